"""Compaction: the metadata of an output held in few Parquet files, so that readers list and open few.

Each generation actor records its batch in a file of its own (an interruption loses at most the batch in flight).
As the run goes, MetadataMerger merges every `output.merge_every` files of batches that have come back into one,
in a Ray task; at the end of a run, once more than MAX_FILES files are there, their rows are rewritten by Ray Data
tasks into files of about ROWS_PER_FILE rows. Both are crash-safe: the new files are written under
`metadata/_compacting-<id>/` (hidden from readers) with a manifest naming the files they replace, written last;
then the old files are deleted and the new ones moved in. A run that finds such a folder finishes its work
(manifest there) or deletes it (no manifest: the old files still hold every row).
"""

import json
import logging
import posixpath
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from pyarrow import fs

from storage.lease import check_held
from storage.metadata import METADATA_DIR, METADATA_SCHEMA, SCAN_BATCH_ROWS, batch_file_name
from storage.uris import join, resolve
from workflows.scan import metadata_files

log = logging.getLogger(__name__)
MAX_FILES = 64  # files an output may hold before a run's end compacts them
ROWS_PER_FILE = 1_000_000  # about 100 MB of metadata a file
MANIFEST = "_manifest.json"


def compact_metadata(output: str, endpoint: str | None, max_files: int = MAX_FILES,
                     rows_per_file: int = ROWS_PER_FILE, rows_per_group: int = SCAN_BATCH_ROWS) -> int:
    """Rewrite the metadata into files of about `rows_per_file` rows when it holds more than `max_files`;
    returns the files it replaced (0: left as it was). Row groups of `rows_per_group` rows: a reader decodes a
    row group whole, and Ray's default here (one group a file) made each read of a file cost ~1 GB."""
    files = metadata_files(output, endpoint)
    if len(files) <= max_files:
        return 0
    filesystem, root = resolve(output, endpoint)
    folder = join(root, METADATA_DIR, f"_compacting-{uuid.uuid4().hex[:12]}")
    ctx = ray.data.DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    try:
        ray.data.read_parquet(files, filesystem=filesystem, schema=METADATA_SCHEMA).write_parquet(
            folder, filesystem=filesystem, min_rows_per_file=rows_per_file, row_group_size=rows_per_group)
    finally:
        ctx.enable_progress_bars = bars
    _replace(filesystem, folder, files)
    log.info("compacted %d metadata files", len(files))
    return len(files)


class MetadataMerger:
    """Merges the metadata files of batches that have come back to the driver, `every` at a time, in a Ray task,
    while the run goes on. Only those: a batch that has come back is not run again, so its file is not rewritten
    after the merge took it in (a batch in flight may be, when Ray retries it). `wait` before anything else reads
    or rewrites the metadata (the run's end, a pipeline restart's scan)."""

    def __init__(self, output: str, endpoint: str | None, run_id: str, every: int) -> None:
        self.output, self.endpoint, self.run_id, self.every = output, endpoint, run_id, every
        self.names: list[str] = []
        self.merging: list[ray.ObjectRef] = []

    def finished(self, commit: str, rows: pa.Table) -> None:
        """A batch recorded by an actor under `commit` (actors.generator) came back with these rows."""
        self.names.append(batch_file_name(commit, rows))
        if len(self.names) >= self.every:
            self.merging.append(_merge.remote(self.output, self.endpoint, self.run_id, self.names))
            self.names = []

    def wait(self) -> None:
        """Wait for the merges under way. A merge that fails (the lease lost, the store unreachable) leaves its files
        as they were, or its manifest for the next run to finish."""
        for ref in self.merging:
            try:
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - every row is still in the files or the manifest's folder
                log.warning("merging metadata files failed (%s); they stay as they are", exc)
        self.merging = []


@ray.remote(num_cpus=0, max_retries=0)
def _merge(output: str, endpoint: str | None, run_id: str, names: list[str]) -> None:
    """The named files of `metadata/` as one (crash-safe, see the module), if the run still holds the output."""
    filesystem, root = resolve(output, endpoint)
    metadata = join(root, METADATA_DIR)
    paths = [info.path for info in filesystem.get_file_info([join(metadata, name) for name in names])
             if info.type == fs.FileType.File]
    if len(paths) < 2:
        return
    folder = join(metadata, f"_compacting-{uuid.uuid4().hex[:12]}")
    if isinstance(filesystem, fs.LocalFileSystem):  # object stores have no folders to make
        filesystem.create_dir(folder)
    rows = pa.concat_tables([pq.read_table(path, filesystem=filesystem).cast(METADATA_SCHEMA) for path in paths])
    pq.write_table(rows, join(folder, "merged.parquet"), filesystem=filesystem, row_group_size=SCAN_BATCH_ROWS)
    check_held(output, endpoint, run_id)  # a run that lost the output to another job changes nothing more there
    _replace(filesystem, folder, paths)


def finish_compactions(output: str, endpoint: str | None) -> None:
    """Complete (manifest there) or drop (none) compactions that a crash cut off."""
    filesystem, root = resolve(output, endpoint)
    for info in filesystem.get_file_info(fs.FileSelector(join(root, METADATA_DIR), allow_not_found=True)):
        if info.type == fs.FileType.Directory and info.base_name.startswith("_compacting-"):
            if filesystem.get_file_info(join(info.path, MANIFEST)).type == fs.FileType.File:
                _finish(filesystem, info.path)
            else:
                filesystem.delete_dir(info.path)


def _replace(filesystem: fs.FileSystem, folder: str, replaced: list[str]) -> None:
    """Commit the new files written under `folder`: the manifest naming the files they replace, then _finish."""
    with filesystem.open_output_stream(join(folder, MANIFEST)) as stream:
        stream.write(json.dumps([posixpath.basename(path) for path in replaced]).encode())
    _finish(filesystem, folder)


def _finish(filesystem: fs.FileSystem, folder: str) -> None:
    """Delete the files the manifest names (those still there), move the new ones in, drop the folder."""
    metadata = posixpath.dirname(folder)
    with filesystem.open_input_stream(join(folder, MANIFEST)) as stream:
        replaced = json.loads(stream.read())
    gone = filesystem.get_file_info([join(metadata, name) for name in replaced])
    for info in gone:
        if info.type == fs.FileType.File:
            filesystem.delete_file(info.path)
    for info in filesystem.get_file_info(fs.FileSelector(folder)):
        if info.base_name.endswith(".parquet"):
            filesystem.move(info.path, join(metadata, f"compacted-{folder.rsplit('-', 1)[-1]}-{info.base_name}"))
    filesystem.delete_dir(folder)
