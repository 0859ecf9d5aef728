"""Read the official HART folders: the sizes in their config.json files, and their weight files.

The official classes (`HARTForT2IConfig`, `HARTAutoEncoderWithDiscConfig`) write every constructor argument
into config.json; a key missing from a file takes that class's default. Options the released model does not
use are refused by name rather than silently run another architecture.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# What hart-0.7b-1024px reads as: the sizes `workflows.inspect` lists and the GPU benchmark builds when the
# folders are not at hand. Loading always takes the folders' own config.json instead.
HART_0_7B_PATCH_NUMS = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)


@dataclass(frozen=True)
class TokenizerArch:
    """The parts of the hybrid tokenizer that inference uses: codebook, Phi convolutions and decoder."""

    vocab_size: int = 4096
    z_channels: int = 32  # Cvae
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    double_decoder: bool = False


@dataclass(frozen=True)
class TransformerArch:
    """The transformer and its diffusion head, as `HARTForT2IConfig` sizes them."""

    context_token: int = 300
    context_dim: int = 1536
    embed_dim: int = 1536
    depth: int = 16
    num_heads: int = 24
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    patch_nums: tuple[int, ...] = HART_0_7B_PATCH_NUMS
    use_context_norm: bool = False
    diff_width: int = 1024
    diff_depth: int = 6
    num_sampling_steps: str = "8"

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        """LlamaMLP width: 2/3 of mlp_ratio·C, rounded up to a multiple of 256."""
        return int((self.embed_dim * self.mlp_ratio * 2) / 3 + 255) // 256 * 256

    @property
    def total_tokens(self) -> int:
        """Context tokens plus every image stage after the first (the first stage is the context's last token)."""
        return self.context_token + sum(p * p for p in self.patch_nums[1:])


# Options of the official config classes that HART-0.7B fixes; any other value is another architecture.
_FIXED_LLM = {"attn_type": "llama", "mlp_type": "llama", "attn_l2_norm": True, "sep_aln_pooling_mode": "max",
              "disable_aln": False, "shared_aln": False, "use_cross_attn": False, "use_timestep_embed": False,
              "sampler": "iddpm"}
_OFFICIAL_LLM_DEFAULTS = {"attn_type": "gpt2", "mlp_type": "gpt2", "attn_l2_norm": False,
                          "sep_aln_pooling_mode": "max", "disable_aln": False, "shared_aln": False,
                          "use_cross_attn": False, "use_timestep_embed": False, "sampler": "iddpm"}
_FIXED_TOKENIZER = {"quantizer_type": "var_hybrid"}
_OFFICIAL_TOKENIZER_DEFAULTS = {"quantizer_type": "var"}


def check_local(folder: str, role: str) -> Path:
    """The folder as a local directory, or an error naming the config key to fix."""
    if "://" in folder:
        raise ValueError(f"model.{role}={folder!r} is a URI: the hart backend reads local folders; "
                         "storage.checkpoints.localize_checkpoints fetches s3:// and hf:// folders onto the node")
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"HART {role} folder not found: {path} (set model.{role})")
    return path


def read_config(folder: Path, role: str) -> dict[str, Any]:
    config = folder / "config.json"
    try:
        return json.loads(config.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{config} is missing: model.{role} must point at the official {role} folder") \
            from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config} is not valid JSON: {exc}") from None


def _require(raw: dict[str, Any], fixed: dict[str, Any], defaults: dict[str, Any], where: Path) -> None:
    for key, wanted in fixed.items():
        found = raw.get(key, defaults[key])
        if found != wanted:
            raise ValueError(f"{where}: {key}={found!r} is not supported; HART-0.7B uses {wanted!r}")


def transformer_arch(folder: Path) -> TransformerArch:
    raw = read_config(folder, "llm")
    _require(raw, _FIXED_LLM, _OFFICIAL_LLM_DEFAULTS, folder / "config.json")
    official = TransformerArch(context_token=77, context_dim=768, embed_dim=1024, depth=16, num_heads=16,
                               patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16))  # the config class's defaults
    values = {name: raw.get(name, getattr(official, name)) for name in TransformerArch.__dataclass_fields__}
    values["patch_nums"] = tuple(values["patch_nums"])
    values["num_sampling_steps"] = str(values["num_sampling_steps"])
    arch = TransformerArch(**values)
    if arch.embed_dim % arch.num_heads or arch.head_dim % 4:
        raise ValueError(f"{folder}/config.json: embed_dim={arch.embed_dim} must split into {arch.num_heads} "
                         "heads of a size divisible by 4 (2-D RoPE)")
    return arch


def tokenizer_arch(folder: Path) -> TokenizerArch:
    raw = read_config(folder, "tokenizer")
    _require(raw, _FIXED_TOKENIZER, _OFFICIAL_TOKENIZER_DEFAULTS, folder / "config.json")
    official = TokenizerArch()  # the config class's defaults
    values = {name: raw.get(name, getattr(official, name)) for name in TokenizerArch.__dataclass_fields__}
    values["ch_mult"] = tuple(values["ch_mult"])
    arch = TokenizerArch(**values)
    if arch.share_quant_resi < 2 or abs(arch.quant_resi) <= 1e-6:
        raise ValueError(f"{folder}/config.json: only partially shared Phi (share_quant_resi >= 2, quant_resi "
                         f"!= 0) is supported, as HART-0.7B uses; got {arch.share_quant_resi}, {arch.quant_resi}")
    return arch


def archs(llm: str, tokenizer: str) -> tuple[TransformerArch, TokenizerArch]:
    """Both architectures from the folders' config.json files."""
    return transformer_arch(check_local(llm, "llm")), tokenizer_arch(check_local(tokenizer, "tokenizer"))


def weights_file(folder: Path, names: tuple[str, ...], role: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder} holds none of {', '.join(names)}: model.{role} must point at the official "
                            f"{role} folder with its weights")
