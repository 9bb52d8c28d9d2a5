"""Shared output helpers: JSON files, the reference's progression plot, notes."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

YLIMS = {"cosine": (-1, 1), "probability": (0, 1), "log-norm": (0, 10)}


def _clean(x):
    """JSON-safe: NaN/inf -> None, tensors/arrays -> lists, dataclasses -> dicts."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _clean(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "tolist"):
        return _clean(x.tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x


def write_json(path: Path, payload) -> Path:
    path.write_text(json.dumps(_clean(payload), indent=1) + "\n", encoding="utf-8")
    return path


def notes_text(notes) -> str:
    return "\n".join(f"[note] {n}" for n in notes)


def progression_plot(path: Path, x, series: dict, ylabel: str, title: str, kind: str | None = None,
                     dpi: int = 300) -> Path:
    """One line per series over layers: series = {label: (values, variances or None)}.
    Error bars are +-sqrt(variance) where a variance is given (reference: 12x6 in, circle markers, cap 2)."""
    fig, ax = plt.subplots(figsize=(12, 6))
    ymax = 0.0
    for label, (vals, var) in series.items():
        vals = np.asarray(vals, dtype=float)
        ymax = max(ymax, float(np.nanmax(vals)) if len(vals) else 0.0)
        if var is not None:
            ax.errorbar(x, vals, yerr=np.sqrt(np.maximum(np.asarray(var, dtype=float), 0)), marker="o",
                        capsize=2, label=label)
        else:
            ax.plot(x, vals, marker="o", label=label)
    ax.set_xticks(list(x))
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if kind in YLIMS:
        ax.set_ylim(*YLIMS[kind])
        if kind == "cosine":
            ax.set_yticks(np.arange(-1, 1.01, 0.2))
        if kind == "probability":
            ax.set_yticks(np.arange(0, 1.01, 0.1))
    elif kind == "spread":
        ax.set_ylim(0, 1.15 * ymax if ymax > 0 else 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
