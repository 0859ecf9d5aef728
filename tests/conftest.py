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

import pytest  # noqa: E402
import torch  # noqa: E402

from benchmarks.cluster import local_cluster  # noqa: E402

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


@pytest.fixture(scope="session")
def ray_cluster():
    """A two-CPU head node on 127.0.0.1, started with `ray start` as on a real cluster (benchmarks.cluster), shared
    by every test that asks for it (start-up costs seconds); the test process joins it as a driver."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)  # never the developer's own cluster
    with local_cluster(num_cpus=2) as cluster:
        try:
            ray.init(address=cluster.address)
            yield cluster
        finally:
            ray.shutdown()


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
