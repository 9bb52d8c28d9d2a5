"""Streaming statistics and sink attention without attention maps (issue 4), on every tiny family.

* batched (batch sizes 3 and 7, length-bucketed, right-padded) == unbatched (batch size 1, prompt order) for every
  `--scan` and `--decompose-output` statistic;
* the sink-attention columns that Capture computes while the model runs SDPA (from the kernel's log-sum-exp, or
  recomputed over key chunks) == the eager model's own attention probabilities, with padding and with a prompt
  longer than the sliding window;
* the model's output is bit-identical with and without the attention tap;
* the scan's streaming state has a fixed size, however many batches it has seen.
"""

import math

import pytest
import torch

from sinkscope import capture
from sinkscope.capture import Capture
from sinkscope.experiments import scan as scan_mod
from sinkscope.experiments.decompose_output import run_decompose_output
from sinkscope.experiments.scan import run_scan
from sinkscope.promptset import make_batches, tokenize
from sinkscope.runner import RunContext
from sinkscope.testing import FAMILIES, tiny_model

# Byte-level tokenizer: one token per byte. Lengths 3 .. 58, several longer than the tiny sliding window (6),
# some shorter than the sink keys 4 and 8 (they are skipped for those keys), all different (padding).
TEXTS = [
    "Attention sinks form early in the stack.",
    "Hi!",
    "A much longer prompt that runs well past the sliding window.",
    "Token 8 here",
    "short",
    "The quick brown fox jumps over the lazy dog",
    "Mixed 123 numbers, 4.5e6 and [brackets]",
    "ends",
    "Nine words of plain prose make a fine test prompt",
    "abcdefghij",
    "Zwölf Boxkämpfer jagen Viktor quer über den Sylter Deich",
]
SINKS = [0, 1, 4, 8]
TOKENS = [0, 1, 8]
RTOL = 1e-5


class UnbatchedContext(RunContext):
    """Batch size 1 in prompt order: no padding and no bucketing."""

    def batches(self):
        return make_batches(self.prompts, 1, pad_id=self.pad_id, bucket=False)


def _close(a: float, b: float, abs_tol: float) -> bool:
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=abs_tol)


def _abs_tol(key: str, rec: dict) -> float:
    """1e-5 relative everywhere; an absolute floor only where fp32 cancellation makes relative error meaningless:
    means of cosines near 0 (terms are bounded by 1), and variances of nearly equal values (measured against
    the square of the values they are the variance of)."""
    if key.endswith("_head_var"):
        base = key[: -len("_head_var")]
        return 1e-5 * (rec[base] ** 2 + rec[key])
    if key.endswith("_prompt_var"):
        return 1e-5 * (rec["mlp_out_log_norm"] ** 2 + rec[key])
    if key.startswith("cos"):
        return 1e-6
    return 1e-9


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    lm = tiny_model(request.param)
    return request.param, lm, tokenize(lm.tokenizer, TEXTS)


def test_scan_batched_equals_unbatched(family):
    name, lm, prompts = family
    ref = run_scan(UnbatchedContext(lm, prompts, batch_size=1, progress=False), sinks=SINKS).records
    for bs in (1, 3, 7):
        got = run_scan(RunContext(lm, prompts, batch_size=bs, progress=False), sinks=SINKS).records
        assert len(got) == len(ref) == lm.n_layers * len(SINKS)
        for r0, r in zip(ref, got):
            assert set(r) == set(scan_mod.RECORD_KEYS)
            for key, v0 in r0.items():
                assert _close(r[key], v0, _abs_tol(key, r0)), (name, bs, r0["layer"], r0["sink_idx"], key, r[key], v0)
    # prompts too short for a sink are left out of it, the same way batched or not: the token statistics keep
    # every prompt that has token t, the query statistics those that also have a query q >= max(4, t+1)
    by_sink = {r["sink_idx"]: (r["n_prompts"], r["n_prompts_query"]) for r in ref}
    assert by_sink[0] == (len(TEXTS), sum(1 for t in TEXTS if len(t.encode()) > 4))
    assert by_sink[8] == (sum(1 for t in TEXTS if len(t.encode()) > 8), sum(1 for t in TEXTS if len(t.encode()) > 9))


def test_decompose_output_batched_equals_unbatched(family):
    name, lm, prompts = family
    ref = run_decompose_output(UnbatchedContext(lm, prompts, batch_size=1, progress=False), layer=1, tokens=TOKENS)
    for bs in (1, 3, 7):
        got = run_decompose_output(RunContext(lm, prompts, batch_size=bs, progress=False), layer=1, tokens=TOKENS)
        assert got.n_prompts == ref.n_prompts and got.n_skipped == ref.n_skipped
        for row, vals in ref.values.items():
            for a, b in zip(got.values[row], vals):
                assert _close(a, b, 1e-9), (name, bs, row, a, b)
        assert got.max_abs_y_mismatch < 1e-4


@pytest.mark.parametrize("kernel_lse", [True, False], ids=["kernel-lse", "recomputed-lse"])
def test_sink_columns_match_eager_probabilities(family, kernel_lse, monkeypatch):
    name, lm, prompts = family
    monkeypatch.setattr(capture, "KERNEL_LSE", kernel_lse)
    eager = tiny_model(name, attn_implementation="eager")  # same seed, same weights
    batch = make_batches(prompts, len(prompts), pad_id=0, bucket=False)[0]
    cols = [0, 1, 4, 8, 20]  # 20 is beyond some prompts (NaN there) and far past the sliding window
    before = dict(capture.LSE_STATS)
    with Capture(lm, {"attn.hook_pattern": cols}) as cap:
        got = cap.forward(batch)
    # Falcon's multi-query SDPA call broadcasts one k/v head over the query heads: torch runs its math backend,
    # which has no log-sum-exp to reuse, so the columns are recomputed there
    uses_sdpa = lm.model.config._attn_implementation == "sdpa" and name != "falcon"
    if kernel_lse and uses_sdpa:  # the fast path really ran (CPU flash attention gives its log-sum-exp)
        assert capture.LSE_STATS["kernel"] > before["kernel"], capture.LSE_STATS
    else:
        assert capture.LSE_STATS["recompute"] > before["recompute"]
    with torch.inference_mode():
        out = eager.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_attentions=True,
                          use_cache=False)
    lengths = batch.lengths.tolist()
    for l, A in enumerate(out.attentions):
        p = got[f"blocks.{l}.attn.hook_pattern"]
        assert p.shape == (len(prompts), A.shape[1], batch.input_ids.shape[1], len(cols)) and p.dtype == torch.float32
        for b, n in enumerate(lengths):
            for i, c in enumerate(cols):
                if c >= n:
                    assert torch.isnan(p[b, :, :, i]).all()
                    continue
                diff = (p[b, :, :n, i] - A[b, :, :n, c].float()).abs().max().item()
                assert diff <= 1e-5, (name, l, b, c, diff)


def test_tap_leaves_model_output_unchanged(family):
    name, lm, prompts = family
    batch = make_batches(prompts, len(prompts), pad_id=0, bucket=False)[0]
    with torch.inference_mode():
        plain = lm.body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)[0]
        with Capture(lm, {"attn.hook_pattern": [0, 4], "attn.hook_q": None}, stop_early=False):
            tapped = lm.body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)[0]
    mask = batch.attention_mask.bool()
    assert torch.equal(plain[mask], tapped[mask]), name


def test_scan_state_size_is_fixed(monkeypatch):
    """The streaming state (and each batch's captures) do not grow with the number of prompts."""
    lm = tiny_model("qwen3")
    sizes = []
    update = scan_mod._ScanAccumulator.update

    def spy(self, *args):
        update(self, *args)
        sizes.append(sum(t.numel() for t in self.state().values()))
    monkeypatch.setattr(scan_mod._ScanAccumulator, "update", spy)
    cache_sizes = []
    forward = Capture.forward

    def spy_forward(self, batch, **kw):
        c = forward(self, batch, **kw)
        cache_sizes.append(sum(t.numel() for t in c.values()) / batch.size)
        return c
    monkeypatch.setattr(Capture, "forward", spy_forward)
    few = tokenize(lm.tokenizer, ["x" * 24] * 4)
    many = tokenize(lm.tokenizer, ["x" * 24] * 40)
    r_few = run_scan(RunContext(lm, few, batch_size=2, progress=False), sinks=SINKS).records
    n_few = len(sizes)
    r_many = run_scan(RunContext(lm, many, batch_size=2, progress=False), sinks=SINKS).records
    assert n_few == 2 and len(sizes) == 22
    assert len(set(sizes)) == 1, sizes
    assert len(set(cache_sizes)) == 1, cache_sizes  # per-prompt capture size is the same in every batch
    # identical prompts: the statistics of 4 copies and of 40 copies agree
    for a, b in zip(r_few, r_many):
        assert b["n_prompts"] == 10 * a["n_prompts"]
        for key in ("k_norm", "v_norm", "sink_attn", "mlp_out_log_norm"):
            assert _close(a[key], b[key], 1e-7), key


def test_auto_batch_size_bounds_padding():
    """--batch-size auto: within the memory cap, the largest size whose bucketed batches pad <= 20%."""
    import json
    from pathlib import Path

    from sinkscope.promptset import choose_batch_size, padded_tokens
    lengths = json.loads((Path(__file__).resolve().parents[1] / "bench" / "data" / "prose56_lengths.json").read_text())
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # device objects only: no GPU needed
    assert padded_tokens([1, 2, 3], 2) == 7
    assert choose_batch_size(lengths, 256, cpu) == 16            # CPU: capped at 16
    bs = choose_batch_size(lengths, 256, cuda)
    assert padded_tokens(lengths, bs) <= 1.2 * sum(lengths) < padded_tokens(lengths, 2 * bs)
    assert choose_batch_size([32] * 512, 256, cuda) == 256     # equal lengths: no padding, memory decides
    assert choose_batch_size(lengths, 3, cuda) == 3 and choose_batch_size([8192], 1, cuda) == 1
    lm = tiny_model("llama")
    ctx = RunContext(lm, tokenize(lm.tokenizer, TEXTS), batch_size="auto", progress=False)
    assert 1 <= ctx.batch_size <= 16
