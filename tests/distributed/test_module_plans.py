"""backend="lynx" on nn.ModuleList experts under a per-module tensor-parallel plan: 2 gloo
processes on loopback, CPU.

torch.distributed.tensor.parallel.parallelize_module with a plan on each expert's modules:
- examples ModuleListMoE (transformers 4.x's Mixtral style: 8 experts, each three
  nn.Linear without biases): every expert's w1 and w3 ColwiseParallel, its w2
  RowwiseParallel, so each expert's linears convert to and from DTensors and its down
  projection is summed over the ranks (8 all_reduces a layer). lynx rewrites those linears
  into each rank's local products (passes/parallel_linears.py) and fuses the rank's shard of
  every expert into one lynx::experts_list call, whose output is summed over the ranks once.
- examples BiasedModuleListMoE (GELU MLPs with nn.Linear biases), experts.N.0 colwise and
  experts.N.2 rowwise: DTensor adds the rowwise linear's replicated bias once, to the ranks'
  sum, so its local product carries the bias on rank 0 only, and the rank's shards fuse as
  above (rank 0's op with down biases, rank 1's without).
- LinearModuleListMoE below (each expert two nn.Linear, the second reading the first's
  output directly), experts.N.0 colwise and experts.N.1 rowwise, exact policy only: both
  linears become local products and marked all_reduces, and with no activation for
  lynx::experts the dispatch stays those (exact equals eager through the rewritten linears).
Checked per rank: exact equals the single-process eager layer; the router is rewritten;
the fused graph holds one all_reduce where the model's held one per expert; under the
default policy the ranks route identically and equal single-process lynx.
"""

from __future__ import annotations

from unittest import mock

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

FUSED, BIASED = "ModuleListMoE+parallelize_module", "BiasedModuleListMoE+parallelize_module"
LINEAR = "LinearModuleListMoE+parallelize_module"
LAYOUTS = (FUSED, BIASED)
NUM_EXPERTS = 8


def _linear_experts(dim: int = 32, hidden: int = 48, num_experts: int = NUM_EXPERTS):
    """BiasedModuleListMoE with experts w2(w1(x)): two bias-free nn.Linear, nothing between."""
    from lynx_compile.examples.moe_modules import BiasedModuleListMoE
    from torch import nn

    layer = BiasedModuleListMoE(dim, hidden, num_experts)
    layer.experts = nn.ModuleList(
        nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, dim, bias=False))
        for _ in range(num_experts)
    )
    return layer.eval()


def _plan(layout: str) -> dict:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for e in range(NUM_EXPERTS):
        if layout == FUSED:
            plan |= {f"experts.{e}.w1": ColwiseParallel(), f"experts.{e}.w3": ColwiseParallel()}
            plan[f"experts.{e}.w2"] = RowwiseParallel()
        elif layout == LINEAR:
            plan |= {f"experts.{e}.0": ColwiseParallel(), f"experts.{e}.1": RowwiseParallel()}
        else:
            plan |= {f"experts.{e}.0": ColwiseParallel(), f"experts.{e}.2": RowwiseParallel()}
    return plan


def _collectives(gm) -> tuple[int, int]:
    """(functional all_reduces, DTensor redistribute calls) in a graph lynx hands Inductor."""
    reduce = torch.ops._c10d_functional.all_reduce.default
    nodes = gm.graph.nodes
    return (
        sum(n.target is reduce for n in nodes),
        sum(n.op == "call_method" and n.target == "redistribute" for n in nodes),
    )


def _recording_inductor(counts: list):
    """Inductor's compile_fx, appending _collectives(gm) of each graph it is handed."""
    from torch._inductor import compile_fx

    inductor = compile_fx.compile_fx

    def record(gm, *args, **kwargs):
        counts.append(_collectives(gm))
        return inductor(gm, *args, **kwargs)

    return mock.patch("torch._inductor.compile_fx.compile_fx", record)


def _run_linear_layout(mesh, rank: int, results) -> None:
    """LINEAR under the exact policy: outputs against the single-process eager layer."""
    from torch.distributed.tensor.parallel import parallelize_module

    import lynx_compile

    torch.manual_seed(0)
    whole = _linear_experts()
    layer = _linear_experts()
    layer.load_state_dict(whole.state_dict())
    parallelize_module(layer, mesh, _plan(LINEAR))
    torch._dynamo.reset()
    lynx_compile.clear_report()
    counts: list = []
    exact = torch.compile(layer, backend="lynx", options={"policy": "exact"})
    outputs = {}
    with _recording_inductor(counts), torch.no_grad():
        for n in DECODE_TOKENS:
            x = torch.randn(n, 1, 32, generator=torch.Generator().manual_seed(n))
            outputs[n] = (exact(x), whole(x))
    sites = lynx_compile.report()["sites"]
    results[(LINEAR, rank)] = dict(outputs=outputs, sites=sites, counts=counts)


def _rank_main(rank: int, port: int, results) -> None:
    join_gloo(rank, port, GLOO_WORLD)
    try:
        from lynx_compile.examples import moe_modules
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import parallelize_module

        import lynx_compile

        ids_seen = record_route_ids()
        mesh = init_device_mesh("cpu", (GLOO_WORLD,))
        for layout in LAYOUTS:
            cls = getattr(moe_modules, layout.split("+")[0])
            torch.manual_seed(0)
            whole = cls(num_experts=NUM_EXPERTS).eval()  # the single-process layer
            layer = cls(num_experts=NUM_EXPERTS).eval()
            layer.load_state_dict(whole.state_dict())
            parallelize_module(layer, mesh, _plan(layout))
            torch._dynamo.reset()
            lynx_compile.clear_report()
            counts: list = []
            with _recording_inductor(counts):
                # torch.compile's default shapes (not dynamic=True) for the DTensor layer
                out, ids = run_policies(layer, whole, ids_seen, dynamic=None)
            store_rank_result(results, layout, rank, out, ids)
            results[(layout, rank)] = {**results[(layout, rank)], "counts": counts}
        _run_linear_layout(mesh, rank, results)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    return spawn_ranks(_rank_main, GLOO_WORLD)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_exact_equals_single_process_eager_on_every_rank(ranks, layout):
    assert_exact_equals_eager(ranks, layout, GLOO_WORLD, SHARDED_FP32_TOL)


def _parallel_dispatch(ranks, layout: str, rank: int) -> list[dict]:
    """The dispatch sites of the parallel layer's graphs (exact and default, one per token
    count; the report also holds the single-process layer's)."""
    routers, dispatch = rank_sites(ranks, layout, rank)
    assert routers and all(s["status"] == "rewritten" for s in routers), (rank, routers)
    single = ("split-gate silu", "plain gelu, biased up+down")  # ModuleListMoE's, Biased...'s
    single = {f"sparse_experts({form}, per-expert tensors)" for form in single}
    parallel = [s for s in dispatch if s["reason"] not in single]
    assert len(parallel) == 2 * len(DECODE_TOKENS), (rank, dispatch)
    return parallel


def test_each_rank_fuses_its_shards_and_sums_the_ranks_once(ranks):
    for rank in range(GLOO_WORLD):
        parallel = _parallel_dispatch(ranks, FUSED, rank)
        assert all(s["status"] == "rewritten" for s in parallel), (rank, parallel)
        summed = "partial sums all_reduced once over 2 ranks (the model: 8 all_reduces)"
        assert all(
            s["reason"].startswith("sparse_experts(split-gate silu, per-expert tensors)")
            for s in parallel
        )
        assert all(summed in s["reason"] for s in parallel), parallel
        # one all_reduce in each graph of the parallel layer (Inductor may be handed a graph
        # more than once), none in the single layer's, and no DTensor redistribute left
        counts = ranks[(FUSED, rank)]["counts"]
        reduces = [r for r, _ in counts]
        assert set(reduces) == {0, 1} and reduces.count(1) >= len(parallel), counts
        assert not any(red for _, red in counts), counts


def test_a_rowwise_linear_with_a_bias_adds_it_once(ranks):
    """DTensor adds a RowwiseParallel linear's replicated bias once, to the ranks' sum: the
    fused dispatch adds the down biases on rank 0 only (exact equals eager above, where a
    bias on every rank would count it twice), and sums the ranks once."""
    for rank in range(GLOO_WORLD):
        parallel = _parallel_dispatch(ranks, BIASED, rank)
        assert all(s["status"] == "rewritten" for s in parallel), (rank, parallel)
        form = "biased up+down" if rank == 0 else "biased up,"
        assert all(f"sparse_experts(plain gelu, {form}" in s["reason"] for s in parallel)
        summed = "partial sums all_reduced once over 2 ranks (the model: 8 all_reduces)"
        assert all(summed in s["reason"] for s in parallel), parallel
        counts = ranks[(BIASED, rank)]["counts"]
        reduces = [r for r, _ in counts]
        assert set(reduces) == {0, 1} and reduces.count(1) >= len(parallel), counts
        assert not any(red for _, red in counts), counts


def test_a_down_projection_reading_the_up_projection_directly_is_localized(ranks):
    """w2(w1(x)) with nothing between: both chains become local products (exact equals
    eager through them), each expert's sum a functional all_reduce; no lynx::experts form
    (no activation), so the dispatch is reported skipped with that reason."""
    for rank in range(GLOO_WORLD):
        result = ranks[(LINEAR, rank)]
        for n, (exact, eager) in result["outputs"].items():
            torch.testing.assert_close(exact, eager, **SHARDED_FP32_TOL, msg=f"{rank}, {n}")
        routers = [s for s in result["sites"] if s["kind"] == "router"]
        dispatch = [s for s in result["sites"] if s["kind"] == "dispatch"]
        assert routers and all(s["status"] == "rewritten" for s in routers), routers
        assert dispatch and all(s["status"] == "skipped" for s in dispatch), dispatch
        assert result["counts"] and set(result["counts"]) == {(NUM_EXPERTS, 0)}, result


@pytest.mark.parametrize("layout", LAYOUTS)
def test_default_policy_routes_identically_on_both_ranks(ranks, layout):
    """Replicated tokens: the ranks chose the same ids, their outputs are identical, and
    equal single-process lynx (fused per-expert experts) on the whole layer."""
    assert_ranks_route_alike(ranks, layout, GLOO_WORLD, DECODE_TOKENS, SHARDED_FP32_TOL)
