"""The calibration file (`calibration.parquet`) and the adaptive controllers built from it (a job's actor, a
Serve replica).

The file holds one row per setting (dense, then each τ) and, in its schema metadata, the setup it was
measured with. A curve only predicts a job that runs the same model, SparseVAR settings (τ aside) and
sampling, so those must match; batch size, device and threads may differ, since the controller corrects the
scale from its own measurements (a warning says so).
"""

import json
import logging
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow.fs import LocalFileSystem

from actors.config import JobConfig
from sparsevar.adaptive import Controller, Curve, per_actor_latency_ms
from sparsevar.calibration import CalibrationPoint
from storage.uris import join, resolve

log = logging.getLogger(__name__)

FILE_NAME = "calibration.parquet"
SETUP_KEY = b"sparsevar.calibration"
STAGE_POINT_TYPE = pa.struct([("stage", pa.int32()), ("tokens", pa.int32()), ("kept_ratio", pa.float64()),
                              ("token_match", pa.float64())])
CALIBRATION_SCHEMA = pa.schema([
    ("tau", pa.float64()),  # null: the dense model
    ("latency_ms_per_image", pa.float64()),  # median warm batch wall time / images
    ("images_per_sec", pa.float64()),  # one actor, at the calibrated batch size
    ("kept_ratio", pa.float64()),  # of the tokens of the stages that may exclude
    ("psnr_db", pa.float64()),  # against dense, same prompts and seeds; inf when identical
    ("token_match", pa.float64()),  # share of the tokens of the stages that may exclude equal to dense's
    ("stages", pa.list_(STAGE_POINT_TYPE)),
    ("yardstick", pa.float64()),  # the demo model's yardstick score; null for other models
])
MUST_MATCH = ("model", "sparsevar", "sampling")


class CalibrationError(ValueError):
    """A calibration that is missing, unreadable or measured for another setup."""


def calibration_setup(cfg: JobConfig) -> dict[str, Any]:
    """What a calibration depends on: MUST_MATCH sections, then what the controller's correction absorbs."""
    return {
        "model": cfg.model.model_dump(mode="json"),
        "sparsevar": cfg.sparsevar.model_dump(mode="json", exclude={"enabled", "tau"}),
        "sampling": cfg.sampling.model_dump(mode="json"),
        "batch_size": cfg.ray.batch_size,
        "num_cpus_per_actor": cfg.ray.num_cpus_per_actor,
        "runtime": cfg.runtime.model_dump(mode="json"),
    }


def calibration_uri(uri: str) -> str:
    """The calibration file itself, given the file or the folder that workflows.calibrate wrote it to."""
    return uri if uri.endswith(".parquet") else join(uri, FILE_NAME)


def calibration_table(points: list[CalibrationPoint], setup: dict[str, Any]) -> pa.Table:
    rows = [{"tau": p.tau, "latency_ms_per_image": p.latency_ms_per_image, "images_per_sec": p.images_per_sec,
             "kept_ratio": p.kept_ratio, "psnr_db": p.psnr_db, "token_match": p.token_match,
             "stages": [vars(s) for s in p.stages], "yardstick": p.yardstick} for p in points]
    schema = CALIBRATION_SCHEMA.with_metadata({SETUP_KEY: json.dumps(setup).encode()})
    return pa.Table.from_pylist(rows, schema=schema)


def write_calibration(table: pa.Table, output: str, endpoint_url: str | None = None) -> str:
    """Write `{output}/calibration.parquet` (output: a folder path or URI); returns its URI."""
    uri = join(output, FILE_NAME)
    filesystem, path = resolve(uri, endpoint_url)
    if isinstance(filesystem, LocalFileSystem):  # object stores have no folders to make
        filesystem.create_dir(posixpath.dirname(path), recursive=True)
    pq.write_table(table, path, filesystem=filesystem)
    return uri


def read_calibration(uri: str, endpoint_url: str | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """The calibration rows and the setup they were measured with."""
    uri = calibration_uri(uri)
    try:
        filesystem, path = resolve(uri, endpoint_url)
        table = pq.read_table(path, filesystem=filesystem)
    except FileNotFoundError:
        raise CalibrationError(f"no calibration at {uri}: run python -m workflows.calibrate --config ... "
                               "--prompts ... --output DIR and set adaptive.calibration to DIR") from None
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise CalibrationError(f"cannot read calibration {uri}: {exc}") from None
    metadata = table.schema.metadata or {}
    if SETUP_KEY not in metadata or not set(CALIBRATION_SCHEMA.names) <= set(table.column_names):
        raise CalibrationError(f"{uri} is not a calibration written by workflows.calibrate; rerun it")
    return table, json.loads(metadata[SETUP_KEY])


def _check_setup(measured: dict[str, Any], job: dict[str, Any], uri: str) -> None:
    for section in MUST_MATCH:
        differ = sorted(k for k in {*measured[section], *job[section]}
                        if measured[section].get(k) != job[section].get(k))
        if differ:
            keys = ", ".join(f"{section}.{k} (calibrated {measured[section].get(k)!r}, job {job[section].get(k)!r})"
                             for k in differ)
            raise CalibrationError(f"calibration {uri} was measured for another setup: {keys}; rerun "
                                   "workflows.calibrate with this job's config")
    for key in ("batch_size", "num_cpus_per_actor", "runtime"):
        if measured[key] != job[key]:
            log.warning("calibration %s was measured with %s=%r, this job uses %r: the controller corrects the "
                        "scale from its own batches", uri, key, measured[key], job[key])


def load_curve(cfg: JobConfig, calibration: str | None = None) -> Curve:
    """The calibration curve (sparse rows only) at `calibration` (default: the job's `adaptive.calibration`), after
    checking it was measured for this setup."""
    uri = calibration_uri(calibration or cfg.adaptive.calibration or "")
    table, setup = read_calibration(uri, cfg.storage.endpoint_url)
    _check_setup(setup, calibration_setup(cfg), uri)
    rows = [row for row in table.select(["tau", "latency_ms_per_image", "psnr_db"]).to_pylist()
            if row["tau"] is not None]
    try:
        return Curve.fit([r["tau"] for r in rows], [r["latency_ms_per_image"] for r in rows],
                         [r["psnr_db"] for r in rows])
    except ValueError as exc:
        raise CalibrationError(f"calibration {uri}: {exc}") from None


def controller_for(cfg: JobConfig) -> Controller:
    """One actor's controller: the calibration curve and the actor's share of the target (of a [min, max] pool,
    the full pool's share: the target matters once the work has scaled the pool up)."""
    adaptive = cfg.adaptive
    curve = load_curve(cfg)
    try:
        return Controller(curve, per_actor_latency_ms(adaptive, cfg.ray.actor_range[1]), adaptive.tau_min,
                          adaptive.tau_max, adaptive.min_psnr)
    except ValueError as exc:
        raise CalibrationError(str(exc)) from None


def serve_controller_for(cfg: JobConfig) -> Controller:
    """One Serve replica's controller: the batch job's, aimed at `serve.target_latency_ms` (a request's p95); the
    replica gives it a per-image budget from its queue for each batch (`sparsevar.adaptive.queue_budget_ms`)."""
    serve = cfg.serve
    if serve.target_latency_ms is None:
        raise CalibrationError("serve.target_latency_ms is not set: τ follows the load only towards a target")
    curve = load_curve(cfg, serve.calibration)
    try:
        return Controller(curve, serve.target_latency_ms, serve.tau_min, serve.tau_max)
    except ValueError as exc:
        raise CalibrationError(str(exc)) from None
