"""The one conftest: Triton's interpreter for CPU runs of the kernels, the hypothesis profile,
and Dynamo state reset around each test module, so compiled models of the same class in
different modules never hit Dynamo's recompile limit. Shared helpers live in
tests/helpers.py."""

from __future__ import annotations

import os

# CPU CI runs the Triton kernels in Triton's interpreter; the flag is read when triton.jit
# functions (triton.language's own included) are defined, so it must be set before anything
# imports triton: lynx_compile does, through torch.library.triton_op.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

import lynx_compile  # noqa: E402

# CI runs each property test on the same derandomized examples (a failure there reproduces
# on any machine); local runs explore new random ones and keep failures in .hypothesis/.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True, scope="module")
def fresh_dynamo():
    """Each module starts and ends with an empty Dynamo cache and report."""
    torch._dynamo.reset()
    lynx_compile.clear_report()
    yield
    torch._dynamo.reset()
