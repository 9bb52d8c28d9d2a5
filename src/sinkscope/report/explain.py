"""`explain` results -> OUTDIR/explain/report.json, report.html and report.md (one model, or several side by side).

report.json holds everything the report shows (schema: docs/explain.md); report.html is self-contained (html.py);
report.md is the verdict and the tables (markdown.py), also what the CLI prints."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from ..experiments.explain_core import ExplainComparison, ExplainResult
from . import html, markdown
from .common import _clean, atomic_file

RESULT = ExplainResult
FOLDER = "explain"
FILES = ("report.json", "report.md")


def result_payload(r: ExplainResult) -> dict:
    """One model's report.json object."""
    return {
        "model": r.model, "model_type": r.model_type, "n_layers": r.n_layers, "n_prompts": r.n_prompts,
        "seed": r.seed, "verdict": r.verdict, "headline": r.headline, "summary": r.summary,
        "birth_layers": r.birth_layers, "sink_layers": r.sink_layers, "token0": r.token0,
        "thresholds": r.thresholds.as_dict(), "claims": _clean(r.claims), "steps": _clean(r.steps),
        "passes": r.passes, "seconds": r.seconds, "notes": r.notes, "meta": r.meta}


def table(r) -> str:
    return markdown.render(r)


def payload(r: ExplainResult) -> dict:
    return result_payload(r)


def json_name(r) -> str:
    return f"{FOLDER}/report.json"


def extra_files(r, outdir) -> list[Path]:
    folder = Path(outdir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    page, text = html.render(r, files=FILES), markdown.render(r)
    return [atomic_file(folder / "report.html", lambda tmp: tmp.write_text(page, encoding="utf-8")),
            atomic_file(folder / "report.md", lambda tmp: tmp.write_text(text, encoding="utf-8"))]


def comparison_payload(c: ExplainComparison) -> dict:
    header, rows = markdown.comparison_rows(c)
    return {"models": [result_payload(r) for r in c.results],
            "comparison": {"columns": header[1:], "rows": {row[0]: row[1:] for row in rows}}, "meta": c.meta}


COMPARISON = SimpleNamespace(RESULT=ExplainComparison, table=table, payload=comparison_payload, json_name=json_name,
                             extra_files=extra_files)
