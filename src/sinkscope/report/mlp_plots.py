"""Plots shared by the MLP modes: the z energy stack (with the zoom panel fixed) and small helpers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .common import plt, save_fig

ZOOM_MARGIN = 1.15
ZOOM_BIG = 0.5       # rows over half the largest norm count as large and are not zoomed on
LABELED_SEGMENTS = 6
MIN_LABEL_FRAC = 0.04   # a segment gets its dim label when it spans at least this share of the axis


def zoom_limit(norms) -> float:
    """The zoom panel's x range: 1.15 x the largest mean norm among the rows other than the largest one.

    The reference zoomed on the first row, which is useless when the first row is the sink (fix 8.7). Rows of
    the same size as the largest (over half of it, e.g. the sink after a control ablation) are left out with it,
    so that the zoom shows the small rows; when every row is that large, the zoom is the full range."""
    v = sorted((float(n) for n in norms if n is not None and math.isfinite(n)), reverse=True)
    if not v or v[0] <= 0:
        return 1.0
    small = [n for n in v[1:] if n < ZOOM_BIG * v[0]]
    return ZOOM_MARGIN * (small[0] if small and small[0] > 0 else v[0])


def _draw_stack(ax, rows, xmax: float, title: str) -> None:
    cmap = plt.get_cmap("viridis")
    y = np.arange(len(rows))[::-1]
    for yi, row in zip(y, rows):
        if row.mean_norm is None or not math.isfinite(row.mean_norm):
            ax.text(0, yi, "  no prompts", va="center", fontsize=8)
            continue
        left = 0.0
        n = max(len(row.dims), 1)
        for s, (d, f) in enumerate(zip(row.dims, row.fracs)):
            w = row.mean_norm * f
            ax.barh(yi, w, left=left, height=0.6, color=cmap(s / n), edgecolor="white", linewidth=0.3)
            if s < LABELED_SEGMENTS and w >= MIN_LABEL_FRAC * xmax and left < xmax:
                ax.text(min(left + w / 2, left + 0.5 * (xmax - left)), yi, str(d), ha="center", va="center",
                        fontsize=7, color="white")
            left += w
        rest = row.mean_norm - left
        if rest > 0:
            ax.barh(yi, rest, left=left, height=0.6, color="lightgrey", hatch="//", edgecolor="grey",
                    linewidth=0.3)
        clipped = row.mean_norm > xmax
        near_edge = row.mean_norm > 0.85 * xmax
        ax.text(min(row.mean_norm, xmax * 0.99), yi + 0.34, f"‖Z‖≈{row.mean_norm:.4g}" + (" (clipped)" if clipped
                                                                                        else ""),
                ha="right" if near_edge else "left", va="bottom", fontsize=7)
    ax.set_yticks(y)
    ax.set_yticklabels([r.label for r in rows])
    ax.set_xlim(0, xmax)
    ax.set_xlabel("mean ‖z‖, split by mean energy share of the top dims (hatched: rest)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)


def zstack_plot(path: Path, rows, title: str, dpi: int = 200) -> Path:
    """Top panel: full scale. Bottom panel: zoomed to 1.15 x the second-largest mean norm."""
    norms = [r.mean_norm for r in rows]
    finite = [n for n in norms if n is not None and math.isfinite(n)]
    full = (max(finite) * 1.05) if finite and max(finite) > 0 else 1.0
    fig, axes = plt.subplots(2, 1, figsize=(11, 1.2 + 1.3 * len(rows) * 2), squeeze=False)
    _draw_stack(axes[0, 0], rows, full, title + " | full scale")
    _draw_stack(axes[1, 0], rows, zoom_limit(norms), title + " | zoom: 1.15 × the largest ‖Z‖ among rows under half the top one")
    fig.tight_layout()
    return save_fig(fig, path, dpi=dpi)


def columns(M) -> list:
    """A [D, k] tensor as a list of k columns (each a list of D floats), for JSON."""
    return [] if M is None else M.T.tolist()
