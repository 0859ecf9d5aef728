"""Three Ray nodes on one machine (ray.cluster_utils.Cluster): the job's generation actors spread over the nodes,
and a node removed mid-job, its actors dying with it, costs nothing: every prompt once, the bytes of an
uninterrupted run."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray.cluster_utils import Cluster

from benchmarks.cluster import actor_pids
from tests.test_failures import outputs

PROMPTS = 16


@pytest.fixture(scope="module")
def cluster():
    """A head node with no CPU (the driver's side: reading and planning ask for none) and two one-CPU workers,
    so two generation actors can only run on two different nodes."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        yield cluster, workers
    finally:
        cluster.shutdown()


def job(cluster: Cluster, fast_overrides, prompts: Path, out: Path) -> subprocess.Popen:
    overrides = [*fast_overrides, "ray.num_actors=2", "ray.batch_size=1", "ray.pipeline_restarts=3"]
    return subprocess.Popen(
        [sys.executable, "-m", "workflows.generate", "--config", "configs/tiny-random.yaml", "--prompts", str(prompts),
         "--output", str(out), *[a for o in overrides for a in ("--set", o)]],
        env={**os.environ, "RAY_ADDRESS": cluster.address}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)


def test_a_node_removed_mid_job_costs_nothing(cluster, fast_overrides, tmp_path):
    ray_cluster, workers = cluster
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"shape {i}", "seed": i}) + "\n"
                               for i in range(PROMPTS)))
    calm = job(ray_cluster, fast_overrides, prompts, tmp_path / "calm")
    assert calm.wait(timeout=600) == 0, calm.stdout.read()
    uninterrupted = outputs(tmp_path / "calm")
    assert len(uninterrupted) == PROMPTS

    out = tmp_path / "out"
    stormed = job(ray_cluster, fast_overrides, prompts, out)
    deadline, spread = time.monotonic() + 300, False
    while len(list((out / "images").glob("*.png"))) < 3:
        assert stormed.poll() is None and time.monotonic() < deadline, stormed.stdout.read()
        spread = spread or len(actor_pids()) >= 2  # one CPU a worker node: two actors are on two nodes
        time.sleep(0.1)
    assert spread or len(actor_pids()) >= 2, "the work did not spread over the two worker nodes"
    ray_cluster.remove_node(workers[1])  # its raylet and actors die with it
    assert stormed.wait(timeout=600) == 0, stormed.stdout.read()
    assert outputs(out) == uninterrupted  # every prompt once (outputs asserts it), byte for byte
    assert len(list((out / "images").glob("*.png"))) == PROMPTS
