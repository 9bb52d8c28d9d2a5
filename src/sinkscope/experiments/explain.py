"""`sinkscope explain`: from a model to a tested account of how its attention sink forms. An orchestrator: it adds
no hooks, no capture code and no statistics of its own (those live in explain_observe.py, explain_ablate.py,
explain_stats.py and the modules they use); the thresholds live in one dataclass (explain_core.ExplainThresholds).

    run_explain(ctx, thresholds=ExplainThresholds(), seed=19) -> ExplainResult

Steps (docs/explain.md):
1. Where: one observation pass over every layer: sink layers (sink attention to token 0 > epsilon), birth layers
   (token 0's norm jumps through a block while the other tokens' does not; every run of consecutive blocks),
   what token 0 is (BOS or a word), secondary sinks (metrics, when available).
2. Who: at each birth layer, the share of the jump a + m written by the attention and by the MLP.
3. What: for an MLP birth, the z dims (adaptive k) and their W_down columns (and the super weight); for an
   attention birth, the heads that write it.
4. (A) causal: remove the W_down span from token 0's MLP output, per birth layer and jointly; the magnitude
   ablation; seeded random equal-rank controls with bootstrap CIs; later-layer sink attention (and the loss).
5. (B) geometric: token 0's MLP input along the gradient direction of each chosen z dim, against token 1, token 8,
   random later positions and token 0 of the same prompts shuffled (seeded): Cohen's d and a permutation p.
6. Verdict: claims with their numbers and thresholds, and a paragraph (explain_verdict.py).
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..checks import check_int, ffn_width
from ..errors import UsageError
from ..promptset import fit_to_model, tokenize
from ..runner import RunContext
from . import explain_stats as es
from . import explain_steps as steps
from .explain_ablate import n_passes, run_causal
from .explain_core import ExplainComparison, ExplainResult, ExplainThresholds
from ..hooks import site_available
from .explain_observe import XZ_BUDGET_BYTES, dense_mlp, observe, xz_bytes
from .explain_verdict import conclude

MIN_LAYERS = 3
FIXED_TOKENS = (0, 1, 8)
N_STEPS = 5


# -- the literature metrics (--metrics): Gu et al.'s Sink_1^eps, secondary sinks and the super weight ---------------

def run_metrics_numbers(ctx: RunContext, epsilon: float) -> dict:
    """The metrics explain reports, from `run_metrics` ({"unavailable": why} where the model cannot run it)."""
    from .metrics import run_metrics
    try:
        res = run_metrics(ctx, epsilon=epsilon)
    except UsageError as err:            # e.g. a site this model does not have: explain goes on without them
        return {"unavailable": str(err)}
    keep = ("gu_sink_rate_model", "gu_sink_rate", "super_weight", "secondary_sinks", "massive_first_layer",
            "massive_dims", "epsilon")
    return {k: getattr(res, k) for k in keep}


# -- progress: one labelled bar per step ----------------------------------------------------------------------------

@contextmanager
def step_bar(ctx: RunContext, label: str, n_passes: float, seconds: dict, key: str):
    """One bar for a whole step: every pass the step runs through `ctx.iterate` advances it."""
    n_batches = len(distributed.shard(ctx.batches()))
    show = ctx.progress and distributed.is_main()
    bar = tqdm(total=max(1, round(n_passes * n_batches)), desc=label, unit="batch", file=sys.stderr,
               disable=not show, leave=False, dynamic_ncols=True)

    def iterate(desc: str):
        bar.set_postfix_str(desc)
        for b in RunContext.iterate(ctx, desc):       # the passes' own bars are off (progress=False below)
            yield b
            bar.update(1)
    t0 = time.perf_counter()
    progress, ctx.progress, ctx.iterate = ctx.progress, False, iterate
    try:
        yield bar
    finally:
        del ctx.iterate
        ctx.progress = progress
        bar.close()
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0


def _positions(lengths: list[int], n_random: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    fixed = torch.tensor([[t if t < n else -1 for t in FIXED_TOKENS] for n in lengths], dtype=torch.long)
    rand = es.random_positions(lengths, n_random, seed, start=2, exclude=FIXED_TOKENS)
    return torch.cat([fixed, rand], 1), [f"tok{t}" for t in FIXED_TOKENS] + [f"rand{i + 1}" for i in range(n_random)]


def shuffled_context(ctx: RunContext, seed: int) -> tuple[RunContext, float]:
    """The same prompts with their tokens shuffled (seeded; leading special tokens stay first), and the fraction of
    prompts whose token 0 is unchanged."""
    p = ctx.prompts
    sh = tokenize(ctx.lm.tokenizer, p.texts, bos=p.bos, shuffle_seed=seed)
    sh = fit_to_model(sh, getattr(ctx.lm.config, "max_position_embeddings", None), truncate=True)
    same = sum(int(a[0]) == int(b[0]) for a, b in zip(p.ids, sh.ids)) / len(p.ids)
    return RunContext(ctx.lm, sh, batch_size=ctx.batch_size, progress=ctx.progress), same


def check_model(lm) -> None:
    if lm.n_layers < MIN_LAYERS:
        raise UsageError(f"explain needs a model with at least {MIN_LAYERS} layers (a birth layer, a block before "
                         f"and a block after it); {lm.name} has {lm.n_layers}")


def run_explain(ctx: RunContext, thresholds: ExplainThresholds | None = None, seed: int = 19,
                n_controls: int = 10, n_random: int = 2, metrics: bool = True,
                with_loss: bool = True) -> ExplainResult:
    t = (thresholds or ExplainThresholds()).check()
    lm = ctx.lm
    check_model(lm)
    check_int("--n-controls", n_controls, 1)
    L, N = lm.n_layers, len(ctx.prompts)
    lengths = ctx.prompts.lengths
    positions, labels = _positions(lengths, n_random, seed)
    seconds, passes, notes = {}, {}, []
    F = ffn_width(lm.config) or 4 * lm.config.hidden_size
    keep_xz = xz_bytes(N, L, len(labels), lm.config.hidden_size, F) <= XZ_BUDGET_BYTES

    # 1. Where (the one observation pass serves Where, Who, What and (B) at token 0 and the baseline tokens)
    with step_bar(ctx, f"explain 1/{N_STEPS} where: one pass, every layer", 1, seconds, "where"):
        obs = observe(ctx, positions, labels, xz_layers=range(L) if keep_xz else [], desc="observation pass")
    passes["where"] = 1.0
    token0 = steps.token0_info(lm, ctx.prompts)
    where = steps.where(obs, t, token0)
    births = where["birth_layers"]
    metric_numbers = None
    if metrics:
        with step_bar(ctx, f"explain 1/{N_STEPS} where: literature metrics", 1, seconds, "metrics"):
            metric_numbers = run_metrics_numbers(ctx, t.epsilon)
        passes["metrics"] = 1.0
        if "unavailable" in metric_numbers:
            notes.append(f"literature metrics: not available for this model ({metric_numbers['unavailable']})")
            metric_numbers = None
        else:
            where["secondary_sinks"] = metric_numbers.get("secondary_sinks")

    # 2. Who
    who = steps.who(obs, births, t)
    mlp_births = [w["layer"] for w in who if w["share_mlp"] >= 0.5]

    # 3. What
    dense_births = [l for l in mlp_births if dense_mlp(lm, l)]
    if dense_births and not keep_xz:
        frac = (max(dense_births) + 1) / L
        with step_bar(ctx, f"explain 3/{N_STEPS} what: MLP input and z at the birth layers", frac, seconds, "what"):
            extra = observe(ctx, positions, labels, xz_layers=dense_births, full=False, desc="x, z at birth layers")
        obs.x.update(extra.x)
        obs.z0.update(extra.z0)
        passes["what"] = frac
    sw = (metric_numbers or {}).get("super_weight")
    what = []
    for w in who:
        l = w["layer"]
        if l not in mlp_births:
            what.append(steps.what_attention(obs, l, t))
        elif l not in obs.z0:
            what.append({"layer": l, "kind": "unsupported", "dims": [],
                         "why": site_available(lm, l, "mlp.hook_post") or "a mixture of experts (explain does not "
                                                                          "analyse experts)"})
        else:
            what.append(steps.what_mlp(lm, l, obs.z0[l], obs.x[l], labels, t, sw))
    dims = {w["layer"]: w["dims"] for w in what if w["kind"] == "mlp" and w["dims"]}

    # 5. (B), before (A): it needs one partial pass over the shuffled prompts
    geo = {"skipped": None, "layers": []}
    if not dims:
        geo["skipped"] = ("no MLP-written birth layer" if not mlp_births else
                          "the MLP birth layer(s) have no dense MLP (a mixture of experts is not supported yet)"
                          if not dense_births else "no z dims") if births else "no birth layer"
    else:
        sobs, same = None, None
        if lm.tokenizer is not None:
            sctx, same = shuffled_context(ctx, seed)
            frac = (max(dims) + 1) / L
            with step_bar(sctx, f"explain 5/{N_STEPS} (B) geometric: shuffled prompts", frac, seconds, "B_geometric"):
                sobs = observe(sctx, torch.zeros(N, 1, dtype=torch.long), ["tok0"], xz_layers=sorted(dims),
                               full=False, desc="x at token 0, shuffled prompts")
            passes["B_geometric"] = frac
        else:
            notes.append("(B): no tokenizer, so no shuffled prompts; the shuffled group is left out")
        t0 = time.perf_counter()
        for l, d in sorted(dims.items()):
            geo["layers"].append(steps.geometric(lm, l, d, obs.x[l], labels, None if sobs is None else sobs.x[l][:, 0],
                                                 same, t, seed))
        seconds["B_geometric"] = seconds.get("B_geometric", 0.0) + time.perf_counter() - t0

    # 4. (A)
    causal = {"skipped": None}
    later = list(range(max(births) + 1, L)) if births else []
    if not dims:
        causal["skipped"] = geo["skipped"]
    elif not later:
        causal["skipped"] = f"the last birth layer ({max(births)}) is the model's last layer: no later layer"
    elif not any(l in where["sink_layers"] for l in later):
        causal["skipped"] = (f"no sink layer after the birth layer(s): the sink attention to token 0 stays <= "
                             f"{t.epsilon} at layers {later[0]}–{later[-1]}, so there is no sink to remove")
    else:
        n = n_passes(len(dims), n_controls, with_loss)
        with step_bar(ctx, f"explain 4/{N_STEPS} (A) causal: {n} passes", n, seconds, "A_causal"):
            causal = {"skipped": None, **run_causal(ctx, dims, later, obs.sink[:, later], n_controls, seed,
                                                    with_loss=with_loss)}
        passes["A_causal"] = float(n)

    res = ExplainResult(
        model=lm.name, model_type=lm.adapter.model_type, n_layers=L, n_prompts=N, seed=seed, thresholds=t,
        token0=token0, sink_layers=where["sink_layers"], birth_layers=births,
        steps={"where": where, "who": who, "what": what, "A_causal": causal, "B_geometric": geo,
               "metrics": metric_numbers},
        passes=passes, seconds=seconds, notes=list(dict.fromkeys(list(ctx.notes) + notes)))
    if metric_numbers is None and not any(n.startswith("literature metrics") for n in res.notes):
        res.notes.append("literature metrics: not run (metrics=False)")
    if not keep_xz:
        res.notes.append("x and z were too large to keep for every layer: a second, partial pass read them at the "
                         "birth layers")
    return conclude(res)


def compare(results: list[ExplainResult]) -> ExplainComparison:
    """Several models' results side by side (one report with a column per model)."""
    return ExplainComparison(results=list(results))
