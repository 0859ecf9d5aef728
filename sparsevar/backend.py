"""What a model backend supplies to the shared generation loop (`sparsevar.generate`).

A backend owns the model; the loop owns stage order, token selection and statistics. Rows of every forward
are the images' conditional rows first, then (with guidance) their unconditional rows: R = branches * B.
Per-generation tensors (text, key/value caches, the running residual sum) live in a backend-defined state
object, so one backend instance serves any number of generations.
"""

from typing import Any, Protocol

import numpy as np
import torch

from sparsevar.fastvar import StagePruning
from sparsevar.packing import Padding


class Backend(Protocol):
    name: str
    device: torch.device
    depth: int  # transformer blocks
    dim: int  # hidden width
    block_params: int  # parameters of one block, for the spec's cost model
    kept_multiple: int  # kept tokens per image are rounded up to a multiple of this (1: exact; see plan_stage)

    def schedule(self, h_div_w: float) -> list[tuple[int, int]]:
        """Token-map sizes (h, w) of every stage, coarse to fine."""

    def begin(self, prompts: list[str], negative_prompts: list[str | None], h_div_w: float) -> Any:
        """Encode the text and return a fresh state (empty caches, zero residual sum)."""

    def branches(self, state: Any) -> int:
        """Rows per image in a forward: 2 with classifier-free guidance, else 1."""

    def stage_input(self, state: Any, stage: int) -> torch.Tensor:
        """Input tokens of a stage (from 1) over its full grid, (R, h*w, C), before any embedding."""

    def forward(
        self,
        state: Any,
        x_RnC: torch.Tensor,
        stage: int,
        positions_Rn: torch.Tensor | None,
        padding: Padding | None,
        capture_block: int | None,
        prune: StagePruning | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run blocks 1..N and the head on the given tokens of a stage.

        positions_Rn: flat grid positions of x's tokens (None: the whole grid in order); padding: where a batch
        pads images to its largest kept count (None: nowhere); padding rows must add nothing the cache lets later
        stages see, and need not run outside attention (`sparsevar.packing`). Only these tokens enter the
        key/value cache. Returns per-token predictions (R, n, V) and, when capture_block (from 1) is given,
        that block's per-token change (R, n) (`sparse.block_scores`, the spec's step 1), so that no hidden
        state outlives the forward. Both may be overwritten by the next forward (CUDA graphs reuse memory).
        prune: FastVAR's work at this stage (`sparsevar.fastvar`): each block hands each sub-layer's branch to
        `prune.branch`, and the stage runs unpacked.
        """

    def sample(
        self, state: Any, pred_RnV: torch.Tensor, stage: int, generators: list[torch.Generator],
        positions_Bn: torch.Tensor | None,
    ) -> torch.Tensor:
        """Guide and sample predictions into residual tokens (B, n, C). Random draws are made per image over
        its full grid and taken at `positions_Bn`, so a token gets the same draw whatever else is kept."""

    def drop_guidance(self, state: Any) -> None:
        """From the next stage on, run each image's conditional row alone (`speedups.guidance_stages`): keep the
        first B rows of everything per row in the state (caches, text, conditioning) and set its branches to 1,
        so that sampling goes unguided. Never called with CUDA graphs, which hold the rows they were captured on."""

    def accumulate(self, state: Any, tokens_BLC: torch.Tensor, stage: int) -> None:
        """Add a stage's full map of residual tokens to the running sum."""

    def decode(self, state: Any) -> np.ndarray:
        """Images (B, H, W, 3) uint8 RGB from the running sum."""
