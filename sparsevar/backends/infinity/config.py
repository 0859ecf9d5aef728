"""Configuration of the `infinity` backend: the official Infinity checkpoints and the architecture they hold.

Defaults are Infinity-2B's (`tools/run_infinity.py`, model_type infinity_2b, vae_type 32); Infinity-8B sets
dim 3584, depth 40, heads 28, vae_bits 14, spatial_patchify true and a 4-level VAE (configs/infinity-8b.yaml).
Checkpoint fields take a local path, an s3:// or an hf:// URI; `storage.checkpoints.localize_checkpoints` turns
URIs into local paths (downloaded once per node) before the backend is built, and the backend reads local paths
only.
"""

from typing import Literal

from pydantic import Field, model_validator

from sparsevar.config import StrictModel, cuda_graphs_field

Resolution = Literal["0.06M", "0.25M", "0.60M", "1M"]


class InfinityConfig(StrictModel):
    backend: Literal["infinity"] = "infinity"

    transformer: str = Field(description="infinity_2b_reg.pth (a state dict), or a folder of shards with an index")
    transformer_sha256: str | None = None
    transformer_size: int | None = Field(None, ge=1, description="bytes; a folder of shards is not size-checked")
    vae: str = Field(description="infinity_vae_d32reg.pth (d56 for 8B): a dict holding the VAE under 'vae'")
    vae_sha256: str | None = None
    vae_size: int | None = Field(None, ge=1)
    text_encoder: str = Field(description="folder of google/flan-t5-xl: config, weights and tokenizer files")

    dim: int = Field(2048, ge=8, description="embed_dim")
    depth: int = Field(32, ge=1)
    heads: int = Field(16, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    block_chunks: int = Field(8, ge=1, description="blocks are stored as block_chunks.{i}.module.{j}")
    text_channels: int = Field(2048, ge=128, description="T5 width (Ct5)")
    text_max_tokens: int = Field(512, ge=1, description="T5 padding length and rows of cfg_uncond")
    vae_bits: int = Field(32, ge=1, description="BSQ code length of the VAE (vae_type)")
    spatial_patchify: bool = Field(False, description="a token holds 2x2 VAE latents (4 * vae_bits channels)")
    vae_base_channels: int = Field(128, ge=8)
    vae_channel_mult: list[int] = Field(default=[1, 2, 4, 4, 4], min_length=1)
    vae_res_blocks: int = Field(2, ge=1)
    resolution: Resolution = Field("1M", description="official `pn`: 1M is the 13-stage 1024-level schedule")
    cuda_graphs: bool = cuda_graphs_field()

    @model_validator(mode="after")
    def _shapes_fit(self) -> "InfinityConfig":
        head_dim, rest = divmod(self.dim, self.heads)
        if rest or head_dim % 4:
            raise ValueError(f"dim={self.dim} must split into {self.heads} heads of a size divisible by 4 (2-D RoPE)")
        if self.depth % self.block_chunks:
            raise ValueError(f"depth={self.depth} must be a multiple of block_chunks={self.block_chunks}")
        pool_heads = self.text_pool_heads
        if self.text_channels % pool_heads or self.dim % pool_heads:
            raise ValueError(f"text_channels={self.text_channels} and dim={self.dim} must split into the text pool's "
                             f"{pool_heads} heads")
        return self

    @property
    def text_pool_heads(self) -> int:
        """Heads of the pooled start token's attention: text_channels // 128 (// 64 above dim 4096)."""
        return self.text_channels // (64 if self.dim > 4096 else 128)

    @property
    def token_channels(self) -> int:
        """Channels of one transformer token: the VAE code, times 4 when 2x2 latents are patchified."""
        return self.vae_bits * (4 if self.spatial_patchify else 1)

    def checkpoints(self) -> dict[str, tuple[str, str | None, int | None]]:
        """Checkpoint fields to resolve to local paths: field -> (uri, sha256, size)."""
        return {
            "transformer": (self.transformer, self.transformer_sha256, self.transformer_size),
            "vae": (self.vae, self.vae_sha256, self.vae_size),
            "text_encoder": (self.text_encoder, None, None),
        }
