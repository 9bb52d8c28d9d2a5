"""The literature's attention-sink metrics as pure tensor functions (no model, no hooks; fp32 in, fp32 out).

Each function names the paper whose definition it implements. Shapes: B prompts, H heads, S positions (right
padding; `lengths` [B] gives each prompt's real length), D hidden dims, F down-projection input dims.
Positions are 0-based here: the papers' first token (k = 1) is position 0.
"""

from __future__ import annotations

import torch

# Gu et al. 2025, "When Attention Sink Emerges in Language Models": Sink_k^eps with eps = 0.3, T = 64 tokens.
GU_EPSILON = 0.3
GU_METRIC_LEN = 64
# Sun et al. 2024, "Massive Activations in Large Language Models": |h| > 100 and |h| >= 1000 x the median |h|.
SUN_MIN_ABS = 100.0
SUN_MEDIAN_RATIO = 1000.0
SUN_TOP_K = 3
# Yu et al. 2024, "The Super Weight": a layer's down projection *spikes* where its max |output| is at least
# YU_SPIKE_RATIO x the median over layers of that max (two orders of magnitude above a typical layer). The super
# weight sits in the first spiking layer (Yu et al.: early layers; the super activation then rides the residual).
YU_SPIKE_RATIO = 100.0
# Secondary sinks (ours, after Gu et al.'s alpha): a key t > 0 needs at least this many queries that see it, so
# that the last few positions (alpha_t of the final key is one query's attention to itself) are not flagged.
SECONDARY_MIN_QUERIES = 4


def valid_positions(lengths: torch.Tensor, S: int) -> torch.Tensor:
    """[B, S] bool: position < the prompt's length."""
    return torch.arange(S, device=lengths.device).view(1, -1) < lengths.view(-1, 1)


# -- Gu et al. 2025 ---------------------------------------------------------------------------------------------

def gu_alpha(A: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Gu et al. 2025, importance score alpha_k^{l,h} = 1/(T - k + 1) sum_{i >= k} A_{i,k} (1-based k).

    A: [B, H, S, S] attention probabilities (query, key). Every query that can see key k counts (i >= k, no
    q >= 4 rule); queries beyond the prompt's length do not. Returns [B, H, S]: alpha per key position
    (0-based key j = paper's k - 1, so the divisor is T - j); NaN for keys beyond the prompt's length."""
    B, H, S, _ = A.shape
    lengths = lengths.to(A.device)
    valid = valid_positions(lengths, S)                                       # [B, S]
    seen = A.float().tril().nan_to_num_()                                     # only queries i >= key k
    colsum = torch.einsum("bhqk,bq->bhk", seen, valid.to(seen.dtype))         # real queries only
    n_q = (lengths.view(-1, 1) - torch.arange(S, device=A.device).view(1, -1)).clamp_min(1)  # T - j
    alpha = colsum / n_q.view(B, 1, S).float()
    return alpha.masked_fill(~valid.view(B, 1, S), float("nan"))


def gu_sink_fraction(alpha_k: torch.Tensor, epsilon: float = GU_EPSILON) -> torch.Tensor:
    """Gu et al. 2025, Sink_k^eps for one prompt: the fraction of (layer, head) pairs with alpha_k > eps.
    alpha_k: [..., heads] -> [...] (the fraction over the last dim; average it over layers and prompts)."""
    return (alpha_k > epsilon).float().mean(-1)


# -- Sun et al. 2024 --------------------------------------------------------------------------------------------

_MEDIAN_SAMPLE = 2048     # median_abs: a strided sample of about this many values brackets the median first


def _median_1d(x: torch.Tensor) -> torch.Tensor:
    """The exact median of a 1-D tensor (mean of the two middle values for an even count). A strided sample
    brackets the middle ranks, so only the values inside the bracket are searched (by selection); if the bracket
    misses, the whole tensor is searched (same result, slower)."""
    n = x.numel()
    k1, k2 = (n + 1) // 2, n // 2 + 1                                          # 1-based middle ranks
    if n > 4 * _MEDIAN_SAMPLE:
        sample = x[::n // _MEDIAN_SAMPLE]
        m = sample.numel()
        half = 1.5 * m ** 0.5                                               # ~3 sd of the sample median's rank
        lo_b = sample.kthvalue(max(1, int(m / 2 - half))).values
        hi_b = sample.kthvalue(min(m, int(m / 2 + half) + 1)).values
        below = int((x < lo_b).sum())
        inside = x[(x >= lo_b) & (x <= hi_b)]
        if below < k1 and below + inside.numel() >= k2:
            v1 = inside.kthvalue(k1 - below).values
            return v1 if k1 == k2 else (v1 + inside.kthvalue(k2 - below).values) / 2
    v1 = x.kthvalue(k1).values
    return v1 if k1 == k2 else (v1 + x.kthvalue(k2).values) / 2


def _median_rows(a: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Exact medians of a [B, S, D] over each row's first lengths[b] positions (all dims) -> [B] (fp32, CPU)."""
    return torch.stack([_median_1d(a[b, :n].reshape(-1)) for b, n in enumerate(lengths.tolist())]).float().cpu()


def median_abs(h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sun et al. 2024: each prompt's median |h| over its real positions and every dim (the mean of the two middle
    values for an even count). h: [B, S, D] -> [B]."""
    return _median_rows(h.float().abs(), lengths)


def sun_reduce(h: torch.Tensor, lengths: torch.Tensor, k: int = SUN_TOP_K) -> dict:
    """Sun et al. 2024 for one batch of hidden states, |h| computed once: each prompt's median |h| [B], its top-k
    (top_abs) and its massive activations (massive_mask) as hits [n, 3] (row, position, dim) and values [n]."""
    a = h.float().abs()
    med = _median_rows(a, lengths)
    tv, tp, td = top_abs(a, lengths, k)
    top1 = tv[:, 0].cpu()
    if bool(((top1 > SUN_MIN_ABS) & (top1 >= SUN_MEDIAN_RATIO * med)).any()):   # else no activation is massive
        hits = massive_mask(a, med, lengths).nonzero()
    else:
        hits = torch.zeros(0, 3, dtype=torch.long)
    vals = h[hits[:, 0], hits[:, 1], hits[:, 2]].float()
    return {"median": med, "top_v": tv.cpu(), "top_p": tp.cpu(), "top_d": td.cpu(), "hits": hits.cpu(),
            "hit_vals": vals.cpu()}


def massive_mask(h: torch.Tensor, median: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Sun et al. 2024: an activation is massive when |h| > 100 and |h| >= 1000 x the median |h| of its hidden
    state. h: [B, S, D], median: [B] -> [B, S, D] bool (padding positions are never massive)."""
    a = h.float().abs()
    m = (a > SUN_MIN_ABS) & (a >= SUN_MEDIAN_RATIO * median.view(-1, 1, 1).to(a.device))
    if lengths is not None:
        m &= valid_positions(lengths.to(h.device), h.shape[1]).unsqueeze(-1)
    return m


def top_abs(h: torch.Tensor, lengths: torch.Tensor, k: int = SUN_TOP_K):
    """Sun et al. 2024: the k largest |h| of each prompt's hidden state, with their positions and dims.
    h: [B, S, D] -> (values [B, k] (|h|), positions [B, k], dims [B, k])."""
    B, S, D = h.shape
    k = min(k, S * D)
    valid = valid_positions(lengths.to(h.device), S)
    pv, pd = h.float().abs().topk(min(k, D), dim=-1)                         # per position first: [B, S, k']
    pv = pv.masked_fill(~valid.unsqueeze(-1), -1.0).reshape(B, -1)
    v, i = pv.topk(k, dim=1)
    pos = i // pd.shape[-1]
    return v, pos, pd.reshape(B, -1).gather(1, i)


# -- Yu et al. 2024 ---------------------------------------------------------------------------------------------

def abs_max_where(x: torch.Tensor, lengths: torch.Tensor):
    """Yu et al. 2024: the max |x| over real positions of a [B, S, C] activation and where it is.
    Returns (value, prompt row b, position s, channel c)."""
    B, S, C = x.shape
    valid = valid_positions(lengths.to(x.device), S)
    per_pos = torch.maximum(x.amax(-1), -x.amin(-1)).float().masked_fill(~valid, -1.0)   # [B, S]: no [B, S, C] copy
    i = int(per_pos.argmax())
    b, s = i // S, i % S
    c = int(x[b, s].float().abs().argmax())
    return float(per_pos[b, s]), b, s, c


def spike_layers(out_max: list, ratio: float = YU_SPIKE_RATIO) -> list[int]:
    """Yu et al. 2024, the spike rule (named, ours): layers whose max |down-projection output| is at least `ratio` x
    the median over layers of that max. None entries (no dense MLP) are left out."""
    vals = [v for v in out_max if v is not None]
    if not vals:
        return []
    med = float(torch.tensor(vals, dtype=torch.float64).median())  # the lower middle for an even count
    return [l for l, v in enumerate(out_max) if v is not None and v >= ratio * med]


def super_weight_coords(z_at: torch.Tensor, out_channel: int, W_down: torch.Tensor) -> dict:
    """Yu et al. 2024: the super weight links the spiking input channel to the spiking output channel.
    z_at: [F] the down projection's input at the spike's position; out_channel: the channel of the spiking
    output; W_down: [D, F]. col = argmax_j |z_j|; returns {row, col, value}."""
    col = int(z_at.float().abs().argmax())
    return {"row": int(out_channel), "col": col, "value": float(W_down[out_channel, col])}


# -- Guo et al. 2024 --------------------------------------------------------------------------------------------

def value_norms(v: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Guo et al. 2024 ("Active-dormant attention heads"): per head ||v_0|| and the mean ||v_t|| over real t > 0.
    v: [B, S, H, d] -> ([B, H], [B, H]); the mean is NaN for a one-token prompt."""
    n = v.float().norm(dim=-1)                                                # [B, S, H]
    valid = valid_positions(lengths.to(v.device), v.shape[1]).clone()
    valid[:, 0] = False
    cnt = valid.sum(1, keepdim=True).float()                                  # [B, 1]
    rest = (n * valid.unsqueeze(-1)).sum(1) / cnt
    return n[:, 0], rest.masked_fill(cnt == 0, float("nan"))


def dormant(alpha_first: torch.Tensor, v0: torch.Tensor, v_rest: torch.Tensor,
            epsilon: float = GU_EPSILON) -> torch.Tensor:
    """Guo et al. 2024: a head is dormant when it sinks onto the first token (alpha_1 > eps, Gu et al.'s score) and
    that token's value is smaller than the others' (||v_0|| < mean ||v_t||, t > 0). [B, H] -> [B, H] bool."""
    return (alpha_first > epsilon) & (v0 < v_rest)


# -- secondary sinks ---------------------------------------------------------------------------------------------

def secondary_candidates(alpha_layer: torch.Tensor, lengths: torch.Tensor, epsilon: float = GU_EPSILON,
                         min_queries: int = SECONDARY_MIN_QUERIES) -> torch.Tensor:
    """Keys t > 0 whose head-mean alpha_t (Gu et al.'s score, mean over the layer's heads) exceeds eps, among the
    keys seen by at least `min_queries` queries. alpha_layer: [B, S] -> [B, S] bool."""
    B, S = alpha_layer.shape
    t = torch.arange(S, device=alpha_layer.device).view(1, -1)
    enough = (lengths.to(alpha_layer.device).view(-1, 1) - t) >= min_queries
    return (torch.nan_to_num(alpha_layer, nan=0.0) > epsilon) & enough & (t > 0)
