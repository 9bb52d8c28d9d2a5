"""--ablate-router: the sink-attention table with the loss, ablate_router_{route}_e{E}_L{L}.json and its plot."""

from __future__ import annotations

from pathlib import Path

from ..experiments.ablate_router import AblateRouterResult
from ..fmt import format_table
from .ablate_mlp_out import series_payload, sink_plot
from .common import notes_text

RESULT = AblateRouterResult


def table(result: AblateRouterResult) -> str:
    r = result
    lines = [f"[ablate-router] route={r.route} expert={r.expert} L={r.layer}: token {r.token} is routed to expert "
             f"{r.expert} in {r.routed_before}/{r.n_prompts} prompts by the model, in {r.routed_after}/{r.n_prompts} "
             f"with the edit (the model's routing rule with expert {r.expert} "
             f"{'excluded' if r.route == 'forbid' else 'forced into the top-k'}); other tokens untouched"]
    lines.append(format_table(r.sink_table.columns, r.sink_table.rows, title=r.sink_table.title))
    lines.append("[loss] " + ", ".join(f"{k}: {'n/a (this build measures no loss)' if v is None else f'{v:.4f}'}"
                                       for k, v in r.loss.items()))
    lines.append(notes_text(r.notes))
    return "\n".join(filter(None, lines))


def json_name(result: AblateRouterResult) -> str:
    return f"ablate_router_{result.route}_e{result.expert}_L{result.layer}.json"


def payload(result: AblateRouterResult) -> dict:
    r = result
    return {"layer": r.layer, "route": r.route, "expert": r.expert, "token": r.token, "model_type": r.model_type,
            "layers": r.layers, "columns": r.sink_table.columns, "table": r.sink_table.as_dict(),
            "series": series_payload(r.series), "loss": r.loss, "routed_before": r.routed_before,
            "routed_after": r.routed_after, "n_prompts": r.n_prompts, "notes": r.notes}


def plots(result: AblateRouterResult, outdir: Path) -> list[Path]:
    r = result
    return [sink_plot(outdir / f"ablate_router_{r.route}_e{r.expert}_L{r.layer}.png", r.layers, r.series, r.token,
                      f"Sink attention, router {r.route} expert {r.expert} at L={r.layer} | token={r.token}")]
