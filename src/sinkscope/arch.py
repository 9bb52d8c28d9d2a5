"""The adapter table: one row of data per architecture family. This is the only per-family code.

Every path is relative to the object named in its comment (the top model, or one decoder block). A path may
list alternatives, "a|b": the first one present in the block is used (Falcon's norms differ between its
variants). sinkscope reads q, k and v from the attention *function* (transformers' attention interface), so it
sees them exactly as the attention uses them: after QK-norm and RoPE, with the model's own scaling. The q/k/v
module paths below are kept as data (weight access, documentation, the adapter test).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import reduce

import torch

from .errors import UsageError


class UnsupportedModelError(UsageError):
    """The model's family is not in the adapter table (or a variant we cannot decompose)."""


@dataclass(frozen=True)
class MoESpec:
    """How one family's MoE block computes (paths from the decoder block)."""
    routing: str                     # "softmax_topk": softmax over all logits, top-k (Mixtral, Qwen, OLMoE);
    #                                  "topk_softmax": top-k logits (with a router bias), softmax over them (gpt-oss);
    #                                  "sigmoid_grouped": sigmoid scores, group-limited top-k, routed scaling (DeepSeek-V3)
    renorm: bool | None = None       # True: the top-k weights are always renormalised; None: the router's norm_topk_prob
    layout: str = "gate_up"          # "gate_up": gate_up_proj [E, 2F, D] ([gate | up]), down_proj [E, D, F], act_fn;
    #                                  "gpt_oss": [E, D, 2F] interleaved gate/up with biases, clamped SwiGLU (alpha, limit)
    block: str = "mlp"               # the MoE module; its input is x
    router: str = "mlp.gate"
    experts: str = "mlp.experts"
    shared: str | None = None        # a dense gated MLP added to every token
    shared_gate: str | None = None   # Linear(D, 1): the shared expert is scaled by sigmoid(gate(x)) (Qwen2-MoE)

    def describe(self) -> str:
        what = {"softmax_topk": "softmax then top-k", "topk_softmax": "top-k logits then softmax",
                "sigmoid_grouped": "sigmoid, group-limited top-k, routed scaling factor"}[self.routing]
        extra = "; clamped SwiGLU with biases" if self.layout == "gpt_oss" else ""
        shared = "; gated shared expert" if self.shared_gate else "; shared expert" if self.shared else ""
        return f"MoE routing: {what}{extra}{shared}"


@dataclass(frozen=True)
class Adapter:
    model_type: str
    # -- paths from the top model (the *ForCausalLM / *ForConditionalGeneration object) --
    body: str                 # the headless body, called instead of the LM to skip the LM head
    layers: str               # the ModuleList of decoder blocks
    final_norm: str
    # -- paths from one decoder block --
    attn: str                 # softmax attention module; output[0] is its output before any post-norm
    q: str | None             # q/k/v projections, or None where they are fused in `qkv`
    k: str | None
    v: str | None
    qkv: str | None           # fused projection, split by `qkv_split`
    qkv_split: str | None     # "concat" ([q|k|v]), "interleaved_heads" (NeoX) or "falcon" (per kv group)
    qk_norm: tuple[str, str] | None  # present when the config enables it (Cohere, StableLM: optional)
    o: str                    # attention output projection
    attn_norm: str | None     # pre-attention norm (None: there is none, as in OLMo 2)
    mlp_norm: str | None      # pre-MLP norm; absent: a parallel block shares attn_norm, a sequential one has none
    attn_post_norm: str | None  # norm on the attention output before the residual add (Gemma 2/3, OLMo 2)
    mlp_post_norm: str | None   # norm on the MLP output before the residual add (Gemma 2/3, OLMo 2)
    mlp_in: str               # module whose input is the MLP input x
    mlp_out: str              # module whose output is m as added to the residual (up to `residual_scale`)
    mlp_kind: str             # "gated" (act(g) * u), "gated_fused" (one gate_up matrix), "plain" (act(W_in x + b))
    #                           or "moe" (a mixture of experts, see `moe`; its dense layers, if any, are "gated")
    gate: str | None          # gated: W_gate; gated_fused: the fused [gate|up] projection
    up: str | None            # gated: W_up; plain: the input projection W_in
    down: str | None          # the down/output projection; its input is z
    act: str | None           # the activation module
    # True, False, or the name(s) of bool config attributes (any of them true: parallel attention and MLP)
    parallel: bool | str | tuple[str, ...] = False
    norm_kind: str = "rms"    # the block norms: "rms" (x / rms(x) * g) or "layer" ((x - mean) / std * g + b)
    residual_scale: str | None = None  # config attribute multiplying each sublayer's output as added (Granite)
    attn_sinks: str | None = None      # attention-module parameter: per-head learned sink logits (gpt-oss)
    attn_gate: str | None = None       # projection whose per-head [q | gate] halves give the output gate, applied
    #                                    as sigmoid(gate) * attention output before o (Qwen3-Next)
    linear_mixer: str | None = None    # token mixer of the blocks that have no softmax attention (Qwen3-Next)
    attn_inline: bool = False          # attention computed inside the module's forward, not through transformers'
    #                                    attention-function registry (Falcon): read with a torch-function mode
    # (config flag, attention-module method): under eager attention with the flag set, the module calls
    # method(query, key, value, attention_mask) instead of the attention function (GPT-2's fp32 upcast path)
    eager_methods: tuple[tuple[str, str], ...] = ()
    moe: MoESpec | None = None         # the MoE block of the layers that have one (moe.py); dense layers use the above
    refuse: tuple[tuple[str, object, str], ...] = ()  # (config attribute, value, why): variants we cannot decompose
    special: str = ""                  # what is special about the family (documentation, README table)

    def is_parallel(self, config) -> bool:
        if isinstance(self.parallel, bool):
            return self.parallel
        names = (self.parallel,) if isinstance(self.parallel, str) else self.parallel
        return any(bool(getattr(config, n, False)) for n in names)

    @property
    def gated(self) -> bool:
        return self.mlp_kind in ("gated", "gated_fused", "moe")  # "moe": the dense layers of MoE families

    @property
    def has_learned_sinks(self) -> bool:
        return self.attn_sinks is not None

    @property
    def has_attn_gate(self) -> bool:
        return self.attn_gate is not None

    @property
    def norm_placement(self) -> str:
        pre = "pre" if self.attn_norm else ""
        post = "post" if self.attn_post_norm or self.mlp_post_norm else ""
        return "+".join(p for p in (pre, post) if p) + "-norm" if pre or post else "no norms"


def _llama_like(model_type: str, *, qk_norm: bool = False, sandwich: bool = False, body: str = "model",
                **extra) -> Adapter:
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
        gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj", act="mlp.act_fn",
        **{"mlp_kind": "gated", **extra},
    )


_QWEN_SHARED = MoESpec("softmax_topk", shared="mlp.shared_expert", shared_gate="mlp.shared_expert_gate")
_SANDWICH = "pre- and post-norms around both sublayers (sandwich)"
ADAPTERS: dict[str, Adapter] = {
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral", special="sliding-window attention"),
    "qwen2": _llama_like("qwen2", special="q/k/v biases"),
    "qwen3": _llama_like("qwen3", qk_norm=True, special="QK-norm"),
    "gemma": _llama_like("gemma", special="(1 + g) RMSNorm, scaled embedding"),
    "gemma2": _llama_like("gemma2", sandwich=True,
                          special=f"{_SANDWICH}; logit soft-capping; eager attention (no SDPA)"),
    "gemma3_text": _llama_like("gemma3_text", qk_norm=True, sandwich=True,
                               special=f"{_SANDWICH}; QK-norm; local/global layers"),
    # Gemma 3 with a vision tower (what AutoModelForCausalLM returns for every Gemma 3 checkpoint but the 1B
    # text-only one): the text tower is the body.
    "gemma3": _llama_like("gemma3", qk_norm=True, sandwich=True, body="model.language_model",
                          special="multimodal: the text tower of Gemma3ForConditionalGeneration"),
    "mixtral": _llama_like("mixtral", mlp_kind="moe", moe=MoESpec("softmax_topk", renorm=True),
                           special="MoE: softmax then top-k, renormalised; sliding-window attention"),
    "qwen2_moe": _llama_like("qwen2_moe", mlp_kind="moe", moe=_QWEN_SHARED,
                             special="MoE: softmax then top-k (norm_topk_prob); shared expert scaled by a sigmoid "
                                     "gate; dense layers (mlp_only_layers, decoder_sparse_step); q/k/v biases"),
    "qwen3_moe": _llama_like("qwen3_moe", qk_norm=True, mlp_kind="moe", moe=MoESpec("softmax_topk"),
                             special="MoE: softmax then top-k (norm_topk_prob); QK-norm; dense layers "
                                     "(mlp_only_layers)"),
    "olmoe": _llama_like("olmoe", qk_norm=True, mlp_kind="moe", moe=MoESpec("softmax_topk"),
                         special="MoE: softmax then top-k (norm_topk_prob); QK-norm over all heads"),
    "deepseek_v3": replace(
        _llama_like("deepseek_v3", mlp_kind="moe", moe=MoESpec("sigmoid_grouped", shared="mlp.shared_experts"),
                    special="MoE: sigmoid scores + correction bias, group-limited top-k, routed scaling factor; "
                            "shared experts; first_k_dense_replace dense layers; MLA attention (low-rank q and kv, "
                            "v head dim != qk head dim)"),
        q="self_attn.q_b_proj|self_attn.q_proj", k="self_attn.kv_b_proj", v="self_attn.kv_b_proj"),
    "olmo2": Adapter(
        model_type="olmo2", body="model", layers="model.layers", final_norm="model.norm",
        attn="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", qkv=None,
        qkv_split=None, qk_norm=("self_attn.q_norm", "self_attn.k_norm"), o="self_attn.o_proj",
        attn_norm=None, mlp_norm=None, attn_post_norm="post_attention_layernorm",
        mlp_post_norm="post_feedforward_layernorm", mlp_in="mlp", mlp_out="post_feedforward_layernorm",
        mlp_kind="gated", gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj", act="mlp.act_fn",
        special="norms after each sublayer, none before; QK-norm over all heads"),
    "granite": _llama_like("granite", residual_scale="residual_multiplier",
                           special="residual_multiplier on every sublayer output, embedding_multiplier, "
                                   "attention_multiplier as the softmax scale"),
    "cohere": replace(_llama_like("cohere", qk_norm=True, parallel=True, norm_kind="layer",
                                  special="parallel block with one shared LayerNorm (no bias); optional QK-norm; "
                                          "logit scale"), mlp_norm=None),
    "starcoder2": Adapter(
        model_type="starcoder2", body="model", layers="model.layers", final_norm="model.norm",
        attn="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", qkv=None,
        qkv_split=None, qk_norm=None, o="self_attn.o_proj", attn_norm="input_layernorm",
        mlp_norm="post_attention_layernorm", attn_post_norm=None, mlp_post_norm=None, mlp_in="mlp", mlp_out="mlp",
        mlp_kind="plain", gate=None, up="mlp.c_fc", down="mlp.c_proj", act="mlp.act", norm_kind="layer",
        special="biases everywhere, plain MLP, LayerNorm, sliding window"),
    "stablelm": Adapter(
        model_type="stablelm", body="model", layers="model.layers", final_norm="model.norm",
        attn="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", qkv=None,
        qkv_split=None, qk_norm=("self_attn.q_layernorm", "self_attn.k_layernorm"), o="self_attn.o_proj",
        attn_norm="input_layernorm", mlp_norm="post_attention_layernorm", attn_post_norm=None, mlp_post_norm=None,
        mlp_in="mlp", mlp_out="mlp", mlp_kind="gated", gate="mlp.gate_proj", up="mlp.up_proj",
        down="mlp.down_proj", act="mlp.act_fn", parallel="use_parallel_residual", norm_kind="layer",
        special="partial rotary; optional parallel block (use_parallel_residual); optional per-head QK LayerNorm"),
    "smollm3": _llama_like("smollm3", special="some layers without RoPE (no_rope_layers)"),
    "gpt2": Adapter(
        model_type="gpt2", body="transformer", layers="transformer.h", final_norm="transformer.ln_f",
        attn="attn", q=None, k=None, v=None, qkv="attn.c_attn", qkv_split="concat", qk_norm=None,
        o="attn.c_proj", attn_norm="ln_1", mlp_norm="ln_2", attn_post_norm=None, mlp_post_norm=None,
        mlp_in="mlp", mlp_out="mlp", mlp_kind="plain", gate=None, up="mlp.c_fc", down="mlp.c_proj",
        act="mlp.act", norm_kind="layer", eager_methods=(("reorder_and_upcast_attn", "_upcast_and_reordered_attn"),),
        special="fused c_attn (Conv1D); learned positions; reorder_and_upcast_attn"),
    "gpt_neox": Adapter(
        model_type="gpt_neox", body="gpt_neox", layers="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm",
        attn="attention", q=None, k=None, v=None, qkv="attention.query_key_value",
        qkv_split="interleaved_heads", qk_norm=None, o="attention.dense", attn_norm="input_layernorm",
        mlp_norm="post_attention_layernorm", attn_post_norm=None, mlp_post_norm=None,
        mlp_in="mlp", mlp_out="mlp", mlp_kind="plain", gate=None, up="mlp.dense_h_to_4h",
        down="mlp.dense_4h_to_h", act="mlp.act", parallel="use_parallel_residual", norm_kind="layer",
        special="optional parallel block; partial rotary"),
    "falcon": Adapter(
        model_type="falcon", body="transformer", layers="transformer.h", final_norm="transformer.ln_f",
        attn="self_attention", q=None, k=None, v=None, qkv="self_attention.query_key_value", qkv_split="falcon",
        qk_norm=None, o="self_attention.dense", attn_norm="input_layernorm|ln_attn",
        mlp_norm="ln_mlp|post_attention_layernorm", attn_post_norm=None, mlp_post_norm=None, mlp_in="mlp",
        mlp_out="mlp", mlp_kind="plain", gate=None, up="mlp.dense_h_to_4h", down="mlp.dense_4h_to_h",
        act="mlp.act", parallel=("parallel_attn", "new_decoder_architecture"), norm_kind="layer",
        attn_inline=True,
        refuse=(("alibi", True, "Falcon with ALiBi (alibi=True, e.g. falcon-rw-1b) is not supported: its position "
                                "bias is folded into the mask, so q.k alone does not give the attention logits"),),
        special="parallel attention/MLP (one or two input norms); multi-query or grouped KV; attention "
                "computed inline (no attention-function registry)"),
    "opt": Adapter(
        model_type="opt", body="model", layers="model.decoder.layers", final_norm="model.decoder.final_layer_norm",
        attn="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", qkv=None,
        qkv_split=None, qk_norm=None, o="self_attn.out_proj", attn_norm="self_attn_layer_norm",
        mlp_norm="final_layer_norm", attn_post_norm=None, mlp_post_norm=None,
        mlp_in="fc1", mlp_out="fc2", mlp_kind="plain", gate=None, up="fc1", down="fc2", act="activation_fn",
        norm_kind="layer",
        refuse=(("do_layer_norm_before", False, "post-LN OPT (do_layer_norm_before=False, e.g. opt-350m) is not "
                 "supported: its block output is not r + a + m; pre-LN OPT checkpoints are"),),
        special="MLP layers live in the block (fc1/fc2); pre-LN only"),
    "phi": Adapter(
        model_type="phi", body="model", layers="model.layers", final_norm="model.final_layernorm",
        attn="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", qkv=None,
        qkv_split=None, qk_norm=None, o="self_attn.dense", attn_norm="input_layernorm", mlp_norm=None,
        attn_post_norm=None, mlp_post_norm=None, mlp_in="mlp", mlp_out="mlp", mlp_kind="plain",
        gate=None, up="mlp.fc1", down="mlp.fc2", act="mlp.activation_fn", parallel=True, norm_kind="layer",
        special="parallel block, shared LayerNorm; partial rotary"),
    "phi3": Adapter(
        model_type="phi3", body="model", layers="model.layers", final_norm="model.norm",
        attn="self_attn", q=None, k=None, v=None, qkv="self_attn.qkv_proj", qkv_split="concat", qk_norm=None,
        o="self_attn.o_proj", attn_norm="input_layernorm", mlp_norm="post_attention_layernorm",
        attn_post_norm=None, mlp_post_norm=None, mlp_in="mlp", mlp_out="mlp", mlp_kind="gated_fused",
        gate="mlp.gate_up_proj", up=None, down="mlp.down_proj", act="mlp.activation_fn",
        special="fused qkv and gate_up projections"),
    "gpt_oss": Adapter(
        model_type="gpt_oss", body="model", layers="model.layers", final_norm="model.norm",
        attn="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", qkv=None,
        qkv_split=None, qk_norm=None, o="self_attn.o_proj", attn_norm="input_layernorm",
        mlp_norm="post_attention_layernorm", attn_post_norm=None, mlp_post_norm=None, mlp_in="mlp", mlp_out="mlp",
        mlp_kind="moe", gate=None, up=None, down=None, act=None, attn_sinks="sinks",
        moe=MoESpec("topk_softmax", layout="gpt_oss", router="mlp.router"),
        special="learned per-head attention sinks (softmax rows sum to 1 - p_sink); eager attention (no SDPA); "
                "MoE: router with bias, top-k logits then softmax; clamped SwiGLU (alpha, limit, up + 1) with "
                "biases, interleaved gate/up"),
    "qwen3_next": _llama_like("qwen3_next", qk_norm=True, attn_gate="self_attn.q_proj",
                              linear_mixer="linear_attn", moe=_QWEN_SHARED,
                              special="hybrid: gated-delta-net (linear attention) layers without softmax "
                                      "attention; sigmoid output gate on softmax attention; MoE or dense MLP"),
}

SUPPORTED = tuple(ADAPTERS)


def text_config(config):
    """The text config of a model (the config itself, or its text tower's for multimodal Gemma 3)."""
    return getattr(config, "text_config", None) or config


def get_adapter(config) -> Adapter:
    """The adapter row for a transformers config, or a one-line UnsupportedModelError.

    The top-level model_type is looked up first (multimodal Gemma 3 is `gemma3`, whose text tower sits below the
    vision model), then the text config's; refusals are checked against the text config."""
    types = [getattr(config, "model_type", None)]
    tc = text_config(config)
    if tc is not config:
        types.append(getattr(tc, "model_type", None))
    row = next((ADAPTERS[t] for t in types if t in ADAPTERS), None)
    if row is None:
        shown = " / ".join(repr(t) for t in types)
        raise UnsupportedModelError(f"unsupported architecture {shown}; supported model types: {', '.join(SUPPORTED)}")
    for attr, value, why in row.refuse:
        if getattr(tc, attr, None) == value:
            raise UnsupportedModelError(why)
    return row


def family_table() -> str:
    """The README's architecture table (Markdown), generated from the rows: MLP kind, norm placement, block
    layout, what is special, and the refused variants with the reason."""
    kinds = {"gated": "dense, gated", "gated_fused": "dense, gated (fused)", "plain": "dense, plain", "moe": "MoE"}
    lines = ["| model_type | MLP | norms | block | special | refused |", "|---|---|---|---|---|---|"]
    for t, a in ADAPTERS.items():
        block = ("parallel" if a.parallel is True else "sequential" if a.parallel is False
                 else f"parallel if {' or '.join([a.parallel] if isinstance(a.parallel, str) else a.parallel)}")
        refused = "; ".join(f"{attr}={value!r}: {why}" for attr, value, why in a.refuse) or "-"
        mlp = kinds[a.mlp_kind] + (" or MoE" if a.moe is not None and a.mlp_kind != "moe" else "")
        lines.append(f"| {t} | {mlp} | {a.norm_placement} ({a.norm_kind}) | {block} | "
                     f"{a.special or '-'} | {refused} |")
    return "\n".join(lines)


def get_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """Resolve a dotted path ("model.layers", "mlp.down_proj") below `root`; "a|b": the first present one."""
    if "|" in path:
        mod = resolve(root, path)
        if mod is None:
            raise AttributeError(f"none of {path!r} is present in {type(root).__name__}")
        return mod
    return reduce(getattr, path.split("."), root)


def resolve(root: torch.nn.Module, path: str | None) -> torch.nn.Module | None:
    """Like get_module, but None when the path (every alternative of "a|b") is absent or set to None."""
    if path is None:
        return None
    for alt in path.split("|"):
        try:
            mod = reduce(getattr, alt.split("."), root)
        except AttributeError:
            continue
        if mod is not None:
            return mod
    return None


def has_softmax_attention(adapter: Adapter, block: torch.nn.Module) -> bool:
    """Whether a block has a softmax attention (hybrid models have blocks with a linear token mixer instead)."""
    return resolve(block, adapter.attn) is not None


def attn_out_module(adapter: Adapter, block: torch.nn.Module) -> torch.nn.Module:
    """The module whose output is the block's attention (token mixer) output as added to the residual."""
    mod = resolve(block, adapter.attn_post_norm) or resolve(block, adapter.attn) or resolve(block, adapter.linear_mixer)
    if mod is None:
        raise AttributeError(f"{adapter.model_type} block has no {adapter.attn!r} (nor a token mixer)")
    return mod


def mlp_input_norm(adapter: Adapter, block: torch.nn.Module, config) -> torch.nn.Module | None:
    """The norm that maps s (r + a, or r in a parallel block) to the MLP input x; None when x = s (OLMo 2)."""
    mod = resolve(block, adapter.mlp_norm)
    if mod is None and adapter.is_parallel(config):
        mod = resolve(block, adapter.attn_norm)
    return mod


def residual_scale(adapter: Adapter, config) -> float | None:
    """The multiplier of every sublayer output as added to the residual (None: 1)."""
    if adapter.residual_scale is None:
        return None
    return float(getattr(config, adapter.residual_scale))


def normalised_stream(s: torch.Tensor, kind: str, eps: float = 1e-12) -> torch.Tensor:
    """What a norm of `kind` makes of s before its affine part: s / rms(s) ("rms") or (s - mean) / std ("layer")."""
    s = s.float()
    if kind == "layer":
        c = s - s.mean(-1, keepdim=True)
        return c / c.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(eps)
    if kind == "rms":
        return s / s.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(eps)
    raise ValueError(f"unknown norm kind {kind!r}")


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
