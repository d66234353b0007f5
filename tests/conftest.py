"""Shared fixtures: Dynamo state is reset around each test module, so compiled models of
the same class in different modules never hit Dynamo's recompile limit."""

from __future__ import annotations

import os

# CPU CI runs the Triton kernels in Triton's interpreter; the flag is read when triton.jit
# functions (triton.language's own included) are defined, so it must be set before anything
# imports triton: lynx_compile does, through torch.library.triton_op.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import lynx_compile  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def fresh_dynamo():
    """Each module starts and ends with an empty Dynamo cache and report."""
    torch._dynamo.reset()
    lynx_compile.clear_report()
    yield
    torch._dynamo.reset()


def sites_of(report: dict, graph_ids=None, kind: str = "router") -> list[dict]:
    """Sites of one kind in a report, optionally limited to some graphs."""
    return [
        s
        for s in report["sites"]
        if s["kind"] == kind and (graph_ids is None or s.get("graph") in graph_ids)
    ]


# Sparse-experts kernels against experts_general_reference. fp32: same products, other
# summation order. bf16: both sides round the gate/up products and expert outputs to bf16
# (eps 7.8e-3), at slightly different points.
EXPERTS_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def experts_case(tokens, experts, k, d, inter, form, dtype, seed=0):
    """Random sparse-experts inputs: (x, ids, weights, w_up, w_down, w_gate); form "gated"
    (w_up [E, 2I, d]), "plain" ([E, I, d]) or "split" (w_gate and w_up [E, I, d])."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=gen)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    ids = ids.reshape(tokens, k)
    w = torch.rand(tokens, k, generator=gen)
    up_rows = inter if form == "plain" else 2 * inter
    w_up = torch.randn(experts, up_rows if form != "split" else inter, d, generator=gen) / d**0.5
    w_gate = torch.randn(experts, inter, d, generator=gen) / d**0.5 if form == "split" else None
    w_down = torch.randn(experts, d, inter, generator=gen) / inter**0.5
    cast = [t.to(dtype) if t is not None else None for t in (x, w_up, w_down, w_gate)]
    return cast[0], ids, w, cast[1], cast[2], cast[3]
