"""`backend="lynx"` on transformers MoE blocks and the examples/ modules, end to end on CPU.

Independent references: the eager module itself (exact policy), and for the affinity
policy the routing reference applied to the module's own router logits followed by the
module's own eager expert computation. Decode batches of 1, 3, 13 and 33 tokens share one
compiled model per (module, policy); prefill (T=5) must be untouched by approximate policies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from lynx_compile.examples.moe_modules import DenseMoE, LoopMoE
from lynx_compile.lowering.reference import RoutingPolicy, route_reference
from lynx_compile.tools import hf_tiny

import lynx_compile
from tests.helpers import sites_of

DECODE_BATCHES = (1, 3, 13, 33)
# fp32: the compiled graph reorders reductions (Inductor fusion) but routes identically.
FP32_TOL = dict(rtol=1e-4, atol=1e-5)
# Wide bins (1 logit), so the tiny random routers really remap tokens at these batches.
AFFINITY = RoutingPolicy("affinity", alpha=1.0, beta=1.0)
OPTIONS = {
    "exact": {"policy": "exact"},
    "affinity": {"policy": "affinity", "alpha": AFFINITY.alpha, "beta": AFFINITY.beta},
}


@dataclass
class Case:
    """A module plus how to get its router logits and run its experts on given routing."""

    name: str
    build: Callable[[], torch.nn.Module]
    logits: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]  # tokens [N, d] -> [N, E]
    experts: Callable  # (module, tokens [N, d], ids [N, k], weights [N, k]) -> [N, d]
    top_k: Callable[[torch.nn.Module], int]
    convention: str
    fused: bool  # whether the expert dispatch is in the router's graph and must be fused


def _hf_case(family: str, impl: str) -> Case:
    norm = hf_tiny.FAMILIES[family].config.get("norm_topk_prob", True)
    return Case(
        name=f"{family}-{impl}",
        build=lambda: hf_tiny.build_block(family, impl),
        logits=lambda m, x: m.gate(x)[0].float(),
        experts=lambda m, x, ids, w: m.experts(x, ids, w.to(x.dtype)),
        top_k=lambda m: m.gate.top_k,
        convention="renorm" if norm else "mass",
        fused=True,  # "eager" too: lynx-compiled calls trace it as transformers' grouped_mm
    )


def _loop_experts(m, x, ids, w):
    out = torch.zeros_like(x)
    for slot in range(ids.shape[1]):
        for t in range(x.shape[0]):
            out[t] += w[t, slot] * m.experts[int(ids[t, slot])](x[t : t + 1])[0]
    return out


def _dense_experts(m, x, ids, w):
    routing = torch.zeros(x.shape[0], m.num_experts).scatter(1, ids, w)
    h = torch.nn.functional.silu(torch.einsum("nd,ehd->neh", x, m.w_gate))
    h = h * torch.einsum("nd,ehd->neh", x, m.w_up)
    return torch.einsum("ned,ne->nd", torch.einsum("neh,edh->ned", h, m.w_down), routing)


def _seeded(cls):
    def build():
        torch.manual_seed(0)
        return cls().eval()

    return build


CASES = [
    _hf_case(family, impl)
    for family in ("mixtral", "qwen3_moe", "olmoe")
    for impl in hf_tiny.EXPERTS_IMPLEMENTATIONS
] + [
    Case(
        "examples-loop",
        _seeded(LoopMoE),
        lambda m, x: m.router.proj(x).float(),
        _loop_experts,
        lambda m: m.router.top_k,
        "renorm",
        fused=True,  # its empty-expert `continue` is traced as not taken, then fused away
    ),
    Case(
        "examples-dense",
        _seeded(DenseMoE),
        lambda m, x: m.gate(x).float(),
        _dense_experts,
        lambda m: m.top_k,
        "renorm",
        fused=True,
    ),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.name)
def compiled(request):
    """(case, eager module, {policy: compiled module}) with a fresh Dynamo cache per case."""
    torch._dynamo.reset()
    case = request.param
    module = case.build()
    models = {
        policy: torch.compile(module, backend="lynx", options=options)
        for policy, options in OPTIONS.items()
    }
    return case, module, models


def _input(batch: int, seq: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, seq, dim, generator=torch.Generator().manual_seed(seed))


def _dim(module) -> int:
    return next(p for p in module.parameters() if p.dim() == 2).shape[-1]


@torch.no_grad()
def test_exact_policy_equals_eager_on_decode_batches(compiled):
    case, module, models = compiled
    lynx_compile.clear_report()
    for batch in DECODE_BATCHES:
        x = _input(batch, 1, _dim(module), seed=batch)
        torch.testing.assert_close(models["exact"](x), module(x), **FP32_TOL)
    sites = sites_of(lynx_compile.report())
    assert sites and all(s["status"] == "rewritten" for s in sites), sites
    assert all(s["policy"] == "exact" for s in sites)
    assert all(s["weights"] == case.convention for s in sites)
    dispatch = sites_of(lynx_compile.report(), kind="dispatch")
    assert len(dispatch) == len(sites)
    expected = "rewritten" if case.fused else "skipped"
    assert all(s["status"] == expected for s in dispatch), dispatch


@torch.no_grad()
def test_affinity_equals_reference_on_the_module_router_logits(compiled):
    case, module, models = compiled
    lynx_compile.clear_report()
    changed = 0
    for batch in DECODE_BATCHES:
        x = _input(batch, 1, _dim(module), seed=100 + batch)
        tokens = x.reshape(batch, -1)
        weights, ids = route_reference(
            case.logits(module, tokens), case.top_k(module), AFFINITY, case.convention
        )
        expected = case.experts(module, tokens, ids, weights).reshape(x.shape)
        torch.testing.assert_close(models["affinity"](x), expected, **FP32_TOL)
        changed += not torch.allclose(expected, module(x), **FP32_TOL)
    assert changed, "affinity never changed routing on these batches: the test proves nothing"
    sites = sites_of(lynx_compile.report())
    assert sites and all(s["status"] == "rewritten" for s in sites), sites
    assert all(s["policy"] == "affinity" and s["decode"] for s in sites)


@torch.no_grad()
def test_prefill_is_unchanged_under_affinity(compiled):
    case, module, models = compiled
    lynx_compile.clear_report()
    x = _input(3, 5, _dim(module), seed=7)
    torch.testing.assert_close(models["affinity"](x), module(x), **FP32_TOL)
    sites = sites_of(lynx_compile.report())
    assert sites and all(s["policy"] == "exact" and s["decode"] is False for s in sites), sites
