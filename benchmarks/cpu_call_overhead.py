"""The fixed cost of one call with the caches cold: what a decode step pays per MoE layer
beyond its weight reads, on this CPU.

    python benchmarks/cpu_call_overhead.py --threads 2

Between two calls of one MoE layer a decoder streams every other layer's weights (GBs), so
the CPU's caches and TLBs hold none of the code and Python objects a call walks. Each timed
call here is preceded by a 128 MiB sum that evicts them, as the real-size suite's rounds
do (`lynx-compile bench --suite real`, where every backend's calls follow other backends'
weight streams). Timed, at toy dimensions so that no weight read hides the fixed cost (the
Qwen3-30B-A3B block of the suite at QUICK_SIZES): an empty Python call, one ATen op, one
lynx::experts call, Dynamo's frame alone (the block compiled by a backend that runs no graph
and hands back a fixed output: what every compiled call pays before its graph runs), the
block compiled by lynx (exact), by Inductor, and in eager. Hot
times (no eviction) beside them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from lynx_compile.lowering import cpu_native
from lynx_compile.tools import bench_real

import lynx_compile  # noqa: F401  (registers the backend)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    if not cpu_native.available():
        raise SystemExit("the native CPU kernels are not built here (see lowering/cpu_native.py)")
    torch.set_num_threads(args.threads)
    shape = next(s for s in bench_real.SHAPES if s.name == "Qwen3-30B-A3B")
    block, u = bench_real.build(shape, quick=True, dtype=torch.bfloat16)
    x = bench_real.make_inputs(u, 1, torch.bfloat16, seed=1)
    tokens = x.reshape(-1, x.shape[-1])
    k = block.gate.top_k
    ids = torch.arange(k).view(1, k)
    weights = torch.full((1, k), 1.0 / k, dtype=torch.bfloat16)
    experts = block.experts
    lynx = torch.compile(block, backend="lynx", options={"policy": "exact"})
    inductor = torch.compile(block)
    with torch.no_grad():
        out = block(x)
    # Dynamo's frame without a graph to run: entry, guards and wrappers of a compiled call,
    # whatever the backend (the backend hands back the eager output)
    frame = torch.compile(block, backend=lambda gm, example_inputs: lambda *args: (out,))
    fns = {
        "python call": lambda: None,
        "one aten op": lambda: tokens.add(1),
        "lynx::experts": lambda: torch.ops.lynx.experts(
            tokens, ids, weights, experts.gate_up_proj, None, experts.down_proj, "silu", True
        ),
        "Dynamo frame alone": lambda: frame(x),
        "block, lynx exact": lambda: lynx(x),
        "block, Inductor": lambda: inductor(x),
        "block, eager": lambda: block(x),
    }
    evict = torch.ones(2**25)  # 128 MiB of float32: four times the last-level cache
    print(f"{args.threads} threads; median of {args.calls} calls each, interleaved")
    with torch.no_grad():
        for fn in fns.values():  # compiles, warms up
            fn(), fn()
        for cold in (True, False):
            times = {label: [] for label in fns}
            for _ in range(args.calls):
                for label, fn in fns.items():
                    if cold:
                        evict.sum()
                    start = time.perf_counter()
                    fn()
                    times[label].append(time.perf_counter() - start)
            print("cold" if cold else "hot")
            for label, ts in times.items():
                print(f"  {label:18s} {statistics.median(ts) * 1e6:7.0f} us")


if __name__ == "__main__":
    main()
