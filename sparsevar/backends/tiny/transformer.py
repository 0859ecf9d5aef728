"""The tiny backend's transformer: Infinity's block structure at toy size.

AdaLN self-attention with 2-D RoPE over block-causal stages (through a KV cache), cross-attention to the
text, an AdaLN MLP, and a bitwise head. Every module sees only the tokens the loop lets run.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsevar.attention import KVCache, apply_rope, attend
from sparsevar.fastvar import StagePruning, take
from sparsevar.packing import Padding
from sparsevar.sparse import block_scores


@dataclass
class TextContext:
    """Per-generation text tensors: cross-attention keys/values of each block and the padding mask."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    mask_R11T: torch.Tensor | None


Modulation = tuple[torch.Tensor, ...]  # AdaLN shifts, scales (and gates), each (R, 1, C)


@dataclass
class Conditioning:
    """The AdaLN modulation of every block and of the head: fixed for a generation, so computed once in it."""

    blocks: list[Modulation]
    head: Modulation


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_RnC, rope_2Rnd, cache: KVCache, valid_Rn, packing: Padding | None = None) -> torch.Tensor:
        qkv = self.qkv(x_RnC)
        if packing is not None:
            qkv = packing.unpack(qkv)
        R, n, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.view(R, n, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        keys, values, mask = cache.extend(apply_rope(k, rope_2Rnd), v, valid_Rn)
        out = attend(apply_rope(q, rope_2Rnd), keys, values, mask).transpose(1, 2).reshape(R, n, C)
        return self.proj(out if packing is None else packing.pack(out))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, text_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(text_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def text_kv(self, text_RTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        R, T, _ = text_RTC.shape
        k, v = self.kv(text_RTC).view(R, T, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x_RnC, kv, mask_R11T, packing: Padding | None = None) -> torch.Tensor:
        q = self.q(x_RnC)
        if packing is not None:
            q = packing.unpack(q)
        R, n, C = q.shape
        out = attend(q.view(R, n, self.heads, C // self.heads).transpose(1, 2), kv[0], kv[1], mask_R11T)
        out = out.transpose(1, 2).reshape(R, n, C)
        return self.proj(out if packing is None else packing.pack(out))


class Block(nn.Module):
    def __init__(self, dim: int, text_dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.ada = nn.Linear(dim, 6 * dim)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = SelfAttention(dim, heads)
        self.norm_ca = nn.LayerNorm(dim)
        self.cross = CrossAttention(dim, text_dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def modulation(self, cond_R1C: torch.Tensor) -> Modulation:
        return self.ada(F.silu(cond_R1C)).chunk(6, dim=-1)

    def forward(self, x_RnC, ada: Modulation, rope_2Rnd, cache, valid_Rn, text_kv, text_mask,
                packing: Padding | None = None, prune: StagePruning | None = None, index: int = 0) -> torch.Tensor:
        """x and ada are (R, n, C) and (R, 1, C), or with packing (1, N, C) both. With prune (FastVAR, never
        with packing), each branch runs on the tokens it picks; `index` is the block's, from 1."""
        shift1, scale1, gate1, shift2, scale2, gate2 = ada

        def attention(x, idx):
            rope, valid = (rope_2Rnd, valid_Rn) if idx is None else (take(rope_2Rnd, idx, 2), take(valid_Rn, idx, 1))
            return gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1, rope, cache, valid, packing)

        def cross(x, idx):
            return self.cross(self.norm_ca(x), text_kv, text_mask, packing)

        def mlp(x, idx):
            return gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)

        for name, branch in (("attn", attention), ("cross", cross), ("mlp", mlp)):
            x_RnC = x_RnC + (branch(x_RnC, None) if prune is None else prune.branch(index, name, x_RnC, branch))
        return x_RnC


class TinyTransformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, bits: int, text_dim: int,
                 stages: int) -> None:
        super().__init__()
        self.text_pool = nn.Linear(text_dim, dim)
        self.pos_start = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.word_embed = nn.Linear(bits, dim)
        self.lvl_embed = nn.Embedding(stages, dim)
        self.blocks = nn.ModuleList(Block(dim, text_dim, heads, mlp_ratio) for _ in range(depth))
        self.head_ada = nn.Linear(dim, 2 * dim)
        self.head_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.head = nn.Linear(dim, 2 * bits)

    def condition(self, text_RTC: torch.Tensor, mask_RT: torch.Tensor) -> torch.Tensor:
        """Pooled text: the AdaLN condition and, plus pos_start, the first stage's token. (R, 1, C)."""
        weights_RT1 = mask_RT.unsqueeze(-1).to(text_RTC.dtype)
        pooled_RC = (text_RTC * weights_RT1).sum(1) / weights_RT1.sum(1)
        return self.text_pool(pooled_RC).unsqueeze(1)

    def conditioning(self, cond_R1C: torch.Tensor) -> Conditioning:
        return Conditioning([block.modulation(cond_R1C) for block in self.blocks],
                            self.head_ada(F.silu(cond_R1C)).chunk(2, dim=-1))

    def forward(self, x_RnC, stage, cond: Conditioning, rope_2Rnd, caches, valid_Rn, text: TextContext,
                capture_block, packing: Padding | None = None, prune: StagePruning | None = None):
        """Logits (R, n, 2 * bits) and block capture_block's change (R, n). With packing (the stage's padding,
        whose valid_Rn this is), only the real tokens run outside attention (`sparsevar.packing`)."""
        x_RnC = (x_RnC if stage == 1 else self.word_embed(x_RnC)) + self.lvl_embed.weight[stage - 1]
        if packing is not None:
            x_RnC = packing.pack(x_RnC)
        change_Rn = None
        for i, (block, cache) in enumerate(zip(self.blocks, caches, strict=True), start=1):
            x_in = x_RnC
            ada = cond.blocks[i - 1] if packing is None else tuple(map(packing.per_token, cond.blocks[i - 1]))
            x_RnC = block(x_RnC, ada, rope_2Rnd, cache, valid_Rn, text.kv[i - 1], text.mask_R11T, packing, prune, i)
            if i == capture_block:
                change_Rn = block_scores(x_in, x_RnC)
        logits = self.logits(x_RnC, cond.head if packing is None else tuple(map(packing.per_token, cond.head)))
        if packing is None:
            return logits, change_Rn
        return packing.unpack(logits), None if change_Rn is None else packing.unpack(change_Rn)

    def logits(self, x_RnC: torch.Tensor, head: Modulation) -> torch.Tensor:
        shift, scale = head
        return self.head(self.head_norm(x_RnC) * (1 + scale) + shift)

    def forward_teacher(self, inputs_BLb, cond_B1C, rope_21Ld, stage_ids_L, text: TextContext) -> torch.Tensor:
        """Training: every stage at once from teacher-forced inputs, block-causal over stages. (B, L, 2*bits)."""
        x_BLC = torch.cat([cond_B1C + self.pos_start, self.word_embed(inputs_BLb)], dim=1)
        x_BLC = x_BLC + self.lvl_embed(stage_ids_L)
        whole = _WholeSequence(stage_ids_L[None, :] <= stage_ids_L[:, None])
        cond = self.conditioning(cond_B1C)
        for block, ada, kv in zip(self.blocks, cond.blocks, text.kv, strict=True):
            x_BLC = block(x_BLC, ada, rope_21Ld, whole, None, kv, text.mask_R11T)
        return self.logits(x_BLC, cond.head)


class _WholeSequence:
    """Stands in for the KV cache when the whole sequence runs at once: keys are the inputs, the mask fixed."""

    def __init__(self, mask_LL: torch.Tensor) -> None:
        self.mask_11LL = mask_LL[None, None]

    def extend(self, k_BHLD, v_BHLD, valid):
        return k_BHLD, v_BHLD, self.mask_11LL
