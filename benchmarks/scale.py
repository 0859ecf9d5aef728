"""How the batch job's planning scales with the prompt list: time to first image, planning time and the driver's peak
RSS, for a fresh run and for a resumed one whose output holds the first half of the images (issue #20).

    python -m benchmarks.scale --prompts 1000000 10000000

Each run is the real command (`python -m workflows.generate`, files layout, one actor, on the CPU) in a process of
its own, stopped once its first image lands; its peak RSS is the kernel's high-water mark (VmHWM) of that process,
the driver (Ray's own processes are apart). Planning time is the time to first image less that of a one-prompt
file (the fixed cost of starting Ray, the actor and one image). The half-done output is made up: metadata rows and
empty image files (`image_bytes` 0) for the first half of the prompts, in Parquet files of at most 1 M rows in row
groups of 65,536 (as compaction writes them); with `--layout webdataset` (shards of 1,000; an image has landed when
a shard's tar, being written, holds one), metadata rows and empty tars of the first half's shards: millions of
image files take longer to make than the runs they serve.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage.images import image_key
from storage.metadata import METADATA_SCHEMA, SCAN_BATCH_ROWS
from storage.shards import shard_name

SHARD_SIZE = 1000
OVERRIDES = ("runtime.device=cpu", "ray.num_actors=1", "ray.batch_size=1", "output.report=false",
             "model.patch_sizes=[1,2,3,4,6,8,12,16]", "sparsevar.start_stage=6")
ROWS_PER_FILE = 1_000_000


@dataclass(frozen=True)
class Measure:
    first_image_s: float
    peak_rss_mb: float


def write_prompts(path: Path, count: int) -> Path:
    """`count` JSONL prompts (ids p000000000...), written once and kept for later runs."""
    if path.exists():
        return path
    temp = path.with_suffix(".tmp")
    with temp.open("w") as stream:
        for start in range(0, count, 100_000):
            stream.write("".join(f'{{"id": "p{i:09d}", "prompt": "a red striped circle at the top left", '
                                 f'"seed": {i}}}\n' for i in range(start, min(count, start + 100_000))))
    temp.rename(path)
    return path


def half_done(output: Path, count: int, layout: str) -> None:
    """An output holding the first half of `count` prompts' images: ok rows, and empty image files (files) or
    empty tars of the whole shards (webdataset)."""
    folder = output / ("images" if layout == "files" else "shards")
    folder.mkdir(parents=True)
    (output / "metadata").mkdir()
    done = count // 2 if layout == "files" else count // 2 // SHARD_SIZE * SHARD_SIZE
    for index in range(done // SHARD_SIZE if layout == "webdataset" else 0):
        open(folder / shard_name(index), "wb").close()  # noqa: SIM115 - an empty file, closed at once
    for start in range(0, done, ROWS_PER_FILE):
        ids = [f"p{i:09d}" for i in range(start, min(done, start + ROWS_PER_FILE))]
        seeds = list(range(start, start + len(ids)))
        n = len(ids)
        columns = {"prompt_id": ids, "prompt": ["a red striped circle at the top left"] * n, "seed": seeds,
                   "model": ["tiny"] * n, "status": ["ok"] * n, "image_bytes": [0] * n,
                   "source_row": [s + 1 for s in seeds], "run_id": ["synthetic"] * n}
        if layout == "files":
            columns["image_uri"] = [str(output / image_key(pid, seed, "png")) for pid, seed in zip(ids, seeds,
                                                                                                    strict=True)]
            for uri in columns["image_uri"]:
                open(uri, "wb").close()  # noqa: SIM115 - an empty file, closed at once
        else:
            columns["shard"] = [str(folder / shard_name(seed // SHARD_SIZE)) for seed in seeds]
        table = pa.table(columns)
        table = pa.table({f.name: table[f.name] if f.name in table.column_names else pa.nulls(n, f.type)
                          for f in METADATA_SCHEMA}, schema=METADATA_SCHEMA)
        pq.write_table(table, output / "metadata" / f"synthetic-{start // ROWS_PER_FILE:06d}.parquet",
                       row_group_size=SCAN_BATCH_ROWS)  # as compaction writes them


def landed(output: Path, layout: str, before: set[str]) -> bool:
    """Whether an image made by this run is there: a new image file, or a sample in a shard being written."""
    if layout == "files":
        return (output / "images").exists() and any(entry.name.endswith(".png") and entry.name not in before
                                                    for entry in os.scandir(output / "images"))
    return (output / "shards").exists() and any(entry.name not in before and entry.stat().st_size > 1024
                                                for entry in os.scandir(output / "shards"))


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), in MB; 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    found = [line for line in status.splitlines() if line.startswith("VmHWM:")]  # none once a zombie
    return int(found[0].split()[1]) / 1024 if found else 0.0


def first_image(prompts: Path, output: Path, config: str, timeout: float, layout: str = "files") -> Measure:
    """Run the job until an image it made lands (see landed), then stop it."""
    folder = output / ("images" if layout == "files" else "shards")
    before = {entry.name for entry in os.scandir(folder)} if folder.exists() else set()
    overrides = [*OVERRIDES, f"output.format={layout}", f"output.shard_size={SHARD_SIZE}"]
    started = time.perf_counter()
    job = subprocess.Popen([sys.executable, "-m", "workflows.generate", "--config", config, "--prompts", str(prompts),
                            "--output", str(output), *[a for o in overrides for a in ("--set", o)]],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    peak, seconds = 0.0, None
    try:
        while seconds is None:
            peak = max(peak, peak_rss_mb(job.pid))
            if job.poll() is not None:
                raise RuntimeError(f"the job ended (exit {job.returncode}) before its first image: "
                                   f"{job.stderr.read()[-2000:]}")
            if time.perf_counter() - started > timeout:
                raise RuntimeError(f"no image after {timeout:.0f} s")
            if landed(output, layout, before):
                seconds = time.perf_counter() - started
            time.sleep(0.05)
        peak = max(peak, peak_rss_mb(job.pid))
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGINT)
            try:
                job.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
    return Measure(seconds, peak)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[100_000, 1_000_000], help="prompt list sizes")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sparsevar-scale"), help="prompt files and outputs")
    parser.add_argument("--config", default="configs/tiny-random.yaml")
    parser.add_argument("--no-resume", action="store_true", help="measure fresh runs only")
    parser.add_argument("--layout", choices=["files", "webdataset"], default="files", help="output.format")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args.workdir.mkdir(parents=True, exist_ok=True)
    base = first_image(write_prompts(args.workdir / "prompts-1.jsonl", 1), args.workdir / "out-base", args.config,
                       args.timeout, args.layout)
    shutil.rmtree(args.workdir / "out-base")
    results = []
    for count in args.prompts:
        prompts = write_prompts(args.workdir / f"prompts-{count}.jsonl", count)
        runs = [("fresh", False)] + ([] if args.no_resume else [("resumed (half done)", True)])
        for label, resumed in runs:
            output = args.workdir / f"out-{count}"
            shutil.rmtree(output, ignore_errors=True)
            if resumed:
                half_done(output, count, args.layout)
            measure = first_image(prompts, output, args.config, args.timeout, args.layout)
            shutil.rmtree(output, ignore_errors=True)
            row = {"prompts": count, "layout": args.layout, "run": label,
                   "first_image_s": round(measure.first_image_s, 1),
                   "planning_s": round(max(0.0, measure.first_image_s - base.first_image_s), 1),
                   "driver_peak_rss_mb": round(measure.peak_rss_mb)}
            print(json.dumps(row), flush=True)
            results.append(row)
    print(f"\none-prompt baseline: first image after {base.first_image_s:.1f} s, driver peak RSS "
          f"{base.peak_rss_mb:.0f} MB\n")
    print("| prompts | layout | run | time to first image (s) | planning (s) | driver peak RSS (MB) |\n"
          "|---|---|---|---|---|---|")
    for row in results:
        print(f"| {row['prompts']:,} | {row['layout']} | {row['run']} | {row['first_image_s']} | {row['planning_s']} | "
              f"{row['driver_peak_rss_mb']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
