"""Benchmark SparseVAR against dense on one config: latency, speed-up, ideal (FLOPs) speed-up, efficiency,
per-stage costs, and the Ray pipeline's overhead over the bare generation loop.

    python -m workflows.bench --config configs/bench-cpu.yaml --out bench-out

Every ratio compares figures measured in the same run. Writes DIR/bench.json, DIR/bench.md and PNG plots.
"""

import argparse
import itertools
import json
import multiprocessing
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from actors.config import JobConfig
from sparsevar.backend import Backend
from sparsevar.backends import build_backend
from sparsevar.config import SparseVARConfig
from sparsevar.demo.scenes import held_out_captions
from sparsevar.demo.yardstick import Judge, demo_judge
from sparsevar.flops import flops_ratio
from sparsevar.generate import NO_SPEEDUPS, ImageResult, Request, first_sparse_stage, generate
from sparsevar.speedups import Setting, compared
from storage.checkpoints import localize_checkpoints
from storage.metadata import read_metadata
from workflows.config import ConfigError, load_config

PROMPTS = held_out_captions(8)  # in the demo model's domain, so that its yardstick can judge them


def requests(n: int, offset: int = 0) -> list[Request]:
    return [Request(PROMPTS[(offset + i) % len(PROMPTS)], seed=offset + i) for i in range(n)]


def timed_runs(backend: Backend, batch: list[Request], settings: list[Setting],
               repeats: int) -> list[list[list[ImageResult]]]:
    """Each setting's runs, interleaved: one warm-up run of every setting, then `repeats` rounds that run every
    setting once, so that a drift in the machine's speed (a shared CPU) hits every setting alike."""
    for _, sv, speedups in settings:
        generate(backend, batch, sv, speedups, profile=True)
    rounds = [[generate(backend, batch, sv, speedups, profile=True) for _, sv, speedups in settings]
              for _ in range(repeats)]
    return [[one_round[i] for one_round in rounds] for i in range(len(settings))]


def summarise(backend: Backend, batch: list[Request], sv: SparseVARConfig, runs: list[list[ImageResult]],
              judge: Judge | None = None) -> dict[str, Any]:
    """Median latency per image and per-stage figures of one setting's runs; with a judge (the demo model's
    yardstick), its score of the pictures against their prompts."""
    B = len(batch)
    per_image_ms = [run[0].latency_ms / B for run in runs]
    first_sparse = first_sparse_stage(sv) or len(runs[0][0].stages) + 1
    stages = []
    for i, stage in enumerate(runs[0][0].stages):
        stages.append({
            "stage": stage.stage, "tokens": stage.tokens, "branches": stage.branches,
            "latency_ms": statistics.median(run[0].stages[i].latency_ms for run in runs) / B,
            "kept_ratio": statistics.mean(img.stages[i].kept / stage.tokens for img in runs[0]),
            "overhead_ms": statistics.median(run[0].stages[i].overhead_ms for run in runs) / B,
        })
    late = [s for img in runs[0] for s in img.stages if s.stage >= first_sparse]
    return {
        "latency_ms_median": statistics.median(per_image_ms),
        "flops_ratio": statistics.mean(
            flops_ratio(img.stages, backend.block_params, backend.dim, backend.depth) for img in runs[0]),
        "kept_ratio": sum(s.kept for s in late) / sum(s.tokens for s in late) if late else 1.0,
        "sparsevar_overhead_ms": sum(s["overhead_ms"] for s in stages),
        "text_ms": statistics.median(run[0].text_ms for run in runs) / B,  # outside the stages, per image
        "decode_ms": statistics.median(run[0].decode_ms for run in runs) / B,
        "yardstick": judge([img.pixels_HWC for img in runs[0]], [r.prompt for r in batch]) if judge else None,
        "stages": stages,
    }


def settings(sv: SparseVARConfig, taus: list[float], kept: list[float], speedups: bool = False,
             stages: int = 0, depth: int = 0) -> list[Setting]:
    """Dense, min-max at each τ, and quantile at each kept fraction (τ = the fraction left out); with `speedups`,
    the other speed-ups too (`sparsevar.speedups.compared`)."""
    none = NO_SPEEDUPS
    dense, on = sv.model_copy(update={"enabled": False}), sv.model_copy(update={"enabled": True})
    out: list[Setting] = [("dense", dense, none)]
    out += [(f"minmax τ={t}", on.model_copy(update={"normalize": "minmax", "tau": t}), none) for t in taus]
    out += [(f"quantile τ={round(1 - k, 6)}", on.model_copy(update={"normalize": "quantile", "tau": round(1 - k, 6)}),
             none) for k in kept]
    if speedups:
        out += compared(sv, stages, depth)
    return out


def actor_like_backend(cfg: JobConfig) -> Backend:
    """The configured backend, with the torch threads of one generation actor (`ray.num_cpus_per_actor`)."""
    torch.set_num_threads(max(1, int(cfg.ray.num_cpus_per_actor)))
    return build_backend(localize_checkpoints(cfg.model), cfg.sampling, cfg.runtime.device, cfg.runtime.dtype)


def bench_loop(cfg: JobConfig, batch_sizes: list[int], taus: list[float], kept: list[float],
               repeats: int, speedups: bool = False) -> list[dict[str, Any]]:
    backend = actor_like_backend(cfg)
    judge = demo_judge(cfg.model)
    rows = []
    rows_of = settings(cfg.sparsevar, taus, kept, speedups, len(backend.schedule(1.0)), backend.depth)  # dense first
    for B in batch_sizes:
        batch = requests(B)
        per_setting = timed_runs(backend, batch, rows_of, repeats)
        for (label, sv, _), runs in zip(rows_of, per_setting, strict=True):
            row = {"setting": label, "mode": "sparse" if sv.enabled else "dense",
                   "normalize": sv.normalize if sv.enabled else None, "tau": sv.tau if sv.enabled else None,
                   "batch_size": B,
                   **summarise(backend, batch, sv, runs, judge)}
            # the median of each round's ratio: a round's runs are close in time
            row["speedup"] = statistics.median(dense[0].latency_ms / run[0].latency_ms
                                               for dense, run in zip(per_setting[0], runs, strict=True))
            row["efficiency"] = row["speedup"] / row["flops_ratio"]
            rows.append(row)
            print(f"B={B} {label:40} "
                  f"{row['latency_ms_median']:.0f} ms/img speedup {row['speedup']:.2f} "
                  f"ideal {row['flops_ratio']:.2f} eff {row['efficiency']:.2f}", flush=True)
    return rows


def steady_window(written_at: list[datetime], warm: int) -> tuple[int, float]:
    """The images stored after the first `warm` (every actor's first batch: its start-up and warm-up) and the
    seconds from the warm-up's end to the last of them."""
    times = sorted(written_at)
    if len(times) <= warm:
        raise ValueError(f"{len(times)} images leave no steady state after the first {warm}")
    return len(times) - warm, (times[-1] - times[warm - 1]).total_seconds()


def pipeline_warm_up(cfg: JobConfig, prompts: int) -> int:
    """The images of the pipeline run that count as warm-up (every actor's first batch); raises for a setting
    that leaves no steady state to measure."""
    low, actors = cfg.ray.actor_range
    if low != actors:
        raise ValueError(f"ray.num_actors is a range {[low, actors]}: the pipeline benchmark needs a fixed number "
                         "of actors (set one number, or pass --no-pipeline)")
    B = cfg.ray.batch_size
    if prompts < (actors + 1) * B:
        raise ValueError(f"--pipeline-prompts {prompts} leaves no steady state: give at least {(actors + 1) * B} "
                         f"(every actor's first batch of {B} is warm-up)")
    return actors * B


def bare_rate(config: dict[str, Any], prompts: int) -> float:
    """Images a second of the bare loop in this process, over the batches after the first (its warm-up, as an
    actor's first batch): the loop a user would write, a new process that builds the model and generates."""
    cfg = JobConfig.model_validate(config)
    backend = actor_like_backend(cfg)
    B, batch, sv = cfg.ray.batch_size, requests(prompts), cfg.sparsevar
    generate(backend, batch[:B], sv)
    started = time.perf_counter()
    for i in range(B, len(batch), B):
        generate(backend, batch[i: i + B], sv)
    return (len(batch) - B) / (time.perf_counter() - started)


def median_round(overheads: list[float]) -> int:
    """The round whose overhead is the median of an odd number of rounds, so that its figures reconcile."""
    if len(overheads) % 2 == 0:
        raise ValueError(f"{len(overheads)} rounds have no middle one: give an odd number")
    return sorted(range(len(overheads)), key=overheads.__getitem__)[len(overheads) // 2]


def bare_rate_in_new_process(config: dict[str, Any], prompts: int) -> float:
    """`bare_rate` in a new Python process, which ends with it (a pool would start the next one at once, and it
    would import torch beside the pipeline job being timed)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as new_process:
        return new_process.submit(bare_rate, config, prompts).result()


def pipeline_run(cfg: JobConfig, source: Path, output: Path, prompts: int, warm: int) -> dict[str, float]:
    """One job of the Ray pipeline (a cluster of its own when none is connected): its steady-state images a second,
    the share of that time its actors spent generating, cluster start and time to every actor's first batch."""
    import ray

    from workflows.generate import connect_ray, run

    owned = not ray.is_initialized()
    started = time.perf_counter()
    connect_ray()
    cluster_start_s = time.perf_counter() - started
    shutil.rmtree(output, ignore_errors=True)  # an earlier bench's images would be skipped as done
    job_start = datetime.now(UTC)
    run(cfg, str(source), str(output), None)
    if owned:
        ray.shutdown()
    rows = read_metadata(str(output), columns=["status", "written_at", "latency_ms"]).to_pylist()
    rows = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["written_at"])
    if len(rows) != prompts:
        raise RuntimeError(f"the pipeline run stored {len(rows)} of {prompts} images: see {output}/metadata")
    images, window_s = steady_window([r["written_at"] for r in rows], warm)
    busy_s = sum({r["latency_ms"] for r in rows[warm:]}) / 1e3  # a batch's images share its wall time
    return {"rate": images / window_s, "generating_pct": 100 * busy_s / (window_s * cfg.ray.num_actors),
            "cluster_start_s": cluster_start_s,
            "first_batch_s": (rows[warm - 1]["written_at"] - job_start).total_seconds()}


def bench_pipeline(cfg: JobConfig, out: Path, prompts: int, rounds: int) -> dict[str, Any]:
    """Steady-state Ray throughput, from the moment every actor has stored its first batch (read from the rows'
    `written_at`), against the bare loop on the same batches after the same warm-up, per actor; and the share of
    that time the actors spent generating (the rest: image encoding and writing, Ray's scheduling).

    This machine's speed drifts by more than the target's margin between runs, so bare loops and pipeline jobs
    alternate, bare first and last: each job is compared with the mean of the bare loops either side of it, and
    the rates and overhead reported are those of the median round (every round's overhead is listed); start-up
    figures are the first job's. Each bare loop runs in a new process, as each job's actors do: in this one,
    after minutes of benchmarking, the same loop ran up to 13 % slower. With several actors the first
    `batch_size * num_actors` images stand for every actor's first batch: an approximation, as a fast actor may
    store its second batch before a slow one its first."""
    B, actors, warm = cfg.ray.batch_size, cfg.ray.num_actors, pipeline_warm_up(cfg, prompts)
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"images_per_prompt": 1})})  # as the loop
    batch = requests(prompts)
    source = out / "pipeline.jsonl"
    source.write_text("".join(json.dumps({"id": f"p{i}", "prompt": r.prompt, "seed": r.seed}) + "\n"
                              for i, r in enumerate(batch)))
    config = cfg.model_dump(mode="json")
    bare, jobs = [bare_rate_in_new_process(config, prompts)], []
    for i in range(rounds):
        jobs.append(pipeline_run(cfg, source, out / f"pipeline-{i}", prompts, warm))
        bare.append(bare_rate_in_new_process(config, prompts))
    bare_rates = [(before + after) / 2 for before, after in itertools.pairwise(bare)]
    overheads = [(rate * actors / job["rate"] - 1) * 100 for rate, job in zip(bare_rates, jobs, strict=True)]
    median, first = median_round(overheads), jobs[0]
    return {"bare_images_per_sec": bare_rates[median], "ray_images_per_sec": jobs[median]["rate"],
            "overhead_pct": overheads[median], "overhead_pct_rounds": overheads,
            "actor_generating_pct": jobs[median]["generating_pct"],
            "cluster_start_s": first["cluster_start_s"], "first_batch_s": first["first_batch_s"],
            "actor_startup_s": first["first_batch_s"] - B * actors / first["rate"],
            "prompts": prompts, "batch_size": B, "actors": actors, "rounds": rounds}


def write_report(out: Path, rows: list[dict[str, Any]], pipeline: dict[str, Any] | None, command: str) -> None:
    (out / "bench.json").write_text(json.dumps({"command": command, "rows": rows, "pipeline": pipeline}, indent=2))
    lines = [f"`{command}`", "", "| batch | setting | ms/image | speed-up | FLOPs ratio | efficiency |"
             " kept (≥P) | overhead ms | yardstick |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        yardstick = "–" if r["yardstick"] is None else f"{r['yardstick']:.3f}"
        lines.append(f"| {r['batch_size']} | {r['setting']}"
                     f" | {r['latency_ms_median']:.1f} | {r['speedup']:.2f} | {r['flops_ratio']:.2f} | "
                     f"{r['efficiency']:.2f} | {r['kept_ratio']:.3f} | {r['sparsevar_overhead_ms']:.2f} | "
                     f"{yardstick} |")
    if pipeline:
        lines += ["", "| pipeline | value |", "|---|---|"] + [f"| {k} | {_figure(v)} |" for k, v in pipeline.items()]
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    plot(out, rows)


def _figure(value: int | float | list[float]) -> str:
    """A pipeline figure for the markdown table: counts as they are, rates and times to 3 places, lists to 2."""
    if isinstance(value, list):
        return ", ".join(f"{v:.2f}" for v in value)
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def plot(out: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for B in sorted({r["batch_size"] for r in rows}):
        pts = [(r["flops_ratio"], r["speedup"]) for r in rows if r["batch_size"] == B]
        ax.scatter(*zip(*pts, strict=True), label=f"batch {B}")
    top = max(r["flops_ratio"] for r in rows)
    ax.plot([1, top], [1, top], "k--", label="ideal")
    ax.set(xlabel="ideal speed-up (FLOPs ratio)", ylabel="measured speed-up")
    ax.legend()
    fig.savefig(out / "speedup.png", dpi=120, bbox_inches="tight")
    fig, ax = plt.subplots(figsize=(7, 4))
    shown = [r for r in rows if r["batch_size"] == rows[0]["batch_size"]]
    width = 0.8 / len(shown)
    for j, r in enumerate(shown):
        xs = [s["stage"] + j * width for s in r["stages"]]
        ax.bar(xs, [s["latency_ms"] for s in r["stages"]], width=width, label=r["setting"])
    ax.set(xlabel="stage", ylabel="ms per image", title=f"per-stage latency, batch {rows[0]['batch_size']}")
    ax.legend(fontsize=7)
    fig.savefig(out / "stages.png", dpi=120, bbox_inches="tight")
    plt.close("all")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflows.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/bench-cpu.yaml")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--taus", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--kept", type=float, nargs="+", default=[0.5, 0.3], help="quantile kept fractions")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pipeline-prompts", type=int, default=32, metavar="N",
                        help="prompts of the Ray pipeline run; every actor's first batch is warm-up")
    parser.add_argument("--pipeline-rounds", type=int, default=3, metavar="K",
                        help="pipeline jobs (an odd number), each between two bare loops; the figures are the "
                        "median round's")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the Ray pipeline comparison")
    parser.add_argument("--speedups", action="store_true", help="also time the other speed-ups (last stages "
                        "skipped, FastVAR in its released shapes, guidance on the first stages only), alone and with "
                        "SparseVAR (docs/accelerations.md)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if not args.no_pipeline:
            pipeline_warm_up(cfg, args.pipeline_prompts)  # before minutes of loop timing
            if args.pipeline_rounds < 1 or args.pipeline_rounds % 2 == 0:
                raise ValueError(f"--pipeline-rounds {args.pipeline_rounds}: give an odd number (1, 3, 5, ...), so "
                                 "that a median round exists")
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = bench_loop(cfg, args.batch_sizes, args.taus, args.kept, args.repeats, args.speedups)
    pipeline = None
    if not args.no_pipeline:
        pipeline = bench_pipeline(cfg, out, args.pipeline_prompts, args.pipeline_rounds)
    write_report(out, rows, pipeline, "python -m workflows.bench " + " ".join(argv or sys.argv[1:]))
    print((out / "bench.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
