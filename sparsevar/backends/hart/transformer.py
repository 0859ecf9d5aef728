"""HART's transformer (llama-style blocks with AdaLN), under the parameter names of the official
`HARTForT2I` state dict so that `ema_model.bin` loads with strict=True.

Attention l2-normalises q and k, scales q by exp(min(scale_mul, ln 100)) and uses softmax scale 1; RoPE is
applied after the normalisation. Every block reads one AdaLN condition: the context embedding max-pooled over
all context tokens. Keys and values go through the shared `KVCache`, so only tokens that ran are attended to.
"""

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from sparsevar.attention import KVCache, cosine_attention_constants
from sparsevar.backends.hart.diffusion import DiffusionHead
from sparsevar.backends.hart.folders import TokenizerArch, TransformerArch
from sparsevar.backends.hart.rope import apply_rope
from sparsevar.fastvar import StagePruning, take
from sparsevar.packing import Padding
from sparsevar.sparse import block_scores

TRAINING_BUFFERS = ("lvl_1L", "attn_bias_for_masking")  # in the official files, unused by inference


@dataclass
class BlockContext:
    """What a block reads at every stage of a generation, computed once per generation rather than per stage:
    its AdaLN modulation (γ1, γ2, 1 + scale1, 1 + scale2, shift1, shift2), its qkv bias and its query and key
    scales."""

    ada: tuple[torch.Tensor, ...]
    qkv_bias: torch.Tensor
    qk_scale: torch.Tensor


@dataclass
class Conditioning:
    """A generation's per-block contexts and the logits head's modulation (1 + scale, shift) in float32."""

    blocks: list[BlockContext]
    head: tuple[torch.Tensor, torch.Tensor]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor, in a fixed order: a conditioning kept for CUDA graphs takes a new generation's in one copy."""
        return [t for b in self.blocks for t in (*b.ada, b.qkv_bias, b.qk_scale)] + [*self.head]


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) in float32, cast back, times the weight: the official fused kernel's result."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv_proj = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.scale_mul_1H11 = nn.Parameter(torch.zeros(1, heads, 1, 1))
        self.proj = nn.Linear(dim, dim)

    def constants(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The qkv bias and the query and key scales, as forward takes them; computed once per generation."""
        return cosine_attention_constants(self.q_bias, self.zero_k_bias, self.v_bias, self.scale_mul_1H11)

    def forward(self, x_RnC, cos_sin_2RnD, cache: KVCache, valid_Rn, bias, scale_2_1H11,
                packing: Padding | None = None) -> torch.Tensor:
        """Queries and keys are normalised, scaled and rotated as one tensor: the same values as one at a time,
        in half the kernel launches, which set the time of small stages."""
        qkv = F.linear(x_RnC, self.qkv_proj.weight, bias)
        if packing is not None:
            qkv = packing.unpack(qkv)
        R, n, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        qkv = qkv.view(R, n, 3, self.heads, C // self.heads)
        qk_2RHnD = F.normalize(qkv[:, :, :2].permute(2, 0, 3, 1, 4), dim=-1).mul(scale_2_1H11)
        q, k = apply_rope(qk_2RHnD, cos_sin_2RnD).unbind(0)
        keys, values, mask = cache.extend(k, qkv[:, :, 2].transpose(1, 2), valid_Rn)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=1.0).transpose(1, 2)
        out = out.reshape(R, n, C)
        return self.proj(out if packing is None else packing.pack(out))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, arch: TransformerArch) -> None:
        super().__init__()
        C = arch.embed_dim
        self.attn = Attention(C, arch.num_heads)
        self.ffn = MLP(C, arch.mlp_hidden)
        self.ln_wo_grad = RMSNorm(C, arch.norm_eps)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def context(self, cond_R1C: torch.Tensor) -> BlockContext:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond_R1C).chunk(6, dim=-1)
        return BlockContext((gamma1, gamma2, scale1 + 1, scale2 + 1, shift1, shift2), *self.attn.constants())

    def forward(self, x_RnC, ctx: BlockContext, cos_sin_2RnD, cache, valid_Rn,
                packing: Padding | None = None, prune: StagePruning | None = None, index: int = 0) -> torch.Tensor:
        """x and ctx.ada are (R, n, C) and (R, 1, C), or with packing (1, N, C) both. With prune (FastVAR, never
        with packing), each branch runs on the tokens it picks; `index` is the block's, from 1."""
        gamma1, gamma2, scale1_1, scale2_1, shift1, shift2 = ctx.ada

        def attention(x, idx):
            cos_sin, valid = ((cos_sin_2RnD, valid_Rn) if idx is None
                              else (take(cos_sin_2RnD, idx, 2), take(valid_Rn, idx, 1)))
            return self.attn(self.ln_wo_grad(x) * scale1_1 + shift1, cos_sin, cache, valid, ctx.qkv_bias,
                             ctx.qk_scale, packing) * gamma1

        def ffn(x, idx):
            return self.ffn(self.ln_wo_grad(x) * scale2_1 + shift2) * gamma2

        for name, branch in (("attn", attention), ("ffn", ffn)):
            x_RnC = x_RnC + (branch(x_RnC, None) if prune is None else prune.branch(index, name, x_RnC, branch))
        return x_RnC


class HeadNorm(nn.Module):
    """AdaLN before the logits head."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.ln_wo_grad = RMSNorm(dim, eps)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def modulation(self, cond_R1C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 + scale, shift), each (R, 1, C)."""
        scale, shift = self.ada_lin(cond_R1C).chunk(2, dim=-1)
        return scale + 1, shift

    def forward(self, x_RnC: torch.Tensor, modulation: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        scale_1, shift = modulation
        return self.ln_wo_grad(x_RnC) * scale_1 + shift


class HartTransformer(nn.Module):
    """Everything `llm/ema_model.bin` holds: embeddings, blocks, logits head, the diffusion head and its norm."""

    def __init__(self, arch: TransformerArch, tok: TokenizerArch) -> None:
        super().__init__()
        C = arch.embed_dim
        self.context_embed = nn.Linear(arch.context_dim, C)
        self.context_norm = RMSNorm(arch.context_dim, arch.norm_eps) if arch.use_context_norm else nn.Identity()
        self.lvl_embed = nn.Embedding(len(arch.patch_nums), C)
        self.word_embed = nn.Linear(tok.z_channels, C)
        self.blocks = nn.ModuleList(Block(arch) for _ in range(arch.depth))
        self.head_nm = HeadNorm(C, arch.norm_eps)
        self.head = nn.Linear(C, tok.vocab_size)
        self.decoder_norm = RMSNorm(C, arch.norm_eps)
        self.diffloss = DiffusionHead(tok.z_channels, C, arch.diff_width, arch.diff_depth)
        n = arch.total_tokens
        self.register_buffer("lvl_1L", torch.zeros(1, n, dtype=torch.long))
        self.register_buffer("attn_bias_for_masking", torch.zeros(1, 1, n, n))

    def drop_training_buffers(self) -> None:
        """Free the block-causal training mask (n² floats) once a checkpoint has been checked against it."""
        for name in TRAINING_BUFFERS:
            delattr(self, name)

    def embed_context(self, context_RTC: torch.Tensor) -> torch.Tensor:
        return self.context_embed(self.context_norm(context_RTC))

    def condition(self, cond_R1C: torch.Tensor) -> Conditioning:
        """Everything the stages read that depends on the AdaLN condition only, computed once per generation."""
        blocks = [block.context(cond_R1C) for block in self.blocks]
        return Conditioning(blocks, self.head_nm.modulation(cond_R1C.float()))

    def forward(self, x_RnC, cond: Conditioning, cos_sin_2RnD, caches: list[KVCache], valid_Rn,
                capture_block: int | None, packing: Padding | None = None, prune: StagePruning | None = None):
        """Blocks 1..N on embedded tokens; returns the last hidden state and block `capture_block`'s per-token
        change (`block_scores`). With packing (the stage's padding, whose valid_Rn this is), only the real tokens
        run outside attention (`sparsevar.packing`)."""
        if packing is not None:
            x_RnC = packing.pack(x_RnC)
        change_Rn = None
        for i, (block, ctx, cache) in enumerate(zip(self.blocks, cond.blocks, caches, strict=True), start=1):
            x_in = x_RnC
            if packing is not None:  # per-token modulations one block at a time: all at once would be depth × larger
                ctx = replace(ctx, ada=tuple(map(packing.per_token, ctx.ada)))
            x_RnC = block(x_RnC, ctx, cos_sin_2RnD, cache, valid_Rn, packing, prune, i)
            if i == capture_block:
                change_Rn = block_scores(x_in, x_RnC)
        if packing is None:
            return x_RnC, change_Rn
        return packing.unpack(x_RnC), None if change_Rn is None else packing.unpack(change_Rn)

    def logits(self, h_RnC: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.head(self.head_nm(h_RnC, cond.head)).float()
