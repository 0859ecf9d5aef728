"""The OpenAI Images API's request and error shapes, so that existing clients talk to `actors.serve` unchanged.

A request body is read with a size bound and validated strictly (an unknown field, a string for a number, a bad
value: each refused naming the field); every refusal answers OpenAI's error object,
`{"error": {"message", "type", "param", "code"}}`. No Ray here: the replica's routes call it.
"""

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from actors.config import ServeConfig

MAX_SEED = 2**63 - 1  # the metadata's int64
_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")


class ApiError(Exception):
    """A request answered with an OpenAI-style error; `param` names the field at fault (None: the whole body)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class ImageRequest(BaseModel):
    """`POST /v1/images/generations`: OpenAI's fields that apply (`model` and `user` are accepted as such), then
    ours: `seed` (default: random, reported), `negative_prompt` and `tau` (default: the replica's choice)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    n: int | None = Field(None, ge=1)
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    model: str | None = None
    user: str | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    negative_prompt: str | None = None
    tau: float | None = Field(None, ge=0.0, le=1.0)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused with 413 past `max_bytes` (by its Content-Length, or as it streams in without one)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
    return bytes(body)


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"request body is larger than {max_bytes} bytes (serve.max_body_bytes)", None,
                    "request_too_large")


def parse_request(body: bytes, limits: ServeConfig, model_id: str) -> ImageRequest:
    """Validate a body against the schema and the configured limits; ApiError (400) names the first field at fault."""
    try:
        request = ImageRequest.model_validate_json(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    if not request.prompt.strip():
        raise ApiError(400, "prompt is empty", "prompt", "invalid_value")
    for field in ("prompt", "negative_prompt"):
        text = getattr(request, field)
        if text is not None and len(text) > limits.max_prompt_chars:
            raise ApiError(400, f"{field} is {len(text)} characters long; the most is {limits.max_prompt_chars}",
                           field, "invalid_value")
    if (request.n or 1) > limits.max_images:
        raise ApiError(400, f"n={request.n} is above the most images a request may ask for ({limits.max_images})",
                       "n", "invalid_value")
    if request.model is not None and request.model != model_id:
        raise ApiError(400, f"model {request.model!r} is not served here; this server serves {model_id!r}", "model",
                       "model_not_found")
    if request.response_format == "url" and limits.output is None:
        raise ApiError(400, "response_format 'url' needs serve.output (where images are stored); use 'b64_json'",
                       "response_format", "invalid_value")
    return request


def _validation_error(exc: ValidationError) -> ApiError:
    error = exc.errors()[0]
    if error["type"] == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {error['msg']}", None, "invalid_json")
    if error["type"] == "model_type":
        return ApiError(400, "the body must be a JSON object", None, "invalid_json")
    param = ".".join(str(part) for part in error["loc"]) or None
    if error["type"] == "extra_forbidden":
        return ApiError(400, f"unknown field {param!r}", param, "unknown_parameter")
    if error["type"] == "missing":
        return ApiError(400, f"{param} is required", param, "missing_required_parameter")
    return ApiError(400, f"{param}: {error['msg']}", param, "invalid_value")


def parse_size(size: str) -> tuple[int, int]:
    """`WIDTHxHEIGHT` in pixels; ApiError otherwise."""
    match = _SIZE.fullmatch(size)
    if match is None or 0 in (int(match[1]), int(match[2])):
        raise ApiError(400, f"size {size!r} is not WIDTHxHEIGHT in pixels, e.g. 256x256", "size", "invalid_value")
    return int(match[1]), int(match[2])
