"""Infinity's transformer under the official checkpoint's parameter names, for the inference path only.

Text side: RMS-normed T5 features, an attentive pool (the start token and the AdaLN condition) and an MLP
(cross-attention keys and values). Blocks: shared AdaLN (a per-block `ada_gss` plus one `shared_ada_lin`),
cosine self-attention with 2-D RoPE over the cached stages, cross-attention to the text, and an MLP; then an
AdaLN head with two logits per bit. Blocks are stored as `block_chunks.{i}.module.{j}`.

Numerics follow the official fused-norm inference path: LayerNorms and the head run in float32; queries,
keys and values of cross-attention are rounded to bf16 (the official code hands them to flash-attn in bf16
even in float32), and so is its output.
"""

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from sparsevar.attention import KVCache, cosine_attention_constants
from sparsevar.backends.infinity.config import InfinityConfig
from sparsevar.backends.infinity.schedule import apply_rope
from sparsevar.fastvar import StagePruning, take
from sparsevar.packing import Padding
from sparsevar.sparse import block_scores

EPS = 1e-6
LEVELS = 15  # rows of the level embedding in the official model


@dataclass
class BlockContext:
    """What a block reads at every stage of a generation, computed once per generation rather than per stage:
    its AdaLN modulation (γ1, γ2, 1 + scale1, 1 + scale2, shift1, shift2), its self-attention's qkv bias and
    query and key scales, its cross-attention norm's weight and bias in float32, and the text's keys and values."""

    ada: tuple[torch.Tensor, ...]
    qkv_bias: torch.Tensor
    qk_scale: torch.Tensor
    ca_norm: tuple[torch.Tensor, torch.Tensor]
    text_kv: tuple[torch.Tensor, torch.Tensor]


@dataclass
class TextContext:
    """Per-generation tensors: each block's context, the head's modulation (1 + scale, shift), the text's mask."""

    blocks: list[BlockContext]
    head: tuple[torch.Tensor, torch.Tensor]
    mask_R11T: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor, in a fixed order: a context kept for CUDA graphs takes a new generation's in one copy."""
        blocks = [t for b in self.blocks for t in (*b.ada, b.qkv_bias, b.qk_scale, *b.ca_norm, *b.text_kv)]
        return [*blocks, *self.head, *([] if self.mask_R11T is None else [self.mask_R11T])]


def layer_norm(x_RnC: torch.Tensor) -> torch.Tensor:
    """Parameter-free LayerNorm in float32, as every AdaLN norm of the model."""
    return F.layer_norm(x_RnC.float(), (x_RnC.shape[-1],), eps=EPS)


class RMSNorm(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x_RTC: torch.Tensor) -> torch.Tensor:
        x_RTC = x_RTC.float()
        return x_RTC * torch.rsqrt(x_RTC.pow(2).mean(-1, keepdim=True) + EPS) * self.weight


class SelfAttention(nn.Module):
    """Cosine attention: L2-normed queries and keys, queries scaled by a learned per-head factor, scale 1."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def constants(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The qkv bias and the query and key scales, as forward takes them; computed once per generation."""
        return cosine_attention_constants(self.q_bias, self.zero_k_bias, self.v_bias, self.scale_mul_1H11)

    def forward(self, x_RnC, rope_2Rnd, cache: KVCache, valid_Rn, bias, scale_2_1H11,
                packing: Padding | None = None) -> torch.Tensor:
        """Queries and keys are normalised, scaled and rotated as one tensor: the same values as one at a time,
        in half the kernel launches, which set the time of small stages."""
        qkv = F.linear(x_RnC, self.mat_qkv.weight, bias)
        if packing is not None:
            qkv = packing.unpack(qkv)
        R, n, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        qkv = qkv.view(R, n, 3, self.heads, C // self.heads)
        qk_2RHnD = F.normalize(qkv[:, :, :2].permute(2, 0, 3, 1, 4), dim=-1, eps=1e-12).mul(scale_2_1H11)
        q, k = apply_rope(qk_2RHnD, rope_2Rnd).to(cache.k_RHLD.dtype).unbind(0)
        v = qkv[:, :, 2].transpose(1, 2)
        keys, values, mask = cache.extend(k, v.to(cache.v_RHLD.dtype), valid_Rn)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=1.0).transpose(1, 2)
        out = out.reshape(R, n, C)
        return self.proj(out if packing is None else packing.pack(out))


class CrossAttention(nn.Module):
    """Attention from image tokens (or, pooling, one learned query) to the text; keys and values are cached."""

    def __init__(self, dim: int, kv_dim: int, heads: int, pool: bool = False) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        if pool:
            self.mat_q = nn.Parameter(torch.zeros(1, heads, self.head_dim))
        else:
            self.mat_q = nn.Linear(dim, dim)
        self.mat_kv = nn.Linear(kv_dim, 2 * dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def text_kv(self, text_RTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        R, T, _ = text_RTC.shape
        kv = F.linear(text_RTC, self.mat_kv.weight, torch.cat([self.zero_k_bias, self.v_bias]))
        k, v = kv.view(R, T, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, q_RHnD: torch.Tensor, kv, mask_R11T: torch.Tensor | None,
                packing: Padding | None = None) -> torch.Tensor:
        R, _, n, _ = q_RHnD.shape
        k, v = kv
        if q_RHnD.dtype == torch.float32:  # the official code casts to bf16 for flash-attn in this case only
            q_RHnD, k, v = (t.to(torch.bfloat16).float() for t in (q_RHnD, k, v))
        out = F.scaled_dot_product_attention(q_RHnD, k, v, attn_mask=mask_R11T)
        if out.dtype == torch.float32:  # and its output in bf16 (under autocast it is bf16 already)
            out = out.to(torch.bfloat16).float()
        out = out.transpose(1, 2).reshape(R, n, self.heads * self.head_dim)
        return self.proj(out if packing is None else packing.pack(out))

    def attend(self, x_RnC: torch.Tensor, kv, mask_R11T: torch.Tensor | None,
               packing: Padding | None = None) -> torch.Tensor:
        q = self.mat_q(x_RnC)
        if packing is not None:
            q = packing.unpack(q)
        R, n, _ = q.shape
        return self(q.view(R, n, self.heads, self.head_dim).transpose(1, 2), kv, mask_R11T, packing)

    def pool(self, text_RTC: torch.Tensor, mask_R11T: torch.Tensor | None) -> torch.Tensor:
        """The learned query's attention over the whole text: (R, dim)."""
        q = self.mat_q.to(text_RTC.dtype).expand(text_RTC.shape[0], -1, -1).unsqueeze(2)
        return self(q, self.text_kv(text_RTC), mask_R11T)[:, 0]


class TextAttentivePool(nn.Module):
    def __init__(self, text_channels: int, dim: int, heads: int) -> None:
        super().__init__()
        self.ca = CrossAttention(dim, text_channels, heads, pool=True)


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """CrossAttnBlock: x += γ1·SA(AdaLN(x)); x += CA(LN(x)); x += γ2·FFN(AdaLN(x)), residual in float32."""

    def __init__(self, dim: int, text_dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.sa = SelfAttention(dim, heads)
        self.ca = CrossAttention(dim, text_dim, heads)
        self.ffn = FFN(dim, hidden)
        self.ca_norm = nn.LayerNorm(dim, eps=EPS)
        self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, dim))

    def context(self, cond_R16C: torch.Tensor, text_kv: tuple[torch.Tensor, torch.Tensor]) -> BlockContext:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + cond_R16C).unbind(2)
        norm = self.ca_norm  # in float32 whatever the block's dtype, as CUDA autocast does it
        return BlockContext((gamma1, gamma2, scale1 + 1, scale2 + 1, shift1, shift2), *self.sa.constants(),
                            (norm.weight.float(), norm.bias.float()), text_kv)

    def forward(self, x_RnC, ctx: BlockContext, rope_2Rnd, cache, valid_Rn, text_mask,
                packing: Padding | None = None, prune: StagePruning | None = None, index: int = 0) -> torch.Tensor:
        """x and ctx.ada are (R, n, C) and (R, 1, C), or with packing (1, N, C) both. With prune (FastVAR, never
        with packing), each branch runs on the tokens it picks; `index` is the block's, from 1."""
        gamma1, gamma2, scale1_1, scale2_1, shift1, shift2 = ctx.ada

        def attention(x, idx):
            rope, valid = (rope_2Rnd, valid_Rn) if idx is None else (take(rope_2Rnd, idx, 2), take(valid_Rn, idx, 1))
            return self.sa(layer_norm(x) * scale1_1 + shift1, rope, cache, valid, ctx.qkv_bias, ctx.qk_scale,
                           packing) * gamma1

        def cross(x, idx):  # bf16 under autocast: summed into the residual in fp32
            x_ca = F.layer_norm(x.float(), self.ca_norm.normalized_shape, *ctx.ca_norm, self.ca_norm.eps)
            return self.ca.attend(x_ca, ctx.text_kv, text_mask, packing)

        def ffn(x, idx):
            return self.ffn(layer_norm(x) * scale2_1 + shift2) * gamma2

        for name, branch in (("sa", attention), ("ca", cross), ("ffn", ffn)):
            x_RnC = x_RnC + (branch(x_RnC, None) if prune is None else prune.branch(index, name, x_RnC, branch))
        return x_RnC


class Chunk(nn.Module):
    def __init__(self, blocks: list[Block]) -> None:
        super().__init__()
        self.module = nn.ModuleList(blocks)


class AdaLNHead(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def modulation(self, cond_RD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 + scale, shift), each (R, 1, C)."""
        scale, shift = self.ada_lin(cond_RD).view(cond_RD.shape[0], 1, 2, -1).unbind(2)
        return scale + 1, shift

    def forward(self, x_RnC: torch.Tensor, modulation: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        scale_1, shift = modulation
        return layer_norm(x_RnC) * scale_1 + shift


class Infinity(nn.Module):
    def __init__(self, cfg: InfinityConfig) -> None:
        super().__init__()
        C, Ct5 = cfg.dim, cfg.text_channels
        self.cfg_uncond = nn.Parameter(torch.zeros(cfg.text_max_tokens, Ct5))
        self.text_norm = RMSNorm(Ct5)
        self.text_proj_for_sos = TextAttentivePool(Ct5, C, cfg.text_pool_heads)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(Ct5, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.lvl_embed = nn.Embedding(LEVELS, C)
        self.word_embed = nn.Linear(cfg.token_channels, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        hidden = round(C * cfg.mlp_ratio / 256) * 256
        per_chunk = cfg.depth // cfg.block_chunks
        self.block_chunks = nn.ModuleList(
            Chunk([Block(C, C, cfg.heads, hidden) for _ in range(per_chunk)]) for _ in range(cfg.block_chunks)
        )
        self.head_nm = AdaLNHead(C)
        self.head = nn.Linear(C, 2 * cfg.token_channels)

    @property
    def blocks(self) -> list[Block]:
        return [block for chunk in self.block_chunks for block in chunk.module]

    def encode_text(self, text_RTC: torch.Tensor, mask_RT: torch.Tensor, keep_mask: bool = False
                    ) -> tuple[torch.Tensor, TextContext]:
        """Start tokens (R, 1, C) and the text context: everything the stages read that depends on the text only.

        The AdaLN condition (R, D) gives the start token, the shared projection (R, 1, 6, C) every block's
        modulation and, with autocast off as in `forward`, the head's. The mask is dropped when every token is
        real, unless keep_mask (CUDA graphs need the same layout for every prompt).
        """
        text_RTC = self.text_norm(text_RTC)
        mask_R11T = None if not keep_mask and bool(mask_RT.all()) else mask_RT[:, None, None, :]
        cond_RD = self.text_proj_for_sos.ca.pool(text_RTC, mask_R11T).float()
        ca_RTC = self.text_proj_for_ca(text_RTC)
        with torch.autocast(cond_RD.device.type, enabled=False):
            cond_R16C = self.shared_ada_lin(cond_RD).view(cond_RD.shape[0], 1, 6, -1).float()
            head = self.head_nm.modulation(cond_RD.float())
        blocks = [block.context(cond_R16C, block.ca.text_kv(ca_RTC)) for block in self.blocks]
        sos_R1C = cond_RD.unsqueeze(1) + self.pos_start
        return sos_R1C, TextContext(blocks, head, mask_R11T)

    def forward(self, x_RnC, stage, rope_2Rnd, caches, valid_Rn, text: TextContext, capture_block: int | None,
                packing: Padding | None = None, prune: StagePruning | None = None):
        """Logits (R, n, 2 * bits) of a stage's tokens and, if asked, block capture_block's per-token change (R, n).

        x is the start token at stage 1 and raw codes afterwards; the level embedding is added once, before
        the first block. With packing (the stage's padding, whose valid_Rn this is), only the real tokens run
        outside attention (`sparsevar.packing`).
        """
        x_RnC = x_RnC if stage == 1 else self.word_embed(x_RnC)
        x_RnC = x_RnC.float() + self.lvl_embed.weight[stage - 1]
        if packing is not None:
            x_RnC = packing.pack(x_RnC)
        change_Rn = None
        for i, (block, ctx, cache) in enumerate(zip(self.blocks, text.blocks, caches, strict=True), start=1):
            x_in = x_RnC
            if packing is not None:  # per-token modulations one block at a time: all at once would be depth × larger
                ctx = replace(ctx, ada=tuple(map(packing.per_token, ctx.ada)))
            x_RnC = block(x_RnC, ctx, rope_2Rnd, cache, valid_Rn, text.mask_R11T, packing, prune, i)
            if i == capture_block:
                change_Rn = block_scores(x_in, x_RnC)
        head = text.head if packing is None else tuple(map(packing.per_token, text.head))
        with torch.autocast(x_RnC.device.type, enabled=False):
            logits = self.head(self.head_nm(x_RnC.float(), head))
        if packing is None:
            return logits, change_Rn
        return packing.unpack(logits), None if change_Rn is None else packing.unpack(change_Rn)
