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

from tests.helpers import (
    DECODE_TOKENS,
    GLOO_WORLD,
    SHARDED_FP32_TOL,
    assert_exact_equals_eager,
    assert_ranks_route_alike,
    join_gloo,
    rank_sites,
    record_route_ids,
    run_policies,
    spawn_ranks,
    store_rank_result,
)

LAYOUTS = ("TensorParallelMoE", "DTensorParallelMoE", "ExpertParallelMoE")


def _rank_main(rank: int, port: int, results) -> None:
    join_gloo(rank, port, GLOO_WORLD)
    try:
        from lynx_compile.examples import moe_modules

        import lynx_compile

        ids_seen = record_route_ids()  # the ids the default-policy routing op returned
        for layout in LAYOUTS:
            torch._dynamo.reset()
            lynx_compile.clear_report()
            cls = getattr(moe_modules, layout)
            kwargs = dict(num_experts=16, top_k=4)
            layer = cls(rank, GLOO_WORLD, **kwargs).eval()
            whole = cls(0, 1, **kwargs).eval()  # the single-process layer
            out, ids = run_policies(layer, whole, ids_seen)
            store_rank_result(results, layout, rank, out, ids)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    return spawn_ranks(_rank_main, GLOO_WORLD)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_exact_equals_single_process_eager_on_every_rank(ranks, layout):
    assert_exact_equals_eager(ranks, layout, GLOO_WORLD, SHARDED_FP32_TOL)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_rank_fuses_its_shard_and_keeps_the_collective(ranks, layout):
    for rank in range(GLOO_WORLD):
        routers, dispatch = rank_sites(ranks, layout, rank)
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
    assert_ranks_route_alike(ranks, layout, GLOO_WORLD, DECODE_TOKENS, SHARDED_FP32_TOL)
