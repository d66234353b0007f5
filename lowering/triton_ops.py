"""The Triton kernels as ops, and which op the FX pass should emit on which device.

- `lynx::route_triton` / `lynx::experts_triton`: torch.library.triton_op + wrap_triton,
  same signatures as lynx::route / lynx::experts, so Inductor sees (and schedules) the
  Triton launches inside compiled graphs. CUDA tensors only: a triton_op under
  torch.compile on CPU fails (no CPU Triton driver).
- Eager lynx::route / lynx::experts on CUDA tensors run the same Triton wrappers
  (registered here as their CUDA kernels); telemetry keeps working there.
- `route_op_for(device)` / `experts_op_for(device)`: the OpOverload to emit.

Importing this module needs neither CUDA nor Triton: without Triton nothing is
registered and every device gets the reference ops. The kernel modules are imported on
first use, so importing lynx_compile never compiles or decorates a kernel (that also
lets tests set TRITON_INTERPRET before the kernels are defined).
"""

from __future__ import annotations

import importlib.util

import torch
from lynx_compile.lowering import ops, reference
from lynx_compile.lowering.telemetry import record_route

HAVE_TRITON = importlib.util.find_spec("triton") is not None

# Kernel limits of the routing kernel (lowering/triton_route.py: MAX_EXPERTS, MAX_TOP_K);
# repeated here so choosing an op never imports Triton.
ROUTE_MAX_EXPERTS = 512
ROUTE_MAX_TOP_K = 16


def _kernels():
    """(triton_route, triton_experts), imported on first use."""
    from lynx_compile.lowering import triton_experts, triton_route

    return triton_route, triton_experts


def route_fits(num_experts: int, top_k: int) -> bool:
    """Whether the Triton routing kernel takes this router shape."""
    return num_experts <= ROUTE_MAX_EXPERTS and top_k <= ROUTE_MAX_TOP_K


if HAVE_TRITON:
    from torch.library import triton_op, wrap_triton

    @triton_op("lynx::route_triton", mutates_args=())
    def route_triton(
        logits: torch.Tensor,
        top_k: int,
        policy: str,
        alpha: float,
        beta: float | None,
        k0: int,
        budget: int,
        weights: str,
        telemetry_site: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [N, E] -> (weights [N, k] in logits' dtype, ids int64 [N, k]), one launch.

        telemetry_site is accepted for signature parity and not recorded: recording reads
        ids back to the host, which a compiled graph cannot do; route_op_for(...,
        telemetry=True) hands out lynx::route_recorded, which records.
        """
        triton_route, _ = _kernels()
        return triton_route.route(
            logits, top_k, policy, alpha, beta, k0, budget, weights, wrap=wrap_triton
        )

    @triton_op("lynx::experts_triton", mutates_args=())
    def experts_triton(
        x: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        w_up: torch.Tensor,
        w_down: torch.Tensor,
        activation: str,
        gated: bool,
    ) -> torch.Tensor:
        """x [N, d], ids/weights [N, k], w_up [E, U, d], w_down [E, d, I] -> [N, d]."""
        _, triton_experts = _kernels()
        return triton_experts.experts(
            x, ids, weights, w_up, w_down, activation, gated, wrap=wrap_triton
        )

    @ops.route.register_kernel("cuda")
    def _route_cuda(logits, top_k, policy, alpha, beta, k0, budget, weights, telemetry_site):
        """Eager lynx::route on CUDA: the Triton kernel where it fits, else the reference."""
        if route_fits(logits.shape[1], top_k):
            triton_route, _ = _kernels()
            out_w, out_ids = triton_route.route(
                logits, top_k, policy, alpha, beta, k0, budget, weights
            )
        else:
            pol = reference.RoutingPolicy(policy, alpha, beta, k0, budget)
            out_w, out_ids = reference.route_reference(logits, top_k, pol, weights)
        if telemetry_site >= 0:
            record_route(telemetry_site, logits, top_k, out_ids)
        return out_w, out_ids

    @ops.experts.register_kernel("cuda")
    def _experts_cuda(x, ids, weights, w_up, w_down, activation, gated):
        """Eager lynx::experts on CUDA: the Triton kernels."""
        _, triton_experts = _kernels()
        return triton_experts.experts(x, ids, weights, w_up, w_down, activation, gated)


def route_op_for(
    device: torch.device,
    num_experts: int = 0,
    top_k: int = 1,
    telemetry: bool = False,
) -> torch._ops.OpOverload:
    """The routing op to emit for tensors on `device`: lynx::route_recorded when telemetry
    is asked (opaque, records each call; Triton inside on CUDA), else lynx::route_triton on
    CUDA when the kernel takes the shape, else lynx::route (traced by Inductor)."""
    if telemetry:
        return torch.ops.lynx.route_recorded.default
    if HAVE_TRITON and torch.device(device).type == "cuda" and route_fits(num_experts, top_k):
        return torch.ops.lynx.route_triton.default
    return torch.ops.lynx.route.default


def experts_op_for(device: torch.device) -> torch._ops.OpOverload:
    """The sparse-experts op to emit for tensors on `device`: Triton on CUDA."""
    if HAVE_TRITON and torch.device(device).type == "cuda":
        return torch.ops.lynx.experts_triton.default
    return torch.ops.lynx.experts.default
