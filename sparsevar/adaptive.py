"""Adaptive τ: pick, batch by batch, the smallest τ (closest to dense) that meets a throughput target.

The controller starts from a calibration curve (τ -> warm latency per image, measured by
`python -m workflows.calibrate`) and corrects it with the latencies its own batches take: the ratio
measured / predicted is a running median, so one slow batch (a cold start, a noisy neighbour) cannot swing
τ, while a lasting change of pace is followed within a few batches. Pure logic: no Ray, no storage, no clock.
"""

import bisect
import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import Field, model_validator

from sparsevar.config import StrictModel


class AdaptiveConfig(StrictModel):
    """The `adaptive` config section. Latency per image means an actor's batch wall time / images in the batch."""

    enabled: bool = False
    target_images_per_sec: float | None = Field(
        None, gt=0, description="for the whole job; each of the ray.num_actors actors (the maximum of a "
        "[min, max] pool) aims at an equal share")
    target_latency_ms: float | None = Field(None, gt=0, description="per image, for each actor")
    tau_min: float = Field(0.0, ge=0.0, description="lowest τ the controller may choose (0 is dense)")
    tau_max: float = Field(1.0, ge=0.0, description="highest τ the controller may choose")
    calibration: str | None = Field(None, description="calibration.parquet (or its folder) from workflows.calibrate")
    min_psnr: float | None = Field(
        None, description="dB against dense; caps τ at the largest calibrated τ whose PSNR reaches it")

    @model_validator(mode="after")
    def _consistent(self) -> "AdaptiveConfig":
        if self.tau_min > self.tau_max:
            raise ValueError(f"tau_min={self.tau_min} is above tau_max={self.tau_max}; swap them")
        if self.enabled:
            if (self.target_images_per_sec is None) == (self.target_latency_ms is None):
                raise ValueError("set exactly one of target_images_per_sec (whole job) and target_latency_ms "
                                 "(per image, per actor)")
            if not self.calibration:
                raise ValueError("calibration is required: run python -m workflows.calibrate --config ... "
                                 "--prompts ... --output DIR, then set calibration: DIR")
        return self


def per_actor_latency_ms(cfg: AdaptiveConfig, num_actors: int) -> float:
    """Each actor's target latency per image. Actors cannot see each other, so a job-wide images/s target is
    shared evenly: each of the `num_actors` actors aims at target / num_actors images/s."""
    if cfg.target_latency_ms is not None:
        return cfg.target_latency_ms
    if cfg.target_images_per_sec is None:
        raise ValueError("adaptive config has no target: set target_images_per_sec or target_latency_ms")
    return 1000.0 * num_actors / cfg.target_images_per_sec


def queue_budget_ms(target_ms: float, waited_ms: float, pending_images: int) -> float:
    """Per-image latency at which a server meets its request target: the last of the `pending_images` images
    (this batch's and those queued behind it, served one batch after another) must be done within what is
    left of the target of the oldest request, which has waited `waited_ms`. An idle server gets the whole
    target for one batch, so it goes back to the lowest τ; a growing queue shrinks the budget, raising τ."""
    return max(0.0, target_ms - waited_ms) / max(1, pending_images)


def _non_increasing_fit(values: Sequence[float]) -> list[float]:
    """Pool adjacent violators: the least-squares non-increasing sequence, so measurement noise cannot make a
    higher τ look slower and the curve can be inverted."""
    blocks: list[tuple[float, int]] = []  # (sum, count)
    for value in values:
        total, count = value, 1
        while blocks and blocks[-1][0] / blocks[-1][1] < total / count:
            prev_total, prev_count = blocks.pop()
            total, count = total + prev_total, count + prev_count
        blocks.append((total, count))
    return [total / count for total, count in blocks for _ in range(count)]


@dataclass(frozen=True)
class Curve:
    """A calibration curve: ascending τ, the monotone (non-increasing) latency per image, and PSNR vs dense."""

    taus: tuple[float, ...]
    latency_ms: tuple[float, ...]
    psnr_db: tuple[float, ...] | None = None

    @classmethod
    def fit(cls, taus: Sequence[float], latency_ms: Sequence[float],
            psnr_db: Sequence[float] | None = None) -> "Curve":
        """Sort by τ and fit the latencies non-increasing; raises ValueError on an unusable calibration."""
        if not taus or len(taus) != len(latency_ms) or (psnr_db is not None and len(psnr_db) != len(taus)):
            raise ValueError("a calibration curve needs one latency (and PSNR) per τ, and at least one τ")
        if len(set(taus)) != len(taus):
            raise ValueError(f"calibration repeats a τ: {sorted(taus)}")
        if any(not math.isfinite(v) or v <= 0 for v in latency_ms):
            raise ValueError(f"calibration latencies must be positive: {list(latency_ms)}")
        order = sorted(range(len(taus)), key=lambda i: taus[i])
        return cls(tuple(float(taus[i]) for i in order),
                   tuple(_non_increasing_fit([float(latency_ms[i]) for i in order])),
                   None if psnr_db is None else tuple(float(psnr_db[i]) for i in order))

    def latency(self, tau: float) -> float:
        """Predicted latency per image: linear between calibrated τ, flat beyond the ends."""
        if tau <= self.taus[0]:
            return self.latency_ms[0]
        if tau >= self.taus[-1]:
            return self.latency_ms[-1]
        j = bisect.bisect_right(self.taus, tau)
        t0, t1, y0, y1 = self.taus[j - 1], self.taus[j], self.latency_ms[j - 1], self.latency_ms[j]
        return y0 + (y1 - y0) * (tau - t0) / (t1 - t0)

    def smallest_tau(self, max_latency_ms: float, lo: float, hi: float) -> float:
        """The smallest τ in [lo, hi] predicted to take at most `max_latency_ms` per image; `hi` when none is."""
        if self.latency(lo) <= max_latency_ms:
            return lo
        if self.latency(hi) > max_latency_ms:
            return hi
        points = [lo, *(t for t in self.taus if lo < t < hi), hi]
        j = next(i for i, t in enumerate(points) if self.latency(t) <= max_latency_ms)  # exists, and j >= 1
        t0, t1 = points[j - 1], points[j]
        y0, y1 = self.latency(t0), self.latency(t1)  # y0 > max_latency_ms >= y1 on this linear piece
        return t0 + (t1 - t0) * (y0 - max_latency_ms) / (y0 - y1)

    def psnr_cap(self, min_psnr: float) -> float:
        """The largest calibrated τ whose PSNR reaches `min_psnr`; ValueError when none does."""
        if self.psnr_db is None:
            raise ValueError("adaptive.min_psnr needs a calibration with PSNR; rerun workflows.calibrate")
        meeting = [t for t, p in zip(self.taus, self.psnr_db, strict=True) if p >= min_psnr]
        if not meeting:
            best = max(self.psnr_db)
            raise ValueError(f"no calibrated τ reaches adaptive.min_psnr={min_psnr} dB (best {best:.1f} dB); lower "
                             "min_psnr or calibrate lower τ values (--taus 0,...)")
        return max(meeting)


class Controller:
    """Chooses each batch's τ for one actor and learns how far its device is from the calibration.

    `ratio` is measured / calibrated latency: the median of the last `window` batches' ratios (in log space),
    starting from `window // 2` at 1, the calibration's own word. So up to `window // 2` slow batches in a
    row (a cold start, a noisy neighbour) never move it, and a lasting change is adopted after
    `window // 2 + 1` batches.
    """

    def __init__(self, curve: Curve, target_ms: float, tau_min: float = 0.0, tau_max: float = 1.0,
                 min_psnr: float | None = None, *, window: int = 5) -> None:
        if not target_ms > 0:
            raise ValueError(f"target latency per image must be positive, got {target_ms}")
        if tau_min > tau_max:
            raise ValueError(f"tau_min={tau_min} is above tau_max={tau_max}")
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.curve, self.target_ms, self.tau_min = curve, target_ms, tau_min
        self.upper = tau_max
        if min_psnr is not None:
            cap = curve.psnr_cap(min_psnr)
            if cap < tau_min:
                raise ValueError(f"adaptive.min_psnr={min_psnr} allows τ <= {cap}, below adaptive.tau_min={tau_min}; "
                                 "lower one of them")
            self.upper = min(tau_max, cap)
        self._log_ratios: deque[float] = deque([0.0] * (window // 2), maxlen=window)

    @property
    def ratio(self) -> float:
        return math.exp(statistics.median(self._log_ratios)) if self._log_ratios else 1.0

    def next_tau(self) -> float:
        """The smallest τ in [tau_min, upper] whose corrected predicted latency meets the target."""
        return self.tau_for(self.target_ms)

    def tau_for(self, budget_ms_per_image: float) -> float:
        """The smallest τ in [tau_min, upper] whose corrected predicted latency per image fits the budget (a
        server's budget moves with its queue, see `queue_budget_ms`)."""
        return self.curve.smallest_tau(budget_ms_per_image / self.ratio, self.tau_min, self.upper)

    def observe(self, tau: float, batch_latency_ms: float, n_images: int) -> None:
        """Learn from one batch generated at `tau` that took `batch_latency_ms` for `n_images` images."""
        if n_images >= 1 and batch_latency_ms > 0:
            self._log_ratios.append(math.log(batch_latency_ms / n_images / self.curve.latency(tau)))

    @property
    def missed_by(self) -> float:
        """Share of the throughput target out of reach even at the upper bound (0 when reachable)."""
        best_ms = self.curve.latency(self.upper) * self.ratio
        return max(0.0, 1.0 - self.target_ms / best_ms)
