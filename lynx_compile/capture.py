"""What Dynamo captures under backend="lynx": expert loops with data-dependent indexing.

MoE code written by hand loops over experts and picks each expert's tokens with
`torch.where(ids == e)`, `nonzero` or a boolean mask. Those ops have data-dependent output
shapes, so by default Dynamo breaks the graph inside the loop and skips the whole frame:
no graph reaches the backend. While a lynx-compiled call runs, `lynx_capture()` turns on
`torch._dynamo.config.capture_dynamic_output_shape_ops` (the shapes become unbacked
symbols), so the loop is traced into one graph and the dispatch pass can fuse it. The
setting is scoped to lynx-compiled calls; other backends and plain eager code are not
affected. `.item()` / `.tolist()` are captured too (`capture_scalar_outputs`: the per-expert
counts of the sort-and-split style). A frame that fails to trace with these settings (some
ops' shapes cannot be unbacked, e.g. bincount's counts read with .tolist()) is traced
again without them, so it compiles exactly as it would under any other backend.

transformers' "eager" experts implementation loops over the experts a batch hits, a
tensor of data-dependent length that no tracer can unroll. Inside lynx-compiled calls it
runs as transformers' own "grouped_mm" implementation of the same experts (the same
weights read in place, the same math up to summation order), which traces into one graph.

How the scope is attached: `torch.compile(backend=...)` wraps every backend other than
Inductor in a `_TorchCompileWrapper` that does not forward a `backend_ctx_ctor` attribute,
so a context hook on `lynx_backend` alone is never used. `install()` gives Dynamo's
backend wrapper (`WrapBackendDebug`, built once per `torch.compile` call) the lynx context
when the backend it wraps is lynx; Dynamo then enters it around every call of the compiled
model, as it does for any backend's `backend_ctx_ctor`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch

log = logging.getLogger("lynx_compile")

_installed = False


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


@contextlib.contextmanager
def _hf_eager_as_grouped() -> Iterator[None]:
    """transformers' "eager" experts run as its "grouped_mm" implementation (traceable)."""
    import sys

    if "transformers.integrations.moe" not in sys.modules:  # no transformers model in use
        yield
        return
    found = _hf_experts_interface()
    if found is None:
        yield
        return
    cls, grouped = found
    mapping = cls._global_mapping
    had, previous = "eager" in mapping, mapping.get("eager")
    mapping["eager"] = grouped
    try:
        yield
    finally:
        if had:
            mapping["eager"] = previous
        else:
            mapping.pop("eager", None)


_CAPTURE = dict(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True)
_active = 0  # depth of lynx-compiled calls in progress


@contextlib.contextmanager
def lynx_capture() -> Iterator[None]:
    """The Dynamo settings of a lynx-compiled call (entered by Dynamo around each call)."""
    global _active
    _active += 1
    try:
        with torch._dynamo.config.patch(**_CAPTURE), _hf_eager_as_grouped():
            yield
    finally:
        _active -= 1


def _install_retry() -> bool:
    """Frames that fail to trace under lynx's capture settings are traced again without
    them (what every other backend gets): capture never makes a model fail to compile."""
    try:
        from torch._dynamo.convert_frame import ConvertFrame
    except ImportError:
        return False
    original_call = ConvertFrame.__call__

    def __call__(self, frame, cache_entry, hooks, frame_state, *args, **kwargs):
        if not _active or not torch._dynamo.config.capture_dynamic_output_shape_ops:
            return original_call(self, frame, cache_entry, hooks, frame_state, *args, **kwargs)
        try:
            return original_call(self, frame, cache_entry, hooks, frame_state, *args, **kwargs)
        except Exception as error:  # noqa: BLE001 (retried as stock; its own error if any)
            log.info(
                "lynx: %s failed to trace with dynamic-shape capture (%s: %s); tracing it without",
                frame.f_code.co_name,
                type(error).__name__,
                str(error).splitlines()[0] if str(error) else "",
            )
            off = {key: False for key in _CAPTURE}
            with torch._dynamo.config.patch(**off):
                return original_call(self, frame, cache_entry, hooks, frame_state, *args, **kwargs)

    ConvertFrame.__call__ = __call__
    return True


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
    if not _install_retry():
        log.warning("lynx: this torch has no ConvertFrame; expert loops are not captured")
        WrapBackendDebug.__init__ = original_init
        return False
    _installed = True
    return True
