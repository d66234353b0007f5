"""Dispatch sites: the expert computation that consumes a router's (weights, ids) in the same
graph, rewritten into lynx::experts when it is shown equivalent.

Rather than one pattern per spelling (transformers' grouped_mm and batched_mm forms, dense
all-experts einsums, gather + bmm, ...), the pass works on meaning:

1. region:    the nodes downstream of the routing outputs, up to a node O whose value
              is [tokens, d'] and that closes the region (d' the experts' width: the
              router's hidden size d, tried first, or a projection's that the model runs
              its experts on, MuseSpark / NemotronH latent; no region node other than O
              is used outside it; the routing outputs themselves may be: a module that
              also returns its ids keeps them), grown backwards over side nodes used only
              inside it (weight transposes, repeat_interleave of the tokens, aranges);
              candidates widest first, the first that passes 2 and 3 is taken. In-place
              accumulation into a fresh buffer (loops: out.index_add_, out[rows] += y)
              is put in functional form first;
2. inputs:    the region must read exactly: the routing weights and ids, one [tokens, d']
              hidden-states tensor, two (gate_up, down) or three (gate, up, down) 3-D
              expert weights with leading dim E, up to three per-expert biases [E, width]
              (indexed by expert: GPT-OSS's gate_up_proj_bias, down_proj_bias), plus sizes;
              or, for an nn.ModuleList of nn.Linear experts, 2 or 3 2-D weights per expert
              of the router (each expert's own tensors, read in place by
              lynx::experts_list, never stacked) and their nn.Linear biases;
   For scored routers (lynx::route_scored returns what torch.topk returned), the routing
   weights are what the model computes from the top-k values after it (gather of unbiased
   scores, renormalisation, scaling, softmax over the k values): `model_weights` finds that
   computation, which stays the model's, and the region starts after it;
3. candidates: layouts (linear [E, out, in] or transposed), gated or not, gate/up halves
              or interleaved (gate_up[..., ::2], [..., 1::2]: passed as strided views,
              never copied), each bias on each projection it fits, the activation found in
              the region (swiglu_clamped with the alpha and limit read from the region's
              mul-before-sigmoid and clamp constants); each is checked numerically
              against the original region on random hidden states (a clamped one also at
              scales that reach its limit) and random exact routings with the real
              weights, and the first that matches replaces the region. No match: the
              region is kept and the site is reported as skipped, with why.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.fx as fx
from lynx_compile.lowering.constants import ELEMENTWISE_ACTIVATIONS
from lynx_compile.lowering.ops import experts_op
from lynx_compile.passes import report as report_mod
from lynx_compile.passes.fx_utils import GUARD, arg, canonical_op, example_value
from lynx_compile.passes.group_routing import group_world
from lynx_compile.passes.parallel_linears import (
    KEPT_BIASED,
    PARTIAL_SUM,
    localize_expert_linears,
)
from lynx_compile.passes.router import router_hidden_dim

log = logging.getLogger("lynx_compile")

# Candidate regions checked numerically per router before the dispatch is reported skipped
# (each check runs the region once on random inputs).
_MAX_CHECKED_REGIONS = 3
# Hidden-state scales at which a clamped activation's plan is checked again (its random
# pre-activations at scale 1 may stay inside the limit: then every limit would pass).
_CLAMP_PROBES = (8.0, 64.0)


# One projection's experts: a stacked [E, ...] tensor's node, or E per-expert tensors' nodes.
Weights = fx.Node | tuple[fx.Node, ...]


@dataclass
class ExpertsPlan:
    """How to call lynx::experts in place of one dispatch region."""

    x: fx.Node
    # each a stacked [E, ...] parameter's node, or a tuple of E per-expert tensors' nodes
    # (an nn.ModuleList of nn.Linear experts: lynx::experts_list); biases likewise
    w_up: Weights
    w_down: Weights
    w_gate: Weights | None
    up_transposed: bool
    down_transposed: bool
    gated: bool
    activation: str
    # top-1 only: the weight scales the expert's input, not its output (Llama-4)
    scale_input: bool = False
    # expert-parallel slice: the weights hold experts [offset, offset + E_local) of the
    # router's; slots routed elsewhere get weight 0 (and an expert read anyway)
    expert_offset: int | None = None
    # routing received from other ranks, into these experts: a slot of weight 0 (held
    # elsewhere) is pointed at an expert the call reads anyway
    repoint_idle: bool = False
    # gate and up interleaved in w_up's rows (gate even, up odd: GPT-OSS); passed to the op
    # as split-gate views, and b_up (then [E, 2I]) split the same way
    interleaved: bool = False
    # per-expert biases [E, width] added after the up (gate) and down projections
    b_up: Weights | None = None
    b_gate: Weights | None = None
    b_down: Weights | None = None
    # swiglu_clamped's parameters, read from the region's constants
    act_alpha: float | None = None
    act_limit: float | None = None

    def describe(self) -> str:
        """Pattern name for the report."""
        gate = "split-gate" if self.w_gate is not None else ("gated" if self.gated else "plain")
        gate = "interleaved" if self.interleaved else gate
        act = self.activation
        if self.act_alpha is not None:
            limit = "none" if self.act_limit is None else f"{self.act_limit:g}"
            act += f"(alpha={self.act_alpha:g}, limit={limit})"
        biased = [
            name
            for name, node in (("gate_up" if self.interleaved else "up", self.b_up),
                               ("gate", self.b_gate), ("down", self.b_down))
            if node is not None
        ]  # fmt: skip
        scaled = f", biased {'+'.join(biased)}" if biased else ""
        scaled += ", input-scaled" if self.scale_input else ""
        if self.expert_offset is not None:
            held = _held(self)
            scaled += f", experts {self.expert_offset}..{self.expert_offset + held - 1}"
        if self.per_expert:
            scaled += ", per-expert tensors"
        return f"sparse_experts({gate} {act}{scaled})"

    @property
    def per_expert(self) -> bool:
        """Whether each expert's weights are tensors of their own (lynx::experts_list)."""
        return isinstance(self.w_up, tuple)


def _hint(v):
    """A concrete int for an int or SymInt, without adding a guard."""
    return v if isinstance(v, int) else v.node.hint


def _same_size(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return str(a) == str(b)


def _forward_slice(seeds: list[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(seeds)
    while todo:
        node = todo.pop()
        for user in node.users:
            if user not in seen and user.op != "output":
                seen.add(user)
                todo.append(user)
    return seen


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        for inp in todo.pop().all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                todo.append(inp)
    return seen


_LIKE_OPS = {torch.zeros_like, torch.empty_like, torch.ones_like, torch.full_like}

_CLAMPS = {"clamp", "clamp_min", "clamp_max", "clip"}
_CLAMP_FUNCTIONS = {torch.clamp: "clamp", torch.clamp_min: "clamp_min",
                    torch.clamp_max: "clamp_max", torch.clip: "clamp"}  # fmt: skip


# In-place updates of a fresh buffer (the loop styles: out.index_add_(0, tok, y),
# out[rows] += y) and their functional forms.
_ACCUMULATORS = {"index_add_": "index_add", "add_": "add", "scatter_add_": "scatter_add"}
_FRESH_FUNCTIONS = {torch.zeros_like, torch.zeros, torch.empty_like, torch.full_like}
_FRESH_METHODS = {"new_zeros", "new_full"}


def _is_fresh_buffer(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _FRESH_FUNCTIONS
    return node.op == "call_method" and node.target in _FRESH_METHODS


def _updates(node: fx.Node, versions: set[fx.Node]) -> bool:
    """Whether node updates a version of the buffer in place: an accumulating method, or
    `buffer[index] = value` with a tensor index (what `out[rows] += y` becomes)."""
    if not node.args or node.args[0] not in versions:
        return False
    if node.op == "call_method":
        return node.target in _ACCUMULATORS
    if node.op == "call_function" and node.target is operator.iadd:  # out += y
        return True
    return (
        node.op == "call_function"
        and node.target is operator.setitem
        and isinstance(node.args[1], fx.Node)
    )


def _mutates_first_arg(node: fx.Node) -> bool:
    """An in-place op (`x.mul_(2)`, `x[0:4] = v`, `operator.iadd`) on its first argument."""
    if node.op == "call_method":
        return node.target.endswith("_")
    name = getattr(node.target, "__name__", "")
    return node.op == "call_function" and (name.endswith("_") or name in ("setitem", "iadd"))


def _copying_read(node: fx.Node) -> bool:
    """A read whose result does not alias the buffer (advanced indexing, arithmetic)."""
    if node.op == "call_function" and node.target is operator.getitem:
        return isinstance(node.args[1], fx.Node)
    return canonical_op(node) in ("add", "mul", "div", "sum")


def _functional(graph: fx.Graph, update: fx.Node, current: fx.Node) -> fx.Node:
    if update.op == "call_method":
        name = _ACCUMULATORS[update.target]
        return graph.call_method(name, (current, *update.args[1:]), dict(update.kwargs))
    if update.target is operator.iadd:
        return graph.call_function(operator.add, (current, update.args[1]))
    index, value = update.args[1], update.args[2]
    return graph.call_method("index_put", (current, (index,), value))


def functionalize_accumulators(gm: fx.GraphModule, seeds: list[fx.Node]) -> int:
    """Rewrite in-place updates of fresh buffers, where the routing feeds them, into their
    functional forms (`b = b.index_add(...)`, `b = b.index_put((rows,), v)`), so the
    dispatch's result is one node.

    Taken only when nothing can observe the difference: the buffer is made in the graph
    (zeros_like, zeros, ...); every use of it is an update, a copying read (each then reads
    the version current at its place), or any read after the last update. Inductor
    functionalizes mutations the same way, so the compiled code is unchanged. Returns the
    buffers rewritten."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    downstream = _forward_slice(seeds)
    rewritten = 0
    for buffer in [n for n in gm.graph.nodes if _is_fresh_buffer(n)]:
        versions, steps = {buffer}, []
        for node in sorted(_forward_slice([buffer]), key=order.__getitem__):
            if _updates(node, versions):
                versions.add(node)
                steps.append(node)
        if not steps or not any(step in downstream for step in steps):
            continue
        last = order[steps[-1]]
        uses = sorted(
            {u for v in versions for u in v.users if u not in versions}, key=order.__getitem__
        )
        early = [u for u in uses if order[u] < last]
        untracked = [u for u in uses if _mutates_first_arg(u) and u.args[0] in versions]
        if not all(_copying_read(u) for u in early) or untracked:
            continue  # a view read before an update, or an update of a kind not modelled
        current, pending = buffer, list(uses)
        for step in steps:
            for reader in [u for u in pending if order[u] < order[step]]:
                for version in versions:
                    reader.replace_input_with(version, current)
                pending.remove(reader)
            with gm.graph.inserting_before(step):
                new = _functional(gm.graph, step, current)
            new.meta = dict(buffer.meta)
            current = new
        for reader in pending:
            for version in versions:
                reader.replace_input_with(version, current)
        for step in reversed(steps):
            gm.graph.erase_node(step)
        rewritten += 1
    return rewritten


def _shape_only(node: fx.Node, region: set[fx.Node]) -> bool:
    """Whether the region reads only the shape of `node` (through zeros_like and kin)."""
    users = [u for u in node.users if u in region]
    return bool(users) and all(u.op == "call_function" and u.target in _LIKE_OPS for u in users)


def _grow_backwards(region: set[fx.Node], protected: set[fx.Node], is_hidden) -> None:
    """Add side nodes (not placeholders, not on the router's path, not mere shape sources,
    not the [*tokens, d] hidden states the experts read) used only by the region."""
    changed = True
    while changed:
        changed = False
        for node in {i for n in region for i in n.all_input_nodes} - region:
            if node.op in ("placeholder", "get_attr") or node in protected or is_hidden(node):
                continue
            if local_shard(node) or stacked_view(node):  # parameters read as they are
                continue
            if _shape_only(node, region):
                continue
            if node.users and all(u in region for u in node.users):
                region.add(node)
                changed = True


def local_shard(node: fx.Node) -> bool:
    """`param.to_local()` of a DTensor parameter or buffer (torch.distributed.tensor: a rank's
    shard of expert weights sharded by parallelize_module or distribute_tensor): the experts
    read the local tensor in place, as they read a plain parameter."""
    if node.op != "call_method" or node.target != "to_local" or not node.args:
        return False
    source = node.args[0]
    return isinstance(source, fx.Node) and source.op in ("placeholder", "get_attr")


def stacked_view(node: fx.Node) -> bool:
    """A 2-D parameter viewed as 3-D (DBRX's flat [E * I, d] w1 / v1 / w2, viewed as
    [E, I, d] to pick an expert): the experts read the view, which is the parameter's
    storage, in place."""
    if node.op not in ("call_method", "call_function") or node.target == "contiguous":
        return False
    source = node.args[0] if node.args else None
    if canonical_op(node) != "view" or not isinstance(source, fx.Node):
        return False
    if source.op not in ("placeholder", "get_attr"):
        return False
    before, after = example_value(source), example_value(node)
    return before is not None and after is not None and before.dim() == 2 and after.dim() == 3


def merge_stacked_views(gm: fx.GraphModule) -> int:
    """Identical stacked views of one parameter (a loop re-viewing it in every iteration)
    made one node, so that the experts read one 3-D tensor; returns the nodes merged."""
    first: dict[tuple, fx.Node] = {}
    merged = 0
    for node in list(gm.graph.nodes):
        if not stacked_view(node):
            continue
        try:
            key = (node.op, node.target, node.args, tuple(sorted(node.kwargs.items())))
            hash(key)
        except TypeError:  # a shape holding something unhashable: left as traced
            continue
        kept = first.setdefault(key, node)
        if kept is not node:
            node.replace_all_uses_with(kept)
            gm.graph.erase_node(node)
            merged += 1
    return merged


def _external_inputs(region: set[fx.Node], order: dict[fx.Node, int]) -> list[fx.Node]:
    ext = {i for n in region for i in n.all_input_nodes} - region
    return sorted(ext, key=order.__getitem__)


def _is_closed(region: set[fx.Node], out: fx.Node) -> bool:
    """No value of the region but out is read outside it (a lynx guard may read one:
    _replace keeps what it reads)."""
    return all(u in region or u.meta.get(GUARD) for n in region if n is not out for u in n.users)


def _is_float(node: fx.Node) -> bool:
    val = example_value(node)
    return val is not None and val.dtype.is_floating_point


def _router_scores(route: fx.Node, logits: fx.Node) -> set[fx.Node]:
    """The router's score tensors: the linear output and what derives from it on the way
    to the routing op (sigmoid, softmax, + bias, group mask), which the model may gather
    its weights from."""
    upstream = _ancestors(route)
    return {n for n in _forward_slice([logits]) if n in upstream} | {logits}


def _is_constant_input(node: fx.Node) -> bool:
    """A parameter or buffer without a token dim (a per-expert scale), or a scalar (a
    routed scaling factor that dynamic=True passes as a tensor and reads with .item()):
    never hidden states or 3-D expert weights."""
    val = node.meta.get("example_value")
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)):
        return True
    val = example_value(node)
    return node.op in ("placeholder", "get_attr") and val is not None and val.dim() <= 1


# What the weights computation does between the top-k and the weights, keeping each value
# at its (token, slot) place: elementwise math, reductions over the k slots, gathers at the
# ids, scatters into a dense gate. A permutation (w.reshape(-1)[order]) belongs to the
# dispatch, even where its shape looks like [tokens, k] (k = 1).
_ALIGNED = {
    "type_as",
    "pow",
    "sqrt",
    "rsqrt",
    "abs",
    "log",
    "reciprocal",
    "clamp_max",
    "where",
    "masked_fill",
    "add",
    "sub",
    "mul",
    "div",
    "truediv",
    "itruediv",
    "iadd",
    "imul",
    "neg",
    "exp",
    "float",
    "to",
    "type",
    "half",
    "bfloat16",
    "softmax",
    "sigmoid",
    "sum",
    "norm",
    "gather",
    "scatter",
    "scatter_",
    "clamp",
    "clamp_min",
    "div_",
    "mul_",
    "add_",
}


def _is_indexing(node: fx.Node) -> bool:
    """gather(src, dim, index) / scatter(src, dim, index, value): the ids are an index."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name in ("gather", "scatter", "scatter_")


def _keeps_alignment(node: fx.Node) -> bool:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name in _ALIGNED


def model_weights(
    gm: fx.GraphModule, route: fx.Node, values: fx.Node, ids: fx.Node, logits: fx.Node
) -> tuple[fx.Node, frozenset[fx.Node]] | str:
    """The routing weights a scored router's model computes after its top-k, and the nodes
    computing them: (weights node, its computation), or why none is found.

    The computation is what reads only the top-k (values, ids), the router's scores and
    per-expert constants; the weights are its float [*tokens, k] result (or a dense
    [*tokens, E] gate, zero off the chosen experts: Llama-4) that derives from scores,
    reads the ids only as a gather/scatter index (a mask `w * (ids == e)` is the
    dispatch's), and that no other such result derives from.
    """
    tokens_k = example_value(ids).shape
    scores = _router_scores(route, logits)
    scores |= {  # a buffer shaped like the scores (Llama-4 scatters the top-k into it)
        n
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target in _LIKE_OPS and n.args and n.args[0] in scores
    }
    seeds = {n for n in (values, ids) if n is not None}
    routing: set[fx.Node] = set(seeds)
    scored: set[fx.Node] = {values} if values is not None else set()
    id_data: set[fx.Node] = {ids}  # what reads the ids other than as an index
    for node in gm.graph.nodes:  # topological order
        if node in routing or node.op in ("placeholder", "get_attr", "output"):
            continue
        inputs = node.all_input_nodes
        if not any(i in routing for i in inputs):
            continue
        if all(i in routing or i in scores or _is_constant_input(i) for i in inputs):
            routing.add(node)
            # ids as data (a mask ids == e, ids.float()), not as a gather/scatter index
            index = None
            if _is_indexing(node):
                index = node.args[2] if len(node.args) > 2 else node.kwargs.get("index")
            if any(i in id_data for i in inputs if i is not index):
                id_data.add(node)
            elif _keeps_alignment(node) and any(i in scored or i in scores for i in inputs):
                scored.add(node)

    dense_shape = (*tokens_k[:-1], example_value(logits).shape[-1])  # [*tokens, E]

    def is_weights(n: fx.Node) -> bool:  # [*tokens, k], or a dense [*tokens, E] gate
        val = example_value(n)
        return (
            n in scored
            and bool(n.users)
            and _is_float(n)
            and val.dim() == len(tokens_k)
            and (
                all(map(_same_size, val.shape, tokens_k))
                or all(map(_same_size, val.shape, dense_shape))
            )
        )

    candidates = [n for n in routing if is_weights(n)]
    final = [n for n in candidates if not any(c in _forward_slice([n]) for c in candidates)]
    if len(final) != 1:
        found = "none" if not final else ", ".join(sorted(n.name for n in final))
        return (
            "the routing weights the model computes after its top-k are not one "
            f"[tokens, k] tensor (found {found})"
        )
    weights = final[0]
    computation = (_ancestors(weights) & routing) - seeds
    return weights, frozenset(computation | {weights})


_COLLECTIVE_NAMESPACES = ("_c10d_functional", "c10d_functional", "c10d", "_dtensor")


def _op_name(node: fx.Node) -> str | None:
    """'namespace::op' of a call to a torch op (an OpOverload or an OpOverloadPacket)."""
    if node.op != "call_function":
        return None
    target = node.target
    schema = getattr(target, "_schema", None)
    return schema.name if schema is not None else getattr(target, "_qualified_op_name", None)


def _is_collective(node: fx.Node) -> bool:
    """A torch.distributed collective (functional or not): never inside a region."""
    name = _op_name(node)
    if name is not None and name.split("::")[0] in _COLLECTIVE_NAMESPACES:
        return True
    module = getattr(node.target, "__module__", "") or ""
    return node.op == "call_function" and module.startswith("torch.distributed")


def partial_sum_groups(region: set[fx.Node]) -> set[str]:
    """The process groups of the marked all_reduces in a region (parallel_linears: each
    expert's down projection summed over the ranks holding a shard of it)."""
    return {n.meta[PARTIAL_SUM] for n in region if PARTIAL_SUM in n.meta}


def _gathered(node: fx.Node) -> tuple[fx.Node, tuple] | None:
    """(wait, (group size, group)) where node's only use is a functional all_gather along
    dim 0 whose result is read only through its wait_tensor; else None."""
    if len(node.users) != 1:
        return None
    (gather,) = node.users
    if _op_name(gather) not in _ALL_GATHERS or len(gather.users) != 1:
        return None
    (wait,) = gather.users
    if _op_name(wait) not in _WAITS:
        return None
    return wait, tuple(gather.args[1:3])


def gathered_routing(weights: fx.Node, ids: fx.Node) -> tuple[fx.Node, fx.Node, int] | None:
    """Routing all_gathered before the experts (data-parallel attention + expert parallelism:
    each rank routes its own tokens, then every rank's tokens, weights and ids are gathered
    and each rank computes its experts' share of the whole batch, examples
    DataParallelExpertsMoE): (gathered weights, gathered ids, group size) when both are
    gathered over the same group; the dispatch is then sought on the gathered tensors (its
    hidden states are the gathered tokens), between the model's collectives."""
    found = [_gathered(weights), _gathered(ids)]
    if None in found or found[0][1] != found[1][1]:
        return None
    return found[0][0], found[1][0], found[0][1][0]


def _received(seed: fx.Node, floating: bool) -> list[tuple[fx.Node, tuple]]:
    """(wait, (group size, group)) of each functional all_to_all that seed reaches before
    any collective (so never the next layer's exchange), whose 2-D result of the given kind
    (floating, or integer and not bool) is read only through its wait; in graph order."""
    found, seen, todo = [], set(), [seed]
    while todo:
        for user in todo.pop().users:
            if user in seen or user.op == "output":
                continue
            seen.add(user)
            if not _is_collective(user):
                todo.append(user)
            elif _op_name(user) in _ALL_TO_ALLS and len(user.users) == 1:
                (wait,) = user.users
                val = example_value(wait)
                if _op_name(wait) not in _WAITS or val is None or val.dim() != 2:
                    continue
                integer = not val.dtype.is_floating_point and val.dtype != torch.bool
                wanted = val.dtype.is_floating_point if floating else integer
                if wanted:
                    found.append((wait, (len(user.args[1]), user.args[3])))
    order = {n: i for i, n in enumerate(seed.graph.nodes)}
    return sorted(found, key=lambda f: order[f[0]])


def exchanged_routing(weights: fx.Node, ids: fx.Node) -> tuple[fx.Node, fx.Node, int] | None:
    """Routing sent to the experts' ranks before the experts (per-rank tokens and expert
    parallelism with a token exchange, examples AllToAllExpertsMoE): (received weights,
    received ids, group size) for the first pair in graph order of functional all_to_alls
    over one group, one carrying a float tensor derived from the weights, the other an
    integer one derived from the ids, of one shape [M, k'] (k' the router's k, or 1 for one
    row per slot), both before any other collective. The dispatch is then sought on the
    received tensors (its hidden states are the received tokens), between the model's
    collectives; whatever the pick, a plan is taken only where it reproduces the region on
    random routing, and at run time slots of weight 0 or with ids outside the rank's
    experts weigh 0 (idle_routing)."""
    sent_w = _received(weights, floating=True)
    for recv_ids, group in _received(ids, floating=False):
        shape = example_value(recv_ids).shape
        for recv_w, w_group in sent_w:
            if w_group == group and all(map(_same_size, example_value(recv_w).shape, shape)):
                return recv_w, recv_ids, group[0]
    return None


_ALL_GATHERS = ("_c10d_functional::all_gather_into_tensor",)
_ALL_TO_ALLS = ("_c10d_functional::all_to_all_single",)
_WAITS = ("_c10d_functional::wait_tensor",)


def find_regions(
    gm: fx.GraphModule,
    weights: fx.Node,
    ids: fx.Node,
    route: fx.Node,
    weight_nodes: frozenset[fx.Node] = frozenset(),
    need_ids: bool = True,
) -> Iterator[tuple[fx.Node, set[fx.Node], list[fx.Node]]]:
    """Candidate dispatches consuming weights/ids, in graph order: (output node, region,
    external inputs), where the output is a [*tokens, w] node (tokens: the ids' leading
    dims, [N] or e.g. [B, T]) that closes the region, and the region grows back to the
    [*tokens, w] hidden states it reads. w is the experts' width: the router's hidden size
    d, or the width of a projection the model runs its experts on (MuseSpark, NemotronH's
    latent experts: [N, d] -> [N, d'] -> experts -> [N, d'] -> [N, d]). Several can close
    (a [tokens, E] gate matrix, a partial loop, the dispatch with the projections around
    it): the caller checks each. `weight_nodes` (the model's own computation of `weights`
    from the top-k, see model_weights) stay outside the region; a dense gate holds the ids
    (need_ids=False)."""
    ids_val = example_value(ids)
    if ids_val is None:
        return
    tokens = ids_val.shape[:-1]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    guards = {n for n in gm.graph.nodes if n.meta.get(GUARD)}
    slice_ = _forward_slice([weights, ids]) - weight_nodes - guards
    protected = _ancestors(route) | {route, weights, ids} | weight_nodes
    for out in sorted(slice_, key=order.__getitem__):
        val = example_value(out)
        if val is None or val.dim() != len(tokens) + 1:
            continue
        if not all(map(_same_size, val.shape[:-1], tokens)):
            continue
        region = {n for n in slice_ if order[n] <= order[out]}
        if any(_is_collective(n) and PARTIAL_SUM not in n.meta for n in region):
            continue  # collectives stay the model's (and the numerical check never runs one)
        if len(partial_sum_groups(region)) > 1:
            continue
        # The dispatch reads both routing outputs; they may have other users too (a module
        # that also returns its ids for an auxiliary loss): those keep reading them.
        if not (set(weights.users) & region and (set(ids.users) & region or not need_ids)):
            continue
        if not _is_closed(region, out):
            continue

        def is_hidden(node: fx.Node, shape=val.shape) -> bool:  # the experts' x: [*tokens, d]
            v = example_value(node)
            # an output buffer (zeros_like(x), torch.zeros(N, d): JetMoE's index_add target)
            fresh = _is_fresh_buffer(node) or (
                node.op == "call_function" and node.target in _LIKE_OPS
            )
            return v is not None and v.shape == shape and not fresh

        _grow_backwards(region, protected, is_hidden)
        yield out, region, _external_inputs(region, order)


def _plan_candidates(
    inputs: list[fx.Node],
    region: set[fx.Node],
    weights: fx.Node,
    ids: fx.Node,
    num_experts: int,
    real: dict[fx.Node, object],
    width,
) -> list[ExpertsPlan] | str:
    """Every plausible lynx::experts call for a region's inputs, or why there is none;
    `real` holds the placeholders' values (a 0-d float input is a constant of the model:
    Dynamo passes float attributes so under dynamic=True); `width` is the region output's
    (the op returns its input's width). num_experts: the router's, which the ids index;
    negated for routing received from other ranks (the ids index the experts the region
    reads, or the router's, masked by the region; slots of weight 0 or held elsewhere are
    then pointed at experts read anyway)."""
    order = {n: i for i, n in enumerate(next(iter(region)).graph.nodes)}
    tensors = [
        n
        for n in inputs
        if n not in (weights, ids)
        and example_value(n) is not None
        and example_value(n).dim() > 0
        and not _shape_only(n, region)
    ]
    tokens = example_value(ids).shape[:-1]  # [N], or e.g. [B, T] for [B, T, k] routing

    def is_hidden(n: fx.Node) -> bool:  # [*tokens, d]: hidden states, never expert weights
        lead = example_value(n).shape[:-1]
        return len(lead) == len(tokens) and all(map(_same_size, lead, tokens))

    experts = [n for n in tensors if example_value(n).dim() == 3 and not is_hidden(n)]
    others = [n for n in tensors if n not in experts]
    first_use = {n: min(order[u] for u in n.users if u in region) for n in tensors}
    per_expert = None  # {matrix: its bias} when the experts are separate 2-D tensors
    if not experts:
        found = _per_expert_weights(others, is_hidden, first_use, num_experts)
        if isinstance(found, str):
            return found
        if found is not None:
            experts, per_expert, others = found
    held = {_expert_count(n) for n in experts}
    offsets: list[int | None] = [None]
    count = num_experts  # the experts the weights (and biases) hold
    received = num_experts is not None and num_experts < 0
    if received:  # ids into the receiving rank's experts, or global ones the region masks
        if len(held) > 1:
            return "the dispatch's expert weights hold different expert counts"
        num_experts = -num_experts
        if held and not num_experts % next(iter(held)):
            offsets += list(range(0, num_experts, next(iter(held))))
        num_experts = count = next(iter(held), num_experts)
    if held and held != {num_experts}:
        count = held.pop()
        if held or count > num_experts or num_experts % count:
            return "a 3-D input of the dispatch is not indexed by expert"
        # an expert-parallel slice: which range it holds is checked numerically
        offsets = list(range(0, num_experts, count))
    biases = [  # [experts held, width]: GPT-OSS's, sliced like the weights under EP
        n
        for n in others
        if example_value(n).dim() == 2
        and not is_hidden(n)
        and _hint(example_value(n).shape[0]) == count
        and per_expert is None
    ]
    others = [n for n in others if n not in biases]
    if len(biases) > 3:
        return f"dispatch reads {len(biases)} per-expert 2-D inputs, expected at most 3 biases"
    vectors = [n for n in others if example_value(n).dim() == 1]
    rest = [n for n in others if n not in vectors]
    if vectors and len(rest) == 1 and is_hidden(rest[0]):
        # MuseSpark's post-expert norm weight, read per (token, slot) before the combine
        return (
            f"dispatch reads {len(vectors)} 1-D tensor(s) beside the experts' weights (a norm "
            "or scale of each expert's output: lynx::experts takes none)"
        )
    if len(others) != 1 or not is_hidden(others[0]):
        return f"dispatch reads {len(others)} hidden-state tensors, expected one [tokens, d]"
    x = others[0]
    d = _hint(example_value(x).shape[-1])
    if not _same_size(example_value(x).shape[-1], width):
        return f"dispatch reads [tokens, {d}] hidden states and returns [tokens, {_hint(width)}]"
    if per_expert is None:
        experts.sort(key=first_use.__getitem__)  # first used = first matmul
    if len(experts) not in (2, 3):
        return f"dispatch reads {len(experts)} expert weight tensors, expected 2 or 3"
    glu = _glu_parameters(region, real)
    if isinstance(glu, str):  # swiglu_clamped's constants unreadable: its plans are left out
        if not _activations_in(region) - {"swiglu_clamped"}:
            return glu
        glu = []
    plans = []
    for activation in (*ELEMENTWISE_ACTIVATIONS, "swiglu_clamped"):
        params = glu if activation == "swiglu_clamped" else [(None, None)]
        for (alpha, limit), (up_t, down_t) in itertools.product(
            params, itertools.product((False, True), repeat=2)
        ):
            act = dict(activation=activation, act_alpha=alpha, act_limit=limit)
            glu_only = activation == "swiglu_clamped"
            if len(experts) == 2:
                forms = [(True, False), (True, True)] + ([] if glu_only else [(False, False)])
                for gated, interleaved in forms:
                    plans.append(
                        ExpertsPlan(
                            x, experts[0], experts[1], None, up_t, down_t, gated,
                            interleaved=interleaved, **act,
                        )
                    )  # fmt: skip
            else:
                for gate, up in ((experts[0], experts[1]), (experts[1], experts[0])):
                    plans.append(ExpertsPlan(x, up, experts[2], gate, up_t, down_t, True, **act))
    if per_expert is not None:
        fitting = [q for p in plans if _shapes_fit(p, d) for q in _with_list_biases(p, per_expert)]
    else:
        fitting = [q for p in plans if _shapes_fit(p, d) for q in _with_biases(p, biases, d)]
    return [
        dataclasses.replace(p, expert_offset=o, repoint_idle=received)
        for o in offsets
        for p in fitting
    ]


def _with_biases(plan: ExpertsPlan, biases: list[fx.Node], d: int) -> list[ExpertsPlan]:
    """The plan with each way of placing the biases on its projections that fits their
    widths (each projection takes at most one; the numerical check decides among them)."""
    if not biases:
        return [plan]
    up = [_hint(s) for s in example_value(plan.w_up).shape[1:]]
    up_out = up[1] if plan.up_transposed else up[0]
    widths = {"b_up": up_out, "b_down": d}
    if plan.w_gate is not None:
        widths["b_gate"] = up_out
    found = []
    for roles in itertools.permutations(widths, len(biases)):
        pairs = list(zip(biases, roles, strict=True))
        if all(_hint(example_value(b).shape[1]) == widths[r] for b, r in pairs):
            found.append(dataclasses.replace(plan, **{r: b for b, r in pairs}))
    return found


def _expert_count(w: Weights) -> int:
    """The experts a projection's weights hold."""
    return len(w) if isinstance(w, tuple) else _hint(example_value(w).shape[0])


def _expert_shape(w: Weights) -> list[int] | None:
    """One expert's matrix (or bias) shape; None where per-expert tensors differ in shape,
    dtype or strides (lynx::experts_list reads them all with one set of strides)."""
    if not isinstance(w, tuple):
        return [_hint(s) for s in example_value(w).shape[1:]]
    vals = [example_value(n) for n in w]
    first = vals[0]
    if any(
        v.shape != first.shape or v.dtype != first.dtype or v.stride() != first.stride()
        for v in vals
    ):
        return None
    return [_hint(s) for s in first.shape]


def _per_expert_weights(others: list[fx.Node], is_hidden, first_use: dict, num_experts):
    """Experts as separate 2-D tensors, one per expert and projection (an nn.ModuleList of
    nn.Linear experts) of every expert of the router: (the projections' weights as tuples
    in order of first use, {matrix: its bias or None}, the remaining inputs), None where the
    region reads no such matrices, or why they cannot be read. The matrices are taken in the
    order the region first uses them, m = 3 (gate, up, down) or 2 (up, down) per expert,
    expert j's before expert j+1's as a loop over the experts computes them (the numerical
    check confirms the order); an nn.Linear bias is the 1-D tensor its matrix's F.linear
    also reads."""
    matrices = sorted(
        (n for n in others if example_value(n).dim() == 2 and not is_hidden(n)),
        key=first_use.__getitem__,
    )
    if len(matrices) < 2:
        return None
    vectors = [n for n in others if example_value(n).dim() == 1]
    bias_of: dict[fx.Node, fx.Node | None] = dict.fromkeys(matrices)
    for v in vectors:
        partners = [m for m in matrices if set(m.users) & set(v.users)]
        if len(partners) != 1 or bias_of[partners[0]] is not None:
            return (
                f"dispatch reads {len(matrices)} per-expert 2-D weights and a 1-D tensor that "
                "is not one of their nn.Linear biases"
            )
        bias_of[partners[0]] = v
    rest = [n for n in others if n not in matrices and n not in vectors]
    total = -num_experts if num_experts is not None and num_experts < 0 else num_experts
    for per in (3, 2):
        # every expert of the router: a region holding some of them is part of a loop (its
        # partial sums close regions too), not a rank's slice of the experts
        held = len(matrices) // per
        if len(matrices) % per or held != total:
            continue
        chunks = [matrices[j * per : (j + 1) * per] for j in range(held)]
        # by role across experts: expert j's first, second (and third) matrix
        experts = [tuple(chunk[r] for chunk in chunks) for r in range(per)]
        if any(_expert_shape(w) is None for w in experts):
            return (
                f"the experts' {len(matrices)} separate 2-D weights differ in shape, dtype or "
                "strides between experts: lynx::experts_list reads every expert alike"
            )
        return experts, bias_of, rest
    return (
        f"the experts are {len(matrices)} separate 2-D weights, not 2 or 3 for each of the "
        f"router's {total} experts"
    )


def _with_list_biases(plan: ExpertsPlan, bias_of: dict) -> list[ExpertsPlan]:
    """The per-expert plan with each projection's nn.Linear biases (all of its experts have
    one, or none); no plan where only some experts' projection has a bias."""
    found = {}
    for name, w in (("b_up", plan.w_up), ("b_gate", plan.w_gate), ("b_down", plan.w_down)):
        if w is None:
            continue
        biases = [bias_of[n] for n in w]
        if all(b is None for b in biases):
            continue
        if any(b is None for b in biases):
            return []
        found[name] = tuple(biases)
    return [dataclasses.replace(plan, **found)]


def _constant(value, real: dict[fx.Node, object]) -> float | None:
    """The number `value` is at compile time: a literal, a 0-d model input read with
    .item() (its example value: the model's float attribute), or the negation of one;
    None for anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, fx.Node) or not value.args:
        return None
    inner = value.args[0]
    if value.op == "call_method" and value.target == "item" and inner in real:
        held = real[inner]
        return float(held) if isinstance(held, torch.Tensor) and held.dim() == 0 else None
    if value.target in (operator.neg, torch.neg, "neg"):
        found = _constant(inner, real)
        return None if found is None else -found
    return None


def _clamp_bounds(node: fx.Node, real: dict[fx.Node, object]) -> tuple | None:
    """(min, max) of a clamp node (_is_clamp; None for an open side), or None if a bound is
    not a constant."""
    kind = _CLAMP_FUNCTIONS.get(node.target) if node.op == "call_function" else node.target
    kind = "clamp" if kind == "clip" else kind
    if kind == "clamp":
        bounds = (arg(node, 1, "min"), arg(node, 2, "max"))
    elif kind == "clamp_min":
        bounds = (arg(node, 1, "min"), None)
    else:
        bounds = (None, arg(node, 1, "max"))
    values = tuple(None if b is None else _constant(b, real) for b in bounds)
    if any(v is None for v, b in zip(values, bounds, strict=True) if b is not None):
        return None
    return values


def _glu_parameters(
    region: set[fx.Node], real: dict[fx.Node, object]
) -> list[tuple[float, float | None]] | str:
    """swiglu_clamped's candidate (alpha, limit) pairs from the region's constants: alpha
    from each sigmoid's input `g * alpha` (1.0 for sigmoid(g)), limit from the clamps, which
    must all bound at one +-limit (gate.clamp(max=L), up.clamp(-L, L)); no clamp: None.
    [] when the region has no sigmoid; a reason string when its constants cannot be read
    (they would be guessed, and the numerical check cannot tell a limit its random inputs
    never reach). Constants Dynamo passes as inputs are read at their compile-time values
    (_constant)."""
    alphas = []
    for node in region:
        if canonical_op(node) != "sigmoid" or not node.args:
            continue
        inner = node.args[0]
        if isinstance(inner, fx.Node) and canonical_op(inner) == "mul":
            consts = [c for c in (_constant(a, real) for a in inner.args) if c is not None]
            if len(consts) != 1:
                continue  # sigmoid(g * s) with a tensor s: not swiglu_clamped
            alphas.append(consts[0])
        else:
            alphas.append(1.0)
    if not alphas:
        return []
    bounds = [_clamp_bounds(n, real) for n in region if _is_clamp(n)]
    if None in bounds:
        return "the dispatch clamps at a bound that is not a constant"
    magnitudes = {abs(float(b)) for pair in bounds for b in pair if b is not None}
    if len(magnitudes) > 1:
        return (
            f"the dispatch clamps at several bounds ({sorted(magnitudes)}); swiglu_clamped "
            "takes one limit"
        )
    limit = magnitudes.pop() if magnitudes else None
    return [(alpha, limit) for alpha in sorted(set(alphas))]


def _is_clamp(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _CLAMPS) or (
        node.op == "call_function" and node.target in _CLAMP_FUNCTIONS
    )


def _shapes_fit(plan: ExpertsPlan, d: int) -> bool:
    up, down = _expert_shape(plan.w_up), _expert_shape(plan.w_down)
    gate = None if plan.w_gate is None else _expert_shape(plan.w_gate)
    if up is None or down is None or (plan.w_gate is not None and gate is None):
        return False
    if _expert_count(plan.w_down) != _expert_count(plan.w_up):
        return False
    up_out, up_in = reversed(up) if plan.up_transposed else up
    down_out, down_in = reversed(down) if plan.down_transposed else down
    inter = up_out // 2 if plan.gated and plan.w_gate is None else up_out
    if plan.gated and plan.w_gate is None and up_out % 2:
        return False
    if plan.w_gate is not None:
        gate_out, gate_in = reversed(gate) if plan.up_transposed else gate
        if (gate_out, gate_in) != (up_out, up_in):
            return False
    return up_in == d and down_out == d and down_in == inter


_POW_FUNCTIONS = {operator.pow, torch.pow}


def _same_call(a, b) -> bool:
    """Whether a and b are one value: the same node, or the same call on the same inputs
    (Dynamo keeps `F.relu(g) * F.relu(g)` as two relu nodes)."""
    if a is b:
        return True
    calls = ("call_function", "call_method")
    return (
        isinstance(a, fx.Node)
        and isinstance(b, fx.Node)
        and a.op in calls
        and (a.op, a.target, a.args, a.kwargs) == (b.op, b.target, b.args, b.kwargs)
    )


def _squares(node: fx.Node, base: fx.Node) -> bool:
    """Whether node is `base` squared as models write it: torch.square(base), base ** 2
    (base.pow(2)), base * base."""
    function = node.target if node.op == "call_function" else None
    method = node.target if node.op == "call_method" else None
    if function is torch.square or method == "square":
        return node.args[0] is base
    if function in _POW_FUNCTIONS or method == "pow":
        exponent = arg(node, 1, "exponent")
        return node.args[0] is base and type(exponent) in (int, float) and exponent == 2
    return (
        canonical_op(node) == "mul"
        and len(node.args) >= 2
        and base in node.args[:2]
        and _same_call(*node.args[:2])
    )


def _activations_in(region: set[fx.Node]) -> set[str]:
    """The activations the region's nodes may compute; where one node allows two readings
    (a relu also used unsquared), both, and the numerical check decides."""
    found = set()
    for node in region:
        op = canonical_op(node)
        if op == "relu":  # relu(h) ** 2 (NemotronH's ReLUSquaredActivation) or relu(h)
            users = [u for u in node.users if u in region]
            squared = [u for u in users if _squares(u, node)]
            if squared:
                found.add("relu2")
            if not squared or len(squared) < len(users):
                found.add("relu")
        elif op == "silu":
            found.add(op)
        elif op == "sigmoid":  # g * sigmoid(alpha * g): GPT-OSS's gate
            found.add("swiglu_clamped")
        elif op == "gelu":
            tanh = node.kwargs.get("approximate", "none") == "tanh"
            found.add("gelu_tanh" if tanh else "gelu")
    return found


def _extract(gm, region: set[fx.Node], inputs: list[fx.Node], out: fx.Node, ranks: float = 1):
    """The region as a standalone GraphModule taking `inputs` in order; a marked all_reduce
    of partial products (PARTIAL_SUM) becomes its input times `ranks`: what the sum over
    that many ranks holding the same partial product gives, on this process alone."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        env[node] = graph.placeholder(node.name)
    for node in gm.graph.nodes:
        if node in region and PARTIAL_SUM in node.meta:
            partial = env[node.args[0]]
            summed = _is_collective(node) and _op_name(node) not in _WAITS
            env[node] = graph.call_function(operator.mul, (partial, ranks)) if summed else partial
        elif node in region:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[out])
    return fx.GraphModule(gm, graph)


_EVEN, _ODD = (slice(None), slice(0, None, 2)), (slice(None), slice(1, None, 2))


def _weight_args(plan: ExpertsPlan, values: dict[fx.Node, object]):
    """(w_up, w_down, w_gate, b_up, b_gate, b_down) for lynx::experts: views of the plan's
    tensors (transposes, and an interleaved gate/up's even and odd rows)."""

    if plan.per_expert:  # lists of per-expert views: [U, d] matrices, [U] biases
        return _list_weight_args(plan, values)

    def layout(node, transposed):
        w = values[node]
        return w.transpose(1, 2) if transposed else w

    up = layout(plan.w_up, plan.up_transposed)
    down = layout(plan.w_down, plan.down_transposed)
    gate = None if plan.w_gate is None else layout(plan.w_gate, plan.up_transposed)
    b_up, b_gate, b_down = (None if b is None else values[b] for b in _biases(plan))
    if plan.interleaved:
        gate, up = up[_EVEN], up[_ODD]
        if b_up is not None:
            b_gate, b_up = b_up[_EVEN], b_up[_ODD]
    return up, down, gate, b_up, b_gate, b_down


_EVEN_ROWS, _ODD_ROWS = slice(0, None, 2), slice(1, None, 2)


def _list_weight_args(plan: ExpertsPlan, values: dict[fx.Node, object]):
    """_weight_args for per-expert tensors: lists (empty where absent) of views."""

    def layout(nodes, transposed):
        return [values[n].t() if transposed else values[n] for n in nodes or ()]

    up = layout(plan.w_up, plan.up_transposed)
    down = layout(plan.w_down, plan.down_transposed)
    gate = layout(plan.w_gate, plan.up_transposed)
    b_up, b_gate, b_down = ([values[n] for n in b or ()] for b in _biases(plan))
    if plan.interleaved:
        gate, up = [w[_EVEN_ROWS] for w in up], [w[_ODD_ROWS] for w in up]
        b_gate, b_up = [b[_EVEN_ROWS] for b in b_up], [b[_ODD_ROWS] for b in b_up]
    return up, down, gate, b_up, b_gate, b_down


def _biases(plan: ExpertsPlan) -> tuple:
    return plan.b_up, plan.b_gate, plan.b_down


def local_routing(ids: torch.Tensor, weights: torch.Tensor, offset: int, held: int):
    """(local ids, weights) [N, k] for an expert-parallel slice holding experts [offset,
    offset + held): ids - offset where the slot's expert is held here; a slot routed to
    another rank weighs 0 and points at an expert this rank reads anyway (the token's own
    lowest local one, else the batch's, else 0), so it makes the kernel read no extra
    expert. Static shapes, no host sync (traced into the compiled graph)."""
    local = (ids >= offset) & (ids < offset + held)
    return _point_idle(ids - offset, local, held), torch.where(local, weights, 0)


def idle_routing(ids: torch.Tensor, weights: torch.Tensor, held: int):
    """(ids, weights) [N, k] of routing received from other ranks, into `held` experts: a
    slot of weight 0 (one the sender routed to another rank's experts) or of an id outside
    [0, held) (one the model itself masks out, checked numerically) weighs 0 and points at
    an expert read anyway, as local_routing does. Such a slot adds nothing to the output
    (0 x a finite expert output, as the model computes it) and makes the kernel read no
    extra expert."""
    active = (weights != 0) & (ids >= 0) & (ids < held)
    return _point_idle(ids, active, held), torch.where(active, weights, 0)


def _point_idle(ids: torch.Tensor, active: torch.Tensor, held: int) -> torch.Tensor:
    """ids where active; elsewhere the token's own lowest active id, else the batch's,
    else 0. Static shapes, no host sync (traced into the compiled graph)."""
    candidate = torch.where(active, ids, torch.full_like(ids, held))
    own = candidate.amin(dim=-1, keepdim=True)  # [N, 1]: held where the token has none
    batch = torch.cat([candidate.reshape(-1), candidate.new_full((1,), held)]).amin()
    fallback = torch.where(batch < held, batch, torch.zeros_like(batch))
    return torch.where(active, ids, torch.where(own < held, own, fallback))


def _repoints(plan: ExpertsPlan) -> bool:
    """Whether the plan points slots of weight 0 at other experts than the model's."""
    return plan.expert_offset is not None or plan.repoint_idle


def _held(plan: ExpertsPlan) -> int:
    return _expert_count(plan.w_up)


def _local_routing(plan: ExpertsPlan, ids: torch.Tensor, weights: torch.Tensor):
    return local_routing(ids, weights, plan.expert_offset, _held(plan))


def plan_dtype(plan: ExpertsPlan) -> torch.dtype:
    """The dtype the experts compute in: the hidden states'."""
    return example_value(plan.x).dtype


def call_experts(plan: ExpertsPlan, x, ids, weights, values) -> torch.Tensor:
    """Run lynx::experts for a plan, eagerly; x [*tokens, d], ids/weights [*tokens, k]."""
    up, down, gate, b_up, b_gate, b_down = _weight_args(plan, values)
    flat_x, flat_ids = x.reshape(-1, x.shape[-1]), ids.reshape(-1, ids.shape[-1])
    flat_w = weights.reshape(flat_ids.shape)
    if plan.expert_offset is not None:
        flat_ids, flat_w = _local_routing(plan, flat_ids, flat_w)
    if plan.repoint_idle:
        flat_ids, flat_w = idle_routing(flat_ids, flat_w, _held(plan))
    if plan.scale_input:  # top-1: x * w through the expert, weight 1 after it
        flat_x, flat_w = flat_x * flat_w.to(flat_x.dtype), torch.ones_like(flat_w)
    op, args = _experts_call(plan, flat_x, flat_ids, flat_w, (up, down, gate, b_up, b_gate, b_down))
    return op(*args).reshape(x.shape)


def _experts_call(plan: ExpertsPlan, x, ids, weights, weight_args) -> tuple:
    """(op, its arguments) for a plan: lynx::experts, or lynx::experts_list for per-expert
    tensors, whose weights and biases come before the activation. weight_args is
    (up, down, gate, b_up, b_gate, b_down) as _weight_args gives them (tensors when run
    eagerly, graph nodes in _replace)."""
    up, down, gate, b_up, b_gate, b_down = weight_args
    act = (plan.activation, plan.gated)
    params = (plan.act_alpha, plan.act_limit)
    if plan.per_expert:
        args = (x, ids, weights, up, gate, down, b_up, b_gate, b_down, *act, *params)
    else:
        args = (x, ids, weights, up, gate, down, *act, b_up, b_gate, b_down, *params)
    return experts_op(plan.per_expert), args


def _routing_shape(val: torch.Tensor) -> list[int]:
    """Concrete [*tokens, k] for random routing: each token dim at least 1 (an empty batch
    still shows the computation's form)."""
    return [max(_hint(s), 1) for s in val.shape[:-1]] + [_hint(val.shape[-1])]


def _random_routing(
    weights, ids, num_experts, dense: bool, gen, first: int = 0, cover: int | None = None
) -> tuple:
    """(ids [*tokens, k], weights [*tokens, k], what the region reads as `weights`): a
    random exact routing into experts [first, first + num_experts) (distinct per token, or
    drawn with repeats where a slice holds fewer experts than k); a dense gate holds the
    weights at the ids and zeros elsewhere. With `cover` = c, the ids are slots c*M ..
    (c+1)*M - 1 (M = tokens x k) of a random cycle through every expert: draws 0 ..
    ceil(E / M) - 1 route to each expert at least once."""
    ids_val, w_val = example_value(ids), example_value(weights)
    shape = _routing_shape(ids_val)
    slots = math.prod(shape)
    if cover is not None and num_experts >= shape[-1]:
        # the same cycle in every draw (its own seed), so that the draws tile it
        cycle = torch.randperm(num_experts, generator=torch.Generator().manual_seed(0))
        chosen = cycle[(cover * slots + torch.arange(slots)) % num_experts].reshape(shape)
    elif num_experts >= shape[-1]:
        logits = torch.randn(*shape[:-1], num_experts, generator=gen)
        chosen = torch.topk(logits, shape[-1], dim=-1).indices
    else:
        chosen = torch.randint(0, num_experts, shape, generator=gen)
    chosen = (chosen + first).to(ids_val.device)
    # Not normalised: with k = 1 a normalised weight is 1, and a weight that scales the
    # expert's input could not be told from one that scales its output.
    w = (torch.rand(shape, generator=gen) * 0.9 + 0.1).to(w_val.dtype).to(w_val.device)
    if not dense:
        return chosen, w, w
    width = _hint(w_val.shape[-1])  # the gate's: every expert of the router
    gate = torch.zeros(*shape[:-1], width, dtype=w.dtype, device=w.device)
    return chosen, w, gate.scatter(-1, chosen, w)


def _random_inputs(
    inputs,
    weights,
    ids,
    num_experts,
    real: dict,
    dense: bool = False,
    first: int = 0,
    cover: int | None = None,
):
    """Random hidden states and a random exact routing into experts [first, first +
    num_experts) (`cover`: see _random_routing); real tensors for placeholders. Also returns
    the [*tokens, k] weights the experts op takes (the gate's, when dense)."""
    gen = torch.Generator().manual_seed(0 if cover is None else 1 + cover)
    chosen, w_k, w_region = _random_routing(weights, ids, num_experts, dense, gen, first, cover)
    values = {ids: chosen, weights: w_region}
    for node in inputs:
        val = example_value(node)
        if node is ids or node is weights:  # the random routing, also where they are inputs
            continue
        if node in real:
            values[node] = real[node]
        elif val is not None:
            shape = [_hint(s) for s in val.shape]
            values[node] = torch.randn(shape, generator=gen).to(val.dtype).to(val.device)
        elif isinstance(node.meta.get("example_value"), torch.SymInt):
            values[node] = _hint(node.meta["example_value"])
        else:
            return None
    return values, w_k


def _tolerance(dtype: torch.dtype) -> float:
    # Relative to the output's scale: fp32 differs only by summation order; half types by
    # rounding of intermediates (the original may round between matmuls differently).
    return {torch.float32: 1e-4, torch.float64: 1e-8}.get(dtype, 3e-2)


def _matches(expected: torch.Tensor, got: torch.Tensor, compute_dtype: torch.dtype) -> bool:
    """Max error relative to the output's scale, within the tolerance of the dtype the
    experts compute in (a bf16 block may return fp32 after an upcast). An all-zero expected
    output (a region that routed every slot elsewhere) matches nothing: it cannot tell the
    plans apart."""
    if expected.shape != got.shape or not torch.isfinite(expected).all():
        return False
    if not expected.any():
        return False
    scale = expected.abs().max().clamp_min(1e-6)
    err = (expected.float() - got.float()).abs().max() / scale
    return bool(err <= max(_tolerance(expected.dtype), _tolerance(compute_dtype)))


def _placeholder_values(gm: fx.GraphModule, example_inputs) -> dict[fx.Node, object]:
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    pairs = zip(holders, example_inputs, strict=True)
    real = {n: v for n, v in pairs if isinstance(v, torch.Tensor)}
    for node in gm.graph.nodes:  # DTensor parameters' local shards, as the graph reads them
        if local_shard(node) and hasattr(real.get(node.args[0]), "to_local"):
            real[node] = real[node.args[0]].to_local()
    return real


def rewrite_dispatch(gm: fx.GraphModule, routed, example_inputs, graph_id: int) -> bool:
    """Fuse the dispatch consuming one router's outputs (a pipeline.Routed) into
    lynx::experts; report either way."""
    route, weights, ids, router_entry = routed.route, routed.weights, routed.ids, routed.entry
    num_experts, top_k = router_entry["num_experts"], router_entry["top_k"]
    # routing the graph takes as inputs (pipeline.input_routings): reported only where fused
    inputs_routing = routed.logits is None

    def report(status, reason):
        if inputs_routing:
            if status != "rewritten":
                return
            reason += f"; {INPUT_ROUTING} (its router runs in another graph)"
        report_mod.add_site(
            kind="dispatch",
            status=status,
            reason=reason,
            num_experts=num_experts,
            top_k=top_k,
            graph=graph_id,
            router_site=router_entry["site"],
        )

    weight_nodes: frozenset[fx.Node] = frozenset()
    if inputs_routing:  # the weights as the graph receives them
        pass
    elif router_entry["weights"] == "model":  # top-k values: the model derives the weights
        found = model_weights(gm, route, weights, ids, routed.logits)
        if isinstance(found, str):
            report("skipped", found)
            return False
        weights, weight_nodes = found
    else:  # lynx's weights; what the model still does to them (a routed scaling factor, a
        # dtype cast) is the model's own and stays outside the experts
        found = model_weights(gm, route, weights, ids, routed.logits)
        if not isinstance(found, str):
            weights, weight_nodes = found
    dense = example_value(weights).shape[-1] != example_value(ids).shape[-1]
    if all(u.op == "output" for u in (*weights.users, *ids.users) if u not in weight_nodes):
        report("skipped", "routing leaves the graph: the experts run in another graph")
        return False
    hidden_dim = routed.hidden_dim if inputs_routing else router_hidden_dim(routed.logits)
    if hidden_dim is None:
        report("skipped", "the router's input (hidden size) is not visible in the graph")
        return False
    # The routing as the dispatch reads it: lynx's outputs, or (when the model gathers them
    # across ranks first) the gathered copies, whose region lies between the collectives.
    # The ids index the router's experts (negated: received, after a token exchange).
    seeds = [(weights, ids, "", num_experts)]
    gathered = gathered_routing(weights, ids)
    if gathered is not None:
        where = f"; on the routing all_gathered from {_ranks(gathered[2])}"
        seeds.append((gathered[0], gathered[1], where, num_experts))
    exchanged = exchanged_routing(weights, ids)
    if exchanged is not None:
        where = f"; on the routing exchanged (all_to_all) between {_ranks(exchanged[2])}"
        seeds.append((exchanged[0], exchanged[1], where, -num_experts))
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    # per-expert tensor-parallel linears (parallelize_module on each expert's modules) as
    # each rank's local products, their rowwise sums marked for the regions below
    biased = localize_expert_linears(
        gm, _forward_slice([ids]), dict(zip(holders, example_inputs, strict=True))
    )
    merge_stacked_views(gm)
    real = _placeholder_values(gm, example_inputs)  # what each input holds, for the checks
    why = None  # the first candidate's reason, reported when none is taken
    # the first reason for an experts region (reading 3-D weights) of another width than d
    why_elsewhere = None
    checked = 0
    for weights, ids, where, indexed in seeds:
        functionalize_accumulators(gm, [weights, ids])
        # Widest first: a loop's partial sums close regions too (one per expert), and the
        # widest region that passes the structural checks is the whole dispatch, or the
        # dispatch plus a residual or shared expert, which fails the numerical check.
        # Regions of the router's width d before those of another width (experts on a
        # projection of the hidden states: the region of width d holds the projections and
        # fails the structural checks).
        regions = list(find_regions(gm, weights, ids, route, weight_nodes, need_ids=not dense))
        regions.reverse()
        regions.sort(key=lambda r: not _same_size(example_value(r[0]).shape[-1], hidden_dim))
        for out, region, inputs in regions:
            width = example_value(out).shape[-1]
            plans = _plan_candidates(inputs, region, weights, ids, indexed, real, width)
            if not isinstance(plans, str) and top_k == 1:  # the weight may scale the input
                # (not where weight-0 slots are re-pointed at other experts and the experts
                # are biased: f(0 * x) is then the other expert's bias path, not 0)
                plans += [
                    dataclasses.replace(p, scale_input=True)
                    for p in plans
                    if not (_repoints(p) and any(b is not None for b in _biases(p)))
                ]
            if not isinstance(plans, str):
                acts = _activations_in(region)
                plans = [p for p in plans if p.activation in acts] or (
                    f"no supported activation in the dispatch (found {sorted(acts)})"
                )
            own_width = _same_size(width, hidden_dim)
            if isinstance(plans, str):
                why = why or (plans if own_width else None)
                if not own_width and why_elsewhere is None and _reads_expert_weights(inputs):
                    why_elsewhere = f"at the experts' width {_hint(width)}: {plans}"
                continue
            chosen = _verified_plan(gm, region, inputs, out, plans, weights, ids, real, dense)
            if chosen is not None:
                summed = partial_sum_groups(region)
                if summed:
                    sums = sum(1 for n in region if PARTIAL_SUM in n.meta) // 2
                    (group,) = summed
                    where += (
                        f"; the rank's shards of every expert (tensor-parallel linears), its "
                        f"partial sums all_reduced once over {_ranks(group_world(group))} "
                        f"(the model: {sums} all_reduces)"
                    )
                _replace(gm, region, out, chosen, weights, ids, dense)
                report("rewritten", chosen.describe() + where)
                return True
            why = why or (_NOT_REPRODUCED if own_width else None)
            if not own_width and why_elsewhere is None:
                why_elsewhere = f"at the experts' width {_hint(width)}: {_NOT_REPRODUCED}"
            checked += 1
            if checked == _MAX_CHECKED_REGIONS:
                break
    reasons = [r for r in (why, why_elsewhere) if r is not None]
    collectives = collections.Counter(
        str(_op_name(n) or getattr(n.target, "__name__", n.target)).split("::")[-1]
        for n in _forward_slice([routed.weights, routed.ids])
        if _is_collective(n) and _op_name(n) not in _WAITS
    )
    if not reasons and collectives:
        # e.g. a parallelize_module plan on per-expert nn.Linear modules: each expert's
        # linears convert to and from DTensors (the all_reduce of its RowwiseParallel down
        # projection inside)
        calls = ", ".join(f"{count} x {name}" for name, count in sorted(collectives.items()))
        # the plans lynx recognised and left (a rowwise linear with a bias), else a guess
        plan = (
            f"{biased} x {KEPT_BIASED}"
            if biased
            else "a tensor-parallel plan on each expert's modules?"
        )
        reasons.append(
            f"torch.distributed calls run between the routing and the experts' output "
            f"({calls}: {plan}); lynx::experts runs none, and they stay the model's: "
            "router-only rewrite"
        )
    report(
        "skipped",
        "; ".join(reasons)
        or (
            "no closed [tokens, d] expert computation consumes the routing in this graph "
            "(the experts run elsewhere: router-only rewrite)"
        ),
    )
    return False


_NOT_REPRODUCED = "no lynx::experts form reproduces the dispatch numerically"
INPUT_ROUTING = "on the routing the graph takes as inputs"


def _reads_expert_weights(inputs: list[fx.Node]) -> bool:
    """Whether a region reads two or more 3-D tensors (an experts computation's weights)."""
    return sum(1 for n in inputs if (v := example_value(n)) is not None and v.dim() == 3) >= 2


def sum_factors(world: int) -> tuple[float, ...]:
    """The factors _verified_plan puts in place of a region's partial sums over `world`
    ranks: the region must give that factor times its output at each. The group's size (at
    least 2) fails a nonlinearity or a bias after the sum; a negative one also fails a
    positively homogeneous one (relu, abs, max), which scales with any positive factor."""
    return (float(max(2, world)), -1.5)


def _verified_plan(gm, region, inputs, out, plans, weights, ids, real, dense=False):
    held = _held(plans[0])
    original = _extract(gm, region, inputs, out)
    # Each expert's partial products summed over the ranks inside the region: the fused op
    # sums the rank's experts first and the ranks once after it, which is the same only
    # where the region is linear in those sums. Checked by putting a factor c in place of
    # each sum (c ranks holding the same partial products): the region must then give c
    # times the plan's output, for c the group's size (tanh, a bias added after the sum
    # fail) and for a negative c (relu, abs, max: positively homogeneous, not linear).
    summed = partial_sum_groups(region)
    factors = sum_factors(group_world(next(iter(summed)))) if summed else ()
    scaled_regions = [(c, _extract(gm, region, inputs, out, ranks=c)) for c in factors]
    draws: dict[tuple, tuple | None] = {}

    def drawn(plan, cover=None):
        """Random inputs whose ids fall in the experts the plan reads: [offset, offset +
        held) of the router's for an expert-parallel slice, so that a slice at the wrong
        offset sees the region route every slot elsewhere (an all-zero output) and fails."""
        key = (plan.expert_offset or 0, cover)
        if key not in draws:
            draws[key] = _random_inputs(inputs, weights, ids, held, real, dense, key[0], cover)
        return draws[key]

    def reproduces(plan, scale=1.0, idle=False, beyond=False, cover=None) -> bool:
        found = drawn(plan, cover)
        if found is None:
            return False
        values, w_k = found
        if idle:
            values, w_k = _idle_slots(values, w_k, weights, ids, plan.expert_offset or 0)
        if beyond:  # every other slot's id past the plan's experts, its weight kept
            values = _slots_beyond(values, ids, held)
        scaled = dict(values)
        scaled[plan.x] = values[plan.x] * scale
        args = [scaled[n] for n in inputs]
        try:
            expected = original(*args)
            got = call_experts(plan, scaled[plan.x], values[ids], w_k, scaled)
            summed_over = [(c, region_c(*args)) for c, region_c in scaled_regions]
        except _CHECK_ERRORS as err:
            # inputs the plan cannot take (a tensor subclass the op does not handle): the
            # region stays the model's, never a failed compile
            log.debug("lynx dispatch: plan %s not checked: %s", plan.describe(), err)
            # ids past its experts the region itself cannot take: nothing to match there
            return beyond and _region_refuses(original, args)
        dtype = values[plan.x].dtype
        if not _matches(expected, got.to(expected.dtype), dtype):
            return False
        return all(_matches(y, c * got.to(y.dtype), dtype) for c, y in summed_over)

    # A clamp random hidden states may never reach: where the region clamps, every plan is
    # also checked where they reach it (a plan without the clamp, HY-V4's clamped SiLU GLU,
    # would pass at scale 1 and then differ wherever the model's activations reach it).
    clamped = any(_is_clamp(n) for n in region)
    with torch.no_grad():
        for plan in plans:
            if not reproduces(plan):
                continue
            if clamped and not all(reproduces(plan, s) for s in _CLAMP_PROBES):
                continue
            # per-expert tensors: which expert each matrix is, and what each expert
            # computes, are inferred, so every expert must be routed to and checked (one
            # random draw at a decode batch reaches a few of them)
            if plan.per_expert and not all(
                reproduces(plan, cover=c) for c in range(_cover_draws(ids, held))
            ):
                continue
            # received routing: also where senders routed slots elsewhere (weight 0, id 0),
            # which the plan points at experts read anyway, and where ids lie past the plan's
            # experts, which it drops: the model must add nothing there either (or refuse
            # such ids: it masks them, or would fail on them itself)
            received = plan.repoint_idle and not dense
            if received and not (reproduces(plan, idle=True) and reproduces(plan, beyond=True)):
                continue
            return plan
    return None


_CHECK_ERRORS = (RuntimeError, TypeError, ValueError, IndexError, NotImplementedError)


def _cover_draws(ids: fx.Node, held: int) -> int:
    """Draws of _random_routing(cover=...) that route to each of `held` experts."""
    return -(-held // math.prod(_routing_shape(example_value(ids))))


def _region_refuses(original, args) -> bool:
    """Whether the model's own region fails on these inputs."""
    try:
        original(*args)
    except _CHECK_ERRORS:
        return True
    return False


def _every_other(t: torch.Tensor) -> torch.Tensor:
    """A mask of t's shape true at every other element in row-major order, the first too."""
    return (torch.arange(t.numel(), device=t.device) % 2 == 0).reshape(t.shape)


def _slots_beyond(values: dict, ids: fx.Node, held: int) -> dict:
    """values with every other slot's id (in row-major order, the first included) moved
    `held` past its expert: outside the experts the slot's range holds."""
    i = values[ids]
    return {**values, ids: torch.where(_every_other(i), i + held, i)}


def _idle_slots(values: dict, w_k, weights: fx.Node, ids: fx.Node, first: int):
    """values and w_k with every other slot (in row-major order, the first included) of
    weight 0 and id `first`, as a sender writes a slot held by another rank."""
    w = values[weights]
    idle = _every_other(w)
    out = dict(values)
    out[weights] = torch.where(idle, torch.zeros_like(w), w)
    out[ids] = torch.where(idle, torch.full_like(values[ids], first), values[ids])
    return out, out[weights] if w_k is values[weights] else torch.where(idle, 0, w_k)


def _ranks(count) -> str:
    return "1 rank" if count == 1 else f"{count} ranks"


def _replace(gm, region, out, plan: ExpertsPlan, weights, ids, dense: bool = False) -> None:
    graph = gm.graph
    (group,) = partial_sum_groups(region) or {None}
    with graph.inserting_before(out):
        if dense:  # the gate's weights at the chosen experts: [*tokens, k]
            weights = graph.call_method("gather", (weights, -1, ids))

        if plan.per_expert:
            up, down, gate, b_up, b_gate, b_down = _list_weight_nodes(graph, plan)
        else:

            def layout(node, transposed):
                return graph.call_method("transpose", (node, 1, 2)) if transposed else node

            up = layout(plan.w_up, plan.up_transposed)
            down = layout(plan.w_down, plan.down_transposed)
            gate = None if plan.w_gate is None else layout(plan.w_gate, plan.up_transposed)
            b_up, b_gate, b_down = _biases(plan)
            if plan.interleaved:  # strided views of the model's parameters, never a copy
                gate = graph.call_function(operator.getitem, (up, _EVEN))
                up = graph.call_function(operator.getitem, (up, _ODD))
                if b_up is not None:
                    b_gate = graph.call_function(operator.getitem, (plan.b_up, _EVEN))
                    b_up = graph.call_function(operator.getitem, (plan.b_up, _ODD))
        x, flat_ids, flat_weights = plan.x, ids, weights
        leading = example_value(ids).dim() > 2  # e.g. [B, T, k]: the op takes [B*T, ...]
        if leading:
            x = graph.call_method("reshape", (plan.x, -1, example_value(plan.x).shape[-1]))
            flat_ids = graph.call_method("reshape", (ids, -1, example_value(ids).shape[-1]))
            flat_weights = graph.call_method("reshape_as", (weights, flat_ids))
        routings = []
        if plan.expert_offset is not None:  # this rank's experts: the others weigh 0
            routings.append((local_routing, plan.expert_offset, _held(plan)))
        if plan.repoint_idle:  # received routing: its weight-0 slots read no extra expert
            routings.append((idle_routing, _held(plan)))
        for fn, *args in routings:
            routed = graph.call_function(fn, (flat_ids, flat_weights, *args))
            flat_ids = graph.call_function(operator.getitem, (routed, 0))
            flat_weights = graph.call_function(operator.getitem, (routed, 1))
        if plan.scale_input:  # top-1: the expert reads x * w and its output is kept as is
            x = graph.call_function(
                operator.mul, (x, graph.call_method("to", (flat_weights, plan_dtype(plan))))
            )
            flat_weights = graph.call_function(torch.ones_like, (flat_weights,))
        weight_args = (up, down, gate, b_up, b_gate, b_down)
        fused = graph.call_function(*_experts_call(plan, x, flat_ids, flat_weights, weight_args))
        if leading:
            fused = graph.call_method("reshape_as", (fused, plan.x))
        out_val = example_value(out)
        result = fused
        if out_val is not None and out_val.dtype != example_value(plan.x).dtype:
            result = graph.call_method("to", (fused, out_val.dtype))
        if group is not None:  # the rank's experts' partial sums, summed over the ranks once
            reduced = graph.call_function(
                torch.ops._c10d_functional.all_reduce.default, (result, "sum", group)
            )
            result = graph.call_function(torch.ops._c10d_functional.wait_tensor.default, (reduced,))
            if out_val is not None:
                reduced.meta["example_value"] = out_val
    if out_val is not None:
        result.meta["example_value"] = out_val
    out.replace_all_uses_with(result)
    kept: set[fx.Node] = set()  # what a guard reads (capture's ids check on ids.long())
    for node in reversed(list(graph.nodes)):
        if node in region:
            if node.users and all(u.meta.get(GUARD) or u in kept for u in node.users):
                kept.add(node)
            else:
                graph.erase_node(node)


def _list_weight_nodes(graph: fx.Graph, plan: ExpertsPlan):
    """_list_weight_args as graph nodes: lists of the per-expert parameters (their
    transposes and an interleaved gate/up's row views where the plan reads them so), never
    a copy."""

    def layout(nodes, transposed):
        return [graph.call_method("t", (n,)) if transposed else n for n in nodes or ()]

    def rows(nodes, which):
        return [graph.call_function(operator.getitem, (n, which)) for n in nodes]

    up = layout(plan.w_up, plan.up_transposed)
    down = layout(plan.w_down, plan.down_transposed)
    gate = layout(plan.w_gate, plan.up_transposed)
    b_up, b_gate, b_down = (list(b or ()) for b in _biases(plan))
    if plan.interleaved:
        gate, up = rows(up, _EVEN_ROWS), rows(up, _ODD_ROWS)
        b_gate, b_up = rows(b_up, _EVEN_ROWS), rows(b_up, _ODD_ROWS)
    return up, down, gate, b_up, b_gate, b_down
