"""HART's per-stage sampling of codebook indices, as its official sampler does it.

Guidance at stage si of S is t = cfg·si/(S−1) (the last stage reuses stage S−2's), mixed (1+t)·cond − t·uncond.
Top-k keeps 600 logits before stage 7 (counted from 0) and 300 after, in place, so the Gumbel step sees the
filtered logits. The index is drawn as torch.multinomial draws one sample: argmax(p / q), q ~ Exp(1) over the
whole (tokens, V) tensor. Each image draws its q over its full grid, so a token's draw does not depend on
which other tokens ran.
"""

import torch

from sparsevar.config import SamplingConfig


def stage_ratio(si: int, stages: int) -> float:
    """si/(S−1) for the discrete stages; the last stage keeps the previous stage's value."""
    return min(si, stages - 2) / (stages - 1)


def official_top_k(si: int) -> int:
    return 600 if si < 7 else 300


def guide(logits_RnV: torch.Tensor, branches: int, t: float) -> torch.Tensor:
    if branches == 1:
        return logits_RnV
    cond_BnV, uncond_BnV = logits_RnV.chunk(2, dim=0)
    return (1 + t) * cond_BnV - t * uncond_BnV


def filter_(logits_BnV: torch.Tensor, top_k: int, top_p: float) -> None:
    """Top-k, then top-p (off at 1.0, as the official sampler's 0), setting the dropped logits to −inf."""
    if top_k < logits_BnV.shape[-1]:
        kth = logits_BnV.topk(top_k, dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits_BnV.masked_fill_(logits_BnV < kth, -torch.inf)
    if top_p < 1.0:
        sorted_logits, sorted_idx = logits_BnV.sort(dim=-1, descending=False)
        drop = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        drop[..., -1:] = False
        logits_BnV.masked_fill_(drop.scatter(-1, sorted_idx, drop), -torch.inf)


def _at(x_BLW: torch.Tensor, positions_Bn: torch.Tensor | None) -> torch.Tensor:
    if positions_Bn is None:
        return x_BLW
    return torch.gather(x_BLW, 1, positions_Bn.unsqueeze(-1).expand(-1, -1, x_BLW.shape[-1]))


def exponentials(generators: list[torch.Generator], tokens: int, width: int, positions_Bn: torch.Tensor | None,
                 device: torch.device) -> torch.Tensor:
    """Exp(1) draws per image over its full (tokens, width) grid, taken at the given positions: (B, n, width)."""
    return _at(torch.stack([torch.empty(tokens, width, device=device).exponential_(generator=g)
                            for g in generators]), positions_Bn)


def normals(generators: list[torch.Generator], tokens: int, width: int, positions_Bn: torch.Tensor | None,
            device: torch.device) -> torch.Tensor:
    """N(0, 1) draws per image over its full (tokens, width) grid, taken at the given positions: (B, n, width)."""
    return _at(torch.stack([torch.randn(tokens, width, generator=g, device=device) for g in generators]),
               positions_Bn)


def sample_embeddings(logits_RnV: torch.Tensor, branches: int, si: int, stages: int, tokens: int,
                      sampling: SamplingConfig, more_smooth: bool, codebook_VC: torch.Tensor,
                      generators: list[torch.Generator], positions_Bn: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (B, n) and the token embeddings (B, n, C) they give: hard, or Gumbel-softened with more_smooth.

    `tokens` is the stage's full grid (h*w); sampling.top_k = 0 takes the official schedule, temperature 1 and
    top_p 1 leave the logits as the official sampler does.
    """
    ratio = stage_ratio(si, stages)
    logits_BnV = guide(logits_RnV.float(), branches, sampling.cfg * ratio)
    if sampling.temperature != 1.0:
        logits_BnV = logits_BnV / sampling.temperature
    V, device = logits_BnV.shape[-1], logits_BnV.device
    filter_(logits_BnV, min(sampling.top_k or official_top_k(si), V), sampling.top_p)
    q_BnV = exponentials(generators, tokens, V, positions_Bn, device)
    idx_Bn = (logits_BnV.softmax(dim=-1) / q_BnV).argmax(dim=-1)
    if not more_smooth:
        return idx_Bn, codebook_VC[idx_Bn].float()
    gumbel_BnV = -exponentials(generators, tokens, V, positions_Bn, device).log()
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
    weights_BnV = ((logits_BnV.mul(1 + ratio) + gumbel_BnV) / tau).softmax(dim=-1)
    return idx_Bn, weights_BnV @ codebook_VC.float()
