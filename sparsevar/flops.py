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


def generation_flops(stages: Sequence[StageCounts], block_params: int, dim: int, depth: int, dense: bool) -> float:
    """Estimated transformer FLOPs of one image's generation (per guidance branch; the ratio is unaffected)."""
    total, cached = 0.0, 0
    for stage in stages:
        q = stage.tokens if dense else stage.kept
        kv = cached + q
        total += depth * (2.0 * block_params * q + 4.0 * dim * q * kv)
        if not dense and stage.pruned:  # FastVAR's pruned blocks run fewer queries (their keys: ignored here)
            total -= stage.pruned_blocks * (2.0 * block_params + 4.0 * dim * kv) * stage.pruned
        cached = kv
    return total


def flops_ratio(stages: Sequence[StageCounts], block_params: int, dim: int, depth: int) -> float:
    """Dense over sparse estimated FLOPs: the speed-up a perfect implementation would reach."""
    dense = generation_flops(stages, block_params, dim, depth, dense=True)
    return dense / generation_flops(stages, block_params, dim, depth, dense=False)
