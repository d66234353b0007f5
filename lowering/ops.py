"""The op registry: every `lynx::` op's schema, fake kernel and composite kernel, declared once.

    route(logits, top_k, policy, alpha, beta, k0, budget, weights, telemetry_site)
        -> (weights [N, k], ids int64 [N, k])   softmax routers; traced into compiled graphs
    route_recorded(... as route ...)            route plus telemetry, opaque in compiled graphs
    route_scored(scores, top_k, space, policy, alpha, beta, k0, budget, telemetry_site)
        -> (scores at ids [N, k], ids int64)    routers ranked by any score (sigmoid, bias, ...)
    route_affinity_cpu(logits, probs, top_k, alpha, beta, renorm, k0) -> (weights, ids)
                                                route's affinity policy after the softmax: the
                                                CPU lowering's entry to the native kernel
    route_scored_affinity_cpu(scores, top_k, space, alpha, beta, k0) -> (values, ids)
                                                route_scored's affinity policy: the same for
                                                scored routers
    route_votes(logits, policy, alpha, beta) -> int32 [D*E + 1]
    route_kept(logits, votes, top_k, policy, alpha, beta, k0, budget) -> int32 [E]
    route_remap(logits, votes, kept, top_k, policy, beta, weights, telemetry_site)
        -> (weights, ids)                       lynx::route as three steps for ranks that
                                                route one batch together (option
                                                routing_group; the passes all_reduce votes
                                                and kept between them); route_scored_votes,
                                                _kept, _remap: the same for route_scored
    experts(x, ids, weights, w_up, w_gate?, w_down, activation, gated,
            b_up?, b_gate?, b_down?, act_alpha?, act_limit?) -> [N, d]
                                                the sparse experts: fused gate/up (w_up
                                                [E, 2I, d], gated), plain (w_up [E, I, d]) or
                                                split gate (w_gate and w_up [E, I, d]);
                                                optional per-expert biases b_up [E, U],
                                                b_gate [E, I], b_down [E, d], added after
                                                their projections; act_alpha / act_limit
                                                parameterise the activation "swiglu_clamped"
                                                (GPT-OSS: constants.GLU_ACTIVATIONS) and are
                                                None for the elementwise ones

    experts_list(x, ids, weights, w_up[], w_gate[], w_down[], b_up[], b_gate[], b_down[],
                 activation, gated, act_alpha?, act_limit?) -> [N, d]
                                                lynx::experts with each projection's experts
                                                as E separate tensors (an nn.ModuleList of
                                                per-expert nn.Linear modules: w_up[e] [U, d],
                                                w_gate[e] [I, d], w_down[e] [d, I], biases
                                                [U] / [I] / [d]), all of one shape, dtype and
                                                strides; an empty list for an absent split
                                                gate or bias

lynx::experts reads its weights and biases in place, at any strides: an interleaved gate/up
(GPT-OSS's gate_up_proj [E, d, 2I], gate = [..., ::2], up = [..., 1::2]) is passed as the
split-gate views w_gate = gate_up_proj.transpose(1, 2)[:, 0::2] and w_up = [:, 1::2] (biases
likewise: b_gate = gate_up_proj_bias[:, 0::2], b_up = [:, 1::2]); no kernel copies, stacks
or re-lays-out a weight. The trailing arguments default to None, so a call without them is
the bias-free form.

The body of each op is its composite kernel (every device, from the plain-PyTorch forms in
reference.py and cpu_kernels.py). Per-device kernels are registered from their own modules
under their dispatch keys: CUDA from triton_ops.py (Triton), CPU from the C++ library
lynx_ops.cpp (loaded by cpu_native.py). Inductor lowerings live in decompositions.py (CPU)
and triton_ops.py (CUDA); the routing steps' in distributed_route.py. The passes emit ops
only through the selector at the bottom.

Fake kernels check their inputs with torch._check* (ValueError / TypeError messages that say
what is wrong) and derive output shapes from input shapes only, so symbolic token counts work.
"""

from __future__ import annotations

import contextlib

import torch
from lynx_compile.lowering import cpu_kernels, reference
from lynx_compile.lowering.constants import (
    ACTIVATION_NAMES,
    GLU_ACTIVATIONS,
    POLICIES,
    SCORE_SPACES,
    WEIGHT_CONVENTIONS,
)
from lynx_compile.lowering.telemetry import record_route

# --------------------------------------------------------------------- input checks (fakes)


def _check_scores(scores: torch.Tensor, top_k: int, what: str) -> None:
    """[N, E] floating-point scores and 1 <= top_k <= E."""
    torch._check_value(
        scores.dim() == 2,
        lambda: (
            f"lynx: {what} must be 2-D [tokens, experts], got shape {tuple(scores.shape)}; "
            "flatten the batch and sequence dimensions first"
        ),
    )
    torch._check_type(
        scores.is_floating_point(),
        lambda: f"lynx: {what} must be floating point, got {scores.dtype}",
    )
    torch._check_value(
        1 <= top_k <= scores.shape[1],
        lambda: f"lynx: top_k must be in [1, {scores.shape[1]}] (the expert count), got {top_k}",
    )


def _check_choice(value: str, valid: tuple[str, ...], what: str) -> None:
    torch._check_value(
        value in valid, lambda: f"lynx: unknown {what} {value!r}; valid: {', '.join(valid)}"
    )


def _route_outputs(scores: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = scores.shape[0]
    return scores.new_empty((n, top_k)), scores.new_empty((n, top_k), dtype=torch.int64)


def _route_fake(logits, top_k, policy, alpha, beta, k0, budget, weights, telemetry_site):
    _check_scores(logits, top_k, "router logits")
    _check_choice(policy, POLICIES, "routing policy")
    _check_choice(weights, WEIGHT_CONVENTIONS, "weight convention")
    return _route_outputs(logits, top_k)


def _check_experts(
    x,
    ids,
    weights,
    w_up,
    w_gate,
    w_down,
    activation,
    gated,
    b_up=None,
    b_gate=None,
    b_down=None,
    act_alpha=None,
    act_limit=None,
) -> None:
    """x [N, d], ids int64 / weights [N, k], w_up [E, U, d], w_gate [E, I, d] or None,
    w_down [E, d, I]; U = 2I for a fused gated w_up, else I; biases b_up [E, U], b_gate
    [E, I] (with w_gate only), b_down [E, d] or None; act_alpha / act_limit as
    reference.check_activation wants them."""
    _check_choice(activation, ACTIVATION_NAMES, "activation")
    torch._check_value(
        activation not in GLU_ACTIVATIONS or (gated and act_alpha is not None),
        lambda: (
            f"lynx::experts: activation {activation!r} needs gated=True and act_alpha (got "
            f"gated={gated}, act_alpha={act_alpha})"
        ),
    )
    torch._check_value(
        activation in GLU_ACTIVATIONS or (act_alpha is None and act_limit is None),
        lambda: (
            f"lynx::experts: act_alpha / act_limit parameterise {', '.join(GLU_ACTIVATIONS)} "
            f"only; activation {activation!r} takes neither (got {act_alpha}, {act_limit})"
        ),
    )
    dims = (x.dim(), ids.dim(), weights.dim(), w_up.dim(), w_down.dim())
    torch._check_value(
        dims == (2, 2, 2, 3, 3) and (w_gate is None or w_gate.dim() == 3),
        lambda: (
            "lynx::experts wants x [N, d], ids and weights [N, k], w_up [E, U, d], "
            f"w_gate [E, I, d] or None, w_down [E, d, I]; got ranks {dims}"
        ),
    )
    torch._check_type(
        ids.dtype == torch.int64, lambda: f"lynx::experts: ids must be int64, got {ids.dtype}"
    )
    torch._check_type(
        x.is_floating_point() and weights.is_floating_point(),
        lambda: (
            f"lynx::experts: x and weights must be floating point, got {x.dtype}, {weights.dtype}"
        ),
    )
    n, d = x.shape
    e, u, d_up = w_up.shape
    inter = w_down.shape[2]
    split = w_gate is not None
    torch._check(ids.shape[0] == n and weights.shape == ids.shape, lambda: (
        f"lynx::experts: ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must both be "
        f"[N={n}, k]"
    ))  # fmt: skip
    want_u = 2 * inter if gated and not split else inter
    torch._check(
        d_up == d and u == want_u and w_down.shape[0] == e and w_down.shape[1] == d,
        lambda: (
            f"lynx::experts: want w_up [E, {'2I' if gated and not split else 'I'}, d={d}] and "
            f"w_down [E, d={d}, I]; got w_up {tuple(w_up.shape)}, w_down {tuple(w_down.shape)} "
            f"(gated={gated}, split gate {split})"
        ),
    )
    if split:
        torch._check_value(gated, lambda: "lynx::experts: a split gate (w_gate) needs gated=True")
        torch._check(
            tuple(w_gate.shape) == (e, inter, d),
            lambda: (
                f"lynx::experts: w_gate must be [E={e}, I={inter}, d={d}] like w_up, "
                f"got {tuple(w_gate.shape)}"
            ),
        )
    torch._check_value(
        b_gate is None or split,
        lambda: "lynx::experts: b_gate needs a split gate (w_gate); a fused w_up's bias is b_up",
    )
    for name, bias, width in (("b_up", b_up, u), ("b_gate", b_gate, inter), ("b_down", b_down, d)):
        if bias is None:
            continue
        torch._check(
            bias.dim() == 2 and bias.shape[0] == e and bias.shape[1] == width,
            lambda name=name, bias=bias, width=width: (
                f"lynx::experts: {name} must be [E={e}, {width}] (one bias row per expert), "
                f"got {tuple(bias.shape)}"
            ),
        )
        torch._check_type(
            bias.is_floating_point(),
            lambda name=name, bias=bias: (
                f"lynx::experts: {name} must be floating point, got {bias.dtype}"
            ),
        )


# ------------------------------------------------------------------------------ routing


def route_composite(
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


route = torch.library.custom_op("lynx::route", mutates_args=())(route_composite)
route.register_fake(_route_fake)

# Calibration routes many policies through one compiled model: while a chooser is set, the
# opaque (telemetry) routing ops compiled with an approximate policy, that is the decode
# sites, route with chooser(telemetry_site) instead (lynx_compile.tools.calibrate).
_policy_chooser: list = []


@contextlib.contextmanager
def decode_policy_override(chooser):
    """Within the block, lynx::route_recorded and lynx::route_scored calls compiled with an
    approximate policy route with `chooser(telemetry_site) -> reference.RoutingPolicy`."""
    _policy_chooser.append(chooser)
    try:
        yield
    finally:
        _policy_chooser.pop()


def chosen_policy(telemetry_site: int, policy: str, *params) -> tuple:
    """(policy, alpha, beta, k0, budget) a telemetry routing call runs with."""
    if not _policy_chooser or policy == "exact":
        return (policy, *params)
    pol = _policy_chooser[-1](telemetry_site)
    return pol.name, pol.alpha, pol.beta, pol.k0, pol.budget


@torch.library.custom_op("lynx::route_recorded", mutates_args=())
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
    chosen = chosen_policy(telemetry_site, policy, alpha, beta, k0, budget)
    out_w, out_ids = torch.ops.lynx.route(logits, top_k, *chosen, weights, -1)
    record_route(telemetry_site, logits, top_k, out_ids)
    return out_w, out_ids


route_recorded.register_fake(_route_fake)


def route_scored_composite(
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
    if telemetry_site >= 0:
        policy, alpha, beta, k0, budget = chosen_policy(
            telemetry_site, policy, alpha, beta, k0, budget
        )
    pol = reference.RoutingPolicy(policy, alpha, beta, k0, budget)
    values, ids = reference.route_scored_reference(scores, top_k, space, pol)
    if telemetry_site >= 0:
        record_route(telemetry_site, scores, top_k, ids)
    return values, ids


route_scored = torch.library.custom_op("lynx::route_scored", mutates_args=())(
    route_scored_composite
)


@route_scored.register_fake
def _route_scored_fake(scores, top_k, space, policy, alpha, beta, k0, budget, telemetry_site):
    _check_scores(scores, top_k, "router scores")
    _check_choice(space, SCORE_SPACES, "score space")
    _check_choice(policy, POLICIES, "routing policy")
    return _route_outputs(scores, top_k)


@torch.library.custom_op("lynx::route_affinity_cpu", mutates_args=())
def route_affinity_cpu(
    logits: torch.Tensor,
    probs: torch.Tensor,
    top_k: int,
    alpha: float,
    beta: float | None,
    renorm: bool,
    k0: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """lynx::route's affinity policy from the model's softmax probs [N, E] (logits [N, E]):
    (weights [N, k] in probs' dtype, ids int64 [N, k]); equal probabilities rank the lower
    index first; each token's own top-k0 is protected. The CPU kernel is native
    (lynx_ops.cpp); this body is the reference."""
    pol = reference.RoutingPolicy("affinity", alpha, beta, k0)
    weights = "renorm" if renorm else "mass"
    return reference.route_reference(logits, top_k, pol, weights, "lower_index", probs=probs)


@route_affinity_cpu.register_fake
def _route_affinity_fake(logits, probs, top_k, alpha, beta, renorm, k0=0):
    _check_scores(logits, top_k, "router logits")
    torch._check_value(
        probs.shape == logits.shape,
        lambda: (
            f"lynx::route_affinity_cpu: probs {tuple(probs.shape)} must have the logits' "
            f"shape {tuple(logits.shape)}"
        ),
    )
    return _route_outputs(probs, top_k)


@torch.library.custom_op("lynx::route_scored_affinity_cpu", mutates_args=())
def route_scored_affinity_cpu(
    scores: torch.Tensor,
    top_k: int,
    space: str,
    alpha: float,
    beta: float | None,
    k0: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """lynx::route_scored's affinity policy in one call: scores [N, E] -> (scores at ids
    [N, k], ids int64 [N, k]); equal scores rank the lower index first. The CPU kernel is
    native (lynx_ops.cpp); this body is the reference."""
    pol = reference.RoutingPolicy("affinity", alpha, beta, k0)
    return reference.route_scored_reference(scores, top_k, space, pol, ties="lower_index")


@route_scored_affinity_cpu.register_fake
def _route_scored_affinity_fake(scores, top_k, space, alpha, beta, k0):
    _check_scores(scores, top_k, "router scores")
    _check_choice(space, SCORE_SPACES, "score space")
    return _route_outputs(scores, top_k)


# ------------------------------------------------------------ one batch routed by many ranks
# With options={"routing_group": ...} each rank routes its own tokens as part of the batch
# of every rank in the group: the passes emit lynx::route (route_scored) as three steps with
# a functional all_reduce (sum) after each of the first two, so that every rank's ids equal
# single-process routing of the ranks' batches concatenated (docs/design/affinity_binning.md,
# "Routing across ranks"). Step 1 (votes) is additive over batches; step 2 (kept) is each
# rank's share of the kept set; step 3 (remap) routes this rank's tokens from the union.


def _check_group_step(scores, votes, kept, policy, beta, what: str) -> None:
    """The step inputs: scores [N, E], votes int32 [votes_size], kept int32 [E] or None."""
    _check_choice(policy, POLICIES[1:], "batch-aware routing policy")
    size = reference.votes_size(policy, beta, scores.shape[1])
    torch._check_value(
        votes.dim() == 1 and votes.shape[0] == size and votes.dtype == torch.int32,
        lambda: (
            f"lynx::{what}: votes must be int32 [{size}] (route votes of the policy), got "
            f"{votes.dtype} {tuple(votes.shape)}"
        ),
    )
    if kept is not None:
        torch._check_value(
            tuple(kept.shape) == (scores.shape[1],) and kept.dtype == torch.int32,
            lambda: (
                f"lynx::{what}: kept must be int32 [{scores.shape[1]}] (one count per "
                f"expert), got {kept.dtype} {tuple(kept.shape)}"
            ),
        )


def _votes_fake(scores, policy, beta, what):
    _check_scores(scores, 1, what)
    _check_choice(policy, POLICIES[1:], "batch-aware routing policy")
    size = reference.votes_size(policy, beta, scores.shape[1])
    return scores.new_empty((size,), dtype=torch.int32)


@torch.library.custom_op("lynx::route_votes", mutates_args=())
def route_votes(
    logits: torch.Tensor, policy: str, alpha: float, beta: float | None
) -> torch.Tensor:
    """Step 1 of lynx::route across ranks: this rank's votes, logits [N, E] -> int32
    [D * E + 1] under affinity (tokens per bin depth and expert, then N), int32 [1] else."""
    pol = reference.RoutingPolicy(policy, alpha, beta)
    return reference.route_votes_reference(logits, pol)


@route_votes.register_fake
def _route_votes_fake(logits, policy, alpha, beta):
    return _votes_fake(logits, policy, beta, "router logits")


@torch.library.custom_op("lynx::route_kept", mutates_args=())
def route_kept(
    logits: torch.Tensor,
    votes: torch.Tensor,
    top_k: int,
    policy: str,
    alpha: float,
    beta: float | None,
    k0: int,
    budget: int,
) -> torch.Tensor:
    """Step 2: the experts this rank's tokens keep, int32 [E] (0 or 1), given the group's
    votes (step 1 summed over the ranks)."""
    pol = reference.RoutingPolicy(policy, alpha, beta, k0, budget)
    probs = torch.softmax(logits, dim=-1)
    kept = reference.route_kept_reference(logits, probs, votes, top_k, pol)
    return kept.to(torch.int32)


@route_kept.register_fake
def _route_kept_fake(logits, votes, top_k, policy, alpha, beta, k0, budget):
    _check_scores(logits, top_k, "router logits")
    _check_group_step(logits, votes, None, policy, beta, "route_kept")
    return logits.new_empty((logits.shape[1],), dtype=torch.int32)


@torch.library.custom_op("lynx::route_remap", mutates_args=())
def route_remap(
    logits: torch.Tensor,
    votes: torch.Tensor,
    kept: torch.Tensor,
    top_k: int,
    policy: str,
    beta: float | None,
    weights: str,
    telemetry_site: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3: lynx::route's (weights [N, k], ids int64 [N, k]) for this rank's tokens from
    the group's votes and kept set (steps 1 and 2 summed over the ranks). telemetry_site
    >= 0 records this rank's distinct experts (exact vs chosen) for that report site."""
    out_w, out_ids = reference.route_group_remap_reference(logits, top_k, votes, kept, weights)
    if telemetry_site >= 0:
        record_route(telemetry_site, logits, top_k, out_ids)
    return out_w, out_ids


@route_remap.register_fake
def _route_remap_fake(logits, votes, kept, top_k, policy, beta, weights, telemetry_site):
    _check_scores(logits, top_k, "router logits")
    _check_choice(weights, WEIGHT_CONVENTIONS, "weight convention")
    _check_group_step(logits, votes, kept, policy, beta, "route_remap")
    return _route_outputs(logits, top_k)


@torch.library.custom_op("lynx::route_scored_votes", mutates_args=())
def route_scored_votes(
    scores: torch.Tensor, space: str, policy: str, alpha: float, beta: float | None
) -> torch.Tensor:
    """Step 1 of lynx::route_scored across ranks, as lynx::route_votes (bins in `space`)."""
    pol = reference.RoutingPolicy(policy, alpha, beta)
    return reference.scored_votes_reference(scores, space, pol)


@route_scored_votes.register_fake
def _route_scored_votes_fake(scores, space, policy, alpha, beta):
    _check_choice(space, SCORE_SPACES, "score space")
    return _votes_fake(scores, policy, beta, "router scores")


@torch.library.custom_op("lynx::route_scored_kept", mutates_args=())
def route_scored_kept(
    scores: torch.Tensor,
    votes: torch.Tensor,
    top_k: int,
    space: str,
    policy: str,
    alpha: float,
    beta: float | None,
    k0: int,
    budget: int,
) -> torch.Tensor:
    """Step 2 of lynx::route_scored across ranks, as lynx::route_kept: int32 [E]."""
    pol = reference.RoutingPolicy(policy, alpha, beta, k0, budget)
    kept = reference.scored_kept_reference(scores, space, votes, top_k, pol)
    return kept.to(torch.int32)


@route_scored_kept.register_fake
def _route_scored_kept_fake(scores, votes, top_k, space, policy, alpha, beta, k0, budget):
    _check_scores(scores, top_k, "router scores")
    _check_choice(space, SCORE_SPACES, "score space")
    _check_group_step(scores, votes, None, policy, beta, "route_scored_kept")
    return scores.new_empty((scores.shape[1],), dtype=torch.int32)


@torch.library.custom_op("lynx::route_scored_remap", mutates_args=())
def route_scored_remap(
    scores: torch.Tensor,
    votes: torch.Tensor,
    kept: torch.Tensor,
    top_k: int,
    policy: str,
    beta: float | None,
    telemetry_site: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3 of lynx::route_scored across ranks: (scores at ids [N, k], ids int64 [N, k])
    for this rank's tokens, as lynx::route_remap."""
    values, ids = reference.scored_group_remap_reference(scores, top_k, votes, kept)
    if telemetry_site >= 0:
        record_route(telemetry_site, scores, top_k, ids)
    return values, ids


@route_scored_remap.register_fake
def _route_scored_remap_fake(scores, votes, kept, top_k, policy, beta, telemetry_site):
    _check_scores(scores, top_k, "router scores")
    _check_group_step(scores, votes, kept, policy, beta, "route_scored_remap")
    return _route_outputs(scores, top_k)


# ------------------------------------------------------------------------------ experts


def experts_composite(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w_up: torch.Tensor,
    w_gate: torch.Tensor | None,
    w_down: torch.Tensor,
    activation: str,
    gated: bool,
    b_up: torch.Tensor | None = None,
    b_gate: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    act_alpha: float | None = None,
    act_limit: float | None = None,
) -> torch.Tensor:
    """Sparse experts: x [N, d], ids/weights [N, k], w_up [E, U, d], w_gate [E, I, d] or
    None, w_down [E, d, I], biases b_up [E, U] / b_gate [E, I] / b_down [E, d] or None
    -> [N, d] in x's dtype (reference.experts_general_reference)."""
    return cpu_kernels.experts_grouped(
        x, ids, weights, w_up, w_down, activation, gated, w_gate,
        b_up=b_up, b_gate=b_gate, b_down=b_down, alpha=act_alpha, limit=act_limit,
    )  # fmt: skip


experts = torch.library.custom_op("lynx::experts", mutates_args=())(experts_composite)


@experts.register_fake
def _experts_fake(x, ids, weights, w_up, w_gate, w_down, activation, gated, *extras):
    _check_experts(x, ids, weights, w_up, w_gate, w_down, activation, gated, *extras)
    return torch.empty_like(x)


def experts_list_composite(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w_up: list[torch.Tensor],
    w_gate: list[torch.Tensor],
    w_down: list[torch.Tensor],
    b_up: list[torch.Tensor],
    b_gate: list[torch.Tensor],
    b_down: list[torch.Tensor],
    activation: str,
    gated: bool,
    act_alpha: float | None = None,
    act_limit: float | None = None,
) -> torch.Tensor:
    """Sparse experts over per-expert tensors: x [N, d], ids/weights [N, k], w_up[e] [U, d],
    w_gate[e] [I, d] (or []), w_down[e] [d, I], biases [U] / [I] / [d] per expert (or [])
    -> [N, d] in x's dtype (reference.experts_general_reference, which reads w[e] of a list
    as of a stacked tensor: nothing is stacked or copied)."""
    flat = ids.reshape(-1)
    if flat.numel():  # a list would take a negative id from its end: refuse it instead
        low, high = int(flat.min()), int(flat.max())
        if low < 0 or high >= len(w_up):
            raise IndexError(f"lynx::experts_list: expert ids must be in [0, {len(w_up)}), "
                             f"got ids in [{low}, {high}]")  # fmt: skip
    return reference.experts_general_reference(
        x, ids, weights, w_gate or None, w_up, w_down, activation, gated,
        b_up or None, b_gate or None, b_down or None, act_alpha, act_limit,
    )  # fmt: skip


experts_list = torch.library.custom_op("lynx::experts_list", mutates_args=())(
    experts_list_composite
)


@experts_list.register_fake
def _experts_list_fake(x, ids, weights, w_up, w_gate, w_down, b_up, b_gate, b_down, *rest):
    _check_experts_list(x, ids, weights, w_up, w_gate, w_down, b_up, b_gate, b_down, *rest)
    return torch.empty_like(x)


def _check_experts_list(x, ids, weights, w_up, w_gate, w_down, b_up, b_gate, b_down,
                        activation, gated, act_alpha=None, act_limit=None) -> None:  # fmt: skip
    """lynx::experts_list's inputs: lynx::experts' checks on expert 0's tensors seen as
    one-expert stacks, then every list one tensor per expert of expert 0's shape, dtype and
    strides (the kernel reads them with one set of strides)."""
    num = len(w_up)
    torch._check_value(
        num > 0 and len(w_down) == num,
        lambda: (
            f"lynx::experts_list: w_up and w_down need one tensor per expert, got {len(w_up)} "
            f"and {len(w_down)}"
        ),
    )
    for name, tensors in (("w_gate", w_gate), ("b_up", b_up), ("b_gate", b_gate),
                          ("b_down", b_down)):  # fmt: skip
        torch._check_value(
            len(tensors) in (0, num),
            lambda name=name, tensors=tensors: (
                f"lynx::experts_list: {name} holds {len(tensors)} tensors; want one per expert "
                f"({num}) or none"
            ),
        )
    for name, tensors in (("w_up", w_up), ("w_gate", w_gate), ("w_down", w_down),
                          ("b_up", b_up), ("b_gate", b_gate), ("b_down", b_down)):  # fmt: skip
        for t in tensors:
            first = tensors[0]
            torch._check(
                t.shape == first.shape and t.dtype == first.dtype and t.stride() == first.stride(),
                lambda name=name, t=t, first=first: (
                    f"lynx::experts_list: every tensor of {name} must have the first one's shape, "
                    f"dtype and strides ({tuple(first.shape)}, {first.dtype}, {first.stride()}); "
                    f"got {tuple(t.shape)}, {t.dtype}, {t.stride()}"
                ),
            )
    torch._check_value(
        all(t.dim() == 2 for t in (*w_up, *w_gate, *w_down))
        and all(t.dim() == 1 for t in (*b_up, *b_gate, *b_down)),
        lambda: "lynx::experts_list: per-expert weights must be 2-D and biases 1-D",
    )

    def one(tensors):  # expert 0's tensor as a one-expert stack
        return tensors[0].unsqueeze(0) if tensors else None

    _check_experts(
        x, ids, weights, one(w_up), one(w_gate), one(w_down), activation, gated,
        one(b_up), one(b_gate), one(b_down), act_alpha, act_limit,
    )  # fmt: skip


ALL_OPS = (
    route,
    route_recorded,
    route_scored,
    route_affinity_cpu,
    route_scored_affinity_cpu,
    route_votes,
    route_kept,
    route_remap,
    route_scored_votes,
    route_scored_kept,
    route_scored_remap,
    experts,
    experts_list,
)

# ------------------------------------------------------------------ the passes' op selector
# Device-neutral: the passes emit these ops whatever the device; how each runs on a device
# (Triton, native C++, traced reference) is the lowering's choice, made when Inductor
# compiles the graph (decompositions.py, triton_ops.py).


def route_op(telemetry: bool) -> torch._ops.OpOverload:
    """The softmax-router op to emit: lynx::route_recorded when telemetry is asked (opaque,
    records each call), else lynx::route (compiled into the graph)."""
    return torch.ops.lynx.route_recorded.default if telemetry else torch.ops.lynx.route.default


def route_scored_op() -> torch._ops.OpOverload:
    """The scored-router op to emit (it records telemetry itself when given a site)."""
    return torch.ops.lynx.route_scored.default


def group_route_ops(scored: bool) -> tuple[torch._ops.OpOverload, ...]:
    """The three routing steps across ranks to emit, (votes, kept, remap): lynx::route_*
    for softmax routers, lynx::route_scored_* for scored ones. Their Inductor lowering
    (distributed_route.py) is loaded on first use, when the passes emit them."""
    from lynx_compile.lowering import distributed_route

    distributed_route.register_fallbacks()
    lynx = torch.ops.lynx
    if scored:
        return (
            lynx.route_scored_votes.default,
            lynx.route_scored_kept.default,
            lynx.route_scored_remap.default,
        )
    return lynx.route_votes.default, lynx.route_kept.default, lynx.route_remap.default


def experts_op(per_expert: bool = False) -> torch._ops.OpOverload:
    """The sparse-experts op to emit, for every expert form (fused gate/up, plain, split):
    lynx::experts_list where each expert's weights are separate tensors."""
    return torch.ops.lynx.experts_list.default if per_expert else torch.ops.lynx.experts.default
