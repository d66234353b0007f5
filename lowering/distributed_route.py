"""Inductor decompositions of the routing steps across ranks (lynx::route_votes, route_kept,
route_remap and their route_scored_* twins): their reference bodies, traced.

The steps are small (a few [N, E] sorts and scatters per layer); traced, Inductor fuses them
with the model's graph on every device instead of calling three opaque ops that run the
reference eagerly. A remap that records telemetry (telemetry_site >= 0) stays an opaque call
so that its body can read the ids back; the collectives between the steps are the
functional ones the passes emit (passes/group_routing.py).
"""

from __future__ import annotations

import functools

import torch
from lynx_compile.lowering import reference
from torch._inductor.decomposition import register_decomposition

_lynx = torch.ops.lynx


@functools.cache
def register_fallbacks() -> None:
    """Where a remap's decomposition declines (telemetry), Inductor calls the op itself, with
    the layout rule it gives every custom op. Called by the passes when they emit the steps:
    torch._inductor.lowering is a heavy import that `import lynx_compile` need not pay."""
    from torch._inductor.lowering import make_fallback, tag_to_layout_constraint
    from torch._library.utils import get_layout_constraint_tag

    for op in (_lynx.route_remap.default, _lynx.route_scored_remap.default):
        constraint = tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True))
        make_fallback(op, constraint, override_decomp=True)


@register_decomposition(_lynx.route_votes.default)
def route_votes_traced(logits, policy, alpha, beta):
    """lynx::route_votes, traced."""
    return reference.route_votes_reference(logits, reference.RoutingPolicy(policy, alpha, beta))


@register_decomposition(_lynx.route_kept.default)
def route_kept_traced(logits, votes, top_k, policy, alpha, beta, k0, budget):
    """lynx::route_kept, traced."""
    pol = reference.RoutingPolicy(policy, alpha, beta, k0, budget)
    probs = torch.softmax(logits, dim=-1)
    return reference.route_kept_reference(logits, probs, votes, top_k, pol).to(torch.int32)


@register_decomposition(_lynx.route_remap.default)
def route_remap_traced(logits, votes, kept, top_k, policy, beta, weights, telemetry_site):
    """lynx::route_remap, traced unless it records telemetry."""
    if telemetry_site >= 0:
        return NotImplemented
    return reference.route_group_remap_reference(logits, top_k, votes, kept, weights)


@register_decomposition(_lynx.route_scored_votes.default)
def route_scored_votes_traced(scores, space, policy, alpha, beta):
    """lynx::route_scored_votes, traced."""
    pol = reference.RoutingPolicy(policy, alpha, beta)
    return reference.scored_votes_reference(scores, space, pol)


@register_decomposition(_lynx.route_scored_kept.default)
def route_scored_kept_traced(scores, votes, top_k, space, policy, alpha, beta, k0, budget):
    """lynx::route_scored_kept, traced."""
    pol = reference.RoutingPolicy(policy, alpha, beta, k0, budget)
    return reference.scored_kept_reference(scores, space, votes, top_k, pol).to(torch.int32)


@register_decomposition(_lynx.route_scored_remap.default)
def route_scored_remap_traced(scores, votes, kept, top_k, policy, beta, telemetry_site):
    """lynx::route_scored_remap, traced unless it records telemetry."""
    if telemetry_site >= 0:
        return NotImplemented
    return reference.scored_group_remap_reference(scores, top_k, votes, kept)
