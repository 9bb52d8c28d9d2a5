"""Where a result came from: every JSON sinkscope writes carries this under "provenance".

    {"sinkscope": "0.2.0", "mode": "scan", "params": {...}, "argv": [...] or null, "command": "...",
     "model": {"name", "model_type", "source", "fingerprint", "revision", "dtype", "device", "attn_implementation"},
     "prompts": {"source", "sha256", "n", "min_len", "max_len", "bos", "shuffle_seed"},
     "seed": 19 or null, "versions": {...}, "time": "2026-11-28T12:00:00+00:00"}

The model fingerprint is a SHA-256 over config.json and, for every weight file (*.safetensors, *.bin, *.gguf),
its name, size and first MiB (the safetensors header and the first weights): cheap for a 100 GB checkpoint, yet
any re-export changes it. A hub model also records its commit (`revision`).
"""

from __future__ import annotations

import datetime
import hashlib
import platform
import shlex
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
HEAD_BYTES = 1 << 20
_FINGERPRINTS: dict[tuple, str | None] = {}


def fingerprint(source: str) -> str | None:
    """SHA-256 fingerprint of a local model folder or file (see the module docstring); None for a hub id."""
    p = Path(source)
    if not p.exists():
        return None
    files = sorted(f for f in (p.iterdir() if p.is_dir() else [p])
                   if f.is_file() and (f.name == "config.json" or f.suffix in WEIGHT_SUFFIXES))
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _FINGERPRINTS:
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0" + str(f.stat().st_size).encode() + b"\0")
            with open(f, "rb") as fh:
                h.update(fh.read() if f.name == "config.json" else fh.read(HEAD_BYTES))
        _FINGERPRINTS[key] = h.hexdigest()
    return _FINGERPRINTS[key]


def versions() -> dict:
    import numpy
    import torch
    import transformers

    from . import __version__
    return {"sinkscope": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__, "platform": platform.platform()}


def model_info(lm) -> dict:
    cfg = getattr(lm.model, "config", None)
    return {"name": lm.name, "model_type": lm.adapter.model_type, "source": lm.source,
            "fingerprint": fingerprint(lm.source), "revision": getattr(cfg, "_commit_hash", None),
            "n_layers": lm.n_layers, "dtype": str(lm.dtype).replace("torch.", ""), "device": str(lm.device),
            "attn_implementation": lm.attn_implementation}


def prompts_info(prompts) -> dict:
    lengths = prompts.lengths
    return {"source": getattr(prompts, "source", "<list>"), "sha256": getattr(prompts, "sha256", None),
            "n": len(lengths), "min_len": min(lengths), "max_len": max(lengths), "bos": prompts.bos,
            "shuffle_seed": prompts.shuffle_seed}


def provenance(lm, prompts, mode: str, params: dict, argv: list[str] | None = None) -> dict:
    """The provenance record of one run of one mode."""
    return {
        "sinkscope": versions()["sinkscope"], "mode": mode, "params": params, "argv": argv,
        "command": None if argv is None else " ".join(shlex.quote(a) for a in ["sinkscope", *argv]),
        "model": model_info(lm), "prompts": prompts_info(prompts), "seed": params.get("seed"),
        "versions": versions(), "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "world_size": _world_size(),     # data-parallel processes (torchrun); 1 in a single process
    }


def _world_size() -> int:
    from . import distributed
    return distributed.world_size()


__all__ = ["fingerprint", "provenance", "model_info", "prompts_info", "versions"]
