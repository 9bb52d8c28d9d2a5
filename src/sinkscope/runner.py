"""What every experiment needs: a loaded model, tokenised prompts, batches, a progress bar, token checks.

Batches are this rank's share in a data-parallel run (distributed.py); `ctx.owned` marks the prompts this process
ran. `ctx.for_each(desc, step)` runs step(batch) on each batch and survives an out-of-memory error: the batch is
split in two and each half retried (and later batches are cut to that size), so no prompt is lost or counted twice
as long as `step` only accumulates after its forward pass succeeded.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from . import distributed
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
        self.owned = torch.zeros(len(self.prompts), dtype=torch.bool)   # prompts run by this process
        self.max_rows: int | None = None                                 # set after an out-of-memory split
        if self.batch_size == "auto":
            cfg = self.lm.config
            cap = auto_batch_size(
                self.lm.n_layers, cfg.hidden_size, getattr(cfg, "num_attention_heads", 1),
                max(self.prompts.lengths), torch.finfo(self.lm.dtype).bits // 8, self.lm.device)
            # within the memory cap, no more padding than ~20% of the real tokens (and <= 16 on a CPU)
            # every rank must cut the same batches: the smallest choice over ranks (free memory differs)
            self.batch_size = distributed.all_min_int(choose_batch_size(self.prompts.lengths, cap, self.lm.device))
            self.notes.append(f"--batch-size auto: {self.batch_size} prompts per batch (device {self.lm.device}, "
                              f"memory cap {cap}, longest prompt {max(self.prompts.lengths)} tokens)")
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
        """This rank's share of the batches (all of them in a single process), with a progress bar on rank 0."""
        batches = distributed.shard(self.batches())
        for b in batches:
            self.owned[b.index] = True
        show = self.progress and distributed.is_main() and len(batches) >= 2
        yield from tqdm(batches, desc=desc, unit="batch", disable=not show, file=sys.stderr, leave=False)

    def for_each(self, desc: str, step: Callable[[Batch], None]) -> None:
        """step(batch) for every batch of this rank, retrying a batch that runs out of memory as two halves."""
        for batch in self.iterate(desc):
            self._guarded(batch, step)
        if distributed.world_size() > 1:   # a note one rank made (an out-of-memory split) reaches rank 0's report
            for part in distributed.gather(list(self.notes)):
                self.notes.extend(n for n in part if n not in self.notes)

    def _guarded(self, batch: Batch, step: Callable[[Batch], None]) -> None:
        if self.max_rows is not None and batch.size > self.max_rows:
            for part in split_batch(batch):
                self._guarded(part, step)
            return
        try:
            step(batch)
        except Exception as err:  # noqa: BLE001  (re-raised unless it is an out-of-memory error)
            if not is_oom(err):
                raise
            if batch.size == 1:
                raise UsageError(f"out of memory on a single prompt of {int(batch.lengths[0])} tokens; use a "
                                 f"smaller --dtype, more devices, --max-memory with offload, or shorter prompts"
                                 ) from None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = (batch.size + 1) // 2
            if self.max_rows is None or half < self.max_rows:
                self.max_rows = half
                self.notes.append(f"out of memory at {batch.size} prompts per batch: batches were split to at "
                                  f"most {half} and retried (no prompt lost or counted twice)")
            for part in split_batch(batch):
                self._guarded(part, step)

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


def is_oom(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(err, oom)) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def split_batch(batch: Batch) -> tuple[Batch, Batch]:
    """The batch's rows in two halves, each trimmed to its own longest prompt."""
    half = (batch.size + 1) // 2

    def part(rows: slice) -> Batch:
        lengths = batch.lengths[rows]
        S = int(lengths.max())
        return Batch(batch.index[rows], batch.input_ids[rows, :S], batch.attention_mask[rows, :S], lengths)
    return part(slice(0, half)), part(slice(half, None))


def valid_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of a [N, D] capture that are not NaN (positions a prompt does not have are NaN)."""
    return x[~torch.isnan(x).any(dim=-1)]


def query_mask(lengths: torch.Tensor, S: int, t: int) -> torch.Tensor:
    """[B, S] bool: the queries averaged for key t, q in [max(QUERY_START, t + 1), length).

    The reference used q >= 4 for every key, which includes causally masked queries (q < t) for t > 4
    (MODES.md section 8.3); for t <= 4 the two definitions agree."""
    q = torch.arange(S, device=lengths.device).view(1, -1)
    return (q >= max(QUERY_START, t + 1)) & (q < lengths.view(-1, 1))
