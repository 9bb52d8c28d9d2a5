"""`--scan` (MODES.md section 1): per layer and sink key t, how token t's K, V, MLP output and the attention
it receives look across prompts. Everything is streamed batch by batch: memory does not grow with N."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import stats
from ..capture import Capture
from ..errors import UsageError
from ..runner import RunContext, query_mask

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


def _q_reducer(sinks: list[int]):
    """hook_q [B, S, H, d] -> [B, T, H, d]: per prompt, the mean unit query over each sink's query set.
    cos(q, k_t) averaged over queries is then (mean unit query) . (unit k_t): q is never stored."""
    def reduce(q: torch.Tensor, batch) -> torch.Tensor:
        B, S = q.shape[:2]
        qn = stats.unit(q)
        out = []
        for t in sinks:
            m = query_mask(batch.lengths.to(q.device), S, t).to(qn.dtype)  # [B, S]
            cnt = m.sum(1).clamp(min=1).view(B, 1, 1)
            out.append((qn * m.view(B, S, 1, 1)).sum(1) / cnt)
        return torch.stack(out, dim=1)
    return reduce


def _pattern_reducer(sinks: list[int]):
    """hook_pattern [B, H, S, T] -> [B, H, T]: per prompt and head, the mean attention to key t over its queries."""
    def reduce(p: torch.Tensor, batch) -> torch.Tensor:
        B, H, S, T = p.shape
        cols = []
        for i, t in enumerate(sinks):
            m = query_mask(batch.lengths.to(p.device), S, t).to(p.dtype)  # [B, S]
            cnt = m.sum(1).clamp(min=1).view(B, 1)
            cols.append((torch.nan_to_num(p[..., i]) * m.view(B, 1, S)).sum(-1) / cnt)
        return torch.stack(cols, dim=-1)
    return reduce


def _heatmap_reducer(head: int, size: int):
    def reduce(p: torch.Tensor, batch) -> torch.Tensor:
        return p[:, head, :size, :size].sum(0)
    return reduce


class _LayerSink:
    """Streaming accumulators for one (layer, sink)."""

    def __init__(self, H: int, d_head: int, D: int):
        self.k_norm, self.v_norm = stats.MeanVar((H,)), stats.MeanVar((H,))
        self.cos, self.attn = stats.MeanVar((H,)), stats.MeanVar((H,))
        self.k_spread = [stats.NormSpread(d_head) for _ in range(H)]
        self.v_spread = [stats.NormSpread(d_head) for _ in range(H)]
        self.m_log, self.a_log, self.y_log = stats.MeanVar(), stats.MeanVar(), stats.MeanVar()
        self.m_spread = stats.NormSpread(D)

    def update(self, ok, k, v, cos, attn, m, a, y):
        """ok [B] bool rows that have this token; k, v [B, H, d]; cos, attn [B, H]; m, a, y [B, D]."""
        if not ok.any():
            return
        k, v, cos, attn, m, a, y = (x[ok] for x in (k, v, cos, attn, m, a, y))
        self.k_norm.update(k.norm(dim=-1))
        self.v_norm.update(v.norm(dim=-1))
        self.cos.update(cos)
        self.attn.update(attn)
        for h in range(k.shape[1]):
            self.k_spread[h].update(k[:, h])
            self.v_spread[h].update(v[:, h])
        log = lambda x: torch.log(x.norm(dim=-1).clamp(min=LOG_FLOOR))  # noqa: E731
        self.m_log.update(log(m))
        self.a_log.update(log(a))
        self.y_log.update(log(y))
        self.m_spread.update(m)

    def record(self, layer: int, sink: int) -> dict:
        r = {"layer": layer, "sink_idx": sink, "n_prompts": self.m_log.n}
        for key, acc in (("k_norm", self.k_norm), ("v_norm", self.v_norm), ("cos", self.cos), ("sink_attn", self.attn)):
            r[key], r[f"{key}_head_var"] = stats.head_reduce(acc.mean().float())
        for key, accs in (("k_spread", self.k_spread), ("v_spread", self.v_spread)):
            r[key], r[f"{key}_head_var"] = stats.head_reduce(torch.tensor([s.spread() for s in accs]))
        r["mlp_out_log_norm"] = float(self.m_log.mean())
        r["mlp_out_log_norm_prompt_var"] = float(self.m_log.var())
        r["mlp_out_spread"] = self.m_spread.spread()
        r["attn_out_log_norm"] = float(self.a_log.mean())
        r["resid_post_log_norm"] = float(self.y_log.mean())
        return r


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
    sites = {"attn.hook_q": None, "attn.hook_k": sinks, "attn.hook_v": sinks, "attn.hook_pattern": sinks,
             "hook_mlp_out": sinks, "hook_attn_out": sinks, "hook_resid_post": sinks}
    reduce = {"attn.hook_q": _q_reducer(sinks), "attn.hook_pattern": _pattern_reducer(sinks)}
    min_len = min(ctx.prompts.lengths)
    if heatmap_head is not None:
        if not 0 <= heatmap_head < H:
            raise UsageError(f"--head {heatmap_head} is out of range: this model has heads 0..{H - 1}")
        sites = {"attn.hook_pattern": None}  # full maps only for the heatmap
        reduce = {"attn.hook_pattern": _heatmap_reducer(heatmap_head, min_len)}
    acc: dict[tuple[int, int], _LayerSink] = {}
    heat = {l: torch.zeros(min_len, min_len, dtype=torch.float64) for l in layers}
    with Capture(lm, sites, layers=layers, reduce=reduce) as cap:
        for batch in ctx.iterate("scan"):
            c = cap.forward(batch)
            if heatmap_head is not None:
                for l in layers:
                    heat[l] += c[f"blocks.{l}.attn.hook_pattern"].double().cpu()
                continue
            for l in layers:
                g = lambda s: c[f"blocks.{l}.{s}"].cpu()  # noqa: E731
                q_mean, k, v, p = g("attn.hook_q"), g("attn.hook_k"), g("attn.hook_v"), g("attn.hook_pattern")
                m, a, y = g("hook_mlp_out"), g("hook_attn_out"), g("hook_resid_post")
                d_head = k.shape[-1]
                for i, t in enumerate(sinks):
                    key = (l, t)
                    if key not in acc:
                        acc[key] = _LayerSink(k.shape[2], d_head, D)
                    ok = (batch.lengths > max(4, t + 1)) & ~torch.isnan(k[:, i, 0, 0])
                    cos = (q_mean[:, i] * stats.unit(k[:, i])).sum(-1)  # [B, H]
                    acc[key].update(ok, k[:, i], v[:, i], cos, p[..., i], m[:, i], a[:, i], y[:, i])
    if heatmap_head is not None:
        n = len(ctx.prompts)
        return ScanResult(layers, sinks, [], {l: (heat[l] / n).tolist() for l in layers}, heatmap_head, list(ctx.notes))
    records = [acc[(l, t)].record(l, t) for l in layers for t in sinks]
    return ScanResult(layers, sinks, records, notes=list(ctx.notes))
