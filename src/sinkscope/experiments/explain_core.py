"""`explain`'s thresholds (one dataclass), its result types, and the verdict: claims and a plain-words paragraph
generated from the steps' numbers. No model code here: everything reads the numbers the steps recorded."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from ..errors import UsageError
from ..result import Result

CLAIM_IDS = ("where", "who", "what", "A_causal", "B_geometric")


def _t(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ExplainThresholds:
    """Every threshold explain decides with. Declared in every output; override any of them (CLI: --NAME)."""
    epsilon: float = _t(0.3, "a sink layer: the mean sink attention to token 0 (queries q >= 4) is > epsilon "
                             "(Gu et al.'s threshold)")
    birth_strong: float = _t(10.0, "a birth run starts at a block where token 0's norm ratio ||y||/||r|| is >= this "
                                   "times the other tokens' ratio")
    birth_weak: float = _t(2.0, "... and extends over neighbouring blocks where it is >= this times the others'")
    massive_ratio: float = _t(10.0, "token 0 is massive where its norm is >= this times the other tokens' (after a "
                                    "birth run; at block 0's input: massive from the embedding)")
    who_share: float = _t(0.8, "the attention (or the MLP) writes the jump when its share of ||a + m||^2 is >= this")
    energy_mass: float = _t(0.9, "adaptive k: the smallest k whose top-k z dims hold this median energy mass at "
                                 "token 0")
    max_k: int = _t(8, "adaptive k: at most this many z dims")
    a_min_drop: float = _t(0.5, "(A) holds when the joint ablation lowers the later sink attention by >= this "
                                "fraction ...")
    a_control_tol: float = _t(0.05, "... and the random controls' 95% CI of the change includes 0 or lies within "
                                    "+- this fraction of the baseline")
    b_min_d: float = _t(2.0, "(B) holds when token 0 against every baseline group has Cohen's d >= this ...")
    b_max_p: float = _t(0.01, "... and a permutation p <= this")

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}

    def check(self) -> "ExplainThresholds":
        def bad(name, why):
            raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)} {why}")
        if not 0 < self.epsilon < 1:
            bad("epsilon", "must be in (0, 1)")
        if not self.birth_strong >= self.birth_weak > 1:
            bad("birth_weak", f"must be > 1 and <= --birth-strong ({self.birth_strong})")
        if not self.massive_ratio > 1:
            bad("massive_ratio", "must be > 1")
        if not 0.5 < self.who_share <= 1:
            bad("who_share", "must be in (0.5, 1]")
        if not 0 < self.energy_mass <= 1:
            bad("energy_mass", "must be in (0, 1]")
        if isinstance(self.max_k, bool) or not isinstance(self.max_k, int) or self.max_k < 1:
            bad("max_k", "must be an integer >= 1")
        if not 0 < self.a_min_drop <= 1:
            bad("a_min_drop", "must be in (0, 1]")
        if not 0 <= self.a_control_tol < 1:
            bad("a_control_tol", "must be in [0, 1)")
        if not self.b_min_d > 0:
            bad("b_min_d", "must be > 0")
        if not 0 < self.b_max_p <= 1:
            bad("b_max_p", "must be in (0, 1]")
        return self

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Claim:
    id: str
    text: str
    holds: bool | None            # None: not tested (the reason is in the text)
    numbers: dict
    thresholds: dict

    @property
    def mark(self) -> str:
        return {True: "✓", False: "✗", None: "–"}[self.holds]


@dataclass
class ExplainResult(Result):
    model: str
    model_type: str
    n_layers: int
    n_prompts: int
    seed: int
    thresholds: ExplainThresholds
    token0: dict                  # {text, token, id, is_bos, is_special, share}
    sink_layers: list[int]
    birth_layers: list[int]
    steps: dict                   # where, who, what, A_causal, B_geometric (+ metrics): each step's numbers
    claims: list[Claim] = field(default_factory=list)
    verdict: str = ""             # found | partial | not found | different mechanism
    headline: str = ""
    summary: str = ""
    passes: dict = field(default_factory=dict)   # forward passes over the prompts, per step
    seconds: dict = field(default_factory=dict)  # wall time, per step
    notes: list[str] = field(default_factory=list)

    def claim(self, cid: str) -> Claim:
        return next(c for c in self.claims if c.id == cid)


@dataclass
class ExplainComparison(Result):
    """Several models' explain results, compared side by side (one column per model)."""
    results: list[ExplainResult]


# -- formatting helpers (also used by the reports) ------------------------------------------------------------------

def fnum(x, digits: int = 3) -> str:
    """A number for prose: 3 significant digits, thousands separated; n/a for missing."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) >= 1000):
        return f"{int(x):,}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def ranges(layers) -> str:
    """[3, 4, 5, 9, 12, 13] -> '3–5, 9, 12–13'."""
    layers = sorted(int(l) for l in layers)
    if not layers:
        return "none"
    out, start, prev = [], layers[0], layers[0]
    for l in layers[1:] + [None]:
        if l is not None and l == prev + 1:
            prev = l
            continue
        out.append(f"{start}" if start == prev else f"{start}–{prev}")
        if l is not None:
            start = prev = l
    return ", ".join(out)


def pct(x) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    v = round(100 * x)
    return f"{0 if v == 0 else v}%"


def fci(ci) -> str:
    """A CI of a change, with enough digits to tell a tiny effect from none."""
    lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "[n/a]"
    return f"[{lo:+.3g}, {hi:+.3g}]"
