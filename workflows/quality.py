"""The paper's tables in shape, on the trained demo model: yardstick, PSNR against dense and latency for
dense, a τ grid, random exclusion at equal kept ratios, and the α, P and s ablations.

    python -m workflows.quality --config configs/tiny.yaml --out out/quality

Prompts are the captions of held-out procedural scenes (seeds no training batch drew). Runs in this process
without Ray; writes {out}/quality.json and {out}/quality.md. Exit status: 0, or 2 for a config error.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

from sparsevar.backend import Backend
from sparsevar.backends import build_backend
from sparsevar.calibration import psnr_db
from sparsevar.config import SparseVARConfig, SpeedupConfig
from sparsevar.demo.scenes import held_out
from sparsevar.demo.yardstick import ATTRIBUTES, Yardstick, accuracy, described, load_yardstick, parse, pixels
from sparsevar.generate import NO_SPEEDUPS, ImageResult, Request, first_sparse_stage, generate
from sparsevar.speedups import compared
from workflows.config import ConfigError, load_config


def settings(sv: SparseVARConfig, depth: int, stages: int) -> list[tuple[str, str, SparseVARConfig, SpeedupConfig]]:
    """(table, label, config, speed-ups) of every measured setting; the config's own values are the defaults."""
    on = sv.model_copy(update={"enabled": True})
    dense = sv.model_copy(update={"enabled": False})
    rows = [("tau", "dense", dense)]
    rows += [("tau", f"{on.normalize} τ={t}", on.model_copy(update={"tau": t})) for t in (0.4, 0.5, 0.6, 0.7)]
    for tau in (0.5, 0.7):
        quantile = on.model_copy(update={"normalize": "quantile", "tau": tau})
        rows += [("random", f"frequency, quantile τ={tau}", quantile),
                 ("random", f"random, quantile τ={tau}", quantile.model_copy(update={"selection": "random"}))]
    rows += [("alpha", f"α={a}", on.model_copy(update={"anchor_grid": a})) for a in (0, 2, 4, 8)]
    rows += [("start", f"P={p}", on.model_copy(update={"start_stage": p})) for p in range(stages - 3, stages + 1)]
    rows += [("block", f"s={s}", on.model_copy(update={"score_block": s})) for s in range(1, depth + 1)]
    measured = [(table, label, config, NO_SPEEDUPS) for table, label, config in rows]
    measured += [("speedups", label, config, speedups) for label, config, speedups in compared(sv, stages, depth)]
    return measured


def measure(backend: Backend, requests: list[Request], sv: SparseVARConfig, speedups: SpeedupConfig, batch: int,
            yardstick: Yardstick, dense: list[ImageResult] | None) -> tuple[dict[str, Any], list[ImageResult]]:
    batches = [requests[i:i + batch] for i in range(0, len(requests), batch)]
    generate(backend, batches[0], sv, speedups)  # warm-up
    results, per_image_ms = [], []
    for chunk in batches:
        out = generate(backend, chunk, sv, speedups)
        results += out
        per_image_ms.append(out[0].latency_ms / len(chunk))
    images = pixels(np.stack([r.pixels_HWC for r in results]))
    verdicts = yardstick.judge(images, [parse(r.prompt) for r in requests])
    first = first_sparse_stage(sv.model_copy(update={"enabled": True}))
    kept = [s.kept / s.tokens for r in results for s in r.stages if s.stage >= first]
    row = {
        "latency_ms": statistics.median(per_image_ms),
        "yardstick": statistics.mean(v.score for v in verdicts),
        "psnr_db": None if dense is None else psnr_db([r.pixels_HWC for r in results], [d.pixels_HWC for d in dense]),
        "kept_ratio": float(np.mean(kept)),
        **accuracy(verdicts),
    }
    return row, results


def reference(yardstick: Yardstick, real: np.ndarray, captions: list[str], found: list) -> dict[str, Any]:
    """The yardstick on the held-out scenes themselves: against their captions (what the tables' rows are judged
    on) and against everything true of them (every object's place named)."""
    x = pixels(real)
    by_caption = yardstick.judge(x, [parse(c) for c in captions])
    return {"yardstick": statistics.mean(v.score for v in by_caption), **accuracy(by_caption),
            "described": accuracy(yardstick.judge(x, [described(s) for s in found]))}


TABLES = {
    "tau": "Dense and the τ grid (the config's normalize, α, P, s)",
    "random": "Frequency-aware against random exclusion at equal kept ratios (quantile normalisation)",
    "alpha": "Anchor grid α at the config's τ (0: no anchors)",
    "start": "First sparse stage P at the config's τ",
    "block": "Score block s at the config's τ",
    "speedups": "Other speed-ups on the same loop: the last K stages skipped, alone and with SparseVAR "
                "(kept: tokens that ran from stage P on, the skipped stages' none included)",
}


def _share(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown(rows: list[dict[str, Any]], truth: dict[str, Any], command: str) -> str:
    lines = [f"Made by `{command}`.", "",
             f"Yardstick on the held-out scenes themselves: {truth['yardstick']:.3f} "
             f"(all found: {truth['all_found']:.3f}).", "",
             "### Per attribute: the share of the named objects that show it (count: of the pictures)", "",
             f"| pictures | {' | '.join(ATTRIBUTES)} | count | all found |", "|---|" + "---|" * (len(ATTRIBUTES) + 2)]
    per_attribute = [("real scenes, every attribute named", truth["described"]), ("real scenes, captions", truth)]
    per_attribute += [(f"generated, {r['label']}", r) for r in rows if r["table"] == "tau"]
    for label, shares in per_attribute:
        cells = [_share(shares[a]) for a in (*ATTRIBUTES, "count", "all_found")]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    lines.append("")
    measured = {r["table"] for r in rows}
    for table, title in ((t, title) for t, title in TABLES.items() if t in measured):
        lines += [f"### {title}", "", "| setting | yardstick | all found | PSNR vs dense (dB) | kept | ms/image |",
                  "|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["table"] == table):
            psnr = "–" if r["psnr_db"] is None else f"{r['psnr_db']:.2f}"
            lines.append(f"| {r['label']} | {r['yardstick']:.3f} | {r['all_found']:.3f} | {psnr} | "
                         f"{r['kept_ratio']:.3f} | {r['latency_ms']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflows.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml", help="job config of the demo model")
    parser.add_argument("--out", type=Path, required=True, help="folder for quality.json and quality.md")
    parser.add_argument("--prompts", type=int, default=64, help="held-out scenes to caption and generate")
    parser.add_argument("--batch", type=int, default=8, help="images per generation batch")
    parser.add_argument("--only", default=",".join(TABLES), help=f"tables to measure, of {','.join(TABLES)}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(TABLES)
    if unknown:
        parser.error(f"--only: unknown table(s) {', '.join(sorted(unknown))}; choose from {','.join(TABLES)}")
    try:
        cfg = load_config(args.config, args.overrides)
        yardstick = load_yardstick()
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    backend = build_backend(cfg.model, cfg.sampling, cfg.runtime.device, cfg.runtime.dtype)
    real, captions, found = held_out(args.prompts, cfg.model.image_side)
    requests = [Request(caption, seed=i) for i, caption in enumerate(captions)]
    truth = reference(yardstick, real, captions, found)
    wanted = set(args.only.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    rows, dense = [], None
    for table, label, sv, speedups in settings(cfg.sparsevar, backend.depth, len(backend.schedule(1.0))):
        if table not in wanted and label != "dense":
            continue
        row, results = measure(backend, requests, sv, speedups, args.batch, yardstick, dense)
        if label == "dense":
            dense = results
            write_grid(args.out, [r.pixels_HWC for r in results[:16]], [r.prompt for r in requests[:16]])
        rows.append({"table": table, "label": label, **row})
        psnr = "     –" if row["psnr_db"] is None else f"{row['psnr_db']:6.2f}"
        print(f"{label:32} yardstick {row['yardstick']:.3f}  PSNR {psnr}  "
              f"kept {row['kept_ratio']:.3f}  {row['latency_ms']:7.1f} ms/img", flush=True)
    command = "python -m workflows.quality " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / "quality.json").write_text(json.dumps({"reference": truth, "rows": rows}, indent=2))
    (args.out / "quality.md").write_text(markdown(rows, truth, command))
    return 0


def write_grid(out: Path, images: list[np.ndarray], prompts: list[str]) -> None:
    """samples.png: the dense samples in rows of (at most) four, each with its prompt written under it, a short last
    row padded white; and samples.txt: the prompts in the same order."""
    from PIL import Image

    columns = min(4, len(images))
    cells = [np.concatenate([image, caption_strip(prompt, image.shape[1])]) for image, prompt in zip(images, prompts,
                                                                                                    strict=True)]
    height = max(c.shape[0] for c in cells)
    cells = [np.pad(c, ((0, height - c.shape[0]), (0, 0), (0, 0)), constant_values=255) for c in cells]
    padded = cells + [np.full_like(cells[0], 255)] * (-len(cells) % columns)
    rows = [np.concatenate(padded[i:i + columns], axis=1) for i in range(0, len(padded), columns)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(out / "samples.png")
    (out / "samples.txt").write_text("\n".join(prompts) + "\n")


def caption_strip(text: str, width: int, size: int = 10) -> np.ndarray:
    """The text, word-wrapped to the width, black on white: (lines x 1.2 size + 4, width, 3) uint8."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=size)
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width - 4:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    strip = Image.new("RGB", (width, int(len(lines) * 1.2 * size) + 4), "white")
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        draw.text((2, 2 + int(i * 1.2 * size)), line, fill="black", font=font)
    return np.asarray(strip)


if __name__ == "__main__":
    sys.exit(main())
