"""`lynx-compile tune`: time launch configs of the sparse-experts kernels on this GPU and
write the JSON file that lowering/launch_configs.py reads at run time.

Search, per token bucket (coordinate descent, ~70 candidates instead of the product): the
largest row tile (block_m: which row-tile bodies the kernels hold), then the up GEMM's
tile, the down GEMM's tile, the most K splits, the persistent programs per SM and the
tensor-descriptor (TMA) weight loads. Kernels
compiled for one bucket are reused by the next, so compile time is paid once. Each
candidate is timed with triton.testing.do_bench (CUDA events, median, L2 cleared before
each call, so small shapes are not timed from cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from pathlib import Path

import torch
from lynx_compile.lowering import launch_configs
from lynx_compile.lowering.launch_configs import ROW_TILES, ExpertsConfig, GemmConfig

PRESETS = {
    # name: (experts, hidden, intermediate, top_k)
    "mixtral-8x7b": (8, 4096, 14336, 2),
    "qwen3-30b-a3b": (128, 2048, 768, 8),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GEMM_CANDIDATES = [
    GemmConfig(block_n, block_k, warps, stages)
    for block_n, block_k, (warps, stages) in itertools.product(
        (32, 64, 128), (64, 128, 256), ((4, 3), (4, 4), (8, 4))
    )
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `lynx-compile tune`."""
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="a known MoE shape (sets the four dims)"
    )
    parser.add_argument("--experts", type=int, default=128, help="number of experts E")
    parser.add_argument("--hidden", type=int, default=2048, help="model dimension d")
    parser.add_argument("--inter", type=int, default=768, help="expert intermediate size I")
    parser.add_argument("--top-k", type=int, default=8, help="experts per token")
    parser.add_argument(
        "--plain", action="store_true", help="ungated experts (w_up [E, I, d]); default gated"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weight dtype")
    parser.add_argument(
        "--batches",
        default="1,2,4,8,16,32,64,128,256",
        help="comma-separated token buckets to tune (powers of two)",
    )
    parser.add_argument(
        "--rep-ms", type=float, default=20.0, help="timed window per candidate (do_bench rep), ms"
    )
    parser.add_argument(
        "--out-dir",
        default=None,
        help="where to write the JSON (default: lowering/configs, read at run time)",
    )


def _median_ms(fn, rep_ms: float) -> float:
    """Median device time of fn() in ms (do_bench: CUDA events, L2 cleared before each
    call, repeated for about rep_ms after a 10 ms warm-up)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")


def _time_config(call, config: ExpertsConfig, rep_ms: float) -> float:
    """ms of one experts call with `config`; inf when it does not compile or launch."""
    try:
        return _median_ms(lambda: call(config), rep_ms)
    except Exception as err:  # a tile too big for shared memory, an unsupported combination
        print(f"  skip {config}: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
        return float("inf")


def tune_bucket(call, base: ExpertsConfig, rep_ms: float) -> tuple[ExpertsConfig, float]:
    """Coordinate descent over block_m, the up tile, the down tile, split_k, programs_per_sm."""
    best, best_ms = base, _time_config(call, base, rep_ms)
    steps = (
        [{"block_m": m} for m in ROW_TILES[1:]]
        + [{"up": up} for up in GEMM_CANDIDATES]
        + [{"down": down} for down in GEMM_CANDIDATES]
        + [{"split_k": s} for s in (1, 2, 4, 8)]
        + [{"programs_per_sm": p} for p in (1, 2, 4)]
        + [{"tma": True}]
    )
    for change in steps:
        cand = dataclasses.replace(best, **change)
        if cand == best:
            continue
        ms = _time_config(call, cand, rep_ms)
        best, best_ms = (cand, ms) if ms < best_ms else (best, best_ms)
    return best, best_ms


def run(args: argparse.Namespace) -> int:
    """Tune every requested bucket and write the JSON; 2 when there is no CUDA device."""
    if not torch.cuda.is_available():
        print(
            "lynx-compile tune: no CUDA device visible; run it on the GPU that will serve "
            "the model (launch configs are per GPU)",
            file=sys.stderr,
        )
        return 2
    from lynx_compile.lowering import triton_experts

    experts, hidden, inter, top_k = (
        PRESETS[args.preset] if args.preset else (args.experts, args.hidden, args.inter, args.top_k)
    )
    dtype = DTYPES[args.dtype]
    gated = not args.plain
    batches = sorted({int(b) for b in args.batches.split(",") if b.strip()})
    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(device)
    gen = torch.Generator(device=device).manual_seed(0)
    up_rows = 2 * inter if gated else inter
    w_up = torch.randn(experts, up_rows, hidden, device=device, dtype=dtype, generator=gen)
    w_down = torch.randn(experts, hidden, inter, device=device, dtype=dtype, generator=gen)
    w_up /= hidden**0.5
    w_down /= inter**0.5
    print(f"tuning E={experts} d={hidden} I={inter} k={top_k} {args.dtype} on {gpu}")
    table = {}
    for batch in batches:
        x = torch.randn(batch, hidden, device=device, dtype=dtype, generator=gen)
        logits = torch.randn(batch, experts, device=device, generator=gen)
        weights, ids = torch.topk(torch.softmax(logits, -1), top_k, dim=-1)
        weights = weights.to(dtype)

        def call(config, x=x, ids=ids, weights=weights):
            return triton_experts.experts(
                x, ids, weights, w_up, w_down, "silu", gated, config=config
            )

        base = launch_configs.default_config(experts, hidden, inter, batch, top_k, dtype)
        base_ms = _time_config(call, base, args.rep_ms)
        best, best_ms = tune_bucket(call, base, args.rep_ms)
        table[launch_configs.token_bucket(batch)] = best
        print(f"batch {batch}: default {base_ms:.4f} ms -> tuned {best_ms:.4f} ms  {best}")
    out_dir = Path(args.out_dir) if args.out_dir else None
    path = launch_configs.write_table(experts, hidden, inter, gpu, dtype, table, out_dir)
    print(f"wrote {path}")
    return 0
