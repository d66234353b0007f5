"""lynx::route_experts_cpu (a softmax router's route and its experts in one native call)
against the two ops it replaces, and the CPU lowering's rewrite that emits it
(lowering/cpu_fusion.py)."""

from __future__ import annotations

import pytest
import torch
from lynx_compile.lowering import cpu_fusion, cpu_native, reference
from torch._dynamo.utils import counters

from tests.helpers import EXPERTS_TOL as TOL
from tests.helpers import experts_case

E, K, D, INTER = 16, 4, 24, 20  # experts, top-k, model width, expert width

pytestmark = pytest.mark.skipif(not cpu_native.available(), reason="no native library")


def tied_logits(n: int, seed: int = 0) -> torch.Tensor:
    """Logits on a 0.5 grid: most rows hold equal values across their k-th place."""
    gen = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(n, E, generator=gen)).mul(2).round().div(2)


def boundary_ties(logits: torch.Tensor, k: int) -> int:
    top = torch.sort(logits, dim=1, descending=True).values
    return int((top[:, k - 1] == top[:, k]).sum())


def unfused(x, logits, k, policy, rule, scale, dtype, w_up, w_gate, w_down, act, gated):
    """lynx::route's reference, the graph's scale and cast, then the native lynx::experts."""
    ties = "topk" if policy == "exact" else "lower_index"
    pol = reference.RoutingPolicy(policy, 3.0, 2.0, 1)
    w, ids = reference.route_reference(logits, k, pol, rule, ties)
    w = (w * scale).to(dtype)
    return torch.ops.lynx.experts(x, ids, w, w_up, w_gate, w_down, act, gated)


@pytest.mark.parametrize("tokens", [1, 3, 13, 33])
@pytest.mark.parametrize("policy,rule", [("exact", "renorm"), ("exact", "mass"),
                                         ("affinity", "renorm"), ("affinity", "mass")])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_op_computes_route_then_experts(tokens, policy, rule, dtype):
    form = "split" if rule == "mass" else "gated"
    x, _, _, w_up, w_down, w_gate = experts_case(tokens, E, K, D, INTER, form, dtype, seed=tokens)
    logits = tied_logits(tokens, seed=tokens)
    scale = 1.0 if rule == "renorm" else 2.5
    args = (x, logits, K, policy, rule, scale, dtype, w_up, w_gate, w_down, "silu", True)
    got = torch.ops.lynx.route_experts_cpu(
        x, logits, K, policy, 3.0, 2.0, 1, rule, scale, dtype, w_up, w_gate, w_down, "silu", True
    )
    # The same experts and weights: only the weights' last bits may differ (another exp), so
    # the per-dtype tolerance of the experts kernel; one expert chosen differently moves a
    # token's output by O(1), far past it.
    torch.testing.assert_close(got, unfused(*args), **TOL[dtype])


def test_exact_ties_come_out_as_torch_topk_orders_them():
    """On rows full of ties at the k-th place, exact mode picks torch.topk's experts, which
    here differ from the lower-index order (so the comparison can tell them apart)."""
    n = 64
    x, _, _, w_up, w_down, _ = experts_case(n, E, K, D, INTER, "gated", torch.float32, seed=5)
    logits = tied_logits(n, seed=5)
    assert boundary_ties(logits, K) >= n // 4
    probs = torch.softmax(logits, -1)
    lower = reference.exact_routing(probs, K, "lower_index", "renorm")[0]
    topk = torch.topk(probs, K).indices
    assert (lower.sort(1).values != topk.sort(1).values).any(dim=1).sum() > 0
    args = (x, logits, K, "exact", "renorm", 1.0, torch.float32, w_up, None, w_down, "silu", True)
    got = torch.ops.lynx.route_experts_cpu(
        x, logits, K, "exact", 3.0, 2.0, 0, "renorm", 1.0, None, w_up, None, w_down, "silu", True
    )
    torch.testing.assert_close(got, unfused(*args), **TOL[torch.float32])
    w = torch.gather(probs, 1, lower) / torch.gather(probs, 1, lower).sum(1, keepdim=True)
    wrong = torch.ops.lynx.experts(x, lower, w, w_up, None, w_down, "silu", True)
    assert (got - wrong).abs().amax(dim=1).gt(1e-3).any(), "the orders give the same experts"


def test_non_finite_rows_and_empty_batches():
    x, _, _, w_up, w_down, _ = experts_case(4, E, K, D, INTER, "gated", torch.float32, seed=1)
    logits = tied_logits(4, seed=1)
    logits[1, 3] = float("nan")
    logits[2, 5] = float("inf")
    args = (x, logits, K, "exact", "renorm", 1.0, torch.float32, w_up, None, w_down, "silu", True)
    got = torch.ops.lynx.route_experts_cpu(
        x, logits, K, "exact", 3.0, 2.0, 0, "renorm", 1.0, None, w_up, None, w_down, "silu", True
    )
    assert got[1:3].isnan().all() and got[[0, 3]].isfinite().all()
    torch.testing.assert_close(got, unfused(*args), equal_nan=True, **TOL[torch.float32])
    empty = torch.ops.lynx.route_experts_cpu(
        x[:0], logits[:0], K, "affinity", 3.0, 2.0, 1, "renorm", 1.0, None, w_up, None, w_down,
        "silu", True,
    )  # fmt: skip
    assert empty.shape == (0, D)


def test_fused_op_says_what_is_wrong():
    x, _, _, w_up, w_down, _ = experts_case(3, E, K, D, INTER, "gated", torch.float32)
    logits = tied_logits(3)
    call = torch.ops.lynx.route_experts_cpu
    with pytest.raises(TypeError, match="routes float32 logits"):
        call(x, logits.bfloat16(), K, "exact", 3.0, 2.0, 0, "renorm", 1.0, None, w_up, None,
             w_down, "silu", True)  # fmt: skip
    with pytest.raises(ValueError, match="policy must be 'exact' or 'affinity'"):
        call(x, logits, K, "oea", 3.0, 2.0, 0, "renorm", 1.0, None, w_up, None, w_down, "silu",
             True)  # fmt: skip
    with pytest.raises(ValueError, match="want 1 <= top_k <= E"):
        call(x, logits, E + 1, "exact", 3.0, 2.0, 0, "renorm", 1.0, None, w_up, None, w_down,
             "silu", True)  # fmt: skip


@pytest.fixture(scope="module")
def qwen3_block():
    from lynx_compile.tools import hf_tiny

    torch.manual_seed(0)
    return hf_tiny.build_block("qwen3_moe", "grouped_mm")


def _compiled(block, x, options, fuse=True, monkeypatch=None):
    torch._dynamo.reset()
    counters.clear()
    if not fuse:
        monkeypatch.setattr(cpu_fusion, "fuse_route_experts", lambda graph: 0)
    with torch.no_grad():
        out = torch.compile(block, backend="lynx", options=options)(x)
    if not fuse:
        monkeypatch.undo()
    return out[0] if isinstance(out, tuple) else out, counters["lynx"]["cpu_route_experts_fused"]


@pytest.mark.parametrize("policy", ["exact", "affinity"])
def test_the_lowering_fuses_a_router_and_computes_what_the_two_ops_compute(
    qwen3_block, policy, monkeypatch
):
    x = torch.randn(13, 1, 32, generator=torch.Generator().manual_seed(2))
    fused, count = _compiled(qwen3_block, x, {"policy": policy})
    assert count == 1
    plain, count = _compiled(qwen3_block, x, {"policy": policy}, False, monkeypatch)
    assert count == 0
    torch.testing.assert_close(fused, plain, **TOL[torch.float32])
    if policy == "exact":
        with torch.no_grad():
            eager = qwen3_block(x)
        torch.testing.assert_close(fused, eager[0] if isinstance(eager, tuple) else eager,
                                   **TOL[torch.float32])  # fmt: skip


def test_what_the_lowering_leaves_unfused(qwen3_block):
    x = torch.randn(3, 1, 32, generator=torch.Generator().manual_seed(4))
    assert _compiled(qwen3_block, x, {"policy": "oea"})[1] == 0  # traced whole
    assert _compiled(qwen3_block, x, {"telemetry": True})[1] == 0  # the recorded route
    assert _compiled(qwen3_block, x[:1], {"policy": "oea"})[1] == 1  # one token: exact


@pytest.mark.parametrize("policy,rule", [("exact", "renorm"), ("affinity", "mass")])
def test_the_onnx_decomposition_computes_the_op(policy, rule):
    """An exported graph that holds the fused op writes it as routing plus dense experts."""
    from lynx_compile import onnx_export

    x, _, _, w_up, w_down, _ = experts_case(13, E, K, D, INTER, "gated", torch.float32, seed=3)
    args = (x, tied_logits(13, seed=3), K, policy, 3.0, 2.0, 1, rule, 1.5, None, w_up, None,
            w_down, "silu", True)  # fmt: skip
    torch.testing.assert_close(
        onnx_export.route_experts_cpu_decomposed(*args),
        torch.ops.lynx.route_experts_cpu(*args),
        **TOL[torch.float32],
    )
