"""What a run still has to generate: every prompt's images, less what the output already holds.

The metadata under `{output}/metadata` is the single record of what is done. In the `files` layout a
(prompt_id, seed) with an `ok` row whose image exists is skipped, so a crashed, pre-empted or repeated job
continues where it stopped and never writes an image, or its row, twice. Any other recorded image (its
generation failed, or its file is gone) is generated again after its rows are taken out of the metadata, so
the metadata holds one outcome per image.

In the `webdataset` layout the unit is the shard: row i of the full list of images (prompts expanded by
`images_per_prompt`, after `--limit`) belongs to shard i // shard_size, fixed on the driver. A shard is done
when its tar exists and the metadata holds exactly its rows; any other shard is generated again whole (same
seeds, so the same samples) after its rows, if some were recorded, are taken out of the metadata files that
hold them (each file rewritten in one step). Readers of the metadata so see every sample once.
"""

import hashlib
import logging
import posixpath
import uuid
from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs

from storage.images import safe_name
from storage.metadata import METADATA_DIR
from storage.prompts import derived_seed
from storage.shards import list_shards, sample_key, shard_name, shard_of
from storage.uris import join, resolve
from workflows.config import ConfigError

log = logging.getLogger(__name__)
QUARANTINE = "_unreadable"
Key = tuple[str, int]


def expand_images(prompts: pa.Table, images_per_prompt: int) -> pa.Table:
    """One row per image: the prompt's own seed first, then seeds derived from it."""
    if images_per_prompt == 1:
        return prompts
    rows = [{**row, "seed": derived_seed(row["seed"], j) if row["error"] is None else row["seed"]}
            for row in prompts.to_pylist() for j in range(images_per_prompt)
            if j == 0 or row["error"] is None]
    return pa.Table.from_pylist(rows, schema=prompts.schema)


def mark_duplicates(prompts: pa.Table) -> pa.Table:
    """A row whose image name (from its id and seed) an earlier row of the file already takes becomes an error
    row: its image would overwrite the first. Ids collide this way when they are equal, and also when one is
    another's cleaned-up form (`a/b` is stored as `a_b-<hash>`, which a literal id can spell)."""
    seen: dict[str, str] = {}  # the image's name in either layout -> the id that took it
    errors = prompts.column("error").to_pylist()
    for i, (pid, seed) in enumerate(zip(prompts.column("prompt_id").to_pylist(), prompts.column("seed").to_pylist(),
                                        strict=True)):
        if errors[i] is not None:
            continue
        names = (f"{safe_name(pid)}-s{seed}", f"shard sample {sample_key(pid, seed)}")
        taken = next((seen[name] for name in names if name in seen), None)
        if taken == pid:
            errors[i] = (f"duplicate id {pid!r} with seed {seed}: an earlier row already generates this image; "
                         "give each prompt a unique id, or a different seed")
        elif taken is not None:
            errors[i] = (f"id {pid!r} with seed {seed} would be stored under the same name as the earlier id "
                         f"{taken!r}; rename one of them")
        else:
            seen.update(dict.fromkeys(names, pid))
    return prompts.set_column(prompts.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))


def recorded_tables(output: str, endpoint_url: str | None, columns: list[str]) -> Iterator[tuple[str, pa.Table]]:
    """(path, table of `columns`) for each metadata file; a column a file lacks (written before it existed) is
    null. A file that cannot be read (a write cut off by a crash) is moved to `metadata/_unreadable/`, which
    readers skip; its rows count as never recorded. A hidden rewrite (`_take_out`) cut off before its rename is
    deleted: the file it would have replaced still holds every row."""
    filesystem, root = resolve(output, endpoint_url)
    folder = join(root, METADATA_DIR)
    for info in filesystem.get_file_info(fs.FileSelector(folder, allow_not_found=True)):
        if info.type == fs.FileType.File and info.base_name.startswith("_") and info.base_name.endswith(".tmp"):
            log.warning("deleting %s, a metadata rewrite cut off by a crash", info.path)
            filesystem.delete_file(info.path)
            continue
        if info.type != fs.FileType.File or not info.base_name.endswith(".parquet") or info.base_name[0] in "._":
            continue
        try:
            present = set(pq.read_schema(info.path, filesystem=filesystem).names)
            table = pq.read_table(info.path, filesystem=filesystem, columns=[c for c in columns if c in present])
        except (OSError, pa.ArrowInvalid) as exc:
            target = join(folder, QUARANTINE, info.base_name)
            log.warning("metadata file %s is unreadable (%s); moving it to %s", info.path, exc, target)
            filesystem.create_dir(join(folder, QUARANTINE))
            filesystem.move(info.path, target)
            continue
        for name in columns:
            if name not in present:
                table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
        yield info.path, table


def _layout_error(output: str, found: str, wanted: str) -> ConfigError:
    return ConfigError(f"output {output} already holds the {found} layout (see its metadata), but this run writes "
                       f"{wanted}: set output.format: {found} to continue it, or write to a new output")


class Recorded(NamedTuple):
    """What the metadata of a `files` output says is done (see completed_keys)."""

    done: set[Key]  # keys with an ok row whose image is there, whole
    recorded: dict[Key, set[str]]  # every key with a row -> the metadata files holding its rows
    duplicates: dict[str, set[tuple[Key, int]]]  # file -> (key, n): the n-th row of the key there, a surplus ok row


def completed_keys(output: str, endpoint_url: str | None = None, verify: bool = False) -> Recorded:
    """(prompt_id, seed) of every `ok` row in the output's metadata whose image is still there, whole, and of every
    row at all with the metadata files that hold it (so a malformed input row is reported once, not once per
    run, and a retried image's earlier rows can be taken out). `files` layout only.

    An image whose file has another size than its row records (`image_bytes`; rows from before the column are
    taken at their word) is not done, so it is generated again; with `verify`, neither is one whose bytes have
    another sha256 (every image is read). A done image recorded by several ok rows (two jobs that wrote one
    output at once, before the lease) keeps the first that matches its file; the others are `duplicates`, to take
    out. A metadata file that cannot be read is quarantined (see recorded_tables); its images are regenerated,
    byte for byte, by this run.
    """
    filesystem, root = resolve(output, endpoint_url)
    images = {posixpath.basename(i.path): i for i in filesystem.get_file_info(
        fs.FileSelector(join(root, "images"), recursive=True, allow_not_found=True)) if i.type == fs.FileType.File}
    recorded: dict[Key, set[str]] = {}
    ok_rows: dict[Key, list[tuple[str, int, bool, str, str]]] = {}  # -> (file, n, image whole, sha256, name)
    columns = ["prompt_id", "seed", "status", "image_uri", "image_sha256", "image_bytes", "shard"]
    for path, table in recorded_tables(output, endpoint_url, columns):  # one file in memory at a time
        if table["shard"].null_count < table.num_rows:
            raise _layout_error(output, "webdataset", "files")
        rows = zip(_occurrences(table), *(table[c].to_pylist() for c in columns[2:-1]), strict=True)
        for (key, n), status, uri, sha, size in rows:
            recorded.setdefault(key, set()).add(path)
            if status == "ok":
                name = posixpath.basename(uri)
                whole = name in images and (size is None or images[name].size == int(size))
                ok_rows.setdefault(key, []).append((path, n, whole, sha, name))
    done: dict[Key, tuple[str, str]] = {}  # -> the image's path and the kept row's sha256
    damaged: list[str] = []
    for key, rows in ok_rows.items():
        rows.sort()  # by file, then row: the first is kept whatever order the store lists files in
        kept = next((row for row in rows if row[2]), None)
        if kept is not None:
            done[key] = images[kept[4]].path, kept[3]
        elif rows[0][4] in images:
            damaged.append(images[rows[0][4]].path)
    if verify:
        damaged += [done.pop(key)[0] for key in _sha256_mismatches(filesystem, done)]
    if damaged:
        shown = ", ".join(sorted(damaged)[:5]) + (", ..." if len(damaged) > 5 else "")
        log.warning("%d image(s) differ from their metadata (size%s), generating them again: %s", len(damaged),
                    " or sha256" if verify else "", shown)
    duplicates: dict[str, set[tuple[Key, int]]] = {}
    for key in done:
        kept = next(row for row in ok_rows[key] if row[2])
        for path, n, *_ in (row for row in ok_rows[key] if row is not kept):
            duplicates.setdefault(path, set()).add((key, n))
    return Recorded(set(done), recorded, duplicates)


def _sha256_mismatches(filesystem: fs.FileSystem, images: dict[Key, tuple[str, str]], threads: int = 16) -> list[Key]:
    """The keys whose image's bytes do not hash to the recorded sha256, read `threads` at a time."""
    def differs(item: tuple[Key, tuple[str, str]]) -> Key | None:
        key, (path, sha) = item
        digest = hashlib.sha256()
        with filesystem.open_input_stream(path) as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
        return key if digest.hexdigest() != sha else None

    with ThreadPoolExecutor(threads) as pool:
        return [key for key in pool.map(differs, images.items()) if key is not None]


def pending(prompts: pa.Table, done: set[Key], recorded: dict[Key, set[str]], whole_file: bool = False
            ) -> tuple[pa.Table, dict[str, set[Key]]]:
    """The rows still to generate or report, and the metadata rows to take out first (file -> keys).

    Valid rows without an ok image are generated; an image recorded before (failed, or its file gone) has every
    row of its key taken out, and an input error sharing that key is reported again with it. Other input errors
    are reported once. When `prompts` is the whole file (no --limit), rows of keys it no longer asks for that hold
    no image are taken out too: the error row of a line since fixed (its key changes with it) would stay for good."""
    if not recorded:
        return prompts, {}
    keys = list(zip(prompts["prompt_id"].to_pylist(), prompts["seed"].to_pylist(), strict=True))
    errors = prompts["error"].to_pylist()
    retried = {key for key, error in zip(keys, errors, strict=True) if error is None and key in recorded
               and key not in done}
    keep = [key not in done if error is None else (key not in recorded or key in retried)
            for key, error in zip(keys, errors, strict=True)]
    stale = set(recorded) - done - set(keys) if whole_file else set()
    unrecord: dict[str, set[Key]] = {}
    for key in retried | stale:
        for path in recorded[key]:
            unrecord.setdefault(path, set()).add(key)
    return prompts.filter(pa.array(keep, pa.bool_())), unrecord


def assign_shards(prompts: pa.Table, shard_size: int) -> pa.Table:
    """Add each row's `shard` (row index // shard_size) and `shard_rows` (how many rows its shard holds)."""
    index = np.arange(prompts.num_rows, dtype=np.int64) // shard_size
    rows = np.minimum(shard_size, prompts.num_rows - index * shard_size)
    return prompts.append_column("shard", pa.array(index)).append_column("shard_rows", pa.array(rows))


@dataclass
class ShardPlan:
    todo: pa.Table  # the rows of every shard to generate, whole shards in shard order
    done: list[str] = field(default_factory=list)  # shard names already complete
    # metadata file -> names of the not-done shards whose rows it holds (to take out before generating)
    unrecord: dict[str, set[str]] = field(default_factory=dict)


def plan_shards(prompts: pa.Table, output: str, endpoint_url: str | None = None) -> ShardPlan:
    """Which shards of `prompts` (with `shard` from assign_shards) to generate, and which recorded rows to take out
    of the metadata first. Reads only (but quarantines unreadable metadata files)."""
    planned: dict[str, Counter[Key]] = {}
    where: dict[Key, set[str]] = {}
    for pid, seed, index in zip(prompts["prompt_id"].to_pylist(), prompts["seed"].to_pylist(),
                                prompts["shard"].to_pylist(), strict=True):
        name = shard_name(index)
        planned.setdefault(name, Counter())[(pid, seed)] += 1
        where.setdefault((pid, seed), set()).add(name)
    recorded: dict[str, Counter[Key]] = {}
    files: dict[str, set[str]] = {}
    for path, table in recorded_tables(output, endpoint_url, ["prompt_id", "seed", "shard"]):
        for pid, seed, uri in zip(table["prompt_id"].to_pylist(), table["seed"].to_pylist(),
                                  table["shard"].to_pylist(), strict=True):
            if uri is None:
                raise _layout_error(output, "files", "webdataset")
            name = shard_of(uri)
            if (pid, seed) in where and name not in where[(pid, seed)]:
                raise ConfigError(
                    f"output {output} holds prompt {pid!r} (seed {seed}) in shard {name}, but this run puts it in "
                    f"{sorted(where[(pid, seed)])[0]}: shards are cut from the prompt list in order, so resume with "
                    "the same prompts, --limit, output.images_per_prompt and output.shard_size, or write to a new "
                    "output")
            recorded.setdefault(name, Counter())[(pid, seed)] += 1
            files.setdefault(name, set()).add(path)
    existing = list_shards(output, endpoint_url)
    done = [name for name, rows in planned.items() if name in existing and recorded.get(name) == rows]
    redo = set(planned) - set(done)
    unrecord: dict[str, set[str]] = {}
    for name in redo:
        for path in files.get(name, ()):
            unrecord.setdefault(path, set()).add(name)
    names = pa.array([shard_name(i) for i in prompts["shard"].to_pylist()], pa.string())
    todo = prompts.filter(pc.is_in(names, pa.array(sorted(redo), pa.string())))
    return ShardPlan(todo, sorted(done), unrecord)


def unrecord_shards(output: str, unrecord: dict[str, set[str]], endpoint_url: str | None = None) -> int:
    """Take the rows of the given shards (file -> shard names) out of the metadata; see _take_out."""
    return _take_out(output, unrecord, endpoint_url, lambda table: [
        shard_of(uri) if uri is not None else None for uri in table["shard"].to_pylist()])


def unrecord_images(output: str, unrecord: dict[str, set[Key]], endpoint_url: str | None = None) -> int:
    """Take the rows of the given (prompt_id, seed) (file -> keys) out of the metadata; see _take_out."""
    return _take_out(output, unrecord, endpoint_url, lambda table: list(
        zip(table["prompt_id"].to_pylist(), table["seed"].to_pylist(), strict=True)))


def unrecord_duplicates(output: str, duplicates: dict[str, set[tuple[Key, int]]],
                        endpoint_url: str | None = None) -> int:
    """Take surplus ok rows out of the metadata (file -> (key, n): the n-th row of the key in that file, as
    completed_keys counted them); see _take_out."""
    return _take_out(output, duplicates, endpoint_url, _occurrences)


def _occurrences(table: pa.Table) -> list[tuple[Key, int]]:
    """Each row's (key, n): it is the n-th row of its (prompt_id, seed) in the table, from 0. completed_keys and
    unrecord_duplicates name rows this way, so both must count alike."""
    seen: Counter[Key] = Counter()
    out = []
    for key in zip(table["prompt_id"].to_pylist(), table["seed"].to_pylist(), strict=True):
        out.append((key, seen[key]))
        seen[key] += 1
    return out


def _take_out(output: str, unrecord: dict[str, set], endpoint_url: str | None,
              keys_of: Callable[[pa.Table], list[Hashable]]) -> int:
    """Take the rows whose key is listed for their file out of the given metadata files, each file replaced in one
    step (written beside it under a hidden name, then renamed; on S3 one PUT over it), or deleted when nothing is
    left. A crash between two files leaves rows whose images will be generated again anyway. Returns the rows
    taken out."""
    filesystem, _ = resolve(output, endpoint_url)
    local = isinstance(filesystem, fs.LocalFileSystem)
    removed = 0
    for path, names in sorted(unrecord.items()):
        table = pq.read_table(path, filesystem=filesystem)
        keep = pa.array([key not in names for key in keys_of(table)], pa.bool_())
        kept = table.filter(keep)
        removed += table.num_rows - kept.num_rows
        log.info("taking %d rows of images to redo out of %s", table.num_rows - kept.num_rows, path)
        if kept.num_rows == 0:
            filesystem.delete_file(path)
        elif local:
            temp = join(posixpath.dirname(path), f"_{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
            pq.write_table(kept, temp, filesystem=filesystem)
            filesystem.move(temp, path)
        else:
            pq.write_table(kept, path, filesystem=filesystem)
    return removed
