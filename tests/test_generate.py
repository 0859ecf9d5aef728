"""The shared generation loop on the tiny backend: the spec's invariants end to end, without Ray."""

import math

import numpy as np
import pytest
import torch

from sparsevar.backends import build_backend
from sparsevar.backends.tiny.backend import TinyBackend
from sparsevar.backends.tiny.config import TinyConfig
from sparsevar.config import SamplingConfig, SparseVARConfig
from sparsevar.generate import Request, generate

SMALL = TinyConfig(dim=64, depth=4, heads=2, patch_sizes=[1, 2, 3, 4, 6, 8, 12, 16], decoder_channels=16)
SPARSE = SparseVARConfig(tau=0.5, start_stage=6, score_block=2, anchor_grid=4)
REQUESTS = [Request("a red circle", 1), Request("a green square", 2, "blurry"), Request("two triangles", 3),
            Request("checkered", 4)]


class RecordingTinyBackend(TinyBackend):
    """The real tiny backend, keeping each generation's state so tests can look into its caches."""

    def begin(self, *args):
        self.last_state = super().begin(*args)
        return self.last_state


@pytest.fixture(scope="module")
def backend() -> RecordingTinyBackend:
    torch.set_num_threads(1)
    return RecordingTinyBackend(SMALL, SamplingConfig(), torch.device("cpu"))


def pixels(results) -> list[bytes]:
    return [r.pixels_HWC.tobytes() for r in results]


def test_tau_zero_equals_dense_bit_for_bit(backend):
    dense = generate(backend, REQUESTS, SPARSE.model_copy(update={"enabled": False}))
    tau0 = generate(backend, REQUESTS, SPARSE.model_copy(update={"tau": 0.0}))
    assert pixels(tau0) == pixels(dense)
    assert all(s.kept == s.tokens for r in tau0 for s in r.stages)


def test_sparse_run_differs_from_dense_and_keeps_fewer_tokens(backend):
    dense = generate(backend, REQUESTS[:1], SPARSE.model_copy(update={"enabled": False}))
    sparse = generate(backend, REQUESTS[:1], SPARSE)
    assert pixels(sparse) != pixels(dense)
    assert sum(s.kept for s in sparse[0].stages) < sum(s.tokens for s in sparse[0].stages)


@pytest.mark.parametrize("normalize", ["minmax", "quantile"])
def test_tau_above_one_keeps_exactly_the_anchors_from_start_stage(backend, normalize):
    sv = SPARSE.model_copy(update={"tau": 1.0 if normalize == "minmax" else 1.01, "normalize": normalize})
    for result in generate(backend, REQUESTS, sv):
        for s in result.stages:
            anchors = math.ceil(s.height / 4) * math.ceil(s.width / 4)
            assert s.kept == (anchors if s.stage >= sv.start_stage else s.tokens), s


def test_same_seed_same_bytes_across_runs_and_batch_sizes(backend):
    batched = generate(backend, REQUESTS, SPARSE)
    again = generate(backend, REQUESTS, SPARSE)
    singles = [generate(backend, [r], SPARSE)[0] for r in REQUESTS]
    assert pixels(again) == pixels(batched)
    assert pixels(singles) == pixels(batched)
    assert [r.stages[-1].kept for r in singles] == [r.stages[-1].kept for r in batched]


def test_masks_are_per_image(backend):
    results = generate(backend, REQUESTS, SPARSE)
    assert len({r.stages[-1].kept for r in results}) > 1


def test_kv_cache_holds_only_kept_tokens(backend):
    results = generate(backend, REQUESTS, SPARSE)
    kept_B = [sum(s.kept for s in r.stages) for r in results]
    state = backend.last_state
    for cache in state.caches:
        assert cache.valid_count().tolist() == kept_B * state.branches


@pytest.mark.parametrize("fill", ["logits", "code"])
def test_fill_modes_and_no_anchors_generate_full_images(backend, fill):
    for sv in (SPARSE.model_copy(update={"fill": fill}), SPARSE.model_copy(update={"fill": fill, "anchor_grid": 0})):
        results = generate(backend, REQUESTS[:2], sv)
        assert all(r.pixels_HWC.shape == (32, 32, 3) and r.pixels_HWC.dtype == np.uint8 for r in results)


def test_no_anchors_and_tau_above_one_runs_no_token_in_sparse_stages(backend):
    results = generate(backend, REQUESTS[:2], SPARSE.model_copy(update={"anchor_grid": 0, "tau": 2.0}))
    assert [s.kept for s in results[0].stages if s.stage >= SPARSE.start_stage] == [0, 0, 0]


def test_code_fill_gives_kept_tokens_their_dense_draws(backend):
    """With `code` fill a kept token's random draw does not depend on which others ran, so τ = 0 is dense."""
    dense = generate(backend, REQUESTS[:2], SPARSE.model_copy(update={"enabled": False}))
    code0 = generate(backend, REQUESTS[:2], SPARSE.model_copy(update={"fill": "code", "tau": 0.0}))
    assert pixels(code0) == pixels(dense)


def test_score_block_outside_the_model_is_rejected(backend):
    with pytest.raises(ValueError, match="score_block"):
        generate(backend, REQUESTS[:1], SPARSE.model_copy(update={"score_block": SMALL.depth + 1}))


def test_stage_statistics_describe_the_schedule(backend):
    result = generate(backend, REQUESTS[:1], SPARSE)[0]
    assert [(s.stage, s.height, s.width) for s in result.stages] == [
        (i, p, p) for i, p in enumerate(SMALL.patch_sizes, start=1)
    ]
    assert all(s.latency_ms > 0 for s in result.stages)
    assert result.text_ms > 0 and result.decode_ms > 0  # the parts of a generation outside the stages
    parts = result.text_ms + sum(s.latency_ms for s in result.stages) + result.decode_ms
    assert parts <= result.latency_ms < parts + 50


def test_non_square_aspect_ratio_and_guidance_off(backend):
    b = build_backend(SMALL, SamplingConfig(cfg=1.0), "cpu")
    result = generate(b, [Request("wide", 5, h_div_w=0.5)], SPARSE)[0]
    assert result.pixels_HWC.shape == (22, 46, 3)


def test_random_selection_baseline_is_seeded_and_replaces_the_frequency_scores(backend):
    from sparsevar.generate import random_scores

    scores = random_scores(REQUESTS[:2], 16, stage=7, device=torch.device("cpu"))
    assert sorted(scores[0].tolist()) == [i / 15 for i in range(16)]  # uniform ranks per image
    assert torch.equal(scores, random_scores(REQUESTS[:2], 16, stage=7, device=torch.device("cpu")))
    assert not torch.equal(scores[0], scores[1])
    assert not torch.equal(scores, random_scores(REQUESTS[:2], 16, stage=8, device=torch.device("cpu")))
    sv = SPARSE.model_copy(update={"normalize": "quantile"})
    random = sv.model_copy(update={"selection": "random"})
    first, again = generate(backend, REQUESTS[:2], random), generate(backend, REQUESTS[:2], random)
    assert pixels(first) == pixels(again)
    assert pixels(first) != pixels(generate(backend, REQUESTS[:2], sv))


def test_the_conditional_rows_score_the_next_stage(backend, monkeypatch):
    """With guidance a forward has conditional rows, then unconditional ones; the spec scores the former."""
    requests, B = REQUESTS[:2], 2
    baseline = [s.kept for r in generate(backend, requests, SPARSE) for s in r.stages]
    forward = type(backend).forward

    def zeroed(rows: slice):
        def forward_with_zero_change(self, *args):
            pred, change_Rn = forward(self, *args)
            if change_Rn is not None:
                change_Rn = change_Rn.clone()
                change_Rn[rows] = 0.0
            return pred, change_Rn
        return forward_with_zero_change

    monkeypatch.setattr(type(backend), "forward", zeroed(slice(B, None)))  # the unconditional rows: no effect
    assert [s.kept for r in generate(backend, requests, SPARSE) for s in r.stages] == baseline
    monkeypatch.setattr(type(backend), "forward", zeroed(slice(0, B)))  # flat scores: only the anchors run
    for result in generate(backend, requests, SPARSE):
        for s in result.stages[SPARSE.start_stage - 1:]:
            assert s.kept == math.ceil(s.height / 4) * math.ceil(s.width / 4), s


def test_skipping_the_last_stages_decodes_the_stages_before(backend):
    from sparsevar.config import SpeedupConfig

    dense = SPARSE.model_copy(update={"enabled": False})
    full = generate(backend, REQUESTS, SPARSE)
    assert pixels(generate(backend, REQUESTS, SPARSE, SpeedupConfig(skip_last_stages=0))) == pixels(full)
    skipped = generate(backend, REQUESTS, SPARSE, SpeedupConfig(skip_last_stages=2), record_tokens=True,
                       record_masks=True)
    for image, reference in zip(skipped, full, strict=True):
        assert [s.tokens for s in image.stages] == [s.tokens for s in reference.stages]
        assert [(s.kept, s.latency_ms) for s in image.stages[-2:]] == [(0, 0.0), (0, 0.0)]
        assert [s.kept for s in image.stages[:-2]] == [s.kept for s in reference.stages[:-2]]
        assert len(image.tokens) == len(image.stages) - 2
        assert not any(np.unpackbits(np.frombuffer(m, np.uint8)).any() for m in image.keep_masks[-2:])
    # the same stages' tokens as the full run, and an image decoded from them alone
    for image, reference in zip(skipped, generate(backend, REQUESTS, SPARSE, record_tokens=True), strict=True):
        assert all(torch.equal(a, b) for a, b in zip(image.tokens, reference.tokens, strict=False))
    assert pixels(skipped) != pixels(full)
    dense_skipped = generate(backend, REQUESTS, dense, SpeedupConfig(skip_last_stages=2))
    assert [s.kept for s in dense_skipped[0].stages[:-2]] == [s.tokens for s in dense_skipped[0].stages[:-2]]
    with pytest.raises(ValueError, match="skip_last_stages=8 leaves none"):
        generate(backend, REQUESTS, SPARSE, SpeedupConfig(skip_last_stages=8))


FASTVAR = {"cache_stage": 5, "prune": {6: 0.4, 7: 0.5}, "layers": (2, 3)}


def test_fastvar_prunes_the_sub_layers_it_names_and_restores_from_the_cache_stage(backend):
    from sparsevar.config import FastVARConfig, SpeedupConfig

    dense = SPARSE.model_copy(update={"enabled": False})
    plain = generate(backend, REQUESTS, dense)
    neutral = SpeedupConfig(fastvar=FastVARConfig(**{**FASTVAR, "prune": {6: 0.0, 7: 0.0}}))
    assert pixels(generate(backend, REQUESTS, dense, neutral)) == pixels(plain), "r = 0 runs every token"
    fastvar = SpeedupConfig(fastvar=FastVARConfig(**FASTVAR))
    pruned = generate(backend, REQUESTS, dense, fastvar)
    assert pixels(pruned) != pixels(plain)
    assert [s.kept for s in pruned[0].stages] == [s.kept for s in plain[0].stages]  # FastVAR works inside blocks
    assert [(s.pruned, s.pruned_blocks) for s in pruned[0].stages][4:7] == [(0, 0), (25, 2), (72, 2)]
    lengths = [cache.length for cache in backend.last_state.caches]
    grid = sum(h * w for h, w in backend.schedule(1.0))
    kept_6, kept_7 = 64 - int(64 * 0.4), 144 - int(144 * 0.5)  # stages 6 and 7 are 8x8 and 12x12
    pruned_blocks = grid - 64 - 144 + kept_6 + kept_7
    assert lengths == [grid, pruned_blocks, pruned_blocks, grid], "only the pivotal tokens' keys and values"
    # with SparseVAR: its kept tokens run the unpruned blocks, FastVAR prunes among them in blocks 2 and 3
    both = generate(backend, REQUESTS, SPARSE, fastvar)
    alone = generate(backend, REQUESTS, SPARSE)
    assert [s.kept for s in both[0].stages[:6]] == [s.kept for s in alone[0].stages[:6]]
    assert pixels(both) != pixels(alone)


def test_guidance_on_the_first_stages_only_runs_the_others_on_the_conditional_rows(backend):
    from sparsevar.config import FastVARConfig, SpeedupConfig

    S, B = len(backend.schedule(1.0)), len(REQUESTS)
    full = generate(backend, REQUESTS, SPARSE, record_tokens=True)
    assert pixels(generate(backend, REQUESTS, SPARSE, SpeedupConfig(guidance_stages=S))) == pixels(full)
    cut = generate(backend, REQUESTS, SPARSE, SpeedupConfig(guidance_stages=5), record_tokens=True)
    assert pixels(cut) != pixels(full)
    for image, reference in zip(cut, full, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(image.tokens[:5], reference.tokens[:5], strict=True))
        assert [s.branches for s in image.stages] == [2] * 5 + [1] * (S - 5)
        assert [s.branches for s in reference.stages] == [2] * S
        assert [s.kept for s in image.stages[:6]] == [s.kept for s in reference.stages[:6]]
    assert {cache.k_RHLD.shape[0] for cache in backend.last_state.caches} == {B}, "the uncond rows are gone"
    # FastVAR's reference stage (5) cached both halves; its pruned stages after the cut restore the cond half
    both = generate(backend, REQUESTS, SPARSE, SpeedupConfig(fastvar=FastVARConfig(**FASTVAR), guidance_stages=5))
    assert [s.branches for s in both[0].stages] == [2] * 5 + [1] * (S - 5)
    assert [s.pruned for s in both[0].stages][5] > 0
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        SpeedupConfig(guidance_stages=0)


@pytest.mark.parametrize(("fields", "message"), [
    ({"prune": {6: 0.4}}, "cache_stage must be set"), ({"prune": {6: 0.4}, "cache_stage": 6}, "come before"),
    ({"prune": {6: 1.0}, "cache_stage": 5}, "fractions in"), ({**FASTVAR, "layers": (3, 2)}, "layers must be"),
])
def test_fastvar_settings_are_checked(fields, message):
    from pydantic import ValidationError

    from sparsevar.config import FastVARConfig

    with pytest.raises(ValidationError, match=message):
        FastVARConfig(**fields)


def test_fastvar_needs_its_cache_stage_before_sparsevar_and_fits_the_model(backend):
    from sparsevar.config import FastVARConfig, SpeedupConfig

    late = SpeedupConfig(fastvar=FastVARConfig(cache_stage=6, prune={7: 0.5}))
    with pytest.raises(ValueError, match="must come before SparseVAR's first sparse stage"):
        generate(backend, REQUESTS, SPARSE, late)
    with pytest.raises(ValueError, match="names stage 9 of a 8-stage"):
        generate(backend, REQUESTS, SPARSE, SpeedupConfig(fastvar=FastVARConfig(cache_stage=5, prune={9: 0.5})))
