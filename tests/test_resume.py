"""Which rows a (re-)run still has to generate, from the output's own metadata: the scan (workflows.scan) and
the planner (workflows.planner) on the shared local cluster, and compaction (workflows.compact)."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from storage.images import ImageWriter, safe_name
from storage.metadata import metadata_table
from storage.prompts import PROMPT_SCHEMA, derived_seed
from storage.shards import sample_key, shard_name
from workflows.compact import MANIFEST, compact_metadata, finish_compactions
from workflows.config import ConfigError
from workflows.planner import Planner, expand_and_hash, image_hash
from workflows.resume import expand_images
from workflows.scan import scan_files, scan_shards, take_out_images


def prompts(*rows) -> pa.Table:
    return pa.Table.from_pylist([{"prompt_id": p, "prompt": p, "seed": s, "negative_prompt": None, "error": e,
                                  "source_row": n} for n, (p, s, e) in enumerate(rows, 1)], schema=PROMPT_SCHEMA)


def plan(table: pa.Table, output: Path, layout: str = "files", batches: int = 1, whole_file: bool = True,
         shard_size: int = 3) -> tuple[pa.Table, dict]:
    """`table` planned against the output in `batches` batches, as the job does; (the rows, finish())."""
    if layout == "files":
        found = scan_files(str(output), None)
        planner = Planner.remote(layout, shard_size, whole_file, str(output), None, done=found.done,
                                 recorded=found.recorded)
    else:
        planner = Planner.remote(layout, shard_size, whole_file, str(output), None,
                                 shards=scan_shards(str(output), None, shard_size))
    rows = expand_and_hash(table, 1)
    step = -(-rows.num_rows // batches)
    out = [ray.get(planner.plan.remote(rows.slice(i, step))) for i in range(0, rows.num_rows, step)]
    finished = ray.get(planner.finish.remote())
    if finished["tail"] is not None:
        out.append(finished["tail"])
    return pa.concat_tables(out), finished


def test_images_per_prompt_derives_distinct_stable_seeds():
    table = expand_images(prompts(("a", 7, None), ("bad", 1, "invalid JSON")), 3)
    assert table["seed"].to_pylist() == [7, derived_seed(7, 1), derived_seed(7, 2), 1]
    assert len(set(table["seed"].to_pylist()[:3])) == 3


@pytest.mark.parametrize("batches", [1, 3])
def test_later_duplicates_become_error_rows_within_and_across_batches(ray_cluster, tmp_path, batches):
    table, _ = plan(prompts(("a", 1, None), ("a", 1, None), ("a", 2, None)), tmp_path, batches=batches)
    errors = table["error"].to_pylist()
    assert errors[0] is None and errors[2] is None
    assert "duplicate id 'a' with seed 1" in errors[1] and table["source_row"].to_pylist() == [1, 2, 3]


@pytest.mark.parametrize("batches", [1, 5])
def test_ids_that_would_share_an_image_name_become_error_rows(ray_cluster, tmp_path, batches):
    cleaned = safe_name("a/b")  # what a literal id must spell to collide with it
    assert cleaned.startswith("a_b-")
    rows = [("a/b", 5, None), (cleaned, 5, None), (cleaned, 6, None), ("v.1", 7, None), (sample_key("v.1", 7)[:-3],
                                                                                         7, None)]
    errors = plan(prompts(*rows), tmp_path, batches=batches)[0]["error"].to_pylist()
    assert f"id {cleaned!r} with seed 5 would be stored under the same name as the earlier id 'a/b'" in errors[1]
    assert errors[2] is None and errors[3] is None
    assert "as the earlier id 'v.1'" in errors[4]  # a shard sample key spelled literally


def test_column_hashes_are_those_of_each_rows_stored_names():
    """expand_and_hash works a column at a time; its hashes and `renamed` are those of the per-row names (safe_name,
    sample_key), for ids that need cleaning, are empty, too long or not ASCII, and null seeds."""
    from storage.shards import sample_key
    from workflows.planner import _hash, image_hashes

    rng = np.random.default_rng(1)
    alphabet = list("abcXYZ019._-/ é\n\0")
    ids = ["", ".", "..a", "a.b", "x" * 100, "x" * 101, "y" * 64, "y" * 65, "a/b", "a_b", "é", "plain"] + [
        "".join(rng.choice(alphabet, rng.integers(0, 120))) for _ in range(300)]
    seeds = [[None, 0, -5, 2**62, 7][i % 5] for i in range(len(ids))]
    rows = pa.table({"prompt_id": ids, "seed": pa.array(seeds, pa.int64()), "error": pa.nulls(len(ids), pa.string())})
    hashed = expand_and_hash(rows, 1)
    pairs = list(zip(ids, seeds, strict=True))
    assert hashed["name_hash"].to_pylist() == [_hash(f"{safe_name(p)}-s{s}") for p, s in pairs]
    assert image_hashes(rows["prompt_id"], rows["seed"]).tolist() == hashed["name_hash"].to_pylist()
    assert hashed["sample_hash"].to_pylist() == [_hash(f"shard sample {sample_key(p, s)}") for p, s in pairs]
    assert hashed["exact_hash"].to_pylist() == [_hash(f"{p}\0{s}") for p, s in pairs]
    renamed = [safe_name(p) != p or sample_key(p, s) != f"{p}-s{s}" for p, s in pairs]
    assert hashed["renamed"].to_pylist() == renamed and 0 < sum(renamed) < len(ids)


def test_hash_sets_hold_what_was_added_across_chunks_and_merges(monkeypatch):
    from workflows import planner

    monkeypatch.setattr(planner, "MERGE_EVERY", 50)
    rng = np.random.default_rng(0)  # values from 0-299: repeats within and across additions
    hashes, added = planner.HashSet(rng.integers(0, 300, 30, dtype=np.uint64)), set()
    added |= set(hashes.base.tolist())
    for size in [1, 1, 2, 7, 3, 40, 1, 5, 90, 2]:
        values = rng.integers(0, 300, size, dtype=np.uint64)
        hashes.add(values)
        added |= set(values.tolist())
        probe = np.concatenate([values, rng.integers(0, 300, 20, dtype=np.uint64)])
        assert hashes.contains(probe).tolist() == [int(v) in added for v in probe]
        assert len(hashes.chunks) <= 8  # merged pairwise as they grow
    assert hashes.array().tolist() == sorted(added)


def test_done_needs_an_ok_row_and_its_image_and_the_rest_is_retried(ray_cluster, tmp_path):
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
    todo, finished = plan(prompts(("a", 1, None), ("b", 1, None), ("c", 1, None), ("c", 1, "bad seed"),
                                  ("d", 1, "x"), ("e", 1, None)), tmp_path)
    assert not (tmp_path / "metadata" / "_run1.parquet.0123abcd.tmp").exists()
    assert (tmp_path / "metadata" / "_unreadable" / "cut-off.parquet").exists()
    # b and c are generated again, and the input error that shares c's key is reported again with it; d's input
    # error was never recorded; e is new; a is done
    assert list(zip(todo["prompt_id"].to_pylist(), todo["error"].to_pylist(), strict=True)) == [
        ("b", None), ("c", None), ("c", "bad seed"), ("d", "x"), ("e", None)]
    assert finished["skipped"] == 1
    assert sorted(finished["take_out"].tolist()) == sorted([image_hash("b", 1), image_hash("c", 1)])
    # the run's end takes the earlier rows of b and c out; its own rows stay
    pq.write_table(metadata_table([{**rows[2], "run_id": "new"}]), tmp_path / "metadata" / "new.parquet")
    assert take_out_images(str(tmp_path), None, finished["take_out"], "new") == 2
    assert pq.read_table(tmp_path / "metadata" / "run1.parquet")["prompt_id"].to_pylist() == ["a"]
    assert pq.read_table(tmp_path / "metadata" / "new.parquet")["prompt_id"].to_pylist() == ["c"]


def test_a_whole_file_run_takes_out_rows_of_keys_the_file_no_longer_asks_for(ray_cluster, tmp_path):
    writer = ImageWriter(str(tmp_path))
    uri, sha, _ = writer.write("kept", 1, np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "metadata").mkdir()
    rows = [{"prompt_id": "kept", "prompt": "p", "seed": 1, "model": "tiny", "status": "ok", "image_uri": uri,
             "image_sha256": sha},  # an image of an earlier prompt file stays
            {"prompt_id": "fixed", "prompt": "p", "seed": 9, "model": "tiny", "status": "error",
             "error": "seed must be a whole number"}]  # the line now gives seed 77: a new key
    pq.write_table(metadata_table(rows), tmp_path / "metadata" / "run1.parquet")
    now = prompts(("fixed", 77, None))
    assert plan(now, tmp_path, whole_file=False)[1]["take_out"].tolist() == []  # a --limit run may not see every line
    todo, finished = plan(now, tmp_path)
    assert todo["prompt_id"].to_pylist() == ["fixed"] and finished["take_out"].tolist() == [image_hash("fixed", 9)]


def test_an_input_error_already_recorded_is_not_reported_again(ray_cluster, tmp_path):
    (tmp_path / "metadata").mkdir()
    pq.write_table(metadata_table([{"prompt_id": "x", "prompt": "", "seed": 3, "model": "tiny", "status": "error",
                                    "error": "empty prompt"}]), tmp_path / "metadata" / "run1.parquet")
    todo, finished = plan(prompts(("x", 3, "empty prompt")), tmp_path)
    assert todo.num_rows == 0 and finished["skipped_errors"] == 1 and finished["take_out"].tolist() == []


def test_an_image_recorded_twice_keeps_one_ok_row_and_the_surplus_is_taken_out(ray_cluster, tmp_path):
    writer = ImageWriter(str(tmp_path))
    stored = writer.write("a", 1, np.zeros((4, 4, 3), np.uint8))
    ok = {"prompt_id": "a", "prompt": "a", "seed": 1, "model": "tiny", "status": "ok", "image_uri": stored.uri,
          "image_sha256": stored.sha256, "image_bytes": stored.size}
    duplicate = {"prompt_id": "a", "prompt": "a", "seed": 1, "model": "tiny", "status": "error",
                 "error": "duplicate id 'a' with seed 1"}  # an input error that shares the key stays
    failed = {**duplicate, "error": "generation failed: RuntimeError: boom"}  # an earlier failure of the image
    (tmp_path / "metadata").mkdir()
    pq.write_table(metadata_table([ok, duplicate, ok, failed]), tmp_path / "metadata" / "job1.parquet")
    pq.write_table(metadata_table([{**ok, "image_bytes": stored.size + 1}, ok]), tmp_path / "metadata" / "job2.parquet")
    found = scan_files(str(tmp_path), None)
    assert found.deduplicated == 4
    assert pq.read_table(tmp_path / "metadata" / "job1.parquet")["status"].to_pylist() == ["ok", "error"]
    assert not (tmp_path / "metadata" / "job2.parquet").exists()
    assert ray.get(found.done).tolist() == [image_hash("a", 1)]
    assert scan_files(str(tmp_path), None).deduplicated == 0


# --- webdataset: whole shards --------------------------------------------------------------------------------------


def shard_row(pid: str, shard: int, status: str = "ok") -> dict:
    return {"prompt_id": pid, "prompt": pid, "seed": 1, "model": "tiny", "status": status,
            "error": None if status == "ok" else "boom", "shard": f"/out/shards/{shard_name(shard)}"}


def test_shards_are_redone_whole_unless_their_tar_and_all_their_rows_are_there(ray_cluster, tmp_path):
    (tmp_path / "shards").mkdir()
    for index in (0, 2):  # shard 1's tar is gone
        (tmp_path / "shards" / shard_name(index)).write_bytes(b"tar")
    (tmp_path / "shards" / f".{shard_name(1)}.abc.tmp").write_bytes(b"partial")  # not a published shard
    (tmp_path / "metadata").mkdir()
    # shard 0 complete (an error row counts as recorded); shard 1 recorded but its tar is gone; shard 2's tar is
    # there but its row was never recorded; rows of shards without a tar (1, 9) are taken out before the plan
    first = [shard_row("p0", 0), shard_row("p1", 0, "error"), shard_row("p3", 1), shard_row("p4", 1)]
    pq.write_table(metadata_table(first), tmp_path / "metadata" / "run1.parquet")
    pq.write_table(metadata_table([shard_row("p2", 0), shard_row("p5", 1), shard_row("zz", 9)]),
                   tmp_path / "metadata" / "run2.parquet")
    todo, finished = plan(prompts(*[(f"p{i}", 1, None) for i in range(7)]), tmp_path, "webdataset", batches=3)
    assert todo["prompt_id"].to_pylist() == ["p3", "p4", "p5", "p6"]
    assert todo["shard"].to_pylist() == [1, 1, 1, 2] and todo["shard_rows"].to_pylist() == [3, 3, 3, 1]
    assert finished["skipped"] == 3 and finished["skipped_errors"] == 0  # shard 0: three rows asked for, done
    left = pq.read_table(tmp_path / "metadata")
    assert sorted(left["prompt_id"].to_pylist()) == ["p0", "p1", "p2"]


def test_shard_plan_refuses_an_output_written_another_way(ray_cluster, tmp_path):
    (tmp_path / "metadata").mkdir()
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / shard_name(0)).write_bytes(b"tar")
    pq.write_table(metadata_table([shard_row("p1", 0)]), tmp_path / "metadata" / "a.parquet")
    table = prompts(("p0", 1, None), ("p1", 1, None))
    with pytest.raises(ConfigError, match=r"holds prompt 'p1' \(seed 1\) in shard images-000000.tar, but this run "
                                          r"puts it in images-000001.tar.*output.shard_size"):
        plan(table, tmp_path, "webdataset", shard_size=1)
    with pytest.raises(ConfigError, match="already holds the webdataset layout.*set output.format: webdataset"):
        scan_files(str(tmp_path), None)
    pq.write_table(metadata_table([shard_row(f"q{i}", 0) for i in range(3)]), tmp_path / "metadata" / "a.parquet")
    with pytest.raises(ConfigError, match="holds 3 rows in shard images-000000.tar.*shards of 2"):
        scan_shards(str(tmp_path), None, 2)
    files_row = {**shard_row("p0", 0), "shard": None, "image_uri": str(tmp_path / "images" / "p0-s1.png")}
    pq.write_table(metadata_table([files_row]), tmp_path / "metadata" / "a.parquet")
    with pytest.raises(ConfigError, match="already holds the files layout.*set output.format: files"):
        scan_shards(str(tmp_path), None, 1)


# --- compaction ------------------------------------------------------------------------------------------------------


def test_compaction_rewrites_many_files_into_few_with_every_row_once(ray_cluster, tmp_path):
    folder = tmp_path / "metadata"
    folder.mkdir()
    for i in range(5):
        rows = [{"prompt_id": f"p{i}-{j}", "prompt": "p", "seed": j, "model": "tiny", "status": "ok"} for j in range(3)]
        pq.write_table(metadata_table(rows), folder / f"batch-{i}.parquet")
    assert compact_metadata(str(tmp_path), None, max_files=5) == 0  # few enough: left as they were
    assert compact_metadata(str(tmp_path), None, max_files=2, rows_per_group=4) == 5
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == 1 and files[0].startswith("compacted-")
    groups = pq.ParquetFile(folder / files[0]).metadata
    assert [groups.row_group(g).num_rows for g in range(groups.num_row_groups)] == [4, 4, 4, 3]
    assert sorted(pq.read_table(folder)["prompt_id"].to_pylist()) == [f"p{i}-{j}" for i in range(5) for j in range(3)]


def test_a_compaction_cut_off_by_a_crash_is_finished_or_dropped(tmp_path):
    folder = tmp_path / "metadata"
    (folder / "_compacting-aaa").mkdir(parents=True)
    rows = [{"prompt_id": "p", "prompt": "p", "seed": 1, "model": "tiny", "status": "ok"}]
    pq.write_table(metadata_table(rows), folder / "old.parquet")
    pq.write_table(metadata_table(rows), folder / "_compacting-aaa" / "new.parquet")
    (folder / "_compacting-aaa" / MANIFEST).write_text(json.dumps(["old.parquet"]))  # written: finish it
    (folder / "_compacting-bbb").mkdir()
    pq.write_table(metadata_table(rows), folder / "_compacting-bbb" / "half.parquet")  # no manifest: drop it
    finish_compactions(str(tmp_path), None)
    assert sorted(p.name for p in folder.iterdir()) == ["compacted-aaa-new.parquet"]
