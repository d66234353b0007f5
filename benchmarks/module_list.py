"""nn.ModuleList experts at published dimensions on CPU: eager, stock Inductor, lynx exact and
lynx default, side by side.

One examples.moe_modules.ModuleListMoE layer (transformers 4.x's Mixtral loop over a one-hot
expert mask, each expert three nn.Linear) at Mixtral-8x7B's (d 4096, 8 x 14336, top-2) or
Qwen3-30B-A3B's (d 2048, 128 x 768, top-8) dimensions, seeded random bf16 weights and router
logits spread like a trained router's, decode batches. Under stock torch.compile the loop
graph-breaks at its data-dependent token picks; under lynx it is one graph whose experts
run as lynx::experts_list on each expert's own tensors. `--loop skip-empty` times
examples.moe_modules.LoopMoE instead: the loop that skips its empty experts with
`if idx.numel() == 0: continue` (stock Inductor breaks the graph at every expert's branch
and runs only the hit ones; lynx traces the branch as not taken and fuses the loop).
`--loop hit` times examples.moe_modules.HitModuleListMoE: transformers 4.5x's Mixtral block,
looping over only the experts the batch hits (stock Inductor cannot trace that loop and runs
it eagerly; lynx unrolls it over every expert and fuses it).

Per row: median ms over interleaved rounds (each backend once per round, order alternating),
the ratio to Inductor's, the distinct experts the routing touched, the weight bytes those
experts hold, and the floor: those bytes at the read bandwidth of a 1 GiB torch.sum timed
in every round (median over rounds of bytes / that round's bandwidth).

`--ranks N` runs the layer tensor-parallel over N gloo processes on this machine (one
intra-op thread each unless --threads says otherwise): torch.distributed.tensor.parallel's
parallelize_module with ColwiseParallel on each expert's w1 / w3 and RowwiseParallel on its
w2, so each rank holds 1/N of every expert and the model sums every expert's down
projection over the ranks (one all_reduce per expert); lynx fuses the rank's shards into
one lynx::experts_list call and sums once. Rows are rank 0's; bytes and floors per rank.

    python benchmarks/module_list.py --shape mixtral --batch 1 16 --threads 2
    python benchmarks/module_list.py --shape qwen3 --loop skip-empty --batch 1 4 16
    python benchmarks/module_list.py --shape mixtral --loop hit --batch 1 16
    python benchmarks/module_list.py --shape mixtral --batch 1 16 --ranks 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import types

import torch
from lynx_compile.examples.moe_modules import HitModuleListMoE, LoopMoE, ModuleListMoE

import lynx_compile

SHAPES = {  # dim, hidden, experts, top_k
    "mixtral": (4096, 14336, 8, 2),
    "qwen3": (2048, 768, 128, 8),
}
LOOPS = {"mask": ModuleListMoE, "skip-empty": LoopMoE, "hit": HitModuleListMoE}


def build(shape: str, loop: str = "mask") -> ModuleListMoE | LoopMoE:
    dim, hidden, experts, top_k = SHAPES[shape]
    with torch.device("meta"):
        module = LOOPS[loop](dim, hidden, experts, top_k)
    module = module.to_empty(device="cpu").to(torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = p.shape[-1]
            scale = 4.0 if name.startswith("router") else 1.0  # spread logits (~N(0, 4))
            p.copy_((torch.randn(p.shape, generator=gen) * scale / fan_in**0.5).to(p.dtype))
    return module


def own_code(module: torch.nn.Module, tag: str) -> torch.nn.Module:
    """The module (its parameters and submodules shared, nothing copied) with a forward of
    its own code object. Dynamo caches compiled frames per code object, and in one process
    a lynx-compiled call was seen running the frames stock Inductor had compiled for the
    same forward (and its graph breaks' resume functions), timing Inductor's code as
    lynx's."""
    twin = copy.copy(module)  # a shallow copy: the same parameter and module dicts
    fn = type(module).forward
    code = fn.__code__.replace(co_name=f"forward_{tag}")
    own = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    twin.forward = types.MethodType(own, twin)
    return twin


def read_gbs(pool: torch.Tensor) -> float:
    start = time.perf_counter()
    pool.sum()
    return pool.numel() * pool.element_size() / (time.perf_counter() - start) / 1e9


def touched(module: torch.nn.Module, x: torch.Tensor, policy: str) -> int:
    """Distinct experts the routing chose: exact from the model's router, default from
    lynx's routing op (recorded through telemetry)."""
    if policy == "exact":
        _, ids = module.router(x)
        return int(ids.unique().numel())
    torch._dynamo.reset()
    lynx_compile.clear_report()
    with torch.no_grad():
        torch.compile(module, backend="lynx", options={"telemetry": True})(x)
    sites = [s for s in lynx_compile.report()["sites"] if s.get("telemetry")]
    return round(sites[0]["telemetry"]["mean_experts_chosen"])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mixtral")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--loop", choices=sorted(LOOPS), default="mask",
                        help="the expert loop: a one-hot mask (ModuleListMoE) or one that "
                        "skips empty experts (LoopMoE)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads per process (default: all cores, or 1 per "
                        "rank with --ranks)")  # fmt: skip
    parser.add_argument("--ranks", type=int, default=1,
                        help="tensor-parallel gloo processes (a per-expert plan)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3)
    return parser.parse_args()


def tensor_parallel(module: torch.nn.Module, ranks: int) -> torch.nn.Module:
    """module with each expert's w1 / w3 ColwiseParallel and w2 RowwiseParallel."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    plan = {}
    for e in range(len(module.experts)):
        plan |= {f"experts.{e}.w1": ColwiseParallel(), f"experts.{e}.w3": ColwiseParallel()}
        plan[f"experts.{e}.w2"] = RowwiseParallel()
    return parallelize_module(module, init_device_mesh("cpu", (ranks,)), plan)


def run(args: argparse.Namespace, rank: int = 0) -> None:
    """Time every backend at every batch and print the table (rank 0 prints)."""
    show = print if rank == 0 else (lambda *a, **k: None)
    torch.set_num_threads(args.threads or (1 if args.ranks > 1 else torch.get_num_threads()))
    # Stock Inductor graph-breaks in the loop (a resume function per break and batch): past
    # the default limit of 8 cache entries its calls would silently run eagerly.
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096
    module = build(args.shape, args.loop)
    if args.ranks > 1:
        module = tensor_parallel(module, args.ranks)
    dim, hidden, experts, _ = SHAPES[args.shape]
    expert_bytes = 3 * dim * hidden * 2 // args.ranks  # a rank's shard of one expert
    pool = torch.ones(1 << 29, dtype=torch.bfloat16)  # 1 GiB
    layout = f", tensor-parallel over {args.ranks} gloo ranks" if args.ranks > 1 else ""
    show(f"# {args.shape}, {type(module).__name__}: {experts} experts x "
         f"{expert_bytes / 2**20:.0f} MiB bf16 per rank{layout}, "
         f"{torch.get_num_threads()} threads per process, torch {torch.__version__}")  # fmt: skip
    show("| batch | backend | experts | MB read | ms | vs inductor | floor ms | floor/ms |")
    show("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch in args.batch:
        x = torch.randn(batch, 1, dim, generator=torch.Generator().manual_seed(batch))
        x = x.to(torch.bfloat16)
        counts = {"exact": touched(module, x, "exact"), "default": touched(module, x, "default")}
        torch._dynamo.reset()
        backends = {
            "eager": module,
            "inductor": torch.compile(own_code(module, "inductor")),
            "lynx exact": torch.compile(
                own_code(module, "exact"), backend="lynx", options={"policy": "exact"}
            ),
            "lynx default": torch.compile(own_code(module, "default"), backend="lynx"),
        }
        times: dict[str, list[float]] = {name: [] for name in backends}
        floors: dict[str, list[float]] = {name: [] for name in backends}
        with torch.no_grad():
            for fn in backends.values():  # compile and warm up
                fn(x)
            eager_out = module(x).float()
            drift = (backends["lynx exact"](x).float() - eager_out).abs().max().item()
            scale = eager_out.abs().max().item()
            for r in range(args.rounds):
                order = list(backends) if r % 2 == 0 else list(reversed(backends))
                for name in order:
                    gbs = read_gbs(pool)
                    used = counts["default" if name == "lynx default" else "exact"]
                    floors[name].append(used * expert_bytes / gbs / 1e6)
                    for _ in range(args.calls):
                        pool[:: 1 << 12].add_(0)  # touch the pool's pages: weights leave cache
                        start = time.perf_counter()
                        backends[name](x)
                        times[name].append((time.perf_counter() - start) * 1e3)
        base = statistics.median(times["inductor"])
        show(f"| {batch} | (lynx exact - eager: max {drift:.3g}, of outputs up to {scale:.3g}) "
             "| | | | | | |")  # fmt: skip
        for name in backends:
            used = counts["default" if name == "lynx default" else "exact"]
            ms, floor = statistics.median(times[name]), statistics.median(floors[name])
            show(f"| {batch} | {name} | {used} | {used * expert_bytes / 1e6:.0f} | {ms:.1f} | "
                 f"{ms / base:.2f}x | {floor:.1f} | {floor / ms:.2f} |")  # fmt: skip


def _rank_main(rank: int, port: int, args: argparse.Namespace) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks)
    try:
        run(args, rank)
    finally:
        dist.destroy_process_group()


def main() -> None:
    args = parse_args()
    if args.ranks == 1:
        run(args)
        return
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free loopback port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(port, args), nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
