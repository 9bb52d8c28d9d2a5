"""--find-mlp-subspace on a mixture of experts: the router's choice, the massive channel's (expert, dim)
decomposition with its closure error, the top pairs and the super weight; find_mlp_subspace_L{L}.json."""

from __future__ import annotations

from ..experiments.moe_subspace import MoESubspaceResult
from .common import notes_text

RESULT = MoESubspaceResult


def _expert(e) -> str:
    return "shared" if e == "shared" else f"e{e}"


def table(result: MoESubspaceResult) -> str:
    r = result
    lines = [f"[MoE] layer={r.layer} {r.model_type}: {r.n_experts} experts, top-{r.top_k}"
             + (", plus a shared expert" if r.has_shared else "") + f"; {r.n_prompts} prompts at tok{r.sink_tok}"]
    for t in r.tokens:
        picks = ", ".join(f"{_expert(p['expert'])} ({p['n_prompts']} prompts, mean w {p['mean_weight']:.3f})"
                          for p in r.routing[t])
        lines.append(f"[router] tok{t}: {picks or '-'}")
    lines.append(f"[massive channel] c={r.channel}: mean m_c at tok{r.sink_tok} = {r.m_channel_mean:.4g}")
    lines.append(f"[closure] sum of w_e W^e_down[:, j] z^e_j (+ down biases) vs the model's m at tok{r.sink_tok} "
                 f"(fp32): max rel error {r.closure_rel:.2e} (whole vector), {r.closure_channel_rel:.2e} (channel c)")
    lines.append(f"[top (expert, dim) pairs at channel {r.channel}] (mean contribution, share of m_c)")
    for p in r.top_pairs:
        share = "n/a" if p["share"] is None else f"{p['share']:+.3f}"
        lines.append(f"  {_expert(p['expert']):>7} dim {p['dim']:<6d} {p['contribution']:+.4g}  {share}")
    sw = r.super_weight
    lines.append(f"[super weight] (layer {sw['layer']}, expert {_expert(sw['expert'])}, row {sw['row']}, col "
                 f"{sw['col']}) = {sw['value']:.4g}  ({sw['param']})")
    if r.empty_message:
        lines.append(f"[MLP subspace] {r.empty_message}")
    else:
        lines.append(f"[MLP subspace] chosen flat z dims {r.chosen_dims} = {r.chosen_pairs} ({r.dims_source}; "
                     f"top-energy candidates {r.te_candidates}, median mass {r.te_median_mass:.4f})")
    lines.append(notes_text(r.notes))
    return "\n".join(filter(None, lines))


def json_name(result: MoESubspaceResult) -> str:
    return f"find_mlp_subspace_L{result.layer}.json"


def payload(result: MoESubspaceResult) -> dict:
    r = result
    return {"layer": r.layer, "model_type": r.model_type, "mlp_kind": "moe", "tokens": r.tokens,
            "sink_tok": r.sink_tok, "ref_tok": r.ref_tok, "n_experts": r.n_experts, "top_k": r.top_k,
            "has_shared": r.has_shared, "routing": {f"tok{t}": v for t, v in r.routing.items()},
            "routing_sink_per_prompt": r.routing_sink, "channel": r.channel, "m_channel_mean": r.m_channel_mean,
            "closure_rel": r.closure_rel, "closure_channel_rel": r.closure_channel_rel, "top_pairs": r.top_pairs,
            "super_weight": r.super_weight, "chosen_dims": r.chosen_dims, "chosen_pairs": r.chosen_pairs,
            "dims_source": r.dims_source, "te_candidates": r.te_candidates, "te_median_mass": r.te_median_mass,
            "empty_message": r.empty_message, "n_prompts": r.n_prompts, "notes": r.notes}
