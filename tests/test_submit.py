"""The job as users run it on a cluster: `ray job submit` to a head node, code shipped as the working dir."""

import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]


def test_ray_job_submit_generates_into_the_output(ray_cluster, fast_overrides, tmp_path):
    out = tmp_path / "out"
    overrides = [arg for o in fast_overrides for arg in ("--set", o)]
    command = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_cluster.dashboard,
               "--working-dir", str(REPO), "--runtime-env-json", '{"excludes": [".venv", ".git", "out", "*.egg-info"]}',
               "--", "python", "-m", "workflows.generate", "--config", "configs/tiny-random.yaml",
               "--prompts", "configs/prompts/sample.jsonl", "--output", str(out), "--limit", "3", *overrides]
    deadline = time.monotonic() + 180  # a fresh head node's job agent can take a while on a busy machine
    while True:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if "No available agent to submit job" not in result.stdout + result.stderr or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "images written: 3" in result.stdout
    assert len(list((out / "images").glob("*.png"))) == 3
    table = pq.read_table(out / "metadata")
    assert table.num_rows == 3 and set(table["status"].to_pylist()) == {"ok"}
