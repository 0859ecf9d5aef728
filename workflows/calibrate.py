"""Calibrate adaptive τ: time a small prompt sample dense and at a grid of τ on this machine's device.

    python -m workflows.calibrate --config configs/tiny-adaptive.yaml --prompts configs/prompts/sample.jsonl \\
        --output out/calibration

Writes {output}/calibration.parquet, one row per setting (dense, then each τ): median warm latency per image,
images per second at ray.batch_size, mean kept ratio per stage, and fidelity against the dense image of the
same prompt and seed (PSNR, share of stage tokens identical to dense); and {output}/calibration.png. Runs in
this process without Ray, with ray.num_cpus_per_actor torch threads like one generation actor; set
adaptive.calibration to the output. Exit status: 0, or 2 for a config or input error.
"""

import argparse
import io
import itertools
import logging
import sys

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

from actors.calibration import (
    CALIBRATION_SCHEMA,
    calibration_setup,
    calibration_table,
    calibration_uri,
    write_calibration,
)
from actors.config import JobConfig
from sparsevar.backends import build_backend
from sparsevar.calibration import calibrate
from sparsevar.demo.yardstick import demo_judge
from sparsevar.generate import Request, first_sparse_stage
from storage.prompts import normalize_jsonl_lines, normalize_records, normalize_text_lines, prompt_format
from storage.uris import join, resolve, write_bytes
from workflows.calibration_plot import plot_calibration
from workflows.config import ConfigError, load_config

DEFAULT_TAUS = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0"
PLOT_NAME = "calibration.png"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workflows.calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="job config YAML, e.g. configs/tiny-adaptive.yaml")
    parser.add_argument("--prompts", required=True, help="JSONL, CSV, Parquet or text file (path or URI)")
    parser.add_argument("--output", required=True, help="folder or URI for calibration.parquet and calibration.png")
    parser.add_argument("--limit", type=int, default=8,
                        help="prompts in the sample, rounded down to whole batches of ray.batch_size (default 8)")
    parser.add_argument("--taus", default=DEFAULT_TAUS, help=f"comma-separated τ grid (default {DEFAULT_TAUS})")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; latency is their median (default 3)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set sparsevar.normalize=quantile (repeatable)")
    return parser.parse_args(argv)


def parse_taus(text: str) -> list[float]:
    try:
        taus = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ConfigError(f"--taus {text!r}: expected comma-separated numbers, e.g. 0,0.25,0.5,0.75,1") from None
    if not taus or taus[0] < 0:
        raise ConfigError(f"--taus {text!r}: give at least one τ, none negative")
    return taus


def read_prompt_sample(uri: str, limit: int, endpoint_url: str | None = None) -> list[Request]:
    """The first `limit` valid prompts of a file, read in this process (a sample needs no cluster)."""
    try:
        filesystem, path = resolve(uri, endpoint_url)
        kind = prompt_format(uri)
        if kind == "parquet":
            rows = normalize_records(pq.read_table(path, filesystem=filesystem)).to_pylist()
        else:
            with filesystem.open_input_stream(path) as stream:
                if kind == "csv":
                    rows = normalize_records(pacsv.read_csv(stream)).to_pylist()
                else:
                    normalize = normalize_jsonl_lines if kind == "jsonl" else normalize_text_lines
                    lines = io.TextIOWrapper(stream, encoding="utf-8")
                    valid = (row for line in lines for row in normalize([line]).to_pylist() if row["error"] is None)
                    rows = list(itertools.islice(valid, limit))
    except FileNotFoundError:
        raise ConfigError(f"prompts file not found: {uri} (try configs/prompts/sample.jsonl)") from None
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise ConfigError(f"cannot read prompts {uri}: {exc}") from None
    rows = [row for row in rows if row["error"] is None][:limit]
    return [Request(row["prompt"], row["seed"], row["negative_prompt"]) for row in rows]


def sample_requests(uri: str, limit: int, batch_size: int, endpoint_url: str | None = None) -> list[Request]:
    """Whole batches of the sample: latency per image is that of the job's batch size."""
    if limit < batch_size:
        raise ConfigError(f"--limit {limit} is below ray.batch_size={batch_size}: calibration times whole batches")
    requests = read_prompt_sample(uri, limit, endpoint_url)
    whole = len(requests) - len(requests) % batch_size
    if whole == 0:
        raise ConfigError(f"prompts {uri} hold {len(requests)} valid prompts, fewer than one batch of "
                          f"ray.batch_size={batch_size}; add prompts or lower ray.batch_size")
    return requests[:whole]


def run(cfg: JobConfig, prompts: str, output: str, limit: int, taus: list[float], repeats: int) -> pa.Table:
    """Measure, then write the calibration and its plot under `output`; returns the table."""
    endpoint = cfg.storage.endpoint_url
    requests = sample_requests(prompts, limit, cfg.ray.batch_size, endpoint)
    torch.set_num_threads(max(1, int(cfg.ray.num_cpus_per_actor)))
    backend = build_backend(cfg.model, cfg.sampling, cfg.runtime.device, cfg.runtime.dtype)
    points = calibrate(backend, requests, cfg.sparsevar, taus, cfg.ray.batch_size, repeats, demo_judge(cfg.model))
    table = calibration_table(points, calibration_setup(cfg))
    write_calibration(table, output, endpoint)
    title = (f"{backend.name}, batch {cfg.ray.batch_size}, normalize={cfg.sparsevar.normalize}, "
             f"{len(requests)} prompts on {backend.device}")
    first_sparse = first_sparse_stage(cfg.sparsevar.model_copy(update={"enabled": True}))
    write_bytes(join(output, PLOT_NAME), plot_calibration(table, first_sparse, title), endpoint)
    return table


def describe(table: pa.Table) -> str:
    """A plain-text table of the calibration, one line per setting."""
    lines = [f"{'tau':>6} {'ms/image':>9} {'images/s':>9} {'kept':>6} {'PSNR dB':>8} {'tokens=dense':>12} "
             f"{'yardstick':>9}"]
    for r in table.select([name for name in CALIBRATION_SCHEMA.names if name != "stages"]).to_pylist():
        tau = "dense" if r["tau"] is None else f"{r['tau']:.2f}"
        yardstick = "-" if r["yardstick"] is None else f"{r['yardstick']:.3f}"
        lines.append(f"{tau:>6} {r['latency_ms_per_image']:9.1f} {r['images_per_sec']:9.2f} {r['kept_ratio']:6.3f} "
                     f"{r['psnr_db']:8.2f} {r['token_match']:12.3f} {yardstick:>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        if args.repeats < 1:
            raise ConfigError(f"--repeats must be at least 1, got {args.repeats}")
        table = run(cfg, args.prompts, args.output, args.limit, parse_taus(args.taus), args.repeats)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(describe(table))
    print(f"wrote {calibration_uri(args.output)} and {join(args.output, PLOT_NAME)}; set "
          f"adaptive.calibration: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
