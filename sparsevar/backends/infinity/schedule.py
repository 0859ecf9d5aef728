"""Infinity's stage schedules and its 2-D RoPE table, as the official `dynamic_resolution` tables define them.

Every aspect-ratio template has a 13-stage 1024-level (1M) schedule; smaller resolutions take its first 7, 10
or 12 stages. RoPE positions of every stage are scaled to the last 1M grid of the template (the official
`rope2d_normalized_by_hw = 2`), rounded to whole grid cells, so a 0.06M run sees the positions the 1M run does.
"""

from functools import lru_cache

import torch

# (h, w) token grids of the 1M schedule for h/w >= 1; the transposed templates are h/w = 1 / ratio.
_TALL_1M: dict[float, list[tuple[int, int]]] = {
    1.000: [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40),
            (48, 48), (64, 64)],
    1.250: [(1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36),
            (55, 44), (70, 56)],
    1.333: [(1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36),
            (60, 45), (72, 54)],
    1.500: [(1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32),
            (63, 42), (78, 52)],
    1.750: [(1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32),
            (70, 40), (84, 48)],
    2.000: [(1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30),
            (74, 37), (90, 45)],
    2.500: [(1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26),
            (80, 32), (100, 40)],
    3.000: [(1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24),
            (90, 30), (111, 37)],
}
STAGES = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}
ROPE_GRID = 128  # positions the official frequency table covers per axis (2048 // 16)
ROPE_BASE = 10000.0


def _templates() -> dict[float, list[tuple[int, int]]]:
    """Templates in the official order (each ratio, then its transpose), which decides ties."""
    out: dict[float, list[tuple[int, int]]] = {}
    for ratio, grids in _TALL_1M.items():
        out[ratio] = grids
        if ratio != 1.0:
            out[int(1 / ratio * 1000) / 1000] = [(w, h) for h, w in grids]
    return out


TEMPLATES = _templates()


def template(h_div_w: float) -> float:
    """The nearest h/w template; the first in official order on a tie."""
    if not h_div_w > 0:
        raise ValueError(f"h_div_w must be a positive height/width ratio, got {h_div_w}")
    return min(TEMPLATES, key=lambda t: abs(t - h_div_w))


def schedule(h_div_w: float, resolution: str) -> list[tuple[int, int]]:
    """Token grids (h, w) of every stage for the template nearest h_div_w, at `resolution` (official `pn`)."""
    return TEMPLATES[template(h_div_w)][: STAGES[resolution]]


@lru_cache(maxsize=64)
def rope_table(h_div_w_template: float, head_dim: int) -> torch.Tensor:
    """Cos/sin of every 1M stage of a template, stages concatenated: (2, sum h*w, head_dim / 2), float32.

    Pair i of a head's channels (channels 2i, 2i+1) rotates with the row for i < head_dim/4, else the column.
    """
    half = head_dim // 2
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))
    freqs = torch.outer(torch.arange(ROPE_GRID, dtype=torch.int64).float(), inv_freq)  # (grid, head_dim/4)
    grids = TEMPLATES[h_div_w_template]
    top_h, top_w = grids[-1]
    angles = []
    for h, w in grids:
        rows = (torch.arange(h) * (top_h / h)).round().int()
        cols = (torch.arange(w) * (top_w / w)).round().int()
        ang_hwq = torch.cat([freqs[rows][:, None].expand(h, w, -1), freqs[cols][None, :].expand(h, w, -1)], dim=-1)
        angles.append(ang_hwq.reshape(h * w, half))
    ang_Ld = torch.cat(angles)
    return torch.stack([ang_Ld.cos(), ang_Ld.sin()])


def stage_offsets(grids: list[tuple[int, int]]) -> list[int]:
    """Index of each stage's first token in the concatenated table."""
    offsets, total = [], 0
    for h, w in grids:
        offsets.append(total)
        total += h * w
    return offsets


def apply_rope(x_RHnD: torch.Tensor, cos_sin_2Rnd: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (x[2i], x[2i+1]) in float32; cos_sin is (2, R|1, n, D/2). x may carry
    leading dims (queries and keys stacked)."""
    cos, sin = cos_sin_2Rnd[0][:, None], cos_sin_2Rnd[1][:, None]
    x0, x1 = x_RHnD.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1).flatten(-2)
