"""The runtime needs torch only: `import lynx_compile` and a compile with backend="lynx"
load none of the tools' or exporters' libraries, and still work with them uninstalled;
a tool whose library is missing exits with one line naming the extra to install.

networkx is a dependency of torch: Inductor's lowering, which lowering/ registers into, loads
torch's partitioner, which imports it. It is checked against that baseline, and the source
check below makes sure no lynx_compile module imports it (or any optional library) itself."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

from tests.helpers import REPO_ROOT as REPO

OPTIONAL = ("transformers", "matplotlib", "safetensors", "onnx", "tqdm", "networkx")
UNINSTALLABLE = tuple(m for m in OPTIONAL if m != "networkx")  # torch.compile needs networkx

# Makes the libraries in BLOCKED uninstalled for this process: every meta path finder is
# wrapped so that it finds none of them, as in a Python without them (imports raise
# ModuleNotFoundError, importlib.util.find_spec returns None, no sys.modules entry).
BLOCKER = """
import sys
BLOCKED = {blocked!r}

class _Uninstalled:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.finder, attr)

sys.meta_path[:] = [_Uninstalled(f) for f in sys.meta_path]
"""

# A plain PyTorch MoE (examples/moe_modules.py) through torch.compile(backend="lynx") on a
# decode step, under no_grad as served; prints which OPTIONAL modules got loaded.
COMPILE_PLAIN_MOE = """
import json, sys
import torch
OPTIONAL = {optional!r}
import torch._inductor.lowering  # torch's own imports: networkx (partitioner), tqdm (torch.hub)
preloaded = {{m for m in OPTIONAL if m in sys.modules}}
import lynx_compile
after_import = [m for m in OPTIONAL if m in sys.modules and m not in preloaded]
import torch._inductor.compile_fx  # what every torch.compile loads (networkx, for one)
preloaded |= {{m for m in OPTIONAL if m in sys.modules}}
from lynx_compile.examples.moe_modules import DenseMoE
torch.manual_seed(0)
model = DenseMoE(dim=32, hidden=48, num_experts=16, top_k=2).eval()
x = torch.randn(4, 1, 32)  # [B, T=1, d]: a decode step
with torch.no_grad():
    want = model(x)
    got = torch.compile(model, backend="lynx", options={{"policy": "exact"}})(x)
torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
rewritten = sum(s["status"] == "rewritten" for s in lynx_compile.report()["sites"])
after_compile = [m for m in OPTIONAL if m in sys.modules and m not in preloaded]
print(json.dumps({{"after_import": after_import, "after_compile": after_compile,
                   "rewritten": rewritten}}))
"""


def _python(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
    )


def _last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_and_compile_load_no_optional_library():
    """With every library installed, the runtime imports none of them (beyond torch's own)."""
    result = _last_json(_python(COMPILE_PLAIN_MOE.format(optional=OPTIONAL)))
    assert result["after_import"] == [], result
    assert result["after_compile"] == [], result
    assert result["rewritten"] >= 1, result


def test_compile_runs_with_optional_libraries_uninstalled():
    """The same compile in a Python where the optional libraries cannot be imported."""
    code = BLOCKER.format(blocked=UNINSTALLABLE) + COMPILE_PLAIN_MOE.format(optional=OPTIONAL)
    result = _last_json(_python(code))
    assert result == {"after_import": [], "after_compile": [], "rewritten": result["rewritten"]}
    assert result["rewritten"] >= 1, result


def _cli_without(blocked: tuple[str, ...], argv: list[str]) -> subprocess.CompletedProcess:
    code = BLOCKER.format(blocked=blocked) + (
        f"from lynx_compile.cli import main\nsys.exit(main({argv!r}))\n"
    )
    return _python(code, timeout=120)


def test_demo_without_its_libraries_names_the_demo_extra():
    proc = _cli_without(("transformers", "tqdm", "safetensors"), ["demo"])
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert proc.stderr.strip() == (
        "lynx-compile demo needs tqdm: pip install 'lynx_compile[demo]'"
    ), proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_without_transformers_names_the_bench_extra():
    proc = _cli_without(("transformers",), ["bench", "--quick"])
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "lynx-compile bench needs transformers: pip install 'lynx_compile[bench]'" in (
        proc.stderr
    ), proc.stderr
    assert "Traceback" not in proc.stderr


def test_dump_of_a_transformers_block_without_transformers_names_the_dump_extra(tmp_path):
    proc = _cli_without(("transformers",), ["dump", "hf:mixtral", "--out", str(tmp_path / "d")])
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert proc.stderr.strip() == (
        "lynx-compile dump hf:mixtral needs transformers: pip install 'lynx_compile[dump]'"
    ), proc.stderr
    assert not (tmp_path / "d").exists()


def test_require_names_the_extra_and_keeps_other_import_errors():
    """require's message names the extra; a broken dependency of an installed library is
    not reported as that library missing."""
    import pytest

    from lynx_compile._extras import MissingExtraError, require

    with pytest.raises(MissingExtraError, match=r"feature X needs no_such_lib: pip install "):
        require("no_such_lib.sub", "demo", "feature X")
    assert require("json", "demo", "feature X").__name__ == "json"
    with pytest.raises(ModuleNotFoundError) as info:
        require("json.no_such_submodule", "demo", "feature X")
    assert not isinstance(info.value, MissingExtraError)


# The runtime: what `import lynx_compile` and a compile load (dump.py, cli.py and
# onnx_export.py are features that import their libraries through lynx_compile._extras).
RUNTIME_SOURCES = [
    *(REPO / "lynx_compile" / name for name in ("__init__.py", "backend.py", "config.py")),
    *(REPO / "lynx_compile" / name for name in ("export.py", "graph_dump.py", "_extras.py")),
    *sorted((REPO / "passes").glob("*.py")),
    *sorted((REPO / "lowering").glob("*.py")),
]


def _module_level_imports(tree: ast.Module) -> list[str]:
    """Modules imported when the file is imported: statements outside functions, including
    class bodies and if/try blocks, except `if TYPE_CHECKING:` blocks."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo += node.orelse
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo += [n for n in ast.iter_child_nodes(node) if isinstance(n, ast.stmt)]
    return found


def test_runtime_sources_import_no_optional_library_and_no_tool():
    """No runtime module imports an optional library when loaded, nor the tools at all."""
    offending = []
    for path in RUNTIME_SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        for name in _module_level_imports(tree):
            if name.partition(".")[0] in OPTIONAL:
                offending.append(f"{path.relative_to(REPO)}: import {name}")
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if isinstance(node, ast.ImportFrom) and node.module == "lynx_compile":
                names += [f"lynx_compile.{a.name}" for a in node.names]
            offending += [
                f"{path.relative_to(REPO)}: import {n}"
                for n in names
                if n.startswith("lynx_compile.tools")
            ]
    assert RUNTIME_SOURCES and not offending, offending
