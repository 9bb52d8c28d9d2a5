"""`--decompose-output --layer L` (MODES.md section 2): norm and spread of the block output Y = r + a + m and of
its three parts, per token, across prompts. Streamed: memory does not grow with the prompt count."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import stats
from ..capture import Capture
from ..runner import RunContext, valid_rows

ROWS = ("norm_Y", "spread_Y", "norm_residual", "norm_attn", "norm_mlp", "spread_residual", "spread_attn",
        "spread_mlp")
PARTS = {"Y": None, "residual": "hook_resid_pre", "attn": "hook_attn_out", "mlp": "hook_mlp_out"}


@dataclass
class DecomposeOutputResult:
    layer: int
    tokens: list[int]
    values: dict[str, list[float]]   # row name -> one value per token (the reference's rows)
    n_prompts: list[int]             # prompts that contributed, per token
    n_skipped: list[int]             # prompts too short for the token
    max_abs_y_mismatch: float        # max |(r + a + m) - y| over the run: the decomposition is exact
    notes: list[str] = field(default_factory=list)


def run_decompose_output(ctx: RunContext, layer: int, tokens=(0, 1, 8)) -> DecomposeOutputResult:
    layer = ctx.check_layer(layer)
    tokens = [int(t) for t in tokens]
    short = ctx.check_tokens(tokens)
    D = ctx.lm.config.hidden_size
    acc = {(part, t): stats.NormSpread(D) for part in PARTS for t in tokens}
    sites = {f"blocks.{layer}.{s}": tokens for s in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out",
                                                     "hook_resid_post")}
    mismatch = 0.0
    with Capture(ctx.lm, sites) as cap:
        for batch in ctx.iterate(f"decompose-output L{layer}"):
            c = {k.split(".", 2)[2]: v.cpu() for k, v in cap.forward(batch).items()}
            r, a, m = c["hook_resid_pre"], c["hook_attn_out"], c["hook_mlp_out"]
            y = r + a + m  # summed in fp32, as the reference does
            mismatch = max(mismatch, float((y - c["hook_resid_post"]).nan_to_num().abs().max()))
            parts = {"Y": y, "residual": r, "attn": a, "mlp": m}
            for i, t in enumerate(tokens):
                for part, x in parts.items():
                    acc[(part, t)].update(valid_rows(x[:, i]))
    values = {}
    for row in ROWS:
        kind, part = row.split("_", 1)
        values[row] = [getattr(acc[(part, t)], kind)() for t in tokens]
    return DecomposeOutputResult(
        layer=layer, tokens=tokens, values=values, n_prompts=[acc[("Y", t)].n for t in tokens],
        n_skipped=[short[t] for t in tokens], max_abs_y_mismatch=mismatch, notes=list(ctx.notes))
