"""Several real-size MoE blocks compiled as one model: the per-layer cost a decode step pays.

    python benchmarks/real_stack.py --shape Qwen3-30B-A3B --layers 4 --batch 1 4 16 --threads 2

`lynx-compile bench --suite real` compiles one MoE block per row, so every call pays Dynamo's
frame (its entry, guards and wrappers: ~0.3-0.4 ms with the caches cold on this VM,
`benchmarks/cpu_call_overhead.py`) on top of one layer's weight reads. A user compiles the
whole model, and that frame is paid once per decode step, not once per layer. Here `--layers`
blocks of the suite's (bench_real.build, one seed each, at published dimensions) run as one
module, x <- x + block(x) per layer, compiled once per backend: eager, stock Inductor and
lynx exact, timed in interleaved rounds beside the suite's paired floor (a 1 GiB float32
sum). Per row: ms per layer (a call's median / layers), lynx exact / Inductor (paired, median
over rounds), the experts each layer touches (exact routing, counted in eager), the bytes a
call must read (every layer's touched experts, shared experts and router) and the floor
fraction (bench_real.paired_floor: that round's floor time for those bytes / the median).

The inputs carry every layer's popular direction (the sum of the layers' `u`), so each
layer's router sees the popularity skew the suite gives one block.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from lynx_compile.tools import bench, bench_real

import lynx_compile  # noqa: F401  (registers the backend)


class Stack(torch.nn.Module):
    """Blocks applied in turn with a residual, as a decoder's MoE layers are."""

    def __init__(self, blocks: list[torch.nn.Module]):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            out = block(x)
            x = x + (out[0] if isinstance(out, tuple) else out)
        return x


def eager_with_hooks(stack: Stack, x: torch.Tensor, part: str, hook) -> None:
    """One eager call of the stack on x with `hook` as a forward pre-hook on each block's `part`
    (its router "gate" or its "experts" module)."""
    handles = [getattr(b, part).register_forward_pre_hook(hook) for b in stack.blocks]
    try:
        with torch.no_grad():
            stack(x)
    finally:
        for h in handles:
            h.remove()


def touched_per_layer(stack: Stack, x: torch.Tensor) -> list[int]:
    """Distinct experts each layer's exact routing picks for x: the ids the model passes to
    its experts module, caught in eager."""
    seen: list[int] = []
    eager_with_hooks(stack, x, "experts", lambda _m, args: seen.append(args[1].unique().numel()))
    if len(seen) != len(stack.blocks):
        raise RuntimeError(f"caught {len(seen)} expert calls for {len(stack.blocks)} layers")
    return seen


MARGIN = 0.05  # logit units: 3 bf16 ulps at the top logits' magnitude (2 to 4)


def routing_margin(stack: Stack, x: torch.Tensor, top_k: int) -> float:
    """The smallest gap, over tokens and layers, between a token's k-th and (k+1)-th router
    logit in eager: below a few bf16 ulps, another summation order may pick another expert."""
    gaps: list[float] = []

    def hook(module, args):
        logits = torch.nn.functional.linear(args[0], module.weight).float()
        top = logits.reshape(-1, logits.shape[-1]).topk(top_k + 1, dim=-1).values
        gaps.append((top[:, top_k - 1] - top[:, top_k]).min().item())

    eager_with_hooks(stack, x, "gate", hook)
    return min(gaps)


def check_fused(fns: dict, stack: Stack, make_x, top_k: int) -> None:
    """Every layer's router and experts rewritten by lynx, and lynx exact equal to eager
    within bf16 tolerance, or a SystemExit saying which failed: a timing of a model lynx did
    not rewrite would measure Inductor. The input checked is the first token (of seeds
    0, 1, ...) whose routing has no near-tie in any layer (`routing_margin` >= MARGIN):
    at a tie, one layer's reordered sums change the next layer's input by an ulp and can
    flip its pick (Mixtral, 2 layers, 3 tokens of seed 3: logits 2.375 / 2.375 at the
    second choice), a legitimate difference that is no sign of a wrong rewrite. Qwen3's
    128-expert routers have near-ties at the 8th choice for most tokens in some layer, so
    one token is checked (the suite and tests check every batch size block by block)."""
    for seed in range(100):
        x = make_x(seed)
        if routing_margin(stack, x, top_k) >= MARGIN:
            break
    else:
        raise SystemExit("no checking input without a near-tie in 100 draws")
    lynx_compile.clear_report()
    with torch.no_grad():
        want, got = stack(x).float(), fns["lynx-exact"](x).float()
    sites = lynx_compile.report()["sites"]
    for kind in ("router", "dispatch"):
        done = sum(s["kind"] == kind and s["status"] == "rewritten" for s in sites)
        if done != len(stack.blocks):
            raise SystemExit(f"lynx rewrote {done} {kind} sites of {len(stack.blocks)} layers")
    # bf16 through a few residual layers: 4 bf16 ulps (2^-7 relative spacing) of the
    # largest output; a wrong rewrite (another layer's weights, a lost expert) is O(1) off
    diff = (got - want).abs().max().item()
    if diff > 4 * 2**-7 * max(1.0, want.abs().max().item()):
        raise SystemExit(f"lynx exact differs from eager by {diff:.3g} (seed {seed})")
    print(
        f"checked: {len(stack.blocks)} routers and experts rewritten; lynx exact vs eager "
        f"max |diff| {diff:.3g} on one token (seed {seed})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="Qwen3-30B-A3B",
                        choices=[s.name for s in bench_real.SHAPES])  # fmt: skip
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--threads", type=int, default=0, help="0: every core")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="toy dimensions (a smoke run)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = next(s for s in bench_real.SHAPES if s.name == args.shape)
    dtype = torch.bfloat16
    config = bench_real.RealConfig()  # the suite's memory headroom and turn length
    need = args.layers * bench_real.block_bytes(shape, args.quick, dtype)
    free = bench_real.mem_available()
    if free and need + config.headroom * 2**30 > free:
        raise SystemExit(
            f"{args.layers} layers need {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB "
            f"available (keeping {config.headroom:.0f} GiB free): pass fewer --layers"
        )
    built = [bench_real.build(shape, args.quick, dtype, seed=s) for s in range(args.layers)]
    blocks, us = [b for b, _ in built], [u for _, u in built]
    stack = Stack(blocks).eval()
    u = torch.stack(us).sum(0)
    routed, shared, router = bench_real.expert_sizes(blocks[0])
    fns = {
        "eager": stack,
        "inductor": torch.compile(stack),
        "lynx-exact": torch.compile(stack, backend="lynx", options={"policy": "exact"}),
    }
    make_x = lambda seed: bench_real.make_inputs(u, 1, dtype, seed)  # noqa: E731
    check_fused(fns, stack, make_x, blocks[0].gate.top_k)
    read_floor = bench_real._summing(bench_real.floor_buffer())
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    print(f"{shape.name} x {args.layers} layers, bf16, {threads} threads, "
          f"{args.rounds} interleaved rounds; torch {torch.__version__}")  # fmt: skip
    print(
        "| B | experts per layer | MB per call | eager ms/layer | Inductor ms/layer "
        "| exact ms/layer | exact / Inductor | floor ms/layer | exact floor fraction |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch in args.batch:
        x = bench_real.make_inputs(u, batch, dtype, seed=batch)
        touched = touched_per_layer(stack, x)
        nbytes = sum(touched) * routed + args.layers * (shared + router)
        for fn in fns.values():  # the first call compiles
            bench.time_calls(fn, (x,), cpu, 2)
        calls = bench_real.calls_per_round(bench.time_calls(fns["inductor"], (x,), cpu, 2), config)
        timed = {**fns, bench_real.FLOOR: read_floor}
        samples = bench.time_interleaved(timed, (x,), cpu, 0, args.rounds, calls)
        floor_ms = samples.pop(bench_real.FLOOR)
        floor, fraction, _ = bench_real.paired_floor(samples["lynx-exact"], floor_ms, nbytes, calls)
        per = {k: statistics.median(v) / args.layers for k, v in samples.items()}
        ratio = statistics.median(
            bench_real.round_ratios(samples["lynx-exact"], samples["inductor"], calls)
        )
        print(f"| {batch} | {'/'.join(map(str, touched))} | {nbytes / 1e6:.1f} "
              f"| {per['eager']:.2f} | {per['inductor']:.2f} | {per['lynx-exact']:.2f} "
              f"| {ratio:.2f}x | {floor / args.layers:.2f} | {fraction:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
