"""The generation loop's stages never wait on the device, except for the one read a sparse stage needs (its kept
counts set the shape of what runs). Counted on the CPU, where every read of a tensor's value into Python would be
a host-device synchronisation on a GPU; no timing."""

import statistics

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparsevar.config import SamplingConfig, SparseVARConfig
from sparsevar.generate import Request, generate

READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")


def infinity_backend(cuda_graphs: bool = False, dtype: torch.dtype = torch.float32):
    from sparsevar.backends.infinity.backend import InfinityBackend, InfinityParts
    from sparsevar.backends.infinity.config import InfinityConfig
    from sparsevar.backends.infinity.testing import TINY, offline_tokenizer, random_parts, random_t5
    from sparsevar.backends.infinity.text import T5Text

    cfg = InfinityConfig(transformer="-", vae="-", text_encoder="-", cuda_graphs=cuda_graphs, **TINY)
    transformer, vae = random_parts(cfg)
    tokenizer, cpu = offline_tokenizer(), torch.device("cpu")
    text = T5Text(tokenizer, random_t5(cfg.text_channels, vocab=len(tokenizer)), cpu, cfg.text_max_tokens)
    return InfinityBackend(cfg, SamplingConfig(cfg=4.0), InfinityParts(transformer, vae, text), cpu, dtype), 5


def hart_backend(cuda_graphs: bool = False, dtype: torch.dtype = torch.float32):
    from sparsevar.backends.hart.backend import HartBackend
    from sparsevar.backends.hart.config import HartConfig
    from sparsevar.backends.hart.testing import TINY_ARCH, TINY_TOK, TextArch, random_parts

    cpu = torch.device("cpu")
    parts = random_parts(TINY_ARCH, TINY_TOK, TextArch(hidden_size=TINY_ARCH.context_dim), cpu)
    return HartBackend(HartConfig(llm="-", tokenizer="-", text_encoder="-", cuda_graphs=cuda_graphs),
                       SamplingConfig(cfg=4.5, top_p=1.0), parts, cpu, dtype), 4


@pytest.fixture(scope="module", params=["infinity", "infinity-graphs", "hart", "hart-graphs"])
def backend(request):
    """With CUDA graphs a read inside a stage's forward would fail the capture: the emulated replays count too."""
    make = hart_backend if request.param.startswith("hart") else infinity_backend
    return make(cuda_graphs=request.param.endswith("graphs"))


def stage_reads(backend, sv: SparseVARConfig, monkeypatch) -> int:
    """Reads of tensor values into Python between the end of `begin` (text) and the start of `decode`."""
    counting, reads = [False], [0]
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads[0] += counting[0]
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def begin(*args, _begin=backend.begin):
        state = _begin(*args)
        counting[0] = True
        return state

    def decode(*args, _decode=backend.decode):
        counting[0] = False
        return _decode(*args)

    monkeypatch.setattr(backend, "begin", begin)
    monkeypatch.setattr(backend, "decode", decode)
    generate(backend, [Request("a red fox", 1), Request("a lighthouse", 2)], sv)
    monkeypatch.undo()
    return reads[0]


@pytest.mark.parametrize("update", [{"normalize": "quantile"}, {"anchor_grid": 0}, {"fill": "code"},
                                    {"anchor_grid": 0, "tau": 1.5}, {"tau": 0.0}])
def test_a_dense_stage_reads_nothing_and_a_sparse_stage_one_value(backend, update, monkeypatch):
    backend, start_stage = backend
    sv = SparseVARConfig(tau=0.6, start_stage=start_stage, score_block=2).model_copy(update=update)
    stages = len(backend.schedule(1.0))
    assert stage_reads(backend, sv.model_copy(update={"enabled": False}), monkeypatch) == 0
    assert stage_reads(backend, sv, monkeypatch) == stages - start_stage + 1


class WritingOps(TorchDispatchMode):
    """Counts ops that write memory (a new output or an in-place update): on a GPU, one kernel launch each."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        outputs = [o for o in (out if isinstance(out, tuple | list) else [out]) if isinstance(o, torch.Tensor)]
        in_place = func.overloadpacket.__name__.endswith("_")
        self.count += in_place or any(o.untyped_storage().data_ptr() not in inputs for o in outputs)
        return out


@pytest.mark.parametrize(("make", "most"), [(infinity_backend, 42), (hart_backend, 45)])
def test_a_block_launches_few_kernels_under_bf16_autocast(make, most, monkeypatch):
    """At batch 1 a stage costs its launches (Infinity-2B: 25 ms for 32 blocks on an H200), so a block's op count
    is a budget: queries and keys share their normalise, scale and RoPE kernels; no dtype round trips."""
    backend, _ = make(dtype=torch.bfloat16)
    block_class, counts = type(backend.model.blocks[0]), []

    def counted(self, *args, _forward=block_class.forward, **kwargs):
        with WritingOps() as ops:
            out = _forward(self, *args, **kwargs)
        counts.append(ops.count)
        return out

    monkeypatch.setattr(block_class, "forward", counted)
    generate(backend, [Request("a red fox", 1)], SparseVARConfig(enabled=False))
    assert statistics.median(counts) <= most


@pytest.mark.parametrize("make", [infinity_backend, hart_backend])
def test_a_packed_stage_reads_nothing_more(make, monkeypatch):
    """Packing takes its token count from the host (the kept counts), so it adds no wait on the device."""
    from sparsevar.packing import Padding

    backend, start_stage = make()
    packs, pack = [0], Padding.pack

    def counted(self, x_RnC, _pack=pack):
        packs[0] += 1
        return _pack(self, x_RnC)

    sv = SparseVARConfig(tau=0.5, start_stage=start_stage, score_block=2)
    stages = len(backend.schedule(1.0))
    with monkeypatch.context() as patch:
        patch.setattr(Padding, "pack", counted)
        reads = stage_reads(backend, sv, monkeypatch)
    assert packs[0] > 0 and reads == stages - start_stage + 1
