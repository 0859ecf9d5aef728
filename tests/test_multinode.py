"""Three Ray nodes on one machine (ray.cluster_utils.Cluster): the job's generation actors spread over the worker
nodes, the stateful planning actors stay on the head (the driver's node), and a worker node removed mid-job, its
actors dying with it, costs nothing: every prompt once, with the bytes of a single-process run (the dense model,
one Generator, no Ray)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from ray.cluster_utils import Cluster

from actors.generator import Generator
from storage.prompts import normalize_jsonl_lines
from tests.test_failures import outputs
from workflows.config import load_config

PROMPTS = 12
STATEFUL = ("_Numberer", "PlanStage", "Planner")  # process titles of the actors that hold the plan's state
TITLES = ("MapBatches(Generator)", *STATEFUL)
CONFIG = "configs/tiny-random.yaml"
# the dense model; batches of one image, so both actors get work; pipeline restarts should Ray's retries run out
OVERRIDES = ("sparsevar.enabled=false", "output.report=false", "ray.num_actors=2", "ray.batch_size=1",
             "ray.pipeline_restarts=3")


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


def prompt_lines() -> list[str]:
    return [json.dumps({"id": f"p{i}", "prompt": f"shape {i}", "seed": i}) for i in range(PROMPTS)]


def reference(fast_overrides: tuple[str, ...], out: Path) -> dict[tuple[str, int], str]:
    """(prompt_id, seed) -> sha256 of each image made by one Generator in this process, no Ray: one batch."""
    cfg = load_config(CONFIG, [*fast_overrides, *OVERRIDES])
    rows = Generator(cfg.model_dump(mode="json"), str(out))(normalize_jsonl_lines(prompt_lines())).to_pylist()
    assert all(row["status"] == "ok" for row in rows)
    return {(row["prompt_id"], row["seed"]): row["image_sha256"] for row in rows}


def raylet(node) -> int:
    return node.all_processes["raylet"][0].process.pid


def nodes_of(cluster: Cluster) -> dict[str, set[int]]:
    """For each of TITLES, the raylet pids (nodes) of the cluster's Ray workers whose process title holds it: a
    worker's parent is its node's raylet (other clusters on the machine are left out)."""
    raylets = {raylet(node) for node in cluster.list_all_nodes()}
    listing = subprocess.run(["ps", "-ww", "-eo", "ppid=,args="], capture_output=True, text=True).stdout
    workers = [(int(ppid), args) for ppid, args in (line.split(None, 1) for line in listing.splitlines())
               if int(ppid) in raylets and args.startswith("ray::")]
    return {title: {ppid for ppid, args in workers if title in args} for title in TITLES}


def test_a_worker_node_removed_mid_job_costs_nothing(cluster, fast_overrides, tmp_path):
    ray_cluster, workers = cluster
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(line + "\n" for line in prompt_lines()))
    expected = reference(fast_overrides, tmp_path / "reference")
    out = tmp_path / "out"
    job = subprocess.Popen(
        [sys.executable, "-m", "workflows.generate", "--config", CONFIG, "--prompts", str(prompts), "--output",
         str(out), *[a for o in [*fast_overrides, *OVERRIDES] for a in ("--set", o)]],
        env={**os.environ, "RAY_ADDRESS": ray_cluster.address}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        seen: dict[str, set[int]] = {title: set() for title in TITLES}  # title -> raylets of the processes
        while len(list((out / "images").glob("*.png"))) < 2:
            assert job.poll() is None and time.monotonic() < deadline, job.stdout.read()
            seen = {title: nodes | found for (title, nodes), found in zip(seen.items(), nodes_of(ray_cluster).values(),
                                                                          strict=True)}
            time.sleep(0.05)
        assert seen["MapBatches(Generator)"] == {raylet(w) for w in workers}, "the work did not spread"
        assert seen["Planner"] and all(seen[title] <= {raylet(ray_cluster.head_node)} for title in STATEFUL), seen
        ray_cluster.remove_node(workers[1])  # its raylet and the generation actor on it die
        assert len(list((out / "images").glob("*.png"))) < PROMPTS, "the job ended before the node was removed"
        assert job.wait(timeout=120) == 0, job.stdout.read()
    finally:
        job.kill()
    assert outputs(out) == expected  # every prompt once (outputs asserts it), byte for byte
    assert pq.read_table(out / "metadata").num_rows == PROMPTS
    assert len(list((out / "images").glob("*.png"))) == PROMPTS
