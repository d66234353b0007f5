"""backend="lynx" on nn.ModuleList experts under a per-module tensor-parallel plan: 2 gloo
processes on loopback, CPU.

examples ModuleListMoE (transformers 4.x's Mixtral style: 8 experts, each three nn.Linear)
with torch.distributed.tensor.parallel.parallelize_module: every expert's w1 and w3
ColwiseParallel, its w2 RowwiseParallel, so each expert's linears convert to and from
DTensors (its down projection's all_reduce inside). On one process lynx fuses these experts
into lynx::experts_list; here the torch.distributed calls sit inside the expert computation,
so the dispatch stays the model's, and the report says why. Checked: exact equals the
single-process eager layer on both ranks; the router is rewritten on both and the ranks
route identically under the default policy, equal to single-process lynx (whose experts
are fused).
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

LAYOUT = "ModuleListMoE+parallelize_module"


def _rank_main(rank: int, port: int, results) -> None:
    join_gloo(rank, port, GLOO_WORLD)
    try:
        from lynx_compile.examples.moe_modules import ModuleListMoE
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        import lynx_compile

        ids_seen = record_route_ids()
        torch.manual_seed(0)
        whole = ModuleListMoE().eval()  # the single-process layer
        layer = ModuleListMoE().eval()
        layer.load_state_dict(whole.state_dict())
        plan = {}
        for e in range(len(layer.experts)):
            plan |= {f"experts.{e}.w1": ColwiseParallel(), f"experts.{e}.w3": ColwiseParallel()}
            plan[f"experts.{e}.w2"] = RowwiseParallel()
        parallelize_module(layer, init_device_mesh("cpu", (GLOO_WORLD,)), plan)
        torch._dynamo.reset()
        lynx_compile.clear_report()
        # torch.compile's default shapes (not dynamic=True) for the DTensor layer
        out, ids = run_policies(layer, whole, ids_seen, dynamic=None)
        store_rank_result(results, LAYOUT, rank, out, ids)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    return spawn_ranks(_rank_main, GLOO_WORLD)


def test_exact_equals_single_process_eager_on_every_rank(ranks):
    assert_exact_equals_eager(ranks, LAYOUT, GLOO_WORLD, SHARDED_FP32_TOL)


def test_router_rewritten_and_the_report_says_why_the_experts_stay(ranks):
    for rank in range(GLOO_WORLD):
        routers, dispatch = rank_sites(ranks, LAYOUT, rank)
        assert routers and all(s["status"] == "rewritten" for s in routers), (rank, routers)
        # the parallel layer's graphs (exact, default; one per token count) skipped, with
        # the reason; the single-process layer's fused
        skipped = [s for s in dispatch if s["status"] == "skipped"]
        fused = [s for s in dispatch if s["status"] == "rewritten"]
        assert len(skipped) == 2 * len(DECODE_TOKENS) and fused, (rank, dispatch)
        assert all("torch.distributed calls run between" in s["reason"] for s in skipped)
        fused_as = {s["reason"] for s in fused}
        assert fused_as == {"sparse_experts(split-gate silu, per-expert tensors)"}, fused_as


def test_default_policy_routes_identically_on_both_ranks(ranks):
    """Replicated tokens: the ranks chose the same ids, their outputs are identical, and
    equal single-process lynx (fused per-expert experts) on the whole layer."""
    assert_ranks_route_alike(ranks, LAYOUT, GLOO_WORLD, DECODE_TOKENS, SHARDED_FP32_TOL)
