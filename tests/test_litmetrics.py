"""The literature metrics (--metrics) and the super-weight ablation: every metric against a hand-computed value,
run_metrics against a brute-force eager computation, the planted super weight, the CLI and its bad input."""

import math

import numpy as np
import pytest
import torch

from sinkscope import api
from sinkscope.arch import get_module
from sinkscope.cli import main
from sinkscope.experiments import litmetrics as lit
from sinkscope.experiments.metrics import run_metrics
from sinkscope.interventions import zero_weight
from sinkscope.runner import RunContext
from sinkscope.testing import read_strict_json, save_tiny_model, tiny_model

PROMPTS = ["The cat sat. On the mat", "A b", "hello world, this is longer text\nwith a newline", "xyz q"]


# -- Gu et al. 2025 ----------------------------------------------------------------------------------------------

def test_gu_alpha_uses_every_query_that_sees_the_key():
    # one head, S = 4; prompt 0 has 4 tokens, prompt 1 has 3 (its query row 3 is padding and must not count)
    A = torch.tensor([[1.0, 9.0, 9.0, 9.0],          # entries above the diagonal (i < k) must not count
                      [0.6, 0.4, 9.0, 9.0],
                      [0.5, 0.2, 0.3, 9.0],
                      [0.4, 0.1, 0.2, 0.3]])
    A = torch.stack([A, A]).unsqueeze(1)             # [2, 1, 4, 4]
    alpha = lit.gu_alpha(A, torch.tensor([4, 3]))
    # prompt 0 (T = 4): k=1 (j=0): (1+.6+.5+.4)/4; k=2: (.4+.2+.1)/3; k=3: (.3+.2)/2; k=4: .3/1
    assert alpha[0, 0].tolist() == pytest.approx([2.5 / 4, 0.7 / 3, 0.5 / 2, 0.3])
    # prompt 1 (T = 3): k=1: (1+.6+.5)/3; k=2: (.4+.2)/2; k=3: .3/1; key 3 is padding -> NaN
    a1 = alpha[1, 0]
    assert a1[:3].tolist() == pytest.approx([2.1 / 3, 0.6 / 2, 0.3]) and math.isnan(a1[3])


def test_gu_sink_fraction_is_strictly_above_epsilon():
    a = torch.tensor([[0.31, 0.30, 0.20, 0.50]])
    assert lit.gu_sink_fraction(a, 0.3).tolist() == [0.5]                    # 0.30 is not > 0.3


# -- Sun et al. 2024 ---------------------------------------------------------------------------------------------

def test_median_abs_even_and_odd_counts_over_real_positions():
    h = torch.tensor([[[1.0, -2.0], [3.0, -10.0]]])
    assert lit.median_abs(h, torch.tensor([2])).tolist() == [2.5]            # |.| = 1 2 3 10 -> (2 + 3) / 2
    assert lit.median_abs(h, torch.tensor([1])).tolist() == [1.5]            # only position 0: 1 2
    # large enough for the bracketing path (> 4096 values): a shuffled 1..5005 (odd count), then 4004 values (even)
    perm = (torch.randperm(5005, generator=torch.Generator().manual_seed(0)) + 1).float().view(1, 5, 1001)
    assert lit.median_abs(perm, torch.tensor([5])).tolist() == [2503.0]     # the 2503rd of 1..5005
    assert lit.median_abs(-perm[:, :4], torch.tensor([4])).tolist() == [float(np.median(perm[0, :4].numpy()))]


@pytest.mark.parametrize("med,value,massive", [
    (0.0625, 100.0, False),    # 1000 x median = 62.5 passes, but |h| > 100 fails at exactly 100
    (0.0625, 100.5, True),
    (0.25, 250.0, True),       # |h| > 100 passes and |h| >= 1000 x median holds at exactly 1000 x median
    (0.25, 249.75, False),
])
def test_massive_rule_at_its_thresholds(med, value, massive):
    h = torch.full((1, 1, 101), med)
    h[0, 0, 7] = -value                                                      # the sign does not matter
    m = lit.median_abs(h, torch.tensor([1]))
    assert m.tolist() == [med]
    mask = lit.massive_mask(h, m, torch.tensor([1]))
    assert bool(mask[0, 0, 7]) is massive and int(mask.sum()) == int(massive)


def test_top_abs_positions_and_dims():
    h = torch.zeros(1, 3, 4)
    h[0, 0, 2], h[0, 2, 1], h[0, 0, 3], h[0, 1, 0] = -9.0, 8.0, 7.0, 50.0
    v, p, d = lit.top_abs(h, torch.tensor([3]))
    assert v.tolist() == [[50.0, 9.0, 8.0]] and p.tolist() == [[1, 0, 2]] and d.tolist() == [[0, 2, 1]]
    v, p, d = lit.top_abs(h, torch.tensor([1]))                              # position 1 and 2 are padding
    assert v.tolist() == [[9.0, 7.0, 0.0]] and p.tolist()[0][:2] == [0, 0] and d.tolist()[0][:2] == [2, 3]


# -- Yu et al. 2024 ----------------------------------------------------------------------------------------------

def test_spike_rule_and_super_weight_coordinates():
    assert lit.spike_layers([1.0, 2.0, 1.0, 300.0, 1.5]) == [3]             # median 1.5: 300 >= 150
    assert lit.spike_layers([1.0, 2.0, 1.0, 149.0, 1.5]) == []
    assert lit.spike_layers([None, 1.0, 100.0, 1.0]) == [2]                 # None (no dense MLP) left out
    x = torch.zeros(2, 3, 4)
    x[1, 2, 3] = -7.0
    assert lit.abs_max_where(x, torch.tensor([3, 3])) == (7.0, 1, 2, 3)
    assert lit.abs_max_where(x, torch.tensor([3, 2]))[0] == 0.0             # the max is on padding
    W = torch.arange(12.0).view(3, 4)
    assert lit.super_weight_coords(torch.tensor([0.1, -5.0, 2.0, 0.0]), 2, W) == {"row": 2, "col": 1, "value": 9.0}


# -- Guo et al. 2024 and secondary sinks ------------------------------------------------------------------------

def test_value_norms_and_dormant_heads():
    v = torch.tensor([[[3.0, 4.0], [0.0, 1.0], [0.0, 3.0], [9.0, 9.0]]]).unsqueeze(2)   # [1, S=4, H=1, 2]
    v0, rest = lit.value_norms(v, torch.tensor([3]))                         # position 3 is padding
    assert v0.tolist() == [[5.0]] and rest.tolist() == [[2.0]]
    assert not lit.dormant(torch.tensor([[0.9]]), v0, rest, 0.3)             # sinks, but ||v_0|| is large
    assert lit.dormant(torch.tensor([[0.9]]), torch.tensor([[1.0]]), rest, 0.3)
    assert not lit.dormant(torch.tensor([[0.3]]), torch.tensor([[1.0]]), rest, 0.3)   # alpha_1 must exceed eps


def test_secondary_candidates_need_enough_queries():
    a = torch.tensor([[0.9, 0.1, 0.2, 0.1, 0.5, 0.5, 0.1, 0.9]])
    flag = lit.secondary_candidates(a, torch.tensor([8]), 0.3, min_queries=4)
    assert flag.nonzero()[:, 1].tolist() == [4]    # t=0 is the first token; t=5 and t=7 have < 4 queries


# -- run_metrics against a brute-force eager computation ------------------------------------------------------

def _block_out(out):
    return out[0] if isinstance(out, tuple) else out


def test_run_metrics_matches_brute_force_eager():
    lm = tiny_model("llama", attn_implementation="eager")
    toks = api.tokenized(lm, api.prompts(PROMPTS, bos="always"))
    L, H, a = lm.n_layers, lm.config.num_attention_heads, lm.adapter
    alpha1, med = torch.zeros(L, H), torch.zeros(L)
    first, vnorms = [], []                           # per prompt and layer: alpha_1 [H] and ||v_t|| [T, H]
    zmax, omax = torch.zeros(L), torch.zeros(L)
    for ids in toks.ids:
        T = len(ids)
        seen = {}
        hooks = []
        for l in range(L):
            blk = lm.layers[l]
            hooks.append(blk.register_forward_hook(lambda m, i, o, l=l: seen.__setitem__(("h", l), _block_out(o))))
            hooks.append(get_module(blk, "self_attn.v_proj").register_forward_hook(
                lambda m, i, o, l=l: seen.__setitem__(("v", l), o)))
            hooks.append(get_module(blk, a.down).register_forward_hook(
                lambda m, i, o, l=l: seen.__setitem__(("zo", l), (i[0], o))))
        try:
            with torch.no_grad():
                out = lm.model(input_ids=ids[None], output_attentions=True)
        finally:
            for hk in hooks:
                hk.remove()
        for l in range(L):
            A = out.attentions[l][0]                                          # [H, T, T]
            al = torch.stack([A[:, j:, j].sum(-1) / (T - j) for j in range(T)], -1)   # Gu et al., by the book
            alpha1[l] += al[:, 0]
            v = seen[("v", l)][0].view(T, -1, 16).repeat_interleave(H // lm.config.num_key_value_heads, 1)
            first.append((l, al[:, 0]))
            vnorms.append(v.norm(dim=-1))                                     # [T, H]
            med[l] += float(np.median(seen[("h", l)][0].abs().numpy()))     # numpy's median: the mean of the middle two
            z, o = seen[("zo", l)]
            zmax[l] = max(zmax[l], z.abs().max())
            omax[l] = max(omax[l], o.abs().max())
    eps = float(torch.cat([x for _, x in first]).median())                # a threshold some heads pass
    rate, dorm = torch.zeros(L), torch.zeros(L)
    for (l, a1), vn in zip(first, vnorms):
        rate[l] += (a1 > eps).float().mean()
        dorm[l] += ((a1 > eps) & (vn[0] < vn[1:].mean(0))).float().mean()
    res = run_metrics(RunContext(lm, toks, batch_size=3, progress=False), epsilon=eps)
    N = len(toks)
    assert torch.tensor(res.gu_alpha) == pytest.approx(alpha1 / N, abs=1e-5)
    assert res.gu_sink_rate == pytest.approx((rate / N).tolist(), abs=1e-6)
    assert 0 < res.gu_sink_rate_model < 1 and res.gu_sink_rate_model == pytest.approx(float((rate / N).mean()))
    assert res.dormant_frac == pytest.approx((dorm / N).tolist(), abs=1e-6)
    assert res.massive_median == pytest.approx((med / N).tolist(), rel=1e-5)
    assert res.z_max == pytest.approx(zmax.tolist(), rel=1e-5) and res.out_max == pytest.approx(omax.tolist(), rel=1e-5)
    assert res.super_weight is None and res.massive == [] and res.p_sink is None


def test_metric_len_truncates_and_learned_sinks_and_hybrid_rows():
    lm = tiny_model("gpt_oss")
    res = run_metrics(RunContext(lm, api.tokenized(lm, api.prompts(PROMPTS, bos="always")), batch_size=2,
                                 progress=False), metric_len=4)
    assert res.metric_len == 4 and any("--metric-len 4" in n for n in res.notes)
    assert all(0 <= p <= 1 for row in res.p_sink for p in row) and len(res.p_sink) == lm.n_layers
    assert res.z_max == [None] * lm.n_layers and res.super_weight is None        # a mixture of experts: N/A
    assert all(s["position"] < 4 for s in res.secondary_sinks)
    hy = tiny_model("qwen3_next")
    r = run_metrics(RunContext(hy, api.tokenized(hy, api.prompts(PROMPTS[:2], bos="always")), progress=False))
    for l in range(hy.n_layers):
        assert (r.gu_sink_rate[l] is None) == (l not in hy.attention_layers)
        assert (r.dormant_frac[l] is None) == (l not in hy.attention_layers)


def test_rank_accumulators_merge_like_one_pass():
    """Data-parallel runs merge each rank's sums: two halves merged equal one pass over every prompt."""
    from sinkscope.experiments.metrics import _result, collect
    from sinkscope.promptset import Prompts
    lm = tiny_model("llama")
    toks = api.tokenized(lm, api.prompts(PROMPTS, bos="always"))
    half = lambda sl: Prompts(toks.texts[sl], toks.ids[sl], toks.bos, None)  # noqa: E731
    eps = 0.295                                       # alpha_1 of this model is ~0.29-0.30: some heads pass
    full, taps = collect(RunContext(lm, toks, batch_size=2, progress=False), eps)
    a, _ = collect(RunContext(lm, half(slice(0, 2)), batch_size=2, progress=False), eps)
    b, _ = collect(RunContext(lm, half(slice(2, 4)), batch_size=2, progress=False), eps)
    a.merge(b)
    args = (taps.summary(), eps, None, list(lm.attention_layers), False, [])
    r1, r2 = _result(lm, full, *args), _result(lm, a, *args)
    assert r2.n_prompts == 4 and torch.allclose(torch.tensor(r2.gu_alpha), torch.tensor(r1.gu_alpha))
    assert r2.gu_sink_rate == pytest.approx(r1.gu_sink_rate) and 0 < r1.gu_sink_rate_model < 1
    assert r2.dormant_frac == pytest.approx(r1.dormant_frac) and r2.massive_median == pytest.approx(r1.massive_median)
    assert r2.secondary_sinks == r1.secondary_sinks
    for t1, t2 in zip(r1.top3, r2.top3):
        assert [x["mean_abs"] for x in t2] == pytest.approx([x["mean_abs"] for x in t1])
        assert (t2[0]["position"], t2[0]["dim"], t2[0]["share"]) == (t1[0]["position"], t1[0]["dim"], t1[0]["share"])


# -- the super weight: planted, found, zeroed and restored -------------------------------------------------------

LAYER, ROW, COL, W_VALUE, Z_GAIN = 1, 5, 17, 1e4, 30.0


def _plant(family: str):
    """Block 1's MLP with z_17 x30 everywhere and W_down[5, 17] = 1e4: a down-projection spike at layer 1. GPT-2's
    Conv1D stores its weights as [in, out], so the same entries sit transposed there."""
    if family == "gpt2":
        lm = tiny_model("gpt2", n_layer=5)
        mlp = lm.layers[LAYER].mlp
        with torch.no_grad():
            mlp.c_fc.weight[:, COL] *= Z_GAIN
            mlp.c_fc.bias[COL] = 3.0
            mlp.c_proj.weight[COL, ROW] = W_VALUE
        return lm
    lm = tiny_model(family, num_hidden_layers=5)
    mlp = lm.layers[LAYER].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[COL] *= Z_GAIN
        mlp.up_proj.weight[COL] *= Z_GAIN
        mlp.down_proj.weight[ROW, COL] = W_VALUE
    return lm


@pytest.fixture(params=["llama", "gpt2"])
def planted(request):
    return _plant(request.param)


def test_planted_super_weight_is_found_and_its_ablation_restores_everything(planted, tmp_path):
    lm = planted
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    res = api.metrics(lm, PROMPTS, progress=False)
    sw = res.super_weight
    assert res.spike_layers[0] == LAYER
    assert (sw["layer"], sw["row"], sw["col"], sw["value"]) == (LAYER, ROW, COL, W_VALUE)
    ab = api.ablate_super_weight(lm, PROMPTS, progress=False, batch_size=2)
    assert ab.super_weight["col"] == COL and ab.layers == [2, 3, 4]
    assert ab.massive["ablated"]["out_max"] < ab.massive["baseline"]["out_max"] / 10
    assert ab.massive["ablated"]["h_tok0_row_mean"] < ab.massive["baseline"]["h_tok0_row_mean"]
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)             # bit-identical
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())
    paths = ab.save(tmp_path)
    data = _strict(tmp_path / "ablate_super_weight.json")
    assert data["super_weight"]["row"] == ROW and data["sink"]["n_prompts"] == 3   # "A b" has no query q >= 4
    assert data["loss"]["baseline"] is None or data["loss"]["baseline"] > 0      # the loss, once the build has it
    assert (tmp_path / "ablate_super_weight_sink.png").is_file() and len(paths) == 2
    assert "Yu et al. 2024" in ab.table() and f"W_down[row {ROW}, col {COL}]" in ab.table()


def test_zero_weight_restores_bit_identically_even_on_error():
    w = torch.nn.Parameter(torch.randn(4, 4))
    ref = w.detach().clone()
    with zero_weight(w, (2, 3)):
        assert w[2, 3] == 0 and torch.equal(w[0], ref[0])
    assert torch.equal(w, ref)
    with pytest.raises(RuntimeError):
        with zero_weight(w, (1, 1)):
            raise RuntimeError("boom")
    assert torch.equal(w, ref)


# -- the CLI -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny_model("llama", tmp_path_factory.mktemp("m") / "tiny"))


_strict = read_strict_json


def test_cli_metrics_writes_strict_json_with_the_interface_names(tiny_dir, tmp_path, capsys):
    rc = main(["--metrics", "--model", tiny_dir, "--max-prompts", "3", "--metric-len", "32", "--outdir",
               str(tmp_path), "--no-progress", "--no-plots"])
    assert rc == 0
    out = capsys.readouterr().out
    for paper in ("Gu et al. 2025", "Sun et al. 2024", "Yu et al. 2024", "Guo et al. 2024"):
        assert paper in out
    data = _strict(tmp_path / "metrics.json")
    for key in ("gu_alpha", "gu_sink_rate", "gu_sink_rate_model", "epsilon", "massive", "massive_median",
                "super_weight", "dormant_frac", "secondary_sinks", "massive_first_layer"):
        assert key in data, key
    assert data["epsilon"] == 0.3 and data["metric_len"] == 32
    assert len(data["gu_alpha"]) == 3 and len(data["gu_alpha"][0]) == 4 and len(data["gu_sink_rate"]) == 3


@pytest.mark.parametrize("argv,msg", [
    (["--metrics", "--epsilon", "0"], "--epsilon must be in (0, 1)"),
    (["--metrics", "--epsilon", "1"], "--epsilon must be in (0, 1)"),
    (["--metrics", "--metric-len", "1"], "--metric-len must be >= 2"),
    (["--ablate-super-weight"], "no down-projection output spikes"),
])
def test_cli_bad_input_one_line_exit_2(tiny_dir, tmp_path, capsys, argv, msg):
    rc = main(argv + ["--model", tiny_dir, "--max-prompts", "2", "--outdir", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and "Traceback" not in err
    assert len([x for x in err.splitlines() if x.startswith("sinkscope: error")]) == 1


# -- the real default model ----------------------------------------------------------------------------------------

def test_default_model_super_weight_at_layer_11(default_lm):
    from sinkscope.experiments.super_weight import find_super_weight
    ctx = RunContext(default_lm, api.tokenized(default_lm, api.prompts("prose56.txt", max_prompts=8)),
                     progress=False)
    sw = find_super_weight(ctx)["super_weight"]
    assert sw["layer"] == 11 and sw["col"] in {1229, 1487, 213}
    assert sw["z_max"] > 1000 and sw["out_max"] > 1e4


@pytest.mark.parametrize("n", [20_000, 20_001, 4 * lit._MEDIAN_SAMPLE + 1])
def test_median_abs_bracketed_path_equals_numpy(n):
    """Above 4 x _MEDIAN_SAMPLE values the median is found inside a sampled bracket: still numpy's exact median
    (mean of the two middle values for an even count), ties and a heavy tail included."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 4
    x[: n // 10] = 0.5                                                      # a block of ties near the middle
    x = x[torch.randperm(n, generator=g)]
    h = x.reshape(1, 1, n)
    assert n > 4 * lit._MEDIAN_SAMPLE
    assert lit.median_abs(h, torch.tensor([1])).item() == pytest.approx(float(np.median(np.abs(x.numpy()))),
                                                                         rel=1e-7)
