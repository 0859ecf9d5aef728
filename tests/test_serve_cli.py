"""`python -m workflows.serve` as a user runs it: a subprocess with its own local Ray, asked for /healthz, then
stopped with Ctrl-C (SIGINT). Every process of its Ray carries a marker in its environment, so the test can tell
that none of them outlived it (other Ray clusters may run on the machine)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from benchmarks.cluster import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-random.yaml"
MARK = "SPARSEVAR_SERVE_TEST_RUN"
START_S = 300  # a bound on start-up on a busy machine, never a measured figure


def marked_pids(value: str) -> list[int]:
    """Processes whose environment holds MARK=value: the subprocess and all that its Ray started."""
    needle = f"{MARK}={value}".encode()
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


def healthz(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port (a bind as a server makes it, so TIME_WAIT does not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def test_serve_answers_healthz_and_ctrl_c_stops_it_and_its_ray(tmp_path, fast_overrides):
    port, run = free_port(), uuid.uuid4().hex
    env = {**os.environ, MARK: run, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)  # its own local Ray, as a user's first run
    log = tmp_path / "serve.log"
    argv = [sys.executable, "-m", "workflows.serve", "--config", str(CONFIG), "--port", str(port),
            *(arg for setting in fast_overrides for arg in ("--set", setting))]
    with log.open("w") as out:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline, health = time.monotonic() + START_S, None
        while health is None and process.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
            health = healthz(f"http://127.0.0.1:{port}")
        assert health is not None and health["status"] == "ok", log.read_text()[-3000:]
        assert len(marked_pids(run)) > 2  # the server, its gcs_server, raylet, ...: the marker finds them
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=120)
        left = marked_pids(run)
        deadline = time.monotonic() + 30  # Ray's workers follow their raylet down within moments, not at once
        while left and time.monotonic() < deadline:
            time.sleep(1)
            left = marked_pids(run)
    finally:
        if process.poll() is None:
            process.kill()
        for pid in marked_pids(run):  # none after a pass; after a failure, never left to the next test
            os.kill(pid, signal.SIGKILL)
    output = log.read_text()
    assert code in (0, 130), output[-3000:]
    assert "Traceback" not in output, output
    assert "stopped" in output.splitlines(), output[-3000:]
    assert not listening(port)
    assert left == [], "processes of the stopped server's Ray are left"
