"""Pure numerical helpers of `explain` (no model code, no printing): turn captured numbers into the steps' numbers.

Every function takes tensors or arrays that the observation pass (explain_observe.py) or the ablation runs
(explain_ablate.py) produced and returns plain Python numbers and lists, ready for JSON. Conventions:

* "others" are the baseline tokens of a prompt: token 1, token 8 and the seeded random later positions. A ratio
  over "others" is the median over every (prompt, other token) pair that exists (NaN entries are skipped).
* Medians are used for ratios (a few short prompts or odd tokens must not decide a layer); means for norms, as
  the reference does.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .. import stats

__all__ = ["nanmedian", "nanmedian_dim", "layer_ratios", "find_runs", "BirthScan", "scan_births", "writer_shares",
           "adaptive_k", "group_comparison", "later_means", "relative_change"]


def nanmedian(x) -> float:
    """Median of the finite entries (NaN when there are none)."""
    a = np.asarray(torch.as_tensor(x, dtype=torch.float64).flatten().cpu())
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else float("nan")


def nanmedian_dim(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Median over `dim` of the finite entries, averaging the two middle values (numpy's median, not torch's
    lower median); NaN where a slice has none."""
    a = torch.as_tensor(x, dtype=torch.float64).cpu().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN slices -> NaN
        return torch.from_numpy(np.nanmedian(a, axis=dim))


def _nanmean(x) -> float:
    a = np.asarray(torch.as_tensor(x, dtype=torch.float64).flatten().cpu())
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def layer_ratios(norms: torch.Tensor) -> dict[str, list[float]]:
    """Per layer, from norms [N, L, 4, T] (parts r, a, m, y; token 0 first, then the other tokens):

    ratio0        median over prompts of ||y_0|| / ||r_0||           (token 0's jump through the block)
    ratio_others  median over (prompt, other token) of ||y_t|| / ||r_t||
    excess        ratio0 / ratio_others                                  (how much more token 0 jumps)
    norm0         mean over prompts of ||y_0||
    norm_others   median over (prompt, other token) of ||y_t||
    massive       median over prompts of ||y_0|| / (median over that prompt's other tokens of ||y_t||)
    resid0_ratio  the same as `massive` for the block input r (layer 0: the embedding)
    attn_ratio    the same as `massive` for the attention output a
    mlp_ratio     the same as `massive` for the MLP output m
    """
    r, y = norms[:, :, 0], norms[:, :, 3]
    ratio = y / r.clamp_min(stats.EPS)
    L = norms.shape[1]
    out = {k: [] for k in ("ratio0", "ratio_others", "excess", "norm0", "norm_others", "massive", "resid0_ratio",
                           "attn_ratio", "mlp_ratio")}
    for l in range(L):
        r0, ro = nanmedian(ratio[:, l, 0]), nanmedian(ratio[:, l, 1:])
        out["ratio0"].append(r0)
        out["ratio_others"].append(ro)
        out["excess"].append(r0 / ro if ro > 0 else float("nan"))
        out["norm0"].append(_nanmean(y[:, l, 0]))
        out["norm_others"].append(nanmedian(y[:, l, 1:]))
        for key, v in (("massive", y[:, l]), ("resid0_ratio", r[:, l]), ("attn_ratio", norms[:, l, 1]),
                       ("mlp_ratio", norms[:, l, 2])):
            others = nanmedian_dim(v[:, 1:], 1)  # per prompt (NaN when it has no other token)
            out[key].append(nanmedian(v[:, 0] / others.clamp_min(stats.EPS)))
    return out


def find_runs(values: list[float], strong: float, weak: float) -> list[list[int]]:
    """Runs of consecutive indices (hysteresis): every index with value >= strong seeds a run, which grows over
    its neighbours while their value is >= weak. Overlapping runs merge. NaN never qualifies."""
    ok_weak = [v is not None and math.isfinite(v) and v >= weak for v in values]
    runs: list[list[int]] = []
    seen: set[int] = set()
    for i, v in enumerate(values):
        if i in seen or not (v is not None and math.isfinite(v) and v >= strong):
            continue
        lo = hi = i
        while lo > 0 and ok_weak[lo - 1]:
            lo -= 1
        while hi < len(values) - 1 and ok_weak[hi + 1]:
            hi += 1
        run = list(range(lo, hi + 1))
        seen.update(run)
        runs.append(run)
    return runs


@dataclass
class BirthScan:
    runs: list[list[int]]          # each run of consecutive birth blocks
    birth_layers: list[int]        # all of them, ascending
    minor_jumps: list[int]         # excess >= weak but outside every run (below the strong threshold)
    drops: list[int]               # token 0's norm falls while the others' does not (excess <= 1 / weak)
    embedding_massive: bool        # token 0 is already massive in the block-0 input (the embedding)
    massive_layers: list[int]      # layers whose output has token 0 massive (massive >= massive_ratio)


def scan_births(ratios: dict, strong: float, weak: float, massive_ratio: float) -> BirthScan:
    """Birth layers from layer_ratios(): runs of consecutive blocks where token 0's norm jumps much more than
    the other tokens' (hysteresis on `excess`, see find_runs), kept only where token 0 is massive after the run
    (its output norm >= massive_ratio x the other tokens')."""
    excess, massive = ratios["excess"], ratios["massive"]
    runs = [run for run in find_runs(excess, strong, weak) if massive[run[-1]] >= massive_ratio]
    births = sorted(l for run in runs for l in run)
    minor = [l for l, e in enumerate(excess) if math.isfinite(e) and e >= weak and l not in births]
    drops = [l for l, e in enumerate(excess) if math.isfinite(e) and e > 0 and e <= 1.0 / weak]
    emb = bool(math.isfinite(ratios["resid0_ratio"][0]) and ratios["resid0_ratio"][0] >= massive_ratio)
    return BirthScan(runs=runs, birth_layers=births, minor_jumps=minor, drops=drops, embedding_massive=emb,
                     massive_layers=[l for l, v in enumerate(massive) if math.isfinite(v) and v >= massive_ratio])


def writer_shares(sq_a: torch.Tensor, sq_m: torch.Tensor, dot_am: torch.Tensor) -> dict[str, float]:
    """Who writes the jump y - r = a + m, per prompt: the share of ||a + m||^2 along a and along m,
    s_a = a.(a+m) / ||a+m||^2 and s_m = m.(a+m) / ||a+m||^2 (they sum to 1); medians over prompts."""
    sq_a, sq_m, dot_am = (torch.as_tensor(t, dtype=torch.float64) for t in (sq_a, sq_m, dot_am))
    tot = (sq_a + sq_m + 2 * dot_am).clamp_min(stats.EPS)
    return {"share_attn": nanmedian((sq_a + dot_am) / tot), "share_mlp": nanmedian((sq_m + dot_am) / tot)}


def adaptive_k(Z: torch.Tensor, mass: float, max_k: int) -> dict:
    """The smallest k whose top-k z dims hold a median energy mass >= `mass` at this token (stats.top_energy_dims,
    MODES.md section 0), trying k = 1 .. max_k. Never empty: if even max_k falls short, max_k is used and
    `reached` is False. Returns {k, dims, reached, masses (one per k tried), candidates (top max_k)}."""
    Z = Z[~torch.isnan(Z).any(-1)]
    masses = []
    for k in range(1, min(max_k, Z.shape[1]) + 1):
        te = stats.top_energy_dims(Z, k=k, tau=mass)
        masses.append(te.median_mass)
        if te.dims:
            return {"k": k, "dims": list(te.dims), "reached": True, "masses": masses,
                    "candidates": stats.top_energy_dims(Z, k=min(max_k, Z.shape[1]), tau=0.0).candidates}
    te = stats.top_energy_dims(Z, k=min(max_k, Z.shape[1]), tau=0.0)
    return {"k": len(te.candidates), "dims": list(te.candidates), "reached": False, "masses": masses,
            "candidates": te.candidates}


def group_comparison(p0, pg, n_perm: int, seed: int) -> dict:
    """Token 0's projections p0 against a baseline group's pg: means, sds, Cohen's d, a permutation p."""
    a = np.asarray(p0, dtype=np.float64)
    b = np.asarray(pg, dtype=np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    out = {"n0": int(a.size), "n": int(b.size), "mean0": float(a.mean()) if a.size else float("nan"),
           "sd0": float(a.std()) if a.size else float("nan"), "mean": float(b.mean()) if b.size else float("nan"),
           "sd": float(b.std()) if b.size else float("nan"), "d": float("nan"), "p": float("nan")}
    if a.size >= 1 and b.size >= 1 and a.size + b.size > 2:
        out["d"] = stats.cohens_d(a, b)
        out["p"] = stats.permutation_pvalue(a, b, n_perm=n_perm, seed=seed)
    return out


# -- (A): per-prompt effects and their bootstrap CIs ------------------------------------------------------------

def later_means(per_prompt: torch.Tensor) -> torch.Tensor:
    """[N, n_layers] head-mean sink attention per prompt -> [N] mean over the later layers (NaN: not measured)."""
    pp = torch.as_tensor(per_prompt, dtype=torch.float64)
    ok = ~torch.isnan(pp).any(-1)
    out = torch.full((pp.shape[0],), float("nan"), dtype=torch.float64)
    out[ok] = pp[ok].mean(-1)
    return out


def relative_change(value: float, baseline: float) -> float:
    """(value - baseline) / baseline; NaN when the baseline is 0 or missing."""
    if not (math.isfinite(value) and math.isfinite(baseline)) or baseline == 0:
        return float("nan")
    return (value - baseline) / baseline


def random_positions(lengths: list[int], n: int, seed: int, start: int = 2, exclude=(8,)) -> torch.Tensor:
    """[N, n] seeded random later positions per prompt, drawn without replacement from start..len-1 minus
    `exclude`; -1 where a prompt has fewer such positions. Prompt i's draw depends only on (seed, i, its length)."""
    out = torch.full((len(lengths), n), -1, dtype=torch.long)
    for i, S in enumerate(lengths):
        cand = [p for p in range(start, S) if p not in exclude]
        if not cand or n == 0:
            continue
        rng = np.random.default_rng([int(seed), i])
        pick = rng.choice(len(cand), size=min(n, len(cand)), replace=False)
        out[i, :len(pick)] = torch.tensor([cand[j] for j in pick], dtype=torch.long)
    return out
