"""lynx_compile.export: a torch.export ExportedProgram of a model with the lynx passes applied.

torch.export hands back an aten-level graph, but the lynx router pass matches the
torch-level graph Dynamo produces. So the model is captured whole with Dynamo (static
shapes, so the decode gating sees T == 1), rewritten by the same apply_lynx_passes the
backend runs, and the rewritten GraphModule is then exported. lynx::route / lynx::experts
stay custom ops in the program: torch.export.load needs `import lynx_compile` first.
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx

from lynx_compile.backend import apply_lynx_passes
from lynx_compile.config import parse_options


class ExportError(ValueError):
    """The model cannot be captured as one graph, or its rewritten graph cannot be exported."""


def describe_error(err: BaseException) -> str:
    """'Type: first line' of the innermost cause of `err` (exporters wrap the real reason,
    e.g. the op without a translation, in several generic layers)."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def capture_rewritten(model, example_inputs, options: dict | None = None) -> fx.GraphModule:
    """Capture `model(*example_inputs)` as one torch-level Dynamo graph and apply the lynx
    passes to it; the returned GraphModule takes the model's positional inputs."""
    config = parse_options(options)
    args = tuple(example_inputs)
    with torch.no_grad():
        try:
            captured = torch._dynamo.export(model, aten_graph=False, assume_static_by_default=True)(
                *args
            )
        except Exception as err:
            raise ExportError(
                "could not capture the model as a single graph for export "
                f"({describe_error(err)}); export needs a model without graph breaks "
                "(e.g. transformers experts_implementation='grouped_mm' or 'batched_mm', "
                "not 'eager')"
            ) from err
        return apply_lynx_passes(captured.graph_module, list(args), config)


def export_graph(gm: fx.GraphModule, example_inputs) -> torch.export.ExportedProgram:
    """torch.export a captured (and rewritten) GraphModule with the given inputs."""
    try:
        with torch.no_grad():
            return torch.export.export(gm, tuple(example_inputs), strict=False)
    except Exception as err:
        raise ExportError(
            f"torch.export failed on the rewritten graph: {describe_error(err)}"
        ) from err


def export(model, example_inputs, options: dict | None = None) -> torch.export.ExportedProgram:
    """A torch.export ExportedProgram of `model(*example_inputs)` with the lynx passes applied
    (routers as torch.ops.lynx.route; options as for torch.compile(backend="lynx"))."""
    args = tuple(example_inputs)
    return export_graph(capture_rewritten(model, args, options), args)
