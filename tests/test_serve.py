"""The Serve application over real HTTP on 127.0.0.1, on the shared local Ray cluster: one app for the module
(start-up costs seconds), called with the `openai` client and, for bodies no client would send, with urllib."""

import base64
import hashlib
import io
import json
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from PIL import Image
from ray import cloudpickle, serve

from actors.serve import ImageService, build_app, deployment_options
from benchmarks.cluster import free_port
from storage.prompts import derived_seed
from workflows.calibrate import run as calibrate
from workflows.config import load_config
from workflows.generate import EXIT_OK
from workflows.generate import main as generate_main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-random.yaml"
APP = "sparsevar-test"
FAIL_MARKER = "FAIL-IN-THE-MODEL"
HOLD_MARKER = "HOLD-IN-THE-MODEL"  # held until the file RELEASE appears in serve.output
RELEASE = "release"
PROMPT = "a red striped circle at the top left"

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the replica process cannot import this test module


class FailingService(ImageService):
    """The real replica, whose model fails on prompts holding FAIL_MARKER, as on a broken input, and holds those
    with HOLD_MARKER until the test releases them (a busy replica, without racing a clock)."""

    async def __init__(self, config: dict) -> None:  # the ingress wrapper's constructor is async
        await super().__init__(config)
        backend = self.generator.backend
        begin = backend.begin
        release = Path(self.cfg.serve.output) / RELEASE

        def failing_begin(prompts, negative_prompts, h_div_w):
            if any(FAIL_MARKER in prompt for prompt in prompts):
                raise RuntimeError("the model failed on this prompt")
            held_until = time.monotonic() + 120  # a failed test releases nothing: never hang the suite
            while any(HOLD_MARKER in prompt for prompt in prompts) and not release.exists():
                if time.monotonic() > held_until:
                    raise RuntimeError("held prompts were never released")
                time.sleep(0.05)
            return begin(prompts, negative_prompts, h_div_w)

        backend.begin = failing_begin


@pytest.fixture(scope="module")
def overrides(fast_overrides, tmp_path_factory) -> list[str]:
    output = tmp_path_factory.mktemp("serve-out")
    return [*fast_overrides, "serve.num_cpus_per_replica=0.5", "serve.max_batch_size=4",
            "serve.batch_wait_timeout_s=1.0", "serve.max_ongoing_requests=4", "serve.max_queued_requests=2",
            "serve.max_images=3", "serve.max_prompt_chars=100", "serve.max_body_bytes=2048", f"serve.output={output}"]


@pytest.fixture(scope="module")
def server(ray_cluster, overrides) -> str:
    cfg = load_config(CONFIG, overrides)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = serve.deployment(FailingService, name="ImageService").options(**deployment_options(cfg.serve))
    serve.run(app.bind(cfg.model_dump(mode="json")), name=APP, route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def post(server: str, body: bytes | dict, path: str = "/v1/images/generations") -> tuple[int, dict, dict]:
    """Status, JSON answer and headers of a raw POST."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        text = exc.read()
        try:
            answer = json.loads(text)
        except ValueError:
            answer = {"text": text.decode()}
        return exc.code, answer, dict(exc.headers)


def png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image


def test_the_openai_client_gets_pngs_with_their_rows(client, overrides):
    cfg = load_config(CONFIG, overrides)
    answer = client.images.generate(prompt=PROMPT, n=2, size="32x32", extra_body={"seed": 5})
    assert answer.size == "32x32" and len(answer.data) == 2
    for i, image in enumerate(answer.data):
        meta = image.metadata
        assert png(image.b64_json).size == (meta["width"], meta["height"]) == (32, 32)
        assert meta["seed"] == derived_seed(5, i)  # as the batch job's images_per_prompt
        assert meta["status"] == "ok" and meta["model"] == "tiny" and meta["tau"] == cfg.sparsevar.tau
        assert meta["image_sha256"] == hashlib.sha256(base64.b64decode(image.b64_json)).hexdigest()
        assert [s["stage"] for s in meta["stages"]] == list(range(1, len(cfg.model.patch_sizes) + 1))
        sparse = [s for s in meta["stages"] if s["stage"] >= cfg.sparsevar.start_stage]
        assert all(1 <= s["kept"] <= s["tokens"] for s in meta["stages"])
        assert sum(s["kept"] for s in sparse) < sum(s["tokens"] for s in sparse)
        assert meta["latency_ms"] > 0 and meta["batch_size"] == 2
    assert answer.data[0].b64_json != answer.data[1].b64_json


def test_the_same_prompt_and_seed_give_the_batch_jobs_bytes(server, client, overrides, tmp_path):
    rows = [{"id": "a", "prompt": PROMPT, "seed": 11},
            {"id": "b", "prompt": "a blue checkered square", "seed": 3, "negative_prompt": "green"}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["--config", str(CONFIG), "--prompts", str(prompts), "--output", str(tmp_path / "out")]
    assert generate_main([*argv, *(a for o in overrides for a in ("--set", o))]) == EXIT_OK
    for row in rows:
        extra = {"seed": row["seed"], "negative_prompt": row.get("negative_prompt")}
        served = client.images.generate(prompt=row["prompt"], extra_body=extra).data[0]
        batch = (tmp_path / "out" / "images" / f"{row['id']}-s{row['seed']}.png").read_bytes()
        assert base64.b64decode(served.b64_json) == batch


def test_concurrent_requests_are_batched(client):
    patient = client.with_options(max_retries=8)  # a 503 of the queue bound (max_queued_requests=2) is retried
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda seed: patient.images.generate(prompt=PROMPT, extra_body={"seed": seed}),
                                range(4)))
    assert [a.data[0].metadata["seed"] for a in answers] == [0, 1, 2, 3]
    # requests that waited together ran together (a retried one may run alone later)
    assert max(a.data[0].metadata["batch_size"] for a in answers) >= 2, [a.data[0].metadata for a in answers]


def test_url_answers_store_the_image_as_the_batch_job_does(client, overrides):
    output = Path(load_config(CONFIG, overrides).serve.output)
    image = client.images.generate(prompt=PROMPT, response_format="url", extra_body={"seed": 9}).data[0]
    path = Path(image.url.removeprefix("file://"))
    assert path.parent == output / "images" and path.name.endswith("-s9.png")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == image.metadata["image_sha256"]
    assert image.metadata["image_uri"] == str(path) and image.b64_json is None


LONG = "x" * 101
BAD_REQUESTS = [
    ({"n": 1}, 400, "prompt", "missing_required_parameter"),
    ({"prompt": "  "}, 400, "prompt", "invalid_value"),
    ({"prompt": LONG}, 400, "prompt", "invalid_value"),
    ({"prompt": "a", "negative_prompt": LONG}, 400, "negative_prompt", "invalid_value"),
    ({"prompt": 7}, 400, "prompt", "invalid_value"),
    ({"prompt": "a", "seed": "5"}, 400, "seed", "invalid_value"),
    ({"prompt": "a", "seed": -1}, 400, "seed", "invalid_value"),
    ({"prompt": "a", "seed": 1.5}, 400, "seed", "invalid_value"),
    ({"prompt": "a", "n": 4}, 400, "n", "invalid_value"),
    ({"prompt": "a", "n": 0}, 400, "n", "invalid_value"),
    ({"prompt": "a", "size": "1024x1024"}, 400, "size", "invalid_value"),
    ({"prompt": "a", "size": "big"}, 400, "size", "invalid_value"),
    ({"prompt": "a", "tau": 1.5}, 400, "tau", "invalid_value"),
    ({"prompt": "a", "response_format": "jpeg"}, 400, "response_format", "invalid_value"),
    ({"prompt": "a", "model": "dall-e-3"}, 400, "model", "model_not_found"),
    ({"prompt": "a", "style": "vivid"}, 400, "style", "unknown_parameter"),
    (b'{"prompt": "a",', 400, None, "invalid_json"),
    (b'["a"]', 400, None, "invalid_json"),
    (json.dumps({"prompt": "a", "user": "y" * 3000}).encode(), 413, None, "request_too_large"),
]


@pytest.mark.parametrize(("body", "status", "param", "code"), BAD_REQUESTS)
def test_a_bad_request_gets_its_4xx_naming_the_field(server, body, status, param, code):
    got, answer, _ = post(server, body)
    assert got == status, answer
    error = answer["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert error["message"] and (param is None or param in error["message"])


def test_the_openai_client_raises_on_a_bad_request(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a", n=4)
    assert caught.value.status_code == 400 and caught.value.body["param"] == "n"


def test_a_failing_generation_answers_500_and_the_replica_serves_the_next(server, client):
    status, answer, _ = post(server, {"prompt": f"{FAIL_MARKER} a circle", "seed": 1})
    assert status == 500, answer
    assert answer["error"]["type"] == "server_error" and "the model failed on this prompt" in answer["error"]["message"]
    assert client.images.generate(prompt=PROMPT, extra_body={"seed": 1}).data[0].metadata["status"] == "ok"


def health(server: str) -> dict:
    with urllib.request.urlopen(f"{server}/healthz") as response:
        return json.loads(response.read())


def test_a_full_replica_answers_503_in_openais_shape_with_retry_after(server, client, overrides):
    """4 requests held in the replica (serve.max_ongoing_requests=4): the next is refused by the replica itself.
    They are sent one by one: a burst waits in Serve's own queue (max_queued_requests=2) while it is routed."""
    release = Path(load_config(CONFIG, overrides).serve.output) / RELEASE
    with ThreadPoolExecutor(4) as pool:
        held = []
        try:
            for seed in range(4):
                held.append(pool.submit(post, server, {"prompt": f"{HOLD_MARKER} {PROMPT}", "seed": seed}))
                while health(server)["ongoing_requests"] <= seed:
                    time.sleep(0.1)
            status, answer, headers = post(server, {"prompt": PROMPT, "seed": 9})
            with pytest.raises(openai.InternalServerError) as caught:
                client.images.generate(prompt=PROMPT)
        finally:
            release.touch()
        assert [future.result()[0] for future in held] == [200] * 4
    assert status == 503 and headers.get("retry-after") == "1", (status, answer)
    assert answer["error"]["code"] == "server_overloaded" and answer["error"]["type"] == "server_error"
    assert answer["error"]["param"] is None and "serve.max_ongoing_requests" in answer["error"]["message"]
    assert caught.value.status_code == 503 and caught.value.body["code"] == "server_overloaded"
    release.unlink()
    assert post(server, {"prompt": PROMPT, "seed": 0})[0] == 200  # capacity comes back


def test_a_burst_past_every_bound_answers_503_with_retry_after(server):
    """Of 20 at once, 4 are held, 2 more let in to be refused by the replica, 2 queued by Serve: the rest are
    Serve's own 503s (plain text), which carry Retry-After too."""
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda seed: post(server, {"prompt": PROMPT, "seed": seed}), range(20)))
    statuses = [status for status, _, _ in answers]
    assert set(statuses) == {200, 503}, statuses
    assert all(headers.get("retry-after") == "1" for status, _, headers in answers if status == 503)
    assert post(server, {"prompt": PROMPT, "seed": 0})[0] == 200  # capacity comes back


def test_with_a_latency_target_tau_follows_the_budget(server, overrides, tmp_path):
    """A replica with serve.target_latency_ms: idle and within a generous target, dense (τ_min); with a target no τ
    can meet, τ_max. The replica's controller is the one the answers' τ comes from."""
    prompts = ROOT / "configs" / "prompts" / "sample.jsonl"
    calibrate(load_config(CONFIG, overrides), str(prompts), str(tmp_path / "calibration"), 4, [0.0, 1.0], 1)
    taus = []
    for target_ms in (600_000, 0.001):
        cfg = load_config(CONFIG, [*overrides, f"serve.target_latency_ms={target_ms}", "serve.tau_max=0.9",
                                   f"serve.calibration={tmp_path / 'calibration'}"])
        serve.run(build_app(cfg), name="adaptive", route_prefix="/adaptive")
        status, answer, _ = post(server, {"prompt": PROMPT, "seed": 3}, path="/adaptive/v1/images/generations")
        assert status == 200, answer
        meta = answer["data"][0]["metadata"]
        assert meta["run_id"] is None
        taus.append(meta["tau"])
    serve.delete("adaptive")
    assert taus == [0.0, 0.9]


def test_models_health_and_unknown_routes(server):
    with urllib.request.urlopen(f"{server}/v1/models") as response:
        models = json.loads(response.read())
    assert models["data"][0]["id"] == "tiny" and "32x32" in models["data"][0]["sizes"]
    assert health(server) == {"status": "ok", "model": "tiny", "ongoing_requests": 0, "pending_images": 0}
    status, answer, _ = post(server, {"prompt": "a"}, path="/v1/images/edits")
    assert status == 404 and answer["error"]["code"] == "404"
