"""benchmarks/gpu_check.py --dry-run: every step of the GPU check runs on CPU (tiny shapes,
interpreted kernels, no timings) and writes its JSON and Markdown. In a subprocess, so the
script's own TRITON_INTERPRET and torch.compile state stay out of this process."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO_ROOT as REPO


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["errors"] == [], result["errors"]
    assert result["correctness"] and all(c["ok"] for c in result["correctness"])
    backends = {row["backend"] for row in result["rows"]}
    assert {"hf-grouped-compile", "lynx-exact", "lynx-affinity"} <= backends
    for row in result["rows"]:
        assert set(row) == {
            "shape", "backend", "batch", "ms", "experts_touched", "floor_ms", "floor_fraction"
        }  # fmt: skip
        assert row["ms"] is None  # a dry run makes no timing claims
    assert "gpu_check (dry run" in out.with_suffix(".md").read_text()
