"""lynx_compile: a torch.compile backend for batch-aware MoE routing (LYNX AffinityBinning).

model = torch.compile(model, backend="lynx")          # no import needed
model = torch.compile(model, backend="lynx", options={"policy": "exact"})
lynx_compile.report()                                 # what was rewritten, and why not
lynx_compile.export(model, example_inputs)            # torch.export program with lynx ops
lynx_compile.to_onnx(model, example_inputs, "d/model.onnx")  # lynx ops as standard ONNX
"""

from lynx_compile.backend import lynx_backend
from lynx_compile.config import LynxConfig, parse_options
from lynx_compile.export import export
from lynx_compile.lowering.reference import RoutingPolicy, route_reference
from lynx_compile.onnx_export import to_onnx
from lynx_compile.passes.report import clear_report, report

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
