"""Prompt files as a streaming Ray dataset of normalised rows (storage.prompts.PROMPT_SCHEMA).

The file is cut into parts (byte ranges, row groups) that tasks read and validate in parallel, so the driver
holds no row of it; each row is validated on its own, so a malformed row travels on as an `error` row instead
of failing the job.
"""

import re
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray
from pyarrow import fs

from storage.prompts import PROMPT_SCHEMA, normalize_jsonl_lines, normalize_records, normalize_text_lines, prompt_format
from storage.uris import resolve
from workflows.config import ConfigError
from workflows.errors import exception_chain

# Reading and validating prompts is light I/O; asking no CPU for it keeps a pool of actors that holds every
# core (the laptop default) from starving the reader that feeds them.
IO_CPUS = 0
PART_BYTES = 4 << 20  # bytes of a line-based file per read task: ~40,000 prompts, read and checked in about a second
VALIDATION_ROWS = 4096  # (tests) rows across which numbering is checked: more than one batch of the old reader
COMPRESSED = (".gz", ".bz2", ".zst", ".lz4", ".br")  # read whole: a byte range of a compressed stream means nothing
# text columns stay text: ids such as 007 keep their zeros, and so their file names
CSV_TEXT = pacsv.ConvertOptions(column_types={column: pa.string() for column in ("id", "prompt", "negative_prompt")})


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


class PromptFileError(ValueError):
    """A problem of the whole file that shows only as it is read (bytes that are not UTF-8): the job stops with
    exit 2. Raised in a read task; prompt_file_error finds it under Ray's wrappers."""


def prompt_file_error(exc: BaseException) -> str | None:
    """The message of the PromptFileError (or the planner's ConfigError) that stopped a pipeline, if one did."""
    for error in exception_chain(exc):
        if isinstance(error, PromptFileError | ConfigError):
            return str(error.args[0]) if error.args else str(error)
        # Ray Data's wrapper keeps only the traceback's text
        found = re.search(r"(?:PromptFileError|ConfigError): (.+)", str(error))
        if found:
            return found.group(1).strip()
    return None


def prompt_parts(uri: str, endpoint_url: str | None = None) -> list[dict[str, Any]]:
    """The file cut into parts that read tasks take one each: byte ranges of PART_BYTES (JSONL, text; a line
    belongs to the part it starts in), row groups (Parquet), or the whole file (CSV, whose quoted fields may hold
    newlines, and compressed files). Whole-file problems (missing, empty, no `prompt` column) raise ConfigError."""
    filesystem, path = check_prompts(uri, endpoint_url)
    kind = prompt_format(uri)
    size = filesystem.get_file_info(path).size
    base = {"uri": uri, "endpoint": endpoint_url or "", "kind": kind}
    if kind == "parquet":
        with filesystem.open_input_file(path) as stream:
            meta = pq.ParquetFile(stream).metadata
        _check_columns(uri, meta.schema.names)
        return [{**base, "start": i, "end": i + 1, "size": size} for i in range(max(1, meta.num_row_groups))]
    if kind == "csv":
        with filesystem.open_input_stream(path) as stream:
            _check_columns(uri, pacsv.open_csv(stream).schema.names)
    if kind == "csv" or path.lower().endswith(COMPRESSED):
        return [{**base, "start": 0, "end": size, "size": size}]
    return [{**base, "start": start, "end": min(size, start + PART_BYTES), "size": size}
            for start in range(0, size, PART_BYTES)]


def _check_columns(uri: str, columns: list[str]) -> None:
    if "prompt" not in columns:
        raise ConfigError(f"prompts file {uri} has no 'prompt' column (columns: {columns}); rename the "
                          "column that holds the prompts to 'prompt'")


def _count_part(parts: pa.Table) -> pa.Table:
    """Each part's `lines`: the lines that start in its byte range, or its rows; what the parts before a part
    hold numbers its rows. A part that is the whole file counts 0 (no part follows it)."""
    counts = []
    for part in parts.to_pylist():
        filesystem, path = resolve(part["uri"], part["endpoint"] or None)
        if part["kind"] == "parquet":
            with filesystem.open_input_file(path) as stream:
                meta = pq.ParquetFile(stream).metadata
            counts.append(meta.row_group(part["start"]).num_rows if meta.num_row_groups else 0)
        elif part["start"] == 0 and part["end"] == part["size"]:
            counts.append(0)
        else:
            start, end = part["start"], part["end"]
            low = max(0, start - 1)
            with filesystem.open_input_file(path) as stream:
                data = stream.read_at(end - 1 - low, low)  # a line starts after each newline of [start-1, end-1)
            counts.append(data.count(b"\n") + (start == 0))
    return parts.append_column("lines", pa.array(counts, pa.int64()))


class _Numberer:
    """Gives each part the number of its first line or row: the sum of the parts before it. One actor sees the
    parts in file order (the job runs with preserve_order), so it holds one integer."""

    def __init__(self) -> None:
        self.next = 1

    def __call__(self, parts: pa.Table) -> pa.Table:
        firsts = []
        for lines in parts["lines"].to_pylist():
            firsts.append(self.next)
            self.next += lines
        return parts.append_column("first_line", pa.array(firsts, pa.int64()))


def _part_text(stream: Any, start: int, end: int, size: int) -> tuple[bytes, int]:
    """The bytes of the lines that start in [start, end), the last one read to its end, and their offset."""
    low = max(0, start - 1)
    data = stream.read_at(end - low, low)
    if start:  # the first line of the part starts after the first newline at or past start - 1
        cut = data.find(b"\n")
        if cut < 0:
            return b"", end
        data, low = data[cut + 1:], low + cut + 1
    position = end
    while data and position < size and not data.endswith(b"\n"):  # the last line runs on into the next part
        chunk = stream.read_at(min(1 << 16, size - position), position)
        cut = chunk.find(b"\n")
        data += chunk if cut < 0 else chunk[:cut + 1]
        position += len(chunk)
        if cut >= 0:
            break
    return data, low


def _decode(uri: str, data: bytes, offset: int, first_line: int) -> str:
    """The part's text; bytes that are not UTF-8 raise PromptFileError naming the first (offset -1: `data` is
    a decompressed stream, whose offsets are not the file's)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if offset < 0:
            where = "its text, as read (a compressed file is decompressed by its extension), is not UTF-8"
        else:
            line = first_line + data.count(b"\n", 0, exc.start)
            where = f"byte {offset + exc.start} (line {line}) starts no UTF-8 character"
        raise PromptFileError(f"prompts file {uri} is not UTF-8 text: {where}; save the file as UTF-8") from None


def _read_part(parts: pa.Table) -> pa.Table:
    """The part's validated rows (PROMPT_SCHEMA), `source_row` counted from the file's start."""
    tables = []
    for part in parts.to_pylist():
        filesystem, path = resolve(part["uri"], part["endpoint"] or None)
        kind, first = part["kind"], part["first_line"]
        if kind == "parquet":
            with filesystem.open_input_file(path) as stream:
                parquet = pq.ParquetFile(stream)
                records = parquet.read_row_group(part["start"]) if parquet.metadata.num_row_groups else None
            rows = normalize_records(records) if records is not None else PROMPT_SCHEMA.empty_table()
        elif kind == "csv":
            with filesystem.open_input_stream(path) as stream:
                rows = normalize_records(pacsv.read_csv(stream, convert_options=CSV_TEXT))
        else:
            if part["start"] == 0 and part["end"] == part["size"] and path.lower().endswith(COMPRESSED):
                with filesystem.open_input_stream(path) as stream:
                    data, offset = stream.read(), -1
            else:
                with filesystem.open_input_file(path) as stream:
                    data, offset = _part_text(stream, part["start"], part["end"], part["size"])
            lines = _decode(part["uri"], data, offset, first).split("\n")
            if lines and lines[-1] == "":
                lines.pop()
            rows = (normalize_jsonl_lines if kind == "jsonl" else normalize_text_lines)(lines)
        rows = rows.cast(PROMPT_SCHEMA)
        numbered = pc.add(rows["source_row"], pa.scalar(first - 1, pa.int64()))
        tables.append(rows.set_column(rows.schema.get_field_index("source_row"), "source_row", numbered))
    return pa.concat_tables(tables) if tables else PROMPT_SCHEMA.empty_table()


def prompt_rows(uri: str, endpoint_url: str | None = None, limit: int | None = None,
                parts: list[dict[str, Any]] | None = None) -> ray.data.Dataset:
    """A dataset of validated prompt rows, numbered by their place in the file; with `limit`, its first rows.

    Parts are counted (newlines, no parsing) in parallel tasks; one small actor on the driver's node numbers them
    in order; tasks read and validate them in parallel, and Ray Data hands their rows on in file order (the
    dataset, and every one made from it, keeps its order: see in_order). It streams: rows flow on while later
    parts are read, and `limit` stops the reading once it has its rows (Ray Data's limit ends the operators above
    it). `parts`: the file's parts (prompt_parts), where the caller has listed them already."""
    parts = prompt_parts(uri, endpoint_url) if parts is None else parts
    ds = in_order(ray.data.from_items(parts, override_num_blocks=len(parts)))
    ds = ds.map_batches(_count_part, batch_size=1, batch_format="pyarrow", num_cpus=IO_CPUS,
                        compute=reader_tasks(len(parts)))
    ds = ds.map_batches(_Numberer, batch_size=None, batch_format="pyarrow", num_cpus=IO_CPUS,
                        compute=in_order_pool(), label_selector=on_driver_node())
    ds = ds.map_batches(_read_part, batch_size=1, batch_format="pyarrow", num_cpus=IO_CPUS,
                        compute=reader_tasks(len(parts)))
    return ds.limit(limit) if limit is not None else ds


def reader_tasks(parts: int) -> ray.data.TaskPoolStrategy:
    """The reading tasks (counting, reading, validating, hashing) of a file of `parts` parts: at most one per CPU of
    the cluster and one per part. They ask for no CPU, so without a cap Ray Data starts a worker process per part
    at once, and on a small machine their start-up (seconds each) delayed the first image by a minute (1 M
    prompts: 21 parts); a cap above the parts makes Ray warn of tasks without input. The stages that read a part
    share one size, so Ray Data fuses them into one task per part."""
    return ray.data.TaskPoolStrategy(size=max(1, min(parts, int(ray.cluster_resources().get("CPU", 1)))))


def in_order(ds: ray.data.Dataset) -> ray.data.Dataset:
    """`ds` run with preserve_order: each operator hands on its outputs in its inputs' order, however its parallel
    tasks finish, so parts are numbered in order, `--limit` takes the first rows and the planner sees the file's
    order. Set on the dataset's own context (which the datasets made from it share): a dataset runs with the
    context it was made in, not the one current when it runs."""
    ds.context.execution_options.preserve_order = True
    return ds


def in_order_pool() -> ray.data.ActorPoolStrategy:
    """One actor given one batch at a time: a stage that must see the rows in file order (preserve_order orders
    a stage's output, not the calls; an actor with several calls in flight runs them on threads)."""
    return ray.data.ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=1)


def on_driver_node() -> dict[str, str]:
    """A label selector for the driver's node, where the stateful stages run (the numbering and planning-stage
    actors, the Planner): the job cannot outlive that node anyway, so a worker node lost mid-job takes with it
    only stateless tasks and generation actors, which Ray retries and restarts, never the plan's state (an actor
    restarted with its state gone stops the job: rows out of order). Being pinned also keeps Ray Data from fusing
    the parallel reading and hashing tasks into these one-at-a-time actors (docs/scale.md)."""
    return {"ray.io/node-id": ray.get_runtime_context().get_node_id()}


def read_prompt_table(uri: str, limit: int | None = None, endpoint_url: str | None = None) -> pa.Table:
    """The prompt rows (the first `limit`) as one table, in file order: for tests and tools that want the rows
    at hand; the job streams them (prompt_rows). A file that is not UTF-8 or holds no prompt raises ConfigError."""
    try:
        tables = ray.get(prompt_rows(uri, endpoint_url, limit).to_arrow_refs())
    except Exception as exc:
        message = prompt_file_error(exc)
        if message is None:
            raise
        raise ConfigError(message) from None
    tables = [t.cast(PROMPT_SCHEMA) for t in tables if t.num_rows]
    rows = pa.concat_tables(tables) if tables else PROMPT_SCHEMA.empty_table()
    if not rows.num_rows:
        raise ConfigError(f"prompts file {uri} holds no prompts: add one prompt per line (or row)")
    return rows

