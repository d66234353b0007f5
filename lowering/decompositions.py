"""Inductor decompositions of the lynx ops for CPU tensors: the C++ path.

On CPU an opaque custom op costs a Python call per op per layer, which at decode sizes is
more than the work itself. Decomposed into plain aten ops, routing and the sparse experts
are traced into the graph and compiled by Inductor's C++ codegen with everything around
them. Each decomposition computes what the op's reference computes (tests check it).
On CUDA the passes emit the Triton ops (lynx::route_triton, lynx::experts_triton), which
have no decomposition; where no Triton kernel fits, these decompositions are traced there
too (static shapes, so still CUDA-graph safe). Routing with telemetry emits
lynx::route_recorded, which stays opaque so its Python kernel can record.
"""

from __future__ import annotations

import torch
from lynx_compile.lowering import cpu_kernels, ops, reference  # noqa: F401  (ops first)
from torch._inductor.decomposition import register_decomposition


@register_decomposition(torch.ops.lynx.route.default)
def route_cpu(logits, top_k, policy, alpha, beta, k0, budget, weights, telemetry_site):
    """lynx::route: the reference, traced."""
    policy = reference.RoutingPolicy(policy, alpha, beta, k0, budget)
    return reference.route_reference(logits, top_k, policy, weights)


@register_decomposition(torch.ops.lynx.experts.default)
def experts_cpu(x, ids, weights, w_up, w_down, activation, gated):
    """lynx::experts: the static-shape gathered form, traced."""
    return cpu_kernels.experts_gathered(x, ids, weights, w_up, w_down, activation, gated)


@register_decomposition(torch.ops.lynx.experts_split.default)
def experts_split_cpu(x, ids, weights, w_gate, w_up, w_down, activation):
    """lynx::experts_split: the static-shape gathered form, traced."""
    return cpu_kernels.experts_gathered(x, ids, weights, w_up, w_down, activation, True, w_gate)
