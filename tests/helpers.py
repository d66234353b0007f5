"""Helpers shared by the test modules (fixtures live in tests/conftest.py)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]


# The dispatch report's words for experts fused in a graph of their own, on its inputs.
INPUT_ROUTING = "on the routing the graph takes as inputs"


def sites_of(report: dict, graph_ids=None, kind: str = "router") -> list[dict]:
    """Sites of one kind in a report, optionally limited to some graphs."""
    return [
        s
        for s in report["sites"]
        if s["kind"] == kind and (graph_ids is None or s.get("graph") in graph_ids)
    ]


# Sparse-experts kernels against experts_general_reference. fp32: same products, other
# summation order. bf16: both sides round the gate/up products and expert outputs to bf16
# (eps 7.8e-3), at slightly different points.
EXPERTS_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def experts_case(tokens, experts, k, d, inter, form, dtype, seed=0):
    """Random sparse-experts inputs: (x, ids, weights, w_up, w_down, w_gate); form "gated"
    (w_up [E, 2I, d]), "plain" ([E, I, d]) or "split" (w_gate and w_up [E, I, d])."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=gen)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    ids = ids.reshape(tokens, k)
    w = torch.rand(tokens, k, generator=gen)
    up_rows = inter if form == "plain" else 2 * inter
    w_up = torch.randn(experts, up_rows if form != "split" else inter, d, generator=gen) / d**0.5
    w_gate = torch.randn(experts, inter, d, generator=gen) / d**0.5 if form == "split" else None
    w_down = torch.randn(experts, d, inter, generator=gen) / inter**0.5
    cast = [t.to(dtype) if t is not None else None for t in (x, w_up, w_down, w_gate)]
    return cast[0], ids, w, cast[1], cast[2], cast[3]


def poisoned_empty(shape, dtype, device) -> torch.Tensor:
    """A stand-in for a kernel wrapper's buffer allocator: NaN (floats) or -1 (ints), so a
    row the kernel never writes shows up in the output."""
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)


def lynx_passes_only(graphs: list | None = None):
    """Within it, backend="lynx" runs its passes and then the rewritten graph as it is
    (Inductor's compile_fx replaced): the passes on whole graphs at a few seconds a model,
    the lynx ops' kernels run eagerly. Each rewritten graph is appended to `graphs`."""
    from unittest import mock

    def run_as_is(gm, *args, **kwargs):
        if graphs is not None:
            graphs.append(gm)
        return gm.forward

    return mock.patch("torch._inductor.compile_fx.compile_fx", run_as_is)


def dynamo_graph(module: nn.Module, *args: torch.Tensor):
    """(gm, example_inputs) of the first graph Dynamo captures for module(*args)."""
    captured = []

    def capture(gm, example_inputs):
        captured.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(module, backend=capture)(*args)
    return captured[0]


# ------------------------------------------------------------- 2-process gloo tests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(rank_main, world: int) -> dict:
    """Run rank_main(rank, port, results) in `world` processes and return what they put in
    `results` (a shared dict); `port` is a free loopback port for join_gloo."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(rank_main, args=(_free_port(), results), nprocs=world, join=True)
    return dict(results)


def join_gloo(rank: int, port: int, world: int) -> None:
    """Join this spawned rank to a gloo process group on loopback, one intra-op thread."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)


# The 2-process tests' world, decode token counts (odd, one new token per sequence) and
# fp32 tolerance: each rank's partial sums, then the all_reduce, add in another order.
GLOO_WORLD = 2
DECODE_TOKENS = (3, 13)
SHARDED_FP32_TOL = dict(rtol=1e-4, atol=1e-5)


def record_route_ids() -> list[torch.Tensor]:
    """In this (rank) process, make reference.route_reference and route_scored_reference
    (softmax and scored routers) append a copy of the ids they return to the list returned
    here: a compile with options={"telemetry": True} keeps the routing op an opaque call
    into them, so the list holds the ids each call chose."""
    from lynx_compile.lowering import reference

    seen: list[torch.Tensor] = []

    def recording(route):
        def wrapped(scores, top_k, *args, **kwargs):
            values, ids = route(scores, top_k, *args, **kwargs)
            seen.append(ids.clone())
            return values, ids

        return wrapped

    reference.route_reference = recording(reference.route_reference)
    reference.route_scored_reference = recording(reference.route_scored_reference)
    return seen


def assert_exact_equals_eager(ranks: dict, layout: str, world: int, tol: dict) -> None:
    """Every rank's policy-"exact" output ([0] of each token count's outputs) equals the
    single-process eager one ([1])."""
    for rank in range(world):
        for n, (exact, eager, *_) in ranks[(layout, rank)]["outputs"].items():
            torch.testing.assert_close(exact, eager, **tol, msg=f"rank {rank}, {n} tokens")


def assert_ranks_route_alike(ranks: dict, layout: str, world: int, tokens, tol: dict) -> None:
    """Replicated tokens under the default policy: every rank recorded the same ids (ids[n]),
    their outputs ([2]) are identical, equal single-process lynx ([3]) and what each peer
    gathered (peers)."""
    for n in tokens:
        chosen = [ranks[(layout, r)]["ids"][n] for r in range(world)]
        assert chosen[0], f"{n} tokens: the routing op recorded no ids"
        assert all(len(c) == len(chosen[0]) for c in chosen), n
        pairs = [(a, b) for c in chosen[1:] for a, b in zip(chosen[0], c, strict=True)]
        assert all(torch.equal(a, b) for a, b in pairs), n
        outs = [ranks[(layout, r)]["outputs"][n][2] for r in range(world)]
        assert all(torch.equal(outs[0], o) for o in outs[1:]), f"{n} tokens: the ranks disagree"
        torch.testing.assert_close(outs[0], ranks[(layout, 0)]["outputs"][n][3], **tol)
        assert all(torch.equal(p[n], outs[0]) for p in ranks[(layout, 0)]["peers"])


def run_policies(layer, whole, ids_seen: list, dynamic: bool | None = True) -> tuple:
    """A rank's runs of a sharded `layer` at each DECODE_TOKENS count: ({n: (lynx exact,
    single-process eager `whole`, lynx default, single-process lynx default)}, {n: the ids
    the default-policy routing op returned}); ids_seen is record_route_ids()'s list."""
    exact = torch.compile(layer, backend="lynx", options={"policy": "exact"}, dynamic=dynamic)
    # telemetry keeps the routing op an opaque call (its reference records ids)
    default = torch.compile(layer, backend="lynx", options={"telemetry": True}, dynamic=dynamic)
    single = torch.compile(whole, backend="lynx", dynamic=dynamic)
    out, ids = {}, {}
    with torch.no_grad():
        for n in DECODE_TOKENS:
            x = torch.randn(n, 1, 32, generator=torch.Generator().manual_seed(n))
            ids_seen.clear()
            default_out = default(x)
            ids[n] = [i for i in ids_seen if i.shape[0] == n]
            out[n] = (exact(x), whole(x), default_out, single(x))
    return out, ids


def store_rank_result(results, layout: str, rank: int, outputs: dict, ids: dict) -> None:
    """A rank's results for one layout: its outputs and recorded ids by token count, the
    report's sites, and every rank's default-policy outputs ([2]) gathered here."""
    import torch.distributed as dist

    import lynx_compile

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {n: o[2] for n, o in outputs.items()})
    sites = lynx_compile.report()["sites"]
    results[(layout, rank)] = dict(outputs=outputs, ids=ids, sites=sites, peers=gathered)


def rank_sites(ranks: dict, layout: str, rank: int) -> tuple[list[dict], list[dict]]:
    """(router sites, dispatch sites) a rank reported for one layout."""
    sites = ranks[(layout, rank)]["sites"]
    return (
        [s for s in sites if s["kind"] == "router"],
        [s for s in sites if s["kind"] == "dispatch"],
    )
