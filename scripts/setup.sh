#!/usr/bin/env bash
# Creates .venv with the CPU build of torch 2.13.0 and lynx_compile (editable) + test extras.
# Installing torch first, pinned, keeps pip from pulling a multi-GB CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import lynx_compile, torch, triton, pytest" 2>/dev/null; then
  .venv/bin/pip install --quiet "torch==2.13.0"
  .venv/bin/pip install --quiet -e ".[test]"
fi
