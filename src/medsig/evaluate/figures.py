"""Formatting and plotting shared by the report and its sections (audit, retention, safety,
clinical): numbers with intervals, matplotlib figures as PNG bytes (Agg backend)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.{digits}f}"
    return str(v)


def fmt_ci(r: dict[str, Any] | None) -> str:
    if not r:
        return "–"
    if r.get("low") is None or r.get("high") is None:
        return fmt(r.get("point"))
    return f"{fmt(r.get('point'))} [{fmt(r['low'])}, {fmt(r['high'])}]"


def tsne_map(emb: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of (n, d) embeddings (cosine distances), n >= 5; exact below 500 points
    (Barnes-Hut's threads gain nothing there and stall on a busy machine)."""
    from sklearn.manifold import TSNE

    n = len(emb)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                metric="cosine", method="exact" if n <= 500 else "barnes_hut",
                random_state=seed).fit_transform(np.asarray(emb, np.float64))


def figure(width: float = 4.6, height: float = 3.6) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=90)
    FigureCanvasAgg(fig)
    return fig


def png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def line_figure(title: str, xlabel: str, ylabel: str, series: dict[str, tuple[list, list]],
                 diagonal: bool = False, markers: bool = False) -> bytes:
    fig = figure()
    ax = fig.add_subplot(1, 1, 1)
    if diagonal:
        ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls="--")
    for name, (x, y) in series.items():
        ax.plot(x, [np.nan if v is None else v for v in y], lw=1.6, label=name,
                marker="o" if markers else None, ms=3)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, ylim=(0, 1.02))
    ax.title.set_fontsize(10)
    ax.legend(fontsize=7, loc="lower right")
    return png(fig)
