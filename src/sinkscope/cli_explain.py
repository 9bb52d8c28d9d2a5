"""`sinkscope explain [--model M ...]`: the parser and the dispatcher of the explain subcommand. No science here: it
checks every flag, then calls the Python API (`api.explain`, `api.explain_compare`) and saves the report.

    sinkscope explain                                   # the default model, prose56.txt -> results/explain/
    sinkscope explain --model A --model B --outdir out  # one report with a column per model

Order of work: parse -> check every value (thresholds, seeds, counts, duplicate models) and the output folder ->
read the prompt file -> read each model's config (no weights) and refuse models with fewer than 3 layers -> for each
model: load, explain, free -> save one report (OUTDIR/explain/report.{html,json,md}). Known errors print one line,
`sinkscope: error: ...`, and exit with code 2.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

from .errors import UsageError

MIN_LAYERS = 3


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage first)
        raise UsageError(message)


def _int_or_auto(s: str):
    return s if s == "auto" else int(s)


def build_parser() -> argparse.ArgumentParser:
    from .experiments.explain_core import ExplainThresholds
    p = _Parser(prog="sinkscope explain", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                description="Find where and how a model's attention sink forms, test it (A: causal, B: geometric) "
                            "and write OUTDIR/explain/report.html, report.json and report.md.")
    m = p.add_argument_group("model")
    m.add_argument("--model", action="append", default=None,
                   help="built-in name, hub id, folder or .gguf file; repeat to compare models side by side "
                        "(default: smollm2-135m)")
    m.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    m.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N")
    m.add_argument("--attn-impl", default="auto", choices=("auto", "sdpa", "eager"))
    d = p.add_argument_group("prompts")
    d.add_argument("--prompt-file", default="prose56.txt", help="one prompt per line (built-in: prose56.txt, "
                                                                "natural_mixed.txt)")
    d.add_argument("--bos", default="auto", choices=("auto", "always", "never"))
    d.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    d.add_argument("--truncate", action="store_true", help="cut prompts longer than the model's positions")
    d.add_argument("--batch-size", type=_int_or_auto, default=16, help="prompts per forward pass, or auto")
    e = p.add_argument_group("experiment")
    e.add_argument("--seed", type=int, default=19, help="seed of the random positions, controls, shuffle and "
                                                        "permutation tests")
    e.add_argument("--n-controls", type=int, default=10, help="(A): seeded random equal-rank controls")
    e.add_argument("--n-random", type=int, default=2, help="(B): random later positions per prompt")
    e.add_argument("--no-metrics", action="store_true", help="skip the literature metrics pass")
    t = p.add_argument_group("thresholds (declared in the report)")
    helps = ExplainThresholds.help()
    for name, value in ExplainThresholds().as_dict().items():
        t.add_argument("--" + name.replace("_", "-"), dest=name, type=type(value), default=value, help=helps[name])
    o = p.add_argument_group("output")
    o.add_argument("--outdir", default="results", help="the report goes to OUTDIR/explain/")
    o.add_argument("--no-progress", action="store_true", help="hide progress bars")
    from . import scale
    scale.add_flags(p)                                # --gpus-per-rank, --max-memory, --offload-folder
    return p


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def check_args(args):
    """Every value, before any file or model is read; returns the thresholds."""
    from .experiments.explain_core import ExplainThresholds
    from .checks import check_int
    from .promptset import check_seed
    models = args.model or ["smollm2-135m"]
    for i, a in enumerate(models):
        if not a.strip():
            raise UsageError("--model is empty")
        for b in models[:i]:
            if _same_model(a, b):
                raise UsageError(f"--model {a} is given twice; compare different models")
    check_seed(args.seed, "--seed")
    if args.batch_size != "auto" and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1 or auto, not {args.batch_size}")
    check_int("--n-controls", args.n_controls, 1)
    check_int("--n-random", args.n_random, 1)
    if args.max_prompts is not None and args.max_prompts < 2:
        raise UsageError(f"--max-prompts must be >= 2 (explain compares prompts), not {args.max_prompts}")
    th = ExplainThresholds(**{n: getattr(args, n) for n in ExplainThresholds.names()})
    return models, th.check()


def _check_layers(name: str) -> None:
    from .arch import text_config
    from .model import read_config
    config, _ = read_config(name)
    n = getattr(text_config(config), "num_hidden_layers", None)
    if n is not None and n < MIN_LAYERS:
        raise UsageError(f"--model {name} has {n} layer(s); explain needs at least {MIN_LAYERS} (a birth layer, a "
                         f"block before and a block after it)")


def run(args, argv: list[str]) -> int:
    from . import api, checks, distributed, scale
    models, th = check_args(args)
    scale.check_flags(args)
    outdir = checks.check_outdir(args.outdir)
    prompt_set = api.prompts(args.prompt_file, bos=args.bos, max_prompts=args.max_prompts)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()           # before the configs: the first GGUF conversion happens there
    for name in models:                         # configs only: a bad model fails before any weights load
        _check_layers(name)
    results = []
    with api.invoked_as(["explain", *argv]):
        for name in models:
            t0 = time.time()
            lm = api.load(name, dtype=args.dtype, attn_impl=args.attn_impl, **scale.load_kwargs(args))
            print(f"[model] {name} ({lm.adapter.model_type}, {lm.n_layers} layers, {lm.dtype}, {lm.device}) loaded "
                  f"in {time.time() - t0:.1f}s from {lm.source}", file=sys.stderr, flush=True)
            t0 = time.time()
            res = api.explain(lm, prompt_set, thresholds=th, seed=args.seed, n_controls=args.n_controls,
                              n_random=args.n_random, metrics=not args.no_metrics, batch_size=args.batch_size,
                              progress=not args.no_progress, truncate=args.truncate)
            print(f"[explain] {name}: {res.verdict} ({time.time() - t0:.1f}s after loading)", file=sys.stderr,
                  flush=True)
            results.append(res)
            del lm
            gc.collect()
        final = results[0] if len(results) == 1 else api.explain_compare(results)
    print(final.table(), flush=True)
    if not distributed.is_main():                     # data-parallel runs: rank 0 alone writes files
        return 0
    paths = final.save(outdir)
    print("[saved] " + ", ".join(str(p) for p in paths), file=sys.stderr, flush=True)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .report.common import WRITTEN
    start = len(WRITTEN)
    try:
        if any(a in ("-h", "--help") for a in argv):
            build_parser().print_help()
            return 0
        args = build_parser().parse_args(argv)
        from .scale import ranks
        with ranks(args):                             # torchrun: torch.distributed for the whole run
            return run(args, argv)
    except UsageError as err:
        from .distributed import env_is_main
        if env_is_main():                             # torchrun: one error line, not one per rank
            print(f"sinkscope: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        done = [str(p) for p in WRITTEN[start:]]
        print("sinkscope: interrupted; " + (f"completed files: {', '.join(done)}" if done else
                                            "no file was completed"), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
