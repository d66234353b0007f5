"""lynx_compile: a torch.compile backend for batch-aware MoE routing (LYNX AffinityBinning).

model = torch.compile(model, backend="lynx")          # no import needed
model = torch.compile(model, backend="lynx", options={"policy": "exact"})
lynx_compile.report()                                 # what was rewritten, and why not
lynx_compile.export(model, example_inputs)            # torch.export program with lynx ops
lynx_compile.to_onnx(model, example_inputs, "d/model.onnx")  # lynx ops as standard ONNX
"""

import importlib.metadata
import importlib.util
from pathlib import Path

# A source checkout that was not pip-installed (the GPU image reaches no registry), or was
# installed editable before tools/ existed: map passes/, lowering/, examples/ and tools/
# into this package as pyproject's package-dir does.
if any(importlib.util.find_spec(f"lynx_compile.{name}") is None for name in ("lowering", "tools")):
    __path__.append(str(Path(__file__).resolve().parent.parent))

from lynx_compile import capture as _capture  # noqa: E402
from lynx_compile.backend import lynx_backend  # noqa: E402
from lynx_compile.config import LynxConfig, parse_options  # noqa: E402
from lynx_compile.export import export  # noqa: E402
from lynx_compile.lowering.reference import RoutingPolicy, route_reference  # noqa: E402
from lynx_compile.passes import report as _report  # noqa: E402


def report() -> dict:
    """What the lynx passes matched, rewrote and left alone since the last clear_report()
    ("sites"), and the calibrations those graphs use ("calibration": [] when none)."""
    from lynx_compile import calibration

    return {**_report.report(), "calibration": calibration.in_use()}


def clear_report() -> None:
    """Forget recorded sites, telemetry and calibrations in use (compiled graphs keep working)."""
    from lynx_compile import calibration

    _report.clear_report()
    calibration.clear_in_use()


def _register_without_entry_point() -> None:
    """Without installed metadata the `lynx` entry point is missing: register the name here
    (never both: Dynamo rejects a duplicate name)."""
    points = importlib.metadata.entry_points(group="torch_dynamo_backends")
    if not any(p.name == "lynx" for p in points):
        import torch._dynamo

        torch._dynamo.register_backend(name="lynx")(lynx_backend)


_register_without_entry_point()
_capture.install(lynx_backend)  # expert loops traced in lynx-compiled calls (capture.py)


def __getattr__(name: str):
    """`lynx_compile.to_onnx` is imported on first use: the ONNX stack is the [onnx] extra."""
    if name == "to_onnx":
        from lynx_compile.onnx_export import to_onnx

        globals()["to_onnx"] = to_onnx
        return to_onnx
    raise AttributeError(f"module 'lynx_compile' has no attribute {name!r}")


__all__ = [
    "LynxConfig",
    "RoutingPolicy",
    "clear_report",
    "export",
    "lynx_backend",
    "parse_options",
    "report",
    "route_reference",
    "to_onnx",
]
__version__ = "0.1.0"
