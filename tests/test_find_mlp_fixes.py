"""Issue 9 section 1: find-mlp-subspace's W_down_topk_act_norm and residual-section dims (MODES.md section 3)."""

from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from sinkscope import stats
from sinkscope.arch import mlp_input_norm
from sinkscope.experiments.find_mlp_subspace import _z_table, run_find_mlp_subspace, top_mean_square_dims
from sinkscope.experiments.mlp_residual import TOP_CONTRIB, row_energy_shares
from sinkscope.promptset import tokenize
from sinkscope.runner import RunContext
from sinkscope.testing import tiny_model

TEXTS = [f"prompt {i}: the sink forms where attention has nowhere else to go" for i in range(6)]


def test_W_down_topk_act_norm_uses_the_top_dims_by_mean_z_squared():
    # prompt 0 puts a large z on dims 0 and 3, prompt 1 a small one on dim 1 only: by mean *energy fraction* the
    # top-2 are {1, 0} (prompt 1's dim 1 is its whole energy), by mean z^2 they are {0, 3}
    Z = torch.tensor([[10.0, 0.0, 0.0, 3.0], [0.0, 1.0, 0.0, 0.0]])
    assert sorted(stats.top_energy_dims(Z, k=2, tau=0.0).candidates) == [0, 1]
    assert top_mean_square_dims(Z, 2) == [0, 3]
    W = torch.zeros(5, 4)
    for j in range(4):
        W[j, j] = j + 1.0  # column norms 1, 2, 3, 4
    table = _z_table({0: Z}, SimpleNamespace(W_down=W), [0], 0, [0, 1], 2, 0.55, 3)
    assert table.as_dict()["W_down_topk_act_norm k=2"] == [pytest.approx(2.5)]  # (1 + 4) / 2, not (1 + 2) / 2


def _picks(v: torch.Tensor, rows: dict) -> list[int]:
    """The section's rule on a stream v [N, D]: the 2 most frequent among each row's top-3 contributors."""
    counts, total = Counter(), torch.zeros(v.shape[-1], dtype=torch.float64)
    for w in rows.values():
        e = row_energy_shares(v, w)
        counts.update(int(i) for i in torch.sort(e, descending=True, stable=True).indices[:TOP_CONTRIB])
        total += e
    return sorted(counts, key=lambda d: (-counts[d], -float(total[d]), d))[:2]


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # RMSNorm (s / rms(s)) and LayerNorm ((s - mean) / std)
def test_residual_dims_come_from_the_normalised_stream_not_the_gain_scaled_input(family):
    lm = tiny_model(family)
    ctx = RunContext(lm, tokenize(lm.tokenizer, TEXTS), batch_size=6, progress=False)
    L, dims = 1, [0, 1]
    base = run_find_mlp_subspace(ctx, L, sections=["residual"], vec_idx=dims).residual
    assert base.ranked_on == ("s / rms(s)" if family == "llama" else "(s - mean(s)) / std(s)")
    # a non-uniform gain (as in trained models; random-init ones have gamma = 1, where x and s/rms(s) agree)
    norm = mlp_input_norm(lm.adapter, lm.layers[L], lm.config)
    big = [d for d in range(lm.config.hidden_size) if d not in base.picked_dims][:6]
    with torch.no_grad():
        norm.weight.fill_(1.0)
        norm.weight[big] = 40.0
    res = run_find_mlp_subspace(ctx, L, sections=["residual"], vec_idx=dims, tokens=(0, 1, 8))
    sec = res.residual
    assert sec.picked_dims == base.picked_dims  # the gain of the norm does not move the picked dims
    assert sec.norm_check_rel < 1e-5            # and the captured x is really norm(s) with that gain
    # the same rule on the gain-scaled MLP input x would pick the boosted dims: the test tells the two apart
    from sinkscope.capture import Capture
    batch = ctx.batches()[0]
    with Capture(lm, {f"blocks.{L}.hook_mlp_in": [0]}) as cap:
        x0 = cap.forward(batch)[f"blocks.{L}.hook_mlp_in"][:, 0]
    from sinkscope.experiments.mlp_common import mlp_math
    mm = mlp_math(lm, L)
    rows = {f"g{j}": mm.W_gate[j] for j in dims}
    if mm.gated:
        rows.update({f"u{j}": mm.W_up[j] for j in dims})
    naive = _picks(x0, rows)
    assert set(naive) & set(big) and naive != sec.picked_dims
