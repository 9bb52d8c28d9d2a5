"""`explain` results -> one self-contained HTML file (report.html): the verdict first, then each step with its
table and plot, the run's metadata and links to the JSON beside it. Plots are embedded as base64 PNG; a strict
Content-Security-Policy forbids every request (no scripts, no fonts, no remote images). Reads result dataclasses
only; never runs a model."""

from __future__ import annotations

import base64
import html
import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..experiments.explain_core import ExplainComparison, ExplainResult, ranges  # noqa: E402
from . import markdown as md  # noqa: E402

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
DPI = 90
VERDICT_COLOURS = {"found": "#1b7f3b", "partial": "#a86b00", "not found": "#555", "different mechanism": "#1f5fa8"}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;line-height:1.45;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.verdict{padding:.8em 1em;border-radius:6px;color:#fff;font-size:1.15em;margin:.8em 0}
.mark-true{color:#1b7f3b;font-weight:bold;font-size:1.2em}.mark-false{color:#b3261e;font-weight:bold;font-size:1.2em}
.mark-none{color:#777;font-size:1.2em}
.summary{background:#f7f7f4;border-left:4px solid #999;padding:.6em 1em}
img{max-width:100%;height:auto;border:1px solid #eee}
.small{font-size:.85em;color:#555}code{background:#f3f3f3;padding:0 .2em}
section.model{border-top:3px double #bbb;margin-top:2em}
"""


def _e(x) -> str:
    return html.escape("" if x is None else str(x))


def _png(fig) -> str:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(b64: str | None, alt: str) -> str:
    return "" if not b64 else f'<p><img alt="{_e(alt)}" src="data:image/png;base64,{b64}"></p>'


def table(header, rows, cls: str = "", marks: int | None = None) -> str:
    """An HTML table; column `marks` holds ✓/✗/– marks (coloured)."""
    out = [f'<table class="{cls}"><thead><tr>' + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for row in rows:
        cells = []
        for i, c in enumerate(row):
            if marks is not None and i == marks:
                k = {"✓": "true", "✗": "false"}.get(str(c), "none")
                cells.append(f'<td class="mark-{k}">{_e(c)}</td>')
            elif isinstance(c, (int, float)) and not isinstance(c, bool):
                cells.append(f'<td class="num">{_e(md.fnum(c))}</td>')
            else:
                cells.append(f"<td>{_e(c)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</tbody></table>"


# -- plots ------------------------------------------------------------------------------------------------------------

def _arr(v) -> np.ndarray:
    return np.array([np.nan if x is None else float(x) for x in v], dtype=float)


def plot_where(r: ExplainResult) -> str:
    w = r.steps["where"]
    x = np.array(w["layers"])
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 6.4), sharex=True)
    a1.plot(x, _arr(w["sink"]), marker="o", label="sink attention to token 0")
    a1.axhline(r.thresholds.epsilon, color="grey", ls="--", lw=1, label=f"ε = {r.thresholds.epsilon}")
    a1.set_ylim(0, 1)
    a1.set_ylabel("attention")
    a1.legend(loc="upper right", fontsize=8)
    a2.semilogy(x, _arr(w["norm0"]), marker="o", label="‖y‖ token 0 (mean)")
    a2.semilogy(x, _arr(w["norm_others"]), marker="s", label="‖y‖ other tokens (median)")
    a2.set_ylabel("block output norm")
    a2.set_xlabel("layer")
    for l in w["birth_layers"]:
        for ax in (a1, a2):
            ax.axvspan(l - 0.45, l + 0.45, color="#e4572e", alpha=0.25, lw=0)
    for l in w["minor_jumps"]:
        for ax in (a1, a2):
            ax.axvspan(l - 0.45, l + 0.45, color="#f3a712", alpha=0.15, lw=0)
    a2.legend(loc="lower right", fontsize=8)
    a1.set_title("Where: sink attention and token 0's norm (red: birth layers; orange: smaller jumps)")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.set_xticks(x)
    fig.tight_layout()
    return _png(fig)


def plot_who(r: ExplainResult) -> str | None:
    who = r.steps["who"]
    if not who:
        return None
    fig, ax = plt.subplots(figsize=(max(4, 1.8 * len(who) + 2), 3.6))
    names = ["‖r_0‖", "‖a_0‖", "‖m_0‖", "‖y_0‖"]
    keys = ["norm_r0", "norm_a0", "norm_m0", "norm_y0"]
    width = 0.2
    for i, (n, k) in enumerate(zip(names, keys)):
        ax.bar(np.arange(len(who)) + i * width, [max(w[k], 1e-6) for w in who], width, label=n)
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(who)) + 1.5 * width)
    ax.set_xticklabels([f"block {w['layer']} ({w['writer']})" for w in who])
    ax.set_title("Who: token 0's block decomposition y = r + a + m at the birth layers")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _png(fig)


def plot_what(r: ExplainResult) -> str | None:
    what = [w for w in r.steps["what"] if w["kind"] in ("mlp", "attention")]
    if not what:
        return None
    fig, axes = plt.subplots(1, len(what), figsize=(4.2 * len(what) + 1, 3.4), squeeze=False)
    for ax, w in zip(axes[0], what):
        if w["kind"] == "mlp":
            ks = np.arange(1, len(w["masses"]) + 1)
            ax.bar(ks, w["masses"], color=["#e4572e" if k == w["k"] else "#8fb3d9" for k in ks])
            ax.axhline(w["energy_mass"], color="grey", ls="--", lw=1)
            ax.set_ylim(0, 1.05)
            ax.set_xticks(ks)
            ax.set_xlabel("k (top-k z dims)")
            ax.set_ylabel("median energy mass at token 0")
            ax.set_title(f"block {w['layer']}: k={w['k']}, dims {w['dims']}", fontsize=9)
        else:
            hs = w["heads"]
            ax.bar([str(h["head"]) for h in hs], [h["share"] for h in hs])
            ax.set_xlabel("head")
            ax.set_ylabel("share of token 0's attention output")
            ax.set_title(f"block {w['layer']}: heads {w['top_heads']}", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("What: the write's dims (MLP) or heads (attention)")
    fig.tight_layout()
    return _png(fig)


def plot_causal(r: ExplainResult) -> str | None:
    a = r.steps["A_causal"]
    if a.get("skipped"):
        return None
    runs, c = a["runs"], a.get("controls")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 1.4]})
    names = [x["name"] for x in runs] + (["controls"] if c else [])
    vals = [x["value"] for x in runs] + ([c["mean"]] if c else [])
    err = [[0, 0]] * len(runs)
    if c:
        err = err + [[c["mean"] - c["ci95"][0], c["ci95"][1] - c["mean"]]]
    a1.bar(names, vals, yerr=np.array(err).T, capsize=3,
           color=["#777"] + ["#e4572e"] * (len(runs) - 1) + (["#8fb3d9"] if c else []))
    a1.set_ylim(0, 1)
    a1.set_ylabel(f"mean sink attention, layers {ranges(a['layers_measured'])}")
    a1.tick_params(axis="x", rotation=30, labelsize=8)
    a1.set_title("(A): later sink attention per run (controls: 95% CI)", fontsize=9)
    x = a["layers_measured"]
    for run in runs:
        a2.plot(x, _arr(run["per_layer"]), marker="o", ms=3, label=run["name"])
    a2.axhline(r.thresholds.epsilon, color="grey", ls="--", lw=1)
    a2.set_ylim(0, 1)
    a2.set_xlabel("layer")
    a2.legend(fontsize=7)
    a2.set_title("per layer", fontsize=9)
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def plot_geometric(r: ExplainResult) -> str | None:
    b = r.steps["B_geometric"]
    if b.get("skipped") or not b.get("layers"):
        return None
    lays = b["layers"]
    fig, axes = plt.subplots(1, len(lays), figsize=(4.8 * len(lays) + 1, 3.6), squeeze=False)
    for ax, lay in zip(axes[0], lays):
        g = lay["directions"][0]["groups"]
        first = next(iter(g.values()))
        names = ["token 0"] + list(g)
        means = [first["mean0"]] + [g[n]["mean"] for n in g]
        sds = [first["sd0"]] + [g[n]["sd"] for n in g]
        ax.bar(names, means, yerr=sds, capsize=3, color=["#e4572e"] + ["#8fb3d9"] * len(g))
        ax.set_ylabel("projection on v1 (mean ± sd)")
        ax.set_title(f"block {lay['layer']}, v1 of z_{lay['primary_dim']}", fontsize=9)
        ax.tick_params(axis="x", rotation=20, labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("(B): token 0's MLP input along the driving direction, against the baseline groups")
    fig.tight_layout()
    return _png(fig)


# -- document --------------------------------------------------------------------------------------------------------

def _verdict_block(r: ExplainResult, level: int) -> str:
    h = f"h{level}"
    colour = VERDICT_COLOURS.get(r.verdict, "#555")
    return "\n".join([
        f'<div class="verdict" id="verdict" style="background:{colour}">Verdict: <b>{_e(r.verdict)}</b> — '
        f"{_e(r.headline)}</div>",
        f'<{h} id="claims">Claims</{h}>',
        table(["id", "holds", "claim", "thresholds"], md.claims_rows(r), cls="claims", marks=1),
        f'<p class="summary">{_e(r.summary)}</p>',
        f"<{h}>Thresholds (declared before the run; override with --NAME)</{h}>",
        table(["name", "value", "meaning"], md.thresholds_rows(r.thresholds))])


def _token0_words(tok: dict) -> str:
    if tok["is_bos"]:
        return f"the BOS token {tok['token']!r} in every prompt"
    if tok["is_special"]:
        return f"a special token ({tok['token']!r} most often)"
    return f"the first word of each prompt ({tok['n_distinct']} distinct; {tok['text'].strip()!r} most often)"


def _steps_block(r: ExplainResult, level: int) -> str:
    h = f"h{level}"
    w = r.steps["where"]
    out = [f"<{h}>Where</{h}>",
           f"<p>Token 0 is {_e(_token0_words(r.token0))}. "
           f"Birth layers: <b>{_e(ranges(w['birth_layers']))}</b>; sink layers: {_e(ranges(w['sink_layers']))}; "
           f"smaller jumps: {_e(ranges(w['minor_jumps']))}; drops: {_e(ranges(w['drops']))}.</p>",
           _img(plot_where(r), "where plot"), table(*md.where_rows(r))]
    if r.steps["who"]:
        out += [f"<{h}>Who</{h}>", _img(plot_who(r), "who plot"), table(*md.who_rows(r)),
                f"<{h}>What</{h}>", _img(plot_what(r), "what plot"), table(*md.what_rows(r))]
    a = r.steps["A_causal"]
    out.append(f"<{h}>(A) causal</{h}>")
    if a.get("skipped"):
        out.append(f"<p>Not run: {_e(a['skipped'])}.</p>")
    else:
        out += [f"<p>Mean sink attention to token 0 over layers {_e(ranges(a['layers_measured']))}; token 0's MLP "
                f"output edited at block(s) {_e(ranges(a['birth_layers']))} (basis: "
                f"{_e('; '.join(f'L{k}: {v}' for k, v in a['basis_space'].items()))}).</p>",
                _img(plot_causal(r), "causal plot"), table(*md.causal_rows(r))]
    b = r.steps["B_geometric"]
    out.append(f"<{h}>(B) geometric</{h}>")
    if b.get("skipped"):
        out.append(f"<p>Not run: {_e(b['skipped'])}.</p>")
    else:
        out.append(_img(plot_geometric(r), "geometric plot"))
        for lay in b["layers"]:
            out += [f"<p>Block {lay['layer']}: token 0's MLP input projected on v1 of d z_j²/dx ({_e(lay['grad_method'])}"
                    f" gradient), centred on the {_e(lay['centred_on'])} mean; {lay['n_perm']} permutations.</p>",
                    table(*md.geometric_rows(r, lay))]
    out += [f"<{h}>Literature metrics</{h}>", "<ul>" + "".join(f"<li>{_e(x)}</li>" for x in md.metrics_lines(r))
            + "</ul>"]
    out += [f"<{h}>Cost</{h}>", table(["step", "forward passes", "seconds"],
                                      [[k, r.passes.get(k, float("nan")), r.seconds.get(k, float("nan"))]
                                       for k in dict.fromkeys(list(r.passes) + list(r.seconds))])]
    out += [f"<{h}>Run metadata</{h}>", table(["", ""], md.provenance_rows(r.meta))]
    if r.notes:
        out += [f"<{h}>Notes</{h}>", "<ul>" + "".join(f"<li>{_e(n)}</li>" for n in r.notes) + "</ul>"]
    return "\n".join(out)


def _files_block(files: list[str]) -> str:
    return "<h2>Files</h2><ul>" + "".join(f'<li><a href="{_e(f)}">{_e(f)}</a></li>' for f in files) + "</ul>"


def render(result, files=("report.json", "report.md")) -> str:
    """The whole report as one HTML string; `files` are linked (relative names beside report.html)."""
    if isinstance(result, ExplainComparison):
        title = "sinkscope explain: " + " vs ".join(r.model for r in result.results)
        body = [f"<h1>{_e(title)}</h1>", '<h2 id="comparison">Side by side</h2>',
                table(*md.comparison_rows(result), cls="comparison")]
        for i, r in enumerate(result.results):
            body += [f'<section class="model" id="model-{i}"><h2>{_e(r.model)}</h2>', _verdict_block(r, 3),
                     _steps_block(r, 3), "</section>"]
    else:
        title = f"sinkscope explain: {result.model}"
        body = [f"<h1>{_e(title)}</h1>", _verdict_block(result, 2), _steps_block(result, 2)]
    body.append(_files_block(list(files)))
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>", *body, "</body></html>", ""])


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
