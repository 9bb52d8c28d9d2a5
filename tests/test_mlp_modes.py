"""The three MLP modes (--find-mlp-subspace, --ablate-mlp-out, --decompose-mlp-in) on tiny random models of every
family: they run and render, the empty top-energy path is explained, --vec-idx selects the columns, the random
control is seeded and orthogonal, the gradient's closed form equals autograd, and the edits do what they say."""

import json

import pytest
import torch

from sinkscope import report, stats
from sinkscope.arch import ADAPTERS
from sinkscope.capture import Capture
from sinkscope.errors import UsageError
from sinkscope.experiments.ablate_mlp_out import run_ablate_mlp_out
from sinkscope.experiments.decompose_mlp_in import run_decompose_mlp_in
from sinkscope.experiments.find_mlp_subspace import run_find_mlp_subspace
from sinkscope.experiments.mlp_common import mlp_math
from sinkscope.experiments.sinkattn import run_sink_pass
from sinkscope.interventions import project_out_token, scale_token
from sinkscope.promptset import tokenize
from sinkscope.report.mlp_plots import zoom_limit
from sinkscope.runner import RunContext
from sinkscope.testing import FAMILIES, tiny_model

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Attention sinks form early in the network.",
         "Zebras, yaks and a short line.", "Hi there"]  # the last has 8 bytes: too short for token 8
PLOT_FAMILIES = {"llama", "gpt2"}  # plots depend on the result only; a gated and a plain
# (Conv1D) family cover every branch of the renderers
GATED = [f for f in FAMILIES if ADAPTERS[f].gated]
L = 1


def make_ctx(family: str, texts=TEXTS, batch_size: int = 3, **kw) -> RunContext:
    lm = tiny_model(family, **kw)
    return RunContext(lm, tokenize(lm.tokenizer, texts), batch_size=batch_size, progress=False)


@pytest.fixture(scope="module", params=FAMILIES)
def ctx(request):
    return make_ctx(request.param)


def load_json(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_all_modes_run_and_render(ctx, tmp_path):
    lm = ctx.lm
    fam = lm.adapter.model_type
    plots = fam in PLOT_FAMILIES
    D = lm.config.hidden_size

    find = run_find_mlp_subspace(ctx, L, te_mass=0.0)
    assert find.chosen_dims == find.te_dims and len(find.chosen_dims) == 3
    assert find.sanity_mean_rel_l2 < 1e-5        # z recomputed in fp32 from the captured factors
    assert find.z[0].shape == (len(TEXTS), mlp_math(lm, L).F)
    assert torch.isnan(find.z[8][3]).all() and not torch.isnan(find.z[8][:3]).any()  # short prompt: counted
    assert find.n_prompts == [4, 4, 3]
    assert any("token 8: 1 of 4 prompts are too short" in n for n in find.notes)
    if find.gated:
        assert [t.title.split("]")[0] for t in find.tables] == ["[MLP subspace: Z/W_d", "[MLP subspace: G/A",
                                                               "[MLP subspace: U"]
    else:
        assert len(find.tables) == 1 and "need a gated MLP" in find.section_notes[0]
    assert find.residual.max_sum_mismatch < 1e-5 and find.residual.norm_check_rel < 1e-4
    text = report.render(find, tmp_path, plots=plots)
    assert "[Sanity check] reconstruction mean_rel_l2=" in text
    js = load_json(tmp_path / f"find_mlp_subspace_L{L}.json")
    assert js["chosen_dims"] == find.chosen_dims
    assert torch.tensor(js["W_down_columns"]).shape == (3, D)
    assert (tmp_path / f"find_mlp_subspace_L{L}_z.npz").exists()

    direction = run_ablate_mlp_out(ctx, L, "direction", vec_idx=[3, 5])
    magnitude = run_ablate_mlp_out(ctx, L, "magnitude")
    assert all(direction.series[c] is not None for c in direction.series)
    assert direction.residual_frac < 1e-5
    assert magnitude.series["layer_input_ablated"] is None and magnitude.series["random_control"] is None
    assert magnitude.n_measured == 3                 # the prompt without token 8 is left out of every column
    assert 0 < magnitude.alpha["max"] <= 1.0
    for res, name in ((direction, "direction"), (magnitude, "magnitude")):
        report.render(res, tmp_path, plots=plots)
        js = load_json(tmp_path / f"ablate_mlp_out_{name}_L{L}.json")
        assert js["columns"] == ["baseline", "mlp_out_ablated", "layer_input_ablated", "random_control"]
        assert len(js["table"]) == lm.n_layers - L - 1 + 1  # one row per later layer + the mean
    if plots:
        assert (tmp_path / f"ablate_mlp_out_ablate_direction_L{L}_token_0_vec3_5_L{L}.png").exists()

    dec = run_decompose_mlp_in(ctx, L, te_mass=0.0)
    assert dec.grad_method == ("closed form" if lm.adapter.gated else "autograd")
    assert len(dec.gram_eigs) == 3 and abs(sum(dec.gram_eigs) - 3) < 1e-4
    assert dec.x_residual_frac["-span(Q)"] < 1e-5
    assert [s.label for s in dec.stacks] == ["tok0 (base)", "tok0 (-span(Q))", "tok0 (-span(rand⊥))", "tok8 (base)"]
    text = report.render(dec, tmp_path, plots=plots)
    assert "eff_rank(participation)" in text
    assert load_json(tmp_path / f"decompose_mlp_in_L{L}.json")["z_idx"] == dec.chosen_dims
    if plots:
        for name in ("MLP_Z_topk_energy_stacks_L1", "mlp_in_eig_L1_tok0", "mlp_in_eig_proj_L1_tok0",
                     "mlp_in_ablate_Qproj_zstack_L1_tok0", "mlp_in_ablate_Qproj_attnL1_tok0"):
            assert (tmp_path / f"{name}.png").stat().st_size > 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_empty_top_energy_is_explained(family, tmp_path):
    """Random tiny models have no dominant z dims: every mode says so and what to do, and does not crash."""
    ctx = make_ctx(family)
    find = run_find_mlp_subspace(ctx, L)
    assert find.chosen_dims == [] and find.te_median_mass < 0.55
    for res in (find, run_ablate_mlp_out(ctx, L, "direction"), run_decompose_mlp_in(ctx, L)):
        assert "--te-mass" in res.empty_message and "--vec-idx" in res.empty_message
        text = report.render(res, tmp_path, plots=False)
        assert "no top-energy z dims" in text
    ab = run_ablate_mlp_out(ctx, L, "direction")
    assert ab.series["baseline"] is not None and ab.series["mlp_out_ablated"] is None
    assert "N/A" in report.render(ab, tmp_path, plots=False)


@pytest.mark.parametrize("family", GATED)
def test_closed_form_gradient_matches_autograd(family):
    lm = tiny_model(family)
    mm = mlp_math(lm, L)
    x = torch.randn(7, lm.config.hidden_size, generator=torch.Generator().manual_seed(3)) * 3
    for j in (0, 5, mm.F - 1):
        cf, ag = mm.grad_closed_form(x, j), mm.grad_autograd(x, j)
        torch.testing.assert_close(cf, ag, rtol=1e-4, atol=1e-6)
        assert cf.abs().max() > 0


def test_plain_mlp_gradient_uses_autograd_and_is_right():
    mm = mlp_math(tiny_model("gpt2"), L)
    x = torch.randn(4, mm.W_gate.shape[1], generator=torch.Generator().manual_seed(4))
    g, _ = mm.pre(x)
    j = 7
    expected = (2 * mm.activate(g)[:, j] * mm.act_prime(g)[:, j]).unsqueeze(1) * mm.W_gate[j]
    torch.testing.assert_close(mm.grad(x, j), expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError):
        mm.grad_closed_form(x, j)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_project_out_removes_span_at_token_only(family):
    ctx = make_ctx(family)
    lm = ctx.lm
    Q = stats.orthonormal_basis(torch.randn(lm.config.hidden_size, 3, generator=torch.Generator().manual_seed(5)))
    site = {f"blocks.{L}.hook_mlp_in": [0, 1, 2]}
    batch = ctx.batches()[0]
    with Capture(lm, site) as cap:
        clean = cap.forward(batch)[f"blocks.{L}.hook_mlp_in"].clone()
    with project_out_token(lm, L, "hook_mlp_in", 0, Q):
        with Capture(lm, site) as cap:
            edited = cap.forward(batch)[f"blocks.{L}.hook_mlp_in"]
    assert (edited[:, 0] @ Q).abs().max() < 1e-5 * clean[:, 0].norm(dim=-1).max()
    torch.testing.assert_close(edited[:, 0], clean[:, 0] - (clean[:, 0] @ Q) @ Q.T, rtol=1e-5, atol=1e-5)
    assert torch.equal(edited[:, 1:], clean[:, 1:])


def test_magnitude_scaling_matches_definition():
    ctx = make_ctx("llama", texts=TEXTS[:3], batch_size=8)
    lm = ctx.lm
    site = {f"blocks.{L}.hook_mlp_out": [0, 8]}
    batch = ctx.batches()[0]

    def alpha(full):
        return (full[:, 8].norm(dim=-1) / full[:, 0].norm(dim=-1)).clamp(max=1.0)
    with Capture(lm, site) as cap:
        clean = cap.forward(batch)[f"blocks.{L}.hook_mlp_out"].clone()
    with scale_token(lm, L, "hook_mlp_out", 0, alpha):
        with Capture(lm, site) as cap:
            edited = cap.forward(batch)[f"blocks.{L}.hook_mlp_out"]
    n0, n8 = clean[:, 0].norm(dim=-1), clean[:, 1].norm(dim=-1)
    torch.testing.assert_close(edited[:, 0].norm(dim=-1), torch.minimum(n0, n8), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.unit(edited[:, 0]), stats.unit(clean[:, 0]), rtol=1e-5, atol=1e-6)


def test_vec_idx_selects_columns_and_is_checked():
    ctx = make_ctx("qwen3")
    W = mlp_math(ctx.lm, L).W_down
    find = run_find_mlp_subspace(ctx, L, vec_idx=[9, 2], sections=["z"])
    assert find.chosen_dims == [9, 2] and find.dims_source == "vec-idx"
    assert torch.equal(find.W_down_columns, W[:, [9, 2]])
    ab = run_ablate_mlp_out(ctx, L, "direction", vec_idx=[9, 2])
    assert ab.chosen_dims == [9, 2]
    cols = W[:, [9, 2]]
    assert ab.Q.shape[1] == 2 and (cols - ab.Q @ (ab.Q.T @ cols)).norm() < 1e-5 * cols.norm()
    with pytest.raises(UsageError, match="out of range"):
        run_ablate_mlp_out(ctx, L, "direction", vec_idx=[W.shape[1]])


def test_random_control_is_seeded_and_orthogonal():
    ctx = make_ctx("llama")
    a = run_ablate_mlp_out(ctx, L, "direction", vec_idx=[1, 2, 3], seed=7)
    b = run_ablate_mlp_out(ctx, L, "direction", vec_idx=[1, 2, 3], seed=7)
    c = run_ablate_mlp_out(ctx, L, "direction", vec_idx=[1, 2, 3], seed=8)
    assert torch.equal(a.R, b.R) and not torch.allclose(a.R, c.R)
    assert a.R.shape == a.Q.shape == (ctx.lm.config.hidden_size, 3)
    assert (a.Q.T @ a.R).abs().max() < 1e-5
    torch.testing.assert_close(a.R.T @ a.R, torch.eye(3), atol=1e-5, rtol=0)
    d = run_decompose_mlp_in(ctx, L, vec_idx=[1, 2, 3], seed=7)
    assert (d.Q.T @ d.R).abs().max() < 1e-5


def test_layer_input_trick_equals_separate_passes():
    """The one-pass layer_input_ablated series equals one pass per later layer with a plain hook."""
    ctx = make_ctx("llama", num_hidden_layers=4)
    lm = ctx.lm
    res = run_ablate_mlp_out(ctx, 0, "direction", vec_idx=[4, 6, 8])
    for i, l in enumerate(res.layers):
        single = run_sink_pass(ctx, [l], 0, edit=lambda s, l=l: project_out_token(lm, l, "hook_resid_pre", 0, res.Q))
        assert abs(single.mean[0] - res.series["layer_input_ablated"].mean[i]) < 1e-5
    assert res.series["layer_input_ablated"].mean != res.series["baseline"].mean


def test_bad_input_is_a_usage_error():
    ctx = make_ctx("gpt2")
    last = ctx.lm.n_layers - 1
    with pytest.raises(UsageError, match="last layer"):
        run_ablate_mlp_out(ctx, last, "magnitude")
    with pytest.raises(UsageError, match="beyond every prompt"):
        run_decompose_mlp_in(ctx, L, ref_tok=500)
    with pytest.raises(UsageError, match="out of range"):
        run_find_mlp_subspace(ctx, 99)
    with pytest.raises(UsageError, match="--te-k"):
        run_find_mlp_subspace(ctx, L, te_k=0)


def test_zoom_panel_ignores_the_largest_row():
    assert zoom_limit([3007.0, 6.1, 6.0]) == pytest.approx(1.15 * 6.1)
    assert zoom_limit([6.0, 3007.0, 6.1]) == pytest.approx(1.15 * 6.1)  # not the first row (the reference's slip)
    assert zoom_limit([3007.0, 9.0, 3006.9, 6.0]) == pytest.approx(1.15 * 9.0)
    assert zoom_limit([5.0]) == pytest.approx(5.75)
