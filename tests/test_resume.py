"""Which rows a (re-)run still has to generate, from the output's own metadata."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.images import ImageWriter
from storage.metadata import metadata_table
from storage.prompts import PROMPT_SCHEMA, derived_seed
from workflows.resume import completed_keys, expand_images, mark_duplicates, pending


def prompts(*rows) -> pa.Table:
    return pa.Table.from_pylist([{"prompt_id": p, "prompt": p, "seed": s, "negative_prompt": None, "error": e}
                                 for p, s, e in rows], schema=PROMPT_SCHEMA)


def test_images_per_prompt_derives_distinct_stable_seeds():
    table = expand_images(prompts(("a", 7, None), ("bad", 1, "invalid JSON")), 3)
    assert table["seed"].to_pylist() == [7, derived_seed(7, 1), derived_seed(7, 2), 1]
    assert len(set(table["seed"].to_pylist()[:3])) == 3


def test_later_duplicates_become_error_rows():
    table = mark_duplicates(prompts(("a", 1, None), ("a", 1, None), ("a", 2, None)))
    errors = table["error"].to_pylist()
    assert errors[0] is None and errors[2] is None
    assert "duplicate id 'a' with seed 1" in errors[1]


def test_completed_keys_need_an_ok_row_and_its_image(tmp_path):
    writer = ImageWriter(str(tmp_path))
    uri_a, sha_a = writer.write("a", 1, np.zeros((4, 4, 3), np.uint8))
    rows = [
        {"prompt_id": "a", "prompt": "a", "seed": 1, "model": "tiny", "status": "ok", "image_uri": uri_a,
         "image_sha256": sha_a},
        {"prompt_id": "b", "prompt": "b", "seed": 1, "model": "tiny", "status": "ok",
         "image_uri": str(tmp_path / "images" / "b-s1.png")},  # its image is gone
        {"prompt_id": "c", "prompt": "c", "seed": 1, "model": "tiny", "status": "error", "error": "boom"},
    ]
    (tmp_path / "metadata").mkdir()
    pq.write_table(metadata_table(rows), tmp_path / "metadata" / "run1.parquet")
    (tmp_path / "metadata" / "cut-off.parquet").write_bytes(b"PAR1 truncated")
    done, recorded = completed_keys(str(tmp_path))
    assert done == {("a", 1)}
    assert recorded == {("a", 1), ("b", 1), ("c", 1)}
    assert (tmp_path / "metadata" / "_unreadable" / "cut-off.parquet").exists()
    todo = pending(prompts(("a", 1, None), ("b", 1, None), ("c", 1, None), ("c", 1, "bad seed"), ("d", 1, "x")),
                   done, recorded)
    # b and c are generated again; c's input error was already recorded; d's was not
    assert list(zip(todo["prompt_id"].to_pylist(), todo["error"].to_pylist(), strict=True)) == [
        ("b", None), ("c", None), ("d", "x")]
