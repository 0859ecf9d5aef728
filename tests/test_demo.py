"""The demo model: procedural scenes, the tokenizer's agreement with the backend, teacher forcing against the
generation loop, the shipped weights and the yardstick."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsevar.backends import build_backend
from sparsevar.backends.tiny.backend import DEMO_WEIGHTS, TinyBackend, TinyModel, load_weights
from sparsevar.backends.tiny.transformer import TextContext
from sparsevar.config import SamplingConfig
from sparsevar.demo import scenes
from sparsevar.demo.tokenizer import Encoder, quantize, stage_inputs
from sparsevar.demo.train import TrainConfig, _batches, demo_model, sequence_layout
from sparsevar.demo.yardstick import ATTRIBUTES, SHIPPED, load_yardstick, pixels, requested
from sparsevar.generate import Request, generate
from workflows import train_demo
from workflows.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_scenes_are_a_function_of_their_seed_and_captions_name_every_shape():
    for seed in range(30):
        (scene, caption), (again, caption_again) = scenes.scene_from_seed(seed), scenes.scene_from_seed(seed)
        assert scene == again and caption == caption_again
        assert np.array_equal(scenes.render(scene, 64), scenes.render(again, 64))
        for shape in scene.shapes:
            assert {shape.shape, shape.colour, shape.fill} <= set(caption.replace(",", "").split())
    images, captions, _ = scenes.batch(range(8), 128)
    assert images.shape == (8, 128, 128, 3) and images.dtype == np.uint8
    assert len(set(captions)) > 4 and images.std() > 20


def test_quantizer_sums_and_stage_inputs_are_what_the_backend_computes():
    cfg = demo_model()
    backend = TinyBackend(cfg, SamplingConfig(), torch.device("cpu"))
    torch.manual_seed(0)
    f = Encoder(cfg.bits, 16, cfg.upsample)(torch.rand(2, 3, 128, 128) * 2 - 1)
    f_hat, codes = quantize(f, cfg.patch_sizes)
    inputs = stage_inputs(codes, cfg.patch_sizes)
    state = backend.begin(["a", "b"], [None, None], 1.0)
    offset = 0
    for stage, q in enumerate(codes, start=1):
        if stage > 1:
            x = backend.stage_input(state, stage)[:2]
            n = x.shape[1]
            torch.testing.assert_close(x, inputs[:, offset:offset + n], rtol=0, atol=1e-6)
            offset += n
        backend.accumulate(state, q.flatten(2).transpose(1, 2), stage)
    torch.testing.assert_close(state.f_hat_BCHW, f_hat, rtol=0, atol=1e-5)
    assert set(torch.cat([c.flatten() for c in codes]).unique().tolist()) == {-0.25, 0.25}


def test_teacher_forcing_gives_the_generation_loops_logits():
    """Training sees, all stages at once, exactly what the cached stage-by-stage loop computes."""
    cfg = demo_model().model_copy(update={"patch_sizes": [1, 2, 3, 4]})
    backend = TinyBackend(cfg, SamplingConfig(cfg=1.0), torch.device("cpu"))
    model = backend.model
    state = backend.begin(["a red solid circle", "a blue striped square at the top"], [None, None], 1.0)
    logits, inputs = [], []
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    for stage in range(1, len(cfg.patch_sizes) + 1):
        x = backend.stage_input(state, stage)
        if stage > 1:
            inputs.append(x)
        pred, _ = backend.forward(state, x, stage, None, None, None)
        logits.append(pred)
        backend.accumulate(state, backend.sample(state, pred, stage, generators, None), stage)
    ids, mask = backend.tokenizer(["a red solid circle", "a blue striped square at the top"], "cpu")
    text = model.text_encoder(ids, mask)
    context = TextContext([b.cross.text_kv(text) for b in model.transformer.blocks], mask[:, None, None, :])
    rope, stage_ids = sequence_layout(cfg)
    with torch.no_grad():
        teacher = model.transformer.forward_teacher(
            torch.cat(inputs, 1), model.transformer.condition(text, mask), rope, stage_ids, context
        )
    torch.testing.assert_close(teacher, torch.cat(logits, 1), rtol=1e-4, atol=1e-4)


def test_yardstick_parses_prompts():
    assert [ATTRIBUTES[i] for i in requested("A Red striped circle, and a blue square")] == [
        "circle", "square", "red", "blue", "striped"]
    assert requested("a photo of a cat") == []


@pytest.mark.skipif(not DEMO_WEIGHTS.exists(), reason="demo weights not shipped yet")
def test_shipped_weights_load_through_the_job_config_and_generate_deterministically():
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["runtime.device=cpu"])
    assert cfg.model.weights == "demo"
    assert DEMO_WEIGHTS.stat().st_size + SHIPPED.stat().st_size <= 40 * 2**20
    backend = build_backend(cfg.model, cfg.sampling, "cpu")
    requests = [Request("a red solid circle in the centre", 3), Request("a blue striped square", 4)]
    first = generate(backend, requests, cfg.sparsevar)
    again = generate(backend, requests, cfg.sparsevar)
    for a, b in zip(first, again, strict=True):
        assert a.pixels_HWC.shape == (128, 128, 3)
        assert np.array_equal(a.pixels_HWC, b.pixels_HWC)
    assert not np.array_equal(first[0].pixels_HWC, first[1].pixels_HWC)


@pytest.mark.skipif(not SHIPPED.exists(), reason="yardstick not shipped yet")
def test_shipped_yardstick_recognises_real_scenes():
    images, captions, _ = scenes.held_out(32, 128)
    assert load_yardstick().score(pixels(images), captions).mean() > 0.9


def test_train_demo_runs_every_phase_and_resumes(tmp_path):
    steps = json.dumps({"tokenizer": 1, "decoder": 1, "transformer": 1, "yardstick": 1})
    assert train_demo.main(["--out", str(tmp_path), "--steps", steps, "--held-out", "2"]) == 0
    for name in ("demo.safetensors", "yardstick.safetensors", "tokenizer.pt", "decoder.pt", "transformer.pt",
                 "summary.json"):
        assert (tmp_path / name).exists()
    load_weights(TinyModel(demo_model()), str(tmp_path / "demo.safetensors"))  # strict: every entry, right shapes
    more = json.dumps({"tokenizer": 2, "decoder": 1, "transformer": 1, "yardstick": 1})
    assert train_demo.main(["--out", str(tmp_path), "--steps", more, "--held-out", "2",
                            "--phases", "tokenizer"]) == 0
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in logged] == [
        ("tokenizer", 1), ("decoder", 1), ("transformer", 1), ("yardstick", 1), ("tokenizer", 2)]


def test_rendering_pool_yields_the_same_batches_in_order():
    """A GPU run renders scenes in worker processes: resuming on another machine must see the same data."""
    cfg = TrainConfig(model=demo_model().model_copy(update={"patch_sizes": [1, 2, 4], "upsample": 2}))
    in_loop = list(_batches(cfg, 2, 3, range(5, 9), workers=0))
    pooled = list(_batches(cfg, 2, 3, range(5, 9), workers=2))
    assert [b[0] for b in pooled] == [5, 6, 7, 8]
    for (step, images, captions, _), (step2, images2, captions2, _) in zip(in_loop, pooled, strict=True):
        assert step == step2 and captions == captions2 and np.array_equal(images, images2)
    assert in_loop[0][2] != in_loop[1][2]


def test_train_demo_recipe_overrides_persist_and_bad_ones_are_refused(tmp_path, capsys):
    recipe = json.dumps({"transformer": {"batch": 3, "steps": 5}, "checkpoint_every": 7})
    quick = ["--out", str(tmp_path), "--phases", "yardstick"]
    assert train_demo.main([*quick, "--recipe", recipe, "--steps", '{"transformer": 4, "yardstick": 0}']) == 0
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["transformer"] == {"steps": 4, "batch": 3, "lr": 0.002} and saved["checkpoint_every"] == 7
    assert train_demo.main(quick) == 0  # a resume without --recipe keeps the recipe DIR was started with
    assert json.loads((tmp_path / "config.json").read_text()) == saved
    for bad, named in (('{"transformr": {"steps": 1}}', "transformr"), ('{"transformer": {"batch": 0}}', "batch"),
                       ('{"seed": {"x": 1}}', "seed takes a value"), ('["seed"]', "JSON object"),
                       ('{"transformer": 5}', "transformer takes an object")):
        with pytest.raises(SystemExit) as exc:
            train_demo.main(["--out", str(tmp_path), "--recipe", bad])
        assert exc.value.code == 2
        assert named in capsys.readouterr().err


@pytest.mark.skipif(not DEMO_WEIGHTS.exists(), reason="demo weights not shipped yet")
def test_readme_main_job_runs_the_demo_model_on_ray(ray_cluster, tmp_path):
    """The README's main command, on a real local cluster: the shipped config and sample prompts."""
    from workflows.generate import EXIT_OK, main

    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--prompts", str(ROOT / "configs" / "prompts" /
            "sample.jsonl"), "--output", str(tmp_path), "--limit", "4", "--set", "ray.num_actors=1"]
    assert main(argv) == EXIT_OK
    images = sorted((tmp_path / "images").glob("*.png"))
    assert len(images) == 4
    from PIL import Image

    assert all(Image.open(p).size == (128, 128) for p in images)
