"""`lynx-compile dump` end to end (subprocess), its bad-input errors, and LYNX_DUMP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import networkx as nx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from lynx_compile.examples.moe_modules import DenseMoE
from lynx_compile.passes import report as report_mod

from lynx_compile import dump as dump_mod
from lynx_compile import graph_dump

# onnxruntime vs PyTorch, relative to the output's largest magnitude (the bound).
ONNX_RTOL = 1e-3
SITE_FIELDS = {"site", "kind", "status", "reason", "num_experts", "top_k", "graph", "node"}

_SCRIPT = Path(sys.executable).with_name("lynx-compile")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "lynx_compile.cli"]

FACTORIES = """
import torch

def raises():
    raise RuntimeError("checkpoint not found")

def no_moe():
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval(), (torch.randn(2, 8),)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every CLI run of this module, two at a time (the machine has two cores):
    {name: (CompletedProcess, --out folder)}."""
    root = tmp_path_factory.mktemp("dump")
    factories = root / "factories.py"
    factories.write_text(FACTORIES)
    blocker = root / "a_file"
    blocker.write_text("not a folder")
    cases = {
        "mixtral": ["hf:mixtral"],
        "tiny_exact": ["tiny", "--onnx", "--policy", "exact"],
        "tiny_affinity": ["tiny", "--onnx", "--policy", "affinity"],
        "unknown_target": ["no_such_target"],
        "factory_raises": [f"{factories}:raises"],
        "no_moe": [f"{factories}:no_moe"],
        "unwritable_out": ["tiny"],
    }
    outs = {name: root / name / "out" for name in cases}
    outs["unwritable_out"] = blocker / "out"

    def run(name):
        cmd = [*CLI, "dump", *cases[name], "--out", str(outs[name])]
        return name, subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(pool.map(run, cases))
    return {name: (done[name], outs[name]) for name in cases}


def test_mixtral_dump_has_before_after_report_and_picture(runs):
    done, out = runs["mixtral"]
    assert done.returncode == 0, done.stderr[-2000:]
    assert {"before0.py", "after0.py", "report.json", "report.txt", "region0.dot"} <= {
        p.name for p in out.iterdir()
    }
    assert "topk(" in (out / "before0.py").read_text()
    assert "lynx.route.default" in (out / "after0.py").read_text()
    report = json.loads((out / "report.json").read_text())
    routers = [s for s in report["sites"] if s["kind"] == "router"]
    assert [s["status"] for s in routers] == ["rewritten"]
    assert set(routers[0]) >= SITE_FIELDS
    assert routers[0]["num_experts"] == 8 and routers[0]["top_k"] == 2
    assert "rewritten" in (out / "report.txt").read_text()
    assert "palegreen" in (out / "region0.dot").read_text()  # the lynx op is highlighted
    assert "softmax_topk_renorm" in done.stdout  # the summary table


@pytest.mark.parametrize("policy", ["exact", "affinity"])
def test_tiny_onnx_runs_in_onnxruntime_like_pytorch(runs, policy):
    done, out = runs[f"tiny_{policy}"]
    assert done.returncode == 0, done.stderr[-2000:]
    proto = onnx.load(out / "model.onnx")
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}  # no custom kernels
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    with np.load(out / "inputs.npz") as inputs, np.load(out / "expected.npz") as expected:
        feeds = {i.name: inputs[i.name] for i in session.get_inputs()}
        names = [o.name for o in session.get_outputs()]
        for name, got in zip(names, session.run(names, feeds), strict=True):
            want = expected[name]
            assert np.abs(got - want).max() <= ONNX_RTOL * np.abs(want).max(), name
    report = json.loads((out / "report.json").read_text())
    assert report["onnx"]["onnxruntime_max_rel_error"] < ONNX_RTOL
    routers = [s["policy"] for s in report["sites"] if s["kind"] == "router"]
    assert routers and set(routers) == {policy}  # one site per MoE layer of the model


def test_tiny_affinity_changes_the_exported_outputs(runs):
    expected = []
    for policy in ("exact", "affinity"):
        with np.load(runs[f"tiny_{policy}"][1] / "expected.npz") as npz:
            expected.append(npz[npz.files[0]])
    assert not np.allclose(*expected)  # the affinity export is not exact routing in disguise


@pytest.mark.parametrize(
    "case,message",
    [
        ("unknown_target", "unknown target 'no_such_target'"),
        ("factory_raises", "the factory raised RuntimeError: checkpoint not found"),
        ("no_moe", "has no MoE router"),
        ("unwritable_out", "is a file, not a folder"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(runs, case, message):
    done, out = runs[case]
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not out.exists()
    if out.parent.is_dir():
        assert [p.name for p in out.parent.iterdir()] == []  # no staging folder left


def small_moe():
    """A DenseMoE and x [4, 1, 32]: in-process tests stay fast whatever `tiny` becomes."""
    torch.manual_seed(0)
    return DenseMoE().eval(), (torch.randn(4, 1, 32),)


def test_out_folder_with_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(dump_mod.DumpError, match="non-empty folder"):
        dump_mod.dump("tiny", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_previous_dump_is_replaced(tmp_path):
    target = f"{Path(__file__)}:small_moe"
    out = tmp_path / "d"
    dump_mod.dump(target, out)
    (out / "stale.txt").write_text("from an earlier dump")
    dump_mod.dump(target, out)
    assert not (out / "stale.txt").exists() and (out / "report.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


@torch.no_grad()
def test_lynx_dump_env_writes_the_same_files(runs, tmp_path, monkeypatch):
    out = tmp_path / "env"
    monkeypatch.setenv("LYNX_DUMP", str(out))
    model, (x,) = small_moe()
    torch._dynamo.reset()
    report_mod.clear_report()
    torch.compile(model, backend="lynx")(x)
    torch._dynamo.reset()
    graph_id = graph_dump.graphs_written(out)[0]["graph"]
    names = {p.name.replace(str(graph_id), "0") for p in out.iterdir()}
    assert names == {p.name for p in runs["mixtral"][1].iterdir()}
    sites = json.loads((out / "report.json").read_text())["sites"]
    assert sites == json.loads(json.dumps(report_mod.report()["sites"], default=str))
    assert "lynx.route.default" in (out / f"after{graph_id}.py").read_text()


def test_picture_is_rendered_when_graphviz_is_installed(tmp_path, monkeypatch):
    """A stand-in `dot` on PATH (Graphviz itself is optional) receives the DOT file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_dot = bin_dir / "dot"
    fake_dot.write_text('#!/bin/sh\n# args: -Tfmt in.dot -o out\ncp "$2" "$4"\n')
    fake_dot.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    region = nx.DiGraph()
    region.add_node("route", label="route\nlynx.route.default", kind="lynx")
    region.add_node("logits", label="logits\nlinear\n[8, 16]", kind="context")
    region.add_edge("logits", "route")
    written = graph_dump.write_picture(region, tmp_path / "region3")
    assert written == ["region3.dot", "region3.svg", "region3.png"]
    dot_text = (tmp_path / "region3.svg").read_text()
    assert '"logits" -> "route"' in dot_text and "palegreen" in dot_text
