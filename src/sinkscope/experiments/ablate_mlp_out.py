"""`--layer L --ablate-mlp-out direction|magnitude` (MODES.md section 4): is the sink token's MLP output at L what
makes it a sink later on? Sink attention at every later layer, before and after ablating it.

* magnitude: m_t <- alpha m_t, alpha = min(||m_ref|| / max(||m_t||, 1e-12), 1) per prompt (direction kept).
  Only prompts that have the reference token are measured (in every column), so all columns share one set.
* direction: m_t <- m_t - Q Q^T m_t, Q an orthonormal basis of the chosen W_down columns: --vec-idx if given
  (it really selects them, fix 8.2), else the top-energy z dims at token t (an empty set is reported, fix 8.5).
  Two more columns:
  - layer_input_ablated: for each later layer l', span(Q) removed from token t's residual input of block l'
    (hook_resid_pre) and the sink measured at l' only. All l' are run in ONE forward of each batch twice over:
    at every later layer the second copy's residual is reset to the first copy's with token t ablated, so at
    l' the second copy sees exactly "the clean stream at l' with span(Q) removed at t".
  - random_control: the mlp_out ablation with a seeded random subspace of the same rank, orthogonal to span(Q)
    (seed --seed, the reference's single control). `n_controls` controls are drawn in all (effects.control_seeds;
    the first is this one); their spread is reported beside the table.
* Every run but layer_input_ablated also measures the mean next-token loss (loss.py) over the same prompts; the
  ablation's and the controls' effects on sink attention and loss come with bootstrap CIs over prompts
  (effects.py).
  For magnitude these two columns are N/A: a rescaling has no subspace to remove or to match at random.
* For models with a post-MLP norm (Gemma 2/3 sandwich), m is read after that RMS norm, which rescales and
  multiplies by gamma; the basis is then taken from the normed columns (the span a W_down column lands in).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..checks import check_int
from ..result import Result
from .. import distributed, stats
from ..arch import get_module
from ..interventions import edit_sites, project_out_token, scale_token
from ..runner import RunContext
from .mlp_common import Table, check_te_args, choose_dims, mlp_math, tokens_for
from .effects import Outcome, control_seeds, summarise
from .sinkattn import SinkSeries, later_layers, run_sink_pass, series_rows

MAG_CAP = 1.0       # magnitude mode never increases the norm (the reference's cap)
COLUMNS = ("baseline", "mlp_out_ablated", "layer_input_ablated", "random_control")


@dataclass
class AblateMLPOutResult(Result):
    layer: int
    mode: str
    model_type: str
    sink_tok: int
    ref_tok: int
    layers: list[int]                     # the later layers measured
    series: dict                          # column name -> SinkSeries or None (N/A)
    sink_table: Table
    chosen_dims: list[int]
    dims_source: str
    te_median_mass: float
    te_candidates: list[int]
    empty_message: str | None
    rank: int
    seed: int
    vec_suffix: str                       # "_vec1229_1487" when --vec-idx was given (the reference's file name)
    basis_space: str                      # where Q lives: "W_down columns" or "post-MLP-norm image of ..."
    Q: torch.Tensor | None = field(default=None, repr=False)
    R: torch.Tensor | None = field(default=None, repr=False)
    alpha: dict | None = None             # magnitude: mean/min/max of the per-prompt factor
    residual_frac: float | None = None    # direction: mean ||Q^T m_t'|| / ||m_t|| after the edit (~0)
    n_measured: int = 0
    notes: list[str] = field(default_factory=list)
    n_controls: int = 0
    controls: list = field(default_factory=list, repr=False)   # every random control's SinkSeries
    outcome: Outcome | None = None                              # loss per run, effects with CIs, controls' spread


def _basis(lm, layer: int, cols: torch.Tensor) -> tuple[torch.Tensor, str]:
    post = lm.adapter.mlp_post_norm
    if post is None:
        return stats.orthonormal_basis(cols), "W_down columns"
    norm = get_module(lm.layers[layer], post)
    p = next(norm.parameters())
    with torch.inference_mode():
        normed = norm(cols.T.to(p.device, p.dtype)).float().cpu().T
    return stats.orthonormal_basis(normed), f"{post}(W_down columns) (the MLP output is read after that norm)"


@contextmanager
def _layer_input_edits(lm, layers, token: int, Q: torch.Tensor):
    """Second copy of a doubled batch := first copy with span(Q) removed at `token`, at every layer's input."""
    Q32 = Q.float()

    def reset(t: torch.Tensor) -> torch.Tensor:
        B = t.shape[0] // 2
        out = t.clone()
        out[B:] = t[:B]
        if token < t.shape[1]:
            x = t[:B, token].float()
            q = Q32.to(x.device)
            out[B:, token] = (x - (x @ q) @ q.T).to(t.dtype)
        return out
    with edit_sites(lm, [(l, "hook_resid_pre", reset) for l in layers]):
        yield


def run_ablate_mlp_out(ctx: RunContext, layer: int, mode: str, sink_tok: int = 0, ref_tok: int = 8,
                       vec_idx=None, te_k: int = 3, te_mass: float = 0.55, seed: int = 19,
                       n_controls: int = 10) -> AblateMLPOutResult:
    lm = ctx.lm
    if mode not in ("direction", "magnitude"):
        raise ValueError(f"mode must be direction or magnitude, not {mode!r}")
    layer = ctx.check_layer(layer)
    layers = later_layers(ctx, layer)
    check_te_args(te_k, te_mass)
    check_int("--n-controls", n_controls, 1)
    tokens_for(ctx, sink_tok, ref_tok)
    mm = mlp_math(lm, layer)
    lengths = torch.tensor(ctx.prompts.lengths)
    eligible = lengths > ref_tok if mode == "magnitude" else None
    if eligible is not None and not bool(eligible.all()):
        ctx.notes.append(f"magnitude: {int((~eligible).sum())} of {len(lengths)} prompts have no token {ref_tok} "
                         f"(no reference norm) and are left out of every column")
    series: dict[str, SinkSeries | None] = dict.fromkeys(COLUMNS)
    site = "hook_mlp_out"
    check = {f"blocks.{layer}.{site}": [sink_tok]}
    zsite = f"blocks.{layer}.mlp.hook_post"
    series["baseline"] = run_sink_pass(ctx, layers, sink_tok, eligible=eligible,
                                       extra_sites={**check, zsite: [sink_tok]}, desc="baseline", with_loss=True)
    m_before = series["baseline"].extra.pop(f"blocks.{layer}.{site}")[:, 0]
    z_sink = series["baseline"].extra.pop(zsite)[:, 0]
    Q = R = None
    dims, source, mass, cands, message, basis_space = [], "n/a", float("nan"), [], None, "n/a"
    alpha, residual_frac = None, None
    controls: list[SinkSeries] = []
    seeds: list[int] = []

    if mode == "magnitude":
        alphas = torch.full((len(ctx.prompts),), float("nan"))   # per prompt: a retried batch overwrites it

        def factor(state):
            def fn(full: torch.Tensor) -> torch.Tensor:
                lens = state.batch.lengths.to(full.device)
                m0 = full[:, sink_tok].norm(dim=-1)
                mr = full[:, min(ref_tok, full.shape[1] - 1)].norm(dim=-1)
                a = (mr / m0.clamp_min(stats.EPS)).clamp(max=MAG_CAP)
                a = torch.where(lens > ref_tok, a, torch.ones_like(a))  # no reference token: left as is
                keep = (lens > max(ref_tok, sink_tok)).cpu()
                alphas[state.batch.index[keep]] = a.detach().float().cpu()[keep]
                return a
            return fn

        series["mlp_out_ablated"] = run_sink_pass(
            ctx, layers, sink_tok, eligible=eligible, desc="magnitude ablation", with_loss=True,
            edit=lambda state: scale_token(lm, layer, site, sink_tok, factor(state)))
        a = distributed.merge_rows(alphas, ctx.owned)             # data-parallel runs: every rank's prompts
        a = a[~torch.isnan(a)]
        alpha = {"mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()), "n": int(a.numel())} \
            if a.numel() else None
    else:
        choice = choose_dims(z_sink, vec_idx, te_k, te_mass, sink_tok, layer, mm.F)
        dims, source, message = choice.dims, choice.source, choice.message
        mass, cands = choice.te.median_mass, choice.te.candidates
        if dims:
            Q, basis_space = _basis(lm, layer, mm.W_down[:, dims])
            R = stats.random_orthogonal_basis(Q, Q.shape[1], seed)
            abl = run_sink_pass(ctx, layers, sink_tok, extra_sites=check, desc="direction ablation", with_loss=True,
                                edit=lambda state: project_out_token(lm, layer, site, sink_tok, Q))
            m_after = abl.extra.pop(f"blocks.{layer}.{site}")[:, 0]
            ok = ~torch.isnan(m_after).any(-1)
            residual_frac = float(((m_after[ok] @ Q).norm(dim=-1) / m_before[ok].norm(dim=-1).clamp_min(stats.EPS))
                                  .mean())
            series["mlp_out_ablated"] = abl
            series["layer_input_ablated"] = run_sink_pass(
                ctx, layers, sink_tok, double=True, desc="layer-input ablation",
                edit=lambda state: _layer_input_edits(lm, layers, sink_tok, Q))
            seeds = control_seeds(seed, n_controls)
            for c, sd in enumerate(seeds):
                Rc = R if c == 0 else stats.random_orthogonal_basis(Q, Q.shape[1], sd)
                controls.append(run_sink_pass(
                    ctx, layers, sink_tok, desc=f"random control {c + 1}/{n_controls}", with_loss=True,
                    edit=lambda state, Rc=Rc: project_out_token(lm, layer, site, sink_tok, Rc)))
            series["random_control"] = controls[0] if controls else None
    table = Table(f"[Sink attention to token {sink_tok}] ablate-mlp-out={mode} L={layer}", list(COLUMNS),
                  series_rows(layers, series))
    suffix = "_vec" + "_".join(map(str, vec_idx)) if vec_idx else ""
    return AblateMLPOutResult(
        layer=layer, mode=mode, model_type=lm.adapter.model_type, sink_tok=sink_tok, ref_tok=ref_tok,
        layers=layers, series=series, sink_table=table, chosen_dims=dims, dims_source=source, te_median_mass=mass,
        te_candidates=cands, empty_message=message, rank=0 if Q is None else Q.shape[1], seed=seed,
        vec_suffix=suffix, basis_space=basis_space, Q=Q, R=R, alpha=alpha, residual_frac=residual_frac,
        n_measured=series["baseline"].n_prompts, notes=list(dict.fromkeys(ctx.notes)),
        n_controls=len(controls), controls=controls,
        outcome=summarise(series, ["mlp_out_ablated", "random_control"], controls, seeds, seed))
