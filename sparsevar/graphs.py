"""CUDA graphs for stage forwards: at batch 1 a 2B-parameter stage issues ~2,000 kernels whatever its size, so
the small stages cost the launch time, not the GPU's (25 ms a stage on an H200). A graph replays them in one call.

A graph reads and writes the addresses it was captured with, so everything a stage reads besides its inputs (the
key/value caches, the text context) must be the same tensors in every generation: the backend keeps them in a
workspace (`workspace`) and copies each generation's values in. A key's first run is eager (it warms up kernels
and allocators, and a shape seen once is never captured); its second is captured and replayed; later ones only
replay. The caches' host-side bookkeeping (length, whether a mask is needed) is part of the key and is set after
a replay as the capture left it. Graphs are never destroyed while their workspace lives (past `max_graphs`, new
shapes run eagerly), and they share one memory pool: a replay's outputs hold until the next call only.

On a CPU there is nothing to capture: the same bookkeeping runs and a "replay" calls the captured closure on the
static inputs, so tests exercise what a GPU replays (stale workspace tensors give wrong images there too).
"""

import warnings
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

from sparsevar.attention import KVCache

Inputs = tuple[torch.Tensor | None, ...]


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph | None"  # None on a CPU
    fn: Callable[..., Any]
    inputs: Inputs  # static copies the graph reads
    outputs: Any  # tensors the graph writes, returned by every replay
    caches_after: list[tuple[int, bool]]


def _copy_into(dst: Any, src: Any) -> None:
    """Copy a (nested tuple of) tensors, with Nones, into tensors of the same structure."""
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, tuple):
        for d, s in zip(dst, src, strict=True):
            _copy_into(d, s)


class StageGraphs:
    """Captured stage forwards of one workspace, by key, at most `max_graphs` of them."""

    def __init__(self, device: torch.device, max_graphs: int = 256) -> None:
        self.device, self.max_graphs = device, max_graphs
        self.cuda = device.type == "cuda"
        self._pool = torch.cuda.graph_pool_handle() if self.cuda else None
        self._graphs: dict[Hashable, _Captured] = {}
        self._seen: set[Hashable] = set()
        self._workspace_key: Hashable | None = None
        self._workspace: Any = None
        self.captures = self.replays = 0

    def workspace(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The workspace for `key`; a new key drops the old workspace and its graphs, so that memory holds one
        set of caches (Infinity-2B's take 88 GB at batch 16 with guidance)."""
        if key != self._workspace_key:
            self.clear()
            self._workspace_key, self._workspace = key, make()
        return self._workspace

    def clear(self) -> None:
        """Drop the workspace and every graph, freeing their memory."""
        self._graphs.clear()
        self._seen.clear()
        self._workspace_key = self._workspace = None

    def run(self, key: Hashable, fn: Callable[..., Any], inputs: Inputs, caches: list[KVCache]) -> Any:
        """fn(*inputs), replayed from a graph once it has run before with the same key. `key` must determine every
        tensor fn reads besides its inputs and its Python branches; the inputs' shapes and the caches' length and
        mask state are added to it here."""
        key = (key, tuple(None if t is None else tuple(t.shape) for t in inputs), caches[0].length,
               caches[0].all_valid)
        captured = self._graphs.get(key)
        if captured is not None:
            return self._replay(captured, inputs, caches)
        if key not in self._seen or len(self._graphs) >= self.max_graphs:
            if len(self._seen) >= 100 * self.max_graphs:  # bounded: varied shapes (min-max counts) never repeat
                self._seen.clear()
            self._seen.add(key)
            return fn(*inputs)
        captured = self._capture(fn, inputs, caches)
        self._graphs[key] = captured
        return captured.outputs

    def _capture(self, fn: Callable[..., Any], inputs: Inputs, caches: list[KVCache]) -> _Captured:
        static = tuple(None if t is None else t.clone() for t in inputs)
        if not self.cuda:
            outputs = fn(*static)
        else:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self._pool):
                    outputs = fn(*static)
            except RuntimeError as exc:  # a failed capture leaves the CUDA allocator unusable: no fallback
                raise RuntimeError(f"CUDA graph capture of a stage failed ({exc}); set model.cuda_graphs: false to "
                                   "run eagerly") from exc
            graph.replay()
        self.captures += 1
        return _Captured(graph if self.cuda else None, fn, static, outputs, [(c.length, c.all_valid) for c in caches])

    def _replay(self, captured: _Captured, inputs: Inputs, caches: list[KVCache]) -> Any:
        for static, new in zip(captured.inputs, inputs, strict=True):
            if static is not None:
                static.copy_(new)
        if captured.graph is not None:
            captured.graph.replay()
        else:
            _copy_into(captured.outputs, captured.fn(*captured.inputs))
            for cache in caches:  # the closure's bookkeeping ran; a GPU replay's comes from caches_after only
                cache.length, cache.all_valid = -1, None
        for cache, (length, all_valid) in zip(caches, captured.caches_after, strict=True):
            cache.length, cache.all_valid = length, all_valid
        self.replays += 1
        return captured.outputs


class GraphMode:
    """The `cuda_graphs` switch of a backend: its StageGraphs (None: eager) and the kept-count rounding that
    makes sparse stages repeat their shapes (`plan_stage`'s multiple; the extra tokens run)."""

    KEPT_MULTIPLE = 64
    device: torch.device
    graphs: StageGraphs | None = None
    kept_multiple = 1

    def use_cuda_graphs(self, enabled: bool) -> None:
        """Switch CUDA-graph mode (the config's `model.cuda_graphs`); switching frees any captured graphs."""
        if enabled and self.device.type != "cuda":
            warnings.warn("model.cuda_graphs on a CPU only emulates replays (for tests): it is no faster, and it "
                          "rounds kept counts up; set it false", stacklevel=2)
        if self.graphs is not None:
            self.graphs.clear()
        self.graphs = StageGraphs(self.device) if enabled else None
        self.kept_multiple = self.KEPT_MULTIPLE if enabled else 1
