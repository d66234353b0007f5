"""The Triton kernel tests run the kernels eagerly on CPU tensors under Triton's interpreter,
which tests/conftest.py turns on (TRITON_INTERPRET=1) before anything imports triton. The
flag is read when a kernel is decorated: this checks that it was, for both kernel modules
(nothing imports them before the tests do: lynx_compile.lowering.triton_ops imports them on
first use). Inductor's CPU code generation never uses Triton.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="package")
def interpreted_kernels():
    """The kernels must have been decorated under TRITON_INTERPRET=1."""
    from lynx_compile.lowering import triton_experts, triton_route

    for module, kernel in ((triton_route, "route_kernel"), (triton_experts, "up_kernel")):
        if "Interpreted" not in type(getattr(module, kernel)).__name__:
            pytest.fail(
                f"{module.__name__} was imported before TRITON_INTERPRET=1 was set; run the "
                "kernel tests on their own or import the kernel modules only after "
                "tests/conftest.py"
            )
