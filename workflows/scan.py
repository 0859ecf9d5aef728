"""What an output already holds, read by Ray tasks, one per metadata file, combined in one task: the driver
holds object references and a file list (bounded by compaction, workflows.compact), never the rows.

files: the hashes (workflows.planner.image_hash) of images done (an ok row whose image is there, whole; with
--verify, whose sha256 matches) and of every recorded image, and the surplus rows to take out now (every row of
a done image but the first ok one: copies from before the lease, old error rows of an image since made).
webdataset: ShardScan, what each shard holds; rows of shards whose tar is missing are taken out now.
"""

import hashlib
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from pyarrow import fs

from storage.images import IMAGE_DIR
from storage.metadata import METADATA_DIR
from storage.shards import list_shards, shard_name, shard_of
from storage.uris import join, resolve
from workflows.config import ConfigError
from workflows.planner import image_hashes, in_sorted, search_sorted, sorted_unique
from workflows.resume import QUARANTINE, layout_error, take_out, unrecord_shards

log = logging.getLogger(__name__)
COLUMNS = ["prompt_id", "seed", "status", "error", "image_uri", "image_sha256", "image_bytes", "shard", "run_id"]
# how actors.generator's error rows of a failed generation or write begin (input errors name the input instead)
GENERATION_ERRORS = ("generation failed: ", "writing the image failed: ", "writing shard ")


def metadata_files(output: str, endpoint_url: str | None) -> list[str]:
    """The visible Parquet files of the metadata, sorted; a rewrite cut off by a crash (resume.take_out) is deleted."""
    filesystem, root = resolve(output, endpoint_url)
    files = []
    for info in filesystem.get_file_info(fs.FileSelector(join(root, METADATA_DIR), allow_not_found=True)):
        if info.type != fs.FileType.File:
            continue
        if info.base_name.startswith("_") and info.base_name.endswith(".tmp"):
            log.warning("deleting %s, a metadata rewrite cut off by a crash", info.path)
            filesystem.delete_file(info.path)
        elif info.base_name.endswith(".parquet") and info.base_name[0] not in "._":
            files.append(info.path)
    return sorted(files)


def _read(path: str, output: str, endpoint: str | None) -> pa.Table | None:
    """The file's COLUMNS (null where it lacks one); None, and the file moved to `_unreadable/`, when it cannot
    be read (a write cut off by a crash): its images are generated again."""
    filesystem, root = resolve(output, endpoint)
    try:
        present = set(pq.read_schema(path, filesystem=filesystem).names)
        table = pq.read_table(path, filesystem=filesystem, columns=[c for c in COLUMNS if c in present])
    except (OSError, pa.ArrowInvalid) as exc:
        target = join(root, METADATA_DIR, QUARANTINE, posixpath.basename(path))
        log.warning("metadata file %s is unreadable (%s); moving it to %s", path, exc, target)
        filesystem.create_dir(join(root, METADATA_DIR, QUARANTINE))
        filesystem.move(path, target)
        return None
    for name in COLUMNS:
        if name not in present:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
    return table


def _hashes(table: pa.Table) -> np.ndarray:
    return image_hashes(table["prompt_id"], table["seed"])


@ray.remote(num_cpus=0)
def _scan_file(path: str, output: str, endpoint: str | None, verify: bool) -> dict[str, Any]:
    """One file's rows: hash, and whether each is an ok row whose image is there whole."""
    table = _read(path, output, endpoint)
    if table is None:
        return {"hashes": np.empty(0, np.uint64), **{k: np.empty(0, bool) for k in ("ok", "whole", "failed")}}
    if table["shard"].null_count < table.num_rows:
        return {"layout": "webdataset"}
    filesystem, root = resolve(output, endpoint)
    ok = pc.fill_null(pc.equal(table["status"], "ok"), False)
    names = pc.replace_substring_regex(table.filter(ok)["image_uri"], r"^.*/", "")  # basenames, a column at once
    paths = pc.binary_join_element_wise(join(root, IMAGE_DIR) + "/", names, "").to_pylist()
    ok = ok.to_numpy(zero_copy_only=False).tolist()
    sizes, shas = (table[c].to_pylist() for c in ("image_bytes", "image_sha256"))
    infos = iter(filesystem.get_file_info(paths))
    whole = []
    for good, size, sha in zip(ok, sizes, shas, strict=True):
        info = next(infos) if good else None
        there = info is not None and info.type == fs.FileType.File and (size is None or info.size == int(size))
        if there and verify:
            with filesystem.open_input_stream(info.path) as stream:
                there = hashlib.sha256(stream.read()).hexdigest() == sha
        whole.append(there)
    failed = [(error or "").startswith(GENERATION_ERRORS) for error in table["error"].to_pylist()]
    return {"hashes": _hashes(table), "ok": np.array(ok, bool), "whole": np.array(whole, bool),
            "failed": np.array(failed, bool)}


@ray.remote(num_cpus=0, num_returns=3)
def _combine_files(paths: list[str], *scans: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, Any]:
    """(done, recorded, take-outs: file -> row numbers, or the layout found) from every file's scan."""
    if any("layout" in scan for scan in scans):
        return np.empty(0, np.uint64), np.empty(0, np.uint64), "webdataset"
    hashes = np.concatenate([scan["hashes"] for scan in scans]) if scans else np.empty(0, np.uint64)
    whole = np.concatenate([scan["whole"] for scan in scans]) if scans else np.empty(0, bool)
    failed = np.concatenate([scan["failed"] for scan in scans]) if scans else np.empty(0, bool)
    ok = np.concatenate([scan["ok"] for scan in scans]) if scans else np.empty(0, bool)
    files = np.concatenate([np.full(len(scan["hashes"]), i) for i, scan in enumerate(scans)]) if scans else hashes
    rows = np.concatenate([np.arange(len(scan["hashes"])) for scan in scans]) if scans else hashes
    done = sorted_unique(hashes[whole])
    # ok and failed rows of done images, the kept one (its first whole ok row, by file then row) first; input
    # errors that share a done image's key (a later duplicate line) stay
    mine = np.flatnonzero(in_sorted(done, hashes) & (ok | failed))
    order = mine[np.lexsort((rows[mine], files[mine], ~whole[mine], hashes[mine]))]
    first = np.ones(len(order), bool)
    first[1:] = hashes[order][1:] != hashes[order][:-1]
    surplus: dict[str, set[int]] = {}
    for i in order[~first]:
        surplus.setdefault(paths[int(files[i])], set()).add(int(rows[i]))
    return done, sorted_unique(hashes), surplus


@dataclass
class FilesScan:
    done: Any  # ObjectRef of the sorted hashes of images done
    recorded: Any  # ObjectRef of the sorted hashes of every recorded image
    deduplicated: int  # surplus rows taken out now


def scan_files(output: str, endpoint: str | None, verify: bool = False) -> FilesScan:
    """Scan a files-layout output and take its surplus rows out (see the module's docstring)."""
    paths = metadata_files(output, endpoint)
    done, recorded, surplus = _combine_files.remote(paths, *[_scan_file.remote(p, output, endpoint, verify)
                                                              for p in paths])
    surplus = ray.get(surplus)
    if surplus == "webdataset":
        raise layout_error(output, "webdataset", "files")
    deduplicated = take_out(output, surplus, endpoint, lambda table: list(range(table.num_rows))) if surplus else 0
    return FilesScan(done, recorded, deduplicated)


@dataclass
class ShardScan:
    """What a webdataset output holds per shard, for the planner's verdict on each shard it cuts."""

    tars: set[int]  # shards whose tar exists
    counts: dict[int, int]  # rows recorded per shard
    files: dict[int, list[str]]  # metadata files holding each shard's rows
    keys: np.ndarray  # sorted image hashes of recorded rows
    key_shards: np.ndarray  # the shard of each
    taken: set[int] = field(default_factory=set)

    def locate(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where each image hash's recorded rows lie in `keys`: [low, high) (empty for an image not recorded). The
        planner locates a batch's rows at once: a shard at a time cost 0.8 ms a shard in lookups."""
        return search_sorted(self.keys, hashes, "left"), search_sorted(self.keys, hashes, "right")

    def verdict(self, index: int, rows: pa.Table, output: str, low: np.ndarray, high: np.ndarray) -> str:
        """done (tar and exactly as many rows), redo-recorded (rows to take out first) or redo. A planned image
        (`rows`: the shard's; `low`, `high`: where locate found them) recorded only in other shards means the shards
        were cut otherwise: ConfigError."""
        valid = rows["error"].is_null().to_numpy(zero_copy_only=False)
        one = (high - low == 1) & valid  # the usual case, at once; a key recorded more than once, row by row
        elsewhere = one & (self.key_shards[np.minimum(low, len(self.keys) - 1)] != index) if len(self.keys) else one
        several = np.flatnonzero((high - low > 1) & valid)
        wrong = [int(i) for i in np.flatnonzero(elsewhere)] + [
            int(i) for i in several if index not in self.key_shards[low[i]:high[i]]]
        if wrong:
            i = min(wrong)
            pid, seed, held = rows["prompt_id"][i].as_py(), rows["seed"][i].as_py(), self.key_shards[low[i]:high[i]]
            raise ConfigError(
                f"output {output} holds prompt {pid!r} (seed {seed}) in shard {shard_name(int(held[0]))}, but this "
                f"run puts it in {shard_name(index)}: shards are cut from the prompt list in order, so resume with "
                "the same prompts, --limit, output.images_per_prompt and output.shard_size, or write to a new output")
        recorded = self.counts.get(index, 0) if index not in self.taken else 0
        if index in self.tars and recorded == rows.num_rows:
            return "done"
        return "redo-recorded" if recorded else "redo"

    def take_out(self, name: str, output: str, endpoint: str | None) -> None:
        index = int(name.split("-")[-1].split(".")[0])
        unrecord_shards(output, {path: {name} for path in self.files.get(index, [])}, endpoint)
        self.taken.add(index)


@ray.remote(num_cpus=0)
def _scan_shard_file(path: str, output: str, endpoint: str | None) -> dict[str, Any]:
    table = _read(path, output, endpoint)
    if table is None:
        return {"hashes": np.empty(0, np.uint64), "shards": np.empty(0, np.int64)}
    if table["shard"].null_count:
        return {"layout": "files"}
    shards = [int(shard_of(uri).split("-")[-1].split(".")[0]) for uri in table["shard"].to_pylist()]
    return {"hashes": _hashes(table), "shards": np.array(shards, np.int64)}


@ray.remote(num_cpus=0, num_returns=2)
def _combine_shards(paths: list[str], tars: set[int], shard_size: int, *scans: dict[str, Any]
                    ) -> tuple[ShardScan | None, dict[str, Any]]:
    """(the ShardScan, for the planner; what the driver needs: the layout found, a shard size problem, and the
    rows of shards without a tar, file -> shard names)."""
    if any("layout" in scan for scan in scans):
        return None, {"layout": "files"}
    counts: dict[int, int] = {}
    files: dict[int, list[str]] = {}
    for path, scan in zip(paths, scans, strict=True):
        for index, n in zip(*np.unique(scan["shards"], return_counts=True), strict=True):
            counts[int(index)] = counts.get(int(index), 0) + int(n)
            files.setdefault(int(index), []).append(path)
    hashes = np.concatenate([s["hashes"] for s in scans]) if scans else np.empty(0, np.uint64)
    shards = np.concatenate([s["shards"] for s in scans]) if scans else np.empty(0, np.int64)
    order = np.argsort(hashes, kind="stable")
    complete = sorted(i for i in counts if i in tars)
    wrong = [i for i in complete[:-1] if counts[i] != shard_size]
    if complete and counts[complete[-1]] > shard_size:
        wrong.append(complete[-1])
    missing: dict[str, set[str]] = {}
    for index, held in files.items():
        if index not in tars:
            for path in held:
                missing.setdefault(path, set()).add(shard_name(index))
    summary = {"wrong": (wrong[0], counts[wrong[0]]) if wrong else None, "missing": missing}
    return ShardScan(tars, counts, files, hashes[order], shards[order]), summary


def scan_shards(output: str, endpoint: str | None, shard_size: int) -> Any:
    """Scan a webdataset output: rows of shards without a tar are taken out now; an output whose complete
    shards hold another number of rows than `shard_size` (all but the last) raises ConfigError. Returns an
    ObjectRef of its ShardScan."""
    tars = {int(name.split("-")[-1].split(".")[0]) for name in list_shards(output, endpoint)}
    for _ in range(2):  # once more after taking rows out
        paths = metadata_files(output, endpoint)
        scan, summary = _combine_shards.remote(paths, tars, shard_size,
                                               *[_scan_shard_file.remote(p, output, endpoint) for p in paths])
        summary = ray.get(summary)
        if summary.get("layout"):
            raise layout_error(output, "files", "webdataset")
        if summary["wrong"]:
            index, rows = summary["wrong"]
            raise ConfigError(f"output {output} holds {rows} rows in shard {shard_name(index)}, but this run cuts "
                              f"shards of {shard_size} (output.shard_size): shards are cut from the prompt list in "
                              "order, so resume with the same prompts, --limit, output.images_per_prompt and "
                              "output.shard_size, or write to a new output")
        if not summary["missing"]:
            break
        unrecord_shards(output, summary["missing"], endpoint)
    return scan


@ray.remote(num_cpus=0)
def _take_out_images(path: str, output: str, endpoint: str | None, hashes: np.ndarray, run_id: str) -> int:
    """Take the rows of images in `hashes` (sorted, each once) that other runs wrote out of one file."""
    table = pq.read_table(path, filesystem=resolve(output, endpoint)[0], columns=["prompt_id", "seed", "run_id"])
    mine = np.array([r == run_id for r in table["run_id"].to_pylist()], bool)
    drop = in_sorted(hashes, _hashes(table)) & ~mine
    if not drop.any():
        return 0
    rows = set(np.flatnonzero(drop).tolist())
    return take_out(output, {path: rows}, endpoint, lambda t: list(range(t.num_rows)))


def take_out_images(output: str, endpoint: str | None, hashes: np.ndarray, run_id: str) -> int:
    """Take out the rows of the given images that earlier runs wrote (this run's own rows stay), a task a file."""
    if not len(hashes):
        return 0
    ref = ray.put(sorted_unique(hashes))  # sorted once here, looked up by every file's task
    return sum(ray.get([_take_out_images.remote(p, output, endpoint, ref, run_id)
                        for p in metadata_files(output, endpoint)]))
