"""Dispatch rewrite: fused only where shown equivalent; must-not-match cases stay untouched.

Each module here is a plain gather + bmm MoE (transformers' batched_mm shape) with one
twist; eager PyTorch is the reference for every output.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lynx_compile.examples.moe_modules import BatchedRouterMoE
from lynx_compile.tools import hf_tiny
from torch import nn

import lynx_compile
from tests.helpers import sites_of

FP32_TOL = dict(rtol=1e-4, atol=1e-5)  # reordered fp32 sums only
# bf16 has 8 mantissa bits (eps 7.8e-3); fused and unfused paths round intermediates
# (gate/up products, per-expert outputs) at different points, so allow a few ulps.
BF16_TOL = dict(rtol=3e-2, atol=3e-2)


class GatherBmmMoE(nn.Module):
    """softmax top-k router + gather the 3-D expert weights by id + bmm, with a variant."""

    def __init__(self, variant: str, dim=16, inter=24, experts=8, top_k=2):
        super().__init__()
        self.variant, self.top_k = variant, top_k
        self.router = nn.Linear(dim, experts, bias=False)
        gated = 2 if variant != "plain_gelu" else 1
        self.w_up = nn.Parameter(torch.randn(experts, gated * inter, dim) / dim**0.5)
        self.w_down = nn.Parameter(torch.randn(experts, dim, inter) / inter**0.5)
        self.bias = nn.Parameter(torch.randn(experts, dim))

    def forward(self, x):
        b, t, d = x.shape
        tokens = x.reshape(-1, d)
        probs = F.softmax(self.router(tokens).float(), dim=-1)
        w, ids = torch.topk(probs, self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        flat_ids, flat_w = ids.reshape(-1), w.reshape(-1, 1)
        xs = tokens.repeat_interleave(self.top_k, dim=0)  # [N*k, d]
        if self.variant == "weight_before_experts":  # Llama-4 style: scale the input
            xs = xs * flat_w
        h = torch.bmm(self.w_up[flat_ids], xs.unsqueeze(-1)).squeeze(-1)
        if self.variant == "weight_inside_activation":
            h = h * flat_w
        if self.variant == "plain_gelu":
            h = F.gelu(h)
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        y = torch.bmm(self.w_down[flat_ids], h.unsqueeze(-1)).squeeze(-1)
        if self.variant == "per_expert_bias":
            y = y + self.bias[flat_ids]
        if self.variant not in ("weight_before_experts", "weight_inside_activation"):
            y = y * flat_w
        out = y.view(-1, self.top_k, d).sum(dim=1).view(b, t, d)
        if self.variant == "returns_ids":  # routing also leaves the module (auxiliary loss)
            return out, ids
        if self.variant == "returns_hidden":  # a dispatch intermediate leaves the module
            return out, h
        return out


def _run(module, batches=(1, 3, 13)):
    torch._dynamo.reset()
    lynx_compile.clear_report()
    compiled = torch.compile(module, backend="lynx", options={"policy": "exact"})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for batch in batches:
            x = torch.randn(batch, 1, 16, generator=gen)
            torch.testing.assert_close(compiled(x), module(x), **FP32_TOL)
    return sites_of(lynx_compile.report(), kind="dispatch")


@pytest.mark.parametrize(
    "variant,pattern",
    [("swiglu", "gated silu"), ("plain_gelu", "plain gelu"), ("returns_ids", "gated silu")],
)
def test_gather_bmm_dispatch_is_fused(variant, pattern):
    torch.manual_seed(0)
    sites = _run(GatherBmmMoE(variant).eval())
    assert sites and all(s["status"] == "rewritten" and pattern in s["reason"] for s in sites)


@pytest.mark.parametrize(
    "variant,reason",
    [
        ("weight_before_experts", "reproduces"),  # same inputs, different math
        ("weight_inside_activation", "reproduces"),
        ("per_expert_bias", "per-expert biases"),  # an extra [E, d] input
        ("returns_hidden", "no closed"),  # fusing would drop a value the caller reads
    ],
)
def test_dispatch_that_is_not_lynx_experts_is_kept_and_reported(variant, reason):
    torch.manual_seed(0)
    sites = _run(GatherBmmMoE(variant).eval())
    assert sites and all(s["status"] == "skipped" and reason in s["reason"] for s in sites), sites


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_bf16_fused_dispatch_matches_eager(impl):
    torch._dynamo.reset()
    block = hf_tiny.build_block("mixtral", impl).to(torch.bfloat16)
    lynx_compile.clear_report()
    compiled = torch.compile(block, backend="lynx", options={"policy": "exact"})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for batch in (1, 13):
            x = torch.randn(batch, 1, 32, generator=gen).to(torch.bfloat16)
            torch.testing.assert_close(compiled(x), block(x), **BF16_TOL)
    sites = sites_of(lynx_compile.report(), kind="dispatch")
    assert sites and all(s["status"] == "rewritten" for s in sites), sites


# ------------------------------------------ router scores with leading dims ([B, T, E])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_router_scores_and_dense_dispatch_are_fused(dtype):
    """A router applied to [B, T, d] without flattening (scores [B, T, E]) and a dense einsum
    dispatch through a scatter-built gate matrix: router and dispatch rewritten, exact ==
    eager at odd shapes, decode steps and prefill alike."""
    torch.manual_seed(0)
    module = BatchedRouterMoE(num_experts=16, top_k=4).eval().to(dtype)
    torch._dynamo.reset()
    lynx_compile.clear_report()
    compiled = torch.compile(module, backend="lynx", options={"policy": "exact"})
    gen = torch.Generator().manual_seed(0)
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    with torch.no_grad():
        for batch, seq in ((1, 1), (3, 1), (13, 1), (33, 1), (2, 5)):
            x = torch.randn(batch, seq, 32, generator=gen).to(dtype)
            torch.testing.assert_close(compiled(x), module(x), **tol)
    report = lynx_compile.report()
    routers, dispatches = sites_of(report), sites_of(report, kind="dispatch")
    assert routers and all(s["status"] == "rewritten" for s in routers), routers
    assert dispatches and all(s["status"] == "rewritten" for s in dispatches), dispatches


def test_batched_router_default_policy_touches_fewer_experts_at_batch_16():
    torch.manual_seed(0)
    module = BatchedRouterMoE(num_experts=16, top_k=4).eval()
    x = torch.randn(16, 1, 32, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    lynx_compile.clear_report()
    compiled = torch.compile(module, backend="lynx", options={"telemetry": True})
    with torch.no_grad():
        out = compiled(x)
    assert torch.isfinite(out).all()
    (site,) = sites_of(lynx_compile.report())
    tally = site["telemetry"]
    assert site["decode"] and site["policy"] == "affinity"
    assert tally["mean_experts_chosen"] < tally["mean_experts_exact"], tally
