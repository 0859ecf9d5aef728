"""End-to-end runs of the batch job (`workflows.generate.main`) in-process on the shared local Ray cluster.

Each job run costs seconds (mostly actor start-up), so runs are few and each one is checked thoroughly.
"""

import hashlib
import json
import math
import shutil
from datetime import datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from actors.config import RayConfig
from storage.images import IMAGEFOLDER_METADATA
from storage.metadata import METADATA_SCHEMA, read_metadata
from storage.prompts import default_id, default_seed
from workflows.config import ConfigError, load_config
from workflows.generate import EXIT_BAD_INPUT, EXIT_JOB_STOPPED, EXIT_OK, EXIT_ROWS_FAILED, check_actor_fits, main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-random.yaml"
SAMPLE = ROOT / "configs" / "prompts" / "sample.jsonl"
SAMPLE_ROWS = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]


def run_job(prompts: Path | str, output: Path, overrides=(), *extra: str) -> int:
    argv = ["--config", str(CONFIG), "--prompts", str(prompts), "--output", str(output)]
    for assignment in overrides:
        argv += ["--set", assignment]
    return main([*argv, *extra])


def rows_by_id(output: Path) -> dict[str, dict]:
    rows = read_metadata(str(output)).to_pylist()
    by_id = {row["prompt_id"]: row for row in rows}
    assert len(by_id) == len(rows), "one metadata row per prompt id"
    return by_id


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def image_files(output: Path) -> dict[str, str]:
    """File name -> sha256 of every entry in {output}/images/ but the imagefolder index (hidden temp files
    included, so leftovers show)."""
    folder = output / "images"
    return {path.name: sha256_file(path) for path in sorted(folder.iterdir()) if path.name != IMAGEFOLDER_METADATA}


def sha_by_key(output: Path) -> dict[tuple[str, int], str]:
    return {(r["prompt_id"], r["seed"]): r["image_sha256"] for r in rows_by_id(output).values()}


def assert_ok_row(row: dict, output: Path) -> None:
    """An ok row points at a real image whose bytes and size match the row."""
    assert row["status"] == "ok", row["error"]
    assert row["error"] is None
    assert row["model"] == "tiny"
    path = Path(row["image_uri"])
    assert path.parent == output / "images"
    assert path.name == f"{row['prompt_id']}-s{row['seed']}.png"
    assert row["image_sha256"] == sha256_file(path)
    assert row["image_bytes"] == path.stat().st_size
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.mode == "RGB"
        assert image.size == (row["width"], row["height"])
    assert row["latency_ms"] > 0


@pytest.fixture(scope="module")
def base_run(ray_cluster, fast_overrides, tmp_path_factory):
    """The sample prompts with the fast config (SparseVAR at the config's tau): the reference for other tests."""
    output = tmp_path_factory.mktemp("base") / "out"
    return run_job(SAMPLE, output, fast_overrides), output


def test_job_writes_one_image_and_one_metadata_row_per_prompt(base_run, fast_overrides):
    exit_code, output = base_run
    assert exit_code == EXIT_OK
    cfg = load_config(CONFIG, fast_overrides)
    start = max(cfg.sparsevar.start_stage, 2)  # the spec's first stage that may leave tokens out
    sizes = cfg.model.patch_sizes

    files = sorted((output / "metadata").glob("*.parquet"))
    assert files
    for file in files:
        assert pq.read_schema(file).equals(METADATA_SCHEMA), file

    assert image_files(output).keys() == {f"{r['id']}-s{r['seed']}.png" for r in SAMPLE_ROWS}
    rows = rows_by_id(output)
    assert rows.keys() == {r["id"] for r in SAMPLE_ROWS}
    sparse_tokens_left_out = 0
    for sample in SAMPLE_ROWS:
        row = rows[sample["id"]]
        assert (row["prompt"], row["seed"]) == (sample["prompt"], sample["seed"])
        assert_ok_row(row, output)
        assert row["tau"] == cfg.sparsevar.tau
        stages = row["stages"]
        assert [s["stage"] for s in stages] == list(range(1, len(sizes) + 1))
        for s, side in zip(stages, sizes, strict=True):
            assert (s["height"], s["width"]) == (side, side)
            assert s["tokens"] == s["height"] * s["width"]
            assert 1 <= s["kept"] <= s["tokens"]
            assert s["latency_ms"] >= 0
            if s["stage"] < start:
                assert s["kept"] == s["tokens"], s
            else:
                sparse_tokens_left_out += s["tokens"] - s["kept"]
    assert sparse_tokens_left_out > 0, "SparseVAR at the config's tau should leave some tokens out"
    record = json.loads((output / "run.json").read_text())
    started, finished = (datetime.fromisoformat(record[k]) for k in ("started", "finished"))
    assert all(started < row["written_at"] < finished for row in rows.values())
    lines = {json.loads(line)["id"]: n for n, line in enumerate(SAMPLE.read_text().splitlines(), 1) if line.strip()}
    for pid, row in rows.items():  # how each row was made
        assert (row["cfg"], row["temperature"], row["top_k"], row["top_p"]) == (
            cfg.sampling.cfg, cfg.sampling.temperature, cfg.sampling.top_k, cfg.sampling.top_p)
        sample = next(r for r in SAMPLE_ROWS if r["id"] == pid)
        assert row["negative_prompt"] == sample.get("negative_prompt")
        assert row["h_div_w"] == sample.get("h_div_w", 1.0)
        assert row["weights_fingerprint"] is None  # tiny-random: random weights, no files
        assert row["source_row"] == lines[pid]
        assert row["run_id"] == record["run_id"]


def test_rerun_of_the_same_config_gives_identical_images(base_run, ray_cluster, fast_overrides, tmp_path):
    _, base = base_run
    assert run_job(SAMPLE, tmp_path / "again", fast_overrides) == EXIT_OK
    assert image_files(tmp_path / "again") == image_files(base)
    assert sha_by_key(tmp_path / "again") == sha_by_key(base)


def test_batch_size_does_not_change_images(base_run, ray_cluster, fast_overrides, tmp_path):
    _, base = base_run
    one = tmp_path / "one"
    assert run_job(SAMPLE, one, [*fast_overrides, "ray.batch_size=1"], "--limit", "4") == EXIT_OK
    alone, batched = sha_by_key(one), sha_by_key(base)
    assert len(alone) == 4
    assert alone == {key: batched[key] for key in alone}
    base_files = image_files(base)
    assert image_files(one) == {name: base_files[name] for name in image_files(one)}


def test_finished_batches_metadata_files_are_merged_as_the_run_goes(base_run, ray_cluster, fast_overrides,
                                                                     tmp_path):
    """8 batches of one, merged every 3 as they come back: two merged files and two of a batch; every row once,
    the images those of the base run; a resume finds everything done."""
    _, base = base_run
    output = tmp_path / "merged"
    overrides = [*fast_overrides, "ray.batch_size=1", "output.merge_every=3"]
    assert run_job(SAMPLE, output, overrides) == EXIT_OK
    files = sorted(path.name for path in (output / "metadata").iterdir())
    assert len(files) == 4 and sum(name.startswith("compacted-") for name in files) == 2, files
    assert sha_by_key(output) == sha_by_key(base)  # one row an image (rows_by_id checks)
    assert image_files(output) == image_files(base)
    assert run_job(SAMPLE, output, overrides) == EXIT_OK
    assert sha_by_key(output) == sha_by_key(base)
    assert json.loads((output / "run.json").read_text())["images"] == len(SAMPLE_ROWS)


def test_tau_zero_is_bit_identical_to_dense(base_run, ray_cluster, fast_overrides, tmp_path):
    sparse_zero, dense = tmp_path / "tau0", tmp_path / "dense"
    assert run_job(SAMPLE, sparse_zero, [*fast_overrides, "sparsevar.tau=0"]) == EXIT_OK
    assert run_job(SAMPLE, dense, [*fast_overrides, "sparsevar.enabled=false"]) == EXIT_OK

    zero_rows, dense_rows = rows_by_id(sparse_zero), rows_by_id(dense)
    assert len(dense_rows) == len(SAMPLE_ROWS)
    assert sha_by_key(sparse_zero) == sha_by_key(dense)
    assert image_files(sparse_zero) == image_files(dense)
    for prompt_id, row in zero_rows.items():
        assert_ok_row(row, sparse_zero)
        assert row["tau"] == 0.0
        assert dense_rows[prompt_id]["tau"] is None
        for rows in (row, dense_rows[prompt_id]):
            assert all(s["kept"] == s["tokens"] for s in rows["stages"])
    # The comparison means something only if SparseVAR at the config's tau changes images.
    assert sha_by_key(base_run[1]) != sha_by_key(dense)


def test_tau_one_keeps_only_the_anchors(ray_cluster, fast_overrides, tmp_path):
    overrides = [*fast_overrides, "sparsevar.tau=1.0"]
    assert run_job(SAMPLE, tmp_path, overrides) == EXIT_OK
    cfg = load_config(CONFIG, overrides)
    alpha, start = cfg.sparsevar.anchor_grid, max(cfg.sparsevar.start_stage, 2)
    assert alpha >= 1
    rows = rows_by_id(tmp_path)
    assert len(rows) == len(SAMPLE_ROWS)
    for row in rows.values():
        assert_ok_row(row, tmp_path)
        assert row["tau"] == 1.0
        assert len(row["stages"]) == len(cfg.model.patch_sizes)
        for s in row["stages"]:
            anchors = math.ceil(s["height"] / alpha) * math.ceil(s["width"] / alpha)
            expected = anchors if s["stage"] >= start else s["tokens"]
            assert s["kept"] == expected, (row["prompt_id"], s)


def test_the_other_speedups_land_in_the_per_stage_metadata(ray_cluster, fast_overrides, tmp_path):
    """FastVAR pruning at stage 5 from stage 4's cache, guidance on stages 1-6, the last of 8 stages skipped."""
    overrides = [*fast_overrides, "speedups.fastvar.cache_stage=4", "speedups.fastvar.prune={5: 0.5}",
                 "speedups.guidance_stages=6", "speedups.skip_last_stages=1"]
    assert run_job(SAMPLE, tmp_path, overrides) == EXIT_OK
    depth = load_config(CONFIG, overrides).model.depth
    for row in rows_by_id(tmp_path).values():
        assert_ok_row(row, tmp_path)
        stages = row["stages"]
        assert [s["branches"] for s in stages] == [2] * 6 + [1, 0]
        assert stages[-1]["kept"] == 0 and stages[-1]["latency_ms"] == 0.0
        # stage 4 caches, stage 5 (6x6) leaves half its tokens out of every block's sub-layers
        assert [(s["pruned"], s["pruned_blocks"]) for s in stages[3:5]] == [(0, 0), (6 * 6 // 2, depth)]


def test_malformed_rows_become_error_rows_and_the_rest_is_generated(ray_cluster, fast_overrides, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "\n".join(
            [
                '{"id": "good-1", "prompt": "a red circle", "seed": 1}',
                '{"id": "broken", "prompt": "no closing quote, "seed": 2}',
                '{"id": "blank", "prompt": "   ", "seed": 3}',
                '{"id": "fractional", "prompt": "a blue square", "seed": 1.5}',
                '{"id": "good-2", "prompt": "a green triangle", "seed": 2}',
            ]
        )
        + "\n"
    )
    output = tmp_path / "out"
    assert run_job(prompts, output, fast_overrides) == EXIT_ROWS_FAILED
    stdout = capsys.readouterr().out
    assert "images written: 2" in stdout
    assert "rows failed: 3" in stdout
    for line in (2, 3, 4):  # every failed row is listed with its line in the prompt file
        assert f"  row {line} of the prompt file" in stdout

    rows = read_metadata(str(output)).to_pylist()
    assert len(rows) == 5
    ok = {r["prompt_id"]: r for r in rows if r["status"] == "ok"}
    assert ok.keys() == {"good-1", "good-2"}
    for row in ok.values():
        assert_ok_row(row, output)
    assert image_files(output).keys() == {"good-1-s1.png", "good-2-s2.png"}

    errors = [r for r in rows if r["status"] == "error"]
    assert len(errors) == 3
    for row in errors:
        assert row["error"]
        assert row["image_uri"] is None and row["image_sha256"] is None and row["stages"] is None
    by_id = {r["prompt_id"]: r for r in errors}
    assert 'empty "prompt"' in by_id["blank"]["error"]
    assert by_id["blank"]["seed"] == 3
    assert '"seed" 1.5 is not a whole number' in by_id["fractional"]["error"]
    assert by_id["fractional"]["prompt"] == "a blue square"
    # The id of an unparseable line is derived from its text, so it cannot be "broken".
    (bad_json,) = [r for r in errors if r["prompt_id"] not in ("blank", "fractional")]
    assert bad_json["error"].startswith("invalid JSON")
    assert "no closing quote" in bad_json["error"], "the message quotes the line"

    assert sorted(r["source_row"] for r in errors) == [2, 3, 4]
    before = json.loads((output / "run.json").read_text())
    assert (before["images"], before["failed"]) == (2, 3)
    assert sorted(r["source_row"] for r in before["failed_rows"]) == [2, 3, 4]

    # A rerun has nothing to do: the images and the input errors already recorded are skipped, and counted apart.
    assert run_job(prompts, output, fast_overrides) == EXIT_OK
    # it has its own record, and the dataset's summary keeps its counts
    runs = {path.stem: json.loads(path.read_text()) for path in (output / "runs").glob("*.json")}
    after = json.loads((output / "run.json").read_text())
    assert len(runs) == 2 and runs[after["run_id"]]["images"] == 0 and runs[after["run_id"]]["status"] == "ok"
    assert runs[before["run_id"]]["images"] == 2 and runs[before["run_id"]]["failed"] == 3
    assert (after["images"], after["failed"], after["images_per_sec"]) == (2, 3, before["images_per_sec"])
    assert [r["run_id"] for r in after["runs"]] == [before["run_id"], after["run_id"]]
    assert after["started"] == before["started"] and after["finished"] > before["finished"]
    stdout = capsys.readouterr().out
    assert "images written: 0" in stdout and "rows failed: 0" in stdout
    assert "already in the output (skipped): 2" in stdout
    assert "input errors recorded by an earlier run (skipped): 3" in stdout
    assert len(read_metadata(str(output))) == 5


def test_a_failed_image_is_retried_on_rerun_and_recorded_once(ray_cluster, fast_overrides, tmp_path, capsys):
    """A row that failed in generation (here: its file could not be written) is generated again by the next run,
    which replaces its error row: the metadata ends with one row per image, the input error still reported once."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "a red circle", "seed": 1}\n'
                       '{"id": "b", "prompt": "a blue square", "seed": 2}\n'
                       '{"id": "empty", "prompt": "", "seed": 3}\n')
    output = tmp_path / "out"
    (output / "images" / "b-s2.png").mkdir(parents=True)  # a folder where the image must go
    assert run_job(prompts, output, fast_overrides) == EXIT_ROWS_FAILED
    first = {r["prompt_id"]: r for r in read_metadata(str(output)).to_pylist()}
    assert first["a"]["status"] == "ok" and first["b"]["status"] == "error" and first["empty"]["status"] == "error"
    (output / "images" / "b-s2.png").rmdir()
    capsys.readouterr()
    assert run_job(prompts, output, fast_overrides) == EXIT_OK
    assert "images written: 1" in capsys.readouterr().out  # b only: a is done, the input error was reported
    rows = rows_by_id(output)  # asserts one row per prompt id
    assert rows.keys() == {"a", "b", "empty"}
    assert_ok_row(rows["b"], output)
    assert rows["a"]["image_sha256"] == first["a"]["image_sha256"] and rows["empty"]["status"] == "error"
    index = (output / "images" / IMAGEFOLDER_METADATA).read_text().splitlines()
    assert sorted(json.loads(line)["file_name"] for line in index) == ["a-s1.png", "b-s2.png"]


def test_rows_recorded_twice_from_before_the_lease_are_repaired_by_the_next_run(ray_cluster, fast_overrides,
                                                                               tmp_path, capsys):
    output = tmp_path / "out"
    assert run_job(SAMPLE, output, fast_overrides, "--limit", "3") == EXIT_OK
    (original,) = (output / "metadata").glob("*.parquet")
    shutil.copy(original, output / "metadata" / "other-job.parquet")  # as two jobs on one output left it
    capsys.readouterr()
    assert run_job(SAMPLE, output, fast_overrides, "--limit", "3") == EXIT_OK
    out = capsys.readouterr().out
    assert "images written: 0" in out and "images recorded more than once, surplus rows taken out: 3" in out
    assert len(rows_by_id(output)) == 3  # asserts one row per prompt id


def test_a_damaged_image_is_generated_again_by_its_size_or_with_verify_its_sha256(ray_cluster, fast_overrides,
                                                                                  tmp_path, capsys):
    output = tmp_path / "out"
    assert run_job(SAMPLE, output, fast_overrides, "--limit", "3") == EXIT_OK
    first = image_files(output)
    names = sorted(first)
    truncated, flipped = output / "images" / names[0], output / "images" / names[1]
    truncated.write_bytes(truncated.read_bytes()[:100])  # cut short on disk
    data = bytearray(flipped.read_bytes())
    data[-20] ^= 0xFF  # same size, other bytes: only --verify reads it
    flipped.write_bytes(bytes(data))
    capsys.readouterr()

    assert run_job(SAMPLE, output, fast_overrides, "--limit", "3") == EXIT_OK
    assert "images written: 1" in capsys.readouterr().out
    assert sha256_file(truncated) == first[names[0]] and sha256_file(flipped) != first[names[1]]
    assert run_job(SAMPLE, output, fast_overrides, "--limit", "3", "--verify") == EXIT_OK
    assert "images written: 1" in capsys.readouterr().out
    assert image_files(output) == first
    rows = rows_by_id(output)  # one row per image, every one whole
    assert len(rows) == 3
    for row in rows.values():
        assert_ok_row(row, output)


@pytest.mark.parametrize(
    ("argv_tail", "named"),
    [
        (["--prompts", str(SAMPLE), "--set", "sparsevar.taux=1"], "sparsevar.taux: unknown key"),
        (["--prompts", str(SAMPLE), "--set", "output.format=tar"], "output.format: Input should be 'files' or"),
        (["--prompts", "{tmp}/missing.jsonl"], "prompts file not found: {tmp}/missing.jsonl"),
        (["--prompts", "{tmp}/empty.jsonl"], "prompts file {tmp}/empty.jsonl is empty: add one prompt per line"),
        (["--prompts", "ftp://host/p.jsonl"], "cannot open prompts ftp://host/p.jsonl: unsupported location"),
        (["--prompts", str(SAMPLE), "--output", "ftp://host/out"], "unsupported location 'ftp://host/out': use a"),
        (["--prompts", str(SAMPLE), "--output", " "], "--output is empty: name the output folder or URI"),
        (["--prompts", str(SAMPLE), "--verify", "--set", "output.format=webdataset"],
         "--verify checks images of the files layout"),
        (["--prompts", str(SAMPLE), "--set", "sparsevar.score_block=99"],
         "sparsevar.score_block=99 is past the model's last block (model.depth=6); pick one from 1 to 6"),
    ],
    ids=[
        "unknown-config-key",
        "bad-output-format",
        "missing-prompts-file",
        "empty-prompts-file",
        "bad-prompts-uri",
        "bad-output-uri",
        "empty-output",
        "verify-webdataset",
        "score-block-past-depth",
    ],
)
def test_bad_input_exits_2_before_any_work(ray_cluster, tmp_path, capsys, argv_tail, named):
    output = tmp_path / "out"
    (tmp_path / "empty.jsonl").write_text("")
    argv_tail = [arg.replace("{tmp}", str(tmp_path)) for arg in argv_tail]
    assert main(["--config", str(CONFIG), "--output", str(output), *argv_tail]) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert named.replace("{tmp}", str(tmp_path)) in captured.err
    assert captured.err.startswith("error: ")
    assert "images written" not in captured.out
    assert not output.exists()


def test_an_actor_that_cannot_start_stops_the_job_with_its_reason(ray_cluster, fast_overrides, tmp_path, capsys):
    output = tmp_path / "out"
    missing = tmp_path / "none.safetensors"
    code = run_job(SAMPLE, output, [*fast_overrides, f"model.weights={missing}"], "--limit", "2")
    assert code == EXIT_JOB_STOPPED
    reason = f"tiny model weights not found: {missing}; fix model.weights or remove it"
    assert f"error: the job stopped: FileNotFoundError: {reason}" in capsys.readouterr().err
    record = json.loads((output / "run.json").read_text())
    assert record["status"] == "failed" and reason in record["error"]


def test_an_actor_no_node_can_hold_is_refused_on_a_cluster_started_here(ray_cluster):
    check_actor_fits(RayConfig(num_cpus_per_actor=2), local=True)  # the test cluster's node has 2 CPUs
    with pytest.raises(ConfigError, match=r"asks for 1 CPU and 1 GPU .* \(nodes: 2 CPU and 0 GPU\); lower them"):
        check_actor_fits(RayConfig(num_gpus_per_actor=1), local=True)
    check_actor_fits(RayConfig(num_gpus_per_actor=1), local=False)  # a joined cluster may add a GPU node


def test_csv_prompts_give_the_same_images_as_jsonl(base_run, ray_cluster, fast_overrides, tmp_path):
    _, base = base_run
    first, second = SAMPLE_ROWS[0], SAMPLE_ROWS[1]
    prompts = tmp_path / "prompts.csv"
    prompts.write_text(
        "id,prompt,seed,notes\n"
        f"{first['id']},{first['prompt']},{first['seed']},extra columns are ignored\n"
        f'{second["id"]},"{second["prompt"]}",{second["seed"]},\n'
        'no-seed,"a cat, a dog",,\n'
    )
    output = tmp_path / "out"
    assert run_job(prompts, output, fast_overrides) == EXIT_OK
    rows = rows_by_id(output)
    assert rows.keys() == {first["id"], second["id"], "no-seed"}
    for row in rows.values():
        assert_ok_row(row, output)
    assert rows["no-seed"]["prompt"] == "a cat, a dog"
    assert rows["no-seed"]["seed"] == default_seed("no-seed")
    base_sha = sha_by_key(base)
    for sample in (first, second):
        assert rows[sample["id"]]["image_sha256"] == base_sha[(sample["id"], sample["seed"])]


def test_text_prompts_with_limit(ray_cluster, fast_overrides, tmp_path):
    prompts = tmp_path / "prompts.txt"
    lines = ["a red circle", "a green striped square", "two yellow triangles"]
    prompts.write_text("\n" + "\n\n".join(lines) + "\n")
    output = tmp_path / "out"
    assert run_job(prompts, output, fast_overrides, "--limit", "2") == EXIT_OK
    rows = rows_by_id(output)
    assert len(rows) == 2
    assert len(image_files(output)) == 2
    for prompt_id, row in rows.items():
        assert row["prompt"] in lines
        assert prompt_id == default_id(row["prompt"])
        assert row["seed"] == default_seed(prompt_id)
        assert_ok_row(row, output)


@pytest.mark.parametrize(
    ("argv_tail", "named"),
    [
        (["--prompts", "{tmp}/no-prompt-column.csv"], "has no 'prompt' column (columns: ['id', 'text']); rename"),
        (["--prompts", str(SAMPLE), "--set", "output.format=webdataset"], "already holds the files layout"),
    ],
    ids=["csv-without-prompt-column", "other-output-format"],
)
def test_rejected_rerun_leaves_the_output_as_it_was(base_run, fast_overrides, tmp_path, capsys, argv_tail, named):
    """Input problems found only once the prompts are read still come before the first write to the output."""
    _, output = base_run
    (tmp_path / "no-prompt-column.csv").write_text("id,text\na,a cat\n")
    before = {path: path.read_bytes() for path in output.rglob("*") if path.is_file()}
    argv_tail = [arg.replace("{tmp}", str(tmp_path)) for arg in argv_tail]
    assert run_job(argv_tail[1], output, fast_overrides, *argv_tail[2:]) == EXIT_BAD_INPUT
    assert named in capsys.readouterr().err
    assert {path: path.read_bytes() for path in output.rglob("*") if path.is_file()} == before


def test_the_pool_is_no_larger_than_the_work_and_says_so(ray_cluster, fast_overrides, tmp_path, capsys, recwarn):
    overrides = [*fast_overrides, "ray.num_actors=2", "ray.batch_size=4"]
    assert run_job(SAMPLE, tmp_path, overrides, "--limit", "4") == EXIT_OK
    out = capsys.readouterr().out
    assert out.count("1 block(s) of work: starting 1 actor(s) of the 2 that ray.num_actors allows") == 1
    assert "images written: 4" in out
    assert not [w for w in recwarn if "only received" in str(w.message)], "Ray's warning of an actor without input"
