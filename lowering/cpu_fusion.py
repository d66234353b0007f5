"""The CPU lowering's one graph rewrite: a softmax router's lynx::route and the lynx::experts
call that takes its output become one lynx::route_experts_cpu call. It runs inside Inductor
(its pre-grad custom pass, which the backend sets where the native kernels run), so export,
the dump CLI and a compile_fx stand-in see the lynx passes' device-neutral ops.

At decode on CPU, a layer's routing is a few tiny kernels (the softmax, a top-k, the weights'
renormalisation and cast), each ~40-60 us with the caches cold once the layer's weights have
streamed through them (benchmarks/cpu_call_overhead.py): ~0.1 ms a layer, 4-5% of a
Qwen3-30B-A3B layer at batch 1. The fused op computes the same in the native library with
no call between them (lowering/lynx_ops.cpp).

What it takes, in a graph the lynx passes rewrote (each node's only use the next):

    w, ids = lynx::route(logits, k, policy, ...)      float32 logits, no telemetry site
    w = w * <python number>                           optional
    w = w.to(<dtype>)                                 optional
    y = lynx::experts(x, ids, w, ...)                 the native experts kernel takes x

for the exact policy, for affinity, and for any policy in a graph traced for one token
(which routes exactly: reference.static_one_token). What it leaves: oea and static
batches (traced, decompositions.py), telemetry (lynx::route_recorded), bf16 or fp16
logits, experts the native kernel does not take, per-expert weight lists, and any route
output read elsewhere. The exact policy's top-k is ATen's own loop, so ties come out as the
model's torch.topk orders them; the rest computes what route_reference and lynx::experts do.
Counted in torch._dynamo.utils.counters["lynx"]["cpu_route_experts_fused"].
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from lynx_compile.lowering import decompositions, reference
from lynx_compile.passes.fx_utils import cast_dtype, example_value
from torch._dynamo.utils import counters

_EXPERTS_ARGS = ("x", "ids", "weights", "w_up", "w_gate", "w_down", "activation", "gated",
                 "b_up", "b_gate", "b_down", "act_alpha", "act_limit")  # fmt: skip
_EXPERTS_DEFAULTS = {"b_up": None, "b_gate": None, "b_down": None, "act_alpha": None,
                     "act_limit": None}  # fmt: skip


def fuse_route_experts(graph: fx.Graph) -> int:
    """Rewrite every matching route + experts pair of a Dynamo graph in place (Inductor's
    pre-grad custom pass, set by the backend where the native kernels run); the count."""
    fused = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.lynx.experts.default:
            fused += _fuse(graph, node)
    if fused:
        graph.lint()
        if graph.owning_module is not None:
            graph.owning_module.recompile()
        counters["lynx"]["cpu_route_experts_fused"] += fused
    return fused


def _experts_args(node: fx.Node) -> dict | None:
    if len(node.args) > len(_EXPERTS_ARGS):
        return None
    positional = dict(zip(_EXPERTS_ARGS, node.args, strict=False))
    args = dict(_EXPERTS_DEFAULTS, **positional, **node.kwargs)
    return args if set(args) == set(_EXPERTS_ARGS) else None


def _only_use(node, user: fx.Node) -> bool:
    return isinstance(node, fx.Node) and list(node.users) == [user]


def _weights_chain(weights, experts: fx.Node):
    """From experts' weights back to route's getitem 0: (getitem, scale, dtype, chain nodes)."""
    scale, dtype, chain, user = 1.0, None, [], experts
    node = weights
    if (_only_use(node, user) and node.op == "call_method" and node.target == "to"
            and len(node.args) == 2 and isinstance(node.args[1], torch.dtype)
            and not node.kwargs):  # fmt: skip
        dtype, chain, user, node = node.args[1], [*chain, node], node, node.args[0]
    if (_only_use(node, user) and not node.kwargs and len(node.args) == 2
            and ((node.op == "call_function" and node.target is operator.mul)
                 or (node.op == "call_method" and node.target == "mul"))
            and type(node.args[1]) in (int, float)):  # fmt: skip
        scale, chain, user, node = float(node.args[1]), [*chain, node], node, node.args[0]
    if not (_only_use(node, user) and node.op == "call_function" and node.target is operator.getitem
            and node.args[1] == 0):  # fmt: skip
        return None
    return node, scale, dtype, chain


def _dtype(node) -> torch.dtype | None:
    """A node's dtype: its recorded value's, or a cast's target (a cast the passes inserted
    records no value)."""
    val = example_value(node)
    if val is not None:
        return val.dtype
    if isinstance(node, fx.Node) and node.op == "call_method" and node.target in ("to", "float"):
        return cast_dtype(node)
    return None


def _fuse(graph: fx.Graph, experts: fx.Node) -> int:
    args = _experts_args(experts)
    if args is None:
        return 0
    found = _weights_chain(args["weights"], experts)
    ids = args["ids"]
    if found is None or not _only_use(ids, experts) or ids.target is not operator.getitem:
        return 0
    w_item, scale, dtype, chain = found
    route = w_item.args[0]
    if not (isinstance(route, fx.Node) and route.target is torch.ops.lynx.route.default
            and ids.args == (route, 1) and set(route.users) == {w_item, ids}
            and len(route.args) == 9 and not route.kwargs):  # fmt: skip
        return 0
    logits, top_k, policy, alpha, beta, k0, _budget, rule, site = route.args
    x = example_value(args["x"])
    if x is None or x.dim() != 2 or _dtype(logits) != torch.float32 or site != -1:
        return 0
    if reference.static_one_token(x):  # x and the logits have one row per token
        policy = "exact"  # one token routes exactly, whatever the policy
    weights = [example_value(args[name]) if isinstance(args[name], fx.Node) else None
               for name in ("w_up", "w_gate", "w_down", "b_up", "b_gate", "b_down")]  # fmt: skip
    if policy not in ("exact", "affinity") or not decompositions._native_experts(
        x, args["activation"], *weights
    ):
        return 0
    fused_args = (args["x"], logits, top_k, policy, alpha, beta, k0, rule, scale, dtype,
                  args["w_up"], args["w_gate"], args["w_down"], args["activation"], args["gated"],
                  args["b_up"], args["b_gate"], args["b_down"], args["act_alpha"],
                  args["act_limit"])  # fmt: skip
    with graph.inserting_before(experts):
        fused = graph.call_function(torch.ops.lynx.route_experts_cpu.default, fused_args)
    fused.meta.update(experts.meta)
    experts.replace_all_uses_with(fused)
    for node in (experts, *chain, ids, w_item, route):
        graph.erase_node(node)
    return 1
