"""Router sites beyond softmax -> top-k: every top-k that ranks experts by a router score.

transformers' MoE families rank experts in several ways before their top-k:

    logits[_bias]_topk           top-k on the logits (maybe scaled or biased), softmax or
                                 sigmoid of the k values after (GPT-OSS with a router bias,
                                 Granite, JetMoE, Aria, Llama-4)
    sigmoid[_bias][_grouped]_topk sigmoid scores, plus a score-correction bias, with experts
                                 outside the token's top groups masked out (DeepSeek-V3,
                                 GLM-4 MoE, dots1, EXAONE MoE, LFM2-MoE)
    softmax_bias_topk            softmax probabilities plus a bias (ERNIE 4.5 MoE, LongCat)
    softmax[_grouped]_topk       softmax probabilities whose top-k weights the model
                                 normalises in its own way (DBRX's p-norm), or masked by
                                 group (DeepSeek-V2 group_limited_greedy)

Each site is rewritten at its top-k only: lynx::route_scored(scores, k, space, policy...)
returns what torch.topk returned (the scores at the chosen ids, and the ids), so the
model's own code after the top-k (gather of unbiased scores, renormalisation, routed
scaling factor, softmax over the k logits, sigmoid, p-norm) still computes the weights:
every family keeps its weight convention exactly. Softmax routers that passes/router.py
matches keep its rewrite.

Top-k nodes inside a matched router (the per-group top-k of group-limited routing) belong
to that site. Anything else that looks like a router (fed by a linear) is reported as
skipped with the reason, and compiles as plain Inductor.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from lynx_compile.lowering.ops import route_scored_op
from lynx_compile.passes.fx_utils import arg, canonical_op, example_value, last_dim
from lynx_compile.passes.group_routing import emit_group_route
from lynx_compile.passes.router import (
    copy_flat_meta,
    is_linear_projection,
    report_rewritten_router,
    report_skipped_router,
    unflatten_routing,
)

from lynx_compile.config import LynxConfig

# Spellings canonical_op does not cover and only these patterns need.
_MASK_METHODS = ("masked_fill", "masked_fill_")
# What a top-1 router does with the expert index max/argmax picks.
_SELECTION_USES = ("one_hot", "scatter", "scatter_", "gather", "masked_fill")


@dataclass
class ScoredRouterSite:
    """A matched top-k over a router score [N, E] in one graph."""

    topk: fx.Node
    scores: fx.Node  # the tensor the top-k ranks
    logits: fx.Node  # the router's linear output the scores derive from
    space: str  # "logit" | "prob" | "score" (see lowering.reference.score_bins)
    pattern: str
    values: fx.Node | None  # getitem(topk, 0)
    ids: fx.Node | None  # getitem(topk, 1)
    num_experts: int
    top_k: int
    masked_fill: fx.Node | None = None  # group mask applied right before the top-k
    inner_topks: set[fx.Node] = field(default_factory=set)  # per-group top-k nodes
    ndim: int = 2  # scores' rank: [tokens, E], or [*leading, E] (e.g. [B, T, E])


@dataclass
class _Trace:
    """What the walk from a top-k input back to the router's linear found."""

    logits: fx.Node
    source: str  # "logits" | "sigmoid" | "softmax"
    bias: bool
    mask: fx.Node | None  # masked_fill node on the way, if any


def _is_masked_fill(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _MASK_METHODS
    return node.op == "call_function" and node.target in (
        torch.masked_fill,
        torch.Tensor.masked_fill,
    )


def _is_max_over_experts(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in ("argmax", "max")
    return node.op == "call_function" and node.target in (torch.argmax, torch.max)


def _tensor_input(node: fx.Node) -> fx.Node | None:
    first = node.args[0] if node.args else node.kwargs.get("input")
    return first if isinstance(first, fx.Node) else None


def _is_expert_bias(node, num_experts: int) -> bool:
    """Whether an add operand is a per-expert constant (a bias of numel E), not token data.

    Dynamo passes parameters and buffers as graph inputs, so the shape is what tells a
    score-correction bias [E] or [1, E] from another token-dependent tensor.
    """
    if isinstance(node, (int, float)):
        return True
    val = example_value(node)
    if val is None or not isinstance(val.numel(), int):  # a symbolic size is token data
        return False
    return val.numel() == num_experts and val.shape[-1] == num_experts


def _logit_multiplier(value) -> bool:
    """A scalar the logits are multiplied by (MuseSpark's output_multiplier): a positive
    Python number, or a symbolic float / 0-d tensor (a float attribute under dynamic=True)
    that is positive where it was traced. Only locating the router's linear depends on it:
    the routing op ranks the scores the top-k ranked, whatever the factor."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value > 0
    if not isinstance(value, fx.Node):
        return False
    val = value.meta.get("example_value")
    if isinstance(val, torch.SymFloat):
        return val.node.hint is not None and val.node.hint > 0
    val = example_value(value)
    return isinstance(val, torch.Tensor) and val.dim() == 0 and val.is_floating_point()


def _trace_scores(scores: fx.Node, num_experts: int, ndim: int) -> _Trace | str:
    """Walk from a top-k input to the router's linear; returns a _Trace or why it is not one.

    Accepted on the way: views and casts, + a per-expert bias, * a positive constant,
    masked_fill (a group mask), and at most one sigmoid or softmax over the expert dim.
    """
    node, source, bias, mask = scores, "logits", False, None
    for _ in range(16):
        op = canonical_op(node)
        if op in ("linear", "matmul"):
            return _Trace(node, source, bias, mask)
        if op in ("sigmoid", "softmax") and source == "logits":
            if op == "softmax" and not last_dim(arg(node, 1, "dim"), ndim):
                return "softmax is not over the expert dim"
            source = op
            node = _tensor_input(node)
        elif op in ("view", "cast"):
            node = _tensor_input(node)
        elif op == "add" and len(node.args) == 2:
            a, b = node.args
            if _is_expert_bias(b, num_experts) and isinstance(a, fx.Node):
                node = a
            elif _is_expert_bias(a, num_experts) and isinstance(b, fx.Node):
                node = b
            else:
                return "top-k input adds a token-dependent tensor to the router scores"
            bias = True
        elif op == "mul" and len(node.args) == 2 and _logit_multiplier(node.args[1]):
            node = node.args[0]  # a logit multiplier (MuseSpark): the order is unchanged
        elif _is_masked_fill(node) and mask is None:
            mask, node = node, _tensor_input(node)
        else:
            found = op or str(node.target)
            return (
                "top-k input is not a router score (logits, softmax or sigmoid of a linear, "
                f"plus an expert bias or a group mask): found {found}"
            )
        if node is None:
            return "top-k input is not a router score: the walk lost the tensor argument"
    return "top-k input is too far from the router's linear (more than 16 ops)"


def _derives_from_linear(node: fx.Node, hops: int = 6) -> bool:
    """Whether a tensor comes from a linear/matmul within a few first-argument hops."""
    for _ in range(hops):
        if canonical_op(node) in ("linear", "matmul"):
            return True
        node = _tensor_input(node) if node.op in ("call_function", "call_method") else None
        if node is None:
            return False
    return False


def _topk_problem(topk: fx.Node, scores_val: torch.Tensor, k) -> str | None:
    """Why a top-k cannot be a router's expert choice, or None if its form is fine."""
    if not isinstance(k, int):
        return f"top-k count is not a constant int ({k!r})"
    if scores_val.dim() < 2:
        return f"router scores are {scores_val.dim()}-D, expected [..., tokens, experts]"
    if not last_dim(arg(topk, 2, "dim", -1), scores_val.dim()) or not arg(topk, 3, "largest", True):
        return "top-k is not the largest-k over the expert dim"
    for user in topk.users:
        if canonical_op(user) != "getitem" or user.args[1] not in (0, 1):
            return "top-k result used other than as (values, ids)"
    return None


def _group_topks(mask: fx.Node, logits: fx.Node) -> set[fx.Node]:
    """The top-k nodes that build a group mask (the per-group selection of the router).

    Walks the mask's inputs back to the router's logits, and into in-place updates of
    what it visits (the group mask is `zeros_like(...).scatter_(1, group_idx, 1)`).
    """
    found, stack, seen = set(), [mask.args[1] if len(mask.args) > 1 else None], set()
    while stack:
        node = stack.pop()
        if not isinstance(node, fx.Node) or node in seen or node is logits or len(seen) > 64:
            continue
        seen.add(node)
        if canonical_op(node) == "topk":
            found.add(node)
        stack.extend(node.all_input_nodes)
        stack.extend(u for u in node.users if _in_place_update_of(u, node))
    return found


def _in_place_update_of(user: fx.Node, node: fx.Node) -> bool:
    name = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", "")
    return name.endswith("_") and bool(user.args) and user.args[0] is node


def _declined_softmax_router(topk: fx.Node, softmax: fx.Node, problem: str | None) -> bool:
    """Whether passes/router.py left a softmax -> top-k to this module without reporting it:
    a well-formed top-k whose values the model normalises other than by their sum."""
    has_ids = any(u.args[1] == 1 for u in topk.users)
    ndim = example_value(softmax).dim()
    if ndim > 2 and not is_linear_projection(_tensor_input(softmax)):
        return False  # passes/router.py reported it: N-D scores without a router linear
    return problem is None and has_ids and last_dim(arg(softmax, 1, "dim"), ndim)


def _pattern_and_space(trace: _Trace, grouped: bool) -> tuple[str, str]:
    """Pattern name and the space AffinityBinning compares scores in (reference.score_bins)."""
    name = trace.source + ("_bias" if trace.bias else "") + ("_grouped" if grouped else "")
    if trace.source == "logits":
        return name + "_topk", "logit"
    if trace.source == "softmax" and not trace.bias:
        return name + "_topk", "prob"
    return name + "_topk", "score"


def match_scored_router(topk: fx.Node, graph_id: int) -> ScoredRouterSite | None:
    """Match one top-k over a router score; reports and returns None when it is not one.

    Top-k nodes directly over a softmax belong to passes/router.py: they come here only when
    it declined them without a report (top-k weights normalised other than by their sum).
    """
    scores = topk.args[0] if topk.args else topk.kwargs.get("input")
    k = arg(topk, 1, "k")
    scores_val = example_value(scores)
    if scores_val is None or scores_val.dim() == 0 or not isinstance(scores_val.shape[-1], int):
        return None  # a router has a fixed expert count
    e = scores_val.shape[-1]
    problem = _topk_problem(topk, scores_val, k)
    if canonical_op(scores) == "softmax" and not _declined_softmax_router(topk, scores, problem):
        return None  # passes/router.py reported it
    if problem is not None:
        if _derives_from_linear(scores):
            report_skipped_router(topk, problem, graph_id, e, k if isinstance(k, int) else None)
        return None
    ndim = scores_val.dim()
    trace = _trace_scores(scores, e, ndim)
    if isinstance(trace, str):
        if _derives_from_linear(scores):
            report_skipped_router(topk, trace, graph_id, e, k)
        return None
    if ndim > 2 and (trace.mask is not None or canonical_op(trace.logits) != "linear"):
        report_skipped_router(
            topk,
            f"{ndim}-D router scores are routed only without a group mask and from a linear "
            "layer; flatten the tokens to [N, E] for this router",
            graph_id,
            e,
            k,
        )
        return None
    inner = _group_topks(trace.mask, trace.logits) if trace.mask is not None else set()
    if _ranks_topk_picks(scores, inner):
        report_skipped_router(
            topk,
            "product-key routing: this top-k ranks combinations of an earlier top-k's picks "
            "(sub-keys, not experts)",
            graph_id,
            e,
            k,
        )
        return None
    pattern, space = _pattern_and_space(trace, grouped=bool(inner))
    values = ids = None
    for user in topk.users:
        if user.args[1] == 0:
            values = user
        else:
            ids = user
    if ids is None:
        report_skipped_router(
            topk, "top-k ids are unused: nothing routes on this top-k", graph_id, e, k
        )
        return None
    if _feeds_another_topk(topk):
        report_skipped_router(
            topk,
            "product-key routing: a second top-k combines this top-k's picks (sub-keys, "
            "not experts) into the experts",
            graph_id,
            e,
            k,
        )
        return None
    return ScoredRouterSite(
        topk=topk,
        scores=scores,
        logits=trace.logits,
        space=space,
        pattern=pattern,
        values=values,
        ids=ids,
        num_experts=e,
        top_k=k,
        masked_fill=trace.mask if trace.mask is scores else None,
        inner_topks=inner,
        ndim=ndim,
    )


def _feeds_another_topk(topk: fx.Node) -> bool:
    """Whether a later top-k reads what this one returns (Doge's product keys pick sub-keys
    per half, then a top-k over their sums picks the experts): this top-k is not the expert
    choice. A grouped router's per-group top-k lies before its final top-k, not after.

    Only the routing arithmetic between the two counts: the walk stops where a contraction
    sums over a dimension longer than 1 (the experts' matmuls, the next layer's router
    linear), so a later layer's router, which reads this layer's output through them, does
    not make this top-k a sub-key pick. An outer product (einsum "ni,nj->nij", a [n, i, 1]
    @ [n, 1, j] matmul) sums over nothing: product keys combined that way are still found."""
    return _reaches_topk(list(topk.users), lambda node: node.users, set())


def _ranks_topk_picks(scores: fx.Node, groups: set[fx.Node]) -> bool:
    """Whether the scores a top-k ranks are computed from an earlier top-k's outputs (other
    than a grouped router's per-group top-k, `groups`), within the routing arithmetic (the
    walk up stops at contractions summing over features, as the walk down does): the
    second top-k of product keys, whose positions index each token's own grid of sub-key
    combinations, not the experts."""
    return _reaches_topk([scores], lambda node: node.all_input_nodes, groups)


def _reaches_topk(start: list[fx.Node], step, passed: set[fx.Node]) -> bool:
    """Whether a walk from `start` along `step` (users, or inputs) meets a top-k other than
    those in `passed` (not walked past either), stopping at contractions that sum over
    features: the routing arithmetic around a top-k."""
    seen, frontier = set(), list(start)
    while frontier:
        node = frontier.pop()
        if node in seen or node in passed or _sums_features(node):
            continue
        seen.add(node)
        if canonical_op(node) == "topk":
            return True
        frontier.extend(step(node))
    return False


# Matrix products under their Dynamo spellings, with the argument whose last dim they sum.
_MATMUL_FUNCTIONS = {torch.bmm: 0, torch.baddbmm: 1, torch.addmm: 1}
if hasattr(torch, "_grouped_mm"):
    _MATMUL_FUNCTIONS[torch._grouped_mm] = 0
_MATMUL_METHODS = {"bmm": 0, "matmul": 0, "mm": 0, "__matmul__": 0, "baddbmm": 1, "addmm": 1}


def _sums_features(node: fx.Node) -> bool:
    """Whether `node` is a contraction summing over a dimension longer than 1 (unknown or
    symbolic lengths count as longer)."""
    op = canonical_op(node)
    if op == "linear":
        return True
    if op == "matmul":
        summed = 0
    elif node.op == "call_function" and node.target in _MATMUL_FUNCTIONS:
        summed = _MATMUL_FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target in _MATMUL_METHODS:
        summed = _MATMUL_METHODS[node.target]  # args[0] is the tensor the method is on
    elif node.op == "call_function" and node.target is torch.einsum:
        return _einsum_sums(node)
    else:
        return False
    value = example_value(node.args[summed]) if len(node.args) > summed else None
    return value is None or value.dim() == 0 or not _is_one(value.shape[-1])


def _is_one(size) -> bool:
    return isinstance(size, int) and size == 1


def _einsum_sums(node: fx.Node) -> bool:
    """Whether an einsum sums over an index of length > 1 (unparsable: True)."""
    if not node.args or not isinstance(node.args[0], str):
        return True
    equation = node.args[0].replace(" ", "")
    operands = node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    inputs, arrow, output = equation.partition("->")
    terms = inputs.split(",")
    if "." in equation or len(terms) != len(operands):
        return True
    if not arrow:  # implicit output: the indices that appear once
        output = "".join(c for c in sorted(set(inputs) - {","}) if inputs.count(c) == 1)
    for term, operand in zip(terms, operands, strict=True):
        value = example_value(operand)
        if value is None or value.dim() != len(term):
            return True
        if any(c not in output and not _is_one(n) for c, n in zip(term, value.shape, strict=True)):
            return True
    return False


def _report_max_routers(gm: fx.GraphModule, graph_id: int) -> None:
    """Report top-1 routers written as max/argmax over router scores: not rewritten.

    Switch Transformers (argmax with a per-expert capacity over the sequence) and PhiMoE
    (sparsemixer: two masked max passes with a jitter threshold) choose experts this way;
    their weights come from masks that lynx does not model, so they stay exact.
    """
    for node in gm.graph.nodes:
        if not _is_max_over_experts(node):
            continue
        src = _tensor_input(node)
        dim = arg(node, 1, "dim")
        val = example_value(src) if src is not None else None
        if val is None or dim is None or not last_dim(dim, val.dim()):
            continue
        experts = val.shape[-1]
        if not isinstance(experts, int) or experts == 1:
            continue
        if _derives_from_linear(src) and _feeds_selection(node):
            report_skipped_router(
                node,
                "top-1 by max/argmax (Switch Transformers capacity routing, PhiMoE "
                "sparsemixer) is not rewritten: its weights depend on masks lynx does not "
                "model; it runs exact",
                graph_id,
                experts,
                1,
            )


def _feeds_selection(node: fx.Node) -> bool:
    """Whether a max/argmax result is used as an expert index within two hops."""
    frontier = set(node.users)
    for _ in range(2):
        names = {
            u.target if isinstance(u.target, str) else getattr(u.target, "__name__", "")
            for u in frontier
        }
        if names & set(_SELECTION_USES):
            return True
        frontier = {w for u in frontier for w in u.users}
    return False


def find_scored_router_sites(
    gm: fx.GraphModule, graph_id: int, claimed: set[fx.Node]
) -> list[ScoredRouterSite]:
    """Every top-k over a router score not in `claimed` (softmax sites of passes/router.py).

    Unsupported router-like top-k and max/argmax nodes are reported as skipped.
    """
    sites, inner = [], set()
    topks = [n for n in gm.graph.nodes if canonical_op(n) == "topk" and n not in claimed]
    for node in reversed(topks):  # final top-k first: it claims its per-group top-k nodes
        if node in inner:
            continue
        site = match_scored_router(node, graph_id)
        if site is not None:
            sites.append(site)
            inner |= site.inner_topks
    _report_max_routers(gm, graph_id)
    return sites[::-1]


def rewrite_scored_router(
    gm: fx.GraphModule, site: ScoredRouterSite, config: LynxConfig, graph_id: int
) -> tuple[fx.Node, fx.Node, fx.Node, dict]:
    """Replace one top-k by lynx::route_scored; returns (route, values, ids, report entry)."""
    policy, entry = report_rewritten_router(
        site, config, graph_id, weights="model", score_space=site.space
    )
    graph = gm.graph
    with graph.inserting_before(site.topk):
        scores = _unusable_as_minus_inf(graph, site)
        if site.ndim > 2:  # routed as [B*T, E], outputs shaped back below
            scores = graph.call_method("reshape", (scores, -1, site.num_experts))
        telemetry_site = entry["site"] if config.telemetry else -1
        if entry["routing_scope"] == "group":
            route = emit_group_route(
                graph,
                scores,
                site.top_k,
                policy,
                config.routing_group,
                telemetry_site,
                space=site.space,
            )
        else:
            route = graph.call_function(
                route_scored_op(),
                (
                    scores,
                    site.top_k,
                    site.space,
                    policy.name,
                    float(policy.alpha),
                    None if policy.beta is None else float(policy.beta),
                    int(policy.k0),
                    int(policy.budget),
                    telemetry_site,
                ),
            )
        values = graph.call_function(operator.getitem, (route, 0))
        ids = graph.call_function(operator.getitem, (route, 1))
        flat_outputs = (values, ids)
        if site.ndim > 2:
            values, ids = unflatten_routing(graph, site.scores, flat_outputs, site.top_k)
    _copy_meta(site, values, ids)
    copy_flat_meta(route, *(flat_outputs if site.ndim > 2 else ()), values, ids)
    for old, new in ((site.values, values), (site.ids, ids)):
        if old is not None:
            old.replace_all_uses_with(new)
            graph.erase_node(old)
    graph.erase_node(site.topk)
    return route, values, ids, entry


def _unusable_as_minus_inf(graph: fx.Graph, site: ScoredRouterSite) -> fx.Node:
    """The scores lynx ranks: a group mask that fills a finite value (DeepSeek-V2 fills 0)
    is refilled with -inf, so batch-aware policies never hand a token a masked expert.
    torch.topk picks the same experts either way while k experts stay unmasked."""
    fill = site.masked_fill
    if fill is None:
        return site.scores
    value = fill.args[2] if len(fill.args) > 2 else fill.kwargs.get("value")
    if isinstance(value, float) and math.isinf(value) and value < 0:
        return site.scores
    refilled = graph.call_method("masked_fill", (fill.args[0], fill.args[1], float("-inf")))
    val = example_value(site.scores)
    if val is not None:
        refilled.meta["example_value"] = val
    return refilled


def _copy_meta(site: ScoredRouterSite, values: fx.Node, ids: fx.Node) -> None:
    """Give new nodes the example values of the nodes they replace (later passes read them)."""
    vals = site.topk.meta.get("example_value", site.topk.meta.get("val"))
    if not isinstance(vals, tuple) or len(vals) != 2:
        return
    values.meta["example_value"], ids.meta["example_value"] = vals
