"""The stateful callable that Ray Data's `map_batches` runs in each generation actor.

It builds the backend once per actor, generates a batch of normalised prompt rows, writes the images
through `storage/` and returns one metadata row per prompt. A failing batch (out of memory, or one bad
prompt) is split in halves and retried, so one bad prompt becomes one `error` row and never costs the
others their images. With `adaptive.enabled`, a controller picks each batch's τ from the calibration and
the batches' latencies.

With `output.format: webdataset` a call gets whole shards (the driver makes one block per shard, see
workflows.generate): it generates each shard in batches of `ray.batch_size`, appends every image to the
shard's tar as it comes, and publishes the tar at once when the shard is complete.
"""

import hashlib
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from itertools import groupby
from typing import Any

import pyarrow as pa
import torch

from actors.calibration import controller_for
from actors.config import JobConfig
from sparsevar.adaptive import Controller
from sparsevar.backends import build_backend, weight_files
from sparsevar.config import SparseVARConfig
from sparsevar.generate import ImageResult, Request, generate
from storage.checkpoints import fingerprint, localize_checkpoints
from storage.images import EXTENSIONS, ImageWriter, encode_image
from storage.lease import check_held
from storage.metadata import batch_file_name, metadata_table, write_metadata_file
from storage.shards import ShardWriter, member_uri, sample_key

log = logging.getLogger(__name__)

# Stores one generated image and returns the row's location fields (image_uri, image_sha256, ...).
Store = Callable[[dict[str, Any], ImageResult, float | None], dict[str, Any]]


class Generator:
    def __init__(self, config: dict[str, Any], output: str | None, run_id: str | None = None,
                 controller: Controller | None = None, commit: str | None = None) -> None:
        """`output` None: no image files (a Serve replica answering with the bytes); `run_id` goes on every row;
        `controller` replaces the adaptive section's (a Serve replica's, which follows its queue). With `commit` (a
        job's) the actor records each batch's rows itself, as `metadata/<commit>-<digest>.parquet`, before it
        returns them: an interruption then costs only the batch an actor was making, not batches that came back
        but wait in Ray Data's queues (see `_commit`)."""
        self.cfg = JobConfig.model_validate(config)
        # checked local paths; s3:// and hf:// fetched once per node
        self.cfg.model = localize_checkpoints(self.cfg.model, endpoint_url=self.cfg.storage.endpoint_url)
        torch.set_num_threads(max(1, int(self.cfg.ray.num_cpus_per_actor)))
        self.backend = build_backend(self.cfg.model, self.cfg.sampling, self.cfg.runtime.device,
                                     self.cfg.runtime.dtype)
        self.run_id = run_id
        # every row says which weights made it; hashed once per actor (after the backend loaded them, so a missing
        # file gets the backend's message), cheaply: storage.checkpoints.fingerprint
        self.weights_fingerprint = fingerprint(weight_files(self.cfg.model))
        self.writer = None if output is None else ImageWriter(output, self.cfg.output.image_format,
                                                              self.cfg.output.quality, self.cfg.storage.endpoint_url)
        self.output, self.commit = output, commit
        self.controller = controller or (controller_for(self.cfg) if self.cfg.adaptive.enabled else None)
        self._warned_missed = False

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        if self.cfg.output.format == "files":
            table = metadata_table(self.generate_rows(rows, self._write_file))
        else:
            out = []
            for index, group in groupby(rows, key=lambda row: row["shard"]):
                out += self._generate_shard(index, list(group))
            table = metadata_table(out)
        if self.commit is not None:
            self._commit(table)
        return table

    def _commit(self, table: pa.Table) -> None:
        """Record the batch's rows, the lease checked first. The file is named by the batch's images, so a batch
        that Ray retries (its actor died after writing, before returning) replaces its own file: no row twice."""
        check_held(self.output, self.cfg.storage.endpoint_url, self.run_id)
        write_metadata_file(self.output, batch_file_name(self.commit, table), table, self.cfg.storage.endpoint_url)

    def generate_rows(self, rows: list[dict[str, Any]], store: Store,
                      sv: SparseVARConfig | None = None) -> list[dict[str, Any]]:
        """One batch: its metadata rows, input errors first; `store` keeps each image. `sv` (a Serve replica's
        choice) replaces the configured settings and the controller's τ."""
        todo = [row for row in rows if row["error"] is None]
        sv = sv or self._sparsevar()
        tau = sv.tau if sv.enabled else None
        results = self._generate(todo, sv)
        if self.controller is not None:
            self._observe(sv.tau, results)
        out = [self._error_row(row, row["error"], tau) for row in rows if row["error"] is not None]
        for row, result in zip(todo, results, strict=True):
            out.append(self._ok_row(row, result, tau, store) if isinstance(result, ImageResult)
                       else self._error_row(row, result, tau))
        return out

    def _generate_shard(self, index: int, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Generate a whole shard and publish its tar; if the tar cannot be written, every image row of the shard
        becomes an error row (the shard is then missing, so a resumed run makes it again)."""
        if len(rows) != rows[0]["shard_rows"]:  # a partial tar would replace the whole one: never write it
            raise RuntimeError(f"shard {index} arrived split: {len(rows)} of its {rows[0]['shard_rows']} rows in one "
                               "batch (the driver must give each shard one block)")
        B = self.cfg.ray.batch_size
        out: list[dict[str, Any]] = []
        with ShardWriter(self.output, index, self.cfg.storage.endpoint_url) as writer:
            def store(row: dict[str, Any], result: ImageResult, tau: float | None) -> dict[str, Any]:
                return self._write_sample(writer, row, result, tau)

            for start in range(0, len(rows), B):
                if writer.error is not None:  # the tar is lost: report the rest without generating it
                    out += [self._error_row(row, row["error"] or f"writing shard {writer.name} failed: "
                                            f"{writer.error}", None) for row in rows[start:]]
                    break
                out += self.generate_rows(rows[start:start + B], store)
            failure = writer.error
            if failure is None:
                try:
                    writer.publish()
                except Exception as exc:  # noqa: BLE001 - reported on the shard's rows
                    failure = f"{type(exc).__name__}: {exc}"
        if failure is not None:
            log.warning("shard %s failed: %s", writer.name, failure)
            message = f"writing shard {writer.name} failed: {failure}"
            out = [row if row["status"] == "error" else self._error_row(row, message, row["tau"]) for row in out]
        return [{**row, "shard": writer.uri} for row in out]

    def _write_file(self, row: dict[str, Any], result: ImageResult, tau: float | None) -> dict[str, Any]:
        stored = self.writer.write(row["prompt_id"], row["seed"], result.pixels_HWC)
        return {"image_uri": stored.uri, "image_sha256": stored.sha256, "image_bytes": stored.size}

    def _write_sample(self, writer: ShardWriter, row: dict[str, Any], result: ImageResult,
                      tau: float | None) -> dict[str, Any]:
        """Append the image, its record (.json) and its prompt (.txt) to the shard as one sample."""
        fmt = self.cfg.output.image_format
        data = encode_image(result.pixels_HWC, fmt, self.cfg.output.quality)
        key, sha256 = sample_key(row["prompt_id"], row["seed"]), hashlib.sha256(data).hexdigest()
        height, width = result.pixels_HWC.shape[:2]
        record = {"key": key, "prompt_id": row["prompt_id"], "prompt": row["prompt"], "seed": row["seed"],
                  "negative_prompt": row.get("negative_prompt"), "h_div_w": row.get("h_div_w"),
                  "model": self.backend.name, "width": width, "height": height, "tau": tau, "image_sha256": sha256}
        writer.add(key, {EXTENSIONS[fmt]: data, "json": json.dumps(record, ensure_ascii=False).encode("utf-8"),
                         "txt": row["prompt"].encode("utf-8")})
        return {"image_uri": member_uri(writer.uri, key, EXTENSIONS[fmt]), "image_sha256": sha256,
                "image_bytes": len(data), "sample_key": key}

    def _sparsevar(self) -> SparseVARConfig:
        """This batch's settings: the configured ones, with the controller's τ when adaptive."""
        if self.controller is None:
            return self.cfg.sparsevar
        tau = self.controller.next_tau()
        log.debug("adaptive τ=%.4f (measured/calibrated latency %.3f)", tau, self.controller.ratio)
        return self.cfg.sparsevar.model_copy(update={"tau": tau})

    def _observe(self, tau: float, results: list[ImageResult | str]) -> None:
        """Teach the controller this batch's latency: the summed wall times of its forwards (one per aspect
        ratio, or per part of a split retry), each stamped on every image it made. A batch with a failed
        prompt is left out: its failed attempts' time is not in any image."""
        if results and all(isinstance(r, ImageResult) for r in results):
            self.controller.observe(tau, sum({r.latency_ms for r in results}), len(results))
        if self.controller.missed_by > 0 and not self._warned_missed:
            self._warned_missed = True
            log.warning("adaptive target out of reach for this actor: at τ=%.3f it misses its share by %.0f%%",
                        self.controller.upper, 100 * self.controller.missed_by)

    def _generate(self, rows: list[dict[str, Any]], sv: SparseVARConfig) -> list[ImageResult | str]:
        """Results in row order: an image, or the error message of a prompt that failed alone."""
        if not rows:
            return []
        ratios = {r.get("h_div_w") or 1.0 for r in rows}
        if len(ratios) > 1:  # one forward serves one aspect ratio: generate each ratio's rows apart
            by_ratio = {ratio: [r for r in rows if (r.get("h_div_w") or 1.0) == ratio] for ratio in ratios}
            results = {id(r): res for group in by_ratio.values() for r, res in zip(group, self._generate(group, sv),
                                                                                   strict=True)}
            return [results[id(r)] for r in rows]
        ratio = ratios.pop()
        requests = [Request(r["prompt"], r["seed"], r.get("negative_prompt"), ratio) for r in rows]
        try:
            return generate(self.backend, requests, sv, self.cfg.speedups, record_masks=self.cfg.output.save_masks)
        except Exception as exc:  # noqa: BLE001 - reported per row below
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            if len(rows) == 1:
                log.warning("prompt %r failed: %s", rows[0]["prompt_id"], exc)
                return [f"generation failed: {type(exc).__name__}: {exc}"]
            half = len(rows) // 2
            log.warning("batch of %d failed (%s: %s); retrying as two of %d and %d", len(rows),
                        type(exc).__name__, exc, half, len(rows) - half)
            return self._generate(rows[:half], sv) + self._generate(rows[half:], sv)

    def _ok_row(self, row: dict[str, Any], result: ImageResult, tau: float | None, store: Store) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            location = store(row, result, tau)
        except Exception as exc:  # noqa: BLE001 - a failed write is that row's error, not the batch's
            return self._error_row(row, f"writing the image failed: {type(exc).__name__}: {exc}", tau)
        log.debug("wrote %s in %.1f ms", location["image_uri"], (time.perf_counter() - started) * 1e3)
        height, width = result.pixels_HWC.shape[:2]
        return {
            **self._base_row(row, tau), "status": "ok", "width": width, "height": height, **location,
            "latency_ms": result.latency_ms, "stages": [vars(stage) for stage in result.stages],
            "written_at": datetime.now(UTC), "keep_masks": result.keep_masks,
        }

    def _error_row(self, row: dict[str, Any], message: str, tau: float | None) -> dict[str, Any]:
        return {**self._base_row(row, tau), "status": "error", "error": message}

    def _base_row(self, row: dict[str, Any], tau: float | None) -> dict[str, Any]:
        """The fields every row has, error rows too: what was asked for and how it was (or would be) made."""
        sampling = self.cfg.sampling
        return {"prompt_id": row["prompt_id"], "prompt": row["prompt"], "seed": row["seed"],
                "model": self.backend.name, "tau": tau, "cfg": sampling.cfg, "temperature": sampling.temperature,
                "top_k": sampling.top_k, "top_p": sampling.top_p, "negative_prompt": row.get("negative_prompt"),
                "h_div_w": row.get("h_div_w") or 1.0, "weights_fingerprint": self.weights_fingerprint,
                "source_row": row.get("source_row"), "run_id": self.run_id}
