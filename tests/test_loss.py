"""The next-token loss (loss.py), the bootstrap CI and the effects (stats.py, experiments/effects.py), and
--n-controls: the streamed loss equals the model's own on families with logit scaling and soft-capping, whatever
the vocabulary chunk; hand-computed CIs and effects; N seeded controls in --ablate-mlp-out and --decompose-mlp-in."""

import dataclasses
import json
import math

import pytest
import torch

from sinkscope import stats
from sinkscope.cli import main
from sinkscope.experiments import effects
from sinkscope.experiments.ablate_mlp_out import run_ablate_mlp_out
from sinkscope.experiments.decompose_mlp_in import run_decompose_mlp_in
from sinkscope.experiments.sinkattn import SinkSeries, run_sink_pass
from sinkscope.loss import batch_loss, mean_loss, token_nll
from sinkscope.promptset import Batch, tokenize
from sinkscope.runner import RunContext
from sinkscope.testing import ALL_FAMILIES, save_tiny_model, tiny_model

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Attention sinks form early.", "Hi", "Zebras, yaks, a line."]
# family -> config overrides that make its logit transform matter on a random-init model
LOSS_FAMILIES = {"llama": {}, "gemma2": dict(final_logit_softcapping=0.3), "cohere": dict(logit_scale=4.0),
                 "granite": dict(logits_scaling=0.25)}


def padded_batch(lm, texts=TEXTS) -> Batch:
    ids = [torch.tensor(lm.tokenizer(t)["input_ids"]) for t in texts]
    lens = torch.tensor([len(i) for i in ids])
    S = int(lens.max())
    inp = torch.full((len(ids), S), 258, dtype=torch.long)
    mask = torch.zeros((len(ids), S), dtype=torch.long)
    for r, i in enumerate(ids):
        inp[r, :len(i)], mask[r, :len(i)] = i, 1
    return Batch(torch.arange(len(ids)), inp, mask, lens)


def model_loss(lm, b: Batch) -> float:
    with torch.no_grad():
        return float(lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                              labels=b.input_ids.masked_fill(b.attention_mask == 0, -100)).loss)


@pytest.mark.parametrize("family", list(LOSS_FAMILIES))
def test_loss_equals_the_models_own(family):
    lm = tiny_model(family, **LOSS_FAMILIES[family])
    b = padded_batch(lm)
    s, c = batch_loss(lm, b, vocab_chunk=50)
    assert c.tolist() == [n - 1 for n in b.lengths.tolist()]          # every next token of every prompt, no pad
    ref = model_loss(lm, b)
    assert mean_loss(s, c) == pytest.approx(ref, rel=1e-5)
    if lm.adapter.logit_ops:                                            # the row's transform is what makes it equal
        plain = dataclasses.replace(lm, adapter=dataclasses.replace(lm.adapter, logit_ops=()))
        assert abs(mean_loss(*batch_loss(plain, b)) - ref) > 1e-3 * ref


def test_loss_equals_the_models_own_on_every_family():
    bad = {}
    for family in ALL_FAMILIES:
        lm = tiny_model(family)
        b = padded_batch(lm)
        got, ref = mean_loss(*batch_loss(lm, b, vocab_chunk=100)), model_loss(lm, b)
        if not abs(got - ref) <= 1e-5 * ref:
            bad[family] = (got, ref)
    assert not bad


def test_loss_does_not_depend_on_chunks_and_matches_full_logits():
    lm = tiny_model("llama")
    b = padded_batch(lm)
    s0, c0 = batch_loss(lm, b, vocab_chunk=lm.config.vocab_size)
    for chunk in (1, 7, 64, 10_000):
        s, c = batch_loss(lm, b, vocab_chunk=chunk)
        assert torch.equal(c, c0) and torch.allclose(s, s0, rtol=1e-6, atol=0)
    h = torch.randn(5, lm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 3, 259, 100, 7])
    full = torch.log_softmax(h @ lm.model.lm_head.weight.T, dim=-1)[torch.arange(5), y]
    assert torch.allclose(token_nll(lm, h, y, vocab_chunk=33, row_chunk=2), -full, rtol=1e-5)


def test_sink_pass_loss_per_prompt_in_prompt_order():
    lm = tiny_model("llama")
    ctx = RunContext(lm, tokenize(lm.tokenizer, TEXTS), batch_size=3, progress=False)
    s = run_sink_pass(ctx, [1, 2], 0, with_loss=True)
    plain = run_sink_pass(ctx, [1, 2], 0)
    assert plain.loss is None and plain.loss_sum is None
    assert torch.allclose(s.per_prompt, plain.per_prompt, equal_nan=True)   # the loss changes no sink number
    assert math.isnan(s.loss_sum[2]) and s.loss_count[2] == 0             # "Hi": too short to be measured
    for i in (0, 1, 3):
        one = padded_batch(lm, [TEXTS[i]])
        ls, lc = batch_loss(lm, one)
        assert s.loss_count[i] == lc[0] and float(s.loss_sum[i]) == pytest.approx(float(ls[0]), rel=1e-5)
    kept = [0, 1, 3]
    assert s.loss == pytest.approx(float(s.loss_sum[kept].sum() / s.loss_count[kept].sum()))
    with pytest.raises(ValueError):
        run_sink_pass(ctx, [1], 0, with_loss=True, double=True)


def test_bootstrap_ci_by_hand():
    # two values: resampled means are 0, 0.5, 1 with chances 1/4, 1/2, 1/4 -> the 2.5% / 97.5% quantiles are 0 / 1
    assert stats.bootstrap_ci([0.0, 1.0], seed=1) == [0.0, 1.0]
    assert stats.bootstrap_ci([0.0, 1.0], seed=1, level=0.4) == [0.5, 0.5]   # the middle 40% is all 0.5
    # weighted: (1, w 3) and (3, w 1): resampled weighted means 1, 1.5, 3
    assert stats.bootstrap_ci([1.0, 3.0, math.nan], seed=2, weights=[3, 1, 5]) == [1.0, 3.0]
    assert stats.bootstrap_ci([5.0, math.nan], seed=0) == [5.0, 5.0]
    assert all(math.isnan(x) for x in stats.bootstrap_ci([], seed=0))
    lo, hi = stats.bootstrap_ci([2.0] * 7, seed=0)
    assert lo == pytest.approx(2.0) and hi == pytest.approx(2.0)
    v = torch.linspace(0, 1, 41)
    a = stats.bootstrap_ci(v, seed=5)
    assert a == stats.bootstrap_ci(v, seed=5) and a != stats.bootstrap_ci(v, seed=6)
    assert a[0] < 0.5 < a[1] and a[1] - a[0] < 0.4     # sd of the mean = 0.30 / sqrt(41) ~ 0.047
    assert stats.mean_std([1, 2, 3, 4, math.nan]) == pytest.approx((2.5, math.sqrt(5 / 3)))
    assert stats.mean_std([7.0]) == (7.0, 0.0)


def _series(pp, loss_sum=None, count=None) -> SinkSeries:
    pp = torch.tensor(pp, dtype=torch.float64)
    return SinkSeries(layers=[1, 2], key=0, mean=[], head_var=[], n_prompts=0, per_prompt=pp,
                      loss_sum=None if loss_sum is None else torch.tensor(loss_sum, dtype=torch.float64),
                      loss_count=None if count is None else torch.tensor(count))


def test_effect_and_control_summary_by_hand():
    nan = math.nan
    base = _series([[0.1, 0.1], [0.3, 0.3], [0.5, 0.5]], [3.0, 1.0, 5.0], [3, 1, 2])
    var = _series([[0.2, 0.4], [0.6, 0.8], [nan, nan]], [6.0, 2.0, nan], [3, 1, 0])
    e = effects.effect(var, base, "sink", seed=0)                     # prompts 0 and 1: 0.3, 0.7 vs 0.1, 0.3
    assert (e["value"], e["baseline"], e["delta"], e["n_prompts"]) == pytest.approx((0.5, 0.2, 0.3, 2))
    assert e["rel_change"] == pytest.approx(1.5) and e["value_ci95"] == pytest.approx([0.3, 0.7])
    e = effects.effect(var, base, "loss", seed=0)                     # token-weighted: 8/4 vs 4/4
    assert (e["value"], e["baseline"], e["delta"]) == pytest.approx((2.0, 1.0, 1.0))
    c1 = _series([[0.1, 0.3], [0.3, 0.5], [0.5, 0.7]], [6.0, 1.0, 5.0], [3, 1, 2])
    c2 = _series([[0.1, 0.1], [0.3, 0.3], [0.5, 0.5]], [3.0, 1.0, 7.0], [3, 1, 2])
    out = effects.control_summary([c1, c2], base, None, seed=0, name="random")
    assert out["sink"]["values"] == pytest.approx([0.4, 0.3]) and out["sink"]["mean"] == pytest.approx(0.35)
    assert out["sink"]["std"] == pytest.approx(math.sqrt(0.005)) and out["sink"]["change_mean"] == pytest.approx(0.05)
    assert out["loss"]["values"] == pytest.approx([2.0, 11 / 6]) and out["loss"]["n"] == 2
    assert set(out["loss"]) >= {"values", "mean", "std", "ci95", "change_mean", "change_ci95"}
    assert effects.control_summary([], base) == {}


def test_n_controls_seeded_and_reported():
    lm = tiny_model("llama")
    ctx = RunContext(lm, tokenize(lm.tokenizer, TEXTS), batch_size=4, progress=False)
    a = run_ablate_mlp_out(ctx, 0, "direction", vec_idx=[3, 5], seed=7, n_controls=3)
    b = run_ablate_mlp_out(ctx, 0, "direction", vec_idx=[3, 5], seed=7, n_controls=3)
    c = run_ablate_mlp_out(ctx, 0, "direction", vec_idx=[3, 5], seed=8, n_controls=3)
    va = a.outcome.controls["loss"]["values"]
    assert len(va) == 3 and len(set(va)) == 3 and a.outcome.control_seeds[0] == 7
    assert va == b.outcome.controls["loss"]["values"] and a.outcome.control_seeds == b.outcome.control_seeds
    assert not set(va) & set(c.outcome.controls["loss"]["values"])
    assert a.series["random_control"] is a.controls[0]                 # the table's column is control 1 (--seed)
    assert a.outcome.effects["mlp_out_ablated"]["loss"]["value"] == pytest.approx(a.series["mlp_out_ablated"].loss)
    d = run_decompose_mlp_in(ctx, 0, vec_idx=[3, 5], n_controls=2)
    js = d.to_dict()
    assert len(js["controls"]["sink"]["values"]) == 2 and js["loss"]["baseline"] > 0
    assert "[loss] next-token loss" in d.table()


def test_cli_n_controls_json(tmp_path, capsys):
    model = save_tiny_model("llama", tmp_path / "m")
    out = tmp_path / "out"
    args = ["--model", str(model), "--layer", "0", "--ablate-mlp-out", "direction", "--vec-idx", "3", "5",
            "--max-prompts", "5", "--outdir", str(out), "--no-plots", "--no-progress"]
    assert main(args + ["--n-controls", "3"]) == 0
    js = json.loads((out / "ablate_mlp_out_direction_L0.json").read_text())
    assert all(isinstance(js["loss"][k], float) for k in ("baseline", "mlp_out_ablated", "random_control"))
    for metric in ("sink", "loss"):
        block = js["controls"][metric]
        assert len(block["values"]) == 3 and {"mean", "std", "ci95"} <= set(block)
    assert js["effects"]["mlp_out_ablated"]["loss"]["delta_ci95"][0] <= js["effects"]["mlp_out_ablated"]["loss"]["delta"]
    assert "random x3: std" in capsys.readouterr().out
    assert main(args + ["--n-controls", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--n-controls" in err[0]
