"""`--layer L --decompose-mlp-in` (MODES.md section 5): which directions of the MLP input x at the sink token drive
the top z dims, and is removing them enough to undo the sink later on?

For each chosen z dim j (top-energy at token t, or --vec-idx): the gradient of z_j^2 at token t with respect to
x, per prompt (closed form for gated MLPs, fix 8.11; autograd for plain MLPs), its uncentred second-moment
spectrum and top direction v1 (canonical sign: the entry of largest |value| is positive, fix 8.9), and the
projections p0 = v1.(x_t - mu_b), pb = v1.(x_ref - mu_b), with mu_b the mean of x_ref. Condition (B) as a number:
Cohen's d and a seeded permutation p-value for p0 against pb. Then three runs measuring the sink at every later
layer and z at L: no ablation; span(Q) removed from x_t (hook_mlp_in), Q the orthonormal basis of the v1's; and a
seeded random subspace of the same rank, orthogonal to span(Q) (seed --seed, the reference's control), then
n_controls - 1 more such controls (effects.control_seeds) for the controls' spread. Every run also measures the
mean next-token loss (loss.py); effects and spreads come with bootstrap CIs over prompts (effects.py). The HEAD-only
pre-LN pull-back stage (section 5.7) is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..checks import check_int
from ..result import Result
from .. import stats
from ..interventions import project_out_token
from ..errors import UsageError
from ..runner import RunContext, valid_rows
from .find_mlp_subspace import capture_mlp
from .mlp_common import Table, ZStackRow, check_te_args, choose_dims, mlp_math, tokens_for, zstack_row
from .effects import Outcome, control_seeds, summarise
from .sinkattn import later_layers, run_sink_pass, series_rows

N_PERM = 10000
MAX_EIGS = 256    # eigenvalues kept per spectrum (the reference's plot range)
SERIES = ("baseline", "-span(Q)", "-span(rand⊥)")


@dataclass
class DirectionStats:
    dim: int
    eigvals: list[float]          # lambda_i = s_i^2 / N of the uncentred gradient stack, descending (<= 256)
    v1: list[float]               # unit, canonical sign
    p0: list[float]               # per prompt, token t
    pb: list[float]               # per prompt, reference token
    p0_mean: float
    p0_sd: float
    pb_mean: float
    pb_sd: float
    cohens_d: float
    perm_p: float
    grad_norm_mean: float


@dataclass
class DecomposeMLPInResult(Result):
    layer: int
    model_type: str
    gated: bool
    grad_method: str              # "closed form" or "autograd"
    sink_tok: int
    ref_tok: int
    layers: list[int]
    chosen_dims: list[int]
    dims_source: str
    te_median_mass: float
    te_candidates: list[int]
    empty_message: str | None
    directions: list[DirectionStats] = field(default_factory=list)
    gram: list[list[float]] | None = None
    gram_eigs: list[float] | None = None
    energy_frac: list[float] | None = None
    cum_frac: list[float] | None = None
    eff_rank_entropy: float | None = None
    eff_rank_participation: float | None = None
    rank: int = 0
    seed: int = 19
    n_perm: int = N_PERM
    series: dict = field(default_factory=dict)   # name -> SinkSeries
    sink_table: Table | None = None
    stacks: list[ZStackRow] = field(default_factory=list)
    x_residual_frac: dict = field(default_factory=dict)  # run -> mean ||Q^T x_t'|| / ||x_t|| after the edit
    Q: torch.Tensor | None = field(default=None, repr=False)
    R: torch.Tensor | None = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)
    n_controls: int = 0
    controls: list = field(default_factory=list, repr=False)   # every random control's SinkSeries (the first: R)
    outcome: Outcome | None = None                              # loss per run, effects with CIs, controls' spread


def _direction(mm, X0: torch.Tensor, Xb: torch.Tensor, mu_b: torch.Tensor, j: int, seed: int) -> DirectionStats:
    G = mm.grad(X0, j)
    lam, v1 = stats.second_moment_spectrum(G)
    p0 = ((X0 - mu_b) @ v1).double()
    pb = ((Xb - mu_b) @ v1).double()
    return DirectionStats(
        dim=j, eigvals=lam[:MAX_EIGS].tolist(), v1=v1.tolist(), p0=p0.tolist(), pb=pb.tolist(),
        p0_mean=float(p0.mean()), p0_sd=float(p0.std(unbiased=False)), pb_mean=float(pb.mean()),
        pb_sd=float(pb.std(unbiased=False)), cohens_d=stats.cohens_d(p0, pb),
        perm_p=stats.permutation_pvalue(p0, pb, n_perm=N_PERM, seed=seed),
        grad_norm_mean=float(G.norm(dim=-1).mean()))


def run_decompose_mlp_in(ctx: RunContext, layer: int, sink_tok: int = 0, ref_tok: int = 8, vec_idx=None,
                         te_k: int = 3, te_mass: float = 0.55, seed: int = 19,
                         n_controls: int = 10) -> DecomposeMLPInResult:
    lm = ctx.lm
    layer = ctx.check_layer(layer)
    layers = later_layers(ctx, layer)
    check_te_args(te_k, te_mass)
    check_int("--n-controls", n_controls, 1)
    tokens = tokens_for(ctx, sink_tok, ref_tok)
    n_both = sum(1 for n in ctx.prompts.lengths if n > max(sink_tok, ref_tok))
    if n_both < 2:
        raise UsageError(f"--decompose-mlp-in compares token {sink_tok} with token {ref_tok} across prompts and needs "
                         f"at least 2 prompts that have both; {n_both} has (use more or longer prompts)")
    mm = mlp_math(lm, layer)
    cache = capture_mlp(ctx, layer, tokens, mm.gated, desc=f"decompose-mlp-in L{layer}")
    x, z = cache["hook_mlp_in"], cache["mlp.hook_post"]
    choice = choose_dims(z[:, 0], vec_idx, te_k, te_mass, sink_tok, layer, mm.F)
    res = DecomposeMLPInResult(
        layer=layer, model_type=lm.adapter.model_type, gated=mm.gated,
        grad_method="closed form" if mm.gated else "autograd", sink_tok=sink_tok, ref_tok=ref_tok,
        layers=layers, chosen_dims=choice.dims, dims_source=choice.source, te_median_mass=choice.te.median_mass,
        te_candidates=choice.te.candidates, empty_message=choice.message, seed=seed, notes=list(dict.fromkeys(ctx.notes)))
    if not choice.dims:
        return res

    X0, Xb = valid_rows(x[:, 0]), valid_rows(x[:, 1])
    mu_b = Xb.mean(0)
    res.directions = [_direction(mm, X0, Xb, mu_b, j, seed) for j in choice.dims]
    V = torch.tensor([d.v1 for d in res.directions], dtype=torch.float32)  # [k, D], unit rows
    gram = stats.cosine_matrix(V).double()
    eigs = np.sort(np.linalg.eigvalsh(gram.numpy()))[::-1]
    total = float(np.clip(eigs, 0, None).sum())
    res.gram = gram.tolist()
    res.gram_eigs = [float(e) for e in eigs]
    res.energy_frac = [round(float(e) / total, 4) for e in eigs]
    res.cum_frac = [round(float(c) / total, 4) for c in np.cumsum(eigs)]
    res.eff_rank_entropy = stats.eff_rank_entropy(eigs)
    res.eff_rank_participation = stats.eff_rank_participation(eigs)

    Q = stats.orthonormal_basis(V.T)
    R = stats.random_orthogonal_basis(Q, Q.shape[1], seed)
    res.Q, res.R, res.rank = Q, R, Q.shape[1]
    zsite, xsite = f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.hook_mlp_in"
    extra = {zsite: [sink_tok, ref_tok], xsite: [sink_tok]}
    x_before = None
    for name, basis in zip(SERIES, (None, Q, R)):
        edit = None if basis is None else (
            lambda state, b=basis: project_out_token(lm, layer, "hook_mlp_in", sink_tok, b))
        s = run_sink_pass(ctx, layers, sink_tok, edit=edit, extra_sites=extra, desc=f"decompose-mlp-in {name}",
                          with_loss=True)
        zz, xx = s.extra.pop(zsite), s.extra.pop(xsite)[:, 0]
        res.series[name] = s
        if basis is None:
            x_before = xx
            res.stacks.append(zstack_row(f"tok{sink_tok} (base)", zz[:, 0]))
            ref_row = zstack_row(f"tok{ref_tok} (base)", zz[:, 1])
        else:
            ok = ~torch.isnan(xx).any(-1)
            res.x_residual_frac[name] = float(((xx[ok] @ Q).norm(dim=-1)
                                               / x_before[ok].norm(dim=-1).clamp_min(stats.EPS)).mean())
            res.stacks.append(zstack_row(f"tok{sink_tok} ({name})", zz[:, 0]))
    res.stacks.append(ref_row)
    seeds = control_seeds(seed, n_controls)
    res.controls = [res.series[SERIES[2]]]
    for c, sd in enumerate(seeds[1:], start=2):
        Rc = stats.random_orthogonal_basis(Q, Q.shape[1], sd)
        res.controls.append(run_sink_pass(
            ctx, layers, sink_tok, desc=f"decompose-mlp-in random control {c}/{n_controls}", with_loss=True,
            edit=lambda state, b=Rc: project_out_token(lm, layer, "hook_mlp_in", sink_tok, b)))
    res.n_controls = len(res.controls)
    res.outcome = summarise(res.series, [SERIES[1], SERIES[2]], res.controls, seeds, seed)
    res.sink_table = Table(f"[Sink attention to token {sink_tok}] decompose-mlp-in L={layer}", list(SERIES),
                      series_rows(layers, res.series))
    return res
