"""`explain`'s one observation pass: everything the steps that only read activations need, for every layer, in one
streamed forward per batch (Capture; no intervention).

Per layer l and prompt n, at token 0, token 1, token 8 and seeded random later positions ("the tokens"):
* the norms of r (block input), a (attention output), m (MLP output), y (block output), and a.m;
* the head-mean sink attention to key 0 (the scan's definition: queries q >= 4), and its per-head prompt mean;
* at token 0, what each attention head writes: W_O[:, head] v_head(0) (token 0 attends only to itself, so its
  attention output before any post-norm is the sum of these and the o-projection bias; checked per layer);
* at the layers in `xz_layers`: the MLP input x at the tokens and z (the down projection's input) at token 0.

The tokens differ per prompt (the random positions), so the residual sites are read whole and gathered inside the
hook (a reducer); only [B, T, D] per site leaves the hook. x and z are kept for every layer when they fit
`XZ_BUDGET_BYTES`; otherwise explain runs `observe(..., full=False)` again for the birth layers only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import stats
from ..arch import down_weight, get_module
from ..capture import Capture
from ..hooks import site_available
from ..moe import is_moe_layer
from ..runner import QUERY_START, RunContext
from .sinkattn import pattern_reducer

PARTS = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")   # r, a, m, y
XZ_BUDGET_BYTES = 1 << 30


@dataclass
class Observation:
    layers: list[int]
    positions: torch.Tensor                  # [N, T] the token positions read per prompt (-1: missing)
    labels: list[str]                        # one per column of positions, e.g. tok0 tok1 tok8 rand1 rand2
    norms: torch.Tensor | None = None        # [N, L, 4, T] ||r||, ||a||, ||m||, ||y|| (NaN: missing)
    dot_am: torch.Tensor | None = None       # [N, L, T] a.m
    sink: torch.Tensor | None = None         # [N, L] head-mean sink attention to key 0 (NaN: no query >= 4)
    sink_heads: list | None = None           # [L] per-head prompt means ([H] lists)
    head_share: torch.Tensor | None = None   # [N, L, H] head h's share of token 0's pre-norm attention output
    head_norm: torch.Tensor | None = None    # [N, L, H] ||W_O[:, h] v_h(0)||
    head_check: list = field(default_factory=list)  # [L] max rel. error of (sum of heads + bias) vs a (NaN: n/a)
    x: dict = field(default_factory=dict)    # layer -> [N, T, D] MLP input at the tokens
    z0: dict = field(default_factory=dict)   # layer -> [N, F] z at token 0


def xz_bytes(n_prompts: int, n_layers: int, n_tokens: int, d_model: int, d_ffn: int) -> int:
    return 4 * n_prompts * n_layers * (n_tokens * d_model + d_ffn)


def _gather(positions: torch.Tensor):
    """Reducer: [B, S, D] -> [B, T, D] at each prompt's own positions (NaN where missing)."""
    def reduce(t: torch.Tensor, batch) -> torch.Tensor:
        p = positions[batch.index]
        ok = (p >= 0) & (p < batch.lengths.view(-1, 1))
        idx = p.clamp(0, t.shape[1] - 1).to(t.device)
        out = torch.gather(t, 1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1])).float()
        return out.masked_fill(~ok.to(t.device).unsqueeze(-1), float("nan"))
    return reduce


def dense_mlp(lm, layer: int) -> bool:
    return (not is_moe_layer(lm, layer) and site_available(lm, layer, "mlp.hook_post") is None
            and site_available(lm, layer, "hook_mlp_in") is None)


def _o_proj(lm, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    mod = get_module(lm.layers[layer], lm.adapter.o)
    b = getattr(mod, "bias", None)
    return down_weight(mod).to(lm.device), None if b is None else b.detach().float().to(lm.device)


def observe(ctx: RunContext, positions: torch.Tensor, labels: list[str], xz_layers=(), full: bool = True,
            desc: str = "observation pass") -> Observation:
    """One pass over the prompts; see the module docstring. full=False reads only x and z at `xz_layers`
    (stopping after the last of them)."""
    lm = ctx.lm
    L, N, T = lm.n_layers, len(ctx.prompts), positions.shape[1]
    # x and z only where the block has a dense MLP (z of a mixture of experts is not supported yet)
    xz_layers = sorted(int(l) for l in xz_layers if dense_mlp(lm, int(l)))
    layers = list(range(L)) if full else xz_layers
    att = set(lm.attention_layers) if full else set()      # hybrid models: no softmax attention in some blocks
    obs = Observation(layers=layers, positions=positions, labels=list(labels))
    gather = _gather(positions)
    sites: dict = {}
    reduce = {"hook_mlp_in": gather}
    if full:
        reduce.update({s: gather for s in PARTS})
        reduce["attn.hook_pattern"] = pattern_reducer([0])
        sinks = lm.adapter.has_learned_sinks
        reduce["attn.hook_sink_prob"] = lambda p, batch: p[:, :, 0]      # [B, H]: the sink's mass at query 0
        for l in layers:
            sites.update({f"blocks.{l}.{s}": None for s in PARTS})
            if l in att:
                sites[f"blocks.{l}.attn.hook_pattern"] = [0]
                sites[f"blocks.{l}.attn.hook_v"] = [0]
                if sinks:
                    sites[f"blocks.{l}.attn.hook_sink_prob"] = None
        H = lm.config.num_attention_heads
        obs.norms = torch.full((N, L, 4, T), float("nan"))
        obs.dot_am = torch.full((N, L, T), float("nan"))
        obs.sink = torch.full((N, L), float("nan"))
        obs.head_share = torch.full((N, L, H), float("nan"))
        obs.head_norm = torch.full((N, L, H), float("nan"))
        head_acc = [stats.MeanVar((H,)) for _ in range(L)]
        check = [0.0] * L
        o_proj = {l: _o_proj(lm, l) for l in layers if l in att}
        post_norm = lm.adapter.attn_post_norm is not None
    for l in xz_layers:
        sites[f"blocks.{l}.hook_mlp_in"] = None
        sites[f"blocks.{l}.mlp.hook_post"] = [0]
    for l in xz_layers:
        obs.x[l] = None
        obs.z0[l] = None

    def step(batch) -> None:       # fills obs in place once the forward has succeeded
        c = cap.forward(batch)
        idx = batch.index
        for l in xz_layers:
            x, z = c[f"blocks.{l}.hook_mlp_in"].cpu(), c[f"blocks.{l}.mlp.hook_post"][:, 0].float().cpu()
            if obs.x[l] is None:
                obs.x[l] = torch.full((N,) + tuple(x.shape[1:]), float("nan"))
                obs.z0[l] = torch.full((N, z.shape[-1]), float("nan"))
            obs.x[l][idx], obs.z0[l][idx] = x, z
        if not full:
            return
        ok = batch.lengths > QUERY_START
        for l in layers:
            r, a, m, y = (c[f"blocks.{l}.{s}"] for s in PARTS)          # [B, T, D] fp32
            obs.norms[idx, l] = torch.stack([r, a, m, y], 1).norm(dim=-1).cpu()
            obs.dot_am[idx, l] = (a.double() * m.double()).sum(-1).float().cpu()
            if l not in att:
                continue
            p = c[f"blocks.{l}.attn.hook_pattern"][:, :, 0].float().cpu()  # [B, H]
            obs.sink[idx[ok], l] = p[ok].mean(-1)
            head_acc[l].update(p[ok])
            v = c[f"blocks.{l}.attn.hook_v"][:, 0].float()                  # [B, H, d]
            W, bias = o_proj[l]
            if W.device != v.device:          # a model spread over several devices
                W, bias = W.to(v.device), None if bias is None else bias.to(v.device)
                o_proj[l] = (W, bias)
            Hh, d = v.shape[1], v.shape[2]
            w = torch.einsum("bhd,ohd->bho", v, W.view(W.shape[0], Hh, d))  # [B, H, D]
            if sinks:   # learned sinks: query 0 gives key 0 only 1 - p_sink of its attention
                w = w * (1 - c[f"blocks.{l}.attn.hook_sink_prob"].float()).unsqueeze(-1)
            pre = w.sum(1) + (0 if bias is None else bias)
            obs.head_share[idx, l] = ((w * pre.unsqueeze(1)).sum(-1)
                                      / (pre * pre).sum(-1, keepdim=True).clamp_min(stats.EPS)).cpu()
            obs.head_norm[idx, l] = w.norm(dim=-1).cpu()
            if not post_norm:
                a0 = a[:, 0]
                good = ~torch.isnan(a0).any(-1)
                if bool(good.any()):
                    err = ((pre[good] - a0[good]).norm(dim=-1) / a0[good].norm(dim=-1).clamp_min(stats.EPS))
                    check[l] = max(check[l], float(err.max()))

    with Capture(lm, sites, reduce=reduce) as cap:
        ctx.for_each(desc, step)            # a batch that runs out of memory is split and retried
    if full:
        obs.sink_heads = [acc.mean().tolist() for acc in head_acc]
        obs.head_check = [float("nan") if post_norm or l not in att else e for l, e in enumerate(check)]
    return obs
