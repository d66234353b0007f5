"""When a loop over the experts a batch hits may be unrolled over every expert.

`for e in (counts > 0).nonzero():` (transformers 4.5x's Mixtral / Qwen MoE blocks, DBRX's
and LongCat's experts) runs its body for the experts with at least one token. lynx_capture
unrolls it over every candidate expert (capture._install_hit_loops), which computes the
same thing only where the body of an expert the batch misses does nothing. Two facts
about the traced graph make that so, and this module checks both on Dynamo's FX nodes:

1. The hit tensor is exactly "the experts with at least one token": `nonzero` of
   `count > 0` (or `!= 0`, `>= 1`), where `count` sums a one-hot mask of the routing ids,
   `one_hot(ids, E)`, over every dim but its class dim (permutes and casts between are
   followed). `(counts > 2).nonzero()` or a count of something else is not unrolled.
2. Each token selection the body makes in iteration e (torch.where(mask), nonzero,
   argwhere, a boolean index, masked_select) selects only positions where those same ids
   equal e: the mask is the one-hot's class e (`mask[e]`, `mask[:, e]`, select) or
   `ids == e`, through reshapes and casts, where e is the iteration's own row (the
   constant row, or an int equal to it). For an expert the batch misses every selection
   is then empty, and the gather-compute-scatter body adds nothing; what the body does
   beyond that is checked by the dispatch pass's numerical check and by
   capture.check_hit_rows (no code of the loop may be left after the passes).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

# ops that keep a tensor's values and only re-lay or re-type them
_CASTS = frozenset(
    ("contiguous", "to", "int", "long", "short", "float", "double", "half", "bfloat16",
     "bool", "type", "clone", "detach", "type_as")
)  # fmt: skip
_ID_CASTS = frozenset(("contiguous", "clone", "detach", "long", "int", "to"))
_PERMUTES = frozenset(("permute", "transpose", "swapaxes", "swapdims", "t"))
_RESHAPES = frozenset(("view", "reshape", "flatten", "squeeze", "unsqueeze", "ravel"))
_SELECTIONS = frozenset(("where", "nonzero", "argwhere", "masked_select", "getitem"))


@dataclass(frozen=True)
class HitSource:
    """What a hit tensor counts: the rows of `one_hot(ids, candidates)` with a token."""

    candidates: int  # E: the one-hot's classes, the rows the loop is unrolled over
    one_hot: fx.Node
    ids: fx.Node
    chain: tuple[fx.Node, ...]  # every node from the ids to the hit tensor


def _name(node) -> str:
    """A node's op name: a method's name, or a function's (torch.greater -> "greater")."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return ""
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", "")


def traced_value(node):
    """A node's traced value of any kind (Dynamo's graphs keep it as "example_value", fake
    propagation as "val"): tuples and SymInts too, where passes.fx_utils.example_value
    returns tensors only; None for a non-node."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def _ndim(node) -> int | None:
    value = traced_value(node)
    return value.dim() if isinstance(value, torch.Tensor) else None


def _dims(args, ndim: int) -> list[int] | None:
    """A permute's dims, given as varargs or one sequence, made non-negative."""
    dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
    if not all(isinstance(d, int) for d in dims) or len(dims) != ndim:
        return None
    return [d % ndim for d in dims]


def _class_dim(node: fx.Node) -> tuple[fx.Node, int] | None:
    """(the one_hot node, the position of its class dim in node) where node is a one-hot
    mask reached through permutes and casts only; None otherwise."""
    if _name(node) == "one_hot":
        ndim = _ndim(node)
        return (node, ndim - 1) if ndim else None
    name, args = _name(node), node.args if isinstance(node, fx.Node) else ()
    if not args or not isinstance(args[0], fx.Node):
        return None
    found = _class_dim(args[0])
    if found is None:
        return None
    one_hot, dim = found
    ndim = _ndim(args[0])
    if name in _CASTS:
        return found
    if name == "permute" and ndim is not None:
        dims = _dims(args[1:] or node.kwargs.get("dims", ()), ndim)
        return (one_hot, dims.index(dim)) if dims is not None else None
    if name in ("transpose", "swapaxes", "swapdims") and ndim is not None and len(args) == 3:
        a, b = (d % ndim if isinstance(d, int) else None for d in args[1:])
        if a is None or b is None:
            return None
        return one_hot, b if dim == a else a if dim == b else dim
    if name == "t" and ndim == 2:
        return one_hot, 1 - dim
    return None


def _constant(node, value) -> bool:
    return (
        not isinstance(node, (fx.Node, bool)) and isinstance(node, (int, float)) and node == value
    )


def hit_source(nonzero: fx.Node) -> HitSource | str:
    """What the hit tensor `nonzero` counts (fact 1 in the module docstring), or why it is
    not a count of the experts with a token (a reason for the log)."""
    if _name(nonzero) not in ("nonzero", "argwhere") or len(nonzero.args) != 1:
        return "not a nonzero() of one tensor"
    if nonzero.kwargs.get("as_tuple"):
        return "nonzero(as_tuple=True)"
    test = nonzero.args[0]
    name = _name(test)
    args = test.args if isinstance(test, fx.Node) else ()
    positive = len(args) == 2 and (
        (name in ("gt", "greater", "__gt__") and _constant(args[1], 0))
        or (name in ("ne", "not_equal", "__ne__") and _constant(args[1], 0))
        or (name in ("ge", "greater_equal", "__ge__") and _constant(args[1], 1))
    )
    if not positive and not (name == "bool" and len(args) == 1):
        return "the hit tensor is not `count > 0` of a per-expert count"
    count = args[0]
    if _name(count) != "sum" or count.kwargs.get("keepdim") or not count.args:
        return "the per-expert count is not a sum of a one-hot expert mask"
    mask = count.args[0]
    found = _class_dim(mask) if isinstance(mask, fx.Node) else None
    ndim = _ndim(mask)
    if found is None or ndim is None:
        return "the per-expert count does not sum a one-hot mask of the routing ids"
    one_hot, class_dim = found
    dims = count.args[1] if len(count.args) > 1 else count.kwargs.get("dim")
    dims = (dims,) if isinstance(dims, int) else dims
    if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
        return "the per-expert count's dims are not constant"
    if sorted(d % ndim for d in dims) != [d for d in range(ndim) if d != class_dim]:
        return "the per-expert count does not sum every dim but the experts'"
    value, ids = traced_value(one_hot), one_hot.args[0] if one_hot.args else None
    if not isinstance(value, torch.Tensor) or not isinstance(value.shape[-1], int):
        return "the one-hot mask's class count is not static"
    if not isinstance(ids, fx.Node):
        return "the one-hot mask is not of a traced tensor"
    chain = [nonzero, test, count]
    while chain[-1] is not one_hot:
        chain.append(chain[-1].args[0] if chain[-1] is not count else mask)
    source = HitSource(value.shape[-1], one_hot, ids, (*chain, ids))
    return mutation_reason(source) or source


def mutates(node: fx.Node) -> bool:
    """An in-place op (`add_`, `index_add_`, `out[i] = y`, `+=`)."""
    name = _name(node)
    inplace = name.endswith("_") and not name.startswith("_")
    return inplace or name in ("setitem", "__setitem__", "iadd", "isub", "imul", "itruediv")


_VIEWS = _CASTS | _PERMUTES | _RESHAPES | {"getitem", "select", "narrow", "expand", "as_strided"}


def mutation_reason(source: HitSource) -> str | None:
    """Why the hit tensor may not count what its nodes say: an in-place op writes one of
    them, or a view of one (`counts[3] = 0`, `hit.clamp_(...)`, `ids[ids == 3] = 4`):
    Dynamo keeps the node an op wrote, so its chain reads as the unwritten value."""
    seen, todo = set(), list(source.chain)
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            if mutates(user) and user.args and user.args[0] is node:
                return f"{user.name} writes {node.name} in place"
            if _name(user) in _VIEWS and user.args and user.args[0] is node:
                todo.append(user)
    return None


def _is_row(index, e: int, rows: dict[fx.Node, int]) -> bool:
    """Whether index is iteration e's expert: the int e, or its constant row (`row`,
    `row[0]`, `row.squeeze()`...)."""
    if not isinstance(index, fx.Node):
        return _constant(index, e)
    while index not in rows:
        name = _name(index)
        first = index.args[0] if index.args else None
        first_row = name == "getitem" and _constant(index.args[1], 0) and _ndim(first) == 1
        if not (first_row or name in _CASTS or name in _RESHAPES):
            return False
        index = first
        if not isinstance(index, fx.Node):
            return False
    return rows[index] == e


def _from_ids(node, ids: fx.Node) -> bool:
    """node is the routing ids, re-laid, or cast to an integer type (every position and
    value kept: not `.bool()` or a float cast, which can merge ids)."""
    while isinstance(node, fx.Node) and node is not ids:
        name = _name(node)
        lossless = (
            name in _ID_CASTS
            and not node.kwargs
            and (
                name != "to" or (len(node.args) == 2 and node.args[1] in (torch.int64, torch.int32))
            )
        )
        if not (lossless or name in _PERMUTES or name in _RESHAPES) or not node.args:
            return False
        node = node.args[0]
    return node is ids


def _zero_unless_e(node, source: HitSource, e: int, rows: dict[fx.Node, int]) -> bool:
    """node is zero (False) wherever the routing ids are not e (fact 2): the one-hot's
    class e, or `ids == e`, through reshapes, casts and comparisons that keep zeros."""
    for _ in range(32):
        if not isinstance(node, fx.Node):
            return False
        name, args = _name(node), node.args
        if name in ("eq", "__eq__") and len(args) == 2:
            for ids, index in (args, args[::-1]):
                if _from_ids(ids, source.ids) and _is_row(index, e, rows):
                    return True
            first = args[0]
            if not (isinstance(args[1], (int, float)) and args[1] != 0):
                return False  # x == c keeps the zeros of x only for c != 0
            node = first
        elif name in ("ne", "__ne__", "gt", "__gt__", "greater") and len(args) == 2:
            if not _constant(args[1], 0) and not (
                name in ("gt", "__gt__", "greater")
                and isinstance(args[1], (int, float))
                and args[1] > 0
            ):
                return False  # x != c keeps the zeros of x only for c == 0, x > c for c >= 0
            node = args[0]
        elif name == "getitem" and len(args) == 2:
            found = _class_dim(args[0])
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if found is None or found[0] is not source.one_hot or len(index) <= found[1]:
                return False
            full = slice(None, None, None)
            return all(i == full for i in index[: found[1]]) and _is_row(index[found[1]], e, rows)
        elif name == "select" and len(args) == 3:
            found = _class_dim(args[0])
            ndim = _ndim(args[0])
            return (
                found is not None
                and found[0] is source.one_hot
                and isinstance(args[1], int)
                and ndim is not None
                and args[1] % ndim == found[1]
                and _is_row(args[2], e, rows)
            )
        elif name in _CASTS or name in _RESHAPES or name in _PERMUTES:
            node = args[0] if args else None
        else:
            return False
    return False


def _selected_by(node: fx.Node) -> fx.Node | None | bool:
    """The mask a token selection selects by; False where node selects nothing (not a
    selection); None where it selects by something lynx cannot read."""
    name, args = _name(node), node.args
    if name not in _SELECTIONS:
        return False
    if name == "where":
        return args[0] if len(args) == 1 and not node.kwargs else False
    if name in ("nonzero", "argwhere"):
        return args[0] if args else None
    if name == "masked_select":
        return args[1] if len(args) == 2 else None
    # getitem: a boolean index selects; integer and slice indices do not
    if node.target is not operator.getitem or len(args) != 2:
        return False
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    masks = [
        i for i in index
        if isinstance(i, fx.Node) and getattr(traced_value(i), "dtype", None) == torch.bool
    ]  # fmt: skip
    if not masks:
        return False
    return masks[0] if len(masks) == 1 and len(index) == 1 else None


def iteration_reason(
    nodes: list[fx.Node], source: HitSource, e: int, rows: dict[fx.Node, int]
) -> str | None:
    """Why iteration e of an unrolled hit loop (the nodes it traced) may select tokens on
    an expert the batch misses (None: every selection is of ids == e)."""
    for node in nodes:
        mask = _selected_by(node)
        if mask is False:
            continue
        if mask is None or not _zero_unless_e(mask, source, e, rows):
            return f"{node.name} selects tokens by something other than the routing ids == {e}"
    return None
