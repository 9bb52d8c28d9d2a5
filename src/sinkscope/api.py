"""The Python API: the same objects the CLI uses, one function per mode.

    import sinkscope as ss
    lm = ss.load("smollm2-135m", dtype="fp32", device="cpu")
    prompts = ss.prompts("prose56.txt")                 # or a list of strings
    res = ss.decompose_output(lm, prompts, layer=11)
    print(res.table())                                  # exactly what the CLI prints
    res.to_dict()["values"]["norm_mlp"]                 # the JSON content
    res.save("results")                                 # JSON (+ plots), with provenance

Every mode function takes the loaded model, the prompts (a PromptSet from `ss.prompts`, a file path, a list of
strings, or None for the default prose56.txt) and the mode's keyword arguments, checks them before any model
work, and returns the mode's result dataclass. Shared keyword arguments: batch_size (int or "auto"), progress,
truncate (cut prompts longer than the model's positions instead of refusing them).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Sequence

from . import checks
from .model import DEFAULT_MODEL, LoadedModel, load_model
from .promptset import PromptSet, Prompts, fit_to_model, load_prompts
from .provenance import provenance
from .runner import RunContext

MLP_MODES = ("ablate_mlp_out", "decompose_mlp_in")  # modes whose z dims may index a MoE's flat z
_ARGV: ContextVar[list | None] = ContextVar("sinkscope_argv", default=None)


@contextmanager
def invoked_as(argv: list[str]):
    """Record the command line in the provenance of results made inside (the CLI uses this)."""
    token = _ARGV.set(list(argv))
    try:
        yield
    finally:
        _ARGV.reset(token)


def load(model: str = DEFAULT_MODEL, dtype: str = "auto", device: str = "auto",
         attn_impl: str = "auto", max_memory: dict | None = None, offload_folder: str | None = None) -> LoadedModel:
    """Load a model: the built-in name, a hub id, a local folder or a .gguf file (see README). max_memory and
    offload_folder: spread a large model over GPUs, CPU memory and disk (docs/scale.md)."""
    return load_model(model, dtype=dtype, device=device, attn_implementation=attn_impl, max_memory=max_memory,
                      offload_folder=offload_folder)


def prompts(file_or_list=None, bos: str = "auto", shuffle_seed: int | None = None,
            max_prompts: int | None = None) -> PromptSet:
    """Prompts from a file (path or built-in name; default prose56.txt) or a list of strings."""
    return load_prompts(file_or_list, bos=bos, shuffle_seed=shuffle_seed, max_prompts=max_prompts)


def tokenized(lm: LoadedModel, prompts=None, truncate: bool = False) -> Prompts:
    """Token ids for `lm`, refused (or, with truncate, cut) where longer than the model's positions."""
    if isinstance(prompts, Prompts):
        p = prompts
    else:
        ps = prompts if isinstance(prompts, PromptSet) else load_prompts(prompts)
        p = ps.tokenize(lm.tokenizer)
    return fit_to_model(p, getattr(lm.config, "max_position_embeddings", None), truncate)


def _run(mode: str, fn, lm, prompts, params: dict, batch_size=16, progress: bool = True,
         truncate: bool = False):
    if isinstance(lm, str):
        lm = load(lm)
    checks.check_params(mode, params)
    checks.check_against_config(mode, params, lm.config)
    toks = tokenized(lm, prompts, truncate)
    ctx = RunContext(lm, toks, batch_size=batch_size, progress=progress)
    if mode in MLP_MODES and isinstance(params.get("layer"), int) and params.get("mode") != "magnitude":
        from .moe import flat_layout_note, is_moe_layer
        layer = params["layer"] % lm.n_layers
        if is_moe_layer(lm, layer):
            ctx.notes.append(flat_layout_note(lm, layer))
    result = fn(ctx, **params)
    result.meta = provenance(lm, toks, mode, {**params, "batch_size": ctx.batch_size, "truncate": truncate},
                             argv=_ARGV.get())
    return result


def scan(lm, prompts=None, *, sinks: Sequence[int] = (0,), interval: int = 1, heatmap_head: int | None = None,
         heatmap_size: int | None = None, **run):
    """`--scan`: per layer and sink key t, K/V norms, cos(Q, K), sink attention, MLP-out log-norm and spreads.
    heatmap_head: instead, head H's mean attention map per layer (`--print heatmap --head H`)."""
    from .experiments.scan import run_scan
    return _run("scan", run_scan, lm, prompts, dict(sinks=list(sinks), interval=interval,
                                                    heatmap_head=heatmap_head, heatmap_size=heatmap_size), **run)


def decompose_output(lm, prompts=None, *, layer: int, tokens: Sequence[int] = (0, 1, 8), **run):
    """`--decompose-output --layer L`: norm and spread of Y = r + a + m and its parts, per token."""
    from .experiments.decompose_output import run_decompose_output
    return _run("decompose_output", run_decompose_output, lm, prompts, dict(layer=layer, tokens=list(tokens)),
                **run)


def find_mlp_subspace(lm, prompts=None, *, layer: int, sections: Sequence[str] | None = None,
                      tokens: Sequence[int] = (0, 1, 8), sink_tok: int = 0, ref_tok: int = 8, te_k: int = 3,
                      te_mass: float = 0.55, vec_idx: Sequence[int] | None = None, **run):
    """`--find-mlp-subspace --layer L [--mlp z g u residual]`: which z dims write the sink token's MLP output."""
    from .experiments.find_mlp_subspace import run_find_mlp_subspace
    return _run("find_mlp_subspace", run_find_mlp_subspace, lm, prompts, dict(
        layer=layer, sections=None if sections is None else list(sections), tokens=list(tokens), sink_tok=sink_tok,
        ref_tok=ref_tok, te_k=te_k, te_mass=te_mass, vec_idx=None if vec_idx is None else list(vec_idx)), **run)


def ablate_mlp_out(lm, prompts=None, *, layer: int, mode: str = "direction", sink_tok: int = 0, ref_tok: int = 8,
                   vec_idx: Sequence[int] | None = None, te_k: int = 3, te_mass: float = 0.55, seed: int = 19,
                   n_controls: int = 10, **run):
    """`--layer L --ablate-mlp-out direction|magnitude`: later sink attention and next-token loss with the sink
    token's MLP output at L ablated, next to the baseline and n_controls seeded random controls (with CIs)."""
    from .experiments.ablate_mlp_out import run_ablate_mlp_out
    return _run("ablate_mlp_out", run_ablate_mlp_out, lm, prompts, dict(
        layer=layer, mode=mode, sink_tok=sink_tok, ref_tok=ref_tok,
        vec_idx=None if vec_idx is None else list(vec_idx), te_k=te_k, te_mass=te_mass, seed=seed,
        n_controls=n_controls), **run)


def decompose_mlp_in(lm, prompts=None, *, layer: int, sink_tok: int = 0, ref_tok: int = 8,
                     vec_idx: Sequence[int] | None = None, te_k: int = 3, te_mass: float = 0.55, seed: int = 19,
                     n_controls: int = 10, **run):
    """`--layer L --decompose-mlp-in`: the MLP-input directions that drive the top z dims (condition B), and the
    sink and next-token loss with their span removed (condition A from the input side), against n_controls
    seeded random controls."""
    from .experiments.decompose_mlp_in import run_decompose_mlp_in
    return _run("decompose_mlp_in", run_decompose_mlp_in, lm, prompts, dict(
        layer=layer, sink_tok=sink_tok, ref_tok=ref_tok, vec_idx=None if vec_idx is None else list(vec_idx),
        te_k=te_k, te_mass=te_mass, seed=seed, n_controls=n_controls), **run)


def ablate_router(lm, prompts=None, *, layer: int, route: str = "forbid", expert: int, token: int = 0, **run):
    """`--layer L --ablate-router forbid|force --expert E`: route token 0 away from expert E (or to it) at MoE block
    L and measure the sink attention (and the loss) at the later layers against the baseline."""
    from .experiments.ablate_router import run_ablate_router
    return _run("ablate_router", run_ablate_router, lm, prompts, dict(layer=layer, route=route, expert=expert,
                                                                      token=token), **run)


def metrics(lm, prompts=None, *, epsilon: float = 0.3, metric_len: int | None = None, **run):
    """`--metrics`: Gu, Sun, Yu and Guo et al.'s sink metrics (and secondary sinks) per layer and head, one pass.
    metric_len: cut every prompt to its first T tokens first (Gu et al. use 64)."""
    from .experiments.metrics import run_metrics
    return _run("metrics", run_metrics, lm, prompts, dict(epsilon=epsilon, metric_len=metric_len), **run)


def ablate_super_weight(lm, prompts=None, *, seed: int = 19, **run):
    """`--ablate-super-weight`: zero Yu et al.'s super weight (restored bit-identically afterwards) and measure the
    massive activation, the later sink attention and the loss; a UsageError on a model with no spike."""
    from .experiments.super_weight import run_ablate_super_weight
    return _run("ablate_super_weight", run_ablate_super_weight, lm, prompts, dict(seed=seed), **run)


def explain(lm, prompts=None, *, thresholds=None, seed: int = 19, n_controls: int = 10, n_random: int = 2,
            metrics: bool = True, **run):
    """`sinkscope explain`: where and how the model's sink forms, tested (docs/explain.md). thresholds: an
    ExplainThresholds or a dict overriding some of its fields. Returns an ExplainResult (.save writes
    OUTDIR/explain/report.{html,json,md})."""
    from .experiments.explain import run_explain
    from .experiments.explain_core import ExplainThresholds
    if isinstance(thresholds, dict):
        unknown = sorted(set(thresholds) - set(ExplainThresholds.names()))
        if unknown:
            raise checks.UsageError(f"unknown explain threshold(s): {', '.join(unknown)}; known: "
                                    f"{', '.join(ExplainThresholds.names())}")
        thresholds = ExplainThresholds(**thresholds)
    thresholds = (thresholds or ExplainThresholds()).check()
    return _run("explain", run_explain, lm, prompts, dict(thresholds=thresholds, seed=seed, n_controls=n_controls,
                                                          n_random=n_random, metrics=metrics), **run)


def explain_compare(results):
    """Several `explain` results side by side: .save(outdir) writes one report with a column per model."""
    from .experiments.explain import compare
    from .provenance import versions
    res = compare(results)
    res.meta = {"mode": "explain", "argv": _ARGV.get(), "models": [r.meta for r in res.results],
                "versions": versions()}
    return res


MODES = ("scan", "decompose_output", "find_mlp_subspace", "ablate_mlp_out", "decompose_mlp_in", "ablate_router")

__all__ = ["load", "prompts", "tokenized", "invoked_as", *MODES]
__all__ += ["explain", "explain_compare", "metrics", "ablate_super_weight"]
