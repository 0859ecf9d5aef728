"""The token-selection steps of SparseVAR (`shared/spec/sparsevar.md`, steps 1-7), as pure tensor functions.

Layouts: B images, L = h*w tokens of a stage in row-major order, n = kept tokens padded to the batch maximum.
"""

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

EPS = 1e-12


def block_scores(f_in_BnC: torch.Tensor, f_out_BnC: torch.Tensor) -> torch.Tensor:
    """Step 1: per-token MSE between a block's input and output, D = mean_c (F_out - F_in)^2."""
    return (f_out_BnC.float() - f_in_BnC.float()).pow(2).mean(dim=-1)


def normalize_scores(d_BL: torch.Tensor, mode: str) -> torch.Tensor:
    """Step 2: per-image normalisation to [0, 1] in float64: min-max, or rank / (n - 1) for `quantile`.

    Min-max is (D - min) / (max - min + 1e-12), capped at 1 - 1e-12: in float32 the 1e-12 vanishes and the
    maximum would reach 1, so τ = 1 would keep more than the anchors, which the formula never does.
    """
    d_BL = d_BL.double()
    if mode == "minmax":
        lo = d_BL.amin(dim=1, keepdim=True)
        hi = d_BL.amax(dim=1, keepdim=True)
        return ((d_BL - lo) / (hi - lo + EPS)).clamp(max=1.0 - EPS)
    if mode == "quantile":
        n = d_BL.shape[1]
        ranks = d_BL.argsort(dim=1, stable=True).argsort(dim=1, stable=True)
        return ranks.double() / max(n - 1, 1)
    raise ValueError(f"unknown normalize mode {mode!r}: use 'minmax' or 'quantile'")


def interpolate_scores(s_Bhw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Step 3: bilinear (align_corners=False) resize of a (B, h, w) score map to the next stage's grid."""
    return F.interpolate(s_Bhw.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


@lru_cache(maxsize=256)
def _anchor_layout(h: int, w: int, alpha: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.arange(h), torch.arange(w)
    top, left = rows - rows % alpha, cols - cols % alpha
    cell_h = torch.clamp(h - top, max=alpha)
    cell_w = torch.clamp(w - left, max=alpha)
    anchor_row = top + torch.minimum(torch.full_like(top, alpha // 2), cell_h - 1)
    anchor_col = left + torch.minimum(torch.full_like(left, alpha // 2), cell_w - 1)
    anchor_of_L = (anchor_row[:, None] * w + anchor_col[None, :]).reshape(-1)
    is_anchor_L = anchor_of_L == torch.arange(h * w)
    return anchor_of_L.to(device), is_anchor_L.to(device)


def anchor_layout(h: int, w: int, alpha: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4: for every token, the flat index of its α×α cell's anchor, and whether it is an anchor.

    Cells start at the top-left corner; edge cells may be smaller; the anchor sits at
    (top + min(α//2, cell_h-1), left + min(α//2, cell_w-1)). Cached per grid and device, so a stage copies
    nothing to the device; callers must not modify the tensors.
    """
    if alpha < 1:
        raise ValueError("anchor_grid must be >= 1 to place anchors")
    return _anchor_layout(h, w, alpha, torch.device(device))


@dataclass(frozen=True)
class KeepPlan:
    """Which tokens of one stage run through the transformer, and where each token takes its prediction.

    keep_BL: token runs (score >= τ, or anchor, or one of the best-scoring extras that round its count up).
    kept_idx_Bn: flat positions of the kept tokens in ascending order, padded with 0 to the batch maximum.
    valid_Bn: False on padding; None when no image needed padding.
    src_idx_BL: for each token, its index in the kept list: its own if kept, else its anchor's; -1 for none.
    counts: kept tokens per image, on the host.
    has_sources: no token has source -1 (there are anchors, or every token is kept), so fills need no mask.
    """

    keep_BL: torch.Tensor
    kept_idx_Bn: torch.Tensor
    valid_Bn: torch.Tensor | None
    src_idx_BL: torch.Tensor
    counts: tuple[int, ...]
    has_sources: bool

    @property
    def counts_B(self) -> torch.Tensor:
        return self.keep_BL.sum(dim=1)


def plan_stage(
    score_BL: torch.Tensor, tau: float, anchor_of_L: torch.Tensor | None, is_anchor_L: torch.Tensor | None = None,
    multiple: int = 1,
) -> KeepPlan:
    """Step 5 and the bookkeeping for 6-7: keep S >= τ and every anchor; index kept tokens and fill sources.

    is_anchor_L (from `anchor_layout`) saves recomputing it from anchor_of_L. The kept counts are the plan's one
    read from the device: they set the shape of the kept tensors. multiple > 1 (a departure from the spec, for
    CUDA graphs, which need few distinct shapes) rounds each image's count up to a multiple, or to every token,
    with its highest-scoring excluded tokens: they run and take their own prediction rather than pad.
    """
    keep_BL = score_BL >= tau
    if anchor_of_L is not None:
        if is_anchor_L is None:
            is_anchor_L = anchor_of_L == torch.arange(anchor_of_L.numel(), device=anchor_of_L.device)
        keep_BL = keep_BL | is_anchor_L
    if multiple > 1:  # a target past the grid keeps every token
        target_B = (keep_BL.sum(dim=1) + multiple - 1) // multiple * multiple
        priority_BL = torch.where(keep_BL, torch.inf, score_BL.double().nan_to_num(nan=-torch.inf))
        order_BL = priority_BL.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
        keep_BL = order_BL < target_B[:, None]
    counts_B = keep_BL.sum(dim=1)
    counts = tuple(counts_B.tolist())
    n = max(counts)
    # Stable sort of "not kept" puts kept positions first, in ascending order.
    kept_idx_Bn = torch.argsort((~keep_BL).to(torch.int8), dim=1, stable=True)[:, :n]
    valid_Bn = None
    if min(counts) < n:
        valid_Bn = torch.arange(n, device=keep_BL.device)[None, :] < counts_B[:, None]
        kept_idx_Bn = torch.where(valid_Bn, kept_idx_Bn, torch.zeros_like(kept_idx_Bn))
    rank_BL = keep_BL.cumsum(dim=1) - 1
    if anchor_of_L is None:
        src_idx_BL = torch.where(keep_BL, rank_BL, torch.full_like(rank_BL, -1))
    else:
        src_idx_BL = torch.where(keep_BL, rank_BL, rank_BL[:, anchor_of_L])
    has_sources = anchor_of_L is not None or min(counts) == keep_BL.shape[1]
    return KeepPlan(keep_BL, kept_idx_Bn, valid_Bn, src_idx_BL, counts, has_sources)


def gather_tokens(x_BLC: torch.Tensor, idx_Bn: torch.Tensor) -> torch.Tensor:
    """Rows of x at the given token positions: (B, L, C) -> (B, n, C)."""
    return torch.gather(x_BLC, 1, idx_Bn.unsqueeze(-1).expand(-1, -1, x_BLC.shape[-1]))


def fill_tokens(x_BnC: torch.Tensor, src_idx_BL: torch.Tensor, has_sources: bool | None = None) -> torch.Tensor:
    """Step 7: a full (B, L, C) map from the kept rows; a token with source -1 gets zeros.

    has_sources (`KeepPlan.has_sources`): whether no source is -1; None reads it from the device.
    """
    if x_BnC.shape[1] == 0:
        return x_BnC.new_zeros(*src_idx_BL.shape, x_BnC.shape[-1])
    if has_sources is None:
        has_sources = bool((src_idx_BL >= 0).all())
    if has_sources:
        return gather_tokens(x_BnC, src_idx_BL)
    out_BLC = gather_tokens(x_BnC, src_idx_BL.clamp(min=0))
    return out_BLC * (src_idx_BL >= 0).unsqueeze(-1).to(out_BLC.dtype)


def fill_scores(d_Bn: torch.Tensor, src_idx_BL: torch.Tensor, has_sources: bool | None = None) -> torch.Tensor:
    """Scores of a full stage from the tokens that ran: excluded tokens take their anchor's score.

    With no anchors (src -1) the spec is silent; such a token takes the lowest score that ran in its image,
    which leaves the min-max normalisation of the others unchanged. has_sources as in `fill_tokens`.
    """
    if d_Bn.shape[1] == 0:
        return d_Bn.new_zeros(src_idx_BL.shape)
    if has_sources is None:
        has_sources = bool((src_idx_BL >= 0).all())
    if has_sources:
        return torch.gather(d_Bn, 1, src_idx_BL)
    d_BL = torch.gather(d_Bn, 1, src_idx_BL.clamp(min=0))
    has_src = src_idx_BL >= 0
    floor_B1 = torch.where(has_src, d_BL, torch.full_like(d_BL, float("inf"))).amin(dim=1, keepdim=True)
    floor_B1 = torch.nan_to_num(floor_B1, posinf=0.0)
    return torch.where(has_src, d_BL, floor_B1)
