"""`--scan` (MODES.md section 1): per layer and sink key t, how token t's K, V, MLP output and the attention
it receives look across prompts. Everything is streamed batch by batch: memory does not grow with N.

Speed: the hooks only shrink each layer's tensors to the sink positions (q to one mean unit query per sink,
the attention to one mean per head and sink); after each batch, every layer's and sink's statistics are merged
at once, with a few vectorised operations, into fixed-size accumulators on the model's device. Nothing is
copied to the host until the end, so a GPU never waits on the CPU between batches."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import stats
from ..capture import Capture
from ..errors import UsageError
from ..runner import QUERY_START, RunContext, query_mask

LOG_FLOOR = 1e-12


@dataclass
class ScanResult:
    layers: list[int]
    sinks: list[int]
    records: list[dict]                      # one per (layer, sink); keys listed in RECORD_KEYS
    heatmaps: dict[int, list] | None = None  # layer -> [S, S] mean attention map of one head
    head: int | None = None
    notes: list[str] = field(default_factory=list)


RECORD_KEYS = ("layer", "sink_idx", "k_norm", "v_norm", "cos", "sink_attn", "mlp_out_log_norm", "k_spread",
               "v_spread", "mlp_out_spread", "k_norm_head_var", "v_norm_head_var", "cos_head_var",
               "sink_attn_head_var", "k_spread_head_var", "v_spread_head_var", "mlp_out_log_norm_prompt_var",
               "attn_out_log_norm", "resid_post_log_norm", "n_prompts")


def _batch_weights(batch, sinks: list[int], S: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per batch, once: W [B, T, S] fp32, the averaging weights over each sink's query set (1/count on the
    queries of query_mask, 0 elsewhere), and ok [B, T] bool, the prompts that have sink t and a query for it."""
    lengths = batch.lengths.detach().cpu()
    m = torch.stack([query_mask(lengths, S, t) for t in sinks], dim=1).float()  # [B, T, S]
    cnt = m.sum(-1, keepdim=True).clamp(min=1)
    ok = torch.stack([lengths > max(QUERY_START, t + 1) for t in sinks], dim=1)
    return (m / cnt).to(device), ok.to(device)


class _BatchWeights:
    """Caches _batch_weights per (batch, sequence length, device), so each hook reuses one copy."""

    def __init__(self, sinks: list[int]):
        self.sinks = sinks
        self._batch = None
        self._cache: dict = {}

    def get(self, batch, S: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if batch is not self._batch:
            self._batch, self._cache = batch, {}
        key = (S, str(device))
        if key not in self._cache:
            self._cache[key] = _batch_weights(batch, self.sinks, S, device)
        return self._cache[key]


def _weights(sinks_or_weights) -> _BatchWeights:
    if isinstance(sinks_or_weights, _BatchWeights):
        return sinks_or_weights
    return _BatchWeights([int(t) for t in sinks_or_weights])


def _q_reducer(sinks):
    """hook_q [B, S, H, d] -> [B, T, H, d]: per prompt, the mean unit query over each sink's query set.
    cos(q, k_t) averaged over queries is then (mean unit query) . (unit k_t): q is never stored.
    `sinks`: the sink list, or a _BatchWeights built from it (shared between reducers)."""
    weights = _weights(sinks)

    def reduce(q: torch.Tensor, batch) -> torch.Tensor:
        W, _ = weights.get(batch, q.shape[1], q.device)
        qh = q.transpose(1, 2)                                                  # [B, H, S, d]
        inv = 1.0 / torch.linalg.vector_norm(qh, dim=-1).clamp_min(stats.EPS)  # [B, H, S]
        # sum_s W[b, t, s] * q[b, s, h] / |q[b, s, h]|, as one batched product; q is read twice, never copied
        return torch.matmul(W.unsqueeze(1) * inv.unsqueeze(2), qh).transpose(1, 2)
    return reduce


def _pattern_reducer(sinks):
    """hook_pattern [B, H, S, T] -> [B, H, T]: per prompt and head, the mean attention to key t over its queries.
    `sinks`: the sink list, or a _BatchWeights built from it (shared between reducers)."""
    weights = _weights(sinks)

    def reduce(p: torch.Tensor, batch) -> torch.Tensor:
        W, _ = weights.get(batch, p.shape[2], p.device)
        return torch.einsum("bhst,bts->bht", torch.nan_to_num(p), W)
    return reduce


def _heatmap_reducer(head: int, size: int):
    def reduce(p: torch.Tensor, batch) -> torch.Tensor:
        return p[:, head, :size, :size].sum(0)
    return reduce


def _merge_mean_var(mean: torch.Tensor, m2: torch.Tensor, n: torch.Tensor, x: torch.Tensor, ok: torch.Tensor,
                    nb: torch.Tensor) -> None:
    """Chan et al.'s merge (as stats.MeanVar) of the rows of x [L, B, T, *F] where ok [L, B, T], into
    mean, m2 [L, T, *F] float64 in place; n, nb [L, T] are the counts before and in this batch."""
    extra = x.dim() - 3
    okx = ok.view(*ok.shape, *([1] * extra))
    x64 = x.double()
    nbx = nb.view(*nb.shape, *([1] * extra))
    mb = torch.where(okx, x64, 0.0).sum(1) / nbx.clamp(min=1)
    m2b = torch.where(okx, (x64 - mb.unsqueeze(1)) ** 2, 0.0).sum(1)
    tot = (n + nb).view_as(nbx)
    nx = n.view_as(nbx)
    delta = mb - mean
    mean += delta * (nbx / tot.clamp(min=1))
    m2 += m2b + delta ** 2 * (nx * nbx / tot.clamp(min=1))


def _unit_sum(x: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Sum over the batch (dim 1) of the float64 unit vectors of x [L, B, T, ..., D] where ok [L, B, T]
    (as stats.NormSpread: x / max(||x||, EPS), in float64)."""
    x64 = x.double()
    u = x64 / torch.linalg.vector_norm(x64, dim=-1, keepdim=True).clamp_min(stats.EPS)
    okx = ok.view(*ok.shape, *([1] * (x.dim() - 3)))
    return torch.where(okx, u, 0.0).sum(1)


class _ScanAccumulator:
    """Streaming state of every (layer, sink) of the scan, on one device; its size is fixed by
    (layers, sinks, heads, d_head, D), whatever the number of prompts or batches."""

    HEAD_STATS = ("k_norm", "v_norm", "cos", "sink_attn")   # per head: mean and variance over prompts
    LOG_STATS = ("mlp_out", "attn_out", "resid_post")       # log ||x[t]||: mean and variance over prompts

    def __init__(self, L: int, T: int, H: int, d: int, D: int, device):
        kw = dict(dtype=torch.float64, device=device)
        self.n = torch.zeros(L, T, **kw)
        self.h_mean, self.h_m2 = torch.zeros(4, L, T, H, **kw), torch.zeros(4, L, T, H, **kw)
        self.log_mean, self.log_m2 = torch.zeros(3, L, T, **kw), torch.zeros(3, L, T, **kw)
        self.kv_usum = torch.zeros(2, L, T, H, d, **kw)      # sums of unit k_h[t], v_h[t]
        self.m_usum = torch.zeros(L, T, D, **kw)             # sum of unit m[t]
        self.d, self.D = d, D

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}

    def update(self, ok, q_mean, k, v, p, m, a, y) -> None:
        """ok [B, T]; q_mean, k, v [L, B, T, H, d]; p [L, B, H, T]; m, a, y [L, B, T, D] (fp32)."""
        ok = ok.unsqueeze(0) & ~torch.isnan(k[..., 0, 0])  # [L, B, T]
        nb = ok.sum(1).double()
        cos = (q_mean * stats.unit(k)).sum(-1)
        per_head = torch.stack([torch.linalg.vector_norm(k, dim=-1), torch.linalg.vector_norm(v, dim=-1), cos,
                                p.transpose(2, 3)])                        # [4, L, B, T, H]
        for i in range(4):
            _merge_mean_var(self.h_mean[i], self.h_m2[i], self.n, per_head[i], ok, nb)
        logs = torch.log(torch.linalg.vector_norm(torch.stack([m, a, y]), dim=-1).clamp(min=LOG_FLOOR))
        for i in range(3):
            _merge_mean_var(self.log_mean[i], self.log_m2[i], self.n, logs[i], ok, nb)
        self.kv_usum[0] += _unit_sum(k, ok)
        self.kv_usum[1] += _unit_sum(v, ok)
        self.m_usum += _unit_sum(m, ok)
        self.n += nb

    def records(self, layers: list[int], sinks: list[int]) -> list[dict]:
        s = {k: t.cpu() for k, t in self.state().items()}  # the one device-to-host copy
        n = s["n"]

        def spread(usum: torch.Tensor, cnt: torch.Tensor, dim: int) -> torch.Tensor:
            # stats.NormSpread.spread: sqrt(max(0, 1 - |mean unit|^2) / dim), 0 for fewer than 2 rows
            ubar = usum / cnt.clamp(min=1).view(*cnt.shape, *([1] * (usum.dim() - cnt.dim())))
            val = torch.sqrt((1.0 - (ubar * ubar).sum(-1)).clamp(min=0.0) / dim)
            return torch.where(cnt.view(*cnt.shape, *([1] * (val.dim() - cnt.dim()))) >= 2, val, 0.0)

        kv_spread = spread(s["kv_usum"], n.unsqueeze(0).expand(2, *n.shape), self.d)   # [2, L, T, H]
        m_spread = spread(s["m_usum"], n, self.D)                                      # [L, T]
        nan = float("nan")
        out = []
        for li, layer in enumerate(layers):
            for ti, t in enumerate(sinks):
                cnt = int(n[li, ti])
                r = {"layer": layer, "sink_idx": t, "n_prompts": cnt}
                for i, key in enumerate(self.HEAD_STATS):
                    mean = s["h_mean"][i, li, ti] if cnt else torch.full_like(s["h_mean"][i, li, ti], nan)
                    r[key], r[f"{key}_head_var"] = stats.head_reduce(mean.float())
                for i, key in enumerate(("k_spread", "v_spread")):
                    r[key], r[f"{key}_head_var"] = stats.head_reduce(kv_spread[i, li, ti].float())
                lm, lv = s["log_mean"][:, li, ti], s["log_m2"][:, li, ti] / cnt if cnt else None
                r["mlp_out_log_norm"] = float(lm[0]) if cnt else nan
                r["mlp_out_log_norm_prompt_var"] = float(lv[0]) if cnt else nan
                r["mlp_out_spread"] = float(m_spread[li, ti])
                r["attn_out_log_norm"] = float(lm[1]) if cnt else nan
                r["resid_post_log_norm"] = float(lm[2]) if cnt else nan
                out.append(r)
        return out


class _LayerBuffers:
    """Per-batch [L, ...] buffers, allocated before the forward, that the hooks fill layer by layer (copy_).

    Each hook's result is written into its layer's slot and the cache keeps a view of it, so nothing allocated
    during the forward outlives its layer: on CPU, dozens of small tensors kept between the large per-layer
    temporaries fragment the heap (about 1 GB of extra peak RSS at 4096 tokens). The statistics are then merged
    straight from the buffers. Hooks of one site run in layer order, so a counter gives the slot."""

    def __init__(self, n_layers: int, device):
        self.L, self.device = n_layers, device
        self.buf: dict[str, torch.Tensor] = {}
        self.next: dict[str, int] = {}

    def start(self, shapes: dict[str, tuple]) -> None:
        self.buf = {site: torch.empty((self.L, *shape), device=self.device) for site, shape in shapes.items()}
        self.next = {site: 0 for site in shapes}

    def put(self, site: str, t: torch.Tensor) -> torch.Tensor:
        i = self.next[site]
        self.next[site] = i + 1
        buf = self.buf.get(site)
        if buf is None or tuple(buf.shape[1:]) != tuple(t.shape):  # a shape the config did not predict
            buf = self.buf[site] = torch.empty((self.L, *t.shape), device=self.device)
        buf[i].copy_(t, non_blocking=True)
        return buf[i]

    def writer(self, site: str, fn=None):
        if fn is None:
            return lambda t, batch: self.put(site, t)
        return lambda t, batch: self.put(site, fn(t, batch))


def run_scan(ctx: RunContext, sinks=(0,), interval: int = 1, heatmap_head: int | None = None) -> ScanResult:
    lm = ctx.lm
    sinks = sorted(set(int(t) for t in sinks))
    if interval < 1:
        raise UsageError(f"--scan-interval must be >= 1, not {interval}")
    ctx.check_tokens(sinks, "sink")
    layers = list(range(0, lm.n_layers, interval))
    cfg = lm.config
    H = cfg.num_attention_heads
    D = cfg.hidden_size
    d = getattr(cfg, "head_dim", None) or D // H
    T = len(sinks)
    dev = lm.device
    weights = _BatchWeights(sinks)
    bufs = _LayerBuffers(len(layers), dev)
    sites = {"attn.hook_q": None, "attn.hook_k": sinks, "attn.hook_v": sinks, "attn.hook_pattern": sinks,
             "hook_mlp_out": sinks, "hook_attn_out": sinks, "hook_resid_post": sinks}
    reduce = {site: bufs.writer(site) for site in sites}
    reduce["attn.hook_q"] = bufs.writer("attn.hook_q", _q_reducer(weights))
    reduce["attn.hook_pattern"] = bufs.writer("attn.hook_pattern", _pattern_reducer(weights))
    min_len = min(ctx.prompts.lengths)
    if heatmap_head is not None:
        if not 0 <= heatmap_head < H:
            raise UsageError(f"--head {heatmap_head} is out of range: this model has heads 0..{H - 1}")
        sites = {"attn.hook_pattern": None}  # full maps only for the heatmap
        reduce = {"attn.hook_pattern": _heatmap_reducer(heatmap_head, min_len)}
    # [S, S] float64 sums per layer only for --print heatmap (they would be 4 GB for 30 layers at 4096 tokens)
    heat = {l: torch.zeros(min_len, min_len, dtype=torch.float64) for l in layers} if heatmap_head is not None else {}
    acc: _ScanAccumulator | None = None
    with Capture(lm, sites, layers=layers, reduce=reduce) as cap:
        for batch in ctx.iterate("scan"):
            if heatmap_head is not None:
                c = cap.forward(batch)
                for l in layers:
                    heat[l] += c[f"blocks.{l}.attn.hook_pattern"].double().cpu()
                continue
            B = batch.size
            bufs.start({"attn.hook_q": (B, T, H, d), "attn.hook_k": (B, T, H, d), "attn.hook_v": (B, T, H, d),
                        "attn.hook_pattern": (B, H, T), "hook_mlp_out": (B, T, D), "hook_attn_out": (B, T, D),
                        "hook_resid_post": (B, T, D)})
            cap.forward(batch)
            b = bufs.buf                                                  # [L, B, ...] each
            if acc is None:
                acc = _ScanAccumulator(len(layers), T, b["attn.hook_k"].shape[3], b["attn.hook_k"].shape[4], D, dev)
            _, ok = weights.get(batch, batch.input_ids.shape[1], dev)
            acc.update(ok, b["attn.hook_q"], b["attn.hook_k"], b["attn.hook_v"], b["attn.hook_pattern"],
                       b["hook_mlp_out"], b["hook_attn_out"], b["hook_resid_post"])
            bufs.buf = {}
    if heatmap_head is not None:
        n = len(ctx.prompts)
        return ScanResult(layers, sinks, [], {l: (heat[l] / n).tolist() for l in layers}, heatmap_head, list(ctx.notes))
    records = acc.records(layers, sinks)
    return ScanResult(layers, sinks, records, notes=list(ctx.notes))
