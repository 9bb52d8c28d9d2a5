"""No silent wrong answers (issue 11): short and long prompts, mixed output folders, odd flags, interrupted runs.
Every case runs the CLI in-process on a tiny saved model, as a user would, and checks the exit code, the one-line
error or the note, and the files."""

import json
from pathlib import Path

import pytest

from sinkscope.cli import main
from sinkscope.testing import save_tiny_model

# tiny llama: 3 layers, D = 64, 4 heads, MLP width F = 96, 512 positions; byte-level tokenizer (1 token per byte)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama"))


def write(tmp_path, name, text, encoding="utf-8"):
    f = tmp_path / name
    f.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return str(f)


@pytest.fixture()
def prompts(tmp_path):
    return write(tmp_path, "p.txt", "\n".join(f"prompt {i} talks about attention sinks" for i in range(5)) + "\n")


def cli(args, capsys):
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line_error(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("sinkscope: error:"), err
    for n in needles:
        assert n in last, (n, last)
    return last


# -- 1. short prompts -----------------------------------------------------------------------------------------

def test_all_prompts_too_short_for_a_query_is_an_error_not_a_nan_table(tiny_dir, tmp_path, capsys):
    f = write(tmp_path, "s.txt", "Hi\n")   # 2 tokens: no query q >= 4
    rc, out, err = cli(["--scan", "--model", tiny_dir, "--prompt-file", f, "--outdir", str(tmp_path / "o")], capsys)
    one_line_error(rc, err, "sink_attn", "no data", "2 tokens")
    assert not (tmp_path / "o" / "scan.json").exists()


def test_token_statistics_keep_prompts_without_a_query_and_notes_count_per_statistic(tiny_dir, tmp_path, capsys):
    # key 6: prompts of 5, 6, 7 and 12 bytes -> 7 and 12 have token 6; only 12 has a query q >= 7
    f = write(tmp_path, "p.txt", "abcde\nabcdef\nabcdefg\nabcdefghijkl\n")
    out_dir = tmp_path / "o"
    rc, out, err = cli(["--scan", "--sink-idx", "0", "6", "--model", tiny_dir, "--prompt-file", f, "--outdir",
                        str(out_dir), "--no-plots"], capsys)
    assert rc == 0, err
    data = json.loads((out_dir / "scan.json").read_text())
    r6 = [r for r in data["records"] if r["sink_idx"] == 6]
    assert all(r["n_prompts"] == 2 and r["n_prompts_query"] == 1 for r in r6)
    assert all(r["k_norm"] > 0 and r["k_spread"] is not None and r["sink_attn"] is not None for r in r6)
    r0 = [r for r in data["records"] if r["sink_idx"] == 0]
    assert all(r["n_prompts"] == 4 and r["n_prompts_query"] == 4 for r in r0)  # all longer than 4 tokens
    notes = "\n".join(data["notes"])
    assert "sink 6: k/v norms, spreads and log-norms use 2 of 4 prompts" in notes
    assert "sink 6: cos and sink_attn use 1 of 4 prompts (3 have no query q >= max(4, t+1) = 7" in notes
    assert "[note] sink 6: cos and sink_attn use 1 of 4" in out


def test_spread_of_one_prompt_is_na_with_the_reason(tiny_dir, tmp_path, capsys):
    f = write(tmp_path, "p.txt", "abcdefghij\nabc\n")   # only one prompt has token 8
    rc, out, err = cli(["--scan", "--sink-idx", "8", "--model", tiny_dir, "--prompt-file", f, "--outdir",
                        str(tmp_path / "o"), "--no-plots"], capsys)
    assert rc == 0, err
    data = json.loads((tmp_path / "o" / "scan.json").read_text())
    assert all(r["k_spread"] is None and r["mlp_out_spread"] is None for r in data["records"])
    assert "k_spread, v_spread and mlp_out_spread are N/A" in out
    assert "N/A" in out.splitlines()[2]   # the table prints N/A, not 0.0


def test_decompose_output_spread_of_one_prompt_is_na(tiny_dir, tmp_path, capsys):
    f = write(tmp_path, "p.txt", "a long enough prompt here\nshort\n")
    rc, out, err = cli(["--decompose-output", "--layer", "1", "--model", tiny_dir, "--prompt-file", f,
                        "--outdir", str(tmp_path)], capsys)
    assert rc == 0, err
    data = json.loads((tmp_path / "decompose_output_L1.json").read_text())
    assert data["values"]["spread_Y"][2] is None and data["values"]["spread_Y"][0] is not None
    assert "tok8: the spreads are N/A" in out


# -- 2. heatmaps ----------------------------------------------------------------------------------------------

def test_heatmaps_average_each_cell_over_the_prompts_that_have_it(tiny_dir, tmp_path, capsys):
    f = write(tmp_path, "p.txt", "ab\nabcdefgh\nabcdefghijkl\n")   # 2, 8 and 12 tokens
    rc, out, err = cli(["--scan", "--print", "heatmap", "--head", "1", "--model", tiny_dir, "--prompt-file", f,
                        "--outdir", str(tmp_path)], capsys)
    assert rc == 0, err
    data = json.loads((tmp_path / "scan_heatmaps.json").read_text())
    counts = data["cell_counts"]
    assert len(counts) == 12 and counts[0][0] == 3 and counts[5][2] == 2 and counts[11][11] == 1
    for m in data["maps"].values():
        assert len(m) == 12
        for i, row in enumerate(m):      # every causal row is a probability distribution (mean of them)
            assert sum(row[:i + 1]) == pytest.approx(1, abs=1e-5)
    assert "heatmaps are 12x12" in out
    assert (tmp_path / "scan_heatmaps.png").is_file()


# -- 3. several modes ------------------------------------------------------------------------------------------

def test_every_mode_given_runs(tiny_dir, prompts, tmp_path, capsys):
    rc, out, err = cli(["--scan", "--decompose-output", "--layer", "1", "--model", tiny_dir, "--prompt-file",
                        prompts, "--outdir", str(tmp_path), "--no-plots"], capsys)
    assert rc == 0, err
    assert "[Scan]" in out and "[Block Output L=1]" in out
    assert (tmp_path / "scan.json").is_file() and (tmp_path / "decompose_output_L1.json").is_file()


# -- 4. output folders ----------------------------------------------------------------------------------------

def test_rerun_replaces_a_modes_file_set_and_keeps_other_modes_files(tiny_dir, prompts, tmp_path, capsys):
    base = ["--model", tiny_dir, "--prompt-file", prompts, "--outdir", str(tmp_path)]
    assert cli(["--decompose-output", "--layer", "1"] + base, capsys)[0] == 0
    assert cli(["--scan"] + base, capsys)[0] == 0
    assert (tmp_path / "scan_knorm.png").is_file()
    keep = tmp_path / "my_notes.txt"
    keep.write_text("mine")
    first = json.loads((tmp_path / "scan.json").read_text())
    rc, _, err = cli(["--scan", "--no-plots", "--seed", "7"] + base, capsys)
    assert rc == 0
    assert not list(tmp_path.glob("scan_*.png")), "stale plots of the first run are left beside the new JSON"
    second = json.loads((tmp_path / "scan.json").read_text())
    assert second["files"] == [] and second["provenance"]["argv"][:2] == ["--scan", "--no-plots"]
    assert second["provenance"]["time"] >= first["provenance"]["time"]
    assert (tmp_path / "decompose_output_L1.json").is_file() and keep.read_text() == "mine"
    d = json.loads((tmp_path / "decompose_output_L1.json").read_text())["provenance"]
    for key in ("argv", "model", "prompts", "versions", "time", "seed"):
        assert key in d
    assert len(d["prompts"]["sha256"]) == 64 and d["model"]["dtype"] == "float32"
    assert "[saved]" in err and "png" not in err.split("[saved]")[-1]   # --no-plots names no PNG
    assert not list(tmp_path.glob(".*.tmp*"))                           # no temporary file left


# -- 5. long prompts ------------------------------------------------------------------------------------------

def test_prompts_longer_than_the_model_are_refused_or_truncated_on_request(tiny_dir, tmp_path, capsys):
    f = write(tmp_path, "long.txt", "short prompt here\n" + "x" * 600 + "\n")   # the tiny model has 512 positions
    args = ["--decompose-output", "--layer", "1", "--model", tiny_dir, "--prompt-file", f, "--outdir", str(tmp_path)]
    rc, _, err = cli(args, capsys)
    one_line_error(rc, err, "prompt 2", "600 tokens", "512 positions", "--truncate")
    rc, out, err = cli(args + ["--truncate"], capsys)
    assert rc == 0, err
    assert "truncated to 512 tokens (--truncate): prompt(s) 2" in out


# -- 6. byte-order mark and line separators -------------------------------------------------------------------

def test_bom_is_dropped_and_only_newlines_split(tiny_dir, tmp_path, capsys):
    from sinkscope.promptset import read_prompt_file
    f = write(tmp_path, "bom.txt", "\ufefffirst prompt\u2028same line\r\nsecond\x0cstill second\n")
    assert read_prompt_file(f) == ["first prompt\u2028same line", "second\x0cstill second"]
    rc, out, err = cli(["--decompose-output", "--layer", "0", "--tokens", "0", "--model", tiny_dir, "--prompt-file",
                        f, "--outdir", str(tmp_path)], capsys)
    assert rc == 0 and "token 0 is 'f'" in err


# -- 7. messages that lied ------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, needles", [
    (["--layer", "1", "--ablate-mlp-out", "magnitude", "--vec-idx", "3"], ["--vec-idx has no effect"]),
    (["--layer", "1", "--ablate-mlp-out", "magnitude", "--ablate-tok", "2", "--ref-tok", "2"], ["both 2"]),
    (["--layer", "1", "--decompose-mlp-in", "--ablate-tok", "0", "--ref-tok", "0"], ["both 0"]),
    (["--scan", "--seed", "-5"], ["--seed must be between 0 and 2^63 - 1"]),
    (["--scan", "--seed", str(2 ** 63)], ["--seed must be between 0 and 2^63 - 1"]),
    (["--scan", "--shuffle-seed", str(2 ** 64)], ["--shuffle-seed must be between 0 and 2^63 - 1"]),
    (["--scan", "--outdir", ""], ["--outdir is empty"]),
    (["--scan", "--outdir", "/proc/sinkscope-x"], ["cannot be written"]),
    (["--scan", "--scan-interval", "0"], ["--scan-interval must be >= 1"]),
    (["--scan", "--print", "heatmap", "--heatmap-size", "0"], ["--heatmap-size must be >= 1"]),
    (["--find-mlp-subspace", "--layer", "1", "--te-mass", "1.5"], ["--te-mass must be in [0, 1]"]),
    (["--find-mlp-subspace", "--layer", "1", "--vec-idx", "5", "5"], ["repeated"]),
])
def test_bad_flag_values_are_one_line_errors_before_any_model_work(args, needles, tmp_path, capsys):
    # the model path does not exist: a flag error must come first (no model is read at all)
    full = args + ([] if "--outdir" in args else ["--outdir", str(tmp_path)])
    rc, _, err = cli(full + ["--model", str(tmp_path / "missing-model") + "/"], capsys)
    one_line_error(rc, err, *needles)


@pytest.mark.parametrize("args, needles", [
    (["--find-mlp-subspace", "--layer", "1", "--te-k", "97"], ["--te-k 97", "96 z dims"]),
    (["--layer", "1", "--ablate-mlp-out", "direction", "--te-k", "40"], ["random control", "64 dimensions"]),
    (["--layer", "2", "--decompose-mlp-in"], ["last layer"]),
    (["--scan", "--print", "heatmap", "--head", "4"], ["heads 0..3"]),
    (["--decompose-output", "--layer", "3"], ["layers 0..2"]),
])
def test_shape_dependent_flag_errors_need_only_the_config(args, needles, tiny_dir, prompts, tmp_path, capsys,
                                                          monkeypatch):
    import sinkscope.api
    monkeypatch.setattr(sinkscope.api, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    rc, _, err = cli(args + ["--model", tiny_dir, "--prompt-file", prompts, "--outdir", str(tmp_path)], capsys)
    one_line_error(rc, err, *needles)


def test_prompt_file_that_is_a_directory_and_outdir_that_is_a_file(tmp_path, capsys):
    rc, _, err = cli(["--scan", "--prompt-file", str(tmp_path), "--outdir", str(tmp_path / "o")], capsys)
    one_line_error(rc, err, "is a directory")
    f = tmp_path / "afile"
    f.write_text("x")
    rc, _, err = cli(["--scan", "--outdir", str(f)], capsys)
    one_line_error(rc, err, "exists and is not a folder")


# -- interrupted runs -----------------------------------------------------------------------------------------

def test_interrupt_names_completed_files_and_leaves_no_partial_file(tiny_dir, prompts, tmp_path, capsys,
                                                                     monkeypatch):
    import sinkscope.report.scan as rscan
    real = rscan.progression_plot
    calls = []

    def plot_then_interrupt(path, *a, **k):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(path, *a, **k)
    monkeypatch.setattr(rscan, "progression_plot", plot_then_interrupt)
    rc, out, err = cli(["--decompose-output", "--scan", "--layer", "1", "--model", tiny_dir, "--prompt-file",
                        prompts, "--outdir", str(tmp_path)], capsys)
    assert rc == 130
    last = err.strip().splitlines()[-1]
    assert last.startswith("sinkscope: interrupted; completed files:")
    # the scan runs first (the reference's order): its first two plots were completed, its JSON was not, and
    # --decompose-output never started
    assert "scan_knorm.png" in last and "scan_vnorm.png" in last and "scan.json" not in last
    assert not (tmp_path / "scan.json").exists() and not (tmp_path / "decompose_output_L1.json").exists()
    assert not list(tmp_path.glob(".*tmp*"))


def test_json_is_strict(tiny_dir, tmp_path, capsys):
    f = write(tmp_path, "p.txt", "abcdefghij\nabc\n")
    assert cli(["--scan", "--sink-idx", "8", "--model", tiny_dir, "--prompt-file", f, "--outdir", str(tmp_path),
                "--no-plots"], capsys)[0] == 0
    text = (tmp_path / "scan.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert Path(tmp_path / "scan.json").stat().st_size > 0
