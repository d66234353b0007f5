"""backend="lynx" on whole transformers models: every MoE layer's router and experts.

test_families.py compiles one MoE block per family. A user compiles the whole model, and
Dynamo hands the backend one graph holding every decoder layer, where each layer's router
must be found among the others' (a later layer's router reads this layer's output, so a
check that looks downstream of a top-k sees the next layer's top-k). Here each family's
causal LM (tools/hf_tiny.build_causal_lm: 2 decoder layers, every one an MoE layer; Switch
Transformers as its encoder-decoder, 4 sparse layers) is compiled, and per family:

- policy "exact" equals the eager model on decode batches of 13 and 3 tokens (one new
  token per sequence), in fp32 and in bf16 (the model cast with .to(torch.bfloat16), as
  checkpoints are served);
- each MoE block of the model (counted from its modules, the independent reference) has
  its router rewritten, reported under the block's module path, and no router in the model
  is skipped; its dispatch is fused into lynx::experts;
- the families lynx leaves exact (NOT_REWRITTEN) report every router skipped;
- under the default policy every MoE block's routing op gives each token k distinct
  experts the model allows (finite scores), touches no more distinct experts than
  torch.topk of the same scores does, and the logits are finite.

Inductor's compile step is replaced by running the rewritten graph as it is (the lynx ops'
kernels then run eagerly): the lowering is what the block matrix compiles; this file tests
the passes on whole-model graphs at a few seconds per family.
"""

from __future__ import annotations

import pytest
import torch
from lynx_compile.tools import hf_tiny

import lynx_compile
from tests.e2e.test_families import (
    FP32_TOL,
    NOT_REWRITTEN,
    REWRITTEN,
    recorded_routes,
)
from tests.helpers import lynx_passes_only, sites_of

DECODE_BATCHES = (13, 3)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# bf16 logits: the fused experts sum each dot product in fp32 and round once where the
# model rounds every matmul's output (eps 2^-8 = 3.9e-3 per rounding); over two MoE layers
# and the head that measured up to 0.011 x max|logit| (aria, 13 tokens). The bound catches
# wrong weights, biases, activations or experts for many tokens. It does not catch one
# token's k-th and (k+1)-th experts swapped in the last layer (0.006-0.026 x max, measured
# by forcing the swap): in bf16 such a swap at a near-tie is what rounding alone may cause,
# so exactness is checked in fp32 (rtol 1e-4), and the routing per block by the call counts.
BF16_SHARE_OF_MAX = 0.03
# Modules besides the MoE blocks that route tokens to experts with a router of their own:
# JetMoE's mixture of attention heads (top-k of attention experts per token). Its router is
# rewritten like any other (passes/router.py does not look at what the experts compute);
# its experts are attention projections, not an MLP, so their dispatch stays the model's.
ROUTED_ATTENTION = {"jetmoe": "JetMoeMoA"}


def _implementation(family: str) -> str:
    """grouped_mm where the family has the switch (the form real checkpoints load with),
    else its only implementation."""
    impls = hf_tiny.FAMILIES[family].implementations
    return "grouped_mm" if "grouped_mm" in impls else impls[0]


def _tokens(batch: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (batch, 1), generator=torch.Generator().manual_seed(seed))


def _logits(model, family: str, tokens: torch.Tensor) -> torch.Tensor:
    if family == "switch_transformers":  # encoder-decoder: the same tokens on both sides
        return model(input_ids=tokens, decoder_input_ids=tokens).logits
    return model(tokens).logits


@pytest.fixture(
    scope="module",
    params=[(f, d) for f in sorted({*REWRITTEN, *NOT_REWRITTEN}) for d in DTYPES],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def whole(request):
    """(family, MoE block paths, routed attention paths, eager logits, exact logits,
    routing-op calls per batch, report sites) per family."""
    family, dtype = request.param
    torch._dynamo.reset()
    lynx_compile.clear_report()
    model = hf_tiny.build_causal_lm(family, _implementation(family)).to(DTYPES[dtype])
    blocks = hf_tiny.moe_blocks(model, family)
    attention = [
        name
        for name, module in model.named_modules()
        if type(module).__name__ == ROUTED_ATTENTION.get(family)
    ]
    compiled = torch.compile(model, backend="lynx", options={"policy": "exact"}, dynamic=True)
    eager, exact, calls = {}, {}, {}
    with torch.no_grad(), lynx_passes_only():
        for batch in DECODE_BATCHES:
            tokens = _tokens(batch, seed=batch)
            eager[batch] = _logits(model, family, tokens)
            _logits(compiled, family, tokens)  # compiles (the passes' checks run the graph)
            with recorded_routes() as routed:
                exact[batch] = _logits(compiled, family, tokens)
            calls[batch] = len(routed)
    sites = lynx_compile.report()["sites"]
    return family, blocks, attention, eager, exact, calls, sites


@pytest.fixture(scope="module")
def default_policy(whole):
    """{batch: (logits, [(scores, ids) per routing-op call])} under the default policy."""
    family, _, _, eager, *_ = whole
    dtype = eager[DECODE_BATCHES[0]].dtype  # the model's, as in `whole`
    model = hf_tiny.build_causal_lm(family, _implementation(family)).to(dtype)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="lynx", dynamic=True)
    out = {}
    with torch.no_grad(), lynx_passes_only():
        for batch in DECODE_BATCHES:
            tokens = _tokens(batch, seed=batch)
            _logits(compiled, family, tokens)
            with recorded_routes() as routed:
                out[batch] = (_logits(compiled, family, tokens), routed)
    return out


def _block_of(path: str | None, blocks: list[str]) -> str | None:
    """The MoE block a router's module path lies in."""
    inside = [b for b in blocks if path is not None and (path + ".").startswith(b + ".")]
    return max(inside, key=len) if inside else None


def test_every_family_builds_with_every_layer_an_moe_layer(whole):
    family, blocks, attention, *_ = whole
    assert len(attention) == (2 if family in ROUTED_ATTENTION else 0), (family, attention)
    expected = 4 if family == "switch_transformers" else 2
    assert len(blocks) == expected, (family, blocks)


@torch.no_grad()
def test_exact_policy_equals_eager_on_the_whole_model(whole):
    family, _, _, eager, exact, _, _ = whole
    for batch in DECODE_BATCHES:
        if eager[batch].dtype == torch.float32:
            torch.testing.assert_close(exact[batch], eager[batch], **FP32_TOL, msg=family)
            continue
        error = (exact[batch].float() - eager[batch].float()).abs().max()
        scale = eager[batch].float().abs().max()
        assert error <= BF16_SHARE_OF_MAX * scale, (family, batch, error.item(), scale.item())


def test_every_moe_layer_routes_through_the_lynx_routing_op(whole):
    """Behaviour, not the report: one routing-op call per MoE block in each forward."""
    family, blocks, attention, _, _, calls, _ = whole
    expected = 0 if family in NOT_REWRITTEN else len(blocks) + len(attention)
    assert calls == dict.fromkeys(DECODE_BATCHES, expected), (family, blocks, calls)


def test_every_moe_layer_has_its_router_rewritten(whole):
    family, blocks, attention, _, _, _, sites = whole
    routers = sites_of({"sites": sites})
    if family in NOT_REWRITTEN:
        assert routers and all(s["status"] == "skipped" for s in routers), routers
        return
    assert all(s["status"] == "rewritten" for s in routers), [
        (s.get("layer"), s["reason"]) for s in routers if s["status"] != "rewritten"
    ]
    pattern = REWRITTEN[family][0]
    assert all(s["reason"] == pattern for s in routers), routers
    found = [_block_of(s.get("layer"), blocks + attention) for s in routers]
    assert None not in found, (blocks, [s.get("layer") for s in routers])
    assert set(found) == set(blocks + attention), (blocks, attention, found)


def test_every_moe_layer_has_its_experts_fused(whole):
    family, blocks, attention, _, _, _, sites = whole
    if family in NOT_REWRITTEN:
        assert not sites_of({"sites": sites}, kind="dispatch")
        return
    by_site = {(s["graph"], s["site"]): s for s in sites}
    dispatch = sites_of({"sites": sites}, kind="dispatch")
    where = {
        id(s): _block_of(by_site[(s["graph"], s["router_site"])].get("layer"), blocks + attention)
        for s in dispatch
    }
    experts = [s for s in dispatch if where[id(s)] in blocks]
    assert experts and all(s["status"] == "rewritten" for s in experts), experts
    assert {where[id(s)] for s in experts} == set(blocks), (blocks, experts)
    kept = [s for s in dispatch if where[id(s)] not in blocks]
    assert {where[id(s)] for s in kept} <= set(attention), kept
    assert all(s["status"] == "skipped" for s in kept), kept


def test_default_policy_routes_every_layer_to_k_usable_experts(whole, default_policy):
    family, blocks, attention, *_ = whole
    for batch, (logits, routed) in default_policy.items():
        assert torch.isfinite(logits).all(), (family, batch)
        expected = 0 if family in NOT_REWRITTEN else len(blocks) + len(attention)
        assert len(routed) == expected, (family, batch, len(routed))
        for scores, ids in routed:
            top_k = ids.shape[-1]
            assert ids.shape == (batch, top_k), ids.shape
            assert all(len(set(row)) == top_k for row in ids.tolist()), ids
            # experts the model masks out (group limit) have -inf scores: never chosen
            assert torch.isfinite(torch.gather(scores, 1, ids)).all(), (scores, ids)


def test_default_policy_touches_no_more_experts_than_the_top_k(whole, default_policy):
    """Per routing call: the distinct experts the default policy chose <= those torch.topk
    of the same scores chooses (AffinityBinning keeps a subset of the batch's experts)."""
    family, *_ = whole
    for batch, (_, routed) in default_policy.items():
        for layer, (scores, ids) in enumerate(routed):
            exact = torch.topk(scores.float(), ids.shape[-1], dim=-1).indices
            touched, bound = ids.unique().numel(), exact.unique().numel()
            assert touched <= bound, (family, batch, layer, touched, bound)
