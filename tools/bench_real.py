"""`lynx-compile bench --suite real`: one transformers MoE block per shape at published sizes.

Each shape is one sparse-MoE block of its transformers family at the published model's
dimensions, with seeded random weights (never downloaded) and a router whose logits are
spread like a trained router's (see `router_spread`). Per (shape, dtype, threads, decode
batch B), eager / Inductor / lynx exact / lynx default are compiled side by side and timed in
interleaved rounds, odd rounds in reverse order (bench.time_interleaved). Rows per backend:
ms (median), ms_min,
paired_vs_inductor (median over rounds of the within-round ratio), noise (half the
interquartile range of those per-round ratios: two backends within it are a tie), experts
(distinct routed experts per call: exact for eager / Inductor / lynx exact, lynx's choice for
lynx default, from a telemetry compile), bytes (weights one call must read: routed experts
touched, shared experts, router), floor_ms (bytes / the read bandwidth measured in the same
rounds), floor_fraction (median over rounds of that round's floor / the backend's median)
and gbps (bytes / ms); lynx exact's row also holds read_gbps, the paired bandwidth, and
aa_ratio: an A/A control, the same compiled lynx exact timed a second time in every round
(AA) beside the first, median over rounds of AA / exact. Two backends doing the same work
(lynx default where it keeps exact's experts) differ from 1.0 by as much as this control
does, so a default / exact within max(noise vs exact, |A/A - 1|) of 1.0 is a tie measured
in the same run.

The floor is paired: a 1 GiB float32 sum at the row's thread count is one more "backend" in
every interleaved round, so each round's fraction divides by the bandwidth of the same few
hundred milliseconds. This machine's read bandwidth drifts by up to 1.5x within an hour
(34.5 to 51.9 GB/s on 2 threads in one session), more than any kernel change; a floor
measured once at the start of the run made the fractions of later rows depend on when
they ran.

Memory: one block is alive at a time; before building one the suite compares its bytes with
MemAvailable and skips it (saying so in the results) when it would not fit with headroom.
`--quick` runs every shape at toy dimensions through the same code (the CI test).
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import math
import os
import statistics
import time
from pathlib import Path

import torch
from lynx_compile.tools import bench
from lynx_compile.tools.demo import decode_router_experts, ticking

import lynx_compile

BACKENDS = ("eager", "inductor", "lynx-exact", "lynx")
FLOOR = "read-floor"  # the paired floor's turn in each round (not a backend)
AA = "lynx-exact-again"  # lynx exact's second turn in each round: the A/A control


@dataclasses.dataclass(frozen=True)
class Shape:
    """One published MoE layer: its transformers block and the config fields that size it."""

    name: str
    module: str  # transformers.models.<module>
    config_cls: str
    block_cls: str
    config: dict
    routed: tuple[str, str]  # config field names: (number of routed experts, top-k)
    logit_std: float  # per-token spread of the router logits (see router_spread)


SHAPES = (
    Shape(
        "Qwen3-30B-A3B",
        "qwen3_moe",
        "Qwen3MoeConfig",
        "Qwen3MoeSparseMoeBlock",
        dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128,
             num_experts_per_tok=8, norm_topk_prob=True),
        ("num_experts", "num_experts_per_tok"),
        2.0,
    ),
    Shape(
        "Mixtral-8x7B",
        "mixtral",
        "MixtralConfig",
        "MixtralSparseMoeBlock",
        dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8,
             num_experts_per_tok=2),
        ("num_local_experts", "num_experts_per_tok"),
        1.5,
    ),
    Shape(
        "OLMoE-1B-7B",
        "olmoe",
        "OlmoeConfig",
        "OlmoeSparseMoeBlock",
        dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
             norm_topk_prob=False),
        ("num_experts", "num_experts_per_tok"),
        2.0,
    ),
    Shape(
        "DeepSeek-V2-Lite",
        "deepseek_v2",
        "DeepseekV2Config",
        "DeepseekV2Moe",
        dict(hidden_size=2048, moe_intermediate_size=1408, n_routed_experts=64,
             num_experts_per_tok=6, n_shared_experts=2, topk_method="greedy", n_group=1,
             topk_group=1, routed_scaling_factor=1.0),
        ("n_routed_experts", "num_experts_per_tok"),
        2.0,
    ),
    Shape(
        "GLM-4.5-Air-like",
        "glm4_moe",
        "Glm4MoeConfig",
        "Glm4MoeMoE",
        dict(hidden_size=4096, moe_intermediate_size=1408, n_routed_experts=128,
             num_experts_per_tok=8, n_shared_experts=1, n_group=1, topk_group=1,
             norm_topk_prob=True, routed_scaling_factor=1.0),
        ("n_routed_experts", "num_experts_per_tok"),
        2.0,
    ),
    Shape(
        "DeepSeek-V3-shaped",
        "deepseek_v3",
        "DeepseekV3Config",
        "DeepseekV3MoE",
        dict(hidden_size=2048, moe_intermediate_size=768, n_routed_experts=128,
             num_experts_per_tok=8, n_group=8, topk_group=4, n_shared_experts=1,
             norm_topk_prob=True, routed_scaling_factor=2.5),
        ("n_routed_experts", "num_experts_per_tok"),
        2.0,
    ),
)  # fmt: skip

# --quick: every shape at toy size (the same families, routers and code path).
QUICK_SIZES = dict(
    hidden_size=64,
    intermediate_size=48,
    moe_intermediate_size=32,
    num_experts=16,
    num_local_experts=8,
    n_routed_experts=16,
)
POPULARITY_STD = 0.5  # logit units: per-expert offset, the skew of a trained router's load


@dataclasses.dataclass(frozen=True)
class RealConfig:
    """What one run of the real-size suite measures."""

    quick: bool = False
    shapes: tuple[str, ...] = tuple(s.name for s in SHAPES)
    dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)
    batches: tuple[int, ...] = (1, 4, 16, 64)
    threads: tuple[int, ...] = (1, 0)  # 0: every core
    warmup: int = 1
    rounds: int = 5  # interleaved rounds, each timing every backend `calls` times
    calls: int = 1  # at least; more for fast rows (calls_per_round)
    turn_ms: float = 60.0
    headroom: float = 2.0  # GiB of MemAvailable kept free beyond the block


def _config(shape: Shape, quick: bool, dtype: torch.dtype):
    base = f"transformers.models.{shape.module}"
    mod = importlib.import_module(f"{base}.modeling_{shape.module}")
    cfg_mod = importlib.import_module(f"{base}.configuration_{shape.module}")
    fields = dict(shape.config)
    if quick:
        fields.update({k: v for k, v in QUICK_SIZES.items() if k in fields})
    config = getattr(cfg_mod, shape.config_cls)(**fields, num_hidden_layers=1)
    config._experts_implementation = "grouped_mm"
    return config, getattr(mod, shape.block_cls)


def block_bytes(shape: Shape, quick: bool, dtype: torch.dtype) -> int:
    """Bytes of the block's parameters, from its config (built on the meta device)."""
    config, block_cls = _config(shape, quick, dtype)
    with torch.device("meta"):
        block = block_cls(config)
    return sum(p.numel() for p in block.parameters()) * dtype.itemsize


def router_spread(block: torch.nn.Module, n_experts: int, std: float, gen) -> torch.Tensor:
    """Sets the router so logits look trained, returns the shared direction u [d].

    Router weight rows: std / sqrt(d) x N(0, 1) (token-dependent logits of spread `std` for
    unit-variance inputs) plus b_e u with b_e ~ N(0, POPULARITY_STD) and u a unit vector
    that every input token carries once (make_inputs): logits = noise + b_e, so some experts
    are popular across the batch, as trained routers' loads are skewed."""
    (name, weight), *more = [
        (n, p) for n, p in block.named_parameters()
        if p.shape == (n_experts, p.shape[-1]) and p.dim() == 2 and "expert" not in n
    ]  # fmt: skip
    assert not more, f"more than one router weight: {name}, {[n for n, _ in more]}"
    d = weight.shape[1]
    u = torch.randn(d, generator=gen)
    u /= u.norm()
    b = torch.randn(n_experts, generator=gen) * POPULARITY_STD
    w = torch.randn(n_experts, d, generator=gen) * (std / math.sqrt(d)) + b[:, None] * u
    with torch.no_grad():
        weight.copy_(w.to(weight.dtype))
    return u


def build(shape: Shape, quick: bool, dtype: torch.dtype, seed: int = 0):
    """(block in eval mode, shared input direction u): built on the meta device, then
    materialised in `dtype` and filled expert by expert (no float32 copy of the weights)."""
    config, block_cls = _config(shape, quick, dtype)
    with torch.device("meta"):
        block = block_cls(config).to(dtype)
    block = block.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            scale = p.shape[-1] ** -0.5 if p.dim() > 1 else 1.0
            rows = p.view(-1, p.shape[-1]) if p.dim() > 1 else p.view(1, -1)
            for lo in range(0, rows.shape[0], 4096):
                chunk = rows[lo : lo + 4096]
                chunk.copy_(torch.randn(chunk.shape, generator=gen) * scale)
        for buf in block.buffers():
            buf.zero_()  # e_score_correction_bias: no correction
    n_experts = getattr(config, shape.routed[0])
    return block, router_spread(block, n_experts, shape.logit_std, gen)


def make_inputs(u: torch.Tensor, batch: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Decode input x [B, 1, d]: N(0, 1) plus the shared direction u (router_spread)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, u.numel(), generator=gen) + u
    return x.to(dtype)


def expert_sizes(block: torch.nn.Module) -> tuple[int, int, int]:
    """(bytes of one routed expert, bytes of the shared experts, bytes of the router)."""
    routed = shared = router = 0
    for name, p in block.named_parameters():
        if p.dim() == 3:
            routed += p[0].numel() * p.element_size()
        elif "shared" in name:
            shared += p.numel() * p.element_size()
        elif "expert" not in name:
            router += p.numel() * p.element_size()
    return routed, shared, router


FLOOR_BYTES = 2**30  # the floor's buffer: far past the last-level cache a core reaches


def floor_buffer() -> torch.Tensor:
    """The 1 GiB of float32 the read floor sums."""
    return torch.ones(FLOOR_BYTES // 4)


def read_bandwidth(seconds: float = 2.0) -> float:
    """Bytes per second of reading 1 GiB (a float32 sum, torch's intra-op threads): the best
    of repeated passes for `seconds` (the run's start, in the results' header; each row's
    floor is measured in its own rounds, see paired_floor)."""
    buf = floor_buffer()
    best, start = math.inf, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return buf.numel() * buf.element_size() / best


def _summing(buf: torch.Tensor):
    """The floor's turn in a round: a sum of `buf`, whatever the backends' arguments."""
    return lambda *_: buf.sum()


def paired_floor(samples: list[float], floor_ms: list[float], nbytes: float, calls: int):
    """(floor_ms, floor_fraction, bandwidth) of one backend against the floor timed in the
    same rounds: per round, the bandwidth is FLOOR_BYTES / the median floor pass and the
    fraction that round's floor time for `nbytes` / the backend's median; the fraction is
    the median over rounds, floor_ms and the bandwidth use the median bandwidth."""
    bandwidths = [FLOOR_BYTES / (m * 1e-3) for m in round_medians(floor_ms, calls)]
    fractions = [
        nbytes / bw * 1e3 / m
        for bw, m in zip(bandwidths, round_medians(samples, calls), strict=True)
    ]
    bandwidth = statistics.median(bandwidths)
    return nbytes / bandwidth * 1e3, statistics.median(fractions), bandwidth


def mem_available() -> int:
    """MemAvailable from /proc/meminfo in bytes (0 if unreadable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def calls_per_round(probe_ms: list[float], config: RealConfig) -> int:
    """Calls per backend per round: enough for ~`config.turn_ms` of each backend's turn
    (single calls of a few ms are at the mercy of other processes' bursts), at least
    `config.calls`, at most 10."""
    need = math.ceil(config.turn_ms / max(statistics.median(probe_ms), 1e-3))
    return max(config.calls, min(10, need))


def round_medians(samples: list[float], calls: int) -> list[float]:
    """The median of each round's `calls` consecutive samples (time_interleaved's order)."""
    return [statistics.median(samples[i : i + calls]) for i in range(0, len(samples), calls)]


def round_ratios(samples: list[float], ref: list[float], calls: int) -> list[float]:
    """Per-round ratio of medians (bench.paired_ratio's terms)."""
    return [
        a / b for a, b in zip(round_medians(samples, calls), round_medians(ref, calls), strict=True)
    ]


def noise(ratios: list[float]) -> float:
    """Half the interquartile range of per-round ratios (0 with fewer than 2 rounds)."""
    if len(ratios) < 2:
        return 0.0
    q = statistics.quantiles(ratios, n=4, method="inclusive")
    return (q[2] - q[0]) / 2


def _compile_all(block):
    """Every timed backend compiled for the current thread count (Inductor bakes the thread
    count into its C++ kernels), all sharing Dynamo's cache."""
    torch._dynamo.reset()
    lynx_compile.clear_report()
    fns = {"eager": block}
    for label, spec in bench.RUNTIME_BACKENDS.items():
        if spec is not None:
            fns[label] = torch.compile(block, backend=spec[0], options=spec[1])
    return fns


def _experts_touched(block, u, batch, dtype) -> tuple[float, float]:
    """(exact, lynx default) distinct routed experts per call, from a telemetry compile."""
    torch._dynamo.reset()
    lynx_compile.clear_report()
    fn = torch.compile(block, backend="lynx", options={"telemetry": True})
    with torch.no_grad():
        fn(make_inputs(u, batch, dtype, seed=batch))
    try:
        return decode_router_experts()
    except RuntimeError:
        return math.nan, math.nan  # the router was not rewritten: nothing recorded


def run_shape(shape: Shape, dtype: torch.dtype, config: RealConfig, rows: bench.Rows, meta):
    """Every (threads, batch) row of one shape and dtype; the block is freed on return."""
    label = f"{shape.name}/{str(dtype).removeprefix('torch.')}"
    need = block_bytes(shape, config.quick, dtype)
    free = mem_available()
    if free and need + config.headroom * 2**30 > free:
        meta["skipped"].append(
            f"{label}: {need / 2**30:.1f} GiB of weights, {free / 2**30:.1f} GiB available "
            f"(keeping {config.headroom:.0f} GiB free)"
        )
        return
    with ticking(f"build {label} ({need / 2**30:.2f} GiB)"):
        block, u = build(shape, config.quick, dtype)
    routed, shared, router = expert_sizes(block)
    touched = {}
    for batch in config.batches:
        with ticking(f"experts {label} b{batch}"):
            touched[batch] = _experts_touched(block, u, batch, dtype)
    all_threads = torch.get_num_threads()
    try:
        for threads in config.threads:
            torch.set_num_threads(threads or all_threads)
            t = torch.get_num_threads()
            meta["read_bandwidth"].setdefault(t, read_bandwidth())
            read_floor = _summing(floor_buffer())
            fns = _compile_all(block)
            for batch in config.batches:
                name = f"{label}/t{t}/b{batch}"
                args = (make_inputs(u, batch, dtype, seed=batch),)
                cpu = torch.device("cpu")
                with ticking(f"compile+time {name}"):
                    for fn in fns.values():  # the first call compiles
                        bench.time_calls(fn, args, cpu, config.warmup)
                    calls = calls_per_round(bench.time_calls(fns["inductor"], args, cpu, 2), config)
                    # AA runs just before lynx exact, as lynx default runs just after it
                    timed = {k: fns[k] for k in ("eager", "inductor")}
                    timed |= {AA: fns["lynx-exact"], "lynx-exact": fns["lynx-exact"]}
                    timed |= {"lynx": fns["lynx"], FLOOR: read_floor}
                    samples = bench.time_interleaved(timed, args, cpu, 0, config.rounds, calls)
                floor_samples = samples.pop(FLOOR)
                again = samples.pop(AA)
                exact, chosen = touched[batch]
                for backend, ms in samples.items():
                    median = statistics.median(ms)
                    ratios = round_ratios(ms, samples["inductor"], calls)
                    experts = chosen if backend == "lynx" else exact
                    nbytes = (experts * routed if experts == experts else math.nan) + shared
                    nbytes += router
                    floor, fraction, bandwidth = paired_floor(ms, floor_samples, nbytes, calls)
                    if backend == "lynx-exact":
                        rows.add("real", name, backend, "read_gbps", bandwidth / 1e9, "GB/s")
                    for metric, value, unit in (
                        ("ms", median, "ms"),
                        ("ms_min", min(ms), "ms"),
                        ("paired_vs_inductor", statistics.median(ratios), "x"),
                        ("noise", noise(ratios), "x"),
                        ("experts", experts, "experts/call"),
                        ("bytes", nbytes, "B"),
                        ("floor_ms", floor, "ms"),
                        ("floor_fraction", fraction, ""),
                        ("gbps", nbytes / median / 1e6, "GB/s"),
                    ):
                        rows.add("real", name, backend, metric, value, unit)
                paired = round_ratios(samples["lynx"], samples["lynx-exact"], calls)
                rows.add("real", name, "inductor", "calls_per_round", calls, "calls")
                rows.add("real", name, "lynx", "paired_vs_exact", statistics.median(paired), "x")
                rows.add("real", name, "lynx", "noise_vs_exact", noise(paired), "x")
                aa = round_ratios(again, samples["lynx-exact"], calls)
                rows.add("real", name, "lynx-exact", "aa_ratio", statistics.median(aa), "x")
            del fns, read_floor
            torch._dynamo.reset()
    finally:
        torch.set_num_threads(all_threads)
        del block
        gc.collect()


def run_real(config: RealConfig, out: Path | None = None) -> dict:
    """The real-size suite: {"meta": ..., "rows": [...]}; with `out`, the results so far are
    written there after each shape (a long run that is cut short keeps what it measured)."""
    started = time.perf_counter()
    meta = {
        **bench.machine_meta(torch.device("cpu")),
        "quick": config.quick,
        "suite": "real",
        "batches": list(config.batches),
        "rounds": config.rounds,
        "calls": config.calls,
        "turn_ms": config.turn_ms,
        "read_bandwidth": {},
        "skipped": [],
        "router": f"logit std per shape (SHAPES), popularity std {POPULARITY_STD}",
    }
    rows = bench.Rows("cpu")
    with ticking("native CPU kernels"):
        meta["native_build_s"] = bench.native_build_seconds()
    by_name = {s.name: s for s in SHAPES}
    unknown = sorted(set(config.shapes) - set(by_name))
    if unknown:
        raise ValueError(f"unknown shapes {unknown}; known: {', '.join(by_name)}")
    chosen = [by_name[name] for name in config.shapes]  # in the order asked
    with torch.no_grad():
        for shape in chosen:
            for dtype in config.dtypes:
                run_shape(shape, dtype, config, rows, meta)
                if out is not None:
                    write_results(_result(meta, rows, started), out)
    return _result(meta, rows, started)


def _result(meta: dict, rows: bench.Rows, started: float) -> dict:
    """The result document as it stands (bandwidths in GB/s, end load and seconds now)."""
    done = {
        **meta,
        "read_bandwidth": {str(t): bw / 1e9 for t, bw in meta["read_bandwidth"].items()},
    }
    done["load_avg_end"] = list(os.getloadavg())
    done["seconds"] = time.perf_counter() - started
    return {"meta": done, "rows": list(rows.rows)}


def _get(rows, case, backend, metric):
    return bench._value(rows, suite="real", case=case, backend=backend, metric=metric)


def format_table(result: dict) -> str:
    """The markdown table: one line per (shape, dtype, threads, batch)."""
    rows = result["rows"]
    out = [
        "| shape | dtype | threads | B | eager ms | Inductor ms | exact ms | default ms "
        "| exact / Inductor | noise | default / Inductor | default / exact | noise vs exact "
        "| exact A/A | experts exact -> default | exact GB/s | read GB/s | exact floor ms "
        "| exact floor fraction |",
        "| --- " * 19 + "|",
    ]
    for case in bench._cases(rows, "real"):
        shape, dtype, threads, batch = case.split("/")

        def g(backend, metric, case=case):
            return _get(rows, case, backend, metric)

        f = bench._fmt
        cells = [
            shape, dtype, threads[1:], batch[1:],
            f(g("eager", "ms"), ".2f"), f(g("inductor", "ms"), ".2f"),
            f(g("lynx-exact", "ms"), ".2f"), f(g("lynx", "ms"), ".2f"),
            f(g("lynx-exact", "paired_vs_inductor"), ".2f") + "x",
            f(g("lynx-exact", "noise"), ".2f"),
            f(g("lynx", "paired_vs_inductor"), ".2f") + "x",
            f(g("lynx", "paired_vs_exact"), ".2f") + "x",
            f(g("lynx", "noise_vs_exact"), ".2f"),
            f(g("lynx-exact", "aa_ratio"), ".2f") + "x",
            f(g("lynx-exact", "experts"), ".1f") + " -> " + f(g("lynx", "experts"), ".1f"),
            f(g("lynx-exact", "gbps"), ".1f"), f(g("lynx-exact", "read_gbps"), ".1f"),
            f(g("lynx-exact", "floor_ms"), ".2f"),
            f(g("lynx-exact", "floor_fraction"), ".2f"),
        ]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(result: dict, out: Path) -> Path:
    """time_vs_experts.png: per shape and thread count, ms against experts touched per
    backend, with the read-bandwidth floor as a line."""
    matplotlib = bench.require("matplotlib", "bench", "lynx-compile bench")
    matplotlib.use("Agg")
    plt = bench.require("matplotlib.pyplot", "bench", "lynx-compile bench")
    rows = result["rows"]
    groups = {}
    for case in bench._cases(rows, "real"):
        shape, dtype, threads, _ = case.split("/")
        groups.setdefault(f"{shape} {dtype}, {threads[1:]} threads", []).append(case)
    cols = min(4, max(1, len(groups)))
    nrows = max(1, math.ceil(len(groups) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    markers = dict(zip(BACKENDS, "osD^", strict=True))
    for ax, (title, group) in zip(axes.flat, groups.items(), strict=False):
        for backend in BACKENDS:
            xs = [_get(rows, c, backend, "experts") for c in group]
            ys = [_get(rows, c, backend, "ms") for c in group]
            ax.plot(xs, ys, marker=markers[backend], linestyle="-", label=backend)
        xs = [_get(rows, c, "lynx-exact", "experts") for c in group]
        fl = [_get(rows, c, "lynx-exact", "floor_ms") for c in group]
        ax.plot(xs, fl, color="grey", linestyle=":", label="read floor")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("distinct routed experts per call")
        ax.set_ylabel("ms per call")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    fig.tight_layout()
    path = out / "time_vs_experts.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(result: dict, out: Path) -> list[Path]:
    """OUT/results.json, OUT/results.md, OUT/time_vs_experts.png."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    meta = result["meta"]
    bw = ", ".join(f"{t} threads {v:.1f} GB/s" for t, v in meta["read_bandwidth"].items())
    lines = [
        f"# lynx-compile bench --suite real{' --quick' if meta['quick'] else ''}",
        "",
        f"{meta['date']}; {meta['device_name']}, {meta['cpu_count']} CPUs, torch {meta['torch']}, "
        f"Python {meta['python']}, lynx_compile {meta['source'] or 'version unknown'}; "
        f"{meta['seconds']:.0f} s in all. Load average at start {meta['load_avg_start'][0]:.1f}, "
        f"at end {meta['load_avg_end'][0]:.1f}.",
        f"Read bandwidth at the start (1 GiB float32 sum, best pass over 2 s): {bw}. Each "
        "row's floor is paired instead: the same sum timed in every round beside the "
        "backends (read GB/s: the median over rounds of its median pass); the floor fraction "
        "is the median over rounds of that round's floor time / lynx exact's median.",
        f"Timing: {meta['rounds']} interleaved rounds per row (odd rounds in reverse order), "
        "each timing every backend for "
        f"as many calls as fill ~{meta['turn_ms']:.0f} ms (at least {meta['calls']}, at most 10); "
        "ratios are paired (median over rounds of the within-round ratio of medians); noise "
        "is half the interquartile range of lynx exact's per-round ratios to Inductor, noise "
        "vs exact that of lynx default's per-round ratios to lynx exact; exact A/A is the "
        "same compiled lynx exact timed twice in every round (median over rounds of the "
        "second turn / the first), the spread two equal-work backends show in this run.",
        f"Router: {meta['router']}. Skipped: {'; '.join(meta['skipped']) or 'nothing'}.",
        "",
        format_table(result),
        "",
    ]
    (out / "results.md").write_text("\n".join(lines))
    return [out / "results.json", out / "results.md", plot(result, out)]


def config_from_args(args) -> RealConfig:
    """The suite's configuration from `lynx-compile bench` flags."""
    dtypes = tuple(getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[d]) for d in args.dtypes)
    overrides = {}
    if args.shapes:
        overrides["shapes"] = tuple(args.shapes)
    if args.quick:
        overrides.update(batches=(1, 4), threads=(1,), rounds=2, calls=1, warmup=1)
    if getattr(args, "rounds", None):
        overrides["rounds"] = args.rounds
    return RealConfig(quick=args.quick, dtypes=dtypes, **overrides)
