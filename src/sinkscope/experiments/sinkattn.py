"""Sink attention at key t over chosen layers, optionally under an intervention (MODES.md section 0, fix 8.3).

Definition, as in `--scan`: per prompt and head, the mean attention probability to key t over the queries
q >= max(4, t + 1); then the mean over prompts per head; reported as the mean across heads, with the
population variance across heads. Prompts with no such query are left out (and counted).

With `with_loss`, the same pass also measures the mean next-token loss (loss.py: streamed over the vocabulary,
the model runs to its last layer) over the same prompts: per prompt its NLL sum and token count, and `loss`, the
token-weighted mean over the measured prompts.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from types import SimpleNamespace
from typing import Callable

import torch

from .. import distributed, stats
from ..capture import Capture
from ..loss import LossTap, mean_loss
from ..promptset import Batch
from ..runner import QUERY_START, RunContext
from . import scan


def pattern_reducer(keys):
    """hook_pattern [B, H, S, T] -> [B, H, T]: the scan's own per-prompt, per-head mean over each key's queries
    (scan.py's reducer, reused so both modes share one definition)."""
    return scan._pattern_reducer([int(k) for k in keys])


@dataclass
class SinkSeries:
    layers: list[int]
    key: int
    mean: list[float]              # per layer: mean across heads of the prompt-mean attention to the key
    head_var: list[float]          # per layer: population variance across heads
    n_prompts: int                 # prompts measured
    per_prompt: torch.Tensor = field(repr=False)  # [N, n_layers] head-mean per prompt (NaN: not measured)
    extra: dict = field(default_factory=dict, repr=False)  # extra captures, prompt order, [N, ...]
    loss_sum: torch.Tensor | None = field(default=None, repr=False)    # [N] float64 NLL sum (NaN: not measured)
    loss_count: torch.Tensor | None = field(default=None, repr=False)  # [N] long predicted tokens (0: not measured)

    @property
    def loss(self) -> float | None:
        """Token-weighted mean next-token NLL over the measured prompts (None when the loss was not measured)."""
        return None if self.loss_sum is None else mean_loss(self.loss_sum, self.loss_count)

    def mean_over_layers(self) -> float:
        vals = [m for m in self.mean if m == m]  # layers without softmax attention (hybrid models) are NaN
        return float(sum(vals) / len(vals)) if vals else float("nan")


def doubled(batch: Batch) -> Batch:
    """The batch twice over: rows 0..B-1 and B..2B-1 are the same prompts (for the layer-input reset trick)."""
    cat = lambda t: torch.cat([t, t], dim=0)  # noqa: E731
    return Batch(cat(batch.index), cat(batch.input_ids), cat(batch.attention_mask), cat(batch.lengths))


def run_sink_pass(ctx: RunContext, layers, key: int, *, edit: Callable | None = None,
                  extra_sites: dict | None = None, eligible: torch.Tensor | None = None,
                  double: bool = False, desc: str = "sink attention", with_loss: bool = False) -> SinkSeries:
    """One pass over every prompt measuring the sink attention to `key` at `layers`.

    edit(state) -> context manager, opened once around the whole pass (outside the Capture, so captures see
    edited values); `state.batch` is the batch being run, for edits that need its lengths.
    extra_sites: {"blocks.L.site": tokens} also captured and returned in `extra` (prompt order).
    eligible: [N] bool, the prompts to measure (others are skipped).
    double: run each batch twice over in one forward and measure the second copy (see `doubled`); the edit
    sees the [2B, ...] tensors.
    with_loss: also measure the next-token loss (`loss_sum`, `loss_count`, `loss`); not with `double`.
    """
    if with_loss and double:
        raise ValueError("the loss of a doubled batch is not defined (its second copy is edited at every layer)")
    lm = ctx.lm
    layers = [int(l) for l in layers]
    N = len(ctx.prompts)
    H = lm.config.num_attention_heads
    acc = {l: stats.MeanVar((H,)) for l in layers}
    per_prompt = torch.full((N, len(layers)), float("nan"))
    extra: dict[str, torch.Tensor] = {}
    sites = {"attn.hook_pattern": [key], **(extra_sites or {})}
    state = SimpleNamespace(batch=None)
    measured = torch.zeros(N, dtype=torch.bool)
    loss_sum = torch.full((N,), float("nan"), dtype=torch.float64) if with_loss else None
    loss_count = torch.zeros(N, dtype=torch.long) if with_loss else None
    with (edit(state) if edit is not None else nullcontext()), (LossTap(lm) if with_loss else nullcontext()) as tap:
        with Capture(lm, sites, layers=layers, reduce={"attn.hook_pattern": pattern_reducer([key])},
                     stop_early=not with_loss) as cap:
            def step(batch: Batch) -> None:     # accumulates only after its forward succeeded (OOM retry)
                run_batch = doubled(batch) if double else batch
                rows = slice(batch.size, 2 * batch.size) if double else slice(None)
                state.batch = run_batch
                c = cap.forward(run_batch)
                ok = batch.lengths > max(QUERY_START, key + 1)
                if eligible is not None:
                    ok = ok & eligible[batch.index]
                idx = batch.index[ok]
                measured[idx] = True
                if tap is not None:
                    ls, lc = tap.take()
                    loss_sum[idx], loss_count[idx] = ls[ok], lc[ok]
                for li, l in enumerate(layers):
                    if f"blocks.{l}.attn.hook_pattern" not in c:  # no softmax attention in block l: N/A
                        continue
                    p = c[f"blocks.{l}.attn.hook_pattern"][rows, :, 0].float().cpu()[ok]  # [b, H]
                    acc[l].update(p)
                    per_prompt[idx, li] = p.mean(-1)
                for name in extra_sites or {}:
                    v = c[name][rows].float().cpu()
                    if name not in extra:
                        extra[name] = torch.full((N,) + tuple(v.shape[1:]), float("nan"))
                    extra[name][batch.index] = v
            ctx.for_each(desc, step)
    acc = dict(zip(layers, distributed.merge_mean_vars([acc[l] for l in layers])))   # data-parallel: all ranks
    measured = distributed.merge_rows(measured.long(), ctx.owned).bool()
    means, vars_ = [], []
    for l in layers:
        if acc[l].n:
            m, v = stats.head_reduce(acc[l].mean().float())
        else:
            m, v = float("nan"), float("nan")
        means.append(m)
        vars_.append(v)
    return merged_across_ranks(ctx, SinkSeries(layers=layers, key=key, mean=means, head_var=vars_,
                                               n_prompts=int(measured.sum()), per_prompt=per_prompt, extra=extra,
                                               loss_sum=loss_sum, loss_count=loss_count))


def merged_across_ranks(ctx: RunContext, series: SinkSeries) -> SinkSeries:
    """Data-parallel runs: every per-prompt tensor [N, ...] of the series (its fields and `extra`) taken from the
    rank that owns the prompt (distributed.merge_prompt_arrays; the identity in a single process)."""
    N = len(ctx.prompts)
    arrays = {f.name: getattr(series, f.name) for f in fields(series)}
    arrays = {k: v for k, v in arrays.items() if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == N}
    arrays.update({"extra." + k: v for k, v in series.extra.items()})
    for k, v in distributed.merge_prompt_arrays(arrays, ctx.owned).items():
        if k.startswith("extra."):
            series.extra[k[len("extra."):]] = v
        else:
            setattr(series, k, v)
    return series


def later_layers(ctx: RunContext, layer: int) -> list[int]:
    """The layers measured after an intervention at `layer`: layer+1 .. last (a UsageError if there are none)."""
    from ..errors import UsageError
    n = ctx.lm.n_layers
    if layer >= n - 1:
        raise UsageError(f"--layer {layer} is the last layer: there is no later layer to measure the sink at "
                         f"(use --layer 0..{n - 2})")
    return list(range(layer + 1, n))


def series_rows(layers: list[int], series: dict) -> list[tuple[str, list, str]]:
    """Table rows (one per layer, then the mean over layers) of sink-attention series; None series -> N/A."""
    rows = [(f"L{l}", [None if s is None else s.mean[i] for s in series.values()], "float")
            for i, l in enumerate(layers)]
    rows.append((f"mean L{layers[0]}-{layers[-1]}",
                 [None if s is None else s.mean_over_layers() for s in series.values()], "float"))
    return rows
