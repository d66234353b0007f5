"""The Triton sparse-experts kernels (interpreted on CPU) against reference.experts_reference,
plus the launch-config lookup and the tuner's no-CUDA exit."""

from __future__ import annotations

import argparse
import json
import logging

import pytest
import torch
from lynx_compile.lowering import launch_configs, ops, reference, triton_experts, triton_ops, tuner
from lynx_compile.lowering.launch_configs import ExpertsConfig, GemmConfig

from tests.helpers import poisoned_empty

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on NaN poison

# Error relative to the output's largest magnitude. fp32: the kernel's fp32 dot and the
# reference's CPU matmul sum in different orders (~1e-6). fp16: the reference rounds the
# up projection, the activation and the gate product to fp16 separately, the kernel
# rounds h once, so a few fp16 ulps (2**-10 ~ 1e-3) separate them.
REL_TOL = {torch.float32: 1e-5, torch.float16: 4e-3}


def poison(monkeypatch) -> None:
    """Every buffer the wrapper allocates (outputs and scratch) starts as NaN or -1."""
    monkeypatch.setattr(triton_experts, "_empty", poisoned_empty)


def make_inputs(tokens, experts, k, hidden, inter, dtype, gated, seed):
    """x [N, d], ids [N, k] distinct per token, weights [N, k], w_up [E, U, d], w_down [E, d, I]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=gen).to(dtype)
    up_rows = 2 * inter if gated else inter
    w_up = (torch.randn(experts, up_rows, hidden, generator=gen) / hidden**0.5).to(dtype)
    w_down = (torch.randn(experts, hidden, inter, generator=gen) / inter**0.5).to(dtype)
    return x, ids, weights, w_up, w_down


def assert_close_to_reference(got, want, dtype) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert not torch.isnan(got).any(), "unwritten (poisoned) output rows"
    err = (got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-6)
    assert err < REL_TOL[dtype], f"relative error {err:.2e} >= {REL_TOL[dtype]:.0e}"


# Every listed value appears: tokens 1, 3, 13, 33; experts 8, 60, 128; k 1, 2, 8; fp32
# and fp16; each activation, gated and plain; odd d and I (masked tile edges).
CASES = [
    # tokens, experts, k, hidden, inter, dtype, activation, gated
    (1, 8, 1, 40, 24, torch.float32, "silu", True),
    (3, 128, 8, 32, 16, torch.float16, "gelu", True),
    (13, 60, 2, 48, 40, torch.float32, "gelu_tanh", False),
    (33, 8, 2, 64, 48, torch.float16, "relu", False),
    (13, 128, 8, 24, 20, torch.float32, "silu", True),
    (33, 60, 1, 40, 72, torch.float16, "silu", True),
]


@pytest.mark.parametrize("tokens,experts,k,hidden,inter,dtype,activation,gated", CASES)
def test_experts_match_reference(
    monkeypatch, tokens, experts, k, hidden, inter, dtype, activation, gated
):
    poison(monkeypatch)
    args = make_inputs(tokens, experts, k, hidden, inter, dtype, gated, seed=tokens + experts)
    want = reference.experts_reference(*args, activation, gated)
    assert_close_to_reference(triton_experts.experts(*args, activation, gated), want, dtype)


@pytest.mark.parametrize("tokens", [1, 3, 13, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_relu2_plain_experts_match_reference(monkeypatch, tokens, dtype):
    """NemotronH's plain relu(h)**2 experts; odd d and I (masked tile edges)."""
    poison(monkeypatch)
    args = make_inputs(tokens, 16, 2, 40, 24, dtype, False, seed=tokens)
    want = reference.experts_reference(*args, "relu2", False)
    assert_close_to_reference(triton_experts.experts(*args, "relu2", False), want, dtype)
    relu = reference.experts_reference(*args, "relu", False)
    assert (want - relu).abs().max() > 0.1 * want.abs().max()  # the square is taken


def test_several_tiles_per_expert_and_strided_weights(monkeypatch):
    """block_m 16 with 33 tokens on 8 experts at k=8 (3 tiles each); w_down stored as the
    transpose of [E, I, d] (stride 1 along d), fp32 routing weights with fp16 x."""
    poison(monkeypatch)
    x, ids, weights, w_up, _ = make_inputs(33, 8, 8, 40, 24, torch.float16, True, seed=1)
    w_down = (torch.randn(8, 24, 40) / 24**0.5).to(torch.float16).transpose(1, 2)
    weights = weights.float()
    gemm = GemmConfig(block_n=16, block_k=16, num_warps=4, num_stages=2)
    config = ExpertsConfig(block_m=16, up=gemm, down=gemm)
    want = reference.experts_reference(x, ids, weights, w_up, w_down, "silu", True)
    got = triton_experts.experts(x, ids, weights, w_up, w_down, "silu", True, config=config)
    assert_close_to_reference(got, want, torch.float16)


def record_buffers(monkeypatch) -> list[torch.Tensor]:
    """Poison every buffer the wrapper allocates and keep them, in allocation order:
    chunk counts, sorted assignments, tile table [4, tiles], plan [2], h, y, out."""
    made = []

    def empty(shape, dtype, device):
        made.append(poisoned_empty(shape, dtype, device))
        return made[-1]

    monkeypatch.setattr(triton_experts, "_empty", empty)
    return made


def skewed_inputs(counts, experts, hidden, inter, dtype, seed):
    """Inputs where expert e gets counts[e] tokens (k = 1): rows per expert set exactly."""
    x, _, weights, w_up, w_down = make_inputs(
        sum(counts), experts, 1, hidden, inter, dtype, True, seed
    )
    ids = torch.cat([torch.full((c, 1), e) for e, c in enumerate(counts)])
    ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))]
    return x, ids, weights, w_up, w_down


def test_row_tile_per_expert_chosen_on_the_gpu(monkeypatch):
    """One config (largest tile 128) at two token counts: each expert gets the smallest
    row tile holding its rows (5 -> 16, 20 -> 32, 40 -> 64, 100 -> 128, 130 -> 128 + 16),
    chosen by the grouping kernel, not by the wrapper; the output matches either way."""
    gemm = GemmConfig(block_n=16, block_k=16, num_warps=4, num_stages=2)
    config = ExpertsConfig(block_m=128, up=gemm, down=gemm)
    for counts, want_tiles in (
        ((5, 0, 20, 40), [(0, 5, 0), (2, 20, 1), (3, 40, 2)]),
        ((100, 130, 3), [(0, 100, 3), (1, 128, 3), (1, 2, 0), (2, 3, 0)]),
    ):
        made = record_buffers(monkeypatch)
        args = skewed_inputs(counts, 4, 24, 16, torch.float16, seed=sum(counts))
        want = reference.experts_reference(*args, "silu", True)
        got = triton_experts.experts(*args, "silu", True, config=config)
        assert_close_to_reference(got, want, torch.float16)
        table, plan = made[2], made[3]
        live = int(plan[0])
        assert live == len(want_tiles)
        assert [tuple(table[[0, 2, 3], t].tolist()) for t in range(live)] == want_tiles


@pytest.mark.parametrize(
    "tokens,dtype,split,planes",
    [(1, torch.float32, 2, 2), (1, torch.float16, 2, 2), (13, torch.float32, 1, 2),
     (33, torch.float32, 1, 1)],
)  # fmt: skip
def test_down_projection_splits_k_when_the_grid_is_thin(monkeypatch, tokens, dtype, split, planes):
    """Split K where live down items < 2 x SMs (the interpreter's 2): one token on one
    expert has 2 column blocks, so K (3 steps) splits in 2; 13 tokens fill the grid. The
    partial sums get only the planes a split can use: at 33 tokens at least 3 tiles x 2
    column blocks are live, enough without a split, so one plane (prefill never pays)."""
    made = record_buffers(monkeypatch)
    gemm = GemmConfig(block_n=16, block_k=16, num_warps=4, num_stages=2)
    config = ExpertsConfig(block_m=16, up=gemm, down=gemm, split_k=4, programs_per_sm=1)
    args = make_inputs(tokens, 8, 1, 32, 40, dtype, True, seed=7)
    want = reference.experts_reference(*args, "silu", True)
    got = triton_experts.experts(*args, "silu", True, config=config)
    assert_close_to_reference(got, want, dtype)
    assert int(made[3][1]) == split and made[5].shape[0] == planes


@pytest.mark.parametrize("tokens,experts,k,hidden,inter,dtype,activation,gated", CASES[1:5])
def test_tensor_descriptor_weight_loads_match_reference(
    monkeypatch, tokens, experts, k, hidden, inter, dtype, activation, gated
):
    """tma=True: weight tiles through tensor descriptors (the interpreter emulates them,
    zero past d and I; tile edges at odd d, I), with split K and several row tiles."""
    poison(monkeypatch)
    args = make_inputs(tokens, experts, k, hidden, inter, dtype, gated, seed=tokens + 1)
    assert triton_experts.tma_fits(args[3], args[4])
    gemm = GemmConfig(block_n=16, block_k=16, num_warps=4, num_stages=2)
    config = ExpertsConfig(block_m=32, up=gemm, down=gemm, tma=True)
    want = reference.experts_reference(*args, activation, gated)
    got = triton_experts.experts(*args, activation, gated, config=config)
    assert_close_to_reference(got, want, dtype)


def test_tensor_descriptors_only_for_contiguous_aligned_weights():
    """Strided weights (a transposed w_down) or rows that are not 16-byte multiples take the
    pointer loads."""
    w = torch.randn(4, 16, 24)
    assert triton_experts.tma_fits(w)
    assert not triton_experts.tma_fits(w.transpose(1, 2))
    assert not triton_experts.tma_fits(torch.randn(4, 16, 6, dtype=torch.float16))


def test_routed_by_the_router_and_through_the_cuda_kernel(monkeypatch):
    """ids and weights straight from affinity routing, through lynx::experts' CUDA kernel
    (told the interpreted CPU tensors fit, it runs the Triton kernels)."""
    x, _, _, w_up, w_down = make_inputs(13, 60, 8, 32, 24, torch.float32, True, seed=2)
    logits = 2 * torch.randn(13, 60, generator=torch.Generator().manual_seed(3))
    weights, ids = reference.route_reference(logits, 8, reference.RoutingPolicy("affinity"))
    want = reference.experts_reference(x, ids, weights, w_up, w_down, "silu", True)
    monkeypatch.setattr(triton_ops, "experts_take", lambda x, w_gate, *rest: w_gate is None)
    got = triton_ops._experts_cuda(x, ids, weights, w_up, None, w_down, "silu", True)
    assert_close_to_reference(got, want, torch.float32)


def test_poisoning_catches_unwritten_rows(monkeypatch):
    """Must fail: an expert id past E is never grouped, so its slot's output row is never
    written and the poisoned NaN reaches the output (the kernel does not check ids: that
    would sync; the reference path raises instead)."""
    poison(monkeypatch)
    x, ids, weights, w_up, w_down = make_inputs(3, 8, 2, 32, 16, torch.float32, True, seed=4)
    ids[1, 0] = 8
    got = triton_experts.experts(x, ids, weights, w_up, w_down, "silu", True)
    assert torch.isnan(got[1]).all() and not torch.isnan(got[[0, 2]]).any()
    with pytest.raises(AssertionError, match="unwritten"):
        assert_close_to_reference(got, torch.zeros_like(got), torch.float32)


TRACE_SYMBOLIC = """
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.library import wrap_triton
from lynx_compile.lowering import triton_experts

def f(x, ids, weights, w_up, w_down):
    return triton_experts.experts(x, ids, weights, w_up, w_down, "silu", True, wrap=wrap_triton)

E, d, I, k, n = 16, 64, 32, 4, 13
args = (torch.randn(n, d), torch.randint(0, E, (n, k)), torch.rand(n, k),
        torch.randn(E, 2 * I, d), torch.randn(E, d, I))
code = make_fx(f, tracing_mode="symbolic")(*args).code
launches = [line for line in code.splitlines() if "triton_kernel_wrapper" in line]
grids = [line.split("grid = [(")[1].split(")]")[0].split(", ")[0] for line in launches]
print(len(launches))
print(all(not g.isdigit() for g in grids))  # every grid a function of N
"""


def test_traced_with_a_symbolic_token_count(tmp_path):
    """What a compiled graph records (wrap_triton, as triton_ops.py traces it): the five
    launches with grids and buffers that are functions of the symbolic token count, so the
    graph serves any N and the row tiles come from each call's routing. Real Triton (no
    interpreter: it cannot be traced), in a subprocess; nothing is compiled or launched."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", TRACE_SYMBOLIC], capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["5", "True"]


def test_rejects_bad_arguments():
    x, ids, weights, w_up, w_down = make_inputs(3, 8, 2, 32, 16, torch.float32, True, seed=5)
    with pytest.raises(ValueError, match="unknown activation"):
        triton_experts.experts(x, ids, weights, w_up, w_down, "swish", True)
    with pytest.raises(ValueError, match="expected w_up"):
        triton_experts.experts(x, ids, weights, w_up, w_down, "silu", False)
    with pytest.raises(ValueError, match="ids and weights"):
        triton_experts.experts(x, ids[:, :1], weights, w_up, w_down, "silu", True)


def test_one_op_for_every_device_and_what_the_triton_kernels_take():
    """The passes emit lynx::experts whatever the device; on CUDA the Triton kernels take
    fused or plain w_up in fp32/fp16/bf16 with an elementwise activation and no biases; a
    split gate, biases or swiglu_clamped (GPT-OSS) fall back (composite / traced)."""
    from torch._subclasses import FakeTensorMode

    assert ops.experts_op() is torch.ops.lynx.experts.default
    with FakeTensorMode():
        cuda_x, gate = torch.empty(4, 32, device="cuda"), torch.empty(8, 16, 32, device="cuda")
        cuda_f64 = torch.empty(4, 32, device="cuda", dtype=torch.float64)
        bias = torch.empty(8, 32, device="cuda")
    no_extras = (None,) * 5  # b_up, b_gate, b_down, act_alpha, act_limit
    assert triton_ops.experts_take(cuda_x, None, "silu", *no_extras)
    assert not triton_ops.experts_take(cuda_x, gate, "silu", *no_extras)
    assert not triton_ops.experts_take(cuda_f64, None, "silu", *no_extras)
    assert not triton_ops.experts_take(torch.empty(4, 32), None, "silu", *no_extras)
    assert not triton_ops.experts_take(cuda_x, None, "silu", None, None, bias, None, None)
    assert not triton_ops.experts_take(cuda_x, None, "swiglu_clamped", None, None, None, 1.7, 7.0)


def test_launch_configs_round_trip_and_fallback(tmp_path, monkeypatch, caplog):
    """Tuned table: nearest bucket >= N, else the largest; absent or malformed: the
    default heuristic, with a log line naming the file."""
    monkeypatch.setattr(launch_configs, "CONFIG_DIR", tmp_path)
    launch_configs.load_table.cache_clear()
    small = ExpertsConfig(16, GemmConfig(32, 64, 4, 3), GemmConfig(64, 128, 4, 4))
    large = ExpertsConfig(64, GemmConfig(128, 64, 8, 4), GemmConfig(64, 256, 8, 4))
    path = launch_configs.write_table(
        128, 2048, 768, "NVIDIA H200", torch.bfloat16, {16: small, 256: large}
    )
    assert path.parent == tmp_path and json.loads(path.read_text())["device"] == "NVIDIA H200"

    def lookup(tokens, device="NVIDIA H200"):
        return launch_configs.experts_config(128, 2048, 768, tokens, 8, torch.bfloat16, device)

    assert lookup(3) == small and lookup(16) == small
    assert lookup(17) == large and lookup(1000) == large
    with caplog.at_level(logging.INFO, logger="lynx_compile.launch_configs"):
        fallback = lookup(64, device="NVIDIA B200")
    assert fallback == launch_configs.default_config(128, 2048, 768, 64, 8, torch.bfloat16)
    assert "no tuned launch configs" in caplog.text
    path.write_text('{"configs": {"16": {"block_m": 16}}}')
    launch_configs.load_table.cache_clear()
    with caplog.at_level(logging.WARNING, logger="lynx_compile.launch_configs"):
        assert lookup(16) == launch_configs.default_config(128, 2048, 768, 16, 8, torch.bfloat16)
    assert "malformed" in caplog.text
    launch_configs.load_table.cache_clear()


def test_tuner_without_cuda_exits_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the tuner would tune")
    parser = argparse.ArgumentParser()
    tuner.add_arguments(parser)
    assert tuner.run(parser.parse_args(["--preset", "qwen3-30b-a3b"])) == 2
    err = capsys.readouterr().err.strip()
    assert "no CUDA device" in err and "\n" not in err
