"""Training of the demo model in resumable phases: tokenizer, decoder fine-tuning, transformer, yardstick.

The decoder phase trains the decoder alone on the frozen encoder's codes: pictures get sharper while the
codes, and so what the transformer learns, stay the same.

Every batch is a pure function of (seed, phase, step), so a run resumed from its last checkpoint continues
exactly as if it had never stopped. Held-out scenes use seeds no training batch can draw.
"""

import copy
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from sparsevar.attention import rope_2d_table
from sparsevar.backends.tiny.backend import TinyModel, load_weights
from sparsevar.backends.tiny.config import TinyConfig
from sparsevar.backends.tiny.decoder import Decoder
from sparsevar.backends.tiny.text import ByteTokenizer
from sparsevar.backends.tiny.transformer import TextContext
from sparsevar.config import StrictModel
from sparsevar.demo import scenes
from sparsevar.demo.scenes import HELD_OUT_SEED
from sparsevar.demo.tokenizer import Encoder, quantize, stage_inputs
from sparsevar.demo.yardstick import Yardstick, accuracy, described, pixels


def demo_model() -> TinyConfig:
    """The shipped demo model's architecture: 128x128 pictures from a 16x16 map in 10 stages."""
    return TinyConfig(
        dim=128, depth=6, heads=4, bits=16, patch_sizes=[1, 2, 3, 4, 5, 6, 8, 10, 13, 16],
        text_dim=64, text_depth=2, text_heads=4, max_text_tokens=96, decoder_channels=128, upsample=3,
    )


class Phase(StrictModel):
    steps: int = Field(ge=0)
    batch: int = Field(ge=1)
    lr: float = Field(gt=0)


class TrainConfig(StrictModel):
    seed: int = 0
    model: TinyConfig = Field(default_factory=demo_model)
    tokenizer: Phase = Phase(steps=600, batch=12, lr=2e-3)
    decoder: Phase = Phase(steps=200, batch=12, lr=5e-4)
    transformer: Phase = Phase(steps=1000, batch=16, lr=2e-3)
    yardstick: Phase = Phase(steps=800, batch=32, lr=2e-3)
    place: float = Field(0.0, ge=0, le=1, description="chance that a caption part without its place names it "
                         "anyway (scenes.caption): 0 names it in half the parts, 0.6 in 80%")
    cfg_dropout: float = Field(0.1, ge=0, le=1)
    commitment: float = Field(0.1, ge=0, description="weight of |f - f_hat|^2 that keeps the encoder in range")
    checkpoint_every: int = Field(50, ge=1)
    held_out: int = Field(64, ge=1)
    init: str | None = Field(None, description="a demo.safetensors to fine-tune (text encoder and transformer); "
                             "its decoder stays, and the tokenizer phase fits a new encoder to it, frozen")
    layout_stages: int = Field(0, ge=0, description="if > 0, transformer steps not divisible by full_every train "
                               "only the first this many stages: exact under block-causal attention, and cheaper")
    full_every: int = Field(1, ge=1)


@dataclass(frozen=True)
class Runtime:
    """Where training runs: not part of the recipe (a run may resume on another device)."""

    device: torch.device = torch.device("cpu")
    store: torch.dtype = torch.float32  # of the exported demo.safetensors (fp16 halves it; it loads back to fp32)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two batches in [-1, 1], over all pixels."""
    return float(10 * torch.log10(4.0 / F.mse_loss(a, b).clamp_min(1e-12)))


def _batches(cfg: TrainConfig, phase: int, batch: int, steps: range, device: torch.device
             ) -> Iterator[tuple[int, torch.Tensor, list[str], list[scenes.Scene]]]:
    """Each step's pictures (B, H, W, 3) uint8, rendered on the training device, with their captions and scenes."""
    for step in steps:
        first = (phase * 10**8 + step * batch) % HELD_OUT_SEED + cfg.seed * 7919
        found, captions = zip(*(scenes.scene_from_seed(s, cfg.place) for s in range(first, first + batch)), strict=True)
        yield step, scenes.render_batch(found, cfg.model.image_side, device), list(captions), list(found)


def _lr(phase: Phase, step: int) -> float:
    """Linear warm-up over 5% of the steps, then cosine down to a tenth."""
    warm = max(1, phase.steps // 20)
    if step < warm:
        return phase.lr * (step + 1) / warm
    progress = (step - warm) / max(1, phase.steps - warm)
    return phase.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


class Checkpoint:
    """One phase's modules, optimizer and step in one file, written atomically."""

    def __init__(self, path: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer):
        self.path, self.modules, self.optimizer = path, modules, optimizer

    def load(self) -> int:
        if not self.path.exists():
            return 0
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        for name, module in self.modules.items():
            module.load_state_dict(state[name])
        self.optimizer.load_state_dict(state["optimizer"])
        return int(state["step"])

    def save(self, step: int) -> None:
        state = {name: m.state_dict() for name, m in self.modules.items()}
        state |= {"optimizer": self.optimizer.state_dict(), "step": step}
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)


def export_weights(module: nn.Module, path: Path, dtype: torch.dtype = torch.float32) -> None:
    """A module's weights as the backends load them (safetensors, on the CPU), replaced in one step. fp16 halves the
    file; loading casts back to the model's fp32 (on the demo model: 41 dB against the fp32 pictures, bf16 35 dB)."""
    tmp = path.with_name(path.name + ".tmp")
    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in module.state_dict().items()}
    save_file(state, tmp)
    tmp.replace(path)


def _run(name: str, cfg: TrainConfig, phase: Phase, index: int, out: Path, rt: Runtime, modules, params, step_fn,
         on_save: Callable[[], None] | None = None) -> None:
    """The shared loop of every phase: resume, step, log, checkpoint (then on_save, if given)."""
    optimizer = torch.optim.AdamW(params, lr=phase.lr, betas=(0.9, 0.95), weight_decay=0.0)
    checkpoint = Checkpoint(out / f"{name}.pt", modules, optimizer)
    start = checkpoint.load()
    if start >= phase.steps:
        return
    log = (out / "log.jsonl").open("a")
    bar = tqdm(total=phase.steps, initial=start, desc=name, dynamic_ncols=True, mininterval=5)
    began = time.time()
    for step, images, captions, found in _batches(cfg, index, phase.batch, range(start, phase.steps), rt.device):
        for group in optimizer.param_groups:
            group["lr"] = _lr(phase, step)
        loss, figures = step_fn(step, images, captions, found)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", **{k: f"{v:.2f}" for k, v in figures.items()})
        if (step + 1) % 10 == 0 or step + 1 == phase.steps:
            row = {"phase": name, "step": step + 1, "loss": loss.item(), "seconds": time.time() - began} | figures
            log.write(json.dumps(row) + "\n")
            log.flush()
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == phase.steps:
            checkpoint.save(step + 1)
            if on_save is not None:
                on_save()
    bar.close()
    log.close()


def init_model(cfg: TrainConfig) -> TinyModel:
    """The model to train: fresh (seeded by the caller), or cfg.init's weights."""
    model = TinyModel(cfg.model)
    if cfg.init is not None:
        load_weights(model, cfg.init)
    return model


def train_tokenizer(cfg: TrainConfig, out: Path, rt: Runtime) -> tuple[Encoder, Decoder]:
    """Encoder and decoder trained together; with cfg.init, the encoder alone against that model's decoder."""
    m = cfg.model
    torch.manual_seed(cfg.seed)
    encoder, decoder = Encoder(m.bits, m.decoder_channels, m.upsample), Decoder(m.bits, m.decoder_channels, m.upsample)
    if cfg.init is not None:
        decoder = init_model(cfg).decoder.requires_grad_(False)
    encoder, decoder = encoder.to(rt.device), decoder.to(rt.device)
    params = [p for p in (*encoder.parameters(), *decoder.parameters()) if p.requires_grad]

    def step(index, images, captions, found):
        x = pixels(images)
        f = encoder(x)
        f_hat, _ = quantize(f, m.patch_sizes)
        y = decoder(f_hat)
        loss = F.mse_loss(y, x) + cfg.commitment * F.mse_loss(f, f_hat.detach())
        return loss, {"psnr": psnr(y.detach(), x)}

    _run("tokenizer", cfg, cfg.tokenizer, 1, out, rt, {"encoder": encoder, "decoder": decoder}, params, step)
    return encoder.eval().requires_grad_(False), decoder.eval().requires_grad_(False)


def finetune_decoder(cfg: TrainConfig, out: Path, rt: Runtime, encoder: Encoder, decoder: Decoder) -> Decoder:
    decoder = copy.deepcopy(decoder).train().requires_grad_(True)

    def step(index, images, captions, found):
        x = pixels(images)
        with torch.no_grad():
            f_hat, _ = quantize(encoder(x), cfg.model.patch_sizes)
        y = decoder(f_hat)
        return F.mse_loss(y, x), {"psnr": psnr(y.detach(), x)}

    _run("decoder", cfg, cfg.decoder, 4, out, rt, {"decoder": decoder}, list(decoder.parameters()), step)
    return decoder.eval().requires_grad_(False)


def teacher_batch(encoder: Encoder, cfg: TinyConfig, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced stage inputs (B, L-1, bits) and target bits (B, L, bits) of a batch of pictures."""
    device = next(encoder.parameters()).device
    with torch.no_grad():
        _, codes = quantize(encoder(pixels(images.to(device))), cfg.patch_sizes)
    targets_BLb = torch.cat([c.flatten(2).transpose(1, 2) for c in codes], dim=1) > 0
    return stage_inputs(codes, cfg.patch_sizes), targets_BLb.long()


def sequence_layout(cfg: TinyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE table (2, 1, L, d/2) and stage index (L,) of the whole square token sequence."""
    head_dim, grid = cfg.dim // cfg.heads, (cfg.patch_sizes[-1],) * 2
    rope = torch.cat([rope_2d_table(p, p, head_dim, grid) for p in cfg.patch_sizes], dim=1)[:, None]
    stage_ids = torch.cat([torch.full((p * p,), i) for i, p in enumerate(cfg.patch_sizes)])
    return rope, stage_ids


def train_transformer(cfg: TrainConfig, out: Path, rt: Runtime, encoder: Encoder, decoder: Decoder) -> TinyModel:
    m = cfg.model
    torch.manual_seed(cfg.seed + 1)
    model = init_model(cfg).to(rt.device)
    model.decoder.load_state_dict(decoder.state_dict())
    model.decoder.requires_grad_(False)
    tokenizer = ByteTokenizer(m.max_text_tokens)
    rope, stage_ids = (t.to(rt.device) for t in sequence_layout(m))
    params = [p for name, p in model.named_parameters() if not name.startswith("decoder.")]

    def step(index, images, captions, found):
        inputs, targets = teacher_batch(encoder, m, images)
        full = cfg.layout_stages == 0 or index % cfg.full_every == 0
        # else the first stages only: under block-causal attention they never see the later ones
        n = sum(p * p for p in m.patch_sizes[: None if full else cfg.layout_stages])
        inputs, targets = inputs[:, : n - 1], targets[:, :n]
        ids, mask = tokenizer(captions, rt.device)
        text = model.text_encoder(ids, mask)
        dropout = torch.Generator().manual_seed((cfg.seed + 2) * 10**9 + index)  # per step, so resumes match
        drop = (torch.rand(len(captions), generator=dropout) < cfg.cfg_dropout).to(rt.device)
        text = torch.where(drop[:, None, None], model.cfg_uncond[: ids.shape[1]].expand_as(text), text)
        cond = model.transformer.condition(text, mask)
        context = TextContext([b.cross.text_kv(text) for b in model.transformer.blocks], mask[:, None, None, :])
        logits = model.transformer.forward_teacher(inputs, cond, rope[:, :, :n], stage_ids[:n], context)
        loss = F.cross_entropy(logits.reshape(-1, 2), targets.reshape(-1))
        right = logits.detach().unflatten(-1, (-1, 2)).argmax(-1) == targets
        if not full:
            return loss, {"bit_acc_layout": float(right.float().mean())}
        return loss, {"bit_acc_last": float(right[:, n - m.patch_sizes[-1] ** 2:].float().mean())}

    # usable weights at every checkpoint, so that a run cut short (a GPU lease running out) still ships something
    _run("transformer", cfg, cfg.transformer, 2, out, rt, {"model": model}, params, step,
         on_save=lambda: export_weights(model, out / "demo.safetensors", rt.store))
    return model.eval().requires_grad_(False)


def soften(x_BCHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Real scenes made to look like generated ones, so that the yardstick judges those by their content: half of
    them blurred (a 2x to 4x area downsampling, upsampled back: soft edges and fills), all with a little noise."""
    B, _, H, W = x_BCHW.shape
    factor = int(torch.randint(2, 5, (), generator=generator))
    blurred = F.interpolate(F.interpolate(x_BCHW, scale_factor=1 / factor, mode="area"), size=(H, W), mode="bilinear")
    pick = (torch.rand(B, generator=generator) < 0.5).to(x_BCHW.device)[:, None, None, None]
    noise = torch.randn(x_BCHW.shape, generator=generator).to(x_BCHW.device) * 0.04
    return torch.where(pick, blurred, x_BCHW) + noise


def train_yardstick(cfg: TrainConfig, out: Path, rt: Runtime) -> Yardstick:
    torch.manual_seed(cfg.seed + 3)
    yardstick = Yardstick().to(rt.device)

    def step(index, images, captions, found):
        generator = torch.Generator().manual_seed((cfg.seed + 4) * 10**9 + index)  # per step, so resumes match
        return yardstick.loss(soften(pixels(images), generator), found)

    _run("yardstick", cfg, cfg.yardstick, 3, out, rt, {"yardstick": yardstick}, list(yardstick.parameters()), step)
    return yardstick.eval().requires_grad_(False)


def tokenizer_psnr(cfg: TrainConfig, encoder: Encoder, decoder: Decoder) -> float:
    """Reconstruction PSNR over the held-out scenes."""
    images, _, _ = scenes.held_out(cfg.held_out, cfg.model.image_side)
    x = pixels(images).to(next(encoder.parameters()).device)
    with torch.no_grad():
        y = decoder(quantize(encoder(x), cfg.model.patch_sizes)[0])
    y = ((y + 1) * 127.5).round() / 127.5 - 1  # as the backend writes it: 8-bit
    return psnr(y, x)


def yardstick_accuracy(yardstick: Yardstick, scenes_n: int, side: int) -> dict[str, float | None]:
    """The yardstick's accuracy per attribute on held-out real scenes, every object's place named."""
    images, _, found = scenes.held_out(scenes_n, side)
    x = pixels(images).to(next(yardstick.parameters()).device)
    return accuracy(yardstick.judge(x, [described(s) for s in found]))
