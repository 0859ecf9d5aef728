"""Checkpoint resolution: local paths checked in place, s3:// files and folders downloaded once into the cache."""

import hashlib

import boto3
import pytest

from sparsevar.backends.infinity.config import InfinityConfig
from storage.checkpoints import CheckpointError, fetch_checkpoint, localize_checkpoints

DATA = b"weights" * 1000
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def s3_endpoint(s3_endpoint):
    """The session's loopback S3 endpoint, with this module's checkpoint objects (put again for every test)."""
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.put_object(Bucket="bucket", Key="models/infinity_2b_reg.pth", Body=DATA)
    s3.put_object(Bucket="bucket", Key="models/vae.pth", Body=b"vae")
    s3.put_object(Bucket="bucket", Key="models/flan-t5-xl/config.json", Body=b"{}")
    s3.put_object(Bucket="bucket", Key="models/flan-t5-xl/tokenizer/spiece.model", Body=b"sp")
    return s3_endpoint


def test_local_file_is_checked_in_place(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(DATA)
    cache = str(tmp_path / "cache")
    assert fetch_checkpoint(str(path), SHA, len(DATA), cache) == str(path)
    assert fetch_checkpoint(f"file://{path}", SHA, cache_dir=cache) == str(path)  # remembered: no re-hash
    with pytest.raises(CheckpointError, match=r"model.pth has 7000 bytes, expected 9000 \(truncated"):
        fetch_checkpoint(str(path), size=9000, cache_dir=cache)
    with pytest.raises(CheckpointError, match="model.pth has sha256 .* expected 00"):
        fetch_checkpoint(str(path), "00" * 32, cache_dir=cache)
    with pytest.raises(CheckpointError, match="missing.pth not found"):
        fetch_checkpoint(str(tmp_path / "missing.pth"), cache_dir=cache)
    with pytest.raises(CheckpointError, match="unsupported location"):
        fetch_checkpoint("gs://bucket/model.pth", cache_dir=cache)


def test_s3_file_and_folder_download_once_into_the_cache(s3_endpoint, tmp_path):
    cache = str(tmp_path / "cache")
    local = fetch_checkpoint("s3://bucket/models/infinity_2b_reg.pth", SHA, len(DATA), cache, s3_endpoint)
    assert open(local, "rb").read() == DATA and local.startswith(cache)
    boto3.client("s3", endpoint_url=s3_endpoint).delete_object(Bucket="bucket", Key="models/infinity_2b_reg.pth")
    assert fetch_checkpoint("s3://bucket/models/infinity_2b_reg.pth", SHA, None, cache, s3_endpoint) == local
    folder = fetch_checkpoint("s3://bucket/models/flan-t5-xl/", cache_dir=cache, endpoint_url=s3_endpoint)
    assert open(f"{folder}/tokenizer/spiece.model", "rb").read() == b"sp"


def test_s3_problems_name_the_file(s3_endpoint, tmp_path):
    cache = str(tmp_path / "cache")
    with pytest.raises(CheckpointError, match="s3://bucket/models/nothing.pth not found"):
        fetch_checkpoint("s3://bucket/models/nothing.pth", cache_dir=cache, endpoint_url=s3_endpoint)
    with pytest.raises(CheckpointError, match="vae.pth has sha256"):
        fetch_checkpoint("s3://bucket/models/vae.pth", "ab" * 32, cache_dir=cache, endpoint_url=s3_endpoint)
    with pytest.raises(CheckpointError, match="vae.pth has 3 bytes, expected 4"):  # and no stale file is kept
        fetch_checkpoint("s3://bucket/models/vae.pth", size=4, cache_dir=cache, endpoint_url=s3_endpoint)


def test_localize_checkpoints_resolves_every_checkpoint_field(s3_endpoint, tmp_path):
    cfg = InfinityConfig(transformer="s3://bucket/models/infinity_2b_reg.pth", transformer_size=len(DATA),
                         vae="s3://bucket/models/vae.pth", text_encoder="s3://bucket/models/flan-t5-xl")
    local = localize_checkpoints(cfg, str(tmp_path / "cache"), s3_endpoint)
    assert local.transformer.endswith("models/infinity_2b_reg.pth") and not local.transformer.startswith("s3:")
    assert local.text_encoder.endswith("models/flan-t5-xl") and local.dim == cfg.dim
    assert localize_checkpoints("not a config") == "not a config"


def test_fingerprint_tells_weights_apart_by_name_size_and_content_and_ignores_mtimes(tmp_path, monkeypatch):
    import os

    from sparsevar.backends import weight_files
    from sparsevar.backends.tiny.config import TinyConfig
    from storage import checkpoints

    folder = tmp_path / "llm"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "ema_model.bin").write_bytes(DATA)
    first = checkpoints.fingerprint([str(folder)])
    os.utime(folder / "ema_model.bin", (1, 1))  # a fresh download on another node: same files, other times
    assert checkpoints.fingerprint([str(folder)]) == first
    (folder / "ema_model.bin").write_bytes(DATA[:-1] + b"X")
    assert checkpoints.fingerprint([str(folder)]) not in (first, None)
    assert checkpoints.fingerprint([]) is None  # random weights have no files
    demo = weight_files(TinyConfig(backend="tiny", weights="demo"))
    assert len(demo) == 1 and checkpoints.fingerprint(demo) == checkpoints.fingerprint(demo)
    assert weight_files(TinyConfig(backend="tiny")) == []
    # a large file is read at its ends only: a change in its middle goes unseen, one at an end does not
    monkeypatch.setattr(checkpoints, "FINGERPRINT_WHOLE", 100)
    monkeypatch.setattr(checkpoints, "FINGERPRINT_END", 10)
    big = tmp_path / "big.pth"
    big.write_bytes(bytes(1000))
    whole = checkpoints.fingerprint([str(big)])
    big.write_bytes(bytes(500) + b"x" + bytes(499))
    assert checkpoints.fingerprint([str(big)]) == whole
    big.write_bytes(bytes(999) + b"x")
    assert checkpoints.fingerprint([str(big)]) != whole
