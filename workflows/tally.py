"""An output's metadata counted by column, a record batch at a time: what the run records and `run.json` say (images
and failures per run, the mean kept ratio per stage, the first failed rows), without the driver ever holding the
rows. At 10 M rows the table with its per-stage lists, turned into Python objects, took gigabytes (docs/scale.md)."""

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from storage.metadata import scan_metadata

COLUMNS = ["run_id", "status", "stages", "source_row", "prompt_id", "seed", "error"]
FAILED_COLUMNS = ["source_row", "prompt_id", "seed", "error"]


@dataclass
class RowCounts:
    """Of one run's rows (or all of them): ok and error rows, per-stage sums of kept/tokens over the ok rows, and
    the first failed rows in metadata order."""

    images: int = 0
    failed: int = 0
    kept_sums: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    kept_rows: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    failed_rows: list[dict[str, Any]] = field(default_factory=list)

    def kept_ratio_by_stage(self, first_sparse: int | None) -> dict[int, float]:
        """Mean kept ratio of each stage from `first_sparse` on (none when SparseVAR is off)."""
        if first_sparse is None:
            return {}
        rows = sorted(self.kept_rows.items())
        return {stage: self.kept_sums[stage] / n for stage, n in rows if stage >= first_sparse}


@dataclass
class Tally:
    """RowCounts per run (key None: rows from before rows carried a run id) and of the whole output."""

    runs: dict[str | None, RowCounts] = field(default_factory=lambda: defaultdict(RowCounts))
    total: RowCounts = field(default_factory=RowCounts)


def tally_metadata(output: str, endpoint_url: str | None, failed_shown: int) -> Tally:
    """Count the output's metadata by column, batch by batch; keep at most `failed_shown` failed rows per run and
    of the whole output."""
    tally = Tally()
    for batch in scan_metadata(output, endpoint_url, COLUMNS):
        table = pa.Table.from_batches([batch])
        ok = pc.equal(table["status"], "ok")
        _count_rows(tally, table)
        _keep_failed(tally, table.filter(pc.invert(ok)), failed_shown)
        _add_kept(tally, table.filter(ok))
    return tally


def _count_rows(tally: Tally, rows: pa.Table) -> None:
    """Ok rows count as images, the others as failed, per (run, status) group."""
    counted = rows.group_by(["run_id", "status"], use_threads=False).aggregate([([], "count_all")])
    for run_id, status, n in zip(*(counted[c].to_pylist() for c in ("run_id", "status", "count_all")), strict=True):
        for counts in (tally.runs[run_id], tally.total):
            if status == "ok":
                counts.images += n
            else:
                counts.failed += n


def _keep_failed(tally: Tally, errors: pa.Table, failed_shown: int) -> None:
    """The first failed rows: few are ever kept, so only those are turned into Python objects."""
    for counts, rows in [(tally.total, errors)] + [
            (tally.runs[run_id], errors.filter(_run_is(errors, run_id)))
            for run_id in pc.unique(errors["run_id"]).to_pylist()]:
        wanted = failed_shown - len(counts.failed_rows)
        if wanted > 0:
            counts.failed_rows += rows.select(FAILED_COLUMNS).slice(0, wanted).to_pylist()


def _run_is(rows: pa.Table, run_id: str | None) -> pa.ChunkedArray:
    return pc.is_null(rows["run_id"]) if run_id is None else pc.fill_null(pc.equal(rows["run_id"], run_id), False)


def _add_kept(tally: Tally, ok: pa.Table) -> None:
    """Per (run, stage) sums of kept/tokens over the ok rows' stage lists, flattened in Arrow."""
    stages = ok["stages"].combine_chunks()
    flat = pc.list_flatten(stages)
    if not len(flat):
        return
    per_stage = pa.table({
        "run_id": ok["run_id"].combine_chunks().take(pc.list_parent_indices(stages)),
        "stage": flat.field("stage"),
        "ratio": pc.divide(pc.cast(flat.field("kept"), pa.float64()), pc.cast(flat.field("tokens"), pa.float64())),
    }).group_by(["run_id", "stage"], use_threads=False).aggregate([("ratio", "sum"), ("ratio", "count")])
    for run_id, stage, total, n in zip(*(per_stage[c].to_pylist() for c in ("run_id", "stage", "ratio_sum",
                                                                          "ratio_count")), strict=True):
        for counts in (tally.runs[run_id], tally.total):
            counts.kept_sums[stage] += total
            counts.kept_rows[stage] += n
