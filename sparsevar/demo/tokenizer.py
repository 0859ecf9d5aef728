"""The training half of the tiny backend's tokenizer: a convolutional encoder and the multi-scale BSQ
quantizer whose residual arithmetic is exactly the backend's (area-downsampled stage inputs, bilinear
upsampling of each stage's codes into the summed map), so teacher forcing sees what generation will see."""

import torch
import torch.nn.functional as F
from torch import nn

from sparsevar.backends.tiny.decoder import ResBlock, widths


class Encoder(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> (B, bits, H / 2^downsample, W / 2^downsample): the decoder mirrored."""

    def __init__(self, bits: int, channels: int, downsample: int) -> None:
        super().__init__()
        c = widths(channels, downsample)[::-1]
        layers: list[nn.Module] = [nn.Conv2d(3, c[0], 3, padding=1), ResBlock(c[0])]
        for c_in, c_out in zip(c, c[1:], strict=False):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), ResBlock(c_out)]
        layers += [ResBlock(c[-1]), nn.GroupNorm(4, c[-1]), nn.SiLU(), nn.Conv2d(c[-1], bits, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.net(x_BCHW)


def upsample_codes(codes_BChw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A stage's codes on the last map, as the backend's `accumulate` adds them."""
    if codes_BChw.shape[-2:] == size:
        return codes_BChw
    return F.interpolate(codes_BChw, size=size, mode="bilinear", align_corners=False)


def quantize(f_BCHW: torch.Tensor, patch_sizes: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Multi-scale residual BSQ: per stage, the sign of the area-downsampled residual, scaled to 1/sqrt(bits).

    Returns the summed map (straight-through: gradients reach the encoder as if quantization were the
    identity) and each stage's codes (B, bits, p, p) in {-1, +1}/sqrt(bits).
    """
    size, scale = tuple(f_BCHW.shape[-2:]), f_BCHW.shape[1] ** -0.5
    f_hat = torch.zeros_like(f_BCHW)
    codes = []
    for p in patch_sizes:
        residual = F.interpolate(f_BCHW - f_hat, size=(p, p), mode="area")
        q = torch.where(residual > 0, scale, -scale)
        codes.append(q.detach())
        f_hat = f_hat + upsample_codes(residual + (q - residual).detach(), size)
    return f_hat, codes


def stage_inputs(codes: list[torch.Tensor], patch_sizes: list[int]) -> torch.Tensor:
    """Teacher-forced inputs of stages 2.. (B, sum p^2, bits): the area-downsampled sum of earlier stages."""
    size = tuple(codes[-1].shape[-2:])
    f_hat = torch.zeros_like(codes[-1])
    inputs = []
    for q, p in zip(codes[:-1], patch_sizes[1:], strict=True):
        f_hat = f_hat + upsample_codes(q, size)
        inputs.append(F.interpolate(f_hat, size=(p, p), mode="area").flatten(2).transpose(1, 2))
    return torch.cat(inputs, dim=1)
