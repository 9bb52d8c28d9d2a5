"""`explain` results -> Markdown (report.md, and the text the CLI prints): the verdict first, then each step's table.
Reads result dataclasses only; never runs a model."""

from __future__ import annotations

import math

from ..experiments.explain_core import ExplainComparison, ExplainResult, ExplainThresholds, fci, fnum, pct, ranges

STEP_TITLES = {"where": "Where", "who": "Who", "what": "What", "A_causal": "(A) causal", "B_geometric": "(B) geometric"}


def _cell(x) -> str:
    s = x if isinstance(x, str) else fnum(x) if isinstance(x, (int, float)) else str(x)
    return s.replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _f(x, digits=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


# -- per-step tables (shared with the HTML report: header, rows) ----------------------------------------------------

def claims_rows(r: ExplainResult) -> list[list]:
    return [[c.id, c.mark, c.text, ", ".join(f"{k}={v}" for k, v in c.thresholds.items())] for c in r.claims]


def thresholds_rows(t: ExplainThresholds) -> list[list]:
    helps = ExplainThresholds.help()
    return [[name, str(value), helps[name]] for name, value in t.as_dict().items()]


def where_rows(r: ExplainResult) -> tuple[list[str], list[list]]:
    w = r.steps["where"]
    header = ["layer", "sink attn", "‖y‖/‖r‖ tok0", "‖y‖/‖r‖ others", "excess", "‖y_0‖", "‖y_0‖ / others",
              "‖m_0‖ / others", "marks"]
    rows = []
    for l in w["layers"]:
        marks = []
        if l in w["birth_layers"]:
            marks.append("BIRTH")
        if l in w["minor_jumps"]:
            marks.append("minor jump")
        if l in w["drops"]:
            marks.append("drop")
        if l in w["sink_layers"]:
            marks.append("sink")
        rows.append([l, _f(w["sink"][l]), fnum(w["ratio0"][l]), fnum(w["ratio_others"][l]), fnum(w["excess"][l]),
                     fnum(w["norm0"][l]), fnum(w["massive"][l]), fnum(w["mlp_ratio"][l]), ", ".join(marks)])
    return header, rows


def who_rows(r: ExplainResult) -> tuple[list[str], list[list]]:
    header = ["layer", "writer", "MLP share", "attn share", "‖r_0‖", "‖a_0‖", "‖m_0‖", "‖y_0‖", "‖a‖ others",
              "‖m‖ others"]
    return header, [[w["layer"], w["writer"], pct(w["share_mlp"]), pct(w["share_attn"]), fnum(w["norm_r0"]),
                     fnum(w["norm_a0"]), fnum(w["norm_m0"]), fnum(w["norm_y0"]), fnum(w["norm_a_others"]),
                     fnum(w["norm_m_others"])] for w in r.steps["who"]]


def what_rows(r: ExplainResult) -> tuple[list[str], list[list]]:
    header = ["layer", "kind", "chosen", "why", "details"]
    rows = []
    for w in r.steps["what"]:
        if w["kind"] == "mlp":
            det = (f"W_down column norms {', '.join(fnum(x) for x in w['W_down_col_norms'])}; "
                   f"top-{len(w['candidates'])} candidates {w['candidates']}; the same dims hold "
                   + ", ".join(f"{k} {pct(v)}" for k, v in w["dims_energy_others"].items())
                   + " of the other tokens' z energy")
            if w.get("super_weight"):
                sw = w["super_weight"]
                det += (f"; super weight W_down[{sw.get('row')}, {sw.get('col')}] = {fnum(sw.get('value'))} "
                        f"(column {'among' if sw['col_in_dims'] else 'not among'} the chosen dims)")
            rows.append([w["layer"], "MLP", f"z dims {w['dims']}", w["why"], det])
        elif w["kind"] == "unsupported":
            rows.append([w["layer"], "MLP (not analysed)", "-", w["why"], ""])
        else:
            rows.append([w["layer"], "attention", f"heads {w['top_heads']}",
                         f"the fewest heads holding >= {pct(r.thresholds.energy_mass)} of token 0's attention output",
                         ", ".join(f"h{h['head']} {pct(h['share'])}" for h in w["heads"])])
    return header, rows


def causal_rows(r: ExplainResult) -> tuple[list[str], list[list]]:
    a = r.steps["A_causal"]
    header = ["run", "edited layers", "later sink attn", "change", "relative", "95% CI of change", "loss",
              "loss change (95% CI)", "prompts"]
    if a.get("skipped"):
        return header, []

    def dloss(x):
        return "n/a" if x.get("loss_change") is None else f"{x['loss_change']:+.3g} {fci(x['loss_change_ci95'])}"
    rows = [[x["name"], ranges(x["edited_layers"]) if x["edited_layers"] else "-", _f(x["value"]),
             f"{x['change']:+.3g}", pct(x["rel_change"]), fci(x["change_ci95"]),
             _f(x.get("loss")), dloss(x) if x["kind"] != "baseline" else "-", x["n_prompts"]] for x in a["runs"]]
    c = a.get("controls")
    if c:
        le = c.get("loss_effect") or {}
        cl = "n/a" if not le else f"{le['change_mean']:+.3g} {fci(le['change_ci95'])}"
        rows.append([f"random controls (n={c['n']})", ranges(a["birth_layers"]),
                     f"{c['mean']:.3f} ± {c['std']:.2g}", f"{c['change']:+.3g}", pct(c["rel_change"]),
                     fci(c["change_ci95"]), _f(c.get("loss_mean")), cl, "-"])
    return header, rows


def geometric_rows(r: ExplainResult, layer: dict) -> tuple[list[str], list[list]]:
    t = r.thresholds
    header = ["z dim", "group", "n", "token 0 (mean ± sd)", "group (mean ± sd)", "Cohen's d", "perm. p", "passes"]
    # v1 is oriented so that token 0's mean projection is positive (d > 0: token 0 lies further along v1)
    rows = []
    for d in layer["directions"]:
        for name, g in d["groups"].items():
            inf = layer["informative"].get(name, True)
            ok = g["d"] >= t.b_min_d and g["p"] <= t.b_max_p if math.isfinite(g["d"]) and math.isfinite(g["p"]) \
                else False
            rows.append([str(d["dim"]), name, g["n"], f"{g['mean0']:.2f} ± {g['sd0']:.2f}", f"{g['mean']:.2f} ± {g['sd']:.2f}",
                         fnum(g["d"]), fnum(g["p"], 2),
                         ("✓" if ok else "✗") if inf else "n/a (same token)"])
    return header, rows


def metrics_lines(r: ExplainResult) -> list[str]:
    m = r.steps.get("metrics")
    if not m:
        return ["Not available in this run (see notes)."]
    out = []
    if "gu_sink_rate_model" in m:
        out.append(f"Sink_1^{r.thresholds.epsilon} (Gu et al. 2025): {fnum(m['gu_sink_rate_model'])}")
    if m.get("super_weight"):
        sw = m["super_weight"]
        out.append(f"Super weight (Yu et al. 2024): layer {sw.get('layer')}, W_down[{sw.get('row')}, {sw.get('col')}] = "
                   f"{fnum(sw.get('value'))}")
    elif "super_weight" in m:
        out.append("Super weight (Yu et al. 2024): none (no down-projection spike)")
    sec = m.get("secondary_sinks")
    if sec is not None:
        out.append("Secondary sinks: " + (", ".join(f"position {s.get('position')} {s.get('token')!r} "
                                                     f"({s.get('count')} prompts, max α {fnum(s.get('max_alpha'))})"
                                                     for s in sec[:10]) or "none"))
    return out


def provenance_rows(meta: dict | None) -> list[list]:
    if not meta:
        return [["provenance", "n/a"]]
    m, p, v = meta.get("model") or {}, meta.get("prompts") or {}, meta.get("versions") or {}
    return [["model", m.get("name")], ["model type", m.get("model_type")], ["source", m.get("source")],
            ["fingerprint", m.get("fingerprint")], ["revision", m.get("revision")], ["dtype", m.get("dtype")],
            ["device", m.get("device")], ["attention implementation", m.get("attn_implementation")],
            ["torch", v.get("torch")], ["transformers", v.get("transformers")], ["sinkscope", v.get("sinkscope")],
            ["prompt file", p.get("source")], ["prompt file sha256", p.get("sha256")], ["prompts", p.get("n")],
            ["seed", meta.get("seed")], ["command", meta.get("command") or "(Python API)"], ["time", meta.get("time")]]


def comparison_rows(c: ExplainComparison) -> tuple[list[str], list[list]]:
    rs = c.results
    header = [""] + [r.model for r in rs]

    def claim(r, cid):
        cl = r.claim(cid)
        if cid == "A_causal" and cl.holds is not None:
            return f"{cl.mark} {cl.numbers['baseline']:.2f} → {cl.numbers['ablated']:.2f} " \
                   f"(controls {cl.numbers['controls_mean']:.2f})"
        if cid == "B_geometric" and cl.holds is not None:
            parts = []
            for lay in cl.numbers.values():
                d = {n: g["d"] for n, g in lay["groups"].items() if g["informative"]}
                rest = [v for n, v in d.items() if n != "shuffled"]
                txt = f"min d {fnum(min(rest))}" if rest else ""
                if "shuffled" in d:
                    txt += f", shuffled d {fnum(d['shuffled'])}"
                if lay["fails"] == ["shuffled"]:
                    txt += " (fails only vs shuffled: the first position, not the word)"
                parts.append(txt.strip(", "))
            return f"{cl.mark} " + "; ".join(parts)
        return cl.mark

    def sink_rate(r):
        m = r.steps.get("metrics") or {}
        return fnum(m["gu_sink_rate_model"]) if "gu_sink_rate_model" in m else "n/a (metrics not available)"

    def super_weight(r):
        m = r.steps.get("metrics") or {}
        if "super_weight" not in m:
            return "n/a (metrics not available)"
        sw = m["super_weight"]
        return "none" if not sw else f"L{sw.get('layer')} [{sw.get('row')}, {sw.get('col')}] = {fnum(sw.get('value'))}"

    rows = [["verdict"] + [r.verdict for r in rs],
            ["token 0"] + [f"BOS {r.token0['token']!r}" if r.token0["is_bos"] else
                           f"first word ({r.token0['text'].strip()!r} most often)" for r in rs],
            ["layers"] + [r.n_layers for r in rs],
            ["sink layers"] + [ranges(r.sink_layers) for r in rs],
            ["birth layers"] + [ranges(r.birth_layers) for r in rs],
            ["mechanism"] + [", ".join(f"L{w['layer']} {w['writer']}" for w in r.steps["who"]) or "-" for r in rs],
            ["z dims"] + ["; ".join(f"L{w['layer']}: {w['dims']}" for w in r.steps["what"] if w["kind"] == "mlp")
                         or "-" for r in rs],
            ["(A) causal"] + [claim(r, "A_causal") for r in rs],
            ["(B) geometric"] + [claim(r, "B_geometric") for r in rs],
            ["Sink_1^ε (Gu et al.)"] + [sink_rate(r) for r in rs],
            ["super weight"] + [super_weight(r) for r in rs]]
    return header, rows


# -- documents -------------------------------------------------------------------------------------------------------

def render_result(r: ExplainResult, level: int = 1) -> str:
    h = "#" * level
    out = [f"{h} sinkscope explain: {r.model}", "",
           f"**Verdict: {r.verdict}** — {r.headline}.", "", r.summary, "",
           f"{h}# Claims", "", md_table(["id", "holds", "claim", "thresholds"], claims_rows(r)), "",
           f"{h}# Thresholds", "", md_table(["name", "value", "meaning"], thresholds_rows(r.thresholds)), "",
           f"{h}# Where", "", md_table(*where_rows(r)), ""]
    if r.steps["who"]:
        out += [f"{h}# Who", "", md_table(*who_rows(r)), "", f"{h}# What", "", md_table(*what_rows(r)), ""]
    a = r.steps["A_causal"]
    out += [f"{h}# (A) causal", ""]
    out += [f"Not run: {a['skipped']}.", ""] if a.get("skipped") else [
        f"Mean sink attention to token 0 over layers {ranges(a['layers_measured'])}.", "", md_table(*causal_rows(r)), ""]
    b = r.steps["B_geometric"]
    out += [f"{h}# (B) geometric", ""]
    if b.get("skipped"):
        out += [f"Not run: {b['skipped']}.", ""]
    for lay in b.get("layers", []):
        out += [f"Block {lay['layer']}: token 0's MLP input projected on v1 of d z_j²/dx (centred on the "
                f"{lay['centred_on']} mean).", "", md_table(*geometric_rows(r, lay)), ""]
    out += [f"{h}# Literature metrics", ""] + [f"- {x}" for x in metrics_lines(r)] + [""]
    out += [f"{h}# Cost", "", md_table(["step", "forward passes", "seconds"],
                                       [[k, fnum(r.passes.get(k)), fnum(r.seconds.get(k))]
                                        for k in dict.fromkeys(list(r.passes) + list(r.seconds))]), ""]
    out += [f"{h}# Provenance", "", md_table(["", ""], provenance_rows(r.meta)), ""]
    if r.notes:
        out += [f"{h}# Notes", ""] + [f"- {n}" for n in r.notes] + [""]
    return "\n".join(out)


def render(result) -> str:
    if isinstance(result, ExplainComparison):
        out = ["# sinkscope explain: " + " vs ".join(r.model for r in result.results), "",
               md_table(*comparison_rows(result)), ""]
        for r in result.results:
            out += [render_result(r, level=2), ""]
        return "\n".join(out)
    return render_result(result)
