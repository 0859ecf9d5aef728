"""The per-image metadata records: one fixed schema, written as Parquet under ``{output}/metadata/``."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyarrow import fs

from storage.uris import join, resolve

SCAN_BATCH_ROWS = 65_536

STAGE_TYPE = pa.struct(
    [
        ("stage", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("tokens", pa.int32()),
        ("kept", pa.int32()),
        ("latency_ms", pa.float64()),
        # FastVAR (speedups.fastvar): tokens each of its pruned sub-layers left out, and in how many blocks
        ("pruned", pa.int32()),
        ("pruned_blocks", pa.int32()),
        # rows the image ran at the stage: 2 with classifier-free guidance, 1 without (speedups.guidance_stages)
        ("branches", pa.int32()),
    ]
)

METADATA_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("model", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image_uri", pa.string()),
        ("image_sha256", pa.string()),
        ("tau", pa.float64()),
        ("latency_ms", pa.float64()),
        ("stages", pa.list_(STAGE_TYPE)),
        ("status", pa.string()),
        ("error", pa.string()),
        # when the actor stored the image (webdataset: added it to its shard's tar); null on error rows. Steady-state
        # throughput is read from these (workflows.bench).
        ("written_at", pa.timestamp("us", tz="UTC")),
        # webdataset layout only (null for `files`): the tar shard holding the row's sample, and the sample's key
        # in it; image_uri is then `{shard}#{sample_key}.{ext}`. Error rows carry their shard too.
        ("shard", pa.string()),
        ("sample_key", pa.string()),
        # the stored image's size in bytes (null on error rows and in files written before the column): a resumed
        # run regenerates an image whose file has another size
        ("image_bytes", pa.int64()),
        # with output.save_masks: per stage, which tokens ran (np.packbits of the row-major h×w mask); an entry is
        # null where every token ran; the column is null when masks were not saved
        ("keep_masks", pa.list_(pa.binary())),
        # how the row was made (null in files written before these columns): the sampling settings, the negative
        # prompt and aspect ratio asked for (h_div_w: 1.0 when the prompt gave none), a fingerprint of the weights
        # (storage.checkpoints.fingerprint; null for random weights), the prompt's line or row in its file (from 1)
        # and the run that wrote the row (its record is runs/<run_id>.json)
        ("cfg", pa.float64()),
        ("temperature", pa.float64()),
        ("top_k", pa.int32()),
        ("top_p", pa.float64()),
        ("negative_prompt", pa.string()),
        ("h_div_w", pa.float64()),
        ("weights_fingerprint", pa.string()),
        ("source_row", pa.int64()),
        ("run_id", pa.string()),
    ]
)

METADATA_DIR = "metadata"
REQUIRED_FIELDS = ("prompt_id", "prompt", "seed", "model", "status")
STATUSES = ("ok", "error")


def metadata_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Build a METADATA_SCHEMA table; absent optional keys become null and unknown keys are dropped.

    Required keys are checked here so a bug in the caller fails loudly instead of writing null ids.
    """
    for row in rows:
        missing = [name for name in REQUIRED_FIELDS if row.get(name) is None]
        if missing:
            raise ValueError(f"metadata row for {row.get('prompt_id')!r} lacks required fields {missing}")
        if row["status"] not in STATUSES:
            raise ValueError(f"metadata status must be one of {STATUSES}, got {row['status']!r}")
    return pa.Table.from_pylist(rows, schema=METADATA_SCHEMA)


def batch_file_name(commit: str, table: pa.Table) -> str:
    """The metadata file of one batch's rows, `<commit>-<digest>.parquet`, named by its images (prompt_id, seed): a
    batch Ray retries replaces its own file (no row twice), and the driver, given the rows back, knows the file."""
    keys = "\n".join(f"{pid}\0{seed}" for pid, seed in zip(table["prompt_id"].to_pylist(), table["seed"].to_pylist(),
                                                           strict=True))
    return f"{commit}-{hashlib.sha256(keys.encode('utf-8')).hexdigest()[:16]}.parquet"


def write_metadata_file(output_uri: str, name: str, table: pa.Table, endpoint_url: str | None = None) -> str:
    """Write one batch's rows as ``{output_uri}/metadata/<name>`` (METADATA_SCHEMA); returns its path. A write cut
    off by a crash leaves a file that the next run quarantines (workflows.resume), its images generated again."""
    filesystem, root = resolve(output_uri, endpoint_url)
    folder = join(root, METADATA_DIR)
    if isinstance(filesystem, fs.LocalFileSystem):  # object stores have no folders to make
        filesystem.create_dir(folder, recursive=True)
    path = join(folder, name)
    pq.write_table(table.cast(METADATA_SCHEMA), path, filesystem=filesystem)
    return path


def read_metadata(output_uri: str, endpoint_url: str | None = None, columns: list[str] | None = None,
                  where: ds.Expression | None = None) -> pa.Table:
    """Read every Parquet file under ``{output_uri}/metadata/`` (only ``columns``, and only rows matching ``where``,
    when given), e.g. to find work a resumed run can skip. Files written before a column existed read it as null.

    Only ``*.parquet`` files count; hidden or ``_``-prefixed files and folders (temp files, markers)
    are skipped so an interrupted writer's leftovers cannot break the read.
    """
    dataset = metadata_dataset(output_uri, endpoint_url)
    if dataset is None:
        empty = METADATA_SCHEMA.empty_table()
        return empty.select(columns) if columns is not None else empty
    return dataset.to_table(columns=columns, filter=where)


def scan_metadata(output_uri: str, endpoint_url: str | None, columns: list[str],
                  where: ds.Expression | None = None) -> Iterator[pa.RecordBatch]:
    """The metadata as record batches, file by file (read_metadata's files, columns and rows): for readers that
    aggregate by column, so an output of any size costs them a row group or two of memory, not the whole table.
    A file at a time: pyarrow's scan of the whole dataset read files ahead of a slower consumer without bound
    (whatever its read-ahead settings; 1.7 GB of stage lists at 10 M rows, 0.3 GB file by file)."""
    dataset = metadata_dataset(output_uri, endpoint_url)
    if dataset is not None:
        for fragment in dataset.get_fragments():
            yield from fragment.to_batches(schema=dataset.schema, columns=columns, filter=where,
                                           batch_size=SCAN_BATCH_ROWS, batch_readahead=1)


def metadata_dataset(output_uri: str, endpoint_url: str | None = None) -> ds.Dataset | None:
    """The output's metadata files as one pyarrow dataset of METADATA_SCHEMA (None when there are none)."""
    filesystem, root = resolve(output_uri, endpoint_url)
    folder = join(root, METADATA_DIR)
    files = [
        info.path
        for info in filesystem.get_file_info(fs.FileSelector(folder, recursive=True, allow_not_found=True))
        if info.type == fs.FileType.File and _is_visible_parquet(info.path[len(folder) :])
    ]
    if not files:
        return None
    return ds.dataset(sorted(files), schema=METADATA_SCHEMA, format="parquet", filesystem=filesystem)


def _is_visible_parquet(relative_path: str) -> bool:
    parts = [part for part in relative_path.split("/") if part]
    return parts[-1].endswith(".parquet") and not any(part.startswith((".", "_")) for part in parts)
