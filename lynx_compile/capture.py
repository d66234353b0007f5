"""What Dynamo captures under backend="lynx": expert loops with data-dependent indexing.

MoE code written by hand loops over experts and picks each expert's tokens with
`torch.where(ids == e)`, `nonzero` or a boolean mask. Those ops have data-dependent output
shapes, so by default Dynamo breaks the graph inside the loop and skips the whole frame:
no graph reaches the backend. Frames Dynamo traces inside a lynx-compiled call are traced
with `torch._dynamo.config.capture_dynamic_output_shape_ops` on (the shapes become unbacked
symbols), so the loop is traced into one graph and the dispatch pass can fuse it; other
backends and plain eager code are not affected. `.item()` / `.tolist()` are captured too
(`capture_scalar_outputs`: the per-expert counts of the sort-and-split style). A frame
that fails to trace with these settings (some ops' shapes cannot be unbacked, e.g.
bincount's counts read with .tolist()) is traced again without them, so it compiles
exactly as it would under any other backend.

An expert loop that skips its empty experts (`if idx.numel() == 0: continue`, transformers
4.x's `if top_x.shape[0] == 0: continue`) branches on a data-dependent size, where Dynamo
breaks the graph. Inside lynx-compiled calls the branch is traced as if the expert had
tokens, where the empty path is a plain `continue` (`_continues_loop` reads the bytecode):
the rest of the iteration then runs on empty index tensors, which is a no-op when the body
only gathers, computes and scatters. Code past the skip that changes Python state the
graph cannot hold (a counter carried between iterations, a global or attribute written, a
container mutated, a break; `_changes_python_state` reads the bytecode) rules the
assumption out at once: its effect would be folded into the graph where no check on
tensors sees it. Otherwise the assumption is made, never trusted: the dispatch pass
checks the fused experts op against the traced loop on routings that leave experts empty,
and a graph in which the passes did not replace every assumed region is refused
(`check_nonempty_assumptions`); Dynamo then traces the frame again without the assumption,
so it graph-breaks there and runs the model's code as written.

A loop over the experts a batch hits (`for e in (counts > 0).nonzero():`, transformers
4.x's Mixtral / Qwen MoE blocks, DBRX's and LongCat's experts) iterates a tensor of
data-dependent length, which no tracer can unroll. Inside lynx's first trace of a frame it
is unrolled over every candidate expert instead, each row the constant `tensor([e])` the
nonzero would give (`_install_hit_loops`), where that computes what the loop does: an
expert the batch misses must run the body on no tokens, a no-op. Three checks make it so,
and any failure traces the frame again as written:
- before unrolling, hit_loops.hit_source shows the hit tensor counts exactly the experts
  with a token of some routing ids (`one_hot(ids, E)` summed over all but its class dim,
  compared `> 0`), and the loop's bytecode keeps no Python state (_hit_loop_state_reason:
  the rule of the empty-expert skip above, over the whole body);
- when the iterator runs out, hit_loops.iteration_reason shows every token selection of
  iteration e reads positions where those same ids equal e (so it is empty for an expert
  the batch misses);
- after the passes, `check_hit_rows`: no code the loop traced is left computed other than
  parameter reads (a tensor counter of the hit experts would count them all; in-place ops
  count as computed), no later node holds a size the body made, and the whole loop was
  traced (no graph break inside it). The fused op itself is checked by the dispatch pass
  on routings that leave experts empty.
Only a plain `for` over the hit tensor is unrolled (not enumerate, a comprehension or a
generator over it). A body that indexes a smaller tensor than the candidates (DBRX's
one_hot counts a class past its experts) fails to trace at the first row past it; the
frame is traced again over the rows before it, which are all the eager loop can reach
without failing itself (the limit lives for that frame's conversion only); a token routed
past them makes eager raise IndexError, so that trace asserts every routing id is below
the limit (`_assert_ids_below`), where the unrolled rows would drop it. The span check
of the empty-expert `continue` counts only code traced in the function holding the branch,
so that in a whole model the next decoder layer's attention, traced between two layers'
loops, is not taken for loop code.

transformers' "eager" experts implementation loops over the experts a batch hits, a
tensor of data-dependent length that no tracer can unroll. Inside lynx-compiled calls it
runs as transformers' own "grouped_mm" implementation of the same experts (the same
weights read in place, the same math up to summation order), which traces into one graph.

How the scope is attached: `torch.compile(backend=...)` wraps every backend other than
Inductor in a `_TorchCompileWrapper` that does not forward a `backend_ctx_ctor` attribute,
so a context hook on `lynx_backend` alone is never used. `install()` gives Dynamo's
backend wrapper (`WrapBackendDebug`, built once per `torch.compile` call) the lynx context
when the backend it wraps is lynx; Dynamo then enters it around every call of the compiled
model, as it does for any backend's `backend_ctx_ctor` (~1 us: it marks the call and swaps
the experts table). The capture settings are applied where Dynamo converts a frame
(`ConvertFrame`), which runs only when a frame is traced, not on every call.
"""

from __future__ import annotations

import logging
import re
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx

from lynx_compile import hit_loops
from lynx_compile.passes.fx_utils import GUARD

log = logging.getLogger("lynx_compile")

_installed = False
_CAPTURE = dict(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True)
_MISSING = object()
_active = 0  # depth of lynx-compiled calls in progress
_assume_nonempty = False  # while a frame is traced the first time inside a lynx call
_assumptions_made = 0  # branches traced as non-empty, ever (a retry tells by the change)
# ShapeEnv -> the unbacked size symbols a branch was traced as >= 1 for (one per trace)
_nonempty_symbols: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# ShapeEnv -> (file, first line, last line) of each function holding a branch traced as
# non-empty
_nonempty_codes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CONTINUE_OPS = ("JUMP_BACKWARD", "JUMP_BACKWARD_NO_INTERRUPT", "JUMP_ABSOLUTE")


# meta keys of the constant rows an unrolled hit loop iterates, and of every node the
# unrolled loop traced (_install_hit_loops)
HIT_ROW, HIT_BODY = "lynx_hit_row", "lynx_hit_body"
_hit_rows_made = 0  # hit loops unrolled, ever (a failed trace tells by the change)
# The hit loops unrolled while the frame under way is converted, and the rows to unroll a
# loop over, _HitLoop.key -> rows, set where a trace over every candidate
# failed indexing past a tensor's end (module docstring). Both live for one conversion.
_hit_loops: list = []
_row_limits: dict = {}
_skips: list = []  # the empty-expert skips assumed in the conversion under way (_Skip)
_HIT_RETRIES = 2  # traces of a frame with a lower hit-loop limit, before tracing it as written
_OUT_OF_BOUNDS = re.compile(r"index (\d+) is out of bounds for dimension 0 with size \d+")


class NonemptyAssumptionUnfused(RuntimeError):
    """A graph traced with an empty-expert branch taken as non-empty still holds code of
    that region after the lynx passes: the frame must be traced again without it."""


def _hf_experts_interface():
    """transformers' ExpertsInterface class and its grouped_mm forward, or None."""
    try:
        from transformers.integrations import moe
    except Exception:  # transformers absent, or a version without the experts switch
        return None
    cls = getattr(moe, "ExpertsInterface", None)
    grouped = getattr(moe, "grouped_mm_experts_forward", None)
    if grouped is None or not isinstance(getattr(cls, "_global_mapping", None), dict):
        return None
    return cls, grouped


class lynx_capture:  # noqa: N801 (used like a function: backend_ctx_ctor = lynx_capture)
    """Entered by Dynamo around each call of a lynx-compiled model: marks the call as lynx's
    (frames Dynamo traces during it get dynamic-shape capture, see _install_convert) and
    runs transformers' "eager" experts as its "grouped_mm". The swap happens on every call
    (Dynamo guards on the table it traced), so it is kept to a few dict operations."""

    def __enter__(self) -> None:
        global _active
        _active += 1
        self._mapping = None
        if "transformers.integrations.moe" in sys.modules:  # a transformers model in use
            found = _hf_experts_interface()
            if found is not None:
                cls, grouped = found
                self._mapping = cls._global_mapping
                self._eager = self._mapping.get("eager", _MISSING)
                self._mapping["eager"] = grouped

    def __exit__(self, *exc) -> None:
        global _active
        _active -= 1
        if self._mapping is not None:
            if self._eager is _MISSING:
                self._mapping.pop("eager", None)
            else:
                self._mapping["eager"] = self._eager


def _nonempty_value(sym_bool) -> bool | None:
    """A data-dependent condition's value when each unbacked size it reads is at least 1,
    where that decides it (`u0 == 0` -> False, `u0 > 0` -> True); None otherwise."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    node = getattr(sym_bool, "node", None)
    expr, shape_env = getattr(node, "expr", None), getattr(node, "shape_env", None)
    if expr is None or shape_env is None or not expr.free_symbols:
        return None
    symbols = expr.free_symbols
    if set(free_unbacked_symbols(expr)) != symbols or not symbols <= shape_env.size_like:
        return None
    at_least_one = {
        s: sympy.Symbol(f"{s}_less_1", integer=True, nonnegative=True) + 1 for s in symbols
    }
    value = expr.xreplace(at_least_one)
    return bool(value) if value in (sympy.true, sympy.false) else None


def _jump_being_traced():
    """(instruction translator, conditional jump) of the branch Dynamo is tracing: the
    frame of its jump handler up the stack (inlined calls have translators of their own)."""
    from torch._dynamo.symbolic_convert import InstructionTranslatorBase

    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return None
        tx, inst = frame.f_locals.get("self"), frame.f_locals.get("inst")
        if isinstance(tx, InstructionTranslatorBase) and "JUMP_" in getattr(inst, "opname", ""):
            return tx, inst
        frame = frame.f_back
    return None


def _continues_loop(tx, inst, value: bool) -> bool:
    """Whether the conditional jump `inst` with its condition `value` goes straight to the
    next iteration of the enclosing loop (`continue`: a backward jump, after NOPs and
    forward jumps), so that nothing of the loop body runs on that path."""
    index = tx.indexof
    jumps = ("IF_TRUE" in inst.opname) == value
    if jumps and index[inst.target] < index[inst]:
        return True  # a conditional jump back to the loop's head (Python 3.11)
    nxt = inst.target if jumps else tx.instructions[index[inst] + 1]
    for _ in range(8):
        if nxt.opname == "NOP":
            nxt = tx.instructions[index[nxt] + 1]
        elif nxt.opname == "JUMP_FORWARD":
            nxt = nxt.target
        else:
            break
    return nxt.opname in _CONTINUE_OPS


# Past an empty-expert skip, instructions whose effect lies outside the graph: a global,
# closure cell or attribute written, a name deleted, the frame left, a value yielded
_STATEFUL_OPS = frozenset(
    ("STORE_GLOBAL", "STORE_DEREF", "STORE_ATTR", "STORE_NAME", "DELETE_FAST", "DELETE_GLOBAL",
     "DELETE_DEREF", "DELETE_ATTR", "DELETE_NAME", "RETURN_VALUE", "RETURN_CONST",
     "YIELD_VALUE", "RAISE_VARARGS")
)  # fmt: skip
# methods that change a Python container in place (a list of the experts that ran)
_MUTATING_METHODS = frozenset(
    ("append", "extend", "insert", "pop", "popitem", "update", "add", "setdefault", "remove",
     "discard", "clear")
)  # fmt: skip


def _names(inst) -> tuple:
    """The local names a LOAD_FAST / STORE_FAST style instruction reads or writes."""
    value = inst.argval
    return value if isinstance(value, tuple) else (value,)


def _enclosing_loop(tx, inst) -> tuple[int, int] | None:
    """(head, last) instruction indices of the innermost loop holding instruction `inst`:
    the target of its jumps back, and the last of them."""
    index, code = tx.indexof, tx.instructions
    at = index[inst]
    backs = [
        i for i in range(at + 1, len(code))
        if "JUMP_BACKWARD" in code[i].opname or code[i].opname == "JUMP_ABSOLUTE"
    ]  # fmt: skip
    heads = [index[code[i].target] for i in backs if index[code[i].target] < at]
    if not heads:
        return None
    head = max(heads)
    return head, max(i for i in backs if index[code[i].target] == head)


def _changes_python_state(tx, inst) -> str | None:
    """Why the loop body past the conditional jump `inst` may change Python state that the
    graph cannot hold (None: it only computes tensors in the loop). Traced as non-empty, an
    empty expert's iteration runs that code too: a counter `n += 1` would count every
    expert, and its value is folded into the graph as a constant. Read from the bytecode of
    the enclosing loop, from the branch to the loop's last jump back to its head
    (_body_state_reason); what functions it calls change is watched as they are traced
    (_note_mutation)."""
    loop = _enclosing_loop(tx, inst)
    if loop is None:
        return "no enclosing loop found"
    return _body_state_reason(tx, loop[0], tx.indexof[inst] + 1, loop[1])


def _body_state_reason(tx, head: int, start: int, last: int) -> str | None:
    """Why the instructions start..last of the loop whose head is instruction `head` (and
    whose last instruction is `last`) may change Python state: a write of a global, closure
    cell or attribute, a delete, return, yield or raise, a mutating container method, a
    jump out of the loop (break), or a write of a name live at the loop's head (read in a
    later iteration before it is written, or after the loop: `n += 1`, `last = e`)."""
    code, index = tx.instructions, tx.indexof
    stored: set = set()
    for op in code[start : last + 1]:
        name = op.opname
        if name in _STATEFUL_OPS:
            return f"{name} in the loop body"
        if name in ("LOAD_METHOD", "LOAD_ATTR") and op.argval in _MUTATING_METHODS:
            return f".{op.argval}() in the loop body"
        target = getattr(op, "target", None)
        if target is not None and "JUMP" in name and not head <= index[target] <= last:
            return "a jump out of the loop (break)"
        if name.startswith("STORE_FAST"):
            stored.update(_names(op))
    carried = stored & _live_names_at(code, index, head)
    if carried:
        return f"the loop body writes {sorted(carried)}, read in a later iteration or after it"
    return None


def _install_nonempty_branches() -> bool:
    """Dynamo's data-dependent branches on a size being zero are traced as non-empty inside
    lynx's first trace of a frame, where the empty path is a `continue` (module docstring)."""
    try:
        from torch._dynamo.variables.tensor import SymNodeVariable
    except ImportError:
        return False
    original = SymNodeVariable.evaluate_expr

    def evaluate_expr(self, output_graph=None):
        global _assumptions_made
        try:
            return original(self, output_graph)
        except Exception:
            if not _assume_nonempty:
                raise
            value = _nonempty_value(self.sym_num)
            where = _jump_being_traced() if value is not None else None
            if where is None or not _continues_loop(*where, not value):
                raise
            stateful = _changes_python_state(*where)
            if stateful is not None:  # the skip stays a graph break: lynx cannot check it
                log.info("lynx: an empty-expert skip is traced as written: %s", stateful)
                raise
            node = self.sym_num.node
            _nonempty_symbols.setdefault(node.shape_env, set()).update(node.expr.free_symbols)
            tx, inst = where
            _skips.append(_Skip(tx.output.graph, tx, tx.indexof[inst], _enclosing_loop(*where)[1]))
            code = where[0].f_code  # the function holding the loop, for the span check
            lines = [line for *_, line in code.co_lines() if line is not None]
            last = max(lines, default=code.co_firstlineno)
            codes = _nonempty_codes.setdefault(node.shape_env, set())
            codes.add((code.co_filename, code.co_firstlineno, last))
            _assumptions_made += 1
            log.debug("lynx: traced %s as %s (the experts assumed non-empty)", node.expr, value)
            return value

    SymNodeVariable.evaluate_expr = evaluate_expr
    return True


@dataclass(eq=False)
class _Skip:
    """An empty-expert skip assumed not taken in the trace under way: Python objects
    mutated past it, in its loop's body or any function that calls, refuse it."""

    graph: fx.Graph
    tx: object  # the instruction translator of the function holding the loop
    branch: int  # the skip's instruction index
    last: int  # the loop's last instruction index
    refusal: str | None = None

    def active(self) -> bool:
        """Whether the translator is past the skip and still inside its loop."""
        at = getattr(self.tx, "instruction_pointer", None)
        return isinstance(at, int) and self.branch < at - 1 <= self.last


@dataclass(eq=False)
class _HitLoop:
    """A loop over the experts a batch hits, unrolled in the trace under way."""

    graph: fx.Graph  # the graph it was traced into (a restarted trace leaves stale ones)
    key: tuple  # (code, GET_ITER offset, candidates): what a row limit is for
    source: hit_loops.HitSource
    rows: dict[fx.Node, int]  # the constant rows, each with its expert
    marks: list[tuple[int, fx.Node]] = field(default_factory=list)  # (row, last node before)
    closed: bool = False  # its iterator ran out: the whole loop was traced
    refusal: str | None = None  # why its unrolling does not compute what the loop does
    symbols: frozenset = frozenset()  # unbacked symbols its body's values hold


def _get_iter_being_traced():
    """(instruction translator, GET_ITER) where Dynamo is tracing `for row in tensor:` up
    the stack; None for any other use of the tensor's rows (list(hit), enumerate(hit))."""
    from torch._dynamo.symbolic_convert import InstructionTranslatorBase

    frame = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            return None
        tx, inst = frame.f_locals.get("self"), frame.f_locals.get("inst")
        if isinstance(tx, InstructionTranslatorBase) and inst is not None:
            return (tx, inst) if getattr(inst, "opname", "") == "GET_ITER" else None
        frame = frame.f_back
    return None


_UNCONDITIONAL = ("JUMP_FORWARD", "JUMP_BACKWARD", "JUMP_BACKWARD_NO_INTERRUPT",
                  "JUMP_ABSOLUTE", "JUMP")  # fmt: skip
_EXITS = ("RETURN_VALUE", "RETURN_CONST", "RAISE_VARARGS", "RERAISE")


def _live_names_at(code: list, index: dict, at: int) -> set:
    """The local names live before instruction `at` (read on some path from it before being
    written), by backward liveness over the function's bytecode, exception edges aside."""
    uses, defs, succs = [], [], []
    for i, inst in enumerate(code):
        name = inst.opname
        read = name.startswith("LOAD_FAST") or name in ("LOAD_DEREF", "LOAD_CLOSURE")
        uses.append(set(_names(inst)) if read else set())
        defs.append(set(_names(inst)) if name.startswith("STORE_FAST") else set())
        target = getattr(inst, "target", None)
        branches = target is not None and ("JUMP" in name or name == "FOR_ITER")
        nxt = [] if name in _EXITS or name in _UNCONDITIONAL or i + 1 >= len(code) else [i + 1]
        succs.append(nxt + ([index[target]] if branches else []))
    live = [set() for _ in code]
    changed = True
    while changed:
        changed = False
        for i in range(len(code) - 1, -1, -1):
            out = set().union(*(live[j] for j in succs[i])) if succs[i] else set()
            new = uses[i] | (out - defs[i])
            if new != live[i]:
                live[i], changed = new, True
    return live[at]


def _hit_loop_state_reason(tx, get_iter) -> str | None:
    """Why a `for` over a hit tensor may change Python state that unrolled over every
    expert would be wrong (None: its body only computes tensors). Read from the bytecode:
    the loop must be a plain `for` (GET_ITER then FOR_ITER: not a comprehension or a
    generator, which hide their loop), its body may not write a global, closure cell or
    attribute, call a mutating container method, delete, return, yield, raise or break,
    and no name it writes may be live at the loop's head (a value carried to the next
    iteration, or read after the loop: `n += 1`, `last = e`)."""
    code, index = tx.instructions, tx.indexof
    head = index[get_iter] + 1
    if head >= len(code) or code[head].opname != "FOR_ITER":
        return "the hit tensor is not iterated by a plain for loop"
    return _body_state_reason(tx, head, head + 1, index[code[head].target] - 1)


def _install_hit_loops() -> bool:
    """A `for` over a hit tensor is unrolled over every candidate expert inside lynx's first
    trace of a frame, where hit_loops proves the hit tensor counts the experts with a token
    and the bytecode shows no Python state past it (module docstring); each iteration's
    nodes are recorded, and checked when the iterator runs out."""
    try:
        from torch._dynamo.variables.builder import wrap_fx_proxy_cls
        from torch._dynamo.variables.lists import ListIteratorVariable
        from torch._dynamo.variables.tensor import TensorVariable
    except ImportError:
        return False
    # the iterator's next-item method: tp_iternext_impl (torch 2.12+), next_variable before
    step = next(
        (n for n in ("tp_iternext_impl", "next_variable") if hasattr(ListIteratorVariable, n)),
        None,
    )
    if step is None:
        return False
    original_unpack = TensorVariable.unpack_var_sequence
    original_step = getattr(ListIteratorVariable, step)

    def unpack_var_sequence(self, tx, idxes=None):
        global _hit_rows_made
        node = getattr(getattr(self, "proxy", None), "node", None)
        where = _get_iter_being_traced() if _assume_nonempty and node is not None else None
        value = node.meta.get("example_value") if where is not None else None
        shape = getattr(value, "shape", (0,))
        if where is None or idxes is not None or len(shape) != 2 or isinstance(shape[0], int):
            return original_unpack(self, tx, idxes)  # not a data-dependent row count
        source = hit_loops.hit_source(node)
        reason = source if isinstance(source, str) else _hit_loop_state_reason(*where)
        if reason is not None:
            log.info("lynx: a loop over a tensor's nonzero rows is traced as written: %s", reason)
            return original_unpack(self, tx, idxes)
        # which loops a row limit is for: this code and place at this many candidates (a
        # model's layers run the same code: a limit one layer's trace found holds for all)
        key = (where[0].f_code, where[1].offset, source.candidates)
        rows = min(source.candidates, _row_limits.get(key, source.candidates))
        _hit_rows_made += 1
        log.debug("lynx: hit loop unrolled over %d of %d experts", rows, source.candidates)
        if rows < source.candidates:
            _assert_ids_below(tx, source.ids, rows)
        items, loop = [], _HitLoop(tx.output.graph, key, source, {})
        for e in range(rows):
            row = tx.output.create_proxy(
                "call_function",
                torch.tensor,
                ([e],),
                {"dtype": value.dtype, "device": value.device},
            )
            row.node.meta[HIT_ROW] = e
            loop.rows[row.node] = e
            items.append(wrap_fx_proxy_cls(target_cls=type(self), tx=tx, proxy=row))
        _hit_loops.append(loop)
        return items

    def next_item(self, tx, *args, **kwargs):
        items = getattr(self, "items", None)
        first = getattr(getattr(items[0], "proxy", None), "node", None) if items else None
        loop = next((lp for lp in _hit_loops if first in lp.rows), None)
        if loop is not None and not loop.closed:
            if self.index < len(items):
                loop.marks.append((self.index, next(iter(reversed(loop.graph.nodes)))))
            else:
                _close(loop)
        return original_step(self, tx, *args, **kwargs)

    TensorVariable.unpack_var_sequence = unpack_var_sequence
    setattr(ListIteratorVariable, step, next_item)
    return True


def _assert_ids_below(tx, ids: fx.Node, rows: int) -> None:
    """Trace `assert (ids < rows).all()` where a hit loop is unrolled over only its first
    rows (a row limit): eager raises IndexError at a row past them, which the unrolled loop
    never visits, so without it a token routed there would be dropped silently. On CPU it
    raises RuntimeError; on GPU it is a device-side assert (no host sync; like Inductor's
    own indexing asserts it is fatal to the CUDA context, where eager raises IndexError)."""
    tracer, value = tx.output.current_tracer, ids.meta.get("example_value")
    below = tx.output.create_proxy("call_function", torch.lt, (fx.Proxy(ids, tracer), rows), {})
    below.node.meta["example_value"] = value < rows
    every = tx.output.create_proxy("call_function", torch.all, (below,), {})
    every.node.meta["example_value"] = below.node.meta["example_value"].all()
    message = (
        f"lynx: a token was routed to expert {rows} or above, past the {rows} experts this "
        "loop over the hit experts can index (the model's own loop raises IndexError here); "
        "check the router's expert count against the experts' weights"
    )
    check = tx.output.create_proxy("call_function", torch._assert_async, (every, message), {})
    for node in (below.node, every.node, check.node):
        node.meta[GUARD] = True


def _install_side_effect_watch() -> bool:
    """Any Python object Dynamo records as mutated while a hit loop is being unrolled (a
    list appended to, an attribute or global set, in the loop's function or any function
    it calls) refuses that loop: the mutation would run once per candidate expert; past an
    empty-expert skip assumed not taken, it refuses the skip."""
    try:
        from torch._dynamo.side_effects import SideEffects
    except ImportError:
        return False
    names = ("mutation", "store_attr", "store_cell", "store_global")
    if not all(callable(getattr(SideEffects, name, None)) for name in names):
        return False
    for name in names:
        original = getattr(SideEffects, name)

        def watch(self, var, *args, _original=original, _name=name, **kwargs):
            if _hit_loops or _skips:
                try:
                    _note_mutation(self, var, _name)
                except Exception as error:  # noqa: BLE001 (never raise into Dynamo)
                    reason = f"lynx could not read a mutation ({error!r})"
                    _refuse(reason, reason)
            return _original(self, var, *args, **kwargs)

        setattr(SideEffects, name, watch)
    return True


def _note_mutation(side_effects, var, how: str) -> None:
    """Refuse the open hit loops and the active empty-expert skips of the graph whose side
    effects record `var` mutated (a hit loop's own iterator advancing aside). Where the
    graph cannot be read, every open loop and active skip is refused."""
    try:
        graph = side_effects.output_graph_weakref().graph
    except Exception:  # noqa: BLE001 (another torch's SideEffects: refuse, never raise)
        graph = None
    items = getattr(var, "items", None)  # an iterator's items: a hit loop's rows
    first = items[0] if isinstance(items, list) and items else None
    node = getattr(getattr(first, "proxy", None), "node", None)
    what = f"a Python object ({type(var).__name__}, {how})"
    loop_reason = f"its body mutates {what}, once per expert"
    _refuse(loop_reason, f"code past the skip mutates {what}", graph, spare=node)


def _refuse(loop_reason: str, skip_reason: str, graph=None, spare=None) -> None:
    """Refuse the open hit loops and the active skips of graph (None: of every graph),
    but a loop whose rows hold `spare` (its own iterator)."""
    for loop in _hit_loops:
        if not loop.closed and (graph is None or loop.graph is graph) and spare not in loop.rows:
            loop.refusal = loop.refusal or loop_reason
    for skip in _skips:
        if skip.refusal is None and (graph is None or skip.graph is graph) and skip.active():
            skip.refusal = skip_reason


def _close(loop: _HitLoop) -> None:
    """The whole loop was traced: mark its nodes HIT_BODY, record the unbacked symbols they
    hold, and check each iteration's token selections (hit_loops.iteration_reason)."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    loop.closed = True
    nodes = list(loop.graph.nodes)
    at = {n: i for i, n in enumerate(nodes)}
    first = min(at[r] for r in loop.rows)
    symbols: set = set()
    for node in nodes[first:]:
        node.meta[HIT_BODY] = True
        symbols.update(free_unbacked_symbols(hit_loops.traced_value(node)))
    loop.symbols = frozenset(symbols)
    written = hit_loops.mutation_reason(loop.source)
    if written is not None:
        loop.refusal = written
        return
    bounds = [at[last] + 1 for _, last in loop.marks] + [len(nodes)]
    for i, (e, _) in enumerate(loop.marks):
        iteration = nodes[bounds[i] : bounds[i + 1]]
        reason = hit_loops.iteration_reason(iteration, loop.source, e, loop.rows)
        if reason is not None:
            loop.refusal = reason
            return


def _reads_parameters_only(node: fx.Node) -> bool:
    """A view, slice or select of the model's parameters (a region input read in place),
    not an op that writes one (`self.hits.add_(1)` on a buffer)."""
    return (
        node.op in ("call_function", "call_method")
        and not hit_loops.mutates(node)
        and all(i.op in ("placeholder", "get_attr") for i in node.all_input_nodes)
    )


def _live(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes the graph's output, a side effect (an impure node) or an in-place op
    depends on."""
    roots = [n for n in gm.graph.nodes if n.op == "output" or n.is_impure() or hit_loops.mutates(n)]
    live: set[fx.Node] = set()
    while roots:
        node = roots.pop()
        if node not in live:
            live.add(node)
            roots.extend(node.all_input_nodes)
    return live


def check_hit_rows(gm: fx.GraphModule) -> None:
    """Raise NonemptyAssumptionUnfused where a hit loop unrolled into this graph may not
    compute what the loop does: it was not traced to its end (a graph break inside it),
    an iteration selects tokens by something other than its expert's ids, or code it
    traced is still computed after the passes (other than reads of parameters, and
    including any later node holding a size its body made): only the fused op is checked
    to add nothing for the experts the batch misses."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    loops = [lp for lp in _hit_loops if lp.graph is gm.graph]
    if not loops:
        if any(HIT_ROW in n.meta for n in gm.graph.nodes):  # a graph not the one traced
            raise NonemptyAssumptionUnfused(
                "a loop over the experts a batch hits was unrolled over every expert, and "
                "lynx cannot find its record for this graph; tracing it again as written"
            )
        return
    refusal = next((lp.refusal for lp in loops if lp.refusal), None)
    if not all(lp.closed for lp in loops):
        refusal = "lynx cannot see its end (a graph break inside it)"
    symbols = frozenset().union(*(lp.symbols for lp in loops))
    live = _live(gm)
    left = [
        n.name
        for n in gm.graph.nodes
        if n in live
        and n.op not in ("placeholder", "get_attr", "output")
        and (
            (n.meta.get(HIT_BODY) and not _reads_parameters_only(n))
            or set(free_unbacked_symbols(hit_loops.traced_value(n))) & symbols
        )
    ]
    if left and refusal is None:
        refusal = f"the lynx passes did not fuse all of it (left: {left[:4]})"
    if refusal is not None:
        raise NonemptyAssumptionUnfused(
            "a loop over the experts a batch hits was unrolled over every expert (the "
            f"experts assumed non-empty), and {refusal}; tracing it again as written"
        )


def _row_limit(error: BaseException) -> bool:
    """Where a trace failed indexing past a tensor's end at row i of the hit loop it was
    unrolling, unroll that loop over rows [0, i) in the next trace of this frame (module
    docstring); whether a new limit was set."""
    open_loops = [lp for lp in _hit_loops if not lp.closed]
    if len(open_loops) != 1:
        return False
    (loop,) = open_loops
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        found = _OUT_OF_BOUNDS.search(str(error)) if isinstance(error, IndexError) else None
        if found is not None:
            row = int(found.group(1))
            traced = loop.marks[-1][0] if loop.marks else None  # the row the trace was at
            if row != traced or not 0 < row < len(loop.rows):
                return False
            _row_limits[loop.key] = row
            return True
        error = getattr(error, "inner_exception", None) or error.__cause__ or error.__context__
    return False


_TRACE_LINE = re.compile(r'File "(.+)", line (\d+), in ')


def _traced_in(node: fx.Node, codes: set) -> bool:
    """Whether node was traced inside one of the codes, (file, first line, last line) of a
    function: a frame of its stack trace lies there (no stack trace: taken as inside)."""
    trace = node.meta.get("stack_trace")
    if not isinstance(trace, str):
        return True
    frames = [(m.group(1), int(m.group(2))) for m in _TRACE_LINE.finditer(trace)]
    return any(
        file == where and first <= line <= last
        for where, line in frames
        for file, first, last in codes
    )


def nonempty_snapshot(gm: fx.GraphModule) -> list[tuple[str, str, frozenset, bool]] | None:
    """Before the passes: each node's (name, op, assumed symbols its value holds, whether
    it was traced in a function holding an assumed branch) in graph order, if this graph
    was traced with empty-expert branches assumed non-empty."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    context = torch._guards.TracingContext.try_get()
    shape_env = getattr(getattr(context, "fake_mode", None), "shape_env", None)
    assumed = _nonempty_symbols.get(shape_env) if shape_env is not None else None
    if not assumed:
        return None
    codes = _nonempty_codes.get(shape_env, set())
    return [
        (
            n.name,
            n.op,
            frozenset(free_unbacked_symbols(hit_loops.traced_value(n))) & assumed,
            _traced_in(n, codes),
        )
        for n in gm.graph.nodes
    ]


def check_nonempty_assumptions(gm: fx.GraphModule, before: list) -> None:
    """Raise NonemptyAssumptionUnfused unless the passes replaced every assumed-non-empty
    region: from the first node holding an assumed size to the last node they removed,
    nothing traced in the functions holding the assumed branches may be left but
    placeholders and parameters (code of other functions in between, such as the next
    decoder layer's attention in a whole model, is not the loop's), and no node anywhere
    may hold such a size."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    assumed = frozenset().union(*(symbols for _, _, symbols, _ in before))
    left = {n.name: n for n in _live(gm)}  # dead code (an unrolled loop's unread rows) aside
    start = next((i for i, (_, _, symbols, _) in enumerate(before) if symbols), None)
    present = {n.name for n in gm.graph.nodes}
    removed = [i for i, (name, _, _, _) in enumerate(before) if name not in present]
    kept = [
        name
        for name, op, _, inside in before[start : (removed[-1] + 1 if removed else start)]
        if name in left and inside and op not in ("placeholder", "get_attr", "output")
    ]
    holding = [
        n.name
        for n in gm.graph.nodes
        if set(free_unbacked_symbols(hit_loops.traced_value(n))) & assumed
    ]
    refusal = next((s.refusal for s in _skips if s.graph is gm.graph and s.refusal), None)
    if refusal is not None:
        raise NonemptyAssumptionUnfused(
            f"an expert loop's empty experts were assumed non-empty, and {refusal}; "
            "tracing it again as written"
        )
    if start is not None and (kept or holding):
        raise NonemptyAssumptionUnfused(
            "the expert loop was traced with its empty experts' `continue` taken as not "
            f"taken, and the lynx passes did not fuse it (left: {(holding or kept)[:4]}); "
            "tracing it again as written"
        )


def _forget_trace() -> None:
    """Drop the records of the trace that ended (its hit loops and assumed skips)."""
    _hit_loops.clear()
    _skips.clear()


def _install_convert() -> bool:
    """Frames Dynamo traces inside a lynx-compiled call are traced with dynamic-shape
    capture on (only tracing reads these settings: set here, not on every call); a frame
    that fails to trace that way is traced again without it (what every other backend
    gets), so capture never makes a model fail to compile."""
    try:
        from torch._dynamo.convert_frame import ConvertFrame
    except ImportError:
        return False
    original_call = ConvertFrame.__call__

    def __call__(self, frame, cache_entry, hooks, frame_state, *args, **kwargs):
        config = torch._dynamo.config
        if not _active or all(getattr(config, key) for key in _CAPTURE):
            return original_call(self, frame, cache_entry, hooks, frame_state, *args, **kwargs)
        global _assume_nonempty
        _row_limits.clear()
        try:
            with config.patch(**_CAPTURE):
                for _ in range(_HIT_RETRIES + 1):
                    made, rows_made = _assumptions_made, _hit_rows_made
                    _forget_trace()
                    try:
                        _assume_nonempty = True
                        return original_call(
                            self, frame, cache_entry, hooks, frame_state, *args, **kwargs
                        )
                    except Exception as error:  # noqa: BLE001 (retried; its own error if any)
                        if _assumptions_made == made and _hit_rows_made == rows_made:
                            raise
                        if _row_limit(error):
                            _log_retry(frame, error, "with its hit loop over every candidate")
                            continue
                        _log_retry(frame, error, "with its empty experts assumed non-empty")
                        break
                _assume_nonempty = False
                _forget_trace()
                return original_call(self, frame, cache_entry, hooks, frame_state, *args, **kwargs)
        except Exception as error:  # noqa: BLE001 (retried as stock; its own error if any)
            _log_retry(frame, error, "with dynamic-shape capture")
            _assume_nonempty = False
            _forget_trace()
            return original_call(self, frame, cache_entry, hooks, frame_state, *args, **kwargs)
        finally:
            _assume_nonempty = False
            _forget_trace()
            _row_limits.clear()

    ConvertFrame.__call__ = __call__
    return True


def _log_retry(frame, error: BaseException, how: str) -> None:
    """Say why a frame is traced again (INFO: a retry is normal, not a failure)."""
    error = getattr(error, "inner_exception", None) or error  # Dynamo's BackendCompilerFailed
    lines = str(error).splitlines()
    log.info(
        "lynx: %s failed to trace %s (%s: %s); tracing it without",
        frame.f_code.co_name,
        how,
        type(error).__name__,
        lines[0] if lines else "",
    )


def _wraps_lynx(backend, lynx_backend: Callable) -> bool:
    """Whether a backend Dynamo received is lynx: the function itself, or torch.compile's
    wrapper around it."""
    return backend is lynx_backend or getattr(backend, "compiler_fn", None) is lynx_backend


def install(lynx_backend: Callable) -> bool:
    """Attach lynx_capture to every Dynamo backend wrapper around `lynx_backend`; whether
    it could (False on a torch whose internals differ: loops then graph-break as before)."""
    global _installed
    lynx_backend.backend_ctx_ctor = lynx_capture  # torch._dynamo.optimize(lynx_backend)
    if _installed:
        return True
    try:
        from torch._dynamo.repro.after_dynamo import WrapBackendDebug
    except ImportError:
        log.warning("lynx: this torch has no WrapBackendDebug; expert loops are not captured")
        return False
    original_init = WrapBackendDebug.__init__

    def __init__(self, unconfigured_compiler_fn, compiler_name):
        original_init(self, unconfigured_compiler_fn, compiler_name)
        if _wraps_lynx(unconfigured_compiler_fn, lynx_backend):
            self.backend_ctx_ctor = lynx_capture

    WrapBackendDebug.__init__ = __init__
    if not _install_nonempty_branches():
        log.warning("lynx: this torch has no SymNodeVariable; empty-expert skips graph-break")
    if not (_install_side_effect_watch() and _install_hit_loops()):
        log.warning("lynx: this torch's Dynamo differs; loops over the hit experts graph-break")
    if not _install_convert():
        log.warning("lynx: this torch has no ConvertFrame; expert loops are not captured")
        WrapBackendDebug.__init__ = original_init
        return False
    _installed = True
    return True
