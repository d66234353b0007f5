"""Property tests of the routing reference (the specification every kernel must match).

The affinity policy is checked against an independent brute-force re-statement of the
design page, written per token with exact rational arithmetic (fractions.Fraction), so
the integer popularity key of the reference is tested against the B**q votes it encodes.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from lynx_compile.lowering.reference import (
    RoutingPolicy,
    distinct_experts,
    experts_reference,
    route_reference,
)

POLICIES = [
    RoutingPolicy("exact"),
    RoutingPolicy("affinity", alpha=3.0, beta=2.0),
    RoutingPolicy("affinity", alpha=1.0, beta=1.0),
    RoutingPolicy("affinity", alpha=0.7, beta=None),
    RoutingPolicy("oea", k0=1),
    RoutingPolicy("oea", k0=2),
    RoutingPolicy("static", budget=3),
]


@st.composite
def router_logits(draw):
    """Random logits [N, E] with coarse values so that bins and scores tie often."""
    n = draw(st.integers(1, 12))
    e = draw(st.integers(2, 12))
    k = draw(st.integers(1, min(e, 4)))
    scale = draw(st.sampled_from([0.25, 1.0, 4.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randint(-8, 9, (n, e), generator=gen).float() * scale
    return logits, k


def brute_force_affinity(logits: torch.Tensor, k: int, alpha: float, beta: float | None):
    """The design page's steps 1-6, literally, per token, with exact fractions (a batch of
    one token routes exactly: docs/design/affinity_binning.md, edge cases)."""
    rows = logits.double().tolist()
    n, e = len(rows), len(rows[0])
    if n == 1:
        return torch.topk(torch.softmax(logits, dim=-1), k, dim=-1).indices.tolist()
    q = []
    for row in rows:
        top = max(row)
        bins = [math.ceil(alpha * (v - top)) for v in row]
        q.append([max(b, -math.floor(beta)) if beta is not None else b for b in bins])
    h = [[Fraction(n) ** qq for qq in row] for row in q]
    total = [sum(h[t][j] for t in range(n)) for j in range(e)]
    probs = torch.softmax(logits, dim=-1).tolist()
    kept = set()
    for t in range(n):
        pop = [(total[j] - h[t][j]) / n for j in range(e)]
        order = sorted(range(e), key=lambda j: (-(q[t][j] + pop[j]), -probs[t][j], j))
        kept.update(order[:k])
    final = []
    for t in range(n):
        order = sorted(kept, key=lambda j: (-probs[t][j], j))
        final.append(order[:k])
    return final


@settings(max_examples=150, deadline=None)
@given(router_logits(), st.sampled_from([(3.0, 2.0), (1.0, 1.0), (0.7, None), (2.0, 4.0)]))
def test_affinity_matches_brute_force(case, params):
    logits, k = case
    alpha, beta = params
    _, ids = route_reference(logits, k, RoutingPolicy("affinity", alpha=alpha, beta=beta))
    expected = brute_force_affinity(logits, k, alpha, beta)
    assert [sorted(r) for r in ids.tolist()] == [sorted(r) for r in expected]


@settings(max_examples=100, deadline=None)
@given(router_logits(), st.sampled_from(POLICIES), st.sampled_from(["renorm", "mass"]))
@example(  # one token, tied top logits: torch.topk's pick, not the stable one (found by CI)
    (torch.tensor([[2.0, 2.0, -1.25, -1.0]]), 1), RoutingPolicy("oea", k0=1), "renorm"
)
def test_every_token_gets_k_distinct_experts_from_the_kept_set(case, policy, convention):
    logits, k = case
    weights, ids = route_reference(logits, k, policy, convention)
    assert ids.shape == weights.shape == (logits.shape[0], k)
    assert ids.dtype == torch.int64 and weights.dtype == logits.dtype
    for row in ids.tolist():
        assert len(set(row)) == k
    probs = torch.softmax(logits, dim=-1)
    exact_vals, exact_ids = torch.topk(probs, k, dim=-1)
    if logits.shape[0] == 1:  # one token routes exactly, ties included (design page)
        assert torch.equal(ids, exact_ids)
    elif policy.name == "oea" and policy.k0 * logits.shape[0] >= k:
        own = torch.sort(probs, dim=-1, descending=True, stable=True).indices[
            :, : min(policy.k0, k)
        ]
        kept = set(own.flatten().tolist())
        if len(kept) >= k:
            assert set(ids.flatten().tolist()) <= kept
        for t in range(logits.shape[0]):  # every token keeps its own top-k0
            assert set(own[t].tolist()) <= set(ids[t].tolist())
    if policy.name == "oea":  # the union of own top-k0 is inside exact's union (same tie rule)
        stable_exact = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :k]
        assert distinct_experts(ids) <= distinct_experts(stable_exact)
    # Weights follow the model's convention.
    chosen = torch.gather(probs, 1, ids)
    if convention == "renorm":
        torch.testing.assert_close(weights.sum(-1), torch.ones(len(ids)))
        torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True))
    else:
        torch.testing.assert_close(weights.sum(-1), exact_vals.sum(-1))


@settings(max_examples=60, deadline=None)
@given(router_logits(), st.sampled_from(["renorm", "mass"]))
def test_exact_policy_is_torch_topk(case, convention):
    logits, k = case
    logits = logits + torch.rand(logits.shape) * 1e-3  # distinct scores: topk order defined
    weights, ids = route_reference(logits, k, RoutingPolicy("exact"), convention)
    vals, expected = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    assert torch.equal(ids, expected)
    expected_w = vals / vals.sum(-1, keepdim=True) if convention == "renorm" else vals
    assert torch.equal(weights, expected_w)


def test_tie_order_q_then_popularity_then_score_then_index():
    # Two tokens, 4 experts, k=1. Token 0 prefers e0 by 0.05 logits, inside one bin
    # (alpha=1): popularity decides. Token 1 is certain about e1, so e1 is popular.
    logits = torch.tensor([[0.05, 0.0, -5.0, -5.0], [-5.0, 3.0, -5.0, -5.0]])
    _, ids = route_reference(logits, 1, RoutingPolicy("affinity", alpha=1.0, beta=None))
    assert ids[:, 0].tolist() == [1, 1]
    # Same bins and popularity for e0 and e1 (token 1 votes equally): score decides.
    logits = torch.tensor([[0.05, 0.0, -5.0, -5.0], [0.0, 0.0, -5.0, -5.0]])
    _, ids = route_reference(logits, 1, RoutingPolicy("affinity", alpha=1.0, beta=None))
    assert ids[0, 0].item() == 0
    # Exact ties everywhere: lower expert index wins.
    _, ids = route_reference(torch.zeros(3, 5), 2, RoutingPolicy("affinity"))
    assert ids.tolist() == [[0, 1]] * 3


def test_static_budget_keeps_the_most_probable_experts():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 12, generator=gen)
    _, ids = route_reference(logits, 2, RoutingPolicy("static", budget=4))
    totals = torch.softmax(logits, -1).sum(0)
    assert set(ids.flatten().tolist()) == set(torch.topk(totals, 4).indices.tolist())


def test_static_budget_below_top_k_still_gives_k_experts():
    _, ids = route_reference(torch.randn(5, 8), 3, RoutingPolicy("static", budget=1))
    assert all(len(set(r)) == 3 for r in ids.tolist())


def test_single_token_batch_is_exact_for_every_policy():
    logits = torch.randn(1, 16)
    _, exact = route_reference(logits, 4, RoutingPolicy("exact"))
    for policy in POLICIES:
        assert torch.equal(route_reference(logits, 4, policy)[1], exact), policy


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.name}")
def test_empty_batch_gives_empty_result(policy):
    weights, ids = route_reference(torch.empty(0, 8), 2, policy)
    assert weights.shape == ids.shape == (0, 2)


@pytest.mark.parametrize("policy", POLICIES[1:], ids=lambda p: f"{p.name}")
def test_non_finite_rows_keep_exact_routing_and_do_not_vote(policy):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 10, generator=gen)
    clean = logits.clone()
    logits[2, 3] = float("nan")
    logits[4, :] = float("-inf")
    logits[5, 7] = float("inf")
    weights, ids = route_reference(logits, 3, policy)
    _, exact_ids = torch.topk(torch.softmax(logits, -1), 3, dim=-1)
    for t in (2, 4, 5):  # the model's own (non-finite) routing, untouched
        assert torch.equal(ids[t], exact_ids[t])
    # The finite rows are routed as if the bad rows were not in the batch's vote.
    keep = [0, 1, 3]
    _, alone = route_reference(clean[keep], 3, policy)
    if policy.name != "affinity":  # affinity's B in B**q counts the whole batch
        assert torch.equal(ids[keep], alone)
    assert torch.isfinite(weights[keep]).all()


def test_masked_experts_at_minus_inf_are_never_chosen():
    logits = torch.randn(8, 6)
    logits[:, 0] = float("-inf")
    for policy in POLICIES:
        _, ids = route_reference(logits, 2, policy)
        assert (ids != 0).all(), policy


def test_bad_shapes_and_values_raise_clear_errors():
    with pytest.raises(ValueError, match="2-D"):
        route_reference(torch.randn(2, 3, 4), 2)
    with pytest.raises(ValueError, match="top_k"):
        route_reference(torch.randn(2, 4), 5)
    with pytest.raises(ValueError, match="floating point"):
        route_reference(torch.ones(2, 4, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="unknown routing policy"):
        route_reference(torch.randn(2, 4), 1, RoutingPolicy("fastest"))


@pytest.mark.parametrize("gated,activation", [(True, "silu"), (False, "gelu")])
def test_experts_reference_matches_dense_loop(gated, activation):
    gen = torch.Generator().manual_seed(0)
    n, d, inter, e, k = 5, 8, 6, 4, 2
    x = torch.randn(n, d, generator=gen)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)])
    w = torch.rand(n, k, generator=gen)
    w_up = torch.randn(e, 2 * inter if gated else inter, d, generator=gen)
    w_down = torch.randn(e, d, inter, generator=gen)
    out = experts_reference(x, ids, w, w_up, w_down, activation, gated)
    act = torch.nn.functional.silu if activation == "silu" else torch.nn.functional.gelu
    expected = torch.zeros(n, d)
    for t in range(n):
        for s in range(k):
            h = w_up[ids[t, s]] @ x[t]
            h = act(h[:inter]) * h[inter:] if gated else act(h)
            expected[t] += w[t, s] * (w_down[ids[t, s]] @ h)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)  # fp32, reordered sums
