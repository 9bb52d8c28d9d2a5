"""The loss and the random controls' spread beside an intervention mode's sink table (experiments/effects.py):
one table per metric (sink attention over the later layers; next-token loss), and the JSON blocks `loss`,
`controls` and `effects`. A helper of the ablate_mlp_out and decompose_mlp_in reports (not a report of its own).
"""

from __future__ import annotations

import math

from ..experiments.effects import LEVEL, Outcome
from ..fmt import format_table

TITLES = {"sink": "sink attention, mean over L{a}-{b} per prompt", "loss": "next-token loss, NLL per token"}
COLUMNS = ["value", "value_ci95", "change", "change_ci95", "rel_change"]


def _f(x) -> str:
    return "N/A" if x is None or not math.isfinite(x) else f"{x:.4f}"


SMALL = 1e-3          # below this |x|, changes print as 2.6e-4 (short scientific), so CI cells stay < 20 chars


def _g(x) -> str:
    if x is None or not math.isfinite(x):
        return "N/A"
    if x != 0 and abs(x) < SMALL:
        mant, exp = f"{x:.1e}".split("e")
        return f"{mant}e{int(exp)}"
    return f"{x:.3g}"


def _ci(ci, fmt=_f) -> str:
    return "N/A" if ci is None or any(not math.isfinite(v) for v in ci) else f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def _pct(x) -> str:
    return "N/A" if x is None or not math.isfinite(x) else f"{100 * x:+.2f}%"


def metric_table(o: Outcome, metric: str, base_name: str = "baseline", labels: dict | None = None) -> str:
    labels = labels or {}
    rows = []
    eff = {r: e[metric] for r, e in o.effects.items() if metric in e}
    if eff:
        first = next(iter(eff.values()))
        rows.append((base_name, [_f(first["baseline"]), "", "", "", ""], "str"))
    for run, e in eff.items():
        rows.append((labels.get(run, run), [_f(e["value"]), _ci(e["value_ci95"]), _g(e["delta"]), _ci(e["delta_ci95"], _g),
                                            _pct(e["rel_change"])], "str"))
    c = o.controls.get(metric)
    if c:
        rows.append((f"random x{c['n']}: mean", [_f(c["mean"]), _ci(c["ci95"]), _g(c["change_mean"]),
                                                 _ci(c["change_ci95"], _g), _pct(c["rel_change"])], "str"))
        rows.append((f"random x{c['n']}: std", [_g(c["std"]), "", "", "", ""], "str"))
        rows.append((f"random x{c['n']}: min..max", [f"{min(c['values']):.4f}..{max(c['values']):.4f}", "", "", "",
                                                     ""], "str"))
    if not rows:
        return ""
    title = TITLES[metric].format(a=o.layers[0], b=o.layers[-1]) if o.layers else TITLES[metric]
    return format_table(COLUMNS, rows, title=f"[{metric}] {title}; change = paired over prompts; "
                                              f"{int(LEVEL * 100)}% bootstrap CIs over prompts (seed {o.seed})")


def tables(o: Outcome | None, labels: dict | None = None) -> str:
    """The sink and loss tables (empty when there is nothing to show)."""
    if o is None:
        return ""
    parts = [metric_table(o, m, labels=labels) for m in ("sink", "loss")]
    if o.n_controls:
        parts.append(f"[controls] {o.n_controls} random subspaces of the same rank, orthogonal to span(Q), seeds "
                     f"{o.control_seeds[0]} (the table's random column) and {o.n_controls - 1} drawn from it")
    return "\n".join(p for p in parts if p)


def payload(o: Outcome | None) -> dict:
    """JSON: loss per run, the effects with their CIs, and the controls (every value, mean, std, ci95)."""
    if o is None:
        return {"loss": None, "effects": None, "controls": None}
    controls = None
    if o.n_controls:
        controls = {"n": o.n_controls, "seeds": o.control_seeds, "level": LEVEL, **o.controls,
                    "sink_per_layer": {"layers": o.layers, "values": o.control_per_layer}}
    loss = dict(o.loss)
    if o.n_controls and o.control_loss and all(x is not None for x in o.control_loss):
        loss["random_controls"] = o.control_loss
        loss["random_controls_mean"] = sum(o.control_loss) / len(o.control_loss)
    return {"loss": loss, "effects": o.effects, "controls": controls}
