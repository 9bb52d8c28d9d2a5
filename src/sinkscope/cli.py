"""The one argument parser (the reference's flag spelling) and the dispatcher. No science lives here.

    sinkscope --scan --print qkv
    python analyze_sink.py --decompose-output --layer 11
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from .errors import UsageError

# (mode, function name in MODES_IMPL) in the reference's dispatch order (MODES.md section 0). The first mode
# set wins, except that --find-mlp-subspace and --decompose-output may be combined, as in the reference.
DISPATCH = ("decompose_mlp_in", "ablate_mlp_out", "scan", "find_mlp_subspace", "decompose_output")
COMBINABLE = {"find_mlp_subspace", "decompose_output"}


def _int_or_auto(s: str):
    return s if s == "auto" else int(s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sinkscope", description="Find out how attention sinks form (the five reference experiments).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    modes = p.add_argument_group("modes (the reference's flags)")
    modes.add_argument("--scan", action="store_true", help="per-layer K/V/attention/MLP-out statistics of sink keys")
    modes.add_argument("--decompose-output", action="store_true", help="norm/spread of Y = r + a + m at --layer")
    modes.add_argument("--find-mlp-subspace", action="store_true", help="which z dims write the massive vector")
    modes.add_argument("--ablate-mlp-out", choices=("direction", "magnitude"), default=None,
                       help="ablate token 0's MLP output at --layer and measure later sink attention")
    modes.add_argument("--decompose-mlp-in", action="store_true",
                       help="which MLP-input directions drive the top z dims (gradients, causal test)")

    m = p.add_argument_group("model")
    m.add_argument("--model", default="smollm2-135m",
                   help="built-in name (smollm2-135m), Hugging Face hub id, local folder or .gguf file")
    m.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="weights dtype; auto = fp32 on CPU, bf16 on CUDA. Statistics are always fp32")
    m.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N; auto spreads over all GPUs (accelerate)")
    m.add_argument("--attn-impl", default="auto", choices=("auto", "sdpa", "eager"),
                   help="attention kernel the model runs (auto: sdpa where the model supports it, else eager); "
                        "sink attention is recomputed exactly either way")

    d = p.add_argument_group("prompts")
    d.add_argument("--prompt-file", default="prose56.txt",
                   help="one prompt per line; built-in: prose56.txt (56 prompts), natural_mixed.txt (512)")
    d.add_argument("--bos", default="auto", choices=("auto", "always", "never"),
                   help="token 0: the tokenizer's default (auto), always the BOS token, or never a BOS")
    d.add_argument("--shuffle-seed", type=int, default=None, help="seeded token shuffle within each prompt (off)")
    d.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    d.add_argument("--batch-size", type=_int_or_auto, default=16, help="prompts per forward pass, or auto")

    e = p.add_argument_group("experiment")
    e.add_argument("--layer", type=int, default=0, help="the block L studied by the layer modes")
    e.add_argument("--print", dest="print_kind", default="qkv", choices=("qkv", "heatmap"), help="--scan output")
    e.add_argument("--head", type=int, default=0, help="head for --print heatmap")
    e.add_argument("--sink-idx", type=int, nargs="+", default=[0], help="key tokens t scanned")
    e.add_argument("--scan-interval", type=int, default=1, help="scan layers 0, i, 2i, ...")
    e.add_argument("--tokens", type=int, nargs="+", default=[0, 1, 8],
                   help="tokens (table columns) for --decompose-output and --find-mlp-subspace")
    e.add_argument("--mlp", nargs="*", default=None, choices=("z", "g", "u", "residual"),
                   help="--find-mlp-subspace sections (default: all)")
    e.add_argument("--te-k", type=int, default=3, help="top-energy dims: k")
    e.add_argument("--te-mass", type=float, default=0.55, help="top-energy dims: median mass threshold")
    e.add_argument("--vec-idx", type=int, nargs="+", default=None,
                   help="z dims (W_down columns) to use instead of the top-energy dims")
    e.add_argument("--ablate-tok", type=int, default=0, help="token whose MLP output/input is ablated")
    e.add_argument("--ref-tok", type=int, default=8, help="reference (non-sink) token")
    e.add_argument("--seed", type=int, default=19, help="seed of random controls and permutation tests")

    o = p.add_argument_group("output")
    o.add_argument("--outdir", default="results", help="folder for JSON and PNG outputs")
    o.add_argument("--no-plots", action="store_true", help="write JSON only")
    o.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _modes(args) -> list[str]:
    chosen = [m for m in DISPATCH if getattr(args, m)]
    if not chosen:
        return []
    if chosen[0] in COMBINABLE:
        return [m for m in chosen if m in COMBINABLE]
    return chosen[:1]


def _describe_prompts(lm, prompts) -> str:
    from collections import Counter
    first = Counter(int(ids[0]) for ids in prompts.ids)
    tok_id, count = first.most_common(1)[0]
    text = lm.tokenizer.convert_ids_to_tokens(tok_id) if lm.tokenizer is not None else str(tok_id)
    lens = prompts.lengths
    return (f"[prompts] {len(prompts)} prompts, {min(lens)}-{max(lens)} tokens; bos={prompts.bos}; "
            f"token 0 is {text!r} (id {tok_id}) in {count}/{len(prompts)}"
            + (f"; tokens shuffled with seed {prompts.shuffle_seed}" if prompts.shuffle_seed is not None else ""))


def run(args) -> int:
    from . import report
    from .experiments import registry
    from .model import load_model
    from .prompts import read_prompt_file, tokenize
    from .runner import RunContext

    modes = _modes(args)
    texts = read_prompt_file(args.prompt_file)
    if args.max_prompts is not None:
        if args.max_prompts < 1:
            raise UsageError(f"--max-prompts must be >= 1, not {args.max_prompts}")
        texts = texts[:args.max_prompts]
    t0 = time.time()
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # the weight-loading bar is noise here; our own bars stay
    lm = load_model(args.model, dtype=args.dtype, device=args.device, attn_implementation=args.attn_impl)
    print(f"[model] {args.model} ({lm.adapter.model_type}, {lm.n_layers} layers, {lm.dtype}, {lm.device}) "
          f"loaded in {time.time() - t0:.1f}s from {lm.source}", file=sys.stderr)
    prompts = tokenize(lm.tokenizer, texts, bos=args.bos, shuffle_seed=args.shuffle_seed)
    print(_describe_prompts(lm, prompts), file=sys.stderr)
    outdir = Path(args.outdir)
    for mode in modes:
        ctx = RunContext(lm, prompts, batch_size=args.batch_size, progress=not args.no_progress)
        result = registry.RUNNERS[mode](ctx, args)
        print(report.render(result, outdir, plots=not args.no_plots))
    meta = {"argv": sys.argv[1:], "modes": modes, "model": args.model, "model_type": lm.adapter.model_type,
            "source": lm.source, "dtype": str(lm.dtype), "device": str(lm.device), "n_prompts": len(prompts),
            "bos": args.bos, "shuffle_seed": args.shuffle_seed, "seed": args.seed, "python": platform.python_version()}
    try:
        import torch
        import transformers
        meta.update(torch=torch.__version__, transformers=transformers.__version__)
    except ImportError:  # pragma: no cover
        pass
    (outdir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not _modes(args):
        parser.error("choose a mode: --scan, --decompose-output, --find-mlp-subspace, --ablate-mlp-out or "
                     "--decompose-mlp-in")
    try:
        return run(args)
    except UsageError as err:
        print(f"sinkscope: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sinkscope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
