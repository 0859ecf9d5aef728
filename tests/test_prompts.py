import hashlib
import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from storage.prompts import (
    PROMPT_SCHEMA,
    default_id,
    default_seed,
    normalize_jsonl_lines,
    normalize_records,
    normalize_text_lines,
    prompt_format,
)


def _only_row(table: pa.Table) -> dict:
    assert table.schema == PROMPT_SCHEMA
    assert table.num_rows == 1
    return table.to_pylist()[0]


def _jsonl_row(line: str) -> dict:
    return _only_row(normalize_jsonl_lines([line]))


def _csv_rows(text: str) -> list[dict]:
    """Parse like Ray's read_csv (pyarrow type inference), then normalise."""
    table = normalize_records(pacsv.read_csv(pa.py_buffer(text.encode())))
    assert table.schema == PROMPT_SCHEMA
    return table.to_pylist()


# --- helpers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("prompts.jsonl", "jsonl"),
        ("s3://bucket/dir/Prompts.JSON", "jsonl"),
        ("/data/p.ndjson", "jsonl"),
        ("p.csv", "csv"),
        ("p.parquet", "parquet"),
        ("s3://bucket/p.pq", "parquet"),
        ("p.txt", "text"),
        ("prompts", "text"),
        ("dir.csv/prompts", "text"),
        ("p.tsv", "text"),
    ],
)
def test_prompt_format(uri, expected):
    assert prompt_format(uri) == expected


def test_default_seed_is_stable_and_in_range():
    assert default_seed("cat") == 2007988107  # pinned: changing it would change every default image
    seeds = [default_seed(f"id-{index}") for index in range(200)]
    assert all(0 <= seed < 2**31 for seed in seeds)
    assert len(set(seeds)) == 200
    assert max(seeds) >= 2**30  # uses the full 31-bit range


def test_default_id():
    assert default_id("a cat") == hashlib.sha256(b"a cat").hexdigest()[:16] == "51e4674156077982"
    assert default_id("a cat") != default_id("a dog")


# --- JSONL: valid rows -------------------------------------------------------------------------------


def test_jsonl_valid_rows():
    lines = [
        '{"id": "cat", "prompt": "a cat", "seed": 7, "negative_prompt": "blurry"}',
        "",
        "   ",
        '{"prompt": "  a dog  ", "style": "ignored"}',
        '{"id": 12, "prompt": "a cow", "seed": "42"}',
        '{"prompt": "a fox", "seed": 3.0, "negative_prompt": null}',
        f'{{"prompt": "max", "seed": {2**63 - 1}}}',
    ]
    rows = normalize_jsonl_lines(lines).to_pylist()
    assert rows == [
        {"prompt_id": "cat", "prompt": "a cat", "seed": 7, "negative_prompt": "blurry", "h_div_w": None, "error": None,
         "source_row": 1},
        {
            "prompt_id": default_id("a dog"),
            "prompt": "a dog",
            "seed": default_seed(default_id("a dog")),
            "negative_prompt": None,
            "h_div_w": None,
            "error": None,
            "source_row": 4,
        },
        {"prompt_id": "12", "prompt": "a cow", "seed": 42, "negative_prompt": None, "h_div_w": None, "error": None,
         "source_row": 5},
        {
            "prompt_id": default_id("a fox"),
            "prompt": "a fox",
            "seed": 3,
            "negative_prompt": None,
            "h_div_w": None,
            "error": None,
            "source_row": 6,
        },
        {
            "prompt_id": default_id("max"),
            "prompt": "max",
            "seed": 2**63 - 1,
            "negative_prompt": None,
            "h_div_w": None,
            "error": None,
            "source_row": 7,
        },
    ]


def test_jsonl_blank_id_counts_as_absent():
    row = _jsonl_row('{"id": " ", "prompt": "a cat"}')
    assert row["prompt_id"] == default_id("a cat") and row["error"] is None


def test_empty_inputs_give_empty_tables_with_schema():
    for table in (normalize_jsonl_lines([]), normalize_jsonl_lines(["", " "]), normalize_text_lines([])):
        assert table.num_rows == 0 and table.schema == PROMPT_SCHEMA


# --- JSONL: malformed rows ---------------------------------------------------------------------------


def test_jsonl_invalid_json_names_problem_quotes_line_and_says_how_to_fix():
    line = '{"prompt": "a" "seed": 3}'
    row = _jsonl_row(line)
    assert row["error"] == (
        'invalid JSON: Expecting \',\' delimiter (line text: \'{"prompt": "a" "seed": 3}\'); '
        'each line must be a JSON object like {"prompt": "...", "seed": 1}'
    )
    assert row["prompt"] == ""
    assert row["prompt_id"] == default_id(line)
    assert row["seed"] == default_seed(default_id(line))


def test_jsonl_error_quotes_at_most_80_characters_of_the_line():
    line = '{"prompt": "' + "x" * 200 + '", "seed": "soon"}'
    error = _jsonl_row(line)["error"]
    quoted = line[:77] + "..."
    assert f"(line text: '{quoted}')" in error
    assert "x" * 78 not in error


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("[1, 2]", "line holds an array, not a JSON object"),
        ('"a cat"', "line holds a string, not a JSON object"),
        ("42", "line holds a number, not a JSON object"),
        ("null", "line holds null, not a JSON object"),
    ],
)
def test_jsonl_line_that_is_not_an_object(line, problem):
    row = _jsonl_row(line)
    assert row["error"].startswith(f"{problem} (line text: {line!r}); each line must be a JSON object")
    assert row["prompt_id"] == default_id(line)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"seed": 1}', 'missing "prompt"'),
        ('{"prompt": null}', 'missing "prompt"'),
        ('{"prompt": ""}', 'empty "prompt"'),
        ('{"prompt": "   "}', 'empty "prompt"'),
        ('{"prompt": 5}', '"prompt" is a number, not a string'),
        ('{"prompt": ["a"]}', '"prompt" is an array, not a string'),
        ('{"prompt": {"text": "a"}}', '"prompt" is an object, not a string'),
    ],
)
def test_jsonl_missing_or_empty_prompt(line, problem):
    row = _jsonl_row(line)
    assert row["error"].startswith(f"{problem} (line text: ")
    assert 'give a non-empty "prompt" string' in row["error"]
    assert row["prompt"] == ""


@pytest.mark.parametrize(
    ("seed", "problem"),
    [
        ("true", '"seed" true is not a whole number'),
        ("1.5", '"seed" 1.5 is not a whole number'),
        ('"abc"', '"seed" "abc" is not a whole number'),
        ('"1e3"', '"seed" "1e3" is not a whole number'),
        ("[1]", '"seed" [1] is not a whole number'),
        ("NaN", '"seed" NaN is not a whole number'),
        ("-1", '"seed" -1 is negative'),
        ('"-3"', '"seed" "-3" is negative'),
        (str(2**63), f'"seed" {2**63} is too large (must be below 2**63)'),
        (f'"{2**64}"', f'"seed" "{2**64}" is too large (must be below 2**63)'),
    ],
)
def test_jsonl_bad_seed_keeps_prompt_and_id(seed, problem):
    line = f'{{"id": "cat", "prompt": "a cat", "seed": {seed}}}'
    row = _jsonl_row(line)
    assert row["error"].startswith(f"{problem} (line text: {line!r}); ")
    assert 'make "seed" a whole number from 0 to 9223372036854775807' in row["error"]
    assert (row["prompt_id"], row["prompt"]) == ("cat", "a cat")
    assert row["seed"] == default_seed("cat")


def test_jsonl_error_row_without_id_uses_hash_of_line_and_keeps_valid_seed():
    line = '{"prompt": "a cat", "seed": 9, "negative_prompt": 3}'
    row = _jsonl_row(line)
    assert row["error"].startswith('"negative_prompt" is a number, not a string')
    assert row["prompt_id"] == default_id(line) != default_id("a cat")
    assert (row["prompt"], row["seed"]) == ("a cat", 9)


@pytest.mark.parametrize("value", ["true", "1.5", "[1]", '{"a": 1}'])
def test_jsonl_bad_id(value):
    line = f'{{"id": {value}, "prompt": "a cat"}}'
    row = _jsonl_row(line)
    assert row["error"].startswith(f'"id" {value} is ')
    assert 'make "id" a string or an integer' in row["error"]
    assert row["prompt_id"] == default_id(line)


def test_jsonl_reports_every_problem_of_a_line_once():
    row = _jsonl_row('{"prompt": "", "seed": -1, "id": false}')
    error = row["error"]
    for problem in ('empty "prompt"', '"seed" -1 is negative', '"id" false is a boolean, not a string'):
        assert problem in error
    assert error.count("give a non-empty") == 1


def test_jsonl_lone_surrogates_become_error_rows_that_arrow_can_store():
    lines = [
        r'{"prompt": "bad \ud800"}',
        r'{"prompt": "ok", "id": "\udfff"}',
        r'{"prompt": "ok", "seed": "\ud800"}',
    ]
    table = normalize_jsonl_lines(lines)
    errors = table.column("error").to_pylist()
    assert all(errors)
    assert "not valid Unicode" in errors[0] and "not valid Unicode" in errors[1]
    assert "not a whole number" in errors[2]


def test_jsonl_deeply_nested_line_is_an_error_row():
    row = _jsonl_row("[" * 100_000)
    assert row["error"].startswith("invalid JSON: ")


def test_jsonl_rows_stay_distinct_per_line():
    table = normalize_jsonl_lines(["{bad", "{worse"])
    assert len(set(table.column("prompt_id").to_pylist())) == 2


# --- CSV / Parquet records ---------------------------------------------------------------------------


def test_csv_float_seeds_accept_whole_numbers_only():
    rows = _csv_rows("prompt,seed\na cat,3.0\na dog,3.5\na cow,\n")
    assert [row["seed"] for row in rows[::2]] == [3, default_seed(default_id("a cow"))]
    assert rows[0]["error"] is None and rows[2]["error"] is None
    assert rows[1]["error"] == (
        '"seed" 3.5 is not a whole number (row: \'{"prompt": "a dog", "seed": 3.5}\'); '
        'make "seed" a whole number from 0 to 9223372036854775807, or leave it out to derive one from the id'
    )
    assert rows[1]["prompt"] == "a dog"


def test_csv_string_seeds_and_ids():
    rows = _csv_rows("id,prompt,seed,negative_prompt,notes\ncat,a cat,12,,x\n,a dog,oops,dark,y\n")
    assert rows[0] == {
        "prompt_id": "cat",
        "prompt": "a cat",
        "seed": 12,
        "negative_prompt": None,
        "h_div_w": None,
        "error": None,
        "source_row": 1,
    }
    assert rows[1]["error"].startswith('"seed" "oops" is not a whole number (row: ')
    assert rows[1]["negative_prompt"] == "dark"


def test_csv_integer_ids_and_blank_prompts():
    rows = _csv_rows("id,prompt\n1,a cat\n2,\n")
    assert (rows[0]["prompt_id"], rows[0]["error"]) == ("1", None)
    assert rows[1]["prompt_id"] == "2"
    assert rows[1]["error"].startswith('empty "prompt" (row: ')


def test_records_from_parquet_like_table():
    table = pa.table(
        {
            "prompt": ["a cat", None],
            "seed": pa.array([5, None], pa.int64()),
            "id": ["c", "d"],
            "extra": [1.0, 2.0],
        }
    )
    rows = normalize_records(table).to_pylist()
    assert rows[0] == {"prompt_id": "c", "prompt": "a cat", "seed": 5, "negative_prompt": None, "h_div_w": None,
                       "error": None, "source_row": 1}
    assert rows[1]["error"].startswith('missing "prompt" (row: ')
    assert json.loads(rows[1]["error"].split("(row: '")[1].split("')")[0]) == {
        "prompt": None,
        "id": "d",
        "seed": None,
    }


def test_records_without_prompt_column_fail_for_the_whole_file():
    with pytest.raises(
        ValueError, match=r"no 'prompt' column \(columns found: \['text', 'seed'\]\)"
    ) as error:
        normalize_records(pa.table({"text": ["a cat"], "seed": [1]}))
    assert "add a 'prompt' column" in str(error.value)


# --- plain text --------------------------------------------------------------------------------------


def test_text_lines():
    table = normalize_text_lines(["a cat\n", "", "  ", '  {"prompt": "literal"}  '])
    assert table.schema == PROMPT_SCHEMA
    rows = table.to_pylist()
    assert [row["prompt"] for row in rows] == ["a cat", '{"prompt": "literal"}']
    assert [row["source_row"] for row in rows] == [1, 4]  # blank lines are counted, not kept
    assert rows[0] == {
        "prompt_id": default_id("a cat"),
        "prompt": "a cat",
        "seed": default_seed(default_id("a cat")),
        "negative_prompt": None,
        "h_div_w": None,
        "error": None,
        "source_row": 1,
    }


def test_same_prompt_gets_same_id_in_every_format():
    from_text = normalize_text_lines(["a cat"]).to_pylist()
    from_jsonl = normalize_jsonl_lines(['{"prompt": "a cat"}']).to_pylist()
    from_csv = _csv_rows("prompt\na cat\n")
    assert from_text == from_jsonl == from_csv


def test_aspect_ratio_and_oversized_prompts():
    table = normalize_jsonl_lines([
        '{"prompt": "wide", "h_div_w": 0.5625}',
        '{"prompt": "odd", "h_div_w": -1}',
        '{"prompt": "' + "x" * 5000 + '"}',
    ])
    rows = table.to_pylist()
    assert rows[0]["h_div_w"] == 0.5625 and rows[0]["error"] is None
    assert '"h_div_w" -1 is not a usable aspect ratio' in rows[1]["error"]
    assert "5000 characters, more than 4096" in rows[2]["error"]
