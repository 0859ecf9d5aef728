"""Generate a dataset of images from a prompt file with a SparseVAR-accelerated model on a Ray cluster.

    python -m workflows.generate --config configs/tiny.yaml --prompts configs/prompts/sample.jsonl --output ./out

Joins the cluster in RAY_ADDRESS (as under `ray job submit`) or starts a local one. Exit status: 0 when
every row is ok, 1 when some rows failed, 2 for a config or input error found before any work starts.
"""

import argparse
import os
import sys
import time
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data.datasource import FilenameProvider

from actors.config import JobConfig
from actors.generator import Generator
from sparsevar.generate import first_sparse_stage
from storage.metadata import METADATA_DIR, METADATA_SCHEMA
from storage.uris import join, resolve
from workflows.config import ConfigError, load_config
from workflows.prompts import IO_CPUS, read_prompts

EXIT_OK, EXIT_ROWS_FAILED, EXIT_BAD_INPUT = 0, 1, 2


@dataclass(frozen=True)
class Summary:
    images: int
    failed: int
    seconds: float
    kept_ratio_by_stage: dict[int, float]

    def __str__(self) -> str:
        rate = self.images / self.seconds if self.seconds else 0.0
        lines = [f"images written: {self.images}", f"rows failed: {self.failed}",
                 f"images per second: {rate:.2f} ({self.seconds:.1f} s, actor start-up included)"]
        if self.kept_ratio_by_stage:
            kept = ", ".join(f"stage {s}: {r:.3f}" for s, r in sorted(self.kept_ratio_by_stage.items()))
            lines.append(f"mean kept ratio per sparse stage: {kept}")
        return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workflows.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="job config YAML, e.g. configs/tiny.yaml")
    parser.add_argument("--prompts", required=True, help="JSONL, CSV, Parquet or text file (path or URI)")
    parser.add_argument("--output", required=True, help="output folder or URI")
    parser.add_argument("--limit", type=int, default=None, help="generate at most this many prompts")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set sparsevar.tau=0.5 (repeatable)")
    return parser.parse_args(argv)


def connect_ray() -> None:
    """Join RAY_ADDRESS's cluster or start a local one; usage statistics stay off unless the user set them."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(include_dashboard=False)


def run(cfg: JobConfig, prompts: str, output: str, limit: int | None = None) -> Summary:
    """Run the pipeline (read, generate in an actor pool, write Parquet) and summarise this run's rows."""
    ds = read_prompts(prompts, limit, block_rows=cfg.ray.batch_size)
    ds = ds.map_batches(
        Generator,
        fn_constructor_kwargs={"config": cfg.model_dump(mode="json"), "output": output},
        batch_size=cfg.ray.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.ray.num_actors),
        num_gpus=cfg.ray.num_gpus_per_actor or None,
        num_cpus=cfg.ray.num_cpus_per_actor,
    )
    run_id = uuid.uuid4().hex[:12]
    filesystem, metadata_path = resolve(join(output, METADATA_DIR))
    started = time.perf_counter()
    ds.write_parquet(metadata_path, filesystem=filesystem, schema=METADATA_SCHEMA,
                     filename_provider=FilenameProvider(dataset_uuid=run_id, file_format="parquet"),
                     ray_remote_args={"num_cpus": IO_CPUS})
    seconds = time.perf_counter() - started
    selector = pa.fs.FileSelector(metadata_path, allow_not_found=True)
    files = [f.path for f in filesystem.get_file_info(selector) if f.base_name.startswith(run_id)]
    table = pq.ParquetDataset(files, filesystem=filesystem).read() if files else METADATA_SCHEMA.empty_table()
    return summarize(table, seconds, first_sparse_stage(cfg.sparsevar))


def summarize(table: pa.Table, seconds: float, first_sparse: int | None) -> Summary:
    ok = table.filter(pc.equal(table["status"], "ok"))
    kept: dict[int, list[float]] = {}
    if first_sparse is not None:
        for stages in ok["stages"].to_pylist():
            for s in stages:
                if s["stage"] >= first_sparse:
                    kept.setdefault(s["stage"], []).append(s["kept"] / s["tokens"])
    ratios = {stage: sum(values) / len(values) for stage, values in kept.items()}
    return Summary(ok.num_rows, table.num_rows - ok.num_rows, seconds, ratios)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.limit is not None and args.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {args.limit}")
        connect_ray()
        summary = run(cfg, args.prompts, args.output, args.limit)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(summary)
    return EXIT_OK if summary.failed == 0 else EXIT_ROWS_FAILED


if __name__ == "__main__":
    sys.exit(main())
