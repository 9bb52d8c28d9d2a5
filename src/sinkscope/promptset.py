"""Prompt files -> token ids (BOS policy, optional seeded shuffle) -> length-bucketed, right-padded batches.

    ps = load_prompts("prose56.txt", bos="auto", shuffle_seed=None)   # a PromptSet: texts + where they came from
    prompts = ps.tokenize(lm.tokenizer)                                # Prompts: token ids, one tensor per prompt

Prompt files are UTF-8 (a byte-order mark is dropped); one prompt per line, split on "\n" or "\r\n" only (not on
U+2028 or form feeds); each line is stripped and empty lines are skipped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from .errors import UsageError

DEFAULT_PROMPT_FILE = "prose56.txt"
BUILTIN_PROMPT_FILES = ("prose56.txt", "natural_mixed.txt")


class PromptError(UsageError):
    """Bad prompt input (missing, unreadable or empty file; impossible token request)."""


SEED_MAX = 2 ** 63 - 1   # seeds are 0 .. 2^63 - 1 (what every generator here accepts)


def _read_bytes(path: str | None) -> tuple[bytes, str]:
    """(file bytes, the name it is known by). A bare built-in name reads package data."""
    name = path or DEFAULT_PROMPT_FILE
    if name in BUILTIN_PROMPT_FILES and not Path(name).exists():
        return resources.files("sinkscope").joinpath("data", name).read_bytes(), name
    p = Path(name).expanduser()
    if p.is_dir():
        raise PromptError(f"prompt file {p} is a directory, not a file")
    if not p.exists():
        raise PromptError(f"prompt file not found: {p}")
    try:
        return p.read_bytes(), str(p)
    except OSError as err:
        raise PromptError(f"cannot read prompt file {p}: {err.strerror or err}") from None


def split_prompts(data: bytes, name: str = "<bytes>") -> list[str]:
    """UTF-8 (BOM dropped) -> one prompt per non-empty stripped line, split on \\n and \\r\\n only."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise PromptError(f"cannot read prompt file {name} as UTF-8 text: {err}") from None
    prompts = [line.strip() for line in text.split("\n") if line.strip()]
    if not prompts:
        raise PromptError(f"prompt file {name} holds no prompts (every line is empty)")
    return prompts


def read_prompt_file(path: str | None = None) -> list[str]:
    """One prompt per non-empty stripped line (see the module docstring). A bare built-in name reads package data."""
    data, name = _read_bytes(path)
    return split_prompts(data, name)


def check_seed(value, flag: str = "--seed") -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise PromptError(f"{flag} must be an integer, not {value!r}")
    if not 0 <= value <= SEED_MAX:
        raise PromptError(f"{flag} must be between 0 and 2^63 - 1, not {value}")
    return value


@dataclass
class PromptSet:
    """Prompt texts before tokenisation, with where they came from (for provenance) and how to tokenise them."""
    texts: list[str]
    source: str                     # the file (or built-in name) read, or "<list>"
    sha256: str                     # of the file's bytes (or of the texts joined by "\n" for a list)
    bos: str = "auto"
    shuffle_seed: int | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.texts)

    def tokenize(self, tokenizer) -> "Prompts":
        key = id(tokenizer)
        if key not in self._cache:
            p = tokenize(tokenizer, self.texts, bos=self.bos, shuffle_seed=self.shuffle_seed)
            p.source, p.sha256 = self.source, self.sha256
            self._cache[key] = p
        return self._cache[key]


def load_prompts(file_or_list=None, bos: str = "auto", shuffle_seed: int | None = None,
                 max_prompts: int | None = None) -> PromptSet:
    """A PromptSet from a prompt file (a path or a built-in name; default prose56.txt) or a list of strings."""
    if bos not in ("auto", "always", "never"):
        raise PromptError(f"--bos must be auto, always or never, not {bos!r}")
    check_seed(shuffle_seed, "--shuffle-seed")
    if max_prompts is not None and (isinstance(max_prompts, bool) or not isinstance(max_prompts, int)
                                    or max_prompts < 1):
        raise PromptError(f"--max-prompts must be >= 1, not {max_prompts}")
    if file_or_list is None or isinstance(file_or_list, (str, Path)):
        data, name = _read_bytes(None if file_or_list is None else str(file_or_list))
        texts, source, digest = split_prompts(data, name), name, hashlib.sha256(data).hexdigest()
    else:
        texts = [str(t) for t in file_or_list]
        bad = [i for i, t in enumerate(texts) if not t.strip()]
        if not texts or bad:
            raise PromptError("the prompt list is empty" if not texts else f"prompt {bad[0]} of the list is empty")
        source, digest = "<list>", hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
    if max_prompts is not None:
        texts = texts[:max_prompts]
    return PromptSet(texts, source, digest, bos=bos, shuffle_seed=shuffle_seed)


@dataclass
class Prompts:
    """Tokenised prompts. ids[n] is a 1-D LongTensor."""
    texts: list[str]
    ids: list[torch.Tensor]
    bos: str
    shuffle_seed: int | None
    source: str = "<list>"          # where the texts came from (PromptSet.source)
    sha256: str | None = None       # of the prompt file (PromptSet.sha256)
    notes: list[str] = field(default_factory=list)   # e.g. which prompts were truncated

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
    empty = [i for i, t in enumerate(out) if len(t) == 0]
    if empty:
        raise PromptError(f"prompt {empty[0] + 1} ({texts[empty[0]][:40]!r}) tokenised to zero tokens")
    return Prompts(texts=list(texts), ids=out, bos=bos, shuffle_seed=shuffle_seed)


def fit_to_model(prompts: Prompts, max_positions: int | None, truncate: bool = False) -> Prompts:
    """Refuse prompts longer than the model's maximum positions, naming the first such prompt and the limit; with
    `truncate`, cut them to the limit instead and say so in `prompts.notes`. Returns the (possibly new) Prompts."""
    if not max_positions:
        return prompts
    long = [i for i, t in enumerate(prompts.ids) if len(t) > max_positions]
    if not long:
        return prompts
    if not truncate:
        i = long[0]
        raise PromptError(
            f"prompt {i + 1} ({prompts.texts[i][:40]!r}...) has {len(prompts.ids[i])} tokens, more than this model's "
            f"{max_positions} positions ({len(long)} prompt(s) are too long); shorten them or pass --truncate")
    ids = [t[:max_positions] if len(t) > max_positions else t for t in prompts.ids]
    note = (f"{len(long)} prompt(s) longer than the model's {max_positions} positions were truncated to "
            f"{max_positions} tokens (--truncate): prompt(s) {', '.join(str(i + 1) for i in long[:10])}"
            + (" ..." if len(long) > 10 else ""))
    return Prompts(texts=prompts.texts, ids=ids, bos=prompts.bos, shuffle_seed=prompts.shuffle_seed,
                   source=prompts.source, sha256=prompts.sha256, notes=prompts.notes + [note])


def truncate_to(prompts: Prompts, length: int) -> Prompts:
    """Every prompt cut to its first `length` tokens (e.g. Gu et al.'s T = 64)."""
    ids = [t[:length] for t in prompts.ids]
    return Prompts(texts=prompts.texts, ids=ids, bos=prompts.bos, shuffle_seed=prompts.shuffle_seed,
                   source=prompts.source, sha256=prompts.sha256, notes=list(prompts.notes))


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


# --batch-size auto: bytes per token of one sequence that a forward pass with capture holds at its peak layer
ACT_WIDTHS_PER_TOKEN = 16      # model-dtype activations of width D alive at once (residual, q/k/v, MLP up/gate/act)
CAPTURE_WIDTHS_PER_TOKEN = 8   # fp32 copies of width D the hooks keep (residual sites, reductions)
SCORE_COPIES = 2               # fp32 [H, S, S] score + probability buffers of an eager attention layer
FREE_MEMORY_SHARE = 0.25       # use at most this share of the free memory (4x headroom for the allocator)
MAX_AUTO_BATCH = 256


def auto_batch_size(n_layers: int, hidden: int, n_heads: int, max_len: int, dtype_bytes: int,
                    device: torch.device, vocab: int = 0) -> int:
    """The largest batch that fits, from the free memory of `device` (after the weights are loaded):

        per_seq = S * D * (ACT_WIDTHS_PER_TOKEN * dtype_bytes + CAPTURE_WIDTHS_PER_TOKEN * 4)
                  + H * S * S * 4 * SCORE_COPIES
        batch   = clamp(FREE_MEMORY_SHARE * free // per_seq, 1, MAX_AUTO_BATCH)

    with S the longest prompt, D the hidden size and H the heads. Activations are freed layer by layer (no
    gradients), so the layer count does not enter. The score term bounds eager attention; SDPA and the chunked
    sink recomputation (attention.QUERY_CHUNK) need less, so the estimate errs on the safe side. An error
    left over is caught by RunContext.for_each (the batch is halved and retried)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        try:
            import psutil  # optional
            free = psutil.virtual_memory().available
        except ImportError:
            free = _linux_available_bytes()
    per_seq = (max_len * hidden * (ACT_WIDTHS_PER_TOKEN * dtype_bytes + CAPTURE_WIDTHS_PER_TOKEN * 4)
               + n_heads * max_len * max_len * 4 * SCORE_COPIES)
    return int(max(1, min(MAX_AUTO_BATCH, FREE_MEMORY_SHARE * free // max(per_seq, 1))))


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
