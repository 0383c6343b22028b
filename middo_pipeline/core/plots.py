"""Small matplotlib figures as PNG bytes, for Dagster metadata (markdown with a data URI).

Figures are built with ``matplotlib.figure.Figure`` on the Agg canvas (no pyplot state, safe
in threads and without a display), ~6×4 in at 80 dpi so one image stays well under 100 KB.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "png_to_markdown",
    "loss_curve_png",
    "loss_scatter_png",
    "histogram_png",
    "cluster_map_png",
    "metric_by_round_png",
]

FIGSIZE = (6.0, 4.0)
DPI = 80
MAX_POINTS = 10000  # scatter plots subsample above this (the PNG stays small, drawing fast)
PALETTE_COLORS = 96


def _new(figsize=FIGSIZE):
    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _png(fig) -> bytes:
    """PNG bytes, quantised to a small palette (dense scatter plots compress ~5x better)."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    raw = buf.getvalue()
    try:
        from PIL import Image  # a matplotlib dependency

        img = (
            Image.open(io.BytesIO(raw)).convert("RGB").quantize(colors=PALETTE_COLORS, method=Image.Quantize.MEDIANCUT)
        )
        out = io.BytesIO()
        img.save(out, format="PNG", optimize=True)
        small = out.getvalue()
        return small if len(small) < len(raw) else raw
    except Exception:  # pragma: no cover - PIL missing or failing: the plain PNG is still valid
        return raw


def _empty(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float, np.floating, np.integer)) and math.isfinite(float(x))


def png_to_markdown(png: bytes, alt: str = "figure") -> str:
    """A markdown image whose source is a base64 data URI of the PNG."""
    alt = (alt or "figure").replace("[", "(").replace("]", ")").replace("\n", " ")
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def loss_curve_png(history: Sequence[tuple[int, float]], title: str = "training loss") -> bytes:
    """Training loss by optimizer step."""
    fig, ax = _new()
    pts = [(int(s), float(v)) for s, v in history if _finite(v)]
    if pts:
        steps, losses = zip(*pts)
        ax.plot(steps, losses, marker="o" if len(pts) < 30 else None, ms=3, lw=1.5)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    else:
        _empty(ax, "no loss logged")
    ax.set_title(title)
    return _png(fig)


def _subsample(n: int, keep: np.ndarray | None = None, limit: int = MAX_POINTS, seed: int = 0) -> np.ndarray:
    """Indices to draw: everything up to ``limit``; above it a random subset plus all ``keep``."""
    if n <= limit:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    idx = rng.choice(n, size=limit, replace=False)
    if keep is not None:
        idx = np.union1d(idx, np.flatnonzero(keep))
    return np.sort(idx)


def loss_scatter_png(
    loss_before,
    loss_after,
    hard_mask,
    thr_before: float,
    thr_after: float,
    title: str = "response loss before vs after training",
) -> bytes:
    """Loss before training (x) vs after (y); the hard region (both above threshold) shaded,
    hard samples in red."""
    x = np.asarray(loss_before, dtype=np.float64)
    y = np.asarray(loss_after, dtype=np.float64)
    hard = np.asarray(hard_mask, dtype=bool)
    fig, ax = _new()
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.any():
        idx = _subsample(len(x), hard)
        idx = idx[ok[idx]]
        easy = idx[~hard[idx]]
        hi = idx[hard[idx]]
        ax.scatter(
            x[easy],
            y[easy],
            s=8,
            alpha=0.5,
            color="tab:blue",
            label=f"not hard ({int((~hard & ok).sum())})",
            rasterized=True,
        )
        ax.scatter(
            x[hi], y[hi], s=14, alpha=0.8, color="tab:red", label=f"hard ({int((hard & ok).sum())})", rasterized=True
        )
        xmin, xmax = float(np.min(x[ok])), float(np.max(x[ok]))
        ymin, ymax = float(np.min(y[ok])), float(np.max(y[ok]))
        padx = 0.05 * (xmax - xmin or 1.0)
        pady = 0.05 * (ymax - ymin or 1.0)
        ax.set_xlim(xmin - padx, xmax + padx)
        ax.set_ylim(ymin - pady, ymax + pady)
        if _finite(thr_before) and _finite(thr_after):
            ax.axvline(thr_before, color="0.3", ls="--", lw=1)
            ax.axhline(thr_after, color="0.3", ls="--", lw=1)
            x0, y0 = float(thr_before), float(thr_after)
            x1, y1 = max(xmax + padx, x0), max(ymax + pady, y0)
            ax.fill_between([x0, x1], y0, y1, color="tab:red", alpha=0.12, label="hard region", lw=0)
        lo = min(xmin, ymin)
        hi_ = max(xmax, ymax)
        ax.plot([lo, hi_], [lo, hi_], color="0.7", lw=0.8, zorder=0)
        ax.set_xlabel("loss before training")
        ax.set_ylabel("loss after training")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
    else:
        _empty(ax)
    ax.set_title(title)
    return _png(fig)


def histogram_png(
    values_by_name: dict[str, np.ndarray],
    thresholds: dict[str, float] | None = None,
    title: str = "",
    bins: int = 30,
) -> bytes:
    """Overlaid histograms of several named series (NaN dropped), thresholds as vertical
    lines in the series' colour."""
    fig, ax = _new()
    thresholds = thresholds or {}
    drawn = False
    colors = [f"C{i}" for i in range(10)]
    series = {}
    for name, values in values_by_name.items():
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        series[name] = v[np.isfinite(v)]
    finite = [v for v in series.values() if v.size]
    edges = bins
    if finite:  # one set of bin edges for all series, so the overlaid bars line up
        lo = min(float(v.min()) for v in finite)
        hi = max(float(v.max()) for v in finite)
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    for i, (name, v) in enumerate(series.items()):
        color = colors[i % len(colors)]
        if v.size:
            ax.hist(v, bins=edges, alpha=0.45, color=color, label=f"{name} (n={v.size})", histtype="stepfilled")
            drawn = True
        thr = thresholds.get(name)
        if _finite(thr):
            ax.axvline(float(thr), color=color, ls="--", lw=1.5, label=f"{name} threshold {float(thr):.3g}")
    for name, thr in thresholds.items():  # thresholds without a series of their own
        if name not in values_by_name and _finite(thr):
            ax.axvline(float(thr), color="k", ls="--", lw=1.5, label=f"{name} threshold {float(thr):.3g}")
    if drawn:
        ax.set_ylabel("samples")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    else:
        _empty(ax)
    ax.set_title(title)
    return _png(fig)


def cluster_map_png(xy, labels, sparse_mask, title: str = "clusters") -> bytes:
    """2-D map coloured by cluster; sparse samples drawn as larger black-outlined markers."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    labels = np.asarray(labels).reshape(-1)
    sparse = np.asarray(sparse_mask, dtype=bool).reshape(-1)
    fig, ax = _new()
    ok = np.isfinite(xy).all(axis=1)
    if ok.any():
        idx = _subsample(len(xy), sparse)
        idx = idx[ok[idx]]
        n_clusters = len(np.unique(labels)) if labels.size else 0
        cmap = "tab20" if n_clusters <= 20 else "gist_ncar"
        dense = idx[~sparse[idx]]
        sp = idx[sparse[idx]]
        vmin, vmax = (float(labels.min()), float(labels.max())) if labels.size else (0.0, 1.0)
        ax.scatter(
            xy[dense, 0],
            xy[dense, 1],
            c=labels[dense],
            cmap=cmap,
            vmin=vmin,
            vmax=vmax,
            s=8,
            alpha=0.7,
            linewidths=0,
            rasterized=True,
        )
        if sp.size:
            ax.scatter(
                xy[sp, 0],
                xy[sp, 1],
                c=labels[sp],
                cmap=cmap,
                vmin=vmin,
                vmax=vmax,
                s=40,
                alpha=0.95,
                edgecolors="black",
                linewidths=1.2,
                marker="o",
                label=f"sparse ({int(sparse.sum())})",
                rasterized=True,
            )
            ax.legend(loc="best", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{int(ok.sum())} samples, {n_clusters} clusters")
    else:
        _empty(ax)
    ax.set_title(title)
    return _png(fig)


def metric_by_round_png(rounds: Sequence[int], series: dict[str, Sequence[float]], title: str = "by round") -> bytes:
    """One line per metric across rounds (series named ``base_*`` are drawn dashed)."""
    fig, ax = _new()
    rounds = list(rounds)
    drawn = False
    for name, values in series.items():
        vals = [float(v) if _finite(v) else np.nan for v in values]
        if not vals or all(np.isnan(vals)):
            continue
        xs = rounds[: len(vals)] if len(rounds) >= len(vals) else list(range(1, len(vals) + 1))
        ls = "--" if name.startswith("base") else "-"
        ax.plot(xs, vals[: len(xs)], ls=ls, marker="o" if ls == "-" else None, ms=4, label=name)
        drawn = True
    if drawn:
        ax.set_xlabel("round")
        if rounds:
            ax.set_xticks(sorted(set(int(r) for r in rounds)))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    else:
        _empty(ax)
    ax.set_title(title)
    return _png(fig)
