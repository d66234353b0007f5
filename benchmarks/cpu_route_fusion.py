"""What fusing a softmax router's route into the experts call saves on CPU: one real-size
block compiled by lynx twice, with lowering/cpu_fusion.py's rewrite and without it, timed
interleaved beside the suite's paired 1 GiB-sum floor.

    python benchmarks/cpu_route_fusion.py --shape Qwen3-30B-A3B --threads 2 --batch 1 4

Both compiles are checked to give the same output first (they route alike: the fused op's
exact top-k is ATen's loop). Per batch it prints each build's median, floor fraction and
the paired ratio fused / unfused (median over rounds of the rounds' median ratio).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from lynx_compile.lowering import cpu_fusion, cpu_native
from lynx_compile.tools import bench, bench_real

import lynx_compile  # noqa: F401  (registers the backend)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="Qwen3-30B-A3B",
                        choices=[s.name for s in bench_real.SHAPES])  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=5, help="calls per build per round")
    parser.add_argument("--quick", action="store_true", help="the suite's tiny dimensions")
    args = parser.parse_args()
    if not cpu_native.available():
        raise SystemExit("the native CPU kernels are not built here (see lowering/cpu_native.py)")
    torch.set_num_threads(args.threads)
    shape = next(s for s in bench_real.SHAPES if s.name == args.shape)
    fused_block, u = bench_real.build(shape, args.quick, torch.bfloat16)
    plain_block, _ = bench_real.build(shape, args.quick, torch.bfloat16)  # the same seed
    routed, shared, router = bench_real.expert_sizes(fused_block)
    floor = bench_real._summing(bench_real.floor_buffer())
    fuse, cpu = cpu_fusion.fuse_route_experts, torch.device("cpu")
    print(f"{shape.name} bf16, {torch.get_num_threads()} threads, {args.rounds} rounds")
    for batch in args.batch:
        x = bench_real.make_inputs(u, batch, torch.bfloat16, seed=batch)
        torch._dynamo.reset()
        options = {"policy": "exact"}
        fused = torch.compile(fused_block, backend="lynx", options=options)
        plain = torch.compile(plain_block, backend="lynx", options=options)
        with torch.no_grad():
            want = fused(x)  # compiles with the rewrite
            cpu_fusion.fuse_route_experts = lambda graph: 0
            try:
                got = plain(x)  # compiles without it
            finally:
                cpu_fusion.fuse_route_experts = fuse
            if not torch.equal(want, got):
                raise SystemExit(f"batch {batch}: the two builds differ by "
                                 f"{(want - got).abs().max().item():.3g}")  # fmt: skip
            exact, _ = bench_real._experts_touched(fused_block, u, batch, torch.bfloat16)
            fns = {"fused": fused, "unfused": plain, "floor": floor}
            samples = bench.time_interleaved(fns, (x,), cpu, 2, args.rounds, args.calls)
        floor_ms = samples.pop("floor")
        nbytes = exact * routed + shared + router
        for name, ms in samples.items():
            _, fraction, _ = bench_real.paired_floor(ms, floor_ms, nbytes, args.calls)
            print(f"  batch {batch:3d} {name:8s} {statistics.median(ms):8.3f} ms  "
                  f"floor fraction {fraction:.3f}")  # fmt: skip
        ratio = bench.paired_ratio(samples["fused"], samples["unfused"], args.calls)
        print(f"  batch {batch:3d} fused / unfused {ratio:.3f}x ({exact:.1f} experts)")


if __name__ == "__main__":
    main()
