"""Each step of shared/spec/sparsevar.md on hand-made tensors."""

import math

import pytest
import torch

from sparsevar.attention import KVCache, apply_rope, rope_2d_table
from sparsevar.sparse import (
    anchor_layout,
    block_scores,
    fill_scores,
    fill_tokens,
    gather_tokens,
    interpolate_scores,
    normalize_scores,
    plan_stage,
)


def test_block_scores_is_mean_squared_change_over_channels():
    f_in = torch.zeros(1, 3, 4)
    f_out = torch.tensor([[[1.0, 1, 1, 1], [2, 0, 0, 0], [0, 0, 0, 0]]])
    assert block_scores(f_in, f_out).tolist() == [[1.0, 1.0, 0.0]]


def test_minmax_normalisation_is_per_image():
    d = torch.tensor([[1.0, 3.0, 5.0], [10.0, 10.0, 20.0]])
    s = normalize_scores(d, "minmax")
    assert torch.allclose(s, torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64))
    assert float(s.max()) < 1.0  # the +1e-12 keeps the maximum under 1, so τ = 1 keeps only anchors
    assert float(normalize_scores(torch.tensor([[0.0, 5e4]]), "minmax").max()) < 1.0  # whatever the range


def test_quantile_normalisation_is_rank_over_n_minus_one():
    d = torch.tensor([[0.3, 0.1, 0.9, 0.5, 0.7]])
    assert normalize_scores(d, "quantile").tolist() == [[0.25, 0.0, 1.0, 0.5, 0.75]]


def test_unknown_normalisation_is_rejected():
    with pytest.raises(ValueError, match="quantile"):
        normalize_scores(torch.zeros(1, 2), "zscore")


def test_interpolation_is_bilinear_without_corner_alignment():
    s = torch.tensor([[[0.0, 1.0]]])  # (1, 1, 2) -> (1, 1, 4)
    out = interpolate_scores(s, (1, 4))
    assert torch.allclose(out, torch.tensor([[[0.0, 0.25, 0.75, 1.0]]]))


def test_anchor_positions_follow_the_spec_on_uneven_grids():
    h, w, alpha = 6, 5, 4
    anchor_of, is_anchor = anchor_layout(h, w, alpha)
    anchors = sorted(divmod(int(i), w) for i in torch.nonzero(is_anchor).flatten())
    # cells start at rows 0, 4 and cols 0, 4; edge cells are 2 rows and 1 column wide
    assert anchors == [(2, 2), (2, 4), (5, 2), (5, 4)]
    # every token points at the anchor of its own cell
    for row in range(h):
        for col in range(w):
            anchor_row, anchor_col = divmod(int(anchor_of[row * w + col]), w)
            assert (anchor_row // alpha, anchor_col // alpha) == (row // alpha, col // alpha)
    assert int(is_anchor.sum()) == math.ceil(h / alpha) * math.ceil(w / alpha)


def test_keep_mask_keeps_scores_at_or_above_tau_and_every_anchor():
    anchor_of, is_anchor = anchor_layout(4, 4, 2)
    score = torch.zeros(1, 16)
    score[0, 0] = 0.7
    score[0, 5] = 0.6  # 5 = (1, 1) is already an anchor
    score[0, 6] = 0.59
    plan = plan_stage(score, 0.6, anchor_of)
    expected = is_anchor.clone()
    expected[0] = True
    assert torch.equal(plan.keep_BL[0], expected)
    assert plan.counts_B.tolist() == [5]


def test_plan_pads_kept_lists_and_points_excluded_tokens_at_their_anchor():
    anchor_of, _ = anchor_layout(2, 4, 2)  # anchors at flat 5 and 7
    score = torch.tensor([[0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0] * 8])
    plan = plan_stage(score, 0.5, anchor_of)
    assert plan.kept_idx_Bn.tolist() == [[0, 5, 7], [5, 7, 0]]
    assert plan.valid_Bn.tolist() == [[True, True, True], [True, True, False]]
    # image 0: token 0 runs itself (rank 0); tokens of the left cell take anchor 5 (rank 1), right cell 7 (rank 2)
    assert plan.src_idx_BL[0].tolist() == [0, 1, 2, 2, 1, 1, 2, 2]
    assert plan.src_idx_BL[1].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]


@pytest.mark.parametrize("alpha", [4, 0])
def test_rounded_counts_add_each_images_best_excluded_tokens(alpha):
    """CUDA graphs round kept counts up (plan_stage's multiple): the extra tokens are the best-scoring excluded,
    every token that met τ or is an anchor stays, and excluded tokens still take their anchor's row."""
    anchor_of, is_anchor = anchor_layout(8, 8, 4) if alpha else (None, None)
    score = torch.rand(3, 64, generator=torch.Generator().manual_seed(0))
    score[0, 5] = 0.7  # exactly at τ: kept
    score[1, 9] = float("nan")  # never displaces a kept token
    score[2] = 1.0  # every token kept: no rounding past the grid
    exact = plan_stage(score, 0.7, anchor_of, is_anchor)
    rounded = plan_stage(score, 0.7, anchor_of, is_anchor, multiple=16)
    assert list(rounded.counts) == [-(-c // 16) * 16 for c in exact.counts[:2]] + [64]
    assert bool(rounded.keep_BL[0, 5])
    for b in range(2):
        assert bool((rounded.keep_BL[b] >= exact.keep_BL[b]).all())
        extra, left_out = rounded.keep_BL[b] & ~exact.keep_BL[b], ~rounded.keep_BL[b]
        if extra.any():
            assert score[b][extra].nan_to_num(-1).min() >= score[b][left_out].nan_to_num(-1).max()
        kept_positions = rounded.kept_idx_Bn[b][: rounded.counts[b]].tolist()
        for token in left_out.nonzero().flatten().tolist():
            source = rounded.src_idx_BL[b, token].item()
            assert source == (kept_positions.index(int(anchor_of[token])) if alpha else -1)
    assert rounded.has_sources == bool(alpha)


def test_without_anchors_excluded_tokens_have_no_source():
    score = torch.tensor([[0.9, 0.1, 0.8, 0.2]])
    plan = plan_stage(score, 0.5, None)
    assert plan.kept_idx_Bn.tolist() == [[0, 2]]
    assert plan.src_idx_BL.tolist() == [[0, -1, 1, -1]]


def test_fill_copies_the_anchor_row_and_zeroes_tokens_without_source():
    kept = torch.tensor([[[1.0, 1.0], [2.0, 2.0]]])
    full = fill_tokens(kept, torch.tensor([[0, 1, 1, -1]]))
    assert full.tolist() == [[[1.0, 1.0], [2.0, 2.0], [2.0, 2.0], [0.0, 0.0]]]


def test_gather_takes_rows_at_positions():
    x = torch.arange(12.0).view(1, 6, 2)
    assert gather_tokens(x, torch.tensor([[4, 1]])).tolist() == [[[8.0, 9.0], [2.0, 3.0]]]


def test_excluded_tokens_take_their_anchor_score_and_anchorless_ones_the_floor():
    d_kept = torch.tensor([[0.5, 0.25, 0.75]])
    assert fill_scores(d_kept, torch.tensor([[0, 1, 1, 2]])).tolist() == [[0.5, 0.25, 0.25, 0.75]]
    assert fill_scores(d_kept, torch.tensor([[0, -1, 1, 2]])).tolist() == [[0.5, 0.25, 0.25, 0.75]]


def test_kv_cache_keeps_only_valid_rows_visible():
    cache = KVCache(rows=2, heads=1, capacity=6, head_dim=4, device="cpu", dtype=torch.float32)
    k, v, mask = cache.extend(torch.ones(2, 1, 2, 4), torch.ones(2, 1, 2, 4), None)
    assert mask is None and k.shape[2] == 2
    valid = torch.tensor([[True, True, True], [True, False, False]])
    k, v, mask = cache.extend(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4), valid)
    assert k.shape[2] == 5
    assert mask[:, 0, 0].tolist() == [[True] * 5, [True, True, True, False, False]]
    assert cache.valid_count().tolist() == [5, 3]
    with pytest.raises(RuntimeError, match="overflow"):
        cache.extend(torch.zeros(2, 1, 2, 4), torch.zeros(2, 1, 2, 4), None)


def test_rope_at_gathered_positions_equals_rope_of_the_full_grid_gathered():
    table = rope_2d_table(4, 4, 8, (8, 8))
    x = torch.randn(1, 2, 16, 8)
    full = apply_rope(x, table[:, None])
    positions = torch.tensor([[3, 9, 14]])
    sub = apply_rope(x[:, :, positions[0]], table[:, positions])
    assert torch.allclose(sub, full[:, :, positions[0]])
    # positions are scaled to the last grid: stage (2, 2) token (1, 1) sits where (4, 4)'s token (2, 2) does
    coarse = rope_2d_table(2, 2, 8, (8, 8))
    assert torch.allclose(coarse[:, 3], table[:, 2 * 4 + 2])


def test_a_reset_cache_forgets_the_padding_of_the_last_generation():
    cache = KVCache(rows=1, heads=1, capacity=6, head_dim=4, device="cpu", dtype=torch.float32)
    k = torch.zeros(1, 1, 3, 4)
    cache.extend(k, k, torch.tensor([[True, False, False]]))
    cache.reset()
    _, _, mask = cache.extend(k, k, None)  # dense: attends to all, and later masks must agree
    assert mask is None
    _, _, mask = cache.extend(k, k, torch.tensor([[True, True, False]]))
    assert mask.flatten().tolist() == [True, True, True, True, True, False]
