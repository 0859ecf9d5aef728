"""Calibration of one device: latency, kept tokens and fidelity to dense at a grid of τ, for adaptive τ.

Runs the generation loop in-process on a small prompt sample. A first pass over every setting (dense, then
each τ) records tokens for fidelity and warms every code path; then `repeats` timed rounds visit the
settings in turn, so a slow drift of the machine spreads over all τ instead of biasing a few.
"""

import logging
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from sparsevar.backend import Backend
from sparsevar.config import SparseVARConfig
from sparsevar.generate import ImageResult, Request, first_sparse_stage, generate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagePoint:
    stage: int
    tokens: int
    kept_ratio: float  # mean over the sample of kept / tokens
    token_match: float  # mean over the sample of the share of positions whose token equals dense's


@dataclass(frozen=True)
class CalibrationPoint:
    tau: float | None  # None: the dense model
    latency_ms_per_image: float  # median over timed batches of batch wall time / images
    kept_ratio: float  # kept share of the tokens of the stages that may exclude (1 for dense)
    psnr_db: float  # over the whole sample against dense; inf when every image equals dense
    token_match: float  # share of the tokens of the stages that may exclude that equal dense's
    stages: list[StagePoint]
    yardstick: float | None = None  # the judge's mean score of the sample's pictures, when a judge is given

    @property
    def images_per_sec(self) -> float:
        return 1000.0 / self.latency_ms_per_image


def psnr_db(images: Sequence[np.ndarray], references: Sequence[np.ndarray]) -> float:
    """PSNR of uint8 images against references, from the mean squared error over all of them (so one image
    identical to dense does not make the sample's PSNR infinite)."""
    squared = [(a.astype(np.float64) - b.astype(np.float64)) ** 2 for a, b in zip(images, references, strict=True)]
    mse = float(np.mean(np.concatenate([s.ravel() for s in squared])))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _fidelity(results: list[ImageResult], dense: list[ImageResult], first_sparse: int) -> tuple[float, float, list]:
    """(PSNR, token match over sparse stages, per-stage points) of one setting against dense."""
    stages = []
    matched = total = 0
    for k, stats in enumerate(results[0].stages):
        match_per_image = [float((r.tokens[k] == d.tokens[k]).all(dim=-1).double().mean())
                           for r, d in zip(results, dense, strict=True)]
        kept = [r.stages[k].kept / r.stages[k].tokens for r in results]
        stages.append(StagePoint(stats.stage, stats.tokens, float(np.mean(kept)), float(np.mean(match_per_image))))
        if stats.stage >= first_sparse:
            matched += sum(m * stats.tokens for m in match_per_image)
            total += stats.tokens * len(results)
    psnr = psnr_db([r.pixels_HWC for r in results], [d.pixels_HWC for d in dense])
    return psnr, (matched / total if total else 1.0), stages


def _kept_ratio(results: list[ImageResult], first_sparse: int) -> float:
    kept = sum(s.kept for r in results for s in r.stages if s.stage >= first_sparse)
    tokens = sum(s.tokens for r in results for s in r.stages if s.stage >= first_sparse)
    return kept / tokens if tokens else 1.0


def calibrate(backend: Backend, requests: list[Request], sv: SparseVARConfig, taus: Sequence[float],
              batch_size: int, repeats: int = 3,
              judge: Callable[[list[np.ndarray], list[str]], float] | None = None) -> list[CalibrationPoint]:
    """One point for dense and one per τ, with the other `sv` settings as given (normalize, start stage...).

    Every batch is full, so that latency per image is that of the job's batch size. A judge (the demo model's
    yardstick) scores each setting's pictures against their prompts.
    """
    if not requests or not taus or repeats < 1 or batch_size < 1:
        raise ValueError("calibration needs prompts, at least one τ, batch_size >= 1 and repeats >= 1")
    if len(requests) % batch_size:
        raise ValueError(f"calibration times full batches: give a multiple of batch_size={batch_size} prompts, "
                         f"not {len(requests)}")
    batches = [requests[i:i + batch_size] for i in range(0, len(requests), batch_size)]
    settings: list[float | None] = [None, *taus]
    configs = {tau: sv.model_copy(update={"enabled": False}) if tau is None else
               sv.model_copy(update={"enabled": True, "tau": float(tau)}) for tau in settings}
    first_sparse = first_sparse_stage(sv.model_copy(update={"enabled": True}))

    fidelity, kept, judged = {}, {}, {}
    dense: list[ImageResult] = []
    for tau in settings:  # the untimed pass: fidelity, and a warm-up of every setting
        results = [r for batch in batches for r in generate(backend, batch, configs[tau], record_tokens=True)]
        if tau is None:
            dense = results
        fidelity[tau] = _fidelity(results, dense, first_sparse)
        kept[tau] = _kept_ratio(results, first_sparse)
        if judge is not None:
            judged[tau] = judge([r.pixels_HWC for r in results], [r.prompt for r in requests])
        log.info("τ=%s: PSNR %.2f dB, kept %.3f", "dense" if tau is None else tau, fidelity[tau][0], kept[tau])

    per_image_ms: dict[float | None, list[float]] = {tau: [] for tau in settings}
    for round_ in range(repeats):
        for tau in settings:
            for batch in batches:
                per_image_ms[tau].append(generate(backend, batch, configs[tau])[0].latency_ms / len(batch))
        log.info("timed round %d of %d done", round_ + 1, repeats)
    return [CalibrationPoint(tau, statistics.median(per_image_ms[tau]), kept[tau], fidelity[tau][0], fidelity[tau][1],
                             fidelity[tau][2], judged.get(tau)) for tau in settings]
