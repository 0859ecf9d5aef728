"""Packed sparse stages (`sparsevar.packing`): in a batch whose images keep different numbers of tokens, the
linear layers of every backend see the real tokens only, and the images stay those of single runs."""

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from sparsevar import packing
from sparsevar.backends import build_backend
from sparsevar.backends.hart.backend import HartBackend, load_parts
from sparsevar.backends.hart.config import HartConfig
from sparsevar.backends.hart.testing import TINY_ARCH, TINY_TOK, TextArch, write_folders
from sparsevar.backends.infinity.testing import write_checkpoints
from sparsevar.backends.tiny.backend import TinyBackend
from sparsevar.backends.tiny.config import TinyConfig
from sparsevar.config import SamplingConfig, SparseVARConfig
from sparsevar.generate import Request, generate
from sparsevar.packing import MIN_PADDING_TO_PACK, Padding, worth_packing

CPU = torch.device("cpu")


def pixels(results) -> list[bytes]:
    return [r.pixels_HWC.tobytes() for r in results]


REQUESTS = [Request("a red cat on a sofa", 1), Request("mountains at dawn", 2, "blurry, dark"),
            Request("two triangles", 3)]


def test_pack_unpack_and_per_token_follow_the_valid_mask():
    valid_Rn = torch.tensor([[True, True, True, False], [True, False, False, False], [True, True, True, True]])
    x_RnC = torch.randn(3, 4, 5)
    packing = Padding(valid_Rn, tokens=8)
    packed_1NC = packing.pack(x_RnC)
    assert torch.equal(packed_1NC[0], x_RnC[valid_Rn])
    unpacked = packing.unpack(packed_1NC)
    assert torch.equal(unpacked[valid_Rn], x_RnC[valid_Rn]) and not unpacked[~valid_Rn].any()
    scores_Rn = packing.unpack(packed_1NC[..., 0])  # per-token scores: no channel dimension
    assert torch.equal(scores_Rn, unpacked[..., 0])
    mod_R1C = torch.randn(3, 1, 5)
    assert torch.equal(packing.per_token(mod_R1C)[0], mod_R1C.expand(3, 4, 5)[valid_Rn])


def test_only_enough_padding_is_packed_away():
    valid_Rn = torch.ones(2, 8, dtype=torch.bool)  # only the count decides
    for tokens in range(1, 17):
        padded_share = 1 - tokens / 16
        assert (worth_packing(Padding(valid_Rn, tokens)) is not None) == (padded_share >= MIN_PADDING_TO_PACK)
    assert worth_packing(None) is None


def tiny():
    return TinyBackend(TinyConfig(dim=64, depth=4, heads=2, patch_sizes=[1, 2, 3, 4, 6, 8, 12, 16],
                                  decoder_channels=16), SamplingConfig(), CPU)


def infinity(tmp_path, dtype: torch.dtype):
    return build_backend(write_checkpoints(tmp_path, seed=0), SamplingConfig(cfg=3.0), "cpu", str(dtype)[6:])


def hart(tmp_path, dtype: torch.dtype):
    folders = write_folders(tmp_path, TINY_ARCH, TINY_TOK, TextArch(hidden_size=TINY_ARCH.context_dim))
    cfg = HartConfig(llm=str(folders.llm), tokenizer=str(folders.tokenizer), text_encoder=str(folders.text_encoder))
    return HartBackend(cfg, SamplingConfig(cfg=4.5, top_p=1.0), load_parts(cfg, CPU, dtype), CPU, dtype)


MLP_INPUT = {"tiny": lambda b: b.model.transformer.blocks[0].mlp[0], "infinity": lambda b: b.model.blocks[0].ffn.fc1,
             "hart": lambda b: b.model.blocks[0].ffn.gate_proj}


@contextmanager
def rows_into(linear: torch.nn.Module) -> Iterator[list[int]]:
    """The number of token rows of each call of a linear layer (one call per stage)."""
    rows: list[int] = []
    handle = linear.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[:-1].numel()))
    try:
        yield rows
    finally:
        handle.remove()


@pytest.mark.parametrize(("name", "dtype"), [("tiny", torch.float32), ("infinity", torch.float32),
                                             ("hart", torch.float32), ("infinity", torch.bfloat16),
                                             ("hart", torch.bfloat16)])
def test_padded_stages_run_only_real_tokens_through_linear_layers(name, dtype, tmp_path, monkeypatch):
    backend = tiny() if name == "tiny" else {"infinity": infinity, "hart": hart}[name](tmp_path, dtype)
    sv = SparseVARConfig(tau=0.5, start_stage=4, score_block=2, anchor_grid=2)
    with rows_into(MLP_INPUT[name](backend)) as rows:
        batched = generate(backend, REQUESTS, sv)
    branches = backend.branches(backend.begin(["x"], [None], 1.0))
    kept_by_stage = list(zip(*[[s.kept for s in r.stages] for r in batched], strict=True))

    def packed(kept: tuple[int, ...]) -> bool:
        return 1 - sum(kept) / (len(kept) * max(kept)) >= MIN_PADDING_TO_PACK

    assert any(packed(kept) for kept in kept_by_stage), "no stage packed: the test would prove nothing"
    # stage 1 of HART also runs the text context; later stages run the kept tokens of every row, and the padding
    # too where there is little of it
    assert rows[1:] == [branches * (sum(kept) if packed(kept) else len(kept) * max(kept)) for kept in kept_by_stage[1:]]
    monkeypatch.setattr(packing, "MIN_PADDING_TO_PACK", 1.0)  # nothing packed: the same batch run padded
    with rows_into(MLP_INPUT[name](backend)) as padded_rows:
        assert pixels(generate(backend, REQUESTS, sv)) == pixels(batched)
    assert padded_rows[1:] == [branches * len(kept) * max(kept) for kept in kept_by_stage[1:]]
    if dtype == torch.float32:  # in bf16 a batch's images differ from single runs with or without packing
        assert pixels([generate(backend, [r], sv)[0] for r in REQUESTS]) == pixels(batched)


def test_cuda_graph_mode_runs_padded_stages_padded(tmp_path):
    """A graph replays fixed shapes, and padded ones repeat across batches where packed ones would not. (HART's
    test stages are too small to pad once graph mode rounds kept counts up to 64.)"""
    backend = infinity(tmp_path, torch.float32)
    with pytest.warns(UserWarning, match="emulates"):
        backend.use_cuda_graphs(True)
    with rows_into(MLP_INPUT["infinity"](backend)) as rows:
        batched = generate(backend, REQUESTS, SparseVARConfig(tau=0.5, start_stage=4, score_block=2, anchor_grid=2))
    branches = backend.branches(backend.begin(["x"], [None], 1.0))
    kept_by_stage = list(zip(*[[s.kept for s in r.stages] for r in batched], strict=True))
    assert any(1 - sum(kept) / (len(kept) * max(kept)) >= MIN_PADDING_TO_PACK for kept in kept_by_stage)
    assert rows[1:] == [branches * len(kept) * max(kept) for kept in kept_by_stage[1:]]
