"""Random-weight HART parts for tests and benchmarks: built directly on a device (`random_parts`), or saved in the
official folder layout (`write_folders`) so that tests go through the real loader: llm/ (config.json,
ema_model.bin), tokenizer/ (config.json, model.safetensors with a few training-only entries beside the inference
ones) and a Qwen2 text encoder folder with an offline byte-level tokenizer.

The byte-level tokenizer stands in for Qwen's BPE vocabulary, which cannot be built offline: one token per
UTF-8 byte, padding with <|endoftext|> on the right as Qwen's tokenizer does.
"""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sparsevar.backends.hart.backend import HartParts
from sparsevar.backends.hart.folders import TokenizerArch, TransformerArch
from sparsevar.backends.hart.text import QwenTextEncoder
from sparsevar.backends.hart.tokenizer import HybridTokenizer
from sparsevar.backends.hart.transformer import HartTransformer


@dataclass(frozen=True)
class TextArch:
    """Qwen2 sizes; `qwen2_1_5b` gives Qwen2-1.5B's (its vocabulary aside: the byte tokenizer has 257 tokens)."""

    hidden_size: int = 32
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 64

    @classmethod
    def qwen2_1_5b(cls) -> "TextArch":
        return cls(1536, 28, 12, 2, 8960)


# A small HART of the released structure: 4 blocks, 6 stages up to 8x8 tokens, a 2-level tokenizer decoder
# (16x16 pixels) and a 2-layer Qwen2; for tests and the benchmark's smoke run.
TINY_ARCH = TransformerArch(context_token=16, context_dim=32, embed_dim=64, depth=4, num_heads=4,
                            patch_nums=(1, 2, 3, 4, 6, 8), use_context_norm=True, diff_width=32, diff_depth=2,
                            num_sampling_steps="4")
TINY_TOK = TokenizerArch(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2))


@dataclass(frozen=True)
class Folders:
    llm: Path
    tokenizer: Path
    text_encoder: Path


def _randomise_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Default initialisation plus noise on every parameter, so that no weight (zero biases, unit norms) is inert."""
    device = next(module.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator, device=device) * 0.02)
    return module


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Build modules on `device` with their default initialisation drawn from `seed`."""
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        yield


def random_transformer(arch: TransformerArch, tok: TokenizerArch, seed: int, device: torch.device) -> HartTransformer:
    with _seeded(seed, device):
        return _randomise_(HartTransformer(arch, tok), seed)


def random_tokenizer(tok: TokenizerArch, seed: int, device: torch.device) -> HybridTokenizer:
    with _seeded(seed, device):
        return _randomise_(HybridTokenizer(tok), seed)


def byte_tokenizer():
    """A Qwen-style byte-level tokenizer built offline: one token per UTF-8 byte, <|endoftext|> pads on the right."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    byte_level = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=byte_level, pad_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   padding_side="right")


def random_qwen2(text: TextArch, vocab_size: int, seed: int, device: torch.device):
    from transformers import Qwen2Config, Qwen2Model

    config = Qwen2Config(vocab_size=vocab_size, max_position_embeddings=4096, **asdict(text))
    with _seeded(seed, device):
        return Qwen2Model(config)


def random_parts(arch: TransformerArch, tok: TokenizerArch, text: TextArch, device: torch.device,
                 system_prompt: bool = True, seed: int = 0) -> HartParts:
    """All components with random weights, built directly on the device (no files): for benchmarks."""
    transformer = random_transformer(arch, tok, seed, device)
    transformer.drop_training_buffers()
    tokenizer = byte_tokenizer()
    qwen = random_qwen2(text, len(tokenizer), seed + 2, device)
    return HartParts(arch, tok, transformer, random_tokenizer(tok, seed + 1, device),
                     QwenTextEncoder(tokenizer, qwen, arch.context_token, system_prompt, device))


def _training_buffers(arch: TransformerArch) -> dict[str, torch.Tensor]:
    """The official training-time level ids and block-causal mask, which its state dict carries."""
    levels = torch.cat([torch.zeros(arch.context_token, dtype=torch.long)]
                       + [torch.full((p * p,), i + 1) for i, p in enumerate(arch.patch_nums[1:])])
    bias = torch.where(levels[:, None] >= levels[None, :], 0.0, -torch.inf)
    return {"lvl_1L": levels[None], "attn_bias_for_masking": bias[None, None]}


def write_llm(folder: Path, arch: TransformerArch, tok: TokenizerArch, seed: int, dtype: torch.dtype) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = {**asdict(arch), "model_type": "hart_transformer_t2i", "architectures": ["HARTForT2I"],
              "attn_type": "llama", "mlp_type": "llama", "attn_l2_norm": True, "sep_aln_pooling_mode": "max",
              "disable_aln": False, "shared_aln": False, "use_cross_attn": False, "use_timestep_embed": False,
              "sampler": "iddpm", "diffusion_batch_mul": 4, "context_norm_scale": 1.0}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    model = random_transformer(arch, tok, seed, torch.device("cpu"))
    model.drop_training_buffers()
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    torch.save({**state, **_training_buffers(arch)}, folder / "ema_model.bin")


def write_tokenizer(folder: Path, tok: TokenizerArch, patch_nums: tuple[int, ...], seed: int,
                    dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {**asdict(tok), "model_type": "hart_autoencoder_with_disc", "quantizer_type": "var_hybrid",
              "hybrid": False, "v_patch_nums": list(patch_nums), "using_znorm": False, "quant_conv_ks": 3}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    model = random_tokenizer(tok, seed, torch.device("cpu"))
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    generator, C = torch.Generator().manual_seed(seed), tok.z_channels
    state |= {"vae.quant_conv.weight": torch.randn(C, C, 3, 3, generator=generator),  # training-only entries
              "vae.quantize.ema_vocab_hit_SV": torch.zeros(len(patch_nums), tok.vocab_size),
              "disc.main.0.weight": torch.randn(64, 3, 4, 4, generator=generator)}
    save_file(state, str(folder / "model.safetensors"))


def write_text_encoder(folder: Path, text: TextArch, seed: int, dtype: torch.dtype) -> None:
    tokenizer = byte_tokenizer()
    tokenizer.save_pretrained(folder)
    random_qwen2(text, len(tokenizer), seed, torch.device("cpu")).to(dtype).save_pretrained(folder)


def write_folders(root: Path, arch: TransformerArch, tok: TokenizerArch, text: TextArch, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> Folders:
    """All three folders under `root`, with random weights from `seed` (the same as `random_parts`')."""
    if text.hidden_size != arch.context_dim:
        raise ValueError(f"the text encoder's hidden_size {text.hidden_size} must be context_dim {arch.context_dim}")
    folders = Folders(root / "llm", root / "tokenizer", root / "text_encoder")
    write_llm(folders.llm, arch, tok, seed, dtype)
    write_tokenizer(folders.tokenizer, tok, arch.patch_nums, seed + 1, dtype)
    write_text_encoder(folders.text_encoder, text, seed + 2, dtype)
    return folders
