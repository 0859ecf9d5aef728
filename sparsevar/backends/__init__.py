"""Model backends and the config union that picks one by its `backend` key.

To add a backend: its config class (with `backend: Literal["name"]`) joins `ModelConfig`, and its module
path joins `_BACKENDS`; the module provides `build(model_cfg, sampling, device, dtype) -> Backend` and
`expected_entries(model_cfg) -> {component: {key: shape}}` (what its checkpoint files must hold, for
`workflows.inspect`).
"""

import importlib
from typing import Annotated

import torch
from pydantic import Field

from sparsevar.backend import Backend
from sparsevar.backends.hart.config import HartConfig
from sparsevar.backends.infinity.config import InfinityConfig
from sparsevar.backends.tiny.config import TinyConfig
from sparsevar.config import SamplingConfig

ModelConfig = Annotated[TinyConfig | InfinityConfig | HartConfig, Field(discriminator="backend")]

_BACKENDS = {"tiny": "sparsevar.backends.tiny.backend", "infinity": "sparsevar.backends.infinity.backend",
             "hart": "sparsevar.backends.hart.backend"}


def _module(model: ModelConfig):
    return importlib.import_module(_BACKENDS[model.backend])


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """"auto" picks CUDA when present, and bf16 on GPU, fp32 on CPU."""
    torch_device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dtype == "auto":
        return torch_device, torch.bfloat16 if torch_device.type == "cuda" else torch.float32
    return torch_device, getattr(torch, dtype)


def build_backend(model: ModelConfig, sampling: SamplingConfig, device: str = "auto", dtype: str = "auto") -> Backend:
    """Build the configured backend, its weights loaded, ready to generate."""
    torch_device, torch_dtype = resolve_device(device, dtype)
    return _module(model).build(model, sampling, torch_device, torch_dtype)


def weight_files(model: ModelConfig) -> list[str]:
    """The files or folders the model's weights load from (none for random weights), for a run's provenance; a
    backend with `checkpoints()` gives its checkpoint fields, so call this on the config with them made local."""
    if hasattr(model, "checkpoints"):
        return [uri for uri, _, _ in model.checkpoints().values()]
    return _module(model).weight_files(model)


def expected_entries(model: ModelConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """Parameter names and shapes each checkpoint file of the config must hold, built without weights."""
    return _module(model).expected_entries(model)
