"""Per-rank tokens under backend="lynx": option routing_group, 2 gloo processes on loopback.

examples DataParallelExpertsMoE: each rank routes only its own tokens (3 or 13 per rank),
holds half the experts, all_gathers every rank's tokens and routing and sums the experts'
shares with a functional all_reduce. Checked per rank:
- with routing_group, the default policy's ids on each rank are single-process routing
  (the reference) of the ranks' batches concatenated in rank order, and the layer's output
  equals single-process lynx on that batch; exact equals single-process eager and runs no
  routing collective;
- without it, each rank routes its own batch (ids == the reference on its tokens) and the
  report says so;
- a scored router (sigmoid, top-k) under routing_group: the same against
  route_scored_reference on the concatenated batch; a router alone with unequal batches
  (1 and 5 tokens): the same against route_reference;
- the report carries each rank's experts touched (telemetry) and the collective's bytes;
- the dispatch, which reads the routing all_gathered from both ranks, is fused on each rank
  to its own experts;
- examples AllToAllExpertsMoE (the same layer with the tokens exchanged by functional
  all_to_alls): exact equals single-process eager, the default policy with routing_group
  equals single-process lynx, and the dispatch is fused on the received routing: each
  rank's lynx::experts reads exactly the experts of its range that the group's routing
  chose (the slots the senders routed elsewhere, of weight 0, read none).
Beside them, single-process tests of the three routing steps (votes, kept, remap): summed
over any split of a batch they route it as lynx::route / lynx::route_scored do.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from lynx_compile.examples import moe_modules
from lynx_compile.lowering import reference
from torch._subclasses import FakeTensor

from lynx_compile.config import parse_options
from tests.helpers import join_gloo, spawn_ranks

WORLD = 2
TOKENS = (3, 13)
# one token per rank: on some rank, local expert 0 is chosen by neither rank's token
READ_SEED = 7
UNEQUAL = ((1, 5),)  # tokens on rank 0, rank 1 (empty parts: the split test below)
LAYER = dict(num_experts=16, top_k=4)
DEFAULT = reference.RoutingPolicy("affinity", 3.0, 2.0, 1, 16)  # the options' defaults
FP32_TOL = dict(rtol=1e-4, atol=1e-5)  # reordered fp32 sums (gather, shares, all_reduce)


def _recorder(module, name: str, seen: list):
    """Wrap module.name so that each call on real tensors appends (first argument, ids
    returned); calls while Inductor traces a decomposition (fake tensors) are not runs."""
    original = getattr(module, name)

    def recording(scores, *args):
        out = original(scores, *args)
        if not isinstance(scores, FakeTensor):
            seen.append((scores.detach().clone(), out[1].clone()))
        return out

    setattr(module, name, recording)


def _option_errors() -> dict:
    """The messages routing_group's validation gives on a rank (torch.distributed is up)."""
    errors = {}
    for key, options in {
        "unknown group": {"routing_group": "no-such-group"},
        "static": {"routing_group": dist.group.WORLD, "policy": "static"},
        "not a group": {"routing_group": 3},
    }.items():
        try:
            parse_options(options)
        except ValueError as err:
            errors[key] = str(err)
    return errors


class SigmoidRouter(torch.nn.Module):
    """A scored router (sigmoid scores, top-k, weights renormalised after it): lynx rewrites
    its top-k into lynx::route_scored, or into the route_scored_* steps with routing_group."""

    def __init__(self, dim: int = 32, num_experts: int = 16, top_k: int = 4):
        super().__init__()
        torch.manual_seed(1)
        self.proj = torch.nn.Linear(dim, num_experts, bias=False)
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.sigmoid(self.proj(x.reshape(-1, x.shape[-1])))
        values, ids = torch.topk(scores, self.top_k, dim=-1)
        return values / values.sum(dim=-1, keepdim=True), ids


def _experts_read(model, x, group_seen: list) -> dict:
    """A call of `model` (compiled; its dispatch fused) with lynx::experts' CPU
    kernel replaced by one that records the ids and weights it is given and returns the
    reference: {"experts": [(ids, weights)], "routing": the group remap's (logits, ids)}.
    Last in the rank's run: the replacement stays for the process."""
    calls = []

    def recording(x, ids, weights, w_up, w_gate, w_down, activation, gated, *extras):
        calls.append((ids.clone(), weights.clone()))
        return reference.experts_general_reference(
            x, ids, weights, w_gate, w_up, w_down, activation, gated
        )

    with torch.no_grad():
        model(x)  # compiled for this size first: the pass's checks call the op too
        library = torch.library.Library("lynx", "IMPL")
        library.impl("experts", recording, "CPU")
        group_seen.clear()
        model(x)
    _KEPT.append(library)
    return {"experts": calls, "routing": group_seen[:]}


_KEPT = []  # the replacement library of _experts_read (dropped, it would unregister)


class _GlobalIdsExchange(moe_modules.AllToAllExpertsMoE):
    """AllToAllExpertsMoE sending every rank the global ids and the unmasked weights: each
    receiver masks the slots outside its range itself (local_routing)."""

    def outgoing(self, tokens, weights, ids):
        return [t.unsqueeze(0).expand(self.world, *t.shape) for t in (tokens, weights, ids)]

    def received_share(self, tokens, weights, ids):
        return self.local_share(tokens, weights, ids)


class _ModuloExchange(_GlobalIdsExchange):
    """_GlobalIdsExchange whose receivers take every slot modulo their expert count, weight
    kept (not expressible as lynx::experts on the rank's range: must stay the model's)."""

    def local_routing(self, weights, ids):
        return weights, ids % self.local


def _rank_main(rank: int, port: int, results) -> None:
    join_gloo(rank, port, WORLD)
    try:
        from torch._dynamo.utils import counters

        # seven compiled variants share StackedExperts.forward's frame, each at 3, 13 and
        # 1 token: past Dynamo's default limit of 8 entries it would run the rest eagerly
        torch._dynamo.config.recompile_limit = 32

        import lynx_compile

        group_seen, rank_seen = [], []
        _recorder(reference, "route_group_remap_reference", group_seen)
        _recorder(reference, "route_reference", rank_seen)  # lynx::route_recorded's body
        scored_seen = []
        _recorder(reference, "scored_group_remap_reference", scored_seen)

        layer = moe_modules.DataParallelExpertsMoE(rank, WORLD, **LAYER).eval()
        whole = moe_modules.ExpertParallelMoE(0, 1, **LAYER).eval()  # one process, all experts
        group = dist.group.WORLD

        def compiled(module, **options):
            return torch.compile(module, backend="lynx", options=options, dynamic=True)

        exchanged = moe_modules.AllToAllExpertsMoE(rank, WORLD, **LAYER).eval()  # same seed
        variants = {
            "group": compiled(layer, routing_group=group, telemetry=True),  # remap opaque
            "group_traced": compiled(layer, routing_group=group),  # steps traced by Inductor
            "group_exact": compiled(layer, routing_group=group, policy="exact"),
            "per_rank": compiled(layer, telemetry=True),
            "a2a_group": compiled(exchanged, routing_group=group, telemetry=True),
            "a2a_exact": compiled(exchanged, policy="exact"),
            "a2a_global_exact": compiled(
                _GlobalIdsExchange(rank, WORLD, **LAYER).eval(), policy="exact"
            ),
        }
        single = compiled(whole)
        scored = compiled(SigmoidRouter().eval(), routing_group=group, telemetry=True)
        out, seen, collectives = {}, {}, {}
        with torch.no_grad():
            for n in TOKENS:
                xs = [torch.randn(n, 1, 32, generator=torch.Generator().manual_seed(100 * r + n))
                      for r in range(WORLD)]  # fmt: skip
                scored_seen.clear()
                scored(xs[rank])
                seen[("scored", n)] = scored_seen[:]
                batch = torch.cat(xs)  # every rank's tokens, in rank order
                rows = slice(rank * n, (rank + 1) * n)
                # clones: a compiled output may carry attributes that do not pickle
                out[n] = {
                    "eager": whole(batch)[rows].clone(),
                    "single": single(batch)[rows].clone(),
                }
                for name, model in variants.items():
                    group_seen.clear()
                    rank_seen.clear()
                    emitted = counters["lynx"]["routing_group_all_reduce"]
                    out[n][name] = model(xs[rank]).clone()  # compiles at the first size
                    seen[(name, n)] = group_seen[:] if "group" in name else rank_seen[:]
                    collectives[name] = collectives.get(name, 0) + (
                        counters["lynx"]["routing_group_all_reduce"] - emitted
                    )
        sites = lynx_compile.report()["sites"]  # before the router alone below
        modulo = _ModuloExchange(rank, WORLD, **LAYER).eval()
        with torch.no_grad():
            out["modulo"] = (compiled(modulo, policy="exact")(xs[rank]).clone(),
                             modulo(xs[rank]).clone())  # fmt: skip
        modulo_sites = lynx_compile.report()["sites"][len(sites) :]
        one = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(READ_SEED + rank))
        read = _experts_read(variants["a2a_group"], one, group_seen)
        # Unequal batches, a rank with one token: the router alone (the example's
        # all_gather wants equal batches), ids recorded from the opaque remap.
        torch.manual_seed(0)
        router = compiled(moe_modules.TopKRouter(32, 16, 4).eval(), routing_group=group,
                          telemetry=True)  # fmt: skip
        for sizes in UNEQUAL:
            group_seen.clear()
            x = torch.randn(sizes[rank], 1, 32, generator=torch.Generator().manual_seed(rank))
            with torch.no_grad():
                router(x)
            seen[("unequal", sizes)] = group_seen[:]
        results[rank] = dict(
            outputs=out,
            seen=seen,
            collectives=collectives,
            sites=sites,
            errors=_option_errors(),
            group_name=group.group_name,
            read=read,
            modulo_sites=modulo_sites,
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    return spawn_ranks(_rank_main, WORLD)


def _routers(sites: list, **fields) -> list:
    return [
        s for s in sites if s["kind"] == "router" and all(s.get(k) == v for k, v in fields.items())
    ]


@pytest.mark.parametrize("n", TOKENS)
def test_group_routing_equals_single_process_routing_of_the_concatenated_batch(ranks, n):
    seen = [ranks[r]["seen"][("group", n)] for r in range(WORLD)]
    assert all(len(s) == 1 for s in seen), [len(s) for s in seen]  # one MoE layer, one call
    logits = torch.cat([s[0][0] for s in seen])  # [WORLD * n, E], rank order
    ids = torch.cat([s[0][1] for s in seen])
    _, want = reference.route_reference(logits, LAYER["top_k"], DEFAULT)
    assert torch.equal(ids, want)
    for rank in range(WORLD):
        got = ranks[rank]["outputs"][n]
        torch.testing.assert_close(got["group"], got["single"], **FP32_TOL)
        torch.testing.assert_close(got["group_traced"], got["single"], **FP32_TOL)
        torch.testing.assert_close(got["a2a_group"], got["single"], **FP32_TOL)


@pytest.mark.parametrize("sizes", UNEQUAL)
def test_group_routing_with_unequal_batches_and_a_one_token_rank(ranks, sizes):
    seen = [ranks[r]["seen"][("unequal", sizes)] for r in range(WORLD)]
    assert [len(s) for s in seen] == [1, 1]
    logits = torch.cat([s[0][0] for s in seen])
    assert logits.shape[0] == sum(sizes)
    _, want = reference.route_reference(logits, 4, DEFAULT)
    assert torch.equal(torch.cat([s[0][1] for s in seen]), want)


def test_the_group_batch_is_not_what_each_rank_would_choose_alone(ranks):
    """The option matters here: at some batch size the ranks' own batches keep other
    experts than the group's (the routing of each rank alone differs from the group's)."""
    differs = []
    for n in TOKENS:
        seen = [ranks[r]["seen"][("group", n)][0] for r in range(WORLD)]
        alone = [reference.route_reference(s[0], LAYER["top_k"], DEFAULT)[1] for s in seen]
        differs.append(not torch.equal(torch.cat(alone), torch.cat([s[1] for s in seen])))
    assert any(differs), differs


@pytest.mark.parametrize("n", TOKENS)
def test_group_routing_of_a_scored_router_equals_single_process_routing(ranks, n):
    seen = [ranks[r]["seen"][("scored", n)] for r in range(WORLD)]
    assert all(len(s) == 1 for s in seen), [len(s) for s in seen]
    scores = torch.cat([s[0][0] for s in seen])  # sigmoid scores, rank order
    _, want = reference.route_scored_reference(scores, LAYER["top_k"], "score", DEFAULT)
    assert torch.equal(torch.cat([s[0][1] for s in seen]), want)


@pytest.mark.parametrize("n", TOKENS)
def test_exact_equals_single_process_eager_and_runs_no_routing_collective(ranks, n):
    for rank in range(WORLD):
        got = ranks[rank]["outputs"][n]
        torch.testing.assert_close(got["group_exact"], got["eager"], **FP32_TOL)
        torch.testing.assert_close(got["a2a_exact"], got["eager"], **FP32_TOL)
        torch.testing.assert_close(got["a2a_global_exact"], got["eager"], **FP32_TOL)
    for rank in range(WORLD):  # all_reduces the passes emitted, over every compile
        assert ranks[rank]["collectives"] == {
            "group": 2,
            "group_traced": 2,
            "group_exact": 0,
            "per_rank": 0,
            "a2a_group": 2,
            "a2a_exact": 0,
            "a2a_global_exact": 0,
        }
    exact = _routers(ranks[0]["sites"], policy="exact")
    assert exact and all(s["routing_scope"] == "token" for s in exact), exact


@pytest.mark.parametrize("n", TOKENS)
def test_without_the_option_each_rank_routes_its_own_batch(ranks, n):
    for rank in range(WORLD):
        seen = ranks[rank]["seen"][("per_rank", n)]
        assert len(seen) == 1
        logits, ids = seen[0]
        _, want = reference.route_reference(logits, LAYER["top_k"], DEFAULT)
        assert torch.equal(ids, want)


def test_the_report_says_which_batch_each_router_sees_and_its_experts_touched(ranks):
    for rank in range(WORLD):
        sites = ranks[rank]["sites"]
        # the gathered and the exchanged layer's
        grouped = _routers(sites, routing_scope="group", telemetry_on=True, weights="renorm")
        assert len(grouped) == 2, grouped
        for site in grouped:
            assert site["routing_group"] == ranks[rank]["group_name"]
            assert site["routing_world"] == WORLD
            assert site["collective_bytes"] == 4 * (3 * 16 + 1 + 16)  # votes, then kept set
        (per_rank,) = _routers(sites, routing_scope="per_rank", telemetry_on=True)
        assert "each rank routes its own batch" in per_rank["routing_note"]
        assert "world size 2 and no routing_group" in per_rank["routing_note"]
        for site in (*grouped, per_rank):
            tally = site["telemetry"]
            assert tally["calls"] == len(TOKENS) and tally["tokens"] == sum(TOKENS)
            assert 0 < tally["mean_experts_chosen"] <= tally["mean_experts_exact"] <= 16


def test_the_gathered_dispatch_is_fused_to_each_ranks_own_experts(ranks):
    """The dispatch reads the routing all_gathered from both ranks: fused between the
    model's collectives, each rank's lynx::experts over its own expert range; every variant
    of the layer (with and without the option, exact) and the single-process block too (the
    routers compiled alone have no experts)."""
    for rank in range(WORLD):
        dispatch = [s for s in ranks[rank]["sites"] if s["kind"] == "dispatch"]
        alone = [s for s in dispatch if s["reason"].startswith("routing leaves the graph")]
        assert all(s["status"] == "rewritten" for s in dispatch if s not in alone), dispatch
        gathered = [s for s in dispatch if "all_gathered from 2 ranks" in s["reason"]]
        assert len(gathered) == 4, dispatch  # group, group_traced, group_exact, per_rank
        own = f"experts {8 * rank}..{8 * rank + 7}"
        assert all(own in s["reason"] for s in gathered), gathered


def test_the_exchanged_dispatch_is_fused_on_the_received_routing(ranks):
    """AllToAllExpertsMoE: the dispatch reads the routing each rank received by all_to_all
    (ids into its own experts): fused between the model's collectives in both variants; the
    variant that sends global ids (each receiver masking the others' slots) is fused to the
    rank's own range, found numerically."""
    for rank in range(WORLD):
        dispatch = [s for s in ranks[rank]["sites"] if s["kind"] == "dispatch"]
        exchanged = [s for s in dispatch if "exchanged (all_to_all) between 2 ranks" in s["reason"]]
        assert len(exchanged) == 3, dispatch  # a2a_group, a2a_exact, a2a_global_exact
        assert all(s["status"] == "rewritten" for s in exchanged), exchanged
        ranged = [s for s in exchanged if "experts " in s["reason"]]
        assert len(ranged) <= 1, exchanged  # local ids: no range; global ids: rank 1's
        if rank == 1:  # rank 0's range starts at 0: its ids index its experts as they are
            assert ranged and "experts 8..15" in ranged[0]["reason"], exchanged


def test_an_exchange_no_experts_op_reproduces_stays_the_models(ranks):
    """Receivers that take global ids modulo their expert count (weights kept): at ids in
    a rank's range that equals its experts, but past it the model still computes where the
    fused op would drop the slot; the check with ids past the range refuses it."""
    for rank in range(WORLD):
        compiled_out, eager_out = ranks[rank]["outputs"]["modulo"]
        torch.testing.assert_close(compiled_out, eager_out, **FP32_TOL)
        dispatch = [s for s in ranks[rank]["modulo_sites"] if s["kind"] == "dispatch"]
        assert dispatch and all(s["status"] == "skipped" for s in dispatch), dispatch


def test_each_rank_reads_only_its_experts_that_the_group_routing_chose(ranks):
    """The received rows carry every token of both ranks (one each here), the slots routed
    to the other rank's experts of weight 0, which the model sends as local expert 0:
    lynx::experts reads exactly the local experts the group's routing chose, none for the
    weight-0 slots (on some rank expert 0 is not among them, so a kernel reading the slots
    as sent would read one more)."""
    # the recorder replaced the native kernel, which Inductor calls (the traced fallback,
    # without a native build, would record nothing: then the unpacking below fails)
    local = LAYER["num_experts"] // WORLD
    chosen = torch.cat([ranks[r]["read"]["routing"][0][1] for r in range(WORLD)])  # group's
    mine = {r: {e - r * local for e in chosen.unique().tolist() if e // local == r}
            for r in range(WORLD)}  # fmt: skip
    assert any(0 not in m for m in mine.values()), mine  # the case that tells
    for rank in range(WORLD):
        read = ranks[rank]["read"]
        ((ids, weights),) = read["experts"]
        assert ids.shape == (WORLD, LAYER["top_k"])  # one row per token of the group
        assert (weights == 0).any() and (weights != 0).any()
        assert set(ids.unique().tolist()) == mine[rank]
        assert set(ids[weights != 0].unique().tolist()) == mine[rank]


def test_routing_group_validation_says_what_to_do(ranks):
    errors = ranks[0]["errors"]
    assert "no process group named 'no-such-group'" in errors["unknown group"]
    assert "does not take policy 'static'" in errors["static"]
    assert "routing_group=3 is invalid" in errors["not a group"]


def test_routing_group_needs_torch_distributed_initialised():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="needs torch.distributed initialised"):
        parse_options({"routing_group": "0"})


# ------------------------------------------- the three steps, one process, any split


@st.composite
def split_batch(draw):
    """Coarse logits [N, E] (ties in bins and scores are common), cut into 1-3 parts (some
    empty), with masked experts and invalid rows at times."""
    e = draw(st.integers(2, 12))
    k = draw(st.integers(1, min(e, 4)))
    sizes = draw(st.lists(st.integers(0, 6), min_size=1, max_size=3).filter(lambda s: sum(s)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = torch.randint(-8, 9, (sum(sizes), e), generator=gen).float() * 0.5
    if draw(st.booleans()):
        logits[torch.rand(logits.shape, generator=gen) < 0.2] = float("-inf")
    return logits, k, sizes


SPLIT_POLICIES = [
    reference.RoutingPolicy("affinity", 3.0, 2.0, 1),
    reference.RoutingPolicy("affinity", 3.0, 2.0, 0),
    reference.RoutingPolicy("affinity", 0.7, None, 0),
    reference.RoutingPolicy("oea", k0=2),
]


def _sum_over(parts, step):
    return sum(step(part) for part in parts)


@pytest.mark.parametrize("policy", SPLIT_POLICIES, ids=lambda p: f"{p.name}-{p.beta}-{p.k0}")
@settings(max_examples=60, deadline=None)
@given(case=split_batch())
def test_steps_summed_over_a_split_route_the_whole_batch(case, policy):
    logits, k, sizes = case
    ops, pol = torch.ops.lynx, policy
    parts = logits.split(sizes)
    votes = _sum_over(parts, lambda p: ops.route_votes(p, pol.name, pol.alpha, pol.beta))
    kept = _sum_over(
        parts, lambda p: ops.route_kept(p, votes, k, pol.name, pol.alpha, pol.beta, pol.k0, 16)
    )
    routed = [ops.route_remap(p, votes, kept, k, pol.name, pol.beta, "mass", -1) for p in parts]
    want_w, want_ids = reference.route_reference(logits, k, pol, "mass")
    torch.testing.assert_close(torch.cat([w for w, _ in routed]), want_w, equal_nan=True)
    assert torch.equal(torch.cat([i for _, i in routed]), want_ids)

    scores = torch.sigmoid(logits)
    parts = scores.split(sizes)
    votes = _sum_over(
        parts, lambda p: ops.route_scored_votes(p, "score", pol.name, pol.alpha, pol.beta)
    )
    kept = _sum_over(parts, lambda p: ops.route_scored_kept(
        p, votes, k, "score", pol.name, pol.alpha, pol.beta, pol.k0, 16))  # fmt: skip
    routed = [ops.route_scored_remap(p, votes, kept, k, pol.name, pol.beta, -1) for p in parts]
    want_v, want_ids = reference.route_scored_reference(scores, k, "score", pol)
    torch.testing.assert_close(torch.cat([v for v, _ in routed]), want_v, equal_nan=True)
    assert torch.equal(torch.cat([i for _, i in routed]), want_ids)
