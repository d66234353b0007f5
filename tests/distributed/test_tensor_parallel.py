"""backend="lynx" on sharded MoE blocks: 2 processes, gloo on loopback, CPU.

Tensor parallel (examples TensorParallelMoE): each rank holds a slice of every expert's
intermediate dim; DTensorParallelMoE the same with DTensor-sharded weights (Shard(1) /
Shard(2) on a 1-D device mesh), read through to_local(). Expert parallel
(ExpertParallelMoE): each rank holds half the experts, slots routed to the other rank's
experts weigh 0. Tokens and router replicated, the ranks' shares summed by a functional
all_reduce. Checked per rank and layout: policy "exact" equals the single-process eager
layer; the dispatch is fused (lynx::experts on the rank's shard or expert range) and the
collective stays the model's; under the default policy both ranks route identically (the
ids the routing op returned are equal, the outputs agree bit for bit) and equal
single-process lynx on the whole layer.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.helpers import join_gloo, spawn_ranks

WORLD = 2
TOKENS = (3, 13)
LAYOUTS = ("TensorParallelMoE", "DTensorParallelMoE", "ExpertParallelMoE")
FP32_TOL = dict(rtol=1e-4, atol=1e-5)  # reordered fp32 sums (shards, then all_reduce)


def _rank_main(rank: int, port: int, results) -> None:
    join_gloo(rank, port, WORLD)
    try:
        from lynx_compile.examples import moe_modules
        from lynx_compile.lowering import reference

        import lynx_compile

        ids_seen = []  # the ids the default-policy routing op returned, call by call
        route = reference.route_reference

        def recording(logits, top_k, *args):
            weights, ids = route(logits, top_k, *args)
            ids_seen.append(ids.clone())
            return weights, ids

        reference.route_reference = recording
        for layout in LAYOUTS:
            torch._dynamo.reset()
            lynx_compile.clear_report()
            cls = getattr(moe_modules, layout)
            kwargs = dict(num_experts=16, top_k=4)
            layer = cls(rank, WORLD, **kwargs).eval()
            whole = cls(0, 1, **kwargs).eval()  # the single-process layer
            exact = torch.compile(layer, backend="lynx", options={"policy": "exact"}, dynamic=True)
            # telemetry keeps the routing op an opaque call (its reference records ids)
            default = torch.compile(
                layer, backend="lynx", options={"telemetry": True}, dynamic=True
            )
            single = torch.compile(whole, backend="lynx", dynamic=True)
            out, ids = {}, {}
            with torch.no_grad():
                for n in TOKENS:
                    x = torch.randn(n, 1, 32, generator=torch.Generator().manual_seed(n))
                    ids_seen.clear()
                    default_out = default(x)
                    ids[n] = [i for i in ids_seen if i.shape[0] == n]
                    out[n] = (exact(x), whole(x), default_out, single(x))
            sites = lynx_compile.report()["sites"]
            gathered = [None] * WORLD
            dist.all_gather_object(gathered, {n: o[2] for n, o in out.items()})
            results[(layout, rank)] = dict(outputs=out, ids=ids, sites=sites, peers=gathered)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    return spawn_ranks(_rank_main, WORLD)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_exact_equals_single_process_eager_on_every_rank(ranks, layout):
    for rank in range(WORLD):
        for n, (exact, eager, _, _) in ranks[(layout, rank)]["outputs"].items():
            torch.testing.assert_close(exact, eager, **FP32_TOL, msg=f"rank {rank}, {n} tokens")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_rank_fuses_its_shard_and_keeps_the_collective(ranks, layout):
    for rank in range(WORLD):
        sites = ranks[(layout, rank)]["sites"]
        routers = [s for s in sites if s["kind"] == "router"]
        dispatch = [s for s in sites if s["kind"] == "dispatch"]
        assert routers and all(s["status"] == "rewritten" for s in routers), (rank, routers)
        assert dispatch and all(s["status"] == "rewritten" for s in dispatch), (rank, dispatch)
        if layout == "ExpertParallelMoE":  # the rank's own expert range, found numerically
            first = rank * 8  # (the report also holds the single-process layer's sites)
            ranged = [s for s in dispatch if "experts " in s["reason"]]
            assert ranged, dispatch
            assert all(f"experts {first}..{first + 7}" in s["reason"] for s in ranged), ranged


@pytest.mark.parametrize("layout", LAYOUTS)
def test_default_policy_routes_identically_on_both_ranks(ranks, layout):
    """Replicated tokens: the ranks chose the same ids, their outputs after the all_reduce
    are identical, and equal single-process lynx (same policy) on the whole layer."""
    for n in TOKENS:
        chosen = [ranks[(layout, r)]["ids"][n] for r in range(WORLD)]
        assert chosen[0], f"{n} tokens: the routing op recorded no ids"
        assert len(chosen[0]) == len(chosen[1])
        assert all(torch.equal(a, b) for a, b in zip(*chosen, strict=True)), n
        outs = [ranks[(layout, r)]["outputs"][n][2] for r in range(WORLD)]
        assert torch.equal(outs[0], outs[1]), f"{n} tokens: the ranks disagree"
        torch.testing.assert_close(outs[0], ranks[(layout, 0)]["outputs"][n][3], **FP32_TOL)
        assert all(torch.equal(p[n], outs[0]) for p in ranks[(layout, 0)]["peers"])
