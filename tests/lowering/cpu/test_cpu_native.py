"""The native CPU kernels (lowering/lynx_cpu.c, registered by lowering/lynx_ops.cpp) against
the plain-PyTorch reference: AffinityBinning ids exactly, sparse experts within dtype
tolerance, and clear errors for what they do not take."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lynx_compile.lowering import cpu_native, ops, reference

from tests.helpers import EXPERTS_TOL as TOL
from tests.helpers import REPO_ROOT
from tests.helpers import experts_case as _case


@pytest.fixture(autouse=True, scope="module")
def _loaded():
    """The ops' CPU kernels exist once the library is loaded."""
    cpu_native.available()


def test_the_library_builds_here():
    """CI has C and C++ compilers: the kernels under test are the native ones, and the CPU
    lowering emits them (not the traced fallback)."""
    assert cpu_native.available(), "lowering/lynx_ops.cpp did not build; see the logged warning"
    assert cpu_native.build().exists()


def _logits(tokens, experts, dtype, seed, scale=2.0, step=None):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=gen) * scale
    if step is not None:  # coarse values: many exact ties in bins, popularity and probability
        logits = (logits / step).round() * step
    return logits.to(dtype)


# Route weights: both sides sum and divide in float32 and round each result to the scores'
# dtype; only the summation order may differ. fp32: a few ulps at 1.0; bf16 / fp16: one ulp
# at 1.0 (2**-7, 2**-10), where a sum lands on a rounding boundary.
ROUTE_ATOL = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def _both(logits, k, alpha, beta, weights="renorm", k0=0):
    """(native, reference) routes (weights, ids) with the affinity policy, each token's own
    top-k0 protected. The reference orders the model's tied probabilities as the kernel
    does (lower index first)."""
    probs = torch.softmax(logits, dim=-1)
    renorm = weights == "renorm"
    got = torch.ops.lynx.route_affinity_cpu(logits, probs, k, alpha, beta, renorm, k0)
    policy = reference.RoutingPolicy("affinity", alpha, beta, k0)
    want = reference.route_reference(logits, k, policy, weights, ties="lower_index")
    return got, want


def _assert_same_route(got, want, atol=None):
    """ids equal; weights within atol (default: ROUTE_ATOL for their dtype), NaN where the
    reference has NaN."""
    (weights, ids), (want_weights, want_ids) = got, want
    assert ids.dtype == torch.int64 and weights.dtype == want_weights.dtype
    assert torch.equal(ids, want_ids), f"ids differ:\n{ids}\nreference:\n{want_ids}"
    atol = ROUTE_ATOL[weights.dtype] if atol is None else atol
    torch.testing.assert_close(weights, want_weights, rtol=0, atol=atol, equal_nan=True)


@pytest.mark.parametrize("tokens", [1, 3, 13, 33])
@pytest.mark.parametrize(
    "experts,k,dtype,alpha,beta,weights",
    [
        (8, 2, torch.float32, 3.0, 2.0, "renorm"),
        (60, 8, torch.bfloat16, 3.0, 2.0, "mass"),
        (128, 8, torch.float16, 0.7, None, "renorm"),
        (32, 4, torch.float32, 1.0, 2.5, "mass"),
        (60, 1, torch.float32, 3.0, None, "renorm"),
    ],
)
def test_route_affinity_equals_the_reference(tokens, experts, k, dtype, alpha, beta, weights):
    # step 0.5: coarse logits, so probabilities, bins and popularity tie a lot
    for seed, step, k0 in ((0, None, 0), (1, 0.5, 0), (2, None, 1), (3, 0.5, 2)):
        logits = _logits(tokens, experts, dtype, seed, step=step)
        _assert_same_route(*_both(logits, k, alpha, beta, weights, k0))


def test_route_affinity_remaps_for_real_and_keeps_non_finite_rows_exact():
    logits = _logits(33, 60, torch.float32, 3, scale=1.0)
    logits[4] = float("nan")
    logits[5, :7] = float("-inf")  # masked experts: a valid row
    logits[6, 2] = float("inf")  # infinite maximum: kept exact
    logits[7] = float("-inf")
    for weights in ("renorm", "mass"):
        got, want = _both(logits, 8, 3.0, 2.0, weights)
        _assert_same_route(got, want)
        exact_ids = reference.route_reference(logits, 8, ties="lower_index")[1]
        moved = (got[1] != exact_ids).any(dim=1)
        assert moved.any(), "this batch should remap some tokens"
        assert not moved[[4, 6, 7]].any() and torch.isnan(got[0][[4, 6, 7]]).all()
        assert torch.unique(got[1]).numel() < torch.unique(exact_ids).numel()


def test_route_affinity_alpha_zero_with_masked_experts():
    # alpha 0 times -inf is NaN in the bin formula: the reference counts it as bin 0, and so
    # must the kernel's vector and scalar paths (65 experts: 8 full vectors and a tail).
    logits = _logits(9, 65, torch.float32, 3)
    logits[:, ::5] = float("-inf")
    for beta in (None, 2.0):
        _assert_same_route(*_both(logits, 4, 0.0, beta))


@pytest.mark.parametrize("k0", [0, 1])
@pytest.mark.parametrize("beta", [1.0, 2.0, None])
def test_route_affinity_never_takes_a_masked_expert_another_token_needs(k0, beta):
    logits = torch.tensor([[0.0, float("-inf"), -10.0], [-10.0, 0.0, -10.0]])
    got, want = _both(logits, 2, 3.0, beta, k0=k0)
    _assert_same_route(got, want)
    assert sorted(got[1][0].tolist()) == [0, 2] and (got[0][0] > 0).all()
    # many masked experts: the vector and scalar bin paths, packed and four-key rankings
    for seed, beta2 in ((4, 1.0), (5, 4.0), (6, None)):
        logits = _logits(21, 37, torch.float32, seed, step=0.5)
        logits[torch.rand(21, 37, generator=torch.Generator().manual_seed(seed)) < 0.6] = -float(
            "inf"
        )
        _assert_same_route(*_both(logits, 4, 1.0, beta2, k0=k0))


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.integers(1, 40),
    experts=st.integers(2, 70),
    data=st.data(),
    alpha=st.sampled_from([0.5, 1.0, 3.0, 7.0]),
    beta=st.sampled_from([None, 0.0, 1.0, 2.0, 4.5]),
    step=st.sampled_from([None, 0.25, 1.0]),
)
def test_route_affinity_property(tokens, experts, data, alpha, beta, step):
    k = data.draw(st.integers(1, min(experts, 9)))
    seed = data.draw(st.integers(0, 2**16))
    weights = data.draw(st.sampled_from(["renorm", "mass"]))
    k0 = data.draw(st.integers(0, 3))
    logits = _logits(tokens, experts, torch.float32, seed, step=step)
    if data.draw(st.booleans()):  # masked experts, now and then whole rows
        gen = torch.Generator().manual_seed(seed)
        logits[torch.rand(tokens, experts, generator=gen) < 0.3] = float("-inf")
    _assert_same_route(*_both(logits, k, alpha, beta, weights, k0))


def test_route_affinity_empty_batch_and_what_it_does_not_take():
    (weights, ids), _ = _both(torch.zeros(0, 8), 2, 3.0, 2.0)
    assert ids.shape == (0, 2) and weights.shape == (0, 2)
    # float64 scores would be ranked after rounding to float32: refused, not approximated
    # (the CPU lowering traces the reference for them).
    with pytest.raises(TypeError, match="float32, bfloat16 or float16 scores.*got Double"):
        _both(_logits(5, 8, torch.float64, 0), 2, 3.0, 2.0)
    logits = _logits(5, 8, torch.float32, 0)
    op = torch.ops.lynx.route_affinity_cpu
    with pytest.raises(RuntimeError, match=r"logits and probs must both be \[N, E\]"):
        op(logits, logits[:4], 2, 3.0, None, True)
    with pytest.raises(TypeError, match="probs in the logits' dtype; got Float and BFloat16"):
        op(logits, logits.bfloat16(), 2, 3.0, None, True)
    with pytest.raises(ValueError, match="want 1 <= top_k <= E; got top_k = 9, E = 8"):
        op(logits, logits, 9, 3.0, None, True)


def _scores(tokens, experts, dtype, seed, space, step=None):
    """Scores a router of that space ranks by: logits, softmax probabilities, or a sigmoid
    plus a per-expert bias (DeepSeek-V3's e_score_correction_bias: scores can be < 0)."""
    logits = _logits(tokens, experts, torch.float32, seed, step=step)
    if space == "prob":
        return torch.softmax(logits, dim=-1).to(dtype)
    if space == "score":
        bias = 0.3 * torch.randn(experts, generator=torch.Generator().manual_seed(seed + 1))
        return (torch.sigmoid(logits) + bias).to(dtype)
    return logits.to(dtype)


def _both_scored(scores, k, space, alpha, beta, k0=0):
    """(native, reference) scored routes (scores at ids, ids) with the affinity policy; the
    reference orders the model's tied scores as the kernel does (lower index first)."""
    got = torch.ops.lynx.route_scored_affinity_cpu(scores, k, space, alpha, beta, k0)
    policy = reference.RoutingPolicy("affinity", alpha, beta, k0)
    want = reference.route_scored_reference(scores, k, space, policy, ties="lower_index")
    return got, want


def _assert_same_scored(got, want):
    """ids equal; the values are the scores gathered at them, so bit for bit equal."""
    _assert_same_route(got, want, atol=0.0)


@pytest.mark.parametrize("tokens", [1, 3, 13, 33])
@pytest.mark.parametrize("space", ["logit", "prob", "score"])
@pytest.mark.parametrize(
    "experts,k,dtype,alpha,beta",
    [
        (8, 2, torch.float32, 3.0, 2.0),  # packed four-key ranking (beta <= 2)
        (256, 8, torch.bfloat16, 3.0, 2.0),  # DeepSeek-V3's router size
        (60, 6, torch.float16, 0.7, None),  # no floor: the comparator path
        (37, 1, torch.float32, 1.0, 3.0),  # beta 3: the comparator path
    ],
)
def test_route_scored_affinity_equals_the_reference(tokens, space, experts, k, dtype, alpha, beta):
    # step 0.5: coarse scores, so bins, popularity and scores tie a lot
    for seed, step, k0 in ((0, None, 0), (1, 0.5, 1), (2, None, 2)):
        scores = _scores(tokens, experts, dtype, seed, space, step)
        got, want = _both_scored(scores, k, space, alpha, beta, k0)
        _assert_same_scored(got, want)


@pytest.mark.parametrize("space", ["logit", "prob", "score"])
@pytest.mark.parametrize("beta", [2.0, None])
def test_route_scored_affinity_remaps_and_keeps_non_finite_rows_exact(space, beta):
    scores = _scores(33, 60, torch.float32, 5, space)
    scores[4] = float("nan")
    scores[5, :7] = float("-inf")  # masked experts (a group-limited router): a valid row
    scores[6, 2] = float("inf")  # infinite maximum: kept exact
    scores[7] = float("-inf")
    scores[8, :20] = 0.0  # zeros: log(0) is -inf in "prob" space, still usable
    scores[9, 3] = -0.0  # equal to +0: ranked by index, not sign bit
    got, want = _both_scored(scores, 8, space, 3.0, beta, k0=1)
    _assert_same_scored(got, want)
    exact_ids = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :8]
    moved = (got[1] != exact_ids).any(dim=1)
    assert moved.any(), "this batch should remap some tokens"
    assert not moved[[4, 6, 7]].any()
    assert torch.unique(got[1]).numel() < torch.unique(exact_ids).numel()


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.integers(1, 40),
    experts=st.integers(2, 70),
    data=st.data(),
    space=st.sampled_from(["logit", "prob", "score"]),
    alpha=st.sampled_from([0.5, 1.0, 3.0, 7.0]),
    beta=st.sampled_from([None, 0.0, 1.0, 2.0, 4.5]),
    step=st.sampled_from([None, 0.25, 1.0]),
)
def test_route_scored_affinity_property(tokens, experts, data, space, alpha, beta, step):
    k = data.draw(st.integers(1, min(experts, 9)))
    seed = data.draw(st.integers(0, 2**16))
    k0 = data.draw(st.integers(0, 3))
    scores = _scores(tokens, experts, torch.float32, seed, space, step)
    if data.draw(st.booleans()):  # masked experts, now and then whole rows
        gen = torch.Generator().manual_seed(seed)
        scores[torch.rand(tokens, experts, generator=gen) < 0.3] = float("-inf")
    _assert_same_scored(*_both_scored(scores, k, space, alpha, beta, k0))


def test_route_scored_affinity_empty_batch_and_what_it_does_not_take():
    (values, ids), _ = _both_scored(torch.zeros(0, 8), 2, "score", 3.0, 2.0)
    assert ids.shape == (0, 2) and values.shape == (0, 2)
    op = torch.ops.lynx.route_scored_affinity_cpu
    scores = _logits(5, 8, torch.float32, 0)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16 scores; got Double"):
        op(scores.double(), 2, "logit", 3.0, 2.0, 0)
    with pytest.raises(ValueError, match="unknown score space 'logits'; valid: logit, prob"):
        op(scores, 2, "logits", 3.0, 2.0, 0)
    with pytest.raises(ValueError, match="want 1 <= top_k <= E; got top_k = 9, E = 8"):
        op(scores, 9, "logit", 3.0, 2.0, 0)
    with pytest.raises(RuntimeError, match=r"scores must be \[N, E\]"):
        op(scores[None], 2, "logit", 3.0, 2.0, 0)


@pytest.mark.parametrize("tokens", [1, 3, 13, 33])
@pytest.mark.parametrize("form,act", [("gated", "silu"), ("plain", "gelu"), ("split", "silu")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_match_the_reference(tokens, form, act, dtype):
    # d = 40 and inter = 20: vector bodies plus scalar tails, 8-row blocks plus leftover rows.
    x, ids, w, w_up, w_down, w_gate = _case(tokens, 8, 2, 40, 20, form, dtype)
    gated = form != "plain"
    got = torch.ops.lynx.experts(x, ids, w, w_up, w_gate, w_down, act, gated)
    want = reference.experts_general_reference(x, ids, w, w_gate, w_up, w_down, act, gated)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("tokens", [1, 3, 13, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu2_experts_native_and_composite_match_the_reference(tokens, dtype):
    # NemotronH's plain experts, relu(h)**2. d = 40, inter = 20: a vector body and a masked
    # tail; at 33 tokens (fp32) some experts reach the GEMM path.
    x, ids, w, w_up, w_down, _ = _case(tokens, 8, 2, 40, 20, "plain", dtype)
    want = reference.experts_general_reference(x, ids, w, None, w_up, w_down, "relu2", False)
    native = torch.ops.lynx.experts(x, ids, w, w_up, None, w_down, "relu2", False)
    composite = ops.experts_composite(x, ids, w, w_up, None, w_down, "relu2", False)
    relu = reference.experts_general_reference(x, ids, w, None, w_up, w_down, "relu", False)
    assert not torch.allclose(want, relu, **TOL[dtype])  # the square is taken
    for got in (native, composite):
        assert got.dtype == dtype and got.shape == x.shape
        torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("act", ["gelu_tanh", "relu", "silu", "gelu", "relu2"])
def test_experts_activations_and_model_sized_shapes(act):
    x, ids, w, w_up, w_down, w_gate = _case(33, 32, 4, 128, 64, "gated", torch.float32)
    ids[:5] = 7  # many tokens on one expert (more than one token block)
    ids[:5, 1] = 3
    got = torch.ops.lynx.experts(x, ids, w, w_up, None, w_down, act, True)
    want = reference.experts_general_reference(x, ids, w, None, w_up, w_down, act, True)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("act", ["gelu_tanh", "relu", "silu", "relu2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_vector_activations_over_the_whole_range(act, dtype):
    # Pre-activations up to about +-300 (x scaled by 60): the vector exp saturates to inf and
    # 0 there, as expf does. inter = 40: two full 16-lane vectors and a masked tail.
    x, ids, w, w_up, w_down, w_gate = _case(13, 8, 2, 48, 40, "gated", dtype)
    x = x * 60
    got = torch.ops.lynx.experts(x, ids, w, w_up, None, w_down, act, True)
    want = reference.experts_general_reference(x, ids, w, None, w_up, w_down, act, True)
    scale = want.abs().max().item()
    assert scale > 1e3  # the case does reach large activations
    tol = TOL[dtype]
    torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=tol["atol"] * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_dealt_out_to_threads_match_the_reference(dtype):
    # With torch's intra-op threads the touched experts are dealt out to the threads, each
    # into its own output; 1, 2 and 3 threads (3 parts on 2 cores too) give the same sums.
    x, ids, w, w_up, w_down, w_gate = _case(33, 32, 4, 128, 64, "split", dtype)
    want = reference.experts_general_reference(x, ids, w, w_gate, w_up, w_down, "silu", True)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            got = torch.ops.lynx.experts(x, ids, w, w_up, w_gate, w_down, "silu", True)
            torch.testing.assert_close(got, want, **TOL[dtype])
        with pytest.raises(IndexError, match=r"expert ids must be in \[0, 32\)"):
            torch.ops.lynx.experts(x, ids + 1, w, w_up, w_gate, w_down, "silu", True)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("form", ["gated", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_every_token_block_shape_matches_the_reference(form, dtype):
    # Expert j gets COUNTS[j] tokens: each streamed block shape (1-2 tokens row by row; 3-6
    # in one column block; 7 and 13 split into blocks of 4+3 and 5+4+4). d = 45 and
    # inter = 23: rows not a multiple of the 4- and 8-row groups and dot products with a
    # masked tail; 1 and 2 threads.
    counts = [1, 2, 3, 4, 5, 6, 7, 13]
    n = sum(counts)
    x, _, w, w_up, w_down, w_gate = _case(n, len(counts), 1, 45, 23, form, dtype)
    ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    ids = ids[torch.randperm(n, generator=torch.Generator().manual_seed(1))][:, None]
    assert torch.bincount(ids.flatten()).tolist() == counts
    want = reference.experts_general_reference(x, ids, w, w_gate, w_up, w_down, "silu", True)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = torch.ops.lynx.experts(x, ids, w, w_up, w_gate, w_down, "silu", True)
            torch.testing.assert_close(got, want, **TOL[dtype])
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("form", ["gated", "split", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_sliced_across_threads_match_the_reference(form, dtype):
    # Three experts of 3 tokens each, >= 4 MiB in all, deal out unevenly to 2 threads (2 + 1),
    # so each thread takes a slice of every expert's intermediate dim (lynx_ops.cpp,
    # kSliceBytes): inter = 2000 gives slices of 1024 and 976; d = 264 a masked tail. With
    # biases: each slice reads its own bias elements and b_down is added once.
    x, ids, w, w_up, w_down, w_gate = _case(9, 3, 1, 264, 2000, form, dtype)
    ids = torch.arange(9)[:, None] % 3
    gen = torch.Generator().manual_seed(2)
    b_up = torch.randn(3, w_up.shape[1], generator=gen).to(dtype)
    b_gate = torch.randn(3, 2000, generator=gen).to(dtype) if form == "split" else None
    b_down = torch.randn(3, 264, generator=gen).to(dtype)
    gated = form != "plain"
    want = reference.experts_general_reference(
        x, ids, w, w_gate, w_up, w_down, "silu", gated, b_up=b_up, b_gate=b_gate, b_down=b_down
    )
    plain = reference.experts_general_reference(x, ids, w, w_gate, w_up, w_down, "silu", gated)
    assert not torch.allclose(want, plain, **TOL[dtype])  # the biases matter
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = torch.ops.lynx.experts(
                x, ids, w, w_up, w_gate, w_down, "silu", gated, b_up, b_gate, b_down
            )
            torch.testing.assert_close(got, want, **TOL[dtype])
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("tokens", [3, 33, 65])
@pytest.mark.parametrize(
    "form,act", [("gated", "silu"), ("plain", "gelu_tanh"), ("split", "silu"), ("plain", "relu2")]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_with_many_tokens_run_as_gemms_and_match_the_reference(tokens, form, act, dtype):
    # Experts with at least 32 (bf16) or 64 (fp32) tokens run as at::mm GEMMs, the others
    # stream: expert 5 takes every token's first slot (3, 33 or 65 tokens: below, between
    # and above both crossings), experts 6 and 7 share the second slots (65 tokens, bf16:
    # three GEMM experts, dealt out to 2 threads; fp32: one GEMM, two streamed). 1 and 2
    # threads.
    x, ids, w, w_up, w_down, w_gate = _case(tokens, 8, 2, 48, 40, form, dtype, seed=4)
    ids[:, 0] = 5
    ids[:, 1] = 6 + torch.arange(tokens) % 2
    gated = form != "plain"
    want = reference.experts_general_reference(x, ids, w, w_gate, w_up, w_down, act, gated)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = torch.ops.lynx.experts(x, ids, w, w_up, w_gate, w_down, act, gated)
            torch.testing.assert_close(got, want, **TOL[dtype])
    finally:
        torch.set_num_threads(before)


def _largest_allocation(fn) -> int:
    """Bytes of the largest allocation made while fn() runs (torch.profiler's memory
    events: an op that copies its weights shows the copy)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


@pytest.mark.parametrize("tokens", [1, 13, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_read_strided_weights_in_place(tokens, dtype):
    """Weights in a transposed layout ([E, d, U] storage seen as [E, U, d], as a transposed
    dispatch plan passes them), and a split gate and up that are two halves of one fused
    tensor (expert stride 2I d): the reference's result, with no copy of the weights."""
    # 16 experts: each weight tensor is several times the op's own scratch at 33 tokens
    x, ids, w, w_up, w_down, _ = _case(tokens, 16, 2, 64, 48, "gated", dtype, seed=2)
    up_t = w_up.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strides (., 1, U)
    down_t = w_down.transpose(1, 2).contiguous().transpose(1, 2)
    want = reference.experts_general_reference(x, ids, w, None, w_up, w_down, "silu", True)
    for up, down in ((up_t, w_down), (w_up, down_t), (up_t, down_t)):
        got = torch.ops.lynx.experts(x, ids, w, up, None, down, "silu", True)
        torch.testing.assert_close(got, want, **TOL[dtype])
        copied = _largest_allocation(
            lambda up=up, down=down: torch.ops.lynx.experts(x, ids, w, up, None, down, "silu", True)
        )
        assert copied < w_down.nbytes // 2, f"{copied} bytes allocated: a copy of the weights?"
    gate, up = w_up[:, :48], w_up[:, 48:]  # views: expert stride 2 * 48 * 64, not 48 * 64
    want = reference.experts_general_reference(x, ids, w, gate, up, w_down, "silu", True)
    got = torch.ops.lynx.experts(x, ids, w, up, gate, w_down, "silu", True)
    torch.testing.assert_close(got, want, **TOL[dtype])
    copied = _largest_allocation(
        lambda: torch.ops.lynx.experts(x, ids, w, up, gate, w_down, "silu", True)
    )
    assert copied < w_down.nbytes // 2, f"{copied} bytes allocated: a copy of the weights?"


def _separate(t):
    """A stacked [E, ...] tensor's experts as E tensors of their own (separate allocations,
    as an nn.ModuleList's nn.Linear weights are); [] for None."""
    return [] if t is None else [e.clone() for e in t.unbind(0)]


def _list_cases(dtype):
    """(name, threads, x, ids, w, w_up, w_gate, w_down, biases, activation, gated) reaching
    each path of lynx::experts: every streamed token block, threads sliced across the
    intermediate dim (with biases), the GEMM experts, and the ATen loop (float16)."""
    counts = [1, 2, 3, 4, 5, 6, 7, 13]
    n = sum(counts)
    x, _, w, w_up, w_down, w_gate = _case(n, 8, 1, 45, 23, "split", dtype)
    ids = torch.repeat_interleave(torch.arange(8), torch.tensor(counts))[:, None]
    for threads in (1, 2):
        yield "token blocks", threads, x, ids, w, w_up, w_gate, w_down, (None,) * 3, "silu", True
    x, ids, w, w_up, w_down, _ = _case(9, 3, 1, 264, 2000, "gated", dtype)
    ids = torch.arange(9)[:, None] % 3
    gen = torch.Generator().manual_seed(2)
    biases = (torch.randn(3, 4000, generator=gen).to(dtype), None,
              torch.randn(3, 264, generator=gen).to(dtype))  # fmt: skip
    yield "sliced", 2, x, ids, w, w_up, None, w_down, biases, "silu", True
    x, ids, w, w_up, w_down, _ = _case(65, 8, 2, 48, 40, "plain", dtype, seed=4)
    ids[:, 0], ids[:, 1] = 5, 6 + torch.arange(65) % 2
    yield "gemm", 2, x, ids, w, w_up, None, w_down, (None,) * 3, "gelu_tanh", False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_experts_list_equals_the_stacked_op_on_every_path(dtype):
    """lynx::experts_list on each expert's own tensors computes what lynx::experts computes
    on the same weights stacked (the same kernel: bit for bit), and the reference; it
    allocates nothing weight-sized."""
    before = torch.get_num_threads()
    try:
        for case in _list_cases(dtype):
            name, threads, x, ids, w, w_up, w_gate, w_down, biases, act, gated = case
            torch.set_num_threads(threads)
            b_up, b_gate, b_down = biases
            stacked = torch.ops.lynx.experts(
                x, ids, w, w_up, w_gate, w_down, act, gated, b_up, b_gate, b_down
            )
            lists = [_separate(t) for t in (w_up, w_gate, w_down, b_up, b_gate, b_down)]
            got = torch.ops.lynx.experts_list(x, ids, w, *lists, act, gated)
            want = reference.experts_general_reference(
                x, ids, w, w_gate, w_up, w_down, act, gated, b_up=b_up, b_gate=b_gate,
                b_down=b_down,
            )  # fmt: skip
            assert torch.equal(got, stacked), (name, threads)
            torch.testing.assert_close(got, want, **TOL.get(dtype, TOL[torch.bfloat16]))
            copied = _largest_allocation(
                lambda x=x, ids=ids, w=w, lists=lists, act=act, gated=gated: (
                    torch.ops.lynx.experts_list(x, ids, w, *lists, act, gated)
                )
            )
            # stacking one projection's experts would allocate all of their bytes at once
            # (checked where they outweigh the op's scratch: the sliced case's 3-6 MB)
            stack = sum(t.nbytes for t in lists[2])
            assert copied < stack // 2 or stack < 1 << 20, (name, f"{copied} B: stacked?")
    finally:
        torch.set_num_threads(before)


def test_experts_bad_ids_empty_batches_and_what_it_does_not_take():
    x, ids, w, w_up, w_down, w_gate = _case(3, 8, 2, 16, 8, "gated", torch.float32)
    op = torch.ops.lynx.experts
    with pytest.raises(IndexError, match=r"expert ids must be in \[0, 8\)"):
        op(x, ids + 8, w, w_up, None, w_down, "silu", True)
    with pytest.raises(IndexError, match=r"expert ids must be in \[0, 8\)"):
        op(x, ids - 1, w, w_up, None, w_down, "silu", True)
    empty = op(x[:0], ids[:0], w[:0], w_up, None, w_down, "silu", True)
    assert empty.shape == (0, 16) and empty.dtype == x.dtype
    # Dtypes the C kernel does not compute on (float16; weights in another dtype than x) run
    # the reference's loop in ATen: the reference's result. fp16: both sides compute in fp16
    # with the same ops, so only the combine order differs (fp16 eps 9.8e-4).
    half = [t.half() for t in (x, w_up, w_down)]
    want = reference.experts_general_reference(
        half[0], ids, w, None, half[1], half[2], "silu", True
    )
    got = op(half[0], ids, w, half[1], None, half[2], "silu", True)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    want = reference.experts_general_reference(
        x, ids, w, None, w_up.bfloat16(), w_down, "silu", True
    )
    got = op(x, ids, w, w_up.bfloat16(), None, w_down, "silu", True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # fp32: the same ops
    with pytest.raises(IndexError, match=r"expert ids must be in \[0, 8\)"):
        op(half[0], ids + 8, w, half[1], None, half[2], "silu", True)
    with pytest.raises(ValueError, match="unknown activation 'swish'; valid: silu"):
        op(x, ids, w, w_up, None, w_down, "swish", True)
    with pytest.raises(RuntimeError, match=r"inconsistent shapes .* want w_up \[E, 16, 16\]"):
        op(x, ids, w, w_up[:, :12], None, w_down, "silu", True)


@pytest.mark.parametrize("policy", ["affinity", "oea", "static"])
def test_a_batch_of_one_token_routes_exactly_even_with_ties(policy):
    """One token has nobody to share with: every policy returns the model's own top-k (ids
    and weights), also where ties would let a stable ranking pick other experts. Checked
    for the reference and the native kernel."""
    logits = torch.zeros(1, 16)
    logits[0, 9:] = 1.0  # 7 tied experts, top-4: torch.topk picks among the ties
    pol = reference.RoutingPolicy(policy, k0=1, budget=4)
    want_w, want_ids = reference.route_reference(logits, 4, reference.RoutingPolicy("exact"))
    got_w, got_ids = reference.route_reference(logits, 4, pol)
    assert torch.equal(got_ids, want_ids) and torch.equal(got_w, want_w)
    probs = torch.softmax(logits, dim=-1)
    exact_ids = torch.topk(probs, 4, dim=-1).indices
    ids, same = reference.affinity_ids(logits, probs, exact_ids, 3.0, 2.0, 1)
    assert torch.equal(ids, exact_ids) and bool(same.all())
    # the native route orders the tie lower index first: the model's top-k under that order
    got_w, got_ids = torch.ops.lynx.route_affinity_cpu(logits, probs, 4, 3.0, 2.0, True)
    want_w, want_ids = reference.route_reference(logits, 4, ties="lower_index")
    assert torch.equal(got_ids, want_ids) and torch.equal(got_w, want_w)


PORTABLE_CHECK = """
import torch
from lynx_compile.lowering import cpu_native, reference
from tests.helpers import EXPERTS_TOL, experts_case

assert cpu_native.available()
for tokens, form, act, dtype in [(13, "gated", "silu", torch.float32),
                                 (33, "split", "gelu_tanh", torch.float32),
                                 (3, "plain", "relu", torch.bfloat16),
                                 (13, "plain", "relu2", torch.bfloat16),
                                 (33, "gated", "relu2", torch.float32),
                                 (1, "gated", "silu", torch.bfloat16),
                                 (33, "split", "silu", torch.bfloat16)]:
    x, ids, w, w_up, w_down, w_gate = experts_case(tokens, 8, 2, 40, 20, form, dtype)
    gated = form != "plain"
    got = torch.ops.lynx.experts(x, ids, w, w_up, w_gate, w_down, act, gated)
    want = reference.experts_general_reference(x, ids, w, w_gate, w_up, w_down, act, gated)
    torch.testing.assert_close(got, want, **EXPERTS_TOL[dtype])
for beta in (2.0, None):
    logits = torch.randn(13, 37) * 2
    logits[2, 5] = float("nan")
    logits[4:9, ::3] = float("-inf")  # masked experts: MIN_BIN below the floor, remap classes
    probs = torch.softmax(logits, dim=-1)
    got = torch.ops.lynx.route_affinity_cpu(logits, probs, 4, 3.0, beta, True, 1)
    pol = reference.RoutingPolicy("affinity", 3.0, beta, 1)
    want = reference.route_reference(logits, 4, pol, "renorm", ties="lower_index")
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6, equal_nan=True)
    scores = torch.sigmoid(logits) - 0.2  # a biased sigmoid router's scores
    got = torch.ops.lynx.route_scored_affinity_cpu(scores, 4, "score", 3.0, beta, 1)
    want = reference.route_scored_reference(scores, 4, "score", pol, ties="lower_index")
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[0].nan_to_num(), want[0].nan_to_num())  # row 2 keeps its NaN
print("portable path ok")
"""


def test_the_portable_c_path_matches_the_reference(tmp_path):
    """CPUs without AVX-512 (and other architectures) run the C code's portable vector path,
    which this machine's -march=native build skips: built here without AVX-512, in a fresh
    process (one process holds one registration of the ops) and cache directory."""
    import os
    import platform
    import subprocess
    import sys

    flags = "-O3 -march=native" + (" -mno-avx512f" if platform.machine() == "x86_64" else "")
    env = {**os.environ, "LYNX_NATIVE_CFLAGS": flags, "LYNX_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", PORTABLE_CHECK], env=env, cwd=REPO_ROOT, capture_output=True,
        text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0 and "portable path ok" in proc.stdout, proc.stderr[-3000:]
    assert list(tmp_path.glob("lynx_ops_*.so")), "the portable build did not land in its cache"
