"""`explain`'s verdict: the claims table (where, who, what, A_causal, B_geometric) and a plain-words paragraph, both
generated from the steps' numbers. A model whose sink does not fit the MLP story gets "not found" or "different
mechanism" with the evidence; nothing here forces a story."""

from __future__ import annotations

import math

from .explain_core import Claim, ExplainResult, fci, fnum, pct, ranges


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def _where_claim(r: ExplainResult) -> Claim:
    w, t = r.steps["where"], r.thresholds
    th = {k: getattr(t, k) for k in ("epsilon", "birth_strong", "birth_weak", "massive_ratio")}
    births = w["birth_layers"]
    ex = [e if _finite(e) else -1 for e in w["excess"]]
    top = max(range(len(ex)), key=lambda l: ex[l])
    nums = {"birth_layers": births, "runs": w["runs"], "sink_layers": w["sink_layers"],
            "excess_at_births": {l: w["excess"][l] for l in births},
            "ratio0_at_births": {l: w["ratio0"][l] for l in births},
            "ratio_others_at_births": {l: w["ratio_others"][l] for l in births},
            "massive_after": {run[-1]: w["massive"][run[-1]] for run in w["runs"]},
            "largest_excess": {"layer": top, "excess": w["excess"][top]},
            "embedding_ratio": w["embedding_ratio"], "minor_jumps": w["minor_jumps"], "drops": w["drops"],
            "token0_is_bos": r.token0["is_bos"]}
    sinks = f"sink layers (sink attention to token 0 > {t.epsilon}): {ranges(w['sink_layers'])}"
    if births:
        parts = [f"block {l} (token 0's norm ×{fnum(w['ratio0'][l])}, other tokens' ×{fnum(w['ratio_others'][l])})"
                 for l in births]
        text = (f"Token 0's massive activation is born at {', '.join(parts)}, reaching "
                f"{fnum(w['massive'][births[-1]])}× the other tokens' norm; {sinks}")
        holds = bool(w["sink_layers"])
    elif w["embedding_massive"]:
        text = (f"No birth layer: token 0 is massive from the embedding on ({fnum(w['embedding_ratio'])}× the other "
                f"tokens' norm at block 0's input); {sinks}")
        holds = False
    else:
        text = (f"No birth layer: token 0's norm never jumps >= {t.birth_strong}× more than the other tokens' "
                f"(largest: {fnum(w['excess'][top])}× at block {top}); {sinks}")
        holds = False
    return Claim("where", text, holds, nums, th)


def _who_claim(r: ExplainResult) -> Claim:
    who, t = r.steps["who"], r.thresholds
    th = {"who_share": t.who_share}
    if not who:
        return Claim("who", "Not tested: there is no birth layer to decompose", None, {}, th)
    nums = {w["layer"]: {k: w[k] for k in ("share_mlp", "share_attn", "writer", "norm_m0", "norm_a0", "norm_r0",
                                           "norm_y0")} for w in who}
    parts = [f"block {w['layer']}: {'the MLP' if w['writer'] == 'mlp' else 'the attention' if w['writer'] == 'attention' else 'attention and MLP together'}"
             f" (share of ||a+m||²: MLP {pct(w['share_mlp'])}, attention {pct(w['share_attn'])}; "
             f"||m_0|| {fnum(w['norm_m0'])}, ||a_0|| {fnum(w['norm_a0'])})" for w in who]
    holds = all(w["writer"] == "mlp" for w in who)
    return Claim("who", "The MLP, not the attention, writes token 0's jump: " + "; ".join(parts), holds, nums, th)


def _what_claim(r: ExplainResult) -> Claim:
    what, t = r.steps["what"], r.thresholds
    th = {"energy_mass": t.energy_mass, "max_k": t.max_k}
    if not what:
        return Claim("what", "Not tested: there is no birth layer", None, {}, th)
    mlp = [w for w in what if w["kind"] == "mlp"]
    att = [w for w in what if w["kind"] == "attention"]
    uns = [w for w in what if w["kind"] == "unsupported"]
    if uns and not mlp and not att:
        return Claim("what", "Not tested: " + "; ".join(f"block {w['layer']}: {w['why']}" for w in uns), None,
                     {w["layer"]: {"why": w["why"]} for w in uns}, th)
    nums = {w["layer"]: ({"k": w["k"], "dims": w["dims"], "median_mass": w["masses"][w["k"] - 1] if w["reached"]
                          else w["masses"][-1], "reached": w["reached"], "super_weight": w["super_weight"]}
                         if w["kind"] == "mlp" else {"heads": w["top_heads"], "k_heads": w["k_heads"]}
                         if w["kind"] == "attention" else {"why": w["why"]})
            for w in what}
    parts = []
    for w in mlp:
        mass = w["masses"][w["k"] - 1] if w["reached"] else w["masses"][-1]
        parts.append(f"block {w['layer']}'s MLP writes it through {w['k']} z dim{'s' if w['k'] > 1 else ''} "
                     f"{'/'.join(map(str, w['dims']))} (median energy mass {mass:.4f}"
                     f"{' >= ' if w['reached'] else ' < '}{t.energy_mass}; W_down columns {'/'.join(map(str, w['dims']))})")
    for w in att:
        parts.append(f"block {w['layer']}'s attention writes it through head(s) {', '.join(map(str, w['top_heads']))} "
                     f"({pct(sum(h['share'] for h in w['heads'][:w['k_heads']]))} of its output)")
    holds = all(w["reached"] for w in mlp) if mlp and not att else (False if att and not mlp else None)
    if mlp and att:
        holds = False
    return Claim("what", "; ".join(parts), holds, nums, th)


def _a_claim(r: ExplainResult) -> Claim:
    a, t = r.steps["A_causal"], r.thresholds
    th = {"a_min_drop": t.a_min_drop, "a_control_tol": t.a_control_tol}
    if a.get("skipped"):
        return Claim("A_causal", f"Not tested: {a['skipped']}", None, {}, th)
    runs = {x["name"]: x for x in a["runs"]}
    base, joint = runs["baseline"], next(x for x in a["runs"] if x["kind"] == "joint")
    mag = runs.get("magnitude")
    c = a["controls"]
    drop = -joint["rel_change"]
    lo, hi = c["change_ci95"]
    tol = t.a_control_tol * c["baseline"]
    ctrl_zero = lo <= 0 <= hi
    ctrl_small = -tol <= lo and hi <= tol
    holds = bool(_finite(drop) and drop >= t.a_min_drop and (ctrl_zero or ctrl_small))
    later = a["layers_measured"]
    where = f"block{'s' if len(a['birth_layers']) > 1 else ''} {ranges(a['birth_layers'])}"
    text = (f"Removing the span of the chosen W_down columns from token 0's MLP output at {where}"
            f"{' (jointly)' if len(a['birth_layers']) > 1 else ''} lowers the mean sink attention over layers "
            f"{ranges(later)} from {base['value']:.3f} to {joint['value']:.3f} ({pct(drop)} lower; required "
            f">= {pct(t.a_min_drop)}); {c['n']} random equal-rank controls leave it at {c['mean']:.3f} ± {c['std']:.2g} "
            f"(95% CI of their change {fci(c['change_ci95'])}, "
            f"{'includes no change' if ctrl_zero else f'within ±{pct(t.a_control_tol)} of the baseline' if ctrl_small else 'excludes no change'})")
    if mag:
        text += f"; the magnitude ablation gives {mag['value']:.3f}"
    if base.get("loss") is not None and joint.get("loss") is not None:
        text += (f"; next-token loss {base['loss']:.3f} → {joint['loss']:.3f}"
                 + (f" (change 95% CI {fci(joint['loss_change_ci95'])})" if joint.get("loss_change_ci95") else "")
                 + f", controls {fnum(c.get('loss_mean'))}")
    nums = {"baseline": base["value"], "ablated": joint["value"], "drop": drop, "change_ci95": joint["change_ci95"],
            "controls_mean": c["mean"], "controls_std": c["std"], "controls_ci95": c["ci95"],
            "controls_change_ci95": c["change_ci95"], "controls_ci_includes_zero": ctrl_zero,
            "controls_ci_within_tol": ctrl_small, "magnitude": mag["value"] if mag else None,
            "singles": {x["name"]: x["value"] for x in a["runs"] if x["kind"] == "single"},
            "loss": {x["name"]: x.get("loss") for x in a["runs"]}, "layers_measured": later}
    return Claim("A_causal", text, holds, nums, th)


def _b_layer(lay: dict, t) -> dict:
    """Which groups pass at one layer (primary direction): {tested, passed, fails, holds, holds_without_shuffled}."""
    g = lay["directions"][0]["groups"]
    tested = [n for n in g if lay["informative"].get(n, True)]
    passed = {n: bool(_finite(g[n]["d"]) and g[n]["d"] >= t.b_min_d and _finite(g[n]["p"]) and g[n]["p"] <= t.b_max_p)
              for n in tested}
    fails = [n for n in tested if not passed[n]]
    rest = [n for n in tested if n != "shuffled"]
    return {"groups": g, "tested": tested, "passed": passed, "fails": fails, "holds": bool(tested) and not fails,
            "holds_without_shuffled": bool(rest) and all(passed[n] for n in rest)}


def _b_claim(r: ExplainResult) -> Claim:
    b, t = r.steps["B_geometric"], r.thresholds
    th = {"b_min_d": t.b_min_d, "b_max_p": t.b_max_p}
    if b.get("skipped"):
        return Claim("B_geometric", f"Not tested: {b['skipped']}", None, {}, th)
    parts, nums, holds = [], {}, True
    for lay in b["layers"]:
        e = _b_layer(lay, t)
        g = e["groups"]
        holds &= e["holds"]
        first = g[e["tested"][0]] if e["tested"] else next(iter(g.values()))
        nums[lay["layer"]] = {"dim": lay["primary_dim"], "token0_mean": first["mean0"], "token0_sd": first["sd0"],
                              "holds_without_shuffled": e["holds_without_shuffled"], "fails": e["fails"],
                              "groups": {n: {"mean": g[n]["mean"], "sd": g[n]["sd"], "d": g[n]["d"], "p": g[n]["p"],
                                             "n": g[n]["n"], "passes": e["passed"].get(n),
                                             "informative": n in e["tested"]} for n in g}}
        desc = ", ".join(f"{n} {g[n]['mean']:.2f}±{g[n]['sd']:.2f} (d {fnum(g[n]['d'])}, p {fnum(g[n]['p'], 2)}"
                         f"{'' if e['passed'][n] else ', fails'})" for n in e["tested"])
        s = (f"at block {lay['layer']}, along v1 of d z_{lay['primary_dim']}²/dx, token 0's MLP input sits at "
             f"{first['mean0']:.2f}±{first['sd0']:.2f} against {desc}")
        if not lay["informative"].get("shuffled", True):
            s += (" (the shuffled group is left out: shuffling keeps the special token first, so token 0 is the same "
                  "token in every shuffled prompt)")
        parts.append(s)
    return Claim("B_geometric", "Only token 0's MLP input lies along the driving direction: " + "; ".join(parts),
                 bool(holds), nums, th)


def _shuffled_only(r: ExplainResult) -> bool:
    """(B) fails only against the shuffled group: token 0 of shuffled prompts lies along the direction too."""
    c = r.claim("B_geometric")
    return c.holds is False and all(v["holds_without_shuffled"] and v["fails"] == ["shuffled"]
                                    for v in c.numbers.values())


def _verdict(r: ExplainResult) -> tuple[str, str]:
    w = r.steps["where"]
    c = {x.id: x for x in r.claims}
    writers = [x["writer"] for x in r.steps["who"]]
    if not r.birth_layers and w["embedding_massive"]:
        return "different mechanism", "token 0 is massive from the embedding on; no block gives birth to it"
    if not r.sink_layers:
        return "not found", f"no sink: no layer's sink attention to token 0 exceeds {r.thresholds.epsilon}"
    if not r.birth_layers:
        return "not found", "a sink, but no birth layer: token 0's norm never jumps through a block"
    if writers and all(x == "attention" for x in writers):
        return "different mechanism", (f"the attention, not the MLP, writes token 0's jump at block(s) "
                                       f"{ranges(r.birth_layers)}")
    core = all(c[i].holds for i in ("where", "who", "what", "A_causal"))
    mlp = [x for x in r.steps["what"] if x["kind"] == "mlp"]
    dims = "; ".join(f"z dims {'/'.join(map(str, x['dims']))}" for x in mlp)
    head = (f"block{'s' if len(r.birth_layers) > 1 else ''} {ranges(r.birth_layers)}'s MLP writes token 0's massive "
            f"activation through {dims}, and removing it removes the sink")
    if core and c["B_geometric"].holds:
        return "found", head + "; only token 0's MLP input lies along the driving direction"
    if core and _shuffled_only(r):
        return "found", head + ("; the MLP reads the first position, not the word (token 0 of shuffled prompts lies "
                                "along the same direction)")
    ids = ("where", "who", "what", "A_causal", "B_geometric")
    failed = [i for i in ids if c[i].holds is False]
    untested = [i for i in ids if c[i].holds is None]
    detail = "; ".join(x for x in ("fails: " + ", ".join(failed) if failed else "",
                                   "untested: " + ", ".join(untested) if untested else "") if x)
    return "partial", f"MLP-written birth at block(s) {ranges(r.birth_layers)}; {detail}"


def _token0_sentence(r: ExplainResult) -> str:
    tok = r.token0
    if tok["is_bos"]:
        return f"In {r.model}, token 0 is the BOS token {tok['token']!r} in every prompt."
    if tok["is_special"]:
        return f"In {r.model}, token 0 is a special token ({tok['token']!r} most often)."
    return (f"In {r.model}, token 0 is the prompt's first word, not a BOS ({tok['n_distinct']} distinct first tokens "
            f"over {r.n_prompts} prompts; most often {tok['text'].strip()!r}).")


def _summary(r: ExplainResult) -> str:
    w, t = r.steps["where"], r.thresholds
    s = [_token0_sentence(r)]
    s.append(f"It is a sink (sink attention to token 0 above {t.epsilon}) at layers {ranges(r.sink_layers)}."
             if r.sink_layers else f"No layer's sink attention to token 0 exceeds {t.epsilon}: there is no sink.")
    if r.birth_layers:
        b0, last = r.birth_layers[0], r.birth_layers[-1]
        s.append(f"Its massive activation is born at block{'s' if len(r.birth_layers) > 1 else ''} "
                 f"{ranges(r.birth_layers)}: token 0's norm grows ×{fnum(w['ratio0'][b0])} at block {b0} while the "
                 f"other tokens' change ×{fnum(w['ratio_others'][b0])}, reaching {fnum(w['norm0'][last])} "
                 f"({fnum(w['massive'][last])}× theirs).")
    elif w["embedding_massive"]:
        s.append(f"Token 0 is already massive in the embedding ({fnum(w['embedding_ratio'])}× the other tokens' "
                 f"norm at block 0's input): no block gives birth to it, a different mechanism from an MLP-written "
                 f"massive activation.")
    else:
        top = r.claim("where").numbers["largest_excess"]
        s.append(f"No block makes token 0's norm jump {t.birth_strong}× more than the other tokens' (at most "
                 f"{fnum(top['excess'])}× at block {top['layer']}): no birth layer, so nothing further is claimed.")
    for wh in r.steps["who"]:
        who = {"mlp": "the MLP", "attention": "the attention", "mixed": "the attention and the MLP together"}
        s.append(f"At block {wh['layer']}, {who[wh['writer']]} write{'s' if wh['writer'] != 'mixed' else ''} the "
                 f"jump (MLP share {pct(wh['share_mlp'])}, attention {pct(wh['share_attn'])}).")
    for x in r.steps["what"]:
        if x["kind"] == "mlp":
            m = x["masses"]
            s.append(f"It writes through {x['k']} z dim{'s' if x['k'] > 1 else ''} "
                     f"({', '.join(map(str, x['dims']))}): "
                     + (f"the smallest k whose dims hold a median {m[x['k'] - 1]:.4f} of z's energy at token 0 "
                        f"(>= {t.energy_mass}" + (f"; {x['k'] - 1} held {m[x['k'] - 2]:.3f})." if x["k"] > 1 else ").")
                        if x["reached"] else
                        f"even {x['k']} dims hold only {m[-1]:.3f} of z's energy (< {t.energy_mass}): not a "
                        f"low-rank write."))
        elif x["kind"] == "attention":
            s.append(f"At block {x['layer']}, head(s) {', '.join(map(str, x['top_heads']))} write most of it.")
        else:
            s.append(f"At block {x['layer']}, the write's dims were not analysed: {x['why']}.")
    a = r.claim("A_causal")
    if a.holds is not None:
        n = a.numbers
        s.append(f"Removing the span of those W_down columns from token 0's MLP output lowers the mean sink attention "
                 f"over layers {ranges(n['layers_measured'])} from {n['baseline']:.3f} to {n['ablated']:.3f} "
                 f"({pct(n['drop'])} lower), while {r.steps['A_causal']['controls']['n']} random equal-rank controls "
                 f"leave it at {n['controls_mean']:.3f}: (A) {'holds' if a.holds else 'does not hold'}.")
        runs = {x["kind"]: x for x in r.steps["A_causal"]["runs"]}
        if runs["baseline"].get("loss") is not None and runs["joint"].get("loss") is not None:
            s.append(f"The next-token loss goes from {runs['baseline']['loss']:.3f} to {runs['joint']['loss']:.3f} "
                     f"under the ablation (controls: {fnum(r.steps['A_causal']['controls'].get('loss_mean'))}).")
    elif r.birth_layers:
        s.append(f"(A) was not tested: {a.text[len('Not tested: '):]}.")
    b = r.claim("B_geometric")
    if b.holds is not None:
        for layer, v in b.numbers.items():
            g = v["groups"]
            apart = [f"{n} (d {fnum(g[n]['d'])})" for n in g if g[n]["informative"] and g[n]["passes"]]
            s.append(f"Along the driving direction of z_{v['dim']} at block {layer}, token 0's MLP input sits at "
                     f"{v['token0_mean']:.2f}±{v['token0_sd']:.2f}"
                     + (f", apart from {', '.join(apart)}" if apart else ""))
            fails = v["fails"]
            if fails == ["shuffled"]:
                sh = g["shuffled"]
                s[-1] += (f"; but token 0 of the shuffled prompts sits there too ({sh['mean']:.2f}±{sh['sd']:.2f}, "
                          f"d {fnum(sh['d'])}): the direction marks the first position, not the word. (B) holds "
                          f"against every other group and fails against the shuffled one, which is a finding.")
            elif fails:
                s[-1] += f"; it does not stand apart from {', '.join(fails)}: (B) does not hold."
            else:
                s[-1] += ": (B) holds against every baseline group."
    if w["minor_jumps"] or w["drops"]:
        bits = ([f"rises at block(s) {ranges(w['minor_jumps'])} (too little for a birth)"] if w["minor_jumps"]
                else []) + ([f"falls at block(s) {ranges(w['drops'])}"] if w["drops"] else [])
        s.append(f"Outside the birth layers, token 0's norm also {' and '.join(bits)}.")
    if w.get("large_mlp_writes"):
        after = [l for l in w["large_mlp_writes"] if r.birth_layers and l > max(r.birth_layers)]
        s.append(f"Token 0 also receives large MLP writes (>= {t.massive_ratio}× the other tokens') at block(s) "
                 f"{ranges(w['large_mlp_writes'])}" + (f"; those after the birth ({ranges(after)}) are left in place "
                                                       f"by (A)." if after and r.claim("A_causal").holds is False
                                                       else "."))
    s.append(f"Verdict: {r.verdict} — {r.headline}.")
    return " ".join(s)


def conclude(r: ExplainResult) -> ExplainResult:
    r.claims = [_where_claim(r), _who_claim(r), _what_claim(r), _a_claim(r), _b_claim(r)]
    r.verdict, r.headline = _verdict(r)
    r.summary = _summary(r)
    return r
