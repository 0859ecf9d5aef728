"""The HART backend on a tiny random-weight model saved in the official folder layout and loaded by the real
loader: SparseVAR invariants through the shared loop, the diffusion head's sparsity, errors and inspect."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsevar.backends import build_backend, expected_entries
from sparsevar.backends.hart.backend import HartBackend, build, load_parts
from sparsevar.backends.hart.config import HartConfig
from sparsevar.backends.hart.testing import TINY_ARCH, TINY_TOK, TextArch, write_folders
from sparsevar.backends.hart.tokenizer import TRAINING_ONLY
from sparsevar.config import SamplingConfig, SparseVARConfig
from sparsevar.generate import Request, generate
from workflows import inspect

ARCH, TOK = TINY_ARCH, TINY_TOK
SPARSE = SparseVARConfig(tau=0.5, start_stage=4, score_block=2, anchor_grid=2, fill="code")
DENSE = SparseVARConfig(enabled=False)
SAMPLING = SamplingConfig(cfg=4.5, top_p=1.0)
REQUESTS = [Request("a red cat on a sofa", 1), Request("a lighthouse at dusk", 2, "blurry")]
CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


class RecordingHartBackend(HartBackend):
    """The real backend, counting the rows its diffusion head denoises."""

    def _residuals(self, state, hidden_RnC, idx_Bn, generators, positions_Bn, tokens):
        self.diffusion_rows = idx_Bn.numel()
        return super()._residuals(state, hidden_RnC, idx_Bn, generators, positions_Bn, tokens)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_folders(tmp_path_factory.mktemp("hart"), ARCH, TOK, TextArch(hidden_size=ARCH.context_dim))


@pytest.fixture(scope="module")
def cfg(folders) -> HartConfig:
    return HartConfig(llm=str(folders.llm), tokenizer=str(folders.tokenizer), text_encoder=str(folders.text_encoder))


@pytest.fixture(scope="module")
def backend(cfg) -> RecordingHartBackend:
    return RecordingHartBackend(cfg, SAMPLING, load_parts(cfg, CPU, torch.float32), CPU)


def pixels(results) -> list[bytes]:
    return [r.pixels_HWC.tobytes() for r in results]


def test_builds_through_the_registry_and_decodes_square_images(cfg):
    b = build_backend(cfg, SAMPLING, "cpu")
    results = generate(b, REQUESTS, DENSE)
    side = ARCH.patch_nums[-1] * 2 ** (len(TOK.ch_mult) - 1)
    assert all(r.pixels_HWC.shape == (side, side, 3) and r.pixels_HWC.dtype == np.uint8 for r in results)
    assert pixels(results)[0] != pixels(results)[1]


@pytest.mark.parametrize("fill", ["code", "logits"])
def test_tau_zero_equals_dense_bit_for_bit(backend, fill):
    dense = generate(backend, REQUESTS, DENSE, record_tokens=True)
    tau0 = generate(backend, REQUESTS, SPARSE.model_copy(update={"tau": 0.0, "fill": fill}), record_tokens=True)
    assert pixels(tau0) == pixels(dense)
    for a, b in zip(dense, tau0, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens, strict=True))
        assert all(s.kept == s.tokens for s in b.stages)


def test_tau_above_one_keeps_only_the_anchors_from_start_stage(backend):
    for result in generate(backend, REQUESTS, SPARSE.model_copy(update={"tau": 1.0})):
        for s in result.stages:
            anchors = math.ceil(s.height / 2) * math.ceil(s.width / 2)
            assert s.kept == (anchors if s.stage >= SPARSE.start_stage else s.tokens), s


def test_diffusion_head_runs_only_for_kept_tokens_and_excluded_tokens_copy_their_anchor(backend):
    result = generate(backend, REQUESTS[:1], SPARSE.model_copy(update={"tau": 1.0}), record_tokens=True)[0]
    last = result.stages[-1]
    assert backend.diffusion_rows == last.kept < last.tokens
    h, w = last.height, last.width
    tokens_hwC = result.tokens[-1].reshape(h, w, -1)
    for i in range(h):
        for j in range(w):
            anchor = (i - i % 2 + min(1, h - 1 - (i - i % 2)), j - j % 2 + min(1, w - 1 - (j - j % 2)))
            assert torch.equal(tokens_hwC[i, j], tokens_hwC[anchor])


def test_batch_of_two_has_per_image_masks_and_matches_single_runs(backend):
    batched = generate(backend, REQUESTS, SPARSE)
    singles = [generate(backend, [r], SPARSE)[0] for r in REQUESTS]
    assert pixels(singles) == pixels(batched)
    assert [r.stages[-1].kept for r in singles] == [r.stages[-1].kept for r in batched]
    assert all(s.kept < s.tokens for r in batched for s in r.stages if s.stage >= SPARSE.start_stage)


def test_sparse_run_differs_from_dense(backend):
    assert pixels(generate(backend, REQUESTS[:1], SPARSE)) != pixels(generate(backend, REQUESTS[:1], DENSE))


def test_guidance_off_runs_one_branch(cfg):
    b = build(cfg, SamplingConfig(cfg=0.0, top_p=1.0), CPU, torch.float32)
    assert b.branches(b.begin(["a cat"], [None], 1.0)) == 1
    assert generate(b, REQUESTS[:1], SPARSE)[0].pixels_HWC.shape[-1] == 3


def test_non_square_images_are_refused(backend):
    with pytest.raises(ValueError, match="square"):
        generate(backend, [Request("wide", 1, h_div_w=0.5)], DENSE)


def test_clear_errors_for_missing_folders_files_and_other_architectures(cfg, folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="model.llm"):
        build(cfg.model_copy(update={"llm": str(tmp_path / "nowhere")}), SAMPLING, CPU, torch.float32)
    llm = tmp_path / "llm"
    shutil.copytree(folders.llm, llm)
    (llm / "ema_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="ema_model.bin"):
        build(cfg.model_copy(update={"llm": str(llm)}), SAMPLING, CPU, torch.float32)
    config = json.loads((llm / "config.json").read_text())
    (llm / "config.json").write_text(json.dumps({**config, "attn_type": "gpt2"}))
    with pytest.raises(ValueError, match="attn_type='gpt2'"):
        build(cfg.model_copy(update={"llm": str(llm)}), SAMPLING, CPU, torch.float32)
    (llm / "config.json").write_text(json.dumps({**config, "depth": ARCH.depth + 1}))
    shutil.copy(folders.llm / "ema_model.bin", llm / "ema_model.bin")
    with pytest.raises(ValueError, match="blocks.4"):
        build(cfg.model_copy(update={"llm": str(llm)}), SAMPLING, CPU, torch.float32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.text_encoder"):
        build(cfg.model_copy(update={"text_encoder": str(tmp_path / "empty")}), SAMPLING, CPU, torch.float32)
    with pytest.raises(ValueError, match="URI"):
        build(cfg.model_copy(update={"tokenizer": "s3://bucket/tokenizer"}), SAMPLING, CPU, torch.float32)


def test_inspect_lists_the_entries_of_the_saved_files(cfg, folders, tmp_path, capsys):
    from safetensors.torch import load_file

    llm = torch.load(folders.llm / "ema_model.bin", weights_only=True)
    tokenizer = {k: v for k, v in load_file(folders.tokenizer / "model.safetensors").items()
                 if not k.startswith(TRAINING_ONLY)}
    entries = expected_entries(cfg)
    assert entries["llm"] == {k: tuple(v.shape) for k, v in llm.items()}
    assert entries["tokenizer"] == {k: tuple(v.shape) for k, v in tokenizer.items()}
    assert any(k.startswith("diffloss.net.") for k in entries["llm"])

    config = tmp_path / "hart.yaml"
    config.write_text(f"model: {json.dumps(cfg.model_dump())}\n")
    assert inspect.main(["--config", str(config)]) == 0
    listed = {tuple(line.split()[:2]) for line in capsys.readouterr().out.splitlines()}
    assert listed == {(c, k) for c, keys in entries.items() for k in keys}
    assert inspect.main(["--config", str(config), "--checkpoint", str(folders.llm / "ema_model.bin")]) == 0


def test_inspect_lists_hart_0_7b_for_the_shipped_config_without_its_folders(capsys):
    assert inspect.main(["--config", str(REPO / "configs/hart-0.7b.yaml")]) == 0
    listed = dict(line.rsplit(" ", 1) for line in capsys.readouterr().out.splitlines())
    assert listed["llm blocks.15.ffn.gate_proj.weight"] == "4096x1536"
    assert listed["llm diffloss.net.res_blocks.5.mlp.0.weight"] == "1024x1024"
    assert listed["tokenizer vae.quantize.embedding.weight"] == "4096x32"


def test_gpu_bench_smoke_run_on_cpu(capsys, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "scripts/gpu/bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--smoke", "--device", "cpu", "--models", "hart-0.7b", "--batches", "2", "--runs", "1",
                       "--out", str(out)]) == 0
    assert "| hart-0.7b | 2 | minmax τ=0.6 |" in capsys.readouterr().out
    assert len(json.loads(out.read_text())["rows"]) == 3


def test_folders_from_s3_are_fetched_once_into_the_cache_and_load(cfg, folders, backend, tmp_path, monkeypatch):
    import boto3
    from moto.server import ThreadedMotoServer

    from storage.checkpoints import localize_checkpoints

    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="models")
        for role in ("llm", "tokenizer", "text_encoder"):
            for path in getattr(folders, role).iterdir():
                s3.upload_file(str(path), "models", f"hart/{role}/{path.name}")
        remote = cfg.model_copy(update={role: f"s3://models/hart/{role}" for role in ("llm", "tokenizer",
                                                                                       "text_encoder")})
        local = localize_checkpoints(remote, str(tmp_path / "cache"), endpoint)
        assert all(getattr(local, role).startswith(str(tmp_path / "cache")) for role in ("llm", "text_encoder"))
        fetched = build(local, SAMPLING, CPU, torch.float32)
        assert pixels(generate(fetched, REQUESTS[:1], DENSE)) == pixels(generate(backend, REQUESTS[:1], DENSE))
    finally:
        server.stop()
