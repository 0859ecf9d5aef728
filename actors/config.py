"""The whole job's configuration: model, algorithm, sampling, runtime, Ray scaling, output format and serving."""

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from sparsevar.adaptive import AdaptiveConfig
from sparsevar.backends import ModelConfig
from sparsevar.config import SamplingConfig, SparseVARConfig, SpeedupConfig, StrictModel

# Adaptive runs default to quantile normalisation: τ is then the excluded fraction, so latency follows τ
# closely and the same for every image; benchmarks/adaptive.py measured it tracking a target better.
ADAPTIVE_NORMALIZE = "quantile"


class RuntimeConfig(StrictModel):
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class RayConfig(StrictModel):
    num_actors: int | tuple[int, int] = Field(
        1, description="generation actors: a fixed number, or [min, max] for a pool that scales with the work")
    batch_size: int = Field(4, ge=1, description="prompts per generation batch")
    num_gpus_per_actor: float = Field(0.0, ge=0.0, description="fractions share a GPU between actors")
    num_cpus_per_actor: float = Field(1.0, gt=0.0, description="also the actor's torch thread count")
    max_restarts: int = Field(-1, ge=-1, description="restarts of a dead actor process (-1: no limit)")
    max_task_retries: int = Field(3, ge=0, description="retries of a batch whose actor died running it")
    pipeline_restarts: int = Field(
        10, ge=0, description="times the job starts its pipeline again, with backoff, after losing actors faster "
        "than Ray restarts them (each start resumes: nothing recorded is lost or recorded twice)")

    @field_validator("num_actors")
    @classmethod
    def _positive_range(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if not 1 <= low <= high:
            raise ValueError("num_actors must be a number >= 1 or a range [min, max] with 1 <= min <= max")
        return value

    @property
    def actor_range(self) -> tuple[int, int]:
        return (self.num_actors, self.num_actors) if isinstance(self.num_actors, int) else self.num_actors


class OutputConfig(StrictModel):
    format: Literal["files", "webdataset"] = Field(
        "files", description="files: one image file (object) each under images/; webdataset: tar shards under shards/")
    shard_size: int = Field(1000, ge=1, description="webdataset: images (prompt rows) per tar shard")
    image_format: Literal["png", "jpeg", "webp"] = "png"
    quality: int = Field(95, ge=1, le=100, description="JPEG and WebP quality")
    images_per_prompt: int = Field(1, ge=1, description="images per prompt; seeds after the first are derived")
    save_masks: bool = Field(
        False, description="keep each image's per-stage keep masks in the metadata (keep_masks, bit-packed: about "
        "1.5 KB an image at 1024²), for the report's gallery")
    report: bool = Field(True, description="write OUTPUT/report/index.html at the end of every run (the whole "
                         "output's rows, a resumed run's earlier ones too); python -m workflows.report makes it anew")
    report_gallery: int = Field(24, ge=0, description="images in the report's gallery, a sample spread over the run")
    merge_every: int = Field(
        4096, ge=2, description="metadata files of finished batches merged into one as the run goes, so that a run "
        "leaves few files however it ends (1 B images in batches of 16: 15 thousand files, not 62.5 million)")
    lease_ttl_s: float = Field(
        60.0, gt=0, description="seconds a job's lease on its output lasts unless renewed (every third of it): a "
        "second job on the output is refused meanwhile, and a dead job's lease is taken over after it")


class StorageConfig(StrictModel):
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, R2, ...); else AWS_ENDPOINT_URL or AWS itself")


class AutoscalingConfig(StrictModel):
    """Ray Serve's `autoscaling_config`, the keys this app supports: replicas follow the requests in flight."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0, description="requests in flight per replica to aim at")
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} is above max_replicas={self.max_replicas}")
        return self


class ServeConfig(StrictModel):
    """The online service (`python -m workflows.serve`, `actors.serve`): replicas, batching, limits, τ."""

    num_replicas: int = Field(1, ge=1, description="fixed replicas; leave unset with autoscaling_config")
    autoscaling_config: AutoscalingConfig | None = None
    num_gpus_per_replica: float = Field(0.0, ge=0.0, description="fractions share a GPU between replicas")
    num_cpus_per_replica: float = Field(1.0, gt=0.0, description="also the replica's torch thread count")
    max_batch_size: int = Field(4, ge=1, description="images per generation batch (actors.batching)")
    batch_wait_timeout_s: float = Field(0.05, ge=0.0, description="how long a batch waits to fill")
    max_ongoing_requests: int = Field(
        8, ge=1, description="requests one replica holds at once (in its batch queue); it refuses more with an "
        "OpenAI-style 503 and Retry-After")
    max_queued_requests: int = Field(
        16, ge=1, description="requests past those that Serve still lets into a replica (to be refused there) and, "
        "as a backstop for bursts, queues; beyond both, Serve's own plain-text 503 with Retry-After")
    retry_after_s: float = Field(1.0, ge=0.0, description="the Retry-After a refused request is given")
    max_images: int = Field(4, ge=1, description="the most images (`n`) one request may ask for")
    max_prompt_chars: int = Field(2000, ge=1, description="longest prompt (and negative prompt) accepted")
    max_body_bytes: int = Field(65536, ge=1024, description="largest request body accepted")
    output: str | None = Field(
        None, description="where `response_format: url` stores images (a folder or s3:// URI), as the batch job does")
    target_latency_ms: float | None = Field(
        None, gt=0, description="p95 of a request: each replica picks τ from the calibration and its queue to meet it")
    tau_min: float = Field(0.0, ge=0.0, le=1.0, description="lowest τ the replica may choose (0 is dense)")
    tau_max: float = Field(1.0, ge=0.0, le=1.0, description="highest τ the replica may choose")
    calibration: str | None = Field(None, description="calibration.parquet (or its folder) from workflows.calibrate")

    @model_validator(mode="after")
    def _consistent(self) -> "ServeConfig":
        if self.autoscaling_config is not None and "num_replicas" in self.model_fields_set:
            raise ValueError("set num_replicas or autoscaling_config, not both")
        if self.tau_min > self.tau_max:
            raise ValueError(f"tau_min={self.tau_min} is above tau_max={self.tau_max}; swap them")
        if self.target_latency_ms is not None and not self.calibration:
            raise ValueError("target_latency_ms needs calibration: run python -m workflows.calibrate --config ... "
                             "--prompts ... --output DIR, then set serve.calibration: DIR")
        return self


class JobConfig(StrictModel):
    model: ModelConfig
    sparsevar: SparseVARConfig = SparseVARConfig()
    speedups: SpeedupConfig = SpeedupConfig()
    sampling: SamplingConfig = SamplingConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    ray: RayConfig = RayConfig()
    output: OutputConfig = OutputConfig()
    storage: StorageConfig = StorageConfig()
    adaptive: AdaptiveConfig = AdaptiveConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="before")
    @classmethod
    def _adaptive_normalize_default(cls, data: Any) -> Any:
        """With adaptive.enabled and no sparsevar.normalize given, use ADAPTIVE_NORMALIZE."""
        if not isinstance(data, dict):
            return data
        adaptive, sv = data.get("adaptive"), data.get("sparsevar", {})
        if isinstance(adaptive, AdaptiveConfig):
            enabled = adaptive.enabled
        else:
            enabled = isinstance(adaptive, dict) and adaptive.get("enabled") is True
        if enabled and isinstance(sv, dict) and "normalize" not in sv:
            return {**data, "sparsevar": {**sv, "normalize": ADAPTIVE_NORMALIZE}}
        if enabled and isinstance(sv, SparseVARConfig) and "normalize" not in sv.model_fields_set:
            return {**data, "sparsevar": sv.model_copy(update={"normalize": ADAPTIVE_NORMALIZE})}
        return data

    @model_validator(mode="after")
    def _adaptive_needs_sparsevar(self) -> "JobConfig":
        if self.adaptive.enabled and not self.sparsevar.enabled:
            raise ValueError("adaptive.enabled needs sparsevar.enabled: true (τ is what it adapts)")
        return self
