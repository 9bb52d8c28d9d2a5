"""Prompt files -> token ids (BOS policy, optional seeded shuffle) -> length-bucketed, right-padded batches."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .errors import UsageError

DEFAULT_PROMPT_FILE = "prose56.txt"
BUILTIN_PROMPT_FILES = ("prose56.txt", "natural_mixed.txt")


class PromptError(UsageError):
    """Bad prompt input (missing, unreadable or empty file; impossible token request)."""


def read_prompt_file(path: str | None = None) -> list[str]:
    """One prompt per non-empty stripped line, read as UTF-8. A bare built-in name reads package data."""
    name = path or DEFAULT_PROMPT_FILE
    if name in BUILTIN_PROMPT_FILES and not Path(name).exists():
        text = resources.files("sinkscope").joinpath("data", name).read_text(encoding="utf-8")
    else:
        p = Path(name).expanduser()
        if not p.is_file():
            raise PromptError(f"prompt file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise PromptError(f"cannot read prompt file {p} as UTF-8 text: {err}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptError(f"prompt file {name} holds no prompts (every line is empty)")
    return prompts


@dataclass
class Prompts:
    """Tokenised prompts. ids[n] is a 1-D LongTensor; `n_special[n]` leading ids are special tokens."""
    texts: list[str]
    ids: list[torch.Tensor]
    bos: str
    shuffle_seed: int | None

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.ids]

    def __len__(self) -> int:
        return len(self.ids)


def tokenize(tokenizer, texts: list[str], bos: str = "auto", shuffle_seed: int | None = None) -> Prompts:
    """Tokenise each prompt on its own with the tokenizer's default special tokens.

    bos: "auto" keeps the tokenizer's own behaviour; "always" makes token 0 the BOS token (prepended if the
    tokenizer did not add it); "never" removes a leading BOS. Token 0 is thus always chosen knowingly.
    shuffle_seed: if set, permute each prompt's tokens with a seeded generator; leading special tokens stay first.
    """
    if bos not in ("auto", "always", "never"):
        raise PromptError(f"--bos must be auto, always or never, not {bos!r}")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos == "always" and bos_id is None:
        raise PromptError("--bos always: this tokenizer has no BOS token")
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    gen = torch.Generator().manual_seed(shuffle_seed) if shuffle_seed is not None else None
    out = []
    for text in texts:
        ids = list(tokenizer(text)["input_ids"])
        if bos == "always" and (not ids or ids[0] != bos_id):
            ids = [bos_id] + ids
        elif bos == "never":
            while ids and bos_id is not None and ids[0] == bos_id:
                ids = ids[1:]
        t = torch.tensor(ids, dtype=torch.long)
        if gen is not None:
            n_lead = 0
            while n_lead < len(ids) and ids[n_lead] in special:
                n_lead += 1
            perm = torch.randperm(len(ids) - n_lead, generator=gen) + n_lead
            t = torch.cat([t[:n_lead], t[perm]])
        out.append(t)
    if any(len(t) == 0 for t in out):
        raise PromptError("a prompt tokenised to zero tokens")
    return Prompts(texts=list(texts), ids=out, bos=bos, shuffle_seed=shuffle_seed)


@dataclass
class Batch:
    index: torch.Tensor          # [B] prompt indices into the Prompts object
    input_ids: torch.Tensor      # [B, S] right-padded
    attention_mask: torch.Tensor  # [B, S] 1 = real token
    lengths: torch.Tensor        # [B]

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]


def make_batches(prompts: Prompts, batch_size: int, pad_id: int = 0, bucket: bool = True) -> list[Batch]:
    """Right-padded batches. With `bucket`, prompts are sorted by length first so padding stays small;
    every statistic is order-free or carries the prompt index, so results do not depend on this."""
    assert batch_size >= 1, batch_size
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts.ids[i]), i)) if bucket else list(range(len(prompts)))
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        lens = [len(prompts.ids[i]) for i in idx]
        S = max(lens)
        ids = torch.full((len(idx), S), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), S), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, :lens[row]] = prompts.ids[i]
            mask[row, :lens[row]] = 1
        batches.append(Batch(torch.tensor(idx), ids, mask, torch.tensor(lens)))
    return batches


def auto_batch_size(n_layers: int, hidden: int, n_heads: int, max_len: int, dtype_bytes: int,
                    device: torch.device, vocab: int = 0) -> int:
    """Pick a batch size from free memory: a rough per-sequence activation estimate with 4x headroom."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        try:
            import psutil  # optional
            free = psutil.virtual_memory().available
        except ImportError:
            free = _linux_available_bytes()
    per_seq = max_len * (hidden * 16 * dtype_bytes + n_heads * max_len * 4 * 2) + max_len * hidden * 4 * 8
    budget = free * 0.25
    return int(max(1, min(256, budget // max(per_seq, 1))))


def padded_tokens(lengths: list[int], batch_size: int) -> int:
    """Tokens actually run (padding included) by length-bucketed batches of `batch_size` (make_batches)."""
    s = sorted(lengths)
    return sum(s[min(i + batch_size, len(s)) - 1] * len(s[i:i + batch_size]) for i in range(0, len(s), batch_size))


# Beyond 16 prompts per batch a CPU gains nothing (measured on the default model: 16 and 8 are fastest) and
# padding grows; larger batches pay on a GPU.
CPU_MAX_BATCH = 16


def choose_batch_size(lengths: list[int], memory_cap: int, device: torch.device, max_waste: float = 0.2) -> int:
    """`--batch-size auto`: the largest batch size within `memory_cap` (see auto_batch_size) whose length-bucketed
    batches pad at most `max_waste` extra tokens (a fraction of the real ones); at most CPU_MAX_BATCH on a CPU."""
    cap = max(1, min(memory_cap, len(lengths)))
    if device.type == "cpu":
        cap = min(cap, CPU_MAX_BATCH)
    real = sum(lengths)
    best = 1
    for bs in sorted({2 ** i for i in range(cap.bit_length())} | {cap}):
        if bs <= cap and padded_tokens(lengths, bs) <= (1 + max_waste) * real:
            best = bs
    return best


def _linux_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30
