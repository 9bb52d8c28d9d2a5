"""`--metrics`: the literature's sink metrics, per layer and head, in one streamed pass (definitions: litmetrics.py).

One Capture over every block reduces, inside the hooks, each batch to what the metrics need:
* attn.hook_pattern -> Gu et al.'s alpha per key [B, H, S] (column means over the queries that see each key);
* attn.hook_v -> ||v_0|| and the mean ||v_t||, t > 0, per head (Guo et al.);
* hook_resid_post -> each prompt's median |h|, its top-3 |h| and its massive activations (Sun et al.);
* attn.hook_sink_prob (learned sinks only) -> the mean p_sink over a prompt's queries, per head;
* a read-only forward hook on the down projection -> max |z| and max |output|, and z at the output's max
  (Yu et al.); blocks without a dense MLP (mixture of experts) are N/A.
Nothing of size [N, S, S] (or [N, S, D]) is kept: per batch, [B, H, S] at most per layer; across batches, running
sums and maxima. Blocks without softmax attention (hybrid models) have N/A attention metrics.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .. import distributed
from ..arch import down_weight
from ..capture import Capture
from ..hooks import ShapeTracker, SiteUnavailable, locate, shape_hooks, site_available
from ..promptset import truncate_to
from ..result import Result
from ..runner import RunContext
from . import litmetrics as lit


@dataclass
class MetricsResult(Result):
    model_type: str
    n_layers: int
    n_heads: int
    n_prompts: int
    epsilon: float
    metric_len: int | None
    attention_layers: list[int]
    gu_alpha: list                      # [layer][head] mean over prompts of alpha_1 (None: no softmax attention)
    gu_sink_rate: list                  # [layer] Sink_1^eps (None: no softmax attention)
    gu_sink_rate_model: float | None
    massive: list                       # {layer, position, dim, value (mean), max_abs, token (commonest), n_tokens,
    #                                     count (prompts)}
    massive_median: list                # [layer] mean over prompts of each prompt's median |h|
    massive_first_layer: int | None
    massive_dims: list[int]
    massive_positions: list             # {position, token, n_tokens, count}: prompts massive there (any layer)
    top3: list                          # [layer] [{rank, mean_abs, position, dim, token, share}]
    z_max: list                         # [layer] max |down-projection input| (None: no dense MLP)
    out_max: list                       # [layer] max |down-projection output|
    z_argmax: list                      # [layer] the channel of z_max
    out_argmax: list                    # [layer] the channel of out_max
    spike_layers: list[int]
    super_weight: dict | None           # {layer, row, col, value, z_max, out_max}
    value_norm0: list                   # [layer][head] mean ||v_0||
    value_norm_rest: list               # [layer][head] mean over prompts of the mean ||v_t||, t > 0
    dormant_frac: list                  # [layer]
    p_sink: list | None                 # [layer][head] mean learned-sink probability (None: no learned sinks)
    secondary_sinks: list               # {position, token, count, max_alpha, massive_count}
    notes: list[str] = field(default_factory=list)


def token_text(lm, tok_id: int) -> str:
    tok = lm.tokenizer
    return str(tok_id) if tok is None else tok.decode([int(tok_id)])


def dense_down_layers(lm) -> list[int]:
    """Blocks with one dense down projection to hook (a mixture of experts has none: its z, where sinkscope
    computes it, is a weighted sum over experts)."""
    out = []
    for l in range(lm.n_layers):
        if site_available(lm, l, "mlp.hook_post") is not None:
            continue
        try:
            locate(lm, l, "mlp.hook_post")
        except SiteUnavailable:
            continue
        out.append(l)
    return out


class DownTaps:
    """Read-only forward hooks on the down projections: per layer the max |z| and max |output| over the pass, and z
    at the output's max (for the super weight's column). Set `batch` before each forward (lengths, prompt ids)."""

    def __init__(self, lm, layers):
        self.lm, self.layers = lm, list(layers)
        self.z_max = {l: (-1.0, -1) for l in self.layers}               # (value, channel)
        self.out_max = {l: (-1.0, -1, -1, -1) for l in self.layers}     # (value, prompt, position, channel)
        self.z_at = {}                                                  # layer -> [F] z at the output's max
        self.batch = None

    def _hook(self, l, shapes):
        def hook(module, args, out):
            z = shapes.unflatten(args[0] if args else None).detach()
            o = shapes.unflatten(out[0] if isinstance(out, tuple) else out).detach()
            lengths = self.batch.lengths
            zv, _, _, zc = lit.abs_max_where(z, lengths)
            if zv > self.z_max[l][0]:
                self.z_max[l] = (zv, zc)
            ov, b, s, c = lit.abs_max_where(o, lengths)
            if ov > self.out_max[l][0]:
                self.out_max[l] = (ov, int(self.batch.index[b]), s, c)
                self.z_at[l] = z[b, s].float().cpu().clone()
        return hook

    @contextmanager
    def attached(self):
        shapes, handles = ShapeTracker(), []
        try:
            handles += shape_hooks(self.lm, shapes)
            for l in self.layers:
                module, _, _ = locate(self.lm, l, "mlp.hook_post")      # the down projection itself
                handles.append(module.register_forward_hook(self._hook(l, shapes)))
            yield self
        finally:
            for h in handles:
                h.remove()

    def merge_ranks(self) -> None:
        """Data-parallel runs: the maxima over every rank's prompts (z at the output's max from its rank)."""
        if distributed.world_size() == 1:
            return
        for z_max, out_max, z_at in distributed.gather((self.z_max, self.out_max, self.z_at)):
            for l in self.layers:
                if z_max[l][0] > self.z_max[l][0]:
                    self.z_max[l] = z_max[l]
                if out_max[l][0] > self.out_max[l][0]:
                    self.out_max[l], self.z_at[l] = out_max[l], z_at[l]

    def summary(self) -> dict:
        """z_max/out_max/argmax per layer (None without a dense MLP), the spike layers and the super weight."""
        L = self.lm.n_layers
        get = lambda d, i: [d[l][i] if l in d and d[l][0] >= 0 else None for l in range(L)]  # noqa: E731
        z_max, out_max = get(self.z_max, 0), get(self.out_max, 0)
        spikes = lit.spike_layers(out_max)
        sw = None
        if spikes:
            l = spikes[0]
            module, _, _ = locate(self.lm, l, "mlp.hook_post")
            c = lit.super_weight_coords(self.z_at[l], self.out_max[l][3], down_weight(module))
            sw = {"layer": l, **c, "z_max": z_max[l], "out_max": out_max[l],
                  "z_at_col": float(self.z_at[l][c["col"]]), "prompt": self.out_max[l][1],
                  "position": self.out_max[l][2]}
        return {"z_max": z_max, "out_max": out_max, "z_argmax": get(self.z_max, 1), "out_argmax": get(self.out_max, 3),
                "spike_layers": spikes, "super_weight": sw}


# -- reducers (inside the hooks) ---------------------------------------------------------------------------------

def _alpha_reducer(p, batch):
    return lit.gu_alpha(p, batch.lengths)


def _v_reducer(v, batch):
    return lit.value_norms(v, batch.lengths)


def _sink_prob_reducer(ps, batch):
    valid = lit.valid_positions(batch.lengths.to(ps.device), ps.shape[2]).unsqueeze(1)   # [B, 1, S]
    return (torch.nan_to_num(ps.float()) * valid).sum(-1) / valid.sum(-1).clamp_min(1)


def _hidden_reducer(h, batch):
    return lit.sun_reduce(h, batch.lengths)


class _Acc:
    """Running sums over prompts (fp64) and the aggregated lists."""

    def __init__(self, L, H, eps):
        self.eps, self.n = eps, 0
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.alpha1, self.rate, self.dorm = z(L, H), z(L), z(L)
        self.v0, self.vrest, self.vrest_n, self.psink = z(L, H), z(L, H), z(L, H), z(L, H)
        self.median, self.top_v = z(L), z(L, lit.SUN_TOP_K)
        self.top_loc = [[defaultdict(int) for _ in range(lit.SUN_TOP_K)] for _ in range(L)]
        self.top_tok = [{} for _ in range(L)]  # (position, dim) -> the token text where first seen
        self.massive = {}                      # (layer, position, dim) -> [count, sum, max |.|, Counter of tokens]
        self.massive_pos = {}                  # position -> [prompt ids, Counter of tokens]
        self.secondary = {}                    # (position, token) -> [count, max_alpha, massive_count]

    def add_attention(self, l, alpha, v, ps):
        a1 = alpha[:, :, 0].double().cpu()
        self.alpha1[l] += a1.sum(0)
        self.rate[l] += lit.gu_sink_fraction(a1, self.eps).sum()
        v0, vr = (x.double().cpu() for x in v)
        self.dorm[l] += lit.dormant(a1, v0, vr, self.eps).double().mean(-1).sum()
        self.v0[l] += v0.sum(0)
        ok = torch.isfinite(vr)
        self.vrest[l] += torch.where(ok, vr, 0).sum(0)
        self.vrest_n[l] += ok.sum(0)
        if ps is not None:
            self.psink[l] += ps.double().cpu().sum(0)

    def add_hidden(self, l, r, batch, text):
        self.median[l] += r["median"].double().sum()
        self.top_v[l] += r["top_v"].double().sum(0)
        for b in range(batch.size):
            for k in range(r["top_p"].shape[1]):
                loc = (int(r["top_p"][b, k]), int(r["top_d"][b, k]))
                self.top_loc[l][k][loc] += 1
                if loc not in self.top_tok[l]:
                    self.top_tok[l][loc] = text(b, loc[0])
        for (b, s, d), v in zip(r["hits"].tolist(), r["hit_vals"].tolist()):
            e = self.massive.setdefault((l, s, d), [0, 0.0, 0.0, Counter()])
            e[0] += 1
            e[1] += v
            e[2] = max(e[2], abs(v))
            e[3][text(b, s)] += 1
            p = self.massive_pos.setdefault(s, [set(), Counter()])
            if int(batch.index[b]) not in p[0]:
                p[0].add(int(batch.index[b]))
                p[1][text(b, s)] += 1

    def merge(self, o: "_Acc") -> None:
        """Add another rank's sums (data-parallel runs: every rank ran different prompts)."""
        self.n += o.n
        for k in ("alpha1", "rate", "dorm", "v0", "vrest", "vrest_n", "psink", "median", "top_v"):
            setattr(self, k, getattr(self, k) + getattr(o, k))
        for l, ranks in enumerate(o.top_loc):
            for k, counts in enumerate(ranks):
                for loc, c in counts.items():
                    self.top_loc[l][k][loc] += c
            for loc, t in o.top_tok[l].items():
                self.top_tok[l].setdefault(loc, t)
        for key, (c, tot, mx, toks) in o.massive.items():
            e = self.massive.setdefault(key, [0, 0.0, 0.0, Counter()])
            e[0], e[1], e[2] = e[0] + c, e[1] + tot, max(e[2], mx)
            e[3].update(toks)
        for s, (ids, toks) in o.massive_pos.items():
            p = self.massive_pos.setdefault(s, [set(), Counter()])
            p[0] |= ids
            p[1].update(toks)
        for key, (c, a, m) in o.secondary.items():
            e = self.secondary.setdefault(key, [0, None, 0])
            e[0], e[2] = e[0] + c, e[2] + m
            e[1] = a if e[1] is None else (e[1] if a is None else max(e[1], a))

    def add_secondary(self, per_prompt: dict, text):
        """per_prompt: {(row, position): [max_alpha or None, massive]} for one batch."""
        for (b, s), (alpha, massive) in per_prompt.items():
            e = self.secondary.setdefault((s, text(b, s)), [0, None, 0])
            e[0] += 1
            if alpha is not None:
                e[1] = alpha if e[1] is None else max(e[1], alpha)
            e[2] += int(massive)


def _step(cap, taps, acc, lm, batch, eps):
    taps.batch = batch
    c = cap.forward(batch)
    ids = batch.input_ids
    text = lambda b, s: token_text(lm, ids[b, s])  # noqa: E731
    second: dict = {}
    for l in range(lm.n_layers):
        alpha = c.get(f"blocks.{l}.attn.hook_pattern")
        if alpha is not None:
            acc.add_attention(l, alpha, c[f"blocks.{l}.attn.hook_v"], c.get(f"blocks.{l}.attn.hook_sink_prob"))
            am = alpha.float().mean(1).cpu()                                     # [B, S] head mean
            flag = lit.secondary_candidates(am, batch.lengths, eps)
            for b, s in flag.nonzero().tolist():
                e = second.setdefault((b, s), [None, False])
                e[0] = max(e[0] or 0.0, float(am[b, s]))
        r = c[f"blocks.{l}.hook_resid_post"]
        acc.add_hidden(l, r, batch, text)
        for b, s, _ in r["hits"].tolist():
            if s > 0:
                second.setdefault((b, s), [None, False])[1] = True
    acc.add_secondary(second, text)
    acc.n += batch.size


def run_metrics(ctx: RunContext, epsilon: float = lit.GU_EPSILON, metric_len: int | None = None) -> MetricsResult:
    """Gu, Sun, Yu and Guo et al.'s metrics (and the secondary sinks) in one pass over the prompts."""
    lm = ctx.lm
    notes = list(ctx.notes)
    if metric_len is not None:
        n_cut = sum(1 for n in ctx.prompts.lengths if n > metric_len)
        ctx = RunContext(lm, truncate_to(ctx.prompts, metric_len), batch_size=ctx.batch_size, progress=ctx.progress)
        notes.append(f"--metric-len {metric_len}: {n_cut} of {len(ctx.prompts)} prompts cut to their first "
                     f"{metric_len} tokens (Gu et al. use T = {lit.GU_METRIC_LEN})")
    dense = dense_down_layers(lm)
    if len(dense) < lm.n_layers:
        notes.append(f"blocks without a dense MLP ({lm.n_layers - len(dense)} of {lm.n_layers}, mixture of experts): "
                     f"z_max, out_max and the super weight are N/A there")
    acc, taps = collect(ctx, epsilon)
    if distributed.world_size() > 1:                    # data-parallel runs: every rank's prompts
        parts = distributed.gather(acc)
        acc = parts[0]
        for other in parts[1:]:
            acc.merge(other)
    taps.merge_ranks()
    return _result(lm, acc, taps.summary(), epsilon, metric_len, list(lm.attention_layers),
                   bool(lm.adapter.has_learned_sinks), notes)


def collect(ctx: RunContext, epsilon: float) -> tuple[_Acc, DownTaps]:
    """The pass itself over this process's prompts: the running sums and the down-projection maxima."""
    lm = ctx.lm
    sites = {"attn.hook_pattern": None, "attn.hook_v": None, "hook_resid_post": None}
    reduce = {"attn.hook_pattern": _alpha_reducer, "attn.hook_v": _v_reducer, "hook_resid_post": _hidden_reducer}
    if lm.adapter.has_learned_sinks:
        sites["attn.hook_sink_prob"] = None
        reduce["attn.hook_sink_prob"] = _sink_prob_reducer
    acc = _Acc(lm.n_layers, lm.config.num_attention_heads, epsilon)
    taps = DownTaps(lm, dense_down_layers(lm))
    with taps.attached(), Capture(lm, sites, reduce=reduce) as cap:
        ctx.for_each("metrics", lambda batch: _step(cap, taps, acc, lm, batch, epsilon))
    return acc, taps


def _result(lm, acc, yu, eps, metric_len, attn, learned, notes) -> MetricsResult:
    L, H, N = lm.n_layers, lm.config.num_attention_heads, max(acc.n, 1)
    per = lambda t, l: [float(x) for x in t[l] / N] if l in attn else None  # noqa: E731
    rates = [float(acc.rate[l] / N) if l in attn else None for l in range(L)]
    massive = [{"layer": l, "position": s, "dim": d, "value": tot / c, "max_abs": mx,
                "token": toks.most_common(1)[0][0], "n_tokens": len(toks), "count": c}
               for (l, s, d), (c, tot, mx, toks) in sorted(acc.massive.items())]
    top3 = []
    for l in range(L):
        row = []
        for k in range(lit.SUN_TOP_K):
            if not acc.top_loc[l][k]:
                continue
            (s, d), c = max(acc.top_loc[l][k].items(), key=lambda kv: kv[1])
            row.append({"rank": k + 1, "mean_abs": float(acc.top_v[l, k] / N), "position": s, "dim": d,
                        "token": acc.top_tok[l][(s, d)], "share": c / N})
        top3.append(row)
    vrest = [[float(x) for x in acc.vrest[l] / acc.vrest_n[l].clamp_min(1)] if l in attn else None for l in range(L)]
    secondary = sorted(({"position": s, "token": t, "count": c, "max_alpha": a, "massive_count": m}
                        for (s, t), (c, a, m) in acc.secondary.items()), key=lambda x: (-x["count"], x["position"]))
    return MetricsResult(
        model_type=lm.adapter.model_type, n_layers=L, n_heads=H, n_prompts=acc.n, epsilon=eps, metric_len=metric_len,
        attention_layers=attn, gu_alpha=[per(acc.alpha1, l) for l in range(L)], gu_sink_rate=rates,
        gu_sink_rate_model=(sum(r for r in rates if r is not None) / len(attn)) if attn else None,
        massive=massive, massive_median=[float(acc.median[l] / N) for l in range(L)],
        massive_first_layer=min((m["layer"] for m in massive), default=None),
        massive_dims=sorted({m["dim"] for m in massive}),
        massive_positions=[{"position": s, "token": toks.most_common(1)[0][0], "n_tokens": len(toks),
                            "count": len(ids)} for s, (ids, toks) in sorted(acc.massive_pos.items())],
        top3=top3, z_max=yu["z_max"], out_max=yu["out_max"], z_argmax=yu["z_argmax"], out_argmax=yu["out_argmax"],
        spike_layers=yu["spike_layers"], super_weight=yu["super_weight"],
        value_norm0=[per(acc.v0, l) for l in range(L)], value_norm_rest=vrest,
        dormant_frac=[float(acc.dorm[l] / N) if l in attn else None for l in range(L)],
        p_sink=[per(acc.psink, l) for l in range(L)] if learned else None, secondary_sinks=secondary, notes=notes)
