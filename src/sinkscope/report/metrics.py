"""--metrics: the literature-metrics table (each paper named), metrics.json and four plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..experiments import litmetrics as lit
from ..experiments.metrics import MetricsResult
from ..fmt import format_table, format_value
from .common import notes_text, plt, save_fig

RESULT = MetricsResult
PAPERS = {
    "gu": "Gu et al. 2025, When Attention Sink Emerges in Language Models",
    "sun": "Sun et al. 2024, Massive Activations in Large Language Models",
    "yu": "Yu et al. 2024, The Super Weight in Large Language Models",
    "guo": "Guo et al. 2024, Active-Dormant Attention Heads",
}
SHOW_SECONDARY = 8   # table: the most frequent secondary sinks


def _f(v, fmt="float"):
    return format_value(v, fmt)


def _layer_table(r: MetricsResult) -> str:
    cols = [f"Sink_1^{r.epsilon:g}", "mean alpha_1", "dormant", "median |h|", "top-1 |h|", "massive", "z_max",
            "out_max"] + (["mean p_sink"] if r.p_sink is not None else [])
    rows = []
    for l in range(r.n_layers):
        n_mass = sum(m["count"] for m in r.massive if m["layer"] == l)
        a = r.gu_alpha[l]
        top = r.top3[l][0]["mean_abs"] if r.top3[l] else None
        vals = [_f(r.gu_sink_rate[l]), _f(None if a is None else sum(a) / len(a)), _f(r.dormant_frac[l]),
                _f(r.massive_median[l], "sci"), _f(top, "sci"), str(n_mass), _f(r.z_max[l], "sci"),
                _f(r.out_max[l], "sci")]
        if r.p_sink is not None:
            p = r.p_sink[l]
            vals.append(_f(None if p is None else sum(p) / len(p)))
        rows.append((f"L{l}", vals, "str"))
    return format_table(cols, rows, title="per layer (N/A: no softmax attention / no dense MLP in that block)")


def table(result: MetricsResult) -> str:
    r = result
    lines = [f"[metrics] {r.model_type}: {r.n_prompts} prompts, eps = {r.epsilon:g}"
             + (f", prompts cut to {r.metric_len} tokens" if r.metric_len else "")]
    lines.append(f"[{PAPERS['gu']}] Sink_1^{r.epsilon:g} (fraction of (layer, head) pairs with alpha_1 > eps, "
                 f"mean over prompts) = {_f(r.gu_sink_rate_model)}")
    if r.massive:
        pos = ", ".join(f"{p['position']} ({p['token']!r}{' ...' if p['n_tokens'] > 1 else ''}: {p['count']} "
                        f"prompts)" for p in r.massive_positions[:6])
        lines.append(f"[{PAPERS['sun']}] massive (|h| > {lit.SUN_MIN_ABS:g} and >= {lit.SUN_MEDIAN_RATIO:g} x "
                     f"median): first at layer {r.massive_first_layer}; dims {r.massive_dims}; positions {pos}")
    else:
        lines.append(f"[{PAPERS['sun']}] no massive activation (|h| > {lit.SUN_MIN_ABS:g} and >= "
                     f"{lit.SUN_MEDIAN_RATIO:g} x median) in any layer")
    sw = r.super_weight
    if sw:
        lines.append(f"[{PAPERS['yu']}] spike layers (out_max >= {lit.YU_SPIKE_RATIO:g} x the median layer's): "
                     f"{r.spike_layers}; super weight: layer {sw['layer']} W_down[row {sw['row']}, col {sw['col']}] = "
                     f"{sw['value']:.6g} (z_max {sw['z_max']:.4g}, out_max {sw['out_max']:.4g})")
    else:
        known = [v for v in r.out_max if v is not None]
        lines.append(f"[{PAPERS['yu']}] no spike (no layer's out_max >= {lit.YU_SPIKE_RATIO:g} x the median "
                     f"layer's)" if known else f"[{PAPERS['yu']}] N/A: no dense MLP")
    dorm = [d for d in r.dormant_frac if d is not None]
    lines.append(f"[{PAPERS['guo']}] dormant heads (alpha_1 > eps and ||v_0|| < mean ||v_t>0||): mean fraction "
                 f"{_f(sum(dorm) / len(dorm) if dorm else None)} over softmax-attention layers")
    sec = r.secondary_sinks[:SHOW_SECONDARY]
    lines.append(f"[secondary sinks] {len(r.secondary_sinks)} (position, token) pairs with head-mean alpha_t > eps "
                 f"(>= {lit.SECONDARY_MIN_QUERIES} queries) or a massive activation at t > 0"
                 + ("; most frequent: " + ", ".join(f"{s['position']} {s['token']!r} x{s['count']}" for s in sec)
                    if sec else ""))
    lines.append(_layer_table(r))
    lines.append(notes_text(r.notes))
    return "\n".join(filter(None, lines))


def json_name(result: MetricsResult) -> str:
    return "metrics.json"


def payload(result: MetricsResult) -> dict:
    r = result
    keys = ("model_type", "n_layers", "n_heads", "n_prompts", "epsilon", "metric_len", "attention_layers",
            "gu_alpha", "gu_sink_rate", "gu_sink_rate_model", "massive", "massive_median", "massive_first_layer",
            "massive_dims", "massive_positions", "top3", "z_max", "out_max", "z_argmax", "out_argmax",
            "spike_layers", "super_weight", "value_norm0", "value_norm_rest", "dormant_frac", "p_sink",
            "secondary_sinks", "notes")
    out = {k: getattr(r, k) for k in keys}
    out["papers"] = PAPERS
    out["rules"] = {"gu_epsilon": r.epsilon, "sun_min_abs": lit.SUN_MIN_ABS, "sun_median_ratio": lit.SUN_MEDIAN_RATIO,
                    "yu_spike_ratio": lit.YU_SPIKE_RATIO, "secondary_min_queries": lit.SECONDARY_MIN_QUERIES}
    return out


def _arr(vals) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in vals], dtype=float)


def plots(result: MetricsResult, outdir: Path) -> list[Path]:
    r = result
    L = np.arange(r.n_layers)
    out = []
    fig, ax = plt.subplots(figsize=(12, 5))
    ax.bar(L, np.nan_to_num(_arr(r.gu_sink_rate)))
    ax.set(xlabel="layer", ylabel=f"Sink_1^{r.epsilon:g}", ylim=(0, 1),
           title=f"{PAPERS['gu']}: Sink_1^{r.epsilon:g} per layer (model {_f(r.gu_sink_rate_model)})")
    out.append(save_fig(fig, outdir / "metrics_sink_rate.png", dpi=150))

    A = np.array([[np.nan] * r.n_heads if row is None else row for row in r.gu_alpha], dtype=float)
    fig, ax = plt.subplots(figsize=(max(6, r.n_heads * 0.5), max(5, r.n_layers * 0.25)))
    im = ax.imshow(A, aspect="auto", vmin=0, vmax=1, cmap="viridis", origin="lower")
    fig.colorbar(im, ax=ax, label="alpha_1 (mean over prompts)")
    ax.set(xlabel="head", ylabel="layer", title="alpha_1 per layer and head (Gu et al. 2025)")
    out.append(save_fig(fig, outdir / "metrics_alpha1_heatmap.png", dpi=150))

    fig, ax = plt.subplots(figsize=(12, 5))
    ax.plot(L, _arr(r.z_max), marker="o", label="max |z| (down-projection input)")
    ax.plot(L, _arr(r.out_max), marker="s", label="max |down-projection output|")
    ax.set_yscale("log")
    ax.set(xlabel="layer", ylabel="max |.|", title=f"{PAPERS['yu']}: down projection, per layer")
    ax.legend()
    ax.grid(alpha=0.3)
    out.append(save_fig(fig, outdir / "metrics_down_proj_max.png", dpi=150))

    fig, ax = plt.subplots(figsize=(12, 5))
    if r.massive:
        ax.scatter([m["layer"] for m in r.massive], [m["position"] for m in r.massive],
                   s=[10 + 60 * m["count"] / max(r.n_prompts, 1) for m in r.massive], alpha=0.5)
    ax.set(xlabel="layer", ylabel="position", xlim=(-0.5, r.n_layers - 0.5),
           title=f"{PAPERS['sun']}: massive activations (marker size: share of prompts)")
    out.append(save_fig(fig, outdir / "metrics_massive_positions.png", dpi=150))
    return out
