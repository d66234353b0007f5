"""The Triton routing kernel (interpreted on CPU) against reference.route_reference.

ids must be exactly equal. Inputs are built without near-ties in probability (ranked,
spaced logits plus small noise): equal probabilities are ordered by torch.topk in an
unspecified way in the reference's exact path, while the kernel always puts the lower
index first. Affinity bins and popularity still tie a lot on these inputs (bins are
1/alpha wide, beta floors them), so the tie rules of the batch-aware policies are
exercised.
"""

from __future__ import annotations

import pytest
import torch
from lynx_compile.lowering import ops, reference, triton_ops, triton_route

from tests.helpers import poisoned_empty

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on NaN/-inf pads

# Weight tolerances: both sides compute softmax in fp32, round to the logits dtype, and
# normalise with the same operations; only summation order and exp differ, a few ulps.
# fp32: ~8 ulps at 1.0. fp16: 2 ulps at 1.0 (weights lie in [0, 1]).
WEIGHT_ATOL = {torch.float32: 1e-6, torch.float16: 2e-3}


def spaced_logits(tokens: int, experts: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """[tokens, experts]: each row a random ranking, 4/E logits apart, plus 1e-3 noise."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(experts, generator=gen) for _ in range(tokens)])
    noise = 1e-3 * torch.rand(tokens, experts, generator=gen)
    return (ranks.float() * (4.0 / experts) + noise).to(dtype)


def poison(monkeypatch) -> None:
    """Every buffer the wrapper allocates starts as NaN (floats) or -1 (ints)."""
    monkeypatch.setattr(triton_route, "_empty", poisoned_empty)


def assert_routes_match(got, want, dtype) -> None:
    """ids equal; weights equal within the dtype's tolerance, NaN exactly where expected."""
    got_w, got_ids = got
    want_w, want_ids = want
    assert got_ids.dtype == torch.int64 and got_w.dtype == want_w.dtype
    assert torch.equal(got_ids, want_ids), f"ids differ:\n{got_ids}\nvs reference\n{want_ids}"
    torch.testing.assert_close(
        got_w.float(), want_w.float(), rtol=0, atol=WEIGHT_ATOL[dtype], equal_nan=True
    )


# Every listed value appears: tokens 1, 3, 13, 33; experts 8, 60, 128; k 1, 2, 8; fp32 and
# fp16; all four policies; both weight conventions; beta set and beta=None.
CASES = [
    # tokens, experts, k, dtype, policy, weights, alpha, beta
    (1, 8, 1, torch.float32, "exact", "renorm", 3.0, 2.0),
    (33, 128, 8, torch.float16, "exact", "mass", 3.0, 2.0),
    (1, 60, 2, torch.float16, "affinity", "renorm", 3.0, 2.0),
    (3, 8, 2, torch.float32, "affinity", "mass", 0.7, 1.0),
    (13, 60, 8, torch.float16, "affinity", "renorm", 3.0, None),
    (33, 128, 8, torch.float32, "affinity", "renorm", 3.0, 2.0),
    (33, 60, 2, torch.float32, "affinity", "mass", 1.0, None),
    (13, 128, 1, torch.float16, "affinity", "mass", 3.0, 2.5),
    (3, 60, 8, torch.float16, "oea", "renorm", 3.0, 2.0),
    (33, 8, 2, torch.float32, "oea", "mass", 3.0, 2.0),
    (13, 8, 8, torch.float32, "static", "renorm", 3.0, 2.0),
    (33, 128, 2, torch.float16, "static", "mass", 3.0, 2.0),
]


@pytest.mark.parametrize("tokens,experts,k,dtype,policy,weights,alpha,beta", CASES)
def test_route_matches_reference(
    monkeypatch, tokens, experts, k, dtype, policy, weights, alpha, beta
):
    poison(monkeypatch)
    logits = spaced_logits(tokens, experts, dtype, seed=tokens * 1000 + experts + k)
    pol = reference.RoutingPolicy(policy, alpha, beta, k0=1, budget=12)
    want = reference.route_reference(logits, k, pol, weights)
    got = triton_route.route(logits, k, policy, alpha, beta, 1, 12, weights)
    assert_routes_match(got, want, dtype)


def test_affinity_on_gaussian_logits_and_strided_input(monkeypatch):
    """Unspaced N(0, 2) fp32 logits (fp32 probabilities do not tie) in a strided view."""
    poison(monkeypatch)
    gen = torch.Generator().manual_seed(7)
    wide = 2 * torch.randn(13, 120, generator=gen)
    logits = wide[:, ::2]  # [13, 60], stride 2 along experts
    pol = reference.RoutingPolicy("affinity", 3.0, 2.0, k0=2)
    want = reference.route_reference(logits, 8, pol, "renorm")
    assert_routes_match(
        triton_route.route(logits, 8, "affinity", 3.0, 2.0, 2, 16, "renorm"), want, torch.float32
    )
    assert reference.distinct_experts(want[1]) < reference.distinct_experts(
        torch.topk(logits, 8).indices
    ), "this input should make affinity routing share experts"


@pytest.mark.parametrize("policy", ["affinity", "static"])
def test_non_finite_rows_keep_exact_routing_and_do_not_vote(monkeypatch, policy):
    """Rows with NaN or an infinite maximum: NaN weights, in-range distinct ids, and the
    finite rows route exactly as the reference (which they would not if those rows voted).
    Their ids are not compared: torch.topk orders an all-NaN row arbitrarily."""
    poison(monkeypatch)
    logits = spaced_logits(13, 60, torch.float32, seed=3)
    logits[2, 5] = float("nan")
    logits[7, :] = float("-inf")
    logits[9, 1] = float("inf")
    logits[11, :4] = float("-inf")  # masked experts, finite maximum: an ordinary row
    pol = reference.RoutingPolicy(policy, 3.0, 2.0, k0=2, budget=12)
    want_w, want_ids = reference.route_reference(logits, 8, pol, "renorm")
    got_w, got_ids = triton_route.route(logits, 8, policy, 3.0, 2.0, 2, 12, "renorm")
    bad = torch.tensor([2, 7, 9])
    finite = torch.ones(13, dtype=torch.bool)
    finite[bad] = False
    assert torch.equal(got_ids[finite], want_ids[finite])
    torch.testing.assert_close(got_w[finite], want_w[finite], rtol=0, atol=1e-6)
    assert torch.isnan(got_w[bad]).all() and torch.isnan(want_w[bad]).all()
    assert ((got_ids[bad] >= 0) & (got_ids[bad] < 60)).all()
    assert all(len(set(row.tolist())) == 8 for row in got_ids[bad])


@pytest.mark.parametrize(
    "tokens,experts,k,policy,beta,k0",
    [
        (3, 8, 2, "affinity", 1.0, 0),
        (13, 60, 8, "affinity", 2.0, 3),
        (33, 60, 4, "affinity", None, 1),
        (13, 8, 2, "static", 2.0, 1),
        (33, 60, 8, "static", 2.0, 2),
    ],
)
def test_protected_choice_and_masked_experts_match_reference(
    monkeypatch, tokens, experts, k, policy, beta, k0
):
    """Each token's own top-k0 (k0 0..3), with masked (-inf) experts in many rows: the
    kernel ranks them below the floor and remaps usable kept experts first, as the
    reference does."""
    poison(monkeypatch)
    logits = spaced_logits(tokens, experts, torch.float32, seed=tokens + 7 * k0)
    gen = torch.Generator().manual_seed(k0)
    logits[torch.rand(tokens, experts, generator=gen) < 0.4] = float("-inf")
    logits[:, 0] = logits[:, 0].clamp(min=0.0)  # every row keeps a finite maximum
    pol = reference.RoutingPolicy(policy, 1.0, beta, k0=k0, budget=3)
    want = reference.route_reference(logits, k, pol, "renorm")
    got = triton_route.route(logits, k, policy, 1.0, beta, k0, 3, "renorm")
    assert_routes_match(got, want, torch.float32)


def test_a_masked_expert_another_token_needs_is_not_taken(monkeypatch):
    poison(monkeypatch)
    logits = torch.tensor([[0.0, float("-inf"), -10.0], [-10.0, 0.0, -10.0]])
    for k0 in (0, 1):
        weights, ids = triton_route.route(logits, 2, "affinity", 3.0, 1.0, k0, 16, "renorm")
        assert sorted(ids[0].tolist()) == [0, 2] and (weights[0] > 0).all()


def test_cuda_kernel_matches_wrapper(monkeypatch):
    """lynx::route's CUDA kernel runs the same Triton kernel (told the interpreted CPU
    tensors fit), and the reference where the kernel does not fit."""
    logits = spaced_logits(13, 60, torch.float32, seed=11)
    want = reference.route_reference(logits, 2, reference.RoutingPolicy("oea", k0=1), "renorm")
    for fits in (True, False):
        monkeypatch.setattr(triton_ops, "route_takes", lambda logits, top_k, fits=fits: fits)
        got = triton_ops._route_cuda(logits, 2, "oea", 3.0, 2.0, 1, 16, "renorm", -1)
        assert_routes_match(got, want, torch.float32)


def test_op_choice_is_device_neutral_and_what_the_triton_kernel_takes():
    from torch._subclasses import FakeTensorMode

    assert ops.route_op(telemetry=False) is torch.ops.lynx.route.default
    recorded = torch.ops.lynx.route_recorded.default  # telemetry stays an opaque call
    assert ops.route_op(telemetry=True) is recorded
    with FakeTensorMode():
        cuda_128, cuda_1024 = (
            torch.empty(2, 128, device="cuda"),
            torch.empty(2, 1024, device="cuda"),
        )
        cuda_f64 = torch.empty(2, 128, device="cuda", dtype=torch.float64)
    assert triton_ops.route_takes(cuda_128, 8)
    assert not triton_ops.route_takes(cuda_128, 17)  # top_k beyond the kernel's registers
    assert not triton_ops.route_takes(cuda_1024, 8)  # experts beyond the kernel
    assert not triton_ops.route_takes(cuda_f64, 8)
    assert not triton_ops.route_takes(torch.empty(2, 128), 8)  # CPU: the CPU lowering


def test_poisoning_catches_unwritten_rows():
    """Must fail: a launch whose grid misses tokens leaves NaN/-1 that the check catches."""
    logits = spaced_logits(33, 8, torch.float32, seed=5)
    want = reference.route_reference(logits, 2, reference.RoutingPolicy("exact"), "renorm")
    out_w = torch.full((33, 2), float("nan"))
    out_ids = torch.full((33, 2), -1, dtype=torch.int64)
    triton_route.route_kernel[(1,)](
        logits, out_w, out_ids, logits.stride(0), 33, 8, 2, 2, 2, 0, 0,
        POLICY=0, HAS_BETA=False, RENORM=True, BLOCK_T=16, BLOCK_E=8, BLOCK_K=2,
        PRECISE_EXP=False,
    )  # fmt: skip
    assert torch.equal(out_ids[:16], want[1][:16])
    with pytest.raises(AssertionError, match="ids differ"):
        assert_routes_match((out_w, out_ids), want, torch.float32)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"policy": "greedy"}, "unknown routing policy"),
        ({"weights": "softmax"}, "unknown weight convention"),
        ({"top_k": 9}, "top_k must be in"),
        ({"policy": "affinity", "alpha": 0.0}, "alpha > 0"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    args = {"top_k": 2, "policy": "exact", "weights": "renorm"} | kwargs
    with pytest.raises(ValueError, match=message):
        triton_route.route(spaced_logits(3, 8, torch.float32, 0), **args)


def test_rejects_shapes_beyond_the_kernel():
    with pytest.raises(ValueError, match="use torch.ops.lynx.route"):
        triton_route.route(torch.zeros(2, 600), 2)
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        triton_route.route(torch.zeros(2, 8, dtype=torch.float64), 2)
