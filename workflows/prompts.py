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


def _with_end(rows: pa.Table, size: int) -> pa.Table:
    """A batch's rows (numbered from 1 within it) and an end row (no prompt_id, `source_row` = the batch's lines or
    records), from which the driver numbers rows across the whole file (read_prompt_table)."""
    end = pa.Table.from_pylist([{"source_row": size}], schema=PROMPT_SCHEMA)
    return pa.concat_tables([rows.cast(PROMPT_SCHEMA), end])


def _jsonl_batch(batch: pa.Table) -> pa.Table:
    return _with_end(normalize_jsonl_lines(batch.column("text").to_pylist()), batch.num_rows)


def _text_batch(batch: pa.Table) -> pa.Table:
    return _with_end(normalize_text_lines(batch.column("text").to_pylist()), batch.num_rows)


def _records_batch(batch: pa.Table) -> pa.Table:
    return _with_end(normalize_records(batch), batch.num_rows)


def number_rows(rows: pa.Table) -> pa.Table:
    """The prompt rows in file order with `source_row` counted from the file's start: each batch's end row adds
    its size to the rows after it, and is dropped."""
    offset, numbers, keep = 0, [], []
    for pid, local in zip(rows["prompt_id"].to_pylist(), rows["source_row"].to_pylist(), strict=True):
        numbers.append(offset + local)
        keep.append(pid is not None)
        if pid is None:
            offset += local
    numbered = rows.set_column(rows.schema.get_field_index("source_row"), "source_row", pa.array(numbers, pa.int64()))
    return numbered.filter(pa.array(keep, pa.bool_()))


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


def read_prompts(uri: str, endpoint_url: str | None = None) -> ray.data.Dataset:
    """A dataset of validated prompt rows, each batch's followed by its end row (see number_rows). Whole-file
    problems (missing, empty, no `prompt` column) raise ConfigError. The generation blocks are cut later, on the
    driver (workflows.generate.generate_dataset)."""
    filesystem, path = check_prompts(uri, endpoint_url)
    kind = prompt_format(uri)
    if kind in ("jsonl", "text"):  # blank lines are kept so that lines are counted as the file has them
        ds = ray.data.read_text(path, filesystem=filesystem, num_cpus=IO_CPUS, drop_empty_lines=False).map_batches(
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
        ds = ds.map_batches(_records_batch, batch_format="pyarrow", batch_size=VALIDATION_ROWS, num_cpus=IO_CPUS)
    return ds


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
    """All prompt rows on the driver (the first `limit`), in file order and numbered by their place in the file,
    where duplicates and finished work can be seen across the whole file. A file that is not UTF-8 or holds no
    prompt at all raises ConfigError. The whole file is read even with a limit: its rows are numbered as they come."""
    try:
        with _in_file_order():
            tables = ray.get(read_prompts(uri, endpoint_url=endpoint_url).to_arrow_refs())
    except UnicodeDecodeError:  # Ray's text reader decodes whole blocks, strictly, and tells no position
        filesystem, path = check_prompts(uri, endpoint_url)
        offset, line = first_non_utf8(filesystem, path)
        found = offset < filesystem.get_file_info(path).size
        where = (f"byte {offset} (line {line}) starts no UTF-8 character" if found
                 else "its text, as read (a compressed file is decompressed by its extension), is not UTF-8")
        raise ConfigError(f"prompts file {uri} is not UTF-8 text: {where}; save the file as UTF-8") from None
    tables = [t.cast(PROMPT_SCHEMA) for t in tables if t.num_rows]
    rows = number_rows(pa.concat_tables(tables)) if tables else PROMPT_SCHEMA.empty_table()
    if not rows.num_rows:
        raise ConfigError(f"prompts file {uri} holds no prompts: add one prompt per line (or row)")
    return rows.slice(0, limit) if limit is not None else rows
