"""`--scan` (MODES.md section 1): per layer and sink key t, how token t's K, V, MLP output and the attention
it receives look across prompts. Everything is streamed batch by batch: memory does not grow with N.

Speed: the hooks only shrink each layer's tensors to the sink positions (q to one mean unit query per sink,
the attention to one mean per head and sink); after each batch, every layer's and sink's statistics are merged
at once, with a few vectorised operations, into fixed-size accumulators on the model's device. Nothing is
copied to the host until the end, so a GPU never waits on the CPU between batches."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..result import Result
from .. import stats
from ..capture import Capture
from ..errors import UsageError
from ..runner import QUERY_START, RunContext, query_mask

LOG_FLOOR = 1e-12


@dataclass
class ScanResult(Result):
    layers: list[int]
    sinks: list[int]
    records: list[dict]                      # one per (layer, sink); keys listed in RECORD_KEYS
    heatmaps: dict[int, list] | None = None  # layer -> [M, M] mean attention map of one head (None: no prompt)
    head: int | None = None
    notes: list[str] = field(default_factory=list)
    heatmap_counts: list | None = None       # [M, M]: prompts averaged in each heatmap cell (same for every layer)


RECORD_KEYS = ("layer", "sink_idx", "k_norm", "v_norm", "cos", "sink_attn", "mlp_out_log_norm", "k_spread",
               "v_spread", "mlp_out_spread", "k_norm_head_var", "v_norm_head_var", "cos_head_var",
               "sink_attn_head_var", "k_spread_head_var", "v_spread_head_var", "mlp_out_log_norm_prompt_var",
               "attn_out_log_norm", "resid_post_log_norm", "n_prompts", "n_prompts_query")
# Which prompts each statistic uses: those that have token t (TOKEN_STATS), or also a query q >= max(4, t+1)
# for key t (QUERY_STATS). A statistic with fewer prompts than that is N/A (null), never 0.
QUERY_STATS = ("cos", "sink_attn")
TOKEN_STATS = ("k_norm", "v_norm", "mlp_out_log_norm", "attn_out_log_norm", "resid_post_log_norm")
SPREAD_STATS = ("k_spread", "v_spread", "mlp_out_spread")
HEATMAP_MAX = 128   # --print heatmap: maps cover at most the first 128 positions


def _batch_weights(batch, sinks: list[int], S: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per batch, once: W [B, T, S] fp32, the averaging weights over each sink's query set (1/count on the
    queries of query_mask, 0 elsewhere); ok_q [B, T] bool, the prompts that have a query for key t; and ok_tok
    [B, T] bool, the prompts that have token t at all."""
    lengths = batch.lengths.detach().cpu()
    m = torch.stack([query_mask(lengths, S, t) for t in sinks], dim=1).float()  # [B, T, S]
    cnt = m.sum(-1, keepdim=True).clamp(min=1)
    ok_q = torch.stack([lengths > max(QUERY_START, t + 1) for t in sinks], dim=1)
    ok_tok = torch.stack([lengths > t for t in sinks], dim=1)
    return (m / cnt).to(device), ok_q.to(device), ok_tok.to(device)


class _BatchWeights:
    """Caches _batch_weights per (batch, sequence length, device), so each hook reuses one copy."""

    def __init__(self, sinks: list[int]):
        self.sinks = sinks
        self._batch = None
        self._cache: dict = {}

    def get(self, batch, S: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
        W = weights.get(batch, q.shape[1], q.device)[0]
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
        W = weights.get(batch, p.shape[2], p.device)[0]
        return torch.einsum("bhst,bts->bht", torch.nan_to_num(p), W)
    return reduce


def _heatmap_reducer(head: int, size: int):
    """hook_pattern [B, H, S, S] -> [M, M]: the sum over the batch of head `head`'s map, cropped or zero-padded to
    M = size, counting only the cells (query, key) that a prompt has (both below its length)."""
    def reduce(p: torch.Tensor, batch) -> torch.Tensor:
        m = min(size, p.shape[-1])
        lens = batch.lengths.to(p.device).view(-1, 1, 1)
        pos = torch.arange(m, device=p.device)
        has = (pos.view(1, -1, 1) < lens) & (pos.view(1, 1, -1) < lens)                 # [B, m, m]
        out = torch.zeros(size, size, dtype=torch.float64, device=p.device)
        out[:m, :m] = torch.where(has, p[:, head, :m, :m].double(), 0.0).sum(0)
        return out
    return reduce


def heatmap_counts(lengths: list[int], size: int) -> torch.Tensor:
    """[M, M] number of prompts that have each cell (query i, key j): those longer than max(i, j)."""
    pos = torch.arange(size)
    need = torch.maximum(pos.view(-1, 1), pos.view(1, -1))
    lens = torch.tensor(lengths).view(-1, 1, 1)
    return (lens > need).sum(0)


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
        self.n = torch.zeros(L, T, **kw)                      # prompts that have token t
        self.n_q = torch.zeros(L, T, **kw)                    # ... and a query for key t
        self.h_mean, self.h_m2 = torch.zeros(4, L, T, H, **kw), torch.zeros(4, L, T, H, **kw)
        self.log_mean, self.log_m2 = torch.zeros(3, L, T, **kw), torch.zeros(3, L, T, **kw)
        self.kv_usum = torch.zeros(2, L, T, H, d, **kw)      # sums of unit k_h[t], v_h[t]
        self.m_usum = torch.zeros(L, T, D, **kw)             # sum of unit m[t]
        self.d, self.D = d, D

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}

    def update(self, ok_q, ok_tok, q_mean, k, v, p, m, a, y) -> None:
        """ok_q, ok_tok [B, T]; q_mean, k, v [L, B, T, H, d]; p [L, B, H, T]; m, a, y [L, B, T, D] (fp32).
        k/v norms, spreads and log-norms use every prompt that has token t (ok_tok); cos and sink attention
        only those that also have a query for it (ok_q)."""
        ok = ok_tok.unsqueeze(0) & ~torch.isnan(k[..., 0, 0])  # [L, B, T]
        okq = ok & ok_q.unsqueeze(0)
        nb, nbq = ok.sum(1).double(), okq.sum(1).double()
        cos = (q_mean * stats.unit(k)).sum(-1)
        per_head = torch.stack([torch.linalg.vector_norm(k, dim=-1), torch.linalg.vector_norm(v, dim=-1), cos,
                                p.transpose(2, 3)])                        # [4, L, B, T, H]
        for i in range(4):
            query_stat = self.HEAD_STATS[i] in QUERY_STATS
            _merge_mean_var(self.h_mean[i], self.h_m2[i], self.n_q if query_stat else self.n, per_head[i],
                            okq if query_stat else ok, nbq if query_stat else nb)
        logs = torch.log(torch.linalg.vector_norm(torch.stack([m, a, y]), dim=-1).clamp(min=LOG_FLOOR))
        for i in range(3):
            _merge_mean_var(self.log_mean[i], self.log_m2[i], self.n, logs[i], ok, nb)
        self.kv_usum[0] += _unit_sum(k, ok)
        self.kv_usum[1] += _unit_sum(v, ok)
        self.m_usum += _unit_sum(m, ok)
        self.n += nb
        self.n_q += nbq

    def records(self, layers: list[int], sinks: list[int]) -> list[dict]:
        s = {k: t.cpu() for k, t in self.state().items()}  # the one device-to-host copy
        n = s["n"]

        def spread(usum: torch.Tensor, cnt: torch.Tensor, dim: int) -> torch.Tensor:
            # stats.NormSpread.spread: sqrt(max(0, 1 - |mean unit|^2) / dim), NaN for fewer than 2 rows
            ubar = usum / cnt.clamp(min=1).view(*cnt.shape, *([1] * (usum.dim() - cnt.dim())))
            val = torch.sqrt((1.0 - (ubar * ubar).sum(-1)).clamp(min=0.0) / dim)
            return torch.where(cnt.view(*cnt.shape, *([1] * (val.dim() - cnt.dim()))) >= 2, val, float("nan"))

        kv_spread = spread(s["kv_usum"], n.unsqueeze(0).expand(2, *n.shape), self.d)   # [2, L, T, H]
        m_spread = spread(s["m_usum"], n, self.D)                                      # [L, T]
        nan = float("nan")
        out = []
        for li, layer in enumerate(layers):
            for ti, t in enumerate(sinks):
                cnt, cnt_q = int(n[li, ti]), int(s["n_q"][li, ti])
                r = {"layer": layer, "sink_idx": t, "n_prompts": cnt, "n_prompts_query": cnt_q}
                for i, key in enumerate(self.HEAD_STATS):
                    c = cnt_q if key in QUERY_STATS else cnt
                    mean = s["h_mean"][i, li, ti] if c else torch.full_like(s["h_mean"][i, li, ti], nan)
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


def _coverage_notes(lengths: list[int], sinks: list[int]) -> list[str]:
    """Per sink: how many prompts each group of statistics uses, and why the others are left out."""
    N, notes = len(lengths), []
    for t in sinks:
        has_tok = sum(1 for n in lengths if n > t)
        qs = max(QUERY_START, t + 1)
        has_q = sum(1 for n in lengths if n > qs)
        if has_tok < N:
            notes.append(f"sink {t}: k/v norms, spreads and log-norms use {has_tok} of {N} prompts ({N - has_tok} "
                         f"have no token {t}: they are {t} tokens or shorter)")
        if has_q < N:
            notes.append(f"sink {t}: cos and sink_attn use {has_q} of {N} prompts ({N - has_q} have no query "
                         f"q >= max(4, t+1) = {qs}: they are {qs} tokens or shorter)")
        if has_tok < 2:
            notes.append(f"sink {t}: k_spread, v_spread and mlp_out_spread are N/A: a spread needs at least 2 "
                         f"prompts with token {t}, and {has_tok} has it")
    return notes


def _check_has_data(lengths: list[int], sinks: list[int]) -> None:
    """A requested statistic with no data at all is an error (exit 2), not a table of N/A."""
    longest = max(lengths)
    for t in sinks:
        qs = max(QUERY_START, t + 1)
        if longest <= qs:
            raise UsageError(
                f"--scan: cos and sink_attn for sink {t} have no data: they average queries q >= max(4, t+1) = "
                f"{qs}, and the longest prompt has {longest} tokens (use longer prompts or a smaller --sink-idx)")


def run_scan(ctx: RunContext, sinks=(0,), interval: int = 1, heatmap_head: int | None = None,
             heatmap_size: int | None = None) -> ScanResult:
    lm = ctx.lm
    sinks = sorted(set(int(t) for t in sinks))
    if interval < 1:
        raise UsageError(f"--scan-interval must be >= 1, not {interval}")
    ctx.check_tokens(sinks, "sink", note=False)
    lengths = ctx.prompts.lengths
    layers = list(range(0, lm.n_layers, interval))
    cfg = lm.config
    H = cfg.num_attention_heads
    if heatmap_head is not None:
        return _run_heatmaps(ctx, layers, H, heatmap_head, heatmap_size)
    _check_has_data(lengths, sinks)
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
    acc: _ScanAccumulator | None = None
    with Capture(lm, sites, layers=layers, reduce=reduce) as cap:
        for batch in ctx.iterate("scan"):
            B = batch.size
            bufs.start({"attn.hook_q": (B, T, H, d), "attn.hook_k": (B, T, H, d), "attn.hook_v": (B, T, H, d),
                        "attn.hook_pattern": (B, H, T), "hook_mlp_out": (B, T, D), "hook_attn_out": (B, T, D),
                        "hook_resid_post": (B, T, D)})
            cap.forward(batch)
            b = bufs.buf                                                  # [L, B, ...] each
            if acc is None:
                acc = _ScanAccumulator(len(layers), T, b["attn.hook_k"].shape[3], b["attn.hook_k"].shape[4], D, dev)
            _, ok_q, ok_tok = weights.get(batch, batch.input_ids.shape[1], dev)
            acc.update(ok_q, ok_tok, b["attn.hook_q"], b["attn.hook_k"], b["attn.hook_v"], b["attn.hook_pattern"],
                       b["hook_mlp_out"], b["hook_attn_out"], b["hook_resid_post"])
            bufs.buf = {}
    records = acc.records(layers, sinks)
    return ScanResult(layers, sinks, records, notes=list(ctx.notes) + _coverage_notes(lengths, sinks))


def _run_heatmaps(ctx: RunContext, layers: list[int], H: int, head: int, size: int | None) -> ScanResult:
    """--print heatmap: head `head`'s attention map per layer; each cell is averaged over the prompts that have it
    (no crop to the shortest prompt). The maps cover the first M = min(longest prompt, size) positions."""
    if not 0 <= head < H:
        raise UsageError(f"--head {head} is out of range: this model has heads 0..{H - 1}")
    lengths = ctx.prompts.lengths
    size = HEATMAP_MAX if size is None else int(size)
    if size < 1:
        raise UsageError(f"--heatmap-size must be >= 1, not {size}")
    M = min(max(lengths), size)
    heat = {l: torch.zeros(M, M, dtype=torch.float64) for l in layers}
    with Capture(ctx.lm, {"attn.hook_pattern": None}, layers=layers,
                 reduce={"attn.hook_pattern": _heatmap_reducer(head, M)}) as cap:
        for batch in ctx.iterate("scan heatmaps"):
            c = cap.forward(batch)
            for l in layers:
                heat[l] += c[f"blocks.{l}.attn.hook_pattern"].cpu()
    counts = heatmap_counts(lengths, M)
    maps = {l: torch.where(counts > 0, heat[l] / counts.clamp(min=1), float("nan")).tolist() for l in layers}
    note = (f"heatmaps are {M}x{M}: positions 0..{M - 1} of head {head}; each cell is averaged over the prompts "
            f"that have it ({int(counts[0, 0])} prompts at cell (0, 0), {int(counts[M - 1, M - 1])} at "
            f"({M - 1}, {M - 1}); per-cell counts are in the JSON)")
    if max(lengths) > M:
        note += f"; the longest prompt has {max(lengths)} tokens (raise --heatmap-size to see more)"
    return ScanResult(layers, [], [], maps, head, list(ctx.notes) + [note], heatmap_counts=counts.tolist())
