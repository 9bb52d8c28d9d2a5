"""`--find-mlp-subspace --layer L` on a mixture of experts (issue 9 section 2): which experts the router picks for
the sink token and the baselines, and which (expert, z dim) pairs write the sink token's massive channel.

z is the flat z of moe.py (z[off_e + j] = w_e z^e_j, every expert block side by side, the shared expert last), so
m = W_down z + bias exactly; the massive channel c (largest mean |m_c| at the sink token) is decomposed into the
contributions w_e W^e_down[c, j] z^e_j, whose sum (plus the routing-weighted down biases) must give the model's own
m_c: the closure error is printed. The super weight is W^e_down[c, j] of the top pair. --vec-idx and the top-energy
dims index the flat z (the same dims --ablate-mlp-out removes the W_down columns of).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import distributed, stats
from ..capture import Capture
from ..moe import SHARED, MoEMath
from ..result import Result
from ..runner import RunContext
from .mlp_common import check_te_args, choose_dims, tokens_for

TOP_PAIRS = 8   # (expert, dim) pairs listed


@dataclass
class MoESubspaceResult(Result):
    layer: int
    model_type: str
    tokens: list[int]
    sink_tok: int
    ref_tok: int
    n_experts: int
    top_k: int
    has_shared: bool
    routing: dict                 # token -> [{"expert", "n_prompts", "mean_weight"}] (most often chosen first)
    routing_sink: list            # per prompt: [[expert, weight], ...] at the sink token (router order: by expert)
    channel: int                  # the massive channel c: largest mean |m_c| at the sink token
    m_channel_mean: float
    closure_rel: float            # max over prompts ||W_down z + bias - m|| / ||m|| at the sink token (fp32)
    closure_channel_rel: float    # max over prompts |sum of contributions + bias_c - m_c| / |m_c|
    top_pairs: list               # [{"expert", "dim", "flat", "contribution", "share"}] by mean |contribution|
    super_weight: dict            # {"layer", "expert", "row", "col", "value", "param"}
    chosen_dims: list[int]
    chosen_pairs: list[str]
    dims_source: str
    te_candidates: list[int]
    te_median_mass: float
    empty_message: str | None
    n_prompts: int
    notes: list[str] = field(default_factory=list)


def _param(mm: MoEMath, expert, c: int, j: int) -> str:
    """Where the super weight sits in the model's own parameters."""
    spec = mm.spec
    if expert == SHARED:
        return f"{spec.shared}.down_proj.weight[{c}, {j}]"
    if spec.layout == "gpt_oss":   # stored [E, F, D]
        return f"{spec.experts}.down_proj[{expert}, {j}, {c}]"
    return f"{spec.experts}.down_proj[{expert}, {c}, {j}]"


def _routing_summary(mm: MoEMath, X: torch.Tensor) -> list[dict]:
    w, idx = mm.route(X)
    out = []
    for e in range(mm.n_experts):
        hit = idx == e
        n = int(hit.any(-1).sum())
        if n:
            out.append({"expert": e, "n_prompts": n, "mean_weight": float(w[hit].double().mean())})
    return sorted(out, key=lambda r: (-r["n_prompts"], -r["mean_weight"]))


def _capture_x_m(ctx: RunContext, layer: int, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """x (hook_mlp_in) and m (hook_mlp_out) of block `layer` at `tokens`: CPU fp32 [N, T, D] in prompt order, NaN
    where a prompt is too short (every rank's prompts in a data-parallel run)."""
    sites = {f"blocks.{layer}.{s}": tokens for s in ("hook_mlp_in", "hook_mlp_out")}
    N = len(ctx.prompts)
    out: dict[str, torch.Tensor] = {}

    def step(batch):
        for name, v in cap.forward(batch).items():
            out.setdefault(name, torch.full((N,) + tuple(v.shape[1:]), float("nan")))[batch.index] = v.float().cpu()

    with Capture(ctx.lm, sites) as cap:
        ctx.for_each(f"find-mlp-subspace (MoE) L{layer}", step)
    out = distributed.merge_prompt_arrays(out, ctx.owned)
    return out[f"blocks.{layer}.hook_mlp_in"], out[f"blocks.{layer}.hook_mlp_out"]


def run_moe_subspace(ctx: RunContext, layer: int, tokens=(0, 1, 8), sink_tok: int = 0, ref_tok: int = 8,
                     te_k: int = 3, te_mass: float = 0.55, vec_idx=None) -> MoESubspaceResult:
    lm = ctx.lm
    check_te_args(te_k, te_mass)
    tokens = tokens_for(ctx, *tokens, sink_tok, ref_tok)
    mm = MoEMath(lm, layer)
    x, m = _capture_x_m(ctx, layer, tokens)
    ti = tokens.index(sink_tok)
    dev = mm.device
    ok = ~torch.isnan(x[:, ti]).any(-1)
    X0, M0 = x[:, ti][ok].to(dev), m[:, ti][ok].to(dev)
    Z0 = mm.z(X0)                                                 # the flat z, at the sink token only
    z_sink = torch.full((x.shape[0], mm.F), float("nan"))
    z_sink[ok] = Z0.cpu()
    routing = {t: _routing_summary(mm, x[:, i][~torch.isnan(x[:, i]).any(-1)].to(dev)) for i, t in enumerate(tokens)}
    w0, idx0 = mm.route(X0)
    order = torch.argsort(idx0, dim=-1)
    routing_sink = [[[int(e), float(v)] for e, v in zip(idx0[r, order[r]], w0[r, order[r]])]
                    for r in range(X0.shape[0])]

    bias = mm.bias(X0)
    rec = Z0 @ mm.W_down.T + bias
    closure = float(((rec - M0).norm(dim=-1) / M0.norm(dim=-1).clamp_min(stats.EPS)).max())
    c = int(M0.abs().double().mean(0).argmax())
    C = mm.contributions(X0, c)                                                  # [N, F]
    closure_c = float(((C.sum(-1) + bias[:, c] - M0[:, c]).abs() / M0[:, c].abs().clamp_min(stats.EPS)).max())
    mean_c = C.double().mean(0)
    m_c = float(M0[:, c].double().mean())
    pairs = []
    for f in torch.sort(mean_c.abs(), descending=True, stable=True).indices[:TOP_PAIRS].tolist():
        e, j = mm.pair(f)
        pairs.append({"expert": e, "dim": j, "flat": f, "contribution": float(mean_c[f]),
                      "share": float(mean_c[f] / m_c) if m_c else None})
    top = pairs[0]
    sw = {"layer": layer, "expert": top["expert"], "row": c, "col": top["dim"],
          "value": float(mm.W_down[c, top["flat"]]), "param": _param(mm, top["expert"], c, top["dim"])}
    choice = choose_dims(z_sink, vec_idx, te_k, te_mass, sink_tok, layer, mm.F)
    return MoESubspaceResult(
        layer=layer, model_type=lm.adapter.model_type, tokens=tokens, sink_tok=sink_tok, ref_tok=ref_tok,
        n_experts=mm.n_experts, top_k=mm.top_k, has_shared=mm.has_shared, routing=routing,
        routing_sink=routing_sink, channel=c, m_channel_mean=m_c, closure_rel=closure,
        closure_channel_rel=closure_c, top_pairs=pairs, super_weight=sw, chosen_dims=choice.dims,
        chosen_pairs=[mm.label(f) for f in choice.dims], dims_source=choice.source,
        te_candidates=choice.te.candidates, te_median_mass=choice.te.median_mass, empty_message=choice.message,
        n_prompts=int(ok.sum()), notes=list(dict.fromkeys(ctx.notes)))
