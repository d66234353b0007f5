"""`backend="lynx"` over every transformers MoE family that builds as a tiny random block.

The matrix: each family below x each experts implementation it supports ("eager",
"grouped_mm", "batched_mm"; JetMoE, DBRX, LongCat, Llama-4 and Switch Transformers have
no switch, only their own expert code, run as "eager").

    family             router                                   pattern reported
    mixtral            softmax -> top-k, renormalised           softmax_topk_renorm
    qwen3_moe          softmax -> top-k, renormalised           softmax_topk_renorm
    qwen3_next         softmax -> top-k (+ gated shared expert) softmax_topk_renorm
    hunyuan_v1_moe     softmax -> top-k, renormalised           softmax_topk_renorm
    minimax            softmax -> top-k, renormalised           softmax_topk_renorm
    olmoe              softmax -> top-k, raw probabilities      softmax_topk_mass
    qwen2_moe          softmax -> top-k (+ gated shared expert) softmax_topk_mass
    jamba              softmax -> top-k, raw probabilities      softmax_topk_mass
    flex_olmo          softmax -> top-k, raw probabilities      softmax_topk_mass
    dbrx               softmax -> top-k, p-norm weights         softmax_topk
    deepseek_v2        softmax, group mask -> top-k, scaled     softmax_grouped_topk
    ernie4_5_moe       softmax + bias -> top-k, gathered        softmax_bias_topk
    longcat_flash      softmax + bias -> top-k, gathered        softmax_bias_topk
    deepseek_v3        sigmoid + bias, groups -> top-k          sigmoid_bias_grouped_topk
    glm4_moe           sigmoid + bias, groups -> top-k          sigmoid_bias_grouped_topk
    dots1              sigmoid + bias, groups -> top-k          sigmoid_bias_grouped_topk
    exaone_moe         sigmoid + bias, groups -> top-k          sigmoid_bias_grouped_topk
    lfm2_moe           sigmoid + bias -> top-k                  sigmoid_bias_topk
    gpt_oss            top-k on biased logits -> softmax        logits_topk
    granitemoe         top-k on logits -> softmax               logits_topk
    granitemoeshared   top-k on logits -> softmax (+ shared)    logits_topk
    aria               top-k on logits -> softmax (+ shared)    logits_topk
    jetmoe             top-k on logits -> softmax               logits_topk
    llama4             top-1 on logits -> sigmoid (+ shared)    logits_topk
    phimoe             sparsemixer (masked max, top-2)          skipped: runs exact
    switch_transformers argmax top-1 with expert capacity      skipped: runs exact

Checks per (family, implementation), on decode inputs [B, 1, d] with B = 3 and 13 (one
compiled model per policy, dynamic shapes, so both sizes share it):
policy "exact" equals eager (fp32, rtol 1e-4 / atol 1e-5), the report names the
pattern, and the dispatch is fused (lynx::experts) on every implementation, "eager"
included (DBRX's and LongCat's loops over the experts a batch hits are unrolled over
every expert under lynx's capture, lynx_compile/capture.py); the default
policy gives finite outputs and routes every token to k distinct, usable experts (the
ids the routing op produced, recorded from its reference kernel; the CPU decompositions
of the ops are checked against the reference in test_cpu_kernels.py).
Last, lynx::route_scored itself: every policy and score space, its fake implementation.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from lynx_compile.lowering import reference
from lynx_compile.tools import hf_tiny

import lynx_compile
from tests.helpers import sites_of

DECODE_BATCHES = (3, 13)
# fp32: the compiled graph reorders reductions (Inductor fusion) but routes identically.
FP32_TOL = dict(rtol=1e-4, atol=1e-5)

# family -> (pattern the report names, experts per token)
REWRITTEN = {
    "mixtral": ("softmax_topk_renorm", 2),
    "qwen3_moe": ("softmax_topk_renorm", 4),
    "qwen3_next": ("softmax_topk_renorm", 4),
    "hunyuan_v1_moe": ("softmax_topk_renorm", 4),
    "minimax": ("softmax_topk_renorm", 4),
    "olmoe": ("softmax_topk_mass", 4),
    "qwen2_moe": ("softmax_topk_mass", 4),
    "jamba": ("softmax_topk_mass", 4),
    "flex_olmo": ("softmax_topk_mass", 4),
    "dbrx": ("softmax_topk", 4),
    "deepseek_v2": ("softmax_grouped_topk", 4),
    "ernie4_5_moe": ("softmax_bias_topk", 4),
    "longcat_flash": ("softmax_bias_topk", 4),
    "deepseek_v3": ("sigmoid_bias_grouped_topk", 4),
    "glm4_moe": ("sigmoid_bias_grouped_topk", 4),
    "dots1": ("sigmoid_bias_grouped_topk", 4),
    "exaone_moe": ("sigmoid_bias_grouped_topk", 4),
    "lfm2_moe": ("sigmoid_bias_topk", 4),
    "gpt_oss": ("logits_topk", 4),
    "granitemoe": ("logits_topk", 4),
    "granitemoeshared": ("logits_topk", 4),
    "aria": ("logits_topk", 4),
    "jetmoe": ("logits_topk", 4),
    "llama4": ("logits_topk", 1),
}
NOT_REWRITTEN = ("phimoe", "switch_transformers")


def _cases(families):
    return [
        pytest.param((family, impl), id=f"{family}-{impl}")
        for family in families
        for impl in hf_tiny.FAMILIES[family].implementations
    ]


def _first(output):
    """The hidden states of a block output (GPT-OSS and Llama-4 also return router tensors)."""
    return output[0] if isinstance(output, tuple) else output


def _decode_input(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 1, 32, generator=torch.Generator().manual_seed(seed))


def _compile(block, options=None):
    """Compile with dynamic shapes from the start: one graph serves every decode batch, and
    the eager experts loop (tokens per expert vary) compiles 4-5 graphs instead of 7-8."""
    return torch.compile(block, backend="lynx", options=options, dynamic=True)


@contextlib.contextmanager
def recorded_routes():
    """Record (scores, ids) of every routing-op call: the ids the compiled model used."""
    calls = []

    def recorder(fn):
        def wrapped(scores, top_k, *args):
            out = fn(scores, top_k, *args)
            calls.append((scores, out[1]))
            return out

        return wrapped

    with (
        mock.patch.object(reference, "route_reference", recorder(reference.route_reference)),
        mock.patch.object(
            reference, "route_scored_reference", recorder(reference.route_scored_reference)
        ),
    ):
        yield calls


@pytest.fixture(scope="module", params=_cases(REWRITTEN))
def compiled(request):
    """(family, eager block, {"exact": compiled, "default": compiled}), fresh Dynamo state."""
    torch._dynamo.reset()  # Dynamo's recompile limit is per code object: one family at a time
    family, impl = request.param
    block = hf_tiny.build_block(family, impl)
    models = {
        "exact": _compile(block, {"policy": "exact"}),
        # Telemetry keeps the routing op an opaque call (on CPU it is otherwise traced into
        # the C++ graph), so the test can read the ids it returns; the policy is the default.
        "default": _compile(block, {"telemetry": True}),
    }
    return family, block, models


@torch.no_grad()
def test_exact_policy_equals_eager_and_the_router_is_rewritten(compiled):
    family, block, models = compiled
    lynx_compile.clear_report()
    for batch in DECODE_BATCHES:
        x = _decode_input(batch, seed=batch)
        torch.testing.assert_close(models["exact"](x), block(x), **FP32_TOL)
    sites = sites_of(lynx_compile.report())
    pattern, top_k = REWRITTEN[family]
    assert sites and all(s["status"] == "rewritten" for s in sites), sites
    assert all(s["reason"] == pattern and s["top_k"] == top_k for s in sites), sites
    assert all(s["policy"] == "exact" for s in sites), sites
    dispatches = sites_of(lynx_compile.report(), kind="dispatch")
    assert dispatches, f"{family}: no dispatch site reported"
    assert all(s["status"] == "rewritten" for s in dispatches), dispatches


@torch.no_grad()
def test_default_policy_routes_every_token_to_k_usable_experts(compiled):
    family, block, models = compiled
    lynx_compile.clear_report()
    _, top_k = REWRITTEN[family]
    for batch in DECODE_BATCHES:
        x = _decode_input(batch, seed=100 + batch)
        with recorded_routes() as calls:
            out = _first(models["default"](x))
        assert torch.isfinite(out).all(), f"{family}: non-finite output at batch {batch}"
        assert calls, f"{family}: the compiled model never called a lynx routing op"
        for scores, ids in calls:
            assert ids.shape == (batch, top_k)
            assert all(len(set(row)) == top_k for row in ids.tolist()), ids
            # Experts the model masks out (group limit) have -inf scores: never chosen.
            assert torch.isfinite(torch.gather(scores, 1, ids)).all(), (scores, ids)
    sites = sites_of(lynx_compile.report())
    assert sites and all(s["status"] == "rewritten" for s in sites), sites
    calls = sum(s["telemetry"]["calls"] for s in sites if s["telemetry"])
    assert calls >= len(DECODE_BATCHES), sites  # the routing ran once per decode batch
    assert all(s["policy"] == "affinity" and s["decode"] for s in sites), sites


@pytest.mark.parametrize("case", _cases(NOT_REWRITTEN))
@torch.no_grad()
def test_unsupported_router_compiles_to_eager_and_is_reported(case):
    family, impl = case
    torch._dynamo.reset()
    lynx_compile.clear_report()
    block = hf_tiny.build_block(family, impl)
    model = _compile(block)
    for batch in DECODE_BATCHES:
        x = _decode_input(batch, seed=batch)
        torch.testing.assert_close(model(x), block(x), **FP32_TOL)
    sites = sites_of(lynx_compile.report())
    assert sites and all(s["status"] == "skipped" for s in sites), sites
    assert all("max/argmax" in s["reason"] for s in sites), sites


def test_the_matrix_covers_every_tiny_family():
    """Every family hf_tiny builds is in the matrix, and there are at least 15 of them."""
    assert set(REWRITTEN) | set(NOT_REWRITTEN) == set(hf_tiny.FAMILIES)
    assert len(REWRITTEN) + len(NOT_REWRITTEN) >= 15


# ---------------------------------------------------------------- lynx::route_scored itself
def _scores(space: str, tokens: int = 13, experts: int = 16) -> torch.Tensor:
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(experts))
    if space == "logit":
        return logits
    if space == "prob":
        return logits.softmax(dim=-1)
    biased = logits.sigmoid() + 0.1 * torch.randn(
        experts, generator=torch.Generator().manual_seed(1)
    )
    biased[:, : experts // 2] = float("-inf")  # a group mask: half the experts unusable
    return biased


@pytest.mark.parametrize("space", reference.SCORE_SPACES)
@pytest.mark.parametrize("policy", reference.POLICIES)
def test_route_scored_gives_k_distinct_usable_experts_and_exact_is_topk(space, policy):
    scores = _scores(space)
    pol = reference.RoutingPolicy(policy, alpha=1.0, beta=1.0, k0=2, budget=6)
    values, ids = reference.route_scored_reference(scores, 4, space, pol)
    assert all(len(set(row)) == 4 for row in ids.tolist())
    assert torch.isfinite(values).all() and torch.equal(values, scores.gather(1, ids))
    if policy == "exact":
        expected = torch.topk(scores, 4, dim=-1)
        assert torch.equal(ids, expected.indices) and torch.equal(values, expected.values)


def test_route_scored_on_probabilities_bins_as_the_softmax_router_does():
    """Space "prob" bins log p, i.e. the logits: the softmax router's AffinityBinning ids."""
    logits = _scores("logit", tokens=33)
    pol = reference.RoutingPolicy("affinity", alpha=1.0, beta=1.0)
    _, ids = reference.route_scored_reference(logits.softmax(-1), 4, "prob", pol)
    _, expected = reference.route_reference(logits, 4, pol, "renorm")
    assert torch.equal(ids, expected)


def test_route_scored_op_fake_impl_and_schema():
    args = (_scores("score"), 4, "score", "affinity", 3.0, 2.0, 2, 16, -1)
    torch.library.opcheck(torch.ops.lynx.route_scored.default, args)
