"""Time Infinity-2B dense and with SparseVAR at 1024x1024 on one GPU: full-size architecture, random weights.

    python scripts/gpu/infinity_bench.py                          # H200: bf16, CFG, batch 1 and 8
    python scripts/gpu/infinity_bench.py --small --device cpu     # smoke run: tiny architecture, fp32 CPU

Builds the transformer and VAE of infinity_2b_reg.pth / infinity_vae_d32reg.pth and a T5 encoder of
flan-t5-xl's size directly on the device with random weights (no files), warms up, then for each batch size
runs dense and SparseVAR (τ = 0.6, P = 10, s = 16, α = 4 unless overridden) `--repeats` times through the
shared loop with device-synchronised timing. Prints median latencies, per-stage latency and kept ratio, the
measured and the ideal (FLOPs) speed-up, and peak memory; `--json` also writes them to a file.
Random weights make the kept ratios differ from the real model's; the timings of a given ratio do not.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sparsevar.backends import resolve_device  # noqa: E402
from sparsevar.backends.infinity.backend import InfinityBackend, InfinityParts  # noqa: E402
from sparsevar.backends.infinity.config import InfinityConfig  # noqa: E402
from sparsevar.backends.infinity.testing import T5_XL, TINY, offline_tokenizer, random_parts, random_t5  # noqa: E402
from sparsevar.backends.infinity.text import T5Text  # noqa: E402
from sparsevar.config import SamplingConfig, SparseVARConfig  # noqa: E402
from sparsevar.flops import flops_ratio  # noqa: E402
from sparsevar.generate import ImageResult, Request, generate  # noqa: E402

PROMPTS = ["a photo of a red fox in the snow", "a bowl of ramen on a wooden table, studio lighting",
           "an astronaut riding a horse on mars", "a watercolor painting of a lighthouse at dusk",
           "a close-up portrait of an old fisherman", "a futuristic city skyline at night, neon lights",
           "two cats sleeping on a sofa", "a field of sunflowers under a blue sky"]
NO_FILE = "(random weights)"


def build(small: bool, device: torch.device, dtype: torch.dtype, sampling: SamplingConfig) -> InfinityBackend:
    arch = TINY if small else {}
    cfg = InfinityConfig(transformer=NO_FILE, vae=NO_FILE, text_encoder=NO_FILE, **arch)
    transformer, vae = random_parts(cfg, seed=0, device=device)
    tokenizer = offline_tokenizer()
    t5_dims = {} if small else T5_XL
    t5 = random_t5(cfg.text_channels, **{"vocab": len(tokenizer), **t5_dims}, device=device)
    t5.to(torch.float16 if device.type == "cuda" else torch.float32)
    text = T5Text(tokenizer, t5, device, cfg.text_max_tokens)
    return InfinityBackend(cfg, sampling, InfinityParts(transformer, vae, text), device, dtype)


def run(backend: InfinityBackend, batch: int, sv: SparseVARConfig, repeats: int) -> list[list[ImageResult]]:
    requests = [Request(PROMPTS[i % len(PROMPTS)], seed=i) for i in range(batch)]
    generate(backend, requests, sv, profile=True)  # warm-up: kernels, allocator, caches of this shape
    return [generate(backend, requests, sv, profile=True) for _ in range(repeats)]


def summarize(runs: list[list[ImageResult]], backend: InfinityBackend) -> dict:
    first = runs[0]
    stages = []
    for i, stage in enumerate(first[0].stages):
        stages.append({
            "stage": stage.stage, "grid": f"{stage.height}x{stage.width}", "tokens": stage.tokens,
            "latency_ms": statistics.median(run[0].stages[i].latency_ms for run in runs),
            "kept_ratio": statistics.mean(img.stages[i].kept / stage.tokens for img in first),
            "overhead_ms": statistics.median(run[0].stages[i].overhead_ms for run in runs),
        })
    return {
        "batch_ms": statistics.median(run[0].latency_ms for run in runs),
        "flops_ratio": statistics.mean(
            flops_ratio(img.stages, backend.block_params, backend.dim, backend.depth) for img in first),
        "stages": stages,
    }


def report(batch: int, dense: dict, sparse: dict) -> str:
    lines = [f"== batch {batch}: dense {dense['batch_ms']:.1f} ms ({dense['batch_ms'] / batch:.1f} ms/image), "
             f"SparseVAR {sparse['batch_ms']:.1f} ms ({sparse['batch_ms'] / batch:.1f} ms/image); speed-up "
             f"{dense['batch_ms'] / sparse['batch_ms']:.2f}x, ideal (FLOPs) {sparse['flops_ratio']:.2f}x",
             f"{'stage':>5} {'grid':>7} {'tokens':>6} {'dense ms':>9} {'sparse ms':>9} {'kept':>6} {'overhead ms':>11}"]
    for d, s in zip(dense["stages"], sparse["stages"], strict=True):
        lines.append(f"{d['stage']:>5} {d['grid']:>7} {d['tokens']:>6} {d['latency_ms']:>9.2f} "
                     f"{s['latency_ms']:>9.2f} {s['kept_ratio']:>6.3f} {s['overhead_ms']:>11.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--small", action="store_true", help="tiny architecture, 7 stages up to 16x16 (a smoke run)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tau", type=float, default=0.6)
    parser.add_argument("--start-stage", type=int, default=None, help="P; default 10 (5 with --small)")
    parser.add_argument("--score-block", type=int, default=None, help="s; default 16 (2 with --small)")
    parser.add_argument("--anchor-grid", type=int, default=4)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    device, dtype = resolve_device(args.device, args.dtype)
    torch.manual_seed(0)
    started = time.perf_counter()
    backend = build(args.small, device, dtype, SamplingConfig(cfg=args.cfg))
    params = sum(p.numel() for p in backend.model.parameters()) / 1e9
    print(f"built {'tiny' if args.small else 'Infinity-2B'} ({params:.3f}B transformer params) on {device} in "
          f"{dtype} in {time.perf_counter() - started:.1f} s; "
          f"schedule {backend.schedule(1.0)}")
    start_stage = args.start_stage or (5 if args.small else 10)
    score_block = args.score_block or (2 if args.small else 16)
    sparse_cfg = SparseVARConfig(tau=args.tau, start_stage=start_stage, score_block=score_block,
                                 anchor_grid=args.anchor_grid)
    results = []
    for batch in args.batch_sizes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        dense = summarize(run(backend, batch, sparse_cfg.model_copy(update={"enabled": False}), args.repeats), backend)
        sparse = summarize(run(backend, batch, sparse_cfg, args.repeats), backend)
        print(report(batch, dense, sparse))
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        if peak is not None:
            print(f"peak GPU memory {peak:.1f} GiB")
        results.append({"batch": batch, "dense": dense, "sparse": sparse, "peak_gib": peak})
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "dtype": str(dtype),
                                               "sparsevar": sparse_cfg.model_dump(), "runs": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
