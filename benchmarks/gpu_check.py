"""One GPU check (a single call of at most ~5 minutes on an H200): correctness of the Triton
routing and experts kernels against the reference, the routing kernel's latency, and one
MoE block per shape at decode batches, stock vs lynx, against the bandwidth floor.

    python benchmarks/gpu_check.py              # on the GPU; writes docs/results/gpu_check.*
    python benchmarks/gpu_check.py --dry-run    # on CPU: tiny shapes, TRITON_INTERPRET=1,
                                                # exercises every path, no timing claims

Rows (docs/results/gpu_check.json `rows`): shape, backend, batch, ms, experts_touched,
floor_ms, floor_fraction. floor_ms = experts touched x bytes of one expert / measured
copy bandwidth (bytes read + written by a device-to-device copy per second), the least
time that reading those weights can take; floor_fraction = floor_ms / ms (1.0 = the
physical limit). Backends:
  hf-grouped-compile     transformers block, experts_implementation "grouped_mm",
                         torch.compile default mode
  lynx-exact             the block's router linear + lynx Triton route (exact) + Triton
                         experts, called directly
  lynx-affinity          the same with AffinityBinning (the model family's alpha, beta)
  lynx-*-compiled        torch.compile(block, backend="lynx", options={"policy": ...})
Every step records its error in the JSON and the script continues.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The GPU image reaches no registry, so the checkout may not be pip-installed: import it
# from here (lynx_compile maps passes/, lowering/ and examples/ itself in that case).
sys.path.insert(0, str(REPO))
TIME_BUDGET_S = 240.0  # the whole check must fit one 5-minute call, start-up included


@dataclass(frozen=True)
class Shape:
    """One MoE block to time: the model it stands for and its dimensions."""

    name: str
    family: str  # lynx_compile.tools.hf_tiny family
    hidden: int
    inter: int
    experts: int
    top_k: int
    alpha: float  # AffinityBinning parameters the LYNX reference uses for this model
    beta: float

    def config_overrides(self) -> dict:
        """hf_tiny.tiny_config overrides that give the block this shape."""
        if self.family == "mixtral":
            return dict(
                hidden_size=self.hidden,
                intermediate_size=self.inter,
                num_local_experts=self.experts,
                num_experts_per_tok=self.top_k,
            )
        return dict(
            hidden_size=self.hidden,
            moe_intermediate_size=self.inter,
            num_experts=self.experts,
            num_experts_per_tok=self.top_k,
            norm_topk_prob=True,
        )


GPU_SHAPES = [
    Shape("Mixtral-8x7B", "mixtral", 4096, 14336, 8, 2, 0.7, 1.0),
    Shape("Qwen3-30B-A3B", "qwen3_moe", 2048, 768, 128, 8, 3.0, 2.0),
]
DRY_SHAPES = [
    Shape("tiny-mixtral", "mixtral", 64, 48, 8, 2, 0.7, 1.0),
    Shape("tiny-qwen3", "qwen3_moe", 32, 24, 16, 4, 3.0, 2.0),
]


class Check:
    """Collects rows, errors and notes; prints as it goes; writes JSON and Markdown."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.start = time.perf_counter()
        self.result = {"dry_run": dry_run, "rows": [], "correctness": [], "errors": []}
        self.lines: list[str] = []

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def attempt(self, what: str, fn, *args, **kwargs):
        """Run one step; on failure record `what` and the error, and return None."""
        if self.elapsed() > TIME_BUDGET_S:
            self.result["errors"].append({"step": what, "error": "skipped: time budget spent"})
            self.say(f"SKIP {what}: time budget spent")
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            self.result["errors"].append(
                {"step": what, "error": f"{type(err).__name__}: {err}"[:2000]}
            )
            self.say(f"ERROR {what}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            traceback.print_exc(limit=3)
            return None


def median_ms(torch, fn, iters: int, warmup: int = 10) -> float:
    """Median of `iters` CUDA-event timings of fn() after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_bandwidth_gbs(torch, check: Check) -> float:
    """Device-to-device copy of 1 GiB: (bytes read + bytes written) / median time."""
    src = torch.empty(2**29, dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(torch, lambda: dst.copy_(src), iters=50)
    gbs = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
    check.say(f"copy bandwidth: {gbs:.0f} GB/s (1 GiB device-to-device, median of 50)")
    return gbs


def spaced_logits(torch, tokens, experts, dtype, device, gen):
    """[tokens, experts] rows of distinct, spaced scores (no probability ties)."""
    keys = torch.rand(tokens, experts, generator=gen, device=device)
    ranks = keys.argsort(dim=1).argsort(dim=1).float()
    noise = 1e-3 * torch.rand(tokens, experts, generator=gen, device=device)
    return (ranks * (4.0 / experts) + noise).to(dtype)


@contextlib.contextmanager
def poisoned(torch, module):
    """Inside the block, every buffer `module`'s wrapper allocates starts as NaN / -1 (so an
    unwritten row shows); restored after, so no timed call pays the fills."""

    def empty(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)

    original, module._empty = module._empty, empty
    try:
        yield
    finally:
        module._empty = original


def check_route(torch, check: Check, device, gen) -> None:
    """Every policy and convention, fp32/bf16/fp16: ids exact, weights close, nothing unwritten."""
    from lynx_compile.lowering import triton_route

    # (dtype, tokens, experts, k, policy, weights): each distinct (dtype, E, k, policy,
    # weights) compiles a kernel (seconds each), so the list is chosen, not a product
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    cases = [
        (bf16, 64, 128, 8, "exact", "renorm"),
        (bf16, 64, 128, 8, "affinity", "renorm"),
        (bf16, 256, 128, 8, "affinity", "renorm"),
        (bf16, 33, 128, 8, "affinity", "mass"),
        (bf16, 64, 128, 8, "oea", "renorm"),
        (bf16, 64, 128, 8, "static", "mass"),
        (f32, 1, 8, 2, "affinity", "renorm"),
        (f32, 64, 8, 2, "affinity", "renorm"),
        (f32, 1024, 512, 16, "affinity", "renorm"),
        (f16, 13, 60, 2, "affinity", "mass"),
    ]
    if check.dry_run:
        cases = [(f32, 3, 8, 2, "affinity", "renorm"), (f16, 13, 60, 8, "static", "mass")]
    tol = {f32: 1e-5, bf16: 1e-2, f16: 2e-3}
    with poisoned(torch, triton_route):
        _route_cases(torch, check, device, gen, cases, tol)
    bad = [c for c in check.result["correctness"] if c["kernel"] == "route" and not c["ok"]]
    total = sum(c["kernel"] == "route" for c in check.result["correctness"])
    check.say(f"route correctness: {total - len(bad)}/{total} cases ok")
    for c in bad[:10]:
        check.say(f"  FAIL {c}")


def _route_cases(torch, check: Check, device, gen, cases, tol) -> None:
    from lynx_compile.lowering import reference, triton_route

    for dtype, tokens, experts, k, policy, conv in cases:
        for _ in range(2):  # two fresh inputs per compiled kernel
            logits = spaced_logits(torch, tokens, experts, dtype, device, gen)
            pol = reference.RoutingPolicy(policy, 3.0, 2.0, 2, 16)
            want_w, want_ids = reference.route_reference(logits, k, pol, conv)
            got_w, got_ids = triton_route.route(logits, k, policy, 3.0, 2.0, 2, 16, conv)
            ids_ok = bool(torch.equal(got_ids, want_ids))
            err = float((got_w.float() - want_w.float()).abs().max())
            unwritten = bool(torch.isnan(got_w).any() or (got_ids < 0).any())
            check.result["correctness"].append(
                {
                    "kernel": "route",
                    "dtype": str(dtype).removeprefix("torch."),
                    "tokens": tokens,
                    "experts": experts,
                    "top_k": k,
                    "policy": policy,
                    "weights": conv,
                    "ids_equal": ids_ok,
                    "weight_abs_err": err,
                    "unwritten": unwritten,
                    "ok": ids_ok and err <= tol[dtype] and not unwritten,
                }
            )


def check_experts(torch, check: Check, device, gen) -> None:
    """bf16/fp16/fp32 against the reference (bf16 relative error < 1e-2), poisoned buffers."""
    from lynx_compile.lowering import reference, triton_experts

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    cases = [
        # dtype, tokens, experts, k, hidden, inter, activation, gated
        (bf16, 1, 8, 2, 4096, 1024, "silu", True),
        (bf16, 16, 128, 8, 2048, 768, "silu", True),
        (bf16, 64, 128, 8, 2048, 768, "silu", True),
        (bf16, 200, 60, 4, 1024, 1408, "gelu_tanh", False),
        (f16, 16, 128, 8, 2048, 768, "gelu", True),
        (f32, 13, 60, 4, 1024, 1408, "relu", False),
    ]
    if check.dry_run:  # the interpreter cannot run bf16 tl.dot
        cases = [(f16, 3, 8, 2, 32, 24, "silu", True), (f32, 3, 8, 2, 32, 24, "gelu", False)]
    tol = {f32: 1e-4, bf16: 1e-2, f16: 4e-3}
    with poisoned(torch, triton_experts):
        for dtype, tokens, experts, k, hidden, inter, activation, gated in cases:
            x = torch.randn(tokens, hidden, generator=gen, device=device).to(dtype)
            logits = torch.randn(tokens, experts, generator=gen, device=device)
            weights, ids = torch.topk(torch.softmax(logits, -1), k, dim=-1)
            up_rows = 2 * inter if gated else inter
            w_up = torch.randn(experts, up_rows, hidden, generator=gen, device=device)
            w_down = torch.randn(experts, hidden, inter, generator=gen, device=device)
            w_up = (w_up / hidden**0.5).to(dtype)
            w_down = (w_down / inter**0.5).to(dtype)
            args = (x, ids, weights, w_up, w_down, activation, gated)
            want = reference.experts_reference(*args)
            got = triton_experts.experts(*args)
            unwritten = bool(torch.isnan(got).any())
            scale = want.float().abs().max().clamp(min=1e-6)
            rel = float((got.float() - want.float()).abs().max() / scale)
            check.result["correctness"].append(
                {
                    "kernel": "experts",
                    "dtype": str(dtype).removeprefix("torch."),
                    "tokens": tokens,
                    "experts": experts,
                    "top_k": k,
                    "hidden": hidden,
                    "inter": inter,
                    "activation": activation,
                    "gated": gated,
                    "rel_err": rel,
                    "unwritten": unwritten,
                    "ok": rel < tol[dtype] and not unwritten,
                }
            )
    rows = [c for c in check.result["correctness"] if c["kernel"] == "experts"]
    bad = [c for c in rows if not c["ok"]]
    check.say(f"experts correctness: {len(rows) - len(bad)}/{len(rows)} cases ok")
    for c in bad[:10]:
        check.say(f"  FAIL {c}")


def time_route(torch, check: Check, device, gen) -> None:
    """The routing kernel at 64 tokens x 128 experts, top-8, fp32 logits (what the HF router
    feeds): plain launches (includes Python launch cost) and replayed from a CUDA graph."""
    from lynx_compile.lowering import triton_route

    logits = torch.randn(64, 128, generator=gen, device=device)
    for policy in ("exact", "affinity"):

        def call(policy=policy):
            return triton_route.route(logits, 8, policy, 3.0, 2.0, 2, 16, "renorm")

        plain = median_ms(torch, call, iters=200)
        call()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        reps = 20
        with torch.cuda.graph(graph):
            for _ in range(reps):
                call()
        graphed = median_ms(torch, graph.replay, iters=50) / reps
        check.result.setdefault("route_timing", []).append(
            {
                "tokens": 64,
                "experts": 128,
                "top_k": 8,
                "policy": policy,
                "us_launch": plain * 1e3,
                "us_cuda_graph": graphed * 1e3,
                "target_us": 10.0,
            }
        )
        check.say(
            f"route 64x128 top-8 {policy}: {plain * 1e3:.1f} us per launch, "
            f"{graphed * 1e3:.1f} us in a CUDA graph (target <= 10 us)"
        )


def build_block(torch, shape: Shape, device, dtype, seed: int):
    """A transformers sparse-MoE block of `shape` on the GPU, grouped_mm experts,
    random weights scaled by 1/sqrt(fan_in) (eval mode)."""
    from lynx_compile.tools import hf_tiny

    _, _, block_cls = hf_tiny._classes(shape.family)
    config = hf_tiny.tiny_config(shape.family, "grouped_mm", **shape.config_overrides())
    with torch.device(device):
        block = block_cls(config).to(dtype).eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(generator=gen).div_(p.shape[-1] ** 0.5)
    return block


def lynx_forward(torch, block, shape: Shape, policy: str):
    """x [B, 1, d] -> [B, 1, d]: router linear, Triton route, Triton experts."""
    from lynx_compile.lowering import triton_experts, triton_route

    gate_w = block.gate.weight
    w_up, w_down = block.experts.gate_up_proj, block.experts.down_proj

    def forward(x):
        flat = x.view(-1, x.shape[-1])
        logits = torch.nn.functional.linear(flat, gate_w).float()  # the HF router's fp32 scores
        weights, ids = triton_route.route(
            logits, shape.top_k, policy, shape.alpha, shape.beta, 2, 16, "renorm"
        )
        out = triton_experts.experts(flat, ids, weights, w_up, w_down, "silu", True)
        return out.view_as(x), ids

    return forward


def expert_bytes(shape: Shape, dtype_bytes: int) -> int:
    """Bytes of one gated expert's weights: gate+up [2I, d] and down [d, I]."""
    return 3 * shape.hidden * shape.inter * dtype_bytes


def time_blocks(torch, check: Check, device, bandwidth_gbs: float | None) -> None:
    """Each shape x batch x backend: ms, experts touched, floor, floor fraction. The direct
    lynx rows and the stock baseline come first; the lynx-compiled rows (extra compiles)
    last, so the time budget drops them first."""
    dtype = torch.float32 if check.dry_run else torch.bfloat16
    shapes = DRY_SHAPES if check.dry_run else GPU_SHAPES
    blocks = {}
    for shape in shapes:
        block = check.attempt(f"build {shape.name}", build_block, torch, shape, device, dtype, 0)
        if block is None:
            continue
        blocks[shape.name] = block
        runs = {f"lynx-{p}": lynx_forward(torch, block, shape, p) for p in ("exact", "affinity")}
        runs["hf-grouped-compile"] = with_exact_ids(torch, torch.compile(block), block, shape)
        time_runs(torch, check, shape, block, runs, bandwidth_gbs)
    for shape in shapes[:1] if check.dry_run else shapes:  # the CPU dry run compiles lynx once
        if shape.name not in blocks:
            continue
        block = blocks[shape.name]
        check.attempt(
            f"compiled kernels {shape.name}", check_compiled_kernels, torch, check, block, shape
        )
        runs = {}
        for policy in ("exact", "affinity"):
            options = {"policy": policy, "alpha": shape.alpha, "beta": shape.beta}
            fn = torch.compile(block, backend="lynx", options=options)
            missing = check.attempt(f"lynx rewrite {shape.name}", lynx_missing, torch, fn, shape)
            if missing:  # timing it would time stock Inductor under lynx's name
                check.result["errors"].append({"step": f"lynx-{policy}-compiled", "error": missing})
                check.say(f"ERROR lynx-{policy}-compiled {shape.name}: {missing}")
                continue
            # experts touched under a compiled affinity router are not observable here
            runs[f"lynx-{policy}-compiled"] = (
                with_exact_ids(torch, fn, block, shape) if policy == "exact" else without_ids(fn)
            )
        time_runs(torch, check, shape, block, runs, bandwidth_gbs)


def lynx_missing(torch, fn, shape: Shape) -> str:
    """Run a lynx-compiled block once on a decode batch: "" when lynx rewrote its router and
    its dispatch (lynx_compile.report()), else what it left alone and why."""
    import lynx_compile

    param = next(fn.parameters())
    lynx_compile.clear_report()
    with torch.no_grad():
        fn(torch.randn(16, 1, shape.hidden, device=param.device).to(param.dtype))
    sites = lynx_compile.report()["sites"]
    missing = {"router", "dispatch"} - {s["kind"] for s in sites if s["status"] == "rewritten"}
    if not missing:
        return ""
    skipped = [f"{s['kind']}: {s['reason']}" for s in sites if s["status"] == "skipped"]
    return f"not rewritten: {', '.join(sorted(missing))} ({'; '.join(skipped) or 'no site'})"


def check_compiled_kernels(torch, check: Check, block, shape: Shape) -> None:
    """The lynx-compiled block's generated code launches lynx's Triton kernels (traced into
    the graph by the ops' FunctionalTensorMode rule) and matches the block under exact."""
    from torch._inductor.utils import run_and_get_code

    x = torch.randn(16, 1, shape.hidden, device=next(block.parameters()).device)
    x = x.to(next(block.parameters()).dtype)
    torch._dynamo.reset()
    fn = torch.compile(block, backend="lynx", options={"policy": "exact"})
    with torch.no_grad():
        out, code = run_and_get_code(fn, x)
        want = block(x)
    source = "\n".join(code)
    out = out[0] if isinstance(out, tuple) else out
    want = want[0] if isinstance(want, tuple) else want
    err = float((out.float() - want.float()).abs().max() / want.float().abs().max())
    on_gpu = not check.dry_run
    found = {name: name in source for name in ("route_kernel", "up_kernel", "down_kernel")}
    ok = err <= (1e-2 if out.dtype == torch.bfloat16 else 1e-5) and (
        all(found.values()) or not on_gpu
    )
    check.result["correctness"].append(
        {"kernel": "compiled_block", "shape": shape.name, "kernels_in_code": found,
         "rel_err_vs_eager": err, "ok": ok}
    )  # fmt: skip
    check.say(f"compiled lynx block {shape.name}: kernels {found}, rel err {err:.2e}, ok={ok}")


def with_exact_ids(torch, fn, block, shape: Shape):
    """Wrap a block call as x -> (out, ids of the exact top-k) for experts touched."""

    def call(x):
        logits = torch.nn.functional.linear(x.view(-1, shape.hidden), block.gate.weight)
        return fn(x), torch.topk(logits, shape.top_k).indices

    return call


def without_ids(fn):
    """Wrap a block call as x -> (out, None): experts touched unknown."""
    return lambda x: (fn(x), None)


def time_runs(torch, check: Check, shape: Shape, block, runs: dict, bandwidth_gbs) -> None:
    """Time every run at every batch; compare exact runs with the HF block's output."""
    from lynx_compile.lowering import reference

    dtype = next(block.parameters()).dtype
    per_expert = expert_bytes(shape, torch.finfo(dtype).bits // 8)
    batches = (1, 3) if check.dry_run else (1, 16, 64, 256)
    for batch in batches:
        gen = torch.Generator(device=block.gate.weight.device).manual_seed(batch)
        x = torch.randn(batch, 1, shape.hidden, generator=gen, device=gen.device).to(dtype)
        with torch.no_grad():
            want = block(x)
            for name, fn in runs.items():

                def measure(fn=fn, name=name, x=x, batch=batch, want=want):
                    out, ids = fn(x)
                    touched = None if ids is None else reference.distinct_experts(ids)
                    time_one(
                        torch, check, shape, name, batch, lambda: fn(x)[0], out, touched,
                        want, per_expert, bandwidth_gbs,
                    )  # fmt: skip

                check.attempt(f"{shape.name} {name} batch {batch}", measure)


def time_one(torch, check, shape, name, batch, fn, out, touched, want, per_expert, bandwidth_gbs):
    """One row: compare with the HF block (exact routing only), time, floor."""
    if "affinity" not in name:
        scale = want.float().abs().max().clamp(min=1e-6)
        rel = float((out.float() - want.float()).abs().max() / scale)
        if rel > 2e-2:
            raise AssertionError(f"output differs from the HF block: relative error {rel:.3g}")
    ms = None if check.dry_run else median_ms(torch, fn, iters=50)
    floor_ms = None
    if touched is not None and bandwidth_gbs:
        floor_ms = touched * per_expert / (bandwidth_gbs * 1e9) * 1e3
    row = {
        "shape": shape.name,
        "backend": name,
        "batch": batch,
        "ms": ms,
        "experts_touched": touched,
        "floor_ms": floor_ms,
        "floor_fraction": floor_ms / ms if (floor_ms and ms) else None,
    }
    check.result["rows"].append(row)

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    check.say(
        f"| {shape.name} | {name} | {batch} | {fmt(touched, 'd')} | {fmt(ms, '.4f')} | "
        f"{fmt(floor_ms, '.4f')} | {fmt(row['floor_fraction'], '.2f')} |"
    )


def environment(torch) -> dict:
    """GPU name and library versions."""
    import transformers
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU dry run)"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
    }


def main(argv: list[str] | None = None) -> int:
    """Run every check; exit 0 when it ran (failures are recorded), 2 without a GPU."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU: tiny shapes under TRITON_INTERPRET=1, no timings (checks the script)",
    )
    parser.add_argument(
        "--out",
        default=str(Path(os.environ["OUT"]) / "gpu_check.json")
        if os.environ.get("OUT")
        else str(REPO / "docs" / "results" / "gpu_check.json"),
        help="JSON path; a Markdown copy of the printed output goes next to it (.md); "
        "default $OUT/gpu_check.json where $OUT is set (the device machine returns only "
        "what is written there), else docs/results/gpu_check.json",
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    import torch
    from lynx_compile.lowering import triton_ops  # noqa: F401  (Triton CUDA kernels for lynx::*)

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run it on the GPU, or pass --dry-run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    check = Check(args.dry_run)
    check.result["environment"] = environment(torch)
    check.say(f"gpu_check on {check.result['environment']}")
    seed = int(time.time()) % 2**31  # fresh inputs each run; recorded to reproduce
    check.result["seed"] = seed
    gen = torch.Generator(device=device).manual_seed(seed)
    bandwidth = None
    if not args.dry_run:
        bandwidth = check.attempt("copy bandwidth", copy_bandwidth_gbs, torch, check)
    else:
        bandwidth = 4151.0  # the anchors' H200 copy bandwidth, only to exercise the floor math
    check.result["copy_bandwidth_gbs"] = bandwidth
    check.attempt("route correctness", check_route, torch, check, device, gen)
    check.attempt("experts correctness", check_experts, torch, check, device, gen)
    if not args.dry_run:
        check.attempt("route timing", time_route, torch, check, device, gen)
    check.say("| shape | backend | batch | experts | ms | floor ms | floor/ms |")
    check.say("| --- | --- | --- | --- | --- | --- | --- |")
    check.attempt("block timing", time_blocks, torch, check, device, bandwidth)
    check.result["seconds"] = check.elapsed()
    check.say(f"done in {check.elapsed():.0f} s, {len(check.result['errors'])} errors")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(check.result, indent=1) + "\n")
    title = "# gpu_check" + (" (dry run: no timings)" if args.dry_run else "")
    out.with_suffix(".md").write_text(title + "\n\n```\n" + "\n".join(check.lines) + "\n```\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
