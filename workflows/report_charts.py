"""The report's charts: matplotlib figures rendered to inline SVG (text kept as text, no external references)."""

import io
from datetime import datetime

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

plt.rcParams.update({"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
SIZE = (5.2, 2.8)


def _svg(fig) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML prolog and doctype: the SVG sits inside the page


def tau_histogram(taus: list[float | None]) -> str:
    """How many images each τ made; dense images (τ null) in a bar of their own."""
    fig, ax = plt.subplots(figsize=SIZE)
    sparse = [t for t in taus if t is not None]
    dense = len(taus) - len(sparse)
    if sparse:
        ax.hist(sparse, bins=min(30, max(5, len(set(sparse)))), color="#4c72b0", label="SparseVAR")
    if dense:
        ax.bar([-0.05], [dense], width=0.04, color="#999999", label="dense")
    ax.set_xlabel("τ (dense at the left)" if dense else "τ")
    ax.set_ylabel("images")
    ax.legend(frameon=False)
    return _svg(fig)


def tau_over_time(written_at: list[datetime], taus: list[float | None], bin_s: float | None = None) -> str:
    """τ of each image as it was written, and images/s in time bins (the run's throughput as it went)."""
    start = min(written_at)
    seconds = np.array([(t - start).total_seconds() for t in written_at])
    span = max(float(seconds.max()), 1e-3)
    bin_s = bin_s or max(span / 30, 0.5)
    fig, ax = plt.subplots(figsize=SIZE)
    ax.scatter(seconds, [np.nan if t is None else t for t in taus], s=6, color="#4c72b0", label="τ (per image)")
    ax.set_xlabel("seconds since the first image")
    ax.set_ylabel("τ")
    rate_ax = ax.twinx()
    edges = np.arange(0, span + bin_s, bin_s)
    counts, _ = np.histogram(seconds, bins=edges) if len(edges) > 1 else (np.array([len(seconds)]), None)
    rate_ax.step(edges[:len(counts)], counts / bin_s, where="post", color="#dd8452", label="images/s")
    rate_ax.set_ylabel("images/s")
    rate_ax.spines["right"].set_visible(True)
    fig.legend(frameon=False, loc="upper center", ncol=2)
    return _svg(fig)


def per_stage(stages: list[int], values: list[list[float]], ylabel: str) -> str:
    """Median of each stage's values, with the 10th to 90th percentile as a band."""
    fig, ax = plt.subplots(figsize=SIZE)
    median = [float(np.median(v)) for v in values]
    low = [float(np.percentile(v, 10)) for v in values]
    high = [float(np.percentile(v, 90)) for v in values]
    ax.fill_between(stages, low, high, color="#4c72b0", alpha=0.25, label="10th-90th percentile")
    ax.plot(stages, median, marker="o", markersize=3, color="#4c72b0", label="median")
    ax.set_xlabel("stage")
    ax.set_ylabel(ylabel)
    ax.set_xticks(stages)
    ax.legend(frameon=False)
    return _svg(fig)
