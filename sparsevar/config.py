"""Configuration of the algorithm and of sampling: the `sparsevar` and `sampling` config sections.

Validated with pydantic so that an unknown key or a bad value is rejected, by name, before any work starts.
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def cuda_graphs_field() -> Any:
    """The `model.cuda_graphs` switch of the backends that support it (`sparsevar.graphs`)."""
    return Field(False, description="replay each stage's transformer forward as a CUDA graph, for small batches "
                 "where kernel launches set the time; kept counts are rounded up to a multiple of 64 (the extra "
                 "tokens run) so that shapes repeat")


class SparseVARConfig(StrictModel):
    """SparseVAR parameters, named and counted as in `shared/spec/sparsevar.md`."""

    enabled: bool = True
    tau: float = Field(0.6, ge=0.0, description="exclusion threshold on the normalised score")
    start_stage: int = Field(10, ge=1, description="first stage that may exclude tokens, from 1 (P)")
    score_block: int = Field(16, ge=1, description="block whose input and output are compared, from 1 (s)")
    anchor_grid: int = Field(4, ge=0, description="one anchor per α×α cell; 0 disables anchors (α)")
    normalize: Literal["minmax", "quantile"] = "minmax"
    fill: Literal["logits", "code"] = "logits"
    selection: Literal["frequency", "random"] = Field(
        "frequency", description="`random`: a baseline for quality studies that excludes random tokens, ranked "
        "uniformly per image, in place of the low-frequency ones"
    )


class FastVARConfig(StrictModel):
    """FastVAR's cached token pruning (`sparsevar.fastvar`) at the stages `prune` names; empty: off. Released
    settings at 1024²: Infinity-2B prune {10: 0.4, 11: 0.5}, cache_stage 9, layers [4, 28], with
    skip_last_stages 2; HART-0.7B prune {13: 0.5, 14: 0.75}, cache_stage 12."""

    prune: dict[int, float] = Field(default_factory=dict, description="stage (from 1) -> fraction r of its tokens "
                                    "that each pruned sub-layer leaves out")
    cache_stage: int | None = Field(None, ge=1, description="the stage, before every pruned one and never pruned, "
                                    "whose sub-layer outputs the left-out tokens take, upsampled")
    layers: tuple[int, int] | None = Field(None, description="first and last block (from 1) that prune; none: all")

    @model_validator(mode="after")
    def _consistent(self) -> "FastVARConfig":
        if not self.prune:
            return self
        if any(stage < 1 or not 0.0 <= r < 1.0 for stage, r in self.prune.items()):
            raise ValueError(f"prune maps stages (from 1) to fractions in [0, 1), got {self.prune}")
        if self.cache_stage is None or self.cache_stage >= min(self.prune):
            raise ValueError(f"cache_stage must be set and come before the first pruned stage {min(self.prune)}, "
                             f"got {self.cache_stage}")
        if self.layers is not None and not 1 <= self.layers[0] <= self.layers[1]:
            raise ValueError(f"layers must be [first, last] blocks from 1, got {list(self.layers)}")
        return self


class SpeedupConfig(StrictModel):
    """Training-free speed-ups beside SparseVAR, run by the same loop and combinable with it
    (`docs/accelerations.md`); each is off at its default, which gives the image of the loop without it."""

    skip_last_stages: int = Field(
        0, ge=0, description="K: the last K stages are not run, and the image is decoded from the stages before "
        "(every backend keeps their sum at the last grid, so this is their map upsampled)")
    fastvar: FastVARConfig = FastVARConfig()
    guidance_stages: int | None = Field(
        None, ge=1, description="N: classifier-free guidance on the first N stages only; the later stages run "
        "each image's conditional row alone (half the rows) and sample unguided. None: guidance on every stage")


class SamplingConfig(StrictModel):
    """Per-token sampling with classifier-free guidance, shared by the backends."""

    cfg: float = Field(3.0, ge=0.0, description="guidance scale; 1 with no negative prompt disables the uncond pass")
    temperature: float = Field(1.0, gt=0.0)
    top_k: int = Field(0, ge=0, description="0 keeps every value")
    top_p: float = Field(0.97, gt=0.0, le=1.0)
