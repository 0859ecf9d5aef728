"""The `tiny` backend: the embedded default model, random weights from a seed or a small trained file."""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparsevar.attention import KVCache, rope_2d_table
from sparsevar.backends.tiny.config import TinyConfig
from sparsevar.backends.tiny.decoder import Decoder
from sparsevar.backends.tiny.text import ByteTokenizer, TextEncoder
from sparsevar.backends.tiny.transformer import Conditioning, TextContext, TinyTransformer
from sparsevar.config import SamplingConfig
from sparsevar.packing import worth_packing
from sparsevar.sampling import sample_bits

DEMO_WEIGHTS = Path(__file__).parents[2] / "demo" / "weights" / "demo.safetensors"


class TinyModel(nn.Module):
    """All weights of the tiny backend, under the names its checkpoint files use."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.text_encoder = TextEncoder(cfg.text_dim, cfg.text_depth, cfg.text_heads, cfg.max_text_tokens)
        self.cfg_uncond = nn.Parameter(torch.randn(cfg.max_text_tokens, cfg.text_dim) * 0.02)
        self.transformer = TinyTransformer(
            cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.bits, cfg.text_dim, len(cfg.patch_sizes)
        )
        self.decoder = Decoder(cfg.bits, cfg.decoder_channels, cfg.upsample)


@dataclass
class TinyState:
    """One generation in flight."""

    batch: int
    branches: int
    schedule: list[tuple[int, int]]
    cond: Conditioning
    sos_R1C: torch.Tensor
    text: TextContext
    caches: list[KVCache]
    f_hat_BCHW: torch.Tensor


def weight_files(cfg: TinyConfig) -> list[str]:
    """The weights file `model.weights` names (`demo`: the shipped one); none for random weights."""
    if not cfg.weights:
        return []
    return [str(DEMO_WEIGHTS) if cfg.weights == "demo" else cfg.weights]


def load_weights(model: nn.Module, path: str) -> None:
    """Load a state dict saved by torch.save or safetensors, strictly, with a message naming the file.

    `demo` names the demo model's weights shipped in the package (sparsevar/demo/weights/demo.safetensors).
    """
    if path == "demo":
        path = str(DEMO_WEIGHTS)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"tiny model weights not found: {path}; fix model.weights or remove it") from None
    model.load_state_dict(state, strict=True)


class TinyBackend:
    name = "tiny"
    kept_multiple = 1

    def __init__(self, cfg: TinyConfig, sampling: SamplingConfig, device: torch.device, dtype=torch.float32):
        self.cfg, self.sampling, self.device, self.dtype = cfg, sampling, device, dtype
        self.depth, self.dim = cfg.depth, cfg.dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.model = TinyModel(cfg)
        if cfg.weights:
            load_weights(self.model, cfg.weights)
        self.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.block_params = sum(p.numel() for p in self.model.transformer.blocks[0].parameters())
        self.tokenizer = ByteTokenizer(cfg.max_text_tokens)
        self._rope: dict[tuple[int, int, tuple[int, int]], torch.Tensor] = {}

    def schedule(self, h_div_w: float) -> list[tuple[int, int]]:
        ratio = math.sqrt(h_div_w)
        return [(max(1, round(p * ratio)), max(1, round(p / ratio))) for p in self.cfg.patch_sizes]

    def branches(self, state: TinyState) -> int:
        return state.branches

    def begin(self, prompts, negative_prompts, h_div_w) -> TinyState:
        B, m = len(prompts), self.model
        guided = self.sampling.cfg != 1.0 or any(negative_prompts)
        ids, mask = self.tokenizer(prompts, self.device)
        text_BTC = m.text_encoder(ids, mask).to(self.dtype)
        if guided:
            uncond_BTC = m.cfg_uncond[: ids.shape[1]].expand(B, -1, -1)
            if any(negative_prompts):  # a negative prompt replaces the learned unconditional text of its row
                neg_ids, neg_mask = self.tokenizer([n or "" for n in negative_prompts], self.device)
                neg_BTC = m.text_encoder(neg_ids, neg_mask).to(self.dtype)
                width = max(ids.shape[1], neg_ids.shape[1])
                text_BTC, mask = _pad_to(text_BTC, mask, width)
                neg_BTC, neg_mask = _pad_to(neg_BTC, neg_mask, width)
                uncond_BTC = m.cfg_uncond[:width].expand(B, -1, -1)
                has_neg = torch.tensor([bool(n) for n in negative_prompts], device=self.device)[:, None]
                uncond_BTC = torch.where(has_neg[..., None], neg_BTC, uncond_BTC)
                uncond_mask = torch.where(has_neg, neg_mask, mask)
            else:
                uncond_mask = mask
            text_BTC, mask = torch.cat([text_BTC, uncond_BTC]), torch.cat([mask, uncond_mask])
        branches = 2 if guided else 1
        R = branches * B
        cond_R1C = m.transformer.condition(text_BTC, mask)
        text_mask = None if bool(mask.all()) else mask[:, None, None, :]
        text = TextContext([blk.cross.text_kv(text_BTC) for blk in m.transformer.blocks], text_mask)
        schedule = self.schedule(h_div_w)
        capacity = sum(h * w for h, w in schedule)
        heads, dim = self.cfg.heads, self.cfg.dim
        caches = [KVCache(R, heads, capacity, dim // heads, self.device, self.dtype) for _ in range(self.depth)]
        H, W = schedule[-1]
        f_hat = torch.zeros(B, self.cfg.bits, H, W, device=self.device, dtype=torch.float32)
        sos_R1C = cond_R1C + m.transformer.pos_start
        return TinyState(B, branches, schedule, m.transformer.conditioning(cond_R1C), sos_R1C, text, caches, f_hat)

    def stage_input(self, state: TinyState, stage: int) -> torch.Tensor:
        if stage == 1:
            return state.sos_R1C
        h, w = state.schedule[stage - 1]
        f_BChw = F.interpolate(state.f_hat_BCHW, size=(h, w), mode="area")
        x_BLC = f_BChw.flatten(2).transpose(1, 2).to(self.dtype)
        return x_BLC.repeat(state.branches, 1, 1)

    def _rope_table(self, state: TinyState, stage: int) -> torch.Tensor:
        h, w = state.schedule[stage - 1]
        key = (h, w, state.schedule[-1])
        if key not in self._rope:
            table = rope_2d_table(h, w, self.cfg.dim // self.cfg.heads, state.schedule[-1])
            self._rope[key] = table.to(self.device, self.dtype)
        return self._rope[key]

    def forward(self, state, x_RnC, stage, positions_Rn, padding, capture_block, prune=None):
        table_2Ld = self._rope_table(state, stage)
        if positions_Rn is None:
            rope = table_2Ld[:, None]
        else:
            rope = table_2Ld[:, positions_Rn]
        return self.model.transformer(
            x_RnC, stage, state.cond, rope, state.caches, None if padding is None else padding.valid_Rn, state.text,
            capture_block, worth_packing(padding) if prune is None else None, prune,
        )

    def sample(self, state, pred_RnV, stage, generators, positions_Bn):
        h, w = state.schedule[stage - 1]
        return sample_bits(pred_RnV, state.branches, self.sampling, generators, h * w, positions_Bn)

    def drop_guidance(self, state: TinyState) -> None:
        B, cond, text = state.batch, state.cond, state.text
        state.cond = Conditioning([tuple(t[:B] for t in mod) for mod in cond.blocks], tuple(t[:B] for t in cond.head))
        state.text = TextContext([(k[:B], v[:B]) for k, v in text.kv], None if text.mask_R11T is None
                                 else text.mask_R11T[:B])
        for cache in state.caches:
            cache.keep_rows(B)
        state.branches = 1

    def accumulate(self, state: TinyState, tokens_BLC: torch.Tensor, stage: int) -> None:
        h, w = state.schedule[stage - 1]
        r_BChw = tokens_BLC.float().transpose(1, 2).reshape(state.batch, -1, h, w)
        if (h, w) != state.schedule[-1]:
            r_BChw = F.interpolate(r_BChw, size=state.schedule[-1], mode="bilinear", align_corners=False)
        state.f_hat_BCHW += r_BChw

    def decode(self, state: TinyState) -> np.ndarray:
        # One image at a time: convolution kernels pick algorithms by batch size, and an image's bytes
        # must not depend on the batch it was generated in.
        images = []
        for f_1CHW in state.f_hat_BCHW.split(1):
            rgb = self.model.decoder(f_1CHW.to(self.dtype)).float()
            images.append(((rgb + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1))
        return torch.cat(images).cpu().numpy()


def _pad_to(x_BTC: torch.Tensor, mask_BT: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    pad = width - x_BTC.shape[1]
    return F.pad(x_BTC, (0, 0, 0, pad)), F.pad(mask_BT, (0, pad))


def build(cfg: TinyConfig, sampling: SamplingConfig, device: torch.device, dtype: torch.dtype) -> TinyBackend:
    return TinyBackend(cfg, sampling, device, dtype)


def expected_entries(cfg: TinyConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """The tiny model's single state dict (`model.weights`), built on the meta device."""
    with torch.device("meta"):
        model = TinyModel(cfg)
    return {"model": {key: tuple(value.shape) for key, value in model.state_dict().items()}}
