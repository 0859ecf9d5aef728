"""The job's records, for people and tools: `{output}/runs/<run id>.json`, what one invocation was asked to do, how
it ended (running, ok, interrupted, failed) and its own counts; and `{output}/run.json`, the whole dataset's
summary, recomputed at the end of every invocation from the metadata and those records (so a resume with nothing
to do leaves the dataset's counts as they were)."""

import json
import logging
import platform
import re
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pyarrow import fs

from storage.uris import join, resolve, write_bytes
from workflows.tally import RowCounts, Tally

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
RUNS_DIR = "runs"
FAILED_SHOWN = 20  # failed rows listed by a summary; the rest are found with failed_rows_query
_SECRET_KEY = re.compile(r"secret|password|passwd|credential|api_?key|access_?key", re.IGNORECASE)
_URI_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


PACKAGES = ("sparsevar", "torch", "ray", "pyarrow", "numpy", "transformers")


def versions() -> dict[str, str | None]:
    """Python's and the installed versions of the packages that decide what a run produces (None: not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def redact(value: Any) -> Any:
    """A copy without secrets: values of secret-looking keys, and user:password@ in URIs, become ***."""
    if isinstance(value, dict):
        return {k: "***" if _SECRET_KEY.search(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _URI_USERINFO.sub("***@", value)
    return value


def _write_json(output: str, name: str, record: dict[str, Any], endpoint_url: str | None) -> str:
    return write_bytes(join(output, name), json.dumps(redact(record), indent=2).encode(), endpoint_url)


def write_run_json(output: str, record: dict[str, Any], endpoint_url: str | None = None) -> str:
    """Write `record` (secrets redacted) as `{output}/run.json`, the dataset's summary; returns its URI."""
    return _write_json(output, RUN_FILE, record, endpoint_url)


def write_run(output: str, record: dict[str, Any], endpoint_url: str | None = None) -> str:
    """Write one invocation's record (secrets redacted) as `{output}/runs/<run_id>.json`; returns its URI."""
    return _write_json(output, f"{RUNS_DIR}/{record['run_id']}.json", record, endpoint_url)


def read_runs(output: str, endpoint_url: str | None = None) -> list[dict[str, Any]]:
    """Every invocation's record, oldest first; one that cannot be read or parsed is skipped with a warning."""
    filesystem, root = resolve(output, endpoint_url)
    runs = []
    for info in filesystem.get_file_info(fs.FileSelector(join(root, RUNS_DIR), allow_not_found=True)):
        if info.type != fs.FileType.File or not info.base_name.endswith(".json"):
            continue
        try:
            with filesystem.open_input_stream(info.path) as stream:
                runs.append(json.loads(stream.read()))
        except (OSError, ValueError) as exc:
            log.warning("run record %s is unreadable (%s); the summary leaves it out", info.path, exc)
    return sorted(runs, key=lambda run: (run.get("started") or "", run.get("run_id") or ""))


def failed_rows_query(output: str, endpoint_url: str | None = None) -> str:
    """A command that prints every failed row of the output (no tool beyond this package)."""
    endpoint = f", {endpoint_url!r}" if endpoint_url else ""
    return ("python -c \"import pyarrow.compute as pc; from storage.metadata import read_metadata; "
            f"t = read_metadata({output!r}{endpoint}, ['status', 'source_row', 'prompt_id', 'seed', 'error']); "
            "[print(r) for r in t.filter(pc.equal(t['status'], 'error')).to_pylist()]\"")


def dataset_record(latest: dict[str, Any], runs: list[dict[str, Any]], tally: Tally,
                   kept_ratio_by_stage: dict[int, float]) -> dict[str, Any]:
    """run.json: the latest invocation's settings and outcome, the dataset's counts from its metadata (`tally`),
    and every invocation with the rows it left there. A record still `running` other than the latest is a run
    whose driver was killed (`killed`)."""
    listed = []
    for run in runs:
        status = run.get("status")
        if status == "running" and run["run_id"] != latest["run_id"]:
            status = "killed"
        listed.append({"run_id": run["run_id"], "status": status, "started": run.get("started"),
                       "finished": run.get("finished"), **_counts(tally.runs.get(run["run_id"]))})
    timed = [run for run in runs if run.get("images") and run.get("seconds")]
    seconds = sum(run["seconds"] for run in timed)
    finished = [run["finished"] for run in runs if run.get("finished")]
    return {
        **{k: v for k, v in latest.items() if k not in ("images", "failed", "seconds", "images_per_sec",
                                                         "kept_ratio_by_stage", "failed_rows", "skipped",
                                                         "skipped_errors", "deduplicated")},
        "started": min((run["started"] for run in runs if run.get("started")), default=latest.get("started")),
        "finished": max(finished, default=latest.get("finished")),
        "images": tally.total.images, "failed": tally.total.failed,
        "seconds": seconds, "images_per_sec": sum(run["images"] for run in timed) / seconds if seconds else None,
        "kept_ratio_by_stage": {str(k): v for k, v in sorted(kept_ratio_by_stage.items())},
        "failed_rows": tally.total.failed_rows, "failed_rows_query": failed_rows_query(
            latest["output"], (latest.get("config") or {}).get("storage", {}).get("endpoint_url")),
        "runs": listed,
    }


def _counts(counts: RowCounts | None) -> dict[str, int]:
    return {"images": counts.images, "failed": counts.failed} if counts else {"images": 0, "failed": 0}
