"""Speed against quality for SparseVAR and the other speed-ups: the Pareto front of `docs/accelerations.md`.

    python -m workflows.bench --config configs/tiny.yaml --out out/bench-speedups --speedups --no-pipeline \
        --batch-sizes 8 --taus 0.6 --kept 0.5 0.4 0.3 --repeats 5
    python -m workflows.quality --config configs/tiny.yaml --out out/q-speedups --only tau,speedups
    python -m benchmarks.speedups_pareto --bench out/bench-speedups/bench.json \
        --quality out/q-speedups/quality.json --out docs/accelerations

Speed-ups come from the bench (every setting interleaved in one run, so their ratios share the machine's state),
the yardstick and PSNR from the quality run (64 held-out captions); settings are matched by label. Writes
OUT.png (speed-up against yardstick, the front drawn, the band within 0.02 of dense shaded) and OUT.md (the
joined table, front marked, and the best setting within 0.02 of dense overall and among FastVAR's).
"""

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BAND = 0.02  # "within 0.02 of dense": the quality bound


def joined(bench: dict[str, Any], quality: dict[str, Any], batch: int | None) -> list[dict[str, Any]]:
    """One row per setting measured by both: label, speed-up, ms/image, yardstick, PSNR."""
    sizes = sorted({r["batch_size"] for r in bench["rows"]})
    batch = batch or sizes[-1]
    speed = {r["setting"]: r for r in bench["rows"] if r["batch_size"] == batch}
    rows = []
    for q in quality["rows"]:
        b = speed.get(q["label"])
        if b is not None:
            rows.append({"setting": q["label"], "speedup": b["speedup"], "ms_per_image": b["latency_ms_median"],
                         "yardstick": q["yardstick"], "psnr_db": q["psnr_db"], "batch_size": batch})
    return rows


def front(rows: list[dict[str, Any]]) -> set[str]:
    """Settings no other beats on both speed-up and yardstick."""
    def beats(o: dict[str, Any], r: dict[str, Any]) -> bool:
        return (o["speedup"] >= r["speedup"] and o["yardstick"] >= r["yardstick"]
                and (o["speedup"] > r["speedup"] or o["yardstick"] > r["yardstick"]))

    return {r["setting"] for r in rows if not any(beats(o, r) for o in rows)}


def best_within(rows: list[dict[str, Any]], dense: float, among: str = "") -> dict[str, Any] | None:
    """The fastest setting whose yardstick is within BAND of dense (among labels holding `among`)."""
    ok = [r for r in rows if r["yardstick"] >= dense - BAND and among in r["setting"]]
    return max(ok, key=lambda r: r["speedup"], default=None)


def family(label: str) -> str:
    kinds = [name for name, word in (("SparseVAR", "τ="), ("FastVAR", "FastVAR"), ("skip", "skipped"),
                                     ("guidance", "guidance")) if word in label]
    return " + ".join(kinds) or "dense"


def plot(rows: list[dict[str, Any]], dense: float, on_front: set[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.axhspan(dense - BAND, max(r["yardstick"] for r in rows) + 0.01, color="0.92", label=f"within {BAND} of dense")
    for kind in sorted({family(r["setting"]) for r in rows}):
        mine = [r for r in rows if family(r["setting"]) == kind]
        ax.scatter([r["speedup"] for r in mine], [r["yardstick"] for r in mine], label=kind, s=36)
    edge = sorted((r for r in rows if r["setting"] in on_front), key=lambda r: r["speedup"])
    ax.plot([r["speedup"] for r in edge], [r["yardstick"] for r in edge], "k--", lw=1, label="Pareto front")
    for r in edge:
        ax.annotate(r["setting"], (r["speedup"], r["yardstick"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_xlabel(f"speed-up over dense (batch {rows[0]['batch_size']}, one interleaved run)")
    ax.set_ylabel("yardstick (64 held-out captions)")
    ax.set_title("Demo model: training-free speed-ups, speed against quality")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict[str, Any]], dense: float, on_front: set[str]) -> str:
    lines = ["| setting | speed-up | ms/image | yardstick | PSNR vs dense (dB) | on the front |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["speedup"]):
        psnr = "–" if r["psnr_db"] is None else f"{r['psnr_db']:.2f}"
        lines.append(f"| {r['setting']} | {r['speedup']:.2f} | {r['ms_per_image']:.1f} | {r['yardstick']:.3f} | "
                     f"{psnr} | {'yes' if r['setting'] in on_front else ''} |")
    for name, among in (("any setting", ""), ("FastVAR", "FastVAR")):
        best = best_within(rows, dense, among)
        lines.append(f"\nFastest within {BAND} of dense ({dense:.3f}), {name}: "
                     + ("none" if best is None else f"{best['setting']}, {best['speedup']:.2f}×, "
                                                   f"yardstick {best['yardstick']:.3f}"))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", required=True, help="bench.json of `workflows.bench --speedups`")
    parser.add_argument("--quality", required=True, help="quality.json of `workflows.quality --only tau,speedups`")
    parser.add_argument("--batch", type=int, help="the bench's batch size to take (default: its largest)")
    parser.add_argument("--out", required=True, help="path stem: writes OUT.png and OUT.md")
    args = parser.parse_args(argv)
    rows = joined(json.loads(Path(args.bench).read_text()), json.loads(Path(args.quality).read_text()), args.batch)
    dense = next((r["yardstick"] for r in rows if r["setting"] == "dense"), None)
    if dense is None:
        parser.error("the bench and the quality run share no 'dense' row: were both run with the speed-ups?")
    on_front = front(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, dense, on_front, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(table(rows, dense, on_front))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
