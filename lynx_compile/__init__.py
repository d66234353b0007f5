"""lynx_compile: a torch.compile backend for batch-aware MoE routing (LYNX AffinityBinning).

model = torch.compile(model, backend="lynx")          # no import needed
model = torch.compile(model, backend="lynx", options={"policy": "exact"})
lynx_compile.report()                                 # what was rewritten, and why not
"""

from lynx_compile.backend import lynx_backend
from lynx_compile.config import LynxConfig, parse_options
from lynx_compile.lowering.reference import RoutingPolicy, route_reference
from lynx_compile.passes.report import clear_report, report

__all__ = [
    "LynxConfig",
    "RoutingPolicy",
    "clear_report",
    "lynx_backend",
    "parse_options",
    "report",
    "route_reference",
]
__version__ = "0.1.0"
