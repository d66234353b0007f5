"""Per-rank tokens + expert parallelism on a Qwen3-30B-A3B-shaped MoE block: experts touched
and time per rank, 1 vs 2 ranks, each rank routing alone or with option routing_group.

    python benchmarks/routing_group.py [--batch 16] [--ranks 1 2] [--reps 5] [--out FILE]

The block: d 2048, 128 experts x 768 (SwiGLU, fused gate/up, bf16), top-8, renormalised
softmax router (fp32; random weights, seed 0: no trained Qwen3 router here). The decode
batch of `--batch` tokens is split evenly over the ranks (gloo on loopback, CPU, one thread
per rank); rank r holds experts [r*E/W, (r+1)*E/W). Per rank and routing:
- route ms: the compiled router (backend="lynx"), with routing_group its two all_reduces;
- own experts: distinct experts of the rank's own tokens;
- range touched: experts of the rank's range that any rank's tokens use (what an
  expert-parallel rank must read and compute: its share of the whole batch);
- experts ms: lynx::experts (the native CPU kernel) over the whole batch's slots that land
  in the rank's range, slots elsewhere mapped to a touched local expert with weight 0, so it
  reads exactly the range touched;
- all_reduce us: the two int32 all_reduces alone (routing_group's cost), and their bytes.
A tensor-parallel rank (replicated tokens, 1/W of every expert) touches the whole batch's
distinct experts: the 1-rank row's "own experts".
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """The MoE block measured (Qwen3-30B-A3B's shape)."""

    dim: int = 2048
    num_experts: int = 128
    inter: int = 768
    top_k: int = 8
    dtype: torch.dtype = torch.bfloat16


def _timed(fn, reps: int) -> float:
    """Median seconds of fn() over reps calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _local_slots(x, ids, weights, first: int, count: int):
    """The slots of the batch, x [N, d] and ids/weights [N, k], routed to experts [first,
    first + count): (x [M, d], local ids [M, 1], weights [M, 1]), one row per slot, so that
    lynx::experts computes exactly this rank's slots and reads only its touched experts."""
    token, slot = torch.nonzero((ids >= first) & (ids < first + count), as_tuple=True)
    local = ids[token, slot] - first
    return x[token], local[:, None], weights[token, slot][:, None]


def _all_gather(t: torch.Tensor, world: int) -> torch.Tensor:
    if world == 1:
        return t
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    return torch.cat(out)


def run_rank(rank: int, world: int, port: int, cfg: BlockConfig, args, results) -> None:
    """One rank's measurements, into results[(world, rank, routing)]."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        from lynx_compile.examples.moe_modules import TopKRouter
        from lynx_compile.lowering import reference

        torch.manual_seed(0)  # the same router on every rank
        router = TopKRouter(cfg.dim, cfg.num_experts, cfg.top_k).eval()
        local = cfg.num_experts // world
        first = rank * local
        gen = torch.Generator().manual_seed(1 + rank)
        w_up = torch.randn(local, 2 * cfg.inter, cfg.dim, generator=gen).to(cfg.dtype) * 0.02
        w_down = torch.randn(local, cfg.dim, cfg.inter, generator=gen).to(cfg.dtype) * 0.02
        x_all = torch.randn(args.batch, 1, cfg.dim, generator=torch.Generator().manual_seed(7))
        n = args.batch // world
        x = x_all[rank * n : (rank + 1) * n]  # this rank's tokens
        routings = {
            "exact": {"policy": "exact"},
            "alone": {},
            "routing_group": {"routing_group": dist.group.WORLD},  # 1 rank: the steps' cost
        }
        xs = x_all.reshape(-1, cfg.dim).to(cfg.dtype)  # every rank's tokens, for the experts
        for name, options in routings.items():
            model = torch.compile(router, backend="lynx", options=options)
            with torch.no_grad():
                route_s = _timed(lambda m=model: m(x), args.reps)
                weights, ids = model(x)
            all_ids, all_w = _all_gather(ids, world), _all_gather(weights, world)
            slot_x, slot_ids, slot_w = _local_slots(xs, all_ids, all_w, first, local)
            call = (slot_x, slot_ids, slot_w, w_up, None, w_down, "silu", True)
            experts_s = _timed(lambda c=call: torch.ops.lynx.experts.default(*c), args.reps)
            results[(world, rank, name)] = dict(
                tokens=n,
                own=reference.distinct_experts(ids),
                touched=reference.distinct_experts(slot_ids),
                slots=slot_ids.shape[0],
                route_ms=1e3 * route_s,
                experts_ms=1e3 * experts_s,
            )
        votes = torch.zeros(
            reference.votes_size("affinity", 2.0, cfg.num_experts), dtype=torch.int32
        )
        kept = torch.zeros(cfg.num_experts, dtype=torch.int32)
        reduce_s = _timed(lambda: (dist.all_reduce(votes), dist.all_reduce(kept)), args.reps)
        results[(world, rank, "all_reduce")] = dict(
            us=1e6 * reduce_s, bytes=4 * (votes.numel() + kept.numel())
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_experiment(cfg: BlockConfig, args) -> dict:
    """Every (ranks, rank, routing) measurement."""
    results = mp.Manager().dict()
    for world in args.ranks:
        mp.spawn(run_rank, args=(world, _free_port(), cfg, args, results), nprocs=world)
    return dict(results)


def table(results: dict, cfg: BlockConfig, args) -> str:
    """The results as a markdown table (one row per ranks x routing x rank)."""
    expert_mb = 3 * cfg.dim * cfg.inter * cfg.dtype.itemsize / 2**20
    lines = [
        f"Qwen3-30B-A3B-shaped block (d {cfg.dim}, {cfg.num_experts} experts x {cfg.inter}, "
        f"top-{cfg.top_k}, {str(cfg.dtype).removeprefix('torch.')} experts, "
        f"{expert_mb:.1f} MiB each), decode batch {args.batch}, CPU, gloo, 1 thread per rank",
        "",
        "| ranks | routing | rank | tokens | own experts | range touched | slots | route ms | "
        "experts ms | all_reduce |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (world, rank, name), r in sorted(results.items()):
        if name == "all_reduce":
            continue
        reduce = results.get((world, rank, "all_reduce")) if name == "routing_group" else None
        cost = f"{reduce['bytes']} B, {reduce['us']:.0f} us" if reduce else "-"
        lines.append(
            f"| {world} | {name} | {rank} | {r['tokens']} | {r['own']} | {r['touched']} | "
            f"{r['slots']} | "
            f"{r['route_ms']:.2f} | {r['experts_ms']:.1f} | {cost} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="decode tokens over all ranks")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="world sizes")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per measurement")
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    cfg = BlockConfig()
    text = table(run_experiment(cfg, args), cfg, args)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
