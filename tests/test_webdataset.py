"""`output.format: webdataset`: tar shards of .png + .json + .txt samples, exactly once across resumes, and the
`files` layout's Hugging Face imagefolder index. Jobs run in-process on the shared local Ray cluster."""

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.shards import shard_name
from workflows.generate import EXIT_ROWS_FAILED, main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-random.yaml"
SHARD_SIZE = 3
PROMPTS = [
    {"id": "p0", "prompt": "a red circle", "seed": 0},
    {"id": "v1.0", "prompt": "a green striped square", "seed": 1},  # a dot: not allowed in a WebDataset key
    {"id": "a/b", "prompt": "two yellow triangles", "seed": 2},  # a slash
    {"id": "p0", "prompt": "a red circle, again", "seed": 0},  # duplicate (id, seed): an error row in shard 1
    {"id": "long", "prompt": "x" * 5000, "seed": 4},  # oversized prompt: an error row
    {"id": "p5", "prompt": "a blue square", "seed": 5},
    {"id": "p6", "prompt": "a purple checkered circle", "seed": 6},
]
OK_IDS = ["p0", "v1.0", "a/b", "p5", "p6"]
SHARDS = [shard_name(i) for i in range(3)]  # 3 + 3 + 1 rows


def run_job(prompts: Path | str, output: Path | str, overrides) -> int:
    argv = ["--config", str(CONFIG), "--prompts", str(prompts), "--output", str(output)]
    return main([*argv, *[arg for o in overrides for arg in ("--set", o)]])


def webdataset(fast_overrides) -> list[str]:
    """Shards of SHARD_SIZE made in batches of 2, so a shard takes more than one batch."""
    return [*fast_overrides, "output.format=webdataset", f"output.shard_size={SHARD_SIZE}", "ray.batch_size=2"]


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def shard_bytes(output: Path) -> dict[str, bytes]:
    """Every entry of {output}/shards (temp files included, so leftovers show)."""
    return {p.name: p.read_bytes() for p in sorted((output / "shards").iterdir())}


def rows(output: Path) -> list[dict]:
    return pq.read_table(output / "metadata").to_pylist()


def row_view(row: dict) -> tuple:
    """A metadata row without its output location, to compare two outputs."""
    shard = row["shard"] and Path(row["shard"]).name
    return row["prompt_id"], row["seed"], row["status"], row["error"], shard, row["sample_key"], row["image_sha256"]


@pytest.fixture(scope="module")
def jobs(ray_cluster, fast_overrides, tmp_path_factory) -> tuple[Path, Path]:
    """The same prompts written as files and as webdataset shards of SHARD_SIZE."""
    tmp = tmp_path_factory.mktemp("webdataset")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    files, shards = tmp / "files", tmp / "shards"
    assert run_job(prompts, files, fast_overrides) == EXIT_ROWS_FAILED  # the two malformed rows
    assert run_job(prompts, shards, webdataset(fast_overrides)) == EXIT_ROWS_FAILED
    return files, shards


def test_shards_hold_the_files_jobs_images_under_dotless_keys(jobs):
    files, output = jobs
    assert list(shard_bytes(output)) == SHARDS
    assert not (output / "images").exists()
    table = rows(output)
    assert len(table) == len(PROMPTS)
    ok = {(r["prompt_id"], r["seed"]): r for r in table if r["status"] == "ok"}
    assert sorted(pid for pid, _ in ok) == sorted(OK_IDS), "every image exactly once"
    files_ok = {(r["prompt_id"], r["seed"]): r for r in rows(files) if r["status"] == "ok"}
    samples = {}
    for name in SHARDS:
        members = tar_members(output / "shards" / name)
        keys = [member.split(".")[0] for member, _ in members]
        assert all(member.count(".") == 1 for member, _ in members), "the key holds no dot"
        assert [member.split(".")[1] for member, _ in members] == ["png", "json", "txt"] * (len(members) // 3)
        assert keys[::3] == keys[1::3] == keys[2::3], "each sample's files lie together"
        for i in range(0, len(members), 3):
            samples[(name, keys[i])] = {member.split(".")[1]: data for member, data in members[i : i + 3]}
    assert len(samples) == len(OK_IDS)
    for key, row in ok.items():
        shard = Path(row["shard"])
        assert shard == output / "shards" / shard.name
        assert row["image_uri"] == f"{row['shard']}#{row['sample_key']}.png"
        sample = samples[(shard.name, row["sample_key"])]
        assert hashlib.sha256(sample["png"]).hexdigest() == row["image_sha256"]
        assert sample["png"] == Path(files_ok[key]["image_uri"]).read_bytes(), "same image as the files layout"
        record = json.loads(sample["json"])
        assert (record["prompt_id"], record["prompt"], record["seed"]) == (row["prompt_id"], row["prompt"], row["seed"])
        assert record["image_sha256"] == row["image_sha256"] and record["key"] == row["sample_key"]
        assert sample["txt"].decode() == row["prompt"]
    assert ok[("v1.0", 1)]["sample_key"].startswith("v1_0-") and ok[("p0", 0)]["sample_key"] == "p0-s0"
    # the input errors are recorded in their shard, with the files layout's messages
    errors = {(r["prompt_id"], Path(r["shard"]).name, r["error"]) for r in table if r["status"] == "error"}
    files_errors = {(r["prompt_id"], SHARDS[1], r["error"]) for r in rows(files) if r["status"] == "error"}
    assert errors == files_errors and len(errors) == 2
    assert any("duplicate id 'p0' with seed 0" in e for _, _, e in errors)
    assert any("5000 characters, more than 4096" in e for _, _, e in errors)


def test_files_layout_has_an_imagefolder_index(jobs):
    files, _ = jobs
    lines = (files / "images" / "metadata.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    ok = {Path(r["image_uri"]).name: r for r in rows(files) if r["status"] == "ok"}
    # the Hugging Face imagefolder convention: one object a line, `file_name` relative to the file, same keys in all
    assert sorted(r["file_name"] for r in records) == sorted(ok) and len(records) == len(OK_IDS)
    assert all(r.keys() == records[0].keys() for r in records)
    for record in records:
        assert (files / "images" / record["file_name"]).is_file()
        assert record["prompt"] == ok[record["file_name"]]["prompt"]
        assert record["image_sha256"] == ok[record["file_name"]]["image_sha256"]
    datasets = pytest.importorskip("datasets")
    dataset = datasets.load_dataset("imagefolder", data_dir=str(files / "images"), split="train")
    assert dataset.num_rows == len(OK_IDS) and {"image", "prompt", "seed"} <= set(dataset.column_names)


def test_resume_redoes_only_incomplete_shards_and_records_each_sample_once(jobs, fast_overrides, tmp_path, capsys):
    _, original = jobs
    output = tmp_path / "out"
    shutil.copytree(original, output)
    before = shard_bytes(output)
    untouched = (output / "shards" / SHARDS[0]).stat().st_mtime_ns
    # shard 1's tar is lost; shard 2's tar was published but the driver died before its rows were written
    (output / "shards" / SHARDS[1]).unlink()
    for path in (output / "metadata").glob("*.parquet"):
        table = pq.read_table(path)
        keep = pa.array([not (s or "").endswith(SHARDS[2]) for s in table["shard"].to_pylist()])
        pq.write_table(table.filter(keep), path)
    (output / "shards" / f".{SHARDS[2]}.killed-writer.tmp").write_bytes(b"half a tar")
    assert len(rows(output)) == len(PROMPTS) - 1
    capsys.readouterr()

    prompts = original.parent / "prompts.jsonl"
    overrides = webdataset(fast_overrides)
    assert run_job(prompts, output, overrides) == EXIT_ROWS_FAILED  # shard 1's error rows, reported again
    out = capsys.readouterr().out
    assert "images written: 2" in out and "rows failed: 2" in out and "skipped): 3" in out
    assert shard_bytes(output) == before, "the same shards, byte for byte, and no temp file"
    assert (output / "shards" / SHARDS[0]).stat().st_mtime_ns == untouched, "a complete shard is not rewritten"
    assert sorted(map(row_view, rows(output)), key=str) == sorted(map(row_view, rows(original)), key=str)

    # a finished output: nothing to do, nothing recorded twice
    assert run_job(prompts, output, overrides) == 0
    assert "images written: 0" in capsys.readouterr().out
    assert len(rows(output)) == len(PROMPTS) and shard_bytes(output) == before


def test_resume_with_another_shard_size_is_refused_before_any_write(jobs, fast_overrides, tmp_path, capsys):
    _, original = jobs
    output = tmp_path / "out"
    shutil.copytree(original, output)
    before = {p: p.read_bytes() for p in output.rglob("*") if p.is_file()}
    prompts = original.parent / "prompts.jsonl"
    assert run_job(prompts, output, [*fast_overrides, "output.format=webdataset", "output.shard_size=2"]) == 2
    assert "output.shard_size" in capsys.readouterr().err
    assert run_job(prompts, output, fast_overrides) == 2  # the files layout on a webdataset output
    assert "already holds the webdataset layout" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in output.rglob("*") if p.is_file()} == before
