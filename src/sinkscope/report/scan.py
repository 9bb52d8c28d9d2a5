"""--scan: the per-layer table, scan.json, the eight scan_*.png plots, and scan_heatmaps.png."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..experiments.scan import RECORD_KEYS, ScanResult
from .common import notes_text, plt, progression_plot, save_fig

RESULT = ScanResult
TABLE_COLS = ("k_norm", "v_norm", "cos", "sink_attn", "mlp_out_log_norm", "k_spread", "v_spread", "mlp_out_spread")
# file stem -> (record key, variance key or None, y label, y-limit kind)
PLOTS = {
    "scan_knorm": ("k_norm", "k_norm_head_var", "‖K‖ (var across heads)", None),
    "scan_vnorm": ("v_norm", "v_norm_head_var", "‖V‖ (var across heads)", None),
    "scan_cosine": ("cos", "cos_head_var", "cos(Q[q>=max(4,t+1)], K) (var across heads)", "cosine"),
    "scan_sink_attn_mean": ("sink_attn", "sink_attn_head_var", "Attn(Q[q>=max(4,t+1)] -> K) (var across heads)",
                            "probability"),
    "scan_mlp_out_norm": ("mlp_out_log_norm", "mlp_out_log_norm_prompt_var", "log ‖MLP_out‖ (var across prompts)",
                          "log-norm"),
    "scan_k_spread": ("k_spread", "k_spread_head_var", "K spread (var across heads)", "spread"),
    "scan_v_spread": ("v_spread", "v_spread_head_var", "V spread (var across heads)", "spread"),
    # The reference's label claimed a head variance it never drew; this spread has no error bar.
    "scan_mlp_out_spread": ("mlp_out_spread", None, "MLP_out spread (no error bar: one value per layer)", "spread"),
}
# Only for models that have them (learned sinks: gpt-oss; gated attention: Qwen3-Next); N/A (null) otherwise.
OPTIONAL_COLS = ("p_sink", "attn_gate")
OPTIONAL_PLOTS = {
    "scan_p_sink": ("p_sink", "p_sink_head_var", "learned-sink mass, Q[q>=max(4,t+1)] (var across heads)",
                    "probability"),
    "scan_attn_gate": ("attn_gate", "attn_gate_head_var", "output gate sigmoid(g) at token t (var across heads)",
                       "probability"),
}


def _present(result: ScanResult) -> list[str]:
    """The optional columns this model has (some record holds a value)."""
    return [c for c in OPTIONAL_COLS if any(_num(r.get(c)) == _num(r.get(c)) for r in result.records)]


def heatmap_plot(result: ScanResult, path: Path) -> Path:
    n = len(result.layers)
    rows = 4
    cols = int(np.ceil(n / rows))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, l in zip(axes.flat, result.layers):  # row-major: L0..L7 on the first row
        ax.imshow(np.asarray(result.heatmaps[l], dtype=float), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"L{l} head {result.head}", fontsize=8)
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"mean attention map, head {result.head}; each cell averaged over the prompts that have it")
    fig.tight_layout()
    return save_fig(fig, path, dpi=150)


def json_name(result: ScanResult) -> str:
    return "scan_heatmaps.json" if result.heatmaps is not None else "scan.json"


def payload(result: ScanResult) -> dict:
    if result.heatmaps is not None:
        return {"head": result.head, "layers": result.layers, "maps": result.heatmaps,
                "cell_counts": result.heatmap_counts, "notes": result.notes}
    return {"layers": result.layers, "sinks": result.sinks, "keys": list(RECORD_KEYS), "records": result.records,
            "notes": result.notes}


def plots(result: ScanResult, outdir: Path) -> list[Path]:
    if result.heatmaps is not None:
        return [heatmap_plot(result, outdir / "scan_heatmaps.png")]
    out = []
    extra = {stem: spec for stem, spec in OPTIONAL_PLOTS.items() if spec[0] in _present(result)}
    for stem, (key, var, ylabel, kind) in {**PLOTS, **extra}.items():
        series = {}
        for t in result.sinks:
            rs = [r for r in result.records if r["sink_idx"] == t]
            series[f"sink={t}"] = ([_num(r[key]) for r in rs], [_num(r[var]) for r in rs] if var else None)
        out.append(progression_plot(outdir / f"{stem}.png", result.layers, series, ylabel, stem, kind))
    return out


def _num(v):
    return float("nan") if v is None else v


def table(result: ScanResult) -> str:
    if result.heatmaps is not None:
        return "\n".join(filter(None, [f"[Scan] attention maps of head {result.head}, layers "
                                       f"{result.layers[0]}..{result.layers[-1]}", notes_text(result.notes)]))
    cols = TABLE_COLS + tuple(_present(result))
    head = f"{'layer':>5} {'sink':>4} " + " ".join(f"{c:>16}" for c in cols)
    title = "[Scan] per layer and sink key; sink_attn and cos average queries q >= max(4, t+1)"
    if "p_sink" in cols:
        title += "; p_sink: mass on the learned sink over the same queries (sink_attn excludes it)"
    lines = [title, head]
    for r in result.records:
        mark = "" if r.get("softmax_attention", True) else "  (no softmax attention)"
        lines.append(f"{r['layer']:>5} {r['sink_idx']:>4} " + " ".join(_cell(r[c]) for c in cols) + mark)
    return "\n".join(filter(None, ["\n".join(lines), notes_text(result.notes)]))


def _cell(v) -> str:
    return f"{'N/A':>16}" if v is None or v != v else f"{v:>16.4e}"
