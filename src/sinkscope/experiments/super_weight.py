"""`--ablate-super-weight`: zero Yu et al.'s super weight and measure what changes downstream.

1. Find it: one pass of read-only hooks on every down projection (metrics.DownTaps): the first layer whose max
   |output| spikes (litmetrics.spike_layers) and, there, W_down[row = the spiking output channel, col = the
   largest |z| channel at the spike's position]. No spike: a one-line UsageError.
2. Zero that one entry (interventions.zero_weight: restored bit-identically on exit) and compare with the intact
   model, over the same prompts:
   * the massive activation at the super weight's layer: max |down-projection output|, and per prompt the max
     |h| of the block output and |h| at token 0 in the spiking channel (mean over prompts);
   * the sink attention to token 0 at every later softmax-attention layer (sinkattn's definition: queries
     q >= 4), per layer and averaged, with a bootstrap 95% CI over prompts of the change;
   * the mean next-token loss (when the build measures it; explain_ablate.sink_pass / loss_effect).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from .. import distributed, stats
from ..capture import Capture
from ..errors import UsageError
from ..hooks import locate
from ..interventions import zero_weight
from ..result import Result
from ..runner import RunContext
from . import explain_ablate as xa
from . import explain_stats as es
from . import litmetrics as lit
from .metrics import DownTaps, dense_down_layers


@dataclass
class SuperWeightResult(Result):
    model_type: str
    n_prompts: int
    super_weight: dict                 # {layer, row, col, value, z_max, out_max, ...}
    spike_layers: list[int]
    layers: list[int]                  # the later layers where the sink attention is measured
    massive: dict                      # {"baseline": {...}, "ablated": {...}} at the super weight's layer
    sink: dict                         # {"baseline": [per layer], "ablated": [...], means, change, change_ci95}
    loss: dict                         # {"baseline", "ablated"} (None: not measured in this build) + loss_change..
    seed: int
    notes: list[str] = field(default_factory=list)


def weight_index(module, row: int, col: int) -> tuple[int, int]:
    """Where W_down[row, col] (output channel row, input channel col) sits in the module's own weight."""
    return (col, row) if type(module).__name__ == "Conv1D" else (row, col)  # GPT-2's Conv1D stores [in, out]


def find_super_weight(ctx: RunContext) -> dict:
    """Yu et al.'s super weight by the spike rule (one pass of down-projection hooks); UsageError if none."""
    lm = ctx.lm
    dense = dense_down_layers(lm)
    if not dense:
        raise UsageError(f"--ablate-super-weight needs a dense MLP down projection; this {lm.adapter.model_type} "
                         f"model has none (mixture of experts)")
    taps = DownTaps(lm, dense)

    def step(batch):
        taps.batch = batch
        cap.forward(batch)
    with taps.attached(), Capture(lm, {}) as cap:
        ctx.for_each("super weight: find", step)
    taps.merge_ranks()
    found = taps.summary()
    if found["super_weight"] is None:
        vals = [v for v in found["out_max"] if v is not None]
        med = float(torch.tensor(vals, dtype=torch.float64).median())
        raise UsageError(f"--ablate-super-weight: no down-projection output spikes in this model (no layer's max "
                         f"|output| reaches {lit.YU_SPIKE_RATIO:g} x the median layer's {med:.3g}; largest "
                         f"{max(vals):.3g}), so it has no super weight by Yu et al.'s spike rule")
    return found


def _massive_pass(ctx: RunContext, layer: int, row: int, edit) -> dict:
    """At `layer`: max |down output| over the prompts, and per prompt max |h| and |h_0[row]| (means)."""
    lm = ctx.lm
    taps = DownTaps(lm, [layer])
    hmax, h0 = [], []

    def reduce(h, batch):
        valid = lit.valid_positions(batch.lengths.to(h.device), h.shape[1]).unsqueeze(-1)
        return h.abs().masked_fill(~valid, 0).amax(dim=(1, 2)).cpu(), h[:, 0, row].abs().cpu()

    def step(batch):
        taps.batch = batch
        m, r = cap.forward(batch)[f"blocks.{layer}.hook_resid_post"]
        hmax.append(m)
        h0.append(r)
    with ExitStack() as stack:
        if edit is not None:
            stack.enter_context(edit())
        stack.enter_context(taps.attached())
        cap = stack.enter_context(Capture(lm, {"hook_resid_post": None}, layers=[layer],
                                          reduce={"hook_resid_post": reduce}))
        ctx.for_each("super weight: massive", step)
    taps.merge_ranks()
    sums = distributed.all_sum(torch.tensor([float(torch.cat(hmax).double().sum()),
                                             float(torch.cat(h0).double().sum()), float(len(torch.cat(h0)))],
                                            dtype=torch.float64))
    return {"out_max": taps.out_max[layer][0], "h_max_mean": float(sums[0] / sums[2]),
            "h_tok0_row_mean": float(sums[1] / sums[2])}


def run_ablate_super_weight(ctx: RunContext, seed: int = 19) -> SuperWeightResult:
    lm = ctx.lm
    found = find_super_weight(ctx)
    sw = found["super_weight"]
    l, row, col = sw["layer"], sw["row"], sw["col"]
    later = [x for x in range(l + 1, lm.n_layers) if x in lm.attention_layers]
    if not later:
        raise UsageError(f"--ablate-super-weight: the super weight is in layer {l}, after which no layer has a softmax "
                         f"attention to measure the sink at")
    module, _, _ = locate(lm, l, "mlp.hook_post")
    index = weight_index(module, row, col)
    edit = lambda *_: zero_weight(module.weight, index)  # noqa: E731

    massive = {"baseline": _massive_pass(ctx, l, row, None), "ablated": _massive_pass(ctx, l, row, edit)}
    base, base_loss = xa.sink_pass(ctx, later, desc="super weight: baseline", with_loss=True)
    abl, abl_loss = xa.sink_pass(ctx, later, edit=edit, desc="super weight: ablated", with_loss=True)
    b, a = es.later_means(base.per_prompt), es.later_means(abl.per_prompt)
    ok = torch.isfinite(a) & torch.isfinite(b)
    bm, am = float(b[ok].mean()), float(a[ok].mean())
    sink = {"baseline": base.mean, "ablated": abl.mean, "baseline_head_var": base.head_var,
            "ablated_head_var": abl.head_var, "baseline_mean": bm, "ablated_mean": am, "change": am - bm,
            "rel_change": es.relative_change(am, bm), "change_ci95": stats.bootstrap_ci((a - b)[ok], seed=seed),
            "n_prompts": int(ok.sum())}
    loss = {"baseline": base_loss, "ablated": abl_loss, **xa.loss_effect(abl, base, seed)}
    notes = list(ctx.notes)
    if base_loss is None:
        notes.append("loss: not measured in this build (pending the next-token loss of run_sink_pass)")
    return SuperWeightResult(model_type=lm.adapter.model_type, n_prompts=len(ctx.prompts), super_weight=sw,
                             spike_layers=found["spike_layers"], layers=later, massive=massive, sink=sink, loss=loss,
                             seed=seed, notes=notes)
