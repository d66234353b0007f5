"""One GPU check (a single call of at most ~5 minutes on an H200): correctness of the Triton
routing kernels (softmax and scored routers) and experts kernels against the reference, the
routing kernels' latency, and one MoE block per shape at decode batches, stock vs lynx,
against the bandwidth floor.

    python benchmarks/gpu_check.py              # on the GPU; writes $OUT/gpu_check.json
                                                # (else docs/results/gpu_check.json) and .md
    python benchmarks/gpu_check.py --dry-run    # on CPU: tiny shapes, TRITON_INTERPRET=1,
                                                # exercises every path, no timing claims

Rows (`rows` in the JSON): shape, backend, batch, ms, timing, experts_touched, floor_ms,
floor_fraction. floor_ms = experts touched x bytes of one expert / measured copy bandwidth
(bytes read + written by a device-to-device copy per second), the least time that reading
those weights can take; floor_fraction = floor_ms / ms (1.0 = the physical limit).
Every row times the same work: the whole block (router linear, routing, experts) for x,
nothing else; the ids that count experts touched are computed outside the timed call.
Backends:
  hf-grouped-compile       transformers block, experts_implementation "grouped_mm",
                           torch.compile default mode
  hf-grouped-compile-cg    the same, mode="reduce-overhead" (CUDA graphs)
  lynx-exact               the block's router linear + lynx Triton route (exact) + Triton
                           experts, called directly
  lynx-affinity            the same with AffinityBinning (the model family's alpha, beta)
  lynx-exact-tma           lynx-exact with the weight tiles through tensor descriptors
  lynx-*-compiled          torch.compile(block, backend="lynx", options={"policy": ...})
  lynx-exact-compiled-cg   the same (exact), mode="reduce-overhead": how decode is served
Timing (`timing` per row): "do_bench" is triton.testing.do_bench, the median of CUDA-event
timings with L2 cleared before every call (so weights that fit in the 50 MB L2, Qwen3 at
batch 1 say, are read from HBM as in a real layer); the *-cg rows are do_bench over calls
that replay a CUDA graph (one launch per call). The route timings (`route_timing`, and
`route_scored_timing`: a DeepSeek-V3-shaped sigmoid + bias router, 256 experts, top-8,
"score" space, at batches 1/16/64/256) add "cuda_graph_replay": 20 calls captured in one
graph, replayed, per call.
Every step records its error in the JSON and the script continues. The whole check stops at
a hard wall-clock budget (--budget-s, 240 s): a watchdog writes what finished and exits; the
JSON is also rewritten after every step. A compact summary is printed last (it fits in the
12,000 characters the device machine returns).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The GPU image reaches no registry, so the checkout may not be pip-installed: import it
# from here (lynx_compile maps passes/, lowering/ and examples/ itself in that case).
sys.path.insert(0, str(REPO))
TIME_BUDGET_S = 240.0  # the whole check must fit one 5-minute call, start-up included
COMPILE_S = 20.0  # a compile step is not started with less of the budget left
SUMMARY_CHARS = 11_000  # the device machine returns the last 12,000 characters printed


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
    """Collects rows, errors and notes; prints as it goes; writes JSON and Markdown.

    `budget_s` is a hard wall-clock limit: steps are skipped once it is spent, and the
    watchdog (start_watchdog) writes what finished and ends the process if a step overruns.
    """

    def __init__(self, dry_run: bool, out: Path | None = None, budget_s: float = TIME_BUDGET_S):
        self.dry_run = dry_run
        self.out = out
        self.budget_s = budget_s
        self.start = time.perf_counter()
        self.result = {"dry_run": dry_run, "rows": [], "correctness": [], "errors": []}
        self.lines: list[str] = []
        self.lock = threading.RLock()  # the watchdog reads result while steps append

    def say(self, line: str) -> None:
        print(line, flush=True)
        with self.lock:
            self.lines.append(line)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        """Seconds of the budget still unspent."""
        return self.budget_s - self.elapsed()

    def error(self, step: str, message: str) -> None:
        with self.lock:
            self.result["errors"].append({"step": step, "error": message[:2000]})

    def add(self, key: str, item: dict) -> None:
        """Append one record (a row, a correctness case) under result[key]."""
        with self.lock:
            self.result.setdefault(key, []).append(item)

    def attempt(self, what: str, fn, *args, needs_s: float = 0.0, **kwargs):
        """Run one step; on failure record `what` and the error, and return None. A step
        is skipped when less than `needs_s` seconds of the budget are left."""
        if self.left() <= needs_s:
            self.error(what, "skipped: time budget spent")
            self.say(f"SKIP {what}: time budget spent")
            self.write()
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            self.error(what, f"{type(err).__name__}: {err}")
            self.say(f"ERROR {what}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            traceback.print_exc(limit=3)
            return None
        finally:
            self.write()

    def write(self, truncated: bool = False) -> None:
        """Write the JSON and the Markdown summary of what has finished so far."""
        if self.out is None:
            return
        with self.lock:
            result = copy.deepcopy(self.result)
            result["seconds"] = round(self.elapsed(), 1)
            result["truncated"] = truncated
            summary = self.summary(truncated)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(result, indent=1) + "\n")
        title = "# gpu_check" + (" (dry run: no timings)" if self.dry_run else "")
        self.out.with_suffix(".md").write_text(title + "\n\n```\n" + summary + "\n```\n")

    def summary(self, truncated: bool = False) -> str:
        """The compact end-of-run report: environment, correctness, timings, errors."""
        with self.lock:
            res = self.result
            lines = ["== gpu_check summary ==", f"environment: {res.get('environment')}"]
            lines.append(f"copy bandwidth GB/s: {res.get('copy_bandwidth_gbs')}")
            for kernel in ("route", "route_scored", "experts", "compiled_block"):
                cases = [c for c in res["correctness"] if c["kernel"] == kernel]
                bad = [c for c in cases if not c["ok"]]
                lines.append(f"correctness {kernel}: {len(cases) - len(bad)}/{len(cases)} ok")
                lines += [f"  FAIL {json.dumps(c)[:300]}" for c in bad[:5]]
            for r in res.get("route_timing", []):
                lines.append(
                    f"route 64x128 top-8 {r['policy']}: {_fmt(r['us_launch'], '.1f')} us "
                    f"do_bench, {_fmt(r['us_cuda_graph'], '.1f')} us graph replay (target 10)"
                )
            for r in res.get("route_scored_timing", []):
                lines.append(
                    f"route_scored {r['tokens']}x{r['experts']} top-{r['top_k']} {r['space']} "
                    f"{r['policy']}: {_fmt(r['us_launch'], '.1f')} us do_bench, "
                    f"{_fmt(r['us_cuda_graph'], '.1f')} us graph replay"
                )
            lines.append(
                "| shape | backend | batch | timing | experts | ms | floor ms | floor/ms |"
            )
            for r in res["rows"]:
                lines.append(
                    f"| {r['shape']} | {r['backend']} | {r['batch']} | {r['timing']} | "
                    f"{_fmt(r['experts_touched'], 'd')} | {_fmt(r['ms'], '.4f')} | "
                    f"{_fmt(r['floor_ms'], '.4f')} | {_fmt(r['floor_fraction'], '.2f')} |"
                )
            errors = res["errors"]
            lines.append(f"errors: {len(errors)}")
            lines += [f"  {e['step']}: {e['error'].splitlines()[0][:160]}" for e in errors[:20]]
            lines.append(
                f"{'TRUNCATED at the time budget, ' if truncated else ''}"
                f"{self.elapsed():.0f} s of a {self.budget_s:.0f} s budget"
            )
        text = "\n".join(lines)
        if len(text) > SUMMARY_CHARS:  # keep the end: the row table and the errors
            text = "...\n" + text[-SUMMARY_CHARS:]
        return text

    def start_watchdog(self) -> threading.Timer:
        """At the budget, write what finished, print the summary and end the process (a
        step that hangs or overruns must not cost the call its results)."""

        def stop() -> None:
            self.error("watchdog", f"time budget of {self.budget_s:.0f} s spent; stopped")
            self.write(truncated=True)
            print(self.summary(truncated=True), flush=True)
            if self.out is not None:
                print(f"wrote {self.out} and {self.out.with_suffix('.md')}", flush=True)
            os._exit(0)

        timer = threading.Timer(max(self.left(), 0.0), stop)
        timer.daemon = True
        timer.start()
        return timer


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def device_ms(fn, warmup_ms: float = 10, rep_ms: float = 50) -> float:
    """Median device time of fn() in ms: triton.testing.do_bench (CUDA events around each
    call, L2 cleared before each, no host sync between calls)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def copy_bandwidth_gbs(torch, check: Check) -> float:
    """Device-to-device copy of 1 GiB: (bytes read + bytes written) / median time."""
    src = torch.empty(2**29, dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    ms = device_ms(lambda: dst.copy_(src), rep_ms=100)
    gbs = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
    check.say(f"copy bandwidth: {gbs:.0f} GB/s (1 GiB device-to-device, do_bench median)")
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
    from lynx_compile.lowering.constants import default_k0

    for dtype, tokens, experts, k, policy, conv in cases:
        k0 = min(default_k0(policy), k)  # the default protected choice of the policy
        for _ in range(2):  # two fresh inputs per compiled kernel
            logits = spaced_logits(torch, tokens, experts, dtype, device, gen)
            pol = reference.RoutingPolicy(policy, 3.0, 2.0, k0, 16)
            want_w, want_ids = reference.route_reference(logits, k, pol, conv)
            got_w, got_ids = triton_route.route(logits, k, policy, 3.0, 2.0, k0, 16, conv)
            ids_ok = bool(torch.equal(got_ids, want_ids))
            err = float((got_w.float() - want_w.float()).abs().max())
            unwritten = bool(torch.isnan(got_w).any() or (got_ids < 0).any())
            check.add(
                "correctness",
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
                },
            )


def router_scores(torch, tokens, experts, dtype, space, device, gen):
    """[tokens, experts] scores of a scored router: "score", DeepSeek-V3's sigmoid of fp32
    logits plus a per-expert correction bias; "logit", the logits; "prob", their softmax."""
    logits = 2 * torch.randn(tokens, experts, generator=gen, device=device)
    if space == "score":
        bias = 0.1 * torch.randn(experts, generator=gen, device=device)
        return (torch.sigmoid(logits) + bias).to(dtype)
    return (torch.softmax(logits, dim=-1) if space == "prob" else logits).to(dtype)


def check_route_scored(torch, check: Check, device, gen) -> None:
    """The scored router kernel: DeepSeek-V3's shape at every batch, the other spaces and
    policies at one; ids and values (the scores at the ids) exactly the reference's."""
    from lynx_compile.lowering import reference, triton_route
    from lynx_compile.lowering.constants import default_k0

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    # (dtype, tokens, experts, k, space, policy); batch 1 and the others compile apart
    cases = [(f32, b, 256, 8, "score", p) for b in (1, 16, 64, 256) for p in ("exact", "affinity")]
    cases += [
        (bf16, 64, 256, 8, "score", "static"),
        (f32, 64, 128, 8, "logit", "oea"),
        (f16, 33, 60, 2, "prob", "affinity"),
    ]
    if check.dry_run:
        cases = [(f32, 3, 8, 2, "score", "affinity"), (f16, 13, 60, 8, "prob", "static")]
    with poisoned(torch, triton_route):
        for dtype, tokens, experts, k, space, policy in cases:
            k0 = min(default_k0(policy), k)
            scores = router_scores(torch, tokens, experts, dtype, space, device, gen)
            pol = reference.RoutingPolicy(policy, 3.0, 2.0, k0, 16)
            want = reference.route_scored_reference(scores, k, space, pol, ties="lower_index")
            got = triton_route.route_scored(scores, k, space, policy, 3.0, 2.0, k0, 16)
            ids_ok = bool(torch.equal(got[1], want[1]))
            values_ok = bool(torch.equal(got[0], want[0]))
            check.add(
                "correctness",
                {"kernel": "route_scored", "dtype": str(dtype).removeprefix("torch."),
                 "tokens": tokens, "experts": experts, "top_k": k, "space": space,
                 "policy": policy, "ids_equal": ids_ok, "values_equal": values_ok,
                 "ok": ids_ok and values_ok},
            )  # fmt: skip
    rows = [c for c in check.result["correctness"] if c["kernel"] == "route_scored"]
    bad = [c for c in rows if not c["ok"]]
    check.say(f"route_scored correctness: {len(rows) - len(bad)}/{len(rows)} cases ok")
    for c in bad[:10]:
        check.say(f"  FAIL {c}")


def check_experts(torch, check: Check, device, gen) -> None:
    """bf16/fp16/fp32 against the reference (bf16 relative error < 1e-2), poisoned buffers;
    the last cases with the weight tiles through tensor descriptors (tma=True)."""
    from lynx_compile.lowering import reference, triton_experts

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    cases = [
        # dtype, tokens, experts, k, hidden, inter, activation, gated, tma
        (bf16, 1, 8, 2, 4096, 1024, "silu", True, False),
        (bf16, 16, 128, 8, 2048, 768, "silu", True, False),
        (bf16, 64, 128, 8, 2048, 768, "silu", True, False),
        (bf16, 200, 60, 4, 1024, 1408, "gelu_tanh", False, False),
        (f16, 16, 128, 8, 2048, 768, "gelu", True, False),
        (f32, 13, 60, 4, 1024, 1408, "relu", False, False),
        (bf16, 1, 8, 2, 4096, 1024, "silu", True, True),
        (bf16, 300, 128, 8, 2048, 768, "silu", True, True),
    ]
    if check.dry_run:  # the interpreter cannot run bf16 tl.dot
        cases = [
            (f16, 3, 8, 2, 32, 24, "silu", True, False),
            (f32, 3, 8, 2, 32, 24, "gelu", False, False),
            (f16, 13, 8, 2, 32, 24, "silu", True, True),
        ]
    tol = {f32: 1e-4, bf16: 1e-2, f16: 4e-3}
    with poisoned(torch, triton_experts):
        for dtype, tokens, experts, k, hidden, inter, activation, gated, tma in cases:
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
            got = triton_experts.experts(*args, config=launch_config(x, ids, w_up, tma))
            unwritten = bool(torch.isnan(got).any())
            scale = want.float().abs().max().clamp(min=1e-6)
            rel = float((got.float() - want.float()).abs().max() / scale)
            check.add(
                "correctness",
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
                    "tma": tma,
                    "rel_err": rel,
                    "unwritten": unwritten,
                    "ok": rel < tol[dtype] and not unwritten,
                },
            )
    rows = [c for c in check.result["correctness"] if c["kernel"] == "experts"]
    bad = [c for c in rows if not c["ok"]]
    check.say(f"experts correctness: {len(rows) - len(bad)}/{len(rows)} cases ok")
    for c in bad[:10]:
        check.say(f"  FAIL {c}")


def check_module_list(torch, check: Check, device) -> None:
    """nn.ModuleList experts (examples ModuleListMoE, fp32 and bf16, 13 decode tokens)
    compiled with backend="lynx", policy exact, against eager: the dispatch is fused into
    lynx::experts_list, which runs its composite on CUDA (a loop over the touched experts,
    each expert's own tensors in place)."""
    from lynx_compile.examples.moe_modules import ModuleListMoE

    import lynx_compile

    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        torch.manual_seed(0)
        module = ModuleListMoE(dim=256, hidden=512, num_experts=16, top_k=2)
        module = module.eval().to(device=device, dtype=dtype)
        x = torch.randn(13, 1, 256, device=device).to(dtype)
        torch._dynamo.reset()
        lynx_compile.clear_report()
        compiled = torch.compile(module, backend="lynx", options={"policy": "exact"})
        with torch.no_grad():
            got, want = compiled(x), module(x)
        rel = float((got.float() - want.float()).abs().max() / want.float().abs().max())
        dispatch = [s for s in lynx_compile.report()["sites"] if s["kind"] == "dispatch"]
        fused = bool(dispatch) and all("per-expert tensors" in s["reason"] for s in dispatch)
        check.add(
            "correctness",
            {
                "kernel": "experts_list (ModuleListMoE, compiled)",
                "dtype": str(dtype).removeprefix("torch."),
                "tokens": 13,
                "rel_err": rel,
                "fused": fused,
                "ok": rel < tol and fused,
            },
        )
        check.say(f"ModuleListMoE {dtype}: rel err {rel:.2e}, fused {fused}")


def time_route(torch, check: Check, device, gen) -> None:
    """The routing kernel at 64 tokens x 128 experts, top-8, fp32 logits (what the HF router
    feeds): do_bench of plain launches (device time; a host slower than the kernel shows
    as gaps), and 20 calls captured in one CUDA graph, replayed, per call."""
    from lynx_compile.lowering import triton_route
    from lynx_compile.lowering.constants import default_k0

    logits = torch.randn(64, 128, generator=gen, device=device)
    for policy in ("exact", "affinity"):

        def call(policy=policy):
            return triton_route.route(logits, 8, policy, 3.0, 2.0, default_k0(policy), 16, "renorm")

        plain, graphed = launch_and_graph_ms(torch, call)
        check.add(
            "route_timing",
            {
                "tokens": 64,
                "experts": 128,
                "top_k": 8,
                "policy": policy,
                "us_launch": plain * 1e3,
                "us_cuda_graph": graphed * 1e3,
                "target_us": 10.0,
            },
        )
        check.say(
            f"route 64x128 top-8 {policy}: {plain * 1e3:.1f} us per launch (do_bench), "
            f"{graphed * 1e3:.1f} us in a CUDA graph (target <= 10 us)"
        )


def launch_and_graph_ms(torch, call, reps: int = 20) -> tuple[float, float]:
    """(ms per plain launch, do_bench; ms per call of `reps` calls captured in one CUDA
    graph, replayed)."""
    plain = device_ms(call)
    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            call()
    return plain, device_ms(graph.replay) / reps


def time_route_scored(torch, check: Check, device, gen) -> None:
    """The scored routing kernel on a DeepSeek-V3-shaped router (fp32 sigmoid + bias scores,
    256 experts, top-8, "score" space) at decode batches 1/16/64/256, exact and affinity."""
    from lynx_compile.lowering import triton_route
    from lynx_compile.lowering.constants import default_k0

    for batch in (1, 16, 64, 256):
        scores = router_scores(torch, batch, 256, torch.float32, "score", device, gen)
        for policy in ("exact", "affinity"):

            def call(policy=policy, scores=scores):
                k0 = default_k0(policy)
                return triton_route.route_scored(scores, 8, "score", policy, 3.0, 2.0, k0, 16)

            plain, graphed = launch_and_graph_ms(torch, call)
            check.add(
                "route_scored_timing",
                {"tokens": batch, "experts": 256, "top_k": 8, "space": "score",
                 "policy": policy, "us_launch": plain * 1e3, "us_cuda_graph": graphed * 1e3},
            )  # fmt: skip
            check.say(
                f"route_scored {batch}x256 top-8 score {policy}: {plain * 1e3:.1f} us per "
                f"launch (do_bench), {graphed * 1e3:.1f} us in a CUDA graph"
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


def launch_config(x, ids, w_up, tma: bool):
    """The experts launch config the wrapper would pick (stored or default), with tma set."""
    import dataclasses

    from lynx_compile.lowering import launch_configs, triton_experts

    num_experts, up_rows, hidden = w_up.shape
    config = launch_configs.experts_config(
        num_experts, hidden, up_rows // 2, x.shape[0], ids.shape[1], x.dtype,
        triton_experts._gpu_name(x.device),
    )  # fmt: skip
    return dataclasses.replace(config, tma=tma)


def lynx_forward(torch, block, shape: Shape, policy: str, tma: bool = False):
    """x [B, 1, d] -> [B, 1, d]: router linear, Triton route, Triton experts (weight tiles
    through tensor descriptors with tma)."""
    from lynx_compile.lowering import triton_experts, triton_route
    from lynx_compile.lowering.constants import default_k0

    gate_w = block.gate.weight
    w_up, w_down = block.experts.gate_up_proj, block.experts.down_proj

    def forward(x):
        flat = x.view(-1, x.shape[-1])
        logits = torch.nn.functional.linear(flat, gate_w).float()  # the HF router's fp32 scores
        weights, ids = triton_route.route(
            logits, shape.top_k, policy, shape.alpha, shape.beta, default_k0(policy), 16, "renorm"
        )
        config = launch_config(flat, ids, w_up, tma)
        out = triton_experts.experts(flat, ids, weights, w_up, w_down, "silu", True, config)
        return out.view_as(x), ids

    return forward


def expert_bytes(shape: Shape, dtype_bytes: int) -> int:
    """Bytes of one gated expert's weights: gate+up [2I, d] and down [d, I]."""
    return 3 * shape.hidden * shape.inter * dtype_bytes


@dataclass(frozen=True)
class Run:
    """One backend's block call. `timed` (x [B, 1, d] -> out) is all that is timed: the whole
    block, router linear and routing included, as the stock block's forward. `ids` (x -> ids
    [B, k]) counts the experts touched, outside the timing; None where unknown."""

    timed: Callable
    ids: Callable | None
    timing: str = "do_bench"


def exact_ids(torch, block, shape: Shape) -> Callable:
    """x -> the exact top-k expert ids of the block's router (for experts touched)."""

    def ids(x):
        logits = torch.nn.functional.linear(x.view(-1, shape.hidden), block.gate.weight)
        return torch.topk(logits, shape.top_k).indices

    return ids


def lynx_ids(torch, block, shape: Shape) -> Callable:
    """x -> the expert ids lynx's affinity route picks for the block (for experts touched)."""
    forward = lynx_forward(torch, block, shape, "affinity")
    return lambda x: forward(x)[1]


def first(out):
    """The hidden states of a block's output (some transformers versions add logits)."""
    return out[0] if isinstance(out, tuple) else out


def direct_runs(torch, block, shape: Shape) -> dict[str, Run]:
    """lynx's kernels called directly, and the stock block under torch.compile (default)."""
    runs = {}
    for policy in ("exact", "affinity"):
        forward = lynx_forward(torch, block, shape, policy)
        runs[f"lynx-{policy}"] = Run(lambda x, f=forward: f(x)[0], lambda x, f=forward: f(x)[1])
    forward = lynx_forward(torch, block, shape, "exact", tma=True)
    runs["lynx-exact-tma"] = Run(lambda x: forward(x)[0], lambda x: forward(x)[1])
    runs["hf-grouped-compile"] = Run(torch.compile(block), exact_ids(torch, block, shape))
    return runs


def compiled_lynx_runs(torch, check: Check, block, shape: Shape) -> dict[str, Run]:
    """torch.compile(block, backend="lynx") per policy, each checked to be rewritten first
    (a miss would time stock Inductor under lynx's name)."""
    runs = {}
    for policy in ("exact", "affinity"):
        fn = torch.compile(block, backend="lynx", options=lynx_options(shape, policy))
        if not check_rewritten(torch, check, fn, shape, f"lynx-{policy}-compiled"):
            continue
        # the compiled affinity router routes as the direct one: its ids count experts
        ids = exact_ids(torch, block, shape) if policy == "exact" else lynx_ids(torch, block, shape)
        runs[f"lynx-{policy}-compiled"] = Run(fn, ids)
    return runs


def cuda_graph_runs(torch, check: Check, block, shape: Shape) -> dict[str, Run]:
    """mode="reduce-overhead" (CUDA graphs, how decode is served): lynx exact and stock."""
    cg = "do_bench over CUDA-graph replays"
    # torch.compile takes mode= or options=, not both: lynx reads the mode from its options
    options = dict(lynx_options(shape, "exact"), mode="reduce-overhead")
    fn = torch.compile(block, backend="lynx", options=options)
    stock = torch.compile(block, mode="reduce-overhead")
    ids = exact_ids(torch, block, shape)
    runs = {}
    if check_rewritten(torch, check, fn, shape, "lynx-exact-compiled-cg"):
        runs["lynx-exact-compiled-cg"] = Run(new_step(torch, fn), ids, cg)
    runs["hf-grouped-compile-cg"] = Run(new_step(torch, stock), ids, cg)
    return runs


def new_step(torch, fn) -> Callable:
    """fn, each call a new CUDA-graph step (outputs of the previous replay may be overwritten:
    what an inference loop does)."""

    def call(x):
        torch.compiler.cudagraph_mark_step_begin()
        return fn(x)

    return call


def lynx_options(shape: Shape, policy: str) -> dict:
    return {"policy": policy, "alpha": shape.alpha, "beta": shape.beta}


def check_rewritten(torch, check: Check, fn, shape: Shape, name: str) -> bool:
    """Whether lynx rewrote the compiled block (recorded as an error where it did not)."""
    missing = check.attempt(f"lynx rewrite {shape.name} {name}", lynx_missing, torch, fn, shape)
    if missing is None or missing:
        message = missing or "the rewrite check failed (see its error)"
        check.error(name, message)
        check.say(f"ERROR {name} {shape.name}: {message}")
        return False
    return True


def time_blocks(torch, check: Check, device, bandwidth_gbs: float | None) -> None:
    """Each shape x batch x backend: ms, experts touched, floor, floor fraction. Phases in
    order of value, so the time budget drops the last first: direct lynx rows and the stock
    compile (every shape), then the CUDA-graph rows (how decode is served), then the
    default-mode lynx-compiled rows with the check that they launch lynx's kernels."""
    dtype = torch.float32 if check.dry_run else torch.bfloat16
    shapes = DRY_SHAPES if check.dry_run else GPU_SHAPES
    compiled_shapes = shapes[:1] if check.dry_run else shapes  # the CPU dry run compiles once
    blocks = {}
    for shape in shapes:
        block = check.attempt(f"build {shape.name}", build_block, torch, shape, device, dtype, 0)
        if block is None:
            continue
        blocks[shape.name] = block
        runs = check.attempt(f"runs {shape.name}", direct_runs, torch, block, shape)
        time_runs(torch, check, shape, block, runs or {}, bandwidth_gbs)
    for phase in (cuda_graph_runs, compiled_lynx_runs):
        for shape in compiled_shapes:
            if shape.name not in blocks:
                continue
            block = blocks[shape.name]
            if phase is compiled_lynx_runs:
                check.attempt(
                    f"compiled kernels {shape.name}",
                    check_compiled_kernels, torch, check, block, shape, needs_s=COMPILE_S,
                )  # fmt: skip
            runs = check.attempt(
                f"{phase.__name__} {shape.name}",
                phase, torch, check, block, shape, needs_s=COMPILE_S,
            )  # fmt: skip
            time_runs(torch, check, shape, block, runs or {}, bandwidth_gbs)


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
    check.add(
        "correctness",
        {"kernel": "compiled_block", "shape": shape.name, "kernels_in_code": found,
         "rel_err_vs_eager": err, "ok": ok},
    )  # fmt: skip
    check.say(f"compiled lynx block {shape.name}: kernels {found}, rel err {err:.2e}, ok={ok}")


def time_runs(torch, check: Check, shape: Shape, block, runs: dict, bandwidth_gbs) -> None:
    """Time every run at every batch; compare exact runs with the HF block's output."""
    dtype = next(block.parameters()).dtype
    per_expert = expert_bytes(shape, torch.finfo(dtype).bits // 8)
    batches = (1, 3) if check.dry_run else (1, 16, 64, 256)
    for batch in batches:
        gen = torch.Generator(device=block.gate.weight.device).manual_seed(batch)
        x = torch.randn(batch, 1, shape.hidden, generator=gen, device=gen.device).to(dtype)
        with torch.no_grad():
            want = first(block(x))
            for name, run in runs.items():
                check.attempt(
                    f"{shape.name} {name} batch {batch}",
                    time_one, torch, check, shape, name, batch, run, x, want, per_expert,
                    bandwidth_gbs,
                )  # fmt: skip


def time_one(torch, check, shape, name, batch, run: Run, x, want, per_expert, bandwidth_gbs):
    """One row: compare with the HF block (exact routing only), time, floor."""
    from lynx_compile.lowering import reference

    skips_before = cudagraph_skips(torch)
    out = first(run.timed(x))
    if "affinity" not in name:
        scale = want.float().abs().max().clamp(min=1e-6)
        rel = float((out.float() - want.float()).abs().max() / scale)
        if rel > 2e-2:
            raise AssertionError(f"output differs from the HF block: relative error {rel:.3g}")
    del out  # a CUDA-graph output held across replays would force a re-recording
    touched = None if run.ids is None else reference.distinct_experts(run.ids(x))
    ms = None if check.dry_run else device_ms(lambda: run.timed(x))
    timing = run.timing
    skipped = check.result.setdefault("cudagraph_skipped", [])
    if "CUDA-graph" in timing and cudagraph_skips(torch) > skips_before:
        skipped.append(f"{shape.name} {name}")  # counted once, when the graph compiles
    if f"{shape.name} {name}" in skipped:
        timing = "do_bench (Inductor skipped CUDA graphs)"
    row = block_row(shape.name, name, batch, ms, timing, touched, per_expert, bandwidth_gbs)
    check.add("rows", row)
    check.say(
        f"| {shape.name} | {name} | {batch} | {_fmt(touched, 'd')} | {_fmt(ms, '.4f')} | "
        f"{_fmt(row['floor_ms'], '.4f')} | {_fmt(row['floor_fraction'], '.2f')} |"
    )


def block_row(shape, backend, batch, ms, timing, touched, per_expert, bandwidth_gbs) -> dict:
    """One JSON row; the floor is the touched experts' weight bytes over the copy bandwidth."""
    floor_ms = None
    if touched is not None and bandwidth_gbs:
        floor_ms = touched * per_expert / (bandwidth_gbs * 1e9) * 1e3
    return {
        "shape": shape,
        "backend": backend,
        "batch": batch,
        "ms": ms,
        "timing": timing,
        "experts_touched": touched,
        "floor_ms": floor_ms,
        "floor_fraction": floor_ms / ms if (floor_ms and ms) else None,
    }


def cudagraph_skips(torch) -> int:
    """Inductor's count of graphs it compiled without CUDA graphs (reduce-overhead misses)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


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
        help="JSON path; a Markdown copy of the summary goes next to it (.md); "
        "default $OUT/gpu_check.json where $OUT is set (the device machine returns only "
        "what is written there), else docs/results/gpu_check.json",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=TIME_BUDGET_S,
        help="hard wall-clock limit in seconds: what finished by then is written out",
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    check = Check(args.dry_run, Path(args.out), args.budget_s)
    watchdog = check.start_watchdog()
    try:
        return run_checks(check)
    finally:
        watchdog.cancel()


def run_checks(check: Check) -> int:
    """Every step in order of value (correctness, route timing, block timings)."""
    import torch
    from lynx_compile.lowering import triton_ops  # noqa: F401  (Triton CUDA kernels for lynx::*)

    if not check.dry_run and not torch.cuda.is_available():
        message = "no CUDA device; run it on the GPU, or pass --dry-run"
        check.error("start", message)
        check.write()
        print(f"gpu_check: {message}", file=sys.stderr)
        return 2
    device = torch.device("cpu" if check.dry_run else "cuda")
    check.result["environment"] = environment(torch)
    check.say(f"gpu_check on {check.result['environment']}")
    seed = int(time.time()) % 2**31  # fresh inputs each run; recorded to reproduce
    check.result["seed"] = seed
    gen = torch.Generator(device=device).manual_seed(seed)
    bandwidth = None
    if not check.dry_run:
        bandwidth = check.attempt("copy bandwidth", copy_bandwidth_gbs, torch, check)
    else:
        bandwidth = 4151.0  # the anchors' H200 copy bandwidth, only to exercise the floor math
    check.result["copy_bandwidth_gbs"] = bandwidth
    check.attempt("route correctness", check_route, torch, check, device, gen)
    check.attempt("route_scored correctness", check_route_scored, torch, check, device, gen)
    check.attempt("experts correctness", check_experts, torch, check, device, gen)
    check.attempt("per-expert modules", check_module_list, torch, check, device)
    if not check.dry_run:
        check.attempt("route timing", time_route, torch, check, device, gen)
        check.attempt("route_scored timing", time_route_scored, torch, check, device, gen)
    check.say("| shape | backend | batch | experts | ms | floor ms | floor/ms |")
    check.say("| --- | --- | --- | --- | --- | --- | --- |")
    check.attempt("block timing", time_blocks, torch, check, device, bandwidth)
    with check.lock:  # the watchdog must not cut the final write in half
        check.write()
        print(check.summary(), flush=True)
        print(f"wrote {check.out} and {check.out.with_suffix('.md')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
