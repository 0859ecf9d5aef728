"""HART's residual diffusion head: a small AdaLN MLP (`diffloss.net.*` in the official state dict) and the
respaced cosine-schedule ancestral sampler (IDDPM, learned-range variance) that draws each token's continuous
residual from its transformer feature.

The schedule is computed in float64 and each step's constants taken in float32, as the official sampler does.
Noise comes from a caller-supplied function, so each image can draw it over its full token grid.
"""

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
from torch import nn

VAE_SCALE = 0.6  # the head models residual / 0.6
FREQ_DIM = 256


@lru_cache(maxsize=8)
def _frequencies(device: torch.device) -> torch.Tensor:
    """The sinusoidal timestep embedding's frequencies, computed on the CPU and copied to the device once."""
    half = FREQ_DIM // 2
    return torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half).to(device)


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t_N: torch.Tensor) -> torch.Tensor:
        args = t_N[:, None].float() * _frequencies(t_N.device)[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class DenoiserMLP(nn.Module):
    """Predicts (noise, variance interpolation) of a residual token from its noisy value, step and feature z."""

    def __init__(self, channels: int, z_channels: int, width: int, depth: int) -> None:
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_channels, width)
        self.input_proj = nn.Linear(channels, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, 2 * channels)

    def forward(self, x_NC: torch.Tensor, t_N: torch.Tensor, z_NZ: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(x_NC)
        y = self.time_embed(t_N) + self.cond_embed(z_NZ)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)


class DiffusionHead(nn.Module):
    """Named `diffloss` in the official model; holds the denoiser as `net`."""

    def __init__(self, channels: int, z_channels: int, width: int, depth: int) -> None:
        super().__init__()
        self.net = DenoiserMLP(channels, z_channels, width, depth)


def _spaced_steps(total: int, sections: str) -> list[int]:
    """Evenly strided steps per section of the original process (`space_timesteps`)."""
    counts = [int(x) for x in sections.split(",")]
    size_per, extra = divmod(total, len(counts))
    steps, start = [], 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} diffusion steps from a section of {size}")
        stride, at = (1 if count <= 1 else (size - 1) / (count - 1)), 0.0
        for _ in range(count):  # summed, not multiplied, so rounding ties fall as in the official code
            steps.append(start + round(at))
            at += stride
        start += size
    return sorted(set(steps))


class ResidualSampler:
    """Guided ancestral sampling over the respaced cosine schedule (1000 steps, `num_sampling_steps` taken)."""

    def __init__(self, num_sampling_steps: str, total: int = 1000) -> None:
        alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        base = np.array([min(1 - alpha_bar((i + 1) / total) / alpha_bar(i / total), 0.999) for i in range(total)])
        base_cumprod = np.cumprod(1.0 - base)
        self.timestep_map = _spaced_steps(total, num_sampling_steps)
        last, betas = 1.0, []
        for i in self.timestep_map:
            betas.append(1 - base_cumprod[i] / last)
            last = base_cumprod[i]
        betas = np.array(betas, dtype=np.float64)
        cumprod = np.cumprod(1.0 - betas)
        cumprod_prev = np.append(1.0, cumprod[:-1])
        posterior_var = betas * (1.0 - cumprod_prev) / (1.0 - cumprod)
        self.steps = [{
            "recip": np.sqrt(1.0 / cumprod[i]), "recipm1": np.sqrt(1.0 / cumprod[i] - 1),
            "coef1": betas[i] * np.sqrt(cumprod_prev[i]) / (1.0 - cumprod[i]),
            "coef2": (1.0 - cumprod_prev[i]) * np.sqrt(1.0 - betas[i]) / (1.0 - cumprod[i]),
            "min_log": np.log(posterior_var[1] if i == 0 else posterior_var[i]), "max_log": np.log(betas[i]),
        } for i in range(len(betas))]
        self._on_device: dict[torch.device, list[dict[str, torch.Tensor]]] = {}

    def _constants(self, device: torch.device) -> list[dict[str, torch.Tensor]]:
        """Each step's coefficients as float32 scalars on the device, copied there once rather than every step."""
        if device not in self._on_device:
            self._on_device[device] = [{name: torch.tensor(v, dtype=torch.float32, device=device)
                                        for name, v in step.items()} for step in self.steps]
        return self._on_device[device]

    def sample(self, net: DenoiserMLP, z_RnZ: torch.Tensor, branches: int, cfg: float,
               noise: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Residual tokens (n, C) for the n conditional rows of z (conditional rows first, then unconditional).

        Guidance mixes the noise prediction only, (1+cfg)·cond − cfg·uncond, and both halves step from the
        conditional state. As in the official sampler, cfg exactly 1 runs unguided. `noise()` gives (n, C).
        """
        n = z_RnZ.shape[0] // branches
        rows = 2 if branches == 2 and cfg != 1.0 else 1
        z_RnZ = z_RnZ[: rows * n]
        x = noise()
        C, dtype = x.shape[1], next(net.parameters()).dtype
        constants = self._constants(x.device)
        for i in reversed(range(len(self.steps))):
            k = constants[i]
            t_R = torch.full((rows * n,), self.timestep_map[i], device=x.device, dtype=torch.long)
            out = net(x.repeat(rows, 1).to(dtype), t_R, z_RnZ).float()
            eps, var = out[:n, :C], out[:n, C:]
            if rows == 2:
                eps = eps * (1 + cfg) - cfg * out[n:, :C]
            frac = (var + 1) / 2
            log_var = frac * k["max_log"] + (1 - frac) * k["min_log"]
            x0 = (k["recip"] * x - k["recipm1"] * eps).clamp(-1, 1)
            mean = k["coef1"] * x0 + k["coef2"] * x
            x = mean + torch.exp(0.5 * log_var) * noise() if i > 0 else mean
        return x * VAE_SCALE
