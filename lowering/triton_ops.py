"""The CUDA kernels of lynx::route, lynx::route_scored and lynx::experts: the Triton kernels,
registered here.

Two registrations per op, for the two ways an op runs:
- eagerly: the op's CUDA kernel (`register_kernel("cuda")`) calls the Triton wrapper, which
  launches the kernels directly;
- in a compiled graph: a FunctionalTensorMode rule (what torch.library.triton_op installs
  for its own ops) traces the same wrapper with `wrap_triton`, so AOTAutograd records the
  Triton launches themselves and Inductor schedules them as user-defined Triton kernels.
  The rule applies to CUDA inputs the kernels take; every other call (CPU tensors, a router
  larger than the route kernel holds, a split gate, a route_scored call with a telemetry
  site, which must stay opaque to record) falls through to the op's Inductor decomposition
  (decompositions.py), which traces the plain PyTorch forms (static shapes, so still
  CUDA-graph safe), or keeps the op whole. torch.export keeps the ops whole, as it does
  for triton_op.

Without Triton installed nothing is registered and CUDA tensors take the composite kernels.
The kernel modules are imported on first use, so importing lynx_compile never compiles or
decorates a kernel (that also lets tests set TRITON_INTERPRET before the kernels exist).
"""

from __future__ import annotations

import importlib.util

import torch
from lynx_compile.lowering import ops
from lynx_compile.lowering.constants import (
    ELEMENTWISE_ACTIVATIONS,
    TRITON_DTYPES,
    route_fits_triton,
)
from lynx_compile.lowering.telemetry import record_route

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _kernels():
    """(triton_route, triton_experts), imported on first use."""
    from lynx_compile.lowering import triton_experts, triton_route

    return triton_route, triton_experts


def route_takes(logits: torch.Tensor, top_k: int) -> bool:
    """Whether the Triton routing kernels take these CUDA logits (or scores) [N, E] and top_k."""
    return (
        logits.device.type == "cuda"
        and logits.dtype in TRITON_DTYPES
        and route_fits_triton(logits.shape[1], top_k)
    )


def experts_take(x: torch.Tensor, w_gate: torch.Tensor | None, activation: str, *extras) -> bool:
    """Whether the Triton experts kernels take these CUDA inputs: fused or plain w_up, an
    elementwise activation, no biases (extras: lynx::experts' b_up, b_gate, b_down,
    act_alpha, act_limit, all None). Biased or swiglu_clamped calls (GPT-OSS) decline: no
    Triton kernel computes them; they run the composite (decompositions.experts_cpu keeps
    them whole on CUDA), grouped GEMMs on the weights in place."""
    return (
        x.device.type == "cuda"
        and x.dtype in TRITON_DTYPES
        and w_gate is None
        and activation in ELEMENTWISE_ACTIVATIONS
        and all(extra is None for extra in extras)
    )


def _route_cuda(logits, top_k, policy, alpha, beta, k0, budget, weights, telemetry_site):
    """Eager lynx::route on CUDA: the Triton kernel where it fits, else the composite."""
    args = (logits, top_k, policy, alpha, beta, k0, budget, weights)
    if not route_takes(logits, top_k):
        return ops.route_composite(*args, telemetry_site)
    triton_route, _ = _kernels()
    out_w, out_ids = triton_route.route(*args)
    if telemetry_site >= 0:
        record_route(telemetry_site, logits, top_k, out_ids)
    return out_w, out_ids


def _route_scored_cuda(scores, top_k, space, policy, alpha, beta, k0, budget, telemetry_site):
    """Eager lynx::route_scored on CUDA: the Triton kernel where it fits, else the op's body."""
    if not route_takes(scores, top_k):
        return ops.route_scored_composite(
            scores, top_k, space, policy, alpha, beta, k0, budget, telemetry_site
        )
    if telemetry_site >= 0:  # calibration may route this site otherwise, as in the op's body
        policy, alpha, beta, k0, budget = ops.chosen_policy(
            telemetry_site, policy, alpha, beta, k0, budget
        )
    triton_route, _ = _kernels()
    values, ids = triton_route.route_scored(scores, top_k, space, policy, alpha, beta, k0, budget)
    if telemetry_site >= 0:
        record_route(telemetry_site, scores, top_k, ids)
    return values, ids


def _experts_cuda(x, ids, weights, w_up, w_gate, w_down, activation, gated, *extras):
    """Eager lynx::experts on CUDA: the Triton kernels where they fit, else the composite."""
    if experts_take(x, w_gate, activation, *extras):
        _, triton_experts = _kernels()
        return triton_experts.experts(x, ids, weights, w_up, w_down, activation, gated)
    return ops.experts_composite(x, ids, weights, w_up, w_gate, w_down, activation, gated, *extras)


def _traced_in_graph(mode, op, types, args, kwargs, takes, launch):
    """A FunctionalTensorMode rule: trace `launch(*args)` (the Triton wrapper with
    wrap_triton) when `takes(*args)`, else let the mode handle the op as usual."""
    from torch._subclasses import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    from torch.export._trace import custom_triton_ops_decomposition_disabled

    plain = (torch.Tensor, FunctionalTensor)
    known = all(issubclass(t, FakeTensor) or t in plain for t in types)
    if custom_triton_ops_decomposition_disabled() or not known or not takes(*args, **kwargs):
        return mode.__torch_dispatch__(op, types, args, kwargs)
    with mode:
        return launch(*args, **kwargs)


def _route_in_graph(mode, op, types, args, kwargs):
    def takes(logits, top_k, *rest):
        return route_takes(logits, top_k)

    def launch(logits, top_k, policy, alpha, beta, k0, budget, weights, telemetry_site):
        # telemetry_site is not recorded here: recording reads ids back to the host, which a
        # compiled graph cannot do; the passes emit lynx::route_recorded for telemetry.
        from torch.library import wrap_triton

        triton_route, _ = _kernels()
        return triton_route.route(
            logits, top_k, policy, alpha, beta, k0, budget, weights, wrap=wrap_triton
        )

    return _traced_in_graph(mode, op, types, args, kwargs, takes, launch)


def _route_scored_in_graph(mode, op, types, args, kwargs):
    def takes(scores, top_k, space, policy, alpha, beta, k0, budget, telemetry_site):
        # with a telemetry site the op stays opaque, so that each call records
        return telemetry_site < 0 and route_takes(scores, top_k)

    def launch(scores, top_k, space, policy, alpha, beta, k0, budget, telemetry_site):
        from torch.library import wrap_triton

        triton_route, _ = _kernels()
        return triton_route.route_scored(
            scores, top_k, space, policy, alpha, beta, k0, budget, wrap=wrap_triton
        )

    return _traced_in_graph(mode, op, types, args, kwargs, takes, launch)


def _experts_in_graph(mode, op, types, args, kwargs):
    def takes(x, ids, weights, w_up, w_gate, w_down, activation, gated, *extras):
        return experts_take(x, w_gate, activation, *extras)

    def launch(x, ids, weights, w_up, w_gate, w_down, activation, gated, *extras):
        from torch.library import wrap_triton

        _, triton_experts = _kernels()
        return triton_experts.experts(
            x, ids, weights, w_up, w_down, activation, gated, wrap=wrap_triton
        )

    return _traced_in_graph(mode, op, types, args, kwargs, takes, launch)


if HAVE_TRITON:
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    ops.route.register_kernel("cuda")(_route_cuda)
    ops.route_scored.register_kernel("cuda")(_route_scored_cuda)
    ops.experts.register_kernel("cuda")(_experts_cuda)
    ops.route.register_torch_dispatch(FunctionalTensorMode, _route_in_graph)
    ops.route_scored.register_torch_dispatch(FunctionalTensorMode, _route_scored_in_graph)
    ops.experts.register_torch_dispatch(FunctionalTensorMode, _experts_in_graph)
