"""Kernel tests run the Triton kernels eagerly on CPU tensors under Triton's interpreter.

TRITON_INTERPRET is read when a kernel is decorated, so it is set here, before the test
modules import lowering/triton_route.py and lowering/triton_experts.py (nothing imports
those modules earlier: lynx_compile.lowering.triton_ops imports them on first use). Only
this directory's kernels are affected: Inductor's CPU code generation never uses Triton.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
