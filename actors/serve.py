"""The online service: a Ray Serve deployment that answers OpenAI Images API requests with the batch job's generator.

Each replica holds one `actors.generator.Generator`, the callable the batch job's actors run, so a request goes
through the same generation loop, split-and-retry on failure and metadata rows as a dataset row, and the same
prompt, seed and τ give the same bytes. Images of concurrent requests are gathered into batches (`actors.batching`,
a batch formed when the model is free) and generated in a worker thread, so the replica keeps taking requests (and
counting its queue) meanwhile. With
`serve.target_latency_ms`, each batch's τ comes from the batch job's controller given a per-image budget from the
replica's queue (`sparsevar.adaptive.queue_budget_ms`): dense (τ_min) when idle, higher τ as the queue grows.
"""

import asyncio
import base64
import hashlib
import logging
import math
import secrets
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fastapi import FastAPI
from ray import serve
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from actors.batching import Batcher
from actors.calibration import serve_controller_for
from actors.config import JobConfig, ServeConfig
from actors.generator import Generator
from actors.openai_api import ApiError, ImageRequest, parse_request, parse_size, read_body
from actors.serve_metrics import ServeMetrics
from sparsevar.adaptive import AdaptiveConfig, queue_budget_ms
from sparsevar.config import SparseVARConfig
from sparsevar.generate import ImageResult, first_sparse_stage, generate
from sparsevar.generate import Request as GenerationRequest
from storage.images import encode_image
from storage.prompts import derived_seed

log = logging.getLogger(__name__)

COMMON_RATIOS = (1.0, 0.75, 4 / 3, 9 / 16, 16 / 9, 0.5, 2.0)  # h/w of the sizes `GET /v1/models` lists

api = FastAPI(title="sparsevar", description="OpenAI-compatible image generation with SparseVAR")


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Routing errors (404, 405) in OpenAI's error shape too."""
    return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None,
                    str(exc.status_code)).response()


@dataclass
class Item:
    """One image of a request, as the batcher queues it."""

    row: dict[str, Any]  # the batch job's prompt row: prompt_id, prompt, seed, negative_prompt, h_div_w, error
    tau: float | None  # the request's own τ, or None for the replica's
    response_format: str
    arrived: float = field(default_factory=time.perf_counter)


@dataclass
class Generated:
    row: dict[str, Any]  # the metadata row (status ok or error), with batch_size
    data: bytes | None  # the encoded image for b64_json


# Helpers of the replica come before it: serve.ingress copies the class as it is decorated, with the module's
# names defined so far.
def _image_entry(result: Generated) -> dict[str, Any]:
    metadata = {key: value.isoformat() if isinstance(value, datetime) else value for key, value in result.row.items()}
    if result.data is None:
        return {"url": _url(result.row["image_uri"]), "revised_prompt": None, "metadata": metadata}
    return {"b64_json": base64.b64encode(result.data).decode("ascii"), "revised_prompt": None, "metadata": metadata}


def _url(uri: str) -> str:
    """A stored image's URL: object-store URIs as they are, local paths as file:// URLs."""
    return uri if "://" in uri else f"file://{uri}"


def replica_config(cfg: JobConfig) -> dict[str, Any]:
    """The generator's config in a replica: torch threads from the replica's CPUs, and no batch-job controller
    (τ is the replica's to choose)."""
    ray_cfg = cfg.ray.model_copy(update={"num_cpus_per_actor": cfg.serve.num_cpus_per_replica})
    return cfg.model_copy(update={"ray": ray_cfg, "adaptive": AdaptiveConfig()}).model_dump(mode="json")


@serve.ingress(api)
class ImageService:
    """One replica: the model, its batcher and its share of the load."""

    def __init__(self, config: dict[str, Any]) -> None:
        cfg = JobConfig.model_validate(config)
        self.cfg, self.limits = cfg, cfg.serve
        controller = serve_controller_for(cfg) if cfg.serve.target_latency_ms is not None else None
        self.generator = Generator(replica_config(cfg), cfg.serve.output, controller=controller)
        self.model_id = self.generator.backend.name
        self.pixels_per_token = self._warm_up()
        self.started = int(time.time())
        self.ongoing = 0  # requests admitted and not yet answered
        self.pending = 0  # images of those requests: the batch being made and those queued
        self.metrics = ServeMetrics(self.model_id)
        self.batcher = Batcher(self._run_batch, cfg.serve.max_batch_size, cfg.serve.batch_wait_timeout_s)

    def _warm_up(self) -> float:
        """Generate one image, so the first request pays no start-up cost, and learn pixels per token (sizes)."""
        result = generate(self.generator.backend, [GenerationRequest("warm-up", 0)], self.cfg.sparsevar)[0]
        return result.pixels_HWC.shape[0] / self.generator.backend.schedule(1.0)[-1][0]

    def size_for(self, h_div_w: float) -> tuple[int, int]:
        """(width, height) in pixels the model makes for this aspect ratio."""
        h, w = self.generator.backend.schedule(h_div_w)[-1]
        return round(w * self.pixels_per_token), round(h * self.pixels_per_token)

    def sizes(self) -> list[str]:
        return list(dict.fromkeys("{}x{}".format(*self.size_for(ratio)) for ratio in COMMON_RATIOS))

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_id, "ongoing_requests": self.ongoing,
                "pending_images": self.pending}

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": self.started,
                                            "owned_by": "sparsevar", "sizes": self.sizes()}]}

    @api.post("/v1/images/generations")
    async def generations(self, request: Request) -> Response:
        started = time.perf_counter()
        try:
            body = parse_request(await read_body(request, self.limits.max_body_bytes), self.limits, self.model_id)
            items = self._items(body)
        except ApiError as exc:
            self.metrics.error("bad_request")
            return exc.response()
        if self.ongoing >= self.limits.max_ongoing_requests:
            self.metrics.error("overloaded")
            return self._overloaded().response()
        self.ongoing += 1
        self.pending += len(items)
        try:
            results = await asyncio.gather(*(self.batcher.submit(item) for item in items))
        except Exception as exc:  # noqa: BLE001 - a batch that failed outside the generator: answered, not raised
            log.exception("generation batch failed")
            results = [Generated({"status": "error", "error": f"{type(exc).__name__}: {exc}"}, None)]
        finally:
            self.ongoing -= 1
            self.pending -= len(items)
        self.metrics.request_ms.observe((time.perf_counter() - started) * 1e3)
        failed = [r.row["error"] for r in results if r.row["status"] != "ok"]
        if failed:
            self.metrics.error("generation")
            return ApiError(500, f"generation failed: {failed[0]}", None, "generation_failed",
                            "server_error").response()
        width, height = results[0].row["width"], results[0].row["height"]
        return JSONResponse({
            "created": int(time.time()), "size": f"{width}x{height}", "output_format": self.cfg.output.image_format,
            "data": [_image_entry(result) for result in results],
        })

    def _overloaded(self) -> ApiError:
        """The 503 of a full replica, answered here rather than by Serve, whose refusal is plain text."""
        retry_after = math.ceil(self.limits.retry_after_s)
        return ApiError(503, f"the server holds its most requests ({self.limits.max_ongoing_requests}, "
                        f"serve.max_ongoing_requests); retry in {retry_after} s", None, "server_overloaded",
                        "server_error", {"Retry-After": str(retry_after)})

    def _items(self, body: ImageRequest) -> list[Item]:
        """The request's images as prompt rows (seeds after the first derived, as the batch job's)."""
        h_div_w = 1.0
        if body.size not in (None, "auto"):
            width, height = parse_size(body.size)
            h_div_w = height / width
            if self.size_for(h_div_w) != (width, height):
                raise ApiError(400, f"size {body.size} is not one this model makes; try one of "
                               f"{', '.join(self.sizes())}", "size", "invalid_value")
        seed = secrets.randbelow(2**31) if body.seed is None else body.seed
        prompt_id = f"req-{uuid.uuid4().hex[:16]}"
        return [Item({"prompt_id": prompt_id, "prompt": body.prompt, "seed": derived_seed(seed, i),
                      "negative_prompt": body.negative_prompt, "h_div_w": h_div_w, "error": None},
                     body.tau, body.response_format or "b64_json") for i in range(body.n or 1)]

    async def _run_batch(self, items: list[Item]) -> list[Generated]:
        return await asyncio.to_thread(self._generate, items)

    def _generate(self, items: list[Item]) -> list[Generated]:
        """One batch, generated in groups of one τ (a request's own, or the replica's for the others)."""
        load_tau = self._load_tau(items)
        by_tau: dict[float | None, list[Item]] = {}
        for item in items:
            by_tau.setdefault(item.tau if item.tau is not None else load_tau, []).append(item)
        out: dict[int, Generated] = {}
        for tau, group in by_tau.items():
            sv = self.settings(tau)
            encoded: dict[int, bytes] = {}
            store = self._store(encoded, {id(item.row): item.response_format for item in group})
            rows = self.generator.generate_rows([item.row for item in group], store, sv)
            self.metrics.batch(rows, first_sparse_stage(sv))
            for item, row in zip(group, rows, strict=True):
                out[id(item)] = Generated({**row, "batch_size": len(items)}, encoded.get(id(item.row)))
        return [out[id(item)] for item in items]

    def _load_tau(self, items: list[Item]) -> float | None:
        """The controller's τ for this batch's budget, or None (the configured τ) without a latency target."""
        controller = self.generator.controller
        if controller is None:
            return None
        waited_ms = (time.perf_counter() - min(item.arrived for item in items)) * 1e3
        return controller.tau_for(queue_budget_ms(controller.target_ms, waited_ms, max(self.pending, len(items))))

    def settings(self, tau: float | None) -> SparseVARConfig:
        """The configured SparseVAR settings, at `tau` when one was chosen (a request's τ turns SparseVAR on)."""
        sv = self.cfg.sparsevar
        return sv if tau is None else sv.model_copy(update={"enabled": True, "tau": tau})

    def _store(self, encoded: dict[int, bytes], formats: dict[int, str]):
        """The generator's `Store`: `url` images written as the batch job writes them, the others kept as bytes."""
        fmt, quality = self.cfg.output.image_format, self.cfg.output.quality

        def store(row: dict[str, Any], result: ImageResult, tau: float | None) -> dict[str, Any]:
            if formats[id(row)] == "url":
                stored = self.generator.writer.write(row["prompt_id"], row["seed"], result.pixels_HWC)
                return {"image_uri": stored.uri, "image_sha256": stored.sha256, "image_bytes": stored.size}
            data = encode_image(result.pixels_HWC, fmt, quality)
            encoded[id(row)] = data
            return {"image_uri": None, "image_sha256": hashlib.sha256(data).hexdigest(), "image_bytes": len(data)}

        return store


def deployment_options(s: ServeConfig) -> dict[str, Any]:
    """Serve's deployment options from the `serve` section: replicas (or autoscaling), resources, queue bounds.

    Serve lets `max_queued_requests` more than `max_ongoing_requests` into a replica, so that the replica itself
    refuses those (OpenAI's JSON error, with Retry-After); Serve's own queue, of `max_queued_requests` too, is the
    backstop for bursts beyond that, answered with Serve's plain-text 503."""
    options: dict[str, Any] = {
        "max_ongoing_requests": s.max_ongoing_requests + s.max_queued_requests,
        "max_queued_requests": s.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": s.retry_after_s},
        "ray_actor_options": {"num_cpus": s.num_cpus_per_replica, "num_gpus": s.num_gpus_per_replica},
    }
    if s.autoscaling_config is not None:
        options["autoscaling_config"] = s.autoscaling_config.model_dump()
    else:
        options["num_replicas"] = s.num_replicas
    return options


def build_app(cfg: JobConfig) -> serve.Application:
    """The Serve application for `cfg`."""
    deployment = serve.deployment(ImageService, name="ImageService")
    return deployment.options(**deployment_options(cfg.serve)).bind(cfg.model_dump(mode="json"))
