"""hf:// checkpoints fetched by huggingface_hub from a loopback server that answers the Hub's file API.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when imported, as a Ray worker does at its start,
so each fetch runs in a fresh process with its environment; the server counts the requests it answers.
"""

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from storage.hf import HubError, HubPath, parse

REPO = Path(__file__).resolve().parents[1]
COMMIT_MAIN, COMMIT_V1 = "a" * 40, "b" * 40
DATA, OLD = b"weights" * 1000, b"old weights"
TOKEN = "hf_loopback_token"


class Hub(ThreadingHTTPServer):
    """Model repos {repo_id: {revision: commit}} and commits {commit: {path: bytes}}, served as the Hub does: repo
    info at a revision, the recursive tree listing, and HEAD/GET of /{repo}/resolve/{revision}/{path}."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.refs: dict[str, dict[str, str]] = {}
        self.commits: dict[str, dict[str, bytes]] = {}
        self.private: set[str] = set()
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Authorization
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def add(self, repo_id: str, files: dict[str, bytes], commit: str = COMMIT_MAIN, ref: str = "main") -> None:
        self.refs.setdefault(repo_id, {})[ref] = commit
        self.commits[commit] = files

    def downloads(self) -> Counter:
        """GETs of file contents, by path."""
        return Counter(path for method, path, _ in self.requests if method == "GET" and "/resolve/" in path)


class _Handler(BaseHTTPRequestHandler):
    server: Hub

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _send(self, status: int, data: bytes = b"", headers: dict[str, str] | None = None, body: bool = True) -> None:
        self.send_response(status)
        for name, value in {"Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _json(self, value: object) -> None:
        self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"})

    def _commit(self, repo_id: str, revision: str, body: bool) -> str | None:
        """The commit a revision names, or None once a 404 (or 401 for a private repo) was sent."""
        refs = self.server.refs.get(repo_id)
        if refs is None or (repo_id in self.server.private and
                            self.headers.get("Authorization") != f"Bearer {TOKEN}"):
            self._send(401 if refs else 404, headers={"X-Error-Code": "RepoNotFound"}, body=body)
            return None
        commit = refs.get(revision, revision if revision in refs.values() else None)
        if commit is None:
            self._send(404, headers={"X-Error-Code": "RevisionNotFound"}, body=body)
        return commit

    def _answer(self, body: bool) -> None:
        url = urlsplit(self.path)
        with self.server.lock:
            self.server.requests.append((self.command, url.path, self.headers.get("Authorization")))
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 6:  # api/models/{owner}/{name}/{revision|tree}/{rev}
            repo_id, kind, revision = "/".join(parts[2:4]), parts[4], parts[5]
            if (commit := self._commit(repo_id, revision, body)) is None:
                return
            files = self.server.commits[commit]
            if kind == "revision":
                return self._json({"id": repo_id, "sha": commit, "siblings": [{"rfilename": p} for p in files]})
            return self._json([{"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                               for p, d in files.items()])
        if len(parts) >= 5 and parts[2] == "resolve":  # {owner}/{name}/resolve/{revision}/{path}
            repo_id, revision, path = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            if (commit := self._commit(repo_id, revision, body)) is None:
                return
            data = self.server.commits[commit].get(path)
            if data is None:
                return self._send(404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, body=body)
            return self._send(200, data, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                          "Content-Type": "application/octet-stream"}, body=body)
        self._send(404, body=body)


@pytest.fixture
def hub():
    server = Hub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.add("FoundationVision/Infinity", {"infinity_2b_reg.pth": DATA, "infinity_vae_d32reg.pth": b"vae",
                                             "infinity_8b_weights/model.safetensors.index.json": b"{}",
                                             "infinity_8b_weights/model-00001-of-00001.safetensors": b"shard"})
    server.add("FoundationVision/Infinity", {"infinity_2b_reg.pth": OLD}, COMMIT_V1, "v1")
    server.add("google/flan-t5-xl", {"config.json": b"{}", "spiece.model": b"sp", "flax_model.msgpack": b"flax",
                                     "tf_model.h5": b"tf"}, "c" * 40)
    server.add("acme/private", {"model.pth": b"secret"}, "d" * 40)
    server.private.add("acme/private")
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def hub_env(hub: Hub, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a process on a node whose Hub is the loopback one and whose caches are the test's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    return {**env, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "SPARSEVAR_CHECKPOINT_CACHE": str(tmp_path / "cache"), **extra}


FETCH = """
import json, sys
from storage.checkpoints import CheckpointError, fetch_checkpoint
out = []
for uri, sha, size in json.loads(sys.argv[1]):
    try:
        out.append({"path": fetch_checkpoint(uri, sha, size)})
    except CheckpointError as exc:
        out.append({"error": str(exc)})
print(json.dumps(out))
"""


def start_fetch(env: dict[str, str], *specs: str | tuple[str, str | None, int | None]) -> subprocess.Popen:
    args = [list(s) if isinstance(s, tuple) else [s, None, None] for s in specs]
    return subprocess.Popen([sys.executable, "-c", FETCH, json.dumps(args)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def results(process: subprocess.Popen) -> list[dict[str, str]]:
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out)


def fetch(env: dict[str, str], *specs: str | tuple[str, str | None, int | None]) -> list[dict[str, str]]:
    """Each spec's {"path": local path} or {"error": message}, fetched in one fresh process."""
    return results(start_fetch(env, *specs))


def test_uri_grammar_is_huggingface_hubs():
    assert parse("hf://google/flan-t5-xl") == HubPath("google/flan-t5-xl", None, "")
    assert parse("hf://FoundationVision/Infinity/infinity_8b_weights/") == HubPath(
        "FoundationVision/Infinity", None, "infinity_8b_weights")
    assert parse(f"hf://mit-han-lab/hart-0.7b-1024px@{COMMIT_V1}/llm") == HubPath(
        "mit-han-lab/hart-0.7b-1024px", COMMIT_V1, "llm")
    assert parse("hf://acme/model@refs%2Fpr%2F1/a/b.pth").revision == "refs/pr/1"
    for bad in ("hf://flan-t5-xl", "hf://google/flan-t5-xl@", "hf://google/flan-t5-xl/x.pth@v1"):
        with pytest.raises(HubError, match="hf://<owner>/<name>"):
            parse(bad)


def test_files_folders_and_repos_at_a_revision_download_into_the_hub_cache(hub, tmp_path):
    sha = hashlib.sha256(DATA).hexdigest()
    file, old, pinned, folder, repo, bad, named = fetch(
        hub_env(hub, tmp_path), ("hf://FoundationVision/Infinity/infinity_2b_reg.pth", sha, len(DATA)),
        "hf://FoundationVision/Infinity@v1/infinity_2b_reg.pth",
        f"hf://FoundationVision/Infinity@{COMMIT_V1}/infinity_2b_reg.pth",
        "hf://FoundationVision/Infinity/infinity_8b_weights", "hf://google/flan-t5-xl",
        ("hf://FoundationVision/Infinity/infinity_vae_d32reg.pth", "00" * 32, None),
        "hf://google/flan-t5-xl/tf_model.h5")
    assert Path(file["path"]).read_bytes() == DATA and file["path"].startswith(str(tmp_path / "hf"))
    assert Path(old["path"]).read_bytes() == OLD and Path(pinned["path"]).read_bytes() == OLD
    assert sorted(p.name for p in Path(folder["path"]).iterdir()) == [
        "model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    assert (Path(repo["path"]) / "spiece.model").read_bytes() == b"sp"
    assert not any(path.endswith(".msgpack") for path in hub.downloads())  # Flax's weights stay on the Hub
    assert "infinity_vae_d32reg.pth has sha256" in bad["error"]
    assert Path(named["path"]).read_bytes() == b"tf"  # TensorFlow's, but named
    # a file in a folder is fetched alone: the folder's other files and the repo's other files stay on the Hub
    assert hub.downloads()["/FoundationVision/Infinity/resolve/" + COMMIT_MAIN + "/infinity_vae_d32reg.pth"] == 1
    assert sum(hub.downloads().values()) == 8


def test_missing_files_revisions_and_repos_name_the_uri_and_the_fix(hub, tmp_path):
    missing, revision, repo, private = fetch(
        hub_env(hub, tmp_path), "hf://FoundationVision/Infinity/infinity_2b.pth",
        "hf://FoundationVision/Infinity@v9/infinity_2b_reg.pth", "hf://nobody/nothing", "hf://acme/private/model.pth")
    assert missing["error"] == (
        "checkpoint hf://FoundationVision/Infinity/infinity_2b.pth not found: FoundationVision/Infinity@main holds "
        f"no file or folder 'infinity_2b.pth'; check the path against the repo's files ({hub.endpoint}/"
        "FoundationVision/Infinity/tree/main)")
    assert revision["error"].startswith("checkpoint hf://FoundationVision/Infinity@v9/infinity_2b_reg.pth: repo "
                                        "FoundationVision/Infinity has no revision 'v9'")
    assert "repo nobody/nothing not found" in repo["error"]
    assert "hf://acme/private/model.pth" in private["error"] and "set HF_TOKEN" in private["error"]
    [found] = fetch(hub_env(hub, tmp_path, HF_TOKEN=TOKEN), "hf://acme/private/model.pth")
    assert Path(found["path"]).read_bytes() == b"secret"
    assert (f"Bearer {TOKEN}" in {auth for _, path, auth in hub.requests if "/resolve/" in path})


def test_offline_mode_serves_the_cache_after_a_first_download(hub, tmp_path):
    online = fetch(hub_env(hub, tmp_path), "hf://FoundationVision/Infinity/infinity_2b_reg.pth",
                   "hf://google/flan-t5-xl")
    seen = len(hub.requests)
    offline = hub_env(hub, tmp_path, HF_HUB_OFFLINE="1")
    assert fetch(offline, "hf://FoundationVision/Infinity/infinity_2b_reg.pth", "hf://google/flan-t5-xl") == online
    assert len(hub.requests) == seen  # not one request
    [never] = fetch(offline, "hf://FoundationVision/Infinity/infinity_vae_d32reg.pth")
    assert never["error"].startswith("checkpoint hf://FoundationVision/Infinity/infinity_vae_d32reg.pth: "
                                     "FoundationVision/Infinity@main is not in the Hugging Face cache")
    assert "fetch it once with network access, or unset HF_HUB_OFFLINE" in never["error"]
    hub.shutdown()  # a Hub out of reach: the cache still serves what it holds
    hub.server_close()
    cached, unreachable = fetch(hub_env(hub, tmp_path), "hf://google/flan-t5-xl",
                                "hf://FoundationVision/Infinity/infinity_vae_d32reg.pth")
    assert cached == online[1] and f"cannot reach {hub.endpoint} (HF_ENDPOINT)" in unreachable["error"]


def test_actors_of_a_node_starting_together_download_once(hub, tmp_path):
    env = hub_env(hub, tmp_path)
    uris = ("hf://FoundationVision/Infinity/infinity_2b_reg.pth", "hf://google/flan-t5-xl")
    processes = [start_fetch(env, *uris) for _ in range(3)]
    paths = [results(p) for p in processes]
    assert paths[0] == paths[1] == paths[2] and all("path" in r for r in paths[0])
    assert sorted(hub.downloads().values()) == [1, 1, 1]


def test_the_example_configs_name_the_official_repos():
    from sparsevar.backends.hart.config import HartConfig
    from sparsevar.backends.infinity.config import InfinityConfig

    repos = {}
    for name, kind in (("infinity-2b", InfinityConfig), ("infinity-8b", InfinityConfig), ("hart-0.7b", HartConfig)):
        model = kind.model_validate(yaml.safe_load((REPO / f"configs/{name}.yaml").read_text())["model"])
        repos[name] = {field: (parse(uri).repo_id, parse(uri).path) for field, (uri, _, _) in
                       model.checkpoints().items()}
    assert repos["infinity-2b"] == {"transformer": ("FoundationVision/Infinity", "infinity_2b_reg.pth"),
                                    "vae": ("FoundationVision/Infinity", "infinity_vae_d32reg.pth"),
                                    "text_encoder": ("google/flan-t5-xl", "")}
    assert repos["infinity-8b"]["transformer"] == ("FoundationVision/Infinity", "infinity_8b_weights")
    assert repos["infinity-8b"]["vae"] == ("FoundationVision/Infinity", "infinity_vae_d56_f8_14_patchify.pth")
    assert repos["hart-0.7b"] == {"llm": ("mit-han-lab/hart-0.7b-1024px", "llm"),
                                  "tokenizer": ("mit-han-lab/hart-0.7b-1024px", "tokenizer"),
                                  "text_encoder": ("mit-han-lab/Qwen2-VL-1.5B-Instruct", "")}


GENERATE = """
import hashlib, json, sys
from actors.generator import Generator
from sparsevar.config import SparseVARConfig
from sparsevar.generate import Request, generate
actor = Generator(json.loads(sys.argv[1]), None)
[image] = generate(actor.backend, [Request("a red cat on a sofa", 1)], SparseVARConfig(enabled=False))
print(json.dumps({"model": actor.cfg.model.model_dump(), "fingerprint": actor.weights_fingerprint,
                  "pixels": hashlib.sha256(image.pixels_HWC.tobytes()).hexdigest()}))
"""


def test_a_generation_actor_loads_hart_from_the_hub_as_from_local_folders(hub, tmp_path):
    """A tiny random-weight HART in the official repos' layout, served by the loopback Hub, loaded by the job's
    actor: the same images and weights fingerprint as from the local folders."""
    from sparsevar.backends import build_backend
    from sparsevar.backends.hart.config import HartConfig
    from sparsevar.backends.hart.testing import TINY_ARCH, TINY_TOK, TextArch, write_folders
    from sparsevar.config import SamplingConfig, SparseVARConfig
    from sparsevar.generate import Request, generate
    from storage.checkpoints import fingerprint

    folders = write_folders(tmp_path / "hart", TINY_ARCH, TINY_TOK, TextArch(hidden_size=TINY_ARCH.context_dim))
    hub.add("mit-han-lab/hart-0.7b-1024px", {f"{role}/{p.name}": p.read_bytes() for role in ("llm", "tokenizer")
                                             for p in getattr(folders, role).iterdir()}, "e" * 40)
    hub.add("mit-han-lab/Qwen2-VL-1.5B-Instruct", {p.name: p.read_bytes() for p in folders.text_encoder.iterdir()},
            "f" * 40)
    model = {"backend": "hart", "llm": "hf://mit-han-lab/hart-0.7b-1024px/llm",
             "tokenizer": "hf://mit-han-lab/hart-0.7b-1024px@main/tokenizer",
             "text_encoder": "hf://mit-han-lab/Qwen2-VL-1.5B-Instruct", "cuda_graphs": False}
    sampling = {"cfg": 4.5, "top_p": 1.0}
    config = {"model": model, "sampling": sampling, "runtime": {"device": "cpu", "dtype": "float32"}}
    process = subprocess.run([sys.executable, "-c", GENERATE, json.dumps(config)], env=hub_env(hub, tmp_path),
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    remote = json.loads(process.stdout.splitlines()[-1])
    assert remote["model"]["llm"].startswith(str(tmp_path / "hf")) and remote["model"]["llm"].endswith("/llm")

    local = HartConfig(llm=str(folders.llm), tokenizer=str(folders.tokenizer), text_encoder=str(folders.text_encoder),
                       cuda_graphs=False)
    assert remote["fingerprint"] == fingerprint([str(folders.llm), str(folders.tokenizer), str(folders.text_encoder)])
    backend = build_backend(local, SamplingConfig(**sampling), "cpu", "float32")
    [image] = generate(backend, [Request("a red cat on a sofa", 1)], SparseVARConfig(enabled=False))
    assert remote["pixels"] == hashlib.sha256(image.pixels_HWC.tobytes()).hexdigest()
