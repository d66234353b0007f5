"""benchmarks/gpu_check.py on CPU: the dry run (every step on tiny shapes, interpreted kernels,
no timings, in a subprocess so the script's TRITON_INTERPRET and torch.compile state stay out
of this process), and the parts that decide what is measured and what comes back: the time
budget and its watchdog, the JSON and summary writing, the same-work runs, the no-CUDA exit."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.helpers import REPO_ROOT as REPO

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy in interpreted kernels

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
ROW_KEYS = {
    "shape", "backend", "batch", "ms", "timing", "experts_touched", "floor_ms", "floor_fraction"
}  # fmt: skip


@pytest.fixture(scope="module")
def gpu_check():
    """The script as a module (it is not a package member)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["errors"] == [], result["errors"]
    assert not result["truncated"]
    assert result["correctness"] and all(c["ok"] for c in result["correctness"])
    backends = {row["backend"] for row in result["rows"]}
    assert {
        "hf-grouped-compile", "hf-grouped-compile-cg", "lynx-exact", "lynx-affinity",
        "lynx-exact-tma", "lynx-exact-compiled", "lynx-affinity-compiled", "lynx-exact-compiled-cg",
    } <= backends  # fmt: skip
    for row in result["rows"]:
        assert set(row) == ROW_KEYS
        assert row["ms"] is None  # a dry run makes no timing claims
        assert row["experts_touched"] is not None  # every run says which experts it read
        assert row["timing"].startswith("do_bench")
    assert "gpu_check (dry run" in out.with_suffix(".md").read_text()
    assert "== gpu_check summary ==" in proc.stdout[-12_000:]  # what the device returns


def test_steps_are_skipped_once_the_budget_is_spent(gpu_check, tmp_path):
    check = gpu_check.Check(dry_run=True, out=tmp_path / "r.json", budget_s=30)
    assert check.attempt("cheap", lambda: 1) == 1
    assert check.attempt("a compile", lambda: 2, needs_s=60) is None  # 60 s not left
    check.budget_s = 0
    assert check.attempt("late", lambda: 3) is None
    steps = [e["step"] for e in json.loads((tmp_path / "r.json").read_text())["errors"]]
    assert steps == ["a compile", "late"]


def test_failing_step_is_recorded_and_the_check_goes_on(gpu_check, tmp_path):
    check = gpu_check.Check(dry_run=True, out=tmp_path / "r.json")

    def broken():
        raise RuntimeError("no kernel image")

    assert check.attempt("broken", broken) is None
    assert check.attempt("next", lambda: "ran") == "ran"
    errors = json.loads((tmp_path / "r.json").read_text())["errors"]
    assert errors == [{"step": "broken", "error": "RuntimeError: no kernel image"}]


def test_watchdog_writes_what_finished_and_ends_the_run(tmp_path):
    """A step that overruns the budget: the finished row is written, the run ends at the
    budget with exit code 0 and a truncated result, the summary printed last."""
    out = tmp_path / "r.json"
    program = textwrap.dedent(
        f"""
        import importlib.util, sys, time
        spec = importlib.util.spec_from_file_location("gpu_check", {str(SCRIPT)!r})
        gc = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = gc
        spec.loader.exec_module(gc)
        check = gc.Check(dry_run=False, out=gc.Path({str(out)!r}), budget_s=1.0)
        check.start_watchdog()
        check.add("rows", gc.block_row("s", "lynx-exact", 1, 0.5, "do_bench", 8, 10**6, 4000.0))
        check.attempt("hangs", time.sleep, 60)
        print("not reached")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "not reached" not in proc.stdout
    assert "TRUNCATED at the time budget" in proc.stdout
    result = json.loads(out.read_text())
    assert result["truncated"] and result["rows"][0]["backend"] == "lynx-exact"
    assert any(e["step"] == "watchdog" for e in result["errors"])


def test_summary_fits_what_the_device_returns(gpu_check):
    """Thousands of rows and long errors still print a summary under 12,000 characters
    that ends with the newest rows and the errors."""
    check = gpu_check.Check(dry_run=False)
    for i in range(2000):
        row = gpu_check.block_row("Qwen3-30B-A3B", f"b{i}", 64, 0.3, "do_bench", 126, 9e6, 4e3)
        check.add("rows", row)
    check.error("compile", "x" * 5000)
    text = check.summary()
    assert len(text) < 12_000
    assert "| b1999 |" in text and "errors: 1" in text
    assert 0.9 < check.result["rows"][0]["floor_fraction"] < 1.0  # 126 x 9 MB / 4 TB/s


class NoCompile:
    """torch, with torch.compile returning the module as it is (no compile on CPU)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def compile(module, **kwargs):
        return module


def test_every_run_times_the_same_work(gpu_check, monkeypatch):
    """The timed call is the whole block and nothing else: one router linear each; the stock
    block's own top-k only (the exact ids for experts touched are computed apart), none in
    lynx's (its route kernel picks)."""
    shape = gpu_check.DRY_SHAPES[1]
    block = gpu_check.build_block(torch, shape, torch.device("cpu"), torch.float32, 0)
    runs = gpu_check.direct_runs(NoCompile(), block, shape)
    calls = {"topk": 0, "router_linear": 0}
    topk, linear = torch.topk, torch.nn.functional.linear

    def counted_topk(*args, **kwargs):
        calls["topk"] += 1
        return topk(*args, **kwargs)

    def counted_linear(inp, weight, *args, **kwargs):
        calls["router_linear"] += weight is block.gate.weight
        return linear(inp, weight, *args, **kwargs)

    monkeypatch.setattr(torch, "topk", counted_topk)
    monkeypatch.setattr(torch.nn.functional, "linear", counted_linear)
    x = torch.randn(3, 1, shape.hidden)
    want_topk = {"hf-grouped-compile": 1, "lynx-exact": 0, "lynx-affinity": 0}
    with torch.no_grad():
        for name, run in runs.items():
            calls.update(topk=0, router_linear=0)
            run.timed(x)
            assert calls == {"topk": want_topk.get(name, 0), "router_linear": 1}, name
            assert run.ids(x).shape == (3, shape.top_k)
    assert torch.equal(
        runs["hf-grouped-compile"].ids(x).sort(-1).values,
        runs["lynx-exact"].ids(x).sort(-1).values,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: it would run")
def test_without_cuda_it_exits_2_and_says_why(gpu_check, tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no CUDA device" in err and "\n" not in err
    assert json.loads(out.read_text())["errors"][0]["step"] == "start"


def test_sm90_build_of_the_experts_kernels_without_a_gpu():
    """benchmarks/experts_sm90_build.py: the experts kernels build for sm_90 here (triton's
    own ptxas, nothing launched); the quick kernels only, the GEMMs take ~10 s more."""
    script = REPO / "benchmarks" / "experts_sm90_build.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--preset", "qwen3-30b-a3b", "--kernels", "count,combine"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| qwen3")]
    assert [r.split(" | ")[0] for r in rows] == ["| qwen3-30b-a3b count", "| qwen3-30b-a3b combine"]
    assert all(r.split(" | ")[6] == "0" for r in rows)  # no spills
