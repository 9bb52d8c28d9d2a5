"""Attention maths as pure tensor functions: logits, log-sum-exp, probabilities (full maps or a few key columns),
the learned-sink term, and the log-sum-exp of the model's own fused SDPA kernel.

Shapes: q [B, H, Sq, d], k [B, Hkv, Sk, d] (grouped-query attention: each KV head serves H / Hkv query heads),
mask None (causal) or boolean / additive [B|1, 1|H, Sq, Sk] as transformers passes it to the attention function.
Everything is computed in fp32.

Learned sinks (gpt-oss): each head h has a logit s_h that joins every softmax denominator but no value, so
    lse_total = logaddexp(lse over keys, s_h),   A[q, t] = exp(logit[q, t] - lse_total),   p_sink = exp(s_h - lse_total)
and each row of A sums to 1 - p_sink.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# How the log-sum-exp of each attention call was obtained in this process: {"kernel": n, "recompute": n}, and
# "disabled": {combination: reason} for kernel paths that failed their one-time check.
LSE_STATS: dict = {"kernel": 0, "recompute": 0, "disabled": {}}
_KERNEL_OK: dict[tuple, bool] = {}


def key_mask(mask: torch.Tensor | None, Sq: int, j0: int, j1: int, device, q0: int = 0) -> torch.Tensor | None:
    """Additive fp32 mask for queries q0:Sq and key columns j0:j1, [B|1, 1|H, Sq-q0, j1-j0]; None means causal."""
    if mask is None:
        q = torch.arange(q0, Sq, device=device).view(-1, 1)
        k = torch.arange(j0, j1, device=device).view(1, -1)
        return torch.zeros(Sq - q0, j1 - j0, device=device).masked_fill(k > q, float("-inf")).view(1, 1, Sq - q0, -1)
    m = mask[..., q0:Sq, j0:j1]
    if m.dtype == torch.bool:
        return torch.where(m, 0.0, float("-inf")).float()
    return m.float()


def cols_mask(mask: torch.Tensor | None, Sq: int, cols: torch.Tensor, device) -> torch.Tensor:
    """Additive fp32 mask of the key columns `cols` (a LongTensor, all < Sk), [B|1, 1|H, Sq, T]."""
    if mask is None:
        q = torch.arange(Sq, device=device).view(-1, 1)
        return torch.zeros(Sq, cols.numel(), device=device).masked_fill(cols.view(1, -1) > q, float("-inf")).view(
            1, 1, Sq, -1)
    m = mask[..., :Sq, :].index_select(-1, cols)
    if m.dtype == torch.bool:
        return torch.where(m, 0.0, float("-inf")).float()
    return m.float()


_LONG_CACHE: dict = {}


def long_tensor(values: Sequence[int], device) -> torch.Tensor:
    """A small index tensor on `device`, made once (a host-to-device copy inside a hook would stall a GPU)."""
    key = (tuple(values), str(device))
    t = _LONG_CACHE.get(key)
    if t is None:
        if len(_LONG_CACHE) > 256:
            _LONG_CACHE.clear()
        t = _LONG_CACHE[key] = torch.tensor(list(values), dtype=torch.long, device=device)
    return t


def scores(qf: torch.Tensor, kf: torch.Tensor, H: int, scaling: float, softcap: float | None) -> torch.Tensor:
    """Logits for grouped queries qf [B, Hkv, rep, Sq, d] and keys kf [B, Hkv, n, d] -> [B, H, Sq, n]."""
    B, Hkv, rep, Sq, d = qf.shape
    s = (qf.reshape(B, Hkv, rep * Sq, d) @ kf.transpose(-1, -2)).view(B, H, Sq, kf.shape[2]) * scaling
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    return s


def _grouped(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    B, H, Sq, d = q.shape
    Hkv = k.shape[1]
    assert q.dim() == 4 and k.dim() == 4 and H % Hkv == 0 and k.shape[-1] == d, (tuple(q.shape), tuple(k.shape))
    return q.float().reshape(B, Hkv, H // Hkv, Sq, d)


# Long prompts: the log-sum-exp runs over blocks of QUERY_CHUNK queries and, within each, key chunks of at most
# `chunk_bytes` of fp32 logits, so no [S, S] map is ever held (at 32k tokens a head's full map is 4 GiB). The key
# chunk length depends only on QUERY_CHUNK, never on how many queries a block has, so every query row sums the
# same key chunks in the same order whatever the query blocking: the result is the same with or without it.
QUERY_CHUNK = 1024


def attention_lse(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                  softcap: float | None = None, chunk_bytes: int = 64 << 20, causal: bool = True,
                  query_chunk: int | None = None) -> torch.Tensor:
    """log-sum-exp over keys of the attention logits, [B, H, Sq] fp32, over blocks of `query_chunk` queries (None:
    QUERY_CHUNK) and key chunks of at most `chunk_bytes` of logits per QUERY_CHUNK queries. With `causal`, the
    mask (given or implied) is taken to hide keys after the query, so a block skips the key chunks after its last
    query and, in each chunk, the queries before its first key (about half the work)."""
    B, H, Sq, d = q.shape
    Sk = k.shape[2]
    qf = _grouped(q, k)
    kf = k.float()
    off = Sk - Sq  # queries are the last Sq positions
    step = max(16, int(chunk_bytes // max(1, B * H * QUERY_CHUNK * 4)))
    lse = torch.full((B, H, Sq), float("-inf"), device=q.device)
    qstep = max(1, int(QUERY_CHUNK if query_chunk is None else query_chunk))
    for qa in range(0, Sq, qstep):
        qb = min(Sq, qa + qstep)
        for j0 in range(0, Sk, step):
            j1 = min(Sk, j0 + step)
            q0 = min(qb, max(qa, j0 - off)) if causal else qa
            if q0 >= qb:
                break
            s = scores(qf[:, :, :, q0:qb], kf[:, :, j0:j1], H, scaling, softcap)
            s = s + key_mask(mask, qb, j0, j1, q.device, q0)
            lse[..., q0:qb] = torch.logaddexp(lse[..., q0:qb], torch.logsumexp(s, dim=-1))
    return lse


def with_sinks(lse: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """The softmax denominator's log including per-head learned sink logits sinks [H] (unchanged if None)."""
    if sinks is None:
        return lse
    s = sinks.detach().float().to(lse.device)
    assert s.dim() == 1 and s.shape[0] == lse.shape[1], f"sinks {tuple(s.shape)} vs lse {tuple(lse.shape)}"
    return torch.logaddexp(lse, s.view(1, -1, 1))


def sink_probability(lse_total: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """[B, H, Sq] probability mass on the learned sink, from the log-sum-exp that includes it (with_sinks)."""
    return torch.exp(sinks.detach().float().to(lse_total.device).view(1, -1, 1) - lse_total)


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                    softcap: float | None = None, cols: Sequence[int] | None = None,
                    chunk_bytes: int = 64 << 20, lse: torch.Tensor | None = None, causal: bool = True,
                    sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention probabilities in fp32 from q [B, H, Sq, d] and k [B, Hkv, Sk, d].

    cols=None: the full [B, H, Sq, Sk] softmax. Otherwise only those key columns, [B, H, Sq, T]: the
    log-sum-exp over all keys is accumulated chunk by chunk (or `lse` [B, H, Sq], over the keys only, is used), so
    memory is O(Sq * (T + chunk)), never O(Sq * Sk). Columns at or beyond Sk are NaN. `sinks` [H]: learned sink
    logits in the denominator (rows then sum to 1 - p_sink)."""
    B, H, Sq, d = q.shape
    Sk = k.shape[2]
    qf = _grouped(q, k)
    if cols is None:
        s = scores(qf, k.float(), H, scaling, softcap) + key_mask(mask, Sq, 0, Sk, q.device)
        if sinks is None:
            return torch.softmax(s, dim=-1)
        return torch.exp(s - with_sinks(torch.logsumexp(s, dim=-1), sinks).unsqueeze(-1))
    if lse is None:
        lse = attention_lse(q, k, mask, scaling, softcap, chunk_bytes, causal)
    lse = with_sinks(lse, sinks)
    cols = list(cols)
    valid = [c for c in cols if c < Sk]
    if valid:
        idx = long_tensor(valid, q.device)
        s = scores(qf, k.index_select(2, idx).float(), H, scaling, softcap)
        p = torch.exp(s + cols_mask(mask, Sq, idx, q.device) - lse.unsqueeze(-1))
        if len(valid) == len(cols):
            return p
    out = torch.full((B, H, Sq, len(cols)), float("nan"), device=q.device)
    if valid:
        for i, c in enumerate(cols):
            if c < Sk:
                out[..., i] = p[..., valid.index(c)]
    return out


def probs_from_logits(logits: torch.Tensor, cols: Sequence[int] | None = None) -> torch.Tensor:
    """Probabilities from the full logits a model fed to its softmax ([B, H, Sq, Sk], mask included), in fp32;
    cols: only those key columns (NaN beyond Sk), computed QUERY_CHUNK query rows at a time (no fp32 copy of the
    whole map)."""
    if cols is None:
        return torch.softmax(logits.float(), dim=-1)
    Sq, Sk = logits.shape[-2:]
    out = torch.full((*logits.shape[:-1], len(cols)), float("nan"), device=logits.device)
    for qa in range(0, Sq, QUERY_CHUNK):
        p = torch.softmax(logits[..., qa:qa + QUERY_CHUNK, :].float(), dim=-1)
        for i, c in enumerate(cols):
            if c < Sk:
                out[..., qa:qa + QUERY_CHUNK, i] = p[..., c]
    return out


# -- the log-sum-exp of the model's own SDPA kernel ---------------------------------------------------------------

def sdpa_args(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The arguments of F.scaled_dot_product_attention, by position or name."""
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


_LAST_MASK: list = [None, None, None]  # (boolean mask, dtype, additive mask): every layer of a forward shares one


def _bool_to_additive(mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """What `scaled_dot_product_attention` does to a boolean mask before calling a fused kernel."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    if _LAST_MASK[0] is mask and _LAST_MASK[1] == dtype:
        return _LAST_MASK[2]
    out = torch.where(mask.logical_not(), float("-inf"), torch.zeros((), dtype=dtype, device=mask.device))
    _LAST_MASK[:] = [mask, dtype, out]
    return out


def release_mask() -> None:
    _LAST_MASK[:] = [None, None, None]


def _kernel_call(backend: int, q, k, v, mask, dropout_p, is_causal, scale):
    """Call the fused kernel that `scaled_dot_product_attention` dispatches to; (output, lse [B, H, Sq]) or None."""
    dev = q.device.type
    if backend == 1 and dev == "cpu":  # SDPBackend.FLASH_ATTENTION
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=_bool_to_additive(mask, q.dtype), scale=scale)
        return out, lse
    if backend == 1 and dev == "cuda" and mask is None and q.shape[-1] % 8 == 0:
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)
        return res[0], res[1]
    if backend == 2 and dev == "cuda":  # SDPBackend.EFFICIENT_ATTENTION
        bias = _bool_to_additive(mask, q.dtype)
        if bias is not None:  # as the dispatcher does: a 16-aligned bias, expanded to [B, H, Sq, Sk]
            Sk = bias.shape[-1]
            if bias.stride(-1) != 1 or any(st % 16 for st in bias.stride()[:-1]):
                bias = F.pad(bias, (0, 16 - Sk % 16))[..., :Sk]
            bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, dropout_p, is_causal,
                                                                      scale=scale)
        return res[0], res[1][..., :q.shape[2]]
    return None


class KernelLSE(TorchFunctionMode):
    """Active around one attention call: the SDPA call on `query` runs its fused kernel directly, keeping the lse."""

    def __init__(self, query: torch.Tensor):
        super().__init__()
        self.query = query
        self.lse: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.lse is None and args and args[0] is self.query:
            res = sdpa_with_lse(*args, **kwargs)
            if res is not None:
                out, self.lse = res
                return out
        return func(*args, **kwargs)


def sdpa_with_lse(*args, **kwargs):
    """(output, lse fp32 [B, H, Sq]) of an SDPA call through its fused kernel, bit-identical to
    F.scaled_dot_product_attention (checked once per combination), or None where that is not possible."""
    q, k, v, mask, dropout_p, is_causal, scale, gqa = sdpa_args(*args, **kwargs)
    if dropout_p or q.dim() != 4 or torch.is_grad_enabled() and q.requires_grad:
        return None
    try:
        backend = int(torch._fused_sdp_choice(q, k, v, mask, dropout_p, is_causal, scale=scale, enable_gqa=gqa))
    except Exception:  # noqa: BLE001  (an older torch without this private entry point)
        return None
    combo = (q.device.type, backend, str(q.dtype), None if mask is None else str(mask.dtype), bool(is_causal),
             q.shape[1] != k.shape[1])
    ok = _KERNEL_OK.get(combo)
    if ok is False:
        return None
    try:
        res = _kernel_call(backend, q, k, v, mask, dropout_p, is_causal, scale)
    except Exception as err:  # noqa: BLE001
        _disable(combo, f"{type(err).__name__}: {err}")
        return None
    if res is None:
        _KERNEL_OK[combo] = False
        return None
    out, lse = res
    if ok is None:  # first use of this combination in this process: verify it once
        reason = _verify(out, lse, q, k, v, mask, dropout_p, is_causal, scale, gqa)
        if reason:
            _disable(combo, reason)
            return None
        _KERNEL_OK[combo] = True
    return out, lse.float()


def _verify(out, lse, q, k, v, mask, dropout_p, is_causal, scale, gqa) -> str | None:
    kw = {"enable_gqa": True} if gqa else {}
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                         scale=scale, **kw)
    if ref.shape != out.shape or not torch.equal(ref, out):
        return "kernel output differs from scaled_dot_product_attention"
    if tuple(lse.shape) != tuple(q.shape[:3]):
        return f"unexpected lse shape {tuple(lse.shape)}"
    if is_causal:
        mask = None  # attention_lse's None mask is the causal one
    s = scale if scale is not None else q.shape[-1] ** -0.5
    want = attention_lse(q, k, mask, s, causal=False)
    fin = torch.isfinite(want)
    tol = 1e-4 if q.dtype == torch.float32 else 2e-2
    got = lse.float()
    if not torch.equal(fin, torch.isfinite(got)):
        return "kernel lse differs from the recomputed one (non-finite entries)"
    if fin.any():
        err = float((got[fin] - want[fin]).abs().max())
        if err > tol * (1 + float(want[fin].abs().max())):
            return f"kernel lse differs from the recomputed one by {err:.3g}"
    return None


def _disable(combo, reason: str) -> None:
    _KERNEL_OK[combo] = False
    LSE_STATS["disabled"][str(combo)] = reason


# -- attention computed inline in a module's forward ------------------------------------------------------------

_MATMUL = {torch.Tensor.__matmul__, torch.matmul, torch.Tensor.matmul}
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}


class InlineAttention(TorchFunctionMode):
    """Active around the forward of an attention module that computes attention inline (adapter attn_inline):
    observes its F.scaled_dot_product_attention call (run through the kernel-lse path when wanted), or its eager
    q @ k^T -> softmax(logits) -> probs @ v. Every call is passed on unchanged."""

    def __init__(self, want_lse: bool):
        super().__init__()
        self.want_lse = want_lse
        self.sdpa = None           # (q, k, v, mask, is_causal, scale, lse)
        self.matmuls: list = []    # 4-D (a, b) pairs, in call order
        self.logits = None
        self.after_softmax = None  # index into matmuls of the first matmul after the softmax

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.sdpa is None:
            q, k, v, mask, _, is_causal, scale, _ = sdpa_args(*args, **kwargs)
            res = sdpa_with_lse(*args, **kwargs) if self.want_lse else None
            out, lse = res if res is not None else (func(*args, **kwargs), None)
            self.sdpa = (q, k, v, None if is_causal and mask is None else mask, scale, lse)
            return out
        if func in _MATMUL and len(args) == 2 and all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in args):
            self.matmuls.append(args)
        elif func in _SOFTMAX and self.logits is None and args and args[0].dim() == 4:
            self.logits = args[0]
            self.after_softmax = len(self.matmuls)
        return func(*args, **kwargs)

    def qkv(self):
        """(q, k, v, mask, scaling, lse, logits) of the attention just run, or None if it was not seen."""
        if self.sdpa is not None:
            q, k, v, mask, scale, lse = self.sdpa
            return q, k, v, mask, scale if scale is not None else q.shape[-1] ** -0.5, lse, None
        if self.logits is None or not 0 < self.after_softmax < len(self.matmuls):
            return None
        q, kt = self.matmuls[self.after_softmax - 1]
        _, v = self.matmuls[self.after_softmax]
        return q, kt.transpose(-1, -2), v, None, None, None, self.logits
