"""Property test (issue 11): random values for every numeric flag and random small prompt files (short, long, empty
lines, BOM, odd Unicode) never give a traceback. Every run exits 0 or 2, and every JSON it writes is strict JSON
(no NaN or Infinity tokens). Runs the CLI in-process on a tiny saved model."""

import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sinkscope.cli import main
from sinkscope.testing import save_tiny_model

_DIR = tempfile.mkdtemp(prefix="sinkscope-prop-")
TINY = None


def tiny_dir() -> str:
    global TINY
    if TINY is None:
        TINY = str(save_tiny_model("llama", Path(_DIR) / "llama"))   # 3 layers, D 64, F 96, 512 positions
    return TINY


ints = st.integers(min_value=-3, max_value=12)
big = st.one_of(ints, st.integers(min_value=-(2 ** 65), max_value=2 ** 65))
words = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=40)
line = st.one_of(words, st.just(""), st.just("   "), st.text(alphabet="ab .\n", min_size=500, max_size=620),
                 st.just("naïve café — 東京 \u2028 sep\x0cff"))


@st.composite
def command(draw):
    modes = draw(st.lists(st.sampled_from(["--scan", "--decompose-output", "--find-mlp-subspace",
                                           "--ablate-mlp-out", "--decompose-mlp-in"]), min_size=1, max_size=2,
                          unique=True))
    args = []
    for m in modes:
        args += [m, draw(st.sampled_from(["direction", "magnitude"]))] if m == "--ablate-mlp-out" else [m]
    opt = {
        "--layer": ints, "--scan-interval": ints, "--te-k": st.integers(-1, 120), "--ablate-tok": ints,
        "--ref-tok": ints, "--seed": big, "--shuffle-seed": big, "--batch-size": st.integers(-1, 9),
        "--max-prompts": st.integers(-1, 6), "--head": st.integers(-1, 5), "--heatmap-size": st.integers(-1, 20),
        "--te-mass": st.floats(allow_nan=True, allow_infinity=True, width=32),
    }
    for flag, strat in opt.items():
        if draw(st.booleans()):
            args += [flag, str(draw(strat))]
    for flag in ("--sink-idx", "--tokens", "--vec-idx"):
        if draw(st.booleans()):
            args += [flag] + [str(v) for v in draw(st.lists(st.integers(-2, 70), min_size=1, max_size=3))]
    for flag in ("--truncate", "--no-plots", "--no-plots"):
        if draw(st.booleans()):
            args.append(flag)
    if draw(st.booleans()):
        args += ["--print", "heatmap"]
    lines = draw(st.lists(line, min_size=0, max_size=5))
    bom = draw(st.booleans())
    return args, lines, bom


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(command())
def test_random_flags_and_prompt_files_exit_0_or_2_with_strict_json(cmd):
    args, lines, bom = cmd
    work = Path(tempfile.mkdtemp(dir=_DIR))
    try:
        pf = work / "p.txt"
        pf.write_bytes((b"\xef\xbb\xbf" if bom else b"") + "\n".join(lines).encode("utf-8", "surrogatepass"))
        out, err = io.StringIO(), io.StringIO()
        argv = args + ["--model", tiny_dir(), "--prompt-file", str(pf), "--outdir", str(work / "o"),
                       "--no-progress"]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:      # argparse: a value that is not a number, ...
                rc = e.code
        assert rc in (0, 2), (argv, err.getvalue()[-2000:])
        assert "Traceback" not in err.getvalue()
        if rc == 2:
            assert err.getvalue().strip().splitlines()[-1].startswith("sinkscope: error:"), err.getvalue()
        for f in (work / "o").glob("*.json") if (work / "o").is_dir() else []:
            json.loads(f.read_text(encoding="utf-8"),
                       parse_constant=lambda c: pytest.fail(f"{f.name}: non-strict JSON constant {c} ({argv})"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
