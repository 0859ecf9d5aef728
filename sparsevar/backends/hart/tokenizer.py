"""The inference half of HART's hybrid tokenizer, under the official `vae.*` names: the codebook, the partially
shared Phi convolutions that refine each upsampled stage, and the convolutional decoder to pixels.

The official tokenizer file also holds training-only parts (encoder, quant_conv, a second decoder, codebook
hit statistics, the discriminator); `TRAINING_ONLY` names them so the loader can tell them from stray entries.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparsevar.backends.hart.folders import TokenizerArch
from sparsevar.group_norm import GroupNorm

TRAINING_ONLY = ("vae.encoder.", "vae.quant_conv.", "vae.decoder2.", "vae.post_quant_conv2.",
                 "vae.quantize.ema_vocab_hit_SV", "disc.")


def _norm(channels: int) -> GroupNorm:
    return GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map, softmax scale C^-1/2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        # Explicit products in the official order (it runs once per image, at the latent size): equal bytes.
        B, C, H, W = x_BCHW.shape
        q_BCL, k_BCL, v_BCL = self.qkv(self.norm(x_BCHW)).reshape(B, 3, C, H * W).unbind(1)
        w_BLL = torch.bmm(q_BCL.transpose(1, 2).contiguous(), k_BCL.contiguous()).mul_(C ** -0.5).softmax(dim=2)
        h_BCL = torch.bmm(v_BCL.contiguous(), w_BLL.transpose(1, 2).contiguous())
        return x_BCHW + self.proj_out(h_BCL.reshape(B, C, H, W))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Middle(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(channels, channels), AttnBlock(channels), \
            ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution of the decoder: 3 residual blocks (with attention at the coarsest), then 2x upsampling."""

    def __init__(self, c_in: int, c_out: int, attention: bool, upsample: bool, blocks: int = 3) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(blocks))
        self.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(blocks if attention else 0))
        if upsample:
            self.upsample = Upsample(c_out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            h = block(h)
            if self.attn:
                h = self.attn[j](h)
        return self.upsample(h) if hasattr(self, "upsample") else h


class Decoder(nn.Module):
    def __init__(self, arch: TokenizerArch) -> None:
        super().__init__()
        widths = [arch.ch * m for m in arch.ch_mult]
        self.conv_in = nn.Conv2d(arch.z_channels, widths[-1], 3, padding=1)
        self.mid = Middle(widths[-1])
        last = len(widths) - 1
        # up[i] works at resolution level i; they run from the coarsest (last) to the finest (0).
        self.up = nn.ModuleList(
            Level(widths[min(i + 1, last)], widths[i], attention=i == last, upsample=i != 0) for i in range(last + 1))
        self.norm_out = _norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], 3, 3, padding=1)

    def forward(self, z_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z_BCHW))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """(1 − r)·h + r·conv(h): refines an upsampled stage before it joins the running sum."""

    def __init__(self, channels: int, ratio: float) -> None:
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.ratio) + super().forward(h).mul(self.ratio)


class SharedPhi(nn.Module):
    """K convolutions shared by the stages; stage si of S takes the one whose tick is nearest si/(S−1)."""

    def __init__(self, channels: int, ratio: float, count: int) -> None:
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels, ratio) for _ in range(count))
        margin = 1 / 3 / count if count == 4 else 1 / 2 / count
        self.ticks = np.linspace(margin, 1 - margin, count)

    def at(self, si: int, stages: int) -> Phi:
        return self.qresi_ls[int(np.argmin(np.abs(self.ticks - si / (stages - 1))))]


class Quantizer(nn.Module):
    def __init__(self, arch: TokenizerArch) -> None:
        super().__init__()
        self.embedding = nn.Embedding(arch.vocab_size, arch.z_channels)
        self.quant_resi = SharedPhi(arch.z_channels, arch.quant_resi, arch.share_quant_resi)


class VAE(nn.Module):
    def __init__(self, arch: TokenizerArch) -> None:
        super().__init__()
        self.quantize = Quantizer(arch)
        self.post_quant_conv = nn.Conv2d(arch.z_channels, arch.z_channels, 3, padding=1)
        self.decoder = Decoder(arch)


class HybridTokenizer(nn.Module):
    def __init__(self, arch: TokenizerArch) -> None:
        super().__init__()
        self.vae = VAE(arch)

    @property
    def codebook(self) -> torch.Tensor:
        return self.vae.quantize.embedding.weight

    def refine(self, h_BChw: torch.Tensor, si: int, stages: int, size: int) -> torch.Tensor:
        """A discrete stage's contribution to f_hat: bicubic upsampling to the last grid, then its Phi."""
        up = F.interpolate(h_BChw, size=(size, size), mode="bicubic")
        return self.vae.quantize.quant_resi.at(si, stages)(up)

    def decode(self, f_hat_BCHW: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1]."""
        return self.vae.decoder(self.vae.post_quant_conv(f_hat_BCHW)).clamp(-1, 1)
