"""What recording a run costs the driver at the end of a job, by the size of the output (issue #20): counting the
metadata for `runs/<run id>.json` and `run.json` (workflows.tally, by column, a batch at a time) and writing the
imagefolder index (a batch at a time), against reading the same columns' rows into Python, as the end of a run did
before. Time and peak RSS, each in a process of its own.

    python -m benchmarks.records --rows 1000000 10000000

The output is made up: ok rows with ten stages each (the demo model's), a twentieth of them failed, in Parquet files
of 1 M rows in row groups of 65,536, as the end-of-run compaction writes them. The row-by-row baseline runs up to
--baseline-max rows (it needs gigabytes beyond).
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.metadata import METADATA_SCHEMA, SCAN_BATCH_ROWS, STAGE_TYPE

ROWS_PER_FILE = 1_000_000
STAGES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
TASKS = ("tally", "index", "rows")


def stages_column(n: int, rng: np.random.Generator) -> pa.ListArray:
    """`n` rows' stage lists: every stage of STAGES, with a random kept count."""
    sides = np.tile(np.array(STAGES, dtype=np.int32), n)
    tokens = sides * sides
    kept = np.maximum(1, (tokens * rng.random(tokens.size)).astype(np.int32))
    fields = {"stage": np.tile(np.arange(len(STAGES), dtype=np.int32), n), "height": sides, "width": sides,
              "tokens": tokens, "kept": kept, "latency_ms": np.ones(tokens.size)}
    arrays = [pa.array(fields[f.name], f.type) if f.name in fields else pa.nulls(tokens.size, f.type)
              for f in STAGE_TYPE]
    structs = pa.StructArray.from_arrays(arrays, fields=list(STAGE_TYPE))
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * len(STAGES)), structs)


def make_output(output: Path, rows: int) -> None:
    """`output`: `rows` metadata rows in files of ROWS_PER_FILE (kept from an earlier call)."""
    if output.exists():
        return
    shutil.rmtree(output.with_suffix(".tmp"), ignore_errors=True)  # a make cut off
    temp = output.with_suffix(".tmp") / "metadata"
    temp.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for start in range(0, rows, ROWS_PER_FILE):
        n = min(ROWS_PER_FILE, rows - start)
        index = np.arange(start, start + n)
        failed = rng.random(n) < 0.05
        ids = pa.array([f"p{i:09d}" for i in index])
        columns = {"prompt_id": ids, "prompt": pa.array(["a red striped circle at the top left"] * n),
                   "seed": pa.array(index), "model": pa.array(["tiny"] * n),
                   "status": pa.array(np.where(failed, "error", "ok")),
                   "error": pa.array(np.where(failed, "prompt is empty", None)),
                   "image_uri": pa.array([f"{output}/images/p{i:09d}-s{i}.png" for i in index]),
                   "stages": stages_column(n, rng), "tau": pa.array(np.full(n, 0.6)),
                   "source_row": pa.array(index + 1), "run_id": pa.array(["run-a"] * n)}
        table = pa.table({f.name: columns[f.name].cast(f.type) if f.name in columns else pa.nulls(n, f.type)
                          for f in METADATA_SCHEMA}, schema=METADATA_SCHEMA)
        pq.write_table(table, temp / f"synthetic-{start // ROWS_PER_FILE:06d}.parquet", row_group_size=SCAN_BATCH_ROWS)
    temp.parent.rename(output)


def run_task(task: str, output: str) -> None:
    """One task, timed, in this process: prints seconds and peak RSS (MB) as JSON."""
    began = time.perf_counter()
    if task == "tally":
        from workflows.run_record import FAILED_SHOWN
        from workflows.tally import tally_metadata

        tally_metadata(output, None, FAILED_SHOWN)
    elif task == "index":
        from workflows.generate import write_imagefolder_index

        write_imagefolder_index(output, None)
    else:
        from storage.metadata import read_metadata

        read_metadata(output, None, ["status", "error", "prompt_id", "seed", "source_row", "run_id",
                                     "stages"]).to_pylist()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": time.perf_counter() - began, "peak_rss_mb": peak}))


def measure(task: str, output: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.records", "--task", task, "--output", str(output)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.records", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000], help="metadata rows of the output")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sparsevar-records"))
    parser.add_argument("--baseline-max", type=int, default=1_000_000, help="largest output read row by row")
    parser.add_argument("--task", choices=TASKS, help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.task:
        run_task(args.task, args.output)
        return 0
    print("| rows | task | seconds | peak RSS (MB) |\n|---|---|---|---|")
    for rows in args.rows:
        output = args.workdir / f"out-{rows}"
        make_output(output, rows)
        for task in TASKS:
            if task == "rows" and rows > args.baseline_max:
                continue
            found = measure(task, output)
            print(f"| {rows:,} | {task} | {found['seconds']:.1f} | {found['peak_rss_mb']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
