"""The `lynx` torch.compile backend: rewrite MoE routers (and dispatch), then Inductor.

Resolved by name through the `torch_dynamo_backends` entry point, so
`torch.compile(model, backend="lynx")` works without importing lynx_compile. This
module therefore must not register the name itself (Dynamo would see a duplicate).
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

import lynx_compile.lowering as lowering_pkg
import lynx_compile.passes as passes_pkg
from lynx_compile import calibration, capture, graph_dump
from lynx_compile.config import LynxConfig, parse_options
from lynx_compile.lowering import (  # noqa: F401  (the ops, their kernels and lowerings)
    cpu_native,
    decompositions,
    ops,
    triton_ops,
)
from lynx_compile.passes import report as report_mod
from lynx_compile.passes.pipeline import run_passes

log = logging.getLogger("lynx_compile")

# Seconds spent in the lynx passes (not Inductor), summed over graphs; read by `bench`.
pass_seconds: list[float] = []


def apply_lynx_passes(gm: fx.GraphModule, example_inputs, config: LynxConfig) -> fx.GraphModule:
    """Run the lynx passes (passes/pipeline.py) over one Dynamo graph in place."""
    start = time.perf_counter()
    graph_id = report_mod.new_graph_id()
    dump_dir = graph_dump.active_dump_dir()
    before = gm.print_readable(print_output=False) if dump_dir else None
    assumed = capture.nonempty_snapshot(gm)
    run_passes(gm, example_inputs, config, graph_id)
    try:
        if assumed is not None:
            capture.check_nonempty_assumptions(gm, assumed)
        capture.check_hit_rows(gm)
    except capture.NonemptyAssumptionUnfused:
        report_mod.discard_graph(graph_id)  # the frame is traced again
        raise
    if config.calibration is not None:  # the file must describe this model's routers
        sites = [s for s in report_mod.report()["sites"] if s.get("graph") == graph_id]
        calibration.check_sites(config.calibration, sites)
        calibration.record_use(config.calibration, config.calibration_batch)
    pass_seconds.append(time.perf_counter() - start)
    if dump_dir:
        graph_dump.write_graph_dump(dump_dir, graph_id, before, gm)
    return gm


class LynxCacheSalt(CustomGraphPass):
    """A no-op post-grad pass whose uuid hashes the lynx sources and options: Inductor's FX
    graph cache keys on it, so a cached graph never outlives a change to the lynx ops'
    lowerings (decompositions, kernels) or to the options it was compiled with."""

    def __init__(self, config: LynxConfig, native_cpu: bool):
        self.key = f"{config.cache_key()}-native{int(native_cpu)}"

    def __call__(self, graph: fx.Graph) -> None:
        return None

    def uuid(self) -> str:
        return f"{_source_hash()}-{self.key}"


@functools.cache
def _source_hash() -> str:
    roots = [Path(lowering_pkg.__file__).parent, Path(passes_pkg.__file__).parent]
    patterns = ("*.py", "*.c", "*.cpp")
    files = sorted(str(f) for root in roots for pat in patterns for f in root.glob(pat))
    return get_hash_for_files(tuple(files)).hex()


def _native_cpu(example_inputs) -> bool:
    """Whether the CPU lowering may call the native kernels: loaded here, before compiling,
    for any graph with CPU tensors. A graph served from Inductor's cache calls them without
    the decompositions having run (and loaded them) in this process."""
    on_cpu = any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in example_inputs)
    return on_cpu and cpu_native.available()


def _inductor_patches(config: LynxConfig, native_cpu: bool) -> dict:
    patches = {"post_grad_custom_post_pass": LynxCacheSalt(config, native_cpu)}
    if config.mode is not None:
        patches.update(torch._inductor.list_mode_options(config.mode))
    patches.update(config.inductor)
    return patches


def lynx_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode=None):
    """torch.compile backend: lynx passes on the Dynamo graph, then Inductor's compile_fx."""
    from torch._inductor.compile_fx import compile_fx

    config = parse_options(options, mode)
    decompositions.register_fallbacks()
    gm = apply_lynx_passes(gm, example_inputs, config)
    patches = _inductor_patches(config, _native_cpu(example_inputs))
    return compile_fx(gm, example_inputs, config_patches=patches)
