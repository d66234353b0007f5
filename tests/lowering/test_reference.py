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
from lynx_compile.lowering.constants import (
    ACTIVATION_NAMES,
    ELEMENTWISE_ACTIVATIONS,
    GLU_ACTIVATIONS,
    MIN_BIN,
)
from lynx_compile.lowering.reference import (
    ACTIVATIONS,
    RoutingPolicy,
    distinct_experts,
    experts_reference,
    route_reference,
    route_scored_reference,
    score_bins,
)

POLICIES = [
    RoutingPolicy("exact"),
    RoutingPolicy("affinity", alpha=3.0, beta=2.0),
    RoutingPolicy("affinity", alpha=3.0, beta=2.0, k0=0),
    RoutingPolicy("affinity", alpha=1.0, beta=1.0),
    RoutingPolicy("affinity", alpha=0.7, beta=None),
    RoutingPolicy("oea", k0=1),
    RoutingPolicy("oea", k0=2),
    RoutingPolicy("static", budget=3),
]


@st.composite
def router_logits(draw, masked: bool = False):
    """Random logits [N, E] with coarse values so that bins and scores tie often; with
    `masked`, some experts at -inf (masked out by the model), whole rows at times."""
    n = draw(st.integers(1, 12))
    e = draw(st.integers(2, 12))
    k = draw(st.integers(1, min(e, 4)))
    scale = draw(st.sampled_from([0.25, 1.0, 4.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randint(-8, 9, (n, e), generator=gen).float() * scale
    if masked and draw(st.booleans()):
        share = draw(st.sampled_from([0.2, 0.5]))
        logits[torch.rand(n, e, generator=gen) < share] = float("-inf")
    return logits, k


MASKED_BIN = -(10**9)  # brute force: a -inf logit ranks below every finite bin


def brute_force_route(logits: torch.Tensor, k: int, policy: RoutingPolicy):
    """The design page's statement of affinity, oea and static, literally, per token, with
    exact fractions for the votes: own top-k0, then the policy's choice, the kept set K,
    and the remap by (kept and usable, usable, kept, probability, lower index). A batch of
    one token and rows with NaN or a non-finite maximum keep the exact routing."""
    probs_t = torch.softmax(logits, dim=-1)
    exact = torch.topk(probs_t, k, dim=-1).indices.tolist()
    rows, probs = logits.double().tolist(), probs_t.tolist()
    n, e = len(rows), len(rows[0])
    if n == 1 or policy.name == "exact":
        return exact
    valid = [math.isfinite(max(r)) and not any(math.isnan(v) for v in r) for r in rows]
    own = [sorted(range(e), key=lambda j: (-probs[t][j], j))[: min(policy.k0, k)] for t in range(n)]
    kept = set()
    for t in range(n):
        if valid[t]:
            kept.update(own[t])
    if policy.name == "affinity":
        alpha, beta = policy.alpha, policy.beta
        q = []
        for row in rows:
            top = max(row)
            bins = [MASKED_BIN if v == -math.inf else math.ceil(alpha * (v - top)) for v in row]
            if beta is not None:
                bins = [b if b == MASKED_BIN else max(b, -math.floor(beta)) for b in bins]
            q.append(bins)
        h = [
            [Fraction(0) if not valid[t] or b == MASKED_BIN else Fraction(n) ** b for b in q[t]]
            for t in range(n)
        ]
        total = [sum(h[t][j] for t in range(n)) for j in range(e)]
        for t in range(n):
            if not valid[t]:
                continue
            pop = [(total[j] - h[t][j]) / n for j in range(e)]
            rest = sorted(
                (j for j in range(e) if j not in own[t]),
                key=lambda j: (-(q[t][j] + pop[j]), -probs[t][j], j),
            )
            kept.update(rest[: k - len(own[t])])
    elif policy.name == "static":
        # Summed in the logits' dtype, as the policy is specified: rounding decides between
        # totals closer than an ulp (a double sum would split ties that float32 keeps).
        mask = torch.tensor(valid)[:, None]
        totals = torch.where(mask, probs_t, 0).sum(dim=0).tolist()
        m = min(max(policy.budget, k), e)
        kept.update(sorted(range(e), key=lambda j: (-totals[j], j))[:m])
    final = []
    for t in range(n):
        if not valid[t]:
            final.append(exact[t])
            continue
        usable = [v > -math.inf for v in rows[t]]
        cls = [2 * usable[j] + (j in kept) for j in range(e)]
        final.append(sorted(range(e), key=lambda j: (-cls[j], -probs[t][j], j))[:k])
    return final


AFFINITY_PARAMS = [(3.0, 2.0), (1.0, 1.0), (0.7, None), (2.0, 4.0)]


@settings(max_examples=200, deadline=None)
@given(
    router_logits(masked=True),
    st.sampled_from(AFFINITY_PARAMS),
    st.sampled_from([0, 1, 2]),
)
def test_affinity_matches_brute_force(case, params, k0):
    logits, k = case
    alpha, beta = params
    policy = RoutingPolicy("affinity", alpha=alpha, beta=beta, k0=k0)
    _, ids = route_reference(logits, k, policy)
    expected = brute_force_route(logits, k, policy)
    assert [sorted(r) for r in ids.tolist()] == [sorted(r) for r in expected]


@settings(max_examples=150, deadline=None)
@given(
    router_logits(masked=True),
    st.sampled_from(
        [
            RoutingPolicy("oea", k0=1),
            RoutingPolicy("oea", k0=2),
            RoutingPolicy("static", budget=3, k0=0),
            RoutingPolicy("static", budget=2, k0=1),
            RoutingPolicy("static", budget=5, k0=2),
        ]
    ),
)
def test_kept_set_policies_match_brute_force(case, policy):
    logits, k = case
    _, ids = route_reference(logits, k, policy)
    expected = brute_force_route(logits, k, policy)
    assert [sorted(r) for r in ids.tolist()] == [sorted(r) for r in expected]


@settings(max_examples=100, deadline=None)
@given(
    router_logits(),
    st.sampled_from(
        [RoutingPolicy("affinity", 1.0, 1.0, k0=1), RoutingPolicy("affinity", 0.5, 1.0, k0=2)]
        + [RoutingPolicy("static", budget=2, k0=1), RoutingPolicy("oea", k0=1)]
    ),
)
def test_every_token_keeps_its_own_top_k0(case, policy):
    logits, k = case
    _, ids = route_reference(logits, k, policy)
    probs = torch.softmax(logits, dim=-1)
    own = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, : min(policy.k0, k)]
    for t in range(logits.shape[0]):
        if logits.shape[0] > 1:
            assert set(own[t].tolist()) <= set(ids[t].tolist())


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
    _, ids = route_reference(logits, 1, RoutingPolicy("affinity", 1.0, None, k0=0))
    assert ids[:, 0].tolist() == [1, 1]
    # Same bins and popularity for e0 and e1 (token 1 votes equally): score decides.
    logits = torch.tensor([[0.05, 0.0, -5.0, -5.0], [0.0, 0.0, -5.0, -5.0]])
    _, ids = route_reference(logits, 1, RoutingPolicy("affinity", 1.0, None, k0=0))
    assert ids[0, 0].item() == 0
    # Exact ties everywhere: lower expert index wins.
    _, ids = route_reference(torch.zeros(3, 5), 2, RoutingPolicy("affinity", k0=0))
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


@pytest.mark.parametrize("k0", [0, 1])
@pytest.mark.parametrize("beta", [1.0, 2.0, None])
def test_a_masked_expert_another_token_needs_is_not_taken(k0, beta):
    # Token 0 masks expert 1; token 1 wants it. With a floor on the bins the masked expert
    # used to share token 0's deepest bin with expert 2 and win there on token 1's vote.
    logits = torch.tensor([[0.0, float("-inf"), -10.0], [-10.0, 0.0, -10.0]])
    weights, ids = route_reference(logits, 2, RoutingPolicy("affinity", 3.0, beta, k0))
    assert sorted(ids[0].tolist()) == [0, 2]
    assert (weights[0] > 0).all()


def test_masked_experts_rank_below_every_usable_one_in_static():
    # static keeps {0, 1} by mass; token 0 masks expert 1, so it takes a usable expert
    # outside the kept set rather than the masked one inside it.
    logits = torch.tensor([[3.0, float("-inf"), 0.0], [3.0, 2.9, -5.0], [2.9, 3.0, -5.0]])
    _, ids = route_reference(logits, 2, RoutingPolicy("static", budget=2, k0=0))
    assert sorted(ids[0].tolist()) == [0, 2]


def test_prob_space_bins_ignore_masked_scores():
    # DeepSeek-V2 style grouped routers mask whole groups to -inf in probability space;
    # log(-inf) is NaN, which made the row maximum NaN and put every expert in bin 0.
    probs = torch.tensor([[0.5, float("-inf"), 0.05, 0.0], [float("-inf"), 0.9, 0.1, 0.4]])
    q = score_bins(probs, "prob", 1.0, None)
    finite = torch.tensor([[0.5, 0.05], [0.9, 0.1]]).double().log()
    for t, cols in enumerate(([0, 2], [1, 2])):
        top = finite[t].max()
        expected = [math.ceil(v - top) for v in finite[t].tolist()]
        assert q[t, cols].tolist() == expected
    assert q[0, 1] == q[1, 0] == q[0, 3] == MIN_BIN  # masked and zero scores: the lowest bin
    assert q[0, 2] < 0  # a far expert is no longer in bin 0


def test_bad_shapes_and_values_raise_clear_errors():
    with pytest.raises(ValueError, match="2-D"):
        route_reference(torch.randn(2, 3, 4), 2)
    with pytest.raises(ValueError, match="top_k"):
        route_reference(torch.randn(2, 4), 5)
    with pytest.raises(ValueError, match="floating point"):
        route_reference(torch.ones(2, 4, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="unknown routing policy"):
        route_reference(torch.randn(2, 4), 1, RoutingPolicy("fastest"))


# The activations restated from their definitions (relu2: transformers'
# ReLUSquaredActivation, relu(x) ** 2).
DEFINED_ACTIVATIONS = {
    "silu": lambda v: v * torch.sigmoid(v),
    "gelu": torch.nn.functional.gelu,
    "relu2": lambda v: torch.clamp(v, min=0) ** 2,
}


@pytest.mark.parametrize(
    "gated,activation", [(True, "silu"), (False, "gelu"), (False, "relu2"), (True, "relu2")]
)
def test_experts_reference_matches_dense_loop(gated, activation):
    gen = torch.Generator().manual_seed(0)
    n, d, inter, e, k = 5, 8, 6, 4, 2
    x = torch.randn(n, d, generator=gen)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)])
    w = torch.rand(n, k, generator=gen)
    w_up = torch.randn(e, 2 * inter if gated else inter, d, generator=gen)
    w_down = torch.randn(e, d, inter, generator=gen)
    out = experts_reference(x, ids, w, w_up, w_down, activation, gated)
    act = DEFINED_ACTIVATIONS[activation]
    expected = torch.zeros(n, d)
    for t in range(n):
        for s in range(k):
            h = w_up[ids[t, s]] @ x[t]
            h = act(h[:inter]) * h[inter:] if gated else act(h)
            expected[t] += w[t, s] * (w_down[ids[t, s]] @ h)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)  # fp32, reordered sums


def test_every_activation_name_has_one_code_and_the_codes_never_move():
    """The C and Triton kernels switch on ACTIVATION_NAMES' codes: a new activation is
    appended, so a kernel built against the earlier codes keeps its meaning."""
    assert ACTIVATION_NAMES[:6] == ("silu", "gelu", "gelu_tanh", "relu", "swiglu_clamped", "relu2")
    assert set(ACTIVATIONS) == set(ELEMENTWISE_ACTIVATIONS)
    assert set(ELEMENTWISE_ACTIVATIONS) | set(GLU_ACTIVATIONS) == set(ACTIVATION_NAMES)


@settings(max_examples=100, deadline=None)
@given(
    router_logits(masked=True),
    st.sampled_from(["logit", "prob", "score"]),
    st.sampled_from(
        [RoutingPolicy("affinity", 1.0, 1.0, k0=1), RoutingPolicy("static", budget=2, k0=1)]
    ),
)
def test_scored_routers_keep_each_tokens_top_k0_and_never_a_masked_expert(case, space, policy):
    logits, k = case
    scores = {"logit": logits, "prob": logits.softmax(-1), "score": logits.sigmoid()}[space]
    scores = torch.where(logits == float("-inf"), float("-inf"), scores)  # masked stay masked
    values, ids = route_scored_reference(scores, k, space, policy)
    assert torch.equal(values, torch.gather(scores, 1, ids))
    finite = torch.isfinite(scores)
    for t in range(scores.shape[0]):
        row = ids[t].tolist()
        assert len(set(row)) == k
        usable = int(finite[t].sum())
        if not torch.isfinite(scores[t].max()) or scores.shape[0] == 1:
            continue  # invalid rows and a single token keep torch.topk's routing
        # masked experts only when fewer than k usable ones exist
        assert sum(bool(finite[t, e]) for e in row) == min(k, usable)
        own = sorted(range(scores.shape[1]), key=lambda e: (-float(scores[t, e]), e))[:1]
        assert set(own) <= set(row)  # the token's own top-1 is kept
