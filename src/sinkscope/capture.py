"""Record named sites (hooks.py vocabulary) for chosen layers and token positions.

    with Capture(lm, {"hook_mlp_out": [0, 1, 8], "attn.hook_pattern": [0]}, layers=[3, 4]) as cap:
        for batch in batches:
            cache = cap.forward(batch)        # {"blocks.3.hook_mlp_out": fp32 [B, 3, D], ...}

* Every captured tensor is fp32, whatever the model dtype. Positions a prompt does not have are NaN.
* `tokens=None` keeps every position. For `attn.hook_pattern`, tokens select *key* columns: the result is
  [B, H, S_query, T], computed from q and k and the log-sum-exp over all keys (causal mask, padding,
  sliding windows, GQA and soft-capping respected), so the model itself runs its fast SDPA kernel and no full
  attention map is ever materialised. With tokens=None the full [B, H, S, S] map is returned.
* Where the model's SDPA call runs a fused kernel that also returns the log-sum-exp (CPU flash attention;
  CUDA flash / memory-efficient attention), that kernel is called directly and its log-sum-exp is reused, so
  the sink columns cost a [S, T] product per head. Each (device, backend, dtype, mask kind) combination is
  verified once per process against `torch.nn.functional.scaled_dot_product_attention` (bit-identical output)
  and against a recomputed log-sum-exp; anything else falls back to recomputing the log-sum-exp over key chunks.
* `reduce[site](tensor, batch)` shrinks a capture inside the hook (e.g. a per-prompt mean over queries), so
  large per-position tensors are never stored.
* Hooks and the attention tap are removed in `finally`, even when the forward raises; the model is unchanged.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .arch import get_module
from .hooks import ATTN_SITES, ShapeTracker, parse_site, shape_hooks, site_hook, site_name

TAP_PREFIX = "sinkscope_"
_ACTIVE_TAPS: list["Capture"] = []
_REGISTERED: set[str] = set()
# Reuse the log-sum-exp of the model's own fused SDPA kernel where it is verified; SINKSCOPE_KERNEL_LSE=0 turns
# this off (every sink column is then recomputed from q and k with a chunked log-sum-exp).
KERNEL_LSE = os.environ.get("SINKSCOPE_KERNEL_LSE", "1") != "0"
# How the log-sum-exp of each attention call was obtained in this process: {"kernel": n, "recompute": n}, and
# "disabled": {combination: reason} for kernel paths that failed their one-time check.
LSE_STATS: dict = {"kernel": 0, "recompute": 0, "disabled": {}}
_KERNEL_OK: dict[tuple, bool] = {}


class StopForward(Exception):
    """Raised by a hook to end a forward pass early once every requested layer has run."""


def select_tokens(t: torch.Tensor, tokens: Sequence[int] | None, lengths: torch.Tensor | None, dim: int = 1):
    """Index positions along `dim`; positions at or beyond a prompt's length become NaN."""
    if tokens is None:
        return t
    return _Selector(lengths)(t, tokens, dim)


class _Selector:
    """Token selection with index tensors built once per batch and device: no host-to-device copies and no
    device-to-host syncs inside the hooks. Which positions are missing is decided from the CPU lengths."""

    def __init__(self, lengths: torch.Tensor | None):
        self.lengths = None if lengths is None else lengths.detach().cpu()
        self._cache: dict = {}

    def _index(self, tokens: Sequence[int], S: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = (tuple(tokens), S, str(device))
        hit = self._cache.get(key)
        if hit is None:
            tok = torch.tensor(list(tokens), dtype=torch.long)
            bad = (tok >= S).view(1, -1)
            if self.lengths is not None:
                bad = bad | (tok.view(1, -1) >= self.lengths.view(-1, 1))
            idx = tok.clamp(max=S - 1).to(device)
            hit = self._cache[key] = (idx, bad.to(device) if bool(bad.any()) else None)
        return hit

    def __call__(self, t: torch.Tensor, tokens: Sequence[int] | None, dim: int = 1, cast=None) -> torch.Tensor:
        if tokens is None:
            return t if cast is None else t.to(cast)
        idx, bad = self._index(tokens, t.shape[dim], t.device)
        out = t.index_select(dim, idx)
        if cast is not None:
            out = out.to(cast)
        if bad is not None:
            shape = [1] * out.dim()
            shape[0], shape[dim] = bad.shape[0], bad.shape[1]
            out = out.masked_fill(bad.view(shape), float("nan"))
        return out


def _key_mask(mask: torch.Tensor | None, Sq: int, j0: int, j1: int, device, q0: int = 0) -> torch.Tensor | None:
    """Additive fp32 mask for queries q0:Sq and key columns j0:j1, [B|1, 1|H, Sq-q0, j1-j0]; None means causal."""
    if mask is None:
        q = torch.arange(q0, Sq, device=device).view(-1, 1)
        k = torch.arange(j0, j1, device=device).view(1, -1)
        return torch.zeros(Sq - q0, j1 - j0, device=device).masked_fill(k > q, float("-inf")).view(1, 1, Sq - q0, -1)
    m = mask[..., q0:Sq, j0:j1]
    if m.dtype == torch.bool:
        return torch.where(m, 0.0, float("-inf")).float()
    return m.float()


def _cols_mask(mask: torch.Tensor | None, Sq: int, cols: torch.Tensor, device) -> torch.Tensor:
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


def _long_tensor(values: Sequence[int], device) -> torch.Tensor:
    """A small index tensor on `device`, made once (a host-to-device copy inside a hook would stall a GPU)."""
    key = (tuple(values), str(device))
    t = _LONG_CACHE.get(key)
    if t is None:
        if len(_LONG_CACHE) > 256:
            _LONG_CACHE.clear()
        t = _LONG_CACHE[key] = torch.tensor(list(values), dtype=torch.long, device=device)
    return t


def _scores(qf: torch.Tensor, kf: torch.Tensor, H: int, scaling: float, softcap: float | None) -> torch.Tensor:
    """Logits for grouped queries qf [B, Hkv, rep, Sq, d] and keys kf [B, Hkv, n, d] -> [B, H, Sq, n]."""
    B, Hkv, rep, Sq, d = qf.shape
    s = (qf.reshape(B, Hkv, rep * Sq, d) @ kf.transpose(-1, -2)).view(B, H, Sq, kf.shape[2]) * scaling
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    return s


def attention_lse(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                  softcap: float | None = None, chunk_bytes: int = 64 << 20, causal: bool = True) -> torch.Tensor:
    """log-sum-exp over keys of the attention logits, [B, H, Sq] fp32, accumulated over key chunks of at most
    `chunk_bytes` of logits. With `causal`, the mask (given or implied) is taken to hide keys after the query,
    so queries before a chunk's first key are skipped for that chunk (about half the work)."""
    B, H, Sq, d = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    assert H % Hkv == 0, (H, Hkv)
    rep = H // Hkv
    qf = q.float().reshape(B, Hkv, rep, Sq, d)
    kf = k.float()
    off = Sk - Sq  # queries are the last Sq positions
    step = max(16, int(chunk_bytes // max(1, B * H * Sq * 4)))
    lse = torch.full((B, H, Sq), float("-inf"), device=q.device)
    for j0 in range(0, Sk, step):
        j1 = min(Sk, j0 + step)
        q0 = min(Sq, max(0, j0 - off)) if causal else 0
        if q0 >= Sq:
            break
        s = _scores(qf[:, :, :, q0:], kf[:, :, j0:j1], H, scaling, softcap)
        s = s + _key_mask(mask, Sq, j0, j1, q.device, q0)
        part = torch.logsumexp(s, dim=-1)
        if j0 == 0 and q0 == 0:
            lse = part
        else:
            lse[..., q0:] = torch.logaddexp(lse[..., q0:], part)
    return lse


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                    softcap: float | None = None, cols: Sequence[int] | None = None,
                    chunk_bytes: int = 64 << 20, lse: torch.Tensor | None = None, causal: bool = True) -> torch.Tensor:
    """Attention probabilities in fp32 from q [B, H, Sq, d] and k [B, Hkv, Sk, d].

    cols=None: the full [B, H, Sq, Sk] softmax. Otherwise only those key columns, [B, H, Sq, T]: the
    normaliser is `lse` [B, H, Sq] when given (e.g. from the attention kernel), else a log-sum-exp accumulated
    over key chunks of at most `chunk_bytes` of logits (see `attention_lse`). Columns >= Sk are NaN."""
    B, H, Sq, d = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    assert H % Hkv == 0, (H, Hkv)
    if cols is None:
        s = _scores(q.float().reshape(B, Hkv, H // Hkv, Sq, d), k.float(), H, scaling, softcap)
        return torch.softmax(s + _key_mask(mask, Sq, 0, Sk, q.device), dim=-1)
    if lse is None:
        lse = attention_lse(q, k, mask, scaling, softcap, chunk_bytes, causal)
    cols = list(cols)
    valid = [c for c in cols if c < Sk]
    if valid:
        idx = _long_tensor(valid, q.device)
        s = _scores(q.float().reshape(B, Hkv, H // Hkv, Sq, d), k.index_select(2, idx).float(), H, scaling, softcap)
        p = torch.exp(s + _cols_mask(mask, Sq, idx, q.device) - lse.unsqueeze(-1))
        if len(valid) == len(cols):
            return p
    out = torch.full((B, H, Sq, len(cols)), float("nan"), device=q.device)
    if valid:
        for i, c in enumerate(cols):
            if c < Sk:
                out[..., i] = p[..., valid.index(c)]
    return out


# -- the log-sum-exp of the model's own SDPA kernel ---------------------------------------------------------------

def _sdpa_args(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
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


def _release_mask() -> None:
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


class _KernelLSE(TorchFunctionMode):
    """Active around one attention call: the SDPA call on `query` runs its fused kernel directly, keeping the lse."""

    def __init__(self, query: torch.Tensor):
        super().__init__()
        self.query = query
        self.lse: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.lse is None and args and args[0] is self.query:
            res = _sdpa_with_lse(*args, **kwargs)
            if res is not None:
                out, self.lse = res
                return out
        return func(*args, **kwargs)


def _sdpa_with_lse(*args, **kwargs):
    q, k, v, mask, dropout_p, is_causal, scale, gqa = _sdpa_args(*args, **kwargs)
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


# -- the attention tap -----------------------------------------------------------------------------------------------

def _inner_attention(module, impl: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    if impl == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[impl]


def _tap(module, query, key, value, attention_mask, **kwargs):
    """The attention function installed while a Capture reads attention sites: read, then delegate."""
    impl = module.config._attn_implementation[len(TAP_PREFIX):]
    caps = [cap for cap in _ACTIVE_TAPS if id(module) in cap._attn_layer]
    for cap in caps:
        cap._on_qkv(module, query, key, value)
    want = [cap for cap in caps if cap._wants_pattern(module)]
    inner = _inner_attention(module, impl)
    lse = None
    if want and KERNEL_LSE and impl == "sdpa" and kwargs.get("softcap") is None \
            and all(cap._pattern_cols(module) is not None for cap in want):
        grab = _KernelLSE(query)
        with grab:
            result = inner(module, query, key, value, attention_mask, **kwargs)
        lse = grab.lse
    else:
        result = inner(module, query, key, value, attention_mask, **kwargs)
    if want:
        LSE_STATS["kernel" if lse is not None else "recompute"] += 1
    for cap in want:
        cap._on_pattern(module, query, key, attention_mask, kwargs, lse)
    return result


def _register_tap(impl: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface
    name = TAP_PREFIX + impl
    if name not in _REGISTERED:
        AttentionInterface.register(name, _tap)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
        _REGISTERED.add(name)
    return name


class Capture:
    """Context manager that records sites; see the module docstring."""

    def __init__(self, lm, sites: Mapping[str, Sequence[int] | None], layers: Sequence[int] | None = None,
                 reduce: Mapping[str, Callable] | None = None, stop_early: bool = True):
        self.lm = lm
        self.reduce = dict(reduce or {})
        self.stop_early = stop_early
        self.plan: dict[tuple[int, str], Sequence[int] | None] = {}
        all_layers = list(range(lm.n_layers)) if layers is None else list(layers)
        for name, tokens in sites.items():
            layer, site = parse_site(name)
            for l in ([layer] if layer is not None else all_layers):
                if not 0 <= l < lm.n_layers:
                    raise IndexError(f"layer {l} out of range 0..{lm.n_layers - 1}")
                self.plan[(l, site)] = None if tokens is None else list(tokens)
        self.cache: dict[str, torch.Tensor] = {}
        self.batch = None
        self._select = _Selector(None)
        self._handles: list = []
        self._attn_layer: dict[int, int] = {}
        self._saved_impl: str | None = None
        self.last_layer = max((l for l, _ in self.plan), default=-1)

    # -- context management -------------------------------------------------------------------------
    def __enter__(self) -> "Capture":
        try:
            shapes = ShapeTracker()
            self._handles += shape_hooks(self.lm, shapes)
            for (l, site), tokens in self.plan.items():
                if site not in ATTN_SITES:
                    self._handles += site_hook(self.lm, l, site, self._reader(l, site, tokens), shapes)
            attn_layers = {l for l, s in self.plan if s in ATTN_SITES}
            for l in attn_layers:
                self._attn_layer[id(get_module(self.lm.layers[l], self.lm.adapter.attn))] = l
            if attn_layers:
                self._install_tap()
            if self.stop_early and self.last_layer < self.lm.n_layers - 1 and self.plan:
                def stop(mod, args, out):
                    raise StopForward
                self._handles.append(self.lm.layers[self.last_layer].register_forward_hook(stop))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _install_tap(self) -> None:
        cfg = self.lm.model.config
        impl = cfg._attn_implementation
        if impl.startswith(TAP_PREFIX):  # nested capture: the tap is already in place
            _ACTIVE_TAPS.append(self)
            return
        if impl not in ("sdpa", "eager"):
            impl = "sdpa"  # other kernels (flash, flex) are swapped for SDPA while attention sites are read
        self._saved_impl = cfg._attn_implementation
        cfg._attn_implementation = _register_tap(impl)
        _ACTIVE_TAPS.append(self)

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self in _ACTIVE_TAPS:
            _ACTIVE_TAPS.remove(self)
        if self._saved_impl is not None:
            self.lm.model.config._attn_implementation = self._saved_impl
            self._saved_impl = None

    # -- recording ------------------------------------------------------------------------------------
    def _store(self, l: int, site: str, t: torch.Tensor) -> None:
        fn = self.reduce.get(site)
        self.cache[site_name(l, site)] = fn(t, self.batch) if fn is not None else t

    def _lengths(self):
        return None if self.batch is None else self.batch.lengths

    def _reader(self, l: int, site: str, tokens):
        def read(t: torch.Tensor):
            # select first, then cast: only the requested positions are copied to fp32
            self._store(l, site, self._select(t.detach(), tokens, dim=1, cast=torch.float32))
        return read

    def _on_qkv(self, module, query, key, value) -> None:
        l = self._attn_layer.get(id(module))
        if l is None:
            return
        rep = query.shape[1] // key.shape[1]
        for site, t in (("attn.hook_q", query), ("attn.hook_k", key), ("attn.hook_v", value)):
            if (l, site) in self.plan:
                t = self._select(t.detach(), self.plan[(l, site)], dim=2, cast=torch.float32)
                if rep > 1 and site != "attn.hook_q":
                    t = t.repeat_interleave(rep, dim=1)  # GQA: each KV head serves `rep` query heads
                self._store(l, site, t.transpose(1, 2))

    def _wants_pattern(self, module) -> bool:
        l = self._attn_layer.get(id(module))
        return l is not None and (l, "attn.hook_pattern") in self.plan

    def _pattern_cols(self, module):
        return self.plan[(self._attn_layer[id(module)], "attn.hook_pattern")]

    def _on_pattern(self, module, query, key, mask, kwargs, lse) -> None:
        l = self._attn_layer[id(module)]
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        cols = self.plan[(l, "attn.hook_pattern")]
        chunk = (256 << 20) if query.device.type == "cuda" else (64 << 20)
        p = attention_probs(query.detach(), key.detach(), mask, scaling, kwargs.get("softcap"), cols,
                            chunk_bytes=chunk, lse=lse)
        if cols is not None and self.batch is not None:
            _, bad = self._select._index(cols, 1 << 62, p.device)  # only the lengths decide here
            if bad is not None:
                p = p.masked_fill(bad.view(bad.shape[0], 1, 1, -1), float("nan"))
        self._store(l, "attn.hook_pattern", p)

    def forward(self, batch, **kwargs) -> dict[str, torch.Tensor]:
        """Run the headless body on one batch (no LM head, inference mode) and return the fresh cache."""
        self.cache = {}
        self.batch = batch
        self._select = _Selector(None if batch is None else batch.lengths)
        dev = self.lm.device
        try:
            with torch.inference_mode():
                self.lm.body(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                             use_cache=False, **kwargs)
        except StopForward:
            pass
        finally:
            _release_mask()
        return self.cache
