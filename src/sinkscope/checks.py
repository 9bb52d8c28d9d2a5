"""Parameter checks shared by the CLI and the Python API: every value is checked before any model work.

Three stages, cheapest first:
  check_params(mode, params)              pure values (ranges, combinations): no model needed
  check_against_config(mode, params, cfg)  what the model's config decides (layers, heads, widths): no weights
  check_outdir(path)                       an output folder that can be written
Each raises a one-line UsageError (the CLI prints it and exits with code 2).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import UsageError
from .promptset import SEED_MAX

# MLP width attributes by family (the first one present wins); MoE configs name the per-expert width.
FFN_WIDTH_ATTRS = ("moe_intermediate_size", "intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")
# Number-of-experts attributes of MoE configs (the first one present wins).
EXPERT_COUNT_ATTRS = ("num_local_experts", "num_experts", "n_routed_experts")
# Modes that draw a random subspace of the same rank as the chosen one, orthogonal to it.
RANDOM_CONTROL_MODES = ("ablate_mlp_out", "decompose_mlp_in")


def check_int(name: str, v, lo: int | None = None, hi: int | None = None) -> None:
    """A flag value that must be an integer in [lo, hi] (either bound optional); else a one-line UsageError."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise UsageError(f"{name} must be an integer, not {v!r}")
    if lo is not None and v < lo:
        raise UsageError(f"{name} must be >= {lo}, not {v}")
    if hi is not None and v > hi:
        raise UsageError(f"{name} must be <= {hi}, not {v}")


def _flag(key: str) -> str:
    return FLAG_NAMES.get(key, "--" + key.replace("_", "-"))


# API keyword -> the CLI flag a user would recognise in a message.
FLAG_NAMES = {"sinks": "--sink-idx", "interval": "--scan-interval", "heatmap_head": "--head",
              "sink_tok": "--ablate-tok", "ref_tok": "--ref-tok", "mode": "--ablate-mlp-out", "sections": "--mlp",
              "route": "--ablate-router", "token": "--ablate-tok"}


def check_params(mode: str, p: dict) -> None:
    """Pure checks of one mode's keyword arguments (the names of the API functions in api.py)."""
    for key in ("seed",):
        if p.get(key) is not None:
            check_int(_flag(key), p[key], 0, SEED_MAX)
    for key, lo in (("interval", 1), ("te_k", 1), ("n_controls", 1), ("metric_len", 2), ("heatmap_size", 1),
                    ("heatmap_head", 0), ("sink_tok", 0), ("ref_tok", 0), ("n_random", 1)):
        if p.get(key) is not None:
            check_int(_flag(key), p[key], lo)
    for key in ("sinks", "tokens", "vec_idx"):
        vals = p.get(key)
        if vals is None:
            continue
        if len(vals) == 0:
            raise UsageError(f"{_flag(key)} needs at least one value")
        for v in vals:
            check_int(_flag(key), v, 0)
    if p.get("vec_idx") is not None and len(set(p["vec_idx"])) != len(p["vec_idx"]):
        raise UsageError(f"--vec-idx has repeated dims: {' '.join(map(str, p['vec_idx']))}")
    if p.get("te_mass") is not None and not 0.0 <= float(p["te_mass"]) <= 1.0:
        raise UsageError(f"--te-mass must be in [0, 1], not {p['te_mass']}")
    if p.get("epsilon") is not None and not 0.0 < float(p["epsilon"]) < 1.0:
        raise UsageError(f"--epsilon must be in (0, 1), not {p['epsilon']}")
    if mode == "ablate_mlp_out" and p.get("mode") not in ("direction", "magnitude"):
        raise UsageError(f"--ablate-mlp-out must be direction or magnitude, not {p.get('mode')!r}")
    if mode == "ablate_mlp_out" and p.get("mode") == "magnitude":
        if p.get("vec_idx") is not None:
            raise UsageError("--vec-idx has no effect on --ablate-mlp-out magnitude (a rescaling of the whole MLP "
                             "output chooses no dims); drop it or use --ablate-mlp-out direction")
        if p.get("sink_tok") == p.get("ref_tok"):
            raise UsageError(f"--ablate-tok and --ref-tok are both {p.get('sink_tok')}: scaling a token's MLP output "
                             f"to its own norm changes nothing; choose a different --ref-tok")
    if mode == "ablate_router":
        if p.get("route") not in ("forbid", "force"):
            raise UsageError(f"--ablate-router must be forbid or force, not {p.get('route')!r}")
        if p.get("expert") is None:
            raise UsageError("--ablate-router needs --expert E (the expert to forbid or force)")
        check_int("--expert", p["expert"], 0)
        if p.get("token", 0) != 0:
            raise UsageError(f"--ablate-router measures the sink at token 0; --ablate-tok must be 0, not {p['token']}")
    if mode == "decompose_mlp_in" and p.get("sink_tok") == p.get("ref_tok"):
        raise UsageError(f"--ablate-tok and --ref-tok are both {p.get('sink_tok')}: the projection gap compares the "
                         f"sink token with a different reference token")


def ffn_width(config) -> int | None:
    for attr in FFN_WIDTH_ATTRS:
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    hidden = getattr(config, "hidden_size", None)
    return 4 * hidden if getattr(config, "model_type", None) == "gpt2" and hidden else None


def check_against_config(mode: str, p: dict, config) -> None:
    """Checks that need the model's shape (from its config; no weights are loaded)."""
    L = getattr(config, "num_hidden_layers", None)
    H = getattr(config, "num_attention_heads", None)
    D = getattr(config, "hidden_size", None)
    F = ffn_width(config)
    n_experts = next((v for v in (getattr(config, a, None) for a in EXPERT_COUNT_ATTRS) if isinstance(v, int)), 0)
    if L and p.get("layer") is not None:
        layer = p["layer"]
        check_int("--layer", layer)
        if not -L <= layer < L:
            raise UsageError(f"--layer {layer} is out of range: this model has layers 0..{L - 1}")
        if mode in RANDOM_CONTROL_MODES and layer % L == L - 1:
            raise UsageError(f"--layer {layer} is the last layer: there is no later layer to measure the sink at "
                             f"(use --layer 0..{L - 2})")
    if mode == "ablate_router" and n_experts and not p["expert"] < n_experts:
        raise UsageError(f"--expert {p['expert']} is out of range: this model has experts 0..{n_experts - 1}")
    if mode == "ablate_router" and not n_experts:
        raise UsageError("--ablate-router needs a mixture of experts; this model's config has no experts")
    if mode == "ablate_router" and L and p.get("layer") is not None and p["layer"] % L == L - 1:
        raise UsageError(f"--layer {p['layer']} is the last layer: there is no later layer to measure the sink at "
                         f"(use --layer 0..{L - 2})")
    if H and p.get("heatmap_head") is not None and p["heatmap_head"] >= H:
        raise UsageError(f"--head {p['heatmap_head']} is out of range: this model has heads 0..{H - 1}")
    if F and p.get("te_k") is not None and p["te_k"] > F:
        raise UsageError(f"--te-k {p['te_k']} is larger than the MLP width ({F} z dims)")
    if F and p.get("vec_idx") and not n_experts:  # a MoE's flat z is checked once the model is loaded
        bad = [i for i in p["vec_idx"] if i >= F]
        if bad:
            raise UsageError(f"--vec-idx {' '.join(map(str, bad))} is out of range: the MLP has z dims 0..{F - 1}")
    uses_control = mode in RANDOM_CONTROL_MODES and not (mode == "ablate_mlp_out" and p.get("mode") == "magnitude")
    if D and uses_control:
        rank = len(p["vec_idx"]) if p.get("vec_idx") else p.get("te_k", 3)
        if 2 * rank > D:
            raise UsageError(f"a rank-{rank} subspace leaves no room for a random control of the same rank "
                             f"orthogonal to it in {D} dimensions (needs 2 x rank <= {D}); lower --te-k or --vec-idx")


def check_outdir(path) -> Path:
    """An output folder that exists (created if needed) and can be written; a one-line error otherwise."""
    if path is None or str(path).strip() == "":
        raise UsageError("--outdir is empty; give a folder (default: results)")
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UsageError(f"--outdir {p} exists and is not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".sinkscope-write-test", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UsageError(f"--outdir {p} cannot be written: {err.strerror or err}") from None
    return p
