"""Random-weight HART folders in the official layout, for tests and benchmarks that must go through the real
loader: llm/ (config.json, ema_model.bin), tokenizer/ (config.json, model.safetensors with a few training-only
entries beside the inference ones) and a Qwen2 text encoder folder with an offline byte-level tokenizer.

The byte-level tokenizer stands in for Qwen's BPE vocabulary, which cannot be built offline: one token per
UTF-8 byte, padding with <|endoftext|> on the right as Qwen's tokenizer does.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sparsevar.backends.hart.folders import TokenizerArch, TransformerArch
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


@dataclass(frozen=True)
class Folders:
    llm: Path
    tokenizer: Path
    text_encoder: Path


def _randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Default initialisation plus noise on every parameter, so that no weight (zero biases, unit norms) is inert."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)


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
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HartTransformer(arch, tok)
    _randomise(model, generator)
    state = {k: v if k in ("lvl_1L", "attn_bias_for_masking") else v.to(dtype) for k, v in model.state_dict().items()}
    torch.save({**state, **_training_buffers(arch)}, folder / "ema_model.bin")


def write_tokenizer(folder: Path, tok: TokenizerArch, patch_nums: tuple[int, ...], seed: int,
                    dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {**asdict(tok), "model_type": "hart_autoencoder_with_disc", "quantizer_type": "var_hybrid",
              "hybrid": False, "v_patch_nums": list(patch_nums), "using_znorm": False, "quant_conv_ks": 3}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HybridTokenizer(tok)
    _randomise(model, generator)
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    C = tok.z_channels
    state |= {"vae.quant_conv.weight": torch.randn(C, C, 3, 3, generator=generator),  # training-only entries
              "vae.quantize.ema_vocab_hit_SV": torch.zeros(len(patch_nums), tok.vocab_size),
              "disc.main.0.weight": torch.randn(64, 3, 4, 4, generator=generator)}
    save_file(state, str(folder / "model.safetensors"))


def write_text_encoder(folder: Path, text: TextArch, seed: int, dtype: torch.dtype) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2Model

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    byte_level = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=byte_level, pad_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", padding_side="right")
    tokenizer.save_pretrained(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = Qwen2Config(vocab_size=len(vocab), max_position_embeddings=4096, **asdict(text))
        Qwen2Model(config).to(dtype).save_pretrained(folder)


def write_folders(root: Path, arch: TransformerArch, tok: TokenizerArch, text: TextArch, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> Folders:
    """All three folders under `root`, with random weights from `seed`."""
    if text.hidden_size != arch.context_dim:
        raise ValueError(f"the text encoder's hidden_size {text.hidden_size} must be context_dim {arch.context_dim}")
    folders = Folders(root / "llm", root / "tokenizer", root / "text_encoder")
    write_llm(folders.llm, arch, tok, seed, dtype)
    write_tokenizer(folders.tokenizer, tok, arch.patch_nums, seed + 1, dtype)
    write_text_encoder(folders.text_encoder, text, seed + 2, dtype)
    return folders
