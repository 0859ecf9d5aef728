"""The run report (`workflows.report`): keep masks saved in the metadata, and the page the job writes, opened in
headless Chromium (Debian's `chromium`, which .ci/run installs) and checked as a person would look at it."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.metadata import read_metadata
from workflows import report
from workflows.generate import EXIT_ROWS_FAILED, main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-random.yaml"
SAMPLE = ROOT / "configs" / "prompts" / "sample.jsonl"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def run_job(prompts: Path, output: Path, overrides) -> int:
    argv = ["--config", str(CONFIG), "--prompts", str(prompts), "--output", str(output)]
    for assignment in overrides:
        argv += ["--set", assignment]
    return main(argv)


@pytest.fixture(scope="module")
def runs(ray_cluster, fast_overrides, tmp_path_factory) -> dict[str, Path]:
    """The sample prompts and one malformed row, sparse with masks saved and dense."""
    tmp = tmp_path_factory.mktemp("report")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text(SAMPLE.read_text() + '{"prompt": ""}\n')
    outputs = {"sparse": tmp / "sparse", "dense": tmp / "dense"}
    assert run_job(prompts, outputs["sparse"], [*fast_overrides, "output.save_masks=true"]) == EXIT_ROWS_FAILED
    assert run_job(prompts, outputs["dense"], [*fast_overrides, "sparsevar.enabled=false"]) == EXIT_ROWS_FAILED
    return outputs


def test_saved_masks_hold_the_kept_tokens_of_every_sparse_stage(runs):
    rows = [r for r in read_metadata(str(runs["sparse"])).to_pylist() if r["status"] == "ok"]
    assert len(rows) == 8
    for row in rows:
        assert len(row["keep_masks"]) == len(row["stages"])
        for stage, mask in zip(row["stages"], row["keep_masks"], strict=True):
            if mask is None:  # every token ran: only stages before sparsevar.start_stage (6) here
                assert stage["kept"] == stage["tokens"] and stage["stage"] < 6
                continue
            bits = np.unpackbits(np.frombuffer(mask, np.uint8))
            assert len(mask) == -(-stage["tokens"] // 8)
            assert int(bits[:stage["tokens"]].sum()) == stage["kept"] < stage["tokens"]
            assert not bits[stage["tokens"]:].any()
    dense = read_metadata(str(runs["dense"]), columns=["keep_masks"])
    assert dense["keep_masks"].null_count == dense.num_rows  # not saved unless asked for


def test_files_without_the_masks_column_still_read(tmp_path):
    folder = tmp_path / "metadata"
    folder.mkdir()
    pq.write_table(pa.table({"prompt_id": ["a"], "prompt": ["p"], "seed": [1], "model": ["m"], "status": ["ok"]}),
                   folder / "old.parquet")
    assert read_metadata(str(tmp_path))["keep_masks"].to_pylist() == [None]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run does)")
def test_the_report_shows_the_run_its_masks_charts_and_failures_with_no_network(runs):
    from playwright.sync_api import sync_playwright

    page_file = runs["sparse"] / "report" / "index.html"
    assert page_file.is_file(), "the job writes its report at the end"
    rows = {r["prompt_id"]: r for r in read_metadata(str(runs["sparse"])).to_pylist()}
    requests, errors = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("request", lambda r: requests.append(r.url))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(page_file.as_uri())
        page.wait_for_selector("body[data-ready='1']", timeout=10_000)
        items = page.eval_on_selector_all(".item", "els => els.map(e => [e.dataset.promptId, e.dataset.stageKept, "
                                          "e.dataset.drawnKept, e.querySelector('img').naturalWidth])")
        chart_sizes = page.eval_on_selector_all(".chart svg", "els => els.map(e => e.getBoundingClientRect().width)")
        failed = page.inner_text("h2:has-text('Failed rows') + table")
        figure = page.locator(".item").first
        figure.locator(".chip[data-stage='none']").click()
        hidden = figure.get_attribute("data-shown")
        figure.locator(".chip[data-stage='7']").click()
        shown = figure.get_attribute("data-shown")
        figure.locator(".frame").click()
        lightbox = page.locator("#lightbox").get_attribute("class")
        caption = page.inner_text("#lightbox .caption")
        browser.close()
    assert errors == []
    assert requests == [page_file.as_uri()], "the page fetches nothing: every image and chart is inlined"
    assert sorted(i[0] for i in items) == sorted(k for k, r in rows.items() if r["status"] == "ok")
    for prompt_id, stage_kept, drawn_kept, width in items:
        expected = {str(s["stage"]): s["kept"] for s in rows[prompt_id]["stages"] if s["stage"] >= 6}
        assert json.loads(stage_kept) == expected and json.loads(drawn_kept) == expected
        assert width == 32  # the image itself, decoded by the browser
    assert len(chart_sizes) == 4 and min(chart_sizes) > 100
    bad = next(r for r in rows.values() if r["status"] == "error")
    assert bad["prompt_id"] in failed and "empty" in failed.lower()
    assert (hidden, shown) == ("null", "7") and lightbox == "open" and "stage 7:" in caption


def test_compare_gives_psnr_and_pairs_and_finds_identical_runs(runs, tmp_path, capsys):
    same = tmp_path / "same.html"
    assert report.main(["--compare", str(runs["dense"]), str(runs["dense"]), "--out", str(same)]) == 0
    assert "<th>identical pairs</th><td>8</td>" in same.read_text()
    assert report.main(["--compare", str(runs["dense"]), str(runs["sparse"]), "--gallery", "3"]) == 0
    page = (runs["dense"] / "report" / "compare.html").read_text()
    assert capsys.readouterr().out.strip().endswith("compare.html")
    assert "<th>identical pairs</th><td>0</td>" in page and page.count('class="pair"') == 3
    psnr = float(page.split("compared pairs&#x27; pixels)</th><td>")[1].split("<")[0])
    assert 5 < psnr < 60


def test_report_of_a_folder_that_is_no_output_is_a_clear_error(tmp_path, capsys):
    assert report.main([str(tmp_path / "nothing")]) == 2
    assert "holds no job output" in capsys.readouterr().err and not (tmp_path / "nothing").exists()
    with pytest.raises(SystemExit):
        report.main(["--compare", str(tmp_path)])
