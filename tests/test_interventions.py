"""Interventions (sinkscope.interventions): they edit the forward pass, never the weights, leave no hook behind
(also when the block or the forward raises), and compose with Capture."""

import pytest
import torch

from sinkscope.capture import Capture
from sinkscope.interventions import edit_site, edit_sites, project_out_token, replace_token, scale_token
from sinkscope.promptset import make_batches, tokenize
from sinkscope.testing import tiny_model

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Sinks form early.", "A third prompt, a bit longer than that."]
# gated, GPT-2 Conv1D, OPT (flattened fc1/fc2), fused gate_up, sandwich norms, parallel block
FAMILIES = ("llama", "gpt2", "opt", "phi3", "gemma2", "gpt_neox")


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    lm = tiny_model(request.param)
    batch = make_batches(tokenize(lm.tokenizer, TEXTS), batch_size=8, pad_id=0)[0]
    return lm, batch


def forward(lm, batch) -> torch.Tensor:
    with torch.inference_mode():
        return lm.body(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       use_cache=False).last_hidden_state.float()


def snapshot(lm) -> dict:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def assert_clean(lm, before: dict) -> None:
    after = lm.model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"parameter {k} changed"
    for name, mod in lm.model.named_modules():
        assert not mod._forward_hooks, f"forward hook left on {name or 'model'}"
        assert not mod._forward_pre_hooks, f"forward pre-hook left on {name or 'model'}"


def random_q(D: int, r: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(D, r, generator=g))[0]


def contexts(lm):
    D = lm.config.hidden_size
    Q = random_q(D)
    return {
        "project_out_token": lambda: project_out_token(lm, 1, "hook_mlp_out", 0, Q),
        "scale_token": lambda: scale_token(lm, 1, "hook_resid_pre", 0, lambda full: torch.full((full.shape[0],), 0.1)),
        "replace_token": lambda: replace_token(lm, 0, "hook_mlp_in", 2, torch.ones(D)),
        "edit_site": lambda: edit_site(lm, 0, "mlp.hook_post", lambda t: t * 0.5),
        "edit_sites": lambda: edit_sites(lm, [(0, "hook_attn_out", lambda t: -t), (1, "hook_mlp_out", lambda t: t)]),
    }


@pytest.mark.parametrize("which", ["project_out_token", "scale_token", "replace_token", "edit_site", "edit_sites"])
def test_edit_changes_output_then_leaves_no_trace(setup, which):
    lm, batch = setup
    before = snapshot(lm)
    base = forward(lm, batch)
    with contexts(lm)[which]():
        edited = forward(lm, batch)
    assert not torch.allclose(edited, base), "the intervention did not change the forward output"
    assert_clean(lm, before)
    assert torch.equal(forward(lm, batch), base), "the model does not compute the same as before"


@pytest.mark.parametrize("which", ["project_out_token", "scale_token", "edit_sites"])
def test_exception_inside_block_removes_hooks(setup, which):
    lm, batch = setup
    before = snapshot(lm)
    with pytest.raises(RuntimeError, match="boom"):
        with contexts(lm)[which]():
            forward(lm, batch)
            raise RuntimeError("boom")
    assert_clean(lm, before)


def test_exception_inside_forward_removes_hooks(setup):
    lm, batch = setup
    before = snapshot(lm)

    def bad(t):
        raise ValueError("edit failed")
    with pytest.raises(ValueError, match="edit failed"):
        with edit_site(lm, 1, "hook_mlp_out", bad):
            forward(lm, batch)
    assert_clean(lm, before)


def test_composes_with_capture(setup):
    """A Capture opened inside an intervention records the edited value at the edited site, and the clean values
    elsewhere; downstream sites change."""
    lm, batch = setup
    before = snapshot(lm)
    D = lm.config.hidden_size
    Q = random_q(D, seed=1)
    sites = {"blocks.1.hook_mlp_out": [0, 1, 2], "blocks.2.hook_resid_pre": [0]}
    with Capture(lm, sites) as cap:
        clean = {k: v.clone() for k, v in cap.forward(batch).items()}
    with project_out_token(lm, 1, "hook_mlp_out", 0, Q):
        with Capture(lm, sites) as cap:
            edited = cap.forward(batch)
    m0, m0_clean = edited["blocks.1.hook_mlp_out"][:, 0], clean["blocks.1.hook_mlp_out"][:, 0]
    assert (m0 @ Q).abs().max() < 1e-5 * m0_clean.norm(dim=-1).max()
    torch.testing.assert_close(m0, m0_clean - (m0_clean @ Q) @ Q.T, rtol=1e-5, atol=1e-5)
    assert torch.equal(edited["blocks.1.hook_mlp_out"][:, 1:], clean["blocks.1.hook_mlp_out"][:, 1:])
    assert not torch.allclose(edited["blocks.2.hook_resid_pre"], clean["blocks.2.hook_resid_pre"])
    assert_clean(lm, before)


def test_bf16_edit_is_computed_in_fp32_and_cast_back():
    lm = tiny_model("llama", dtype=torch.bfloat16)
    batch = make_batches(tokenize(lm.tokenizer, TEXTS), batch_size=8, pad_id=0)[0]
    before = snapshot(lm)
    Q = random_q(lm.config.hidden_size, seed=2)
    seen = {}

    def read(t):
        seen["t"] = t.clone()  # returns None: reads only
    with project_out_token(lm, 1, "hook_mlp_out", 0, Q):
        with edit_site(lm, 1, "hook_mlp_out", read):
            forward(lm, batch)
    assert seen["t"].dtype == torch.bfloat16
    # the edited value re-enters the model in bf16: its Q component is only bf16 rounding
    m0 = seen["t"][:, 0].float()
    assert float((m0 @ Q).norm(dim=-1).max()) < 2e-2 * float(m0.norm(dim=-1).max())
    assert_clean(lm, before)
