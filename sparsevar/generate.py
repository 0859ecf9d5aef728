"""The one generation loop of every backend, with SparseVAR token selection and per-stage statistics.

Read top to bottom it is the whole algorithm of `shared/spec/sparsevar.md`: each stage scores the previous
stage's block-s change, keeps high-frequency tokens and anchors, runs only those, and fills the rest.
"""

import itertools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from sparsevar.backend import Backend
from sparsevar.config import SparseVARConfig, SpeedupConfig
from sparsevar.fastvar import FastVARRun
from sparsevar.packing import Padding
from sparsevar.sparse import (
    anchor_layout,
    fill_scores,
    fill_tokens,
    gather_tokens,
    interpolate_scores,
    normalize_scores,
    plan_stage,
)

NO_SPEEDUPS = SpeedupConfig()


@dataclass(frozen=True)
class Request:
    """One image to generate."""

    prompt: str
    seed: int
    negative_prompt: str | None = None
    h_div_w: float = 1.0


@dataclass(frozen=True)
class StageStats:
    """What the spec asks every generation to record for each stage (from 1); latency is the batch's."""

    stage: int
    height: int
    width: int
    tokens: int
    kept: int
    latency_ms: float
    overhead_ms: float = 0.0  # of latency_ms: scoring, gathering and filling (device-synchronised when profiling)
    pruned: int = 0  # FastVAR: tokens each of its pruned sub-layers left out (speedups.fastvar)
    pruned_blocks: int = 0  # FastVAR: the blocks that pruned at this stage
    branches: int = 1  # rows the image ran: 2 with guidance, 1 without or after speedups.guidance_stages, 0 skipped


@dataclass(frozen=True)
class ImageResult:
    pixels_HWC: np.ndarray
    stages: list[StageStats]
    latency_ms: float  # wall time of the batch that made the image
    tokens: list[torch.Tensor] | None = None  # per stage, the (h*w, C) residual tokens, when asked for
    text_ms: float = 0.0  # of the batch's latency: text encoding and set-up before stage 1
    decode_ms: float = 0.0  # of the batch's latency: decoding the final map into pixels
    # per stage, when asked for: which tokens ran, bit-packed row-major (np.packbits of the h×w mask); None for a
    # stage where every token ran
    keep_masks: list[bytes | None] | None = None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Stopwatch:
    """Sums the wall time of SparseVAR's own work in a stage; synchronises the device only when profiling."""

    def __init__(self, device: torch.device, profile: bool) -> None:
        self.device, self.profile, self.ms = device, profile, 0.0

    @contextmanager
    def __call__(self) -> Iterator[None]:
        if self.profile:
            _synchronize(self.device)
        started = time.perf_counter()
        yield
        if self.profile:
            _synchronize(self.device)
        self.ms += (time.perf_counter() - started) * 1e3


class _StageClock:
    """Stage boundaries: CUDA events on a GPU, read once the generation has synchronised (a stage never waits
    for the device just to be timed); wall time on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.marks = device, []

    def mark(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive marks; on a GPU, call after synchronising."""
        pairs = itertools.pairwise(self.marks)
        if self.device.type == "cuda":
            return [start.elapsed_time(end) for start, end in pairs]
        return [(end - start) * 1e3 for start, end in pairs]


def first_sparse_stage(sv: SparseVARConfig) -> int | None:
    """The first stage (from 1) that may exclude tokens, or None when SparseVAR is off."""
    return max(sv.start_stage, 2) if sv.enabled else None


def random_scores(requests: list[Request], tokens: int, stage: int, device: torch.device) -> torch.Tensor:
    """The random-exclusion baseline's scores: uniform ranks per image, from a generator of its own (B, L)."""
    rows = []
    for r in requests:
        generator = torch.Generator().manual_seed(r.seed * 1000 + stage)
        rows.append(torch.randperm(tokens, generator=generator))
    return (torch.stack(rows).double() / max(tokens - 1, 1)).to(device)


def check_no_graphs(backend: Backend, setting: str) -> None:
    """Settings that change a generation's tensors mid-way have no place in CUDA graphs yet."""
    if getattr(backend, "graphs", None) is not None:
        raise ValueError(f"{setting} does not run with CUDA graphs yet: set model.cuda_graphs: false")


def check_fastvar(backend: Backend, speedups: SpeedupConfig, first_sparse: int | None) -> None:
    """FastVAR's reference stage must run whole, and its per-generation caches have no place in CUDA graphs yet."""
    check_no_graphs(backend, "speedups.fastvar")
    if first_sparse is not None and first_sparse <= speedups.fastvar.cache_stage:
        raise ValueError(f"speedups.fastvar.cache_stage ({speedups.fastvar.cache_stage}) must come before "
                         f"SparseVAR's first sparse stage ({first_sparse}): FastVAR restores from its every token")


@torch.inference_mode()
def generate(
    backend: Backend, requests: list[Request], sv: SparseVARConfig, speedups: SpeedupConfig = NO_SPEEDUPS, *,
    record_tokens: bool = False, record_masks: bool = False, profile: bool = False,
) -> list[ImageResult]:
    """Generate one image per request in a single batch (all requests share one aspect ratio).

    record_tokens keeps every stage's residual tokens (for fidelity against dense); record_masks keeps every
    stage's keep mask, bit-packed (for reports); profile synchronises the device around SparseVAR's own work so
    that `overhead_ms` is exact on GPUs too.
    """
    if len({r.h_div_w for r in requests}) != 1:
        raise ValueError("a batch must share one h_div_w; group requests by aspect ratio first")
    if sv.enabled and not 1 <= sv.score_block <= backend.depth:
        raise ValueError(f"sparsevar.score_block={sv.score_block} is outside 1..{backend.depth} for {backend.name}")
    B, device = len(requests), backend.device
    schedule = backend.schedule(requests[0].h_div_w)
    if speedups.skip_last_stages >= len(schedule):
        raise ValueError(f"speedups.skip_last_stages={speedups.skip_last_stages} leaves none of {backend.name}'s "
                         f"{len(schedule)} stages to run")
    last = len(schedule) - speedups.skip_last_stages  # the last stage that runs
    first_sparse = first_sparse_stage(sv)
    fastvar = None
    if speedups.fastvar.prune:
        check_fastvar(backend, speedups, first_sparse)
        fastvar = FastVARRun(speedups.fastvar, schedule, backend.depth)
    guided_until = speedups.guidance_stages
    if guided_until is not None and guided_until < last:
        check_no_graphs(backend, "speedups.guidance_stages")
    generators = [torch.Generator(device=device).manual_seed(r.seed) for r in requests]

    _synchronize(device)
    t_batch = time.perf_counter()
    clock = _StageClock(device)
    clock.mark()
    state = backend.begin([r.prompt for r in requests], [r.negative_prompt for r in requests], requests[0].h_div_w)
    branches = backend.branches(state)
    score_Bhw: torch.Tensor | None = None
    kept: list[tuple[int, ...]] = []  # per stage, per image
    overhead_ms: list[float] = []
    rows: list[int] = []  # per stage, the rows each image ran
    tokens: list[list[torch.Tensor]] = [[] for _ in requests]
    masks: list[list[bytes | None]] = [[] for _ in requests]
    clock.mark()
    for stage, (h, w) in enumerate(schedule[:last], start=1):
        sparse_work = _Stopwatch(device, profile)
        if stage - 1 == guided_until and branches == 2:
            backend.drop_guidance(state)
            branches = backend.branches(state)
            if fastvar is not None:
                fastvar.keep_rows(B)
        x_RLC = backend.stage_input(state, stage)
        plan = None
        if first_sparse is not None and stage >= first_sparse:
            with sparse_work():
                s_BL = interpolate_scores(score_Bhw, (h, w)).reshape(B, h * w)
                if sv.selection == "random":
                    s_BL = random_scores(requests, h * w, stage, device)
                anchors = anchor_layout(h, w, sv.anchor_grid, device) if sv.anchor_grid else (None, None)
                plan = plan_stage(s_BL, sv.tau, *anchors, multiple=backend.kept_multiple)
                if min(plan.counts) == h * w:
                    plan = None  # every token runs: take the dense path, which is the same computation
        wants_score = first_sparse is not None and first_sparse <= stage + 1 <= last
        capture = sv.score_block if wants_score else None

        if plan is None:
            prune = None if fastvar is None else fastvar.stage(stage, None)
            pred_RLV, change_Rn = backend.forward(state, x_RLC, stage, None, None, capture, prune)
            tokens_BLC = backend.sample(state, pred_RLV, stage, generators, None)
        else:
            with sparse_work():
                idx_Rn = plan.kept_idx_Bn.repeat(branches, 1)
                padding = None
                if plan.valid_Bn is not None:
                    padding = Padding(plan.valid_Bn.repeat(branches, 1), branches * sum(plan.counts))
                x_RnC = gather_tokens(x_RLC, idx_Rn)
            prune = None if fastvar is None else fastvar.stage(stage, idx_Rn)
            pred_RnV, change_Rn = backend.forward(state, x_RnC, stage, idx_Rn, padding, capture, prune)
            if sv.fill == "logits" and sv.anchor_grid:
                with sparse_work():
                    pred_RLV = fill_tokens(pred_RnV, plan.src_idx_BL.repeat(branches, 1), plan.has_sources)
                tokens_BLC = backend.sample(state, pred_RLV, stage, generators, None)
            else:
                tokens_BnC = backend.sample(state, pred_RnV, stage, generators, plan.kept_idx_Bn)
                with sparse_work():
                    tokens_BLC = fill_tokens(tokens_BnC, plan.src_idx_BL, plan.has_sources)
        backend.accumulate(state, tokens_BLC, stage)
        if record_tokens:
            for i, tokens_LC in enumerate(tokens_BLC.cpu()):
                tokens[i].append(tokens_LC)
        if record_masks:
            packed_BL = None if plan is None else np.packbits(plan.keep_BL.cpu().numpy(), axis=1)
            for i in range(B):
                masks[i].append(None if packed_BL is None else packed_BL[i].tobytes())

        if change_Rn is not None:  # the conditional rows score the next stage; uncond rows share the mask
            with sparse_work():
                d_Bn = change_Rn[:B]
                d_BL = d_Bn if plan is None else fill_scores(d_Bn, plan.src_idx_BL, plan.has_sources)
                score_Bhw = normalize_scores(d_BL, sv.normalize).reshape(B, h, w)

        clock.mark()
        kept.append((h * w,) * B if plan is None else plan.counts)
        overhead_ms.append(sparse_work.ms)
        rows.append(branches)

    pixels_BHWC = backend.decode(state)
    clock.mark()
    _synchronize(device)
    batch_ms = (time.perf_counter() - t_batch) * 1e3
    text_ms, *stage_ms, decode_ms = clock.intervals_ms()
    skipped = len(schedule) - last  # stages not run: nothing kept, no time
    kept += [(0,) * B] * skipped
    stage_ms += [0.0] * skipped
    overhead_ms += [0.0] * skipped
    rows += [0] * skipped
    for h, w in schedule[last:] if record_masks else ():
        for image_masks in masks:
            image_masks.append(bytes(-(-h * w // 8)))  # no token ran
    stats = [[StageStats(stage, h, w, h * w, kept[stage - 1][i], ms, overhead_ms[stage - 1],
                         *(fastvar.pruned(stage, kept[stage - 1][i]) if fastvar else (0, 0)), rows[stage - 1])
              for stage, ((h, w), ms) in enumerate(zip(schedule, stage_ms, strict=True), start=1)]
             for i in range(B)]
    return [ImageResult(pixels_BHWC[i], stats[i], batch_ms, tokens[i] if record_tokens else None, text_ms, decode_ms,
                        masks[i] if record_masks else None)
            for i in range(B)]
