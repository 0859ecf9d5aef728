"""scripts/gpu/official.py: the official pipelines beside ours. The official code lives only in the git-ignored
.official/ (scripts/gpu/official_export.sh), so CI, which has no export, skips the smoke run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts/gpu/official.py"


def test_missing_export_names_the_export_script(tmp_path, monkeypatch):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import official
    finally:
        sys.path.remove(str(SCRIPT.parent))
    monkeypatch.setattr(official, "OFFICIAL", tmp_path / "no-export")
    with pytest.raises(SystemExit, match="scripts/gpu/official_export.sh"):
        official.import_official()


@pytest.mark.skipif(not (REPO / ".official/infinity").is_dir(),
                    reason="no .official/ export (git-ignored, never committed; CI has none): "
                    "run scripts/gpu/official_export.sh")
def test_smoke_runs_official_and_ours_end_to_end(tmp_path):
    out = tmp_path / "official.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--runs", "1", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {(r["model"], r["pipeline"].split(" ")[0]) for r in report["rows"]} == {
        (m, p) for m in ("infinity-2b", "hart-0.7b") for p in ("official", "ours")}
    assert len(report["rows"]) == 6 and all(r["images_per_s"] > 0 for r in report["rows"])
    for model in ("infinity-2b", "hart-0.7b"):
        diff = report[f"{model}_official_vs_ours_dense"][0]
        assert diff["shape_official"] == diff["shape_ours"] and 0 <= diff["max_abs_diff"] <= 255
    assert "| infinity-2b | official |" in out.with_suffix(".md").read_text()
