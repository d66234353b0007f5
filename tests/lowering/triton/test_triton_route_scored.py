"""The Triton scored-routing kernel (interpreted on CPU) against
reference.route_scored_reference(..., ties="lower_index").

The kernel ranks the given scores themselves, so ids must be exactly equal and values (the
scores gathered at the ids) bit-equal on any input, ties included: fp16 inputs tie often,
and so do affinity bins and popularity. The one relaxation is static's fp64 totals (their
summation order differs), which random inputs do not put within an ulp of each other.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from lynx_compile.lowering import reference, triton_ops, triton_route

from tests.helpers import REPO_ROOT, poisoned_empty

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on NaN/-inf/log 0


def router_scores(tokens: int, experts: int, dtype: torch.dtype, space: str, seed: int):
    """[tokens, experts] scores of the kind each space stands for: logit, N(0, 2) logits;
    prob, their softmax with about 1 in 8 probabilities exactly 0; score, sigmoid plus a
    DeepSeek-style correction bias (negative scores included)."""
    gen = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(tokens, experts, generator=gen)
    if space == "logit":
        scores = logits
    elif space == "prob":
        scores = torch.softmax(logits, dim=-1)
        scores[torch.rand(tokens, experts, generator=gen) < 0.125] = 0.0
    else:
        bias = 0.5 * torch.randn(experts, generator=gen) - 0.2
        scores = torch.sigmoid(logits) + bias
    return scores.to(dtype)


def assert_scored_match(got, want) -> None:
    """ids equal; values bit-equal (NaN where the reference has NaN); nothing unwritten."""
    got_vals, got_ids = got
    want_vals, want_ids = want
    assert got_ids.dtype == torch.int64 and got_vals.dtype == want_vals.dtype
    assert torch.equal(got_ids, want_ids), f"ids differ:\n{got_ids}\nvs reference\n{want_ids}"
    torch.testing.assert_close(got_vals, want_vals, rtol=0, atol=0, equal_nan=True)


def route_both(scores, k, space, policy, alpha=3.0, beta=2.0, k0=1, budget=12):
    """(kernel, reference) outputs for one call."""
    pol = reference.RoutingPolicy(policy, alpha, beta, k0, budget)
    want = reference.route_scored_reference(scores, k, space, pol, ties="lower_index")
    return triton_route.route_scored(scores, k, space, policy, alpha, beta, k0, budget), want


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the wrapper allocates starts as NaN (floats) or -1 (ints)."""
    monkeypatch.setattr(triton_route, "_empty", poisoned_empty)


# Every listed value appears: tokens 1, 3, 13, 33; experts 8, 60, 128, 256 (DeepSeek-V3:
# 256 experts, top-8, sigmoid + bias); k 1, 2, 8; fp32 and fp16; the three spaces; the
# four policies; beta set and None; k0 0, 1, 2.
CASES = [
    # tokens, experts, k, dtype, space, policy, alpha, beta, k0
    (1, 8, 1, torch.float32, "logit", "exact", 3.0, 2.0, 0),
    (33, 128, 8, torch.float16, "score", "exact", 3.0, 2.0, 1),
    (1, 60, 2, torch.float16, "score", "affinity", 3.0, 2.0, 1),
    (3, 8, 2, torch.float32, "prob", "affinity", 0.7, 1.0, 0),
    (13, 60, 8, torch.float16, "score", "affinity", 3.0, None, 2),
    (33, 128, 8, torch.float32, "logit", "affinity", 3.0, 2.0, 1),
    (33, 60, 2, torch.float32, "prob", "affinity", 1.0, None, 0),
    (13, 128, 1, torch.float16, "logit", "affinity", 3.0, 2.5, 0),
    (33, 256, 8, torch.float32, "score", "affinity", 1.0, 2.0, 1),
    (3, 60, 8, torch.float16, "prob", "oea", 3.0, 2.0, 2),
    (33, 8, 2, torch.float32, "score", "oea", 3.0, None, 1),
    (13, 8, 8, torch.float32, "logit", "static", 3.0, 2.0, 0),
    (33, 128, 2, torch.float16, "score", "static", 3.0, 2.0, 0),
    (13, 60, 8, torch.float32, "prob", "static", 3.0, None, 1),
]


@pytest.mark.parametrize("tokens,experts,k,dtype,space,policy,alpha,beta,k0", CASES)
def test_route_scored_matches_reference(
    poisoned, tokens, experts, k, dtype, space, policy, alpha, beta, k0
):
    scores = router_scores(tokens, experts, dtype, space, seed=tokens * 1000 + experts + k)
    assert_scored_match(*route_both(scores, k, space, policy, alpha, beta, k0, budget=12))


@pytest.mark.parametrize(
    "space,policy,dtype",
    [
        ("score", "affinity", torch.float32),
        ("prob", "affinity", torch.float16),
        ("logit", "static", torch.float32),
        ("score", "static", torch.float16),
        ("prob", "oea", torch.float32),
    ],
)
def test_non_finite_rows_and_masked_experts(poisoned, space, policy, dtype):
    """Rows with NaN, +inf or all -inf keep the exact routing (NaN first, then +inf, lower
    index on ties) and do not vote; rows with masked (-inf) experts route as ordinary rows,
    taking a masked expert only after every usable one; a row of zeros is an ordinary row."""
    scores = router_scores(13, 60, dtype, space, seed=5)
    gen = torch.Generator().manual_seed(6)
    scores[torch.rand(13, 60, generator=gen) < 0.3] = float("-inf")  # masked experts
    scores[2, 5] = float("nan")
    scores[4, [1, 7]] = float("nan")
    scores[4, 3] = float("inf")
    scores[7, :] = float("-inf")
    scores[9, 1] = float("inf")
    scores[11, :55] = float("-inf")  # 5 usable experts, top-8: 3 masked ones
    scores[12, :] = 0.0  # valid; under "prob" every bin is the lowest: it must not vote
    assert_scored_match(*route_both(scores, 8, space, policy, beta=None, k0=1, budget=3))


def test_affinity_shares_experts_on_sigmoid_bias_scores(poisoned):
    """A DeepSeek-V3-shaped router (256 experts, top-8, sigmoid + bias, "score" space) in a
    strided view: the kernel matches the reference, which moves experts here."""
    wide = router_scores(13, 512, torch.float32, "score", seed=9)
    scores = wide[:, ::2]  # [13, 256], stride 2 along experts
    (vals, ids), want = route_both(scores, 8, "score", "affinity", 3.0, 2.0, 1)
    assert_scored_match((vals, ids), want)
    exact = torch.topk(scores, 8).indices
    assert reference.distinct_experts(ids) < reference.distinct_experts(exact)


def test_ties_rank_lower_index_first(poisoned):
    """Equal scores (-0.0 equal to 0.0, repeated values) rank the lower index first."""
    scores = torch.tensor(
        [[0.5, -0.0, 0.5, 0.0, 0.25, 0.5], [0.0, 0.0, -0.0, 0.0, 0.0, 0.0]] * 2,
        dtype=torch.float16,
    )
    for policy in ("exact", "affinity", "static"):
        assert_scored_match(*route_both(scores, 4, "score", policy, k0=0, budget=2))


def test_cuda_kernel_runs_the_wrapper_and_falls_back_to_the_op_body(monkeypatch):
    """lynx::route_scored's CUDA kernel: the Triton wrapper where it fits (told the CPU
    tensors fit), else the op's body (torch.topk's tie order: inputs without ties); with
    a telemetry site both record the call."""
    scores = router_scores(13, 60, torch.float32, "score", seed=11)
    pol = reference.RoutingPolicy("affinity", 3.0, 2.0, 1, 16)
    want = reference.route_scored_reference(scores, 8, "score", pol)
    recorded = []
    monkeypatch.setattr(triton_ops, "record_route", lambda *args: recorded.append(args[0]))
    monkeypatch.setattr("lynx_compile.lowering.ops.record_route", triton_ops.record_route)
    for fits, site in ((True, -1), (True, 3), (False, -1), (False, 4)):
        monkeypatch.setattr(triton_ops, "route_takes", lambda s, k, fits=fits: fits)
        args = (scores, 8, "score", "affinity", 3.0, 2.0, 1, 16, site)
        assert_scored_match(triton_ops._route_scored_cuda(*args), want)
    assert recorded == [3, 4]


def test_a_telemetry_site_keeps_the_op_opaque_in_a_compiled_graph(monkeypatch):
    """The in-graph rule traces the Triton kernel only without a telemetry site: with one,
    even where the kernel takes the input, the graph keeps lynx::route_scored (it records
    each call). The traced launch itself needs a GPU: the interpreter cannot run on the
    fake tensors of a trace."""
    from torch._dynamo.backends.common import aot_autograd

    monkeypatch.setattr(triton_ops, "route_takes", lambda s, k: True)
    codes = []
    backend = aot_autograd(fw_compiler=lambda gm, _: codes.append(gm.code) or gm.forward)
    scores = router_scores(13, 60, torch.float32, "score", seed=12)

    def route(s):
        return torch.ops.lynx.route_scored(s, 8, "score", "affinity", 3.0, 2.0, 1, 16, 3)

    torch._dynamo.reset()
    values, ids = torch.compile(route, backend=backend, fullgraph=True)(scores)
    torch._dynamo.reset()
    assert "lynx.route_scored" in codes[-1] and "triton_kernel_wrapper" not in codes[-1]
    pol = reference.RoutingPolicy("affinity", 3.0, 2.0, 1, 16)
    assert torch.equal(ids, reference.route_scored_reference(scores, 8, "score", pol)[1])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"policy": "greedy"}, "unknown routing policy"),
        ({"space": "logprob"}, "unknown score space"),
        ({"top_k": 9}, "top_k must be in"),
        ({"policy": "affinity", "alpha": 0.0}, "alpha > 0"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    args = dict(top_k=2, space="score", policy="exact", alpha=3.0, beta=2.0, k0=1, budget=16)
    with pytest.raises(ValueError, match=message):
        triton_route.route_scored(router_scores(3, 8, torch.float32, "score", 0), **args | kwargs)


def test_rejects_shapes_beyond_the_kernel():
    args = ("score", "exact", 3.0, 2.0, 1, 16)
    with pytest.raises(ValueError, match="use torch.ops.lynx.route_scored"):
        triton_route.route_scored(torch.zeros(2, 600), 2, *args)
    with pytest.raises(ValueError, match="fp32/fp16/bf16 scores"):
        triton_route.route_scored(torch.zeros(2, 8, dtype=torch.float64), 2, *args)


def test_route_scored_kernel_builds_for_sm90():
    """The interpreter does not type-check a kernel as the compiler does: build it for sm_90
    (Triton's own ptxas, nothing launched; benchmarks/experts_sm90_build.py's build) in a
    subprocess without TRITON_INTERPRET, DeepSeek-V3's tile, one variant per space."""
    code = textwrap.dedent(
        """
        import os, sys
        os.environ.pop("TRITON_INTERPRET", None)
        sys.path[:0] = [sys.argv[1], sys.argv[1] + "/benchmarks"]
        from experts_sm90_build import build
        from lynx_compile.lowering import triton_route as tr
        from lynx_compile.lowering.constants import POLICY_CODES
        types = {"scores_ptr": "*fp32", "values_ptr": "*fp32", "ids_ptr": "*i64",
                 "alpha_bits": "i64"}
        for policy, space in (("exact", "score"), ("static", "logit"), ("affinity", "prob")):
            meta = dict(POLICY=POLICY_CODES[policy], SPACE=tr.SPACE_CODES[space],
                        HAS_BETA=True, BLOCK_T=8, BLOCK_E=256, BLOCK_K=8, PRECISE_EXP=True)
            r = build(tr.route_scored_kernel, types, meta, ("num_tokens",), 4, 3)
            print(policy, space, r["registers"], r["spill_bytes"])
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(REPO_ROOT)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = [line.split() for line in proc.stdout.splitlines()]
    assert [b[:2] for b in built] == [["exact", "score"], ["static", "logit"], ["affinity", "prob"]]
    assert all(b[3] == "0" for b in built), f"register spills: {built}"
