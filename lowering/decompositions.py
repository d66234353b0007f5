"""Inductor decompositions of the lynx ops: the CPU path, and every path without a kernel.

On CPU tensors:
- lynx::route with the affinity policy traces the model's softmax into Inductor's C++ graph;
  the rest (the model's top-k, AffinityBinning's ranking, kept set and remap, the weights) is
  one call of the native kernel lynx::route_affinity_cpu (lowering/lynx_ops.cpp), which
  replaces a top-k, ~20 small traced kernels and four sorts per layer. exact, oea and static
  are traced whole.
- lynx::route_scored with the affinity policy is one call of the native kernel
  lynx::route_scored_affinity_cpu (the top-k and AffinityBinning in the score space); exact,
  oea and static are traced whole; with a telemetry site the op is kept whole (it records).
- lynx::experts is kept whole (the decomposition declines): Inductor calls the op, whose CPU
  kernel is the native one (lynx_ops.cpp); its work and weight reads follow the experts
  touched (what AffinityBinning reduces). On CUDA, calls the Triton kernels decline that
  carry biases or swiglu_clamped are kept whole as well (the composite: grouped GEMMs on
  the weights in place).
Where the native library cannot be built, or for dtypes it does not take, everything is
traced (route: the reference; experts: the static-shape gathered form). Each decomposition
computes what the op's reference computes (tests check it).

On CUDA the Triton kernels are traced into the graph before these decompositions are
consulted (triton_ops.py); where no Triton kernel fits, these decompositions trace the plain
forms there too (static shapes, so still CUDA-graph safe), except biased or swiglu_clamped
experts, kept whole (above; the composite's grouped GEMMs do not sync, its per-expert
fallback for layouts grouped_mm refuses does). Routing with telemetry is
lynx::route_recorded, which has no decomposition: it stays opaque so its kernel can record.
"""

from __future__ import annotations

import functools

import torch
from lynx_compile.lowering import cpu_kernels, cpu_native, reference
from lynx_compile.lowering.constants import ACTIVATION_NAMES, NATIVE_ROUTE_DTYPES
from torch._inductor.decomposition import register_decomposition


@register_decomposition(torch.ops.lynx.route.default)
def route_cpu(logits, top_k, policy, alpha, beta, k0, budget, weights, telemetry_site):
    """lynx::route: the model's softmax traced, then (affinity policy) one native call for
    the rest; the reference traced otherwise (oea, static, or a graph specialised to one
    token, which routes exactly: the reference's rule, no call needed)."""
    if (
        policy == "affinity"
        and _native(logits)
        and logits.dtype in NATIVE_ROUTE_DTYPES
        and not reference.static_one_token(logits)
    ):
        reference.check_route(logits, top_k, policy, weights)
        probs = torch.softmax(logits, dim=-1)
        return torch.ops.lynx.route_affinity_cpu.default(
            logits, probs, top_k, alpha, beta, weights == "renorm", k0
        )
    policy = reference.RoutingPolicy(policy, alpha, beta, k0, budget)
    return reference.route_reference(logits, top_k, policy, weights)


@register_decomposition(torch.ops.lynx.route_scored.default)
def route_scored_cpu(scores, top_k, space, policy, alpha, beta, k0, budget, telemetry_site):
    """lynx::route_scored: the affinity policy as one native call on CPU (the top-k,
    AffinityBinning's ranking, kept set and remap), the reference traced otherwise. With a
    telemetry site it stays whole (NotImplemented declines), so its kernel records each call."""
    if telemetry_site >= 0:
        return NotImplemented
    if (
        policy == "affinity"
        and _native(scores)
        and scores.dtype in NATIVE_ROUTE_DTYPES
        and not reference.static_one_token(scores)
    ):
        return torch.ops.lynx.route_scored_affinity_cpu.default(
            scores, top_k, space, alpha, beta, k0
        )
    policy = reference.RoutingPolicy(policy, alpha, beta, k0, budget)
    return reference.route_scored_reference(scores, top_k, space, policy)


def _native(*tensors) -> bool:
    """Whether the native CPU kernels take these tensors (all on CPU, library built)."""
    return all(t.device.type == "cpu" for t in tensors) and cpu_native.available()


def _native_experts(x, activation, *weights) -> bool:
    """The native experts kernel, at every batch size. Also in a graph specialised to one
    token (Dynamo specialises size 1): the traced gathered form there copies each slot's
    expert weights (k x 352 MB per call for Mixtral-8x7B in bf16), the kernel reads them in
    place."""
    return (
        activation in ACTIVATION_NAMES and _native(x) and cpu_native.experts_dtypes_fit(x, *weights)
    )


@functools.cache
def register_fallbacks() -> None:
    """Where the experts or route_scored decomposition declines, Inductor calls the op
    itself (experts: its CPU kernel is the native one; route_scored: the kernel that
    records), with the layout rule it gives every custom op. Called by the backend before
    its first compile: torch._inductor.lowering is a heavy import (the partitioner,
    networkx) that `import lynx_compile` need not pay."""
    from torch._inductor.lowering import make_fallback, tag_to_layout_constraint
    from torch._library.utils import get_layout_constraint_tag

    for op in (torch.ops.lynx.experts.default, torch.ops.lynx.route_scored.default):
        constraint = tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True))
        make_fallback(op, constraint, override_decomp=True)


@register_decomposition(torch.ops.lynx.experts.default)
def experts_cpu(
    x,
    ids,
    weights,
    w_up,
    w_gate,
    w_down,
    activation,
    gated,
    b_up=None,
    b_gate=None,
    b_down=None,
    act_alpha=None,
    act_limit=None,
):
    """lynx::experts: kept for its native CPU kernel (NotImplemented declines the
    decomposition; it takes biases and every activation), else the static-shape gathered
    form, traced. On CUDA a biased or swiglu_clamped call (GPT-OSS; the Triton kernels
    decline it) is kept whole too: its CUDA kernel, the composite, runs grouped GEMMs on the
    weights in place, where the gathered form would copy one expert's weights per (token,
    slot) (GPT-OSS-20B at a 2048-token prefill: ~270 GB)."""
    if _native_experts(x, activation, w_up, w_gate, w_down, b_up, b_gate, b_down):
        return NotImplemented
    extras = (b_up, b_gate, b_down, act_alpha, act_limit)
    if x.device.type == "cuda" and any(extra is not None for extra in extras):
        return NotImplemented
    return cpu_kernels.experts_gathered(
        x, ids, weights, w_up, w_down, activation, gated, w_gate,
        b_up=b_up, b_gate=b_gate, b_down=b_down, alpha=act_alpha, limit=act_limit,
    )  # fmt: skip
