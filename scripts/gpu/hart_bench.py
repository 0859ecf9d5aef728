"""Time HART-0.7B dense and with SparseVAR at 1024x1024 on one GPU: full-size architecture, random weights.

    python scripts/gpu/hart_bench.py                          # H200: bf16, CFG 4.5, batch 1 and 8
    python scripts/gpu/hart_bench.py --small --device cpu     # smoke run: tiny architecture, fp32 CPU

Builds HART-0.7B's transformer and diffusion head, its tokenizer decoder and a Qwen2 text encoder of
Qwen2-1.5B's size directly on the device with random weights (no files; the text side uses an offline byte-level
tokenizer, so prompts are padded to the same 300 tokens but the system prompt is longer than Qwen's BPE makes it),
warms up, then for each batch size runs dense and SparseVAR (τ = 0.6, P = 11, s = 8, α = 4, fill code unless
overridden) `--repeats` times through the shared loop with device-synchronised timing. Prints median latencies,
per-stage latency and kept ratio, the measured and the ideal (FLOPs) speed-up, and peak memory; `--json` also
writes them to a file. Random weights make the kept ratios differ from the real model's; the timings of a given
ratio do not.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from infinity_bench import PROMPTS, report, summarize  # noqa: E402

from sparsevar.backends import resolve_device  # noqa: E402
from sparsevar.backends.hart.backend import HartBackend  # noqa: E402
from sparsevar.backends.hart.config import HartConfig  # noqa: E402
from sparsevar.backends.hart.folders import TokenizerArch, TransformerArch  # noqa: E402
from sparsevar.backends.hart.testing import TINY_ARCH, TINY_TOK, TextArch, random_parts  # noqa: E402
from sparsevar.config import SamplingConfig, SparseVARConfig  # noqa: E402
from sparsevar.generate import ImageResult, Request, generate  # noqa: E402

NO_FOLDER = "(random weights)"


def build(small: bool, device: torch.device, dtype: torch.dtype, sampling: SamplingConfig) -> HartBackend:
    arch, tok = (TINY_ARCH, TINY_TOK) if small else (TransformerArch(), TokenizerArch())
    text = TextArch(hidden_size=arch.context_dim) if small else TextArch.qwen2_1_5b()
    parts = random_parts(arch, tok, text, device)
    parts.text.model.to(dtype)
    cfg = HartConfig(llm=NO_FOLDER, tokenizer=NO_FOLDER, text_encoder=NO_FOLDER)
    return HartBackend(cfg, sampling, parts, device, dtype)


def run(backend: HartBackend, batch: int, sv: SparseVARConfig, repeats: int) -> list[list[ImageResult]]:
    requests = [Request(PROMPTS[i % len(PROMPTS)], seed=i) for i in range(batch)]
    generate(backend, requests, sv, profile=True)  # warm-up: kernels, allocator, caches of this shape
    return [generate(backend, requests, sv, profile=True) for _ in range(repeats)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--small", action="store_true", help="tiny architecture, 6 stages up to 8x8 (a smoke run)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tau", type=float, default=0.6)
    parser.add_argument("--start-stage", type=int, default=None, help="P; default 11 (4 with --small)")
    parser.add_argument("--score-block", type=int, default=None, help="s; default 8 (2 with --small)")
    parser.add_argument("--anchor-grid", type=int, default=4)
    parser.add_argument("--fill", default="code", choices=["code", "logits"])
    parser.add_argument("--cfg", type=float, default=4.5)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    device, dtype = resolve_device(args.device, args.dtype)
    started = time.perf_counter()
    backend = build(args.small, device, dtype, SamplingConfig(cfg=args.cfg, top_p=1.0))
    params = sum(p.numel() for p in backend.model.parameters()) / 1e9
    print(f"built {'tiny HART' if args.small else 'HART-0.7B'} ({params:.3f}B transformer and diffusion-head params)"
          f" on {device} in {dtype} in {time.perf_counter() - started:.1f} s; schedule {backend.schedule(1.0)}")
    sparse_cfg = SparseVARConfig(tau=args.tau, start_stage=args.start_stage or (4 if args.small else 11),
                                 score_block=args.score_block or (2 if args.small else 8),
                                 anchor_grid=args.anchor_grid, fill=args.fill)
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
