"""attention.py: the pure attention maths against transformers' own eager attention functions."""

from types import SimpleNamespace

import pytest
import torch
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_eager
from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager

from sinkscope import attention as am

B, H, HKV, S, D = 2, 4, 2, 11, 8


def _inputs(seed=0, sliding: int | None = None, pad: int = 3):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, D, generator=g) * 2
    k = torch.randn(B, HKV, S, D, generator=g) * 2
    v = torch.randn(B, HKV, S, D, generator=g)
    qi, ki = torch.arange(S).view(-1, 1), torch.arange(S).view(1, -1)
    allowed = (ki <= qi).expand(B, 1, S, S).clone()
    if sliding:
        allowed &= (qi - ki < sliding)
    allowed[1, :, :, S - pad:] = False           # prompt 1 is right-padded
    allowed[1, :, S - pad:, 0] = True            # (padding queries see key 0, as transformers' masks do)
    mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
    return q, k, v, mask


def _module(sinks=None):
    return SimpleNamespace(num_key_value_groups=H // HKV, training=False,
                           sinks=None if sinks is None else torch.nn.Parameter(sinks))


@pytest.mark.parametrize("sliding", [None, 4])
def test_probabilities_match_eager_attention(sliding):
    q, k, v, mask = _inputs(sliding=sliding)
    scale = D ** -0.5
    _, ref = llama_eager(_module(), q, k, v, mask, scaling=scale)
    full = am.attention_probs(q, k, mask, scale)
    torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-6)
    cols = [0, 1, 5, S + 2]  # a column beyond the keys is NaN
    part = am.attention_probs(q, k, mask, scale, cols=cols, chunk_bytes=1)  # many tiny key chunks
    torch.testing.assert_close(part[..., :3], ref[..., [0, 1, 5]], rtol=1e-5, atol=1e-6)
    assert torch.isnan(part[..., 3]).all()
    lse = am.attention_lse(q, k, mask, scale, chunk_bytes=1)
    torch.testing.assert_close(lse, torch.logsumexp(
        (q.reshape(B, HKV, 2, S, D) @ k.unsqueeze(2).transpose(-1, -2)).view(B, H, S, S) * scale + mask, -1),
        rtol=1e-5, atol=1e-5)


def test_causal_none_mask_and_softcap():
    q, k, _, _ = _inputs(1)
    s = (q.reshape(B, HKV, 2, S, D) @ k.unsqueeze(2).transpose(-1, -2)).view(B, H, S, S) * 0.3
    s = torch.tanh(s / 2.0) * 2.0
    want = torch.softmax(s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf")), -1)
    torch.testing.assert_close(am.attention_probs(q, k, None, 0.3, softcap=2.0), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(am.attention_probs(q, k, None, 0.3, softcap=2.0, cols=[0, 3]), want[..., [0, 3]],
                               rtol=1e-5, atol=1e-6)


def test_learned_sinks_match_gpt_oss_eager_attention():
    """Rows sum to 1 - p_sink, and both the columns and p_sink match gpt-oss's own eager function."""
    q, k, v, mask = _inputs(2, sliding=5)
    sinks = torch.tensor([2.0, -1.0, 0.5, 4.0])
    scale = D ** -0.5
    _, ref = gpt_oss_eager(_module(sinks), q, k, v, mask, scaling=scale)  # the sink column is dropped there
    full = am.attention_probs(q, k, mask, scale, sinks=sinks)
    torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-6)
    cols = am.attention_probs(q, k, mask, scale, cols=[0, 2], sinks=sinks)
    torch.testing.assert_close(cols, ref[..., [0, 2]], rtol=1e-5, atol=1e-6)
    p_sink = am.sink_probability(am.with_sinks(am.attention_lse(q, k, mask, scale), sinks), sinks)
    torch.testing.assert_close(full.sum(-1) + p_sink, torch.ones(B, H, S), rtol=1e-5, atol=1e-5)
    assert (p_sink > 0).all() and (p_sink < 1).all() and float(p_sink.mean()) > 0.05
    assert float(p_sink[:, 3].mean()) > float(p_sink[:, 1].mean())  # a larger sink logit takes more mass


def test_probs_from_logits():
    logits = torch.randn(2, 3, 5, 5)
    p = am.probs_from_logits(logits, [0, 4, 7])
    torch.testing.assert_close(p[..., :2], torch.softmax(logits, -1)[..., [0, 4]])
    assert torch.isnan(p[..., 2]).all()


def test_kernel_lse_matches_the_recomputed_one():
    """The fused SDPA kernel's log-sum-exp (where torch picks one) equals the chunked recompute, and its output is
    bit-identical to F.scaled_dot_product_attention."""
    q, k, v, mask = _inputs(3)
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    res = am.sdpa_with_lse(q, k, v, attn_mask=mask > -1, scale=0.25)
    assert res is not None, am.LSE_STATS  # CPU: torch's flash-attention kernel returns its log-sum-exp
    out, lse = res
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask > -1, scale=0.25))
    torch.testing.assert_close(lse, am.attention_lse(q, k, mask > -1, 0.25), rtol=1e-4, atol=1e-4)
