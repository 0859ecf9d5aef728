"""The generation loop's stages never wait on the device, except for the one read a sparse stage needs (its kept
counts set the shape of what runs). Counted on the CPU, where every read of a tensor's value into Python would be
a host-device synchronisation on a GPU; no timing."""

import pytest
import torch

from sparsevar.config import SamplingConfig, SparseVARConfig
from sparsevar.generate import Request, generate

READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")


def infinity_backend():
    from sparsevar.backends.infinity.backend import InfinityBackend, InfinityParts
    from sparsevar.backends.infinity.config import InfinityConfig
    from sparsevar.backends.infinity.testing import TINY, offline_tokenizer, random_parts, random_t5
    from sparsevar.backends.infinity.text import T5Text

    cfg = InfinityConfig(transformer="-", vae="-", text_encoder="-", **TINY)
    transformer, vae = random_parts(cfg)
    tokenizer, cpu = offline_tokenizer(), torch.device("cpu")
    text = T5Text(tokenizer, random_t5(cfg.text_channels, vocab=len(tokenizer)), cpu, cfg.text_max_tokens)
    return InfinityBackend(cfg, SamplingConfig(cfg=4.0), InfinityParts(transformer, vae, text), cpu), 5


def hart_backend():
    from sparsevar.backends.hart.backend import HartBackend
    from sparsevar.backends.hart.config import HartConfig
    from sparsevar.backends.hart.testing import TINY_ARCH, TINY_TOK, TextArch, random_parts

    cpu = torch.device("cpu")
    parts = random_parts(TINY_ARCH, TINY_TOK, TextArch(hidden_size=TINY_ARCH.context_dim), cpu)
    return HartBackend(HartConfig(llm="-", tokenizer="-", text_encoder="-"), SamplingConfig(cfg=4.5, top_p=1.0), parts,
                       cpu), 4


@pytest.fixture(scope="module", params=["infinity", "hart"])
def backend(request):
    return infinity_backend() if request.param == "infinity" else hart_backend()


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
