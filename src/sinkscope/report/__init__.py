"""Result -> terminal text, JSON and PNG. Never runs a model.

`render(result, outdir)` writes the JSON and the plots of any experiment result and returns the text to print.
"""

from __future__ import annotations

from pathlib import Path

from . import ablate_mlp_out, decompose_mlp_in, decompose_output, find_mlp_subspace, scan

RENDERERS = {}
for _mod in (scan, decompose_output, find_mlp_subspace, ablate_mlp_out, decompose_mlp_in):
    RENDERERS[_mod.RESULT] = _mod


def register(module) -> None:
    RENDERERS[module.RESULT] = module


def render(result, outdir: str | Path, plots: bool = True) -> str:
    """Write `<outdir>/<name>.json` (+ PNGs) for a result; return the text for the terminal."""
    mod = RENDERERS.get(type(result))
    if mod is None:
        raise TypeError(f"no renderer for {type(result).__name__}")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    return mod.render(result, outdir, plots)
