"""Shared fixtures: one local Ray cluster per test session, and config overrides that make job runs quick."""

import os

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# A ~/.ray/auth_token left by an earlier ray.init() would make `ray start` demand tokens from every client.
os.environ["RAY_AUTH_MODE"] = "disabled"
# Dummy credentials for the loopback S3 endpoint, set before the cluster starts so its workers inherit them;
# no SDK may probe the network for others.
for _name, _value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                      "AWS_EC2_METADATA_DISABLED": "true"}.items():
    os.environ[_name] = _value
os.environ.pop("AWS_ENDPOINT_URL", None)
os.environ.pop("AWS_PROFILE", None)

import contextlib  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Bit-exact comparisons in this process (dense vs sparse, batch vs one by one) assume one intra-op thread,
# as in the generation actors (ray.num_cpus_per_actor=1).
torch.set_num_threads(1)

# KEY=VALUE overrides for `--set` or workflows.config.load_config: 8 stages up to 16x16 tokens (32x32 pixels)
# with SparseVAR from stage 6, so stages 6-8 may exclude tokens; one actor on the CPU, batches of 4.
FAST_OVERRIDES = (
    "model.patch_sizes=[1,2,3,4,6,8,12,16]",
    "sparsevar.start_stage=6",
    "runtime.device=cpu",
    "ray.num_actors=1",
    "ray.batch_size=4",
)


@pytest.fixture(scope="session")
def fast_overrides() -> tuple[str, ...]:
    """KEY=VALUE overrides (a tuple, so no test can change them for the others); extend with [*fast_overrides, ...]."""
    return FAST_OVERRIDES


@dataclass(frozen=True)
class Cluster:
    address: str  # GCS address, for ray.init and RAY_ADDRESS
    dashboard: str  # job submission address, for `ray job submit`


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """A two-CPU head node on 127.0.0.1, started with `ray start` as on a real cluster, shared by every test
    that asks for it (start-up costs seconds); the test process joins it as a driver."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)  # never the developer's own cluster
    # Every port is picked free, so the agents never collide with another cluster on the same machine (a job
    # agent that fails to bind leaves `ray job submit` with "No available agent").
    port, dashboard_port = _free_port(), _free_port()
    temp_dir = f"/tmp/ray-test-{port}"  # marks this cluster's processes, so teardown stops only them
    subprocess.run(["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                    f"--temp-dir={temp_dir}", f"--dashboard-agent-listen-port={_free_port()}",
                    f"--dashboard-agent-grpc-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
                    f"--metrics-export-port={_free_port()}",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                    "--disable-usage-stats"], check=True, capture_output=True)
    cluster = Cluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}")
    try:
        ray.init(address=cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        _stop_processes_of(temp_dir)


def _stop_processes_of(temp_dir: str) -> None:
    """Stop the processes of one local cluster (`ray stop` would stop every cluster on the machine)."""
    listing = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    pids = [int(line.split(None, 1)[0]) for line in listing.splitlines() if temp_dir in line]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        time.sleep(1)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint (moto's standalone server) on 127.0.0.1, with a bucket named `bucket`."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bucket")
    try:
        yield endpoint
    finally:
        server.stop()
