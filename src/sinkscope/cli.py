"""The one argument parser (the reference's flag spelling) and the dispatcher. No science lives here.

    sinkscope --scan --print qkv
    python analyze_sink.py --decompose-output --layer 11

Order of work: parse -> check every flag value (checks.py) and the output folder -> read the prompt file -> read
the model's config and check the flags that depend on its shape -> load the weights -> run each mode given, in
the reference's dispatch order, through the Python API (api.py) -> print each result's table, save its files.
"""

from __future__ import annotations

import argparse
import sys
import time

from .errors import UsageError

# The modes, in the reference's dispatch order (MODES.md section 0). Every mode given on one command line runs.
MODE_ORDER = ("decompose_mlp_in", "ablate_mlp_out", "scan", "find_mlp_subspace", "decompose_output", "ablate_router")
MODE_ORDER += ("metrics", "ablate_super_weight")  # the literature metrics (issue 7)


def _int_or_auto(s: str):
    return s if s == "auto" else int(s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sinkscope", description="Find out how attention sinks form (the five reference experiments). "
        "Several modes may be given at once; each runs, in the reference's order.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    modes = p.add_argument_group("modes (the reference's flags)")
    modes.add_argument("--scan", action="store_true", help="per-layer K/V/attention/MLP-out statistics of sink keys")
    modes.add_argument("--decompose-output", action="store_true", help="norm/spread of Y = r + a + m at --layer")
    modes.add_argument("--find-mlp-subspace", action="store_true", help="which z dims write the massive vector")
    modes.add_argument("--ablate-mlp-out", choices=("direction", "magnitude"), default=None,
                       help="ablate token 0's MLP output at --layer and measure later sink attention")
    modes.add_argument("--decompose-mlp-in", action="store_true",
                       help="which MLP-input directions drive the top z dims (gradients, causal test)")

    r = p.add_argument_group("mixture of experts")
    r.add_argument("--ablate-router", choices=("forbid", "force"), default=None,
                   help="route token 0 away from (forbid) or to (force) --expert at MoE block --layer; measure the "
                        "later sink attention and the loss")
    r.add_argument("--expert", type=int, default=None, help="the expert E of --ablate-router")

    # -- literature metrics (issue 7) --
    lit = p.add_argument_group("literature metrics")
    lit.add_argument("--metrics", action="store_true", help="Gu/Sun/Yu/Guo et al.'s sink metrics in one pass")
    lit.add_argument("--epsilon", type=float, default=0.3, help="--metrics: Gu et al.'s threshold on alpha")
    lit.add_argument("--metric-len", type=int, default=None, help="--metrics: cut prompts to T tokens (paper: 64)")
    lit.add_argument("--ablate-super-weight", action="store_true",
                     help="zero Yu et al.'s super weight; measure massive activation, later sink attention, loss")

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
    d.add_argument("--truncate", action="store_true",
                   help="cut prompts longer than the model's maximum positions (default: refuse them)")
    d.add_argument("--batch-size", type=_int_or_auto, default=16, help="prompts per forward pass, or auto")

    e = p.add_argument_group("experiment")
    e.add_argument("--layer", type=int, default=0, help="the block L studied by the layer modes")
    e.add_argument("--print", dest="print_kind", default="qkv", choices=("qkv", "heatmap"), help="--scan output")
    e.add_argument("--head", type=int, default=0, help="head for --print heatmap")
    e.add_argument("--heatmap-size", type=int, default=128, help="--print heatmap: maps cover positions 0..N-1")
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
    e.add_argument("--n-controls", type=int, default=10,
                   help="--ablate-mlp-out direction, --decompose-mlp-in: seeded random controls drawn (the first "
                        "uses --seed); their mean, std and bootstrap CI are reported with the loss")

    o = p.add_argument_group("output")
    o.add_argument("--outdir", default="results", help="folder for JSON and PNG outputs")
    o.add_argument("--no-plots", action="store_true", help="write JSON only")
    o.add_argument("--no-progress", action="store_true", help="hide progress bars")
    from . import scale
    scale.add_flags(p)                                # --gpus-per-rank, --max-memory, --offload-folder
    return p


def chosen_modes(args) -> list[str]:
    return [m for m in MODE_ORDER if getattr(args, m)]


def mode_params(mode: str, a) -> dict:
    """CLI flags -> the keyword arguments of the API function of `mode` (api.py)."""
    mlp = dict(layer=a.layer, sink_tok=a.ablate_tok, ref_tok=a.ref_tok, vec_idx=a.vec_idx, te_k=a.te_k,
               te_mass=a.te_mass)
    if mode == "scan":
        heat = a.print_kind == "heatmap"
        return dict(sinks=a.sink_idx, interval=a.scan_interval, heatmap_head=a.head if heat else None,
                    heatmap_size=a.heatmap_size if heat else None)
    if mode == "decompose_output":
        return dict(layer=a.layer, tokens=a.tokens)
    if mode == "find_mlp_subspace":
        return dict(sections=a.mlp, tokens=a.tokens, **mlp)
    if mode == "ablate_mlp_out":
        return dict(mode=a.ablate_mlp_out, seed=a.seed, n_controls=a.n_controls, **mlp)
    if mode == "decompose_mlp_in":
        return dict(seed=a.seed, n_controls=a.n_controls, **mlp)
    if mode == "ablate_router":
        return dict(layer=a.layer, route=a.ablate_router, expert=a.expert, token=a.ablate_tok)
    if mode == "metrics":
        return dict(epsilon=a.epsilon, metric_len=a.metric_len)
    if mode == "ablate_super_weight":
        return dict(seed=a.seed)
    raise ValueError(mode)


def _describe_prompts(lm, prompts) -> str:
    from collections import Counter
    first = Counter(int(ids[0]) for ids in prompts.ids)
    tok_id, count = first.most_common(1)[0]
    text = lm.tokenizer.convert_ids_to_tokens(tok_id) if lm.tokenizer is not None else str(tok_id)
    lens = prompts.lengths
    return (f"[prompts] {len(prompts)} prompts, {min(lens)}-{max(lens)} tokens; bos={prompts.bos}; "
            f"token 0 is {text!r} (id {tok_id}) in {count}/{len(prompts)}"
            + (f"; tokens shuffled with seed {prompts.shuffle_seed}" if prompts.shuffle_seed is not None else ""))


def check_run_args(args) -> None:
    """Flag values that belong to no single mode."""
    from .promptset import check_seed
    if args.batch_size != "auto" and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1 or auto, not {args.batch_size}")
    if args.heatmap_size < 1:
        raise UsageError(f"--heatmap-size must be >= 1, not {args.heatmap_size}")
    check_seed(args.seed, "--seed")
    check_seed(args.shuffle_seed, "--shuffle-seed")


def run(args, argv: list[str]) -> int:
    from . import api, checks, distributed, scale
    from .arch import text_config
    from .model import read_config

    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # transformers' loading/converting bars are noise here; our own bars stay
    modes = chosen_modes(args)
    params = {m: mode_params(m, args) for m in modes}
    check_run_args(args)
    scale.check_flags(args)
    for m in modes:                                   # milliseconds: before any file or model is read
        checks.check_params(m, params[m])
    outdir = checks.check_outdir(args.outdir)
    prompt_set = api.prompts(args.prompt_file, bos=args.bos, shuffle_seed=args.shuffle_seed,
                             max_prompts=args.max_prompts)
    config, _ = read_config(args.model)               # the config only: shape checks before the weights
    for m in modes:
        checks.check_against_config(m, params[m], text_config(config))

    t0 = time.time()
    lm = api.load(args.model, dtype=args.dtype, attn_impl=args.attn_impl, **scale.load_kwargs(args))
    print(f"[model] {args.model} ({lm.adapter.model_type}, {lm.n_layers} layers, {lm.dtype}, {lm.device}, "
          f"attention {lm.attn_implementation}) loaded in {time.time() - t0:.1f}s from {lm.source}", file=sys.stderr)
    prompts = api.tokenized(lm, prompt_set, truncate=args.truncate)
    print(_describe_prompts(lm, prompts), file=sys.stderr)
    with api.invoked_as(argv):
        for m in modes:
            result = getattr(api, m)(lm, prompts, batch_size=args.batch_size, progress=not args.no_progress,
                                     **params[m])
            print(result.table(), flush=True)
            if not distributed.is_main():             # data-parallel runs: rank 0 alone writes files
                continue
            paths = result.save(outdir, plots=not args.no_plots)
            print("[saved] " + ", ".join(str(p) for p in paths), file=sys.stderr, flush=True)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "explain":
        from . import cli_explain
        return cli_explain.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not chosen_modes(args):
        parser.error("choose a mode: --scan, --decompose-output, --find-mlp-subspace, --ablate-mlp-out or "
                     "--decompose-mlp-in (or --ablate-router, --metrics, --ablate-super-weight)")
    from .report.common import WRITTEN
    start = len(WRITTEN)
    from .scale import ranks
    try:
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
