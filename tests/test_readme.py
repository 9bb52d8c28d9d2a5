"""The README's Python example runs verbatim (issue 7: "a test runs that example verbatim")."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(heading, 1)[1]
    m = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert m, f"no python block after {heading!r}"
    return m.group(1)


def test_use_it_from_python_example_runs_verbatim(tmp_path):
    code = readme_block("## Use it from Python")
    assert "ss.load(" in code and ".table()" in code and ".save(" in code
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code + "\nprint('EXAMPLE-DONE', sorted(p.name for p in paths))\n"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "[Block Output L=11]" in out and "[1229, 1487, 213]" in out
    assert "EXAMPLE-DONE" in out and (tmp_path / "results" / "find_mlp_subspace_L11.json").is_file()


def test_architecture_table_is_the_adapter_tables_own():
    """The README's architecture table is `arch.family_table()` verbatim: every family, its MLP kind, its norm
    placement, what is special and, for refused variants, the reason."""
    from sinkscope.arch import family_table
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = family_table()
    assert table in text, "README.md's architecture table differs from arch.family_table(): paste it again"
    assert "| MoE |" in table and "refused" in table.splitlines()[0]
