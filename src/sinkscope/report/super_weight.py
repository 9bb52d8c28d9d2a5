"""--ablate-super-weight: the before/after table, ablate_super_weight.json and the sink-attention plot."""

from __future__ import annotations

from pathlib import Path

from ..experiments.super_weight import SuperWeightResult
from ..fmt import format_table, format_value
from .common import notes_text, progression_plot

RESULT = SuperWeightResult
PAPER = "Yu et al. 2024, The Super Weight in Large Language Models"


def _loss_line(r: SuperWeightResult) -> str:
    lo = r.loss
    if lo.get("baseline") is None:
        return "[loss] pending: the next-token loss is not measured in this build"
    line = f"[loss] mean next-token loss {lo['baseline']:.4f} -> {lo['ablated']:.4f}"
    if lo.get("loss_change_ci95"):
        c = lo["loss_change_ci95"]
        line += f" (change {lo['loss_change']:+.4f}, 95% CI [{c[0]:+.4f}, {c[1]:+.4f}])"
    return line


def table(result: SuperWeightResult) -> str:
    r = result
    sw, s, m = r.super_weight, r.sink, r.massive
    lines = [f"[ablate-super-weight] {PAPER}: layer {sw['layer']} W_down[row {sw['row']}, col {sw['col']}] = "
             f"{sw['value']:.6g} zeroed (restored bit-identically afterwards); spike layers {r.spike_layers}; "
             f"{r.n_prompts} prompts"]
    rows = [("max |down output|", [m["baseline"]["out_max"], m["ablated"]["out_max"]], "sci"),
            ("mean max |h|", [m["baseline"]["h_max_mean"], m["ablated"]["h_max_mean"]], "sci"),
            (f"mean |h_0[{sw['row']}]|", [m["baseline"]["h_tok0_row_mean"], m["ablated"]["h_tok0_row_mean"]], "sci")]
    lines.append(format_table(["baseline", "ablated"], rows, title=f"massive activation at layer {sw['layer']}"))
    rows = [(f"L{l}", [s["baseline"][i], s["ablated"][i]], "float") for i, l in enumerate(r.layers)]
    rows.append((f"mean L{r.layers[0]}-{r.layers[-1]}", [s["baseline_mean"], s["ablated_mean"]], "float"))
    lines.append(format_table(["baseline", "ablated"], rows,
                              title="sink attention to token 0 (queries q >= 4, mean over heads)"))
    c = s["change_ci95"]
    lines.append(f"[sink] change {format_value(s['change'], 'float')} ({format_value(s['rel_change'], 'float')} "
                 f"relative), 95% CI [{format_value(c[0], 'float')}, {format_value(c[1], 'float')}] over "
                 f"{s['n_prompts']} prompts")
    lines.append(_loss_line(r))
    lines.append(notes_text(r.notes))
    return "\n".join(filter(None, lines))


def json_name(result: SuperWeightResult) -> str:
    return "ablate_super_weight.json"


def payload(result: SuperWeightResult) -> dict:
    r = result
    return {"paper": PAPER, "model_type": r.model_type, "n_prompts": r.n_prompts, "super_weight": r.super_weight,
            "spike_layers": r.spike_layers, "layers": r.layers, "massive": r.massive, "sink": r.sink,
            "loss": r.loss, "seed": r.seed, "notes": r.notes}


def plots(result: SuperWeightResult, outdir: Path) -> list[Path]:
    r = result
    s = r.sink
    data = {"baseline": (s["baseline"], s["baseline_head_var"]), "super weight zeroed": (s["ablated"],
                                                                                         s["ablated_head_var"])}
    sw = r.super_weight
    return [progression_plot(outdir / "ablate_super_weight_sink.png", r.layers, data,
                             "Attn(Q[q>=4] -> K[0]) (var across heads)",
                             f"Super weight L{sw['layer']} W_down[{sw['row']}, {sw['col']}] zeroed", "probability")]
