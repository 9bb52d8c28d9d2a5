"""Interventions: context managers that edit one site of the forward pass. The weights are never touched, except
by `zero_weight`, which zeroes one entry and restores it bit-identically on exit.

    with project_out_token(lm, 11, "hook_mlp_out", token=0, Q=Q):      # m_0 <- m_0 - Q Q^T m_0
        with Capture(lm, {"attn.hook_pattern": [0]}, layers=later) as cap:
            cache = cap.forward(batch)                                  # sees the edited forward

* Built on `hooks.site_hook`, the mechanism Capture reads with: an fn that returns a tensor edits the site.
* The edit is computed in fp32 and cast back to the model dtype only where it re-enters the model.
* Hooks are removed in `finally`, also when the block raises. Nesting and combining with Capture works: hooks
  registered earlier run first, so a Capture opened inside an intervention records the edited values.
* `token` is a position; a batch shorter than token + 1 is left as is. For right-padded prompts shorter than
  token + 1 the edit only touches padding, which no real token attends to (causal mask).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

from .hooks import ShapeTracker, shape_hooks, site_hook

EditFn = Callable[[torch.Tensor], "torch.Tensor | None"]


@contextmanager
def edit_sites(lm, edits: Sequence[tuple[int, str, EditFn]]) -> Iterator[None]:
    """Install several edits at once: (layer, site, fn) with fn(t [batch, seq, features]) -> new t or None."""
    shapes = ShapeTracker()
    handles: list = []
    try:
        handles += shape_hooks(lm, shapes)
        for layer, site, fn in edits:
            handles += site_hook(lm, layer, site, fn, shapes)
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def edit_site(lm, layer: int, site: str, fn: EditFn) -> Iterator[None]:
    """Replace the value of `blocks.{layer}.{site}` by fn(value) (fn returning None leaves it unchanged)."""
    with edit_sites(lm, [(layer, site, fn)]):
        yield


def token_editor(token: int, fn32: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> EditFn:
    """An edit of one position: fn32(x_tok fp32 [B, D], t_full fp32 [B, S, D]) -> new x_tok (fp32).
    The result is cast back to the model dtype; the other positions are untouched (bit-identical)."""
    def fn(t: torch.Tensor) -> torch.Tensor | None:
        if token >= t.shape[1]:
            return None
        full = t.float()
        out = t.clone()
        out[:, token] = fn32(full[:, token], full).to(t.dtype)
        return out
    return fn


def project_out_fn(token: int, Q: torch.Tensor) -> EditFn:
    """x_tok <- x_tok - Q Q^T x_tok in fp32, Q [D, r] orthonormal columns."""
    Q32 = Q.detach().float()

    def proj(x: torch.Tensor, _full: torch.Tensor) -> torch.Tensor:
        q = Q32.to(x.device)
        return x - (x @ q) @ q.T
    return token_editor(token, proj)


@contextmanager
def project_out_token(lm, layer: int, site: str, token: int, Q: torch.Tensor) -> Iterator[None]:
    """Remove span(Q) from position `token` of a site: x_tok <- x_tok - Q Q^T x_tok (fp32, cast back)."""
    if Q.dim() != 2:
        raise ValueError(f"Q must be [D, r], got shape {tuple(Q.shape)}")
    with edit_site(lm, layer, site, project_out_fn(token, Q)):
        yield


@contextmanager
def scale_token(lm, layer: int, site: str, token: int,
                factor_fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """x_tok <- factor * x_tok per prompt, where factor_fn(t_full fp32 [B, S, D]) -> [B] factors (fp32)."""
    def scale(x: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        f = factor_fn(full).to(device=x.device, dtype=torch.float32)
        return x * f.view(-1, 1)
    with edit_site(lm, layer, site, token_editor(token, scale)):
        yield


@contextmanager
def replace_token(lm, layer: int, site: str, token: int, value: torch.Tensor) -> Iterator[None]:
    """x_tok <- value ([D] or [B, D]) at one position."""
    v = value.detach().float()

    def repl(x: torch.Tensor, _full: torch.Tensor) -> torch.Tensor:
        return v.to(x.device).expand_as(x).clone()
    with edit_site(lm, layer, site, token_editor(token, repl)):
        yield


@contextmanager
def zero_weight(param: torch.nn.Parameter, index: tuple[int, ...]) -> Iterator[None]:
    """Set one weight entry to zero for the duration of the block (Yu et al.'s super-weight ablation). The old value
    is saved as is and written back in `finally` (bit-identical, also when the block raises)."""
    saved = param.data[index].clone()
    try:
        with torch.no_grad():
            param.data[index] = 0
        yield
    finally:
        with torch.no_grad():
            param.data[index] = saved
