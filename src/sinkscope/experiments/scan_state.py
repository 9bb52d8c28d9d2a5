"""The streaming state of `--scan` (scan.py): fixed-size accumulators on the model's device, merged once per
batch from per-layer buffers that the capture hooks fill. Nothing here grows with the number of prompts."""

from __future__ import annotations

import torch

from .. import stats

LOG_FLOOR = 1e-12
# Statistics that average queries q >= max(4, t+1) for key t; the others use every prompt that has token t.
QUERY_STATS = ("cos", "sink_attn", "p_sink")


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


def _chan_merge(mean: torch.Tensor, m2: torch.Tensor, n: torch.Tensor, mean_b: torch.Tensor, m2_b: torch.Tensor,
                n_b: torch.Tensor) -> None:
    """Chan et al.'s merge of two (count, mean, M2) states, in place into (mean, m2); n, n_b [L, T] are the
    counts (not updated here), mean/m2 [L, T, *F]."""
    extra = mean.dim() - n.dim()
    na = n.view(*n.shape, *([1] * extra))
    nb = n_b.view(*n_b.shape, *([1] * extra))
    tot = (na + nb).clamp(min=1)
    delta = mean_b - mean
    mean += delta * (nb / tot)
    m2 += m2_b + delta ** 2 * (na * nb / tot)


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

    HEAD_STATS = ("k_norm", "v_norm", "cos", "sink_attn", "p_sink", "attn_gate")  # per head: mean, var over prompts
    LOG_STATS = ("mlp_out", "attn_out", "resid_post")       # log ||x[t]||: mean and variance over prompts

    def __init__(self, L: int, T: int, H: int, d: int, D: int, device):
        kw = dict(dtype=torch.float64, device=device)
        self.n = torch.zeros(L, T, **kw)                      # prompts that have token t
        self.n_attn = torch.zeros(L, T, **kw)                 # ... in a block with softmax attention
        self.n_q = torch.zeros(L, T, **kw)                    # ... and a query for key t
        S = len(self.HEAD_STATS)
        self.h_mean, self.h_m2 = torch.zeros(S, L, T, H, **kw), torch.zeros(S, L, T, H, **kw)
        self.log_mean, self.log_m2 = torch.zeros(3, L, T, **kw), torch.zeros(3, L, T, **kw)
        self.kv_usum = torch.zeros(2, L, T, H, d, **kw)      # sums of unit k_h[t], v_h[t] (v zero-padded to d)
        self.v_dim = torch.full((), float(d), **kw)           # v's head dim (DeepSeek's MLA: v_head_dim != d)
        self.m_usum = torch.zeros(L, T, D, **kw)             # sum of unit m[t]
        self.d, self.D = d, D

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], d: int, D: int, device) -> "_ScanAccumulator":
        acc = cls.__new__(cls)
        for k, v in state.items():
            setattr(acc, k, v.to(device))
        acc.d, acc.D = d, D
        return acc

    def merge(self, o: "_ScanAccumulator") -> None:
        """Add another accumulator's prompts (another rank's share): Chan's merge, then the counts and sums."""
        for i, key in enumerate(self.HEAD_STATS):
            cnt, cnt_o = (self.n_q, o.n_q) if key in QUERY_STATS else (self.n_attn, o.n_attn)
            _chan_merge(self.h_mean[i], self.h_m2[i], cnt, o.h_mean[i], o.h_m2[i], cnt_o)
        for i in range(len(self.LOG_STATS)):
            _chan_merge(self.log_mean[i], self.log_m2[i], self.n, o.log_mean[i], o.log_m2[i], o.n)
        self.kv_usum += o.kv_usum
        self.m_usum += o.m_usum
        self.n += o.n
        self.n_attn += o.n_attn
        self.n_q += o.n_q

    @classmethod
    def merged_across_ranks(cls, acc: "_ScanAccumulator | None", device) -> "_ScanAccumulator":
        """Every rank's accumulator merged in rank order (the identity in a single process). A rank that ran no
        batch contributes nothing."""
        from .. import distributed
        if distributed.world_size() == 1:
            return acc
        parts = distributed.gather(None if acc is None else ({k: v.cpu() for k, v in acc.state().items()},
                                                             acc.d, acc.D))
        parts = [p for p in parts if p is not None]
        out = cls.from_state(*parts[0], device)
        for state, d, D in parts[1:]:
            out.merge(cls.from_state(state, d, D, device))
        return out

    def update(self, ok_q, ok_tok, q_mean, k, v, p, m, a, y, p_sink=None, gate=None) -> None:
        """ok_q, ok_tok [B, T]; q_mean, k, v [L, B, T, H, d]; p, p_sink [L, B, H, T]; gate [L, B, T, H];
        m, a, y [L, B, T, D] (fp32; NaN in the attention tensors of blocks without softmax attention).
        k/v norms, spreads, gates and log-norms use every prompt that has token t (ok_tok); cos, sink attention
        and p_sink only those that also have a query for it (ok_q)."""
        ok = ok_tok.unsqueeze(0) & ~torch.isnan(m[..., 0])          # [L, B, T]
        ok_a = ok & ~torch.isnan(k[..., 0, 0])                        # ... in a softmax-attention block
        okq = ok_a & ok_q.unsqueeze(0)
        nb, nba, nbq = ok.sum(1).double(), ok_a.sum(1).double(), okq.sum(1).double()
        cos = (q_mean * stats.unit(k)).sum(-1)
        nan = torch.full_like(cos, float("nan"))
        per_head = torch.stack([torch.linalg.vector_norm(k, dim=-1), torch.linalg.vector_norm(v, dim=-1), cos,
                                p.transpose(2, 3), nan if p_sink is None else p_sink.transpose(2, 3),
                                nan if gate is None else gate])             # [S, L, B, T, H]
        for i, key in enumerate(self.HEAD_STATS):
            query_stat = key in QUERY_STATS
            _merge_mean_var(self.h_mean[i], self.h_m2[i], self.n_q if query_stat else self.n_attn, per_head[i],
                            okq if query_stat else ok_a, nbq if query_stat else nba)
        logs = torch.log(torch.linalg.vector_norm(torch.stack([m, a, y]), dim=-1).clamp(min=LOG_FLOOR))
        for i in range(3):
            _merge_mean_var(self.log_mean[i], self.log_m2[i], self.n, logs[i], ok, nb)
        self.kv_usum[0] += _unit_sum(k, ok_a)
        self.v_dim.fill_(v.shape[-1])
        if v.shape[-1] < k.shape[-1]:  # zero padding leaves the unit vectors' norms and dot products as they are
            v = torch.nn.functional.pad(v, (0, k.shape[-1] - v.shape[-1]))
        self.kv_usum[1] += _unit_sum(v, ok_a)
        self.m_usum += _unit_sum(m, ok)
        self.n += nb
        self.n_attn += nba
        self.n_q += nbq

    def records(self, layers: list[int], sinks: list[int], attn_layers=None, has: tuple[str, ...] = ()) -> list[dict]:
        """One dict per (layer, sink); attn_layers: the blocks with softmax attention (default: all); has: the
        optional statistics this model has ("p_sink", "attn_gate"); the others are N/A."""
        s = {k: t.cpu() for k, t in self.state().items()}  # the one device-to-host copy
        n, n_attn = s["n"], s["n_attn"]
        attn_layers = set(layers if attn_layers is None else attn_layers)

        def spread(usum: torch.Tensor, cnt: torch.Tensor, dim: int) -> torch.Tensor:
            # stats.NormSpread.spread: sqrt(max(0, 1 - |mean unit|^2) / dim), NaN for fewer than 2 rows
            ubar = usum / cnt.clamp(min=1).view(*cnt.shape, *([1] * (usum.dim() - cnt.dim())))
            val = torch.sqrt((1.0 - (ubar * ubar).sum(-1)).clamp(min=0.0) / dim)
            return torch.where(cnt.view(*cnt.shape, *([1] * (val.dim() - cnt.dim()))) >= 2, val, float("nan"))

        kv_spread = torch.stack([spread(s["kv_usum"][0], n_attn, self.d),
                                 spread(s["kv_usum"][1], n_attn, int(s["v_dim"]))])   # [2, L, T, H]
        m_spread = spread(s["m_usum"], n, self.D)                                      # [L, T]
        nan = float("nan")
        out = []
        for li, layer in enumerate(layers):
            for ti, t in enumerate(sinks):
                cnt, cnt_a, cnt_q = int(n[li, ti]), int(n_attn[li, ti]), int(s["n_q"][li, ti])
                r = {"layer": layer, "sink_idx": t, "n_prompts": cnt, "n_prompts_query": cnt_q,
                     "softmax_attention": layer in attn_layers}
                for i, key in enumerate(self.HEAD_STATS):
                    c = cnt_q if key in QUERY_STATS else cnt_a
                    if key in ("p_sink", "attn_gate") and key not in has:
                        c = 0
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

    def __init__(self, n_layers: int, device, slots: dict[str, list[int]] | None = None):
        self.L, self.device = n_layers, device
        self.buf: dict[str, torch.Tensor] = {}
        self.next: dict[str, int] = {}
        self.slots = slots or {}  # site -> the slots its hooks fill, in order (attention sites: softmax blocks)

    def start(self, shapes: dict[str, tuple]) -> None:
        self.buf = {}
        for site, shape in shapes.items():
            if len(self.slots.get(site, range(self.L))) < self.L:  # NaN in the slots no hook fills (no attention)
                self.buf[site] = torch.full((self.L, *shape), float("nan"), device=self.device)
            else:
                self.buf[site] = torch.empty((self.L, *shape), device=self.device)
        self.next = {site: 0 for site in shapes}

    def put(self, site: str, t: torch.Tensor) -> torch.Tensor:
        k = self.next[site]
        self.next[site] = k + 1
        i = self.slots[site][k] if site in self.slots else k
        buf = self.buf.get(site)
        if buf is None or tuple(buf.shape[1:]) != tuple(t.shape):  # a shape the config did not predict
            fill = float("nan") if len(self.slots.get(site, range(self.L))) < self.L else 0.0
            buf = self.buf[site] = torch.full((self.L, *t.shape), fill, device=self.device)
        buf[i].copy_(t, non_blocking=True)
        return buf[i]

    def writer(self, site: str, fn=None):
        if fn is None:
            return lambda t, batch: self.put(site, t)
        return lambda t, batch: self.put(site, fn(t, batch))
