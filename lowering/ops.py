"""torch.library ops of the `lynx` namespace: routing and sparse experts.

Every op has a fake implementation whose output shapes depend only on input shapes
(symbolic token counts work). Routing runs the reference; the sparse experts run the
grouped-GEMM CPU kernel (lowering/cpu_kernels.py, tested against the reference). CUDA
tensors take the Triton kernels that lynx_compile.lowering.triton_ops registers.
"""

from __future__ import annotations

import torch
from lynx_compile.lowering import cpu_kernels, reference
from lynx_compile.lowering.telemetry import record_route


@torch.library.custom_op("lynx::route", mutates_args=(), device_types=None)
def route(
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
    """Route tokens: logits [N, E] -> (weights [N, k] in logits' dtype, ids int64 [N, k]).

    telemetry_site >= 0 records distinct experts (exact vs chosen) for that report site.
    """
    pol = reference.RoutingPolicy(policy, alpha, beta, k0, budget)
    out_w, out_ids = reference.route_reference(logits, top_k, pol, weights)
    if telemetry_site >= 0:
        record_route(telemetry_site, logits, top_k, out_ids)
    return out_w, out_ids


@route.register_fake
def _route_fake(logits, top_k, policy, alpha, beta, k0, budget, weights, telemetry_site):
    n = logits.shape[0]
    return (
        logits.new_empty((n, top_k)),
        logits.new_empty((n, top_k), dtype=torch.int64),
    )


@torch.library.custom_op("lynx::route_recorded", mutates_args=(), device_types=None)
def route_recorded(
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
    """lynx::route plus telemetry: stays an opaque call in compiled graphs (lynx::route is
    traced into them), so each call records distinct experts for its report site."""
    out_w, out_ids = torch.ops.lynx.route(
        logits, top_k, policy, alpha, beta, k0, budget, weights, -1
    )
    record_route(telemetry_site, logits, top_k, out_ids)
    return out_w, out_ids


route_recorded.register_fake(_route_fake)


@torch.library.custom_op("lynx::experts", mutates_args=(), device_types=None)
def experts(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str,
    gated: bool,
) -> torch.Tensor:
    """Sparse experts: x [N, d], ids/weights [N, k], w_up [E, U, d], w_down [E, d, I] -> [N, d]."""
    return cpu_kernels.experts_grouped(x, ids, weights, w_up, w_down, activation, gated)


@experts.register_fake
def _experts_fake(x, ids, weights, w_up, w_down, activation, gated):
    return torch.empty_like(x)


@torch.library.custom_op("lynx::experts_split", mutates_args=(), device_types=None)
def experts_split(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """Sparse gated experts with separate gate/up weights [E, I, d]; w_down [E, d, I] -> [N, d]."""
    return cpu_kernels.experts_grouped(x, ids, weights, w_up, w_down, activation, True, w_gate)


@experts_split.register_fake
def _experts_split_fake(x, ids, weights, w_gate, w_up, w_down, activation):
    return torch.empty_like(x)


@torch.library.custom_op("lynx::route_scored", mutates_args=(), device_types=None)
def route_scored(
    scores: torch.Tensor,
    top_k: int,
    space: str,
    policy: str,
    alpha: float,
    beta: float | None,
    k0: int,
    budget: int,
    telemetry_site: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose experts by a ranking score: scores [N, E] -> (scores at ids [N, k], ids int64).

    Replaces a router's top-k; the model computes its weights from the outputs itself.
    telemetry_site >= 0 records distinct experts (exact vs chosen) for that report site.
    """
    pol = reference.RoutingPolicy(policy, alpha, beta, k0, budget)
    values, ids = reference.route_scored_reference(scores, top_k, space, pol)
    if telemetry_site >= 0:
        record_route(telemetry_site, scores, top_k, ids)
    return values, ids


@route_scored.register_fake
def _route_scored_fake(scores, top_k, space, policy, alpha, beta, k0, budget, telemetry_site):
    n = scores.shape[0]
    return (
        scores.new_empty((n, top_k)),
        scores.new_empty((n, top_k), dtype=torch.int64),
    )
