"""`explain` step (A), causal: remove what the birth layers' MLPs write onto token 0 and measure the sink later on.

Every run measures the sink attention to key 0 at the later layers (after the last birth layer) with
`sinkattn.run_sink_pass`, under edits from `interventions.py`:

* single (one run per birth layer, when there are several) and joint (all birth layers at once): token 0's MLP
  output m_0 <- m_0 - Q Q^T m_0 at each birth layer, Q the orthonormal basis of that layer's chosen W_down columns
  (after the post-MLP norm where the model has one; `ablate_mlp_out._basis`);
* magnitude (joint): m_0 <- alpha m_0 with alpha = min(||m_8|| / ||m_0||, 1) per prompt (token 8 as the
  reference), over the prompts that have token 8;
* n_controls random controls (joint): at each birth layer a seeded random subspace of the same rank, orthogonal
  to Q, removed instead.

The baseline is the observation pass's sink attention (the same definition, the same prompts) unless the loss is
measured, which needs a baseline run of its own.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch

from .. import stats
from ..interventions import project_out_token, scale_token
from ..runner import RunContext
from . import effects
from . import explain_stats as es
from .ablate_mlp_out import MAG_CAP, _basis
from .sinkattn import run_sink_pass

SITE = "hook_mlp_out"
REF_TOK = 8


# -- the loss and the bootstrap CIs (loss.py, stats.bootstrap_ci, effects.py) -----------------------------------------

def sink_pass(ctx: RunContext, layers, *, edit=None, eligible=None, desc: str, with_loss: bool):
    """run_sink_pass on key 0, optionally with the loss; returns (SinkSeries, mean loss or None)."""
    s = run_sink_pass(ctx, layers, 0, edit=edit, eligible=eligible, desc=desc, with_loss=with_loss)
    return s, s.loss if with_loss else None


def loss_effect(variant, baseline, seed: int) -> dict:
    """The loss change of a run against the baseline with its bootstrap CI (experiments/effects.py, paired over
    prompts, token-weighted); empty when the loss was not measured."""
    if variant is None or baseline is None or getattr(baseline, "loss_sum", None) is None:
        return {}
    e = effects.effect(variant, baseline, "loss", seed)
    return {} if e is None else {"loss_change": e["delta"], "loss_change_ci95": e["delta_ci95"],
                                 "loss_ci95": e["value_ci95"]}


def loss_controls(series: list, baseline, seed: int) -> dict | None:
    """The controls' loss block (every value, mean, std, CI; and the same for their change), via effects.py."""
    if baseline is None or getattr(baseline, "loss_sum", None) is None or not series:
        return None
    return effects.control_summary(series, baseline, ["loss"], seed, "random").get("loss")


# -- the edits ------------------------------------------------------------------------------------------------------

@contextmanager
def remove_spans(lm, bases: dict):
    """Remove span(bases[l]) from token 0's MLP output at every layer l, at once."""
    with ExitStack() as stack:
        for l, Q in bases.items():
            stack.enter_context(project_out_token(lm, l, SITE, 0, Q))
        yield


def _magnitude(lm, layers, state):
    def factor(full: torch.Tensor) -> torch.Tensor:
        lens = state.batch.lengths.to(full.device)
        m0 = full[:, 0].norm(dim=-1)
        mr = full[:, min(REF_TOK, full.shape[1] - 1)].norm(dim=-1)
        a = (mr / m0.clamp_min(stats.EPS)).clamp(max=MAG_CAP)
        return torch.where(lens > REF_TOK, a, torch.ones_like(a))

    @contextmanager
    def edit():
        with ExitStack() as stack:
            for l in layers:
                stack.enter_context(scale_token(lm, l, SITE, 0, factor))
            yield
    return edit()


# -- the step -------------------------------------------------------------------------------------------------------

def bases_for(lm, dims_by_layer: dict) -> tuple[dict, dict]:
    """{layer: Q} and {layer: where Q lives} for the chosen W_down columns of each MLP birth layer."""
    from .mlp_common import mlp_math
    Q, space = {}, {}
    for l, dims in dims_by_layer.items():
        Q[l], space[l] = _basis(lm, l, mlp_math(lm, l).W_down[:, dims])
    return Q, space


def n_passes(n_birth: int, n_controls: int, with_loss: bool) -> int:
    return (n_birth if n_birth > 1 else 0) + 1 + 1 + n_controls + (1 if with_loss else 0)


def _summ(name: str, kind: str, layers_edited, s, loss, base_lm: torch.Tensor, seed: int, base_s=None) -> dict:
    v = es.later_means(s.per_prompt)
    ok = torch.isfinite(v) & torch.isfinite(base_lm)
    value, base = float(v[ok].mean()), float(base_lm[ok].mean())
    return {"name": name, "kind": kind, "edited_layers": list(layers_edited), "value": value,
            "per_layer": s.mean, "n_prompts": int(ok.sum()), "baseline": base, "change": value - base,
            "rel_change": es.relative_change(value, base), "change_ci95": stats.bootstrap_ci((v - base_lm)[ok], seed=seed),
            "loss": loss, **loss_effect(s, base_s, seed)}


def run_causal(ctx: RunContext, dims_by_layer: dict, later: list[int], baseline_pp: torch.Tensor,
               n_controls: int, seed: int, with_loss: bool = True) -> dict:
    """Step (A). baseline_pp: [N, len(later)] head-mean sink attention per prompt without any edit."""
    lm = ctx.lm
    births = sorted(dims_by_layer)
    Q, space = bases_for(lm, dims_by_layer)
    base_loss = base_s = None
    if with_loss:
        base_s, base_loss = sink_pass(ctx, later, desc="baseline (loss)", with_loss=True)
        baseline_pp = base_s.per_prompt
    base_lm = es.later_means(baseline_pp)
    runs = [{"name": "baseline", "kind": "baseline", "edited_layers": [], "value": float(base_lm.nanmean()),
             "per_layer": [float(x) for x in torch.as_tensor(baseline_pp).nanmean(0)],
             "n_prompts": int(torch.isfinite(base_lm).sum()), "baseline": float(base_lm.nanmean()), "change": 0.0,
             "rel_change": 0.0, "change_ci95": [0.0, 0.0], "loss": base_loss}]
    if len(births) > 1:
        for l in births:
            s, loss = sink_pass(ctx, later, edit=lambda st, l=l: remove_spans(lm, {l: Q[l]}),
                                desc=f"single L{l}", with_loss=with_loss)
            runs.append(_summ(f"single L{l}", "single", [l], s, loss, base_lm, seed, base_s))
    s, loss = sink_pass(ctx, later, edit=lambda st: remove_spans(lm, Q), desc="joint", with_loss=with_loss)
    runs.append(_summ("joint" if len(births) > 1 else f"L{births[0]}", "joint", births, s, loss, base_lm, seed,
                      base_s))
    eligible = torch.tensor(ctx.prompts.lengths) > REF_TOK
    s, loss = sink_pass(ctx, later, edit=lambda st: _magnitude(lm, births, st), eligible=eligible,
                        desc="magnitude", with_loss=with_loss)
    runs.append(_summ("magnitude", "magnitude", births, s, loss, base_lm, seed, base_s))

    ctrl_values, ctrl_pp, ctrl_loss, ctrl_seeds, ctrl_series = [], [], [], [], []
    for c in range(n_controls):
        seeds = {l: seed + 1000 * (c + 1) + l for l in births}
        R = {l: stats.random_orthogonal_basis(Q[l], Q[l].shape[1], seeds[l]) for l in births}
        s, loss = sink_pass(ctx, later, edit=lambda st, R=R: remove_spans(lm, R), desc=f"control {c + 1}",
                            with_loss=with_loss)
        v = es.later_means(s.per_prompt)
        ctrl_pp.append(v)
        ctrl_values.append(float(v.nanmean()))
        ctrl_loss.append(loss)
        ctrl_seeds.append(seeds)
        if base_s is not None:
            ctrl_series.append(s)
    controls = None
    if n_controls:
        V = torch.stack(ctrl_pp)                                   # [C, N]
        vmean = V.mean(0)                                          # per prompt, over controls
        ok = torch.isfinite(vmean) & torch.isfinite(base_lm)
        base = float(base_lm[ok].mean())
        vals = torch.tensor(ctrl_values, dtype=torch.float64)
        controls = {"n": n_controls, "values": ctrl_values, "mean": float(vals.mean()),
                    "std": float(vals.std(unbiased=False)), "ci95": stats.bootstrap_ci(vmean[ok], seed=seed),
                    "baseline": base, "change": float(vals.mean()) - base,
                    "rel_change": es.relative_change(float(vals.mean()), base),
                    "change_ci95": stats.bootstrap_ci((vmean - base_lm)[ok], seed=seed),
                    "loss": None if any(x is None for x in ctrl_loss) else ctrl_loss,
                    "loss_mean": None if any(x is None for x in ctrl_loss) else sum(ctrl_loss) / len(ctrl_loss),
                    "loss_effect": loss_controls(ctrl_series, base_s, seed),
                    "seeds": [[s[l] for l in births] for s in ctrl_seeds], "rank": {l: int(Q[l].shape[1])
                                                                                    for l in births}}
    return {"layers_measured": later, "birth_layers": births, "dims": {l: list(d) for l, d in dims_by_layer.items()},
            "rank": {l: int(Q[l].shape[1]) for l in births}, "basis_space": space, "runs": runs,
            "controls": controls, "loss_measured": base_loss is not None, "ref_tok_magnitude": REF_TOK}
