"""Dispatch sites: the expert computation that consumes a router's (weights, ids) in the same
graph, rewritten into lynx::experts when it is shown equivalent.

Rather than one pattern per spelling (transformers' grouped_mm and batched_mm forms, dense
all-experts einsums, gather + bmm, ...), the pass works on meaning:

1. region:    the nodes downstream of the routing outputs, up to the first node O whose
              value is [tokens, d] and that closes the region (no region node other than O
              is used outside it; the routing outputs themselves may be: a module that
              also returns its ids keeps them), grown backwards over side nodes used only
              inside it (weight transposes, repeat_interleave of the tokens, aranges);
2. inputs:    the region must read exactly: the routing weights and ids, one [tokens, d]
              hidden-states tensor, and two (gate_up, down) or three (gate, up, down) 3-D
              expert weights with leading dim E, plus sizes;
   For scored routers (lynx::route_scored returns what torch.topk returned), the routing
   weights are what the model computes from the top-k values after it (gather of unbiased
   scores, renormalisation, scaling, softmax over the k values): `model_weights` finds that
   computation, which stays the model's, and the region starts after it;
3. candidates: layouts (linear [E, out, in] or transposed), gated or not, the activation
              found in the region; each is checked numerically against the original region
              on random hidden states and random exact routings with the real weights, and
              the first that matches replaces the region. No match: the region is kept and
              the site is reported as skipped, with why.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.fx as fx
from lynx_compile.lowering.constants import ACTIVATION_NAMES
from lynx_compile.lowering.ops import experts_op
from lynx_compile.passes import report as report_mod
from lynx_compile.passes.fx_utils import canonical_op, example_value
from lynx_compile.passes.router import router_hidden_dim

_ACTIVATION_OPS = {"silu": "silu", "relu": "relu"}


@dataclass
class ExpertsPlan:
    """How to call lynx::experts in place of one dispatch region."""

    x: fx.Node
    w_up: fx.Node
    w_down: fx.Node
    w_gate: fx.Node | None
    up_transposed: bool
    down_transposed: bool
    gated: bool
    activation: str

    def describe(self) -> str:
        """Pattern name for the report."""
        gate = "split-gate" if self.w_gate is not None else ("gated" if self.gated else "plain")
        return f"sparse_experts({gate} {self.activation})"


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


# In-place accumulation into a fresh buffer (the loop styles: out.index_add_(0, tok, y))
# and its functional form.
_ACCUMULATORS = {"index_add_": "index_add", "add_": "add", "scatter_add_": "scatter_add"}
_FRESH_FUNCTIONS = {torch.zeros_like, torch.zeros, torch.empty_like, torch.full_like}
_FRESH_METHODS = {"new_zeros", "new_full"}


def _is_fresh_buffer(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _FRESH_FUNCTIONS
    return node.op == "call_method" and node.target in _FRESH_METHODS


def _accumulates_into(node: fx.Node, buffer_versions: set[fx.Node]) -> bool:
    return (
        node.op == "call_method"
        and node.target in _ACCUMULATORS
        and bool(node.args)
        and node.args[0] in buffer_versions
    )


def functionalize_accumulators(gm: fx.GraphModule, seeds: list[fx.Node]) -> int:
    """Rewrite in-place accumulation into fresh buffers, where the routing feeds it, into
    the functional form (`b = b.index_add(...)`), so the dispatch's result is one node.

    Taken only when nothing can observe the difference: the buffer is made in the graph
    (zeros_like, zeros, ...), every use of it or of an in-place result is another
    accumulation into it or a read after the last one. Inductor functionalizes mutations
    the same way, so the compiled code is unchanged. Returns the buffers rewritten."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    downstream = _forward_slice(seeds)
    rewritten = 0
    for buffer in [n for n in gm.graph.nodes if _is_fresh_buffer(n)]:
        versions, steps = {buffer}, []
        for node in sorted(_forward_slice([buffer]) | {buffer}, key=order.__getitem__):
            if _accumulates_into(node, versions):
                versions.add(node)
                steps.append(node)
        if not steps or not any(step in downstream for step in steps):
            continue
        last = order[steps[-1]]
        readers = [u for v in versions for u in v.users if u not in versions]
        other_args = [u for u in readers if any(a in versions for a in u.args[1:])]
        if any(order[u] < last for u in readers) or other_args:
            continue  # read between accumulations, or accumulated into something else
        current = buffer
        for step in steps:
            with gm.graph.inserting_before(step):
                new = gm.graph.call_method(
                    _ACCUMULATORS[step.target], (current, *step.args[1:]), dict(step.kwargs)
                )
            new.meta = dict(step.meta)
            current = new
        for reader in readers:
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
            if _shape_only(node, region):
                continue
            if node.users and all(u in region for u in node.users):
                region.add(node)
                changed = True


def _external_inputs(region: set[fx.Node], order: dict[fx.Node, int]) -> list[fx.Node]:
    ext = {i for n in region for i in n.all_input_nodes} - region
    return sorted(ext, key=order.__getitem__)


def _is_closed(region: set[fx.Node], out: fx.Node) -> bool:
    return all(u in region for n in region if n is not out for u in n.users)


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


def model_weights(
    gm: fx.GraphModule, route: fx.Node, values: fx.Node, ids: fx.Node, logits: fx.Node
) -> tuple[fx.Node, frozenset[fx.Node]] | str:
    """The routing weights a scored router's model computes after its top-k, and the nodes
    computing them: (weights node, its computation), or why none is found.

    The computation is what reads only the top-k (values, ids), the router's scores and
    per-expert constants; the weights are its float [*tokens, k] result that derives from
    scores (not from the ids alone) and that no other such result derives from.
    """
    tokens_k = example_value(ids).shape
    scores = _router_scores(route, logits)
    seeds = {n for n in (values, ids) if n is not None}
    routing: set[fx.Node] = set(seeds)
    scored: set[fx.Node] = {values} if values is not None else set()
    for node in gm.graph.nodes:  # topological order
        if node in routing or node.op in ("placeholder", "get_attr", "output"):
            continue
        inputs = node.all_input_nodes
        if not any(i in routing for i in inputs):
            continue
        if all(i in routing or i in scores or _is_constant_input(i) for i in inputs):
            routing.add(node)
            if any(i in scored or i in scores for i in inputs):
                scored.add(node)

    def is_weights(n: fx.Node) -> bool:
        val = example_value(n)
        return (
            n in scored
            and bool(n.users)
            and _is_float(n)
            and val.dim() == len(tokens_k)
            and all(map(_same_size, val.shape, tokens_k))
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


def find_region(
    gm: fx.GraphModule,
    weights: fx.Node,
    ids: fx.Node,
    route: fx.Node,
    hidden_dim,
    weight_nodes: frozenset[fx.Node] = frozenset(),
) -> tuple[fx.Node, set[fx.Node], list[fx.Node]] | None:
    """(output node, region, external inputs) of the dispatch consuming weights/ids: its
    output is the first [*tokens, hidden_dim] node (tokens: the ids' leading dims, [N] or
    e.g. [B, T]) that closes the region; None if none. `weight_nodes` (the model's own
    computation of `weights` from the top-k, see model_weights) stay outside the region."""
    ids_val = example_value(ids)
    if ids_val is None:
        return None
    tokens = ids_val.shape[:-1]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    slice_ = _forward_slice([weights, ids]) - weight_nodes
    protected = _ancestors(route) | {route, weights, ids} | weight_nodes
    for out in sorted(slice_, key=order.__getitem__):
        val = example_value(out)
        if val is None or val.dim() != len(tokens) + 1:
            continue
        if not all(map(_same_size, val.shape, (*tokens, hidden_dim))):
            continue
        region = {n for n in slice_ if order[n] <= order[out]}
        # The dispatch reads both routing outputs; they may have other users too (a module
        # that also returns its ids for an auxiliary loss): those keep reading them.
        if not (set(weights.users) & region and set(ids.users) & region):
            continue
        if not _is_closed(region, out):
            continue

        def is_hidden(node: fx.Node, shape=val.shape) -> bool:  # the experts' x: [*tokens, d]
            v = example_value(node)
            fresh = node.op == "call_function" and node.target in _LIKE_OPS  # an output buffer
            return v is not None and v.shape == shape and not fresh

        _grow_backwards(region, protected, is_hidden)
        return out, region, _external_inputs(region, order)
    return None


def _plan_candidates(
    inputs: list[fx.Node], region: set[fx.Node], weights: fx.Node, ids: fx.Node, num_experts: int
) -> list[ExpertsPlan] | str:
    """Every plausible lynx::experts call for a region's inputs, or why there is none."""
    order = {n: i for i, n in enumerate(next(iter(region)).graph.nodes)}
    tensors = [
        n
        for n in inputs
        if n not in (weights, ids) and example_value(n) is not None and not _shape_only(n, region)
    ]
    tokens = example_value(ids).shape[:-1]  # [N], or e.g. [B, T] for [B, T, k] routing

    def is_hidden(n: fx.Node) -> bool:  # [*tokens, d]: hidden states, never expert weights
        lead = example_value(n).shape[:-1]
        return len(lead) == len(tokens) and all(map(_same_size, lead, tokens))

    experts = [n for n in tensors if example_value(n).dim() == 3 and not is_hidden(n)]
    others = [n for n in tensors if n not in experts]
    if any(_hint(example_value(n).shape[0]) != num_experts for n in experts):
        return "a 3-D input of the dispatch is not indexed by expert"
    biases = [
        n
        for n in others
        if example_value(n).dim() == 2
        and not is_hidden(n)
        and _hint(example_value(n).shape[0]) == num_experts
    ]
    if biases and len(others) > 1:
        return (
            "the experts have per-expert biases (2-D inputs indexed by expert: "
            f"{', '.join(n.name for n in biases)}); lynx::experts takes bias-free experts"
        )
    if len(others) != 1 or not is_hidden(others[0]):
        return f"dispatch reads {len(others)} hidden-state tensors, expected one [tokens, d]"
    x = others[0]
    d = _hint(example_value(x).shape[-1])
    experts.sort(key=lambda n: min(order[u] for u in n.users))  # first used = first matmul
    if len(experts) not in (2, 3):
        return f"dispatch reads {len(experts)} expert weight tensors, expected 2 or 3"
    plans = []
    for activation in ACTIVATION_NAMES:
        for up_t, down_t in itertools.product((False, True), repeat=2):
            if len(experts) == 2:
                for gated in (True, False):
                    plans.append(
                        ExpertsPlan(
                            x, experts[0], experts[1], None, up_t, down_t, gated, activation
                        )
                    )
            else:
                for gate, up in ((experts[0], experts[1]), (experts[1], experts[0])):
                    plans.append(
                        ExpertsPlan(x, up, experts[2], gate, up_t, down_t, True, activation)
                    )
    return [p for p in plans if _shapes_fit(p, d)]


def _shapes_fit(plan: ExpertsPlan, d: int) -> bool:
    up = [_hint(s) for s in example_value(plan.w_up).shape[1:]]
    down = [_hint(s) for s in example_value(plan.w_down).shape[1:]]
    up_out, up_in = reversed(up) if plan.up_transposed else up
    down_out, down_in = reversed(down) if plan.down_transposed else down
    inter = up_out // 2 if plan.gated and plan.w_gate is None else up_out
    if plan.gated and plan.w_gate is None and up_out % 2:
        return False
    if plan.w_gate is not None:
        gate = [_hint(s) for s in example_value(plan.w_gate).shape[1:]]
        gate_out, gate_in = reversed(gate) if plan.up_transposed else gate
        if (gate_out, gate_in) != (up_out, up_in):
            return False
    return up_in == d and down_out == d and down_in == inter


def _activations_in(region: set[fx.Node]) -> set[str]:
    found = set()
    for node in region:
        op = canonical_op(node)
        if op in _ACTIVATION_OPS:
            found.add(op)
        elif op == "gelu":
            tanh = node.kwargs.get("approximate", "none") == "tanh"
            found.add("gelu_tanh" if tanh else "gelu")
    return found


def _extract(gm: fx.GraphModule, region: set[fx.Node], inputs: list[fx.Node], out: fx.Node):
    """The region as a standalone GraphModule taking `inputs` in order."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        env[node] = graph.placeholder(node.name)
    for node in gm.graph.nodes:
        if node in region:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[out])
    return fx.GraphModule(gm, graph)


def _weight_args(plan: ExpertsPlan, values: dict[fx.Node, object]):
    def layout(node, transposed):
        w = values[node]
        return w.transpose(1, 2) if transposed else w

    up = layout(plan.w_up, plan.up_transposed)
    down = layout(plan.w_down, plan.down_transposed)
    gate = None if plan.w_gate is None else layout(plan.w_gate, plan.up_transposed)
    return up, down, gate


def call_experts(plan: ExpertsPlan, x, ids, weights, values) -> torch.Tensor:
    """Run lynx::experts for a plan, eagerly; x [*tokens, d], ids/weights [*tokens, k]."""
    up, down, gate = _weight_args(plan, values)
    flat_x, flat_ids = x.reshape(-1, x.shape[-1]), ids.reshape(-1, ids.shape[-1])
    flat_w = weights.reshape(flat_ids.shape)
    out = experts_op()(flat_x, flat_ids, flat_w, up, gate, down, plan.activation, plan.gated)
    return out.reshape(x.shape)


def _routing_shape(val: torch.Tensor) -> list[int]:
    """Concrete [*tokens, k] for random routing: each token dim at least 1 (an empty batch
    still shows the computation's form)."""
    return [max(_hint(s), 1) for s in val.shape[:-1]] + [_hint(val.shape[-1])]


def _random_inputs(inputs, weights, ids, num_experts, real: dict):
    """Random hidden states and a random exact routing; real tensors for placeholders."""
    gen = torch.Generator().manual_seed(0)
    values = {}
    for node in inputs:
        val = example_value(node)
        if node in real:
            values[node] = real[node]
        elif node is ids:
            shape = _routing_shape(val)
            logits = torch.randn(*shape[:-1], num_experts, generator=gen)
            values[node] = torch.topk(logits, shape[-1], dim=-1).indices.to(val.device)
        elif node is weights:
            w = torch.rand(_routing_shape(val), generator=gen) + 0.1
            values[node] = (w / w.sum(-1, keepdim=True)).to(val.dtype).to(val.device)
        elif val is not None:
            shape = [_hint(s) for s in val.shape]
            values[node] = torch.randn(shape, generator=gen).to(val.dtype).to(val.device)
        elif isinstance(node.meta.get("example_value"), torch.SymInt):
            values[node] = _hint(node.meta["example_value"])
        else:
            return None
    return values


def _tolerance(dtype: torch.dtype) -> float:
    # Relative to the output's scale: fp32 differs only by summation order; half types by
    # rounding of intermediates (the original may round between matmuls differently).
    return {torch.float32: 1e-4, torch.float64: 1e-8}.get(dtype, 3e-2)


def _matches(expected: torch.Tensor, got: torch.Tensor, compute_dtype: torch.dtype) -> bool:
    """Max error relative to the output's scale, within the tolerance of the dtype the
    experts compute in (a bf16 block may return fp32 after an upcast)."""
    if expected.shape != got.shape or not torch.isfinite(expected).all():
        return False
    scale = expected.abs().max().clamp_min(1e-6)
    err = (expected.float() - got.float()).abs().max() / scale
    return bool(err <= max(_tolerance(expected.dtype), _tolerance(compute_dtype)))


def _placeholder_values(gm: fx.GraphModule, example_inputs) -> dict[fx.Node, object]:
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    pairs = zip(holders, example_inputs, strict=True)
    return {n: v for n, v in pairs if isinstance(v, torch.Tensor)}


def rewrite_dispatch(gm: fx.GraphModule, routed, example_inputs, graph_id: int) -> bool:
    """Fuse the dispatch consuming one router's outputs (a pipeline.Routed) into
    lynx::experts; report either way."""
    route, weights, ids, router_entry = routed.route, routed.weights, routed.ids, routed.entry
    num_experts, top_k = router_entry["num_experts"], router_entry["top_k"]

    def report(status, reason):
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
    if router_entry["weights"] == "model":  # top-k values: the model derives the weights
        found = model_weights(gm, route, weights, ids, routed.logits)
        if isinstance(found, str):
            report("skipped", found)
            return False
        weights, weight_nodes = found
    if all(u.op == "output" for u in (*weights.users, *ids.users) if u not in weight_nodes):
        report("skipped", "routing leaves the graph: the experts run in another graph")
        return False
    hidden_dim = router_hidden_dim(routed.logits)
    if hidden_dim is None:
        report("skipped", "the router's input (hidden size) is not visible in the graph")
        return False
    functionalize_accumulators(gm, [weights, ids])
    found = find_region(gm, weights, ids, route, hidden_dim, weight_nodes)
    if found is None:
        report(
            "skipped",
            "no closed [tokens, d] expert computation consumes the routing in this graph "
            "(the experts run elsewhere: router-only rewrite)",
        )
        return False
    out, region, inputs = found
    plans = _plan_candidates(inputs, region, weights, ids, num_experts)
    if isinstance(plans, str):
        report("skipped", plans)
        return False
    acts = _activations_in(region)
    plans = [p for p in plans if p.activation in acts]
    if not plans:
        report("skipped", f"no supported activation in the dispatch (found {sorted(acts)})")
        return False
    chosen = _verified_plan(gm, region, inputs, out, plans, weights, ids, example_inputs)
    if chosen is None:
        report("skipped", "no lynx::experts form reproduces the dispatch numerically")
        return False
    _replace(gm, region, out, chosen, weights, ids)
    report("rewritten", chosen.describe())
    return True


def _verified_plan(gm, region, inputs, out, plans, weights, ids, example_inputs):
    real = _placeholder_values(gm, example_inputs)
    num_experts = _hint(example_value(plans[0].w_up).shape[0])
    values = _random_inputs(inputs, weights, ids, num_experts, real)
    if values is None:
        return None
    original = _extract(gm, region, inputs, out)
    with torch.no_grad():
        expected = original(*[values[n] for n in inputs])
        for plan in plans:
            got = call_experts(plan, values[plan.x], values[ids], values[weights], values)
            if _matches(expected, got.to(expected.dtype), values[plan.x].dtype):
                return plan
    return None


def _replace(gm, region, out, plan: ExpertsPlan, weights, ids) -> None:
    graph = gm.graph
    with graph.inserting_before(out):

        def layout(node, transposed):
            return graph.call_method("transpose", (node, 1, 2)) if transposed else node

        up = layout(plan.w_up, plan.up_transposed)
        down = layout(plan.w_down, plan.down_transposed)
        gate = None if plan.w_gate is None else layout(plan.w_gate, plan.up_transposed)
        x, flat_ids, flat_weights = plan.x, ids, weights
        leading = example_value(ids).dim() > 2  # e.g. [B, T, k]: the op takes [B*T, ...]
        if leading:
            x = graph.call_method("reshape", (plan.x, -1, example_value(plan.x).shape[-1]))
            flat_ids = graph.call_method("reshape", (ids, -1, example_value(ids).shape[-1]))
            flat_weights = graph.call_method("reshape_as", (weights, flat_ids))
        fused = graph.call_function(
            experts_op(), (x, flat_ids, flat_weights, up, gate, down, plan.activation, plan.gated)
        )
        if leading:
            fused = graph.call_method("reshape_as", (fused, plan.x))
        out_val = example_value(out)
        result = fused
        if out_val is not None and out_val.dtype != example_value(plan.x).dtype:
            result = graph.call_method("to", (fused, out_val.dtype))
    if out_val is not None:
        result.meta["example_value"] = out_val
    out.replace_all_uses_with(result)
    for node in reversed(list(graph.nodes)):
        if node in region:
            graph.erase_node(node)
