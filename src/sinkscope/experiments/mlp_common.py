"""What the three MLP modes share: the MLP of one block as fp32 maths, z-dim selection and z-stack rows.

z is always the input of the down/output projection (down_proj, c_proj, dense_4h_to_h, fc2). For a gated MLP
z = act(g) * u with g = W_gate x + b_g and u = W_up x + b_u; for a plain MLP z = act(g) with g = W_in x + b.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import stats
from ..arch import down_weight, get_module, in_weight, residual_scale
from ..hooks import SiteUnavailable, site_available
from ..moe import MoEMath, is_moe_layer
from ..errors import UsageError
from ..runner import RunContext

STACK_SEGMENTS = 24  # z-stack plot: the top-24 dims by mean energy fraction


def _bias(module) -> torch.Tensor | None:
    b = getattr(module, "bias", None)
    return None if b is None else b.detach().float()


@dataclass
class MLPMath:
    """The MLP of block `layer` in fp32: weights as [F, D] rows, the activation module, W_down as [D, F]."""
    layer: int
    kind: str                     # "gated" (also fused gate_up) or "plain"
    W_gate: torch.Tensor          # gated: W_gate; plain: W_in  [F, D]
    b_gate: torch.Tensor | None
    W_up: torch.Tensor | None     # gated only [F, D]
    b_up: torch.Tensor | None
    act: torch.nn.Module
    W_down: torch.Tensor          # [D, F]; column j is what z_j writes to the residual (times any residual
    #                               multiplier, e.g. Granite's: m = W_down z + b as added to the residual)

    @property
    def gated(self) -> bool:
        return self.kind == "gated"

    @property
    def F(self) -> int:
        return self.W_gate.shape[0]

    def pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(g, u) from x [..., D] in fp32 (u is None for a plain MLP)."""
        x = x.float()
        g = x @ self.W_gate.to(x.device).T
        if self.b_gate is not None:
            g = g + self.b_gate.to(x.device)
        if not self.gated:
            return g, None
        u = x @ self.W_up.to(x.device).T
        if self.b_up is not None:
            u = u + self.b_up.to(x.device)
        return g, u

    def activate(self, g: torch.Tensor) -> torch.Tensor:
        return self.act(g.float())

    def z_from_factors(self, g: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        a = self.activate(g)
        return a if u is None else a * u.float()

    def z(self, x: torch.Tensor) -> torch.Tensor:
        return self.z_from_factors(*self.pre(x))

    def act_prime(self, g: torch.Tensor) -> torch.Tensor:
        """act'(g) elementwise, by autograd on the activation module (exact for any activation)."""
        with torch.enable_grad():
            leaf = g.detach().float().clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.act(leaf).sum(), leaf)
        return grad

    def grad_closed_form(self, x: torch.Tensor, j: int) -> torch.Tensor:
        """d z_j^2 / dx for rows x [N, D] (gated MLPs):
        2 z_j [u_j act'(g_j) W_gate[j, :] + act(g_j) W_up[j, :]], from x alone (fix 8.11)."""
        if not self.gated:
            raise ValueError("the closed-form gradient is for gated MLPs; use grad_autograd")
        g, u = self.pre(x)
        gj, uj = g[:, j], u[:, j]
        aj = self.activate(gj)
        zj = aj * uj
        coef_gate = (2 * zj * uj * self.act_prime(gj)).unsqueeze(1)
        coef_up = (2 * zj * aj).unsqueeze(1)
        return coef_gate * self.W_gate[j].to(x.device) + coef_up * self.W_up[j].to(x.device)

    def grad_autograd(self, x: torch.Tensor, j: int) -> torch.Tensor:
        """d z_j^2 / dx for rows x [N, D] by autograd through the recomputed MLP (any MLP kind)."""
        with torch.enable_grad():
            leaf = x.detach().float().clone().requires_grad_(True)
            zj = self.z(leaf)[:, j]
            (grad,) = torch.autograd.grad((zj ** 2).sum(), leaf)
        return grad

    def grad(self, x: torch.Tensor, j: int) -> torch.Tensor:
        """Closed form for gated MLPs, autograd for the rest."""
        return self.grad_closed_form(x, j) if self.gated else self.grad_autograd(x, j)


def mlp_math(lm, layer: int):
    """The MLP of block `layer`: an MLPMath, or for a mixture of experts a moe.MoEMath (the flat view of every
    expert's z, whose W_down columns are the experts' own); a one-line UsageError where there is neither."""
    why = site_available(lm, layer, "mlp.hook_post")
    if why:
        raise SiteUnavailable(f"the MLP modes need a dense MLP or a mixture of experts: {why}")
    if is_moe_layer(lm, layer):
        return MoEMath(lm, layer)
    a = lm.adapter
    block = lm.layers[layer]
    sub = lambda p: get_module(block, p)  # noqa: E731
    act = sub(a.act)
    W_down = down_weight(sub(a.down))
    scale = residual_scale(a, lm.config)
    if scale is not None:
        W_down = W_down * scale
    if a.mlp_kind == "gated_fused":
        m = sub(a.gate)
        W, b = in_weight(m), _bias(m)
        F = W.shape[0] // 2
        return MLPMath(layer, "gated", W[:F], None if b is None else b[:F], W[F:], None if b is None else b[F:],
                       act, W_down)
    if a.gated:  # also the dense layers of MoE families
        mg, mu = sub(a.gate), sub(a.up)
        return MLPMath(layer, "gated", in_weight(mg), _bias(mg), in_weight(mu), _bias(mu), act, W_down)
    mi = sub(a.up)
    return MLPMath(layer, "plain", in_weight(mi), _bias(mi), None, None, act, W_down)


def check_vec_idx(vec_idx, F: int, layer: int) -> list[int] | None:
    """Validate --vec-idx against the z width; None when not given."""
    if vec_idx is None:
        return None
    idx = [int(i) for i in vec_idx]
    bad = [i for i in idx if not 0 <= i < F]
    if bad:
        raise UsageError(f"--vec-idx {' '.join(map(str, bad))} is out of range: layer {layer}'s MLP has z dims "
                         f"0..{F - 1}")
    if len(set(idx)) != len(idx):
        raise UsageError(f"--vec-idx has repeated dims: {' '.join(map(str, idx))}")
    return idx


@dataclass
class DimChoice:
    dims: list[int]           # the z dims used (W_down columns); empty: nothing to use
    source: str               # "vec-idx" or "top-energy"
    te: stats.TopEnergy       # the top-energy test at the ablated token (always run, for the record)
    message: str | None       # set when dims is empty: what happened and what to do


def choose_dims(Z_tok: torch.Tensor, vec_idx, k: int, tau: float, token: int, layer: int, F: int) -> DimChoice:
    """--vec-idx if given (really selects the columns, fix 8.2), else TE(Z_tok, k, tau) (fix 8.5 when empty)."""
    Z_tok = Z_tok[~torch.isnan(Z_tok).any(-1)]
    te = stats.top_energy_dims(Z_tok, k=k, tau=tau)
    idx = check_vec_idx(vec_idx, F, layer)
    if idx is not None:
        return DimChoice(idx, "vec-idx", te, None)
    if te.dims:
        return DimChoice(list(te.dims), "top-energy", te, None)
    msg = (f"no top-energy z dims at token {token}, layer {layer}: the median energy mass of the top-{k} dims "
           f"{te.candidates} is {te.median_mass:.4f} < --te-mass {tau}; this layer's z has no dominant dims "
           f"there. Lower --te-mass (e.g. --te-mass {max(0.0, te.median_mass - 0.01):.2f}), or pick the dims "
           f"with --vec-idx {' '.join(map(str, te.candidates))}")
    return DimChoice([], "top-energy", te, msg)


def check_te_args(k: int, tau: float) -> None:
    if k < 1:
        raise UsageError(f"--te-k must be >= 1, not {k}")
    if not 0.0 <= tau <= 1.0:
        raise UsageError(f"--te-mass must be in [0, 1], not {tau}")


def tokens_for(ctx: RunContext, *tokens: int) -> list[int]:
    """Distinct tokens in order, checked against the prompts (too-short prompts are counted in ctx.notes)."""
    out: list[int] = []
    for t in tokens:
        if int(t) not in out:
            out.append(int(t))
    ctx.check_tokens(out)
    return out


@dataclass
class ZStackRow:
    """One bar of the z-stack plot: mean ||z||, split into the top dims by mean energy fraction."""
    label: str
    mean_norm: float
    dims: list[int]
    fracs: list[float]
    n_prompts: int


def zstack_row(label: str, Z: torch.Tensor, segments: int = STACK_SEGMENTS) -> ZStackRow:
    Z = Z[~torch.isnan(Z).any(-1)]
    if Z.shape[0] == 0:
        return ZStackRow(label, float("nan"), [], [], 0)
    m = stats.energy_fractions(Z).double().mean(0)
    order = torch.sort(m, descending=True, stable=True).indices[:segments]
    return ZStackRow(label, stats.mean_norm(Z), [int(i) for i in order], [float(m[i]) for i in order], Z.shape[0])


@dataclass
class Table:
    """A reference metrics table: rows of (name, one value per column, fmt) for fmt.format_table."""
    title: str
    columns: list[str]
    rows: list[tuple[str, list, str]]

    def as_dict(self) -> dict:
        return {name: values for name, values, _ in self.rows}
