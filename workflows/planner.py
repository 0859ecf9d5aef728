"""Planning as a stage of the job's streaming pipeline: prompt rows in file order in, rows to generate out.

Rows are expanded into images and hashed in parallel tasks (expand_and_hash); one planner actor, fed in file
order through a one-actor pool stage (PlanStage), does what needs the whole list seen so far: a later row that
takes an earlier row's image name becomes an error row, finished work is left out (workflows.scan says what the
output holds) and, for webdataset, rows are cut into shards in order. It keeps 8-byte hashes, not rows: about
24 bytes per image (docs/scale.md), in an actor of the cluster, never in the driver.
"""

import hashlib
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from storage.images import safe_name
from storage.shards import sample_key, shard_name
from workflows.prompts import in_order_pool, on_driver_node, reader_tasks
from workflows.resume import expand_images

log = logging.getLogger(__name__)
MERGE_EVERY = 1 << 20  # hashes held in a Python set before they join the sorted array


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def image_hash(prompt_id: str, seed: int) -> int:
    """The hash of an image's file name (files layout), the key of (prompt_id, seed) in plans and scans."""
    return _hash(f"{safe_name(prompt_id)}-s{seed}")


def image_hashes(prompt_ids: list[str], seeds: list[int]) -> np.ndarray:
    """`image_hash` of each (prompt_id, seed), as uint64."""
    return np.array([image_hash(p, s) for p, s in zip(prompt_ids, seeds, strict=True)], np.uint64)


def expand_and_hash(rows: pa.Table, images_per_prompt: int) -> pa.Table:
    """One row per image (workflows.resume.expand_images) with the hashes the planner compares: the file name's
    (`name_hash`), the shard sample key's (`sample_hash`, apart by a prefix) and the exact (id, seed)'s."""
    rows = expand_images(rows, images_per_prompt)
    pids, seeds = rows["prompt_id"].to_pylist(), rows["seed"].to_pylist()
    pairs = list(zip(pids, seeds, strict=True))
    columns = {"name_hash": image_hashes(pids, seeds),
               "sample_hash": [_hash(f"shard sample {sample_key(p, s)}") for p, s in pairs],
               "exact_hash": [_hash(f"{p}\0{s}") for p, s in pairs]}
    for name, values in columns.items():
        rows = rows.append_column(name, pa.array(values, pa.uint64()))
    return rows


HASH_COLUMNS = ["name_hash", "sample_hash", "exact_hash"]


class HashSet:
    """A set of 64-bit hashes at 8 bytes each: a sorted array, and the latest additions in a set until there
    are MERGE_EVERY of them."""

    def __init__(self, values: np.ndarray | None = None) -> None:
        self.base = np.unique(values).astype(np.uint64) if values is not None else np.empty(0, np.uint64)
        self.recent: set[int] = set()

    def in_base(self, values: np.ndarray) -> np.ndarray:
        """Which of `values` the sorted array holds, for a whole batch at once (a lookup per row costs more)."""
        if not len(self.base):
            return np.zeros(len(values), bool)
        at = np.minimum(np.searchsorted(self.base, values), len(self.base) - 1)
        return self.base[at] == values

    def add(self, value: int) -> None:
        self.recent.add(value)
        if len(self.recent) >= MERGE_EVERY:
            self.base = np.union1d(self.base, np.fromiter(self.recent, np.uint64, len(self.recent)))
            self.recent.clear()

    def array(self) -> np.ndarray:
        return np.union1d(self.base, np.fromiter(self.recent, np.uint64, len(self.recent)))


@ray.remote(num_cpus=0, max_restarts=0)
class Planner:
    """The job's plan, one batch of image rows at a time, in file order (see the module's docstring).

    files: `done` (hashes of images the output holds whole) are skipped; rows of other recorded images
    (`recorded`) are retried, their old rows taken out at the end (finish); input errors already recorded are
    not reported again. webdataset: `shards` (workflows.scan.ShardScan) says which shards are done."""

    def __init__(self, layout: str, shard_size: int, whole_file: bool, output: str, endpoint: str | None,
                 done: np.ndarray | None = None, recorded: np.ndarray | None = None, shards: Any = None) -> None:
        self.layout, self.shard_size, self.whole_file = layout, shard_size, whole_file
        self.output, self.endpoint = output, endpoint
        self.done, self.recorded = HashSet(done), HashSet(recorded)
        self.shards = shards
        self.names, self.exact, self.errors = HashSet(), HashSet(), HashSet()
        self.cleaned: dict[int, str] = {}  # name hash -> id, for ids whose names are not the id itself
        self.retried: list[int] = []
        self.retrying = HashSet()  # the same, to look up: an input error sharing their key is reported again
        self.skipped = self.skipped_errors = self.images = self.todo = 0
        self.last_row = 0
        self.buffer: list[pa.Table] = []  # webdataset: the rows of the shard being cut
        self.buffered = 0
        self.cut = 0  # webdataset: images cut into shards so far

    def plan(self, rows: pa.Table) -> pa.Table:
        """The rows of this batch to generate (webdataset: whole shards, complete ones only)."""
        if not rows.num_rows:
            return rows.drop_columns(HASH_COLUMNS)
        first = rows["source_row"][0].as_py()
        if first < self.last_row:
            raise RuntimeError(f"planner got row {first} after row {self.last_row}: the pipeline lost file order")
        self.last_row = rows["source_row"][-1].as_py()
        rows = self._mark_duplicates(rows)
        self.images += rows.num_rows
        if self.layout == "files":
            keep = self._keep_files(rows)
            out = rows.filter(pa.array(keep, pa.bool_())).drop_columns(HASH_COLUMNS)
            self.todo += out.num_rows
            return out
        return self._cut_shards(rows.drop_columns(HASH_COLUMNS), final=False)

    def _mark_duplicates(self, rows: pa.Table) -> pa.Table:
        """As workflows.resume used to on the driver, across every batch so far, with hashes."""
        errors = rows["error"].to_pylist()
        hashes = [rows[c].to_numpy() for c in HASH_COLUMNS]
        names_known = self.names.in_base(hashes[0]) | self.names.in_base(hashes[1])
        exact_known = self.exact.in_base(hashes[2])
        recent, exact_recent = self.names.recent, self.exact.recent
        columns = zip(rows["prompt_id"].to_pylist(), rows["seed"].to_pylist(), *(h.tolist() for h in hashes),
                      strict=True)
        for i, (pid, seed, name, sample, exact) in enumerate(columns):
            if errors[i] is not None:
                self.errors.add(name)
                continue
            taken = names_known[i] or name in recent or sample in recent
            if taken and (exact_known[i] or exact in exact_recent):
                errors[i] = (f"duplicate id {pid!r} with seed {seed}: an earlier row already generates this image; "
                             "give each prompt a unique id, or a different seed")
            elif taken:
                hit = name if name in recent or self.names.in_base(np.array([name], np.uint64))[0] else sample
                earlier = self.cleaned.get(hit) or (safe_name(pid) if hit == name
                                                    else sample_key(pid, seed).removesuffix(f"-s{seed}"))
                errors[i] = (f"id {pid!r} with seed {seed} would be stored under the same name as the earlier id "
                             f"{earlier!r}; rename one of them")
            else:
                self.names.add(name)
                self.names.add(sample)
                self.exact.add(exact)
                recent, exact_recent = self.names.recent, self.exact.recent  # a merge empties them
                if safe_name(pid) != pid or sample_key(pid, seed) != f"{pid}-s{seed}":
                    self.cleaned[name] = self.cleaned[sample] = pid
        return rows.set_column(rows.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))

    def _keep_files(self, rows: pa.Table) -> list[bool]:
        names = rows["name_hash"].to_numpy()
        done, recorded = self.done.in_base(names).tolist(), self.recorded.in_base(names).tolist()
        keep = []
        for name, error, is_done, is_recorded in zip(names.tolist(), rows["error"].to_pylist(), done, recorded,
                                                     strict=True):
            if error is not None:
                again = not is_recorded or name in self.retrying.recent or bool(self.retrying.in_base(
                    np.array([name], np.uint64))[0])
                keep.append(again)
                self.skipped_errors += not again
            elif is_done:
                keep.append(False)
                self.skipped += 1
            else:
                keep.append(True)
                if is_recorded:
                    self.retried.append(name)
                    self.retrying.add(name)
        return keep

    def _cut_shards(self, rows: pa.Table, final: bool) -> pa.Table:
        """Whole shards of the rows so far, in order; the rest waits for the next batch (or finish)."""
        self.buffer.append(rows)
        self.buffered += rows.num_rows
        pending = pa.concat_tables(self.buffer)
        out, start = [], 0
        while pending.num_rows - start >= self.shard_size or (final and start < pending.num_rows):
            shard = pending.slice(start, self.shard_size)
            start += shard.num_rows
            out += self._shard(shard)
        self.buffer, self.buffered = [pending.slice(start)], pending.num_rows - start
        return pa.concat_tables(out) if out else self._empty_shard(pending)

    def _shard(self, rows: pa.Table) -> list[pa.Table]:
        index, self.cut = self.cut // self.shard_size, self.cut + rows.num_rows
        name = shard_name(index)
        verdict = self.shards.verdict(index, rows["prompt_id"].to_pylist(), rows["seed"].to_pylist(),
                                     rows["error"].to_pylist(), self.output)
        errors = rows.num_rows - rows["error"].null_count
        if verdict == "done":
            self.skipped += rows.num_rows - errors
            self.skipped_errors += errors
            return []
        if verdict == "redo-recorded":
            self.shards.take_out(name, self.output, self.endpoint)
        self.todo += rows.num_rows
        return [rows.append_column("shard", pa.array([index] * rows.num_rows, pa.int64()))
                .append_column("shard_rows", pa.array([rows.num_rows] * rows.num_rows, pa.int64()))]

    @staticmethod
    def _empty_shard(like: pa.Table) -> pa.Table:
        return like.slice(0, 0).append_column("shard", pa.array([], pa.int64())).append_column(
            "shard_rows", pa.array([], pa.int64()))

    def counts(self) -> dict[str, int]:
        return {"skipped": self.skipped, "skipped_errors": self.skipped_errors}

    def finish(self) -> dict[str, Any]:
        """The counts, the last (short) shard's rows still to generate, and the hashes of images whose earlier
        rows the run takes out when it ends: retried ones, and (a whole-file run) recorded ones that the file no
        longer asks for and that hold no image."""
        tail = None
        if self.layout == "webdataset" and self.buffered:
            tail = self._cut_shards(self.buffer[-1].slice(0, 0), final=True)
        stale: list[int] = []
        if self.layout == "files" and self.whole_file:
            asked = np.union1d(self.names.array(), self.errors.array())
            recorded = self.recorded.array()
            stale = recorded[~np.isin(recorded, asked) & ~np.isin(recorded, self.done.array())].tolist()
        return {"images": self.images, "skipped": self.skipped, "skipped_errors": self.skipped_errors,
                "todo": self.todo, "tail": tail, "take_out": np.array(self.retried + stale, np.uint64)}


class PlanStage:
    """The Ray Data stage that hands each batch to the one Planner, in order (a pool of one actor)."""

    def __init__(self, planner: Any) -> None:
        self.planner = planner

    def __call__(self, rows: pa.Table) -> pa.Table:
        return ray.get(self.planner.plan.remote(rows))


def planned_rows(ds: ray.data.Dataset, planner: Any, images_per_prompt: int) -> ray.data.Dataset:
    """`ds` (prompt rows in file order) expanded, hashed and planned: the rows to generate, still in order."""
    expand: Callable[[pa.Table], pa.Table] = lambda rows: expand_and_hash(rows, images_per_prompt)  # noqa: E731
    ds = ds.map_batches(expand, batch_size=None, batch_format="pyarrow", num_cpus=0, concurrency=reader_tasks())
    return ds.map_batches(PlanStage, fn_constructor_kwargs={"planner": planner}, batch_size=None,
                          batch_format="pyarrow", num_cpus=0, compute=in_order_pool(),
                          label_selector=on_driver_node())


def start_planner(**kwargs: Any) -> Any:
    """The Planner actor, on the driver's node (workflows.prompts.on_driver_node): never restarted with its hashes
    lost (max_restarts=0): losing it stops the pipeline, and the job's pipeline restart plans again."""
    return Planner.options(label_selector=on_driver_node()).remote(**kwargs)
