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
import sys
import weakref
from collections.abc import Callable

import sympy
import torch
import torch.fx as fx

log = logging.getLogger("lynx_compile")

_installed = False
_CAPTURE = dict(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True)
_MISSING = object()
_active = 0  # depth of lynx-compiled calls in progress
_assume_nonempty = False  # while a frame is traced the first time inside a lynx call
_assumptions_made = 0  # branches traced as non-empty, ever (a retry tells by the change)
# ShapeEnv -> the unbacked size symbols a branch was traced as >= 1 for (one per trace)
_nonempty_symbols: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CONTINUE_OPS = ("JUMP_BACKWARD", "JUMP_BACKWARD_NO_INTERRUPT", "JUMP_ABSOLUTE")


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


def _changes_python_state(tx, inst) -> str | None:
    """Why the loop body past the conditional jump `inst` may change Python state that the
    graph cannot hold (None: it only computes tensors in the loop). Traced as non-empty, an
    empty expert's iteration runs that code too: a counter `n += 1` would count every
    expert, and its value is folded into the graph as a constant. Read from the bytecode of
    the enclosing loop: from the branch to the loop's last jump back to its head, no write
    of a name the body read before (a value carried from one iteration to the next), of a
    global, closure cell or attribute, no container method that mutates, no jump out of the
    loop (break) and no return."""
    index, code = tx.indexof, tx.instructions
    at = index[inst]
    backs = [
        i for i in range(at + 1, len(code))
        if "JUMP_BACKWARD" in code[i].opname or code[i].opname == "JUMP_ABSOLUTE"
    ]  # fmt: skip
    heads = [index[code[i].target] for i in backs if index[code[i].target] < at]
    if not heads:
        return "no enclosing loop found"
    head = max(heads)  # the innermost loop holding the branch
    end = max(i for i in backs if index[code[i].target] == head)
    read: set = set()
    for i in range(head + 1, end + 1):
        op = code[i]
        name = op.opname
        if name.startswith("LOAD_FAST") or name == "LOAD_DEREF":
            read.update(_names(op))
        if i <= at:
            continue
        if name in _STATEFUL_OPS:
            return f"{name} in the loop body"
        if name.startswith("STORE_FAST") and read.intersection(_names(op)):
            return f"the loop carries {sorted(read.intersection(_names(op)))} between iterations"
        if name in ("LOAD_METHOD", "LOAD_ATTR") and op.argval in _MUTATING_METHODS:
            return f".{op.argval}() in the loop body"
        target = getattr(op, "target", None)
        if target is not None and "JUMP" in name and not head <= index[target] <= end:
            return "a jump out of the loop (break)"
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
            _assumptions_made += 1
            log.debug("lynx: traced %s as %s (the experts assumed non-empty)", node.expr, value)
            return value

    SymNodeVariable.evaluate_expr = evaluate_expr
    return True


def _value(node: fx.Node):
    """A node's traced value of any kind (Dynamo's graphs keep it as "example_value"):
    tuples and SymInts too, where passes.fx_utils.example_value returns tensors only."""
    return node.meta.get("val", node.meta.get("example_value"))


def nonempty_snapshot(gm: fx.GraphModule) -> list[tuple[str, str, frozenset]] | None:
    """Before the passes: each node's (name, op, assumed symbols its value holds) in graph
    order, if this graph was traced with empty-expert branches assumed non-empty."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    context = torch._guards.TracingContext.try_get()
    shape_env = getattr(getattr(context, "fake_mode", None), "shape_env", None)
    assumed = _nonempty_symbols.get(shape_env) if shape_env is not None else None
    if not assumed:
        return None
    return [
        (n.name, n.op, frozenset(free_unbacked_symbols(_value(n))) & assumed)
        for n in gm.graph.nodes
    ]


def check_nonempty_assumptions(gm: fx.GraphModule, before: list) -> None:
    """Raise NonemptyAssumptionUnfused unless the passes replaced every assumed-non-empty
    region: from the first node holding an assumed size to the last node they removed,
    nothing but placeholders and parameters may be left, and no node holding such a size."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    assumed = frozenset().union(*(symbols for _, _, symbols in before))
    left = {n.name: n for n in gm.graph.nodes}
    start = next((i for i, (_, _, symbols) in enumerate(before) if symbols), None)
    removed = [i for i, (name, _, _) in enumerate(before) if name not in left]
    kept = [
        name
        for name, op, _ in before[start : (removed[-1] + 1 if removed else start)]
        if name in left and op not in ("placeholder", "get_attr", "output")
    ]
    holding = [n.name for n in gm.graph.nodes if set(free_unbacked_symbols(_value(n))) & assumed]
    if start is not None and (kept or holding):
        raise NonemptyAssumptionUnfused(
            "the expert loop was traced with its empty experts' `continue` taken as not "
            f"taken, and the lynx passes did not fuse it (left: {(holding or kept)[:4]}); "
            "tracing it again as written"
        )


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
        made = _assumptions_made
        try:
            with config.patch(**_CAPTURE):
                try:
                    _assume_nonempty = True
                    return original_call(
                        self, frame, cache_entry, hooks, frame_state, *args, **kwargs
                    )
                except Exception as error:  # noqa: BLE001 (retried; its own error if any)
                    if _assumptions_made == made:
                        raise
                    _log_retry(frame, error, "with its empty experts assumed non-empty")
                _assume_nonempty = False
                return original_call(self, frame, cache_entry, hooks, frame_state, *args, **kwargs)
        except Exception as error:  # noqa: BLE001 (retried as stock; its own error if any)
            _log_retry(frame, error, "with dynamic-shape capture")
            return original_call(self, frame, cache_entry, hooks, frame_state, *args, **kwargs)
        finally:
            _assume_nonempty = False

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
    if not _install_convert():
        log.warning("lynx: this torch has no ConvertFrame; expert loops are not captured")
        WrapBackendDebug.__init__ = original_init
        return False
    _installed = True
    return True
