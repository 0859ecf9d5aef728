"""Shared fixtures: one local Ray cluster per test session, and config overrides that make job runs quick."""

import os

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import pytest  # noqa: E402
import torch  # noqa: E402

# Bit-exact comparisons in this process (dense vs sparse, batch vs one by one) assume one intra-op thread,
# as in the generation actors (ray.num_cpus_per_actor=1).
torch.set_num_threads(1)

# KEY=VALUE overrides for `--set` or workflows.config.load_config: 8 stages up to 16x16 tokens (32x32 pixels)
# with SparseVAR from stage 6, so stages 6-8 may exclude tokens; one actor on the CPU, batches of 4.
FAST_OVERRIDES = (
    "model.patch_sizes=[1,2,3,4,6,8,12,16]",
    "sparsevar.start_stage=6",
    "runtime.device=cpu",
    "ray.num_actors=1",
    "ray.batch_size=4",
)


@pytest.fixture(scope="session")
def fast_overrides() -> tuple[str, ...]:
    """KEY=VALUE overrides (a tuple, so no test can change them for the others); extend with [*fast_overrides, ...]."""
    return FAST_OVERRIDES


@pytest.fixture(scope="session")
def ray_cluster():
    """A local two-CPU Ray cluster shared by every test that asks for it (start-up costs seconds)."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)  # always a fresh local cluster, never the developer's own
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        yield ray
    finally:
        ray.shutdown()
