"""Build the Triton experts kernels for sm_90 (H100/H200) on a machine without a GPU and
report what the build says about them: shared memory, registers, spills, and which copy and
matrix instructions they use (cp.async, cp.async.bulk.tensor = TMA, wgmma, mma.sync).

    python benchmarks/experts_sm90_build.py                    # both presets, bf16
    python benchmarks/experts_sm90_build.py --preset qwen3-30b-a3b --kernels up,down --tma

Nothing runs: triton.compile targets sm_90 directly and ptxas (Triton's own) assembles
the PTX. The launch configs are the runtime's (lowering/launch_configs.py: stored, else
the default heuristic). Integer arguments that the launcher would see as multiples of 16
are marked so (as Triton specializes them at launch), stride 1 as a constant.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KERNELS = ("count", "scatter", "up", "down", "combine")


def build(kernel, types: dict, constexprs: dict, div16: tuple, warps: int, stages: int) -> dict:
    """Compile one kernel for sm_90; return its resource and instruction counts."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(names)
        if n not in constexprs and (signature[n].startswith("*") or n in div16)
    }
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": warps, "num_stages": stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        report = subprocess.run(
            [get_ptxas(90).path, "-arch=sm_90a", "-v", str(path), "-o", os.devnull],
            capture_output=True,
            text=True,
        ).stderr
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    return {
        "shared_kb": compiled.metadata.shared / 1024,
        "registers": int(regs.group(1)) if regs else None,
        "spill_bytes": int(spills.group(1)) if spills else None,
        "cp_async": len(re.findall(r"cp\.async\.c[ag]", ptx)),
        "tma": ptx.count("cp.async.bulk.tensor"),
        "wgmma": ptx.count("wgmma.mma_async"),
        "mma_sync": ptx.count("mma.sync"),
    }


def preset_builds(preset: str, dtype_name: str, tma: bool, kernels: tuple) -> list[tuple]:
    """(label, kernel, types, constexprs, div16, warps, stages) for one MoE shape."""
    import torch
    from lynx_compile.lowering import launch_configs, triton_experts, tuner
    from lynx_compile.lowering.constants import ACTIVATION_CODES

    experts, hidden, inter, top_k = tuner.PRESETS[preset]
    dtype = tuner.DTYPES[dtype_name]
    elem = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
    config = launch_configs.experts_config(experts, hidden, inter, 64, top_k, dtype, "NVIDIA H200")
    classes = launch_configs.ROW_TILES.index(config.block_m) + 1
    block_e = triton_experts.triton.next_power_of_2(experts)
    block_a = max(16, 8192 // block_e)
    index = {"sorted_ptr": "*i32", "tiles_ptr": "*i32", "plan_ptr": "*i32"}
    precision = "ieee" if dtype == torch.float32 else "tf32"
    common = dict(PRECISION=precision, USE_TMA=tma, NUM_ROW_CLASSES=classes, stride_wk=1)
    builds = {
        "count": (
            triton_experts.count_kernel, {"ids_ptr": "*i64", "chunk_counts_ptr": "*i32"},
            dict(BLOCK_A=block_a, BLOCK_E=block_e), (), 4, 1,
        ),
        "scatter": (
            triton_experts.scatter_kernel, {"ids_ptr": "*i64", "chunk_counts_ptr": "*i32", **index},
            dict(BLOCK_A=block_a, BLOCK_E=block_e, BLOCK_C=max(1, 4096 // block_e),
                 MAX_BLOCK_M=config.block_m, LOG2_SPLIT=config.split_k.bit_length() - 1),
            (), 4, 1,
        ),
        "up": (
            triton_experts.up_kernel, {"x_ptr": elem, "w_ptr": elem, "h_ptr": elem, **index},
            dict(common, ACTIVATION=ACTIVATION_CODES["silu"], GATED=True,
                 BLOCK_N=config.up.block_n, BLOCK_K=config.up.block_k),
            ("hidden", "inter", "max_tiles", "up_rows", "w_rows", "stride_xt", "stride_we",
             "stride_wn", "stride_ht"),
            config.up.num_warps, config.up.num_stages,
        ),
        "down": (
            triton_experts.down_kernel,
            {"h_ptr": elem, "w_ptr": elem, "y_ptr": "*fp32", **index},
            dict(common, BLOCK_N=config.down.block_n, BLOCK_K=config.down.block_k),
            ("hidden", "inter", "max_tiles", "w_rows", "stride_ht", "stride_we", "stride_wn",
             "stride_ys", "stride_yt"),
            config.down.num_warps, config.down.num_stages,
        ),
        "combine": (
            triton_experts.combine_kernel,
            {"y_ptr": "*fp32", "route_w_ptr": elem, "out_ptr": elem, "plan_ptr": "*i32"},
            dict(BLOCK_D=min(1024, triton_experts.triton.next_power_of_2(hidden))),
            ("hidden", "stride_ys", "stride_yt", "stride_ot"), 4, 1,
        ),
    }  # fmt: skip
    return [(f"{preset} {name}", *builds[name]) for name in kernels]


def main(argv: list[str] | None = None) -> int:
    """Build and print one line per kernel."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", action="append", help="tuner preset (default: every preset); repeatable"
    )
    parser.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32 weights")
    parser.add_argument("--tma", action="store_true", help="tensor-descriptor weight loads")
    parser.add_argument(
        "--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {KERNELS}"
    )
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # real compiles; must precede the kernel imports
    from lynx_compile.lowering import tuner

    kernels = tuple(k for k in args.kernels.split(",") if k)
    unknown = set(kernels) - set(KERNELS)
    if unknown:
        parser.error(f"unknown kernels {sorted(unknown)}; choose from {KERNELS}")
    print("| kernel | warps | stages | shared KB | registers | spills B | cp.async | TMA | "
          "wgmma | mma.sync |")  # fmt: skip
    for preset in args.preset or sorted(tuner.PRESETS):
        for label, kernel, types, consts, div16, warps, stages in preset_builds(
            preset, args.dtype, args.tma, kernels
        ):
            r = build(kernel, types, consts, div16, warps, stages)
            print(
                f"| {label} | {warps} | {stages} | {r['shared_kb']:.0f} | {r['registers']} | "
                f"{r['spill_bytes']} | {r['cp_async']} | {r['tma']} | {r['wgmma']} | "
                f"{r['mma_sync']} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
