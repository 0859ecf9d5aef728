"""The whole job's configuration: model, algorithm, sampling, runtime, Ray scaling and output format."""

from typing import Literal

from pydantic import Field

from sparsevar.backends import ModelConfig
from sparsevar.config import SamplingConfig, SparseVARConfig, StrictModel


class RuntimeConfig(StrictModel):
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class RayConfig(StrictModel):
    num_actors: int = Field(1, ge=1, description="generation actors in the pool")
    batch_size: int = Field(4, ge=1, description="prompts per generation batch")
    num_gpus_per_actor: float = Field(0.0, ge=0.0)
    num_cpus_per_actor: float = Field(1.0, gt=0.0, description="also the actor's torch thread count")


class OutputConfig(StrictModel):
    image_format: Literal["png", "jpeg", "webp"] = "png"
    quality: int = Field(95, ge=1, le=100, description="JPEG and WebP quality")


class JobConfig(StrictModel):
    model: ModelConfig
    sparsevar: SparseVARConfig = SparseVARConfig()
    sampling: SamplingConfig = SamplingConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    ray: RayConfig = RayConfig()
    output: OutputConfig = OutputConfig()
