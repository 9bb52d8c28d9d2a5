"""What every experiment needs: a loaded model, tokenised prompts, batches, a progress bar, token checks."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .errors import UsageError
from .model import LoadedModel
from .promptset import Batch, PromptError, Prompts, auto_batch_size, choose_batch_size, make_batches

QUERY_START = 4  # the reference's first query position for sink attention and cos(Q, K)


@dataclass
class RunContext:
    lm: LoadedModel
    prompts: Prompts
    batch_size: int | str = 16
    progress: bool = True
    notes: list[str] = field(default_factory=list)  # one-line remarks that the report prints and saves

    def __post_init__(self):
        self.notes = list(getattr(self.prompts, "notes", [])) + list(self.notes)
        if self.batch_size == "auto":
            cfg = self.lm.config
            cap = auto_batch_size(
                self.lm.n_layers, cfg.hidden_size, getattr(cfg, "num_attention_heads", 1),
                max(self.prompts.lengths), torch.finfo(self.lm.dtype).bits // 8, self.lm.device)
            # within the memory cap, no more padding than ~20% of the real tokens (and <= 16 on a CPU)
            self.batch_size = choose_batch_size(self.prompts.lengths, cap, self.lm.device)
        self.batch_size = int(self.batch_size)
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1 or auto, not {self.batch_size}")

    @property
    def pad_id(self) -> int:
        tok = self.lm.tokenizer
        pad = getattr(tok, "pad_token_id", None) if tok is not None else None
        return 0 if pad is None else int(pad)

    def batches(self) -> list[Batch]:
        return make_batches(self.prompts, self.batch_size, pad_id=self.pad_id)

    def iterate(self, desc: str) -> Iterator[Batch]:
        batches = self.batches()
        yield from tqdm(batches, desc=desc, unit="batch", disable=not self.progress or len(batches) < 2,
                        file=sys.stderr, leave=False)

    def check_layer(self, layer: int) -> int:
        n = self.lm.n_layers
        if not -n <= layer < n:
            raise UsageError(f"--layer {layer} is out of range: this model has layers 0..{n - 1}")
        return layer % n

    def check_tokens(self, tokens: Sequence[int], what: str = "token", note: bool = True) -> dict[int, int]:
        """Fail if a token index is beyond every prompt; return {t: number of prompts too short for t}
        (and, with `note`, say so in the notes)."""
        lengths = self.prompts.lengths
        longest = max(lengths)
        for t in tokens:
            if t < 0:
                raise PromptError(f"{what} index {t} is negative")
            if t >= longest:
                raise PromptError(f"{what} index {t} is beyond every prompt (the longest has {longest} tokens)")
        short = {t: sum(1 for n in lengths if n <= t) for t in tokens}
        for t, c in short.items():
            if c and note:
                self.notes.append(f"{what} {t}: {c} of {len(lengths)} prompts are too short and were skipped for it")
        return short


def valid_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of a [N, D] capture that are not NaN (positions a prompt does not have are NaN)."""
    return x[~torch.isnan(x).any(dim=-1)]


def query_mask(lengths: torch.Tensor, S: int, t: int) -> torch.Tensor:
    """[B, S] bool: the queries averaged for key t, q in [max(QUERY_START, t + 1), length).

    The reference used q >= 4 for every key, which includes causally masked queries (q < t) for t > 4
    (MODES.md section 8.3); for t <= 4 the two definitions agree."""
    q = torch.arange(S, device=lengths.device).view(1, -1)
    return (q >= max(QUERY_START, t + 1)) & (q < lengths.view(-1, 1))
