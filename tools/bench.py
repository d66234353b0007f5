"""`lynx-compile bench`: compile time, recompiles, runtime and experts touched, lynx vs stock.

Three suites, each a list of rows {suite, case, backend, device, metric, value, unit}:

  compile    cold and warm compile of one call, lynx (default options) vs inductor, the
             fastest of 3 (--quick: 2) cold compiles per backend, backends alternating.
             cold: torch._inductor.utils.fresh_cache() (a fresh, empty
             TORCHINDUCTOR_CACHE_DIR and Inductor's in-process code caches cleared) plus
             torch._dynamo.reset(); warm: Dynamo reset again, same cache dir (FX graph cache
             and compiled kernels present). A warm-up compile first pays the one-off costs of
             any first compile in a process (imports, Inductor's CPU vector-ISA probe).
             Metrics: compile_s (cold), compile_warm_s, lynx_pass_s (the lynx passes' own
             time within the cold compile, from lynx_compile.backend.pass_seconds).
  recompile  one compiled callable fed decode batches 1, 2, ..., 64 in turn, from a fresh
             cache: graphs_compiled (batch 1 is specialised, the rest can share one dynamic
             graph) and sweep_s.
  runtime    eager, inductor, lynx-exact (options {"policy": "exact"}) and lynx (default
             policy), compiled side by side and timed in interleaved rounds, one synchronised
             call at a time: ms (median) and ms_min; paired_vs_inductor (and, for lynx,
             paired_vs_exact), the median over rounds of the ratio of the two backends'
             medians within each round, which cancels load that drifts between rounds;
             experts, distinct experts per MoE layer
             per call (lynx's telemetry, from a separate compile: telemetry syncs and routes
             through an opaque op, so it stays out of the timed graphs); on CUDA floor_ms and
             floor_fraction, the bandwidth floor (experts touched x bytes of one expert /
             measured device copy bandwidth) over the measured time.

Cases: the embedded TinyMoE's decode step (whole model, one byte per sequence through the
KV cache) and one of its MoE layers, on held-out prompts; tiny transformers MoE blocks
(lynx_compile.tools.hf_tiny, grouped_mm experts) for the compile suite. Writes
OUT/results.json, OUT/results.md and OUT/*.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from lynx_compile.lowering import cpu_native
from lynx_compile.tools import hf_tiny
from lynx_compile.tools.demo import (
    checkpoint_label,
    decode_router_experts,
    heldout_prompts,
    load_demo_model,
    paused_gc,
    pick_device,
    prefill,
    synchronize,
    ticking,
    warm_up_compiler,
)
from lynx_compile.tools.tiny_moe import DEFAULT_CHECKPOINT, add_checkpoint_argument

import lynx_compile
from lynx_compile import backend as lynx_backend_mod
from lynx_compile._extras import require

# Checked before any work: the hf cases need transformers, the plots matplotlib.
tqdm = require("tqdm", "bench", "lynx-compile bench").tqdm
require("transformers", "bench", "lynx-compile bench")
require("matplotlib", "bench", "lynx-compile bench")

COMPILE_BACKENDS = {"inductor": ("inductor", None), "lynx": ("lynx", {})}
RUNTIME_BACKENDS = {
    "eager": None,
    "inductor": ("inductor", None),
    "lynx-exact": ("lynx", {"policy": "exact"}),
    "lynx": ("lynx", {}),
}
HF_FAMILIES = ("mixtral", "qwen3_moe", "olmoe")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What one `lynx-compile bench` run measures."""

    quick: bool = False
    device: str = "auto"
    out: Path = Path("bench_results")
    checkpoint: Path = DEFAULT_CHECKPOINT
    batch: int = 16  # decode batch of the compile suite
    runtime_batches: tuple[int, ...] = (1, 16, 64)
    sweep_max: int = 64
    prompt_len: int = 32
    warmup: int = 3
    rounds: int = 20  # timing rounds, each visiting every backend in turn
    calls: int = 4  # timed calls per backend per round
    compile_repeats: int = 3  # cold compiles per backend and case (the fastest is kept)
    profile: bool = False

    @classmethod
    def for_mode(cls, quick: bool, **overrides) -> BenchConfig:
        """The full configuration, or the reduced one that fits 60 s on a 2-core CPU."""
        if quick:
            overrides = {
                "runtime_batches": (16,),
                "warmup": 2,
                "rounds": 2,
                "calls": 5,
                "compile_repeats": 2,
                **overrides,
            }
        return cls(quick=quick, **overrides)


@dataclasses.dataclass
class Case:
    """One module to compile and time, with its inputs as a function of the decode batch."""

    name: str
    module: torch.nn.Module
    make_args: Callable[[int], tuple]  # batch -> positional args of module(...)
    expert_bytes: int  # bytes of one expert's weights (every MoE layer alike)
    moe_layers: int


def expert_bytes(module: torch.nn.Module) -> tuple[int, int]:
    """(bytes of one expert's weights, MoE layers): from the 3-D expert weight tensors
    [E, ., .] of `module`, grouped per experts module."""
    per_layer: dict[str, int] = {}
    for name, p in module.named_parameters():
        if p.dim() == 3:
            owner = name.rsplit(".", 1)[0]
            per_layer[owner] = per_layer.get(owner, 0) + p[0].numel() * p.element_size()
    if not per_layer:
        raise ValueError(f"{type(module).__name__} has no 3-D expert weights [E, ., .]")
    return max(per_layer.values()), len(per_layer)


def tiny_moe_cases(config: BenchConfig, device: torch.device) -> list[Case]:
    """The embedded model's decode step and its first MoE layer, fed held-out bytes.

    One eager prefill of `sweep_max` held-out prompts serves every batch: decode rows are
    independent, so batch B is the first B rows of the cache and of layer 0's MoE input.
    """
    model = load_demo_model(config.checkpoint, device, log=tqdm.write)
    rows = max(config.sweep_max, config.batch, *config.runtime_batches)
    prompts = heldout_prompts(rows, config.prompt_len, seed=0).to(device)
    cache, first = prefill(model, prompts, config.prompt_len + 1)
    position = torch.tensor(config.prompt_len, device=device)
    layer = model.layers[0].moe
    captured = []
    handle = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0].clone()))
    try:
        with torch.no_grad():
            model(first, [tuple(t.clone() for t in kv) for kv in cache], position)
    finally:
        handle.remove()
    layer_input = captured[0]  # [rows, 1, d]

    def decode_args(batch: int) -> tuple:
        """(tokens [B, 1], a prefilled KV cache of B sequences, position): the next step."""
        sliced = [tuple(t[:batch].clone() for t in kv) for kv in cache]
        return first[:batch], sliced, position

    def layer_args(batch: int) -> tuple:
        """(x [B, 1, d],): layer 0's MoE input at that decode step."""
        return (layer_input[:batch],)

    size, layers = expert_bytes(model)
    return [
        Case("tiny_moe/decode_step", model, decode_args, size, layers),
        Case("tiny_moe/moe_layer", layer, layer_args, size, 1),
    ]


def hf_block_case(family: str, device: torch.device) -> Case:
    """A tiny random transformers sparse-MoE block (grouped_mm experts), decode-shaped input."""
    block = hf_tiny.build_block(family, "grouped_mm").to(device)
    hidden = block.experts.gate_up_proj.shape[-1]
    gen = torch.Generator().manual_seed(0)

    def args(batch: int) -> tuple:
        return (torch.randn(batch, 1, hidden, generator=gen).to(device),)

    size, layers = expert_bytes(block)
    return Case(f"{family}/block", block, args, size, layers)


def time_calls(fn: Callable, args: tuple, device: torch.device, calls: int) -> list[float]:
    """Wall time of each of `calls` calls of fn(*args) in ms, synchronised per call (decode
    is latency-bound: one call's latency is what a server waits for). Python's cyclic GC is
    paused while timing, as servers pause or freeze it on the decode path: a collection
    would land on whichever backend happens to run when the allocation count trips it."""
    times = []
    with paused_gc(), torch.no_grad():
        for _ in range(calls):
            synchronize(device)
            start = time.perf_counter()
            fn(*args)
            synchronize(device)
            times.append(1e3 * (time.perf_counter() - start))
    return times


def time_interleaved(
    fns: dict[str, Callable],
    args: tuple,
    device: torch.device,
    warmup: int,
    rounds: int,
    calls: int,
) -> dict[str, list[float]]:
    """Per-call ms of every fn, measured in `rounds` rounds that visit each fn in turn for
    `calls` calls: load from other processes then lands on every fn alike. Odd rounds visit
    the fns in reverse order, so no fn always runs right after the same other one (what the
    one before leaves in the caches, or a drift within a round, moved an A/A pair's ratio by
    2-4% on this VM: docs/perf-notes.md, "bench real, paired floor")."""
    for fn in fns.values():
        time_calls(fn, args, device, warmup)
    samples: dict[str, list[float]] = {label: [] for label in fns}
    order = list(fns.items())
    for r in range(rounds):
        for label, fn in order if r % 2 == 0 else reversed(order):
            samples[label] += time_calls(fn, args, device, calls)
    return samples


def paired_ratio(samples: list[float], ref: list[float], calls: int) -> float:
    """Median over rounds of median(samples' round) / median(ref's round): both lists hold
    `calls` consecutive calls per round, from time_interleaved. Each round's backends run
    within milliseconds of each other, so load that drifts between rounds cancels."""
    rounds = [slice(i, i + calls) for i in range(0, len(ref), calls)]
    return statistics.median(
        statistics.median(samples[r]) / statistics.median(ref[r]) for r in rounds
    )


def compiled_call(case: Case, backend: str, options: dict | None, batch: int, reset: bool = True):
    """(compiled module, seconds of its first call at `batch`: the compile). With `reset`,
    Dynamo's cache and lynx's report are emptied first (else earlier compiles stay usable)."""
    if reset:
        torch._dynamo.reset()
        lynx_compile.clear_report()
    fn = torch.compile(case.module, backend=backend, options=options)
    args = case.make_args(batch)
    device = next(case.module.parameters()).device
    with torch.no_grad():
        synchronize(device)
        start = time.perf_counter()
        fn(*args)
        synchronize(device)
    return fn, time.perf_counter() - start


@dataclasses.dataclass
class Rows:
    """Result rows of one run, all on one device."""

    device: str
    rows: list[dict] = dataclasses.field(default_factory=list)

    def add(self, suite: str, case: str, backend: str, metric: str, value, unit: str) -> None:
        """Append one row."""
        self.rows.append(
            {
                "suite": suite,
                "case": case,
                "backend": backend,
                "device": self.device,
                "metric": metric,
                "value": value,
                "unit": unit,
            }
        )


def run_compile_suite(cases: list[Case], config: BenchConfig, rows: Rows) -> None:
    """Cold and warm compile of each case, each in a fresh cache, repeated
    `config.compile_repeats` times with the backends alternating: compile_s is the fastest
    cold compile (load from other work only ever adds time; one compile of a few seconds
    swung by 2x between identical runs on the development machine), compile_warm_s and
    lynx_pass_s come from the same repeat."""
    for case in cases:
        best: dict[str, tuple[float, float, float]] = {}
        for repeat in range(config.compile_repeats):
            for label, (backend, options) in COMPILE_BACKENDS.items():
                with torch._inductor.utils.fresh_cache():
                    before = len(lynx_backend_mod.pass_seconds)
                    with ticking(f"compile {case.name} {label} cold #{repeat + 1}"):
                        _, cold = compiled_call(case, backend, options, config.batch)
                    pass_s = sum(lynx_backend_mod.pass_seconds[before:])
                    with ticking(f"compile {case.name} {label} warm #{repeat + 1}"):
                        _, warm = compiled_call(case, backend, options, config.batch)
                if label not in best or cold < best[label][0]:
                    best[label] = (cold, warm, pass_s)
        for label, (cold, warm, pass_s) in best.items():
            rows.add("compile", case.name, label, "compile_s", cold, "s")
            rows.add("compile", case.name, label, "compile_warm_s", warm, "s")
            if label == "lynx":
                rows.add("compile", case.name, label, "lynx_pass_s", pass_s, "s")
    torch._dynamo.reset()


def _counting_backend(backend: str, options: dict | None, counter: list[int]):
    """A backend that counts the graphs handed to `backend` before compiling them."""
    if backend == "lynx":
        from lynx_compile.backend import lynx_backend as compile_graph

        def inner(gm, example_inputs):
            return compile_graph(gm, example_inputs, options=options)
    else:
        from torch._inductor.compile_fx import compile_fx as inner

    def counted(gm, example_inputs):
        counter.append(1)
        return inner(gm, example_inputs)

    return counted


def run_recompile_suite(
    cases: list[Case], config: BenchConfig, rows: Rows, backends: tuple[str, ...]
) -> dict[str, list[float]]:
    """Decode batch 1..sweep_max through one compiled callable per (case, backend), from a
    fresh Inductor cache: graphs compiled and total seconds; returns per-call seconds."""
    curves = {}
    batches = range(1, config.sweep_max + 1)
    for case in cases:
        for label in backends:
            backend, options = COMPILE_BACKENDS[label]
            torch._dynamo.reset()
            counter: list[int] = []
            fn = torch.compile(case.module, backend=_counting_backend(backend, options, counter))
            device = next(case.module.parameters()).device
            seconds = []
            with torch.no_grad(), torch._inductor.utils.fresh_cache():
                for batch in tqdm(batches, desc=f"sweep {case.name} {label}", leave=False):
                    args = case.make_args(batch)
                    synchronize(device)
                    start = time.perf_counter()
                    fn(*args)
                    synchronize(device)
                    seconds.append(time.perf_counter() - start)
            rows.add("recompile", case.name, label, "graphs_compiled", len(counter), "graphs")
            rows.add("recompile", case.name, label, "sweep_s", sum(seconds), "s")
            curves[f"{case.name} {label}"] = seconds
    torch._dynamo.reset()
    return curves


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a device-to-device copy (bytes read + written), 256 MiB."""
    src = torch.empty(64 * 2**20, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    time_calls(dst.copy_, (src,), device, 3)
    seconds = statistics.median(time_calls(dst.copy_, (src,), device, 20)) / 1e3
    return 2 * src.numel() * src.element_size() / seconds


def run_runtime_suite(cases: list[Case], config: BenchConfig, rows: Rows) -> None:
    """Per case and decode batch: compile every backend, time them interleaved (median and
    minimum ms), then distinct experts from a separate telemetry compile."""
    device = next(cases[0].module.parameters()).device
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    if bandwidth:
        rows.add("runtime", "device", "copy", "copy_bandwidth", bandwidth / 1e9, "GB/s")
    for case in cases:
        for batch in config.runtime_batches:
            name = f"{case.name}/b{batch}"
            torch._dynamo.reset()
            fns = {}
            for label, spec in RUNTIME_BACKENDS.items():
                if spec is None:
                    fns[label] = case.module
                    continue
                # No reset in between: the compiled backends coexist in Dynamo's cache.
                with ticking(f"compile {name} {label}"):
                    fns[label], _ = compiled_call(case, *spec, batch, reset=False)
            with ticking(f"time {name}"):
                samples = time_interleaved(
                    fns, case.make_args(batch), device, config.warmup, config.rounds, config.calls
                )
            timings = {label: statistics.median(ms) for label, ms in samples.items()}
            for label, ms in samples.items():
                rows.add("runtime", name, label, "ms", timings[label], "ms")
                rows.add("runtime", name, label, "ms_min", min(ms), "ms")
                paired = paired_ratio(samples[label], samples["inductor"], config.calls)
                rows.add("runtime", name, label, "paired_vs_inductor", paired, "x")
            paired = paired_ratio(samples["lynx"], samples["lynx-exact"], config.calls)
            rows.add("runtime", name, "lynx", "paired_vs_exact", paired, "x")
            with ticking(f"experts {name}"):
                compiled_call(case, "lynx", {"telemetry": True}, batch)
                exact, chosen = decode_router_experts()
            for label in RUNTIME_BACKENDS:
                experts = chosen if label == "lynx" else exact
                rows.add("runtime", name, label, "experts", experts, "experts/layer")
                if bandwidth:
                    floor = experts * case.moe_layers * case.expert_bytes / bandwidth * 1e3
                    rows.add("runtime", name, label, "floor_ms", floor, "ms")
                    rows.add("runtime", name, label, "floor_fraction", floor / timings[label], "")
    torch._dynamo.reset()


def profile_case(case: Case, batch: int, device: torch.device, out: Path, calls: int = 20):
    """torch.profiler table per runtime backend of `calls` calls at `batch`, sorted by self
    time: OUT/profile_<case>_<backend>.txt. Says where each backend's time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    args = case.make_args(batch)
    for label, spec in RUNTIME_BACKENDS.items():
        fn = case.module if spec is None else compiled_call(case, spec[0], spec[1], batch)[0]
        time_calls(fn, args, device, 3)
        with torch.no_grad(), profile(activities=activities) as prof:
            for _ in range(calls):
                fn(*args)
            synchronize(device)
        table = prof.key_averages().table(sort_by=sort_by, row_limit=30, max_name_column_width=70)
        paths.append(out / f"profile_{case.name.replace('/', '_')}_b{batch}_{label}.txt")
        paths[-1].write_text(f"{case.name} batch {batch}, {label}, {calls} calls\n{table}\n")
    torch._dynamo.reset()
    return paths


def source_version() -> str | None:
    """`git describe --always --dirty` of the checkout lynx_compile runs from, if any."""
    import subprocess

    try:
        proc = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None


def native_build_seconds() -> float | None:
    """Seconds the one-off build of the native CPU kernels took on this machine (it builds
    now if not cached yet; the compiles then load it, so none of them pays it): None if
    it does not build."""
    try:
        library = cpu_native.build()
    except (OSError, RuntimeError):
        return None
    return cpu_native.build_seconds(library)


def machine_meta(device: torch.device) -> dict:
    """Where and when a run happens: date, device, CPUs, threads, versions, load average."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "source": source_version(),
        "load_avg_start": os.getloadavg(),
    }


def _cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_experiment(config: BenchConfig) -> dict:
    """Every suite of one configuration: {"meta": ..., "rows": [...], "sweeps": {...}}."""
    device = pick_device(config.device)
    started = time.perf_counter()
    meta = {
        **machine_meta(device),
        "quick": config.quick,
        "decode_batch": config.batch,
        "cold_cache": "torch._inductor.utils.fresh_cache() + torch._dynamo.reset() per compile",
        "compile_repeats": config.compile_repeats,
    }
    rows = Rows(str(device))
    if device.type == "cpu":
        with ticking("one-off build of the native CPU kernels"):
            meta["native_build_s"] = native_build_seconds()
            cpu_native.available()  # and the cached build the compiles load (once per machine)
    with ticking("warm-up compile (imports, ISA probe)"):
        meta["warm_up_s"] = warm_up_compiler(device)
    tiny = tiny_moe_cases(config, device)
    decode_step, moe_layer = tiny
    meta["checkpoint"] = checkpoint_label(config.checkpoint)
    families = HF_FAMILIES[:1] if config.quick else HF_FAMILIES
    hf = [hf_block_case(family, device) for family in families]
    with torch.no_grad():
        if config.quick:
            run_compile_suite([moe_layer, *hf], config, rows)
            # lynx only: its rewrite is what could add recompiles; keeps --quick within 60 s
            sweeps = run_recompile_suite([moe_layer], config, rows, ("lynx",))
            run_runtime_suite([moe_layer], config, rows)
        else:
            run_compile_suite([decode_step, moe_layer, *hf], config, rows)
            sweeps = run_recompile_suite(
                [moe_layer, decode_step], config, rows, tuple(COMPILE_BACKENDS)
            )
            run_runtime_suite([moe_layer, decode_step], config, rows)
        if config.profile:
            for case in (decode_step, moe_layer):
                profile_case(case, config.batch, device, config.out)
    meta["load_avg_end"] = os.getloadavg()
    meta["seconds"] = time.perf_counter() - started
    return {"meta": meta, "rows": rows.rows, "sweeps": sweeps}


def _value(rows: list[dict], **match) -> float | None:
    for row in rows:
        if all(row[k] == v for k, v in match.items()):
            return row["value"]
    return None


def _cases(rows: list[dict], suite: str) -> list[str]:
    return list(dict.fromkeys(r["case"] for r in rows if r["suite"] == suite))


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def format_tables(result: dict) -> str:
    """Markdown tables of every suite (also what the CLI prints)."""
    rows, meta = result["rows"], result["meta"]
    out = ["### Compile time (s): cold = fresh Inductor cache, warm = same cache after reset", ""]
    out += [
        "| case | inductor cold | lynx cold | lynx / inductor | inductor warm | lynx warm "
        "| lynx pass ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case in _cases(rows, "compile"):

        def get(backend: str, metric: str, case: str = case) -> float | None:
            return _value(rows, suite="compile", case=case, backend=backend, metric=metric)

        ind, lyn = get("inductor", "compile_s"), get("lynx", "compile_s")
        out.append(
            f"| {case} | {_fmt(ind, '.2f')} | {_fmt(lyn, '.2f')} | {_fmt(lyn / ind, '.2f')}x "
            f"| {_fmt(get('inductor', 'compile_warm_s'), '.2f')} "
            f"| {_fmt(get('lynx', 'compile_warm_s'), '.2f')} "
            f"| {_fmt(_scaled(get('lynx', 'lynx_pass_s'), 1e3), '.1f')} |"
        )
    sweep_max = max((len(s) for s in result["sweeps"].values()), default=0)
    out += ["", f"### Recompiles over decode batch 1..{sweep_max}", ""]
    out += ["| case | backend | graphs compiled | sweep s |", "| --- | --- | --- | --- |"]
    for case in _cases(rows, "recompile"):
        for backend in COMPILE_BACKENDS:
            graphs, sweep = (
                _value(rows, suite="recompile", case=case, backend=backend, metric=metric)
                for metric in ("graphs_compiled", "sweep_s")
            )
            if graphs is not None:
                out.append(f"| {case} | {backend} | {graphs} | {_fmt(sweep, '.1f')} |")
    cuda = meta["device"].startswith("cuda")
    out += [
        "",
        "### Runtime per call (median and minimum ms, backends timed in interleaved rounds; "
        "paired: median over rounds of the within-round ratio) and distinct experts per MoE "
        "layer",
        "",
    ]
    header = (
        "| case | backend | ms | min ms | vs inductor | paired vs inductor | paired vs exact "
        "| experts |" + (" floor ms | floor/ms |" if cuda else "")
    )
    out += [header, "| --- " * (header.count("|") - 1) + "|"]
    for case in _cases(rows, "runtime"):
        if case == "device":
            continue
        ref = _value(rows, suite="runtime", case=case, backend="inductor", metric="ms")
        for backend in RUNTIME_BACKENDS:

            def get(metric: str, case: str = case, backend: str = backend) -> float | None:
                return _value(rows, suite="runtime", case=case, backend=backend, metric=metric)

            ms = get("ms")
            ratio = ms / ref if ms and ref else None
            vs_exact = get("paired_vs_exact")
            line = (
                f"| {case} | {backend} | {_fmt(ms)} | {_fmt(get('ms_min'))} "
                f"| {_fmt(ratio, '.2f')}x | {_fmt(get('paired_vs_inductor'), '.2f')}x "
                f"| {_fmt(vs_exact, '.2f') + 'x' if vs_exact else ''} "
                f"| {_fmt(get('experts'), '.2f')} |"
            )
            if cuda:
                line += f" {_fmt(get('floor_ms'))} | {_fmt(get('floor_fraction'), '.2f')} |"
            out.append(line)
    return "\n".join(out)


def plot(result: dict, out: Path) -> list[Path]:
    """compile.png (cold/warm per case), runtime.png (ms per backend), recompile.png."""
    matplotlib = require("matplotlib", "bench", "lynx-compile bench")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "bench", "lynx-compile bench")

    rows, paths = result["rows"], []
    cases = _cases(rows, "compile")
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.2
    for i, (backend, metric) in enumerate(
        [
            ("inductor", "compile_s"),
            ("lynx", "compile_s"),
            ("inductor", "compile_warm_s"),
            ("lynx", "compile_warm_s"),
        ]
    ):
        values = [
            _value(rows, suite="compile", case=c, backend=backend, metric=metric) or 0
            for c in cases
        ]
        label = f"{backend} {'cold' if metric == 'compile_s' else 'warm'}"
        ax.bar([x + (i - 1.5) * width for x in range(len(cases))], values, width, label=label)
    ax.set_xticks(range(len(cases)), cases, fontsize=8)
    ax.set_ylabel("compile s")
    ax.set_title(f"compile time on {result['meta']['device']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "compile.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    cases = [c for c in _cases(rows, "runtime") if c != "device"]
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, backend in enumerate(RUNTIME_BACKENDS):
        ref = [
            _value(rows, suite="runtime", case=c, backend="inductor", metric="ms") for c in cases
        ]
        values = [
            _value(rows, suite="runtime", case=c, backend=backend, metric="ms") / r
            for c, r in zip(cases, ref, strict=True)
        ]
        ax.bar([x + (i - 1.5) * width for x in range(len(cases))], values, width, label=backend)
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(range(len(cases)), cases, fontsize=7, rotation=15)
    ax.set_ylabel("time per call / inductor's")
    ax.set_title(f"runtime on {result['meta']['device']} (lower is faster)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "runtime.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    for label, seconds in result["sweeps"].items():
        ax.plot(range(1, len(seconds) + 1), seconds, marker=".", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("decode batch (fed in order 1, 2, ...)")
    ax.set_ylabel("seconds of the call (compiles show as spikes)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "recompile.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def native_line(meta: dict) -> str:
    """The results.md line on the one-off build of the native CPU kernels."""
    if meta["device"] != "cpu":
        return "CUDA: the lynx ops run as Triton kernels (no native CPU build involved)."
    seconds = meta.get("native_build_s")
    if seconds is None:
        return "The native CPU kernels did not build here: lynx ran its traced CPU fallback."
    return (
        f"The native CPU kernels (lowering/lynx_ops.cpp with lynx_cpu.c) built once on this "
        f"machine in {seconds:.1f} s "
        "and are cached outside Inductor's cache, so the compile times above do not include it."
    )


def write_results(result: dict, out: Path) -> list[Path]:
    """OUT/results.json, OUT/results.md and the plots; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    meta = result["meta"]
    lines = [
        f"# lynx-compile bench{' --quick' if meta['quick'] else ''}: {meta['device']}",
        "",
        f"{meta['date']}; {meta['device_name']}, {meta['cpu_count']} CPUs, torch "
        f"{meta['torch']} ({meta['torch_threads']} threads), Python {meta['python']}, "
        f"lynx_compile {meta['source'] or 'version unknown'}; "
        f"checkpoint {meta['checkpoint'] or 'none (random TinyMoE)'}; decode batch "
        f"{meta['decode_batch']} for the compile suite; {meta['seconds']:.0f} s in all.",
        f"Load average at start {meta['load_avg_start'][0]:.1f}, at end "
        f"{meta['load_avg_end'][0]:.1f} (above the CPU count means other work shared the CPUs "
        "and timings are noisy).",
        f"Cold cache: {meta['cold_cache']}; the fastest of {meta['compile_repeats']} cold compiles "
        f"per backend (alternating); a {meta['warm_up_s']:.1f} s warm-up compile ran first.",
        native_line(meta),
        "",
        format_tables(result),
        "",
    ]
    (out / "results.md").write_text("\n".join(lines))
    return [out / "results.json", out / "results.md", *plot(result, out)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `lynx-compile bench`."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one MoE layer and one transformers family, batch 16 only, recompile sweep of "
        "lynx only: <= 60 s on CPU",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to run (auto: CUDA when present)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench_results"), help="output directory")
    add_checkpoint_argument(parser)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: decode-sized ops gain little from a second thread, "
        "and on a shared machine a descheduled OpenMP thread stalls every op; 0: torch's choice)",
    )
    parser.add_argument(
        "--suite",
        choices=("tiny", "real"),
        default="tiny",
        help="tiny: TinyMoE and toy transformers blocks (compile, recompile, runtime); real: "
        "one transformers MoE block per published shape (Qwen3-30B-A3B, Mixtral-8x7B, ...), "
        "seeded random weights, batches 1/4/16/64, 1 thread and all cores (--quick: toy "
        "dimensions, same code)",
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        help="--suite real: only these shapes (names as in bench_real.SHAPES)",
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=("bf16", "fp32"),
        default=["bf16"],
        help="--suite real: weight and activation dtypes (fp32 shapes that do not fit in "
        "memory are skipped and listed)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="--suite real: interleaved rounds per row (default 5, --quick 2); more rounds "
        "narrow the paired ratios' noise",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also write torch.profiler tables of the TinyMoE decode step and MoE layer per "
        "backend (OUT/profile_*.txt)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the suites, print the tables, write the results; returns 0."""
    if args.suite == "real":
        from lynx_compile.tools import bench_real

        # --threads does not apply: the suite runs 1 thread and all of torch's threads itself
        result = bench_real.run_real(bench_real.config_from_args(args), args.out)
        print(bench_real.format_table(result))
        paths = bench_real.write_results(result, args.out)
        print(f"wrote {', '.join(str(p) for p in paths)} in {result['meta']['seconds']:.0f} s")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    config = BenchConfig.for_mode(
        args.quick,
        device=args.device,
        out=args.out,
        checkpoint=args.checkpoint,
        profile=args.profile,
    )
    result = run_experiment(config)
    print(format_tables(result))
    paths = write_results(result, config.out)
    print(f"wrote {', '.join(str(p) for p in paths)} in {result['meta']['seconds']:.0f} s")
    return 0
