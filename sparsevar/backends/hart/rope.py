"""HART's rotary position embeddings, evaluated with the official float32 operations.

Context tokens rotate by their 1-D position id. Image tokens of a (pn, pn) stage sit at (i, j)·pn_last/pn,
offset by the row's last context position id; the head's channels carry the angles laid out as
[r·f, r·f, c·f, c·f] (f: head_dim/4 frequencies) and rotate as LLaMA's `rotate_half` pairs them, so channel
k < D/2 mixes with channel k + D/2 even though their angles differ. That is the official layout, kept as is.
"""

from functools import lru_cache

import torch

BASE = 10000  # rope_theta of every HART attention layer


@lru_cache(maxsize=32)
def _inv_freq(head_dim: int, step: int, device: torch.device) -> torch.Tensor:
    """1 / BASE^(k/head_dim) for k = 0, step, 2·step, ... below head_dim, computed on the CPU as the official code
    does and copied to the device once."""
    return (1.0 / (BASE ** (torch.arange(0, head_dim, step, dtype=torch.int64).float() / head_dim))).to(device)


@lru_cache(maxsize=64)
def _grid_positions(pn: int, pn_last: int, device: torch.device) -> torch.Tensor:
    """(row, col)·pn_last/pn of every token of a (pn, pn) stage, row-major: (pn*pn, 2), made once per stage size."""
    grid = torch.arange(pn, device=device)
    ij_L2 = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), dim=-1).reshape(-1, 2)
    return ij_L2 / pn * pn_last


def _cos_sin(angles_RLD: torch.Tensor) -> torch.Tensor:
    return torch.stack([angles_RLD.cos(), angles_RLD.sin()])


def rope_1d(position_ids_RT: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Cos/sin (2, R, T, head_dim) of the context tokens at their position ids."""
    freqs_RTf = position_ids_RT.float()[..., None] * _inv_freq(head_dim, 2, position_ids_RT.device)
    return _cos_sin(torch.cat([freqs_RTf, freqs_RTf], dim=-1))


def rope_2d(pn: int, pn_last: int, offset_R: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Cos/sin (2, R, pn*pn, head_dim) of every token of a (pn, pn) stage, row-major."""
    pos_RL2 = _grid_positions(pn, pn_last, offset_R.device)[None] + offset_R[:, None, None]
    freqs_RL2f = pos_RL2[..., None] * _inv_freq(head_dim, 4, offset_R.device)  # (R, L, row|col, head_dim/4)
    angles_RLD = torch.cat([freqs_RL2f, freqs_RL2f], dim=-1).flatten(2)
    return _cos_sin(angles_RLD)


def apply_rope(x_RHLD: torch.Tensor, cos_sin_2RLD: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin, rotate_half(x) = [-x[D/2:], x[:D/2]]; x may carry leading dims (queries and
    keys stacked)."""
    cos, sin = cos_sin_2RLD[0][:, None].to(x_RHLD.dtype), cos_sin_2RLD[1][:, None].to(x_RHLD.dtype)
    x1, x2 = x_RHLD.chunk(2, dim=-1)
    return x_RHLD * cos + torch.cat([-x2, x1], dim=-1) * sin
