"""`--decompose-output --layer L` (MODES.md section 2): norm and spread of the block output Y = r + a + m and of
its three parts, per token, across prompts. Streamed: memory does not grow with the prompt count, and the
sums stay on the model's device until the end."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..result import Result
from .. import distributed, stats
from ..capture import Capture
from ..runner import RunContext

ROWS = ("norm_Y", "spread_Y", "norm_residual", "norm_attn", "norm_mlp", "spread_residual", "spread_attn",
        "spread_mlp")
PARTS = {"Y": None, "residual": "hook_resid_pre", "attn": "hook_attn_out", "mlp": "hook_mlp_out"}


@dataclass
class DecomposeOutputResult(Result):
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
    dev = ctx.lm.device
    sites = {f"blocks.{layer}.{s}": tokens for s in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out",
                                                     "hook_resid_post")}
    # Streaming stats.NormSpread state for every (part, token) at once, on the model's device (float64):
    # the number of rows, the sum of row norms and the sum of unit rows. One copy to the host at the end.
    kw = dict(dtype=torch.float64, device=dev)
    n = torch.zeros(len(PARTS), len(tokens), **kw)
    norm_sum = torch.zeros(len(PARTS), len(tokens), **kw)
    usum = torch.zeros(len(PARTS), len(tokens), D, **kw)
    mismatch = torch.zeros((), dtype=torch.float32, device=dev)
    def step(batch):
        nonlocal mismatch
        c = {k.split(".", 2)[2]: v.to(dev) for k, v in cap.forward(batch).items()}
        r, a, m = c["hook_resid_pre"], c["hook_attn_out"], c["hook_mlp_out"]
        y = r + a + m  # summed in fp32, as the reference does
        mismatch = torch.maximum(mismatch, (y - c["hook_resid_post"]).nan_to_num().abs().max())
        x = torch.stack([y, r, a, m]).double()                  # [4, B, T, D], in PARTS order
        ok = ~torch.isnan(x).any(-1, keepdim=True)              # valid_rows: the prompt has token t
        norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        n.add_(ok.sum(1).squeeze(-1))
        norm_sum.add_(torch.where(ok, norms, 0.0).sum(1).squeeze(-1))
        usum.add_(torch.where(ok, x / norms.clamp_min(stats.EPS), 0.0).sum(1))

    with Capture(ctx.lm, sites) as cap:
        ctx.for_each(f"decompose-output L{layer}", step)
    # data-parallel runs: the sums over every rank's prompts
    n, norm_sum, usum = (distributed.all_sum(t).cpu() for t in (n, norm_sum, usum))
    mismatch = distributed.all_max(mismatch)
    values = {}
    for row in ROWS:
        kind, part = row.split("_", 1)
        pi = list(PARTS).index(part)
        vals = []
        for ti in range(len(tokens)):
            cnt = int(n[pi, ti])
            if kind == "norm":
                vals.append(float(norm_sum[pi, ti]) / cnt if cnt else float("nan"))
            elif cnt < 2:  # stats.NormSpread.spread, from the streamed sums: undefined below 2 vectors
                vals.append(float("nan"))
            else:
                ubar = usum[pi, ti] / cnt
                vals.append(math.sqrt(max(0.0, 1.0 - float(ubar @ ubar)) / D))
        values[row] = vals
    n_prompts = [int(n[0, ti]) for ti in range(len(tokens))]
    notes = list(ctx.notes)
    if layer not in ctx.lm.attention_layers:  # hybrid models (Qwen3-Next): a linear token mixer, no softmax
        notes.append(f"block {layer} has no softmax attention: 'attn' is its {ctx.lm.adapter.linear_mixer} token "
                     f"mixer's output")
    for t, c in zip(tokens, n_prompts):
        if c < 2:
            notes.append(f"tok{t}: the spreads are N/A: a spread needs at least 2 prompts with token {t}, and {c} "
                         f"has it")
    return DecomposeOutputResult(
        layer=layer, tokens=tokens, values=values, n_prompts=n_prompts,
        n_skipped=[short[t] for t in tokens], max_abs_y_mismatch=float(mismatch), notes=notes)
