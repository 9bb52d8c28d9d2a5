"""The standard family test: a tiny random-init model of every family in the adapter table, written with
save_pretrained, then run through the CLI with `--model DIR` under the default flags (attention implementation,
dtype, device, batch size, ...). This is the path a new user takes, and the one that caught Gemma 2 (SDPA refused)
and multimodal Gemma 3 (wrong adapter row) crashing while the in-memory tests passed.

Each mode must exit 0 and write sane JSON (on a mixture of experts too: tests/test_moe.py goes further)."""

import math

import pytest

from sinkscope.arch import ADAPTERS
from sinkscope.cli import main
from sinkscope.model import load_model
from sinkscope.testing import ALL_FAMILIES, read_strict_json, run_cli, save_tiny_model

PROMPTS = ["Attention sinks form early in the stack of layers.",
           "The quick brown fox jumps over the lazy dog again.",
           "Zwölf Boxkämpfer jagen Viktor quer über den Deich.",
           "short one"]
L = 1


def test_every_family_is_covered():
    assert set(ALL_FAMILIES) == set(ADAPTERS)


@pytest.fixture(scope="module", params=ALL_FAMILIES)
def saved(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    folder = save_tiny_model(request.param, root / "model")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return request.param, str(folder), str(prompts), root


def _moe(family: str) -> bool:
    return ADAPTERS[family].mlp_kind == "moe"


def run(saved, args, capsys, outdir: str):
    family, folder, prompts, root = saved
    return run_cli(args, folder, prompts, root / outdir, capsys)


_json = read_strict_json


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_default_flags_pick_an_implementation_the_class_supports(saved):
    family, folder, _, _ = saved
    lm = load_model(folder, device="cpu")
    assert lm.adapter.model_type == family
    assert lm.attn_implementation == ("eager" if family in ("gemma2", "gpt_oss") else "sdpa")


def test_decompose_output(saved, capsys):
    rc, out, err, od = run(saved, ["--decompose-output", "--layer", str(L)], capsys, "dec")
    assert rc == 0, err
    d = _json(od / f"decompose_output_L{L}.json")
    assert d["max_abs_y_mismatch"] < 1e-4          # r + a + m == y, from the saved folder under default flags
    assert d["n_prompts"][0] == len(PROMPTS)
    for row in ("norm_Y", "norm_residual", "norm_attn", "norm_mlp", "spread_Y"):
        assert all(_finite(v) and v >= 0 for v in d["values"][row]), row
    assert "norm_Y" in out


def test_scan(saved, capsys):
    family, *_ = saved
    rc, out, err, od = run(saved, ["--scan", "--sink-idx", "0", "1"], capsys, "scan")
    assert rc == 0, err
    recs = _json(od / "scan.json")["records"]
    lm_attn = set(load_model(saved[1], device="cpu").attention_layers)
    a = ADAPTERS[family]
    for r in recs:
        assert _finite(r["mlp_out_log_norm"]) and _finite(r["resid_post_log_norm"])
        if r["layer"] in lm_attn:
            assert r["softmax_attention"] and 0 <= r["sink_attn"] <= 1 and _finite(r["k_norm"])
        else:  # hybrid: N/A, marked
            assert not r["softmax_attention"] and r["k_norm"] is None and r["sink_attn"] is None
        if a.has_learned_sinks and r["layer"] in lm_attn:
            assert 0 < r["p_sink"] < 1 and r["sink_attn"] + r["p_sink"] <= 1 + 1e-6
        else:
            assert r["p_sink"] is None
        if a.has_attn_gate and r["layer"] in lm_attn:
            assert 0 < r["attn_gate"] < 1
        else:
            assert r["attn_gate"] is None
    assert ("p_sink" in out) == a.has_learned_sinks
    if len(lm_attn) < len({r["layer"] for r in recs}):
        assert "no softmax attention" in out


MLP_MODES = {
    "find": (["--find-mlp-subspace", "--layer", str(L), "--vec-idx", "0", "1"], f"find_mlp_subspace_L{L}.json"),
    "ablate": (["--layer", str(L), "--ablate-mlp-out", "direction", "--vec-idx", "0", "1", "--n-controls", "2"],
               f"ablate_mlp_out_direction_L{L}.json"),
    "decompose_in": (["--layer", str(L), "--decompose-mlp-in", "--vec-idx", "0", "1", "--n-controls", "2"],
                     f"decompose_mlp_in_L{L}.json"),
}


@pytest.mark.parametrize("mode", list(MLP_MODES))
def test_mlp_modes(saved, mode, capsys):
    family, *_ = saved
    args, name = MLP_MODES[mode]
    rc, out, err, od = run(saved, args, capsys, mode)
    assert rc == 0, err
    d = _json(od / name)
    if mode == "find" and _moe(family):  # the MoE report (tests/test_moe.py checks its numbers)
        assert d["mlp_kind"] == "moe" and d["closure_rel"] < 1e-4 and d["chosen_dims"] == [0, 1]
    elif mode == "find":
        assert d["reconstruction mean_rel_l2"] < 1e-4  # z == act(g) * u (or act(g)) recomputed in fp32
        assert d["tables"] and _finite(d["te_median_mass"]) and d["chosen_dims"] == [0, 1]
        sec = d["residual"]  # the components (embedding, attn_i, mlp_i, attn_L) sum to s, and s -> norm -> x
        assert sec["max_sum_mismatch"] < 1e-4 and sec["norm_check_rel"] < 1e-4 and len(sec["picked_dims"]) == 2
    elif mode == "ablate":
        assert d["chosen_dims"] == [0, 1] and d["dims_source"] == "vec-idx"
        base = d["series"]["baseline"]
        assert _finite(base["mean_over_layers"]) and 0 <= base["mean_over_layers"] <= 1
        assert d["residual_frac"] < 1e-4        # the chosen span is really removed
        assert d["loss"]["baseline"] > 0 and len(d["controls"]["loss"]["values"]) == 2  # the loss on every family
    else:
        assert d["z_idx"] == [0, 1] and len(d["directions"]) == 2


@pytest.mark.parametrize("family, key", [("gpt_oss", "p_sink"), ("qwen3_next", "attn_gate")])
def test_scan_p_sink_and_gate_are_means_of_the_captured_sites(family, key):
    """p_sink: per prompt and head the mean over the sink's queries q >= max(4, t+1) of attn.hook_sink_prob, then
    over prompts, then across heads (as sink_attn); attn_gate: the mean of attn.hook_gate over d_head at token t."""
    import torch
    from sinkscope.capture import Capture
    from sinkscope.experiments.scan import run_scan
    from sinkscope.promptset import make_batches, tokenize
    from sinkscope.runner import RunContext, query_mask
    from sinkscope.testing import tiny_model
    lm = tiny_model(family)
    prompts = tokenize(lm.tokenizer, PROMPTS)
    sinks = [0, 5]
    recs = run_scan(RunContext(lm, prompts, batch_size=3, progress=False), sinks=sinks).records
    batch = make_batches(prompts, len(PROMPTS), pad_id=0, bucket=False)[0]
    site = "attn.hook_sink_prob" if key == "p_sink" else "attn.hook_gate"
    with Capture(lm, {site: None if key == "p_sink" else sinks}) as cap:
        c = cap.forward(batch)
    for r in recs:
        l, t = r["layer"], r["sink_idx"]
        if l not in lm.attention_layers:
            assert r[key] != r[key]  # NaN: N/A
            continue
        v = c[f"blocks.{l}.{site}"]
        if key == "p_sink":
            m = query_mask(batch.lengths, v.shape[-1], t).float()            # [B, S]
            ok = m.sum(-1) > 0
            per = (torch.nan_to_num(v) * m[:, None]).sum(-1)[ok] / m.sum(-1)[ok][:, None]  # [b, H]
        else:
            per = v[:, sinks.index(t)].mean(-1)                               # [B, H]
        head = per.double().mean(0)
        assert r[key] == pytest.approx(float(head.mean()), rel=1e-5)
        assert r[f"{key}_head_var"] == pytest.approx(float(head.var(unbiased=False)), rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("family", [f for f in ALL_FAMILIES if ADAPTERS[f].linear_mixer])
def test_hybrid_blocks_are_marked_in_decompose_output(family, tmp_path, capsys):
    folder = save_tiny_model(family, tmp_path / "m")
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    lm = load_model(str(folder), device="cpu")
    linear = next(l for l in range(lm.n_layers) if l not in lm.attention_layers)
    rc = main(["--decompose-output", "--layer", str(linear), "--model", str(folder), "--prompt-file", str(prompts),
               "--outdir", str(tmp_path / "o"), "--no-progress", "--no-plots"])
    out = capsys.readouterr().out
    assert rc == 0
    d = _json(tmp_path / "o" / f"decompose_output_L{linear}.json")
    assert any("no softmax attention" in n for n in d["notes"]) and "no softmax attention" in out
    assert d["max_abs_y_mismatch"] < 1e-4


def test_metrics(saved, capsys):
    """--metrics runs on every family under the default flags: the issue's interface names, Gu et al.'s rates in
    [0, 1] at the softmax-attention layers and N/A elsewhere, p_sink only with learned sinks, strict JSON."""
    family, folder, *_ = saved
    rc, out, err, od = run(saved, ["--metrics", "--metric-len", "16"], capsys, "metrics")
    assert rc == 0, err
    d = _json(od / "metrics.json")
    for key in ("gu_alpha", "gu_sink_rate", "gu_sink_rate_model", "epsilon", "massive", "massive_median",
                "super_weight", "dormant_frac", "secondary_sinks"):
        assert key in d, key
    lm = load_model(folder, device="cpu")
    attn, H = set(lm.attention_layers), lm.config.num_attention_heads
    assert len(d["gu_sink_rate"]) == lm.n_layers
    for layer, rate in enumerate(d["gu_sink_rate"]):
        if layer in attn:
            assert 0 <= rate <= 1 and len(d["gu_alpha"][layer]) == H
            assert all(0 <= a <= 1 for a in d["gu_alpha"][layer])
        else:
            assert rate is None and d["gu_alpha"][layer] is None
    assert 0 <= d["gu_sink_rate_model"] <= 1 and d["epsilon"] == 0.3
    assert (d["p_sink"] is not None) == ADAPTERS[family].has_learned_sinks
    assert "Gu et al." in out
