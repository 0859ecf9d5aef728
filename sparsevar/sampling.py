"""Bitwise sampling as Infinity does it: guidance on logits, temperature, top-k/top-p per bit.

The head gives two logits per bit (V = 2 * bits). Each image draws its uniforms over the whole stage grid
from its own generator, so the result of an image depends on neither its batch nor which tokens ran.
"""

import torch

from sparsevar.config import SamplingConfig


def guide_logits(logits_RnV: torch.Tensor, branches: int, cfg: float) -> torch.Tensor:
    """cfg * cond + (1 - cfg) * uncond, conditional rows first (Infinity, cfg_insertion_layer = 0)."""
    if branches == 1:
        return logits_RnV
    cond_BnV, uncond_BnV = logits_RnV.float().chunk(2, dim=0)
    return cfg * cond_BnV + (1.0 - cfg) * uncond_BnV


def bit_probabilities(logits_BnV: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Probability that each bit is 1, after temperature, top-k and top-p: (B, n, bits)."""
    logits_Bnb2 = logits_BnV.float().unflatten(-1, (-1, 2)) / sampling.temperature
    p1_Bnb = logits_Bnb2.softmax(dim=-1)[..., 1]
    if sampling.top_k == 1:
        return (p1_Bnb > 0.5).float()
    # top-p with two values: the less likely one is dropped when its probability is <= 1 - top_p.
    drop = torch.minimum(p1_Bnb, 1.0 - p1_Bnb) <= 1.0 - sampling.top_p
    return torch.where(drop, (p1_Bnb > 0.5).float(), p1_Bnb)


def draw_uniforms(
    generators: list[torch.Generator], tokens: int, bits: int, positions_Bn: torch.Tensor | None, device
) -> torch.Tensor:
    """Per-image uniforms over the full grid (tokens, bits), taken at the given positions: (B, n, bits)."""
    u_BLb = torch.stack([torch.rand(tokens, bits, generator=g, device=device) for g in generators])
    if positions_Bn is None:
        return u_BLb
    return torch.gather(u_BLb, 1, positions_Bn.unsqueeze(-1).expand(-1, -1, bits))


def sample_bits(
    logits_RnV: torch.Tensor,
    branches: int,
    sampling: SamplingConfig,
    generators: list[torch.Generator],
    tokens: int,
    positions_Bn: torch.Tensor | None,
) -> torch.Tensor:
    """Sampled BSQ codes in {-1/sqrt(bits), +1/sqrt(bits)}: (B, n, bits)."""
    p1_Bnb = bit_probabilities(guide_logits(logits_RnV, branches, sampling.cfg), sampling)
    u_Bnb = draw_uniforms(generators, tokens, p1_Bnb.shape[-1], positions_Bn, logits_RnV.device)
    bits = p1_Bnb.shape[-1]
    return torch.where(u_Bnb < p1_Bnb, 1.0, -1.0) / bits**0.5
