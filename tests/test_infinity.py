"""The Infinity backend on tiny random-weight checkpoints saved in the official layout and loaded like the real ones."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sparsevar.backends import build_backend, expected_entries
from sparsevar.backends.infinity.schedule import TEMPLATES, rope_table, schedule, template
from sparsevar.backends.infinity.testing import write_checkpoints
from sparsevar.config import SamplingConfig, SparseVARConfig
from sparsevar.generate import Request, generate
from sparsevar.state_dicts import CheckpointMismatch
from workflows import inspect
from workflows.config import load_config

SPARSE = SparseVARConfig(tau=0.5, start_stage=5, score_block=2, anchor_grid=4)  # stages 5-7 of 7 may be sparse
REQUESTS = [Request("a red cat on a sofa", 1), Request("mountains at dawn", 2, "blurry, dark")]


def pixels(results) -> list[bytes]:
    return [r.pixels_HWC.tobytes() for r in results]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_checkpoints(tmp_path_factory.mktemp("infinity"), seed=0)


@pytest.fixture(scope="module")
def backend(files):
    return build_backend(files, SamplingConfig(cfg=3.0), "cpu", "float32")


def test_batch_of_two_generates_images_with_per_image_masks(backend):
    results = generate(backend, REQUESTS, SPARSE)
    assert [r.pixels_HWC.shape for r in results] == [(32, 32, 3)] * 2
    assert all(r.pixels_HWC.dtype == np.uint8 for r in results)
    assert [(s.height, s.width) for s in results[0].stages] == schedule(1.0, "0.06M")
    late = [[s.kept for s in r.stages if s.stage >= SPARSE.start_stage] for r in results]
    assert late[0] != late[1] and all(k < t for r in results for s in r.stages[4:] for k, t in [(s.kept, s.tokens)])


def test_tau_zero_equals_dense_bit_for_bit(backend):
    dense = generate(backend, REQUESTS, SPARSE.model_copy(update={"enabled": False}))
    for fill in ("logits", "code"):
        tau0 = generate(backend, REQUESTS, SPARSE.model_copy(update={"tau": 0.0, "fill": fill}))
        assert pixels(tau0) == pixels(dense)
        assert all(s.kept == s.tokens for r in tau0 for s in r.stages)


def test_tau_one_keeps_only_the_anchors_from_start_stage(backend):
    for result in generate(backend, REQUESTS, SPARSE.model_copy(update={"tau": 1.0})):
        for s in result.stages:
            anchors = math.ceil(s.height / 4) * math.ceil(s.width / 4)
            assert s.kept == (anchors if s.stage >= SPARSE.start_stage else s.tokens), s


def test_same_seed_same_image_and_sparse_differs_from_dense(backend):
    once, again = generate(backend, REQUESTS, SPARSE), generate(backend, REQUESTS, SPARSE)
    assert pixels(once) == pixels(again)
    assert pixels(once) != pixels(generate(backend, REQUESTS, SPARSE.model_copy(update={"enabled": False})))


def test_a_folder_of_safetensors_shards_loads_like_the_single_file(files, backend, tmp_path):
    """The 8B release is a folder of shards with an index; the same weights must give the same images."""
    from safetensors.torch import save_file

    state = torch.load(files.transformer, weights_only=True)
    keys = list(state)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        save_file({k: state[k].contiguous() for k in part}, str(tmp_path / f"model-{i}.safetensors"))
        weight_map.update({k: f"model-{i}.safetensors" for k in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    sharded = build_backend(files.model_copy(update={"transformer": str(tmp_path)}), SamplingConfig(cfg=3.0), "cpu")
    assert pixels(generate(sharded, REQUESTS, SPARSE)) == pixels(generate(backend, REQUESTS, SPARSE))


def test_patchified_tokens_and_other_aspect_ratios(tmp_path):
    """The 8B layout: 2x2 latents per token (4 * bits channels), a 4-level-style VAE, a 3:4 template."""
    cfg = write_checkpoints(tmp_path, {"vae_bits": 4, "spatial_patchify": True}, seed=1)
    backend = build_backend(cfg, SamplingConfig(cfg=1.0), "cpu", "float32")
    requests = [Request("a tall tower", 5, h_div_w=1.3)]
    dense = generate(backend, requests, SPARSE.model_copy(update={"enabled": False}))
    assert dense[0].pixels_HWC.shape == (80, 60, 3)  # 20x15 tokens of 2x2 latents, 2x upsampled
    assert pixels(generate(backend, requests, SPARSE.model_copy(update={"tau": 0.0}))) == pixels(dense)


@pytest.mark.parametrize("name, counts, word_embed, head", [
    ("infinity-2b", (694, 270), (2048, 32), (64, 2048)), ("infinity-8b", (862, 226), (3584, 56), (112, 3584))])
def test_released_configs_expect_the_official_layout(name, counts, word_embed, head):
    """Entry counts and shapes of the official 2B/8B models (checked against the official code's state dicts)."""
    entries = expected_entries(load_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml").model)
    assert (len(entries["transformer"]), len(entries["vae"])) == counts
    assert entries["transformer"]["word_embed.weight"] == word_embed and entries["transformer"]["head.weight"] == head


def test_schedules_follow_the_official_templates():
    assert len(TEMPLATES) == 15
    assert schedule(1.0, "1M")[-1] == (64, 64) and len(schedule(1.0, "1M")) == 13
    assert schedule(0.56, "1M")[-1] == (48, 84) and template(0.56) == 0.571
    assert schedule(1.0, "0.25M") == schedule(1.0, "1M")[:10]
    for grids in TEMPLATES.values():
        h, w = grids[-1]
        assert abs(h * w * 256 - 1024**2) / 1024**2 < 0.07  # ~1 megapixel at 16 pixels a token
    with pytest.raises(ValueError, match="h_div_w"):
        schedule(0.0, "1M")


def test_rope_positions_are_scaled_to_the_last_1m_grid():
    table = rope_table(1.0, 32)  # 8 frequencies per axis
    offset = sum(h * w for h, w in TEMPLATES[1.0][:9])  # stage 10: 32x32 of a 64x64 grid
    last = sum(h * w for h, w in TEMPLATES[1.0][:12])  # stage 13: 64x64
    assert torch.equal(table[:, offset + 32 + 3], table[:, last + 2 * 64 + 6])  # token (1, 3) sits at (2, 6)


def test_inspect_lists_exactly_the_saved_entries(files, tmp_path, capsys):
    config = tmp_path / "infinity.yaml"
    config.write_text(yaml.safe_dump({"model": files.model_dump(exclude_none=True)}))
    assert inspect.main(["--config", str(config)]) == 0
    listed = capsys.readouterr().out.splitlines()
    saved = torch.load(files.transformer, weights_only=True)
    assert {line.split()[1] for line in listed if line.startswith("transformer ")} == set(saved)
    assert inspect.main(["--config", str(config), "--checkpoint", files.transformer]) == 0
    assert inspect.main(["--config", str(config), "--checkpoint", files.vae, "--component", "vae"]) == 0
    assert inspect.main(["--config", str(config), "--checkpoint", files.vae]) == 1  # the VAE is no transformer
    assert len(expected_entries(files)["vae"]) == len(torch.load(files.vae, weights_only=True)["vae"])


def test_missing_truncated_and_mismatched_checkpoints_fail_before_generation(files, tmp_path):
    sampling = SamplingConfig()
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_backend(files.model_copy(update={"transformer": str(tmp_path / "nowhere.pth")}), sampling, "cpu")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(Path(files.transformer).read_bytes()[:5000])
    with pytest.raises(CheckpointMismatch, match="truncated.pth") as error:
        build_backend(files.model_copy(update={"transformer": str(truncated)}), sampling, "cpu")
    assert "not truncated" in str(error.value)
    with pytest.raises(CheckpointMismatch, match="infinity.pth does not hold") as error:
        build_backend(files.model_copy(update={"dim": 128}), sampling, "cpu")
    assert "mis-shaped pos_start: expected 1x1x128, found 1x1x64" in str(error.value)
    with pytest.raises(CheckpointMismatch, match="no 'vae' entry"):
        build_backend(files.model_copy(update={"vae": files.transformer}), sampling, "cpu")
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_backend(files.model_copy(update={"text_encoder": str(tmp_path)}), sampling, "cpu")


def test_gpu_bench_smoke_run(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_bench", Path(__file__).parents[1] / "scripts/gpu/bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    threshold = bench.packing.MIN_PADDING_TO_PACK
    assert bench.main(["--smoke", "--device", "cpu", "--models", "infinity-2b", "--batches", "2", "--runs", "1",
                       "--cuda-graphs", "--decode-experiment", "--unpacked", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    settings = [("dense", None, None), ("sparse", "quantile", 0.6), ("sparse", "minmax", 0.6)]
    eager = [(False, *s, packed) for s in settings for packed in ([True, False] if s[0] == "sparse" else [None])]
    assert [(r["graphs"], r["mode"], r["normalize"], r["tau"], r["packed"]) for r in rows] == [
        *eager, *[(True, *s, None) for s in settings]]  # the A/B is eager: graphs never pack
    assert bench.packing.MIN_PADDING_TO_PACK == threshold  # restored after the unpacked rows
    rows = [r for r in rows if r["packed"] is not False]
    for eager_or_graphs in (rows[:3], rows[3:]):
        assert eager_or_graphs[0]["speedup"] == 1.0
        assert all(r["flops_ratio"] > 1 and r["kept_ratio"] < 1 for r in eager_or_graphs[1:])
    decodes = report["decode_experiment"]
    assert decodes.keys() == {"nchw", "channels_last", "channels_last_phase_upsample", "nchw_torch_group_norm"}
    # a GPU adds bf16 weights
    # fp32 here: the layouts and the phase-split upsampling convolutions differ from NCHW by rounding only
    assert all(d["max_abs_diff_255"] < 0.01 and d["ms"] > 0 and len(d["top_kernels"]) > 3 for d in decodes.values())
    assert [r["same_images_as_first_run"] for r in rows] == [None] * 3 + [True] * 3  # replays, checked in graph rows


def test_t5_features_of_real_tokens_do_not_depend_on_padding():
    """Padding the batch to its longest prompt (ours) gives the features the official 512-token padding gives."""
    from sparsevar.backends.infinity.testing import offline_tokenizer, random_t5
    from sparsevar.backends.infinity.text import T5Text

    tokenizer, cpu = offline_tokenizer(), torch.device("cpu")
    text = T5Text(tokenizer, random_t5(64, layers=2, vocab=len(tokenizer)), cpu, max_tokens=512)
    prompts = ["a red fox", "a bowl of ramen on a wooden table, studio lighting"]
    feats_BTC, mask_BT = text(prompts)
    full = tokenizer(prompts, max_length=512, padding="max_length", truncation=True, return_tensors="pt")
    with torch.inference_mode():
        official_BTC = text.model(input_ids=full.input_ids, attention_mask=full.attention_mask).last_hidden_state
    assert mask_BT.shape[1] == int(full.attention_mask.sum(1).max()) < 100
    assert torch.equal(mask_BT, full.attention_mask[:, :mask_BT.shape[1]].bool())
    torch.testing.assert_close(feats_BTC[mask_BT], official_BTC[:, :mask_BT.shape[1]][mask_BT], rtol=1e-5, atol=1e-5)
