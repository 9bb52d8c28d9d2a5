"""Record named sites (hooks.py vocabulary) for chosen layers and token positions.

    with Capture(lm, {"hook_mlp_out": [0, 1, 8], "attn.hook_pattern": [0]}, layers=[3, 4]) as cap:
        for batch in batches:
            cache = cap.forward(batch)        # {"blocks.3.hook_mlp_out": fp32 [B, 3, D], ...}

* Every captured tensor is fp32, whatever the model dtype. Positions a prompt does not have are NaN.
* `tokens=None` keeps every position. For `attn.hook_pattern`, tokens select *key* columns: the result is
  [B, H, S_query, T], computed from q and k and the log-sum-exp over all keys (causal mask, padding, sliding
  windows, GQA, soft-capping and learned sinks respected; maths in attention.py), so the model itself runs its
  fast SDPA kernel and no full attention map is ever materialised. With tokens=None the full map is returned.
  For `attn.hook_sink_prob` (learned sinks), tokens select query positions.
* Where the model's SDPA call runs a fused kernel that also returns the log-sum-exp, that kernel is called
  directly and its log-sum-exp is reused (attention.sdpa_with_lse: verified once per combination, bit-identical
  output); anything else falls back to recomputing the log-sum-exp over key chunks. SINKSCOPE_KERNEL_LSE=0 turns
  the kernel path off.
* Attention is read where it is computed, without changing which code runs: the model keeps its attention
  implementation (the config is never touched). The attention function the module calls is wrapped for the
  duration of the Capture: the registry entry (sdpa), the modeling module's `eager_attention_forward` (eager), an
  adapter-named method (GPT-2's upcast path), or, for attention computed inline (Falcon), a torch-function mode
  around the module's forward that observes F.scaled_dot_product_attention or the eager matmul-softmax-matmul.
  Every forward is bit-identical with and without a Capture (tests/test_capture.py checks every family).
* Hybrid models: attention sites exist only in blocks with a softmax attention; a site given without a layer is
  recorded in those blocks only (`lm.attention_layers`), and naming another block is an error.
* `reduce[site](tensor, batch)` shrinks a capture inside the hook (e.g. a per-prompt mean over queries), so
  large per-position tensors are never stored.
* Hooks and wrappers are removed in `finally`, even when the forward raises; the model is unchanged.
"""

from __future__ import annotations

import inspect
import os
from typing import Callable, Mapping, Sequence

import torch

from . import attention as am
from .arch import get_module
from .attention import LSE_STATS, attention_lse, attention_probs  # noqa: F401  (public names, re-exported)
from .hooks import (ATTN_MODULE_SITES, ATTN_SITES, MLP_SITES, ShapeTracker, SiteUnavailable, parse_site,
                    shape_hooks, site_available, site_hook, site_name)
from .moe import capture_site, is_moe_layer

# Reuse the log-sum-exp of the model's own fused SDPA kernel where it is verified; SINKSCOPE_KERNEL_LSE=0 turns
# this off (every sink column is then recomputed from q and k with a chunked log-sum-exp).
KERNEL_LSE = os.environ.get("SINKSCOPE_KERNEL_LSE", "1") != "0"
_ACTIVE: list["Capture"] = []
READ_IMPLS = ("sdpa", "eager")  # attention implementations whose inputs the pattern recompute understands


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
        if tokens is None:  # a copy: a model may later change its own tensor in place (Falcon's m += a)
            out = t if cast is None else t.to(cast)
            return out.clone() if out is t else out
        idx, bad = self._index(tokens, t.shape[dim], t.device)
        out = t.index_select(dim, idx)
        if cast is not None:
            out = out.to(cast)
        if bad is not None:
            shape = [1] * out.dim()
            shape[0], shape[dim] = bad.shape[0], bad.shape[1]
            out = out.masked_fill(bad.view(shape), float("nan"))
        return out


# -- reading attention where it is computed ----------------------------------------------------------------------

def _captures_of(module) -> list["Capture"]:
    return [cap for cap in _ACTIVE if id(module) in cap._attn_layer]


def _read_attention(module, inner: Callable, query, key, value, attention_mask, **kwargs):
    """Call the module's own attention function `inner` and give q, k, v (and the pattern) to every Capture."""
    caps = _captures_of(module)
    if not caps:
        return inner(module, query, key, value, attention_mask, **kwargs)
    for cap in caps:
        cap._on_qkv(module, query, key, value)
    want = [cap for cap in caps if cap._wants_probs(module)]
    lse = None
    if want and KERNEL_LSE and kwargs.get("softcap") is None \
            and all(cap._pattern_cols(module) is not None for cap in want):
        grab = am.KernelLSE(query)  # an SDPA call on `query` inside `inner` runs its kernel, keeping the lse
        with grab:
            result = inner(module, query, key, value, attention_mask, **kwargs)
        lse = grab.lse
    else:
        result = inner(module, query, key, value, attention_mask, **kwargs)
    if want:
        LSE_STATS["kernel" if lse is not None else "recompute"] += 1
    for cap in want:
        cap._on_attention(module, query, key, attention_mask, kwargs, lse)
    return result


def _function_tap(inner: Callable) -> Callable:
    def tap(module, query, key, value, attention_mask, **kwargs):
        return _read_attention(module, inner, query, key, value, attention_mask, **kwargs)
    tap.__wrapped__ = inner
    return tap


def _method_tap(module, bound: Callable) -> Callable:
    """For an attention-module method called as method(query, key, value, attention_mask) (adapter eager_methods)."""
    def inner(mod, query, key, value, attention_mask, **kwargs):
        return bound(query, key, value, attention_mask)

    def tap(query, key, value, attention_mask=None):
        return _read_attention(module, inner, query, key, value, attention_mask)
    return tap


def _inline_forward(module, forward: Callable) -> Callable:
    def wrapped(*args, **kwargs):
        caps = _captures_of(module)
        if not caps:
            return forward(*args, **kwargs)
        want = [cap for cap in caps if cap._wants_probs(module)]
        mode = am.InlineAttention(want_lse=bool(want) and KERNEL_LSE
                                and all(cap._pattern_cols(module) is not None for cap in want))
        with mode:
            out = forward(*args, **kwargs)
        seen = mode.qkv()
        if seen is None:
            raise RuntimeError(f"sinkscope could not observe the attention inside {type(module).__name__}")
        q, k, v, mask, scaling, lse, logits = seen
        for cap in caps:
            cap._on_qkv(module, q, k, v)
        if want:
            LSE_STATS["kernel" if lse is not None else "recompute"] += 1
        for cap in want:
            cap._on_attention(module, q, k, mask, {"scaling": scaling}, lse, logits)
        return out
    return wrapped


class _Patches:
    """Reference-counted replacements shared by nested Captures: key -> [count, undo]."""

    def __init__(self):
        self.active: dict = {}

    def acquire(self, key, apply: Callable[[], Callable[[], None]]) -> None:
        if key in self.active:
            self.active[key][0] += 1
        else:
            self.active[key] = [1, apply()]

    def release(self, key) -> None:
        entry = self.active.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self.active[key]
            entry[1]()


_PATCHES = _Patches()


def _patch_registry(impl: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    had, old = impl in local, local.get(impl)
    local[impl] = _function_tap(ALL_ATTENTION_FUNCTIONS[impl])

    def undo():
        if had:
            local[impl] = old
        else:
            local.pop(impl, None)
    return undo


def _patch_global(namespace: dict, name: str):
    original = namespace[name]
    namespace[name] = _function_tap(original)

    def undo():
        namespace[name] = original
    return undo


def _patch_attr(module, name: str, make: Callable):
    """Shadow module.<name> with an instance attribute made from the current one; undo deletes it."""
    module.__dict__[name] = make(getattr(module, name))

    def undo():
        module.__dict__.pop(name, None)
    return undo


def _attention_patches(lm, module) -> list[tuple]:
    """(key, apply) pairs that route `module`'s attention through _read_attention without changing what runs."""
    a = lm.adapter
    if a.attn_inline:
        return [(("forward", id(module)), lambda: _patch_attr(module, "forward",
                                                            lambda f: _inline_forward(module, f)))]
    cfg = getattr(module, "config", None) or lm.model.config
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    if impl not in READ_IMPLS:
        raise SiteUnavailable(f"attention sites are read under sdpa or eager attention; this model runs {impl!r} "
                              f"(load it with attn_implementation='sdpa' or 'eager')")
    out = []
    fwd = inspect.unwrap(type(module).forward)  # past any decorator, to the code that names the function
    if "eager_attention_forward" in fwd.__code__.co_names and "eager_attention_forward" in fwd.__globals__:
        ns = fwd.__globals__
        out.append((("global", id(ns)), lambda: _patch_global(ns, "eager_attention_forward")))
    elif impl == "eager":
        raise SiteUnavailable(f"cannot read the eager attention of {type(module).__name__}: its forward does not "
                              f"call eager_attention_forward (add an eager_methods entry to its adapter row)")
    for flag, method in a.eager_methods:
        if getattr(cfg, flag, False):
            out.append((("method", id(module), method),
                        lambda m=method: _patch_attr(module, m, lambda bound: _method_tap(module, bound))))
    if impl != "eager":
        out.append((("registry", impl), lambda: _patch_registry(impl)))
    return out


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
            attn_site = site in ATTN_SITES or site in ATTN_MODULE_SITES
            for l in ([layer] if layer is not None else all_layers):
                if not 0 <= l < lm.n_layers:
                    raise IndexError(f"layer {l} out of range 0..{lm.n_layers - 1}")
                why = site_available(lm, l, site)
                if why:
                    if attn_site and layer is None and "softmax attention" in why:
                        continue  # hybrid model: attention sites live in the softmax-attention blocks only
                    raise SiteUnavailable(why)
                self.plan[(l, site)] = None if tokens is None else list(tokens)
        self.cache: dict[str, torch.Tensor] = {}
        self.batch = None
        self._select = _Selector(None)
        self._handles: list = []
        self._patches: list = []
        self._attn_layer: dict[int, int] = {}
        self.last_layer = max((l for l, _ in self.plan), default=-1)

    # -- context management -------------------------------------------------------------------------
    def __enter__(self) -> "Capture":
        try:
            shapes = ShapeTracker()
            self._handles += shape_hooks(self.lm, shapes)
            for (l, site), tokens in self.plan.items():
                if site in MLP_SITES and is_moe_layer(self.lm, l):  # computed from x, at the tokens only
                    self._handles += capture_site(self.lm, l, site, lambda t, tok=tokens: self._select(
                        t.detach(), tok, dim=1, cast=torch.float32), lambda v, l=l, s=site: self._store(l, s, v))
                elif site not in ATTN_SITES:
                    self._handles += site_hook(self.lm, l, site, self._reader(l, site, tokens), shapes)
            attn_layers = sorted({l for l, s in self.plan if s in ATTN_SITES})
            modules = [get_module(self.lm.layers[l], self.lm.adapter.attn) for l in attn_layers]
            for l, mod in zip(attn_layers, modules):
                self._attn_layer[id(mod)] = l
            if modules:
                _ACTIVE.append(self)
            for mod in modules:
                for key, apply in _attention_patches(self.lm, mod):
                    _PATCHES.acquire(key, apply)
                    self._patches.append(key)
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

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for key in reversed(self._patches):
            _PATCHES.release(key)
        self._patches.clear()
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    # -- recording ------------------------------------------------------------------------------------
    def _store(self, l: int, site: str, t: torch.Tensor) -> None:
        fn = self.reduce.get(site)
        self.cache[site_name(l, site)] = fn(t, self.batch) if fn is not None else t

    def _reader(self, l: int, site: str, tokens):
        def read(t: torch.Tensor):
            # select first, then cast: only the requested positions are copied to fp32
            self._store(l, site, self._select(t.detach(), tokens, dim=1, cast=torch.float32))
        return read

    def _on_qkv(self, module, query, key, value) -> None:
        l = self._attn_layer.get(id(module))
        if l is None:
            return
        assert query.dim() == 4 and key.dim() == 4 and value.dim() == 4, \
            f"attention inputs must be [B, H, S, d]: {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        rep = query.shape[1] // key.shape[1]
        assert rep * key.shape[1] == query.shape[1], f"{query.shape[1]} query heads vs {key.shape[1]} kv heads"
        for site, t in (("attn.hook_q", query), ("attn.hook_k", key), ("attn.hook_v", value)):
            if (l, site) in self.plan:
                t = self._select(t.detach(), self.plan[(l, site)], dim=2, cast=torch.float32)
                if rep > 1 and site != "attn.hook_q":
                    t = t.repeat_interleave(rep, dim=1)  # GQA / MQA: each KV head serves `rep` query heads
                self._store(l, site, t.transpose(1, 2))

    def _wants_probs(self, module) -> bool:
        l = self._attn_layer.get(id(module))
        return l is not None and ((l, "attn.hook_pattern") in self.plan or (l, "attn.hook_sink_prob") in self.plan)

    def _pattern_cols(self, module):
        return self.plan.get((self._attn_layer[id(module)], "attn.hook_pattern"), [])

    def _on_attention(self, module, query, key, mask, kwargs, lse, logits=None) -> None:
        """The pattern (and learned-sink mass) of one attention call, from q and k (or the model's own logits)."""
        l = self._attn_layer[id(module)]
        a = self.lm.adapter
        sinks = getattr(module, a.attn_sinks) if a.attn_sinks else None
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = getattr(module, "scaling", None) or query.shape[-1] ** -0.5
        softcap = kwargs.get("softcap")
        chunk = (256 << 20) if query.device.type == "cuda" else (64 << 20)
        q, k = query.detach(), key.detach()
        if (l, "attn.hook_sink_prob") in self.plan:
            if lse is None:
                lse = attention_lse(q, k, mask, scaling, softcap, chunk)
            ps = am.sink_probability(am.with_sinks(lse, sinks), sinks)
            self._store(l, "attn.hook_sink_prob", self._select(ps, self.plan[(l, "attn.hook_sink_prob")], dim=2))
        if (l, "attn.hook_pattern") not in self.plan:
            return
        cols = self.plan[(l, "attn.hook_pattern")]
        if logits is not None:
            assert sinks is None, "learned sinks with inline attention are not supported"
            p = am.probs_from_logits(logits.detach(), cols)
        else:
            p = attention_probs(q, k, mask, scaling, softcap, cols, chunk_bytes=chunk, lse=lse, sinks=sinks)
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
            am.release_mask()
        return self.cache
