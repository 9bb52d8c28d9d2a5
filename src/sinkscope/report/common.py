"""Shared output helpers: atomic JSON and figure files, the reference's progression plot, notes."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
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


# Every file completed in this process, in order (the CLI names them after an interrupt).
WRITTEN: list[Path] = []


def _atomic(path: Path, write) -> Path:
    """write(tmp_path) then rename onto `path`: readers never see half a file, an interrupt leaves none."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix="." + path.stem + ".", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    WRITTEN.append(path)
    return path


def atomic_file(path: Path, write) -> Path:
    """Write any file atomically: write(tmp_path) fills a temporary file that is then renamed onto `path`."""
    return _atomic(path, write)


def dumps(payload) -> str:
    """Strict JSON (NaN and infinities become null; a stray one raises instead of writing `NaN`)."""
    return json.dumps(_clean(payload), indent=1, allow_nan=False, ensure_ascii=False) + "\n"


def write_json(path: Path, payload) -> Path:
    text = dumps(payload)
    return _atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_fig(fig, path: Path, dpi: int = 300) -> Path:
    """Save and close a matplotlib figure atomically."""
    try:
        return _atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=Path(path).suffix.lstrip(".")))
    finally:
        plt.close(fig)


def remove_stale(json_path: Path, keep) -> list[Path]:
    """Delete the files listed under "files" in an existing `json_path` that are not in `keep` (the set written
    again now). Only names listed by that JSON, in its own folder, are ever removed."""
    json_path = Path(json_path)
    try:
        old = json.loads(json_path.read_text(encoding="utf-8")).get("files") or []
    except (OSError, ValueError, AttributeError):
        return []
    keep_names = {Path(p).name for p in keep}
    removed = []
    for name in old:
        if not isinstance(name, str) or Path(name).name != name or name in keep_names:
            continue
        p = json_path.parent / name
        if p.is_file():
            p.unlink()
            removed.append(p)
    return removed


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
        fin = vals[np.isfinite(vals)]
        ymax = max(ymax, float(fin.max()) if fin.size else 0.0)
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
    return save_fig(fig, path, dpi=dpi)


def dataclass_dict(obj) -> dict:
    """A result dataclass as a JSON-ready dict (tensors and arrays as lists, NaN as None)."""
    return _clean(obj)
