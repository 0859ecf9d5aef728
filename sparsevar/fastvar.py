"""FastVAR's cached token pruning (Guo et al., arXiv 2503.23367), as a speed-up beside SparseVAR on the same loop.

At a pruned stage, before each sub-layer of a pruned block (self-attention, cross-attention, MLP), the rows'
"pivotal" tokens are chosen again: those farthest from the mean of the stage's map (Σ_c (x − mean(x))²), all but
a fraction r. Only they run the sub-layer's branch (norm, attention or MLP, gate), and only their keys and values
enter the cache; the others take that sub-layer's branch output from the reference stage (never pruned, its
outputs kept per block), upsampled to this stage's grid. The residual stream keeps every token, so the head sees
them all. Rows choose apart (the guidance halves too). With SparseVAR at the same stage, FastVAR prunes among
the tokens SparseVAR lets run, and restores from the cache at their positions.

The facts (scores, where the cache is taken and restored, the released scales and ratios) are from the authors'
released code; docs/accelerations.md lists them.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sparsevar.config import FastVARConfig

Branch = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (tokens (R, k, C), their indices) -> output


def take(t: torch.Tensor | None, idx_Rk: torch.Tensor, dim: int) -> torch.Tensor | None:
    """Each row's tokens at idx_Rk along `dim`, the token axis; the row axis is `dim - 1` (size R, or 1 shared by
    every row). For rotary tables (2, R, n, d), validity masks (R, n) and token maps (R, n, C) alike."""
    if t is None:
        return None
    R, k = idx_Rk.shape
    view = [1] * t.dim()
    view[dim - 1], view[dim] = R, k
    shape = list(t.shape)
    shape[dim - 1], shape[dim] = R, k
    full = list(t.shape)
    full[dim - 1] = R
    return t.expand(full).gather(dim, idx_Rk.view(view).expand(shape))


def pivotal(x_RnC: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (R, keep), ascending, of each row's tokens farthest from the mean of its map."""
    x = x_RnC.float()
    score_Rn = (x - x.mean(dim=1, keepdim=True)).pow(2).sum(dim=-1)
    return score_Rn.topk(keep, dim=1).indices.sort(dim=1).values


class StagePruning:
    """FastVAR's work at one stage: at the reference stage, keep each pruned sub-layer's branch output; at a
    pruned stage, run each pruned sub-layer's branch on the pivotal tokens and restore the others from them."""

    def __init__(self, run: "FastVARRun", stage: int, grid: tuple[int, int], positions_Rn: torch.Tensor | None):
        self.run, self.grid, self.positions_Rn = run, grid, positions_Rn
        self.ratio = run.cfg.prune.get(stage)  # None at the reference stage

    def prunes(self, block: int) -> bool:
        first, last = self.run.cfg.layers or (1, self.run.depth)
        return first <= block <= last

    def branch(self, block: int, name: str, x_RnC: torch.Tensor, fn: Branch) -> torch.Tensor:
        """The sub-layer's branch output for every token of x (R, n, C)."""
        if not self.prunes(block):
            return fn(x_RnC, None)
        if self.ratio is None:
            out = fn(x_RnC, None)
            self.run.cache[block, name] = out
            return out
        n = x_RnC.shape[1]
        idx_Rk = pivotal(x_RnC, n - int(n * self.ratio))
        out_RkC = fn(take(x_RnC, idx_Rk, 1), idx_Rk)
        return self.restored(self.run.cache[block, name], out_RkC, idx_Rk)

    def restored(self, cached_RlC: torch.Tensor, out_RkC: torch.Tensor, idx_Rk: torch.Tensor) -> torch.Tensor:
        """The reference stage's outputs upsampled ('area', as FastVAR) to this grid, at the tokens that run here,
        with the pivotal tokens' own outputs scattered over them."""
        R, _, C = cached_RlC.shape
        up_RCHW = F.interpolate(cached_RlC.transpose(1, 2).reshape(R, C, *self.run.cache_grid).float(),
                                size=self.grid, mode="area")
        up_RnC = up_RCHW.flatten(2).transpose(1, 2).to(out_RkC.dtype)
        if self.positions_Rn is not None:
            up_RnC = take(up_RnC, self.positions_Rn, 1)
        return up_RnC.scatter(1, idx_Rk.unsqueeze(-1).expand(-1, -1, C), out_RkC)


class FastVARRun:
    """FastVAR over one generation: which stages cache and prune, and the reference stage's branch outputs."""

    def __init__(self, cfg: FastVARConfig, schedule: list[tuple[int, int]], depth: int) -> None:
        if max(cfg.prune) > len(schedule):
            raise ValueError(f"speedups.fastvar.prune names stage {max(cfg.prune)} of a {len(schedule)}-stage schedule")
        if cfg.layers is not None and cfg.layers[1] > depth:
            raise ValueError(f"speedups.fastvar.layers ends at block {cfg.layers[1]} of a {depth}-block model")
        self.cfg, self.depth, self.schedule = cfg, depth, schedule
        self.cache_grid = schedule[cfg.cache_stage - 1]
        self.cache: dict[tuple[int, str], torch.Tensor] = {}

    def keep_rows(self, rows: int) -> None:
        """Keep the reference stage's outputs of the first `rows` rows only: the conditional rows, once guidance
        stops (`speedups.guidance_stages`)."""
        self.cache = {key: out_RlC[:rows] for key, out_RlC in self.cache.items()}

    def pruned(self, stage: int, ran: int) -> tuple[int, int]:
        """(tokens each pruned sub-layer left out, blocks that pruned) at a stage where `ran` tokens ran."""
        ratio = self.cfg.prune.get(stage)
        if ratio is None or ran == 0:
            return 0, 0
        first, last = self.cfg.layers or (1, self.depth)
        return int(ran * ratio), last - first + 1

    def stage(self, stage: int, positions_Rn: torch.Tensor | None) -> StagePruning | None:
        """This stage's pruning, or None where FastVAR leaves it alone."""
        if stage != self.cfg.cache_stage and stage not in self.cfg.prune:
            return None
        return StagePruning(self, stage, self.schedule[stage - 1], positions_Rn)
