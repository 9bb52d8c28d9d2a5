"""Effects of an intervention, paired over prompts, with seeded bootstrap CIs (stats.bootstrap_ci).

Two metrics, both per prompt from a `SinkSeries` (sinkattn.py), so a variant and its baseline are compared on the
prompts measured in both:

* "sink": the later-layer mean sink attention of a prompt, the mean over the series' layers of its head-mean
  attention to the key (layers without softmax attention, NaN for every prompt, are skipped). Prompts weigh 1.
* "loss": the prompt's mean next-token NLL, loss_sum / loss_count, weighted by loss_count, so the value is the
  token-weighted mean NLL and its CI resamples prompts (all of a prompt's tokens together).

effect(variant, baseline, metric, seed) -> value, value_ci95, baseline, delta (variant - baseline, paired),
delta_ci95, rel_change (delta / baseline value), n_prompts.
control_summary(controls, baseline, metrics, seed, name) -> per metric: every control's value, their mean and
std (over controls), the CI over prompts of the controls' mean, and the same for their change from the baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .. import stats

METRICS = ("sink", "loss")
LEVEL = 0.95


def per_prompt(series, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(value [N] float64, weight [N] float64) of one metric per prompt; NaN value where not measured."""
    if metric == "sink":
        pp = torch.as_tensor(series.per_prompt, dtype=torch.float64)
        cols = ~torch.isnan(pp).all(0)                  # layers measured for some prompt
        pp = pp[:, cols]
        v = torch.full((pp.shape[0],), math.nan, dtype=torch.float64)
        ok = ~torch.isnan(pp).any(-1) & (pp.shape[1] > 0)
        v[ok] = pp[ok].mean(-1)
        return v, torch.ones_like(v)
    if metric == "loss":
        if getattr(series, "loss_sum", None) is None:
            raise ValueError("this series has no loss (run_sink_pass(..., with_loss=True))")
        s = torch.as_tensor(series.loss_sum, dtype=torch.float64)
        c = torch.as_tensor(series.loss_count, dtype=torch.float64)
        v = torch.where(c > 0, s / c.clamp_min(1), torch.full_like(s, math.nan))
        return v, c
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")


def _wmean(v: torch.Tensor, w: torch.Tensor) -> float:
    return float((v * w).sum() / w.sum()) if v.numel() and float(w.sum()) > 0 else math.nan


def _rel(delta: float, base: float) -> float:
    return delta / base if math.isfinite(delta) and math.isfinite(base) and base != 0 else math.nan


def effect(variant, baseline, metric: str, seed: int) -> dict:
    """The variant's value and its change from the baseline, over the prompts measured in both, with CIs."""
    v, w = per_prompt(variant, metric)
    b, _ = per_prompt(baseline, metric)
    ok = torch.isfinite(v) & torch.isfinite(b) & (w > 0)
    v, b, w = v[ok], b[ok], w[ok]
    value, base = _wmean(v, w), _wmean(b, w)
    delta = _wmean(v - b, w)
    return {"metric": metric, "value": value, "value_ci95": stats.bootstrap_ci(v, seed, level=LEVEL, weights=w),
            "baseline": base, "delta": delta,
            "delta_ci95": stats.bootstrap_ci(v - b, seed, level=LEVEL, weights=w),
            "rel_change": _rel(delta, base), "n_prompts": int(ok.sum())}


def available_metrics(series_list, baseline) -> list[str]:
    have_loss = getattr(baseline, "loss_sum", None) is not None and all(
        getattr(s, "loss_sum", None) is not None for s in series_list)
    return [m for m in METRICS if m != "loss" or have_loss]


def control_summary(series_list, baseline, metrics=None, seed: int = 19, name: str = "controls") -> dict:
    """Per metric (default: every metric the series carry): {"values": one per control, "mean", "std" (sample
    std over controls; 0 for one), "ci95" (bootstrap over prompts of the per-prompt mean over controls),
    "change_mean", "change_ci95", "rel_change", "n", "n_prompts", "name"}. Empty dict for no controls."""
    series_list = list(series_list)
    if not series_list:
        return {}
    out = {}
    for metric in metrics or available_metrics(series_list, baseline):
        b, w = per_prompt(baseline, metric)
        V = torch.stack([per_prompt(s, metric)[0] for s in series_list])       # [C, N]
        vals = [effect(s, baseline, metric, seed)["value"] for s in series_list]
        mean, std = stats.mean_std(vals)
        vm = V.mean(0)                                                          # per prompt, over controls
        ok = torch.isfinite(vm) & torch.isfinite(b) & (w > 0)
        base = _wmean(b[ok], w[ok])
        change = mean - base
        out[metric] = {"name": name, "n": len(vals), "values": vals, "mean": mean, "std": std,
                       "ci95": stats.bootstrap_ci(vm[ok], seed, level=LEVEL, weights=w[ok]),
                       "baseline": base, "change_mean": change,
                       "change_ci95": stats.bootstrap_ci((vm - b)[ok], seed, level=LEVEL, weights=w[ok]),
                       "rel_change": _rel(change, base), "n_prompts": int(ok.sum())}
    return out


# -- an intervention mode's summary: the ablation(s) and N seeded random controls against one baseline ----------

def control_seeds(seed: int, n: int) -> list[int]:
    """Seeds of n random controls: the first is `seed` itself (the reference's single control), the others are
    drawn from numpy's SeedSequence([seed, c]), so another seed gives a different set, not a shifted one."""
    import numpy as np
    return [int(seed)] + [int(np.random.SeedSequence([int(seed), c]).generate_state(1)[0]) for c in range(1, n)]


@dataclass
class Outcome:
    """What `summarise` returns and the report modules print (report/effects.py)."""
    layers: list[int]
    loss: dict                      # run name -> token-weighted mean NLL (None: not measured)
    effects: dict                   # run name -> {metric: effect(...)} against the baseline
    controls: dict                  # metric -> control_summary(...)[metric]
    control_seeds: list[int]
    seed: int
    n_controls: int = 0
    control_loss: list = field(default_factory=list)   # every control's loss, in control order
    control_per_layer: list = field(default_factory=list)  # every control's sink attention per layer


def summarise(series: dict, runs: list[str], controls: list, seeds: list[int], seed: int,
              baseline: str = "baseline") -> Outcome:
    """Effects of the named runs and the controls' spread, against series[baseline] (metrics it carries)."""
    base = series[baseline]
    metrics = [m for m in available_metrics([series[r] for r in runs if series.get(r) is not None] + controls,
                                            base)]
    effects = {r: {m: effect(series[r], base, m, seed) for m in metrics} for r in runs if series.get(r) is not None}
    loss = {name: (None if s is None else s.loss) for name, s in series.items()}
    return Outcome(layers=list(base.layers), loss=loss, effects=effects,
                   controls=control_summary(controls, base, metrics, seed, "random") if controls else {},
                   control_seeds=list(seeds), seed=seed, n_controls=len(controls),
                   control_loss=[s.loss for s in controls], control_per_layer=[list(s.mean) for s in controls])
