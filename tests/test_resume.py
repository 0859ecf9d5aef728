"""Which rows a (re-)run still has to generate, from the output's own metadata."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.images import ImageWriter, safe_name
from storage.metadata import metadata_table
from storage.prompts import PROMPT_SCHEMA, derived_seed
from storage.shards import sample_key, shard_name
from workflows.config import ConfigError
from workflows.resume import (
    assign_shards,
    completed_keys,
    expand_images,
    mark_duplicates,
    pending,
    plan_shards,
    unrecord_duplicates,
    unrecord_images,
    unrecord_shards,
)


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


def test_ids_that_would_share_an_image_name_become_error_rows():
    cleaned = safe_name("a/b")  # a_b-<hash>: a literal id may spell it
    in_shards = sample_key("x.y", 5).removesuffix("-s5")  # x.y keeps its file name, but not its sample key
    rows = [("a/b", 5, None), (cleaned, 5, None), (cleaned, 6, None), ("x.y", 5, None), (in_shards, 5, None)]
    errors = mark_duplicates(prompts(*rows))["error"].to_pylist()
    assert errors[0] is None and errors[2] is None and errors[3] is None
    assert f"id {cleaned!r} with seed 5 would be stored under the same name as the earlier id 'a/b'" in errors[1]
    assert "the earlier id 'x.y'" in errors[4]


def test_completed_keys_need_an_ok_row_and_its_image(tmp_path):
    writer = ImageWriter(str(tmp_path))
    uri_a, sha_a, _ = writer.write("a", 1, np.zeros((4, 4, 3), np.uint8))
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
    (tmp_path / "metadata" / "_run1.parquet.0123abcd.tmp").write_bytes(b"PAR1 half a rewrite")
    done, recorded, duplicates = completed_keys(str(tmp_path))
    assert duplicates == {}
    assert not (tmp_path / "metadata" / "_run1.parquet.0123abcd.tmp").exists()
    assert done == {("a", 1)}
    run1 = str(tmp_path / "metadata" / "run1.parquet")
    assert recorded == {("a", 1): {run1}, ("b", 1): {run1}, ("c", 1): {run1}}
    assert (tmp_path / "metadata" / "_unreadable" / "cut-off.parquet").exists()
    todo, unrecord = pending(prompts(("a", 1, None), ("b", 1, None), ("c", 1, None), ("c", 1, "bad seed"),
                                     ("d", 1, "x"), ("e", 1, None)), done, recorded)
    # b and c are generated again, their earlier rows taken out first, and the input error that shares c's key
    # is reported again with it; d's input error was never recorded; e is new
    assert list(zip(todo["prompt_id"].to_pylist(), todo["error"].to_pylist(), strict=True)) == [
        ("b", None), ("c", None), ("c", "bad seed"), ("d", "x"), ("e", None)]
    assert unrecord == {run1: {("b", 1), ("c", 1)}}
    assert unrecord_images(str(tmp_path), unrecord) == 2
    assert pq.read_table(run1)["prompt_id"].to_pylist() == ["a"]


def test_a_whole_file_run_takes_out_rows_of_keys_the_file_no_longer_asks_for(tmp_path):
    writer = ImageWriter(str(tmp_path))
    uri, sha, _ = writer.write("kept", 1, np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "metadata").mkdir()
    rows = [{"prompt_id": "kept", "prompt": "p", "seed": 1, "model": "tiny", "status": "ok", "image_uri": uri,
             "image_sha256": sha},  # an image of an earlier prompt file stays
            {"prompt_id": "fixed", "prompt": "p", "seed": 9, "model": "tiny", "status": "error",
             "error": "seed must be a whole number"}]  # the line now gives seed 77: a new key
    pq.write_table(metadata_table(rows), tmp_path / "metadata" / "run1.parquet")
    now = prompts(("fixed", 77, None))
    run1 = str(tmp_path / "metadata" / "run1.parquet")
    found = completed_keys(str(tmp_path))
    assert pending(now, found.done, found.recorded)[1] == {}  # a --limit run may not see every line
    todo, unrecord = pending(now, found.done, found.recorded, whole_file=True)
    assert todo["prompt_id"].to_pylist() == ["fixed"] and unrecord == {run1: {("fixed", 9)}}


def test_an_input_error_already_recorded_is_not_reported_again(tmp_path):
    (tmp_path / "metadata").mkdir()
    pq.write_table(metadata_table([{"prompt_id": "x", "prompt": "", "seed": 3, "model": "tiny", "status": "error",
                                    "error": "empty prompt"}]), tmp_path / "metadata" / "run1.parquet")
    todo, unrecord = pending(prompts(("x", 3, "empty prompt")), *completed_keys(str(tmp_path))[:2])
    assert todo.num_rows == 0 and unrecord == {}


def test_an_image_recorded_twice_keeps_one_ok_row_and_the_surplus_is_taken_out(tmp_path):
    writer = ImageWriter(str(tmp_path))
    stored = writer.write("a", 1, np.zeros((4, 4, 3), np.uint8))
    ok = {"prompt_id": "a", "prompt": "a", "seed": 1, "model": "tiny", "status": "ok", "image_uri": stored.uri,
          "image_sha256": stored.sha256, "image_bytes": stored.size}
    duplicate = {"prompt_id": "a", "prompt": "a", "seed": 1, "model": "tiny", "status": "error",
                 "error": "duplicate id 'a' with seed 1"}  # an input error that shares the key stays
    (tmp_path / "metadata").mkdir()
    pq.write_table(metadata_table([ok, duplicate, ok]), tmp_path / "metadata" / "job1.parquet")
    pq.write_table(metadata_table([{**ok, "image_bytes": stored.size + 1}, ok]), tmp_path / "metadata" / "job2.parquet")
    found = completed_keys(str(tmp_path))
    job1, job2 = (str(tmp_path / "metadata" / f"job{i}.parquet") for i in (1, 2))
    assert found.done == {("a", 1)}
    assert found.duplicates == {job1: {(("a", 1), 2)}, job2: {(("a", 1), 0), (("a", 1), 1)}}
    assert unrecord_duplicates(str(tmp_path), found.duplicates) == 3
    assert pq.read_table(job1)["status"].to_pylist() == ["ok", "error"] and not Path(job2).exists()
    assert completed_keys(str(tmp_path)).duplicates == {}


# --- webdataset: whole shards --------------------------------------------------------------------------------------


def shard_row(pid: str, shard: int, status: str = "ok") -> dict:
    return {"prompt_id": pid, "prompt": pid, "seed": 1, "model": "tiny", "status": status,
            "error": None if status == "ok" else "boom", "shard": f"/out/shards/{shard_name(shard)}"}


def test_shards_are_redone_whole_unless_their_tar_and_all_their_rows_are_there(tmp_path):
    table = assign_shards(prompts(*[(f"p{i}", 1, None) for i in range(7)]), 3)  # shards 0-2 of 3, 3, 1 rows
    assert table["shard"].to_pylist() == [0, 0, 0, 1, 1, 1, 2]
    assert table["shard_rows"].to_pylist() == [3, 3, 3, 3, 3, 3, 1]
    (tmp_path / "shards").mkdir()
    for index in (0, 2):  # shard 1's tar is gone
        (tmp_path / "shards" / shard_name(index)).write_bytes(b"tar")
    (tmp_path / "shards" / f".{shard_name(1)}.abc.tmp").write_bytes(b"partial")  # not a published shard
    (tmp_path / "metadata").mkdir()
    # shard 0 complete (an error row counts as recorded); shard 1 recorded but its tar is gone; shard 2's tar is
    # there but its row was never recorded; a row of a shard this run does not ask for is left alone
    first = [shard_row("p0", 0), shard_row("p1", 0, "error"), shard_row("p3", 1), shard_row("p4", 1)]
    pq.write_table(metadata_table(first), tmp_path / "metadata" / "run1.parquet")
    pq.write_table(metadata_table([shard_row("p2", 0), shard_row("p5", 1), shard_row("zz", 9)]),
                   tmp_path / "metadata" / "run2.parquet")
    plan = plan_shards(table, str(tmp_path))
    assert plan.done == [shard_name(0)]
    assert plan.todo["prompt_id"].to_pylist() == ["p3", "p4", "p5", "p6"]
    assert plan.unrecord == {str(tmp_path / "metadata" / f): {shard_name(1)} for f in ("run1.parquet", "run2.parquet")}

    assert unrecord_shards(str(tmp_path), plan.unrecord) == 3
    left = pq.read_table(tmp_path / "metadata")
    assert sorted(left["prompt_id"].to_pylist()) == ["p0", "p1", "p2", "zz"]
    assert sorted(p.name for p in (tmp_path / "metadata").iterdir()) == ["run1.parquet", "run2.parquet"]
    assert plan_shards(table, str(tmp_path)).unrecord == {}  # nothing of the shards to redo is recorded now


def test_shard_plan_refuses_an_output_written_another_way(tmp_path):
    (tmp_path / "metadata").mkdir()
    table = assign_shards(prompts(("p0", 1, None), ("p1", 1, None)), 1)
    pq.write_table(metadata_table([shard_row("p1", 0)]), tmp_path / "metadata" / "a.parquet")
    with pytest.raises(ConfigError, match=r"holds prompt 'p1' \(seed 1\) in shard images-000000.tar, but this run "
                                          r"puts it in images-000001.tar.*output.shard_size"):
        plan_shards(table, str(tmp_path))
    with pytest.raises(ConfigError, match="already holds the webdataset layout.*set output.format: webdataset"):
        completed_keys(str(tmp_path))
    files_row = {**shard_row("p0", 0), "shard": None, "image_uri": str(tmp_path / "images" / "p0-s1.png")}
    pq.write_table(metadata_table([files_row]), tmp_path / "metadata" / "a.parquet")
    with pytest.raises(ConfigError, match="already holds the files layout.*set output.format: files"):
        plan_shards(table, str(tmp_path))
