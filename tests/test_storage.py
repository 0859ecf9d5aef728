import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pyarrow import fs

from storage import images
from storage.images import ImageWriter, encode_image, image_key, safe_name, write_imagefolder_metadata
from storage.metadata import METADATA_SCHEMA, STAGE_TYPE, metadata_table, read_metadata
from storage.shards import ShardWriter, list_shards, remove_temp_files, sample_key
from storage.uris import join, resolve

SAFE = re.compile(r"[A-Za-z0-9._-]+")


def _hash8(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def _pixels(height: int = 24, width: int = 32) -> np.ndarray:
    """A smooth gradient, so lossy codecs reproduce it closely."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 255 // width, ys * 255 // height, (xs + ys) * 4 % 256], axis=-1).astype(np.uint8)


# --- safe_name / image_key -------------------------------------------------------------------------


@pytest.mark.parametrize("prompt_id", ["cat", "cat_01.v2-A", "a_b", "x" * 100, "v1.0"])
def test_safe_name_keeps_safe_ids(prompt_id):
    assert safe_name(prompt_id) == prompt_id


def test_safe_name_blocks_path_traversal():
    name = safe_name("../../etc/passwd")
    assert SAFE.fullmatch(name)
    assert not name.startswith(".")
    assert name.endswith("-" + _hash8("../../etc/passwd"))


@pytest.mark.parametrize("prompt_id", [".", "..", ".hidden", "a/b", "a\\b", "café ☕", "tab\there", ""])
def test_safe_name_cleans_unsafe_ids(prompt_id):
    name = safe_name(prompt_id)
    assert name != prompt_id
    assert SAFE.fullmatch(name)
    assert not name.startswith(".")
    assert name.endswith("-" + _hash8(prompt_id))


def test_safe_name_does_not_collide_when_ids_clean_up_alike():
    names = {safe_name(prompt_id) for prompt_id in ["a/b", "a_b", "a b", "a\\b", "a?b"]}
    assert len(names) == 5


def test_safe_name_caps_length_and_keeps_long_ids_apart():
    long_a, long_b = "x" * 300, "x" * 301
    assert len(safe_name(long_a)) == 100
    assert safe_name(long_a) != safe_name(long_b)
    assert len(safe_name("x" * 101)) == 100


def test_image_key():
    assert image_key("cat", 3, "png") == "images/cat-s3.png"
    assert image_key("cat", 3, "jpeg") == "images/cat-s3.jpg"
    assert image_key("a/b", 7, "webp") == f"images/a_b-{_hash8('a/b')}-s7.webp"


# --- encode_image ------------------------------------------------------------------------------------


def test_png_round_trip_is_exact():
    pixels = _pixels()
    data = encode_image(pixels, "png")
    assert data.startswith(b"\x89PNG")
    decoded = Image.open(io.BytesIO(data))
    assert decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), pixels)


@pytest.mark.parametrize(("fmt", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_lossy_formats_decode_to_the_right_size(fmt, pil_format):
    pixels = _pixels(24, 32)
    decoded = Image.open(io.BytesIO(encode_image(pixels, fmt, quality=90)))
    assert decoded.format == pil_format
    assert decoded.size == (32, 24)
    difference = np.abs(np.asarray(decoded.convert("RGB"), dtype=int) - pixels.astype(int))
    assert difference.mean() < 8


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encoding_is_deterministic(fmt):
    assert encode_image(_pixels(), fmt) == encode_image(_pixels().copy(), fmt)


def test_quality_changes_lossy_output():
    noisy = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert len(encode_image(noisy, "jpeg", quality=20)) < len(encode_image(noisy, "jpeg", quality=95))


def test_encode_accepts_non_contiguous_arrays():
    pixels = _pixels(16, 16)
    flipped = pixels[:, ::-1]
    decoded = np.asarray(Image.open(io.BytesIO(encode_image(flipped, "png"))))
    np.testing.assert_array_equal(decoded, flipped)


@pytest.mark.parametrize(
    "pixels",
    [
        np.zeros((4, 4, 3), dtype=np.float32),
        np.zeros((4, 4), dtype=np.uint8),
        np.zeros((4, 4, 4), dtype=np.uint8),
        np.zeros((3, 4, 4), dtype=np.uint8)[..., :0],
        np.zeros((0, 4, 3), dtype=np.uint8),
    ],
)
def test_encode_rejects_wrong_dtype_or_shape(pixels):
    with pytest.raises(ValueError, match="uint8|HxWx3"):
        encode_image(pixels, "png")


@pytest.mark.parametrize(("fmt", "quality"), [("gif", 95), ("jpeg", 0), ("webp", 101)])
def test_encode_rejects_bad_options(fmt, quality):
    with pytest.raises(ValueError, match="format|quality"):
        encode_image(_pixels(), fmt, quality)


# --- ImageWriter -------------------------------------------------------------------------------------


def test_image_writer_writes_file_and_returns_uri_and_sha256(tmp_path):
    pixels = _pixels()
    uri, digest, _ = ImageWriter(str(tmp_path / "out")).write("a/b", 5, pixels)
    assert uri == str(tmp_path / "out" / image_key("a/b", 5, "png"))
    with open(uri, "rb") as file:
        data = file.read()
    assert digest == hashlib.sha256(data).hexdigest()
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)
    assert sorted(os.listdir(tmp_path / "out" / "images")) == [os.path.basename(uri)]


def test_image_writer_overwrites_the_same_key(tmp_path):
    writer = ImageWriter(str(tmp_path), fmt="jpeg")
    first_uri, first_digest, _ = writer.write("cat", 1, _pixels())
    second_uri, second_digest, _ = writer.write("cat", 1, 255 - _pixels())
    assert first_uri == second_uri and first_uri.endswith(".jpg")
    assert first_digest != second_digest
    assert os.listdir(tmp_path / "images") == ["cat-s1.jpg"]


def test_image_writer_resolves_relative_and_file_uris_to_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative_uri, _, _ = ImageWriter("out").write("cat", 1, _pixels())
    file_uri, _, _ = ImageWriter(f"file://{tmp_path}/other").write("cat", 1, _pixels())
    assert relative_uri == str(tmp_path / "out" / "images" / "cat-s1.png")
    assert file_uri == str(tmp_path / "other" / "images" / "cat-s1.png")
    assert os.path.isfile(relative_uri) and os.path.isfile(file_uri)


def test_image_writer_leaves_nothing_behind_when_the_write_fails(tmp_path, monkeypatch):
    def failing_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(images.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        ImageWriter(str(tmp_path)).write("cat", 1, _pixels())
    assert os.listdir(tmp_path / "images") == []


def test_image_writer_rejects_bad_options_up_front(tmp_path):
    with pytest.raises(ValueError, match="quality"):
        ImageWriter(str(tmp_path), fmt="jpeg", quality=0)


# --- uris --------------------------------------------------------------------------------------------


def test_resolve_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    filesystem, path = resolve("out/run")
    assert isinstance(filesystem, fs.LocalFileSystem)
    assert path == str(tmp_path / "out" / "run")
    assert resolve(str(tmp_path))[1] == str(tmp_path)
    file_system, file_path = resolve(f"file://{tmp_path}/x")
    assert isinstance(file_system, fs.LocalFileSystem) and file_path == f"{tmp_path}/x"


def _s3_options(filesystem: fs.S3FileSystem) -> dict:
    return filesystem.__reduce__()[1][0]


def test_resolve_s3_with_explicit_endpoint(monkeypatch):
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    filesystem, path = resolve("s3://bucket/some/key/", endpoint_url="http://127.0.0.1:1")
    assert isinstance(filesystem, fs.S3FileSystem)
    assert path == "bucket/some/key"
    options = _s3_options(filesystem)
    assert (options["scheme"], options["endpoint_override"]) == ("http", "127.0.0.1:1")
    assert filesystem.region == "eu-west-3"


def test_resolve_s3_uses_endpoint_from_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    filesystem, path = resolve("s3://bucket")
    assert path == "bucket"
    assert _s3_options(filesystem)["endpoint_override"] == "127.0.0.1:1"


@pytest.mark.parametrize("uri", ["gs://bucket/key", "http://host/x", "s3://", "s3:///"])
def test_resolve_rejects_unsupported_uris(uri):
    with pytest.raises(ValueError, match=re.escape(repr(uri))) as error:
        resolve(uri)
    assert "s3://bucket/key" in str(error.value)


@pytest.mark.parametrize(
    ("base", "parts", "expected"),
    [
        ("/out", ("images/a.png",), "/out/images/a.png"),
        ("/out/", ("/images/", "a.png"), "/out/images/a.png"),
        ("out", ("metadata",), "out/metadata"),
        ("/", ("images",), "/images"),
        ("s3://bucket", ("images", "a.png"), "s3://bucket/images/a.png"),
        ("s3://bucket/run/", ("images/a.png",), "s3://bucket/run/images/a.png"),
        ("file:///tmp/out", ("a",), "file:///tmp/out/a"),
        ("s3://bucket/run", (), "s3://bucket/run"),
        ("s3://bucket/run", ("", "/"), "s3://bucket/run"),
    ],
)
def test_join(base, parts, expected):
    assert join(base, *parts) == expected


# --- metadata ----------------------------------------------------------------------------------------


def _row(prompt_id: str = "cat", **overrides) -> dict:
    row = {
        "prompt_id": prompt_id,
        "prompt": "a cat",
        "seed": 7,
        "model": "var-d16",
        "width": 256,
        "height": 256,
        "image_uri": f"/out/images/{prompt_id}-s7.png",
        "image_sha256": "ab" * 32,
        "tau": 0.5,
        "latency_ms": 12.5,
        "stages": [{"stage": 0, "height": 1, "width": 1, "tokens": 1, "kept": 1, "latency_ms": 0.25}],
        "status": "ok",
        "error": None,
    }
    return {**row, **overrides}


def test_metadata_schema_field_order():
    assert METADATA_SCHEMA.names == [
        "prompt_id", "prompt", "seed", "model", "width", "height", "image_uri", "image_sha256",
        "tau", "latency_ms", "stages", "status", "error", "written_at", "shard", "sample_key", "image_bytes",
        "keep_masks", "cfg", "temperature", "top_k", "top_p", "negative_prompt", "h_div_w", "weights_fingerprint",
        "source_row",
        "run_id",
    ]  # fmt: skip
    assert METADATA_SCHEMA.field("stages").type == pa.list_(STAGE_TYPE)


def test_metadata_table_fills_missing_optional_keys_with_null():
    error_row = {"prompt_id": "bad", "prompt": "", "seed": 1, "model": "var-d16", "status": "error"}
    table = metadata_table([_row(), {**error_row, "error": "boom", "extra": 1}])
    assert table.schema == METADATA_SCHEMA
    rows = table.to_pylist()
    assert rows[0]["stages"][0]["latency_ms"] == 0.25
    assert rows[1]["image_uri"] is None and rows[1]["tau"] is None and rows[1]["stages"] is None
    assert rows[1]["error"] == "boom"


def test_metadata_table_of_no_rows_is_empty_with_schema():
    table = metadata_table([])
    assert table.num_rows == 0 and table.schema == METADATA_SCHEMA


@pytest.mark.parametrize(("overrides", "message"), [({"seed": None}, "seed"), ({"status": "done"}, "status")])
def test_metadata_table_rejects_incomplete_rows(overrides, message):
    with pytest.raises(ValueError, match=message):
        metadata_table([_row(**overrides)])


def test_read_metadata_round_trip(tmp_path):
    folder = tmp_path / "metadata"
    (folder / "part").mkdir(parents=True)
    pq.write_table(metadata_table([_row("a"), _row("b")]), folder / "0.parquet")
    pq.write_table(metadata_table([_row("c", tau=None)]), folder / "part" / "1.parquet")
    pq.write_table(metadata_table([_row("hidden")]), folder / ".0.parquet.tmp.parquet")
    (folder / "_SUCCESS").write_text("")
    table = read_metadata(str(tmp_path))
    assert table.schema == METADATA_SCHEMA
    assert sorted(table.column("prompt_id").to_pylist()) == ["a", "b", "c"]
    assert table.filter(pc.equal(table["prompt_id"], "c"))["tau"].to_pylist() == [None]


def test_read_metadata_casts_files_written_with_other_types(tmp_path):
    (tmp_path / "metadata").mkdir()
    narrow = pa.table({"prompt_id": ["a"], "seed": pa.array([3], pa.int32()), "width": [64]})
    pq.write_table(narrow, tmp_path / "metadata" / "x.parquet")
    table = read_metadata(str(tmp_path))
    assert table.schema == METADATA_SCHEMA
    assert table.to_pylist()[0]["seed"] == 3 and table.to_pylist()[0]["model"] is None


def test_read_metadata_without_files_is_empty(tmp_path):
    assert read_metadata(str(tmp_path)).num_rows == 0
    (tmp_path / "metadata").mkdir()
    table = read_metadata(str(tmp_path))
    assert table.num_rows == 0 and table.schema == METADATA_SCHEMA


# --- S3 (moto server on localhost) -------------------------------------------------------------------


def test_image_writer_and_read_metadata_on_s3(s3_endpoint):
    writer = ImageWriter("s3://bucket/run/", fmt="webp", endpoint_url=s3_endpoint)
    uri, digest, _ = writer.write("a/b", 2, _pixels())
    assert uri == f"s3://bucket/run/{image_key('a/b', 2, 'webp')}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    stored = s3.get_object(Bucket="bucket", Key=uri.removeprefix("s3://bucket/"))
    assert stored["ContentType"] == "image/webp"
    assert hashlib.sha256(stored["Body"].read()).hexdigest() == digest

    assert read_metadata("s3://bucket/run", endpoint_url=s3_endpoint).num_rows == 0
    buffer = io.BytesIO()
    pq.write_table(metadata_table([_row("a")]), buffer)
    s3.put_object(Bucket="bucket", Key="run/metadata/0.parquet", Body=buffer.getvalue())
    table = read_metadata("s3://bucket/run", endpoint_url=s3_endpoint)
    assert table.column("prompt_id").to_pylist() == ["a"]


# --- WebDataset shards -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt_id", ["cat", "v1.0", "a/b", "../x", ".hidden", "a b.c", "ü", "x" * 200])
def test_sample_keys_hold_no_dots_or_slashes(prompt_id):
    key = sample_key(prompt_id, 7)
    assert re.fullmatch(r"[A-Za-z0-9_-]+-s7", key), key
    assert len(f"{key}.json") <= 100  # a plain tar name, no extension headers needed


def test_sample_keys_keep_safe_ids_and_stay_distinct():
    assert sample_key("cat_01-A", 3) == "cat_01-A-s3"
    keys = {sample_key(pid, 1) for pid in ["a.b", "a_b", "a/b", "a-b", "x" * 200, "x" * 201]}
    assert len(keys) == 6


def _members(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_shard_writer_publishes_a_whole_deterministic_tar(tmp_path):
    samples = {"k1": {"png": b"\x89PNG1", "json": b'{"a": 1}', "txt": b"a cat"}, "k2": {"png": b"\x89PNG2"}}
    for out in ("a", "b"):
        with ShardWriter(str(tmp_path / out), 3) as writer:
            for key, members in samples.items():
                writer.add(key, members)
            assert os.listdir(tmp_path / out / "shards")[0].startswith(".images-000003.tar.")  # hidden until done
            writer.publish()
        assert writer.uri == str(tmp_path / out / "shards" / "images-000003.tar")
        assert os.listdir(tmp_path / out / "shards") == ["images-000003.tar"]
    first, second = (tmp_path / out / "shards" / "images-000003.tar" for out in ("a", "b"))
    assert first.read_bytes() == second.read_bytes()
    names = [(key, ext) for key, members in samples.items() for ext in members]
    assert _members(first) == [(f"{key}.{ext}", samples[key][ext]) for key, ext in names]
    assert list_shards(str(tmp_path / "a")) == {"images-000003.tar"}


def test_shard_writer_leaves_nothing_when_not_published_or_failing(tmp_path):
    with ShardWriter(str(tmp_path), 0) as writer:
        writer.add("k", {"txt": b"x"})
    with pytest.raises(ValueError, match="no dots"):
        ShardWriter(str(tmp_path), 1).add("k.v", {"txt": b"x"})
    (leftover,) = os.listdir(tmp_path / "shards")  # the unfinished shard 1, as if its writer were killed
    assert leftover.startswith(".images-000001.tar.") and leftover.endswith(".tmp")
    assert remove_temp_files(str(tmp_path)) == 1  # what a killed writer left
    assert os.listdir(tmp_path / "shards") == [] and list_shards(str(tmp_path)) == set()


def test_imagefolder_index_of_no_images_removes_the_old_one(tmp_path):
    record = {"file_name": "a-s1.png", "prompt": "a red circle"}
    uri = write_imagefolder_metadata(str(tmp_path), [record])
    assert json.loads(Path(uri).read_text()) == record
    assert write_imagefolder_metadata(str(tmp_path), []) is None
    assert not Path(uri).exists()
    assert write_imagefolder_metadata(str(tmp_path), []) is None  # and nothing to remove is fine


def test_metadata_from_before_the_provenance_columns_reads_them_as_null(tmp_path):
    import pyarrow.parquet as pq

    from storage.metadata import METADATA_SCHEMA, metadata_table, read_metadata, write_metadata_file

    new = ["cfg", "temperature", "top_k", "top_p", "negative_prompt", "h_div_w", "weights_fingerprint", "source_row",
           "run_id"]
    old = metadata_table([{"prompt_id": "a", "prompt": "p", "seed": 1, "model": "tiny", "status": "ok"}])
    old = old.drop_columns(new)
    (tmp_path / "metadata").mkdir()
    pq.write_table(old, tmp_path / "metadata" / "old.parquet")
    write_metadata_file(str(tmp_path), "new.parquet", metadata_table([{"prompt_id": "b", "prompt": "p", "seed": 2,
                        "model": "tiny", "status": "error", "error": "bad", "source_row": 7, "run_id": "r1"}]))
    table = read_metadata(str(tmp_path))
    assert table.schema == METADATA_SCHEMA
    rows = {row["prompt_id"]: row for row in table.to_pylist()}
    assert all(rows["a"][name] is None for name in new)
    assert (rows["b"]["source_row"], rows["b"]["run_id"]) == (7, "r1")
