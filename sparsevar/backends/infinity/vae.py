"""Infinity's BSQ VAE under the official checkpoint's names: the code lookup and the decoder.

The official file holds the whole tokenizer (`{'vae': state_dict}`): encoder, decoder and the quantizer's bit
mask (under `quantizer.` and its alias `quantize.`). The encoder is declared here only so the file loads
strictly; generation never encodes, so the backend drops it after loading. Layers wrap their conv and norm the
official way (`conv1.conv.weight`, `norm1.norm.weight`); with ch_mult of n levels the decoder upsamples n - 1
times (16x for [1, 2, 4, 4, 4]).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from sparsevar.backends.infinity.config import InfinityConfig
from sparsevar.group_norm import GroupNorm


class Conv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Norm(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels % 32 and channels % 24:
            raise ValueError(f"VAE group norm needs channels divisible by 32 or 24, got {channels}")
        self.norm = GroupNorm(32 if channels % 32 == 0 else 24, channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = Norm(cin), Conv(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = Norm(cout), Conv(cout, cout, 3, padding=1)
        self.nin_shortcut = Conv(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample(nn.Module):
    """Encoder layout only: a stride-2 conv held as `.conv`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv(channels, channels, 3, stride=2)


def _level(blocks: list[ResnetBlock], resample: nn.Module | None, resample_name: str) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    if resample is not None:
        level.add_module(resample_name, resample)
    return level


def _middle(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.block_2 = ResnetBlock(channels, channels), ResnetBlock(channels, channels)
    return mid


class Decoder(nn.Module):
    """(B, bits, h, w) summed codes -> (B, 3, h * 2^(n-1), w * 2^(n-1)), unclamped."""

    def __init__(self, bits: int, ch: int, mult: list[int], res_blocks: int) -> None:
        super().__init__()
        levels = len(mult)
        block_in = ch * mult[-1]
        self.conv_in = Conv(bits, block_in, 3, padding=1)
        self.mid = _middle(block_in)
        up: list[nn.Module] = []
        for i in reversed(range(levels)):
            blocks = []
            for _ in range(res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * mult[i]))
                block_in = ch * mult[i]
            up.insert(0, _level(blocks, Upsample(block_in) if i >= 1 else None, "upsample"))
        self.up = nn.ModuleList(up)
        self.norm_out = Norm(block_in)
        self.conv_out = Conv(block_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class EncoderLayout(nn.Module):
    """The encoder's parameters, declared so the official file loads strictly; it has no forward."""

    def __init__(self, bits: int, ch: int, mult: list[int], res_blocks: int) -> None:
        super().__init__()
        self.conv_in = Conv(3, ch, 3, padding=1)
        down, block_in = [], ch
        for i, m in enumerate(mult):
            blocks = []
            for _ in range(res_blocks):
                blocks.append(ResnetBlock(block_in, ch * m))
                block_in = ch * m
            down.append(_level(blocks, Downsample(block_in) if i < len(mult) - 1 else None, "downsample"))
        self.down = nn.ModuleList(down)
        self.mid = _middle(block_in)
        self.norm_out = Norm(block_in)
        self.conv_out = Conv(block_in, bits, 3, padding=1)


def bit_mask(bits: int) -> torch.Tensor:
    return 2 ** torch.arange(bits - 1, -1, -1)


def constant_entries(bits: int) -> dict[str, torch.Tensor]:
    """State-dict entries that hold no learned values (the quantiser's bit mask, under both names)."""
    return {"quantizer.lfq.mask": bit_mask(bits), "quantize.lfq.mask": bit_mask(bits)}


class BSQ(nn.Module):
    """Binary spherical quantiser: a code is bits -> ±1/sqrt(d), L2-normalised (`quantizer.lfq`)."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.register_buffer("mask", bit_mask(bits))

    def codes(self, bits_Nd: torch.Tensor) -> torch.Tensor:
        """Codes of 0/1 bits along the last dim, computed as the official `indices_to_codes`."""
        scale = 1 / math.sqrt(self.bits)
        return F.normalize(bits_Nd * scale * 2 - scale, dim=-1)


class Quantizer(nn.Module):
    def __init__(self, bits: int) -> None:
        super().__init__()
        self.lfq = BSQ(bits)


class VAE(nn.Module):
    def __init__(self, cfg: InfinityConfig) -> None:
        super().__init__()
        args = (cfg.vae_bits, cfg.vae_base_channels, cfg.vae_channel_mult, cfg.vae_res_blocks)
        self.encoder: EncoderLayout | None = EncoderLayout(*args)
        self.decoder = Decoder(*args)
        self.quantizer = Quantizer(cfg.vae_bits)
        self.quantize = self.quantizer  # the official model registers its quantiser under both names

    def decode(self, f_BdHW: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W)."""
        return self.decoder(f_BdHW).clamp(-1, 1)
