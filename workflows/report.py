"""Write one self-contained HTML page on a run: where SparseVAR left work out, and where the run's time went.

    python -m workflows.report OUTPUT [--gallery N]          # writes OUTPUT/report/index.html
    python -m workflows.report --compare A B [--out FILE]    # two runs of the same prompts side by side

OUTPUT is the job's output (a folder or s3:// URI). The page holds the run's record (run.json, the runs/ records),
the τ distribution, τ and throughput over time, latency and kept ratio per stage, a gallery of a sample of the
images with their per-stage keep masks drawn over them (saved when the job ran with `output.save_masks: true`),
and the failed rows with their errors. Charts are matplotlib SVG, images are inlined: the page opens with no
network. The job writes it at the end of every run (`output.report`). --compare matches the two outputs' images
by prompt id and seed, and gives each pair's PSNR and, for the demo model, the yardstick.
"""

import argparse
import base64
import html
import io
import json
import statistics
import sys
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image
from pyarrow import fs

from sparsevar.calibration import psnr_db
from storage.metadata import read_metadata
from storage.shards import read_stored_images
from storage.uris import join, resolve, write_bytes
from workflows import report_charts as charts
from workflows.report_page import SCRIPT, STYLE

REPORT_DIR, REPORT_FILE = "report", "index.html"
COLUMNS = ["prompt_id", "prompt", "seed", "model", "image_uri", "tau", "latency_ms", "stages", "status", "error",
           "written_at", "keep_masks"]
FAILED_SHOWN = 200
COMPARED = 500  # image pairs read for a comparison's PSNR and yardstick, spread over the matched ones
THUMB_PX, LARGE_PX = 256, 1024


def read_json(uri: str, endpoint_url: str | None) -> dict[str, Any] | None:
    """A JSON file of the output, or None where there is none (a run that never finished)."""
    filesystem, path = resolve(uri, endpoint_url)
    try:
        with filesystem.open_input_stream(path) as stream:
            return json.loads(stream.read())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run_records(output: str, endpoint_url: str | None) -> list[dict[str, Any]]:
    """Each invocation's record under {output}/runs/, oldest first (none for outputs written before them)."""
    filesystem, root = resolve(output, endpoint_url)
    infos = filesystem.get_file_info(fs.FileSelector(join(root, "runs"), allow_not_found=True))
    paths = sorted(i.path for i in infos if i.type == fs.FileType.File and i.base_name.endswith(".json"))
    records = []
    for path in paths:
        with filesystem.open_input_stream(path) as stream:
            records.append(json.loads(stream.read()))
    return sorted(records, key=lambda r: str(r.get("started", "")))


def evenly(rows: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """`count` rows spread over the whole list (its first and last included), in order."""
    if len(rows) <= count:
        return rows
    return [rows[round(i * (len(rows) - 1) / max(count - 1, 1))] for i in range(count)]


def data_uri(image: Image.Image, px: int) -> str:
    """The image at most `px` wide or high, inlined: PNG when small (exact pixels), else JPEG."""
    image = image.convert("RGB")
    if max(image.size) > px:
        image = image.copy()
        image.thumbnail((px, px), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small = max(image.size) <= THUMB_PX
    image.save(buffer, format="PNG" if small else "JPEG", quality=88)
    return f"data:image/{'png' if small else 'jpeg'};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def masks_of(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The row's saved keep masks, one per stage that left tokens out, with the metadata's kept count."""
    stages = {s["stage"]: s for s in row["stages"] or []}
    return [{"stage": stage, "h": stages[stage]["height"], "w": stages[stage]["width"],
             "kept": stages[stage]["kept"], "bits": base64.b64encode(bits).decode()}
            for stage, bits in enumerate(row.get("keep_masks") or [], start=1) if bits is not None]


def gallery(rows: list[dict[str, Any]], endpoint_url: str | None) -> tuple[str, list[dict[str, Any]]]:
    """The gallery's figures and the masks their script draws."""
    stored = read_stored_images([r["image_uri"] for r in rows], endpoint_url)
    figures, items = [], []
    for row in rows:
        image = Image.open(io.BytesIO(stored[row["image_uri"]]))
        masks = masks_of(row)
        chips = "".join(f'<span class="chip" data-stage="{m["stage"]}" title="{m["kept"]} of {m["h"] * m["w"]} '
                        f'tokens ran">{m["stage"]} · {100 * m["kept"] / (m["h"] * m["w"]):.0f}%</span>'
                        for m in masks)
        chips = (f'<div class="chips"><span class="chip" data-stage="none">none</span>{chips}</div>' if masks
                 else '<div class="chips muted">no masks saved (output.save_masks)</div>')
        tau = "dense" if row["tau"] is None else f"τ={row['tau']:.3f}"
        kept = json.dumps({str(m["stage"]): m["kept"] for m in masks})
        figures.append(
            f'<figure class="item" data-prompt-id="{html.escape(row["prompt_id"])}" data-stage-kept=\'{kept}\'>'
            f'<div class="frame"><img src="{data_uri(image, THUMB_PX)}" data-large="{data_uri(image, LARGE_PX)}" '
            f'alt=""><canvas></canvas></div>{chips}<figcaption class="caption">{html.escape(row["prompt"])} '
            f'<span class="muted">(seed {row["seed"]}, {tau})</span></figcaption></figure>')
        items.append({"masks": masks})
    return "".join(figures), items


def table_html(pairs: list[tuple[str, Any]]) -> str:
    def text(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(text(v))}</td></tr>"
                               for k, v in pairs) + "</table>"


def run_section(record: dict[str, Any] | None, runs: list[dict[str, Any]], table: pa.Table) -> str:
    """What was asked and what came out: run.json's fields, the metadata's counts, every recorded invocation."""
    ok = table.filter(pc.equal(table["status"], "ok"))
    written = [t for t in ok["written_at"].to_pylist() if t is not None]
    span = (max(written) - min(written)).total_seconds() if len(written) > 1 else 0.0
    facts = [("rows", table.num_rows), ("images", ok.num_rows), ("failed", table.num_rows - ok.num_rows),
             ("models", ", ".join(sorted(set(table["model"].to_pylist())))),
             ("images/s, first to last image written", f"{(len(written) - 1) / span:.2f}" if span else "n/a")]
    if record is None:
        return table_html(facts) + '<p class="muted">no run.json: the run did not finish, or is still running.</p>'
    config = record.get("config", {})
    shown = ["run_id", "status", "started", "finished", "seconds", "images", "failed", "images_per_sec", "prompts",
             "output"]
    pairs = [(k, record[k]) for k in shown if k in record]
    pairs += [("model", json.dumps(config.get("model", {}).get("backend"))),
              ("sparsevar", json.dumps(config.get("sparsevar", {}))),
              ("versions", ", ".join(f"{k} {v}" for k, v in record.get("versions", {}).items()))]
    invocations = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(r.get(k, '')))}</td>" for k in ("run_id", "status", "started",
                                                                                  "finished", "images", "failed"))
        + "</tr>" for r in runs)
    invocations = (f"<h3>Invocations</h3><table><tr><th>run</th><th>status</th><th>started</th><th>finished</th>"
                   f"<th>images</th><th>failed</th></tr>{invocations}</table>" if runs else "")
    return (f"<div class=charts><div>{table_html(pairs)}</div><div>{table_html(facts)}</div></div>{invocations}"
            f"<details><summary>config</summary><pre>{html.escape(json.dumps(config, indent=1))}</pre></details>")


def charts_section(ok: pa.Table) -> str:
    if ok.num_rows == 0:
        return "<p>No images.</p>"
    taus, stages_rows = ok["tau"].to_pylist(), ok["stages"].to_pylist()
    latency: dict[int, list[float]] = {}
    kept: dict[int, list[float]] = {}
    for stages in stages_rows:
        for s in stages or []:
            latency.setdefault(s["stage"], []).append(s["latency_ms"])
            kept.setdefault(s["stage"], []).append(s["kept"] / s["tokens"])
    order = sorted(latency)
    svgs = [("τ of the images", charts.tau_histogram(taus))]
    written = [(t, tau) for t, tau in zip(ok["written_at"].to_pylist(), taus, strict=True) if t is not None]
    if len(written) > 1:
        svgs.append(("τ and throughput over time", charts.tau_over_time(*map(list, zip(*written, strict=True)))))
    if order:
        svgs.append(("Stage latency (ms, of the batch that made the image)",
                     charts.per_stage(order, [latency[s] for s in order], "ms")))
        svgs.append(("Kept ratio per stage (tokens that ran)",
                     charts.per_stage(order, [kept[s] for s in order], "kept / tokens")))
    return "<div class=charts>" + "".join(f'<div class="chart"><h3>{html.escape(title)}</h3>{svg}</div>'
                                          for title, svg in svgs) + "</div>"


def failures_section(table: pa.Table) -> str:
    failed = table.filter(pc.equal(table["status"], "error")).select(["prompt_id", "seed", "prompt", "error"])
    if failed.num_rows == 0:
        return "<p>None.</p>"
    rows = failed.slice(0, FAILED_SHOWN).to_pylist()
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[k]))}</td>" for k in ("prompt_id", "seed", "prompt",
                                                                                   "error")) + "</tr>" for r in rows)
    more = (f'<p class="muted">{failed.num_rows - FAILED_SHOWN} more: read them with '
            f"storage.metadata.read_metadata(OUTPUT) filtered on status == \"error\".</p>"
            if failed.num_rows > FAILED_SHOWN else "")
    return f"<table><tr><th>id</th><th>seed</th><th>prompt</th><th>error</th></tr>{body}</table>{more}"


def page(title: str, body: str, items: list[dict[str, Any]]) -> str:
    data = json.dumps(items).replace("</", "<\\/")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{body}"
            '<div id="lightbox"><div class="frame"><img alt=""><canvas></canvas></div><p class="caption"></p></div>'
            f'<script type="application/json" id="gallery-data">{data}</script><script>{SCRIPT}</script>'
            "</body></html>")


def build_report(output: str, endpoint_url: str | None = None, gallery_size: int = 24) -> str:
    """The report page of `output`, as HTML."""
    table = read_metadata(output, endpoint_url, COLUMNS)
    record = read_json(join(output, "run.json"), endpoint_url)
    if table.num_rows == 0 and record is None:
        raise ValueError(f"{output} holds no job output (no metadata/ and no run.json): give the folder or URI that "
                         "the job wrote to (its --output)")
    ok = table.filter(pc.equal(table["status"], "ok"))
    sample = evenly(ok.sort_by([("written_at", "ascending"), ("prompt_id", "ascending")]).to_pylist(), gallery_size)
    figures, items = gallery(sample, endpoint_url)
    body = (f"<h1>Run report</h1><p class='muted'>{html.escape(output)} · made "
            f"{datetime.now(UTC).isoformat(timespec='seconds')}</p>"
            f"<h2>Run</h2>{run_section(record, run_records(output, endpoint_url), table)}"
            f"<h2>Where the time went</h2>{charts_section(ok)}"
            f"<h2>Gallery: {len(sample)} of {ok.num_rows} images</h2><p class='muted'>Shaded tokens were left out of "
            "the transformer at the chosen stage (they took their anchor's prediction); click a stage to show it, "
            f"an image to enlarge it.</p><div class='gallery'>{figures}</div>"
            f"<h2>Failed rows</h2>{failures_section(table)}")
    return page(f"sparsevar report: {output}", body, items)


def write_report(output: str, endpoint_url: str | None = None, gallery_size: int = 24) -> str:
    """Write `{output}/report/index.html`; returns its URI."""
    return write_bytes(join(output, REPORT_DIR, REPORT_FILE), build_report(output, endpoint_url, gallery_size)
                       .encode(), endpoint_url)


def yardstick_scores(record: dict[str, Any] | None, images: list[np.ndarray], prompts: list[str]) -> list[float] | None:
    """The demo yardstick's score of each image, when the run used the shipped demo model."""
    from sparsevar.demo.yardstick import demo_yardstick, pixels

    model = (record or {}).get("config", {}).get("model", {})
    yardstick = demo_yardstick(model.get("backend"), model.get("weights"))
    return None if yardstick is None else yardstick.score(pixels(np.stack(images)), prompts).tolist()


def build_comparison(a: str, b: str, endpoint_url: str | None = None, gallery_size: int = 24) -> str:
    """Two outputs of the same prompts, image by image (matched on prompt id and seed), as HTML."""
    tables = [read_metadata(o, endpoint_url, COLUMNS) for o in (a, b)]
    records = [read_json(join(o, "run.json"), endpoint_url) for o in (a, b)]
    rows = [{(r["prompt_id"], r["seed"]): r for r in t.filter(pc.equal(t["status"], "ok")).to_pylist()}
            for t in tables]
    matched = sorted(rows[0].keys() & rows[1].keys())
    keys = evenly(matched, COMPARED)
    shown = evenly(keys, gallery_size)
    stored = [read_stored_images([rows[side][k]["image_uri"] for k in keys], endpoint_url) for side in (0, 1)]
    images = [[np.asarray(Image.open(io.BytesIO(stored[side][rows[side][k]["image_uri"]])).convert("RGB"))
               for k in keys] for side in (0, 1)]
    psnrs = [psnr_db([y], [x]) if x.shape == y.shape else float("nan") for x, y in zip(*images, strict=True)]
    prompts = [rows[0][k]["prompt"] for k in keys]
    scores = [yardstick_scores(records[s], images[s], prompts) if keys else None for s in (0, 1)]
    same_size = [(x, y) for x, y in zip(*images, strict=True) if x.shape == y.shape]
    summary = [("images matched (prompt id and seed)", len(matched)), ("pairs compared", len(keys)),
               ("only in A / only in B", f"{len(rows[0]) - len(matched)} / {len(rows[1]) - len(matched)}"),
               ("PSNR of B against A, dB (over all compared pairs' pixels)",
                f"{psnr_db([y for _, y in same_size], [x for x, _ in same_size]):.2f}" if same_size else "n/a"),
               ("identical pairs", sum(p == float("inf") for p in psnrs))]
    sides: list[tuple[str, list[str]]] = [("output", [a, b])]
    taus = [[rows[side][k]["tau"] for k in keys] for side in (0, 1)]
    sides.append(("τ", ["dense" if all(t is None for t in ts) else
                        f"median {statistics.median(t for t in ts if t is not None):.3f}" for ts in taus]))
    stages = [[s for k in keys for s in rows[side][k]["stages"] or []] for side in (0, 1)]
    sides.append(("tokens that ran, all stages",
                  [f"{sum(s['kept'] for s in st) / max(sum(s['tokens'] for s in st), 1):.3f}" for st in stages]))
    rates = [(r or {}).get("images_per_sec") for r in records]
    sides.append(("images/s (run.json)", ["n/a" if v is None else f"{v:.3f}" for v in rates]))
    if None not in scores:
        sides.append(("yardstick (demo model)", [f"{statistics.mean(score):.3f}" for score in scores]))
    side_table = "<table><tr><th></th><th>A</th><th>B</th></tr>" + "".join(
        f"<tr><th>{html.escape(name)}</th>" + "".join(f"<td>{html.escape(v)}</td>" for v in values) + "</tr>"
        for name, values in sides) + "</table>"
    index = {k: i for i, k in enumerate(keys)}
    pairs = "".join(
        f'<figure class="item"><div class="pair"><img src="{data_uri(Image.fromarray(images[0][index[k]]), THUMB_PX)}" '
        f'alt="A"><img src="{data_uri(Image.fromarray(images[1][index[k]]), THUMB_PX)}" alt="B"></div>'
        f'<figcaption class="caption">{html.escape(rows[0][k]["prompt"])} <span class="muted">(seed {k[1]}, PSNR '
        f'{psnrs[index[k]]:.2f} dB)</span></figcaption></figure>' for k in shown)
    body = (f"<h1>Comparison</h1><p class='muted'>A: {html.escape(a)}<br>B: {html.escape(b)}</p>"
            f"<h2>Summary</h2>{table_html(summary)}<br>{side_table}"
            f"<h2>Pairs: {len(shown)} of {len(keys)} (A left, B right)</h2>"
            f"<div class='gallery'>{pairs}</div>")
    return page(f"sparsevar comparison: {a} and {b}", body, [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", nargs="?", help="the job's output folder or s3:// URI")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two outputs of the same prompts")
    parser.add_argument("--out", help="where to write the page (default OUTPUT/report/index.html, or "
                        "A/report/compare.html)")
    parser.add_argument("--gallery", type=int, default=24, help="images (or pairs) shown (default 24)")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (else AWS_ENDPOINT_URL or AWS itself)")
    args = parser.parse_args(argv)
    if bool(args.output) == bool(args.compare):
        parser.error("give either OUTPUT or --compare A B")
    try:
        if args.compare:
            target = args.out or join(args.compare[0], REPORT_DIR, "compare.html")
            page = build_comparison(*args.compare, args.endpoint_url, args.gallery)
        else:
            target = args.out or join(args.output, REPORT_DIR, REPORT_FILE)
            page = build_report(args.output, args.endpoint_url, args.gallery)
        uri = write_bytes(target, page.encode(), args.endpoint_url)
    except (OSError, ValueError) as exc:
        print(f"error: cannot make the report: {exc}", file=sys.stderr)
        return 2
    print(uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
