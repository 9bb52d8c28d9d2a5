"""The adapter table: one row of data per architecture family. This is the only per-family code.

Every path is relative to the object named in its comment (the top model, or one decoder block).
sinkscope reads q, k and v from the attention *function* (transformers' attention interface), so it
sees them exactly as the attention uses them: after QK-norm and RoPE, with the model's own scaling.
The q/k/v module paths below are kept as data (weight access, documentation, the adapter test).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

import torch

from .errors import UsageError


class UnsupportedModelError(UsageError):
    """The model's family is not in the adapter table (or a variant we cannot decompose)."""


@dataclass(frozen=True)
class Adapter:
    model_type: str
    # -- paths from the top model (the *ForCausalLM object) --
    body: str                 # the headless body, called instead of the LM to skip the LM head
    layers: str               # the ModuleList of decoder blocks
    final_norm: str
    # -- paths from one decoder block --
    attn: str                 # attention module; output[0] is its output before any post-norm
    q: str | None             # q/k/v projections, or None where they are fused in `qkv`
    k: str | None
    v: str | None
    qkv: str | None           # fused projection, split by `qkv_split`
    qkv_split: str | None     # "concat" ([q|k|v] along features) or "interleaved_heads" (NeoX)
    qk_norm: tuple[str, str] | None
    o: str                    # attention output projection
    attn_norm: str            # pre-attention norm
    mlp_norm: str | None      # pre-MLP norm (None: parallel block sharing attn_norm)
    attn_post_norm: str | None  # Gemma 2/3 sandwich norm on the attention output
    mlp_post_norm: str | None   # Gemma 2/3 sandwich norm on the MLP output
    mlp_in: str               # module whose input is the MLP input x
    mlp_out: str              # module whose output is m, exactly as added to the residual
    mlp_kind: str             # "gated" (act(g) * u), "gated_fused" (one gate_up matrix) or "plain" (act(W_in x + b))
    gate: str | None          # gated: W_gate; gated_fused: the fused [gate|up] projection
    up: str | None            # gated: W_up; plain: the input projection W_in
    down: str                 # the down/output projection; its input is z
    act: str                  # the activation module
    parallel: bool | str = False  # True, False, or the name of a bool config attribute

    def is_parallel(self, config) -> bool:
        if isinstance(self.parallel, str):
            return bool(getattr(config, self.parallel))
        return self.parallel

    @property
    def gated(self) -> bool:
        return self.mlp_kind in ("gated", "gated_fused")


def _llama_like(model_type: str, *, qk_norm: bool = False, sandwich: bool = False, body: str = "model") -> Adapter:
    return Adapter(
        model_type=model_type, body=body, layers=f"{body}.layers", final_norm=f"{body}.norm",
        attn="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
        qkv=None, qkv_split=None,
        qk_norm=("self_attn.q_norm", "self_attn.k_norm") if qk_norm else None,
        o="self_attn.o_proj", attn_norm="input_layernorm",
        mlp_norm="pre_feedforward_layernorm" if sandwich else "post_attention_layernorm",
        attn_post_norm="post_attention_layernorm" if sandwich else None,
        mlp_post_norm="post_feedforward_layernorm" if sandwich else None,
        mlp_in="mlp", mlp_out="post_feedforward_layernorm" if sandwich else "mlp",
        mlp_kind="gated", gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj", act="mlp.act_fn",
    )


ADAPTERS: dict[str, Adapter] = {
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    "qwen2": _llama_like("qwen2"),
    "qwen3": _llama_like("qwen3", qk_norm=True),
    "gemma": _llama_like("gemma"),
    "gemma2": _llama_like("gemma2", sandwich=True),
    "gemma3_text": _llama_like("gemma3_text", qk_norm=True, sandwich=True),
    # Gemma 3 with a vision tower: the text tower is the body.
    "gemma3": _llama_like("gemma3", qk_norm=True, sandwich=True, body="model.language_model"),
    "gpt2": Adapter(
        model_type="gpt2", body="transformer", layers="transformer.h", final_norm="transformer.ln_f",
        attn="attn", q=None, k=None, v=None, qkv="attn.c_attn", qkv_split="concat", qk_norm=None,
        o="attn.c_proj", attn_norm="ln_1", mlp_norm="ln_2", attn_post_norm=None, mlp_post_norm=None,
        mlp_in="mlp", mlp_out="mlp", mlp_kind="plain", gate=None, up="mlp.c_fc", down="mlp.c_proj",
        act="mlp.act",
    ),
    "gpt_neox": Adapter(
        model_type="gpt_neox", body="gpt_neox", layers="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm",
        attn="attention", q=None, k=None, v=None, qkv="attention.query_key_value",
        qkv_split="interleaved_heads", qk_norm=None, o="attention.dense", attn_norm="input_layernorm",
        mlp_norm="post_attention_layernorm", attn_post_norm=None, mlp_post_norm=None,
        mlp_in="mlp", mlp_out="mlp", mlp_kind="plain", gate=None, up="mlp.dense_h_to_4h",
        down="mlp.dense_4h_to_h", act="mlp.act", parallel="use_parallel_residual",
    ),
    "opt": Adapter(
        model_type="opt", body="model", layers="model.decoder.layers", final_norm="model.decoder.final_layer_norm",
        attn="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", qkv=None,
        qkv_split=None, qk_norm=None, o="self_attn.out_proj", attn_norm="self_attn_layer_norm",
        mlp_norm="final_layer_norm", attn_post_norm=None, mlp_post_norm=None,
        mlp_in="fc1", mlp_out="fc2", mlp_kind="plain", gate=None, up="fc1", down="fc2", act="activation_fn",
    ),
    "phi": Adapter(
        model_type="phi", body="model", layers="model.layers", final_norm="model.final_layernorm",
        attn="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", qkv=None,
        qkv_split=None, qk_norm=None, o="self_attn.dense", attn_norm="input_layernorm", mlp_norm=None,
        attn_post_norm=None, mlp_post_norm=None, mlp_in="mlp", mlp_out="mlp", mlp_kind="plain",
        gate=None, up="mlp.fc1", down="mlp.fc2", act="mlp.activation_fn", parallel=True,
    ),
    "phi3": Adapter(
        model_type="phi3", body="model", layers="model.layers", final_norm="model.norm",
        attn="self_attn", q=None, k=None, v=None, qkv="self_attn.qkv_proj", qkv_split="concat", qk_norm=None,
        o="self_attn.o_proj", attn_norm="input_layernorm", mlp_norm="post_attention_layernorm",
        attn_post_norm=None, mlp_post_norm=None, mlp_in="mlp", mlp_out="mlp", mlp_kind="gated_fused",
        gate="mlp.gate_up_proj", up=None, down="mlp.down_proj", act="mlp.activation_fn",
    ),
}

SUPPORTED = tuple(ADAPTERS)


def get_adapter(config) -> Adapter:
    """The adapter row for a transformers config, or a one-line UnsupportedModelError."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r}; supported model types: {', '.join(SUPPORTED)}")
    if model_type == "opt" and not getattr(config, "do_layer_norm_before", True):
        raise UnsupportedModelError(
            "post-LN OPT (do_layer_norm_before=False, e.g. opt-350m) is not supported: its block output is "
            "not r + a + m; pre-LN OPT checkpoints are")
    return ADAPTERS[model_type]


def get_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """Resolve a dotted path ("model.layers", "mlp.down_proj") below `root`."""
    return reduce(getattr, path.split("."), root)


def text_config(config):
    """The text config of a model (the config itself, or its text tower's for multimodal Gemma 3)."""
    return getattr(config, "text_config", None) or config


def down_weight(module: torch.nn.Module) -> torch.Tensor:
    """The down projection as a [D, F] fp32 matrix (column j is what z_j writes), for Linear and GPT-2 Conv1D."""
    w = module.weight.detach().float()
    if type(module).__name__ == "Conv1D":  # GPT-2 stores [in, out]
        w = w.t()
    return w


def in_weight(module: torch.nn.Module) -> torch.Tensor:
    """An input projection as a [F, D] fp32 matrix (row j reads x), for Linear and GPT-2 Conv1D."""
    w = module.weight.detach().float()
    if type(module).__name__ == "Conv1D":
        w = w.t()
    return w
