"""Random-weight Infinity parts for tests and benchmarks, and files in the official checkpoint layout.

`write_checkpoints` saves a transformer state dict, a VAE file (`{'vae': state_dict}`) and a T5 folder (a
random T5 encoder saved with `save_pretrained` and a character-level tokenizer built offline), so tests load
them through the same loader as the released files. Benchmarks build the same parts in memory on the GPU.
"""

import math
import string
from pathlib import Path

import torch
from torch import nn

from sparsevar.backends.infinity.config import InfinityConfig
from sparsevar.backends.infinity.model import Infinity
from sparsevar.backends.infinity.vae import VAE

# A small Infinity of the released module structure: 4 blocks in 2 chunks, a 2-level VAE (2x upsampling),
# 8-bit codes and the 7-stage 0.06M schedule (16x16 tokens, 32x32 pixels).
TINY = dict(dim=64, depth=4, heads=2, block_chunks=2, text_channels=128, text_max_tokens=32, vae_bits=8,
            vae_base_channels=32, vae_channel_mult=[1, 2], vae_res_blocks=1, resolution="0.06M")


# flan-t5-xl's encoder dimensions, for benchmarks with a random text encoder of the real cost.
T5_XL = dict(layers=24, heads=32, d_ff=5120, vocab=32128)


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Give every floating parameter a reproducible random value at a scale that keeps activations sane."""
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in module.named_parameters():
        gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
        if name.endswith("scale_mul_1H11"):
            p.fill_(math.log(4.0))
        elif p.ndim >= 2 and not name.endswith(("ada_gss", "cfg_uncond", "pos_start", "mat_q")):
            p.normal_(generator=gen).div_(math.sqrt(p[0].numel()))
        else:
            p.normal_(generator=gen).mul_(0.02 if name.endswith("bias") else 0.5)
        if name.endswith(("norm.weight", "ca_norm.weight", "text_norm.weight")):
            p.add_(1.0)
    return module


def random_parts(cfg: InfinityConfig, seed: int = 0, device: str | torch.device = "cpu") -> tuple[Infinity, VAE]:
    """A transformer and a VAE with random weights, built on `device`."""
    with torch.device(device):
        return randomize_(Infinity(cfg), seed), randomize_(VAE(cfg), seed + 1)


def offline_tokenizer():
    """A T5-style tokenizer (unigram over characters and word starts, `</s>` appended) built without files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = ["<pad>", "</s>", "<unk>", "▁"] + list(string.ascii_letters + string.digits + string.punctuation)
    pieces += ["▁" + c for c in string.ascii_lowercase]
    tok = Tokenizer(models.Unigram([(p, -1.0 if p.startswith("▁") else -2.0) for p in pieces], unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def random_t5(d_model: int, layers: int = 1, heads: int = 4, d_ff: int | None = None, vocab: int = 128,
              seed: int = 0, device: str | torch.device = "cpu"):
    """A random T5 encoder of width d_model (feeding Infinity's text_channels)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab, d_model=d_model, d_kv=d_model // heads, d_ff=d_ff or 2 * d_model,
                      num_layers=layers, num_heads=heads, feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    torch.manual_seed(seed)
    with torch.device(device):
        return T5EncoderModel(config)


def write_checkpoints(folder: str | Path, cfg_fields: dict | None = None, seed: int = 0) -> InfinityConfig:
    """Random weights saved as the official files under `folder`; returns the config that points at them."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    fields = {**TINY, **(cfg_fields or {})}
    paths = dict(transformer=str(root / "infinity.pth"), vae=str(root / "vae.pth"), text_encoder=str(root / "t5"))
    cfg = InfinityConfig(**fields, **paths)
    transformer, vae = random_parts(cfg, seed)
    torch.save(transformer.state_dict(), paths["transformer"])
    torch.save({"vae": vae.state_dict()}, paths["vae"])
    tokenizer = offline_tokenizer()
    tokenizer.save_pretrained(paths["text_encoder"])
    random_t5(cfg.text_channels, vocab=len(tokenizer), seed=seed).save_pretrained(paths["text_encoder"])
    return cfg
