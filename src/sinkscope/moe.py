"""Mixture-of-experts MLPs as fp32 maths: the router's choice, each expert's z, and their contributions to m.

In transformers 5 the experts of an MoE block are fused 3-D parameters, so no hook sees one expert's z. sinkscope
recomputes everything from the block input x (the post-norm MLP input, `hook_mlp_in`) and the weights, in fp32 and
only for the tokens a mode studies. The MoE of block l is seen as one wide "flat" MLP whose z dims are the
concatenation of every expert's z dims (routed experts 0..E-1, then the shared expert, if any):

    m = sum_e w_e W^e_down z^e + bias = W_down z + bias,   z[off_e + j] = w_e z^e_j

with w_e the routing weight (0 for an expert the token was not routed to; the shared expert's weight is its sigmoid
gate, or 1) and bias the routing-weighted down-projection biases (gpt-oss). So `mlp.hook_post` of a MoE block is
this z (read-only), `mlp.hook_pre` / `mlp.hook_pre_linear` are every expert's gate / up pre-activations (unweighted),
and the MLP modes' W_down columns are the experts' own columns. A flat index is shown as (expert, dim).

The per-family data (router path, routing rule, expert layout, shared expert) is a MoESpec in the arch.py row.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator

import torch

from .arch import MoESpec, get_module, resolve

DEEPSEEK_GROUP_TOP = 2      # DeepSeek-V3 scores a group by the sum of its top-2 expert scores
DEEPSEEK_NORM_EPS = 1e-20   # the denominator guard of its top-k renormalisation
SHARED = "shared"


def is_moe_layer(lm, layer: int) -> bool:
    spec = getattr(lm.adapter, "moe", None)
    return spec is not None and resolve(lm.layers[layer], spec.experts) is not None


def moe_layers(lm) -> list[int]:
    return [l for l in range(lm.n_layers) if is_moe_layer(lm, l)]


class Expert:
    """One expert as a dense gated MLP in fp32: z = act(W_g x + b_g) * (W_u x + b_u), m_e = W_d z + b_d.

    The weights are read from the model's parameters when used (fp32 copies of this expert only, not kept), so a
    model with hundreds of experts costs nothing until a mode computes the experts its tokens are routed to."""

    def __init__(self, name, spec: MoESpec, mod):
        self.name, self.mod = name, mod
        self.layout = SHARED if name == SHARED else spec.layout
        if self.layout == SHARED:
            self.F = mod.gate_proj.weight.shape[0]
        else:
            self.F = mod.down_proj.shape[1 if self.layout == "gpt_oss" else 2]
        self.act = getattr(mod, "act_fn", None)
        self.clamp = (float(mod.alpha), float(mod.limit)) if self.layout == "gpt_oss" else None  # gpt-oss SwiGLU

    def weights(self) -> tuple[torch.Tensor, ...]:
        """(W_g [F, D], b_g, W_u [F, D], b_u) in fp32; biases None where the expert has none."""
        m, e = self.mod, self.name
        if self.layout == SHARED:
            return _f32(m.gate_proj.weight), None, _f32(m.up_proj.weight), None
        W = _f32(m.gate_up_proj[e])
        if self.layout == "gpt_oss":   # [D, 2F], gate and up interleaved, with biases
            b = _f32(m.gate_up_proj_bias[e])
            return W[:, ::2].T, b[::2], W[:, 1::2].T, b[1::2]
        return W[:self.F], None, W[self.F:], None

    @property
    def W_d(self) -> torch.Tensor:
        """[D, F]: column j is what z_j writes."""
        if self.layout == SHARED:
            return _f32(self.mod.down_proj.weight)
        W = _f32(self.mod.down_proj[self.name])
        return W.T if self.layout == "gpt_oss" else W

    @property
    def b_d(self) -> torch.Tensor | None:
        b = getattr(self.mod, "down_proj_bias", None)
        return None if b is None or self.layout == SHARED else _f32(b[self.name])

    def pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        W_g, b_g, W_u, b_u = self.weights()
        x = x.float().to(W_g.device)
        g, u = x @ W_g.T, x @ W_u.T
        return (g if b_g is None else g + b_g), (u if b_u is None else u + b_u)

    def z_from_factors(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if self.clamp is None:
            return self.act(g) * u
        alpha, limit = self.clamp
        g = g.clamp(max=limit)
        return (u.clamp(-limit, limit) + 1) * g * torch.sigmoid(g * alpha)

    def z(self, x: torch.Tensor) -> torch.Tensor:
        return self.z_from_factors(*self.pre(x))


def _f32(p: torch.Tensor) -> torch.Tensor:
    return p.detach().float()


class MoEMath:
    """The MoE of block `layer` in fp32: routing as the model computes it, the experts, the flat z and W_down.
    Duck-types the parts of mlp_common.MLPMath the MLP modes use (kind, gated, F, W_down, z, grad)."""

    kind = "moe"
    gated = False

    def __init__(self, lm, layer: int):
        spec = lm.adapter.moe
        block = lm.layers[layer]
        self.layer, self.spec = layer, spec
        self.router = get_module(block, spec.router)
        self.top_k = int(self.router.top_k)
        self.n_experts = int(self.router.num_experts)
        experts = get_module(block, spec.experts)
        self.experts = [Expert(e, spec, experts) for e in range(self.n_experts)]
        shared = resolve(block, spec.shared)
        self.shared_gate = resolve(block, spec.shared_gate)
        if shared is not None:
            self.experts.append(Expert(SHARED, spec, shared))
        self.offsets = [0]
        for ex in self.experts:
            self.offsets.append(self.offsets[-1] + ex.F)
        self.device = self.router.weight.device

    @functools.cached_property
    def W_down(self) -> torch.Tensor:
        """[D, sum F] every expert's W_down side by side (column off_e + j is what z^e_j writes)."""
        return torch.cat([ex.W_d for ex in self.experts], dim=1)

    @property
    def F(self) -> int:
        return self.offsets[-1]

    @property
    def has_shared(self) -> bool:
        return self.experts[-1].name == SHARED

    def pair(self, flat: int) -> tuple[int | str, int]:
        """Flat z index -> (expert, dim within that expert)."""
        for b, ex in enumerate(self.experts):
            if flat < self.offsets[b + 1]:
                return ex.name, flat - self.offsets[b]
        raise IndexError(f"flat z index {flat} out of range 0..{self.F - 1}")

    def label(self, flat: int) -> str:
        e, j = self.pair(flat)
        return f"e{e}:{j}" if e != SHARED else f"shared:{j}"

    # -- routing ---------------------------------------------------------------------------------------------
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        r = self.router
        lg = x.float() @ _f32(r.weight).T
        b = getattr(r, "bias", None)
        return lg if b is None else lg + _f32(b)

    def route(self, x: torch.Tensor, forbid: int | None = None, force: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [N, k] fp32, experts [N, k] long) for rows x [N, D], exactly as the router computes them;
        forbid / force: expert E is never / always among the chosen (its selection score set to -inf / +inf;
        the weights are the model's own rule applied to the new choice)."""
        r, k = self.router, self.top_k
        lg = self.logits(x.to(self.device))

        def steer(sel: torch.Tensor) -> torch.Tensor:
            sel = sel.clone()
            if forbid is not None:
                sel[:, forbid] = float("-inf")
            if force is not None:
                sel[:, force] = float("inf")
            return sel

        if self.spec.routing == "softmax_topk":
            probs = torch.softmax(lg, dim=-1)
            idx = torch.topk(steer(probs), k, dim=-1).indices
            w = probs.gather(1, idx)
            if self.spec.renorm or (self.spec.renorm is None and getattr(r, "norm_topk_prob", False)):
                w = w / w.sum(-1, keepdim=True)
            return w, idx
        if self.spec.routing == "topk_softmax":
            idx = torch.topk(steer(lg), k, dim=-1).indices
            return torch.softmax(lg.gather(1, idx), dim=-1), idx
        scores = torch.sigmoid(lg)
        choice = steer(scores + _f32(r.e_score_correction_bias))
        G = int(r.num_group)
        groups = choice.view(-1, G, self.n_experts // G).topk(DEEPSEEK_GROUP_TOP, dim=-1)[0].sum(-1)
        keep = torch.zeros_like(groups).scatter_(1, torch.topk(groups, int(r.topk_group), dim=-1).indices, 1.0)
        keep = keep.unsqueeze(-1).expand(-1, G, self.n_experts // G).reshape(-1, self.n_experts).bool()
        idx = torch.topk(choice.masked_fill(~keep, float("-inf")), k, dim=-1).indices
        w = scores.gather(1, idx)
        if r.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + DEEPSEEK_NORM_EPS)
        return w * float(r.routed_scaling_factor), idx

    def block_weights(self, x: torch.Tensor, forbid=None, force=None) -> torch.Tensor:
        """[N, n_blocks] the weight of every expert block per row (0 where not routed; the shared expert's gate)."""
        x = x.to(self.device)
        w, idx = self.route(x, forbid, force)
        out = torch.zeros(x.shape[0], len(self.experts), device=w.device)
        out[:, :self.n_experts].scatter_(1, idx, w)
        if self.has_shared:
            out[:, -1] = (torch.sigmoid(x.float() @ _f32(self.shared_gate.weight).T)[:, 0]
                          if self.shared_gate is not None else 1.0)
        return out

    # -- z and its contributions -----------------------------------------------------------------------------
    def factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, u) of every expert, concatenated: [N, F] each (unweighted, also for experts not routed to)."""
        gu = [ex.pre(x) for ex in self.experts]
        return torch.cat([g for g, _ in gu], -1), torch.cat([u for _, u in gu], -1)

    def z(self, x: torch.Tensor) -> torch.Tensor:
        """The flat z [N, F]: w_e z^e for every expert block (0 for experts the row is not routed to)."""
        x = x.to(self.device)
        w = self.block_weights(x)
        parts = []
        for b, ex in enumerate(self.experts):   # experts no row is routed to are zero, not computed
            wb = w[:, b:b + 1]
            parts.append(ex.z(x) * wb if bool((wb != 0).any()) else torch.zeros(x.shape[0], ex.F, device=w.device))
        return torch.cat(parts, -1)

    def bias(self, x: torch.Tensor) -> torch.Tensor:
        """[N, D] what m holds beyond W_down z: the routing-weighted down-projection biases (0 without biases)."""
        x = x.to(self.device)
        w = self.block_weights(x)
        out = torch.zeros(x.shape[0], self.W_down.shape[0], device=w.device)
        for b, ex in enumerate(self.experts):
            if getattr(ex.mod, "down_proj_bias", None) is not None and ex.name != SHARED:
                out = out + w[:, b:b + 1] * ex.b_d
        return out

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """m recomputed in fp32: W_down z + bias."""
        return self.z(x) @ self.W_down.T + self.bias(x)   # on the weights' device

    def contributions(self, x: torch.Tensor, channel: int) -> torch.Tensor:
        """[N, F] w_e W^e_down[channel, j] z^e_j: what each (expert, dim) writes to one residual channel."""
        return self.z(x) * self.W_down[channel]

    def grad(self, x: torch.Tensor, j: int) -> torch.Tensor:
        """d (w_e z^e_j)^2 / dx for rows x [N, D], the routing weight w_e held at its value (the expert of flat
        dim j as a dense MLP; 0 where the row is not routed to it). By autograd through the expert."""
        b = next(i for i in range(len(self.experts)) if j < self.offsets[i + 1])
        w = self.block_weights(x)[:, b:b + 1]
        with torch.enable_grad():
            leaf = x.detach().float().to(self.device).clone().requires_grad_(True)
            zj = self.experts[b].z(leaf)[:, j - self.offsets[b]]
            (grad,) = torch.autograd.grad((zj ** 2).sum(), leaf)
        return (grad * w ** 2).to(x.device)


def moe_math(lm, layer: int) -> MoEMath:
    return MoEMath(lm, layer)


def site_value(mm: MoEMath, site: str, x: torch.Tensor) -> torch.Tensor:
    """An MLP site of a MoE block from rows x [N, D]: mlp.hook_pre (g), mlp.hook_pre_linear (u), mlp.hook_post (z)."""
    if site == "mlp.hook_post":
        return mm.z(x)
    g, u = mm.factors(x)
    return g if site == "mlp.hook_pre" else u


def capture_site(lm, layer: int, site: str, select, store) -> list:
    """Read an MLP site of MoE block `layer` for a Capture: a pre-hook on the MoE module selects the requested
    tokens of x (select: [B, S, D] -> [B, T, D] fp32, NaN where a prompt is too short), computes the site there
    and hands it to store. Returns the hook handles (the Capture removes them)."""
    mm = MoEMath(lm, layer)
    module = get_module(lm.layers[layer], lm.adapter.moe.block)

    def pre(mod, args, kwargs):
        xs = select(args[0] if args else kwargs["hidden_states"])
        flat = xs.reshape(-1, xs.shape[-1])
        bad = torch.isnan(flat).any(-1, keepdim=True)
        v = site_value(mm, site, torch.nan_to_num(flat)).masked_fill(bad, float("nan"))
        store(v.view(*xs.shape[:-1], v.shape[-1]))
    return [module.register_forward_pre_hook(pre, with_kwargs=True)]


@contextmanager
def steer_router(lm, layer: int, token: int, forbid: int | None = None, force: int | None = None) -> Iterator[None]:
    """Route `token` of every prompt away from expert `forbid` or to expert `force` at MoE block `layer`: the
    router's weights and choice for that token are replaced by MoEMath.route's with E excluded or forced; every
    other token is routed as the model does. Hooks only, removed on exit (no weight is touched)."""
    mm = MoEMath(lm, layer)
    block = lm.layers[layer]
    shape: dict = {}

    def pre(mod, args, kwargs):
        shape["S"] = (args[0] if args else kwargs["hidden_states"]).shape[1]

    def post(mod, args, kwargs, out):
        S = shape["S"]
        if token >= S:
            return None
        h = args[0] if args else kwargs["hidden_states"]
        h = h.reshape(-1, h.shape[-1])
        rows = torch.arange(token, h.shape[0], S, device=h.device)
        logits, scores, idx = out
        w, e = mm.route(h[rows], forbid=forbid, force=force)
        scores, idx = scores.clone(), idx.clone()
        scores[rows] = w.to(scores.dtype)
        idx[rows] = e.to(idx.dtype)
        return logits, scores, idx

    handles = [get_module(block, lm.adapter.moe.block).register_forward_pre_hook(pre, with_kwargs=True)]
    try:
        handles.append(mm.router.register_forward_hook(post, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def flat_layout_note(lm, layer: int) -> str:
    """One line saying how the flat z dims of MoE block `layer` map to (expert, dim)."""
    mm = MoEMath(lm, layer)
    spans = ", ".join(f"{'shared' if ex.name == SHARED else f'e{ex.name}'} {mm.offsets[b]}..{mm.offsets[b + 1] - 1}"
                      for b, ex in enumerate(mm.experts))
    return (f"block {layer} is a mixture of experts: its z dims (--vec-idx, chosen dims) index the flat z = w_e z^e "
            f"of every expert side by side: {spans}")
