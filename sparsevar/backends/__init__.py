"""Model backends and the config union that picks one by its `backend` key."""

from typing import Annotated

import torch
from pydantic import Field

from sparsevar.backend import Backend
from sparsevar.backends.tiny.config import TinyConfig
from sparsevar.config import SamplingConfig

ModelConfig = Annotated[TinyConfig, Field(discriminator="backend")]


def build_backend(model: ModelConfig, sampling: SamplingConfig, device: str = "auto", dtype: str = "auto") -> Backend:
    """Build the configured backend on a device ("auto": CUDA when present) and dtype ("auto": bf16 on GPU)."""
    torch_device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                "cpu" if device == "auto" else device)
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if torch_device.type == "cuda" else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    if model.backend == "tiny":
        from sparsevar.backends.tiny.backend import TinyBackend

        return TinyBackend(model, sampling, torch_device, torch_dtype)
    raise ValueError(f"unknown backend {model.backend!r}")
