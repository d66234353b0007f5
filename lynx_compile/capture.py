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
from collections.abc import Callable

import torch

log = logging.getLogger("lynx_compile")

_installed = False
_CAPTURE = dict(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True)
_MISSING = object()
_active = 0  # depth of lynx-compiled calls in progress


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
        try:
            with config.patch(**_CAPTURE):
                return original_call(self, frame, cache_entry, hooks, frame_state, *args, **kwargs)
        except Exception as error:  # noqa: BLE001 (retried as stock; its own error if any)
            log.info(
                "lynx: %s failed to trace with dynamic-shape capture (%s: %s); tracing it without",
                frame.f_code.co_name,
                type(error).__name__,
                str(error).splitlines()[0] if str(error) else "",
            )
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
    if not _install_convert():
        log.warning("lynx: this torch has no ConvertFrame; expert loops are not captured")
        WrapBackendDebug.__init__ = original_init
        return False
    _installed = True
    return True
