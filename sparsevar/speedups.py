"""The training-free speed-ups compared with SparseVAR (`docs/accelerations.md`), as labelled settings of the
one loop, so that `workflows.bench` (speed) and `workflows.quality` (yardstick, PSNR) measure the same rows."""

from sparsevar.config import FastVARConfig, SparseVARConfig, SpeedupConfig

Setting = tuple[str, SparseVARConfig, SpeedupConfig]  # label, SparseVAR, the other speed-ups


def released_shapes(stages: int, depth: int) -> tuple[SpeedupConfig, SpeedupConfig]:
    """FastVAR's released settings carried over to a schedule of `stages` stages and `depth` blocks. Infinity-2B:
    the stages at 24, 32 and 40 of 64 tokens a side cache and prune (by 0.4, 0.5), in blocks 4 to 28 of 32, and
    the last two are skipped; HART-0.7B: the stages at 36, 48 and 64 cache and prune (by 0.5, 0.75), all blocks.
    On the demo model (sides 6, 8, 10, 13, 16 of its last five stages) that is stages 6-8 and 8-10."""
    s = stages
    infinity = FastVARConfig(cache_stage=s - 4, prune={s - 3: 0.4, s - 2: 0.5}, layers=(2, max(2, depth - 1)))
    hart = FastVARConfig(cache_stage=s - 2, prune={s - 1: 0.5, s: 0.75})
    return SpeedupConfig(skip_last_stages=2, fastvar=infinity), SpeedupConfig(fastvar=hart)


def compared(sv: SparseVARConfig, stages: int, depth: int) -> list[Setting]:
    """Every other speed-up alone (on dense) and with the config's SparseVAR where they compose: the last one or
    two stages skipped; FastVAR in its released shapes (`released_shapes`); guidance on the first half of the
    stages, or on all but the last two or the last one."""
    dense, on = sv.model_copy(update={"enabled": False}), sv.model_copy(update={"enabled": True})
    sparse = f"{on.normalize} τ={on.tau}"
    out: list[Setting] = []
    for k in (1, 2):
        skip = SpeedupConfig(skip_last_stages=k)
        out += [(f"dense, last {k} skipped", dense, skip), (f"{sparse}, last {k} skipped", on, skip)]
    infinity_shape, hart_shape = released_shapes(stages, depth)
    prune_only = infinity_shape.model_copy(update={"skip_last_stages": 0})
    out += [("FastVAR, Infinity-2B's shape", dense, infinity_shape),
            ("FastVAR, Infinity-2B's shape without the skip", dense, prune_only),
            ("FastVAR, HART-0.7B's shape", dense, hart_shape)]
    if on.start_stage > prune_only.fastvar.cache_stage:  # FastVAR restores from a stage SparseVAR leaves whole
        out += [(f"{sparse} + FastVAR, Infinity-2B's shape without the skip", on, prune_only),
                (f"{sparse} + FastVAR, Infinity-2B's shape", on, infinity_shape)]
    for n in sorted({stages // 2, stages - 2, stages - 1}):
        guidance = SpeedupConfig(guidance_stages=n)
        out += [(f"dense, guidance on stages 1-{n}", dense, guidance),
                (f"{sparse}, guidance on stages 1-{n}", on, guidance)]
    return out
