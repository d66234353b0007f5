"""Router sites: find softmax -> top-k (-> renormalise) routers and rewrite them to lynx::route.

A router site, in the torch-level graph Dynamo hands the backend:

    logits = linear(x, W_router)           # x: [N, d] flattened from [B, T, d]
    probs  = softmax(cast(logits), -1)     # optionally softmax(logits, dtype=float32)
    vals, ids = topk(probs, k, -1)
    vals = vals / vals.sum(-1, keepdim=True)   # only in "renorm" models
    (vals = vals.to(dtype))                # left in place, it consumes our weights

The rewrite replaces (vals after renorm, ids) with the outputs of
lynx::route(logits_cast, k, policy...), keeping every other user of logits/probs
(aux losses, router-logit outputs) untouched. Decode gating: the approximate policy is
applied only when x was flattened from a [B, 1, d] tensor (one new token per sequence).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from lynx_compile.lowering.ops import route_op
from lynx_compile.passes import report as report_mod
from lynx_compile.passes.fx_utils import arg, canonical_op, example_value, last_dim, module_path
from lynx_compile.passes.group_routing import emit_group_route, routing_scope

from lynx_compile.config import LynxConfig


@dataclass
class RouterSite:
    """A matched softmax -> top-k router in one graph."""

    topk: fx.Node
    softmax: fx.Node
    logits: fx.Node  # the tensor softmax normalises (before its dtype= cast, if any)
    softmax_dtype: torch.dtype | None
    values: fx.Node | None  # getitem(topk, 0)
    ids: fx.Node | None  # getitem(topk, 1)
    weights_out: fx.Node | None  # the node whose users receive the routing weights
    convention: str  # "renorm" | "mass"
    num_experts: int
    top_k: int
    pattern: str
    ndim: int = 2  # scores' rank: [tokens, E], or [*leading, E] (e.g. [B, T, E])


def _topk_outputs(topk: fx.Node) -> tuple[fx.Node | None, fx.Node | None, bool]:
    """(values, ids, ok): the getitem users of a topk node; ok is False on other uses."""
    values = ids = None
    for user in topk.users:
        if canonical_op(user) != "getitem" or user.args[1] not in (0, 1):
            return None, None, False
        if user.args[1] == 0:
            values = user
        else:
            ids = user
    return values, ids, True


def _renorm_of(values: fx.Node, ndim: int) -> fx.Node | None:
    """The node dividing `values` by its own sum over the last dim, if that is all values feeds."""
    sums = [
        u
        for u in values.users
        if canonical_op(u) == "sum"
        and u.args[0] is values
        and last_dim(arg(u, 1, "dim"), ndim)
        and arg(u, 2, "keepdim", False)
    ]
    if len(sums) != 1:
        return None
    divs = [
        u
        for u in values.users
        if canonical_op(u) == "div" and u.args[0] is values and u.args[1] is sums[0]
    ]
    if len(divs) != 1 or set(values.users) != {sums[0], divs[0]}:
        return None
    return divs[0]


def report_skipped_router(topk: fx.Node, reason: str, graph_id: int, e=None, k=None) -> None:
    """Record a router candidate left untouched, and why."""
    report_mod.add_site(
        kind="router",
        status="skipped",
        reason=reason,
        num_experts=e,
        top_k=k,
        graph=graph_id,
        node=topk.name,
    )


def match_router(topk: fx.Node, graph_id: int) -> RouterSite | None:
    """Match one topk node as a softmax router; reports and returns None when it is not one."""
    src = topk.args[0] if topk.args else topk.kwargs.get("input")
    k = arg(topk, 1, "k")
    src_val = example_value(src)
    if src_val is None:
        return None
    e = int(src_val.shape[-1]) if src_val.dim() else None
    if canonical_op(src) != "softmax":
        return None  # passes/router_families.py matches or reports every other router
    if not isinstance(k, int):
        report_skipped_router(topk, f"top-k count is not a constant int ({k!r})", graph_id, e)
        return None
    ndim = src_val.dim()
    if ndim < 2:
        report_skipped_router(
            topk, f"router scores are {ndim}-D, expected [..., tokens, experts]", graph_id, e, k
        )
        return None
    logits = src.args[0] if src.args else src.kwargs["input"]
    if ndim > 2 and not is_linear_projection(logits):
        report_skipped_router(
            topk,
            f"{ndim}-D softmax scores not computed by a linear layer: leading dims are routed "
            "only for a router linear applied to [..., tokens, d]",
            graph_id,
            e,
            k,
        )
        return None
    if not last_dim(arg(topk, 2, "dim", -1), ndim) or not arg(topk, 3, "largest", True):
        report_skipped_router(
            topk, "top-k is not the largest-k over the expert dim", graph_id, e, k
        )
        return None
    if not last_dim(arg(src, 1, "dim"), ndim):
        report_skipped_router(topk, "softmax is not over the expert dim", graph_id, e, k)
        return None
    values, ids, ok = _topk_outputs(topk)
    if not ok or ids is None:
        report_skipped_router(topk, "top-k result used other than as (values, ids)", graph_id, e, k)
        return None
    weights_out, convention = values, "mass"
    if values is not None and (div := _renorm_of(values, ndim)) is not None:
        weights_out, convention = div, "renorm"
    elif values is not None and any(canonical_op(u) == "div" for u in values.users):
        # Normalised other than by the sum (DBRX's p-norm): passes/router_families.py
        # rewrites the top-k alone and keeps the model's own weight code.
        return None
    softmax_dtype = arg(src, 2, "dtype") if src.op == "call_function" else src.kwargs.get("dtype")
    return RouterSite(
        topk=topk,
        softmax=src,
        logits=logits,
        softmax_dtype=softmax_dtype,
        values=values,
        ids=ids,
        weights_out=weights_out,
        convention=convention,
        num_experts=e,
        top_k=k,
        pattern=f"softmax_topk_{convention}",
        ndim=ndim,
    )


def _projection_of(logits: fx.Node) -> fx.Node | None:
    """The linear/matmul node the scores come from through casts and views, or None."""
    node = logits
    for _ in range(6):
        op = canonical_op(node)
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if op in ("linear", "matmul") and tensors:
            return node
        if op not in ("view", "cast") or not tensors:
            return None
        node = tensors[0]
    return None


def is_linear_projection(logits: fx.Node) -> bool:
    """Whether the scores are a linear layer's output (through casts and views): a router
    projection, not, say, an attention score matrix whose softmax another top-k reads."""
    projection = _projection_of(logits)
    return projection is not None and canonical_op(projection) == "linear"


def is_decode_step(logits: fx.Node) -> bool | None:
    """True when the router input was flattened from [B, 1, d] (one new token per sequence),
    False for [B, T>1, d] or a symbolic T, None when the graph does not show the shape."""
    node = logits
    for _ in range(12):
        val = example_value(node)
        if val is not None and val.dim() >= 3:
            return isinstance(val.shape[-2], int) and val.shape[-2] == 1
        op = canonical_op(node)
        if op in ("view", "cast", "linear", "matmul") or (
            op is None and node.op == "call_function"
        ):
            tensors = [a for a in node.args if isinstance(a, fx.Node)]
            if not tensors:
                return None
            node = tensors[0]
        else:
            return None
    return None


def router_hidden_dim(logits: fx.Node) -> int | None:
    """The hidden size d the router projects from: the last dim of the linear's input."""
    projection = _projection_of(logits)
    if projection is None:
        return None
    val = example_value(next(a for a in projection.args if isinstance(a, fx.Node)))
    return None if val is None else val.shape[-1]


def router_layer(site) -> str | None:
    """The router's module path, the key a per-layer calibration names it by (e.g.
    `layers.2.moe.gate`): its linear projection's module where the graph shows one, else
    the module that calls top-k; None when the graph records no module stack."""
    projection = _projection_of(site.logits)
    if projection is not None and canonical_op(projection) == "linear":
        path = module_path(projection)
        if path is not None:
            return path
    return module_path(site.topk)


def find_router_sites(gm: fx.GraphModule, graph_id: int) -> list[RouterSite]:
    """Every softmax -> top-k router in the graph (others are reported as skipped)."""
    sites = []
    for node in list(gm.graph.nodes):
        if canonical_op(node) == "topk":
            site = match_router(node, graph_id)
            if site is not None:
                sites.append(site)
    return sites


def report_rewritten_router(site, config: LynxConfig, graph_id: int, **extra):
    """Decode gating and the report entry every router rewrite shares: (policy, entry).

    `site` is any matched router (softmax or scored) with logits, pattern, num_experts,
    top_k and its topk node; `extra` adds kind-specific report fields. The entry also says
    which batch the policy sees (passes/group_routing.py: routing_scope)."""
    decode = is_decode_step(site.logits)
    layer = router_layer(site)
    policy = config.routing_policy(bool(decode), layer)
    extra.update(routing_scope(config, policy, site.num_experts))
    entry = report_mod.add_site(
        kind="router",
        status="rewritten",
        reason=site.pattern,
        num_experts=site.num_experts,
        top_k=site.top_k,
        graph=graph_id,
        node=site.topk.name,
        layer=layer,
        policy=policy.name,
        policy_params={
            "alpha": policy.alpha,
            "beta": policy.beta,
            "k0": policy.k0,
            "budget": policy.budget,
        },
        decode=decode,
        telemetry_on=config.telemetry,
        **extra,
    )
    return policy, entry


def rewrite_router(
    gm: fx.GraphModule, site: RouterSite, config: LynxConfig, graph_id: int
) -> tuple[fx.Node, fx.Node, fx.Node, dict]:
    """Replace one router site by lynx::route; returns (route, weights, ids, report entry).

    Scores with leading dims ([B, T, E]) are routed flattened to [B*T, E] (the batch the
    policy sees is every token of the call) and the outputs shaped back to [B, T, k]."""
    hidden_dim = router_hidden_dim(site.logits)
    policy, entry = report_rewritten_router(
        site,
        config,
        graph_id,
        weights=site.convention,
        # The report is plain data (report() deep-copies it): a symbolic size (dynamic=True
        # can leave d symbolic, e.g. Jamba) cannot be copied, so it is reported as unknown.
        hidden_dim=hidden_dim if isinstance(hidden_dim, int) else None,
    )
    graph = gm.graph
    with graph.inserting_before(site.topk):
        logits = site.logits
        if site.softmax_dtype is not None:
            logits = graph.call_method("to", (logits, site.softmax_dtype))
        flat = logits
        if site.ndim > 2:
            flat = graph.call_method("reshape", (logits, -1, site.num_experts))
        telemetry_site = entry["site"] if config.telemetry else -1
        if entry["routing_scope"] == "group":
            route = emit_group_route(
                graph,
                flat,
                site.top_k,
                policy,
                config.routing_group,
                telemetry_site,
                weights=site.convention,
            )
        else:
            route = graph.call_function(
                route_op(config.telemetry),
                (
                    flat,
                    site.top_k,
                    policy.name,
                    float(policy.alpha),
                    None if policy.beta is None else float(policy.beta),
                    int(policy.k0),
                    int(policy.budget),
                    site.convention,
                    telemetry_site,
                ),
            )
        weights = graph.call_function(operator.getitem, (route, 0))
        ids = graph.call_function(operator.getitem, (route, 1))
        flat_outputs = (weights, ids)
        if site.ndim > 2:
            weights, ids = unflatten_routing(graph, logits, flat_outputs, site.top_k)
    _copy_meta(site, weights, ids)
    copy_flat_meta(route, *(flat_outputs if site.ndim > 2 else ()), weights, ids)
    if site.weights_out is not None:
        site.weights_out.replace_all_uses_with(weights)
    site.ids.replace_all_uses_with(ids)
    renorm_sum = site.weights_out.args[1] if site.convention == "renorm" else None
    _erase_dead(
        graph, [site.weights_out, renorm_sum, site.values, site.ids, site.topk, site.softmax]
    )
    return route, weights, ids, entry


def _copy_meta(site: RouterSite, weights: fx.Node, ids: fx.Node) -> None:
    """Give new nodes the example values of the nodes they replace (later passes read them)."""
    w_src = site.weights_out if site.weights_out is not None else site.values
    for new, old in ((weights, w_src), (ids, site.ids)):
        val = example_value(old)
        if val is not None:
            new.meta["example_value"] = val


def unflatten_routing(graph: fx.Graph, scores: fx.Node, outputs, top_k: int):
    """Routing outputs [N, k] shaped back to the scores' [*leading, k] (sizes read from the
    scores node at run time, so symbolic sizes stay symbolic)."""
    leading = graph.call_function(
        operator.getitem, (graph.call_method("size", (scores,)), slice(None, -1))
    )
    shape = graph.call_function(operator.add, (leading, (top_k,)))
    return tuple(graph.call_method("reshape", (out, shape)) for out in outputs)


def copy_flat_meta(route: fx.Node, *nodes: fx.Node) -> None:
    """The route node's example value ([N, k] pair), from the outputs' (flattened when they
    have leading dims); with leading dims, `nodes` is (flat w, flat ids, w, ids)."""
    weights, ids = nodes[-2:]
    vals = (example_value(weights), example_value(ids))
    if any(v is None for v in vals):
        return
    if vals[0].dim() > 2:
        with vals[0].fake_mode:
            vals = tuple(v.reshape(-1, v.shape[-1]) for v in vals)
        for node, val in zip(nodes[:2], vals, strict=True):
            node.meta["example_value"] = val
    route.meta["example_value"] = vals


def _erase_dead(graph: fx.Graph, nodes: list[fx.Node | None]) -> None:
    for node in dict.fromkeys(nodes):  # ordered, without repeats
        if node is not None and not node.users:
            graph.erase_node(node)
