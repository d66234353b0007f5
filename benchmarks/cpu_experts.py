"""lynx::experts' native CPU kernel alone at real expert sizes: GB/s against the read floor.

    python benchmarks/cpu_experts.py --shape mixtral --threads 1 --tokens 1 2 4 6 8 16
    python benchmarks/cpu_experts.py --shape qwen3 --threads 2 --batch 1 4 16 [--cold]

`--tokens m`: every call sends m tokens to one expert, cycling through ~3 GB of experts so
each call reads its weights from DRAM (the per-token-count cost of the streaming kernel;
docs/perf-notes.md cpu v12). `--batch B`: a decode batch of B tokens routed top-k over all
experts with a skewed popularity, as `lynx-compile bench --suite real` does (the op only,
no router); with `--cold` the layer's experts are a fresh draw from ~3 GB each call and each
call follows a 1 GiB sum, as between two calls of one layer in a decode step. The floor is
the suite's: the best pass of a 1 GiB float32 sum on the same threads, or with `--cold` the
sum timed just before each call (paired, the median of the per-call fractions).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from lynx_compile.lowering import cpu_native
from lynx_compile.tools.bench_real import FLOOR_BYTES, floor_buffer, read_bandwidth

SHAPES = {  # experts, d, intermediate, top-k (published dimensions)
    "qwen3": (128, 2048, 768, 8),
    "mixtral": (8, 4096, 14336, 2),
    "olmoe": (64, 2048, 1024, 8),
}


def random_experts(count: int, d: int, inter: int, dtype: torch.dtype, gen: torch.Generator):
    """Random fused gate/up [count, 2I, d] and down [count, d, I] weights."""
    w_up = torch.empty(count, 2 * inter, d, dtype=dtype).normal_(0, 0.02, generator=gen)
    w_down = torch.empty(count, d, inter, dtype=dtype).normal_(0, 0.02, generator=gen)
    return w_up, w_down


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mixtral")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, nargs="*", default=[])
    parser.add_argument("--batch", type=int, nargs="*", default=[])
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument(
        "--cold",
        action="store_true",
        help="--batch: fresh experts from ~3 GB each call, each after a timed 1 GiB sum",
    )
    args = parser.parse_args()
    if not cpu_native.available():
        raise SystemExit("the native CPU kernels are not built here (see lowering/cpu_native.py)")
    torch.set_num_threads(args.threads)
    experts, d, inter, top_k = SHAPES[args.shape]
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    per_expert = 3 * inter * d * dtype.itemsize  # gate, up, down
    floor = read_bandwidth()  # the real-size suite's floor, on these threads
    print(
        f"{args.shape} {args.dtype}: d {d}, intermediate {inter}, "
        f"{per_expert / 2**20:.1f} MiB per expert; {args.threads} threads; "
        f"read floor {floor / 1e9:.1f} GB/s"
    )
    gen = torch.Generator().manual_seed(0)
    if args.tokens:
        pool = max(2, min(experts, (3 << 30) // per_expert))  # ~3 GB: reads come from DRAM
        w_up, w_down = random_experts(pool, d, inter, dtype, gen)
        for m in args.tokens:
            x = torch.randn(m, d, generator=gen).to(dtype)
            weights = torch.ones(m, 1)
            times = []
            for rep in range(pool + args.reps):
                ids = torch.full((m, 1), rep % pool, dtype=torch.int64)
                t0 = time.perf_counter()
                torch.ops.lynx.experts(x, ids, weights, w_up, None, w_down, "silu", True)
                times.append(time.perf_counter() - t0)
            t = statistics.median(times[pool:])
            print(
                f"  {m:3d} tokens on one expert: {t * 1e3:7.2f} ms, {per_expert / t / 1e9:5.1f} "
                f"GB/s, {per_expert / t / floor:.2f} of the floor"
            )
    if args.batch:
        # --cold: the layer's experts are a fresh draw from ~3 GB each call, and each call
        # follows a timed 1 GiB sum, as in a decode step (other layers' weights streamed in
        # between); the fraction pairs each call with the sum just before it.
        pool = max(experts, (3 << 30) // per_expert) if args.cold else experts
        w_up, w_down = random_experts(pool, d, inter, dtype, gen)
        buf = floor_buffer() if args.cold else None
        popularity = torch.randn(experts, generator=gen) * 0.5
        for batch in args.batch:
            logits = torch.randn(batch, experts, generator=gen) + popularity
            ids = logits.topk(top_k, dim=-1).indices
            weights = torch.softmax(logits.gather(1, ids), -1)
            x = torch.randn(batch, d, generator=gen).to(dtype)
            touched = ids.unique().numel()
            read = touched * per_expert
            times, fractions = [], []
            for _ in range(2 + args.reps):
                layer = torch.randperm(pool, generator=gen)[:experts] if args.cold else None
                call_ids = layer[ids] if args.cold else ids
                if args.cold:
                    t0 = time.perf_counter()
                    buf.sum()
                    sum_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                torch.ops.lynx.experts(x, call_ids, weights, w_up, None, w_down, "silu", True)
                times.append(time.perf_counter() - t0)
                if args.cold:
                    fractions.append(read / times[-1] / (FLOOR_BYTES / sum_s))
            t = statistics.median(times[2:])
            fraction = statistics.median(fractions[2:]) if args.cold else read / t / floor
            most = torch.bincount(ids.flatten(), minlength=experts).max().item()
            print(
                f"  batch {batch:3d}: {touched} experts (<= {most} tokens each), {t * 1e3:7.2f} "
                f"ms, {read / t / 1e9:5.1f} GB/s, {fraction:.2f} of the floor"
                + (" (paired)" if args.cold else "")
            )


if __name__ == "__main__":
    main()
