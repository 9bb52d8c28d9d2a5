"""`--scan` (MODES.md section 1): per layer and sink key t, how token t's K, V, MLP output and the attention
it receives look across prompts. Everything is streamed batch by batch: memory does not grow with N.

Speed: the hooks only shrink each layer's tensors to the sink positions (q to one mean unit query per sink,
the attention to one mean per head and sink); after each batch, every layer's and sink's statistics are merged
at once, with a few vectorised operations, into fixed-size accumulators on the model's device. Nothing is
copied to the host until the end, so a GPU never waits on the CPU between batches.

Learned sinks (gpt-oss): p_sink, the attention mass on the learned sink, averaged over the same queries as
sink_attn and head-reduced the same way (N/A for models without learned sinks). Gated attention (Qwen3-Next):
attn_gate, the mean of the output gate sigmoid(g) over d_head at token t, per head then head-reduced (N/A for
ungated models). Hybrid models: the blocks without a softmax attention have N/A for every attention statistic
(k/v/cos/sink_attn/p_sink/attn_gate, softmax_attention = false) and a note says which they are."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..result import Result
from .. import distributed, stats
from ..capture import Capture
from ..errors import UsageError
from ..runner import QUERY_START, RunContext, query_mask
from .scan_state import LOG_FLOOR, QUERY_STATS, _LayerBuffers, _ScanAccumulator  # noqa: F401


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
               "attn_out_log_norm", "resid_post_log_norm", "n_prompts", "n_prompts_query", "p_sink",
               "p_sink_head_var", "attn_gate", "attn_gate_head_var", "softmax_attention")
# Which prompts each statistic uses: those that have token t (TOKEN_STATS), or also a query q >= max(4, t+1)
# for key t (QUERY_STATS, scan_state.py). A statistic with fewer prompts than that is N/A (null), never 0.
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


def _sink_prob_reducer(sinks):
    """hook_sink_prob [B, H, S] -> [B, H, T]: per prompt and head, the mean learned-sink mass over the queries of
    each sink key t (the same weights as sink_attn)."""
    weights = _weights(sinks)

    def reduce(ps: torch.Tensor, batch) -> torch.Tensor:
        W = weights.get(batch, ps.shape[2], ps.device)[0]
        return torch.einsum("bhs,bts->bht", torch.nan_to_num(ps), W)
    return reduce


def _gate_reducer(gate: torch.Tensor, batch) -> torch.Tensor:
    """hook_gate [B, T, H, d] -> [B, T, H]: the mean gate value over each head's dims at the sink tokens."""
    return gate.mean(-1)


def _heatmap_reducer(head: int, size: int):
    """hook_pattern [B, H, S, K] (key columns 0..K-1) -> [M, M]: the sum over the batch of head `head`'s map,
    cropped or zero-padded to M = size, counting only the cells (query, key) that a prompt has (both below its
    length)."""
    def reduce(p: torch.Tensor, batch) -> torch.Tensor:
        m = min(size, p.shape[2], p.shape[3])
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
    a = lm.adapter
    attn_layers = [l for l in layers if l in set(lm.attention_layers)]
    if not attn_layers:
        raise UsageError(f"--scan: none of the scanned layers {layers[0]}..{layers[-1]} has a softmax attention")
    weights = _BatchWeights(sinks)
    attn_sites = ["attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern"]
    has = tuple(k for k, on in (("p_sink", a.has_learned_sinks), ("attn_gate", a.has_attn_gate)) if on)
    if "p_sink" in has:
        attn_sites.append("attn.hook_sink_prob")
    if "attn_gate" in has:
        attn_sites.append("attn.hook_gate")
    slots = [i for i, l in enumerate(layers) if l in attn_layers]
    bufs = _LayerBuffers(len(layers), dev, slots={site: slots for site in attn_sites})
    sites = {"attn.hook_q": None, "attn.hook_k": sinks, "attn.hook_v": sinks, "attn.hook_pattern": sinks,
             "attn.hook_sink_prob": None, "attn.hook_gate": sinks,
             "hook_mlp_out": sinks, "hook_attn_out": sinks, "hook_resid_post": sinks}
    sites = {site: tok for site, tok in sites.items() if not site.startswith("attn.") or site in attn_sites}
    reduce = {site: bufs.writer(site) for site in sites}
    reduce["attn.hook_q"] = bufs.writer("attn.hook_q", _q_reducer(weights))
    reduce["attn.hook_pattern"] = bufs.writer("attn.hook_pattern", _pattern_reducer(weights))
    reduce["attn.hook_sink_prob"] = bufs.writer("attn.hook_sink_prob", _sink_prob_reducer(weights))
    reduce["attn.hook_gate"] = bufs.writer("attn.hook_gate", _gate_reducer)
    acc: _ScanAccumulator | None = None

    def step(batch):
        nonlocal acc
        B = batch.size
        bufs.start({"attn.hook_q": (B, T, H, d), "attn.hook_k": (B, T, H, d), "attn.hook_v": (B, T, H, d),
                    "attn.hook_pattern": (B, H, T), "attn.hook_sink_prob": (B, H, T),
                    "attn.hook_gate": (B, T, H), "hook_mlp_out": (B, T, D), "hook_attn_out": (B, T, D),
                    "hook_resid_post": (B, T, D)})
        cap.forward(batch)
        b = bufs.buf                                                  # [L, B, ...] each
        if acc is None:
            acc = _ScanAccumulator(len(layers), T, b["attn.hook_k"].shape[3], b["attn.hook_k"].shape[4], D, dev)
        _, ok_q, ok_tok = weights.get(batch, batch.input_ids.shape[1], dev)
        acc.update(ok_q, ok_tok, b["attn.hook_q"], b["attn.hook_k"], b["attn.hook_v"], b["attn.hook_pattern"],
                   b["hook_mlp_out"], b["hook_attn_out"], b["hook_resid_post"],
                   b["attn.hook_sink_prob"] if "p_sink" in has else None,
                   b["attn.hook_gate"] if "attn_gate" in has else None)
        bufs.buf = {}

    with Capture(lm, sites, layers=layers, reduce=reduce) as cap:
        ctx.for_each("scan", step)
    acc = _ScanAccumulator.merged_across_ranks(acc, dev)   # data-parallel runs: every rank's prompts
    records = acc.records(layers, sinks, attn_layers, has)
    notes = list(ctx.notes) + _coverage_notes(lengths, sinks) + _mixer_notes(lm, layers, attn_layers)
    return ScanResult(layers, sinks, records, notes=notes)


def _mixer_notes(lm, layers: list[int], attn_layers: list[int]) -> list[str]:
    """Say which scanned blocks have no softmax attention (hybrid models), and what is measured there."""
    others = [l for l in layers if l not in attn_layers]
    if not others:
        return []
    return [f"layers {', '.join(map(str, others))} have no softmax attention ({lm.adapter.model_type}: a "
            f"{lm.adapter.linear_mixer} token mixer): their k/v/cos/sink_attn columns are N/A; attn_out is the "
            f"token mixer's output"]


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
    attn = [l for l in layers if l in set(ctx.lm.attention_layers)]
    sums = torch.zeros(len(attn), M, M, dtype=torch.float64)

    def step(batch):
        c = cap.forward(batch)
        sums.add_(torch.stack([c[f"blocks.{l}.attn.hook_pattern"].cpu() for l in attn]))

    # key columns 0..M-1 only: the probabilities are recomputed for those columns, never as a full [S, S] map
    with Capture(ctx.lm, {"attn.hook_pattern": list(range(M))}, layers=attn,
                 reduce={"attn.hook_pattern": _heatmap_reducer(head, M)}) as cap:
        ctx.for_each("scan heatmaps", step)
    heat = dict(zip(attn, distributed.all_sum(sums)))        # data-parallel runs: every rank's prompts
    counts = heatmap_counts(lengths, M)
    maps = {l: torch.where(counts > 0, heat[l] / counts.clamp(min=1), float("nan")).tolist() if l in attn
            else torch.full((M, M), float("nan")).tolist() for l in layers}
    note = (f"heatmaps are {M}x{M}: positions 0..{M - 1} of head {head}; each cell is averaged over the prompts "
            f"that have it ({int(counts[0, 0])} prompts at cell (0, 0), {int(counts[M - 1, M - 1])} at "
            f"({M - 1}, {M - 1}); per-cell counts are in the JSON)")
    if max(lengths) > M:
        note += f"; the longest prompt has {max(lengths)} tokens (raise --heatmap-size to see more)"
    notes = list(ctx.notes) + [note] + _mixer_notes(ctx.lm, layers, attn)
    return ScanResult(layers, [], [], maps, head, notes, heatmap_counts=counts.tolist())
