"""Time SparseVAR against dense on the full-size Infinity-2B and HART-0.7B architectures at 1024², random weights.

    scripts/gpu/run.sh OUTDIR                   # the committed one-call check: GPU smoke, then these rows
    python scripts/gpu/bench.py                 # one GPU (H200): bf16, CFG, batch 1, 8, 16
    python scripts/gpu/bench.py --smoke         # CPU smoke run: tiny architectures and schedules, < 1 minute

Each model is built directly on the device with random weights (no files): the transformer, VAE or tokenizer
decoder and a text encoder of the real size (flan-t5-xl's, Qwen2-1.5B's). Sampling and the SparseVAR defaults
come from configs/infinity-2b.yaml and configs/hart-0.7b.yaml (CUDA graphs are switched per row here). For every
model, batch and mode (eager; with --cuda-graphs, graphs too): dense, then the config's SparseVAR with each
`--normalize` (quantile is the issue's target: for Infinity-2B τ = 0.6, P = 10, s = 16, α = 4). The settings of
a group are warmed up, then timed in --runs interleaved rounds through the shared loop with device
synchronisation, so that drift falls on all alike. Reported: median latency per image, speed-up over the dense
row of the same group, the spec's FLOPs ratio (sparsevar.flops), efficiency (speed-up / FLOPs ratio), kept ratio
from stage P, SparseVAR's own time (scoring, gathering, filling) and peak GPU memory (both models' weights
included). Both models are built first and the batches run in turn (eager, then graphs), so a run cut short, or
stopped by --deadline-s, still covers both. --out (JSON, per-stage figures included) and the markdown table
beside it (.md) are rewritten after each group. Random weights make min-max kept ratios differ from the real
models'; quantile keeps the same fraction whatever the weights. With --unpacked, every sparse setting at
batch > 1 also runs with its padded stages padded rather than packed (`sparsevar.packing`), so the packing's
gain is a ratio from one run.
"""

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from sparsevar import packing  # noqa: E402
from sparsevar.backends import resolve_device  # noqa: E402
from sparsevar.config import SamplingConfig, SparseVARConfig, SpeedupConfig  # noqa: E402
from sparsevar.flops import flops_ratio  # noqa: E402
from sparsevar.generate import NO_SPEEDUPS, ImageResult, Request, first_sparse_stage, generate  # noqa: E402
from sparsevar.group_norm import GroupNorm  # noqa: E402
from sparsevar.speedups import Setting, compared  # noqa: E402

PROMPTS = ["a photo of a red fox in the snow", "a bowl of ramen on a wooden table, studio lighting",
           "an astronaut riding a horse on mars", "a watercolor painting of a lighthouse at dusk",
           "a close-up portrait of an old fisherman", "a futuristic city skyline at night, neon lights",
           "two cats sleeping on a sofa", "a field of sunflowers under a blue sky"]
NO_FILE = "(random weights)"
MODELS = {"infinity-2b": "configs/infinity-2b.yaml", "hart-0.7b": "configs/hart-0.7b.yaml"}
WARMUP = 1  # generations before timing each setting (none in a smoke run): kernels, allocator, shape caches
SMOKE_STAGES = {"infinity-2b": dict(start_stage=5, score_block=2), "hart-0.7b": dict(start_stage=4, score_block=2)}


def build_infinity(model: dict, sampling: SamplingConfig, smoke: bool, device, dtype):
    from sparsevar.backends.infinity.backend import InfinityBackend, InfinityParts
    from sparsevar.backends.infinity.config import InfinityConfig
    from sparsevar.backends.infinity.testing import T5_XL, TINY, offline_tokenizer, random_parts, random_t5
    from sparsevar.backends.infinity.text import T5Text

    files = dict(transformer=NO_FILE, vae=NO_FILE, text_encoder=NO_FILE, cuda_graphs=False)  # rows switch graphs
    cfg = InfinityConfig(**{**(TINY if smoke else model), **files})
    transformer, vae = random_parts(cfg, seed=0, device=device)
    tokenizer = offline_tokenizer()
    t5 = random_t5(cfg.text_channels, **{"vocab": len(tokenizer), **({} if smoke else T5_XL)}, device=device)
    t5.to(torch.float16 if device.type == "cuda" else torch.float32)  # as T5Text.load
    text = T5Text(tokenizer, t5, device, cfg.text_max_tokens)
    return InfinityBackend(cfg, sampling, InfinityParts(transformer, vae, text), device, dtype)


def build_hart(model: dict, sampling: SamplingConfig, smoke: bool, device, dtype):
    from sparsevar.backends.hart.backend import HartBackend
    from sparsevar.backends.hart.config import HartConfig
    from sparsevar.backends.hart.folders import TokenizerArch, TransformerArch
    from sparsevar.backends.hart.testing import TINY_ARCH, TINY_TOK, TextArch, random_parts

    cfg = HartConfig(**{**model, "llm": NO_FILE, "tokenizer": NO_FILE, "text_encoder": NO_FILE, "cuda_graphs": False})
    arch, tok = (TINY_ARCH, TINY_TOK) if smoke else (TransformerArch(), TokenizerArch())
    text = TextArch(hidden_size=arch.context_dim) if smoke else TextArch.qwen2_1_5b()
    parts = random_parts(arch, tok, text, device, system_prompt=cfg.system_prompt)
    parts.text.model.to(dtype)
    return HartBackend(cfg, sampling, parts, device, dtype)


def settings(name: str, sv: SparseVARConfig, smoke: bool, normalize: list[str], backend=None) -> list[Setting]:
    """Dense, then the config's SparseVAR with each of `normalize`'s score normalisations (the smoke run moves P
    and s into range); with a backend (--speedups), the other speed-ups on its schedule and depth, alone and with
    the first of those SparseVARs (`sparsevar.speedups.compared`)."""
    sv = sv.model_copy(update=SMOKE_STAGES[name] if smoke else {})
    out = [("dense", sv.model_copy(update={"enabled": False}), NO_SPEEDUPS)]
    out += [(f"{n} τ={sv.tau}", sv.model_copy(update={"normalize": n}), NO_SPEEDUPS) for n in normalize]
    if backend is not None:
        out += compared(sv.model_copy(update={"normalize": normalize[0]}), len(backend.schedule(1.0)), backend.depth)
    return out


def graph_ready(speedups: SpeedupConfig) -> bool:
    """FastVAR and the guidance cut change a generation's tensors mid-way: eager rows only (a clear error else)."""
    return not speedups.fastvar.prune and speedups.guidance_stages is None


class PhaseUpsample(torch.nn.Module):
    """Nearest 2x upsampling then a 3x3 convolution (padding 1), as one 2x2 convolution of the low-resolution
    input with four output phases and a pixel interleave: the same sums, with 16 rather than 36 multiply-adds per
    input channel and low-resolution pixel, and no upsampled copy of the input. Row phase 0 of an output pixel reads
    input rows (i-1, i) with kernel rows (w0, w1 + w2), phase 1 rows (i, i+1) with (w0 + w1, w2); columns alike."""

    def __init__(self, conv: torch.nn.Conv2d) -> None:
        super().__init__()
        w = conv.weight.detach()
        rows = [torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], 2),
                torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], 2)]
        kernels = [torch.stack([r[..., 0], r[..., 1] + r[..., 2]], -1) if b == 0
                   else torch.stack([r[..., 0] + r[..., 1], r[..., 2]], -1) for r in rows for b in (0, 1)]
        self.out_channels = w.shape[0]
        self.conv = torch.nn.Conv2d(w.shape[1], 4 * w.shape[0], 2).to(w.device, w.dtype)
        self.conv.weight.data.copy_(torch.cat(kernels))
        self.conv.bias.data.copy_(conv.bias.detach().repeat(4))

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x_BCHW.shape
        y = self.conv(torch.nn.functional.pad(x_BCHW, (1, 1, 1, 1))).view(B, 2, 2, self.out_channels, H + 1, W + 1)
        rows = [torch.stack([y[:, a, b, :, a:a + H, b:b + W] for b in (0, 1)], -1) for a in (0, 1)]
        last = x_BCHW.is_contiguous(memory_format=torch.channels_last)
        out = torch.stack(rows, -3).reshape(B, self.out_channels, 2 * H, 2 * W)
        return out.contiguous(memory_format=torch.channels_last if last else torch.contiguous_format)


def phase_upsampled(decoder: torch.nn.Module) -> torch.nn.Module:
    """The decoder with every upsampling level's (nearest 2x, 3x3 conv) replaced by a PhaseUpsample."""
    for level in decoder.up:
        if hasattr(level, "upsample"):
            level.upsample = PhaseUpsample(level.upsample.conv.conv)
    return decoder


def torch_group_norms(decoder: torch.nn.Module) -> torch.nn.Module:
    """The decoder with PyTorch's own GroupNorm kernel, as before `sparsevar.group_norm` (the A/B of its gain)."""
    for module in decoder.modules():
        if isinstance(module, GroupNorm):
            module.__class__ = torch.nn.GroupNorm
    return decoder


def bf16_convs(decoder: torch.nn.Module) -> torch.nn.Module:
    """The decoder with its convolution weights stored in bf16, as autocast casts them (norms stay fp32)."""
    for module in decoder.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.to(torch.bfloat16)
    return decoder


def decode_experiment(backend, runs: int, compile_decoder: bool) -> dict:
    """Infinity's 1024² VAE decode of one image, on the same random codes, as the backend runs it (NCHW, fp32
    weights under bf16 autocast) and in variants: the decoder in channels_last (cuDNN's fast layout for bf16
    convolutions), that with phase-split upsampling (PhaseUpsample), and on a GPU both with their convolution
    weights stored in bf16 (autocast casts them at every call; norms stay fp32) and, with `compile_decoder`, the
    bf16 one torch.compile'd; then three of them again with cuDNN's autotuner on (`cudnn.benchmark`). Each: median
    ms, the largest pixel difference from the backend's way, and the kernels that took most of one decode's time;
    also whether GroupNorm keeps channels_last. Variants run on copies: the backend is left as it was."""
    import copy

    device = backend.device
    H, W = backend._vae_grid(*backend.schedule(1.0)[-1])
    f_BdHW = torch.randn(1, backend.cfg.vae_bits, H, W, device=device, generator=torch.Generator(device).manual_seed(0))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def decode(decoder, layout: torch.memory_format) -> torch.Tensor:
        with torch.inference_mode(), backend._autocast():
            return decoder(f_BdHW.contiguous(memory_format=layout)).clamp(-1, 1).float()

    reference = decode(backend.vae.decoder, torch.contiguous_format)

    def timed(decoder, layout: torch.memory_format) -> dict:
        times = []
        for _ in range(runs + 1):  # the first one warms up (and compiles)
            sync()
            started = time.perf_counter()
            rgb = decode(decoder, layout)
            sync()
            times.append((time.perf_counter() - started) * 1e3)
        return {"ms": statistics.median(times[1:]), "first_ms": times[0],
                "max_abs_diff_255": float((rgb - reference).abs().max()) * 127.5}

    def profile(decoder, layout: torch.memory_format) -> list[tuple[str, float]]:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        cuda = device.type == "cuda"
        with profiler(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            decode(decoder, layout)
            sync()
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:8]
        return [(e.key[:80], round(getattr(e, key) / 1e3, 2)) for e in events]

    last = torch.channels_last
    channels_last = copy.deepcopy(backend.vae.decoder).to(memory_format=last)
    nchw = torch.contiguous_format
    variants = {"nchw": (backend.vae.decoder, nchw), "channels_last": (channels_last, last),
                "nchw_torch_group_norm": (torch_group_norms(copy.deepcopy(backend.vae.decoder)), nchw)}
    phases = phase_upsampled(copy.deepcopy(channels_last))  # kernel sums in fp32
    variants["channels_last_phase_upsample"] = phases, last
    if device.type == "cuda":
        bf16 = bf16_convs(copy.deepcopy(channels_last))
        variants["channels_last_bf16_convs"] = bf16, last
        variants["channels_last_bf16_convs_phase_upsample"] = bf16_convs(copy.deepcopy(phases)), last
        if compile_decoder:
            variants["channels_last_bf16_convs_compiled"] = torch.compile(bf16), last
    results: dict[str, dict] = {}
    for name, (decoder, layout) in variants.items():  # all timed before any profiling, which may slow what follows
        try:
            results[name] = timed(decoder, layout)
        except Exception as exc:  # noqa: BLE001 - one variant's failure (a compile) leaves the others' figures
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    if device.type == "cuda":  # cuDNN's autotuner, against its heuristics above: every image has the same shapes
        benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            for name in ("nchw", "nchw_torch_group_norm", "channels_last_bf16_convs"):
                results[f"{name}_cudnn_benchmark"] = timed(*variants[name])
        finally:
            torch.backends.cudnn.benchmark = benchmark
    for name, (decoder, layout) in variants.items():
        if "error" not in results[name]:
            results[name]["top_kernels"] = profile(decoder, layout)
    # GroupNorm may give NCHW back for a channels_last input: then each norm costs two layout conversions
    norm = channels_last.mid.block_1.norm1
    with torch.inference_mode(), backend._autocast():
        probe = torch.zeros(1, norm.norm.num_channels, 8, 8, device=device).contiguous(memory_format=last)
        results["channels_last"]["group_norm_keeps_channels_last"] = norm(probe).is_contiguous(memory_format=last)
    return results


def batch_of(size: int, run: int) -> list[Request]:
    """A batch of the run-th generation: prompts rotated and seeds moved every run, so that kept counts (and CUDA
    graph keys) vary as in a real job."""
    return [Request(PROMPTS[(i + run) % len(PROMPTS)], seed=1000 * run + i) for i in range(size)]


def measure(backend, batch: int, variants: list[tuple[Setting, bool]], graphs: bool, warmup: int,
            runs: int) -> list[dict]:
    """The figures of each (setting, packed) variant of one model, batch and mode, from `runs` rounds that run
    every variant once in turn, so that a drift in the machine's speed falls on all of them alike.

    Warm-up first: eagerly, `warmup` generations of other batches; with CUDA graphs, every timed batch twice (its
    first sight runs eagerly, the second captures), so that the rounds replay, as a long job does once its
    shapes have been seen. A graph row checks that its replays give the images of the first, eager sight.
    """
    device = backend.device
    counters = getattr(backend, "graphs", None)
    reference: list[list[ImageResult] | None] = []
    for (_, sv, speedups), pack in variants:
        with packed(pack):
            for k in range(1, warmup + 1):
                generate(backend, batch_of(batch, -k), sv, speedups)
            first = [generate(backend, batch_of(batch, run), sv, speedups)
                     for run in range(1, runs + 1)] if graphs else []
            for run in range(1, runs + 1) if graphs else ():
                generate(backend, batch_of(batch, run), sv, speedups)
        reference.append(first[0] if first else None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    results: list[list[list[ImageResult]]] = [[] for _ in variants]
    timed = [[0, 0] for _ in variants]  # while timing: graph captures (each costs a sync) and replays
    for run in range(1, runs + 1):
        for i, ((_, sv, speedups), pack) in enumerate(variants):
            before = (counters.captures, counters.replays) if counters else (0, 0)
            with packed(pack):
                results[i].append(generate(backend, batch_of(batch, run), sv, speedups, profile=True))
            if counters:
                timed[i][0] += counters.captures - before[0]
                timed[i][1] += counters.replays - before[1]
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return [figures(backend, batch, sv, results[i], reference[i], timed[i] if counters else None, peak_gib)
            for i, ((_, sv, _), _) in enumerate(variants)]


def figures(backend, batch: int, sv: SparseVARConfig, results: list[list[ImageResult]],
            reference: list[ImageResult] | None, timed: list[int] | None, peak_gib: float | None) -> dict:
    """Median per-image latency and the other figures of one variant, from its timed generations."""
    images = results[0]
    same = None if reference is None else all(
        (a.pixels_HWC == b.pixels_HWC).all() for a, b in zip(reference, images, strict=True))
    first = first_sparse_stage(sv) or len(images[0].stages) + 1
    late = [s for img in images for s in img.stages if s.stage >= first]
    stages = [{"stage": s.stage, "grid": f"{s.height}x{s.width}", "tokens": s.tokens,
               "latency_ms": statistics.median(run[0].stages[i].latency_ms for run in results) / batch,
               "kept_ratio": statistics.mean(img.stages[i].kept / s.tokens for img in images),
               "overhead_ms": statistics.median(run[0].stages[i].overhead_ms for run in results) / batch}
              for i, s in enumerate(images[0].stages)]  # per image
    return {
        "latency_ms": statistics.median(run[0].latency_ms for run in results) / batch,
        "text_ms": statistics.median(run[0].text_ms for run in results) / batch,
        "decode_ms": statistics.median(run[0].decode_ms for run in results) / batch,
        "flops_ratio": statistics.mean(flops_ratio(img.stages, backend.block_params, backend.dim, backend.depth)
                                       for img in images),
        "kept_ratio": sum(s.kept for s in late) / sum(s.tokens for s in late) if late else 1.0,
        "overhead_ms": sum(s["overhead_ms"] for s in stages),
        "peak_gib": peak_gib,  # the largest of the variants measured together
        "stages": stages,
        "same_images_as_first_run": same,  # graph rows: replays against the first, eager sight; else None
        "graph_captures_replays_timed": timed,
    }


@contextmanager
def packed(enabled: bool) -> Iterator[None]:
    """Eager padded stages packed as the backends do (`sparsevar.packing`), or run padded, for an A/B."""
    threshold = packing.MIN_PADDING_TO_PACK
    packing.MIN_PADDING_TO_PACK = threshold if enabled else 1.0  # 1.0: no stage is ever packed
    try:
        yield
    finally:
        packing.MIN_PADDING_TO_PACK = threshold


def setting(row: dict) -> str:
    return row["setting"] + (" graphs" if row.get("graphs") else "") + (" unpacked" if row["packed"] is False else "")


def table(rows: list[dict]) -> str:
    lines = ["| model | batch | setting | ms/image | text ms | decode ms | speed-up | vs eager dense | FLOPs ratio "
             "| efficiency | kept (≥P) | overhead ms/image | peak GiB |", "|---" * 13 + "|"]
    for r in rows:
        peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(f"| {r['model']} | {r['batch']} | {setting(r)} | {r['latency_ms']:.1f} | {r['text_ms']:.1f} "
                     f"| {r['decode_ms']:.1f} | {r['speedup']:.2f} | {r['speedup_vs_eager_dense']:.2f} "
                     f"| {r['flops_ratio']:.2f} | {r['efficiency']:.2f} | {r['kept_ratio']:.3f} "
                     f"| {r['overhead_ms']:.2f} | {peak} |")
    return "\n".join(lines)


def compile_blocks(backend) -> None:
    """torch.compile each transformer block (regional compilation: identical blocks share the compiled code).

    The key/value cache's bookkeeping stays eager (a graph break); shapes are dynamic, so graphs are compiled per
    kind of stage (a single token or many, dense or with padding), not per stage: a few minutes of warm-up.
    """
    import torch.fx.experimental._config as fx_config

    from sparsevar.attention import KVCache

    fx_config.use_duck_shape = False  # equal sizes in one call (batch rows, heads) must not become guards
    torch._dynamo.config.cache_size_limit = 64
    KVCache.extend = torch.compiler.disable(KVCache.extend)
    for block in backend.model.blocks:
        block.compile(dynamic=True)


def heading(meta: dict) -> str:
    return (f"{meta['device']}, {meta['dtype']}, CFG on, median of {meta['runs']} interleaved rounds after "
            f"{meta['warmup']} warm-up generation a setting (graph rows: every timed batch seen twice first)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batches", type=int, nargs="+", help="default 1 8 16 (smoke: 1 2)")
    parser.add_argument("--runs", type=int, help="timed generations per setting, after one warm-up; default 3 "
                        "(smoke: 1, no warm-up)")
    parser.add_argument("--out", default="gpu-bench.json", help="JSON written after every row")
    parser.add_argument("--compile", action="store_true",
                        help="experimental: torch.compile the transformer blocks (minutes of warm-up)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="also time every setting of the models that support it with `cuda_graphs` (two "
                        "warm-up generations: a first run, then the capture), against the dense row of that mode")
    parser.add_argument("--decode-experiment", action="store_true",
                        help="time Infinity's VAE decode of one image in NCHW, channels_last, with bf16 conv "
                        "weights (and with --compile, compiled), with each one's top kernels")
    parser.add_argument("--unpacked", action="store_true",
                        help="at batch > 1, also time every sparse setting with its padded stages run padded (no "
                        "packing), eagerly, against the packed rows of the same run")
    parser.add_argument("--normalize", nargs="+", choices=["quantile", "minmax"], default=["quantile", "minmax"],
                        help="the sparse settings timed after dense: the config's SparseVAR with these score "
                        "normalisations (quantile is the targets' setting)")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="start no new row after this many seconds from the start; the table and JSON keep "
                        "what was measured (rows run batch by batch, eager then graphs)")
    parser.add_argument("--speedups", action="store_true", help="also the other speed-ups (docs/accelerations.md): "
                        "eager rows only where they change tensors mid-way (FastVAR, the guidance cut)")
    parser.add_argument("--smoke", action="store_true", help="tiny architectures and schedules, for a CPU check")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    batches = args.batches or ([1, 2] if args.smoke else [1, 8, 16])
    runs, warmup = args.runs or (1 if args.smoke else 3), 0 if args.smoke else WARMUP
    device, dtype = resolve_device(args.device)
    if args.smoke and device.type == "cpu":
        torch.set_num_threads(1)  # as a generation actor; on a busy 2-core machine two threads take 7x longer
    started = time.perf_counter()
    rows: list[dict] = []
    meta = {"command": " ".join(["python scripts/gpu/bench.py", *(sys.argv[1:] if argv is None else argv)]),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
            "dtype": str(dtype), "torch": torch.__version__, "runs": runs, "warmup": warmup, "compile": args.compile,
            "cuda_graphs": args.cuda_graphs}

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

    def save() -> None:  # after every row, so that a run cut short keeps what it measured: JSON and markdown
        Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=1))
        Path(args.out).with_suffix(".md").write_text(f"{heading(meta)}\n\n{table(rows)}\n")

    backends = {}  # all built first, then batch by batch, so that a run cut short still covers every model
    for name in args.models:
        config = yaml.safe_load((REPO / MODELS[name]).read_text())
        model = {k: v for k, v in config["model"].items() if k != "backend"}
        torch.manual_seed(0)
        build = build_infinity if name.startswith("infinity") else build_hart
        backend = build(model, SamplingConfig(**config["sampling"]), args.smoke, device, dtype)
        if args.compile:
            compile_blocks(backend)
        backends[name] = backend, settings(name, SparseVARConfig(**config["sparsevar"]), args.smoke, args.normalize,
                                           backend if args.speedups else None)
        params = sum(p.numel() for p in backend.model.parameters()) / 1e9
        log(f"built {name}{' (smoke)' if args.smoke else ''}: {params:.3f}B transformer params, {dtype}, "
            f"{len(backend.schedule(1.0))} stages up to {backend.schedule(1.0)[-1]}")
    if device.type == "cuda":
        log(f"{torch.cuda.memory_allocated(device) / 2**30:.1f} GiB allocated for the models")
    if args.decode_experiment and "infinity-2b" in backends:
        try:  # an experiment: if it fails, the rows still run
            meta["decode_experiment"] = decode_experiment(backends["infinity-2b"][0], max(runs, 3), args.compile)
        except Exception as exc:  # noqa: BLE001 - recorded in the report
            meta["decode_experiment_error"] = f"{type(exc).__name__}: {exc}"
        for variant, result in meta.get("decode_experiment", {}).items():
            log(f"infinity-2b VAE decode of one image, {variant}: {result}")
    eager_dense_ms: dict[tuple[str, int], float] = {}
    # Batch by batch, eager rows before graph rows, so that a run cut at its deadline has both modes of the first
    # batches. A failing capture can leave PyTorch's allocator unusable, so the GPU smoke run (scripts/gpu/run.sh)
    # captures first; here an error ends that model's graph rows and the next model's are still tried (whatever
    # they report then is recorded next to the first error).
    modes = [False, True] if args.cuda_graphs else [False]
    for batch, graphs, (name, (backend, svs)) in itertools.product(batches, modes, backends.items()):
        if (graphs and not hasattr(backend, "use_cuda_graphs")) or meta.get(f"{name}_graph_error"):
            continue
        try:
            if graphs:
                backend.use_cuda_graphs(True)
            can_pack = batch > 1 and not graphs  # graphs run padded shapes; a single image has none
            runnable = [s for s in svs if not graphs or graph_ready(s[2])]
            variants = [(s, p) for s in runnable for p in ([True, False] if args.unpacked and can_pack
                                                             and s[1].enabled and s[2] == NO_SPEEDUPS else [True])]
            left = args.deadline_s is None or time.perf_counter() - started < args.deadline_s
            if not left:
                meta.setdefault("not_run_past_deadline", []).append(f"{name} B={batch} graphs={graphs}")
                continue
            for ((label, sv, speedups), pack), measured in zip(
                    variants, measure(backend, batch, variants, graphs, warmup, runs), strict=True):  # dense first
                row = {"model": name, "batch": batch, "graphs": graphs, "setting": label,
                       "packed": pack if can_pack and sv.enabled else None,  # None: nothing to pack
                       "mode": "sparse" if sv.enabled else "dense",
                       "normalize": sv.normalize if sv.enabled else None,
                       "tau": sv.tau if sv.enabled else None, "sparsevar": sv.model_dump(),
                       "speedups": speedups.model_dump(), **measured}
                if label == "dense":
                    dense_ms = row["latency_ms"]
                    eager_dense_ms.setdefault((name, batch), dense_ms)
                row["speedup"] = dense_ms / row["latency_ms"]
                row["speedup_vs_eager_dense"] = eager_dense_ms[name, batch] / row["latency_ms"]
                row["efficiency"] = row["speedup"] / row["flops_ratio"]
                rows.append(row)
                log(f"{name} B={batch} {setting(row)}: {row['latency_ms']:.1f} ms/image, speed-up "
                    f"{row['speedup']:.2f}, FLOPs ratio {row['flops_ratio']:.2f}, efficiency "
                    f"{row['efficiency']:.2f}, kept {row['kept_ratio']:.3f}")
            save()
        except RuntimeError as exc:
            if not graphs:
                raise
            meta[f"{name}_graph_error"] = f"batch {batch}: {exc}"
            log(f"{name} B={batch} with CUDA graphs failed: {exc}")
            save()
        finally:
            if graphs:
                backend.use_cuda_graphs(False)  # frees the workspace before the next model or batch
    save()
    print(f"\n{heading(meta)}\n\n{table(rows)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
