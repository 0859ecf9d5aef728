"""Whole prompt files read through Ray Data on the shared local cluster: row order, column types, encodings and
files that hold no prompt."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workflows.config import ConfigError
from workflows.prompts import read_prompt_table


def test_rows_keep_file_order_so_limit_takes_the_first(tmp_path, ray_cluster):
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i:05d}", "prompt": f"prompt {i}"}) + "\n" for i in range(20000)))
    assert read_prompt_table(str(path), limit=3)["prompt_id"].to_pylist() == ["p00000", "p00001", "p00002"]
    assert read_prompt_table(str(path))["prompt_id"].to_pylist() == [f"p{i:05d}" for i in range(20000)]


def test_many_parts_read_in_parallel_come_out_in_file_order(tmp_path, ray_cluster, monkeypatch):
    """Parts of 2 KiB, so ~100 read tasks finish in any order; the dataset is made and run outside any context
    (as the job makes its plan before it runs it), and its rows still come in file order, numbered from 1."""
    import ray

    from workflows import prompts

    monkeypatch.setattr(prompts, "PART_BYTES", 2048)
    path = tmp_path / "parts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i:05d}", "prompt": f"prompt {i}"}) + "\n" for i in range(6000)))
    assert len(prompts.prompt_parts(str(path))) > 90
    rows = pa.concat_tables(ray.get(prompts.prompt_rows(str(path)).to_arrow_refs()))
    assert rows["source_row"].to_pylist() == list(range(1, 6001))
    assert rows["prompt_id"].to_pylist() == [f"p{i:05d}" for i in range(6000)]
    first = pa.concat_tables(ray.get(prompts.prompt_rows(str(path), limit=2500).to_arrow_refs()))
    assert first["source_row"].to_pylist() == list(range(1, 2501))


def test_csv_ids_stay_text_and_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path, ray_cluster):
    csv = tmp_path / "ids.csv"
    csv.write_text("id,prompt,seed\n007,a red circle,1\n010,a blue square,2\n")
    assert read_prompt_table(str(csv))["prompt_id"].to_pylist() == ["007", "010"]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_text('\ufeff{"id": "first", "prompt": "a red circle"}\n', encoding="utf-8")
    text = tmp_path / "bom.txt"
    text.write_text("\ufeffa red circle\n", encoding="utf-8")
    for path in (jsonl, text):
        table = read_prompt_table(str(path))
        assert table["error"].to_pylist() == [None] and table["prompt"].to_pylist() == ["a red circle"]


def test_files_without_a_prompt_or_not_utf8_are_refused(tmp_path, ray_cluster):
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n   \n")
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), empty)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"prompt": "a good line"}\n{"prompt": "café"}\n'.encode("latin-1"))
    folder = tmp_path / "prompts"
    folder.mkdir()
    for path, problem in [(blank, "holds no prompts"), (empty, "holds no prompts"), (latin1, "is not UTF-8 text"),
                          (folder, "is a folder")]:
        with pytest.raises(ConfigError, match=problem) as error:
            read_prompt_table(str(path))
        assert str(path) in str(error.value)
    with pytest.raises(ConfigError) as error:
        read_prompt_table(str(latin1))
    assert "byte 41 (line 2) starts no UTF-8 character" in str(error.value)  # the é of "café"


def test_rows_carry_their_line_or_row_number_across_batches_blank_lines_counted(tmp_path, ray_cluster):
    from workflows.prompts import VALIDATION_ROWS

    lines = [json.dumps({"id": f"p{i}", "prompt": f"prompt {i}"}) if i % 3 else "" for i in range(VALIDATION_ROWS + 50)]
    lines[7] = "{not json"
    path = tmp_path / "gaps.jsonl"
    path.write_text("\n".join(lines) + "\n")
    table = read_prompt_table(str(path))
    wanted = [i + 1 for i, line in enumerate(lines) if line]  # lines from 1; blank ones hold no row
    assert table["source_row"].to_pylist() == wanted
    assert table.filter(pa.compute.is_valid(table["error"]))["source_row"].to_pylist() == [8]
    assert read_prompt_table(str(path), limit=4)["source_row"].to_pylist() == wanted[:4]
    csv = tmp_path / "rows.csv"
    csv.write_text("prompt\na red circle\n\"a blue\nsquare\"\na green triangle\n")
    assert read_prompt_table(str(csv))["source_row"].to_pylist() == [1, 2, 3]  # data rows, not lines
