"""The other speed-ups on Infinity's and HART's architectures (tiny, random weights): each at its neutral value
gives the image of the loop without it, byte for byte, and at work changes it."""

import pytest
import torch

from sparsevar.config import FastVARConfig, SparseVARConfig, SpeedupConfig
from sparsevar.generate import Request, generate
from tests.test_hot_path import hart_backend, infinity_backend

REQUESTS = [Request("a red fox", 1), Request("a lighthouse at dusk", 2, "blurry")]


@pytest.fixture(scope="module", params=["infinity", "hart"])
def backend(request):
    torch.set_num_threads(1)
    backend, _ = (hart_backend if request.param == "hart" else infinity_backend)()
    return backend


def pixels(results) -> list[bytes]:
    return [r.pixels_HWC.tobytes() for r in results]


def fastvar(stages: int, ratio: float) -> SpeedupConfig:
    """FastVAR's released shape: the third stage from the end caches, the next two prune, blocks 2 to 3."""
    return SpeedupConfig(fastvar=FastVARConfig(cache_stage=stages - 2, prune={stages - 1: ratio, stages: ratio},
                                               layers=(2, 3)))


def test_neutral_values_give_the_loops_own_images_and_working_ones_change_them(backend):
    stages = len(backend.schedule(1.0))
    for sv in (SparseVARConfig(enabled=False), SparseVARConfig(tau=0.6, start_stage=stages, score_block=2)):
        plain = pixels(generate(backend, REQUESTS, sv))
        assert pixels(generate(backend, REQUESTS, sv, SpeedupConfig(skip_last_stages=0))) == plain
        if not sv.enabled:  # FastVAR's cache stage must come before SparseVAR's first sparse stage
            assert pixels(generate(backend, REQUESTS, sv, fastvar(stages, 0.0))) == plain
            assert pixels(generate(backend, REQUESTS, sv, fastvar(stages, 0.5))) != plain
        skipped = generate(backend, REQUESTS, sv, SpeedupConfig(skip_last_stages=1))
        assert pixels(skipped) != plain and skipped[0].stages[-1].kept == 0
        assert pixels(generate(backend, REQUESTS, sv, SpeedupConfig(guidance_stages=stages))) == plain
        cut = generate(backend, REQUESTS, sv, SpeedupConfig(guidance_stages=stages - 2))
        assert pixels(cut) != plain and [s.branches for s in cut[0].stages[-3:]] == [2, 1, 1]
    # FastVAR's reference stage caches both halves, its pruned stages after the cut restore the conditional one
    both = generate(backend, REQUESTS, SparseVARConfig(enabled=False),
                    fastvar(stages, 0.5).model_copy(update={"guidance_stages": stages - 2}))
    assert [(s.branches, s.pruned > 0) for s in both[0].stages[-2:]] == [(1, True), (1, True)]
