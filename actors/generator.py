"""The stateful callable that Ray Data's `map_batches` runs in each generation actor.

It builds the backend once per actor, generates a batch of normalised prompt rows, writes the images
through `storage/` and returns one metadata row per prompt. A failing batch is retried one prompt at a
time, so one bad prompt becomes one `error` row and never costs the others their images.
"""

import logging
import time
from typing import Any

import pyarrow as pa
import torch

from actors.config import JobConfig
from sparsevar.backends import build_backend
from sparsevar.generate import ImageResult, Request, generate
from storage.images import ImageWriter
from storage.metadata import metadata_table

log = logging.getLogger(__name__)


class Generator:
    def __init__(self, config: dict[str, Any], output: str) -> None:
        self.cfg = JobConfig.model_validate(config)
        torch.set_num_threads(max(1, int(self.cfg.ray.num_cpus_per_actor)))
        self.backend = build_backend(self.cfg.model, self.cfg.sampling, self.cfg.runtime.device,
                                     self.cfg.runtime.dtype)
        self.writer = ImageWriter(output, self.cfg.output.image_format, self.cfg.output.quality)
        sv = self.cfg.sparsevar
        self.tau = sv.tau if sv.enabled else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [row for row in rows if row["error"] is None]
        out = [self._error_row(row, row["error"]) for row in rows if row["error"] is not None]
        for row, result in zip(todo, self._generate(todo), strict=True):
            out.append(self._ok_row(row, result) if isinstance(result, ImageResult) else self._error_row(row, result))
        return metadata_table(out)

    def _generate(self, rows: list[dict[str, Any]]) -> list[ImageResult | str]:
        """Results in row order: an image, or the error message of a prompt that failed alone."""
        if not rows:
            return []
        requests = [Request(r["prompt"], r["seed"], r.get("negative_prompt")) for r in rows]
        try:
            return list(generate(self.backend, requests, self.cfg.sparsevar))
        except Exception as exc:  # noqa: BLE001 - reported per row below
            if len(rows) == 1:
                log.warning("prompt %r failed: %s", rows[0]["prompt_id"], exc)
                return [f"generation failed: {type(exc).__name__}: {exc}"]
            log.warning("batch of %d failed (%s); retrying one prompt at a time", len(rows), exc)
            return [result for row in rows for result in self._generate([row])]

    def _ok_row(self, row: dict[str, Any], result: ImageResult) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            uri, sha256 = self.writer.write(row["prompt_id"], row["seed"], result.pixels_HWC)
        except Exception as exc:  # noqa: BLE001 - a failed write is that row's error, not the batch's
            return self._error_row(row, f"writing the image failed: {type(exc).__name__}: {exc}")
        log.debug("wrote %s in %.1f ms", uri, (time.perf_counter() - started) * 1e3)
        height, width = result.pixels_HWC.shape[:2]
        return {
            **self._base_row(row), "status": "ok", "width": width, "height": height, "image_uri": uri,
            "image_sha256": sha256, "latency_ms": result.latency_ms,
            "stages": [vars(stage) for stage in result.stages],
        }

    def _error_row(self, row: dict[str, Any], message: str) -> dict[str, Any]:
        return {**self._base_row(row), "status": "error", "error": message}

    def _base_row(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"prompt_id": row["prompt_id"], "prompt": row["prompt"], "seed": row["seed"],
                "model": self.backend.name, "tau": self.tau}
