"""The CPU sparse-experts kernels (grouped GEMMs; the traceable gathered form that the
Inductor C++ lowering uses) against the loop reference."""

from __future__ import annotations

import pytest
import torch
from lynx_compile.lowering.cpu_kernels import experts_gathered, experts_grouped
from lynx_compile.lowering.reference import experts_general_reference

from tests.helpers import EXPERTS_TOL as TOL
from tests.helpers import REPO_ROOT
from tests.helpers import experts_case as _case


@pytest.mark.parametrize("tokens", [1, 3, 13, 33])
@pytest.mark.parametrize(
    "form,act", [("gated", "silu"), ("plain", "gelu"), ("split", "silu"), ("plain", "relu2")]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", [experts_grouped, experts_gathered])
def test_cpu_kernels_match_reference(tokens, form, act, dtype, kernel):
    x, ids, w, w_up, w_down, w_gate = _case(tokens, 8, 2, 24, 20, form, dtype)
    gated = form != "plain"
    got = kernel(x, ids, w, w_up, w_down, act, gated, w_gate)
    expected = experts_general_reference(x, ids, w, w_gate, w_up, w_down, act, gated)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, **TOL[dtype])


def test_grouped_kernel_takes_transposed_weight_views_and_empty_batches():
    x, ids, w, w_up, w_down, _ = _case(13, 60, 8, 16, 12, "gated", torch.float32)
    up_t = w_up.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    got = experts_grouped(x, ids, w, up_t, w_down, "silu", True)
    expected = experts_general_reference(x, ids, w, None, w_up, w_down, "silu", True)
    torch.testing.assert_close(got, expected, **TOL[torch.float32])
    empty = experts_grouped(x[:0], ids[:0], w[:0], w_up, w_down, "silu", True)
    assert empty.shape == (0, 16)


def test_cpu_graph_calls_the_native_kernels_and_telemetry_keeps_the_route_op():
    """On CPU the compiled graph traces the softmax and calls the two native kernels
    (lynx::route_affinity_cpu, lynx::experts kept whole for its C++ CPU kernel); telemetry
    keeps the opaque routing op."""
    from lynx_compile.tools import hf_tiny
    from torch._inductor.utils import run_and_get_code

    import lynx_compile

    block = hf_tiny.build_block("qwen3_moe", "grouped_mm")
    x = torch.randn(5, 1, 32)
    for telemetry in (False, True):
        torch._dynamo.reset()
        model = torch.compile(block, backend="lynx", options={"telemetry": telemetry})
        with torch.no_grad():
            _, code = run_and_get_code(model, x)
        source = "\n".join(code)
        assert ("torch.ops.lynx.route_recorded.default" in source) == telemetry
        assert ("torch.ops.lynx.route_affinity_cpu.default" in source) != telemetry
        assert "aten.topk" not in source, "the native route replaces the model's top-k"
        assert "torch.ops.lynx.experts.default" in source
        assert "torch.ops.lynx.route.default" not in source
        assert "aten.bmm" not in source, "the native experts replace the traced gathered form"
    assert lynx_compile.report()["sites"]
    # A graph specialised to one token routes exactly (traced: nobody to share experts with)
    # and still calls the experts kernel, which reads the weights in place where the traced
    # gathered form would copy each slot's expert.
    torch._dynamo.reset()
    model = torch.compile(block, backend="lynx")
    with torch.no_grad():
        out, code = run_and_get_code(model, x[:1])
    source = "\n".join(code)
    assert "torch.ops.lynx.experts.default" in source and "route_affinity_cpu" not in source
    assert "aten.bmm" not in source
    torch.testing.assert_close(out, block(x[:1]), **TOL[torch.float32])


def test_a_scored_router_calls_the_native_scored_route():
    """DeepSeek-V3's sigmoid + bias, group-limited router: the compiled CPU graph routes
    with one native call (lynx::route_scored_affinity_cpu), the same experts as the opaque
    reference op that telemetry keeps, so the same outputs; exact traces the model's top-k."""
    from lynx_compile.tools import hf_tiny
    from torch._inductor.utils import run_and_get_code

    block = hf_tiny.build_block("deepseek_v3", "grouped_mm")
    x = torch.randn(13, 1, 32, generator=torch.Generator().manual_seed(3))
    outputs = {}
    for options in ({}, {"telemetry": True}, {"policy": "exact"}):
        torch._dynamo.reset()
        model = torch.compile(block, backend="lynx", options=options)
        with torch.no_grad():
            out, code = run_and_get_code(model, x)
        source = "\n".join(code)
        native = not options
        assert ("torch.ops.lynx.route_scored_affinity_cpu.default" in source) == native
        assert ("torch.ops.lynx.route_scored.default" in source) == ("telemetry" in options)
        assert "torch.ops.lynx.experts.default" in source
        outputs[str(options)] = out
    with torch.no_grad():
        torch.testing.assert_close(outputs["{'policy': 'exact'}"], block(x), **TOL[torch.float32])
    assert not torch.allclose(outputs["{}"], outputs["{'policy': 'exact'}"]), "nothing remapped"
    # fp32: the same experts and weights; only Inductor's fusion of the weight formula differs
    torch.testing.assert_close(outputs["{}"], outputs["{'telemetry': True}"], rtol=1e-5, atol=1e-6)


def test_without_the_native_library_the_cpu_graph_traces_the_same_function(monkeypatch):
    """A machine without compilers (or LYNX_NATIVE_CPU=0) compiles the traced reference forms:
    no lynx op in the generated code, the same outputs as the native kernels."""
    from lynx_compile.lowering import cpu_native
    from lynx_compile.tools import hf_tiny
    from torch._inductor.utils import run_and_get_code

    block = hf_tiny.build_block("qwen3_moe", "grouped_mm")
    x = torch.randn(5, 1, 32)
    outputs = {}
    for native in (True, False):
        if not native:
            monkeypatch.setattr(cpu_native, "available", lambda: False)
        assert cpu_native.available() == native  # True: built and loaded here
        torch._dynamo.reset()
        with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
            outputs[native], code = run_and_get_code(torch.compile(block, backend="lynx"), x)
        assert ("torch.ops.lynx.experts" in "\n".join(code)) == native
    # fp32 tolerance: the two forms sum the k expert outputs in different orders.
    torch.testing.assert_close(outputs[False], outputs[True], rtol=1e-5, atol=1e-5)


CACHED_RUN = """
import sys, torch
from torch._dynamo.utils import counters
from lynx_compile.tools import hf_tiny
torch.manual_seed(0)
block = hf_tiny.build_block("qwen3_moe", "grouped_mm")
x = torch.randn(5, 1, 32)
with torch.no_grad():
    out = torch.compile(block, backend="lynx", options={"policy": "exact"})(x)
    torch.testing.assert_close(out, block(x), rtol=1e-5, atol=1e-5)  # fp32, summation order
print("hits", counters["inductor"]["fxgraph_cache_hit"])
"""


def test_a_graph_from_inductors_cache_finds_the_native_kernels(tmp_path):
    """A fresh process served the compiled graph from Inductor's FX graph cache runs it
    (the backend loads the native kernels; no decomposition runs to do it)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    hits = []
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-c", CACHED_RUN],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        hits.append(int(proc.stdout.split("hits")[-1]))
    assert hits[0] == 0 and hits[1] >= 1, hits
