"""Mixtures of experts (issue 9 section 2): for every MoE family a tiny random-init model written with
save_pretrained and run through the CLI under the default flags; routing, per-expert z and the (expert, dim)
decomposition checked against the model's own modules (its router output, its experts' weights and activation,
its MoE block output), the routing ablations against hand-computed routing, and every intervention undone."""

import pytest
import torch

import sinkscope as ss
from sinkscope import api
from sinkscope.arch import family_table, get_module
from sinkscope.capture import Capture
from sinkscope.cli import main
from sinkscope.model import load_model
from sinkscope.moe import MoEMath, is_moe_layer, moe_layers, steer_router
from sinkscope.promptset import make_batches, tokenize
from sinkscope.testing import MOE_CONFIGS, read_strict_json, run_cli, save_tiny_model

PROMPTS = ["Attention sinks form early in the stack of layers.",
           "The quick brown fox jumps over the lazy dog again.",
           "Zwölf Boxkämpfer jagen Viktor quer über den Deich.",
           "short one"]
L = 1          # an MoE block in every tiny config (block 0 is dense in qwen2_moe and deepseek_v3)
CLOSURE = 1e-4


@pytest.fixture(scope="module", params=list(MOE_CONFIGS))
def fam(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    folder = save_tiny_model(request.param, root / "model")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    lm = load_model(str(folder), device="cpu")
    batch = make_batches(tokenize(lm.tokenizer, PROMPTS), batch_size=len(PROMPTS), bucket=False)[0]
    return request.param, str(folder), str(prompts), root, lm, batch


def _cli(fam, args, capsys, outdir):
    _, folder, prompts, root, _, _ = fam
    return run_cli(args, folder, prompts, root / outdir, capsys)


_json = read_strict_json


def _router_io(lm, batch, layer):
    """The router's own input rows and (scores, indices) in one forward of the model."""
    seen = {}
    router = get_module(lm.layers[layer], lm.adapter.moe.router)
    h = router.register_forward_hook(lambda m, a, o: seen.update(x=a[0].reshape(-1, a[0].shape[-1]), w=o[1],
                                                                  idx=o[2]))
    try:
        with torch.no_grad():
            lm.body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    finally:
        h.remove()
    return seen


def _hooks(model) -> dict:
    """Every module's hook ids (transformers installs output-capturing hooks of its own, for hidden states)."""
    return {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in model.named_modules()}


def _no_hooks(model) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_router_choice_is_the_models_own(fam):
    *_, lm, batch = fam
    assert moe_layers(lm)
    for layer in moe_layers(lm):
        io = _router_io(lm, batch, layer)
        w, idx = MoEMath(lm, layer).route(io["x"])
        mine, theirs = torch.sort(idx, -1), torch.sort(io["idx"], -1)
        assert torch.equal(mine.values, theirs.values.long()), layer
        torch.testing.assert_close(w.gather(1, mine.indices), io["w"].float().gather(1, theirs.indices),
                                   rtol=1e-5, atol=1e-6)


def test_moe_output_and_r_a_m_close_on_the_models_hidden_states(fam):
    *_, lm, batch = fam
    sites = {f"blocks.{L}.{s}": None for s in ("hook_resid_pre", "hook_attn_out", "hook_mlp_in", "hook_mlp_out")}
    with Capture(lm, sites) as cap:
        c = cap.forward(batch)
    with torch.no_grad():
        hs = lm.body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                     output_hidden_states=True).hidden_states[L + 1]
    n = int(batch.lengths.min())
    r, a, m, x = (c[f"blocks.{L}.{s}"][:, :n] for s in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out",
                                                           "hook_mlp_in"))
    torch.testing.assert_close(r + a + m, hs[:, :n].float(), rtol=1e-5, atol=1e-5)
    rec = MoEMath(lm, L).output(x.reshape(-1, x.shape[-1])).view_as(m)   # W_down z + biases, from x alone
    assert float(((rec - m).norm(dim=-1) / m.norm(dim=-1)).max()) < CLOSURE


def _expert_z(lm, x: torch.Tensor, expert) -> torch.Tensor:
    """z of one expert from the model's own parameters and activation (not moe.py's): [N, F]."""
    mlp = get_module(lm.layers[L], lm.adapter.moe.block)
    if expert == "shared":
        s = get_module(lm.layers[L], lm.adapter.moe.shared)
        z = s.act_fn(s.gate_proj(x)) * s.up_proj(x)
        gate = getattr(mlp, "shared_expert_gate", None)
        return z * (torch.sigmoid(gate(x)) if gate is not None else 1.0)
    ex = mlp.experts
    if lm.adapter.moe.layout == "gpt_oss":  # gpt-oss: [D, 2F] interleaved, biases, its clamped SwiGLU
        return ex._apply_gate(x @ ex.gate_up_proj[expert] + ex.gate_up_proj_bias[expert])
    g, u = torch.nn.functional.linear(x, ex.gate_up_proj[expert]).chunk(2, dim=-1)
    return ex.act_fn(g) * u


def test_find_mlp_subspace_decomposition_closes_and_names_the_super_weight(fam, capsys):
    family, *_, lm, batch = fam
    rc, out, err, od = _cli(fam, ["--find-mlp-subspace", "--layer", str(L)], capsys, "find")
    assert rc == 0, err
    d = _json(od / f"find_mlp_subspace_L{L}.json")
    assert d["closure_rel"] <= CLOSURE and d["closure_channel_rel"] <= CLOSURE
    assert "[closure]" in out and "[super weight]" in out and "[router] tok0" in out
    # the router's choice for token 0, per prompt, is the model's own router output
    io = _router_io(lm, batch, L)
    S = batch.input_ids.shape[1]
    rows = torch.arange(len(PROMPTS)) * S
    theirs = torch.sort(io["idx"][rows], -1)
    mine = torch.tensor([[e for e, _ in p] for p in d["routing_sink_per_prompt"]])
    assert torch.equal(mine, theirs.values.long())
    w_tok0 = io["w"][rows].float().gather(1, theirs.indices)
    torch.testing.assert_close(torch.tensor([[w for _, w in p] for p in d["routing_sink_per_prompt"]]), w_tok0)
    counts = {e: int((mine == e).any(-1).sum()) for e in range(mine.max() + 1)}
    assert {r["expert"]: r["n_prompts"] for r in d["routing"]["tok0"]} == {e: n for e, n in counts.items() if n}
    # the top pair's mean contribution, by hand: w_e * W^e_down[c, j] * z^e_j with the model's own weights
    top, sw, c = d["top_pairs"][0], d["super_weight"], d["channel"]
    assert (sw["layer"], sw["expert"], sw["row"], sw["col"]) == (L, top["expert"], c, top["dim"])
    with Capture(lm, {f"blocks.{L}.hook_mlp_in": [0]}) as cap:
        x0 = cap.forward(batch)[f"blocks.{L}.hook_mlp_in"][:, 0]
    e, j = top["expert"], top["dim"]
    moe_block = get_module(lm.layers[L], lm.adapter.moe.block)
    with torch.no_grad():
        zj = _expert_z(lm, x0, e)[:, j]
        if e == "shared":
            W = get_module(lm.layers[L], lm.adapter.moe.shared).down_proj.weight[c, j]
            w = torch.ones(len(PROMPTS))
        else:
            down = moe_block.experts.down_proj[e]
            W = down[j, c] if family == "gpt_oss" else down[c, j]
            w = torch.where(mine == e, w_tok0, torch.zeros_like(w_tok0)).sum(-1)
    assert sw["value"] == pytest.approx(float(W), rel=1e-6)
    assert top["contribution"] == pytest.approx(float((w * W * zj).mean()), rel=1e-4, abs=1e-9)


def test_every_mode_runs_under_the_default_flags(fam, capsys):
    family, *_ = fam
    rc, _, err, od = _cli(fam, ["--scan", "--decompose-output", "--layer", str(L)], capsys, "scan")
    assert rc == 0, err
    assert _json(od / f"decompose_output_L{L}.json")["max_abs_y_mismatch"] < 1e-4
    assert all(0 <= r["sink_attn"] <= 1 for r in _json(od / "scan.json")["records"])
    rc, _, err, od = _cli(fam, ["--find-mlp-subspace", "--layer", str(L)], capsys, "find2")
    find = _json(od / f"find_mlp_subspace_L{L}.json")
    flat = [p["flat"] for p in find["top_pairs"][:2]]
    for args in (["--ablate-mlp-out", "direction"], ["--decompose-mlp-in"]):
        rc, out, err, _ = _cli(fam, args + ["--layer", str(L)], capsys, "mode")
        assert rc == 0, (args, err)
    rc, _, err, od = _cli(fam, ["--ablate-mlp-out", "direction", "--layer", str(L), "--vec-idx", *map(str, flat)],
                          capsys, "abl")
    d = _json(od / f"ablate_mlp_out_direction_L{L}.json")
    assert rc == 0 and d["chosen_dims"] == flat and d["residual_frac"] < 1e-4   # the experts' columns removed
    assert any("flat z" in n for n in d["notes"])                                 # how flat dims map to experts
    assert d["series"]["random_control"] is not None
    rc, _, err, od = _cli(fam, ["--decompose-mlp-in", "--layer", str(L), "--vec-idx", *map(str, flat)], capsys, "din")
    assert rc == 0 and len(_json(od / f"decompose_mlp_in_L{L}.json")["directions"]) == 2
    chosen = find["routing"]["tok0"][0]["expert"]
    rc, out, err, od = _cli(fam, ["--ablate-router", "forbid", "--expert", str(chosen), "--layer", str(L)], capsys,
                            "rf")
    d = _json(od / f"ablate_router_forbid_e{chosen}_L{L}.json")
    assert rc == 0 and d["routed_before"] >= 1 and d["routed_after"] == 0 and "[loss]" in out
    assert set(d["series"]) == {"baseline", f"forbid e{chosen}"}
    other = next(e for e in range(find["n_experts"]) if e != chosen)
    rc, _, err, od = _cli(fam, ["--ablate-router", "force", "--expert", str(other), "--layer", str(L)], capsys, "rF")
    d = _json(od / f"ablate_router_force_e{other}_L{L}.json")
    assert rc == 0 and d["routed_after"] == d["n_prompts"] == len(PROMPTS)


def test_interventions_leave_weights_bit_identical_and_no_hook(fam):
    *_, lm, _ = fam
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    hooks = _hooks(lm.model)
    kw = dict(layer=L, batch_size=2, progress=False)
    ss.ablate_router(lm, PROMPTS, route="forbid", expert=0, **kw)   # the public API name
    api.ablate_router(lm, PROMPTS, route="force", expert=1, **kw)
    api.ablate_mlp_out(lm, PROMPTS, mode="direction", vec_idx=[0, 1], **kw)
    api.decompose_mlp_in(lm, PROMPTS, vec_idx=[0, 1], **kw)
    assert _hooks(lm.model) == hooks
    after = lm.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_forbid_reroutes_token0_only_as_the_softmax_rule_says():
    """Mixtral, by hand: softmax over the router logits, expert E masked out, top-2, renormalised; the MoE output
    at token 0 is the weighted sum of the two experts' outputs; every other token is untouched."""
    from sinkscope.testing import tiny_model
    lm = tiny_model("mixtral")
    batch = make_batches(tokenize(lm.tokenizer, PROMPTS), batch_size=len(PROMPTS), bucket=False)[0]
    site = f"blocks.{L}.hook_mlp_out"
    sites = {site: None, f"blocks.{L}.hook_mlp_in": [0]}
    with Capture(lm, sites) as cap:
        base = cap.forward(batch)
    x0 = base[f"blocks.{L}.hook_mlp_in"][:, 0]
    mlp = lm.layers[L].mlp
    with torch.no_grad():
        probs = torch.softmax(x0 @ mlp.gate.weight.T, -1)
        E = int(probs[0].argmax())                       # prompt 0's favourite expert at token 0
        masked = probs.clone()
        masked[:, E] = -1.0
        top = torch.topk(masked, 2, -1).indices
        w = probs.gather(1, top)
        w = w / w.sum(-1, keepdim=True)
        expect = torch.zeros_like(x0)
        for r in range(len(PROMPTS)):
            for k in range(2):
                e = int(top[r, k])
                g, u = torch.nn.functional.linear(x0[r], mlp.experts.gate_up_proj[e]).chunk(2, -1)
                expect[r] += w[r, k] * (mlp.experts.down_proj[e] @ (mlp.experts.act_fn(g) * u))
    with steer_router(lm, L, 0, forbid=E):
        with Capture(lm, {site: None}) as cap:
            got = cap.forward(batch)[site]
    assert _no_hooks(lm.model)
    torch.testing.assert_close(got[:, 0], expect, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[0, 0], base[site][0, 0])
    n = int(batch.lengths.min())
    assert torch.equal(got[:, 1:n], base[site][:, 1:n])


def test_bad_router_arguments_exit_2_with_one_line(tmp_path, capsys):
    folder = save_tiny_model("deepseek_v3", tmp_path / "m")
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    lm = load_model(str(folder), device="cpu")
    assert not is_moe_layer(lm, 0) and is_moe_layer(lm, 1)       # first_k_dense_replace = 1
    for args, why in ((["--expert", "8", "--layer", "1"], "--expert 8 is out of range"),
                      (["--expert", "-1", "--layer", "1"], "--expert must be >= 0"),
                      (["--layer", "1"], "needs --expert"),
                      (["--expert", "0", "--layer", "0"], "needs a mixture of experts at --layer 0"),
                      (["--expert", "0", "--layer", "2"], "is the last layer")):
        rc = main(["--ablate-router", "forbid", *args, "--model", str(folder), "--prompt-file", str(prompts),
                   "--outdir", str(tmp_path / "o"), "--no-progress", "--no-plots"])
        err = capsys.readouterr().err
        lines = [l for l in err.splitlines() if l.startswith("sinkscope: error:")]
        assert rc == 2 and len(lines) == 1 and why in lines[0], (args, err)
        assert "Traceback" not in err


def test_family_table_marks_every_moe_family():
    rows = {r.split(" | ")[0].strip("| "): r for r in family_table().splitlines()[2:]}
    for family in MOE_CONFIGS:
        assert rows[family].split(" | ")[1] == "MoE", family
    assert "MLA" in rows["deepseek_v3"] and "shared expert" in rows["qwen2_moe"]


def test_qwen3_next_moe_blocks_route_and_close_like_the_model():
    """Qwen3-Next's MoE variant (a dense family row with a MoESpec): router and MoE output as the model's."""
    from sinkscope.testing import tiny_model
    lm = tiny_model("qwen3_next-moe")
    batch = make_batches(tokenize(lm.tokenizer, PROMPTS), batch_size=len(PROMPTS), bucket=False)[0]
    assert moe_layers(lm) == list(range(lm.n_layers))
    io = _router_io(lm, batch, L)
    w, idx = MoEMath(lm, L).route(io["x"])
    assert torch.equal(torch.sort(idx, -1).values, torch.sort(io["idx"], -1).values.long())
    with Capture(lm, {f"blocks.{L}.hook_mlp_in": None, f"blocks.{L}.hook_mlp_out": None}) as cap:
        c = cap.forward(batch)
    n = int(batch.lengths.min())
    x, m = c[f"blocks.{L}.hook_mlp_in"][:, :n], c[f"blocks.{L}.hook_mlp_out"][:, :n]
    rec = MoEMath(lm, L).output(x.reshape(-1, x.shape[-1])).view_as(m)
    assert float(((rec - m).norm(dim=-1) / m.norm(dim=-1)).max()) < CLOSURE
