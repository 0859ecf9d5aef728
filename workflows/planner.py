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
import pyarrow.compute as pc
import ray

from storage.images import MAX_NAME_LENGTH, safe_name
from storage.shards import MAX_KEY_ID, sample_key, shard_name
from workflows.prompts import in_order_pool, on_driver_node, reader_tasks
from workflows.resume import expand_images

log = logging.getLogger(__name__)
MERGE_EVERY = 1 << 20  # hashes held in sorted chunks before they join the sorted array


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def image_hash(prompt_id: str, seed: int) -> int:
    """The hash of an image's file name (files layout), the key of (prompt_id, seed) in plans and scans."""
    return _hash(f"{safe_name(prompt_id)}-s{seed}")


def image_hashes(prompt_ids: pa.Array | pa.ChunkedArray, seeds: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """`image_hash` of each (prompt_id, seed), as uint64, a column at a time (see _stored_ids)."""
    names, _ = _stored_ids(prompt_ids, _UNSAFE_NAME, MAX_NAME_LENGTH, safe_name)
    return _hashes(pc.binary_join_element_wise(names, _seed_text(seeds), "-s"))


def expand_and_hash(rows: pa.Table, images_per_prompt: int) -> pa.Table:
    """One row per image (workflows.resume.expand_images) with the hashes the planner compares: the file name's
    (`name_hash`), the shard sample key's (`sample_hash`, apart by a prefix) and the exact (id, seed)'s, and whether
    the id is stored under another name (`renamed`: the planner names such ids in its messages)."""
    rows = expand_images(rows, images_per_prompt)
    ids, seeds = rows["prompt_id"], _seed_text(rows["seed"])
    names, renamed_file = _stored_ids(ids, _UNSAFE_NAME, MAX_NAME_LENGTH, safe_name)
    keys, renamed_key = _stored_ids(ids, _UNSAFE_KEY, MAX_KEY_ID, lambda pid: sample_key(pid, 0).removesuffix("-s0"))
    columns = {"name_hash": _hashes(pc.binary_join_element_wise(names, seeds, "-s")),
               "sample_hash": _hashes(pc.binary_join_element_wise(
                   pc.binary_join_element_wise("shard sample", keys, " "), seeds, "-s")),
               "exact_hash": _hashes(pc.binary_join_element_wise(ids, seeds, "\0"))}
    for name, values in columns.items():
        rows = rows.append_column(name, pa.array(values, pa.uint64()))
    return rows.append_column("renamed", pa.array(renamed_file | renamed_key, pa.bool_()))


_UNSAFE_NAME = r"[^A-Za-z0-9._-]|^\."  # what storage.images.safe_name changes
_UNSAFE_KEY = r"[^A-Za-z0-9_-]"  # what storage.shards.sample_key changes


def _stored_ids(ids: pa.Array | pa.ChunkedArray, unsafe: str, limit: int, clean: Callable[[str], str]
                ) -> tuple[pa.Array, np.ndarray]:
    """(each id as `clean` stores it, which ones it changes): ids that match `unsafe` or whose length is outside
    1..`limit` go through `clean`, one by one; the rest (the usual case) are kept, found by one regex over the
    column. A Python call per row (two regexes, an f-string) cost 4x the hashes themselves."""
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    length = pc.utf8_length(ids)
    changed = pc.or_(pc.match_substring_regex(ids, unsafe), pc.or_(pc.equal(length, 0), pc.greater(length, limit)))
    changed = changed.to_numpy(zero_copy_only=False)
    if not changed.any():
        return ids, changed
    values = ids.to_pylist()
    for i in np.flatnonzero(changed).tolist():
        values[i] = clean(values[i])
    return pa.array(values, pa.string()), changed


def _seed_text(seeds: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The seeds as f-strings write them ("None" for a null one)."""
    return pc.fill_null(pc.cast(seeds, pa.string()), "None")


def _hashes(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.fromiter((_hash(text) for text in texts.to_pylist()), np.uint64, len(texts))


HASH_COLUMNS = ["name_hash", "sample_hash", "exact_hash"]
PLAN_COLUMNS = [*HASH_COLUMNS, "renamed"]  # the planner's inputs, not handed on


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """`values` as uint64, sorted, each once. Not np.unique: it hashes, 10.7 s for 11 M values here, where a
    stable sort (a timsort: linear on a few sorted runs, as merging sorted arrays gives) and a neighbour compare
    took 0.04 s."""
    values = np.sort(values.astype(np.uint64, copy=False), kind="stable")
    if len(values) < 2:
        return values
    first = np.empty(len(values), bool)
    first[0] = True
    np.not_equal(values[1:], values[:-1], out=first[1:])
    return values[first]


def search_sorted(held: np.ndarray, values: np.ndarray, side: str = "left") -> np.ndarray:
    """np.searchsorted(held, values, side), with the values looked up in sorted order: numpy then starts each search
    where the last ended, 5x faster into a 10 M array than scattered lookups (cache misses)."""
    order = np.argsort(values, kind="stable")
    at = np.empty(len(values), np.intp)
    at[order] = np.searchsorted(held, values[order], side)
    return at


def in_sorted(held: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Which of `values` the sorted array `held` holds (np.isin sorts both, by np.unique's hashing)."""
    order = np.argsort(values, kind="stable")
    found = np.empty(len(values), bool)
    found[order] = _holds(held, values[order])
    return found


def _holds(held: np.ndarray, needles: np.ndarray) -> np.ndarray:
    """Which of the sorted `needles` the sorted array `held` holds: looked up in sorted order, as search_sorted."""
    if not len(held):
        return np.zeros(len(needles), bool)
    return held[np.minimum(np.searchsorted(held, needles), len(held) - 1)] == needles


class HashSet:
    """A set of 64-bit hashes at 8 bytes each: a sorted array, and the latest additions in sorted chunks (merged
    pairwise as they grow, so there are few) until there are MERGE_EVERY of them. Looked up and added to a batch
    at a time: a Python call per row cost more than the rest of planning."""

    def __init__(self, values: np.ndarray | None = None) -> None:
        self.base = sorted_unique(values) if values is not None else np.empty(0, np.uint64)
        self.chunks: list[np.ndarray] = []
        self.pending = 0

    def contains(self, values: np.ndarray) -> np.ndarray:
        """Which of `values` the set holds."""
        order = np.argsort(values, kind="stable")  # sorted once for all the arrays it is looked up in
        needles, held_any = values[order], np.zeros(len(values), bool)
        for held in (self.base, *self.chunks):
            held_any |= _holds(held, needles)
        found = np.empty(len(values), bool)
        found[order] = held_any
        return found

    def add(self, values: np.ndarray) -> None:
        if not len(values):
            return
        self.chunks.append(np.sort(values.astype(np.uint64)))
        self.pending += len(values)
        while len(self.chunks) > 1 and len(self.chunks[-1]) >= len(self.chunks[-2]):
            last = self.chunks.pop()
            self.chunks[-1] = np.sort(np.concatenate([self.chunks[-1], last]), kind="stable")
        if self.pending >= MERGE_EVERY:
            self.base, self.chunks, self.pending = self.array(), [], 0

    def array(self) -> np.ndarray:
        return sorted_unique(np.concatenate([self.base, *self.chunks])) if self.chunks else self.base


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
            return rows.drop_columns(PLAN_COLUMNS)
        first = rows["source_row"][0].as_py()
        if first < self.last_row:
            raise RuntimeError(f"planner got row {first} after row {self.last_row}: the pipeline lost file order")
        self.last_row = rows["source_row"][-1].as_py()
        rows = self._mark_duplicates(rows)
        self.images += rows.num_rows
        if self.layout == "files":
            keep = self._keep_files(rows)
            out = rows.filter(keep).drop_columns(PLAN_COLUMNS)
            self.todo += out.num_rows
            return out
        return self._cut_shards(rows.drop_columns(["sample_hash", "exact_hash", "renamed"]), final=False)

    def _mark_duplicates(self, rows: pa.Table) -> pa.Table:
        """As workflows.resume used to on the driver, across every batch so far, with hashes. A batch whose names
        are new and distinct (the usual case) is taken whole; otherwise row by row, in order."""
        errors = rows["error"].to_pylist()
        names, samples, exact = (rows[c].to_numpy() for c in HASH_COLUMNS)
        valid = np.array([error is None for error in errors], bool)
        self.errors.add(names[~valid])
        name_known, sample_known = self.names.contains(names), self.names.contains(samples)
        candidates = np.concatenate([names[valid], samples[valid]])
        if (name_known | sample_known)[valid].any() or len(sorted_unique(candidates)) < len(candidates):
            valid = self._mark_taken(rows, errors, valid, name_known, sample_known)
            rows = rows.set_column(rows.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
        self.names.add(np.concatenate([names[valid], samples[valid]]))
        self.exact.add(exact[valid])
        renamed = valid & rows["renamed"].to_numpy(zero_copy_only=False)
        for i in np.flatnonzero(renamed).tolist():
            self.cleaned[int(names[i])] = self.cleaned[int(samples[i])] = rows["prompt_id"][i].as_py()
        return rows

    def _mark_taken(self, rows: pa.Table, errors: list[str | None], valid: np.ndarray, name_known: np.ndarray,
                    sample_known: np.ndarray) -> np.ndarray:
        """Row by row, in order: rows whose name an earlier row takes get their error (in `errors`); returns the
        rows that take their names."""
        names, samples, exact = (rows[c].to_numpy() for c in HASH_COLUMNS)
        exact_known = self.exact.contains(exact)
        pids, seeds = rows["prompt_id"].to_pylist(), rows["seed"].to_pylist()
        taken_now: set[int] = set()
        exact_now: set[int] = set()
        accepted = np.zeros(len(errors), bool)
        for i in np.flatnonzero(valid).tolist():
            pid, seed, name, sample = pids[i], seeds[i], int(names[i]), int(samples[i])
            by_name = bool(name_known[i]) or name in taken_now
            if by_name or sample_known[i] or sample in taken_now:
                if exact_known[i] or int(exact[i]) in exact_now:
                    errors[i] = (f"duplicate id {pid!r} with seed {seed}: an earlier row already generates this "
                                 "image; give each prompt a unique id, or a different seed")
                    continue
                hit = name if by_name else sample
                earlier = self.cleaned.get(hit) or (safe_name(pid) if hit == name
                                                    else sample_key(pid, seed).removesuffix(f"-s{seed}"))
                errors[i] = (f"id {pid!r} with seed {seed} would be stored under the same name as the earlier id "
                             f"{earlier!r}; rename one of them")
                continue
            accepted[i] = True
            taken_now.update((name, sample))
            exact_now.add(int(exact[i]))
            if rows["renamed"][i].as_py():  # a later row of this batch may name this one
                self.cleaned[name] = self.cleaned[sample] = pid
        return accepted

    def _keep_files(self, rows: pa.Table) -> np.ndarray:
        """Which rows to generate: not done ones, and input errors not recorded yet (or sharing the name of an
        image retried, earlier in the file, which are reported again)."""
        names = rows["name_hash"].to_numpy()
        done, recorded = self.done.contains(names), self.recorded.contains(names)
        valid = rows["error"].is_null().to_numpy(zero_copy_only=False)
        keep = valid & ~done
        retried = keep & recorded
        self.skipped += int((valid & done).sum())
        retrying = self.retrying.contains(names)
        for i in np.flatnonzero(~valid).tolist():
            keep[i] = not recorded[i] or retrying[i] or bool(np.isin(names[i], names[:i][retried[:i]]))
            self.skipped_errors += not keep[i]
        self.retried += names[retried].tolist()
        self.retrying.add(names[retried])
        return keep

    def _cut_shards(self, rows: pa.Table, final: bool) -> pa.Table:
        """Whole shards of the rows so far, in order; the rest waits for the next batch (or finish)."""
        self.buffer.append(rows)
        self.buffered += rows.num_rows
        pending = pa.concat_tables(self.buffer)
        low, high = self.shards.locate(pending["name_hash"].to_numpy())
        out, start = [], 0
        while pending.num_rows - start >= self.shard_size or (final and start < pending.num_rows):
            shard = pending.slice(start, self.shard_size)
            out += self._shard(shard, low[start:start + shard.num_rows], high[start:start + shard.num_rows])
            start += shard.num_rows
        self.buffer, self.buffered = [pending.slice(start)], pending.num_rows - start
        return pa.concat_tables(out) if out else self._empty_shard(pending)

    def _shard(self, rows: pa.Table, low: np.ndarray, high: np.ndarray) -> list[pa.Table]:
        index, self.cut = self.cut // self.shard_size, self.cut + rows.num_rows
        name = shard_name(index)
        verdict = self.shards.verdict(index, rows, self.output, low, high)
        rows = rows.drop_columns(["name_hash"])
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
        empty = like.slice(0, 0).drop_columns(["name_hash"])
        return empty.append_column("shard", pa.array([], pa.int64())).append_column("shard_rows",
                                                                                    pa.array([], pa.int64()))

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
            asked = sorted_unique(np.concatenate([self.names.array(), self.errors.array()]))
            recorded = self.recorded.array()
            stale = recorded[~in_sorted(asked, recorded) & ~in_sorted(self.done.array(), recorded)].tolist()
        return {"images": self.images, "skipped": self.skipped, "skipped_errors": self.skipped_errors,
                "todo": self.todo, "tail": tail, "take_out": np.array(self.retried + stale, np.uint64)}


class PlanStage:
    """The Ray Data stage that hands each batch to the one Planner, in order (a pool of one actor)."""

    def __init__(self, planner: Any) -> None:
        self.planner = planner

    def __call__(self, rows: pa.Table) -> pa.Table:
        return ray.get(self.planner.plan.remote(rows))


def planned_rows(ds: ray.data.Dataset, planner: Any, images_per_prompt: int, parts: int) -> ray.data.Dataset:
    """`ds` (prompt rows of a file of `parts` parts, in file order) expanded, hashed and planned: the rows to
    generate, still in order."""
    expand: Callable[[pa.Table], pa.Table] = lambda rows: expand_and_hash(rows, images_per_prompt)  # noqa: E731
    ds = ds.map_batches(expand, batch_size=None, batch_format="pyarrow", num_cpus=0, compute=reader_tasks(parts))
    return ds.map_batches(PlanStage, fn_constructor_kwargs={"planner": planner}, batch_size=None,
                          batch_format="pyarrow", num_cpus=0, compute=in_order_pool(),
                          label_selector=on_driver_node())


def start_planner(**kwargs: Any) -> Any:
    """The Planner actor, on the driver's node (workflows.prompts.on_driver_node): never restarted with its hashes
    lost (max_restarts=0): losing it stops the pipeline, and the job's pipeline restart plans again."""
    return Planner.options(label_selector=on_driver_node()).remote(**kwargs)
