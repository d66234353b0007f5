"""Plain-PyTorch routing policies and sparse-expert computation: the specification.

Every other implementation (the CPU op kernels, the Triton kernels) must agree with
these functions. They favour clarity over speed; they never sync on data they do not
need and never produce data-dependent shapes.

Routing (one MoE layer, one batch of N routed tokens, E experts, top-k):
  exact     the model's own top-k of the router scores.
  affinity  AffinityBinning (LYNX, arXiv 2411.08982), see docs/design/affinity_binning.md.
  oea       opportunistic expert activation: keep each token's top-k0, fill from the union.
  static    keep the `budget` experts with the highest summed probability in the batch.
affinity and static protect each token's own top-k0 (k0 = 0: LYNX as published): those
experts are always kept, the policy decides the rest.

Weight conventions (`weights=`):
  "renorm"  the model divides its top-k probabilities by their sum (Mixtral, Qwen3-MoE).
  "mass"    the model keeps raw top-k probabilities (OLMoE, Qwen2-MoE norm_topk_prob=False);
            approximate policies rescale the final experts' probabilities so that they sum
            to the token's original top-k probability mass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from lynx_compile.lowering.constants import (
    ACTIVATION_NAMES,
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    DEFAULT_BUDGET,
    GLU_ACTIVATIONS,
    POLICIES,
    SCORE_BINS_PER_UNIT,
    SCORE_SPACES,
    WEIGHT_CONVENTIONS,
    default_k0,
)
from lynx_compile.lowering.constants import MIN_BIN as _MIN_BIN


@dataclass(frozen=True)
class RoutingPolicy:
    """One routing policy and its parameters (validated by lynx_compile.config).

    k0: each token's own top-k0 experts by probability: oea's kept set is their union;
    affinity and static always keep them (0: no protection). None: the policy's default
    (constants.default_k0).
    """

    name: str = "exact"
    alpha: float = DEFAULT_ALPHA
    beta: float | None = DEFAULT_BETA
    k0: int | None = None
    budget: int = DEFAULT_BUDGET

    def __post_init__(self):
        if self.k0 is None:
            object.__setattr__(self, "k0", default_k0(self.name))


def check_logits(logits: torch.Tensor, top_k: int) -> None:
    if logits.dim() != 2:
        raise ValueError(
            f"router logits must be 2-D [tokens, experts], got shape {tuple(logits.shape)}; "
            "flatten the batch and sequence dimensions first"
        )
    if not logits.is_floating_point():
        raise ValueError(f"router logits must be floating point, got {logits.dtype}")
    num_experts = logits.shape[1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}] (the expert count), got {top_k}")


def check_policy(policy: str) -> None:
    """ValueError naming the valid policies unless `policy` is one."""
    if policy not in POLICIES:
        raise ValueError(f"unknown routing policy {policy!r}; valid: {', '.join(POLICIES)}")


def check_route(logits: torch.Tensor, top_k: int, policy: str, weights: str) -> None:
    """route_reference's argument checks (ValueError naming what is wrong)."""
    check_logits(logits, top_k)
    check_policy(policy)
    if weights not in WEIGHT_CONVENTIONS:
        raise ValueError(f"unknown weight convention {weights!r}; valid: {WEIGHT_CONVENTIONS}")


def _stable_rank(keys: list[torch.Tensor]) -> torch.Tensor:
    """Expert order per token, most preferred first: keys[0] descending, then keys[1]
    descending, ..., then lower expert index. keys: each [N, E]."""
    num_experts = keys[0].shape[1]
    order = torch.arange(num_experts, device=keys[0].device).expand_as(keys[0]).clone()
    for key in reversed(keys):  # least significant key first; stable sorts keep earlier order
        _, pos = torch.sort(torch.gather(key, 1, order), dim=1, descending=True, stable=True)
        order = torch.gather(order, 1, pos)
    return order


def _finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """[N] bool: rows whose maximum is finite and that hold no NaN (the rows a batch-aware
    policy may remap; the others keep the model's exact routing)."""
    row_max = logits.amax(dim=1)
    return torch.isfinite(row_max) & ~torch.isnan(logits).any(dim=1)


def affinity_bins(logits: torch.Tensor, alpha: float, beta: float | None) -> torch.Tensor:
    """q[t, e] = ceil(alpha * (L[t, e] - max_e' L[t, e'])), floored at -beta: int64 [N, E] <= 0.

    A -inf logit (an expert the model masked out) gets MIN_BIN, below the floor: it never
    votes and ranks after every finite expert.
    """
    shifted = alpha * (logits.double() - logits.double().amax(dim=1, keepdim=True))
    q = torch.ceil(shifted).nan_to_num(nan=0.0, neginf=_MIN_BIN).clamp(_MIN_BIN, 0)
    if beta is not None:
        q = torch.where(logits == float("-inf"), _MIN_BIN, q.clamp(min=-math.floor(beta)))
    return q.to(torch.int64)


def popularity_bins(batch: torch.Tensor, beta: float | None) -> torch.Tensor:
    """How many affinity bins the exact integer popularity key can hold: int64 0-d tensor.

    The vote of token t' for expert e is B**q[t', e]; excluding the token itself each bin
    count is <= B - 1, so the summed vote is a base-B numeral with one digit per bin and
    comparing it equals comparing the per-bin counts lexicographically. The key keeps
    that numeral exactly in int64: the largest b with B**b <= 2**62 (all bins when beta
    is set and small). Deeper bins weigh < B**-b of one top-bin vote. `batch` (B) is a
    0-d tensor so that traced graphs stay valid for every batch size.
    """
    fit = torch.floor(62.0 / torch.log2(batch.double().clamp(min=2.0))).to(torch.int64)
    bins = torch.where(batch <= 1, 1, fit.clamp(min=1))
    return bins if beta is None else bins.clamp(max=math.floor(beta) + 1)


def vote_depths(beta: float | None) -> int:
    """D, the bin depths (-q) that can carry a popularity vote: popularity_bins never exceeds
    floor(beta) + 1 with a floor, nor 62 without one (62 at B = 2)."""
    return 62 if beta is None else math.floor(beta) + 1


def votes_size(policy: str, beta: float | None, num_experts: int) -> int:
    """Length of batch_votes' result: D * E + 1 for affinity, 1 (the token count) else."""
    return vote_depths(beta) * num_experts + 1 if policy == "affinity" else 1


def batch_votes(q: torch.Tensor | None, include: torch.Tensor, beta: float | None) -> torch.Tensor:
    """What a batch's popularity keys depend on, additive over batches: int32 [D * E + 1].

    q: int64 [N, E] affinity bins; include: bool [N] tokens that vote. The first D * E
    entries count the voting tokens per (bin depth d = -q < D, expert), row-major; the last
    is N, every row (the base of the key). The sum of several batches' votes is the votes of
    their concatenation, so ranks that all_reduce them get the global batch's keys. q None
    (policies without votes): the token count alone, int32 [1].
    """
    count = torch.ones_like(include, dtype=torch.int64).sum()[None]  # [1]: N
    if q is None:
        return count.to(torch.int32)
    depths, num_experts = vote_depths(beta), q.shape[1]
    depth = (-q).clamp(max=depths)  # row D collects the bins too deep to vote
    cell = depth * num_experts + torch.arange(num_experts, device=q.device)  # [N, E]
    voters = include[:, None].expand_as(q).to(torch.int64)
    counts = torch.zeros((depths + 1) * num_experts, dtype=torch.int64, device=q.device)
    counts = counts.scatter_add(0, cell.reshape(-1), voters.reshape(-1))
    return torch.cat([counts[: depths * num_experts], count]).to(torch.int32)


def _vote_place(
    depth: torch.Tensor, batch: torch.Tensor, bins: torch.Tensor, beta: float | None
) -> torch.Tensor:
    """The int64 vote B**(bins-1-depth) of one token in bin depth `depth` (0 when the bin is
    too deep to count), elementwise."""
    if beta is None:
        return torch.where(depth < bins, torch.pow(batch, (bins - 1 - depth).clamp(min=0)), 0)
    # at most floor(beta)+1 bins: unrolled, cheaper than an elementwise int pow
    place, power = torch.zeros_like(depth), torch.ones_like(batch)
    for p in range(math.floor(beta) + 1):  # depth bins-1-p votes B**p
        place = torch.where(depth == bins - 1 - p, power, place)
        power = power * batch
    return place


def popularity_from_votes(
    q: torch.Tensor, include: torch.Tensor, votes: torch.Tensor, beta: float | None
) -> torch.Tensor:
    """pop[t, e] * B**(bins-1) as an exact int64 [N, E] from a batch's votes (batch_votes,
    maybe summed over ranks): every vote for e but token t's own.

    q: int64 [N, E] this rank's bins; include: bool [N] its tokens that voted.
    """
    depths, num_experts = vote_depths(beta), q.shape[1]
    batch = votes[-1].to(torch.int64)  # B, 0-d
    counts = votes[:-1].to(torch.int64).view(depths, num_experts)
    bins = popularity_bins(batch, beta)
    depth = torch.arange(depths, device=q.device)[:, None]  # [D, 1]
    total = (counts * _vote_place(depth, batch, bins, beta)).sum(dim=0)  # [E]
    own = _vote_place(-q, batch, bins, beta) * include.to(torch.int64)[:, None]  # [N, E]
    return total[None, :] - own


def popularity_key(q: torch.Tensor, include: torch.Tensor, beta: float | None) -> torch.Tensor:
    """pop[t, e] * B**(bins-1) as an exact int64 [N, E]: the votes of the other tokens.

    q: int64 [N, E] affinity bins; include: bool [N] tokens that vote.
    """
    return popularity_from_votes(q, include, batch_votes(q, include, beta), beta)


def _final_from_kept(
    logits: torch.Tensor, probs: torch.Tensor, kept: torch.Tensor, top_k: int
) -> torch.Tensor:
    """The remap from the kept set bool [E]: each token's top-k by (kept and usable, usable,
    kept, probability, lower index): int64 [N, k]. Usable: a finite logit. So a token takes
    an expert the model masked out (-inf) only when fewer than k usable ones exist, and then
    a kept one first."""
    usable = logits > float("-inf")  # NaN rows are invalid and keep exact routing anyway
    rank_class = 2 * usable.to(torch.int64) + kept.to(torch.int64)  # 3, 2, 1, 0 in that order
    return _stable_rank([rank_class, probs])[:, :top_k]


def protected_experts(probs: torch.Tensor, k0: int, top_k: int) -> torch.Tensor:
    """Each token's own top-min(k0, k) by (probability, lower index) as bool [N, E]."""
    if k0 <= 0:
        return torch.zeros_like(probs, dtype=torch.bool)
    own = _stable_rank([probs])[:, : min(k0, top_k)]
    return _row_sets(own, probs.shape[1])


def _row_sets(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """ids [N, k] -> bool [N, E] membership (compares expert sets without sorting)."""
    member = torch.zeros(ids.shape[0], num_experts, dtype=torch.bool, device=ids.device)
    return member.scatter(1, ids, torch.ones_like(ids, dtype=torch.bool))


def _weights(
    probs: torch.Tensor, ids: torch.Tensor, exact_mass: torch.Tensor, convention: str
) -> torch.Tensor:
    chosen = torch.gather(probs, 1, ids)
    if convention == "renorm":
        return chosen / chosen.sum(dim=1, keepdim=True)
    return chosen * (exact_mass / chosen.sum(dim=1, keepdim=True))


def exact_routing(
    probs: torch.Tensor, top_k: int, ties: str, weights: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's own top-k of probs [N, E]: (ids int64, values, weights), each [N, k];
    `ties` and `weights` as in route_reference."""
    if ties == "lower_index":  # torch.sort puts NaN above every number
        exact_ids = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :top_k]
        exact_vals = torch.gather(probs, 1, exact_ids)
    elif ties == "topk":
        exact_vals, exact_ids = torch.topk(probs, top_k, dim=-1)
    else:
        raise ValueError(f"unknown tie order {ties!r}; valid: 'topk', 'lower_index'")
    if weights == "renorm":
        return exact_ids, exact_vals, exact_vals / exact_vals.sum(dim=1, keepdim=True)
    return exact_ids, exact_vals, exact_vals


def route_reference(
    logits: torch.Tensor,
    top_k: int,
    policy: RoutingPolicy = RoutingPolicy(),
    weights: str = "renorm",
    ties: str = "topk",
    probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route N tokens: logits [N, E] -> (weights [N, k] in logits' dtype, ids int64 [N, k]).

    The scores are softmax(logits) computed in logits' dtype, as the model computes them.
    Rows with NaN or an infinite maximum keep the exact routing (the model's own result,
    however non-finite) and do not vote in batch-aware policies.

    ties: how the model's top-k orders equal probabilities. "topk" leaves it to torch.topk
    (unspecified), as the model does; "lower_index" puts the lower index first (NaN above
    every number), the order the native CPU and Triton route kernels fix.
    probs: the model's softmax of logits when it was computed already (None: computed here).

    The batch-aware policies run in three steps, which ranks routing one global batch
    together run with their votes and kept sets summed between them (lynx::route_votes,
    route_kept, route_remap): route_votes_reference, route_kept_reference, remap_to_kept.
    """
    check_route(logits, top_k, policy.name, weights)
    if probs is None:
        probs = torch.softmax(logits, dim=-1)
    exact = exact_routing(probs, top_k, ties, weights)
    # A batch of one token routes exactly (nothing to share); batch-aware code computes the
    # same for a symbolic batch that is 1 at run time (_keep_exact_rows).
    if policy.name == "exact" or logits.shape[0] == 0 or static_one_token(logits):
        return exact[2], exact[0]
    votes = route_votes_reference(logits, policy)
    kept = route_kept_reference(logits, probs, votes, top_k, policy)
    return _route_to_kept(logits, probs, kept, votes, exact, weights)


def route_votes_reference(logits: torch.Tensor, policy: RoutingPolicy) -> torch.Tensor:
    """Step 1: a batch's votes (batch_votes): int32 [D * E + 1] under affinity (the bin
    counts and the token count), int32 [1] (the token count) under oea and static."""
    q = affinity_bins(logits, policy.alpha, policy.beta) if policy.name == "affinity" else None
    return batch_votes(q, _finite_rows(logits), policy.beta)


def route_kept_reference(
    logits: torch.Tensor,
    probs: torch.Tensor,
    votes: torch.Tensor,
    top_k: int,
    policy: RoutingPolicy,
) -> torch.Tensor:
    """Step 2: the experts this batch's valid tokens keep, bool [E], given `votes`, those of
    the whole routed batch (this batch's, or the sum of every rank's); logits, probs [N, E]."""
    valid = _finite_rows(logits)  # [N]
    q = affinity_bins(logits, policy.alpha, policy.beta) if policy.name == "affinity" else None
    totals = torch.where(valid[:, None], probs, 0).sum(dim=0) if policy.name == "static" else None
    return kept_experts(policy, valid, probs, top_k, q, votes, totals)


def kept_experts(
    policy: RoutingPolicy,
    valid: torch.Tensor,
    ranked: torch.Tensor,
    top_k: int,
    q: torch.Tensor | None,
    votes: torch.Tensor,
    totals: torch.Tensor | None,
) -> torch.Tensor:
    """The union of the valid tokens' kept experts under `policy`: bool [E].

    ranked [N, E]: the score ties and protection go by (probabilities, or a scored router's
    scores); q [N, E]: affinity bins (affinity); votes: the whole batch's (batch_votes);
    totals [E]: the batch's summed probabilities (static). Each valid token's own top-k0 is
    kept; affinity adds each token's choice by (bin, popularity, score, lower index), oea
    nothing, static the `budget` experts with the highest totals.
    """
    num_experts = ranked.shape[1]
    # Own top-k0 under the same tie rule as the remap (torch.topk's tie order is unspecified).
    own = protected_experts(ranked, policy.k0, top_k)
    if policy.name == "affinity":
        pop = popularity_from_votes(q, valid, votes, policy.beta)
        keys = [q, pop, ranked] if policy.k0 == 0 else [own.to(torch.int64), q, pop, ranked]
        return _kept_union(_stable_rank(keys)[:, :top_k], valid, num_experts)
    kept = _union_of_rows(own, valid)
    if policy.name == "static":
        budget = min(max(policy.budget, top_k), num_experts)
        top_experts = _stable_rank([totals[None, :]])[:, :budget]  # [1, budget]
        kept = kept | (_row_sets(top_experts, num_experts)[0] & valid.any())
    return kept


def remap_to_kept(
    logits: torch.Tensor,
    probs: torch.Tensor,
    kept: torch.Tensor,
    batch: torch.Tensor,
    exact_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3: each token's top-k from the kept set [E] (bool, or counts > 0 summed over
    ranks) in the remap order: (ids int64 [N, k], same bool [N, 1]). batch: the routed
    batch's token count (0-d; a batch of one token keeps exact_ids). `same` marks tokens
    whose expert set did not change: they keep exact_ids as they are."""
    ids = _final_from_kept(logits, probs, kept.bool(), exact_ids.shape[1])
    return _keep_exact_rows(ids, _finite_rows(logits), exact_ids, logits.shape[1], batch)


def _route_to_kept(logits, probs, kept, votes, exact, weights):
    """remap_to_kept and the weights: tokens whose experts did not change keep the model's
    weights bit for bit; exact: exact_routing's (ids, values, weights)."""
    exact_ids, exact_vals, exact_weights = exact
    ids, same = remap_to_kept(logits, probs, kept, votes[-1], exact_ids)
    moved = _weights(probs, ids, exact_vals.sum(dim=1, keepdim=True), weights)
    return torch.where(same, exact_weights, moved), ids


def route_group_remap_reference(
    logits: torch.Tensor, top_k: int, votes: torch.Tensor, kept: torch.Tensor, weights: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """route_reference's result for this rank's tokens, logits [N, E], given the votes and
    kept set of the whole batch the ranks route together (each summed over the ranks):
    (weights [N, k], ids int64 [N, k]). Equal to route_reference of the ranks' batches
    concatenated, at this rank's rows."""
    probs = torch.softmax(logits, dim=-1)
    exact = exact_routing(probs, top_k, "topk", weights)
    return _route_to_kept(logits, probs, kept, votes, exact, weights)


def affinity_ids(
    logits: torch.Tensor,
    probs: torch.Tensor,
    exact_ids: torch.Tensor,
    alpha: float,
    beta: float | None,
    k0: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AffinityBinning's experts: (ids int64 [N, k], same bool [N, 1]).

    logits, probs [N, E]; exact_ids [N, k] the model's top-k. Each valid token chooses its
    own top-k0 experts (by probability, lower index), then the rest by (bin, popularity,
    probability, lower index); the batch keeps the union of the choices; each token then
    takes its top-k by probability among the kept experts (the remap order).
    `same` marks tokens whose expert set did not change: they keep exact_ids as they are.
    """
    policy = RoutingPolicy("affinity", alpha, beta, k0)
    votes = route_votes_reference(logits, policy)
    kept = route_kept_reference(logits, probs, votes, exact_ids.shape[1], policy)
    return remap_to_kept(logits, probs, kept, votes[-1], exact_ids)


def static_one_token(x: torch.Tensor) -> bool:
    """A batch that is one token when traced, not just at run time (adds no guard)."""
    n = x.shape[0]
    return type(n) is int and n == 1


def _kept_union(kept_ids: torch.Tensor, valid: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The kept set, union of the valid tokens' kept_ids [N, m]: bool [E]."""
    return _union_of_rows(_row_sets(kept_ids, num_experts), valid)


def _union_of_rows(member: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Union over the valid tokens of per-token sets member bool [N, E]: bool [E]."""
    return (member & valid[:, None]).any(dim=0)


def _keep_exact_rows(
    ids: torch.Tensor,
    valid: torch.Tensor,
    exact_ids: torch.Tensor,
    num_experts: int,
    batch: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Invalid rows, rows whose expert set is unchanged and a batch of one token (batch: the
    routed batch's token count, 0-d) take exact_ids: (ids, same [N, 1])."""
    shared = batch > 1  # 0-d: another token exists
    ids = torch.where((valid & shared)[:, None], ids, exact_ids)
    same = (_row_sets(ids, num_experts) == _row_sets(exact_ids, num_experts)).all(1, keepdim=True)
    return torch.where(same, exact_ids, ids), same


def distinct_experts(ids: torch.Tensor) -> int:
    """Number of distinct experts a batch's routing ids [N, k] touch."""
    return int(torch.unique(ids).numel())


ACTIVATIONS = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "relu": torch.relu,
    "relu2": lambda x: torch.square(torch.relu(x)),  # transformers' ReLUSquaredActivation
}


def experts_reference(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str = "silu",
    gated: bool = True,
) -> torch.Tensor:
    """Sparse experts: x [N, d], ids/weights [N, k], w_up [E, U, d], w_down [E, d, I] -> [N, d].

    For each (token, slot): h = x @ w_up[e].T; gated: act(h[:, :I]) * h[:, I:], else act(h);
    y = h @ w_down[e].T; out[token] += weight * y. Computed per expert touched, in x's dtype,
    with the weighted sum accumulated in fp32 and cast once.
    """
    return experts_general_reference(x, ids, weights, None, w_up, w_down, activation, gated)


def experts_split_reference(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """Sparse gated experts with separate gate and up weights, w_gate/w_up [E, I, d]:
    y = (act(x @ w_gate[e].T) * (x @ w_up[e].T)) @ w_down[e].T, combined as experts_reference."""
    return experts_general_reference(x, ids, weights, w_gate, w_up, w_down, activation, True)


def swiglu_clamped(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float | None):
    """GPT-OSS's gated activation, gate/up [..., I] -> [..., I]: the gate clamped above and
    the up projection on both sides at `limit` (None: unclamped), then
    (up + 1) * gate * sigmoid(alpha * gate), in the model's order of operations."""
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def check_activation(activation: str, gated: bool, alpha: float | None, limit: float | None):
    """ValueError unless the activation is known and its parameters fit it: swiglu_clamped
    is gated and takes alpha (limit optional); the elementwise ones take neither."""
    if activation not in ACTIVATION_NAMES:
        raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATION_NAMES)}")
    if activation in GLU_ACTIVATIONS:
        if not gated or alpha is None:
            raise ValueError(
                f"activation {activation!r} needs gated=True and act_alpha (got gated={gated}, "
                f"act_alpha={alpha})"
            )
    elif alpha is not None or limit is not None:
        raise ValueError(
            f"act_alpha / act_limit parameterise {', '.join(GLU_ACTIVATIONS)} only; "
            f"activation {activation!r} takes neither (got {alpha}, {limit})"
        )


def expert_activation(
    h: torch.Tensor,
    gate: torch.Tensor | None,
    activation: str,
    gated: bool,
    alpha: float | None = None,
    limit: float | None = None,
) -> torch.Tensor:
    """The expert's hidden activation from its up projection h [..., U]: with a separate gate
    projection [..., I], act(gate) * h; gated (U = 2I), the halves h[..., :I] (gate) and
    h[..., I:] (up) combined so; else act(h). swiglu_clamped combines gate and up as
    swiglu_clamped() does, with alpha and limit."""
    if gate is None and gated:
        gate, h = h.chunk(2, dim=-1)
    if activation in GLU_ACTIVATIONS:
        return swiglu_clamped(gate, h, alpha, limit)
    act = ACTIVATIONS[activation]
    return act(h) if gate is None else act(gate) * h


def experts_general_reference(
    x,
    ids,
    weights,
    w_gate,
    w_up,
    w_down,
    activation,
    gated,
    b_up=None,
    b_gate=None,
    b_down=None,
    alpha=None,
    limit=None,
):
    """Every expert form: w_gate None -> experts_reference, else experts_split_reference;
    optional per-expert biases b_up [E, U], b_gate [E, I], b_down [E, d] added after their
    projections (x @ w_up[e].T + b_up[e], ...); alpha / limit parameterise swiglu_clamped.
    Weights and biases may be strided views (an interleaved gate/up: w[:, 0::2], w[:, 1::2])."""
    check_activation(activation, gated, alpha, limit)
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    flat_ids = ids.reshape(-1)

    def project(rows, w, b, e):
        y = rows @ w[e].to(x.dtype).t()
        return y if b is None else y + b[e].to(x.dtype)

    for e in torch.unique(flat_ids).tolist():
        slot = (flat_ids == e).nonzero().squeeze(1)  # positions in [N * k]
        token = slot // ids.shape[1]
        h = project(x[token], w_up, b_up, e)
        gate = None if w_gate is None else project(x[token], w_gate, b_gate, e)
        y = project(expert_activation(h, gate, activation, gated, alpha, limit), w_down, b_down, e)
        w = weights.reshape(-1)[slot].to(torch.float32)
        out.index_add_(0, token, y.to(torch.float32) * w[:, None])
    return out.to(x.dtype)


# ---------------------------------------------------------------- routers ranked by a score
# Routers that are not softmax -> top-k (sigmoid + bias + group limit, top-k on logits,
# softmax + bias, ...) are rewritten at their top-k only: lynx chooses the ids, and the
# model's own code turns them into weights. See docs/design/affinity_binning_routers.md.


def score_bins(scores: torch.Tensor, space: str, alpha: float, beta: float | None) -> torch.Tensor:
    """Affinity bins of a ranking score [N, E] -> int64 [N, E] <= 0, in the space's units.

    logit: bins of 1/alpha on the score itself (it is a logit, as for softmax routers).
    prob:  bins of 1/alpha on log(score) (a probability: the same bins as on its logits).
    score: bins of 1/(4 alpha) on the score (a sigmoid or probability, maybe plus a bias).
    Non-finite scores (experts the model masked out) get the lowest bin: they never vote.
    """
    if space not in SCORE_SPACES:
        raise ValueError(f"unknown score space {space!r}; valid: {', '.join(SCORE_SPACES)}")
    if space == "prob":
        ranked = scores.double().log()  # a masked -inf score gives NaN, 0 gives -inf
    elif space == "score":
        ranked = scores.double() * SCORE_BINS_PER_UNIT
    else:
        ranked = scores.double()
    finite = torch.isfinite(ranked)
    # The bins hang from the row's finite maximum: a NaN (log of a masked -inf) would make
    # the maximum NaN and put every expert in bin 0.
    q = affinity_bins(torch.where(finite, ranked, float("-inf")), alpha, beta)
    return torch.where(finite, q, _MIN_BIN)


def _static_totals(scores: torch.Tensor, space: str, valid: torch.Tensor) -> torch.Tensor:
    """[E] batch totals the static policy ranks: probabilities summed over valid tokens."""
    if space == "logit":
        mass = torch.softmax(scores.double(), dim=-1)
    else:
        mass = torch.where(torch.isfinite(scores), scores.double(), 0.0)
    return torch.where(valid[:, None], mass.nan_to_num(0.0), 0.0).sum(dim=0)


def route_scored_reference(
    scores: torch.Tensor,
    top_k: int,
    space: str,
    policy: RoutingPolicy = RoutingPolicy(),
    ties: str = "topk",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose top_k experts per token by a ranking score [N, E] -> (scores at ids, ids int64).

    Both outputs have shape [N, k]; values are gathered from `scores` (what torch.topk would
    return), so the model computes its weights from them as it does from its own top-k.
    exact is torch.topk. The batch-aware policies bin in `space` (score_bins), break ties by
    popularity, then score, then lower index, and re-select from the batch's kept set by
    score among the experts the token may use (finite score). Rows with NaN or a non-finite
    maximum keep the exact routing and do not vote.
    ties: the exact top-k's order of equal scores, as in route_reference ("topk": torch.topk's,
    unspecified, as the model has it; "lower_index": the native CPU and Triton kernels').
    """
    check_logits(scores, top_k)
    check_policy(policy.name)
    if space not in SCORE_SPACES:
        raise ValueError(f"unknown score space {space!r}; valid: {', '.join(SCORE_SPACES)}")
    exact_ids, exact_vals, _ = exact_routing(scores, top_k, ties, "mass")
    if policy.name == "exact" or scores.shape[0] == 0 or static_one_token(scores):
        return exact_vals, exact_ids  # one token routes exactly, as in route_reference
    votes = scored_votes_reference(scores, space, policy)
    kept = scored_kept_reference(scores, space, votes, top_k, policy)
    return _scored_to_kept(scores, kept, votes, exact_ids)


def scored_votes_reference(scores: torch.Tensor, space: str, policy: RoutingPolicy):
    """route_scored_reference's step 1, as route_votes_reference: int32 [D * E + 1] under
    affinity (bins in `space`), int32 [1] else."""
    q = None
    if policy.name == "affinity":
        q = score_bins(scores, space, policy.alpha, policy.beta)
    return batch_votes(q, _finite_rows(scores), policy.beta)


def scored_kept_reference(
    scores: torch.Tensor, space: str, votes: torch.Tensor, top_k: int, policy: RoutingPolicy
) -> torch.Tensor:
    """route_scored_reference's step 2, as route_kept_reference: the experts this batch's
    valid tokens keep, bool [E], given the whole routed batch's votes."""
    valid = _finite_rows(scores)  # [N]
    q = None
    if policy.name == "affinity":
        q = score_bins(scores, space, policy.alpha, policy.beta)
    totals = _static_totals(scores, space, valid) if policy.name == "static" else None
    return kept_experts(policy, valid, scores, top_k, q, votes, totals)


def _scored_to_kept(scores, kept, votes, exact_ids):
    """Step 3 of a scored router: each token's top-k by score among the kept experts it may
    use (finite score): (scores at ids, ids int64), each [N, k]."""
    usable = torch.isfinite(scores)  # [N, E]: experts the model lets this token use
    allowed = kept.bool() & usable  # the kept set [E] within each token's mask
    ids = _stable_rank([allowed.to(scores.dtype), scores])[:, : exact_ids.shape[1]]
    # Tokens whose experts did not change keep torch.topk's order bit for bit.
    valid = _finite_rows(scores)
    ids, _ = _keep_exact_rows(ids, valid, exact_ids, scores.shape[1], votes[-1])
    return torch.gather(scores, 1, ids), ids


def scored_group_remap_reference(
    scores: torch.Tensor, top_k: int, votes: torch.Tensor, kept: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """route_scored_reference's result for this rank's tokens, scores [N, E], given the
    votes and kept set of the whole batch the ranks route together (each summed over the
    ranks): (scores at ids [N, k], ids int64 [N, k]), as route_group_remap_reference."""
    exact_ids, _, _ = exact_routing(scores, top_k, "topk", "mass")
    return _scored_to_kept(scores, kept, votes, exact_ids)
