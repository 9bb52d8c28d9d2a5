"""The command line end to end on tiny saved models, and one-line errors with exit code 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sinkscope.cli import build_parser, main
from sinkscope.testing import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama"))


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("p") / "prompts.txt"
    f.write_text("\n".join(f"prompt number {i} says something about attention sinks" for i in range(7)) + "\n",
                 encoding="utf-8")
    return str(f)


def run_cli(args, capsys):
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_reference_command_lines_parse_verbatim():
    p = build_parser()
    a = p.parse_args(["--scan", "--print", "qkv"])
    assert a.scan and a.print_kind == "qkv" and a.sink_idx == [0]
    a = p.parse_args(["--decompose-output", "--layer", "11"])
    assert a.decompose_output and a.layer == 11 and a.tokens == [0, 1, 8]
    a = p.parse_args(["--find-mlp-subspace", "--layer", "6", "--mlp", "z"])
    assert a.find_mlp_subspace and a.mlp == ["z"]
    a = p.parse_args(["--layer", "6", "--ablate-mlp-out", "direction"])
    assert a.ablate_mlp_out == "direction"
    a = p.parse_args(["--layer", "6", "--decompose-mlp-in"])
    assert a.decompose_mlp_in


def test_scan_end_to_end(tiny_dir, prompt_file, tmp_path, capsys):
    rc, out, _ = run_cli(["--scan", "--print", "qkv", "--model", tiny_dir, "--prompt-file", prompt_file,
                          "--sink-idx", "0", "2", "--batch-size", "3", "--outdir", str(tmp_path)], capsys)
    assert rc == 0
    assert "sink_attn" in out and "[Scan]" in out
    data = json.loads((tmp_path / "scan.json").read_text())
    keys = {"layer", "sink_idx", "k_norm", "v_norm", "cos", "sink_attn", "mlp_out_log_norm", "k_spread",
            "v_spread", "mlp_out_spread"}
    assert len(data["records"]) == 3 * 2
    for r in data["records"]:
        assert keys <= set(r)
        assert 0 <= r["sink_attn"] <= 1
    for stem in ("knorm", "vnorm", "cosine", "sink_attn_mean", "mlp_out_norm", "k_spread", "v_spread",
                 "mlp_out_spread"):
        assert (tmp_path / f"scan_{stem}.png").stat().st_size > 1000
    prov = data["provenance"]
    assert prov["mode"] == "scan" and prov["prompts"]["n"] == 7 and prov["argv"][0] == "--scan"
    assert prov["model"]["model_type"] == "llama" and len(prov["model"]["fingerprint"]) == 64
    assert prov["model"]["attn_implementation"] == "sdpa"   # --attn-impl auto on a model that supports it
    assert set(data["files"]) == {f"scan_{s}.png" for s in ("knorm", "vnorm", "cosine", "sink_attn_mean",
                                                             "mlp_out_norm", "k_spread", "v_spread", "mlp_out_spread")}


def test_scan_heatmap(tiny_dir, prompt_file, tmp_path, capsys):
    rc, _, _ = run_cli(["--scan", "--print", "heatmap", "--head", "1", "--model", tiny_dir, "--prompt-file",
                        prompt_file, "--outdir", str(tmp_path)], capsys)
    assert rc == 0 and (tmp_path / "scan_heatmaps.png").is_file()
    maps = json.loads((tmp_path / "scan_heatmaps.json").read_text())["maps"]
    # cropped to the shortest prompt, every causal row still holds all of its keys: rows sum to 1
    assert all(abs(sum(row) - 1) < 1e-4 for m in maps.values() for row in m)


def test_decompose_output_end_to_end_and_short_prompt_count(tiny_dir, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("a long enough prompt here\nshort\n", encoding="utf-8")
    rc, out, _ = run_cli(["--decompose-output", "--layer", "1", "--model", tiny_dir, "--prompt-file", str(f),
                          "--tokens", "0", "1", "8", "--outdir", str(tmp_path)], capsys)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "[Block Output L=1]"
    assert [l.split()[0] for l in lines[2:10]] == ["norm_Y", "spread_Y", "norm_residual", "norm_attn", "norm_mlp",
                                                   "spread_residual", "spread_attn", "spread_mlp"]
    assert "tok8: 1 prompts (1 too short)" in out
    data = json.loads((tmp_path / "decompose_output_L1.json").read_text())
    assert data["n_skipped"] == [0, 0, 1] and data["values"]["norm_Y"][0] > 0


@pytest.mark.parametrize("args, message", [
    (["--decompose-output", "--layer", "7"], "out of range: this model has layers 0..2"),
    (["--decompose-output", "--layer", "1", "--tokens", "0", "500"], "beyond every prompt"),
    (["--scan", "--sink-idx", "999"], "beyond every prompt"),
    (["--scan", "--print", "heatmap", "--head", "9"], "heads 0..3"),
    (["--scan", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--scan", "--max-prompts", "0"], "--max-prompts must be >= 1"),
])
def test_bad_input_gives_one_line_and_exit_2(tiny_dir, prompt_file, tmp_path, capsys, args, message):
    rc, out, err = run_cli(args + ["--model", tiny_dir, "--prompt-file", prompt_file, "--outdir", str(tmp_path)],
                           capsys)
    assert rc == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("sinkscope: error:") and message in last
    assert "Traceback" not in err


def test_bad_prompt_files_and_models(tiny_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    cases = [
        (["--model", tiny_dir, "--prompt-file", str(empty)], "holds no prompts"),
        (["--model", tiny_dir, "--prompt-file", str(tmp_path / "nope.txt")], "prompt file not found"),
        (["--model", str(tmp_path / "no_such_dir") + "/"], "model path not found"),
        (["--model", str(empty)], "not a .gguf file"),
        (["--model", str(tmp_path / "missing.gguf")], "GGUF file not found"),
        (["--model", str(tmp_path)], "holds no config.json"),
    ]
    for extra, message in cases:
        rc, _, err = run_cli(["--scan"] + extra + ["--outdir", str(tmp_path / "o")], capsys)
        assert rc == 2, extra
        assert message in err.strip().splitlines()[-1], (extra, err)


def test_unsupported_architecture_is_one_line(tmp_path, capsys):
    from transformers import AutoConfig
    AutoConfig.for_model("bert", vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=8).save_pretrained(tmp_path)
    rc, _, err = run_cli(["--scan", "--model", str(tmp_path)], capsys)
    assert rc == 2 and "unsupported architecture 'bert'; supported model types: llama" in err


def test_offline_hub_id_fails_fast_with_a_clear_message(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, str(ROOT / "analyze_sink.py"), "--scan", "--model",
                           "someorg/not-a-model"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "someorg/not-a-model" in last and "not in the local cache" in last and "switched off" in last


def test_no_mode_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--layer", "3"])
    assert e.value.code == 2
    assert "choose a mode" in capsys.readouterr().err
