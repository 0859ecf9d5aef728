"""`python -m workflows.bench` end to end on a small schedule (the figures are the benchmark's business: here only
that every figure the issue asks for is there and consistent), and its steady-state throughput window."""

import json
from datetime import UTC, datetime, timedelta

import pytest

from workflows.bench import main, median_round, steady_window

REQUIRED = {"setting", "mode", "normalize", "tau", "batch_size", "latency_ms_median", "speedup", "flops_ratio",
            "efficiency", "kept_ratio", "sparsevar_overhead_ms"}


def test_steady_window_starts_when_the_warm_up_images_are_stored():
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    # a slow first batch of 2 (start-up), then a batch of 2 every 4 s, stored in any order
    written = [t0 + timedelta(seconds=s) for s in (20, 30, 30.5, 34, 34.5, 38, 38.5, 20.5)]
    assert steady_window(written, warm=2) == (6, pytest.approx(18))
    with pytest.raises(ValueError, match="no steady state"):
        steady_window(written[:2], warm=2)


def test_the_median_round_is_the_middle_of_an_odd_number():
    assert median_round([5.0, -3.0, 1.0]) == 2 and median_round([4.0]) == 0
    with pytest.raises(ValueError, match="odd number"):
        median_round([1.0, 2.0])


def test_bench_writes_every_figure_of_the_issue(ray_cluster, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["--config", "configs/bench-cpu.yaml", "--out", str(out), "--batch-sizes", "1", "2", "--taus", "0.6",
                 "--kept", "0.5", "--repeats", "1", "--pipeline-prompts", "12", "--pipeline-rounds", "1",
                 "--set", "model.patch_sizes=[1,2,3,4,6,8,12,16]", "--set", "sparsevar.start_stage=6",
                 "--speedups"]) == 0
    report = json.loads((out / "bench.json").read_text())
    rows = report["rows"]
    settings = [("dense", None, None), ("sparse", "minmax", 0.6), ("sparse", "quantile", 0.5)]
    for b in (1, 2):
        first = [(r["mode"], r["normalize"], r["tau"]) for r in rows if r["batch_size"] == b][:3]
        assert first == settings
    labels = [r["setting"] for r in rows if r["batch_size"] == 1]
    assert labels[:3] == ["dense", "minmax τ=0.6", "quantile τ=0.5"] and len(labels) == 18
    assert "FastVAR, HART-0.7B's shape" in labels and "minmax τ=0.6, last 2 skipped" in labels
    cut = next(r for r in rows if r["setting"] == "minmax τ=0.6, guidance on stages 1-6")
    assert [s["branches"] for s in cut["stages"]] == [2] * 6 + [1, 1] and cut["flops_ratio"] > 1
    skipped = next(r for r in rows if r["setting"] == "dense, last 2 skipped")
    assert [s["kept_ratio"] for s in skipped["stages"][-2:]] == [0.0, 0.0] and skipped["flops_ratio"] > 1
    for row in rows:
        assert REQUIRED <= row.keys()
        assert row["efficiency"] == pytest.approx(row["speedup"] / row["flops_ratio"])
        assert (row["setting"] == "dense") == (row["flops_ratio"] == 1.0)  # FastVAR counts through `pruned`
        if row["setting"] in ("dense", "minmax τ=0.6", "quantile τ=0.5"):  # kept: SparseVAR's, from stage P
            assert (row["setting"] == "dense") == (row["kept_ratio"] == 1.0)
        assert row["sparsevar_overhead_ms"] >= 0 and (row["mode"] == "dense") == (row["sparsevar_overhead_ms"] == 0)
    pipeline = report["pipeline"]
    assert pipeline["bare_images_per_sec"] > 0 and pipeline["ray_images_per_sec"] > 0
    assert pipeline["rounds"] == 1 and pipeline["overhead_pct_rounds"] == [pipeline["overhead_pct"]]
    assert pipeline["overhead_pct"] == pytest.approx(
        (pipeline["bare_images_per_sec"] * pipeline["actors"] / pipeline["ray_images_per_sec"] - 1) * 100)
    assert (out / "pipeline-0").is_dir()
    assert pipeline["first_batch_s"] > 0 and pipeline["prompts"] == 12 and 0 < pipeline["actor_generating_pct"] <= 100
    assert {p.name for p in out.iterdir()} >= {"bench.json", "bench.md", "speedup.png", "stages.png"}
    assert "| pipeline | value |" in (out / "bench.md").read_text()


@pytest.mark.parametrize(("argv", "named"), [(["--pipeline-prompts", "4"], "at least 8"),
                                             (["--pipeline-rounds", "0"], "odd number"),
                                             (["--pipeline-rounds", "2"], "odd number"),
                                             (["--set", "ray.num_actors=[1,2]"], "fixed number of actors")])
def test_a_pipeline_with_no_steady_state_is_refused_before_any_timing(tmp_path, capsys, argv, named):
    assert main(["--config", "configs/bench-cpu.yaml", "--out", str(tmp_path / "b"), *argv]) == 2
    assert named in capsys.readouterr().err and not (tmp_path / "b").exists()
