"""Tiny random-init models of every supported family, and a byte-level tokenizer for them.

Used by the test suite and the benchmark's CPU dry run; handy for checking a new adapter row:

    lm = tiny_model("qwen3")                      # a LoadedModel, fp32, 2 layers
    save_tiny_model("gpt2", "/tmp/tiny-gpt2")     # a folder that `--model /tmp/tiny-gpt2` loads
"""

from __future__ import annotations

from pathlib import Path

import torch

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
}
FAMILIES = tuple(TINY_CONFIGS)
_GPT2_DROP = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings")


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig
    kw = {**_COMMON, **TINY_CONFIGS[model_type], **overrides}
    if model_type == "gpt2":
        kw = {k: v for k, v in kw.items() if k not in _GPT2_DROP}
    return AutoConfig.for_model(model_type, **kw)


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
    from transformers import AutoModelForCausalLM
    cfg = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModelForCausalLM.from_config(cfg, **kw).to(dtype)
    return wrap_model(model, byte_tokenizer(), name=f"tiny-{model_type}")


def save_tiny_model(model_type: str, folder: str | Path, seed: int = 0, **overrides) -> Path:
    lm = tiny_model(model_type, seed=seed, **overrides)
    folder = Path(folder)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder
