"""The Pareto script joins the bench's speed and the quality run's yardstick by label and finds the front."""

import json

from benchmarks.speedups_pareto import main


def test_front_and_best_settings_from_a_bench_and_a_quality_run(tmp_path):
    speed = {"dense": 1.0, "quantile τ=0.6": 1.7, "FastVAR, HART-0.7B's shape": 1.6, "dense, last 2 skipped": 2.5,
             "only in the bench": 9.0}
    score = {"dense": 0.74, "quantile τ=0.6": 0.73, "FastVAR, HART-0.7B's shape": 0.68, "dense, last 2 skipped": 0.60,
             "only in the quality run": 0.99}
    bench = {"rows": [{"setting": k, "batch_size": 8, "speedup": v, "latency_ms_median": 100 / v}
                      for k, v in speed.items()]}
    quality = {"rows": [{"label": k, "yardstick": v, "psnr_db": None if k == "dense" else 30.0}
                        for k, v in score.items()]}
    (tmp_path / "b.json").write_text(json.dumps(bench))
    (tmp_path / "q.json").write_text(json.dumps(quality))
    assert main(["--bench", str(tmp_path / "b.json"), "--quality", str(tmp_path / "q.json"),
                 "--out", str(tmp_path / "acc")]) == 0
    md = (tmp_path / "acc.md").read_text()
    front = {line.split(" | ")[0][2:] for line in md.splitlines() if line.endswith("| yes |")}
    assert front == {"dense", "quantile τ=0.6", "dense, last 2 skipped"}  # FastVAR's row is beaten on both
    assert "only in" not in md
    assert "any setting: quantile τ=0.6, 1.70×" in md and "FastVAR: none" in md
    assert (tmp_path / "acc.png").stat().st_size > 10_000
