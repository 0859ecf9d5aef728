"""What a run still has to generate: every prompt's images, less what the output already holds.

The metadata under `{output}/metadata` is the single record of what is done. In the `files` layout a
(prompt_id, seed) with an `ok` row whose image exists is skipped, so a crashed, pre-empted or repeated job
continues where it stopped and never writes an image, or its row, twice. Any other recorded image (its
generation failed, or its file is gone) is generated again, and its earlier rows are taken out when the run
ends, so the metadata holds one outcome per image (workflows.scan, workflows.planner).

In the `webdataset` layout the unit is the shard: row i of the full list of images (prompts expanded by
`images_per_prompt`, after `--limit`) belongs to shard i // shard_size, cut in file order by the planner. A
shard is done when its tar exists and the metadata holds exactly its rows; any other shard is generated again
whole (same seeds, so the same samples) after its rows, if some were recorded, are taken out of the metadata
files that hold them (each file rewritten in one step). Readers of the metadata so see every sample once.

This module keeps the pieces both layouts share: seed expansion and the one-step rewrite of metadata files.
"""

import logging
import posixpath
import uuid
from collections.abc import Callable, Hashable

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs

from storage.prompts import derived_seed
from storage.shards import shard_of
from storage.uris import join, resolve
from workflows.config import ConfigError

log = logging.getLogger(__name__)
QUARANTINE = "_unreadable"


def expand_images(prompts: pa.Table, images_per_prompt: int) -> pa.Table:
    """One row per image: the prompt's own seed first, then seeds derived from it."""
    if images_per_prompt == 1:
        return prompts
    rows = [{**row, "seed": derived_seed(row["seed"], j) if row["error"] is None else row["seed"]}
            for row in prompts.to_pylist() for j in range(images_per_prompt)
            if j == 0 or row["error"] is None]
    return pa.Table.from_pylist(rows, schema=prompts.schema)


def layout_error(output: str, found: str, wanted: str) -> ConfigError:
    return ConfigError(f"output {output} already holds the {found} layout (see its metadata), but this run writes "
                       f"{wanted}: set output.format: {found} to continue it, or write to a new output")


def unrecord_shards(output: str, unrecord: dict[str, set[str]], endpoint_url: str | None = None) -> int:
    """Take the rows of the given shards (file -> shard names) out of the metadata; see take_out."""
    return take_out(output, unrecord, endpoint_url, lambda table: [
        shard_of(uri) if uri is not None else None for uri in table["shard"].to_pylist()])


def take_out(output: str, unrecord: dict[str, set], endpoint_url: str | None,
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
