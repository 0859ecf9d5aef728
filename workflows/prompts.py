"""Prompt files as a Ray dataset of normalised rows (storage.prompts.PROMPT_SCHEMA).

Reading uses Ray Data's own readers; each row is then validated on its own, so a malformed row travels on
as an `error` row instead of failing the job.
"""

import codecs
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.csv as pacsv
import ray
from pyarrow import fs

from storage.prompts import PROMPT_SCHEMA, normalize_jsonl_lines, normalize_records, normalize_text_lines, prompt_format
from storage.uris import resolve
from workflows.config import ConfigError


def _jsonl_batch(batch: pa.Table) -> pa.Table:
    return normalize_jsonl_lines(batch.column("text").to_pylist())


def _text_batch(batch: pa.Table) -> pa.Table:
    return normalize_text_lines(batch.column("text").to_pylist())


# Reading and validating prompts is light I/O; asking no CPU for it keeps a pool of actors that holds every
# core (the laptop default) from starving the reader that feeds them.
IO_CPUS = 0
VALIDATION_ROWS = 4096  # prompt rows validated per task


def check_prompts(uri: str, endpoint_url: str | None = None) -> tuple[fs.FileSystem, str]:
    """The prompt file's filesystem and path; a missing, empty or unreachable file raises ConfigError."""
    try:
        filesystem, path = resolve(uri, endpoint_url)
        info = filesystem.get_file_info(path)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"cannot open prompts {uri}: {exc} (check the URI, the endpoint and your access)") from None
    if info.type == fs.FileType.NotFound:
        raise ConfigError(f"prompts file not found: {uri} (try configs/prompts/sample.jsonl)")
    if info.type == fs.FileType.Directory:
        raise ConfigError(f"prompts {uri} is a folder: give one prompt file (JSONL, CSV, Parquet or text)")
    if info.type == fs.FileType.File and info.size == 0:
        raise ConfigError(f"prompts file {uri} is empty: add one prompt per line")
    return filesystem, path


def read_prompts(uri: str, limit: int | None = None, endpoint_url: str | None = None) -> ray.data.Dataset:
    """A dataset of validated prompt rows. Whole-file problems (missing, empty, no `prompt` column) raise
    ConfigError. The generation blocks are cut later, on the driver (workflows.generate.generate_dataset)."""
    filesystem, path = check_prompts(uri, endpoint_url)
    kind = prompt_format(uri)
    if kind in ("jsonl", "text"):
        ds = ray.data.read_text(path, filesystem=filesystem, num_cpus=IO_CPUS).map_batches(
            _jsonl_batch if kind == "jsonl" else _text_batch, batch_format="pyarrow", batch_size=VALIDATION_ROWS,
            num_cpus=IO_CPUS,
        )
    else:
        if kind == "csv":  # text columns stay text: ids such as 007 keep their zeros, and so their file names
            text = {column: pa.string() for column in ("id", "prompt", "negative_prompt")}
            ds = ray.data.read_csv(path, filesystem=filesystem, num_cpus=IO_CPUS,
                                   convert_options=pacsv.ConvertOptions(column_types=text))
        else:
            ds = ray.data.read_parquet(path, filesystem=filesystem, num_cpus=IO_CPUS)
        columns = ds.schema().names
        if "prompt" not in columns:
            raise ConfigError(f"prompts file {uri} has no 'prompt' column (columns: {columns}); rename the "
                              "column that holds the prompts to 'prompt'")
        ds = ds.map_batches(normalize_records, batch_format="pyarrow", batch_size=VALIDATION_ROWS, num_cpus=IO_CPUS)
    return ds.limit(limit) if limit is not None else ds


@contextmanager
def _in_file_order() -> Iterator[None]:
    """Ray Data keeps the file's row order only when asked: without it `--limit` takes whichever rows come
    first, and a resumed run may cut shards from a different order."""
    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = before


def first_non_utf8(filesystem: fs.FileSystem, path: str, chunk: int = 1 << 20) -> tuple[int, int]:
    """The offset (from 0) and line (from 1) of a file's first byte that is not UTF-8, read a chunk at a time;
    (size, lines + 1) when every byte is."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 1
    with filesystem.open_input_stream(path) as stream:
        while data := stream.read(chunk):
            pending = len(decoder.getstate()[0])  # a character's first bytes, from the chunk before
            try:
                decoder.decode(data)
            except UnicodeDecodeError as exc:  # positions count the pending bytes first
                at = exc.start - pending
                return offset + at, lines + data.count(b"\n", 0, max(at, 0))
            offset, lines = offset + len(data), lines + data.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:  # the file ends inside a character
        return offset - len(decoder.getstate()[0]), lines
    return offset, lines


def read_prompt_table(uri: str, limit: int | None = None, endpoint_url: str | None = None) -> pa.Table:
    """All prompt rows on the driver, in file order, where duplicates and finished work can be seen across the
    whole file. A file that is not UTF-8 or holds no prompt at all raises ConfigError."""
    try:
        with _in_file_order():
            tables = ray.get(read_prompts(uri, limit, endpoint_url=endpoint_url).to_arrow_refs())
    except UnicodeDecodeError:  # Ray's text reader decodes whole blocks, strictly, and tells no position
        filesystem, path = check_prompts(uri, endpoint_url)
        offset, line = first_non_utf8(filesystem, path)
        found = offset < filesystem.get_file_info(path).size
        where = (f"byte {offset} (line {line}) starts no UTF-8 character" if found
                 else "its text, as read (a compressed file is decompressed by its extension), is not UTF-8")
        raise ConfigError(f"prompts file {uri} is not UTF-8 text: {where}; save the file as UTF-8") from None
    tables = [t for t in tables if t.num_rows]
    if not tables:
        raise ConfigError(f"prompts file {uri} holds no prompts: add one prompt per line (or row)")
    return pa.concat_tables(tables).cast(PROMPT_SCHEMA)
