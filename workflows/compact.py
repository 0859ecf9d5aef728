"""Compaction: the metadata of an output held in few Parquet files, so that readers list and open few.

The driver commits one file per batch as the work comes back (an interruption loses at most the batches in
flight); at the end of a run, once more than MAX_FILES files are there, their rows are rewritten by Ray Data
tasks into files of about ROWS_PER_FILE rows. The step is crash-safe: the new files are written under
`metadata/_compacting-<id>/` (hidden from readers) with a manifest naming the files they replace, written last;
then the old files are deleted and the new ones moved in. A run that finds such a folder finishes its work
(manifest there) or deletes it (no manifest: the old files still hold every row).
"""

import json
import logging
import posixpath
import uuid

import ray
from pyarrow import fs

from storage.metadata import METADATA_DIR, METADATA_SCHEMA, SCAN_BATCH_ROWS
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
    with filesystem.open_output_stream(join(folder, MANIFEST)) as stream:
        stream.write(json.dumps([posixpath.basename(path) for path in files]).encode())
    _finish(filesystem, folder)
    log.info("compacted %d metadata files", len(files))
    return len(files)


def finish_compactions(output: str, endpoint: str | None) -> None:
    """Complete (manifest there) or drop (none) compactions that a crash cut off."""
    filesystem, root = resolve(output, endpoint)
    for info in filesystem.get_file_info(fs.FileSelector(join(root, METADATA_DIR), allow_not_found=True)):
        if info.type == fs.FileType.Directory and info.base_name.startswith("_compacting-"):
            if filesystem.get_file_info(join(info.path, MANIFEST)).type == fs.FileType.File:
                _finish(filesystem, info.path)
            else:
                filesystem.delete_dir(info.path)


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
