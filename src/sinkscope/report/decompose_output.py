"""--decompose-output: the reference's [Block Output L=...] table and decompose_output_L{L}.json."""

from __future__ import annotations

from pathlib import Path

from ..experiments.decompose_output import ROWS, DecomposeOutputResult
from ..fmt import format_table
from .common import dataclass_dict, notes_text

RESULT = DecomposeOutputResult


def table(result: DecomposeOutputResult) -> str:
    cols = [f"tok{t}" for t in result.tokens]
    text = format_table(cols, [(row, result.values[row], "sci") for row in ROWS], title=f"[Block Output L={result.layer}]")
    counts = ", ".join(f"tok{t}: {n} prompts ({s} too short)" for t, n, s in
                       zip(result.tokens, result.n_prompts, result.n_skipped))
    return "\n".join(filter(None, [text, f"[counts] {counts}", notes_text(result.notes)]))


def json_name(result: DecomposeOutputResult) -> str:
    return f"decompose_output_L{result.layer}.json"


def payload(result: DecomposeOutputResult) -> dict:
    return {k: v for k, v in dataclass_dict(result).items() if k != "meta"}
