"""The spec's cost model: what a perfect implementation of SparseVAR would save.

A block costs 2 * P_block FLOPs per token that runs plus 4 * d * q * kv for attention (q tokens that run,
kv the keys they see: every token cached by earlier stages plus this stage's kept ones). The ratio of dense
to sparse totals over a generation is the ideal speed-up; the measured speed-up divided by it is the
implementation's efficiency.
"""

from collections.abc import Sequence
from typing import Protocol


class StageCounts(Protocol):
    tokens: int
    kept: int
    pruned: int  # FastVAR: tokens each pruned sub-layer left out, in `pruned_blocks` of the blocks
    pruned_blocks: int
    branches: int  # rows the image ran: 2 with guidance, 1 without or after speedups.guidance_stages, 0 skipped


def generation_flops(stages: Sequence[StageCounts], block_params: int, dim: int, depth: int, dense: bool) -> float:
    """Estimated transformer FLOPs of one image's generation, over the rows it ran (dense: the most rows of any
    stage, at every stage)."""
    total, cached, dense_rows = 0.0, 0, max(stage.branches for stage in stages)
    for stage in stages:
        q = stage.tokens if dense else stage.kept
        kv = cached + q
        work = depth * (2.0 * block_params * q + 4.0 * dim * q * kv)
        if not dense and stage.pruned:  # FastVAR's pruned blocks run fewer queries (their keys: ignored here)
            work -= stage.pruned_blocks * (2.0 * block_params + 4.0 * dim * kv) * stage.pruned
        total += work * (dense_rows if dense else stage.branches)
        cached = kv
    return total


def flops_ratio(stages: Sequence[StageCounts], block_params: int, dim: int, depth: int) -> float:
    """Dense over sparse estimated FLOPs: the speed-up a perfect implementation would reach."""
    dense = generation_flops(stages, block_params, dim, depth, dense=True)
    return dense / generation_flops(stages, block_params, dim, depth, dense=False)
