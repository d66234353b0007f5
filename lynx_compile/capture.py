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
only gathers, computes and scatters. That is assumed, never trusted: the dispatch pass
checks the fused experts op against the traced loop on routings that leave experts empty,
and a graph in which the passes did not replace every assumed region is refused
(`check_nonempty_assumptions`); Dynamo then traces the frame again without the assumption,
so it graph-breaks there and runs the model's code as written.

A loop over the experts a batch hits (`for e in (counts > 0).nonzero():`, transformers
4.x's Mixtral / Qwen MoE blocks, DBRX's and LongCat's experts) iterates a tensor of
data-dependent length, which no tracer can unroll. Inside lynx's first trace of a frame it
is unrolled over every candidate expert instead, each row the constant `tensor([e])` the
nonzero would give (`_install_hit_loops`): an expert the batch does not hit then runs the
body on no tokens, the same no-op the empty-expert `continue` assumes, and checked the
same way (the fused op runs only the experts the ids name, so matching it on routings that
leave experts empty shows the extra iterations add nothing there; a graph in which code
the unrolled loop traced is still computed after the passes, other than reads of the
parameters, is refused, `check_hit_rows`: a counter of the hit experts would count them
all). Only a `for` over the hit tensor (or enumerate / zip of it) is unrolled, where lynx
sees the loop end. A body that indexes a smaller tensor than the candidates (DBRX's
one_hot counts a class past its experts) fails to trace at the first row past it; the
frame is traced again over the rows before it, which are all the eager loop can reach
without failing itself. The span check of the empty-expert `continue` counts only code
traced in the function holding the branch, so that in a whole model the next decoder
layer's attention, traced between two layers' loops, is not taken for loop code.

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
# ShapeEnv -> (file, first line, last line) of each function holding a branch traced as
# non-empty
_nonempty_codes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CONTINUE_OPS = ("JUMP_BACKWARD", "JUMP_BACKWARD_NO_INTERRUPT", "JUMP_ABSOLUTE")


# meta keys of the constant rows an unrolled hit loop iterates, and of every node the
# unrolled loop traced (_install_hit_loops)
HIT_ROW, HIT_BODY = "lynx_hit_row", "lynx_hit_body"
_hit_rows_made = 0  # hit loops unrolled, ever (a failed trace tells by the change)
# code object -> rows to unroll its hit loop over: set where a trace over every candidate
# failed indexing past a tensor's end (module docstring)
_hit_limits: dict = {}
_tracing_code = None  # the code object of the frame being converted, for _hit_limits
# first rows of the hit loops unrolled in the trace under way whose iterator has not run out
_open_loops: list[fx.Node] = []
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
            node = self.sym_num.node
            _nonempty_symbols.setdefault(node.shape_env, set()).update(node.expr.free_symbols)
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


def _hit_candidates(node: fx.Node) -> int | None:
    """The candidates a hit loop's tensor holds rows for: E where node is `nonzero()` (as
    rows) of a 1-D tensor of static size E (per-expert counts compared with 0)."""
    nonzero = node.target in ("nonzero", torch.nonzero, "argwhere", torch.argwhere)
    if not nonzero or node.kwargs.get("as_tuple") or len(node.args) != 1:
        return None
    source = node.args[0]
    value = source.meta.get("example_value") if isinstance(source, fx.Node) else None
    if not isinstance(value, torch.Tensor) or value.dim() != 1:
        return None
    return value.shape[0] if isinstance(value.shape[0], int) else None


def _install_hit_loops() -> bool:
    """A loop over a hit tensor (a nonzero of a per-expert count, its length data-dependent)
    is unrolled over every candidate inside lynx's first trace of a frame (docstring); every
    node the unrolled loop traced is marked HIT_BODY when its iterator runs out."""
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
        count = _hit_candidates(node) if _assume_nonempty and node is not None else None
        # only a `for` over the tensor itself (GET_ITER), whose iterator marks the loop's
        # end (next_item): not list(hit), enumerate(hit) or unpacking into names
        if count is None or idxes is not None or not _iterating_directly():
            return original_unpack(self, tx, idxes)
        value = node.meta.get("example_value")
        if isinstance(getattr(value, "shape", (0,))[0], int):  # a static length: unroll it
            return original_unpack(self, tx, idxes)
        rows = min(count, _hit_limits.get(_tracing_code, count))
        _hit_rows_made += 1
        log.debug("lynx: hit loop unrolled over %d of %d candidate experts", rows, count)
        items = []
        for e in range(rows):
            row = tx.output.create_proxy(
                "call_function",
                torch.tensor,
                ([e],),
                {"dtype": value.dtype, "device": value.device},
            )
            row.node.meta[HIT_ROW] = e
            items.append(wrap_fx_proxy_cls(target_cls=type(self), tx=tx, proxy=row))
        if items:
            _open_loops.append(items[0].proxy.node)
        return items

    def next_item(self, tx, *args, **kwargs):
        items = getattr(self, "items", None)
        first = _row_of(items[0]) if items else None
        if first in _open_loops and self.index >= len(items):
            _open_loops.remove(first)
            node = first  # the loop is over: mark what it traced, rows and body
            while node.op != "root":
                node.meta[HIT_BODY] = True
                node = node.next
        return original_step(self, tx, *args, **kwargs)

    TensorVariable.unpack_var_sequence = unpack_var_sequence
    setattr(ListIteratorVariable, step, next_item)
    return True


def _row_of(item) -> fx.Node | None:
    """The hit row an iterator's item is, or holds (enumerate's and zip's tuples)."""
    from torch._dynamo.variables.lists import BaseListVariable

    inner = item.items if isinstance(item, BaseListVariable) else ()
    for variable in (item, *inner):
        node = getattr(getattr(variable, "proxy", None), "node", None)
        if isinstance(node, fx.Node) and HIT_ROW in node.meta:
            return node
    return None


def _iterating_directly() -> bool:
    """Whether Dynamo is tracing a GET_ITER (`for row in tensor:`) up the stack."""
    from torch._dynamo.symbolic_convert import InstructionTranslatorBase

    frame = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            return False
        tx, inst = frame.f_locals.get("self"), frame.f_locals.get("inst")
        if isinstance(tx, InstructionTranslatorBase) and inst is not None:
            return getattr(inst, "opname", "") == "GET_ITER"
        frame = frame.f_back
    return False


def _reads_parameters_only(node: fx.Node) -> bool:
    """A view, slice or select of the model's parameters (a region input read in place)."""
    return node.op in ("call_function", "call_method") and all(
        i.op in ("placeholder", "get_attr") for i in node.all_input_nodes
    )


def _live(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes the graph's output or a side effect (an impure node) depends on."""
    roots = [n for n in gm.graph.nodes if n.op == "output" or n.is_impure()]
    live: set[fx.Node] = set()
    while roots:
        node = roots.pop()
        if node not in live:
            live.add(node)
            roots.extend(node.all_input_nodes)
    return live


def check_hit_rows(gm: fx.GraphModule) -> None:
    """Raise NonemptyAssumptionUnfused where code an unrolled hit loop traced (HIT_BODY) is
    still computed after the passes, other than its reads of parameters: its iterations
    over experts the batch does not hit would run it (a counter of the hit experts would
    count them all), where only the fused op is checked to add nothing for them."""
    if _open_loops:  # unrolled where its end is not seen (the rows copied into a list)
        raise NonemptyAssumptionUnfused(
            "a loop over the experts a batch hits was unrolled where lynx cannot see its "
            "end; tracing it again as written"
        )
    live = _live(gm)
    left = [
        n.name
        for n in gm.graph.nodes
        if n in live
        and n.meta.get(HIT_BODY)
        and n.op not in ("placeholder", "get_attr", "output")
        and not _reads_parameters_only(n)
    ]
    if left:
        raise NonemptyAssumptionUnfused(
            "the loop over the experts a batch hits was unrolled over every expert, and the "
            f"lynx passes did not fuse all of it (left: {left[:4]}); tracing it again as "
            "written"
        )


def _hit_limit(error: BaseException, code, made: int) -> bool:
    """Where a trace that unrolled a hit loop failed indexing past a tensor's end at row i,
    unroll that frame's hit loop over rows [0, i) next time; whether a new limit was set."""
    if _hit_rows_made == made:
        return False
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        found = _OUT_OF_BOUNDS.search(str(error)) if isinstance(error, IndexError) else None
        if found is not None:
            row = int(found.group(1))
            if not 0 < row < _hit_limits.get(code, row + 1):
                return False
            _hit_limits[code] = row
            return True
        error = getattr(error, "inner_exception", None) or error.__cause__ or error.__context__
    return False


def _value(node: fx.Node):
    """A node's traced value of any kind (Dynamo's graphs keep it as "example_value"):
    tuples and SymInts too, where passes.fx_utils.example_value returns tensors only."""
    return node.meta.get("val", node.meta.get("example_value"))


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
            frozenset(free_unbacked_symbols(_value(n))) & assumed,
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
        global _assume_nonempty, _tracing_code
        try:
            with config.patch(**_CAPTURE):
                for _ in range(_HIT_RETRIES + 1):
                    made, rows_made = _assumptions_made, _hit_rows_made
                    _open_loops.clear()
                    try:
                        _assume_nonempty, _tracing_code = True, frame.f_code
                        return original_call(
                            self, frame, cache_entry, hooks, frame_state, *args, **kwargs
                        )
                    except Exception as error:  # noqa: BLE001 (retried; its own error if any)
                        if _assumptions_made == made and _hit_rows_made == rows_made:
                            raise
                        if _hit_limit(error, frame.f_code, rows_made):
                            _log_retry(frame, error, "with its hit loop over every candidate")
                            continue
                        _log_retry(frame, error, "with its empty experts assumed non-empty")
                        break
                _assume_nonempty = False
                return original_call(self, frame, cache_entry, hooks, frame_state, *args, **kwargs)
        except Exception as error:  # noqa: BLE001 (retried as stock; its own error if any)
            _log_retry(frame, error, "with dynamic-shape capture")
            return original_call(self, frame, cache_entry, hooks, frame_state, *args, **kwargs)
        finally:
            _assume_nonempty, _tracing_code = False, None
            _open_loops.clear()

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
    if not _install_hit_loops():
        log.warning("lynx: this torch has no TensorVariable; loops over hit experts graph-break")
    if not _install_convert():
        log.warning("lynx: this torch has no ConvertFrame; expert loops are not captured")
        WrapBackendDebug.__init__ = original_init
        return False
    _installed = True
    return True
