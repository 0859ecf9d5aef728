"""The `infinity` backend: the official Infinity-2B/8B checkpoints behind the shared generation loop.

Stage 1 runs the pooled text token; every later stage runs the running sum of codes resized (trilinear, as
the official code) to the stage's grid and, with spatial patchify (8B), folded 2x2 into one token. Sampled
bits become BSQ codes, which are upsampled to the last grid and summed; the VAE decodes the sum.
On a GPU the blocks hold bf16 weights and run under bf16 autocast, as the official script; norms, the head
and the running sum stay in float32. On the CPU everything is float32. With `cuda_graphs` each stage's
transformer forward is replayed from a CUDA graph (`sparsevar.graphs`) over caches and a text context that
persist across generations of the same batch shape.
"""

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from sparsevar.attention import KVCache
from sparsevar.backends.infinity.config import InfinityConfig
from sparsevar.backends.infinity.model import Infinity, TextContext
from sparsevar.backends.infinity.schedule import rope_table, schedule, stage_offsets, template
from sparsevar.backends.infinity.text import T5Text
from sparsevar.backends.infinity.vae import VAE, constant_entries
from sparsevar.config import SamplingConfig
from sparsevar.graphs import GraphMode
from sparsevar.packing import worth_packing
from sparsevar.sampling import sample_bits
from sparsevar.state_dicts import check_entries, read_state_dict

# Buffers of older official models that their loader drops before loading; they hold no weights.
LEGACY_BUFFERS = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")
# With CUDA graphs, text is padded to a power of two of at least this many tokens (masked: the same values), so
# that stage graphs repeat across prompts.
MIN_TEXT_WIDTH = 32


@dataclass
class InfinityParts:
    """The three loaded components; `text` maps prompts to T5 features (B, T, C) and a mask (B, T)."""

    transformer: Infinity
    vae: VAE
    text: T5Text


@dataclass
class _Workspace:
    """What CUDA graphs read besides their inputs, kept across the generations of one batch shape: a state (its
    caches) and one text context per text width, into which each generation copies its own."""

    state: "InfinityState"
    texts: dict[int, TextContext]


@dataclass
class InfinityState:
    """One generation in flight."""

    batch: int
    branches: int
    schedule: list[tuple[int, int]]
    sos_R1C: torch.Tensor
    text: TextContext
    caches: list[KVCache]
    rope_2Ld: torch.Tensor
    offsets: list[int]
    f_hat_Bd1HW: torch.Tensor


class InfinityBackend(GraphMode):
    name = "infinity"

    def __init__(self, cfg: InfinityConfig, sampling: SamplingConfig, parts: InfinityParts, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> None:
        self.cfg, self.sampling, self.device, self.dtype = cfg, sampling, device, dtype
        self.depth, self.dim = cfg.depth, cfg.dim
        self.model = parts.transformer.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        self.model.block_chunks.to(dtype)
        self.vae = parts.vae.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        self.text = parts.text
        self.block_params = sum(p.numel() for p in self.model.blocks[0].parameters())
        # Logits are divided by the temperature before guidance, in the official order; sampling then uses 1.
        self._inv_temperature = 1 / sampling.temperature
        self._sampling = sampling.model_copy(update={"temperature": 1.0})
        self._rope: dict[float, torch.Tensor] = {}
        self.use_cuda_graphs(cfg.cuda_graphs)

    def _autocast(self):
        # No weight-cast cache (it would hold tensors a CUDA graph captured; our weights need no grad anyway).
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32,
                              cache_enabled=False)

    def schedule(self, h_div_w: float) -> list[tuple[int, int]]:
        return schedule(h_div_w, self.cfg.resolution)

    def _vae_grid(self, h: int, w: int) -> tuple[int, int]:
        return (2 * h, 2 * w) if self.cfg.spatial_patchify else (h, w)

    def branches(self, state: InfinityState) -> int:
        return state.branches

    def begin(self, prompts, negative_prompts, h_div_w) -> InfinityState:
        """Guidance runs when cfg != 1 (as the official script; a negative prompt alone does not enable it)."""
        B, m = len(prompts), self.model
        guided = self.sampling.cfg != 1.0
        text_BTC, mask_BT = self.text(prompts)
        if guided:
            uncond_BTC, uncond_mask = m.cfg_uncond[: text_BTC.shape[1]].expand(B, -1, -1), mask_BT
            if any(negative_prompts):  # a negative prompt replaces the learned unconditional text of its row
                neg_BTC, neg_mask = self.text([n or "" for n in negative_prompts])
                width = max(text_BTC.shape[1], neg_BTC.shape[1])
                text_BTC, mask_BT = _pad_to(text_BTC, mask_BT, width)
                neg_BTC, neg_mask = _pad_to(neg_BTC, neg_mask, width)
                has_neg_B1 = torch.tensor([bool(n) for n in negative_prompts], device=self.device)[:, None]
                uncond_BTC = torch.where(has_neg_B1[..., None], neg_BTC, m.cfg_uncond[:width].expand(B, -1, -1))
                uncond_mask = torch.where(has_neg_B1, neg_mask, mask_BT)
            text_BTC, mask_BT = torch.cat([text_BTC, uncond_BTC]), torch.cat([mask_BT, uncond_mask])
        if self.graphs is not None:  # few text widths, so that stage graphs repeat across prompts
            width = max(MIN_TEXT_WIDTH, 1 << (text_BTC.shape[1] - 1).bit_length())
            text_BTC, mask_BT = _pad_to(text_BTC, mask_BT, max(min(width, self.cfg.text_max_tokens),
                                                               text_BTC.shape[1]))
        with self._autocast():
            sos_R1C, text = m.encode_text(text_BTC.float(), mask_BT, keep_mask=self.graphs is not None)
        grids = self.schedule(h_div_w)
        branches = 2 if guided else 1

        def new_state() -> InfinityState:
            capacity, heads = sum(h * w for h, w in grids), self.cfg.heads
            caches = [KVCache(branches * B, heads, capacity, self.dim // heads, self.device, self.dtype)
                      for _ in range(self.depth)]
            H, W = self._vae_grid(*grids[-1])
            f_hat = torch.zeros(B, self.cfg.vae_bits, 1, H, W, device=self.device)
            return InfinityState(B, branches, grids, sos_R1C, text, caches,
                                 self._rope_table(template(h_div_w)), stage_offsets(grids), f_hat)

        if self.graphs is None:
            return new_state()
        workspace = self.graphs.workspace((B, branches, tuple(grids), template(h_div_w)),
                                          lambda: _Workspace(new_state(), {}))
        kept = workspace.texts.setdefault(text_BTC.shape[1], text)
        if kept is not text:
            torch._foreach_copy_(kept.tensors(), text.tensors())
        state = workspace.state
        for cache in state.caches:
            cache.reset()
        state.text, state.sos_R1C = kept, sos_R1C
        state.f_hat_Bd1HW.zero_()
        return state

    def _rope_table(self, h_div_w_template: float) -> torch.Tensor:
        if h_div_w_template not in self._rope:
            self._rope[h_div_w_template] = rope_table(h_div_w_template, self.dim // self.cfg.heads).to(self.device)
        return self._rope[h_div_w_template]

    def stage_input(self, state: InfinityState, stage: int) -> torch.Tensor:
        if stage == 1:
            return state.sos_R1C
        h, w = state.schedule[stage - 1]
        f_BdHW = F.interpolate(state.f_hat_Bd1HW, size=(1, *self._vae_grid(h, w)), mode="trilinear").squeeze(2)
        if self.cfg.spatial_patchify:
            f_BdHW = F.pixel_unshuffle(f_BdHW, 2)
        return f_BdHW.flatten(2).transpose(1, 2).repeat(state.branches, 1, 1)

    def forward(self, state, x_RnC, stage, positions_Rn, padding, capture_block, prune=None):
        h, w = state.schedule[stage - 1]
        start = state.offsets[stage - 1]
        table_2Ld = state.rope_2Ld[:, start : start + h * w]
        rope = table_2Ld[:, None] if positions_Rn is None else table_2Ld[:, positions_Rn]
        caches, text = state.caches, state.text

        valid_Rn = None if padding is None else padding.valid_Rn

        def run(x_RnC: torch.Tensor, rope: torch.Tensor, valid_Rn: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
            with self._autocast():  # packed when eager; a graph keeps the padded shapes, which repeat
                return self.model(x_RnC, stage, rope, caches, valid_Rn, text, capture_block,
                                  worth_packing(padding) if self.graphs is None and prune is None else None, prune)

        if self.graphs is None:
            logits, change_Rn = run(x_RnC, rope, valid_Rn)
        else:
            key = (stage, capture_block, tuple(text.mask_R11T.shape))  # the text context of its width
            logits, change_Rn = self.graphs.run(key, run, (x_RnC, rope, valid_Rn), caches)
        return logits.mul(self._inv_temperature), change_Rn

    def sample(self, state, pred_RnV, stage, generators, positions_Bn):
        h, w = state.schedule[stage - 1]
        signs_BnD = sample_bits(pred_RnV, state.branches, self._sampling, generators, h * w, positions_Bn)
        return self._codes(signs_BnD > 0)

    def _codes(self, bits_BnD: torch.Tensor) -> torch.Tensor:
        """BSQ codes of a token's bits, normalised per VAE latent (a patchified token holds 4, interleaved)."""
        B, n, D = bits_BnD.shape
        groups = D // self.cfg.vae_bits
        bits_Bngd = bits_BnD.long().view(B, n, self.cfg.vae_bits, groups).transpose(-1, -2)
        return self.vae.quantizer.lfq.codes(bits_Bngd).transpose(-1, -2).reshape(B, n, D)

    def drop_guidance(self, state: InfinityState) -> None:
        B, text = state.batch, state.text
        blocks = [replace(b, ada=tuple(t[:B] for t in b.ada), text_kv=tuple(t[:B] for t in b.text_kv))
                  for b in text.blocks]
        state.text = TextContext(blocks, tuple(t[:B] for t in text.head),
                                 None if text.mask_R11T is None else text.mask_R11T[:B])
        for cache in state.caches:
            cache.keep_rows(B)
        state.branches = 1

    def accumulate(self, state: InfinityState, tokens_BLC: torch.Tensor, stage: int) -> None:
        h, w = state.schedule[stage - 1]
        codes_BDhw = tokens_BLC.float().transpose(1, 2).reshape(state.batch, -1, h, w)
        if self.cfg.spatial_patchify:
            codes_BDhw = F.pixel_shuffle(codes_BDhw, 2)
        codes_Bd1hw = codes_BDhw.unsqueeze(2)
        if stage < len(state.schedule):
            codes_Bd1hw = F.interpolate(codes_Bd1hw, size=state.f_hat_Bd1HW.shape[2:], mode="trilinear")
        state.f_hat_Bd1HW += codes_Bd1hw

    def decode(self, state: InfinityState) -> np.ndarray:
        # One image at a time: an image's bytes must not depend on its batch, and it bounds the decoder's memory.
        images = []
        for f_1d1HW in state.f_hat_Bd1HW.split(1):
            with self._autocast():
                rgb = self.vae.decode(f_1d1HW.squeeze(2)).float()
            images.append(((rgb + 1) / 2).permute(0, 2, 3, 1).mul(255).to(torch.uint8))
        return torch.cat(images).cpu().numpy()


def _pad_to(x_BTC: torch.Tensor, mask_BT: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    pad = width - x_BTC.shape[1]
    return F.pad(x_BTC, (0, 0, 0, pad)), F.pad(mask_BT, (0, pad))


def load_parts(cfg: InfinityConfig, device: torch.device) -> InfinityParts:
    """Read and check the three local checkpoints; raises naming the file and what it lacks, before any work."""
    expected = expected_entries(cfg)
    state = read_state_dict(cfg.transformer)
    for key in LEGACY_BUFFERS:
        state.pop(key, None)
    check_entries(expected["transformer"], state, cfg.transformer, "Infinity transformer")
    vae_state = read_state_dict(cfg.vae, wrapper="vae")
    for key, constant in constant_entries(cfg.vae_bits).items():  # constants: tolerated if a file omits them
        vae_state.setdefault(key, constant)
    check_entries(expected["vae"], vae_state, cfg.vae, "BSQ VAE")
    text = T5Text.load(cfg.text_encoder, device, cfg.text_max_tokens)
    if text.channels != cfg.text_channels:
        raise ValueError(f"text encoder {cfg.text_encoder} gives {text.channels} channels, but text_channels is "
                         f"{cfg.text_channels}")
    with torch.device("meta"):
        transformer, vae = Infinity(cfg), VAE(cfg)
    transformer.load_state_dict(state, strict=True, assign=True)
    vae.load_state_dict(vae_state, strict=True, assign=True)
    vae.encoder = None  # loaded only to check the file; generation never encodes
    return InfinityParts(transformer, vae, text)


def build(cfg: InfinityConfig, sampling: SamplingConfig, device: torch.device, dtype: torch.dtype) -> InfinityBackend:
    return InfinityBackend(cfg, sampling, load_parts(cfg, device), device, dtype)


def expected_entries(cfg: InfinityConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """What `transformer` and `vae` must hold, keys as in the official files (the VAE's under 'vae')."""
    with torch.device("meta"):
        transformer, vae = Infinity(cfg), VAE(cfg)
    return {
        "transformer": {key: tuple(t.shape) for key, t in transformer.state_dict().items()},
        "vae": {key: tuple(t.shape) for key, t in vae.state_dict().items()},
    }
