#!/usr/bin/env python
"""Collect bench.py JSON files into one markdown summary (and check the issue's GPU acceptance figures).

    python bench/summarize.py bench/results [--gpu-targets] > bench/results/summary.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _mem(r: dict) -> str:
    m = r.get("memory")
    if m is None:
        if "peak_gpu_mb_inprocess" in r:
            return f"{r['peak_gpu_mb_inprocess'] / 1024:.2f} GiB (in-process)"
        return "-"
    if not m.get("ok", False):
        return f"failed: {m.get('error', '?')}"
    if "peak_gpu_mb" in m:
        return f"{m['peak_gpu_mb'] / 1024:.2f} GiB"
    return f"{m['peak_rss_mb']:.0f} MiB RSS"


def _peak(r: dict) -> float | None:
    m = r.get("memory") or {}
    if m.get("ok") and "peak_gpu_mb" in m:
        return m["peak_gpu_mb"]
    if m.get("ok") and "peak_rss_mb" in m:
        return m["peak_rss_mb"]
    return r.get("peak_gpu_mb_inprocess")


def summarize(folder: Path, gpu_targets: bool = False) -> str:
    runs = []
    for f in sorted(folder.glob("*.json")):
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and "workload" in d and "results" in d:
            runs.append((f.name, d))
    if not runs:
        return f"No bench results in {folder}.\n"
    m = runs[0][1]["machine"]
    out = ["# sinkscope benchmark", "",
           f"- device: {m.get('gpu', m.get('cpu', '?'))} ({m.get('device')}); torch {m.get('torch')}, "
           f"transformers {m.get('transformers')}, Python {m.get('python')}; {m.get('platform')}", ""]
    checks = []
    for name, d in runs:
        w, res, rat = d["workload"], d["results"], d["ratios"]
        out += [f"## {w.get('label') or w['model']} ({name})", "",
                f"{w['model']}, {w['dtype']} on {w['device']}; {w['n_prompts']} prompts ({w['prompts']}, "
                f"{w['min_len']}-{w['max_len']} tokens, {w['tokens']} in all); batch size {w['batch_size']}; "
                f"median of {w['repeats']} runs after a warm-up.", "",
                "| variant | median s | min s | peak memory |", "|---|---:|---:|---|"]
        for v, r in res.items():
            out.append(f"| {v} | {r['median_s']:.4f} | {r['min_s']:.4f} | {_mem(r)} |")
        out.append("")
        for k, x in rat.items():
            out.append(f"- {k} = {x:.3f}")
        lp = d.get("lse_path", {})
        if lp.get("kernel") or lp.get("recompute"):
            out.append(f"- sink-attention normaliser: kernel log-sum-exp in {lp.get('kernel')} attention calls, "
                       f"recomputed in {lp.get('recompute')}" + (f"; disabled: {lp['disabled']}" if lp.get("disabled") else ""))
        for n in d.get("notes", []):
            out.append(f"- note: {n}")
        out.append(f"- command: `python bench/bench.py {' '.join(d.get('argv', []))}`")
        out.append("")
        lab = w.get("label") or ""
        if gpu_targets and lab.startswith("56"):
            if "scan/floor" in rat:
                checks.append(("scan <= 1.5 x floor (56 prompts)", rat["scan/floor"] <= 1.5, f"{rat['scan/floor']:.3f}"))
            if "reference/scan" in rat:
                checks.append(("scan >= 8x faster than the reference-style loop (56 prompts)",
                               rat["reference/scan"] >= 8, f"{rat['reference/scan']:.2f}x"))
        if gpu_targets and lab.startswith("long") and "floor" in res and "scan" in res:
            pf, ps = _peak(res["floor"]), _peak(res["scan"])
            if pf and ps:
                checks.append((f"{lab}: peak GPU memory of scan <= 1.3 x floor", ps <= 1.3 * pf,
                               f"{ps / pf:.3f} ({ps / 1024:.2f} / {pf / 1024:.2f} GiB)"))
    if checks:
        out += ["## Acceptance (issue 4, GPU)", "", "| target | measured | met |", "|---|---|---|"]
        out += [f"| {t} | {v} | {'yes' if ok else 'NO'} |" for t, ok, v in checks]
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    gpu = "--gpu-targets" in argv
    paths = [a for a in argv if not a.startswith("--")]
    print(summarize(Path(paths[0] if paths else "bench/results"), gpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
