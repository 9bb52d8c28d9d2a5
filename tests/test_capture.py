"""Capture invariants on tiny random-init models of every family in the adapter table (and the variants whose
config flags change the forward): r + a + m == y == the model's hidden state, softmax(q.k) == the model's own
eager attention (learned sinks included), MLP internals compose to z, and the forward under a Capture is
bit-identical to the forward without it."""

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from sinkscope.arch import (ADAPTERS, UnsupportedModelError, get_adapter, get_module, mlp_input_norm, resolve)
from sinkscope.capture import Capture
from sinkscope.hooks import SITES, SiteUnavailable, parse_site, site_available
from sinkscope.interventions import edit_site
from sinkscope.moe import MoEMath, is_moe_layer
from sinkscope.promptset import make_batches, tokenize
from sinkscope.testing import ALL_FAMILIES, VARIANTS, tiny_config, tiny_model

TEXTS = ["The quick brown fox jumps over the lazy dog.", "short", "Attention sinks form early in the stack, maybe."]
CASES = list(ALL_FAMILIES) + list(VARIANTS)


def all_sites(lm):
    """Every site this model has somewhere (attention sites land in its softmax-attention blocks)."""
    out = {}
    for s in SITES:
        why = [site_available(lm, l, s) for l in range(lm.n_layers)]
        if all(w is None or "softmax attention" in w for w in why) and any(w is None for w in why):
            out[s] = None
    return out


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


_EAGER: dict = {}


def eager_reference(lm, batch):
    """The model's own hidden states and eager attention probabilities, from an eager twin (same seed, same
    weights): switching a loaded model's implementation is not possible for every class (Falcon)."""
    if lm.name not in _EAGER:
        twin = tiny_model(lm.name, attn_implementation="eager")
        assert all(torch.equal(a, b) for a, b in zip(twin.model.parameters(), lm.model.parameters()))
        with torch.no_grad():
            _EAGER[lm.name] = twin.body(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                        output_attentions=True, output_hidden_states=True, use_cache=False)
    out = _EAGER[lm.name]
    assert len(out.attentions) == len(lm.attention_layers)
    out.by_layer = dict(zip(lm.attention_layers, out.attentions))  # hybrid models: softmax blocks only
    return out


@pytest.fixture(scope="module", params=CASES)
def fam(request):
    lm = tiny_model(request.param)
    lm.name = request.param
    batch = make_batches(tokenize(lm.tokenizer, TEXTS), batch_size=3)[0]
    with Capture(lm, all_sites(lm)) as cap:
        cache = cap.forward(batch)
    return lm, batch, cache


def test_every_family_in_the_table_has_a_tiny_model():
    assert set(ALL_FAMILIES) == set(ADAPTERS)
    assert {f for f, _ in VARIANTS.values()} <= set(ALL_FAMILIES)


def test_adapter_paths_resolve(fam):
    lm, _, _ = fam
    a = lm.adapter
    block = lm.layers[lm.attention_layers[0]]
    dense = a.mlp_kind != "moe" and resolve(block, a.down) is not None
    paths = [a.attn, a.o, a.attn_norm, a.attn_post_norm, a.mlp_post_norm, a.mlp_in, a.mlp_out, a.attn_gate,
             a.q, a.k, a.v, a.qkv]
    if dense:
        paths += [a.gate, a.up, a.down, a.act]
    if lm.name in ALL_FAMILIES:  # the tiny configs switch optional QK-norms on; some variants switch them off
        paths += list(a.qk_norm or ())
    for path in paths:
        if path is not None:
            assert isinstance(get_module(block, path), torch.nn.Module), path
    if a.mlp_norm is not None and not a.is_parallel(lm.config):
        assert resolve(block, a.mlp_norm) is not None, a.mlp_norm  # only a parallel block may share attn_norm
    if a.attn_norm is not None:
        assert mlp_input_norm(a, block, lm.config) is not None
    assert isinstance(get_module(lm.model, a.final_norm), torch.nn.Module)
    if a.attn_sinks:
        assert isinstance(getattr(get_module(block, a.attn), a.attn_sinks), torch.nn.Parameter)
    if a.linear_mixer:
        others = [l for l in range(lm.n_layers) if l not in lm.attention_layers]
        assert others and all(resolve(lm.layers[l], a.linear_mixer) is not None for l in others)


def test_residual_decomposition_r_plus_a_plus_m_is_y(fam):
    lm, batch, c = fam
    for l in range(lm.n_layers):
        r, a, m, y = (c[f"blocks.{l}.{s}"] for s in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out",
                                                      "hook_resid_post"))
        for i, n in enumerate(batch.lengths.tolist()):
            torch.testing.assert_close(r[i, :n] + a[i, :n] + m[i, :n], y[i, :n], rtol=1e-5, atol=1e-5)


def test_block_output_is_next_input_and_the_models_hidden_state(fam):
    lm, batch, c = fam
    ref = eager_reference(lm, batch)
    assert len(ref.hidden_states) == lm.n_layers + 1
    for l in range(lm.n_layers):
        y = c[f"blocks.{l}.hook_resid_post"]
        if l + 1 < lm.n_layers:
            torch.testing.assert_close(y, c[f"blocks.{l + 1}.hook_resid_pre"], rtol=0, atol=0, equal_nan=True)
            for i, n in enumerate(batch.lengths.tolist()):
                torch.testing.assert_close(y[i, :n], ref.hidden_states[l + 1][i, :n].float(), rtol=1e-4, atol=1e-5)
    # block 0's input is the embedding output the model reports
    for i, n in enumerate(batch.lengths.tolist()):
        torch.testing.assert_close(c["blocks.0.hook_resid_pre"][i, :n], ref.hidden_states[0][i, :n].float())


def test_softmax_of_captured_q_k_reproduces_the_models_attention(fam):
    lm, batch, c = fam
    ref = eager_reference(lm, batch)
    cfg = lm.config
    assert set(ref.by_layer) == {l for l in range(lm.n_layers) if f"blocks.{l}.attn.hook_q" in c}
    for l, A in ref.by_layer.items():
        q, k = c[f"blocks.{l}.attn.hook_q"], c[f"blocks.{l}.attn.hook_k"]  # [B, S, H, d], GQA-expanded
        assert q.shape == k.shape and q.shape[2] == cfg.num_attention_heads
        p = c[f"blocks.{l}.attn.hook_pattern"]
        for i, n in enumerate(batch.lengths.tolist()):
            torch.testing.assert_close(p[i, :, :n, :n], A[i, :, :n, :n].float(), rtol=1e-5, atol=1e-6)
        if getattr(cfg, "attn_logit_softcapping", None):  # soft-capped logits: checked through the pattern above
            continue
        # softmax(q k^T * scale + causal mask [, learned sink]) from the captured tensors alone
        i, n = 0, int(batch.lengths[0])
        scale = _scaling(lm, l, q.shape[-1])
        logits = torch.einsum("qhd,khd->hqk", q[i, :n], k[i, :n]) * scale
        allowed = torch.ones(n, n, dtype=torch.bool).tril()
        window = getattr(cfg, "sliding_window", None)
        if window and _is_sliding(lm, l):
            allowed &= ~torch.ones(n, n, dtype=torch.bool).tril(-window)
        logits = logits.masked_fill(~allowed, float("-inf"))
        sinks = _sinks(lm, l)
        if sinks is not None:
            with_sink = torch.cat([logits, sinks.view(-1, 1, 1).expand(-1, n, 1)], dim=-1)
            probs = torch.softmax(with_sink, dim=-1)[..., :-1]
            assert (probs.sum(-1) < 1 - 1e-3).all()  # the sink takes a real share of every row
        else:
            probs = torch.softmax(logits, dim=-1)
        torch.testing.assert_close(probs, A[i, :, :n, :n].float(), rtol=1e-5, atol=1e-6)


def _scaling(lm, layer, d):
    attn = get_module(lm.layers[layer], lm.adapter.attn)
    return 1.0 if lm.adapter.model_type == "opt" else getattr(attn, "scaling", d ** -0.5)


def _is_sliding(lm, layer):
    attn = get_module(lm.layers[layer], lm.adapter.attn)
    types = getattr(lm.config, "layer_types", None)
    if types is not None:
        return types[layer] == "sliding_attention"
    return getattr(attn, "sliding_window", None) is not None or lm.adapter.model_type in ("mistral", "starcoder2")


def _sinks(lm, layer):
    if not lm.adapter.attn_sinks:
        return None
    return getattr(get_module(lm.layers[layer], lm.adapter.attn), lm.adapter.attn_sinks).detach().float()


def test_mlp_internals_compose_to_z(fam):
    lm, batch, c = fam
    if is_moe_layer(lm, 1):  # a mixture of experts: z is computed from x (tests/test_moe.py checks the maths)
        mm = MoEMath(lm, 1)
        z = c["blocks.1.mlp.hook_post"][:, :int(batch.lengths.min())]
        live = torch.stack([z[..., mm.offsets[b]:mm.offsets[b + 1]].abs().amax(-1) > 0
                            for b in range(len(mm.experts))], -1)
        assert (live.sum(-1) == mm.top_k + mm.has_shared).all()   # the routed experts (and the shared one) only
        with pytest.raises(SiteUnavailable, match="read-only"):
            with edit_site(lm, 1, "mlp.hook_post", lambda t: t):
                pass
        return
    act = get_module(lm.layers[1], lm.adapter.act)
    g, z = c["blocks.1.mlp.hook_pre"], c["blocks.1.mlp.hook_post"]
    expect = act(g) * c["blocks.1.mlp.hook_pre_linear"] if lm.adapter.gated else act(g)
    n = int(batch.lengths.min())
    torch.testing.assert_close(expect[:, :n], z[:, :n], rtol=1e-5, atol=1e-6)


def test_token_selection_and_nan_for_missing_positions():
    lm = tiny_model("llama")
    batch = make_batches(tokenize(lm.tokenizer, TEXTS), batch_size=3, bucket=False)[0]
    with Capture(lm, {"hook_mlp_out": [0, 7], "hook_resid_post": None}, layers=[1]) as cap:
        c = cap.forward(batch)
    sel, full = c["blocks.1.hook_mlp_out"], c["blocks.1.hook_resid_post"]
    assert sel.shape[:2] == (3, 2)
    assert torch.isnan(sel[1, 1]).all()  # "short" has 5 tokens: position 7 does not exist
    assert not torch.isnan(sel[0]).any()
    assert full.shape[1] == batch.input_ids.shape[1]


def test_hooks_removed_and_attention_restored_even_on_exception():
    lm = tiny_model("qwen3")
    batch = make_batches(tokenize(lm.tokenizer, TEXTS), batch_size=3)[0]
    impl = lm.model.config._attn_implementation
    registry = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    with pytest.raises(RuntimeError, match="boom"):
        with Capture(lm, all_sites(lm)) as cap:
            cap.forward(batch)
            assert not no_hooks(lm.model)
            assert ALL_ATTENTION_FUNCTIONS._local_mapping != registry  # the sdpa entry is wrapped
            raise RuntimeError("boom")
    assert no_hooks(lm.model)
    assert lm.model.config._attn_implementation == impl
    assert ALL_ATTENTION_FUNCTIONS._local_mapping == registry


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("case", CASES)
def test_capture_leaves_every_forward_bit_identical(case, impl):
    """Under a Capture of every site (and of sink columns, which take the SDPA-kernel path), the model's logits are
    torch.equal to those without it; the weights, the config and the attention registry are unchanged after."""
    from transformers import AutoModelForCausalLM
    from sinkscope.testing import tiny_config, variant
    family, overrides = variant(case)
    cls = AutoModelForCausalLM._model_mapping[type(tiny_config(family))]
    if impl == "sdpa" and not cls._supports_sdpa:  # Gemma 2, gpt-oss: the class refuses SDPA at load time
        with pytest.raises(ValueError, match="does not support"):
            tiny_model(case, attn_implementation="sdpa")
        return
    lm = tiny_model(case, attn_implementation=impl)
    assert lm.attn_implementation == impl
    batch = make_batches(tokenize(lm.tokenizer, TEXTS), batch_size=3)[0]
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    registry = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    run = lambda: lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # noqa: E731
    patterns = None
    with torch.inference_mode():
        ref = run()
        for sites in (all_sites(lm), {"attn.hook_pattern": [0, 3], "attn.hook_q": [0], "hook_mlp_out": [0]}):
            with Capture(lm, sites) as cap:
                out = run()
                assert any(name.endswith("attn.hook_pattern") for name in cap.cache)  # attention was read
            assert torch.equal(out, ref), (case, impl, float((out - ref).abs().max()))
            patterns = patterns if "blocks.0.hook_mlp_in" not in cap.cache else {
                l: cap.cache[f"blocks.{l}.attn.hook_pattern"] for l in lm.attention_layers}
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    assert lm.attn_implementation == impl and ALL_ATTENTION_FUNCTIONS._local_mapping == registry
    assert no_hooks(lm.model) and not any("forward" in vars(m) for m in lm.model.modules())
    if impl == "eager":  # every attention path (function, GPT-2's method, Falcon's inline) read right, eager flavour
        with torch.inference_mode():
            att = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           output_attentions=True).attentions
        for l, A in zip(lm.attention_layers, att):
            for i, n in enumerate(batch.lengths.tolist()):
                torch.testing.assert_close(patterns[l][i, :, :n, :n], A[i, :, :n, :n].float(), rtol=1e-5, atol=1e-6)


def test_interventions_leave_weights_unchanged_and_no_hook_behind(fam):
    """An edit of every family's MLP output, with a Capture inside it: the edit is seen, then undone entirely."""
    from sinkscope.interventions import edit_site
    lm, batch, c = fam
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with edit_site(lm, 1, "hook_mlp_out", lambda t: t * 0):
        with Capture(lm, {"blocks.1.hook_mlp_out": None, "blocks.1.hook_resid_post": None}) as cap:
            got = cap.forward(batch)
    assert float(got["blocks.1.hook_mlp_out"].nan_to_num().abs().max()) == 0.0
    r, a = c["blocks.1.hook_resid_pre"], c["blocks.1.hook_attn_out"]
    n = int(batch.lengths.min())
    torch.testing.assert_close(got["blocks.1.hook_resid_post"][:, :n], (r + a)[:, :n], rtol=1e-4, atol=1e-5)
    assert no_hooks(lm.model)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


def test_early_stop_runs_only_the_needed_layers():
    lm = tiny_model("llama")
    batch = make_batches(tokenize(lm.tokenizer, TEXTS), batch_size=3)[0]
    seen = []
    h = lm.layers[2].register_forward_hook(lambda *a: seen.append(2))
    try:
        with Capture(lm, {"blocks.0.hook_mlp_out": [0]}) as cap:
            c = cap.forward(batch)
    finally:
        h.remove()
    assert list(c) == ["blocks.0.hook_mlp_out"] and seen == []


def test_bad_sites_and_unsupported_architectures():
    with pytest.raises(ValueError, match="unknown site"):
        parse_site("blocks.0.hook_nope")
    lm = tiny_model("gpt2")
    with pytest.raises(ValueError, match="gated"):
        with Capture(lm, {"mlp.hook_pre_linear": [0]}):
            pass
    assert no_hooks(lm.model)

    class Cfg:
        model_type = "mamba"
    with pytest.raises(UnsupportedModelError, match="supported model types: llama"):
        get_adapter(Cfg())
    with pytest.raises(UnsupportedModelError, match="post-LN"):
        get_adapter(tiny_config("opt", do_layer_norm_before=False))
    with pytest.raises(UnsupportedModelError, match="ALiBi"):
        get_adapter(tiny_config("falcon", alibi=True))


def test_bf16_model_captures_in_fp32():
    lm32 = tiny_model("llama")
    lm16 = tiny_model("llama", dtype=torch.bfloat16)
    batch = make_batches(tokenize(lm16.tokenizer, TEXTS), batch_size=3)[0]
    caps = []
    for lm in (lm32, lm16):
        with Capture(lm, {"hook_mlp_out": [0, 1], "attn.hook_pattern": [0]}) as cap:
            caps.append(cap.forward(batch))
    for name, t in caps[1].items():
        assert t.dtype == torch.float32, name
        torch.testing.assert_close(t, caps[0][name], rtol=0.05, atol=0.02, equal_nan=True)


# -- learned sinks, gated attention, hybrid blocks (issue 9 section 3) ----------------------------------------------

def _batch(lm, texts=TEXTS):
    return make_batches(tokenize(lm.tokenizer, texts), batch_size=len(texts))[0]


def test_learned_sink_mass_closes_every_row_and_matches_the_sink_logits():
    lm = tiny_model("gpt_oss")
    batch = _batch(lm)
    with Capture(lm, {"attn.hook_pattern": None, "attn.hook_sink_prob": None, "attn.hook_q": None,
                      "attn.hook_k": None}) as cap:
        c = cap.forward(batch)
    for l in lm.attention_layers:
        p, ps = c[f"blocks.{l}.attn.hook_pattern"], c[f"blocks.{l}.attn.hook_sink_prob"]
        assert ps.shape == p.shape[:3]
        sinks = _sinks(lm, l)
        for i, n in enumerate(batch.lengths.tolist()):
            torch.testing.assert_close(p[i, :, :n, :n].sum(-1) + ps[i, :, :n], torch.ones(p.shape[1], n),
                                       rtol=1e-5, atol=1e-5)
            # p_sink from the captured q, k and the sink logits alone, on the first query (which sees only key 0)
            q0, k0 = c[f"blocks.{l}.attn.hook_q"][i, 0], c[f"blocks.{l}.attn.hook_k"][i, 0]  # [H, d]
            logit0 = (q0 * k0).sum(-1) * _scaling(lm, l, q0.shape[-1])
            torch.testing.assert_close(ps[i, :, 0], torch.sigmoid(sinks - logit0), rtol=1e-5, atol=1e-6)
        assert 0.01 < float(ps[0, :, :int(batch.lengths[0])].mean()) < 0.99
    with pytest.raises(SiteUnavailable, match="learned attention sinks"):
        Capture(tiny_model("llama"), {"attn.hook_sink_prob": None})


def test_gate_site_is_the_sigmoid_gate_the_model_applies():
    lm = tiny_model("qwen3_next")
    batch = _batch(lm)
    l = lm.attention_layers[0]
    with Capture(lm, {f"blocks.{l}.attn.hook_gate": [0, 2], f"blocks.{l}.hook_resid_pre": None}) as cap:
        c = cap.forward(batch)
    gate = c[f"blocks.{l}.attn.hook_gate"]
    H, d = lm.config.num_attention_heads, lm.config.head_dim
    assert gate.shape == (3, 2, H, d)
    blk = lm.layers[l]
    with torch.no_grad():
        qg = blk.self_attn.q_proj(blk.input_layernorm(c[f"blocks.{l}.hook_resid_pre"]))
    want = torch.sigmoid(qg.view(3, -1, H, 2 * d)[..., d:])[:, [0, 2]]
    torch.testing.assert_close(gate, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="read-only"):
        from sinkscope.interventions import edit_site
        with edit_site(lm, l, "attn.hook_gate", lambda t: t * 0):
            cap.forward(batch)


def test_hybrid_model_attention_sites_live_in_the_softmax_blocks_only():
    lm = tiny_model("qwen3_next")
    assert lm.attention_layers == [1, 3]
    with Capture(lm, {"attn.hook_pattern": [0], "hook_attn_out": [0]}) as cap:
        c = cap.forward(_batch(lm))
    assert {k for k in c if "pattern" in k} == {"blocks.1.attn.hook_pattern", "blocks.3.attn.hook_pattern"}
    assert {k for k in c if "attn_out" in k} == {f"blocks.{l}.hook_attn_out" for l in range(4)}
    with pytest.raises(SiteUnavailable, match="block 0 .* no softmax attention"):
        Capture(lm, {"blocks.0.attn.hook_q": None})


def test_granite_attn_and_mlp_outputs_include_the_residual_multiplier():
    """`as added to the residual`: r + a + m == y holds only if a and m carry residual_multiplier (0.5 here)."""
    lm = tiny_model("granite")
    batch = _batch(lm)
    with Capture(lm, {"blocks.1.hook_attn_out": None, "blocks.1.hook_mlp_out": None,
                      "blocks.1.mlp.hook_post": None}) as cap:
        c = cap.forward(batch)
    from sinkscope.experiments.mlp_common import mlp_math
    mm = mlp_math(lm, 1)
    m = c["blocks.1.mlp.hook_post"] @ mm.W_down.T  # W_down carries the multiplier too (no bias in Granite)
    torch.testing.assert_close(m, c["blocks.1.hook_mlp_out"], rtol=1e-4, atol=1e-5)
    raw = c["blocks.1.mlp.hook_post"] @ lm.layers[1].mlp.down_proj.weight.T
    torch.testing.assert_close(c["blocks.1.hook_mlp_out"], raw * lm.config.residual_multiplier, rtol=1e-4, atol=1e-5)


def test_family_table_lists_every_family_with_its_refusals():
    from sinkscope.arch import family_table
    rows = family_table().splitlines()[2:]
    assert [r.split(" | ")[0].strip("| ") for r in rows] == list(ADAPTERS)
    assert "MoE" in next(r for r in rows if r.startswith("| gpt_oss ")) and "ALiBi" in next(
        r for r in rows if r.startswith("| falcon ")) and "post-norm" in next(r for r in rows if r.startswith("| olmo2 "))
