"""End to end: `lynx-compile demo` (reduced batch and steps) and `lynx-compile bench --quick`
run as a user runs them, in a subprocess, and print / write what they promise."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROW_KEYS = {"suite", "case", "backend", "device", "metric", "value", "unit"}


def _lynx_compile(args: list[str], timeout: float) -> str:
    """Run `python -m lynx_compile.cli ARGS` on CPU; its stdout. The measured compiles use
    fresh Inductor caches of their own, so the user's cache dir is left as it is."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "lynx_compile.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"lynx-compile {' '.join(args)} failed:\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_demo_prints_table_for_every_backend(tmp_path):
    out = _lynx_compile(
        ["demo", "--batch", "4", "--steps", "6", "--prompt-len", "16", "--threads", "1"],
        timeout=300,
    )
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("backend"))
    rows = {line.split()[0]: line.split() for line in lines[header + 1 : header + 4]}
    for backend in ("eager", "inductor", "lynx"):
        assert backend in rows, out
    assert float(rows["inductor"][1]) > 0 and float(rows["lynx"][1]) > 0, out  # compile s
    assert rows["inductor"][4] == "100.0%", out  # bytes = inductor: agrees with itself
    assert "lynx/exact =" in out and "--- prompt 0:" in out


def test_bench_quick_writes_schema_and_compile_rows(tmp_path):
    out_dir = tmp_path / "bench"
    _lynx_compile(["bench", "--quick", "--threads", "1", "--out", str(out_dir)], 300)
    result = json.loads((out_dir / "results.json").read_text())
    rows = result["rows"]
    assert rows and all(set(row) == ROW_KEYS for row in rows), rows[:3]
    assert {row["suite"] for row in rows} == {"compile", "recompile", "runtime"}
    assert {row["device"] for row in rows} == {"cpu"}
    compile_rows = [row for row in rows if row["metric"] == "compile_s"]
    cases = {row["case"] for row in compile_rows}
    assert len(cases) >= 2
    for case in cases:
        backends = {row["backend"] for row in compile_rows if row["case"] == case}
        assert backends == {"lynx", "inductor"}, case
    assert all(row["value"] > 0 and row["unit"] == "s" for row in compile_rows)
    runtime = {(r["backend"], r["metric"]) for r in rows if r["suite"] == "runtime"}
    for backend in ("eager", "inductor", "lynx-exact", "lynx"):
        assert {(backend, "ms"), (backend, "experts"), (backend, "paired_vs_inductor")} <= runtime
    assert ("lynx", "paired_vs_exact") in runtime
    assert "| case |" in (out_dir / "results.md").read_text()
    for png in ("compile.png", "runtime.png", "recompile.png"):
        assert (out_dir / png).stat().st_size > 0


def test_paired_ratio_cancels_load_that_drifts_between_rounds():
    from lynx_compile.tools.bench import paired_ratio

    # 3 rounds of 2 calls; the machine slows 3x in round 2 and 10x in round 3 for both
    ref = [1.0, 1.2, 3.0, 3.6, 10.0, 12.0]
    fast = [0.8, 0.96, 2.4, 2.88, 8.0, 9.6]
    assert abs(paired_ratio(fast, ref, calls=2) - 0.8) < 1e-12
    assert abs(paired_ratio(ref, fast, calls=2) - 1.25) < 1e-12
    # whereas the ratio of overall medians depends on where the slow rounds fall
    skewed = [0.8, 0.96, 2.4, 2.88, 80.0, 96.0]  # a 10x spike only in this backend's turn
    assert abs(paired_ratio(skewed, ref, calls=2) - 0.8) < 1e-12
