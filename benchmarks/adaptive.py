"""Benchmark adaptive τ: measure dense throughput, then run targets of 1.2x and 1.5x it, for each normalize mode.

    python -m benchmarks.adaptive --config configs/tiny-random.yaml --prompts configs/prompts/sample.jsonl

Runs generation actors' code (actors.generator.Generator) in this process without Ray, so the figures are the
controller's and the device's, not the scheduler's. Each mode is calibrated first (dense and a τ grid). For
each target the modes' actors then take turns batch by batch, so both meet the same load on a shared machine.
Printed per mode and target: achieved images/s over all batches and after the first `--settle`, the bias
(settled / target - 1), the spread of batch throughput (coefficient of variation) and τ. Not a test: the
figures depend on the machine and on whatever else runs on it (the load average is printed).
"""

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import pyarrow as pa

from actors.calibration import calibration_setup, calibration_table, write_calibration
from actors.config import JobConfig
from actors.generator import Generator
from sparsevar.backends import build_backend
from sparsevar.calibration import calibrate
from storage.prompts import PROMPT_SCHEMA
from workflows.calibrate import read_prompt_sample, sample_requests
from workflows.config import load_config

Batch = tuple[float | None, float, int]  # τ, batch latency ms, images


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.adaptive", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny-random.yaml")
    parser.add_argument("--prompts", default="configs/prompts/sample.jsonl", help="cycled with new seeds as needed")
    parser.add_argument("--batches", type=int, default=12, help="batches per run (default 12)")
    parser.add_argument("--settle", type=int, default=3, help="batches left out of the settled figures (default 3)")
    parser.add_argument("--factors", default="1.2,1.5", help="targets as multiples of dense throughput")
    parser.add_argument("--modes", default="minmax,quantile", help="sparsevar.normalize modes to compare")
    parser.add_argument("--taus", default="0,0.2,0.4,0.6,0.8,1.0", help="calibration grid")
    parser.add_argument("--repeats", type=int, default=2, help="timed calibration rounds (default 2)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser.parse_args(argv)


def prompt_rows(uri: str, count: int) -> pa.Table:
    """`count` prompt rows: the file's prompts, cycled with fresh ids and seeds so no image repeats."""
    sample = read_prompt_sample(uri, count)
    rows = [{"prompt_id": f"bench-{i}", "prompt": sample[i % len(sample)].prompt, "seed": i,
             "negative_prompt": sample[i % len(sample)].negative_prompt, "error": None} for i in range(count)]
    return pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA)


def run_batch(actor: Generator, rows: pa.Table) -> Batch:
    out = actor(rows).to_pylist()
    return out[0]["tau"], out[0]["latency_ms"], len(out)


def images_per_sec(batches: list[Batch]) -> float:
    return 1000.0 * sum(n for _, _, n in batches) / sum(ms for _, ms, _ in batches)


def with_mode(cfg: JobConfig, mode: str) -> JobConfig:
    return cfg.model_copy(update={"sparsevar": cfg.sparsevar.model_copy(update={"normalize": mode, "enabled": True})})


def calibrate_mode(cfg: JobConfig, prompts: str, taus: list[float], repeats: int, output: str) -> str:
    """Calibrate `cfg` on two batches of the prompts; returns the calibration's URI."""
    backend = build_backend(cfg.model, cfg.sampling, cfg.runtime.device, cfg.runtime.dtype)
    requests = sample_requests(prompts, 2 * cfg.ray.batch_size, cfg.ray.batch_size)
    points = calibrate(backend, requests, cfg.sparsevar, taus, cfg.ray.batch_size, repeats)
    return write_calibration(calibration_table(points, calibration_setup(cfg)), output)


def report(mode: str, factor: float, target: float, batches: list[Batch], settle: int) -> str:
    settled = batches[settle:]
    rates = [1000.0 * n / ms for _, ms, n in settled]
    taus = [tau for tau, _, _ in batches]
    return (f"{mode:>8} {factor:6.2f}x {target:8.2f} {images_per_sec(batches):9.2f} {images_per_sec(settled):8.2f} "
            f"{images_per_sec(settled) / target - 1:+7.1%} {statistics.pstdev(rates) / statistics.mean(rates):7.1%} "
            f"{statistics.mean(taus):7.3f} {statistics.pstdev(taus):6.3f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    base = load_config(args.config, [*args.overrides, "ray.num_actors=1", "adaptive.enabled=false"])
    size, modes = base.ray.batch_size, args.modes.split(",")
    rows = prompt_rows(args.prompts, args.batches * size)
    batch_rows = [rows.slice(start, size) for start in range(0, rows.num_rows, size)]
    work = Path(tempfile.mkdtemp(prefix="bench-adaptive-"))
    calibrations = {mode: calibrate_mode(with_mode(base, mode), args.prompts, [float(t) for t in args.taus.split(",")],
                                         args.repeats, str(work / mode)) for mode in modes}

    dense = Generator(base.model_copy(update={"sparsevar": base.sparsevar.model_copy(update={"enabled": False})})
                      .model_dump(mode="json"), str(work / "images"))
    run_batch(dense, batch_rows[0])  # warm-up
    dense_ips = images_per_sec([run_batch(dense, batch) for batch in batch_rows])
    print(f"dense: {dense_ips:.2f} images/s ({args.batches} batches of {size}, one actor)")
    print(f"{'mode':>8} {'factor':>7} {'target':>8} {'achieved':>9} {'settled':>8} {'bias':>7} {'spread':>7} "
          f"{'mean τ':>7} {'std τ':>6}")
    for factor in (float(f) for f in args.factors.split(",")):
        target = factor * dense_ips
        actors = {}
        for mode in modes:
            cfg = with_mode(base, mode)
            adaptive = cfg.adaptive.model_copy(update={"enabled": True, "target_images_per_sec": target,
                                                       "calibration": calibrations[mode]})
            actors[mode] = Generator(cfg.model_copy(update={"adaptive": adaptive}).model_dump(mode="json"),
                                     str(work / "images"))
        batches: dict[str, list[Batch]] = {mode: [] for mode in modes}
        for batch in batch_rows:  # the modes take turns, so both meet the same load
            for mode in modes:
                batches[mode].append(run_batch(actors[mode], batch))
        for mode in modes:
            print(report(mode, factor, target, batches[mode], args.settle), flush=True)
    print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
