"""`--layer L --ablate-router forbid|force --expert E` (issue 9 section 2): does the sink depend on which expert
the sink token is routed to? At MoE block L the router's choice for token t (--ablate-tok, default 0) is
replaced, inside a context manager, by the model's own routing rule with expert E excluded (forbid) or forced into
the top-k (force); every other token is routed as usual and no weight is touched. Sink attention to t at every
later layer, and the loss where the build has it, against the unedited baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import distributed
from ..capture import Capture
from ..errors import UsageError
from ..moe import MoEMath, is_moe_layer, moe_layers, steer_router
from ..result import Result
from ..runner import RunContext
from .explain_ablate import sink_pass
from .mlp_common import Table, tokens_for
from .sinkattn import later_layers, series_rows

ROUTES = ("forbid", "force")


@dataclass
class AblateRouterResult(Result):
    layer: int
    route: str
    expert: int
    token: int
    model_type: str
    layers: list[int]
    series: dict                  # "baseline" / "<route> e<E>" -> SinkSeries
    loss: dict                    # same keys -> mean loss, or None where the build has no loss
    sink_table: Table
    routed_before: int            # prompts whose token t the model routes to E
    routed_after: int             # ... once the edit is applied (0 for forbid, all for force)
    n_prompts: int
    notes: list[str] = field(default_factory=list)


def check_router_args(lm, layer: int, route: str, expert) -> MoEMath:
    if route not in ROUTES:
        raise UsageError(f"--ablate-router must be forbid or force, not {route!r}")
    if not is_moe_layer(lm, layer):
        where = moe_layers(lm)
        raise UsageError(f"--ablate-router needs a mixture of experts at --layer {layer}; this "
                         f"{lm.adapter.model_type} model has " +
                         (f"MoE blocks {', '.join(map(str, where))}" if where else "no MoE block"))
    mm = MoEMath(lm, layer)
    if expert is None or not 0 <= int(expert) < mm.n_experts:
        raise UsageError(f"--expert {expert} is out of range: block {layer} has experts 0..{mm.n_experts - 1}")
    return mm


def _token_x(ctx: RunContext, layer: int, token: int) -> torch.Tensor:
    """x at `token` of MoE block `layer`, one row per prompt that has it (every rank's prompts)."""
    site = f"blocks.{layer}.hook_mlp_in"
    out = {site: torch.full((len(ctx.prompts), ctx.lm.config.hidden_size), float("nan"))}

    def step(batch):
        out[site][batch.index] = cap.forward(batch)[site][:, 0].float().cpu()

    with Capture(ctx.lm, {site: [token]}) as cap:
        ctx.for_each(f"ablate-router x L{layer}", step)
    x = distributed.merge_prompt_arrays(out, ctx.owned)[site]
    return x[~torch.isnan(x).any(-1)]


def run_ablate_router(ctx: RunContext, layer: int, route: str, expert: int, token: int = 0) -> AblateRouterResult:
    lm = ctx.lm
    layer = ctx.check_layer(layer)
    mm = check_router_args(lm, layer, route, expert)
    layers = later_layers(ctx, layer)
    tokens_for(ctx, token)
    if token != 0:
        raise UsageError("--ablate-router measures the sink at token 0; --ablate-tok must be 0")
    X = _token_x(ctx, layer, token).to(mm.device)
    before = int((mm.route(X)[1] == expert).any(-1).sum())
    kw = {"forbid": expert} if route == "forbid" else {"force": expert}
    after = int((mm.route(X, **kw)[1] == expert).any(-1).sum())
    name = f"{route} e{expert}"
    series, loss = {}, {}
    series["baseline"], loss["baseline"] = sink_pass(ctx, layers, desc="baseline", with_loss=True)
    series[name], loss[name] = sink_pass(ctx, layers, desc=f"router {name}", with_loss=True,
                                         edit=lambda state: steer_router(lm, layer, token, **kw))
    table = Table(f"[Sink attention to token {token}] ablate-router={route} expert={expert} L={layer}",
                  list(series), series_rows(layers, series))
    return AblateRouterResult(
        layer=layer, route=route, expert=int(expert), token=token, model_type=lm.adapter.model_type, layers=layers,
        series=series, loss=loss, sink_table=table, routed_before=before, routed_after=after,
        n_prompts=int(X.shape[0]), notes=list(dict.fromkeys(ctx.notes)))
