"""Attention pieces every backend shares: a key/value cache that holds only the tokens that ran, and 2-D RoPE
evaluated at true grid positions, so a sparse stage attends exactly like the dense one over what it keeps."""

import torch
import torch.nn.functional as F

MAX_LOG_SCALE_MUL = torch.log(torch.tensor(100.0)).item()  # cap of the learned cosine-attention temperature


class KVCache:
    """Keys and values of one attention layer across the stages of one generation.

    Preallocated for the whole schedule (no copy per stage). Padding rows of a sparse stage are written but
    marked invalid, so later stages never attend to them.
    """

    def __init__(self, rows: int, heads: int, capacity: int, head_dim: int, device, dtype) -> None:
        self.k_RHLD = torch.empty(rows, heads, capacity, head_dim, device=device, dtype=dtype)
        self.v_RHLD = torch.empty_like(self.k_RHLD)
        self.valid_RL = torch.ones(rows, capacity, device=device, dtype=torch.bool)
        self.length = 0
        self.all_valid = True

    def reset(self) -> None:
        """Empty the cache for a new generation, keeping its memory (for CUDA graphs, which hold its address)."""
        self.valid_RL.fill_(True)
        self.length = 0
        self.all_valid = True

    def extend(
        self, k_RHlD: torch.Tensor, v_RHlD: torch.Tensor, valid_Rl: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Append one stage; return every cached key and value and the attention mask (None: attend to all)."""
        start, end = self.length, self.length + k_RHlD.shape[2]
        if end > self.k_RHLD.shape[2]:
            raise RuntimeError(f"KV cache overflow: {end} tokens > capacity {self.k_RHLD.shape[2]}")
        self.k_RHLD[:, :, start:end] = k_RHlD
        self.v_RHLD[:, :, start:end] = v_RHlD
        if valid_Rl is not None:
            self.valid_RL[:, start:end] = valid_Rl
            self.all_valid = False
        self.length = end
        mask = None if self.all_valid else self.valid_RL[:, None, None, :end]
        return self.k_RHLD[:, :, :end], self.v_RHLD[:, :, :end], mask

    def keep_rows(self, rows: int) -> None:
        """Keep the first `rows` rows (views, no copy): the conditional rows, once guidance stops."""
        self.k_RHLD, self.v_RHLD, self.valid_RL = self.k_RHLD[:rows], self.v_RHLD[:rows], self.valid_RL[:rows]

    def valid_count(self) -> torch.Tensor:
        """Valid cached tokens per row, for tests and statistics."""
        return self.valid_RL[:, : self.length].sum(dim=1)


def cosine_attention_constants(q_bias: torch.Tensor, zero_k_bias: torch.Tensor, v_bias: torch.Tensor,
                               scale_mul_1H11: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For Infinity's and HART's cosine attention: the qkv bias (no key bias) and the scales of the normalised
    queries and keys, (2, 1, H, 1, 1): the query's exp(min(scale_mul, ln 100)), the key's 1 (exact), so that one
    multiply serves both."""
    scale_1H11 = scale_mul_1H11.clamp_max(MAX_LOG_SCALE_MUL).exp()
    return torch.cat([q_bias, zero_k_bias, v_bias]), torch.stack([scale_1H11, torch.ones_like(scale_1H11)])


def rope_2d_table(h: int, w: int, head_dim: int, grid: tuple[int, int], base: float = 10000.0) -> torch.Tensor:
    """Cos/sin of 2-D RoPE for an (h, w) stage, positions scaled to the last stage's grid.

    Half of the head's channels rotate with the row, half with the column. Returns (2, h*w, head_dim/2).
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    inv_freq = 1.0 / base ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = torch.arange(h, dtype=torch.float64) * (grid[0] / h)
    cols = torch.arange(w, dtype=torch.float64) * (grid[1] / w)
    ang_row = rows[:, None, None] * inv_freq  # (h, 1, q)
    ang_col = cols[None, :, None] * inv_freq  # (1, w, q)
    ang_L = torch.cat([ang_row.expand(h, w, quarter), ang_col.expand(h, w, quarter)], dim=-1).reshape(h * w, -1)
    return torch.stack([ang_L.cos(), ang_L.sin()]).float()


def apply_rope(x_RHlD: torch.Tensor, cos_sin_Rl: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x[..., :D/2], x[..., D/2:]) by per-token angles; cos_sin_Rl is (2, R|1, l, D/2)."""
    cos, sin = cos_sin_Rl[0][:, None].to(x_RHlD.dtype), cos_sin_Rl[1][:, None].to(x_RHlD.dtype)
    x1, x2 = x_RHlD.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def attend(q_RHlD: torch.Tensor, k_RHLD: torch.Tensor, v_RHLD: torch.Tensor, mask: torch.Tensor | None):
    """Scaled dot-product attention over the cache; mask True where a key may be seen."""
    return F.scaled_dot_product_attention(q_RHlD, k_RHLD, v_RHLD, attn_mask=mask)
