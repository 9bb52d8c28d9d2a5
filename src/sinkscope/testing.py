"""Tiny random-init models of every supported family, and a byte-level tokenizer for them.

Used by the test suite and the benchmark's CPU dry run; handy for checking a new adapter row:

    lm = tiny_model("qwen3")                      # a LoadedModel, fp32, 2 layers
    save_tiny_model("gpt2", "/tmp/tiny-gpt2")     # a folder that `--model /tmp/tiny-gpt2` loads
    run_cli(["--scan"], "/tmp/tiny-gpt2", "prompts.txt", "out", capsys)   # the CLI as a user runs it, in a test
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .arch import get_module, resolve
from .model import LoadedModel, wrap_model

VOCAB = 260  # 256 bytes + 4 special tokens
SPECIAL = ("<bos>", "<eos>", "<pad>", "<unk>")

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
               max_position_embeddings=512, bos_token_id=256, eos_token_id=257, pad_token_id=258)
# Per-family extras; GQA, QK-norm, sliding windows, soft-capping and parallel blocks are all exercised.
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=2, sliding_window=6),
    "qwen2": dict(num_key_value_heads=2),
    "qwen3": dict(num_key_value_heads=2, head_dim=16),
    "gemma": dict(num_key_value_heads=2, head_dim=16),
    "gemma2": dict(num_key_value_heads=2, head_dim=16, sliding_window=6, attn_logit_softcapping=5.0),
    "gemma3_text": dict(num_key_value_heads=2, head_dim=16, sliding_window=6),
    "gpt2": dict(n_embd=64, n_layer=3, n_head=4, n_positions=512, n_inner=96),
    "gpt_neox": dict(rotary_pct=0.5, use_parallel_residual=True),
    "opt": dict(ffn_dim=96, word_embed_proj_dim=64),
    "phi": dict(num_key_value_heads=2, partial_rotary_factor=0.5),
    "phi3": dict(num_key_value_heads=2),
    "olmo2": dict(num_key_value_heads=2),
    "granite": dict(num_key_value_heads=2, residual_multiplier=0.5, embedding_multiplier=3.0,
                    attention_multiplier=0.2, logits_scaling=2.0),
    "cohere": dict(num_key_value_heads=2, use_qk_norm=True, logit_scale=0.5),
    "starcoder2": dict(num_key_value_heads=2, sliding_window=6, use_bias=True),
    "stablelm": dict(num_key_value_heads=2, partial_rotary_factor=0.25, use_parallel_residual=False,
                     qk_layernorm=True, use_qkv_bias=True),
    "smollm3": dict(num_key_value_heads=2, no_rope_layer_interval=2),
    "falcon": dict(multi_query=True, parallel_attn=True, new_decoder_architecture=False, alibi=False,
                   ffn_hidden_size=96, bias=True),
}
# Families the table also covers, not in FAMILIES (which every mode's tests run on): multimodal Gemma 3 (its text
# tower is gemma3_text's block), the mixtures of experts (gpt-oss also has learned sinks; tests/test_moe.py) and
# Qwen3-Next (hybrid: blocks 0 and 2 have linear attention; a dense MLP here).
MOE_CONFIGS: dict[str, dict] = {
    "mixtral": dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
    # block 0 dense (mlp_only_layers); a gated shared expert; top-k weights not renormalised
    "qwen2_moe": dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[0]),
    "qwen3_moe": dict(num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32, norm_topk_prob=True),
    "olmoe": dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, intermediate_size=32),
    # block 0 dense; 8 experts in 2 groups, 1 group kept; MLA with v head dim 12 != qk head dim 24
    "deepseek_v3": dict(num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                        n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1,
                        routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                        qk_nope_head_dim=16, v_head_dim=12, norm_topk_prob=True),
    "gpt_oss": dict(num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=6,
                    num_hidden_layers=4, rope_parameters=dict(rope_type="default", rope_theta=10000.0),
                    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]),
}
EXTRA_CONFIGS: dict[str, dict] = {
    **MOE_CONFIGS,
    "gemma3": dict(num_key_value_heads=2, head_dim=16, sliding_window=6),
    "qwen3_next": dict(num_key_value_heads=2, head_dim=16, num_experts=0, num_hidden_layers=4,
                       layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
                       linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                       linear_value_head_dim=16, linear_conv_kernel_dim=2),
}
FAMILIES = tuple(TINY_CONFIGS)
ROUTER_BIASES = ("bias", "e_score_correction_bias")
ROUTER_BIAS_SD = 0.1
ALL_FAMILIES = FAMILIES + tuple(EXTRA_CONFIGS)
# Variants with flags that change the forward: (family, config overrides).
VARIANTS: dict[str, tuple[str, dict]] = {
    "gpt2-upcast": ("gpt2", dict(reorder_and_upcast_attn=True, scale_attn_by_inverse_layer_idx=True)),
    "gpt_neox-sequential": ("gpt_neox", dict(use_parallel_residual=False)),
    "stablelm-parallel": ("stablelm", dict(use_parallel_residual=True, qk_layernorm=False)),
    "falcon-new-arch": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2, multi_query=False)),
    "falcon-sequential": ("falcon", dict(parallel_attn=False, multi_query=False)),
    "cohere-no-qk-norm": ("cohere", dict(use_qk_norm=False)),
    "qwen3_next-moe": ("qwen3_next", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                          shared_expert_intermediate_size=32)),
}
_GPT2_DROP = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings")
_GEMMA3_VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                      patch_size=14)


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig
    kw = {**_COMMON, **TINY_CONFIGS.get(model_type, EXTRA_CONFIGS.get(model_type, {})), **overrides}
    if model_type == "gpt2":
        kw = {k: v for k, v in kw.items() if k not in _GPT2_DROP}
    if model_type == "gemma3":  # the text tower's vocabulary also holds the image tokens
        text = {**kw, "vocab_size": VOCAB + 4}
        return AutoConfig.for_model("gemma3", text_config=text, vision_config=_GEMMA3_VISION, mm_tokens_per_image=4,
                                    boi_token_index=VOCAB, eoi_token_index=VOCAB + 1, image_token_index=VOCAB + 2)
    return AutoConfig.for_model(model_type, **kw)


def variant(name: str) -> tuple[str, dict]:
    """(family, overrides) of a family or a VARIANTS name."""
    return VARIANTS.get(name, (name, {}))


def byte_tokenizer():
    """A byte-level tokenizer (no merges) with <bos>/<eos>/<pad>/<unk>; adds no BOS by default."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for i, s in enumerate(SPECIAL):
        vocab[s] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32,
               attn_implementation: str | None = None, **overrides) -> LoadedModel:
    """A random-init model of a family (or a VARIANTS name); learned sinks are drawn at random too (init: 0)."""
    from transformers import AutoModelForCausalLM
    model_type, extra = variant(model_type)
    cfg = tiny_config(model_type, **{**extra, **overrides})
    torch.manual_seed(seed)
    kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModelForCausalLM.from_config(cfg, **kw).to(dtype)
    lm = wrap_model(model, byte_tokenizer(), name=f"tiny-{model_type}")
    if lm.adapter.attn_sinks:
        with torch.no_grad():
            for l in lm.attention_layers:
                s = getattr(get_module(lm.layers[l], lm.adapter.attn), lm.adapter.attn_sinks)
                s.copy_(torch.randn(s.shape, generator=torch.Generator().manual_seed(seed + l)) * 2)
    spec = lm.adapter.moe
    with torch.no_grad():  # router biases (gpt-oss) and DeepSeek's score correction: drawn too (init: 0)
        for l, block in enumerate(lm.layers if spec is not None else ()):
            router = resolve(block, spec.router) if resolve(block, spec.experts) is not None else None
            for name in ROUTER_BIASES:
                b = getattr(router, name, None)
                if b is not None:
                    b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(seed + l)) * ROUTER_BIAS_SD)
    return lm


def save_tiny_model(model_type: str, folder: str | Path, seed: int = 0, **overrides) -> Path:
    lm = tiny_model(model_type, seed=seed, **overrides)
    folder = Path(folder)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def read_strict_json(path: str | Path):
    """A JSON file parsed strictly: a NaN or Infinity token (sinkscope writes null instead) raises ValueError."""
    def bad(constant):
        raise ValueError(f"non-strict JSON constant {constant} in {path}")
    return json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=bad)


def run_cli(args: list[str], model: str, prompts: str, outdir: str | Path, capsys) -> tuple:
    """`sinkscope ARGS --model MODEL --prompt-file PROMPTS --outdir OUTDIR --no-progress --no-plots` in-process,
    every other flag at its default (the way family tests load a saved model). capsys: pytest's fixture.
    Returns (exit code, stdout, stderr, outdir); a traceback on stderr is an AssertionError."""
    from .cli import main
    rc = main(list(args) + ["--model", str(model), "--prompt-file", str(prompts), "--outdir", str(outdir),
                            "--no-progress", "--no-plots"])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err, cap.err
    return rc, cap.out, cap.err, Path(outdir)
