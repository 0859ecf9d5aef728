"""Generate a dataset of images from a prompt file with a SparseVAR-accelerated model on a Ray cluster.

    python -m workflows.generate --config configs/tiny.yaml --prompts configs/prompts/sample.jsonl --output ./out

Joins the cluster in RAY_ADDRESS (as under `ray job submit`) or starts a local one. Writes images (files, or
WebDataset tar shards), metadata and `{output}/run.json`. Exit status: 0 when every row is ok, 1 when some rows
failed, 2 for a config or input error found before any work starts, 3 when the job stopped (an actor that cannot
start, a lost cluster) and 130 on Ctrl-C; what was written is kept, and the same command finishes the work.
"""

import argparse
import contextlib
import logging
import os
import posixpath
import sys
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.util.annotations import RayDeprecationWarning

from actors.calibration import CalibrationError, controller_for
from actors.config import JobConfig, RayConfig
from actors.generator import Generator
from sparsevar.generate import first_sparse_stage
from storage.images import write_imagefolder_metadata
from storage.lease import LeaseHeld, OutputLease
from storage.metadata import read_metadata, scan_metadata
from storage.shards import remove_temp_files
from storage.uris import resolve
from workflows.adaptive_report import AdaptiveReport, adaptive_report
from workflows.compact import MetadataMerger, compact_metadata, finish_compactions
from workflows.config import ConfigError, load_config
from workflows.errors import exception_chain
from workflows.planner import planned_rows, start_planner
from workflows.progress import JobProgress
from workflows.prompts import check_prompts, prompt_file_error, prompt_parts, prompt_rows
from workflows.run_record import (
    FAILED_SHOWN,
    dataset_record,
    failed_rows_query,
    read_runs,
    versions,
    write_run,
    write_run_json,
)
from workflows.scan import scan_files, scan_shards, take_out_images
from workflows.tally import RowCounts, tally_metadata

log = logging.getLogger(__name__)
EXIT_OK, EXIT_ROWS_FAILED, EXIT_BAD_INPUT, EXIT_JOB_STOPPED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
# Ray Data puts an actor pool's constructor arguments in the object store (no setting changes that), and Ray's core
# worker logs an error-level line for every such actor that may restart. The job holds those arguments to its end.
RESTARTS_NOTE = ("note: Ray's 'core_worker.cc ... has constructor arguments in the object store and max_restarts "
                 "> 0' line above is harmless here: the job keeps those arguments (the config) until it ends, so "
                 "restarted actors find them (ray#53727)")


@dataclass(frozen=True)
class Summary:
    images: int
    failed: int
    seconds: float
    kept_ratio_by_stage: dict[int, float]
    adaptive: AdaptiveReport | None = None
    skipped: int = 0  # images the output already held
    skipped_errors: int = 0  # input errors (malformed rows) an earlier run recorded, not reported again
    restartable_pool: bool = False  # an actor pool with max_restarts > 0 ran: Ray logged ray#53727's line
    deduplicated: int = 0  # surplus rows of images recorded more than once, taken out
    failed_rows: tuple[dict[str, Any], ...] = ()  # the first FAILED_SHOWN error rows (source_row, prompt_id, ...)
    failed_query: str = ""  # a command that lists every failed row of the output

    @property
    def images_per_sec(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        lines = [f"images written: {self.images}", f"rows failed: {self.failed}"]
        for row in self.failed_rows:
            where = f"row {row['source_row']}" if row["source_row"] is not None else "row ?"
            lines.append(f"  {where} of the prompt file, id {row['prompt_id']!r} (seed {row['seed']}): {row['error']}")
        if self.failed > len(self.failed_rows):
            lines.append(f"  ... {self.failed - len(self.failed_rows)} more; list every failed row with: "
                         f"{self.failed_query}")
        if self.skipped:
            lines.append(f"already in the output (skipped): {self.skipped}")
        if self.skipped_errors:
            lines.append(f"input errors recorded by an earlier run (skipped): {self.skipped_errors}")
        if self.deduplicated:
            lines.append(f"images recorded more than once, surplus rows taken out: {self.deduplicated}")
        lines.append(f"images per second: {self.images_per_sec:.2f} ({self.seconds:.1f} s, actor start-up included)")
        if self.kept_ratio_by_stage:
            kept = ", ".join(f"stage {s}: {r:.3f}" for s, r in sorted(self.kept_ratio_by_stage.items()))
            lines.append(f"mean kept ratio per sparse stage: {kept}")
        if self.adaptive is not None:
            lines.append(str(self.adaptive))
        if self.restartable_pool:
            lines.append(RESTARTS_NOTE)
        return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workflows.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="job config YAML, e.g. configs/tiny.yaml")
    parser.add_argument("--prompts", required=True, help="JSONL, CSV, Parquet or text file (path or URI)")
    parser.add_argument("--output", required=True, help="output folder or URI")
    parser.add_argument("--limit", type=int, default=None, help="generate at most this many prompts")
    parser.add_argument("--verify", action="store_true",
                        help="read every image the output records and generate again those whose sha256 differs "
                        "from their row (files layout; without it, a resumed run compares sizes only)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set sparsevar.tau=0.5 (repeatable)")
    return parser.parse_args(argv)


def connect_ray() -> bool:
    """Join RAY_ADDRESS's cluster or start a local one; usage statistics stay off unless the user set them.
    True when this process started the cluster (then its nodes are all there will be).

    Without RAY_ADDRESS the job never joins a cluster Ray finds by itself (a `ray_current_cluster` record left by
    an earlier `ray start`, maybe of a cluster long gone, or any running one): joining is asked for by name."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return False
    ray.init(address="local", include_dashboard=False)
    return True


@dataclass(frozen=True)
class Plan:
    rows: ray.data.Dataset  # the rows to generate, planned as the prompt file streams in (workflows.planner)
    planner: Any  # the Planner actor: its finish() gives the counts and the last, short shard
    deduplicated: int  # surplus rows of done images taken out before the run (files layout)


@dataclass(frozen=True)
class Counts:
    skipped: int = 0  # images the output already holds
    skipped_errors: int = 0  # input-error rows the output already holds


def run(cfg: JobConfig, prompts: str, output: str, limit: int | None = None, verify: bool = False) -> Summary:
    """Run the pipeline (read, generate in an actor pool, write Parquet), summarise this run's rows and
    record the run in `{output}/run.json`.

    The output's lease is taken first (a second job on it is refused); everything else that can reject the input
    (prompts, output location, an output written with another layout) is checked before the first write, so a
    rejected run leaves an existing output as it was, its lease given back."""
    try:  # read and check the calibration here, before any actor starts
        controller = controller_for(cfg) if cfg.adaptive.enabled else None
    except CalibrationError as exc:
        raise ConfigError(f"adaptive.calibration: {exc}") from None
    run_id = uuid.uuid4().hex[:12]
    check_output(output, cfg.storage.endpoint_url)
    with output_lease(output, cfg.storage.endpoint_url, run_id, cfg.output.lease_ttl_s) as lease:
        started_at = datetime.now(UTC)
        first: Plan | None = None
        restarts = cfg.ray.pipeline_restarts
        progress: JobProgress | None = None
        try:
            for attempt in range(restarts + 1):
                job = plan(cfg, prompts, output, limit, verify and attempt == 0)
                if first is None:
                    first, started = job, time.perf_counter()  # images per second: from the first plan on
                    progress = JobProgress(limit * cfg.output.images_per_prompt if limit else None)
                try:
                    return run_plan(cfg, prompts, output, job, first, lease, attempt, controller, started_at, started,
                                    progress, limit)
                except Exception as exc:
                    if attempt == restarts or not lost_actors(exc):
                        raise
                    delay = min(30.0, 2.0**attempt)
                    print(f"generation actors were lost ({root_cause(exc)}); the pipeline starts again in {delay:.0f} "
                          f"s (restart {attempt + 1} of ray.pipeline_restarts={restarts}): what is recorded is kept "
                          "and not recorded again (batches that were in flight are generated again)", file=sys.stderr,
                          flush=True)
                    time.sleep(delay)
        finally:
            if progress is not None:
                progress.close()
        raise AssertionError("unreachable: the last attempt returns or raises")


def lost_actors(exc: BaseException) -> bool:
    """Whether the pipeline stopped because generation actors died while running (a kill, a lost node, a storm
    of them faster than Ray restarts them), not because one cannot start: then starting again helps."""
    return any(isinstance(error, ray.exceptions.RayActorError) and not error.actor_init_failed
               for error in exception_chain(exc))


@contextlib.contextmanager
def output_lease(output: str, endpoint: str | None, run_id: str, ttl_s: float) -> Iterator[OutputLease]:
    """This run's lease on the output (storage.lease), taken before anything is read or written: a second job on
    the output, or one that cannot write there, is refused with ConfigError (exit 2)."""
    with contextlib.ExitStack() as stack:
        try:
            lease = stack.enter_context(OutputLease(output, endpoint, run_id, ttl_s))
        except LeaseHeld as exc:
            raise ConfigError(str(exc)) from None
        except OSError as exc:
            raise ConfigError(f"cannot write to output {output}: {exc} (check the URI, the endpoint and your "
                              "access)") from None
        yield lease


def run_plan(cfg: JobConfig, prompts: str, output: str, job: Plan, first: Plan, lease: OutputLease, attempt: int,
             controller: Any, started_at: datetime, started: float, progress: JobProgress,
             limit: int | None = None) -> Summary:
    """One attempt of `run`, the output's lease held (checked before each write to the metadata): generate the
    rows as they are planned, then the last short shard, record; take out the earlier rows of images made again,
    and compact the metadata. `first` is the first attempt's plan, whose counts (skipped, repaired) the summary
    gives; every attempt's rows count."""
    endpoint, run_id = cfg.storage.endpoint_url, lease.run_id
    lease.check()
    try:  # fails early, naming the output, when it is not writable
        write_run(output, {"run_id": run_id, "status": "running", "started": started_at.isoformat(),
                           "prompts": prompts, "output": output, "config": cfg.model_dump(mode="json"),
                           "versions": versions()}, endpoint)
    except OSError as exc:
        raise ConfigError(f"cannot write to output {output}: {exc} (check the URI, the endpoint and your "
                          "access)") from None
    prefix = f"{run_id}-{attempt}"
    merger = MetadataMerger(output, endpoint, run_id, cfg.output.merge_every)
    try:
        try:
            follow_batches(generate_dataset(cfg, job.rows, output, run_id, prefix, limit), lease, progress,
                           lambda rows: merger.finished(prefix, rows))
            finished = ray.get(job.planner.finish.remote())
            tail = finished["tail"]
            if tail is not None and tail.num_rows:
                follow_batches(generate_dataset(cfg, ray.data.from_arrow([tail]), output, run_id,
                                                f"{prefix}-last", 1), lease, progress)
        except Exception as exc:
            message = prompt_file_error(exc)
            if message is None:
                raise
            raise ConfigError(message) from None
        finally:
            merger.wait()  # before the metadata is counted, rewritten or scanned again
        if not finished["images"]:
            raise ConfigError(f"prompts file {prompts} holds no prompts: add one prompt per line (or row)")
    except BaseException as exc:  # the run's record says how it ended, not "running" for good
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        with contextlib.suppress(Exception):  # an unreachable store must not hide why the job stopped
            finish_run(cfg, prompts, output, run_id, started_at, started, first_counts(first, job), status,
                       error=root_cause(exc))
        raise
    lease.check()
    deduplicated = first.deduplicated
    if cfg.output.format == "files":
        take_out_images(output, endpoint, finished["take_out"], run_id)
        if attempt:  # a failed attempt's last rows may land after the next plan
            deduplicated += scan_files(output, endpoint).deduplicated
    compact_metadata(output, endpoint)
    if cfg.output.format == "files":
        write_imagefolder_index(output, endpoint)
    else:
        remove_temp_files(output, endpoint)  # of shard writers killed mid-shard
    return finish_run(cfg, prompts, output, run_id, started_at, started, first_counts(first, job), "ok",
                      deduplicated=deduplicated, controller=controller, restartable=cfg.ray.max_restarts != 0)


def first_counts(first: Plan, job: Plan) -> Counts:
    """The first attempt's counts of work found done (its planner's, or this attempt's when it is gone)."""
    for planner in (first.planner, job.planner):
        with contextlib.suppress(Exception):
            return Counts(**ray.get(planner.counts.remote()))
    return Counts()


def follow_batches(dataset: ray.data.Dataset, lease: OutputLease, progress: JobProgress,
                   recorded: Callable[[pa.Table], None] | None = None) -> None:
    """Run the pipeline to its end, showing each batch in the job's one display as it comes back (the actors have
    recorded its rows already, and `recorded` is told of them), and stop it once the lease is lost. Ray Data's own
    progress bars give way."""
    context = ray.data.DataContext.get_current()
    bars, context.enable_progress_bars = context.enable_progress_bars, False
    batches = iter(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
    try:
        for rows in batches:
            lease.check()
            progress.update(rows)
            if recorded is not None:
                recorded(rows)
    finally:
        batches.close()  # on an interrupt, stops the pipeline and its actors now, not when collected
        context.enable_progress_bars = bars


def finish_run(cfg: JobConfig, prompts: str, output: str, run_id: str, started_at: datetime, started: float,
               first: Counts, status: str, error: str | None = None, deduplicated: int = 0,
               controller: Any = None, restartable: bool = False) -> Summary:
    """Record how this invocation ended (`runs/<run_id>.json`, its counts from the rows it left in the metadata,
    so an interrupted run's too) and recompute the dataset's `run.json` from all the metadata and run records,
    counted by column (workflows.tally)."""
    endpoint = cfg.storage.endpoint_url
    seconds = time.perf_counter() - started
    tally = tally_metadata(output, endpoint, FAILED_SHOWN)
    mine, first_sparse = tally.runs.get(run_id, RowCounts()), first_sparse_stage(cfg.sparsevar)
    summary = Summary(mine.images, mine.failed, seconds, mine.kept_ratio_by_stage(first_sparse),
                      skipped=first.skipped, skipped_errors=first.skipped_errors, deduplicated=deduplicated,
                      restartable_pool=restartable, failed_rows=tuple(mine.failed_rows),
                      failed_query=failed_rows_query(output, endpoint))
    if controller is not None:
        ok_rows = read_metadata(output, endpoint, ["status", "tau", "latency_ms"],
                                (pc.field("run_id") == run_id) & (pc.field("status") == "ok"))
        summary = replace(summary, adaptive=adaptive_report(ok_rows, cfg, controller))
    record = {**run_record(cfg, prompts, output, run_id, started_at, summary), "status": status}
    if error is not None:
        record["error"] = error
    write_run(output, record, endpoint)
    dataset = dataset_record(record, read_runs(output, endpoint), tally, tally.total.kept_ratio_by_stage(first_sparse))
    write_run_json(output, dataset, endpoint)
    return summary


def root_cause(exc: BaseException) -> str:
    """The last line of the innermost error that has a message: Ray wraps an actor's exception, traceback
    included, in its own (and that in a bare one of Ray Data's)."""
    found = type(exc).__name__
    cause: BaseException | None = exc
    while cause is not None:
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
        found = lines[-1] if lines else found
        cause = cause.__cause__
    return found


def check_actor_fits(ray_cfg: RayConfig, local: bool) -> None:
    """An actor must fit on one node. On a cluster this process started, none ever will if none does now, and the
    job would wait for good: ConfigError. A joined cluster may yet add one (an autoscaler): a warning."""
    need = {"CPU": ray_cfg.num_cpus_per_actor, "GPU": ray_cfg.num_gpus_per_actor}
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    if any(all(node.get(kind, 0.0) >= amount for kind, amount in need.items()) for node in nodes):
        return
    shapes = ", ".join(sorted({f"{node.get('CPU', 0):g} CPU and {node.get('GPU', 0):g} GPU" for node in nodes}))
    problem = (f"a generation actor asks for {need['CPU']:g} CPU and {need['GPU']:g} GPU (ray.num_cpus_per_actor, "
               f"ray.num_gpus_per_actor), but no node of the cluster has that much (nodes: {shapes or 'none'})")
    if local:
        raise ConfigError(f"{problem}; lower them, e.g. on a machine without a GPU --set ray.num_gpus_per_actor=0 "
                          "--set runtime.device=cpu")
    log.warning("%s; the job waits until a node that fits joins the cluster", problem)


def check_score_block(cfg: JobConfig) -> None:
    """A score block past the model's depth would fail every prompt of the job, one by one; where the config
    gives the depth (HART's comes with its checkpoint), it is refused up front."""
    depth = getattr(cfg.model, "depth", None)
    if cfg.sparsevar.enabled and depth is not None and cfg.sparsevar.score_block > depth:
        raise ConfigError(f"sparsevar.score_block={cfg.sparsevar.score_block} is past the model's last block "
                          f"(model.depth={depth}); pick one from 1 to {depth}")


def check_output(output: str, endpoint_url: str | None) -> None:
    """An output that names no usable location raises ConfigError (whether it is writable shows at the first write)."""
    if not output.strip():
        raise ConfigError("--output is empty: name the output folder or URI, e.g. --output ./out")
    try:
        resolve(output, endpoint_url)
    except ValueError as exc:
        raise ConfigError(f"bad output location: {exc}") from None


def plan(cfg: JobConfig, prompts: str, output: str, limit: int | None, verify: bool = False) -> Plan:
    """The rows to generate, as a dataset planned while the prompt file streams in: every image the prompts ask
    for, less those the output already holds whole (workflows.scan, read by tasks; with `verify`, every recorded
    image's sha256 is checked). Before it returns: completes a compaction cut off by a crash, and takes out
    surplus rows (files) or rows of shards without a tar (webdataset)."""
    endpoint = cfg.storage.endpoint_url
    try:
        finish_compactions(output, endpoint)
        parts = prompt_parts(prompts, endpoint)
        rows = prompt_rows(prompts, endpoint, limit, parts)
        common = {"layout": cfg.output.format, "shard_size": cfg.output.shard_size, "whole_file": limit is None,
                  "output": output, "endpoint": endpoint}
        if cfg.output.format == "webdataset":
            planner, surplus = start_planner(**common, shards=scan_shards(output, endpoint, cfg.output.shard_size)), 0
        else:
            found = scan_files(output, endpoint, verify)
            planner, surplus = start_planner(**common, done=found.done, recorded=found.recorded), found.deduplicated
    except OSError as exc:
        raise ConfigError(f"cannot read output {output}: {exc} (check the URI, the endpoint and your access)") from None
    return Plan(planned_rows(rows, planner, cfg.output.images_per_prompt, len(parts)), planner, surplus)


def write_imagefolder_index(output: str, endpoint_url: str | None) -> None:
    """`{output}/images/metadata.jsonl` for Hugging Face `imagefolder`, rebuilt whole from all the metadata's ok
    rows, a record batch at a time, in the metadata's order (the driver never holds them all). It lists every
    image once, as the metadata does by the time it is written: the run has taken out the surplus rows."""
    columns = ["prompt_id", "prompt", "seed", "model", "width", "height", "tau", "image_uri", "image_sha256"]
    batches = scan_metadata(output, endpoint_url, columns, pc.field("status") == "ok")
    write_imagefolder_metadata(output, (
        {"file_name": posixpath.basename(row.pop("image_uri")), **row}
        for batch in batches for row in batch.to_pylist()), endpoint_url)


def generate_dataset(cfg: JobConfig, rows: ray.data.Dataset, output: str, run_id: str, commit: str,
                     limit: int | None = None) -> ray.data.Dataset:
    """The rows to generate, cut into blocks of one batch and mapped through the actor pool: the actor that makes
    a block records its rows in the metadata (`<commit>-<digest>.parquet`) before it returns them, and a block is
    the unit Ray retries when an actor dies. For webdataset a block is one whole shard (the planner cuts whole shards
    only), handed to the actor as one batch (`batch_size=None`), which writes the shard's tar. With `limit` (at
    most that many prompts) the pool is no larger than the blocks there can be.
    """
    low, high = cfg.ray.actor_range
    shards = cfg.output.format == "webdataset"
    block = cfg.output.shard_size if shards else cfg.ray.batch_size
    if limit is not None:
        blocks = -(-limit * cfg.output.images_per_prompt // block)
        if blocks < high:  # an actor past the number of blocks would get no input, and Ray would warn so
            print(f"{blocks} block(s) of work: starting {blocks} actor(s) of the {high} that ray.num_actors allows",
                  flush=True)
            low, high = min(low, blocks), blocks
    with warnings.catch_warnings():  # the retry limits have no named parameter yet; pyproject pins Ray below 2.64
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", RayDeprecationWarning)
        return asks_no_cpu(rows.repartition(target_num_rows_per_block=block)).map_batches(
            Generator,
            fn_constructor_kwargs={"config": cfg.model_dump(mode="json"), "output": output, "run_id": run_id,
                                   "commit": commit},
            batch_size=None if shards else block,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
            num_gpus=cfg.ray.num_gpus_per_actor or None,
            num_cpus=cfg.ray.num_cpus_per_actor,
            max_restarts=cfg.ray.max_restarts,
            max_task_retries=cfg.ray.max_task_retries,
        )


def asks_no_cpu(ds: ray.data.Dataset) -> ray.data.Dataset:
    """`ds` (a repartition, whose tasks ask a CPU by default, with no parameter to say otherwise) asking none: an
    actor pool that holds every core (the laptop default) would otherwise starve it, and wait for good. Ray Data's
    logical operator holds the task options; this sets them (pyproject pins Ray below 2.64)."""
    ds._logical_plan.dag.ray_remote_args["num_cpus"] = 0
    return ds


def run_record(cfg: JobConfig, prompts: str, output: str, run_id: str, started_at: datetime,
               summary: Summary) -> dict[str, Any]:
    """One invocation's record (runs/<run_id>.json): the config, when, what came out of it and with which versions
    (`adaptive` only for adaptive runs)."""
    record = {
        "run_id": run_id, "config": cfg.model_dump(mode="json"), "prompts": prompts, "output": output,
        "started": started_at.isoformat(), "finished": datetime.now(UTC).isoformat(), "seconds": summary.seconds,
        "images": summary.images, "failed": summary.failed, "images_per_sec": summary.images_per_sec,
        "skipped": summary.skipped, "skipped_errors": summary.skipped_errors, "deduplicated": summary.deduplicated,
        "failed_rows": list(summary.failed_rows),
        "kept_ratio_by_stage": {str(k): v for k, v in sorted(summary.kept_ratio_by_stage.items())},
        "versions": versions(),
    }
    if summary.adaptive is not None:
        record["adaptive"] = summary.adaptive.as_dict()
    return record


def write_run_report(output: str, cfg: JobConfig) -> None:
    """The report page of the whole output (earlier runs' rows too); a failure to make it costs the job nothing."""
    from workflows.report import write_report  # matplotlib's import, paid only where a report is made

    try:
        print(f"report: {write_report(output, cfg.storage.endpoint_url, cfg.output.report_gallery)}")
    except Exception as exc:  # noqa: BLE001 - the images and metadata are written; only the page is missing
        print(f"warning: the report was not written ({type(exc).__name__}: {exc}); make it with python -m "
              f"workflows.report {output}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.limit is not None and args.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {args.limit}")
        if args.verify and cfg.output.format != "files":
            raise ConfigError("--verify checks images of the files layout; a webdataset shard is redone whole when "
                              "its tar or rows are incomplete")
        check_score_block(cfg)
        check_prompts(args.prompts, cfg.storage.endpoint_url)  # before paying for a cluster start
        check_output(args.output, cfg.storage.endpoint_url)
        check_actor_fits(cfg.ray, local=connect_ray())
        summary = run(cfg, args.prompts, args.output, args.limit, args.verify)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: what was written is kept; run the same command again to finish", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the pipeline stopped (an actor that cannot start, a lost cluster)
        traceback.print_exc()
        print(f"error: the job stopped: {root_cause(exc)}\nwhat was written is kept; after fixing the cause, run "
              "the same command again to finish", file=sys.stderr)
        return EXIT_JOB_STOPPED
    if cfg.output.report:
        write_run_report(args.output, cfg)
    print(summary)
    return EXIT_OK if summary.failed == 0 else EXIT_ROWS_FAILED


if __name__ == "__main__":
    sys.exit(main())
