"""FX helpers shared by the lynx passes: canonical op names over Dynamo's spellings.

Dynamo hands the backend torch-level graphs, where one operation has many spellings
(`torch.softmax`, `F.softmax`, `x.softmax()`, `torch._C._nn.linear`, `x /= s`, ...).
`canonical_op` folds them into one name so the pattern code reads like the math.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable

import torch
import torch.fx as fx

F = torch.nn.functional

# meta key of the nodes of an assertion lynx traced into a graph (capture's row-limit
# guard): no pass takes them into a region it replaces, so they run where they were traced
GUARD = "lynx_guard"

_FUNCTIONS: dict[object, str] = {
    torch.softmax: "softmax",
    F.softmax: "softmax",
    torch.special.softmax: "softmax",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.topk: "topk",
    torch.sum: "sum",
    operator.truediv: "div",
    operator.itruediv: "div",
    torch.div: "div",
    torch.true_divide: "div",
    F.linear: "linear",
    torch._C._nn.linear: "linear",
    operator.matmul: "matmul",
    torch.matmul: "matmul",
    torch.mm: "matmul",
    torch.reshape: "view",
    torch.flatten: "view",
    operator.getitem: "getitem",
    operator.mul: "mul",
    operator.imul: "mul",
    torch.mul: "mul",
    operator.add: "add",
    operator.iadd: "add",
    torch.add: "add",
    torch.where: "where",
    torch.gather: "gather",
    F.silu: "silu",
    F.gelu: "gelu",
    torch.relu: "relu",
    F.relu: "relu",
}

_METHODS: dict[str, str] = {
    "softmax": "softmax",
    "sigmoid": "sigmoid",
    "topk": "topk",
    "sum": "sum",
    "div": "div",
    "div_": "div",
    "true_divide": "div",
    "true_divide_": "div",
    "view": "view",
    "reshape": "view",
    "flatten": "view",
    "contiguous": "view",
    "float": "cast",
    "to": "cast",
    "type": "cast",
    "half": "cast",
    "bfloat16": "cast",
    "mul": "mul",
    "mul_": "mul",
    "add": "add",
    "add_": "add",
    "gather": "gather",
}


def canonical_op(node: fx.Node) -> str | None:
    """Canonical name of what `node` computes, or None for anything else."""
    if node.op == "call_function":
        try:
            return _FUNCTIONS.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return _METHODS.get(node.target)
    return None


def arg(node: fx.Node, index: int, name: str, default=None):
    """Argument `index` (positional) or `name` (keyword) of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def example_value(node) -> torch.Tensor | None:
    """The fake tensor Dynamo recorded for a node (None when absent or not a tensor)."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("example_value", node.meta.get("val"))
    return val if isinstance(val, torch.Tensor) else None


_ROOT = re.compile(r"^[LG]\[(['\"])[^'\"]*\1\]\.?")  # Dynamo's root: L['self'], G['model']
_INDEX = re.compile(r"\.?(?:_modules)?\[(['\"]?)([^\]'\"]+)\1\]")  # [0], ['x'], _modules['x']


def module_path(node: fx.Node) -> str | None:
    """The dotted path of the innermost module a node was traced in, relative to the
    compiled root (Dynamo's `L['self'].layers.2.moe.gate` -> `layers.2.moe.gate`; '' for
    the root itself), or None when the graph does not record it (nn_module_stack)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    path = _ROOT.sub("", path)
    return _INDEX.sub(lambda m: "." + m.group(2), path).strip(".")


def last_dim(dim, ndim: int) -> bool:
    """Whether `dim` names the last dimension of an ndim-D tensor."""
    return isinstance(dim, int) and dim in (-1, ndim - 1)


def users_of(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """All users of a set of nodes."""
    out: set[fx.Node] = set()
    for n in nodes:
        out.update(n.users)
    return out


def cast_dtype(node: fx.Node) -> torch.dtype | None:
    """Target dtype of a cast node (`x.float()`, `x.to(torch.float32)`), None if unknown."""
    simple = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16}
    if node.target in simple:
        return simple[node.target]
    for a in list(node.args[1:]) + list(node.kwargs.values()):
        if isinstance(a, torch.dtype):
            return a
    val = example_value(node)
    return None if val is None else val.dtype
