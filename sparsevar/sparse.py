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
def _anchor_layout(h: int, w: int, alpha: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.arange(h), torch.arange(w)
    top, left = rows - rows % alpha, cols - cols % alpha
    cell_h = torch.clamp(h - top, max=alpha)
    cell_w = torch.clamp(w - left, max=alpha)
    anchor_row = top + torch.minimum(torch.full_like(top, alpha // 2), cell_h - 1)
    anchor_col = left + torch.minimum(torch.full_like(left, alpha // 2), cell_w - 1)
    anchor_of_L = (anchor_row[:, None] * w + anchor_col[None, :]).reshape(-1)
    is_anchor_L = anchor_of_L == torch.arange(h * w)
    return anchor_of_L, is_anchor_L


def anchor_layout(h: int, w: int, alpha: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4: for every token, the flat index of its α×α cell's anchor, and whether it is an anchor.

    Cells start at the top-left corner; edge cells may be smaller; the anchor sits at
    (top + min(α//2, cell_h-1), left + min(α//2, cell_w-1)).
    """
    if alpha < 1:
        raise ValueError("anchor_grid must be >= 1 to place anchors")
    anchor_of_L, is_anchor_L = _anchor_layout(h, w, alpha)
    return anchor_of_L.to(device), is_anchor_L.to(device)


@dataclass(frozen=True)
class KeepPlan:
    """Which tokens of one stage run through the transformer, and where each token takes its prediction.

    keep_BL: token runs (score >= τ, or anchor).
    kept_idx_Bn: flat positions of the kept tokens in ascending order, padded with 0 to the batch maximum.
    valid_Bn: False on padding; None when no image needed padding.
    src_idx_BL: for each token, its index in the kept list: its own if kept, else its anchor's; -1 for none.
    """

    keep_BL: torch.Tensor
    kept_idx_Bn: torch.Tensor
    valid_Bn: torch.Tensor | None
    src_idx_BL: torch.Tensor

    @property
    def counts_B(self) -> torch.Tensor:
        return self.keep_BL.sum(dim=1)


def plan_stage(score_BL: torch.Tensor, tau: float, anchor_of_L: torch.Tensor | None) -> KeepPlan:
    """Step 5 and the bookkeeping for 6-7: keep S >= τ and every anchor; index kept tokens and fill sources."""
    keep_BL = score_BL >= tau
    if anchor_of_L is not None:
        keep_BL = keep_BL | (anchor_of_L == torch.arange(anchor_of_L.numel(), device=anchor_of_L.device))
    counts_B = keep_BL.sum(dim=1)
    n = int(counts_B.max())
    # Stable sort of "not kept" puts kept positions first, in ascending order.
    kept_idx_Bn = torch.argsort((~keep_BL).to(torch.int8), dim=1, stable=True)[:, :n]
    valid_Bn = torch.arange(n, device=keep_BL.device)[None, :] < counts_B[:, None]
    kept_idx_Bn = torch.where(valid_Bn, kept_idx_Bn, torch.zeros_like(kept_idx_Bn))
    rank_BL = keep_BL.cumsum(dim=1) - 1
    if anchor_of_L is None:
        src_idx_BL = torch.where(keep_BL, rank_BL, torch.full_like(rank_BL, -1))
    else:
        src_idx_BL = torch.where(keep_BL, rank_BL, rank_BL[:, anchor_of_L])
    return KeepPlan(keep_BL, kept_idx_Bn, None if bool(valid_Bn.all()) else valid_Bn, src_idx_BL)


def gather_tokens(x_BLC: torch.Tensor, idx_Bn: torch.Tensor) -> torch.Tensor:
    """Rows of x at the given token positions: (B, L, C) -> (B, n, C)."""
    return torch.gather(x_BLC, 1, idx_Bn.unsqueeze(-1).expand(-1, -1, x_BLC.shape[-1]))


def fill_tokens(x_BnC: torch.Tensor, src_idx_BL: torch.Tensor) -> torch.Tensor:
    """Step 7: a full (B, L, C) map from the kept rows; a token with source -1 gets zeros."""
    if x_BnC.shape[1] == 0:
        return x_BnC.new_zeros(*src_idx_BL.shape, x_BnC.shape[-1])
    has_src = src_idx_BL >= 0
    out_BLC = gather_tokens(x_BnC, src_idx_BL.clamp(min=0))
    if bool(has_src.all()):
        return out_BLC
    return out_BLC * has_src.unsqueeze(-1).to(out_BLC.dtype)


def fill_scores(d_Bn: torch.Tensor, src_idx_BL: torch.Tensor) -> torch.Tensor:
    """Scores of a full stage from the tokens that ran: excluded tokens take their anchor's score.

    With no anchors (src -1) the spec is silent; such a token takes the lowest score that ran in its image,
    which leaves the min-max normalisation of the others unchanged.
    """
    if d_Bn.shape[1] == 0:
        return d_Bn.new_zeros(src_idx_BL.shape)
    d_BL = torch.gather(d_Bn, 1, src_idx_BL.clamp(min=0))
    has_src = src_idx_BL >= 0
    if bool(has_src.all()):
        return d_BL
    floor_B1 = torch.where(has_src, d_BL, torch.full_like(d_BL, float("inf"))).amin(dim=1, keepdim=True)
    floor_B1 = torch.nan_to_num(floor_B1, posinf=0.0)
    return torch.where(has_src, d_BL, floor_B1)
