"""GroupNorm for the decoders' full-resolution feature maps, with statistics that use the whole GPU.

PyTorch's CUDA GroupNorm gives each (image, group) row of its statistics to one thread block: a decoder runs one
image at a time (batch invariance), so at 1024² a norm has 32 rows for a GPU of 132 multiprocessors, and on the
H200 the statistics took 46 of the 94 ms of an Infinity-2B decode (scripts/gpu/bench.py --decode-experiment,
2026-12-04). `torch.var_mean` splits each long row over many blocks. The sums are the same, in float32, in
another order: results differ from PyTorch's kernel by float32 rounding. On the CPU, PyTorch's own runs, so
CPU images are unchanged.
"""

import torch
from torch import nn


def group_norm_wide(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float, dtype: torch.dtype) -> torch.Tensor:
    """F.group_norm computed in float32 through `torch.var_mean`, returned in `dtype`."""
    N, C = x.shape[:2]
    x_NGm = x.float().reshape(N, groups, -1)
    var_NG1, mean_NG1 = torch.var_mean(x_NGm, dim=-1, keepdim=True, correction=0)
    y_NCm = ((x_NGm - mean_NG1) * torch.rsqrt(var_NG1 + eps)).reshape(N, C, -1)
    if weight is not None:
        y_NCm = y_NCm * weight.float()[:, None]
    if bias is not None:
        y_NCm = y_NCm + bias.float()[:, None]
    return y_NCm.reshape(x.shape).to(dtype)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and names) that takes `group_norm_wide` on CUDA, in the dtype PyTorch's
    would give: float32 under autocast, which runs group_norm in float32, else the input's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda":
            return super().forward(x)
        dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype
        return group_norm_wide(x, self.num_groups, self.weight, self.bias, self.eps, dtype)
