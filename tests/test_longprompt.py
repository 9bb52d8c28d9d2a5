"""Long prompts: the sink columns come from a log-sum-exp over query blocks and key chunks, never a full [S, S] map.
Query blocking changes the result only by fp32 rounding (a CPU matmul rounds a row differently depending on how many
rows it multiplies at once, so bit equality cannot be asked for); the chunked columns match a plain softmax."""

from __future__ import annotations

import torch

from sinkscope import attention as am
from sinkscope.capture import Capture
from sinkscope.experiments import scan
from sinkscope.promptset import make_batches, tokenize
from sinkscope.testing import tiny_model


def _qk(B=2, H=4, Hkv=2, S=37, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, S, d, generator=g) * 3, torch.randn(B, Hkv, S, d, generator=g) * 3


def test_query_blocks_do_not_change_the_log_sum_exp():
    q, k = _qk()
    whole = am.attention_lse(q, k, None, 0.35, chunk_bytes=1 << 12, query_chunk=10 ** 9)
    for qc in (1, 5, 16, 36):
        got = am.attention_lse(q, k, None, 0.35, chunk_bytes=1 << 12, query_chunk=qc)
        torch.testing.assert_close(got, whole, rtol=1e-6, atol=0)


def test_chunked_columns_equal_the_full_softmax():
    """Hand-made reference: softmax of q k^T * scale under the causal mask, columns 0, 1 and 5."""
    q, k = _qk()
    kk = k.repeat_interleave(2, dim=1)
    logits = q @ kk.transpose(-1, -2) * 0.35
    S = q.shape[2]
    logits = logits.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.softmax(logits, dim=-1)[..., [0, 1, 5]]
    got = am.attention_probs(q, k, None, 0.35, cols=[0, 1, 5], chunk_bytes=1 << 12)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    blocked = am.probs_from_logits(logits, [0, 1, 5])
    old_chunk = am.QUERY_CHUNK
    try:
        am.QUERY_CHUNK = 4                                   # the logits path, in blocks of 4 query rows
        assert torch.equal(am.probs_from_logits(logits, [0, 1, 5]), blocked)
    finally:
        am.QUERY_CHUNK = old_chunk
    torch.testing.assert_close(blocked, ref, rtol=1e-6, atol=1e-8)


def test_tiny_model_sink_columns_identical_with_small_query_blocks(monkeypatch):
    """A tiny model's per-head sink attention (the scan reducer) with 3-query blocks equals the unblocked one
    (to fp32 rounding, 1e-6 relative)."""
    lm = tiny_model("llama")
    texts = ["the quick brown fox jumps over the lazy dog " * 3, "a b c d e f g h i j k l m n o p"]
    batch = make_batches(tokenize(lm.tokenizer, texts), 2, pad_id=258)[0]

    def run():
        with Capture(lm, {"attn.hook_pattern": [0, 1]}, reduce={"attn.hook_pattern": scan._pattern_reducer([0, 1])},
                     ) as cap:
            return cap.forward(batch)
    from sinkscope import capture
    monkeypatch.setattr(capture, "KERNEL_LSE", False)           # recompute the log-sum-exp from q and k
    before = am.LSE_STATS["recompute"]
    whole = run()
    assert am.LSE_STATS["recompute"] > before                 # the chunked recomputation ran
    monkeypatch.setattr(am, "QUERY_CHUNK", 10 ** 9)
    unblocked = run()
    monkeypatch.setattr(am, "QUERY_CHUNK", 3)
    blocked = run()
    assert whole.keys() == blocked.keys() and len(whole) == lm.n_layers
    for name in whole:
        torch.testing.assert_close(blocked[name], unblocked[name], rtol=1e-6, atol=1e-9)
        assert torch.isfinite(blocked[name]).all() and (blocked[name] > 0).all(), name
