"""The end of a run counts the metadata by column, a batch at a time: the same figures as counting the rows one by
one in Python (what the run records held before), over several files, runs and failures."""

import random

from storage.metadata import metadata_table, read_metadata, write_metadata_file
from workflows.tally import tally_metadata


def _stages(rng: random.Random) -> list[dict]:
    return [{"stage": s, "height": s, "width": s, "tokens": s * s, "kept": rng.randint(1, s * s), "latency_ms": 1.0}
            for s in range(1, 6)]


def _write_output(tmp_path) -> str:
    """Eight files of rows from three runs (one from before rows carried a run id), a fifth of them failed."""
    rng = random.Random(0)
    for f in range(8):
        rows = []
        for i in range(25):
            run_id = rng.choice(["run-a", "run-b", None])
            base = {"prompt_id": f"p{f}-{i}", "prompt": "a red circle", "seed": i, "model": "tiny", "run_id": run_id,
                    "source_row": f * 25 + i + 1}
            if rng.random() < 0.2:
                rows.append({**base, "status": "error", "error": f"bad row {f}-{i}"})
            else:
                rows.append({**base, "status": "ok", "stages": _stages(rng)})
        write_metadata_file(str(tmp_path), f"file-{f}.parquet", metadata_table(rows))
    return str(tmp_path)


def test_tally_counts_what_a_row_by_row_count_finds(tmp_path):
    output = _write_output(tmp_path)
    rows = read_metadata(output).to_pylist()
    tally = tally_metadata(output, None, failed_shown=3)
    for run_id in ("run-a", "run-b", None):
        mine = [r for r in rows if r["run_id"] == run_id]
        ok = [r for r in mine if r["status"] == "ok"]
        counts = tally.runs[run_id]
        assert (counts.images, counts.failed) == (len(ok), len(mine) - len(ok))
        errors = [r for r in mine if r["status"] == "error"][:3]
        assert counts.failed_rows == [{k: r[k] for k in ("source_row", "prompt_id", "seed", "error")} for r in errors]
        ratios = counts.kept_ratio_by_stage(first_sparse=3)
        assert sorted(ratios) == [3, 4, 5]
        for stage, ratio in ratios.items():
            expected = [s["kept"] / s["tokens"] for r in ok for s in r["stages"] if s["stage"] == stage]
            assert abs(ratio - sum(expected) / len(expected)) < 1e-12
    assert tally.total.images + tally.total.failed == len(rows) == 200
    assert [r["prompt_id"] for r in tally.total.failed_rows] == [r["prompt_id"] for r in rows
                                                                 if r["status"] == "error"][:3]
    assert tally.total.kept_ratio_by_stage(first_sparse=None) == {}


def test_an_output_without_metadata_counts_nothing(tmp_path):
    tally = tally_metadata(str(tmp_path), None, failed_shown=3)
    assert (tally.total.images, tally.total.failed, dict(tally.runs)) == (0, 0, {})
