"""Configuration of the `tiny` backend: an Infinity-like model at toy size that runs on one CPU core."""

from typing import Literal

from pydantic import Field, field_validator

from sparsevar.config import StrictModel


class TinyConfig(StrictModel):
    backend: Literal["tiny"] = "tiny"
    dim: int = Field(128, ge=8)
    depth: int = Field(6, ge=1)
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    bits: int = Field(16, ge=1, description="BSQ code length; the head predicts 2 logits per bit")
    patch_sizes: list[int] = Field(
        default=[1, 2, 3, 4, 6, 8, 10, 13, 16, 20, 24, 32],
        description="side of the square token map of each stage; other aspect ratios scale it",
    )
    text_dim: int = Field(64, ge=8)
    text_depth: int = Field(2, ge=1)
    text_heads: int = Field(4, ge=1)
    max_text_tokens: int = Field(64, ge=1)
    decoder_channels: int = Field(32, ge=4)
    upsample: int = Field(1, ge=0, description="number of 2x upsamplings from the last token map to pixels")
    seed: int = Field(0, description="seed of the random weights when no `weights` file is given")
    weights: str | None = Field(
        None, description="state dict (.pt or .safetensors) to load instead, or `demo` for the shipped demo model"
    )

    @property
    def image_side(self) -> int:
        """Side in pixels of a square picture: the last token map, upsampled."""
        return self.patch_sizes[-1] * 2**self.upsample

    @field_validator("patch_sizes")
    @classmethod
    def _increasing(cls, sizes: list[int]) -> list[int]:
        if not sizes or sizes[0] != 1 or any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)):
            raise ValueError("patch_sizes must start at 1 and strictly increase, e.g. [1, 2, 4, 8]")
        return sizes

    @field_validator("heads")
    @classmethod
    def _heads_divide(cls, heads: int, info) -> int:
        dim = info.data.get("dim")
        if dim is not None and (dim % heads or (dim // heads) % 4):
            raise ValueError(f"dim={dim} must split into {heads} heads of a size divisible by 4 (2-D RoPE)")
        return heads
