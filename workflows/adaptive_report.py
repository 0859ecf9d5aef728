"""How an adaptive run did against its target, from the job's metadata rows.

Throughput here is generation throughput, the quantity the controllers steer: actors × images / the actors'
summed batch wall time, with actors = ray.num_actors (the maximum of a [min, max] pool). Actor start-up,
image writing and scheduling are left out; the summary's wall-clock images per second includes them.
"""

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from actors.config import JobConfig
from sparsevar.adaptive import Controller


@dataclass(frozen=True)
class AdaptiveReport:
    target_images_per_sec: float  # whole job
    target_latency_ms: float  # per image, per actor
    achieved_images_per_sec: float | None  # None when no image was made
    predicted_max_images_per_sec: float  # the calibration's, at tau_bound
    tau_bound: float  # the highest τ allowed: tau_max, or lower under min_psnr
    tau_mean: float | None
    tau_median: float | None
    tau_lowest: float | None
    tau_highest: float | None
    at_bound: float  # share of images made at tau_bound
    missed_by: float  # share of the target not achieved; 0 when met

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"adaptive target: {self.target_images_per_sec:.2f} images/s "
                 f"({self.target_latency_ms:.0f} ms per image per actor)"]
        if self.achieved_images_per_sec is None or self.tau_mean is None:
            return "\n".join([*lines, "adaptive: no image was made"])
        lines.append(f"achieved: {self.achieved_images_per_sec:.2f} images/s of generation (start-up and writing "
                     "excluded)")
        lines.append(f"τ used: mean {self.tau_mean:.3f}, median {self.tau_median:.3f}, range {self.tau_lowest:.3f}"
                     f"-{self.tau_highest:.3f}; {self.at_bound:.0%} of images at the bound {self.tau_bound:.3f}")
        if self.missed_by > 0:
            lines.append(f"target missed by {self.missed_by:.1%} (calibration predicts at most "
                         f"{self.predicted_max_images_per_sec:.2f} images/s at τ {self.tau_bound:.3f}); {self.advice}")
        return "\n".join(lines)

    @property
    def advice(self) -> str:
        """What to change after a missed target: it depends on whether τ ever got to its bound."""
        if self.at_bound == 0:  # τ was held below the bound: the calibration said it was enough
            return ("τ never reached its bound, so the calibration overrated this run's speed and too few batches "
                    "per actor came to correct it (a slow pace is followed after three); give each actor more "
                    "batches, or calibrate again on this machine as loaded")
        if self.tau_bound < 1:
            return "raise adaptive.tau_max (or lower adaptive.min_psnr), lower the target or add actors"
        return "lower the target or add actors"


def adaptive_report(table: pa.Table, cfg: JobConfig, controller: Controller) -> AdaptiveReport:
    """Summarise the τ used and the throughput achieved by the ok rows of `table`."""
    actors = cfg.ray.actor_range[1]
    target_ips = 1000.0 * actors / controller.target_ms
    ok = table.filter(pc.equal(table["status"], "ok"))
    # Every image of a forward carries the forward's one wall time, so the distinct latencies are the forwards.
    batch_ms = ok.group_by("latency_ms").aggregate([]).column("latency_ms").to_pylist()
    achieved = 1000.0 * actors * ok.num_rows / sum(batch_ms) if batch_ms else None
    taus = np.array(ok["tau"].to_pylist(), dtype=np.float64)
    used = taus.size > 0
    return AdaptiveReport(
        target_images_per_sec=target_ips,
        target_latency_ms=controller.target_ms,
        achieved_images_per_sec=achieved,
        predicted_max_images_per_sec=1000.0 * actors / controller.curve.latency(controller.upper),
        tau_bound=controller.upper,
        tau_mean=float(taus.mean()) if used else None,
        tau_median=float(np.median(taus)) if used else None,
        tau_lowest=float(taus.min()) if used else None,
        tau_highest=float(taus.max()) if used else None,
        at_bound=float(np.isclose(taus, controller.upper).mean()) if used else 0.0,
        missed_by=max(0.0, 1.0 - achieved / target_ips) if achieved else 0.0,
    )
