"""The `hart` backend: HART-0.7B's inference path behind the shared generation loop.

Stage 1 runs the prompt's context tokens (its prediction is the last context position's); stages 2..S run the
area-downsampled running sum f_hat, embedded. Discrete stages add Phi(bicubic(embedding)) to f_hat. The last
stage's prediction carries the logits and the hidden state side by side, (R, n, V + C): `sample` draws the
codes, then the diffusion head adds each token's continuous residual, and the tokens join f_hat without Phi.

SparseVAR: with `fill: code` (HART's config) the loop samples only kept tokens, so the diffusion head runs only
for them and excluded tokens copy their anchor's whole token, residual included. With `fill: logits` the loop
fills predictions first and the head runs for every token of the last stage.
"""

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sparsevar.attention import KVCache
from sparsevar.backends.hart import folders
from sparsevar.backends.hart.config import HartConfig
from sparsevar.backends.hart.diffusion import ResidualSampler
from sparsevar.backends.hart.folders import TokenizerArch, TransformerArch
from sparsevar.backends.hart.rope import rope_1d, rope_2d
from sparsevar.backends.hart.sampling import normals, sample_embeddings, stage_ratio
from sparsevar.backends.hart.text import QwenTextEncoder
from sparsevar.backends.hart.tokenizer import TRAINING_ONLY, HybridTokenizer
from sparsevar.backends.hart.transformer import Conditioning, HartTransformer
from sparsevar.config import SamplingConfig
from sparsevar.fastvar import StagePruning, take
from sparsevar.graphs import GraphMode
from sparsevar.packing import Padding, worth_packing
from sparsevar.state_dicts import check_entries, read_state_dict

HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # what save_pretrained writes


@dataclass
class HartState:
    """One generation in flight; rows are the images' conditional rows, then their unconditional rows."""

    batch: int
    branches: int
    schedule: list[tuple[int, int]]
    x1_RTC: torch.Tensor  # stage 1's embedded context tokens
    cond: Conditioning  # from the AdaLN condition: the context embedding max-pooled over its tokens
    context_pos_RT: torch.Tensor
    caches: list[KVCache]
    f_hat_BCHW: torch.Tensor


@dataclass
class HartParts:
    """The loaded components and the sizes they were built with."""

    arch: TransformerArch
    tok: TokenizerArch
    transformer: HartTransformer
    tokenizer: HybridTokenizer
    text: QwenTextEncoder


def _entries(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def load_transformer(cfg: HartConfig, arch: TransformerArch, tok: TokenizerArch) -> HartTransformer:
    """The official llm weights, checked entry by entry and loaded strictly (training buffers included, then
    freed)."""
    path = folders.weights_file(folders.check_local(cfg.llm, "llm"), ("ema_model.bin",) if cfg.ema else HF_WEIGHTS,
                                "llm")
    state = read_state_dict(str(path))
    with torch.device("meta"):
        model = HartTransformer(arch, tok)
    check_entries(_entries(model), state, str(path), "HART transformer (llm)")
    model.load_state_dict(state, strict=True, assign=True)
    model.drop_training_buffers()
    return model


def load_tokenizer(cfg: HartConfig, tok: TokenizerArch) -> HybridTokenizer:
    """The tokenizer's inference entries, checked and loaded strictly; its training-only entries are left out by
    name."""
    path = folders.weights_file(folders.check_local(cfg.tokenizer, "tokenizer"), HF_WEIGHTS, "tokenizer")
    state = {k: v for k, v in read_state_dict(str(path)).items() if not k.startswith(TRAINING_ONLY)}
    with torch.device("meta"):
        model = HybridTokenizer(tok)
    check_entries(_entries(model), state, str(path), "HART tokenizer")
    model.load_state_dict(state, strict=True, assign=True)
    return model


def load_parts(cfg: HartConfig, device: torch.device, dtype: torch.dtype) -> HartParts:
    """Read and check the three local folders; raises naming the folder, file or entry at fault."""
    arch, tok = folders.archs(cfg.llm, cfg.tokenizer)
    text = QwenTextEncoder.load(folders.check_local(cfg.text_encoder, "text_encoder"), arch.context_token,
                                cfg.system_prompt, device, dtype)
    return HartParts(arch, tok, load_transformer(cfg, arch, tok), load_tokenizer(cfg, tok), text)


class HartBackend(GraphMode):
    name = "hart"

    def __init__(self, cfg: HartConfig, sampling: SamplingConfig, parts: HartParts, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> None:
        self.cfg, self.sampling, self.device, self.dtype = cfg, sampling, device, dtype
        self.arch, self.tok, self.text = parts.arch, parts.tok, parts.text
        if self.text.width != self.arch.context_dim:
            raise ValueError(f"the text encoder's hidden size {self.text.width} is not the llm's context_dim "
                             f"{self.arch.context_dim}: model.text_encoder and model.llm do not belong together")
        self.model = parts.transformer.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer = parts.tokenizer.to(device=device, dtype=dtype).eval().requires_grad_(False)
        # float32 where precision is cheap and matters: the logits (the official sampler sees them at least at
        # fp16), and the codebook and Phi convolutions that build f_hat.
        self.model.head_nm.float()
        self.model.head.float()
        self.tokenizer.vae.quantize.float()
        self.diffusion = ResidualSampler(self.arch.num_sampling_steps)
        self.depth, self.dim = self.arch.depth, self.arch.embed_dim
        self.block_params = sum(p.numel() for p in self.model.blocks[0].parameters())
        self.use_cuda_graphs(cfg.cuda_graphs)

    def schedule(self, h_div_w: float) -> list[tuple[int, int]]:
        if abs(h_div_w - 1.0) > 1e-6:
            raise ValueError(f"HART-0.7B generates square images only; got h_div_w={h_div_w}")
        return [(p, p) for p in self.arch.patch_nums]

    def branches(self, state: HartState) -> int:
        return state.branches

    def begin(self, prompts: list[str], negative_prompts: list[str | None], h_div_w: float) -> HartState:
        """Encode the prompts; the unconditional rows are zeros at position 0 unless a negative prompt is given."""
        B, schedule = len(prompts), self.schedule(h_div_w)
        context_BTC, pos_BT = self.text(prompts)
        guided = self.sampling.cfg != 0.0 or any(negative_prompts)
        if guided:
            uncond_BTC, uncond_pos_BT = torch.zeros_like(context_BTC), torch.zeros_like(pos_BT)
            if any(negative_prompts):
                neg_BTC, neg_pos_BT = self.text([n or "" for n in negative_prompts])
                has_neg_B = torch.tensor([bool(n) for n in negative_prompts], device=self.device)
                uncond_BTC = torch.where(has_neg_B[:, None, None], neg_BTC, uncond_BTC)
                uncond_pos_BT = torch.where(has_neg_B[:, None], neg_pos_BT, uncond_pos_BT)
            context_BTC, pos_BT = torch.cat([context_BTC, uncond_BTC]), torch.cat([pos_BT, uncond_pos_BT])
        branches = 2 if guided else 1
        sos_RTC = self.model.embed_context(context_BTC.to(self.dtype))
        x1_RTC = sos_RTC + self.model.lvl_embed.weight[0]
        cond = self.model.condition(sos_RTC.max(dim=1, keepdim=True).values)

        def new_state() -> HartState:
            capacity = self.arch.total_tokens
            caches = [KVCache(branches * B, self.arch.num_heads, capacity, self.arch.head_dim, self.device,
                              self.dtype) for _ in range(self.depth)]
            last = schedule[-1][0]
            f_hat = torch.zeros(B, self.tok.z_channels, last, last, device=self.device)
            return HartState(B, branches, schedule, x1_RTC, cond, pos_BT, caches, f_hat)

        if self.graphs is None:
            return new_state()
        # The graphs read the workspace's caches and conditioning: a new generation copies its own in.
        state = self.graphs.workspace((B, branches, tuple(schedule), tuple(x1_RTC.shape)), new_state)
        if state.cond is not cond:
            torch._foreach_copy_(state.cond.tensors(), cond.tensors())
        for cache in state.caches:
            cache.reset()
        state.x1_RTC, state.context_pos_RT = x1_RTC, pos_BT
        state.f_hat_BCHW.zero_()
        return state

    def stage_input(self, state: HartState, stage: int) -> torch.Tensor:
        """Stage 1: the embedded context tokens (R, T, C). Later stages: f_hat at the stage's size (R, h*w, Cvae)."""
        if stage == 1:
            return state.x1_RTC
        h, w = state.schedule[stage - 1]
        x_BLC = F.interpolate(state.f_hat_BCHW, size=(h, w), mode="area").flatten(2).transpose(1, 2)
        return x_BLC.repeat(state.branches, 1, 1)

    def forward(self, state: HartState, x_RnC: torch.Tensor, stage: int, positions_Rn: torch.Tensor | None,
                padding: Padding | None, capture_block: int | None, prune: StagePruning | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        m, hd, cond, caches, last = self.model, self.arch.head_dim, state.cond, state.caches, len(state.schedule)
        if stage == 1:  # the context, with 1-D RoPE; the last position predicts the 1x1 map
            cos_sin = rope_1d(state.context_pos_RT, hd)
        else:
            pn = state.schedule[stage - 1][0]
            cos_sin = rope_2d(pn, state.schedule[-1][0], state.context_pos_RT[:, -1], hd)
            cos_sin = cos_sin if positions_Rn is None else take(cos_sin, positions_Rn, 2)

        def run(x_RnC: torch.Tensor, cos_sin: torch.Tensor, valid_Rn: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
            if stage == 1:
                h_RTC, change_RT = m(x_RnC, cond, cos_sin, caches, None, capture_block)
                # Logits of every context token, then the last: the official products, so equal bytes on a CPU.
                return m.logits(h_RTC.float(), cond)[:, -1:], None if change_RT is None else change_RT[:, -1:]
            x_RnC = m.word_embed(x_RnC.to(self.dtype)) + m.lvl_embed.weight[stage - 1]
            h_RnC, change_Rn = m(x_RnC, cond, cos_sin, caches, valid_Rn, capture_block,  # packed when eager
                                 worth_packing(padding) if self.graphs is None and prune is None else None, prune)
            logits_RnV = m.logits(h_RnC.float(), cond)
            return (logits_RnV if stage < last else torch.cat([logits_RnV, h_RnC.float()], dim=-1)), change_Rn

        valid_Rn = None if padding is None else padding.valid_Rn
        if self.graphs is None:
            return run(x_RnC, cos_sin, valid_Rn)
        return self.graphs.run((stage, capture_block), run, (x_RnC, cos_sin, valid_Rn), caches)

    def sample(self, state: HartState, pred_RnV: torch.Tensor, stage: int, generators: list[torch.Generator],
               positions_Bn: torch.Tensor | None) -> torch.Tensor:
        S, V = len(state.schedule), self.tok.vocab_size
        h, w = state.schedule[stage - 1]
        idx_Bn, emb_BnC = sample_embeddings(pred_RnV[..., :V], state.branches, stage - 1, S, h * w, self.sampling,
                                            self.cfg.more_smooth, self.tokenizer.codebook, generators, positions_Bn)
        if stage < S:
            return emb_BnC
        return emb_BnC + self._residuals(state, pred_RnV[..., V:], idx_Bn, generators, positions_Bn, h * w)

    def _residuals(self, state: HartState, hidden_RnC: torch.Tensor, idx_Bn: torch.Tensor,
                   generators: list[torch.Generator], positions_Bn: torch.Tensor | None, tokens: int) -> torch.Tensor:
        """The diffusion head's continuous residuals (B, n, Cvae) for the sampled tokens."""
        m, B, n = self.model, state.batch, idx_Bn.shape[1]
        discrete_BnC = m.word_embed(self.tokenizer.codebook[idx_Bn].to(self.dtype))
        z_RnC = m.decoder_norm(hidden_RnC.to(self.dtype) + discrete_BnC.repeat(state.branches, 1, 1))
        Cvae = self.tok.z_channels
        z_Xc = z_RnC.reshape(state.branches * B * n, z_RnC.shape[-1])  # rows: cond (image-major), then uncond

        def noise() -> torch.Tensor:
            return normals(generators, tokens, Cvae, positions_Bn, self.device).reshape(B * n, Cvae)

        t = self.sampling.cfg * stage_ratio(len(state.schedule) - 1, len(state.schedule))
        return self.diffusion.sample(m.diffloss.net, z_Xc, state.branches, t, noise).reshape(B, n, Cvae)

    def drop_guidance(self, state: HartState) -> None:
        B, cond = state.batch, state.cond
        state.cond = Conditioning([replace(b, ada=tuple(t[:B] for t in b.ada)) for b in cond.blocks],
                                  tuple(t[:B] for t in cond.head))
        state.context_pos_RT = state.context_pos_RT[:B]
        for cache in state.caches:
            cache.keep_rows(B)
        state.branches = 1

    def accumulate(self, state: HartState, tokens_BLC: torch.Tensor, stage: int) -> None:
        h, w = state.schedule[stage - 1]
        h_BChw = tokens_BLC.float().transpose(1, 2).reshape(state.batch, -1, h, w)
        S = len(state.schedule)
        if stage < S:
            h_BChw = self.tokenizer.refine(h_BChw, stage - 1, S, state.schedule[-1][0])
        state.f_hat_BCHW += h_BChw

    def decode(self, state: HartState) -> np.ndarray:
        # Image by image: convolution algorithms depend on the batch size, an image's bytes must not.
        images = []
        for f_1CHW in state.f_hat_BCHW.split(1):
            rgb = self.tokenizer.decode(f_1CHW.to(self.dtype)).float()
            images.append(rgb.add(1).mul(0.5).mul(255).to(torch.uint8).permute(0, 2, 3, 1))  # truncates, as official
        return torch.cat(images).cpu().numpy()


def build(cfg: HartConfig, sampling: SamplingConfig, device: torch.device, dtype: torch.dtype) -> HartBackend:
    return HartBackend(cfg, sampling, load_parts(cfg, device, dtype), device, dtype)


def expected_entries(cfg: HartConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """What llm/ema_model.bin (transformer and diffusion head) and the tokenizer weights must hold.

    Sizes come from the folders' config.json when they are local, else from HART-0.7B's.
    """
    local = all("://" not in p and Path(p).expanduser().is_dir() for p in (cfg.llm, cfg.tokenizer))
    arch, tok = folders.archs(cfg.llm, cfg.tokenizer) if local else (TransformerArch(), TokenizerArch())
    with torch.device("meta"):
        return {"llm": _entries(HartTransformer(arch, tok)), "tokenizer": _entries(HybridTokenizer(tok))}
