"""Scale benchmarks (issue 10): data-parallel speed-up and long-prompt memory.

    PYTHONPATH=src python bench/scale_bench.py dist [--nproc 2] [--max-prompts 32] [--batch-size 4]
        time of --scan on the same prompts with 1 process and with N processes (torchrun, gloo on CPU / NCCL on
        GPUs), OMP_NUM_THREADS=1 per process on CPU; prints the speed-up and the scaling efficiency
        time(1) / (N * time(N)). Model load and start-up are not timed (ranks meet at a barrier first).
    PYTHONPATH=src python bench/scale_bench.py longprompt [--lengths 4096,16384,32768] [--layers 2]
        peak memory of the plain forward (floor) and of the --scan capture pass on one prompt of each length,
        each in a fresh process: VmHWM (CPU) or max_memory_allocated (GPU), and the same less the process's
        memory after the model was built (the forward's own share). The model is random-init with the default
        model's width (SmolLM2-135M: d 576, 9 heads of 64, 3 KV heads, MLP 1536) and --layers layers, with
        positions up to 40960 (the default model itself stops at 8192 positions, and 30 layers at 32k tokens
        take many minutes on a CPU); activations are freed layer by layer, so the peak does not grow with depth.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SRC = str(HERE.parent / "src")
TAG = "SCALE_BENCH "
DEFAULT_WIDTH = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=40960,
                     rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)

TINY_WIDTH = dict(DEFAULT_WIDTH, vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)   # gpu_check.sh --cpu-dry-run: checks the steps, not figures


def _bench():
    sys.path.insert(0, str(HERE))
    import bench
    bench.SHAPES.setdefault("default-width", DEFAULT_WIDTH)
    bench.SHAPES.setdefault("tiny-width", TINY_WIDTH)
    return bench


def build(args, seq_len=None, n_prompts=1):
    """(LoadedModel, Prompts): --shape (a random-init shape of bench.py, or default-width with --layers layers) with
    synthetic prompts, else --model with --prompt-file (bench.py's own builders)."""
    bench = _bench()
    if args.shape in ("default-width", "tiny-width"):
        bench.SHAPES[args.shape] = dict(bench.SHAPES[args.shape], num_hidden_layers=args.layers)
    ns = argparse.Namespace(model=args.model, tiny=None, shape=args.shape, config_json=None, device=args.device,
                            dtype="auto" if args.shape else "fp32", seed=0, seq_len=seq_len, n_prompts=n_prompts,
                            prompt_lengths=None, max_prompts=args.max_prompts, prompt_file=args.prompt_file)
    lm = bench.build_model(ns)
    prompts, _ = bench.build_prompts(ns, lm)
    if args.shape is None:
        from sinkscope import api
        prompts = api.tokenized(lm, prompts)
    return lm, prompts


def _env(threads: int = 1) -> dict:
    return {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}


# --------------------------------------------------------------------------------------------- dist

def dist_worker(args) -> None:
    """One rank (or the single process): load, meet, time run_scan, meet; rank 0 prints the time."""
    from sinkscope import distributed
    from sinkscope.experiments.scan import run_scan
    from sinkscope.runner import RunContext
    if args.device.startswith("cuda"):           # one GPU per rank
        torch.cuda.set_device(distributed.local_rank())
        args.device = f"cuda:{distributed.local_rank()}"
    distributed.setup(args.device)
    try:
        lm, prompts = build(args, seq_len=args.dist_seq_len, n_prompts=args.max_prompts)
        ctx = RunContext(lm, prompts, batch_size=args.batch_size, progress=False)
        run_scan(RunContext(lm, prompts, batch_size=args.batch_size, progress=False), sinks=[0]) if args.warmup \
            else None
        distributed.barrier()
        t0 = time.perf_counter()
        run_scan(ctx, sinks=[0])
        distributed.barrier()
        dt = time.perf_counter() - t0
        n_batches = len(distributed.shard(ctx.batches()))
        shares = distributed.gather(n_batches)
        if distributed.is_main():
            print(TAG + json.dumps({"seconds": dt, "world": distributed.world_size(), "batches_per_rank": shares}))
    finally:
        distributed.teardown()


def run_dist(args) -> None:
    out = {}
    for n in (1, args.nproc):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", __file__,
               "dist-worker", "--model", args.model, "--prompt-file", args.prompt_file, "--max-prompts",
               str(args.max_prompts), "--batch-size", str(args.batch_size), "--device", args.device]
        cmd += ["--shape", args.shape, "--dist-seq-len", str(args.dist_seq_len)] if args.shape else []
        cmd += ["--warmup"] if args.warmup else []
        res = subprocess.run(cmd, env=_env(1), capture_output=True, text=True)
        line = [l for l in res.stdout.splitlines() if l.startswith(TAG)]
        if res.returncode or not line:
            raise SystemExit(f"scale_bench dist: {n} process(es) failed:\n{res.stderr[-2000:]}")
        out[n] = json.loads(line[0][len(TAG):])
        print(f"[dist] {n} process(es): {out[n]['seconds']:.2f} s for --scan on {args.max_prompts} prompts "
              f"(batches per rank {out[n]['batches_per_rank']})", flush=True)
    t1, tn, n = out[1]["seconds"], out[args.nproc]["seconds"], args.nproc
    print(f"[dist] speed-up {t1 / tn:.2f}x with {n} processes, 1 thread each; scaling efficiency "
          f"time(1) / ({n} x time({n})) = {t1 / (n * tn):.2f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"runs": out, "speedup": t1 / tn, "efficiency": t1 / (n * tn)}))


# --------------------------------------------------------------------------------------------- long prompts

def _mem_now_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def long_worker(args) -> None:
    """A fresh process: build the model, one prompt of --seq-len tokens, run floor or scan once, print memory."""
    from sinkscope.experiments.scan import run_scan
    from sinkscope.runner import RunContext
    args.shape = args.shape or "default-width"
    lm, prompts = build(args, seq_len=args.seq_len, n_prompts=1)
    dev = lm.device
    ctx = RunContext(lm, prompts, batch_size=1, progress=False)
    base = _mem_now_mb(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    if args.variant == "floor":
        b = ctx.batches()[0]
        with torch.inference_mode():
            lm.body(input_ids=b.input_ids.to(dev), attention_mask=b.attention_mask.to(dev), use_cache=False)
    else:
        run_scan(ctx, sinks=[0])
    dt = time.perf_counter() - t0
    print(TAG + json.dumps({"peak_mb": _peak_mb(dev), "base_mb": base, "seconds": dt}))


def run_longprompt(args) -> None:
    rows = []
    for S in [int(x) for x in args.lengths.split(",")]:
        row = {"tokens": S}
        for variant in ("floor", "scan"):
            cmd = [sys.executable, __file__, "long-worker", "--seq-len", str(S), "--variant", variant, "--layers",
                   str(args.layers), "--device", args.device] + (["--shape", args.shape] if args.shape else [])
            res = subprocess.run(cmd, env=_env(args.threads), capture_output=True, text=True)
            line = [l for l in res.stdout.splitlines() if l.startswith(TAG)]
            if res.returncode or not line:
                row[variant] = {"error": res.stderr.strip().splitlines()[-1:] or ["failed"]}
                print(f"[longprompt] {S} tokens {variant}: failed ({row[variant]['error'][0]})", flush=True)
                continue
            row[variant] = r = json.loads(line[0][len(TAG):])
            print(f"[longprompt] {S:>6} tokens {variant:>5}: peak {r['peak_mb']:8.0f} MB, "
                  f"over the loaded model {r['peak_mb'] - r['base_mb']:8.0f} MB, {r['seconds']:.1f} s", flush=True)
        rows.append(row)
    what = (f"random-init {args.shape} shape" if args.shape and args.shape != "default-width" else
            f"random-init model of the default model's width, {args.layers} layers")
    print(f"[longprompt] {what}, {args.device}; "
          f"'over the loaded model' = peak less the memory right before the forward")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("dist", "longprompt", "dist-worker", "long-worker"))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--shape", default=None, help="a random-init shape (bench.py's SHAPES, default-width or "
                                                 "tiny-width) instead "
                                                 "of --model, with synthetic prompts")
    p.add_argument("--dist-seq-len", type=int, default=32, help="dist with --shape: tokens per synthetic prompt")
    p.add_argument("--prompt-file", default="prose56.txt")
    p.add_argument("--max-prompts", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", action="store_true", help="dist: one untimed scan first")
    p.add_argument("--lengths", default="4096,16384,32768")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="longprompt: threads per process")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--variant", default="floor", choices=("floor", "scan"))
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args(argv)
    {"dist": run_dist, "longprompt": run_longprompt, "dist-worker": dist_worker,
     "long-worker": long_worker}[args.what](args)


if __name__ == "__main__":
    main()
