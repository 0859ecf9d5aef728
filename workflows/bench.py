"""Benchmark SparseVAR against dense on one config: latency, speed-up, ideal (FLOPs) speed-up, efficiency,
per-stage costs, and the Ray pipeline's overhead over the bare generation loop.

    python -m workflows.bench --config configs/bench-cpu.yaml --out bench-out

Every ratio compares figures measured in the same run. Writes DIR/bench.json, DIR/bench.md and PNG plots.
"""

import argparse
import json
import statistics
import sys
import time
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
from sparsevar.generate import ImageResult, Request, first_sparse_stage, generate
from storage.checkpoints import localize_checkpoints
from workflows.config import ConfigError, load_config

PROMPTS = held_out_captions(8)  # in the demo model's domain, so that its yardstick can judge them


def requests(n: int, offset: int = 0) -> list[Request]:
    return [Request(PROMPTS[(offset + i) % len(PROMPTS)], seed=offset + i) for i in range(n)]


def measure(backend: Backend, batch: list[Request], sv: SparseVARConfig, repeats: int,
            judge: Judge | None = None) -> dict[str, Any]:
    """Median warm latency per image and per-stage figures of one setting (one warm-up run first); with a
    judge (the demo model's yardstick), its score of the pictures against their prompts."""
    generate(backend, batch, sv, profile=True)
    runs: list[list[ImageResult]] = [generate(backend, batch, sv, profile=True) for _ in range(repeats)]
    B = len(batch)
    per_image_ms = [run[0].latency_ms / B for run in runs]
    first_sparse = first_sparse_stage(sv) or len(runs[0][0].stages) + 1
    stages = []
    for i, stage in enumerate(runs[0][0].stages):
        stages.append({
            "stage": stage.stage, "tokens": stage.tokens,
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


def settings(sv: SparseVARConfig, taus: list[float], kept: list[float]) -> list[SparseVARConfig]:
    """Dense, min-max at each τ, and quantile at each kept fraction (τ = the fraction left out)."""
    out = [sv.model_copy(update={"enabled": False})]
    out += [sv.model_copy(update={"enabled": True, "normalize": "minmax", "tau": t}) for t in taus]
    out += [sv.model_copy(update={"enabled": True, "normalize": "quantile", "tau": round(1 - k, 6)}) for k in kept]
    return out


def bench_loop(cfg: JobConfig, batch_sizes: list[int], taus: list[float], kept: list[float], repeats: int):
    torch.set_num_threads(max(1, int(cfg.ray.num_cpus_per_actor)))
    backend = build_backend(localize_checkpoints(cfg.model), cfg.sampling, cfg.runtime.device, cfg.runtime.dtype)
    judge = demo_judge(cfg.model)
    rows = []
    for B in batch_sizes:
        dense_ms = None
        for sv in settings(cfg.sparsevar, taus, kept):
            row = {"mode": "sparse" if sv.enabled else "dense", "normalize": sv.normalize if sv.enabled else None,
                   "tau": sv.tau if sv.enabled else None, "batch_size": B,
                   **measure(backend, requests(B), sv, repeats, judge)}
            dense_ms = dense_ms or row["latency_ms_median"]
            row["speedup"] = dense_ms / row["latency_ms_median"]
            row["efficiency"] = row["speedup"] / row["flops_ratio"]
            rows.append(row)
            print(f"B={B} {row['mode']:6} {row['normalize'] or '':8} tau={row['tau']} "
                  f"{row['latency_ms_median']:.0f} ms/img speedup {row['speedup']:.2f} "
                  f"ideal {row['flops_ratio']:.2f} eff {row['efficiency']:.2f}", flush=True)
    return backend, rows


def bench_pipeline(cfg: JobConfig, backend: Backend, out: Path, small: int, large: int) -> dict[str, float]:
    """Steady-state Ray throughput from two job sizes (start-up cancels in the difference) against the bare loop
    on the same prompts and batch size."""
    import ray

    from workflows.generate import connect_ray, run

    started = time.perf_counter()
    connect_ray()
    cluster_start_s = time.perf_counter() - started
    seconds = {}
    for n in (small, large):
        prompts = out / f"pipeline-{n}.jsonl"
        prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": r.prompt, "seed": r.seed}) + "\n"
                                   for i, r in enumerate(requests(n))))
        seconds[n] = run(cfg, str(prompts), str(out / f"pipeline-{n}"), None).seconds
    ray.shutdown()
    ray_rate = (large - small) / (seconds[large] - seconds[small])
    B = cfg.ray.batch_size
    batches = [requests(large)[i: i + B] for i in range(small, large, B)]
    generate(backend, batches[0], cfg.sparsevar)
    started = time.perf_counter()
    for batch in batches:
        generate(backend, batch, cfg.sparsevar)
    bare_rate = (large - small) / (time.perf_counter() - started)
    return {"bare_images_per_sec": bare_rate, "ray_images_per_sec": ray_rate,
            "overhead_pct": (bare_rate / ray_rate - 1) * 100, "cluster_start_s": cluster_start_s,
            "actor_startup_s": seconds[small] - small / ray_rate, "batch_size": B, "actors": cfg.ray.num_actors}


def write_report(out: Path, rows: list[dict[str, Any]], pipeline: dict[str, float] | None, command: str) -> None:
    (out / "bench.json").write_text(json.dumps({"command": command, "rows": rows, "pipeline": pipeline}, indent=2))
    lines = [f"`{command}`", "", "| batch | mode | normalize | τ | ms/image | speed-up | FLOPs ratio | efficiency |"
             " kept (≥P) | overhead ms | yardstick |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tau = "" if r["tau"] is None else r["tau"]
        yardstick = "–" if r["yardstick"] is None else f"{r['yardstick']:.3f}"
        lines.append(f"| {r['batch_size']} | {r['mode']} | {r['normalize'] or ''} | {tau}"
                     f" | {r['latency_ms_median']:.1f} | {r['speedup']:.2f} | {r['flops_ratio']:.2f} | "
                     f"{r['efficiency']:.2f} | {r['kept_ratio']:.3f} | {r['sparsevar_overhead_ms']:.2f} | "
                     f"{yardstick} |")
    if pipeline:
        lines += ["", "| pipeline | value |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in pipeline.items()]
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    plot(out, rows)


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
        label = "dense" if r["mode"] == "dense" else f"{r['normalize']} τ={r['tau']}"
        ax.bar(xs, [s["latency_ms"] for s in r["stages"]], width=width, label=label)
    ax.set(xlabel="stage", ylabel="ms per image", title=f"per-stage latency, batch {rows[0]['batch_size']}")
    ax.legend(fontsize=7)
    fig.savefig(out / "stages.png", dpi=120, bbox_inches="tight")
    plt.close("all")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflows.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/bench-cpu.yaml")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--taus", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--kept", type=float, nargs="+", default=[0.5, 0.3], help="quantile kept fractions")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pipeline-prompts", type=int, nargs=2, default=[8, 32], metavar=("SMALL", "LARGE"))
    parser.add_argument("--no-pipeline", action="store_true", help="skip the Ray pipeline comparison")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backend, rows = bench_loop(cfg, args.batch_sizes, args.taus, args.kept, args.repeats)
    pipeline = None if args.no_pipeline else bench_pipeline(cfg, backend, out, *args.pipeline_prompts)
    write_report(out, rows, pipeline, "python -m workflows.bench " + " ".join(argv or sys.argv[1:]))
    print((out / "bench.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
