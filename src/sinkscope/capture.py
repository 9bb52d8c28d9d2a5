"""Record named sites (hooks.py vocabulary) for chosen layers and token positions.

    with Capture(lm, {"hook_mlp_out": [0, 1, 8], "attn.hook_pattern": [0]}, layers=[3, 4]) as cap:
        for batch in batches:
            cache = cap.forward(batch)        # {"blocks.3.hook_mlp_out": fp32 [B, 3, D], ...}

* Every captured tensor is fp32, whatever the model dtype. Positions a prompt does not have are NaN.
* `tokens=None` keeps every position. For `attn.hook_pattern`, tokens select *key* columns: the result is
  [B, H, S_query, T], computed from q and k with a chunked log-sum-exp over all keys (causal mask, padding,
  sliding windows, GQA and soft-capping respected), so the model itself runs its fast SDPA kernel and no full
  attention map is ever materialised. With tokens=None the full [B, H, S, S] map is returned.
* `reduce[site](tensor, batch)` shrinks a capture inside the hook (e.g. a per-prompt mean over queries), so
  large per-position tensors are never stored.
* Hooks and the attention tap are removed in `finally`, even when the forward raises; the model is unchanged.
"""

from __future__ import annotations

import sys
from typing import Callable, Mapping, Sequence

import torch

from .arch import get_module
from .hooks import ATTN_SITES, ShapeTracker, parse_site, shape_hooks, site_hook, site_name

TAP_PREFIX = "sinkscope_"
_ACTIVE_TAPS: list["Capture"] = []
_REGISTERED: set[str] = set()


class StopForward(Exception):
    """Raised by a hook to end a forward pass early once every requested layer has run."""


def select_tokens(t: torch.Tensor, tokens: Sequence[int] | None, lengths: torch.Tensor | None, dim: int = 1):
    """Index positions along `dim`; positions at or beyond a prompt's length become NaN."""
    if tokens is None:
        return t
    S = t.shape[dim]
    idx = torch.tensor([min(p, S - 1) for p in tokens], device=t.device)
    out = t.index_select(dim, idx)
    bad = torch.tensor([p >= S for p in tokens], device=t.device).view(1, -1)
    if lengths is not None:
        bad = bad | (torch.tensor(list(tokens), device=t.device).view(1, -1) >= lengths.to(t.device).view(-1, 1))
    if bad.any():
        shape = [1] * out.dim()
        shape[0], shape[dim] = bad.shape[0], bad.shape[1]
        out = out.masked_fill(bad.view(shape), float("nan"))
    return out


def _key_mask(mask: torch.Tensor | None, Sq: int, j0: int, j1: int, device) -> torch.Tensor | None:
    """Additive fp32 mask for key columns j0:j1, [B|1, 1|H, Sq, j1-j0]; None mask means plain causal."""
    if mask is None:
        q = torch.arange(Sq, device=device).view(-1, 1)
        k = torch.arange(j0, j1, device=device).view(1, -1)
        return torch.zeros(Sq, j1 - j0, device=device).masked_fill(k > q, float("-inf")).view(1, 1, Sq, -1)
    m = mask[..., :Sq, j0:j1]
    if m.dtype == torch.bool:
        return torch.where(m, 0.0, float("-inf")).float()
    return m.float()


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                    softcap: float | None = None, cols: Sequence[int] | None = None,
                    chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """Attention probabilities in fp32 from q [B, H, Sq, d] and k [B, Hkv, Sk, d].

    cols=None: the full [B, H, Sq, Sk] softmax. Otherwise only those key columns, [B, H, Sq, T]: the
    normaliser is a log-sum-exp accumulated over key chunks of at most `chunk_bytes` of logits."""
    B, H, Sq, d = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    assert H % Hkv == 0, (H, Hkv)
    rep = H // Hkv
    qf = q.float().reshape(B, Hkv, rep * Sq, d)
    kf = k.float()

    def logits(j0: int, j1: int) -> torch.Tensor:
        s = (qf @ kf[:, :, j0:j1].transpose(-1, -2)).view(B, H, Sq, j1 - j0) * scaling
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        return s + _key_mask(mask, Sq, j0, j1, q.device)

    if cols is None:
        return torch.softmax(logits(0, Sk), dim=-1)
    step = max(16, int(chunk_bytes // max(1, B * H * Sq * 4)))
    lse = torch.full((B, H, Sq), float("-inf"), device=q.device)
    for j0 in range(0, Sk, step):
        lse = torch.logaddexp(lse, torch.logsumexp(logits(j0, min(Sk, j0 + step)), dim=-1))
    out = torch.stack([logits(c, c + 1)[..., 0] if c < Sk else torch.full_like(lse, float("nan"))
                       for c in cols], dim=-1)
    return torch.exp(out - lse.unsqueeze(-1))


def _inner_attention(module, impl: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    if impl == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[impl]


def _tap(module, query, key, value, attention_mask, **kwargs):
    """The attention function installed while a Capture reads attention sites: read, then delegate."""
    impl = module.config._attn_implementation[len(TAP_PREFIX):]
    for cap in list(_ACTIVE_TAPS):
        cap._on_attention(module, query, key, value, attention_mask, kwargs)
    return _inner_attention(module, impl)(module, query, key, value, attention_mask, **kwargs)


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
            self._store(l, site, select_tokens(t.detach().float(), tokens, self._lengths(), dim=1))
        return read

    def _on_attention(self, module, query, key, value, mask, kwargs) -> None:
        l = self._attn_layer.get(id(module))
        if l is None:
            return
        H, Hkv = query.shape[1], key.shape[1]
        rep = H // Hkv
        lengths = self._lengths()
        for site, t in (("attn.hook_q", query), ("attn.hook_k", key), ("attn.hook_v", value)):
            if (l, site) in self.plan:
                t = t.detach().float()
                if rep > 1 and site != "attn.hook_q":
                    t = t.repeat_interleave(rep, dim=1)  # GQA: each KV head serves `rep` query heads
                t = select_tokens(t.transpose(1, 2), self.plan[(l, site)], lengths, dim=1)
                self._store(l, site, t)
        if (l, "attn.hook_pattern") in self.plan:
            scaling = kwargs.get("scaling")
            if scaling is None:
                scaling = query.shape[-1] ** -0.5
            cols = self.plan[(l, "attn.hook_pattern")]
            p = attention_probs(query.detach(), key.detach(), mask, scaling, kwargs.get("softcap"), cols)
            if cols is not None and lengths is not None:
                bad = torch.tensor(cols, device=p.device).view(1, -1) >= lengths.to(p.device).view(-1, 1)
                p = p.masked_fill(bad.view(bad.shape[0], 1, 1, -1), float("nan"))
            self._store(l, "attn.hook_pattern", p)

    def forward(self, batch, **kwargs) -> dict[str, torch.Tensor]:
        """Run the headless body on one batch (no LM head, inference mode) and return the fresh cache."""
        self.cache = {}
        self.batch = batch
        dev = self.lm.device
        try:
            with torch.inference_mode():
                self.lm.body(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                             use_cache=False, **kwargs)
        except StopForward:
            pass
        return self.cache
