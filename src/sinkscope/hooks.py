"""The site vocabulary and the one mechanism that reads or edits a site: `site_hook`.

Site names follow TransformerLens. For block l (`blocks.{l}.<site>`), all [batch, pos, ...]:

| site                  | symbol | what it is                                                               |
|-----------------------|--------|--------------------------------------------------------------------------|
| hook_resid_pre        | r      | block input (the residual stream)                                        |
| hook_attn_out         | a      | attention (token mixer) output exactly as added to the residual (after a |
|                       |        | post-norm and any residual multiplier)                                   |
| hook_mlp_in           | x      | MLP input (after the pre-MLP norm)                                       |
| hook_mlp_out          | m      | MLP output exactly as added to the residual (after a post-norm and any   |
|                       |        | residual multiplier)                                                     |
| hook_resid_post       | y      | block output; r + a + m == y for sequential and parallel blocks          |
| mlp.hook_pre          | g      | gate pre-activation (gated MLPs) or W_in x + b (plain MLPs)              |
| mlp.hook_pre_linear   | u      | up projection (gated MLPs only)                                          |
| mlp.hook_post         | z      | input of the down/output projection                                      |
| attn.hook_q / _k / _v | q k v  | [batch, pos, head, d_head] as the attention uses them (post QK-norm and RoPE, GQA-expanded) |
| attn.hook_pattern     | A      | [batch, head, query, key] attention probabilities (see capture.py)       |
| attn.hook_sink_prob   | p_sink | [batch, head, query] probability mass on the learned sink (models with   |
|                       |        | learned sinks only, e.g. gpt-oss); rows of A sum to 1 - p_sink           |
| attn.hook_gate        | gate   | [batch, pos, head, d_head] the output gate sigmoid(g) that multiplies the |
|                       |        | attention output before o (gated attention only, e.g. Qwen3-Next)       |

Residual and MLP sites (and attn.hook_gate) are module hooks; the other attention sites are read inside the
attention function (capture.py). In hybrid models (Qwen3-Next), blocks without a softmax attention have no
attention sites; their hook_attn_out is the linear token mixer's output. In a mixture of experts the MLP sites are
computed from hook_mlp_in (read-only; moe.py): g and u of every expert, and z = w_e z^e over the experts.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from .arch import (attn_out_module, get_module, has_softmax_attention, residual_scale, resolve)
from .errors import UsageError
from .moe import is_moe_layer

RESID_SITES = ("hook_resid_pre", "hook_attn_out", "hook_mlp_in", "hook_mlp_out", "hook_resid_post",
               "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post")
MLP_SITES = ("mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post")
ATTN_SITES = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern", "attn.hook_sink_prob")
ATTN_MODULE_SITES = ("attn.hook_gate",)   # module hooks, but only in blocks with a (gated) softmax attention
SITES = RESID_SITES + ATTN_SITES + ATTN_MODULE_SITES
_FULL = re.compile(r"^blocks\.(\d+)\.(.+)$")


class SiteUnavailable(UsageError):
    """A site this model (or this block) does not have: an MLP site on a mixture of experts, an attention site on
    a block without softmax attention, the learned-sink or gate site on a model without them."""


def site_available(lm, layer: int, site: str) -> str | None:
    """None when block `layer` has `site`; otherwise why not (one line)."""
    a = lm.adapter
    block = lm.layers[layer]
    if site in ATTN_SITES or site in ATTN_MODULE_SITES:
        if not has_softmax_attention(a, block):
            return f"block {layer} of this {a.model_type} model has no softmax attention (a linear token mixer)"
        if site == "attn.hook_sink_prob" and not a.has_learned_sinks:
            return f"{site} needs learned attention sinks, which {a.model_type} has not"
        if site == "attn.hook_gate" and not a.has_attn_gate:
            return f"{site} needs gated attention, which {a.model_type} has not"
    if site in MLP_SITES:
        if is_moe_layer(lm, layer):
            return None  # computed from x by moe.py (read-only)
        path = a.gate if a.mlp_kind == "gated_fused" else a.down
        if resolve(block, path) is None:
            return (f"{site} needs a dense MLP or a mixture of experts in the adapter table; block {layer} of this "
                    f"{a.model_type} model has neither")
        if site == "mlp.hook_pre_linear" and not a.gated:
            return f"{site} exists only for gated MLPs; {a.model_type} has a plain MLP"
    return None


def site_name(layer: int, site: str) -> str:
    return f"blocks.{layer}.{site}"


def parse_site(name: str) -> tuple[int | None, str]:
    """'blocks.3.hook_mlp_out' -> (3, 'hook_mlp_out'); 'hook_mlp_out' -> (None, 'hook_mlp_out')."""
    m = _FULL.match(name)
    layer, site = (int(m.group(1)), m.group(2)) if m else (None, name)
    if site not in SITES:
        raise ValueError(f"unknown site {name!r}; sites are: {', '.join(SITES)}")
    return layer, site


def locate(lm, layer: int, site: str) -> tuple[torch.nn.Module, str, str | None]:
    """(module, 'pre' or 'post', view) for a module site of block `layer`; view: None (the whole last dim),
    "first_half" / "second_half" (fused gate_up), "gate" (the per-head second halves of a [q | gate] projection)."""
    a = lm.adapter
    if not 0 <= layer < lm.n_layers:
        raise IndexError(f"layer {layer} out of range 0..{lm.n_layers - 1}")
    block = lm.layers[layer]
    why = site_available(lm, layer, site)
    if why:
        raise SiteUnavailable(why)
    if site in MLP_SITES and is_moe_layer(lm, layer):
        raise SiteUnavailable(f"{site} of block {layer} (a mixture of experts) is computed from the MLP input and "
                              f"is read-only; edit hook_mlp_in or hook_mlp_out instead")
    sub = lambda p: get_module(block, p)  # noqa: E731
    if site == "hook_resid_pre":
        return block, "pre", None
    if site == "hook_resid_post":
        return block, "post", None
    if site == "hook_attn_out":
        return attn_out_module(a, block), "post", None
    if site == "hook_mlp_in":
        return sub(a.mlp_in), "pre", None
    if site == "hook_mlp_out":
        return sub(a.mlp_out), "post", None
    if site == "attn.hook_gate":
        return sub(a.attn_gate), "post", "gate"
    if site == "mlp.hook_post":
        return sub(a.down), "pre", None
    if site == "mlp.hook_pre":
        if a.mlp_kind == "gated_fused":
            return sub(a.gate), "post", "first_half"
        return sub(a.gate if a.gated else a.up), "post", None
    if site == "mlp.hook_pre_linear":
        if a.mlp_kind == "gated_fused":
            return sub(a.gate), "post", "second_half"
        return sub(a.up), "post", None
    raise ValueError(f"{site} is not a module site")


def site_scale(lm, site: str) -> float | None:
    """The residual multiplier applied to a site's module output ("as added to the residual"), or None."""
    if site in ("hook_attn_out", "hook_mlp_out"):
        return residual_scale(lm.adapter, lm.config)
    return None


def _half(t: torch.Tensor, which: str | None) -> slice:
    if which is None:
        return slice(None)
    h = t.shape[-1] // 2
    return slice(0, h) if which == "first_half" else slice(h, None)


class ShapeTracker:
    """Remembers the [batch, seq] of the current forward, for modules that flatten it (OPT's fc1/fc2)."""

    def __init__(self):
        self.bs: tuple[int, int] | None = None

    def pre_hook(self, module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        self.bs = tuple(h.shape[:2])

    def unflatten(self, t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 2 and self.bs is not None:
            return t.view(*self.bs, t.shape[-1])
        assert t.dim() == 3, f"expected [batch, seq, features], got {tuple(t.shape)}"
        return t


def site_hook(lm, layer: int, site: str, fn: Callable[[torch.Tensor], torch.Tensor | None],
              shapes: ShapeTracker) -> list:
    """Register a hook that calls fn(t) with the site's tensor t as [batch, seq, features] (model dtype).
    If fn returns a tensor, it replaces the site's value in the forward pass (an edit); None reads only.
    Returns the hook handles; the caller removes them (in a `finally`)."""
    module, kind, which = locate(lm, layer, site)
    scale = site_scale(lm, site)

    def apply(t: torch.Tensor) -> torch.Tensor | None:
        flat_shape = t.shape
        full = shapes.unflatten(t)
        if which == "gate":  # [B, S, H * 2d] -> the per-head second halves, as the model applies them
            H = lm.config.num_attention_heads
            g = full.view(*full.shape[:2], H, -1)
            if fn(torch.sigmoid(g[..., g.shape[-1] // 2:])) is not None:
                raise ValueError(f"{site} is read-only")
            return None
        if scale is not None:  # what the block adds: the sublayer output times the residual multiplier
            new = fn(full * scale)
            if new is None:
                return None
            assert new.shape == full.shape, f"edit changed the shape at {site}: {tuple(new.shape)}"
            return (new.to(full.dtype) / scale).view(flat_shape)
        sl = _half(full, which)
        new = fn(full[..., sl])
        if new is None:
            return None
        assert new.shape == full[..., sl].shape, f"edit changed the shape at {site}: {tuple(new.shape)}"
        out = full.clone()
        out[..., sl] = new.to(full.dtype)
        return out.view(flat_shape)

    if kind == "pre":
        def pre(mod, args, kwargs):
            if args:
                new = apply(args[0])
                return None if new is None else ((new,) + tuple(args[1:]), kwargs)
            new = apply(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})
        return [module.register_forward_pre_hook(pre, with_kwargs=True)]

    def post(mod, args, output):
        t = output[0] if isinstance(output, tuple) else output
        new = apply(t)
        if new is None:
            return None
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
    return [module.register_forward_hook(post)]


def shape_hooks(lm, shapes: ShapeTracker) -> list:
    return [blk.register_forward_pre_hook(shapes.pre_hook, with_kwargs=True) for blk in lm.layers]
