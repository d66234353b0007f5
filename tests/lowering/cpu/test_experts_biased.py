"""lynx::experts with per-expert biases and GPT-OSS's clamped SwiGLU: reference, native kernel
(C streaming path and at::mm GEMM path, lynx_ops.cpp), composite and traced decomposition.

GPT-OSS (transformers GptOssExperts) stores gate_up_proj [E, d, 2I] (x @ W), its bias
[E, 2I], down_proj [E, I, d] and its bias [E, d]; gate and up are interleaved along 2I. The
op reads them as split-gate strided views (`gpt_oss_views`), never as a copy.
"""

from __future__ import annotations

import pytest
import torch
from lynx_compile.lowering import cpu_kernels, cpu_native, ops, reference

import lynx_compile
from tests.helpers import EXPERTS_TOL as TOL
from tests.helpers import sites_of

ALPHA, LIMIT = 1.702, 7.0  # GptOssConfig's swiglu_alpha and swiglu_limit


def gpt_oss_params(experts, d, inter, dtype, seed=0):
    """GPT-OSS expert parameters in the model's layout: (gate_up [E, d, 2I], gate_up_bias
    [E, 2I], down [E, I, d], down_bias [E, d]); scaled so that some pre-activations pass
    the limit (the clamps matter)."""
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(experts, d, 2 * inter, generator=gen) * 4 / d**0.5
    gate_up_bias = torch.randn(experts, 2 * inter, generator=gen)
    down = torch.randn(experts, inter, d, generator=gen) / inter**0.5
    down_bias = torch.randn(experts, d, generator=gen)
    return tuple(t.to(dtype) for t in (gate_up, gate_up_bias, down, down_bias))


def gpt_oss_views(gate_up, gate_up_bias, down, down_bias):
    """The op's arguments for GPT-OSS's parameters: (w_up, w_gate, w_down, b_up, b_gate,
    b_down), every one a view of a parameter (interleaved: gate even, up odd)."""
    rows = gate_up.transpose(1, 2)  # [E, 2I, d]
    return (
        rows[:, 1::2],
        rows[:, 0::2],
        down.transpose(1, 2),
        gate_up_bias[:, 1::2],
        gate_up_bias[:, 0::2],
        down_bias,
    )


def gpt_oss_model(x, ids, weights, gate_up, gate_up_bias, down, down_bias, alpha, limit):
    """GptOssExperts' computation restated per (token, slot), as the model writes it."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for s in range(ids.shape[1]):
            e = ids[t, s]
            h = x[t] @ gate_up[e] + gate_up_bias[e]
            gate, up = h[::2].clamp(max=limit), h[1::2].clamp(min=-limit, max=limit)
            glu = gate * torch.sigmoid(gate * alpha)
            y = ((up + 1) * glu) @ down[e] + down_bias[e]
            out[t] += (y * weights[t, s]).float()
    return out.to(x.dtype)


def routing(tokens, experts, k, seed=0):
    """Random exact routing: ids [tokens, k] (distinct per token), weights in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    return ids.reshape(tokens, k), torch.rand(tokens, k, generator=gen)


def _gpt_oss_case(tokens, dtype, experts=8, d=40, inter=20, seed=0):
    params = gpt_oss_params(experts, d, inter, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, d, generator=gen).to(dtype)
    ids, w = routing(tokens, experts, 2, seed)
    return x, ids, w.to(dtype), params


def _op_args(x, ids, w, views, activation="swiglu_clamped", alpha=ALPHA, limit=LIMIT):
    w_up, w_gate, w_down, b_up, b_gate, b_down = views
    return (x, ids, w, w_up, w_gate, w_down, activation, True, b_up, b_gate, b_down, alpha, limit)


def _reference(args):
    x, ids, w, w_up, w_gate, w_down, act, gated, b_up, b_gate, b_down, alpha, limit = args
    return reference.experts_general_reference(
        x, ids, w, w_gate, w_up, w_down, act, gated,
        b_up=b_up, b_gate=b_gate, b_down=b_down, alpha=alpha, limit=limit,
    )  # fmt: skip


@pytest.mark.parametrize("tokens", [1, 3, 13, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_gpt_oss_experts(tokens, dtype):
    """The reference on GPT-OSS's views computes what GptOssExperts computes. fp32: other
    summation order only. bf16: the model runs one token at a time (matrix-vector products,
    other rounding than the reference's per-expert GEMMs) and adds its k slots in bf16, the
    reference in fp32; gate * alpha amplifies a rounding of the gate, so the bf16 check is
    relative to the output's scale (2 bf16 ulps of the largest value, as passes/dispatch.py's
    numerical check compares)."""
    x, ids, w, params = _gpt_oss_case(tokens, dtype)
    got = _reference(_op_args(x, ids, w, gpt_oss_views(*params)))
    want = gpt_oss_model(x, ids, w, *params, ALPHA, LIMIT)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, **TOL[dtype])
    else:
        scale = want.float().abs().max().item()
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * scale)


def test_the_clamps_are_reached_and_change_the_result():
    x, ids, w, params = _gpt_oss_case(33, torch.float32)
    args = _op_args(x, ids, w, gpt_oss_views(*params))
    unclamped = _op_args(x, ids, w, gpt_oss_views(*params), limit=None)
    assert not torch.allclose(_reference(args), _reference(unclamped), **TOL[torch.float32])
    want = gpt_oss_model(x, ids, w, *params, ALPHA, float("inf"))
    torch.testing.assert_close(_reference(unclamped), want, **TOL[torch.float32])


@pytest.mark.parametrize("tokens", [1, 3, 13, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_and_composite_match_the_reference_on_gpt_oss_views(tokens, dtype):
    """GPT-OSS's transposed, interleaved views: rows are not contiguous, so every touched
    expert runs the GEMM path, one at::mm against gate_up read in place. Expert 5 takes
    every token's first slot (up to 33 tokens on one expert)."""
    assert cpu_native.available()
    x, ids, w, params = _gpt_oss_case(tokens, dtype)
    ids[:, 0] = 5
    ids[:, 1] = torch.where(ids[:, 1] == 5, 6, ids[:, 1])
    args = _op_args(x, ids, w, gpt_oss_views(*params))
    want = _reference(args)
    for threads in (1, 2):  # GEMM experts dealt out to threads, or one after the other
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(threads)
            torch.testing.assert_close(torch.ops.lynx.experts(*args), want, **TOL[dtype])
        finally:
            torch.set_num_threads(before)
    torch.testing.assert_close(ops.experts_composite(*args), want, **TOL[dtype])


def _row_contiguous_case(form, tokens, dtype, seed=3):
    """Biased experts whose weight rows are contiguous (the streaming kernel's layout):
    "interleaved" gate/up rows of one [E, 2I, d] tensor (views, row stride 2d), "fused"
    gate/up halves with b_up [E, 2I], "split" gate with b_gate, "plain" with b_up [E, I]."""
    experts, d, inter = 8, 40, 20
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=gen)
    rows = 2 * inter if form != "plain" else inter
    w_up = torch.randn(experts, rows, d, generator=gen) * 3 / d**0.5
    b_up = torch.randn(experts, rows, generator=gen)
    w_down = torch.randn(experts, d, inter, generator=gen) / inter**0.5
    b_down = torch.randn(experts, d, generator=gen)
    x, w_up, b_up, w_down, b_down = (t.to(dtype) for t in (x, w_up, b_up, w_down, b_down))
    ids, w = routing(tokens, experts, 2, seed)
    w_gate = b_gate = None
    if form == "interleaved":
        w_gate, w_up, b_gate, b_up = w_up[:, 0::2], w_up[:, 1::2], b_up[:, 0::2], b_up[:, 1::2]
    elif form == "split":
        w_gate, w_up, b_gate, b_up = w_up[:, :inter], w_up[:, inter:], b_up[:, :inter], None
    return x, ids, w.to(dtype), w_up, w_gate, w_down, b_up, b_gate, b_down


@pytest.mark.parametrize("tokens", [1, 3, 13, 33])
@pytest.mark.parametrize(
    "form,activation",
    [("interleaved", "swiglu_clamped"), ("fused", "swiglu_clamped"), ("fused", "silu"),
     ("split", "gelu_tanh"), ("plain", "gelu")],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_streaming_path_takes_biases_and_the_clamped_activation(
    tokens, form, activation, dtype
):
    """Rows contiguous: experts with few tokens stream through the C kernel, experts with
    many (expert 5: every token's first slot; 64+ in fp32, 32+ in bf16 where the CPU has
    AVX512-BF16) run as GEMMs.
    bf16: the C kernel sums products in fp32 and rounds once, the reference rounds each
    GEMM to bf16 (TOL: a few bf16 ulps)."""
    x, ids, w, w_up, w_gate, w_down, b_up, b_gate, b_down = _row_contiguous_case(
        form, tokens, dtype
    )
    ids[:, 0] = 5
    ids[:, 1] = torch.where(ids[:, 1] == 5, 6, ids[:, 1])
    glu = activation == "swiglu_clamped"
    gated = form != "plain"
    alpha, limit = (ALPHA, LIMIT) if glu else (None, None)
    args = (x, ids, w, w_up, w_gate, w_down, activation, gated, b_up, b_gate, b_down, alpha, limit)
    want = _reference(args)
    torch.testing.assert_close(torch.ops.lynx.experts(*args), want, **TOL[dtype])
    torch.testing.assert_close(ops.experts_composite(*args), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_traced_gathered_form_matches_the_reference(dtype):
    """The decomposition where the native kernel does not run (CUDA without a Triton
    kernel for this form; no native library): cpu_kernels.experts_gathered."""
    x, ids, w, params = _gpt_oss_case(13, dtype)
    w_up, w_gate, w_down, b_up, b_gate, b_down = gpt_oss_views(*params)
    got = cpu_kernels.experts_gathered(
        x, ids, w, w_up, w_down, "swiglu_clamped", True, w_gate,
        b_up=b_up, b_gate=b_gate, b_down=b_down, alpha=ALPHA, limit=LIMIT,
    )  # fmt: skip
    torch.testing.assert_close(got, _reference(_op_args(x, ids, w, (w_up, w_gate, w_down,
                                                                    b_up, b_gate, b_down))),
                               **TOL[dtype])  # fmt: skip


def test_float16_runs_the_aten_path_with_biases():
    """float16 (no C kernel): the reference's loop in ATen, biases and activation included;
    both compute in fp16 with the same ops, only the combine order differs."""
    x, ids, w, params = _gpt_oss_case(13, torch.float16)
    args = _op_args(x, ids, w, gpt_oss_views(*params))
    got = torch.ops.lynx.experts(*args)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, _reference(args), rtol=2e-3, atol=2e-3)


def _largest_allocation(fn) -> int:
    """Bytes of the largest allocation made while fn() runs (torch.profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


@pytest.mark.parametrize("tokens", [1, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_oss_views_are_read_in_place(tokens, dtype):
    """No allocation of even half an expert's gate_up (its [d, 2I] matrix): the interleaved
    views go to one GEMM against the parameter's own storage, not a copy per call (the
    largest allocations are the op's outputs: 2 threads x [33, 128] fp32 partial sums)."""
    x, ids, w, params = _gpt_oss_case(tokens, dtype, experts=16, d=128, inter=256)
    args = _op_args(x, ids, w, gpt_oss_views(*params))
    torch.ops.lynx.experts(*args)  # warm: scratch and thread pools
    copied = _largest_allocation(lambda: torch.ops.lynx.experts(*args))
    one_expert = params[0][0].nbytes
    assert copied < one_expert // 2, f"{copied} bytes allocated (one expert: {one_expert})"


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(alpha=None), "needs gated=True and act_alpha"),
        (dict(activation="silu"), "act_alpha / act_limit parameterise swiglu_clamped only"),
        (dict(b_up="short"), r"b_up must be \[E=8, 20\]"),
        (dict(b_down="short"), r"b_down must be \[E=8, 40\]"),
        (dict(w_gate=None), "b_gate needs a split gate"),
    ],
)
def test_fake_says_what_is_wrong(change, message):
    """The fake kernel (what tracing runs) rejects a wrong call with what to fix."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, ids, w, params = _gpt_oss_case(3, torch.float32)
    w_up, w_gate, w_down, b_up, b_gate, b_down = gpt_oss_views(*params)
    if change.get("w_gate", 0) is None:  # a fused w_up [E, 2I, d] with a b_gate
        w_up, w_gate = params[0].transpose(1, 2), None
    if change.get("b_up") == "short":
        b_up = b_up[:, :-1]
    if change.get("b_down") == "short":
        b_down = b_down[:, :-1]
    activation = change.get("activation", "swiglu_clamped")
    alpha = change.get("alpha", ALPHA)
    args = (x, ids, w, w_up, w_gate, w_down, activation, True, b_up, b_gate, b_down, alpha, LIMIT)
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(Exception, match=message):
        ops.experts(*args)


def test_opcheck_biased_and_clamped():
    x, ids, w, params = _gpt_oss_case(13, torch.float32)
    torch.library.opcheck(
        torch.ops.lynx.experts.default, _op_args(x, ids, w, gpt_oss_views(*params))
    )


def test_onnx_decomposition_matches_the_reference():
    """lynx_compile.onnx_export's dense form of the op (what an ONNX export writes)."""
    from lynx_compile import onnx_export

    x, ids, w, params = _gpt_oss_case(13, torch.float32)
    args = _op_args(x, ids, w, gpt_oss_views(*params))
    got = onnx_export.experts_decomposed(*args)
    torch.testing.assert_close(got, _reference(args), **TOL[torch.float32])


def test_compiled_gpt_oss_without_the_native_kernel_traces_the_gathered_form(monkeypatch):
    """What CUDA runs for this form (experts_take declines it) and a CPU without the native
    library: the decomposition traces cpu_kernels.experts_gathered into the graph (no
    lynx::experts call left), exact == eager."""
    from lynx_compile.tools import hf_tiny
    from torch._inductor.utils import run_and_get_code

    block = hf_tiny.build_block("gpt_oss", "grouped_mm")
    x = torch.randn(5, 1, 32, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(cpu_native, "available", lambda: False)
    torch._dynamo.reset()
    lynx_compile.clear_report()
    compiled = torch.compile(block, backend="lynx", options={"policy": "exact"})
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        out, code = run_and_get_code(compiled, x)
        want = block(x)
    dispatches = sites_of(lynx_compile.report(), kind="dispatch")
    assert dispatches and all(s["status"] == "rewritten" for s in dispatches), dispatches
    assert "torch.ops.lynx.experts" not in "\n".join(code)
    torch.testing.assert_close(out[0], want[0], rtol=1e-5, atol=1e-5)  # fp32: summation order


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_composite_runs_an_interleaved_gate_up_as_one_grouped_gemm(dtype, monkeypatch):
    """The composite (CUDA's kernel for this form) finds the [E, 2I, d] matrix the gate and
    up views alias and runs grouped_mm on it: no fallback to the reference's per-expert
    loop (which syncs, and copies a strided view per expert). inter = 24: grouped_mm
    wants 16-byte strides."""
    x, ids, w, params = _gpt_oss_case(13, dtype, inter=24)
    args = _op_args(x, ids, w, gpt_oss_views(*params))
    want = _reference(args)

    def no_fallback(*args, **kwargs):
        raise AssertionError("the composite fell back to the reference loop")

    monkeypatch.setattr(reference, "experts_general_reference", no_fallback)
    torch.testing.assert_close(ops.experts_composite(*args), want, **TOL[dtype])
    w_up, w_gate = args[3], args[4]
    gate_up = cpu_kernels.interleaved_gate_up(w_gate, w_up)
    assert gate_up.data_ptr() == params[0].data_ptr()  # a view of the parameter
    assert cpu_kernels.interleaved_gate_up(w_up, w_gate) is None  # up before gate: no


def test_on_cuda_a_biased_call_is_kept_whole():
    """On CUDA the Triton kernels decline biased / swiglu_clamped calls and the
    decomposition keeps them whole (NotImplemented), so the composite runs: the gathered
    form would copy one expert's weights per (token, slot)."""
    from lynx_compile.lowering import decompositions, triton_ops
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # shapes only: a CPU-only build makes no views of CUDA fakes

        def cuda(*shape, dtype=torch.bfloat16):
            return torch.empty(shape, dtype=dtype, device="cuda")

        x, ids, w = cuda(3, 40), cuda(3, 2, dtype=torch.int64), cuda(3, 2)
        w_up, w_gate, w_down = cuda(8, 20, 40), cuda(8, 20, 40), cuda(8, 40, 20)
        args = (x, ids, w, w_up, w_gate, w_down, "swiglu_clamped", True,
                cuda(8, 20), cuda(8, 20), cuda(8, 40), ALPHA, LIMIT)  # fmt: skip
        assert not triton_ops.experts_take(args[0], args[4], args[6], *args[8:])
        assert decompositions.experts_cpu(*args) is NotImplemented
