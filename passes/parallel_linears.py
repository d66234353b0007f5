"""Per-expert tensor-parallel nn.Linear modules written as the local computation each rank
runs, so that the dispatch pass can fuse a rank's shard of every expert.

`torch.distributed.tensor.parallel.parallelize_module` with a plan on each expert's
modules (ColwiseParallel w1 / w3, RowwiseParallel w2, examples ModuleListMoE) traces under
Dynamo, per expert projection, as

    colwise:  to_local(redistribute(linear(from_local(x, mesh, [Replicate]), W[Shard 0]),
                                    [Shard -1]))                 == linear(x, W.to_local())
    rowwise:  to_local(redistribute(linear(from_local(h, mesh, [Shard -1]), W[Shard 1]),
                                    [Replicate]))    == all_reduce(linear(h, W.to_local()))

(the colwise redistribute moves nothing: the product is already sharded on its last dim;
the rowwise one sums the ranks' partial products). `localize_expert_linears` rewrites
each such chain in an expert computation into the right-hand side: the same local
products, and the rowwise sum as a functional all_reduce marked `PARTIAL_SUM`, which is
what DTensor itself runs once the graph is lowered. The dispatch pass may then treat the
marked sums as one sum of the whole dispatch (where the dispatch is linear in each
expert's output: `dispatch.py` probes that numerically, sum_factors) and fuse the rank's
local experts; where it does not fuse, the rewritten graph computes what the model
computes.

Only chains inside an expert computation are rewritten: a colwise chain whose input is
the hidden states indexed by an integer or bool tensor the routing ids decide (the
tokens an expert reads), and a rowwise chain whose input is computed from such colwise
outputs. A rowwise linear's replicated bias, which DTensor adds once to the ranks' sum,
goes into the first rank's local product only (sum_r (h_r W_r^T + [r = 0] b) is the
model's sum_r h_r W_r^T + b, summed in another order). Anything else (attention's
projections in the same graph, a plan this file does not know, a rowwise bias that is not
replicated: KEPT_BIASED) stays as the model traced it.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from lynx_compile.passes.fx_utils import canonical_op, example_value

# meta key on a rewritten rowwise chain's all_reduce and wait_tensor: the process group
# name its partial products are summed over
PARTIAL_SUM = "lynx_partial_sum"


def _is_from_local(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") == "from_local"


def _method(node: fx.Node, name: str) -> bool:
    return node.op == "call_method" and node.target == name


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _placements(node: fx.Node):
    """The placements a from_local / redistribute call names, as a tuple."""
    found = node.kwargs.get("placements")
    if found is None and len(node.args) > (2 if _is_from_local(node) else 1):
        found = node.args[2 if _is_from_local(node) else 1]
    return tuple(found) if isinstance(found, (list, tuple)) else None


def _is_shard(placement, dim: int, ndim: int) -> bool:
    from torch.distributed.tensor import Shard

    return type(placement) is Shard and placement.dim % ndim == dim % ndim


def _is_replicate(placement) -> bool:
    from torch.distributed.tensor import Replicate

    return type(placement) is Replicate


class _Chain:
    """One traced parallel linear: from_local -> linear -> redistribute -> to_local."""

    @property
    def x(self) -> fx.Node:
        """The chain's input as the graph holds it now (a colwise chain's to_local that fed
        it may have been rewritten into its local product)."""
        return self.from_local.args[0]

    def __init__(self, to_local: fx.Node):
        self.to_local = to_local
        self.redistribute = to_local.args[0]
        self.linear = self.redistribute.args[0]
        self.from_local = self.linear.args[0]
        self.weight = self.linear.args[1] if len(self.linear.args) > 1 else None
        self.bias = self.linear.args[2] if len(self.linear.args) > 2 else None
        self.bias = self.linear.kwargs.get("bias", self.bias)


def _chain(to_local: fx.Node) -> _Chain | None:
    """The chain ending at a to_local node, where each link has that one user."""
    if not _method(to_local, "to_local") or len(to_local.args) != 1:
        return None
    red = to_local.args[0]
    if not (isinstance(red, fx.Node) and _method(red, "redistribute")) or _only_user(red) is None:
        return None
    lin = red.args[0]
    if not isinstance(lin, fx.Node) or canonical_op(lin) != "linear" or _only_user(lin) is None:
        return None
    src = lin.args[0]
    if not (isinstance(src, fx.Node) and _is_from_local(src)) or _only_user(src) is not lin:
        return None
    chain = _Chain(to_local)
    weight = chain.weight
    if not (isinstance(weight, fx.Node) and weight.op in ("placeholder", "get_attr")):
        return None
    return chain


def _kind(chain: _Chain, real: dict) -> str | None:
    """'colwise' or 'rowwise' where the chain is one of the two plans on a 1-D mesh, its
    weight a DTensor on the mesh its input is put on, its bias (if any) sharded like the
    colwise product or replicated for the rowwise sum ('rowwise+bias': the rowwise plan on a
    linear whose bias is not replicated); else None."""
    weight = real.get(chain.weight)
    mesh = chain.from_local.args[1] if len(chain.from_local.args) > 1 else None
    mesh = real.get(mesh) if isinstance(mesh, fx.Node) else mesh
    if not hasattr(weight, "placements") or mesh is None or weight.device_mesh != mesh:
        return None
    if mesh.ndim != 1 or weight.dim() != 2:
        return None
    given, wanted = _placements(chain.from_local), _placements(chain.redistribute)
    held = weight.placements
    if given is None or wanted is None or len(given) != 1 or len(wanted) != 1:
        return None
    x_ndim = example_value(chain.x).dim() if example_value(chain.x) is not None else 0
    if x_ndim < 1:
        return None
    bias = real.get(chain.bias) if chain.bias is not None else None
    placed = (  # the bias's one placement on the mesh; None where it has none there
        bias.placements[0]
        if hasattr(bias, "placements")
        and bias.dim() == 1
        and bias.device_mesh == mesh
        and len(bias.placements) == 1
        else None
    )
    if (
        _is_replicate(given[0])
        and _is_shard(held[0], 0, 2)
        and _is_shard(wanted[0], -1, x_ndim)
        and (chain.bias is None or (placed is not None and _is_shard(placed, 0, 1)))
    ):
        return "colwise"
    if _is_shard(given[0], -1, x_ndim) and _is_shard(held[0], 1, 2) and _is_replicate(wanted[0]):
        if chain.bias is None or (placed is not None and _is_replicate(placed)):
            return "rowwise"
        return "rowwise+bias"
    return None


def _strip_views(node: fx.Node) -> fx.Node:
    while canonical_op(node) == "view" and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _indexed_by(node: fx.Node, routed: set[fx.Node]) -> bool:
    """Whether node is (a view of) rows picked by an index the routing decides."""
    node = _strip_views(node)
    picks = canonical_op(node) == "getitem" or node.target in (torch.index_select, "index_select")
    if not picks:
        return False
    indices = [a for a in node.args[1:] if isinstance(a, fx.Node)] + [
        i for a in node.args[1:] if isinstance(a, (tuple, list)) for i in a
    ]
    return any(isinstance(i, fx.Node) and i in routed and _is_index_tensor(i) for i in indices)


def _is_index_tensor(node: fx.Node) -> bool:
    """Whether node is an integer or bool tensor (rows picked), not a SymInt in a slice."""
    value = example_value(node)
    return isinstance(value, torch.Tensor) and value.dtype in _INDEX_DTYPES


_INDEX_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _upstream(node: fx.Node, stop: set[fx.Node]) -> set[fx.Node]:
    """node's ancestors, not walking past the nodes in stop."""
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        for inp in todo.pop().all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                if inp not in stop:
                    todo.append(inp)
    return seen


def _local(graph: fx.Graph, param: fx.Node, real: dict) -> fx.Node:
    """param.to_local(): the rank's shard, read in place."""
    node = graph.call_method("to_local", (param,))
    fake = getattr(example_value(param), "_local_tensor", None)
    if fake is not None:
        node.meta["example_value"] = fake
    real[node] = real[param].to_local()
    return node


# why an expert's rowwise linear with a bias is left as the model traced it
KEPT_BIASED = "a RowwiseParallel linear with a bias not replicated on its mesh"


def localize_expert_linears(gm: fx.GraphModule, routed: set[fx.Node], real: dict) -> int:
    """Rewrite the colwise / rowwise chains of expert computations (module docstring) that
    read rows indexed by `routed` nodes (the forward slice of the routing ids) into local
    products and marked all_reduces; `real` maps placeholders to the values the graph was
    compiled for (DTensor parameters, the DeviceMesh) and gains the new shards. Returns
    the number of expert chains left as traced because of their bias (KEPT_BIASED)."""
    chains = [c for n in gm.graph.nodes if (c := _chain(n)) is not None]
    kinds = {c: _kind(c, real) for c in chains}
    colwise = {c.to_local for c in chains if kinds[c] == "colwise" and _indexed_by(c.x, routed)}
    rowwise, kept = [], []
    stops = {c.to_local for c in chains} | {c.from_local for c in chains}
    for c in chains:
        if kinds[c] not in ("rowwise", "rowwise+bias"):
            continue
        above = _upstream(c.x, stops) | {c.x}
        feeding = {n for n in above if n in stops and _method(n, "to_local")}
        if feeding and feeding <= colwise:  # an expert's down projection of its own products
            (rowwise if kinds[c] == "rowwise" else kept).append(c)
    chosen = [c for c in chains if c.to_local in colwise] + rowwise
    graph = gm.graph
    for c in chosen:
        value = c.to_local.meta.get("example_value")
        with graph.inserting_before(c.to_local):
            weight = _local(graph, c.weight, real)
            # a rowwise linear's replicated bias, which DTensor adds once to the ranks' sum:
            # in the first rank's partial product only
            later_rank = c in rowwise and real[c.weight].device_mesh.get_local_rank() != 0
            bias = None if c.bias is None or later_rank else _local(graph, c.bias, real)
            local = graph.call_function(torch._C._nn.linear, (c.x, weight, bias))
            result = local
            if c in rowwise:
                group = real[c.weight].device_mesh.get_group().group_name
                reduced = graph.call_function(
                    torch.ops._c10d_functional.all_reduce.default, (local, "sum", group)
                )
                result = graph.call_function(
                    torch.ops._c10d_functional.wait_tensor.default, (reduced,)
                )
                reduced.meta[PARTIAL_SUM] = result.meta[PARTIAL_SUM] = group
                if value is not None:
                    reduced.meta["example_value"] = value
            if value is not None:
                local.meta["example_value"] = result.meta["example_value"] = value
        c.to_local.replace_all_uses_with(result)
        for node in (c.to_local, c.redistribute, c.linear, c.from_local):
            graph.erase_node(node)
    return len(kept)
