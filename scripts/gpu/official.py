"""The official Infinity and HART pipelines side by side with ours: same random weights, same GPU, same run.

    bash scripts/gpu/official_export.sh         # once: the official code into the git-ignored .official/
    python scripts/gpu/official.py --out official.json            # one GPU: 1024², bf16, CFG, batch 1
    python scripts/gpu/official.py --smoke --out /tmp/official.json   # CPU: tiny models of the same classes

For each model it builds the official modules (Infinity-2B and its d32 BSQ VAE; HART-0.7B and its tokenizer) with
random weights, hands their state dicts to our loaders' checks and strict loads, and shares one random text
encoder (flan-t5-xl's size; Qwen2-1.5B's). Then, in interleaved rounds after a warm-up, it times per image, with
device synchronisation: the official `gen_one_img` (tools/run_infinity.py, its defaults: cfg 4, tau 1, top-k 900,
top-p 0.97, cfg on logits) or the official HART sampler (`encode_prompts` + `autoregressive_infer_cfg`, as
sample.py: fp16 autocast, cfg 4.5, more_smooth), our dense and our SparseVAR (the config's, with quantile
normalisation, the issue's target; our CUDA graphs as the config sets them). Prompts and seeds change every round.
It also reports the largest pixel difference between the official image and our dense one for the same prompt
and seed: the samplers draw their random numbers differently, so it is a sanity figure, not a test.

The official code is imported only from .official/ (a measurement script: never package code). There,
flash_attn is our stand-in on torch's SDPA and HART's CUDA kernels are pure torch (official_export.sh).
"""

import argparse
import contextlib
import inspect
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
OFFICIAL = REPO / ".official"
sys.path.insert(0, str(REPO))

from sparsevar.backends import resolve_device  # noqa: E402
from sparsevar.config import SamplingConfig, SparseVARConfig  # noqa: E402
from sparsevar.generate import Request, generate  # noqa: E402
from sparsevar.state_dicts import check_entries  # noqa: E402

PROMPTS = ["a photo of a red fox in the snow", "a bowl of ramen on a wooden table, studio lighting",
           "an astronaut riding a horse on mars", "a watercolor painting of a lighthouse at dusk",
           "a close-up portrait of an old fisherman", "a futuristic city skyline at night, neon lights",
           "two cats sleeping on a sofa", "a field of sunflowers under a blue sky"]
MODELS = {"infinity-2b": "configs/infinity-2b.yaml", "hart-0.7b": "configs/hart-0.7b.yaml"}
SHIMS = ("flash_attn: our stand-in on torch SDPA (flash kernel in bf16/fp16, one call per sequence for varlen); "
         "HART's hart_backend.fused_kernels (RoPE, RMSNorm): pure torch; fallbacks only where a package is missing "
         "(timm, pytz, imageio, cv2, torchvision: import-time names)")
# Tiny sizes for --smoke: the official VAE builder fixes 128 base channels and 2 residual blocks.
INFINITY_SMOKE = dict(dim=64, depth=4, heads=2, block_chunks=2, text_channels=128, text_max_tokens=64, vae_bits=8,
                      vae_base_channels=128, vae_channel_mult=[1, 2], vae_res_blocks=2, resolution="0.06M")
SMOKE_STAGES = {"infinity-2b": dict(start_stage=5, score_block=2), "hart-0.7b": dict(start_stage=4, score_block=2)}


def import_official() -> None:
    """Put .official/ on sys.path (shims first, fallbacks last), or exit naming the export script."""
    missing = [p for p in ("infinity/infinity", "hart/hart", "shims/flash_attn") if not (OFFICIAL / p).is_dir()]
    if missing:
        raise SystemExit(f"official.py: {OFFICIAL} lacks {', '.join(missing)}: export the official code first with "
                         "`bash scripts/gpu/official_export.sh` (it is git-ignored, never committed)")
    sys.path[1:1] = [str(OFFICIAL / "shims"), str(OFFICIAL / "infinity"), str(OFFICIAL / "infinity" / "tools"),
                     str(OFFICIAL / "hart")]
    with contextlib.suppress(ImportError):  # before the fallbacks: pandas and transformers must see a package
        import pandas  # noqa: F401          # that is missing as missing, not our import-time stand-in
        import transformers.modeling_utils  # noqa: F401
    sys.path.append(str(OFFICIAL / "fallback"))


@contextlib.contextmanager
def cpu_cuda_calls() -> Iterator[None]:
    """On a machine without CUDA, the official code's hard `.cuda()` calls stay on the CPU (smoke runs only)."""
    if torch.cuda.is_available():
        yield
        return
    tensor_cuda, module_cuda = torch.Tensor.cuda, torch.nn.Module.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = tensor_cuda, module_cuda


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_checked(module_cls: Callable[[], torch.nn.Module], state: dict[str, torch.Tensor], what: str
                 ) -> torch.nn.Module:
    """Our module loaded from an official state dict as our loaders do: every entry checked, then a strict load."""
    with torch.device("meta"):
        ours = module_cls()
    check_entries({k: tuple(v.shape) for k, v in ours.state_dict().items()}, state, "(official model in memory)",
                  what)
    ours.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
    return ours


class Pipelines:
    """One model's three pipelines, each a function from (prompt, seed) to an RGB uint8 image (H, W, 3)."""

    def __init__(self, name: str, official: Callable, ours: Callable, dense: SparseVARConfig,
                 sparse: SparseVARConfig, graphs: bool) -> None:
        self.name, self.official, self.ours, self.graphs = name, official, ours, graphs
        self.settings = {"official": official, "ours dense": lambda p, s: ours(p, s, dense),
                         f"ours SparseVAR {sparse.normalize} τ={sparse.tau}": lambda p, s: ours(p, s, sparse)}


def build_infinity(model: dict, sampling: SamplingConfig, sv: SparseVARConfig, smoke: bool, device: torch.device,
                   dtype: torch.dtype) -> Pipelines:
    from infinity.models.bsq_vae.vae import vae_model
    from infinity.models.infinity import Infinity as OfficialInfinity
    from infinity.utils.dynamic_resolution import dynamic_resolution_h_w
    from run_infinity import gen_one_img

    from sparsevar.backends.infinity.backend import LEGACY_BUFFERS, InfinityBackend, InfinityParts
    from sparsevar.backends.infinity.config import InfinityConfig
    from sparsevar.backends.infinity.model import Infinity
    from sparsevar.backends.infinity.testing import T5_XL, offline_tokenizer, random_t5, randomize_
    from sparsevar.backends.infinity.text import T5Text
    from sparsevar.backends.infinity.vae import VAE, constant_entries

    if device.type == "cpu":  # the fused norms are torch.compile'd (Triton on a GPU): eager on the CPU
        import infinity.models.infinity as official_module

        for fn in ("fused_ada_layer_norm", "fused_ada_rms_norm"):
            setattr(official_module, fn, inspect.unwrap(getattr(official_module, fn)))
    files = dict(transformer="(random)", vae="(random)", text_encoder="(random)")
    cfg = InfinityConfig(**{**model, **(INFINITY_SMOKE if smoke else {}), **files})
    mult = list(cfg.vae_channel_mult)
    with cpu_cuda_calls(), torch.device(device):  # as load_visual_tokenizer, vae_type = bits, no file
        vae = vae_model(None, "dynamic", cfg.vae_bits, 2 ** cfg.vae_bits, patch_size=2 ** (len(mult) - 1),
                        encoder_ch_mult=mult, decoder_ch_mult=mult, test_mode=True).to(device)
    randomize_(vae, seed=1)
    kwargs = dict(depth=cfg.depth, embed_dim=cfg.dim, num_heads=cfg.heads, drop_path_rate=0.1, mlp_ratio=4,
                  block_chunks=cfg.block_chunks)  # tools/run_infinity.py, model_type infinity_2b
    with cpu_cuda_calls(), torch.no_grad(), torch.device(device):  # load_infinity's arguments, bf16=1
        official = OfficialInfinity(
            vae_local=vae, text_channels=cfg.text_channels, text_maxlen=cfg.text_max_tokens, shared_aln=True,
            raw_scale_schedule=None, checkpointing="full-block", customized_flash_attn=False, fused_norm=True,
            pad_to_multiplier=128, use_flex_attn=False, add_lvl_embeding_only_first_block=1, use_bit_label=1,
            rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2, pn=cfg.resolution, apply_spatial_patchify=0,
            inference_mode=True, train_h_div_w_list=[1.0], **kwargs).to(device)
    randomize_(official, seed=0)
    state = {k: v for k, v in official.state_dict().items() if k not in LEGACY_BUFFERS}
    transformer = load_checked(lambda: Infinity(cfg), state, "Infinity transformer")
    vae_state = dict(vae.state_dict())
    for key, constant in constant_entries(cfg.vae_bits).items():
        vae_state.setdefault(key, constant)
    ours_vae = load_checked(lambda: VAE(cfg), vae_state, "BSQ VAE")
    ours_vae.encoder = None
    del state, vae_state
    if device.type == "cuda":
        for block in official.unregistered_blocks:
            block.bfloat16()
    official.eval().requires_grad_(False)
    official.rng = torch.Generator(device=device)
    tokenizer = offline_tokenizer()
    t5 = random_t5(cfg.text_channels, **{"vocab": len(tokenizer), **({} if smoke else T5_XL)}, device=device)
    t5.to(torch.float16 if device.type == "cuda" else torch.float32).eval().requires_grad_(False)  # load_tokenizer
    tokenizer.model_max_length = 512
    text = T5Text(tokenizer, t5, device, cfg.text_max_tokens)
    backend = InfinityBackend(cfg, sampling, InfinityParts(transformer, ours_vae, text), device, dtype)
    schedule = [(1, h, w) for _, h, w in dynamic_resolution_h_w[1.0][cfg.resolution]["scales"]]

    def run_official(prompt: str, seed: int) -> np.ndarray:
        with cpu_cuda_calls(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"), \
                torch.no_grad(), contextlib.redirect_stdout(None):  # gen_one_img prints per call
            img = gen_one_img(official, vae, tokenizer, t5, prompt, g_seed=seed, gt_leak=0, gt_ls_Bl=None,
                              cfg_list=sampling.cfg, tau_list=sampling.temperature, scale_schedule=schedule,
                              cfg_insertion_layer=[0], vae_type=cfg.vae_bits, sampling_per_bits=1,
                              enable_positive_prompt=0)
        return img.flip(-1).cpu().numpy()  # the official image is BGR (for cv2.imwrite)

    def run_ours(prompt: str, seed: int, setting: SparseVARConfig) -> np.ndarray:
        return generate(backend, [Request(prompt, seed)], setting)[0].pixels_HWC

    return pipelines("infinity-2b", run_official, run_ours, backend, sv, smoke, cfg.cuda_graphs)


def build_hart(model: dict, sampling: SamplingConfig, sv: SparseVARConfig, smoke: bool, device: torch.device,
               dtype: torch.dtype) -> Pipelines:
    from dataclasses import asdict, replace

    from hart.modules.models.autoencoder import HARTAutoEncoderWithDisc, HARTAutoEncoderWithDiscConfig
    from hart.modules.models.transformer import HARTForT2I, HARTForT2IConfig
    from hart.utils import encode_prompts, llm_system_prompt

    from sparsevar.backends.hart.backend import HartBackend, HartParts
    from sparsevar.backends.hart.config import HartConfig
    from sparsevar.backends.hart.folders import TokenizerArch, TransformerArch
    from sparsevar.backends.hart.testing import (
        TINY_ARCH,
        TINY_TOK,
        TextArch,
        _randomise_,
        byte_tokenizer,
        random_qwen2,
    )
    from sparsevar.backends.hart.text import QwenTextEncoder
    from sparsevar.backends.hart.tokenizer import TRAINING_ONLY, HybridTokenizer
    from sparsevar.backends.hart.transformer import HartTransformer

    cfg = HartConfig(**{**model, "llm": "(random)", "tokenizer": "(random)", "text_encoder": "(random)"})
    # smoke: a codebook above the official sampler's fixed top-k of 600
    arch, tok = (TINY_ARCH, replace(TINY_TOK, vocab_size=1024)) if smoke else (TransformerArch(), TokenizerArch())
    tok_config = HARTAutoEncoderWithDiscConfig(**asdict(tok), quantizer_type="var_hybrid", hybrid=False,
                                               v_patch_nums=list(arch.patch_nums), using_znorm=False, quant_conv_ks=3)
    llm_config = HARTForT2IConfig(**asdict(arch), attn_type="llama", mlp_type="llama", attn_l2_norm=True,
                                  sep_aln_pooling_mode="max", disable_aln=False, shared_aln=False,
                                  use_cross_attn=False, use_timestep_embed=False, sampler="iddpm",
                                  diffusion_batch_mul=4, context_norm_scale=1.0, vae_path="(in memory)")
    torch.manual_seed(0)
    with cpu_cuda_calls(), torch.device(device):
        official_tok = _randomise_(HARTAutoEncoderWithDisc(tok_config), seed=1)
        from_pretrained = HARTAutoEncoderWithDisc.from_pretrained
        HARTAutoEncoderWithDisc.from_pretrained = classmethod(lambda cls, *a, **k: official_tok)
        try:  # HARTForT2I reads its tokenizer with from_pretrained(vae_path): hand it the one in memory
            official = _randomise_(HARTForT2I(llm_config), seed=0).to(device)
        finally:
            HARTAutoEncoderWithDisc.from_pretrained = from_pretrained
    official.eval().requires_grad_(False)
    transformer = load_checked(lambda: HartTransformer(arch, tok), official.state_dict(), "HART transformer (llm)")
    transformer.drop_training_buffers()
    tok_state = {k: v for k, v in official_tok.state_dict().items() if not k.startswith(TRAINING_ONLY)}
    tokenizer_ours = load_checked(lambda: HybridTokenizer(tok), tok_state, "HART tokenizer")
    text_tokenizer = byte_tokenizer()
    text_arch = TextArch(hidden_size=arch.context_dim) if smoke else TextArch.qwen2_1_5b()
    qwen = random_qwen2(text_arch, len(text_tokenizer), 2, device).to(dtype).eval().requires_grad_(False)
    text = QwenTextEncoder(text_tokenizer, qwen, arch.context_token, cfg.system_prompt, device)
    parts = HartParts(arch, tok, transformer, tokenizer_ours, text)
    backend = HartBackend(cfg, sampling, parts, device, dtype)

    def run_official(prompt: str, seed: int) -> np.ndarray:
        with cpu_cuda_calls(), torch.inference_mode(), \
                torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):  # sample.py
            tokens, mask, positions, context = encode_prompts([prompt], qwen, text_tokenizer, arch.context_token,
                                                              llm_system_prompt, cfg.system_prompt)
            imgs = official.autoregressive_infer_cfg(B=context.size(0), label_B=context, cfg=sampling.cfg,
                                                     g_seed=seed, more_smooth=cfg.more_smooth,
                                                     context_position_ids=positions, context_mask=mask)
        return imgs[0].float().permute(1, 2, 0).mul(255).cpu().numpy().astype(np.uint8)  # as save_images

    def run_ours(prompt: str, seed: int, setting: SparseVARConfig) -> np.ndarray:
        return generate(backend, [Request(prompt, seed)], setting)[0].pixels_HWC

    return pipelines("hart-0.7b", run_official, run_ours, backend, sv, smoke, cfg.cuda_graphs)


def pipelines(name: str, official: Callable, ours: Callable, backend, sv: SparseVARConfig, smoke: bool,
              graphs: bool) -> Pipelines:
    sv = sv.model_copy(update={"normalize": "quantile", **(SMOKE_STAGES[name] if smoke else {})})
    backend.use_cuda_graphs(graphs)
    return Pipelines(name, official, ours, sv.model_copy(update={"enabled": False}), sv, graphs)


def measure(p: Pipelines, device: torch.device, warmup: int, runs: int, deadline: float, log: Callable) -> dict:
    """Warm-up, then `runs` rounds running every pipeline once in turn on the round's prompt and seed."""
    times: dict[str, list[float]] = {name: [] for name in p.settings}
    for k in range(warmup):  # compiles, allocator, our graph captures (a shape's second sight)
        for fn in p.settings.values():
            fn(PROMPTS[-1 - k % len(PROMPTS)], 10_000 + k)
    diffs = []
    for run in range(runs):
        if run and time.perf_counter() > deadline:
            log(f"{p.name}: deadline reached after {run} rounds")
            break
        prompt, seed = PROMPTS[run % len(PROMPTS)], run
        images = {}
        for name, fn in p.settings.items():
            sync(device)
            started = time.perf_counter()
            images[name] = fn(prompt, seed)
            sync(device)
            times[name].append((time.perf_counter() - started) * 1e3)
        official, dense = images["official"].astype(np.int16), images["ours dense"].astype(np.int16)
        diffs.append({"prompt": prompt, "seed": seed, "shape_official": list(official.shape),
                      "shape_ours": list(dense.shape), **({"max_abs_diff": int(np.abs(official - dense).max()),
                                                           "mean_abs_diff": float(np.abs(official - dense).mean())}
                                                          if official.shape == dense.shape else {})})
        log(f"{p.name} round {run + 1}: " + ", ".join(f"{n} {t[-1]:.1f} ms" for n, t in times.items()))
    rows = [{"model": p.name, "pipeline": name, "ms_per_image": statistics.median(t), "images_per_s":
             1e3 / statistics.median(t), "rounds": len(t), "ms_all": t,
             "cuda_graphs": None if name == "official" else p.graphs} for name, t in times.items() if t]
    return {"rows": rows, "official_vs_ours_dense": diffs}


def table(rows: list[dict]) -> str:
    lines = ["| model | pipeline | ms/image | images/s | vs official | rounds |", "|---" * 6 + "|"]
    official = {r["model"]: r["ms_per_image"] for r in rows if r["pipeline"] == "official"}
    for r in rows:
        name = r["pipeline"] + (" (graphs)" if r["cuda_graphs"] else "")
        lines.append(f"| {r['model']} | {name} | {r['ms_per_image']:.1f} | {r['images_per_s']:.2f} | "
                     f"{official[r['model']] / r['ms_per_image']:.2f} | {r['rounds']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--runs", type=int, help="timed rounds after the warm-up; default 5 (smoke: 2)")
    parser.add_argument("--warmup", type=int, help="warm-up rounds; default 2 (compiles, graph captures; smoke: 1)")
    parser.add_argument("--out", default="official.json", help="JSON, rewritten after each model; table in .md")
    parser.add_argument("--deadline-s", type=float, default=None, help="start no new round after this many seconds")
    parser.add_argument("--smoke", action="store_true", help="tiny models of the same classes, for a CPU check")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    import_official()
    device, dtype = resolve_device(args.device)
    runs, warmup = args.runs or (2 if args.smoke else 5), args.warmup if args.warmup is not None else (
        1 if args.smoke else 2)
    if device.type == "cpu" and args.smoke:
        torch.set_num_threads(1)
    started = time.perf_counter()
    deadline = started + (args.deadline_s if args.deadline_s is not None else float("inf"))
    meta = {"command": " ".join(["python scripts/gpu/official.py", *(sys.argv[1:] if argv is None else argv)]),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
            "dtype": str(dtype), "torch": torch.__version__, "smoke": args.smoke, "warmup": warmup, "shims": SHIMS,
            "official_commits": (OFFICIAL / "COMMITS").read_text().split("\n") if (OFFICIAL / "COMMITS").exists()
            else None, "official_norms_compiled": device.type == "cuda"}
    rows: list[dict] = []

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

    def save() -> None:
        Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=1))
        Path(args.out).with_suffix(".md").write_text(f"{heading(meta)}\n\n{table(rows)}\n\n{SHIMS}\n")

    for name in args.models:
        if time.perf_counter() > deadline:
            meta.setdefault("not_run_past_deadline", []).append(name)
            continue
        config = yaml.safe_load((REPO / MODELS[name]).read_text())
        model = {k: v for k, v in config["model"].items() if k != "backend"}
        build = build_infinity if name.startswith("infinity") else build_hart
        p = build(model, SamplingConfig(**config["sampling"]), SparseVARConfig(**config["sparsevar"]), args.smoke,
                  device, dtype)
        log(f"built {name}{' (smoke)' if args.smoke else ''}: official and ours, same random weights")
        result = measure(p, device, warmup, runs, deadline, log)
        rows += result["rows"]
        meta[f"{name}_official_vs_ours_dense"] = result["official_vs_ours_dense"]
        for d in result["official_vs_ours_dense"]:
            log(f"{name} official vs ours dense, seed {d['seed']}: max |Δ| {d.get('max_abs_diff')} grey levels, "
                f"mean {d.get('mean_abs_diff', float('nan')):.1f}")
        save()
        del p
        if device.type == "cuda":
            torch.cuda.empty_cache()
    save()
    print(f"\n{heading(meta)}\n\n{table(rows)}\n\n{SHIMS}", flush=True)
    return 0


def heading(meta: dict) -> str:
    return (f"{meta['device']}, {meta['dtype']}, batch 1, CFG on, median of interleaved rounds after "
            f"{meta['warmup']} warm-up round(s){', smoke sizes' if meta['smoke'] else ''}")


if __name__ == "__main__":
    sys.exit(main())
