"""Load the Serve app on loopback: how latency and τ follow an open-loop load, dense against adaptive τ.

    python -m benchmarks.serve_load [--config configs/tiny.yaml] [--out docs]

Calibrates the config on this machine (as `workflows.calibrate`), starts a local Ray with the app (one replica),
measures the replica's dense capacity (images/s, closed loop), then offers open-loop Poisson arrivals with the
`openai` client: (a) `--load` times capacity, dense; (b) the same, with `serve.target_latency_ms`; (c) `--low-load`
times capacity, adaptive, which should stay dense. Each request records its send time, latency, status, τ and
kept ratio (from the answer's `metadata`); refusals (503) are counted, not retried. Writes {out}/serving.json
(the figures and every request), {out}/serving.png (latency and τ over time) and prints a markdown table. Not a
test: the figures depend on the machine and whatever else runs on it (the load average is recorded).
"""

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import openai
from ray import serve

from actors.config import JobConfig
from actors.serve import build_app
from benchmarks.cluster import free_port
from workflows.calibrate import read_prompt_sample
from workflows.calibrate import run as calibrate
from workflows.config import load_config
from workflows.generate import connect_ray

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen

APP = "sparsevar-load"


@dataclass(frozen=True)
class Record:
    """One request as the client saw it; tau and kept come from the answer's metadata (None when refused)."""

    sent_s: float  # since the phase began
    latency_ms: float
    status: int  # HTTP status; 0 when the connection failed
    tau: float | None
    kept: float | None  # kept share of the tokens of the stages SparseVAR may thin (1.0: dense)
    batch_size: int | None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--prompts", default="configs/prompts/sample.jsonl", help="cycled, with seed = request index")
    parser.add_argument("--out", default="docs", help="folder for serving.json and serving.png (default docs)")
    parser.add_argument("--load", type=float, default=2.0, help="offered load of (a) and (b), times dense capacity")
    parser.add_argument("--low-load", type=float, default=0.25, help="offered load of (c), times dense capacity")
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals in (a) and (b)")
    parser.add_argument("--low-duration", type=float, default=20.0, help="seconds of arrivals in (c)")
    parser.add_argument("--max-requests", type=int, default=150, help="at most this many requests per phase")
    parser.add_argument("--capacity-requests", type=int, default=24, help="closed-loop requests for capacity")
    parser.add_argument("--target-ms", type=float, default=None,
                        help="serve.target_latency_ms of (b) and (c); default: 6 dense image times (6 / capacity)")
    parser.add_argument("--max-ongoing", type=int, default=32,
                        help="serve.max_ongoing_requests: how long the dense queue may grow before 503s")
    parser.add_argument("--calibration", default=None, help="a calibration to reuse (default: calibrate first)")
    parser.add_argument("--taus", default="0,0.25,0.5,0.75,1", help="calibration grid")
    parser.add_argument("--seed", type=int, default=0, help="of the arrival times")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser.parse_args(argv)


def kept_ratio(metadata: dict[str, Any], start_stage: int) -> float:
    sparse = [s for s in metadata["stages"] if s["stage"] >= start_stage]
    return sum(s["kept"] for s in sparse) / sum(s["tokens"] for s in sparse)


async def send(client: openai.AsyncOpenAI, index: int, prompt: str, phase_start: float, start_stage: int) -> Record:
    sent = time.perf_counter()
    try:
        answer = await client.images.generate(prompt=prompt, extra_body={"seed": index})
    except openai.APIStatusError as exc:
        return Record(sent - phase_start, (time.perf_counter() - sent) * 1e3, exc.status_code, None, None, None)
    except openai.APIConnectionError:
        return Record(sent - phase_start, (time.perf_counter() - sent) * 1e3, 0, None, None, None)
    metadata = answer.data[0].metadata
    return Record(sent - phase_start, (time.perf_counter() - sent) * 1e3, 200, metadata["tau"],
                  kept_ratio(metadata, start_stage), metadata["batch_size"])


async def open_loop(url: str, prompts: list[str], rate: float, duration: float, max_requests: int, seed: int,
                    start_stage: int) -> list[Record]:
    """Poisson arrivals at `rate`/s for `duration` s (at most `max_requests`), each sent on time whatever the
    server's pace; returns once every answer is in."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, max_requests)
    arrivals = [t for t in np.cumsum(gaps) if t < duration]
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=300) as client:
        start = time.perf_counter()

        async def at(index: int, when: float) -> Record:
            await asyncio.sleep(max(0.0, start + when - time.perf_counter()))
            return await send(client, index, prompts[index % len(prompts)], start, start_stage)

        return list(await asyncio.gather(*(at(i, t) for i, t in enumerate(arrivals))))


async def closed_loop(url: str, prompts: list[str], requests: int, concurrency: int, start_stage: int) -> float:
    """Images/s with `concurrency` requests always outstanding: the replica's capacity at full batches."""
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=300) as client:
        todo = iter(range(requests))
        start = time.perf_counter()

        async def worker() -> list[Record]:
            return [await send(client, i, prompts[i % len(prompts)], start, start_stage) for i in todo]

        done = [r for records in await asyncio.gather(*(worker() for _ in range(concurrency))) for r in records]
        elapsed = time.perf_counter() - start
    return sum(r.status == 200 for r in done) / elapsed


def summary(records: list[Record], rate: float, target_ms: float) -> dict[str, Any]:
    ok = [r for r in records if r.status == 200]
    latency = np.array([r.latency_ms for r in ok]) if ok else np.array([np.nan])
    taus = [r.tau or 0.0 for r in ok]
    span = max(r.sent_s + r.latency_ms / 1e3 for r in records) if records else 1.0
    p95 = float(np.percentile(latency, 95))
    return {
        "requests": len(records), "ok": len(ok), "refused_503": sum(r.status == 503 for r in records),
        "other_errors": sum(r.status not in (200, 503) for r in records),
        "offered_per_s": rate, "served_images_per_s": len(ok) / span,
        "p50_ms": float(np.percentile(latency, 50)), "p95_ms": p95, "p99_ms": float(np.percentile(latency, 99)),
        "p95_over_target": p95 / target_ms,
        "tau_min": min(taus, default=None), "tau_mean": float(np.mean(taus)) if taus else None,
        "tau_max": max(taus, default=None),
        "kept_mean": float(np.mean([r.kept for r in ok])) if ok else None,
        "dense_answers": sum(not r.tau for r in ok),
    }


def table(phases: dict[str, dict[str, Any]]) -> str:
    lines = ["| phase | offered/s | sent | 200 | 503 | served img/s | p50 ms | p95 ms | p95 / target | τ min-mean-max "
             "| kept |", "|" + "---|" * 11]
    for name, s in phases.items():
        taus = "-".join(f"{s[key]:.2f}" if s[key] is not None else "?" for key in ("tau_min", "tau_mean", "tau_max"))
        kept = f"{s['kept_mean']:.2f}" if s["kept_mean"] is not None else "-"
        lines.append(f"| {name} | {s['offered_per_s']:.2f} | {s['requests']} | {s['ok']} | {s['refused_503']} "
                     f"| {s['served_images_per_s']:.2f} | {s['p50_ms']:.0f} | {s['p95_ms']:.0f} "
                     f"| {s['p95_over_target']:.2f} | {taus} | {kept} |")
    return "\n".join(lines)


def plot(records: dict[str, list[Record]], target_ms: float, path: Path) -> None:
    fig, (lat_ax, tau_ax) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for (name, rows), color in zip(records.items(), ("tab:red", "tab:blue", "tab:green"), strict=False):
        ok = [r for r in rows if r.status == 200]
        refused = [r for r in rows if r.status != 200]
        lat_ax.plot([r.sent_s for r in ok], [r.latency_ms / 1e3 for r in ok], ".", color=color, label=name)
        lat_ax.plot([r.sent_s for r in refused], [r.latency_ms / 1e3 for r in refused], "x", color=color, ms=4)
        tau_ax.plot([r.sent_s for r in ok], [r.tau or 0.0 for r in ok], ".", color=color, label=name)
    lat_ax.axhline(target_ms / 1e3, color="k", ls="--", lw=1, label="target (b, c)")
    lat_ax.axhline(1.2 * target_ms / 1e3, color="k", ls=":", lw=1, label="target + 20%")
    lat_ax.set_yscale("log")
    lat_ax.set_ylabel("latency, s (x: 503)")
    lat_ax.legend(fontsize=8, loc="upper left")
    tau_ax.set_ylabel("τ (0: dense)")
    tau_ax.set_xlabel("send time, s since the phase began")
    tau_ax.set_ylim(-0.05, 1.05)
    fig.suptitle("One CPU replica of the tiny demo model under open-loop load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def deploy(cfg: JobConfig) -> None:
    serve.run(build_app(cfg), name=APP, route_prefix="/")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_avg = [os.getloadavg()]
    base_overrides = [*args.overrides, "serve.num_replicas=1", f"serve.max_ongoing_requests={args.max_ongoing}"]
    base = load_config(args.config, base_overrides)
    calibration = args.calibration
    if calibration is None:
        calibration = tempfile.mkdtemp(prefix="serve-load-calibration-")
        calibrate(base, args.prompts, calibration, 8, [float(t) for t in args.taus.split(",")], 2)
    prompts = [request.prompt for request in read_prompt_sample(args.prompts, 64)]
    start_stage = base.sparsevar.start_stage
    connect_ray()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        deploy(load_config(args.config, [*base_overrides, "sparsevar.enabled=false"]))
        capacity = asyncio.run(closed_loop(url, prompts, args.capacity_requests, 2 * base.serve.max_batch_size,
                                           start_stage))
        target_ms = args.target_ms or 6000.0 / capacity
        print(f"dense capacity: {capacity:.2f} images/s; target {target_ms:.0f} ms", flush=True)
        high, low = args.load * capacity, args.low_load * capacity
        records = {f"(a) dense, {args.load:g}x": asyncio.run(
            open_loop(url, prompts, high, args.duration, args.max_requests, args.seed, start_stage))}
        deploy(load_config(args.config, [*base_overrides, f"serve.target_latency_ms={target_ms}",
                                         f"serve.calibration={calibration}"]))
        records[f"(b) adaptive, {args.load:g}x"] = asyncio.run(
            open_loop(url, prompts, high, args.duration, args.max_requests, args.seed, start_stage))
        records[f"(c) adaptive, {args.low_load:g}x"] = asyncio.run(
            open_loop(url, prompts, low, args.low_duration, args.max_requests, args.seed + 1, start_stage))
    finally:
        serve.shutdown()
    load_avg.append(os.getloadavg())
    rates = [high, high, low]
    phases = {name: summary(rows, rate, target_ms) for (name, rows), rate in zip(records.items(), rates, strict=True)}
    text = table(phases)
    print(text)
    figures = {"config": args.config, "overrides": base_overrides, "dense_capacity_images_per_s": capacity,
               "target_latency_ms": target_ms, "load": args.load, "low_load": args.low_load,
               "cpu_count": os.cpu_count(), "load_average_start_end": load_avg, "phases": phases, "table": text,
               "requests": {name: [asdict(r) for r in rows] for name, rows in records.items()}}
    (out / "serving.json").write_text(json.dumps(figures, indent=1) + "\n")
    plot(records, target_ms, out / "serving.png")
    print(f"wrote {out / 'serving.json'} and {out / 'serving.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
