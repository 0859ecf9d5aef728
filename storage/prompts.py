"""Turn prompt files (JSONL, CSV, Parquet, plain text) into rows of PROMPT_SCHEMA.

A bad row becomes a row with ``error`` set instead of an exception, so one typo in a large file is
reported next to its line and does not stop the other prompts from being generated.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from typing import Any, Literal

import pyarrow as pa

PROMPT_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("negative_prompt", pa.string()),
        ("h_div_w", pa.float64()),
        ("error", pa.string()),
        # where the row is in its file, from 1: the line (JSONL, text) or data row (CSV, Parquet). The normalizers
        # number the lines they are given; workflows.prompts makes that the file's numbering.
        ("source_row", pa.int64()),
    ]
)

PromptFormat = Literal["jsonl", "csv", "parquet", "text"]
RECORD_FIELDS = ("prompt", "id", "seed", "negative_prompt", "h_div_w")
MAX_PROMPT_CHARS = 4096
MAX_SEED = 2**63 - 1
EXCERPT_LENGTH = 80
BOM = "\ufeff"  # editors on Windows start UTF-8 files with it; it is not part of the first line

_FORMATS: dict[str, PromptFormat] = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_INTEGER_TEXT = re.compile(r"[+-]?\d{1,30}")

_JSON_FIX = 'each line must be a JSON object like {"prompt": "...", "seed": 1}'
_PROMPT_FIX = 'give a non-empty "prompt" string'
_ID_FIX = 'make "id" a string or an integer, or leave it out'
_SEED_FIX = f'make "seed" a whole number from 0 to {MAX_SEED}, or leave it out to derive one from the id'
_NEGATIVE_FIX = 'make "negative_prompt" a string, or leave it out'
_RATIO_FIX = 'make "h_div_w" a positive number (height / width, e.g. 0.5625 for 16:9), or leave it out for 1.0'
_SURROGATE = "is not valid Unicode (it holds a lone surrogate escape)"

# (what is wrong, how to fix it)
_Issue = tuple[str, str]


def prompt_format(uri: str) -> PromptFormat:
    """Pick the reader by extension; anything unrecognised is read as one prompt per line."""
    name = uri.rstrip("/").rsplit("/", 1)[-1].lower()
    _, dot, extension = name.rpartition(".")
    return _FORMATS.get(f".{extension}", "text") if dot else "text"


def default_seed(prompt_id: str) -> int:
    """Derive a stable seed from the id, so reruns reproduce images without the user picking seeds."""
    return int.from_bytes(hashlib.sha256(prompt_id.encode("utf-8")).digest()[:4], "big") & 0x7FFFFFFF


def default_id(prompt: str) -> str:
    """Derive a stable id from the text, so a rerun of the same file maps to the same images."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def normalize_jsonl_lines(lines: list[str]) -> pa.Table:
    """Parse JSON-object lines such as ``{"id": "cat", "prompt": "a cat", "seed": 7}``."""
    rows = []
    for number, line in enumerate(lines, 1):
        source = line.strip().removeprefix(BOM)
        if not source:
            continue
        try:
            record = json.loads(source)
        except (ValueError, RecursionError) as exc:
            detail = getattr(exc, "msg", None) or str(exc) or type(exc).__name__
            row = _error_row(source, "line text", [(f"invalid JSON: {detail}", _JSON_FIX)])
        else:
            if isinstance(record, dict):
                row = _row_from_record(record, source, "line text")
            else:
                problem = f"line holds {_json_type(record)}, not a JSON object"
                row = _error_row(source, "line text", [(problem, _JSON_FIX)])
        rows.append({**row, "source_row": number})
    return pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA)


def normalize_records(table: pa.Table) -> pa.Table:
    """Validate rows of an already-parsed CSV or Parquet file; columns beyond RECORD_FIELDS are ignored."""
    if "prompt" not in table.column_names:
        raise ValueError(
            f"prompt file has no 'prompt' column (columns found: {table.column_names}); "
            "add a 'prompt' column with one prompt per row, plus optional 'id', 'seed' and 'negative_prompt'"
        )
    present = [name for name in RECORD_FIELDS if name in table.column_names]
    rows = []
    for number, record in enumerate(table.select(present).to_pylist(), 1):
        source = json.dumps(record, ensure_ascii=False, default=str)
        rows.append({**_row_from_record(record, source, "row"), "source_row": number})
    return pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA)


def normalize_text_lines(lines: list[str]) -> pa.Table:
    """Read one prompt per non-blank line; ids and seeds are derived from the text."""
    lines = [line.removeprefix(BOM) for line in lines]
    rows = [{**_row_from_record({"prompt": line}, line.strip(), "line text"), "source_row": number}
            for number, line in enumerate(lines, 1) if line.strip()]
    return pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA)


def _row_from_record(record: Mapping[str, Any], source: str, label: str) -> dict[str, Any]:
    """The one validation shared by every format; ``source`` is the text quoted back in error messages."""
    prompt, prompt_issue = _parse_prompt(record.get("prompt"))
    prompt_id, id_issue = _parse_id(record.get("id"))
    seed, seed_issue = _parse_seed(record.get("seed"))
    negative_prompt, negative_issue = _parse_negative_prompt(record.get("negative_prompt"))
    h_div_w, ratio_issue = _parse_h_div_w(record.get("h_div_w"))
    issues = [issue for issue in (prompt_issue, id_issue, seed_issue, negative_issue, ratio_issue) if issue]
    if issues:
        return _error_row(source, label, issues, prompt, prompt_id, seed, negative_prompt)
    prompt_id = prompt_id or default_id(prompt)
    return {
        "prompt_id": prompt_id,
        "prompt": prompt,
        "seed": default_seed(prompt_id) if seed is None else seed,
        "negative_prompt": negative_prompt,
        "h_div_w": h_div_w,
        "error": None,
    }


def _error_row(
    source: str,
    label: str,
    issues: list[_Issue],
    prompt: str = "",
    prompt_id: str | None = None,
    seed: int | None = None,
    negative_prompt: str | None = None,
) -> dict[str, Any]:
    """Keep whatever was valid, and derive the id from the raw text so distinct bad rows stay distinct."""
    prompt_id = prompt_id or default_id(source)
    problems = "; ".join(problem for problem, _ in issues)
    fixes = "; ".join(dict.fromkeys(fix for _, fix in issues))
    return {
        "prompt_id": prompt_id,
        "prompt": prompt,
        "seed": default_seed(prompt_id) if seed is None else seed,
        "negative_prompt": negative_prompt,
        "error": f"{problems} ({label}: {_excerpt(source)!r}); {fixes}",
    }


def _parse_h_div_w(value: object) -> tuple[float | None, _Issue | None]:
    if value is None or value == "":
        return None, None
    try:
        ratio = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        ratio = float("nan")
    if not math.isfinite(ratio) or not 0.05 <= ratio <= 20:
        return None, (f'"h_div_w" {_show(value)} is not a usable aspect ratio', _RATIO_FIX)
    return ratio, None


def _parse_prompt(value: object) -> tuple[str, _Issue | None]:
    if value is None:
        return "", ('missing "prompt"', _PROMPT_FIX)
    if not isinstance(value, str):
        return "", (f'"prompt" is {_json_type(value)}, not a string', _PROMPT_FIX)
    if not _is_encodable(value):
        return "", (f'"prompt" {_SURROGATE}', _PROMPT_FIX)
    text = value.strip()
    if len(text) > MAX_PROMPT_CHARS:
        return "", (f'"prompt" has {len(text)} characters, more than {MAX_PROMPT_CHARS}',
                    f"shorten the prompt to at most {MAX_PROMPT_CHARS} characters")
    return text, None if text else ('empty "prompt"', _PROMPT_FIX)


def _parse_id(value: object) -> tuple[str | None, _Issue | None]:
    """Ids may be strings or integers; a blank id (an empty CSV cell) counts as absent."""
    if value is None:
        return None, None
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None, (f'"id" {_show(value)} is {_json_type(value)}, not a string or integer', _ID_FIX)
    if isinstance(value, str) and not _is_encodable(value):
        return None, (f'"id" {_SURROGATE}', _ID_FIX)
    text = str(value)
    return (text if text.strip() else None), None


def _parse_seed(value: object) -> tuple[int | None, _Issue | None]:
    """Accept ints, whole floats (CSV columns with gaps parse as float) and digit strings; blank is absent."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, None
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and _INTEGER_TEXT.fullmatch(value.strip()):
        number = int(value.strip())
    if number is None:
        return None, (f'"seed" {_show(value)} is not a whole number', _SEED_FIX)
    if number < 0:
        return None, (f'"seed" {_show(value)} is negative', _SEED_FIX)
    if number > MAX_SEED:
        return None, (f'"seed" {_show(value)} is too large (must be below 2**63)', _SEED_FIX)
    return number, None


def _parse_negative_prompt(value: object) -> tuple[str | None, _Issue | None]:
    if value is None:
        return None, None
    if not isinstance(value, str):
        return None, (f'"negative_prompt" is {_json_type(value)}, not a string', _NEGATIVE_FIX)
    if not _is_encodable(value):
        return None, (f'"negative_prompt" {_SURROGATE}', _NEGATIVE_FIX)
    return value.strip() or None, None


def _is_encodable(text: str) -> bool:
    """JSON escapes can produce lone surrogates, which Arrow strings (UTF-8) cannot hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_type(value: object) -> str:
    """Describe a value's type in JSON terms, with its article, for error messages."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array"}
    return names.get(type(value), "an object" if isinstance(value, dict) else f"a {type(value).__name__}")


def _show(value: object) -> str:
    return _excerpt(json.dumps(value, default=str), 40)


def _excerpt(text: str, limit: int = EXCERPT_LENGTH) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def derived_seed(seed: int, index: int) -> int:
    """Seed of a prompt's index-th image (index 0 keeps the prompt's own seed), stable across runs."""
    if index == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:4], "big") & 0x7FFFFFFF
