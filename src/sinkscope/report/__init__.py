"""Result -> terminal text, JSON and PNG. Never runs a model.

Each report module handles one result type and defines:

    RESULT                        the result dataclass it renders
    table(result) -> str          the text printed for it (the reference's layout where there is one)
    payload(result) -> dict       the JSON content (every printed number, under its printed name)
    json_name(result) -> str      the JSON file's name, e.g. "scan.json"
    plots(result, outdir) -> list[Path]          optional: the PNGs, written with common.save_fig
    extra_files(result, outdir) -> list[Path]    optional: other files (e.g. .npz), written atomically

`save` writes them as one set. The JSON lists the set's files under "files"; the next save of the same JSON
removes the files of the old set that it does not write again (stale plots after --no-plots, a renamed plot),
and never touches any other file. Every JSON carries the run's "provenance" (provenance.py). Files are
written atomically (a temporary file, then a rename), so an interrupted run never leaves half a file.
"""

from __future__ import annotations

from pathlib import Path

from .common import WRITTEN, remove_stale, write_json

_MODULES: dict[type, object] = {}


def register(module) -> None:
    _MODULES[module.RESULT] = module


def module_for(result):
    mod = _MODULES.get(type(result))
    if mod is None:
        _load_builtin()
        mod = _MODULES.get(type(result))
    if mod is None:
        raise TypeError(f"no report for {type(result).__name__}")
    return mod


def _load_builtin() -> None:
    from . import ablate_mlp_out, decompose_mlp_in, decompose_output, find_mlp_subspace, scan
    from . import ablate_router, moe_subspace
    for mod in (scan, decompose_output, find_mlp_subspace, ablate_mlp_out, decompose_mlp_in, moe_subspace,
                ablate_router):
        register(mod)
    from . import metrics, super_weight
    register(metrics)
    register(super_weight)
    from . import explain
    register(explain)
    register(explain.COMPARISON)


def table(result) -> str:
    return module_for(result).table(result)


def to_dict(result) -> dict:
    payload = dict(module_for(result).payload(result))
    payload["provenance"] = getattr(result, "meta", None)
    return payload


def json_path(result, outdir: str | Path) -> Path:
    return Path(outdir) / module_for(result).json_name(result)


def save(result, outdir: str | Path, plots: bool = True) -> list[Path]:
    """Write the result's file set; returns the paths written (the JSON first)."""
    mod = module_for(result)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if hasattr(mod, "extra_files"):
        written += mod.extra_files(result, outdir)
    if plots and hasattr(mod, "plots"):
        written += mod.plots(result, outdir)
    path = outdir / mod.json_name(result)
    remove_stale(path, written)
    payload = to_dict(result)
    payload["files"] = [p.name for p in written]
    write_json(path, payload)
    return [path] + written


def render(result, outdir: str | Path, plots: bool = True) -> str:
    """save() and return the table followed by a "[saved] ..." line (the older one-call interface)."""
    paths = save(result, outdir, plots=plots)
    return table(result) + "\n[saved] " + ", ".join(str(p) for p in paths)


__all__ = ["register", "module_for", "table", "to_dict", "json_path", "save", "render", "WRITTEN"]
