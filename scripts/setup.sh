#!/usr/bin/env bash
# Creates .venv with the CPU build of torch 2.13.0 and lynx_compile (editable) with the
# extras of both README commands: [demo] (scripts/demo.sh) and [test] (scripts/test.sh).
# Installing torch first, pinned, keeps pip from pulling a multi-GB CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import lynx_compile.tools, torch, triton, pytest, tqdm, safetensors, transformers, accelerate" 2>/dev/null; then
  .venv/bin/pip install --quiet "torch==2.13.0"
  .venv/bin/pip install --quiet -e ".[demo,test]"
fi
# The native CPU kernels: built once per machine into ~/.cache/lynx_compile (~12 s), so that
# no demo, benchmark or compile pays it; a machine without compilers gets the traced ops.
.venv/bin/python -c "from lynx_compile.lowering import cpu_native as c; c.available() and print('lynx: native CPU kernels ready:', c.build())"
