#!/usr/bin/env python
"""Time sinkscope against the model's own forward pass and against a reference-style loop.

Variants, all on the same model, prompts, dtype and device:

  floor       the headless body's plain batched forward (SDPA, no hooks, no LM head, inference mode),
              over the same length-bucketed batches and batch size as sinkscope;
  scan        sinkscope's `--scan --print qkv` (run_scan: every statistic, no plots);
  decompose   sinkscope's `--decompose-output --layer L` (run_decompose_output; it stops after block L);
  metrics     (opt-in) sinkscope's `--metrics` (run_metrics: Gu/Sun/Yu/Guo et al.'s metrics, one pass);
  reference   the reference's way: one prompt at a time through the full causal LM (LM head included) with
              eager attention, output_attentions=True and output_hidden_states=True, the sink attention
              computed from the returned maps.

Times are medians over --repeats rounds after one warm-up round; the rounds interleave the variants, so a
slow spell on a shared machine hits every variant alike. Peak memory is measured per variant in a fresh
subprocess that loads the model and runs the variant once: peak RSS (getrusage ru_maxrss) on CPU, and
torch.cuda.max_memory_allocated on GPU (weights included).

    PYTHONPATH=src python bench/bench.py                                   # default model, 56 prompts, CPU
    PYTHONPATH=src python bench/bench.py --prompt-file natural_mixed.txt   # the 512 prompts
    PYTHONPATH=src python bench/bench.py --seq-len 4096 --n-prompts 1 --variants floor,scan
    PYTHONPATH=src python bench/bench.py --tiny llama --repeats 2          # a dry run on a tiny model
    PYTHONPATH=src python bench/bench.py --shape qwen3-8b --device cuda --dtype bf16 \\
        --prompt-lengths bench/data/prose56_lengths.json                   # random-init Qwen3-8B shape
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
VARIANTS = ("floor", "scan", "decompose", "reference")
EXTRA_VARIANTS = ("explain", "metrics")   # opt-in (not in the default --variants)
CHILD_TAG = "SINKSCOPE_BENCH_CHILD "

# Built-in model shapes (random init from a config written here: no download, no tokenizer).
SHAPES = {
    "qwen3-8b": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu", attention_bias=False,
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643),
}


# --------------------------------------------------------------------------------------------- set-up

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model (one of)")
    m.add_argument("--model", default="smollm2-135m", help="anything sinkscope's --model accepts")
    m.add_argument("--tiny", metavar="FAMILY", default=None, help="a tiny random-init model from sinkscope.testing")
    m.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="a random-init model of this exact shape (config written in bench.py)")
    m.add_argument("--config-json", default=None, help="a random-init model from this transformers config.json")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (sinkscope's --device)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto = fp32 on CPU, bf16 on CUDA")
    d = p.add_argument_group("prompts")
    d.add_argument("--prompt-file", default="prose56.txt", help="prompt file (built-in names work)")
    d.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    d.add_argument("--seq-len", type=int, default=None, help="synthetic prompts of this many tokens (seeded)")
    d.add_argument("--n-prompts", type=int, default=1, help="number of synthetic prompts (with --seq-len)")
    d.add_argument("--prompt-lengths", default=None,
                   help="JSON list of token counts: synthetic prompts of these lengths (for tokenizer-free models)")
    d.add_argument("--seed", type=int, default=0, help="seed of synthetic token ids and random-init weights")
    d.add_argument("--batch-size", default="16", help="prompts per forward (sinkscope and floor), or auto")
    r = p.add_argument_group("run")
    r.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    r.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    r.add_argument("--sink-idx", type=int, nargs="+", default=[0], help="--scan sink keys")
    r.add_argument("--layer", type=int, default=0, help="--decompose-output layer")
    r.add_argument("--memory", default="subprocess", choices=("subprocess", "inprocess", "off"),
                   help="peak memory per variant: a fresh subprocess each (default), during the timed runs "
                        "(GPU only: max_memory_allocated is reset per run), or not at all")
    r.add_argument("--memory-variants", default=None,
                   help="comma-separated variants whose memory is measured (default: all that are timed)")
    r.add_argument("--reference-max-len", type=int, default=None,
                   help="skip the reference-style loop (noted) when the longest prompt exceeds this")
    r.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    r.add_argument("--label", default=None, help="a name for this workload in the output")
    r.add_argument("--json", dest="json_out", default=None, help="write the results as JSON here")
    r.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def model_label(args) -> str:
    if args.tiny:
        return f"tiny-{args.tiny}"
    if args.shape:
        return f"random-init {args.shape} shape"
    if args.config_json:
        return f"random-init {args.config_json}"
    return args.model


def build_model(args):
    """A sinkscope LoadedModel for --model / --tiny / --shape / --config-json."""
    from sinkscope.model import load_model, resolve_device, resolve_dtype, wrap_model
    if not (args.tiny or args.shape or args.config_json):
        return load_model(args.model, dtype=args.dtype, device=args.device, attn_implementation="sdpa")
    dev = resolve_device(args.device)
    dev = "cuda" if dev == "auto" else dev
    dtype = resolve_dtype(args.dtype, dev)
    if args.tiny:
        from sinkscope.testing import tiny_model
        lm = tiny_model(args.tiny, seed=args.seed, dtype=dtype)
        lm.model.to(dev)
        return wrap_model(lm.model, lm.tokenizer, name=lm.name, source="sinkscope.testing")
    from transformers import AutoConfig, AutoModelForCausalLM
    if args.shape:
        kw = dict(SHAPES[args.shape])
        cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    else:
        cfg = AutoConfig.from_pretrained(args.config_json)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.device(dev):  # parameters are created and initialised on the device itself
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
        except TypeError:  # older transformers spell it torch_dtype
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype, attn_implementation="sdpa")
    model.to(dev)
    print(f"[bench] built {model_label(args)} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, "
          f"{dtype}, {dev}) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return wrap_model(model, None, name=model_label(args), source="random init")


def build_prompts(args, lm):
    from sinkscope.promptset import Prompts, read_prompt_file, tokenize
    vocab = lm.config.vocab_size
    lengths = None
    if args.seq_len is not None:
        lengths = [args.seq_len] * args.n_prompts
    elif args.prompt_lengths:
        lengths = json.loads(Path(args.prompt_lengths).read_text())
        if args.max_prompts:
            lengths = lengths[:args.max_prompts]
    elif lm.tokenizer is None:
        raise SystemExit("bench: this model has no tokenizer; give --seq-len/--n-prompts or --prompt-lengths")
    if lengths is not None:
        g = torch.Generator().manual_seed(args.seed)
        lo = min(1000, vocab // 4)  # ordinary ids, away from the special tokens at either end
        ids = [torch.randint(lo, vocab - 300 if vocab > 2000 else vocab, (n,), generator=g) for n in lengths]
        return Prompts(texts=[f"<synthetic {n} tokens>" for n in lengths], ids=ids, bos="auto", shuffle_seed=None), \
            "synthetic"
    texts = read_prompt_file(args.prompt_file)
    if args.max_prompts:
        texts = texts[:args.max_prompts]
    return tokenize(lm.tokenizer, texts), args.prompt_file


# --------------------------------------------------------------------------------------------- variants

def _sync(lm):
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)


def make_runner(name: str, lm, prompts, args, batch_size: int):
    """A no-argument callable that runs one variant once."""
    from sinkscope.runner import RunContext

    def ctx():
        return RunContext(lm, prompts, batch_size=batch_size, progress=False)

    if name == "floor":
        batches = ctx().batches()
        dev = lm.device

        def floor():
            with torch.inference_mode():
                for b in batches:
                    lm.body(input_ids=b.input_ids.to(dev), attention_mask=b.attention_mask.to(dev), use_cache=False)
        return floor
    if name == "scan":
        from sinkscope.experiments.scan import run_scan
        return lambda: run_scan(ctx(), sinks=args.sink_idx)
    if name == "decompose":
        from sinkscope.experiments.decompose_output import run_decompose_output
        return lambda: run_decompose_output(ctx(), layer=args.layer)
    if name == "reference":
        return lambda: reference_loop(lm, prompts, args.sink_idx)
    if name == "explain":
        from sinkscope.experiments.explain import run_explain
        return lambda: run_explain(ctx())
    if name == "metrics":  # `--metrics`: the literature metrics in one pass (target <= 1.3x floor)
        from sinkscope.experiments.metrics import run_metrics
        return lambda: run_metrics(ctx())
    raise SystemExit(f"bench: unknown variant {name!r}; choose from {', '.join(VARIANTS)}")


def _set_attn(model, impl: str) -> None:
    try:
        model.set_attn_implementation(impl)
    except (AttributeError, ValueError, TypeError):
        model.config._attn_implementation = impl


def reference_loop(lm, prompts, sinks) -> list:
    """The reference's per-prompt way: full causal LM, eager attention, every attention map and hidden state
    returned; per layer and sink, the attention from queries 4.. to the sink, and the sink's hidden-state norm."""
    model, dev = lm.model, lm.device
    saved = model.config._attn_implementation
    _set_attn(model, "eager")
    out_all = []
    try:
        with torch.no_grad():
            for ids in prompts.ids:
                S = len(ids)
                cols = [min(t, S - 1) for t in sinks]
                out = model(input_ids=ids.view(1, -1).to(dev), position_ids=torch.arange(S, device=dev).view(1, -1),
                            output_attentions=True, output_hidden_states=True, use_cache=False)
                attn = torch.stack([A[0, :, 4:, cols].float().mean(1) for A in out.attentions])   # [L, H, T]
                norms = torch.stack([h[0, cols].float().norm(dim=-1) for h in out.hidden_states])  # [L+1, T]
                out_all.append((attn.cpu(), norms.cpu()))  # the reference gathers per prompt on the host
                del out
    finally:
        _set_attn(model, saved)
    return out_all


# --------------------------------------------------------------------------------------------- measuring

def _rss_now_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def vm_hwm_mb() -> float:
    """This process's own peak RSS (VmHWM; unlike ru_maxrss it does not start from the parent's RSS)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def run_child(args) -> None:
    """In a fresh process: load, run one variant once, print its peak memory as one JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = build_model(args)
    prompts, _ = build_prompts(args, lm)
    from sinkscope.runner import RunContext
    bs = RunContext(lm, prompts, batch_size=_bs(args.batch_size), progress=False).batch_size
    fn = make_runner(args.child, lm, prompts, args, bs)
    info = {"variant": args.child, "rss_after_load_mb": _rss_now_mb(), "peak_rss_after_load_mb": peak_rss_mb()}
    cuda = lm.device.type == "cuda"
    if cuda:
        _sync(lm)
        info["gpu_after_load_mb"] = torch.cuda.memory_allocated(lm.device) / 2**20
        torch.cuda.reset_peak_memory_stats(lm.device)
    t0 = time.perf_counter()
    try:
        fn()
        _sync(lm)
        info["ok"] = True
    except torch.OutOfMemoryError as err:  # reported, not fatal: the point of the measurement
        info["ok"], info["error"] = False, f"out of memory: {str(err).splitlines()[0]}"
    info["seconds_once"] = time.perf_counter() - t0
    info["peak_rss_mb"] = peak_rss_mb()
    info["vm_hwm_mb"] = vm_hwm_mb()
    if cuda:
        info["peak_gpu_mb"] = torch.cuda.max_memory_allocated(lm.device) / 2**20
    print(CHILD_TAG + json.dumps(info), flush=True)


def measure_memory(args, variant: str) -> dict:
    argv = [a for a in sys.argv[1:]]
    argv = _strip_opt(argv, "--json")
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", variant]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_TAG):
            info = json.loads(line[len(CHILD_TAG):])
            info["subprocess_seconds"] = time.perf_counter() - t0
            return info
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"variant": variant, "ok": False, "error": f"subprocess exited {proc.returncode}: {' | '.join(tail)}"}


def _strip_opt(argv: list[str], opt: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == opt:
            skip = True
            continue
        if a.startswith(opt + "="):
            continue
        out.append(a)
    return out


def _longest(args) -> int:
    """The longest prompt, without loading the model (0 when only the tokenizer could tell)."""
    if args.seq_len is not None:
        return args.seq_len
    if args.prompt_lengths:
        lengths = json.loads(Path(args.prompt_lengths).read_text())
        return max(lengths[:args.max_prompts] if args.max_prompts else lengths)
    return 0


def _bs(s):
    return s if s == "auto" else int(s)


def machine_info(lm) -> dict:
    import transformers
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(lm.device)}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if lm.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(lm.device)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if sum(bool(x) for x in (args.tiny, args.shape, args.config_json)) > 1:
        raise SystemExit("bench: give at most one of --tiny, --shape, --config-json")
    if args.child:
        run_child(args)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS + EXTRA_VARIANTS:
            raise SystemExit(f"bench: unknown variant {v!r}; choose from {', '.join(VARIANTS + EXTRA_VARIANTS)}")

    # Peak memory first, while this process holds no model: a child's ru_maxrss starts from its parent's RSS
    # at the fork, and a GPU must not hold two copies of the weights.
    memory = {}
    if args.memory == "subprocess":
        mem_variants = variants if not args.memory_variants else [
            v for v in variants if v in args.memory_variants.split(",")]
        for v in mem_variants:
            if v == "reference" and args.reference_max_len and _longest(args) > args.reference_max_len:
                continue
            print(f"[bench] peak memory of {v} (fresh subprocess) ...", file=sys.stderr)
            memory[v] = measure_memory(args, v)

    t0 = time.perf_counter()
    lm = build_model(args)
    prompts, source = build_prompts(args, lm)
    from sinkscope import capture
    from sinkscope.runner import RunContext
    bs = RunContext(lm, prompts, batch_size=_bs(args.batch_size), progress=False).batch_size
    lengths = prompts.lengths
    workload = {"label": args.label, "model": model_label(args), "model_type": lm.adapter.model_type,
                "n_layers": lm.n_layers, "dtype": str(lm.dtype).replace("torch.", ""), "device": str(lm.device),
                "prompts": source, "n_prompts": len(prompts), "tokens": sum(lengths),
                "min_len": min(lengths), "max_len": max(lengths), "batch_size": bs,
                "sink_idx": args.sink_idx, "decompose_layer": args.layer, "repeats": args.repeats}
    notes = []
    if "reference" in variants and args.reference_max_len and max(lengths) > args.reference_max_len:
        variants.remove("reference")
        notes.append(f"reference-style loop skipped: the longest prompt has {max(lengths)} tokens, more than "
                     f"--reference-max-len {args.reference_max_len} (its attention maps alone would need "
                     f"{lm.n_layers} layers x {lm.config.num_attention_heads} heads x {max(lengths)}^2 x "
                     f"{torch.finfo(lm.dtype).bits // 8} bytes = "
                     f"{lm.n_layers * lm.config.num_attention_heads * max(lengths) ** 2 * torch.finfo(lm.dtype).bits / 8 / 2**30:.1f} GiB)")
    print(f"[bench] {workload['model']} ({workload['model_type']}, {lm.n_layers} layers, {workload['dtype']}, "
          f"{workload['device']}); {len(prompts)} prompts ({source}), {min(lengths)}-{max(lengths)} tokens, "
          f"{sum(lengths)} in all; batch size {bs}; set-up {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    load_before = loadavg()
    runners = {v: make_runner(v, lm, prompts, args, bs) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    gpu_peak: dict[str, float] = {}
    cuda = lm.device.type == "cuda"
    capture.LSE_STATS.update(kernel=0, recompute=0)
    for rnd in range(args.repeats + 1):  # round 0 is the warm-up
        for v, fn in runners.items():
            if cuda and args.memory == "inprocess":
                torch.cuda.reset_peak_memory_stats(lm.device)
            _sync(lm)
            t = time.perf_counter()
            fn()
            _sync(lm)
            dt = time.perf_counter() - t
            if cuda and args.memory == "inprocess":
                gpu_peak[v] = max(gpu_peak.get(v, 0.0), torch.cuda.max_memory_allocated(lm.device) / 2**20)
            if rnd:
                times[v].append(dt)
            print(f"[bench] {'warm-up' if rnd == 0 else f'round {rnd}'} {v}: {dt:.3f}s", file=sys.stderr)
    load_after = loadavg()

    results = {}
    for v in variants:
        ts = times[v]
        results[v] = {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "runs_s": ts}
        if v in gpu_peak:
            results[v]["peak_gpu_mb_inprocess"] = gpu_peak[v]
    info = machine_info(lm)
    for v in variants:
        if v in memory:
            results[v]["memory"] = memory[v]

    med = {v: results[v]["median_s"] for v in variants}
    ratios = {}
    if "floor" in med:
        for v in ("scan", "decompose", "reference", "explain", "metrics"):
            if v in med:
                ratios[f"{v}/floor"] = med[v] / med["floor"]
    if "reference" in med and "scan" in med:
        ratios["reference/scan"] = med["reference"] / med["scan"]
    out = {"workload": workload, "machine": info, "results": results, "ratios": ratios,
           "lse_path": {"kernel": capture.LSE_STATS["kernel"], "recompute": capture.LSE_STATS["recompute"],
                        "disabled": dict(capture.LSE_STATS["disabled"])},
           "loadavg_before": load_before, "loadavg_after": load_after, "notes": notes,
           "argv": sys.argv[1:] if argv is None else list(argv)}
    print(render(out))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"[bench] wrote {args.json_out}", file=sys.stderr)
    return 0


def _mem_str(r: dict) -> str:
    m = r.get("memory")
    if m is None:
        return f"{r['peak_gpu_mb_inprocess'] / 1024:.2f} GiB GPU (in-process)" if "peak_gpu_mb_inprocess" in r else "-"
    if not m.get("ok", False):
        return f"FAILED: {m.get('error', '?')}"
    if "peak_gpu_mb" in m:
        return f"{m['peak_gpu_mb'] / 1024:.2f} GiB GPU (weights {m['gpu_after_load_mb'] / 1024:.2f})"
    return f"{m['peak_rss_mb']:.0f} MiB peak RSS (after load {m['rss_after_load_mb']:.0f})"


def render(out: dict) -> str:
    w = out["workload"]
    lines = [f"== {w['label'] or w['model']}: {w['n_prompts']} prompts ({w['prompts']}, {w['min_len']}-"
             f"{w['max_len']} tokens), {w['dtype']} on {w['device']}, batch size {w['batch_size']}, "
             f"median of {w['repeats']}",
             f"{'variant':<10} {'median s':>10} {'min s':>10} {'max s':>10}  peak memory"]
    for v, r in out["results"].items():
        lines.append(f"{v:<10} {r['median_s']:>10.4f} {r['min_s']:>10.4f} {r['max_s']:>10.4f}  {_mem_str(r)}")
    for k, x in out["ratios"].items():
        lines.append(f"ratio {k} = {x:.3f}")
    if out["lse_path"]["kernel"] or out["lse_path"]["recompute"]:
        lp = out["lse_path"]
        lines.append(f"sink-attention normaliser: {lp['kernel']} attention calls used the kernel's log-sum-exp, "
                     f"{lp['recompute']} recomputed it" + (f"; disabled: {lp['disabled']}" if lp["disabled"] else ""))
    for n in out["notes"]:
        lines.append(f"note: {n}")
    lines.append(f"load average before/after: {out['loadavg_before']} / {out['loadavg_after']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
