"""Data-parallel runs (torchrun, gloo on CPU) equal single-process runs; out-of-memory retry; --batch-size auto;
long-prompt chunking; the scale flags. Launches two 2-process runs (~40 s on 2 cores in all)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sinkscope import distributed, scale
from sinkscope.errors import UsageError

SRC = str(Path(__file__).resolve().parents[1] / "src")
REL = 1e-6
SKIP_KEYS = {"provenance", "meta", "files", "seconds"}   # argv, timings and paths differ by construction
# A paired change (an effect's delta, its CI) is a difference of two nearly equal measured values (e.g. the loss of
# a tiny model under an ablation that barely moves it, ~1e-6 of a loss of ~10): relative error is meaningless at
# zero, so such numbers are compared to an absolute tolerance of REL x 1e-2 (the losses themselves to REL).
DIFF_ABS = REL * 1e-2
# one command line runs every mode given: the acceptance's three modes on the default model, 7 prompts in
# batches of 2 (4 batches: rank 0 runs 2 of them, rank 1 runs 2, the last one holding a single prompt)
MODES = ["--scan", "--decompose-output", "--ablate-mlp-out", "direction", "--layer", "11", "--max-prompts", "7",
         "--batch-size", "2", "--no-plots", "--no-progress"]
FILES = {"scan.json", "decompose_output_L11.json", "ablate_mlp_out_direction_L11.json"}


def launch(args: list[str], outdir: Path, nproc: int = 1, timeout: int = 300,
           entry: str | None = None) -> subprocess.CompletedProcess:
    """sinkscope ARGS --outdir OUTDIR in 1 process or under torchrun (entry: a script instead of -m sinkscope)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC, "TOKENIZERS_PARALLELISM": "false"}
    head = [sys.executable, "-m", "sinkscope"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        *([entry] if entry else ["-m", "sinkscope"])]
    res = subprocess.run(head + args + ["--outdir", str(outdir)], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def assert_close(a, b, path="") -> None:
    """Same structure; numbers equal to REL relative (None/NaN alike); strings and flags equal."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) - SKIP_KEYS == set(b) - SKIP_KEYS, (path, set(a) ^ set(b))
        for k in set(a) - SKIP_KEYS:
            assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (path, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(a, bool) or isinstance(b, float) and not isinstance(b, bool):
        assert isinstance(b, (int, float)) and isinstance(a, (int, float)), (path, a, b)
        leaf = path.rsplit(".", 1)[-1]
        abs_tol = DIFF_ABS if ("delta" in leaf or "change" in leaf) else 1e-12
        assert (a != a and b != b) or math.isclose(a, b, rel_tol=REL, abs_tol=abs_tol), (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_assert_close_catches_differences():
    assert_close({"x": [1.0, None, "a", math.nan]}, {"x": [1.0 + 1e-9, None, "a", math.nan]})
    for bad in ({"x": [1.0 + 1e-4, None, "a"]}, {"x": [1.0, 0.0, "a"]}, {"x": [1.0, None, "b"]}, {"y": 1},
                {"x": [math.nan, None, "a"]}):
        with pytest.raises(AssertionError):
            assert_close({"x": [1.0, None, "a"]}, bad)


def test_two_ranks_equal_one_process_on_the_default_model(tmp_path):
    """--scan, --decompose-output and --ablate-mlp-out direction (with its random controls), 7 prompts: the
    JSON of `torchrun --nproc-per-node 2` equals the single-process run; rank 0 alone prints and writes."""
    one = launch(MODES, tmp_path / "one")
    two = launch(MODES, tmp_path / "two", nproc=2)
    assert {p.name for p in (tmp_path / "two").iterdir()} == FILES
    for name in FILES:
        a = json.loads((tmp_path / "one" / name).read_text())
        b = json.loads((tmp_path / "two" / name).read_text())
        assert_close(a, b, name)
    for folder, world in (("one", 1), ("two", 2)):
        assert json.loads((tmp_path / folder / "scan.json").read_text())["provenance"]["world_size"] == world
    ablate = json.loads((tmp_path / "two" / "ablate_mlp_out_direction_L11.json").read_text())
    assert "random_control" in json.dumps(ablate)                                    # the controls were merged too
    for head in ("[Scan]", "[saved]", "[model]"):          # printed once: by rank 0 only
        assert (two.stdout + two.stderr).count(head) == (one.stdout + one.stderr).count(head) >= 1, head
    assert two.stdout == one.stdout                          # the tables are the same text


def test_other_modes_two_ranks_equal_one_process(tmp_path):
    """The remaining modes on a tiny saved model in one command line: --find-mlp-subspace (per-prompt z),
    --decompose-mlp-in, --ablate-mlp-out magnitude (per-prompt factors) and --scan --print heatmap; with a fake
    out-of-memory error on rank 1 (tests/dist_oom_entry.py), which rank 0's report notes."""
    from sinkscope.testing import save_tiny_model
    model = save_tiny_model("llama", tmp_path / "tiny")
    args = ["--model", str(model), "--decompose-mlp-in", "--ablate-mlp-out", "magnitude", "--find-mlp-subspace",
            "--scan", "--print", "heatmap", "--heatmap-size", "16", "--layer", "1", "--max-prompts", "7",
            "--batch-size", "2", "--no-plots", "--no-progress"]
    one = launch(args, tmp_path / "one")
    launch(args, tmp_path / "two", nproc=2, entry=str(Path(__file__).with_name("dist_oom_entry.py")))
    names = {p.name for p in (tmp_path / "one").glob("*.json")}
    assert names == {"find_mlp_subspace_L1.json", "decompose_mlp_in_L1.json", "ablate_mlp_out_magnitude_L1.json",
                     "scan_heatmaps.json"}, names
    oom_notes = 0
    for name in names:
        a, b = (json.loads((tmp_path / f / name).read_text()) for f in ("one", "two"))
        oom = [n for n in b["notes"] if n.startswith("out of memory at 2 prompts")]
        oom_notes += len(oom)
        b["notes"] = [n for n in b["notes"] if n not in oom]
        assert_close(a, b, name)
    assert oom_notes == 1                     # the mode that ran into it, from rank 1 into rank 0's report
    assert "alpha mean" in one.stderr + one.stdout


def test_explain_two_ranks_equal_one_process(tmp_path):
    """`sinkscope explain` on a tiny saved model: report.json of 2 ranks equals the single-process one."""
    from sinkscope.testing import save_tiny_model
    model = save_tiny_model("llama", tmp_path / "tiny")
    args = ["explain", "--model", str(model), "--max-prompts", "5", "--batch-size", "2", "--n-controls", "2",
            "--no-progress"]
    launch(args, tmp_path / "one")
    launch(args, tmp_path / "two", nproc=2)
    a = json.loads((tmp_path / "one" / "explain" / "report.json").read_text())
    b = json.loads((tmp_path / "two" / "explain" / "report.json").read_text())
    assert_close(a, b, "explain")


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shares_within_one_batch(monkeypatch, world):
    """Each rank's share of the batches differs from the others' by at most one batch, and together they are
    every batch exactly once."""
    items = list(range(7))
    shares = []
    for r in range(world):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        shares.append(distributed.shard(items))
    assert sorted(x for s in shares for x in s) == items
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_fake_oom_mid_scan_leaves_results_identical(default_lm, monkeypatch):
    """A torch.OutOfMemoryError raised once inside layer 5's MLP, in the second batch: that batch is split in two
    and retried; every statistic equals the run without the error."""
    import sinkscope as ss
    prompts = ss.prompts("prose56.txt", max_prompts=7)
    clean = ss.scan(default_lm, prompts, batch_size=2, progress=False).to_dict()
    mlp = default_lm.layers[5].mlp
    calls = {"n": 0}
    forward = mlp.forward

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return forward(*a, **k)
    monkeypatch.setattr(mlp, "forward", flaky)
    res = ss.scan(default_lm, prompts, batch_size=2, progress=False)
    monkeypatch.undo()
    # batch 1 (2 prompts), the failed call, then one prompt per forward (max_rows = 1): 5 prompts left
    assert calls["n"] == 1 + 1 + 5
    assert any("out of memory" in n for n in res.notes)
    assert_close(clean["records"], res.to_dict()["records"], "records")


def test_batch_size_auto_is_noted(default_lm):
    import sinkscope as ss
    from sinkscope.runner import RunContext
    ctx = RunContext(default_lm, ss.tokenized(default_lm, ss.prompts("prose56.txt", max_prompts=4)),
                     batch_size="auto", progress=False)
    assert 1 <= ctx.batch_size <= 4
    assert any(n.startswith(f"--batch-size auto: {ctx.batch_size} prompts") for n in ctx.notes)


def test_scale_flags():
    assert scale.parse_max_memory("0=20GiB, 1=10GiB,cpu=64GiB") == {0: "20GiB", 1: "10GiB", "cpu": "64GiB"}
    assert scale.parse_max_memory(None) is None
    for bad in ("20GiB", "gpu0=1GiB", "0=", "0=1GiB,,"):
        with pytest.raises(UsageError):
            scale.parse_max_memory(bad)


def test_scale_flags_bad_input_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC}
    for args in (["--gpus-per-rank", "0"], ["--max-memory", "x"], ["--offload-folder", str(tmp_path)]):
        r = subprocess.run([sys.executable, "-m", "sinkscope", "--scan", *args, "--outdir", str(tmp_path)],
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.startswith("sinkscope: error:") and "Traceback" not in r.stderr, r.stderr


def test_bad_flag_under_torchrun_is_reported_once(tmp_path):
    """Under torchrun every rank refuses a bad flag with exit 2, and only rank 0 prints the one-line error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        "-m", "sinkscope", "--scan", "--max-memory", "x", "--outdir", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert r.stderr.count("sinkscope: error: --max-memory") == 1, r.stderr[-2000:]


def test_disk_offload_gives_the_same_scan(tmp_path):
    """--max-memory cpu=40KiB --offload-folder: a tiny model's weights all go to disk (accelerate) and the scan
    is unchanged."""
    import sinkscope as ss
    from sinkscope.testing import save_tiny_model
    model = str(save_tiny_model("llama", tmp_path / "m"))
    kw = scale.load_kwargs(_Args(device="cpu", max_memory="cpu=40KiB", offload_folder=str(tmp_path / "off")))
    assert kw == {"device": "cpu", "max_memory": {"cpu": "40KiB"}, "offload_folder": str(tmp_path / "off")}
    plain = ss.load(model, dtype="fp32", device="cpu")
    off = ss.load(model, dtype="fp32", **kw)
    assert set(off.model.hf_device_map.values()) == {"disk"} and off.device.type == "cpu"
    p = ss.prompts(["hello there world, this is a test of things", "another prompt here with words"])
    a = ss.scan(plain, p, progress=False).to_dict()["records"]
    b = ss.scan(off, p, progress=False).to_dict()["records"]
    assert_close(a, b, "records")


class _Args:
    def __init__(self, device="auto", max_memory=None, offload_folder=None, gpus_per_rank=1):
        self.device, self.max_memory, self.offload_folder, self.gpus_per_rank = (device, max_memory, offload_folder,
                                                                                 gpus_per_rank)
