"""Routing one batch across ranks: what the router passes emit with option routing_group.

When each rank holds its own tokens (data-parallel attention + expert parallelism), a
batch-aware policy must see the batch of every rank, or each rank keeps its own expert set.
With options={"routing_group": group} a rewritten router becomes three lynx steps and two
functional all_reduces (sum over the group), traced into the compiled graph:

    votes = lynx::route_votes(logits, policy, alpha, beta)      # int32 [D*E + 1] (oea: [1])
    votes = wait_tensor(all_reduce(votes, "sum", group))        # the group's votes
    kept  = lynx::route_kept(logits, votes, k, policy, ...)      # int32 [E]: this rank's share
    kept  = wait_tensor(all_reduce(kept, "sum", group))         # the group's kept set
    weights, ids = lynx::route_remap(logits, votes, kept, k, ...)

(route_scored_votes / _kept / _remap for scored routers). Every rank's ids then equal
single-process routing of the ranks' batches concatenated in rank order (lowering/
reference.py composes route_reference from the same three steps). Policy exact emits no
collective. Every rank must compile the same routers with the same options, and run them
in the same order: each collective waits for every rank of the group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.fx as fx
from lynx_compile.lowering import reference
from lynx_compile.lowering.ops import group_route_ops
from torch._dynamo.utils import counters

from lynx_compile.config import LynxConfig

_INT32_BYTES = 4


def collective_bytes(policy: str, beta: float | None, num_experts: int) -> int:
    """Bytes each rank all_reduces per routed layer: the votes, then the kept set (int32)."""
    return _INT32_BYTES * (reference.votes_size(policy, beta, num_experts) + num_experts)


def group_world(group_name: str | None) -> int:
    """The size of the named group (None: the default group), 1 without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    if group_name is None:
        return dist.get_world_size()
    from torch.distributed.distributed_c10d import _resolve_process_group

    return dist.get_world_size(_resolve_process_group(group_name))


def routing_scope(config: LynxConfig, policy: reference.RoutingPolicy, num_experts) -> dict:
    """Report fields saying which batch a rewritten router's policy sees.

    routing_scope: "token" (exact: no batch involved), "group" (the batch of every rank of
    routing_group), "per_rank" (torch.distributed with world size > 1 and no routing_group:
    each rank routes its own batch) or "batch" (one process)."""
    if policy.name == "exact":
        return {"routing_scope": "token"}
    if config.routing_group is not None:
        return {
            "routing_scope": "group",
            "routing_group": config.routing_group,
            "routing_world": group_world(config.routing_group),
            "collective_bytes": (
                collective_bytes(policy.name, policy.beta, num_experts)
                if isinstance(num_experts, int)
                else None
            ),
        }
    world = group_world(None)
    if world > 1:
        return {
            "routing_scope": "per_rank",
            "routing_note": (
                f"each rank routes its own batch: torch.distributed is initialised with world "
                f"size {world} and no routing_group is given (the ranks agree only when they "
                "hold the same tokens; options={'routing_group': group} routes the ranks' "
                "tokens as one batch)"
            ),
        }
    return {"routing_scope": "batch"}


def _all_reduce(graph: fx.Graph, tensor: fx.Node, group_name: str) -> fx.Node:
    """wait_tensor(all_reduce(tensor, "sum", group)) as functional collectives, which stay in
    the compiled graph (and in a CUDA graph)."""
    counters["lynx"]["routing_group_all_reduce"] += 1
    reduced = graph.call_function(
        torch.ops._c10d_functional.all_reduce.default, (tensor, "sum", group_name)
    )
    return graph.call_function(torch.ops._c10d_functional.wait_tensor.default, (reduced,))


def emit_group_route(
    graph: fx.Graph,
    scores: fx.Node,
    top_k: int,
    policy: reference.RoutingPolicy,
    group_name: str,
    telemetry_site: int,
    weights: str | None = None,
    space: str | None = None,
) -> fx.Node:
    """Insert the three routing steps and their two all_reduces for scores [N, E]; returns
    the remap node, a (weights or values [N, k], ids [N, k]) pair like lynx::route's.

    weights: a softmax router's weight convention (lynx::route_votes/_kept/_remap); space:
    a scored router's score space (lynx::route_scored_votes/_kept/_remap)."""
    alpha = float(policy.alpha)
    beta = None if policy.beta is None else float(policy.beta)
    name, k0, budget = policy.name, int(policy.k0), int(policy.budget)
    votes_op, kept_op, remap_op = group_route_ops(scored=space is not None)
    if space is None:
        votes_args = (scores, name, alpha, beta)
        kept_tail = (top_k, name, alpha, beta, k0, budget)
        remap_tail = (top_k, name, beta, weights, telemetry_site)
    else:
        votes_args = (scores, space, name, alpha, beta)
        kept_tail = (top_k, space, name, alpha, beta, k0, budget)
        remap_tail = (top_k, name, beta, telemetry_site)
    votes = _all_reduce(graph, graph.call_function(votes_op, votes_args), group_name)
    kept = graph.call_function(kept_op, (scores, votes, *kept_tail))
    kept = _all_reduce(graph, kept, group_name)
    return graph.call_function(remap_op, (scores, votes, kept, *remap_tail))
