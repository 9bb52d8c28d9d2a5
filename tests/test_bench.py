"""The benchmark harness runs end to end on tiny models (numbers are not checked here: see bench/RESULTS.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path):
    env = os.environ.copy()
    env["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["HF_HUB_OFFLINE"] = "1"
    # the scripts run `python`: make it this interpreter even when its venv is not activated (as in CI)
    env["PYTHON"] = sys.executable
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    # Make `import gguf` fail loudly: nothing on the benchmark's path may need it.
    block = tmp_path / "block"
    (block / "gguf").mkdir(parents=True)
    (block / "gguf" / "__init__.py").write_text("raise ImportError('gguf is blocked in this test')\n")
    env["PYTHONPATH"] = str(block) + os.pathsep + env["PYTHONPATH"]
    return env


def test_bench_tiny_llama_prints_ratios_and_writes_json(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench.py"), "--tiny", "llama", "--prompt-file", "prose56.txt",
         "--max-prompts", "6", "--repeats", "1", "--batch-size", "4", "--memory", "subprocess",
         "--memory-variants", "scan",
         "--variants", "floor,scan,decompose,reference", "--json", str(out)],
        capture_output=True, text=True, env=_env(tmp_path), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in ("ratio scan/floor = ", "ratio decompose/floor = ", "ratio reference/floor = ",
                 "ratio reference/scan = "):
        assert line in proc.stdout, proc.stdout
    data = json.loads(out.read_text())
    assert data["workload"]["n_prompts"] == 6 and data["workload"]["batch_size"] == 4
    assert set(data["results"]) == {"floor", "scan", "decompose", "reference"}
    for v, r in data["results"].items():
        assert r["median_s"] > 0 and len(r["runs_s"]) == 1
    assert set(v for v, r in data["results"].items() if "memory" in r) == {"scan"}  # --memory-variants
    mem = data["results"]["scan"]["memory"]
    assert mem["ok"] and mem["peak_rss_mb"] >= mem["rss_after_load_mb"] > 0, mem
    assert data["ratios"]["reference/scan"] == pytest.approx(
        data["results"]["reference"]["median_s"] / data["results"]["scan"]["median_s"])
    assert data["lse_path"]["kernel"] > 0  # tiny llama runs SDPA: the kernel's log-sum-exp was used


def test_bench_synthetic_prompts_and_config_json(tmp_path):
    """A random-init model from a config file with synthetic token ids (the --shape path, tokenizer-free)."""
    from sinkscope.testing import tiny_config
    cfg = tiny_config("qwen3")
    cfg.save_pretrained(tmp_path / "cfg")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench.py"), "--config-json", str(tmp_path / "cfg" / "config.json"),
         "--seq-len", "40", "--n-prompts", "3", "--repeats", "1", "--memory", "off", "--variants", "floor,scan"],
        capture_output=True, text=True, env=_env(tmp_path), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ratio scan/floor = " in proc.stdout and "40-40 tokens" in proc.stdout


def test_bench_qwen3_8b_shape_config():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    from transformers import AutoConfig
    kw = dict(bench.SHAPES["qwen3-8b"])
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.intermediate_size, cfg.vocab_size) == (4096, 36, 32, 8, 128, 12288, 151936)


def test_gpu_check_cpu_dry_run(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu-dry-run", str(out)],
                          capture_output=True, text=True, env=_env(tmp_path), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], (out / "gpu_check.log").read_text()[-3000:])
    names = sorted(p.name for p in out.glob("*.json"))
    assert names == ["512x32.json", "56-prompts.json", "long-256.json", "reference-128.json"], names
    summary = (out / "summary.md").read_text()
    assert "scan/floor" in summary and "CPU dry run" in summary
    assert "scaling efficiency" in summary                                   # issue 10: steps 5 and 6 ran
    assert summary.count("[longprompt]") == 3                                 # floor, scan, caption
    long = json.loads((out / "long-256.json").read_text())
    assert long["results"]["scan"]["memory"]["ok"] and long["results"]["floor"]["memory"]["ok"]
