"""The calibration plot: throughput, kept tokens and fidelity against τ, one PNG to read a calibration by eye."""

import io
import math

import pyarrow as pa
from matplotlib.figure import Figure


def plot_calibration(table: pa.Table, first_sparse: int, title: str) -> bytes:
    """A PNG of a calibration table (actors.calibration.CALIBRATION_SCHEMA); the dense row is a dashed line.
    Kept ratios are drawn for the stages from `first_sparse` on (the earlier ones keep every token)."""
    rows = table.to_pylist()
    dense = next(r for r in rows if r["tau"] is None)
    sparse = sorted((r for r in rows if r["tau"] is not None), key=lambda r: r["tau"])
    taus = [r["tau"] for r in sparse]

    fig = Figure(figsize=(10, 7.5), layout="constrained")
    fig.suptitle(title)
    speed, kept, psnr, match = (fig.add_subplot(2, 2, i) for i in range(1, 5))
    speed.plot(taus, [r["images_per_sec"] for r in sparse], "o-", label="SparseVAR")
    speed.axhline(dense["images_per_sec"], ls="--", color="grey", label="dense")
    speed.set(xlabel="τ", ylabel="images / s (one actor)", title="throughput at the configured batch size")
    speed.legend()
    stages = sorted({s["stage"] for r in sparse for s in r["stages"] if s["stage"] >= first_sparse})
    for stage in stages:
        kept.plot(taus, [next(s["kept_ratio"] for s in r["stages"] if s["stage"] == stage) for r in sparse], "o-",
                  label=f"stage {stage}")
    kept.set(xlabel="τ", ylabel="kept / tokens", title="mean kept ratio per stage", ylim=(0, 1.05))
    if stages:
        kept.legend()
    finite = [(t, r["psnr_db"]) for t, r in zip(taus, sparse, strict=True) if math.isfinite(r["psnr_db"])]
    psnr.plot([t for t, _ in finite], [p for _, p in finite], "o-")
    psnr.set(xlabel="τ", ylabel="dB", title="PSNR against dense (∞ not drawn)")
    match.plot(taus, [r["token_match"] for r in sparse], "o-")
    match.set(xlabel="τ", ylabel="share", title="tokens equal to dense, sparse stages", ylim=(0, 1.05))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
