"""A local Ray cluster started with `ray start`, as on a real cluster, for the tests and the chaos benchmark.

Every port is picked free, so its agents never collide with another cluster on the machine (a job agent that
fails to bind leaves `ray job submit` with "No available agent"), and its temp dir marks its processes, so
stopping it stops only them (`ray stop` would stop every cluster on the machine).
"""

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Cluster:
    address: str  # GCS address, for ray.init and RAY_ADDRESS
    dashboard: str  # job submission address, for `ray job submit`


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_cluster(num_cpus: int = 2) -> Iterator[Cluster]:
    """A head node on 127.0.0.1 with `num_cpus` CPUs and a dashboard, stopped (its processes only) on exit."""
    port, dashboard_port = free_port(), free_port()
    temp_dir = f"/tmp/ray-test-{port}"
    subprocess.run(["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={num_cpus}",
                    f"--temp-dir={temp_dir}", f"--dashboard-agent-listen-port={free_port()}",
                    f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                    f"--metrics-export-port={free_port()}",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                    "--disable-usage-stats"], check=True, capture_output=True)
    try:
        yield Cluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}")
    finally:
        stop_processes_of(temp_dir)


def stop_processes_of(marker: str) -> None:
    """SIGTERM, then SIGKILL, every process whose command line holds `marker`."""
    listing = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    pids = [int(line.split(None, 1)[0]) for line in listing.splitlines() if marker in line]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        time.sleep(1)


def actor_pids() -> list[int]:
    """The generation actors' processes on this machine (by their title: Ray Data's map workers of Generator)."""
    listing = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in listing.splitlines() if "MapBatches(Generator)" in line]
