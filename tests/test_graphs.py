"""CUDA-graph mode of the Infinity and HART backends (`model.cuda_graphs`), on the CPU: the same workspace, keys
and bookkeeping run, and a replay calls the closure captured with the first generation's tensors, so an input a
replay would read stale on a GPU gives a wrong image here too."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparsevar.backends import build_backend
from sparsevar.backends.infinity.testing import write_checkpoints
from sparsevar.config import SamplingConfig, SparseVARConfig
from sparsevar.generate import Request, generate

SPARSE = SparseVARConfig(tau=0.5, start_stage=5, score_block=2, anchor_grid=4, normalize="quantile")
DENSE = SPARSE.model_copy(update={"enabled": False})
ONE = [Request("a red cat on a sofa", 1)]  # 15 and 16 text tokens: text width 32
OTHER = [Request("mountains at dawn", 2)]
LONG = [Request("a lighthouse at dusk on a rocky coast with waves", 5)]  # 38 tokens: width 64, its own context
PAIR = [Request("a red cat on a sofa", 3), Request("a lighthouse at dusk", 4, "blurry")]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_checkpoints(tmp_path_factory.mktemp("infinity"), {"text_max_tokens": 64}, seed=0)


def build(files, graphs: bool):
    return build_backend(files.model_copy(update={"cuda_graphs": graphs}), SamplingConfig(cfg=3.0), "cpu", "float32")


def pixels(results) -> list[bytes]:
    return [r.pixels_HWC.tobytes() for r in results]


def test_replays_give_the_images_of_first_runs_across_prompts_batches_and_settings(files):
    backend = build(files, graphs=True)
    sequence = [(ONE, SPARSE), (ONE, DENSE), (ONE, SPARSE), (OTHER, SPARSE), (OTHER, DENSE), (LONG, DENSE),
                (LONG, DENSE), (ONE, DENSE), (PAIR, SPARSE), (PAIR, SPARSE), (ONE, DENSE), (ONE, DENSE),
                (LONG, DENSE), (OTHER, DENSE)]
    for i, (requests, sv) in enumerate(sequence):
        got = generate(backend, requests, sv)
        fresh = generate(build(files, graphs=True), requests, sv)  # every stage a first, eager run
        assert pixels(got) == pixels(fresh), (i, requests[0].prompt, sv.enabled)
        assert [s.kept for r in got for s in r.stages] == [s.kept for r in fresh for s in r.stages]
    graphs = backend.graphs
    captures, replays = graphs.captures, graphs.replays
    generate(backend, ONE, DENSE)
    assert (graphs.captures, graphs.replays) == (captures, replays + 7)  # every stage replays


def test_dense_images_match_eager_mode_and_sparse_counts_round_up(files):
    eager, graphs = build(files, graphs=False), build(files, graphs=True)
    assert pixels(generate(graphs, ONE + OTHER, DENSE)) == pixels(generate(eager, ONE + OTHER, DENSE))
    exact, rounded = generate(eager, ONE, SPARSE)[0].stages, generate(graphs, ONE, SPARSE)[0].stages
    for e, r in zip(exact[SPARSE.start_stage - 1:], rounded[SPARSE.start_stage - 1:], strict=True):
        assert r.kept == min(-(-e.kept // 64) * 64, r.tokens) >= e.kept


def test_hart_replays_give_the_images_of_first_runs():

    from sparsevar.backends.hart.backend import HartBackend
    from sparsevar.backends.hart.config import HartConfig
    from sparsevar.backends.hart.testing import TINY_ARCH, TINY_TOK, TextArch, random_parts

    cpu = torch.device("cpu")
    parts = random_parts(TINY_ARCH, TINY_TOK, TextArch(hidden_size=TINY_ARCH.context_dim), cpu)
    cfg = HartConfig(llm="-", tokenizer="-", text_encoder="-", cuda_graphs=True)

    def build() -> HartBackend:
        return HartBackend(cfg, SamplingConfig(cfg=4.5, top_p=1.0), parts, cpu)

    backend = build()
    sparse = SPARSE.model_copy(update={"start_stage": 4, "fill": "code"})
    for requests, sv in [(ONE, sparse), (ONE, sparse), (OTHER, sparse), (PAIR, DENSE), (PAIR, DENSE), (PAIR, sparse),
                         (ONE, DENSE), (ONE, DENSE), (OTHER, DENSE)]:
        assert pixels(generate(backend, requests, sv)) == pixels(generate(build(), requests, sv)), requests[0]
    assert backend.graphs.replays >= len(backend.schedule(1.0))


def test_stage_graphs_capture_on_second_sight_and_restore_the_cache_bookkeeping():

    from sparsevar.attention import KVCache
    from sparsevar.graphs import StageGraphs

    graphs, cache = StageGraphs(torch.device("cpu"), max_graphs=1), KVCache(1, 1, 8, 4, "cpu", torch.float32)

    def forward(x_R1C: torch.Tensor) -> tuple[torch.Tensor]:
        cache.extend(x_R1C[:, None].expand(1, 1, 2, 4), x_R1C[:, None].expand(1, 1, 2, 4), None)
        return (x_R1C * 2,)

    outputs = []
    for value in (1.0, 2.0, 3.0):  # first run eager, second captured, third replayed
        cache.reset()
        outputs.append(graphs.run("a", forward, (torch.full((1, 1, 4), value),), [cache]))
        assert cache.length == 2 and outputs[-1][0][0, 0, 0].item() == 2 * value
    assert outputs[2] is outputs[1] and (graphs.captures, graphs.replays) == (1, 1)  # a replay reuses its outputs
    cache.reset()
    graphs.run("b", forward, (torch.ones(1, 1, 4),), [cache])
    cache.reset()
    graphs.run("b", forward, (torch.ones(1, 1, 4),), [cache])  # seen twice, but max_graphs: stays eager
    assert graphs.captures == 1


class CaptureUnsafeOps(TorchDispatchMode):
    """Records ops a CUDA graph capture rejects or silently freezes: host reads, ops whose output shape depends on
    values (they synchronise), tensors made from Python data (a host-to-device copy) and random draws (a capture
    fixes the generator's offset)."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
               "unique_consecutive", "equal", "bincount", "lift_fresh", "multinomial", "uniform_", "normal_",
               "normal", "bernoulli", "bernoulli_", "exponential_", "randn", "rand", "randint", "randperm",
               "random_", "rand_like", "randn_like", "randint_like"}
    HOST = ("tolist", "numpy", "cpu")  # dispatch nothing on a CPU, or nothing visible: recorded by wrapping

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in {"index", "index_put_", "index_put"} and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
        no_size = name == "repeat_interleave" and (kwargs or {}).get("output_size") is None
        if name in self.SYNCING or bool_index or no_size:
            self.found.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("model", ["infinity", "hart"])
def test_captured_forwards_hold_only_ops_a_cuda_graph_can_capture(files, model, monkeypatch):
    from sparsevar.graphs import StageGraphs
    from tests.test_hot_path import hart_backend

    unsafe, capture, capturing = CaptureUnsafeOps(), StageGraphs._capture, [False]

    def guarded(self, fn, inputs, caches):
        capturing[0] = True
        try:
            with unsafe:
                return capture(self, fn, inputs, caches)
        finally:
            capturing[0] = False

    for name in CaptureUnsafeOps.HOST:
        original = getattr(torch.Tensor, name)

        def recorded(self, *args, _name=name, _original=original, **kwargs):
            if capturing[0]:
                unsafe.found.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, recorded)
    monkeypatch.setattr(StageGraphs, "_capture", guarded)
    backend, start = (build(files, graphs=True), 5) if model == "infinity" else (hart_backend(True)[0], 4)
    for sv in (DENSE, SPARSE.model_copy(update={"start_stage": start}),
               SPARSE.model_copy(update={"start_stage": start, "normalize": "minmax", "fill": "code"})):
        for _ in range(2):
            generate(backend, PAIR, sv)
    assert backend.graphs.captures >= len(backend.schedule(1.0))
    assert unsafe.found == []
