"""The tiny backend's pixel decoder: a small convolutional net from the summed residual map to RGB."""

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


class Decoder(nn.Module):
    """(B, bits, h, w) -> (B, 3, h * 2^upsample, w * 2^upsample) in [-1, 1]."""

    def __init__(self, bits: int, channels: int, upsample: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(bits, channels, 3, padding=1), ResBlock(channels)]
        for _ in range(upsample):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels, channels, 3, padding=1),
                       ResBlock(channels)]
        layers += [nn.GroupNorm(4, channels), nn.SiLU(), nn.Conv2d(channels, 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, f_BCHW: torch.Tensor) -> torch.Tensor:
        return self.net(f_BCHW).clamp(-1, 1)
