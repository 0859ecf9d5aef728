"""A Serve replica's metrics, exported through Ray's metrics agent (Prometheus): what an operator watches to see
whether τ is holding the latency target and what it costs in kept tokens. Descriptions are ASCII: Ray's metric
recorder refuses others."""

from typing import Any

from ray.util.metrics import Counter, Gauge, Histogram

_MS_BUCKETS = [10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]


class ServeMetrics:
    def __init__(self, model: str) -> None:
        tags = {"model": model}
        self.images = Counter("sparsevar_serve_images", "images generated and answered", tag_keys=("model",))
        self.errors = Counter("sparsevar_serve_errors", "requests answered with an error, by kind",
                              tag_keys=("model", "kind"))
        self.tau = Gauge("sparsevar_serve_tau", "tau of the last batch (0: dense)", tag_keys=("model",))
        self.kept = Gauge("sparsevar_serve_kept_ratio", "kept share of the tokens of the last batch's sparse stages",
                          tag_keys=("model",))
        self.stage_ms = Histogram("sparsevar_serve_stage_latency_ms", "a stage's time for its whole batch",
                                  boundaries=_MS_BUCKETS, tag_keys=("model", "stage"))
        self.request_ms = Histogram("sparsevar_serve_request_latency_ms", "a request's time in the replica",
                                    boundaries=_MS_BUCKETS, tag_keys=("model",))
        self.batch_size = Histogram("sparsevar_serve_batch_size", "images per generation batch",
                                    boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=("model",))
        for metric in (self.images, self.errors, self.tau, self.kept, self.stage_ms, self.request_ms, self.batch_size):
            metric.set_default_tags(tags)

    def batch(self, rows: list[dict[str, Any]], first_sparse: int | None) -> None:
        """One generation batch's rows (metadata rows of the batch job's shape)."""
        ok = [row for row in rows if row["status"] == "ok"]
        self.batch_size.observe(len(rows))
        if not ok:
            return
        self.images.inc(len(ok))
        self.tau.set(ok[0]["tau"] or 0.0)
        sparse = [s for row in ok for s in row["stages"] if first_sparse is not None and s["stage"] >= first_sparse]
        self.kept.set(sum(s["kept"] for s in sparse) / sum(s["tokens"] for s in sparse) if sparse else 1.0)
        for stage in ok[0]["stages"]:  # a stage's time is its batch's, the same on every row
            self.stage_ms.observe(stage["latency_ms"], tags={"stage": str(stage["stage"])})

    def error(self, kind: str) -> None:
        self.errors.inc(tags={"kind": kind})
