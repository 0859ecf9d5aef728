"""The padding of a batched sparse stage, and packing it away.

A batched sparse stage pads every image to the batch's largest kept count (`plan_stage`, the spec's Batches
section). With min-max scores the counts differ a lot between images, and the padding would run through every
linear layer for nothing. Packed, the residual stream, norms, linear layers and MLPs see the real tokens only,
(1, N, C); the attention cores, which need a rectangle of queries per row, unpack to (R, n, ·) and pack their
output again.
"""

from functools import cached_property

import torch

MIN_PADDING_TO_PACK = 0.125  # below this share of a stage's slots the gathers cost about what packing saves


class Padding:
    """Which of a stage's (R, n) token slots hold real tokens (valid_Rn, real ones first in each row) and how many
    (tokens: known on the host from the kept counts, so packing never reads the device)."""

    def __init__(self, valid_Rn: torch.Tensor, tokens: int) -> None:
        self.valid_Rn, self.tokens = valid_Rn, tokens
        self.rows, self.n = valid_Rn.shape

    @cached_property
    def flat_N(self) -> torch.Tensor:
        """Flat indices into R*n of the real tokens, in order (a stable sort puts them first)."""
        return (~self.valid_Rn).flatten().to(torch.int8).argsort(stable=True)[: self.tokens]

    @cached_property
    def row_N(self) -> torch.Tensor:
        """The row of each real token, for per-row tensors."""
        return self.flat_N // self.n

    def pack(self, x_RnC: torch.Tensor) -> torch.Tensor:
        """(R, n, C) -> (1, N, C), the real tokens in row-major order."""
        return x_RnC.reshape(self.rows * self.n, -1).index_select(0, self.flat_N).unsqueeze(0)

    def unpack(self, x_1N: torch.Tensor) -> torch.Tensor:
        """(1, N, ...) -> (R, n, ...), zeros on padding: hidden states and logits (C), or per-token scores."""
        rest = x_1N.shape[2:]
        out = x_1N.new_zeros(self.rows * self.n, *rest)
        return out.index_copy_(0, self.flat_N, x_1N[0]).view(self.rows, self.n, *rest)

    def per_token(self, t_R1C: torch.Tensor) -> torch.Tensor:
        """A per-row tensor (an AdaLN modulation) repeated for each real token of its row: (R, 1, C) -> (1, N, C)."""
        return t_R1C.reshape(self.rows, -1).index_select(0, self.row_N).unsqueeze(0)


def worth_packing(padding: Padding | None) -> Padding | None:
    """The padding to pack away, or None where there is too little of it to pay for the gathers: on the CPU
    benchmark model a stage with a fifth of its slots padded ran 5-10 % faster packed, one with 3 % no faster."""
    if padding is None or padding.tokens > (1 - MIN_PADDING_TO_PACK) * padding.rows * padding.n:
        return None
    return padding
