"""Mean next-token loss (NLL per token), streamed and chunked over the vocabulary so that memory stays flat.

The model is never asked for its logits: a forward hook on the headless body (the module `Capture.forward`
calls) takes the final hidden state h (after the final norm, exactly what the LM head reads) and computes,
in fp32, for every position t that has a next token (both t and t + 1 inside the prompt's attention mask)

    nll_t = logsumexp_v f(h_t . W_v + b_v) - f(h_t . W_{y_{t+1}} + b_{y_{t+1}}),

with the log-sum-exp accumulated over vocabulary chunks of `vocab_chunk` rows of the LM head (and positions in
chunks of `row_chunk`), so the largest temporary is [row_chunk, vocab_chunk], never [B, S, V]. f is the family's
logit transform, read from the adapter row (`Adapter.logit_ops`: Gemma 2/3 soft-capping, Cohere's logit_scale,
Granite's logits_scaling). Per prompt: the sum of nll_t and the number of positions; the token-weighted mean of
these equals `model(input_ids, labels=input_ids, attention_mask=...).loss` (padding as -100).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

VOCAB_CHUNK = 8192     # LM-head rows per step of the streamed log-sum-exp
ROW_CHUNK = 4096       # positions per step


def logit_transform(lm) -> Callable[[torch.Tensor], torch.Tensor]:
    """The family's map from the LM head's output to the logits (identity for most families)."""
    steps = []
    for op, attr in lm.adapter.logit_ops:
        v = getattr(lm.config, attr, None)
        if v is None:
            continue
        v = float(v)
        if op == "mul":
            steps.append(lambda z, v=v: z * v)
        elif op == "div":
            steps.append(lambda z, v=v: z / v)
        elif op == "softcap":
            steps.append(lambda z, v=v: torch.tanh(z / v) * v)
        else:
            raise ValueError(f"unknown logit op {op!r} in the {lm.adapter.model_type} adapter row")

    def f(z: torch.Tensor) -> torch.Tensor:
        for step in steps:
            z = step(z)
        return z
    return f


def lm_head(lm) -> torch.nn.Module:
    head = lm.model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{type(lm.model).__name__} has no LM head to measure the loss with")
    return head


def token_nll(lm, hidden: torch.Tensor, targets: torch.Tensor, vocab_chunk: int = VOCAB_CHUNK,
              row_chunk: int = ROW_CHUNK) -> torch.Tensor:
    """[M] fp32 NLL of targets [M] given final hidden states [M, D], streamed over the vocabulary."""
    if vocab_chunk < 1 or row_chunk < 1:
        raise ValueError(f"chunk sizes must be >= 1, not {vocab_chunk}, {row_chunk}")
    head = lm_head(lm)
    W = head.weight
    b = getattr(head, "bias", None)
    f = logit_transform(lm)
    V = W.shape[0]
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=W.device)
    for r0 in range(0, hidden.shape[0], row_chunk):
        h = hidden[r0:r0 + row_chunk].to(W.device, torch.float32)
        y = targets[r0:r0 + row_chunk].to(W.device)
        lse = torch.full((h.shape[0],), -math.inf, dtype=torch.float32, device=W.device)
        picked = torch.zeros(h.shape[0], dtype=torch.float32, device=W.device)
        for v0 in range(0, V, vocab_chunk):
            v1 = min(v0 + vocab_chunk, V)
            z = h @ W[v0:v1].float().T
            if b is not None:
                z = z + b[v0:v1].float()
            z = f(z)
            lse = torch.logaddexp(lse, torch.logsumexp(z, dim=-1))
            inside = (y >= v0) & (y < v1)
            if bool(inside.any()):
                rows = inside.nonzero().squeeze(-1)
                picked[rows] = z[rows, y[rows] - v0]
        out[r0:r0 + row_chunk] = lse - picked
    return out


def prompt_loss(lm, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                vocab_chunk: int = VOCAB_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt of a batch: (sum of next-token NLL [B] float64, number of predicted tokens [B] long)."""
    mask = attention_mask.to(hidden.device).bool()
    pairs = mask[:, :-1] & mask[:, 1:]                          # position t predicts t + 1
    nll = token_nll(lm, hidden[:, :-1][pairs], input_ids.to(hidden.device)[:, 1:][pairs], vocab_chunk)
    B = hidden.shape[0]
    rows = torch.arange(B, device=pairs.device).view(-1, 1).expand_as(pairs)[pairs]
    total = torch.zeros(B, dtype=torch.float64).index_add_(0, rows.cpu(), nll.double().cpu())
    return total, pairs.sum(-1).long().cpu()


class LossTap:
    """While open, every forward of `lm.body` also measures the next-token loss of its batch (hook on the body's
    output; inputs read from the call's keyword arguments). `take()` returns (loss_sum [B], count [B])."""

    def __init__(self, lm, vocab_chunk: int = VOCAB_CHUNK):
        self.lm, self.vocab_chunk = lm, vocab_chunk
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handle = None

    def _hook(self, module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if ids is None:
            raise ValueError("the loss needs input_ids passed to the model body")
        hidden = output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state
        if mask is None:
            mask = torch.ones_like(ids)
        self.last = prompt_loss(self.lm, hidden.detach(), ids, mask, self.vocab_chunk)

    def __enter__(self) -> "LossTap":
        self._handle = self.lm.body.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.last is None:
            raise RuntimeError("no forward of the model body ran since the last take()")
        out, self.last = self.last, None
        return out


def batch_loss(lm, batch, vocab_chunk: int = VOCAB_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum [B], count [B]) of one Batch: a plain forward of the body, with the loss tap."""
    dev = lm.device
    with LossTap(lm, vocab_chunk) as tap, torch.inference_mode():
        lm.body(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev), use_cache=False)
        return tap.take()


def mean_loss(loss_sum: torch.Tensor, count: torch.Tensor) -> float:
    """Token-weighted mean NLL over the prompts measured (finite loss_sum, count > 0); NaN if none."""
    s = torch.as_tensor(loss_sum, dtype=torch.float64)
    c = torch.as_tensor(count, dtype=torch.float64)
    ok = torch.isfinite(s) & (c > 0)
    return float(s[ok].sum() / c[ok].sum()) if bool(ok.any()) else float("nan")
