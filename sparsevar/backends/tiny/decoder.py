"""The tiny backend's pixel decoder: a small convolutional net from the summed residual map to RGB.

Widest at the token map, halving its channels at each 2x upsampling (to no fewer than 16), so that a
128x128 picture from a 16x16 map costs little more than the map itself.
"""

import torch
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(4, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(4, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return x_BCHW + self.body(x_BCHW)


def widths(channels: int, upsample: int) -> list[int]:
    """Channels at the token map and after each 2x resampling step."""
    return [max(channels >> i, min(channels, 16)) for i in range(upsample + 1)]


class Decoder(nn.Module):
    """(B, bits, h, w) -> (B, 3, h * 2^upsample, w * 2^upsample) in [-1, 1]."""

    def __init__(self, bits: int, channels: int, upsample: int) -> None:
        super().__init__()
        c = widths(channels, upsample)
        layers: list[nn.Module] = [nn.Conv2d(bits, c[0], 3, padding=1), ResBlock(c[0]), ResBlock(c[0])]
        for c_in, c_out in zip(c, c[1:], strict=False):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1),
                       ResBlock(c_out)]
        layers += [nn.GroupNorm(4, c[-1]), nn.SiLU(), nn.Conv2d(c[-1], 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, f_BCHW: torch.Tensor) -> torch.Tensor:
        return self.net(f_BCHW).clamp(-1, 1)
