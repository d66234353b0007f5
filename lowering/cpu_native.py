"""The native CPU kernels (lowering/lynx_cpu.c, registered by lowering/lynx_ops.cpp): build, load.

On CPU, per-op overhead bounds a decode step: the traced AffinityBinning route is a top-k,
~20 small kernels and four sorts per layer, and the traced sparse experts gather one weight
copy per (token, slot), so their work follows the N*k assignments, not the experts
touched. The C kernels do each in one call:

- `lynx::route_affinity_cpu(logits, probs, top_k, alpha, beta, renorm, k0) -> (weights, ids)`:
  reference.route_reference with the affinity policy after the softmax (probs): the model's
  top-k (equal probabilities: lower index first, as the Triton route kernel orders them),
  AffinityBinning's ranking, kept set and remap, and the weights ("renorm" or "mass").
- `lynx::experts(x, ids, weights, w_up, w_gate, w_down, activation, gated, b_up, b_gate,
  b_down, act_alpha, act_limit) -> out`: reference.experts_general_reference, per-expert
  biases and swiglu_clamped included; each touched expert's weights are read once, in place.

The schemas and fake kernels are declared in ops.py; the CPU kernels are C++ (lynx_ops.cpp,
which links the C code) registered under the ops' CPU dispatch key, so a compiled graph
calls them without entering Python (~11 us per call against ~22 us through a Python kernel
and ctypes). The library is built once per machine with the system compilers (the C++ one
Inductor needs on CPU anyway) against the installed torch's headers, into a cache directory
($LYNX_CACHE_DIR, else $XDG_CACHE_HOME/lynx_compile, else ~/.cache/lynx_compile), keyed by
the sources, flags, compilers, torch and CPU; the build takes ~12 s. When it cannot be
built (or with LYNX_NATIVE_CPU=0), `available()` is False and the CPU lowering traces the
reference forms instead, with the same results. $LYNX_NATIVE_CFLAGS replaces the C code's
optimisation flags (default "-O3 -march=native"; the tests build the portable vector path
with "-mno-avx512f").
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.utils.cpp_extension
from lynx_compile.lowering import ops  # noqa: F401  (the schemas the library implements)
from lynx_compile.lowering.constants import NATIVE_EXPERTS_DTYPES

log = logging.getLogger("lynx_compile")

HERE = Path(__file__).resolve().parent
C_SOURCE = HERE / "lynx_cpu.c"
CPP_SOURCE = HERE / "lynx_ops.cpp"
CPP_FLAGS = ("-O2", "-std=c++20", "-fPIC", "-shared")


def cache_dir() -> Path:
    """Where built libraries live."""
    if os.environ.get("LYNX_CACHE_DIR"):
        return Path(os.environ["LYNX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lynx_compile"


def _compiler(env: str, names: tuple[str, ...]) -> str | None:
    for name in (os.environ.get(env), *names):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """The CPU model and flags (-march=native code is only valid on the CPU that built it)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
    return platform.machine() + "\n" + "\n".join(keep)


def _torch_flags() -> list[str]:
    """Compile and link flags for code using the installed torch's C++ API."""
    cpp = torch.utils.cpp_extension
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = [f"-D_GLIBCXX_USE_CXX11_ABI={abi}"] + [f"-I{p}" for p in cpp.include_paths()]
    for lib_dir in cpp.library_paths():
        flags += [f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}"]
    return flags + ["-lc10", "-ltorch_cpu"]


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])} failed:\n{proc.stderr.strip()[-4000:]}")


def build(directory: Path | None = None) -> Path:
    """Compile lynx_cpu.c and lynx_ops.cpp into one shared library in `directory` (default
    cache_dir()), or find it built there: its path. Raises RuntimeError on failure."""
    cc = _compiler("CC", ("cc", "gcc", "clang"))
    cxx = _compiler("CXX", ("c++", "g++", "clang++"))
    if cc is None or cxx is None:
        raise RuntimeError("no C and C++ compilers found (set CC and CXX, or install g++)")
    versions = [subprocess.run([c, "--version"], capture_output=True, text=True).stdout
                for c in (cc, cxx)]  # fmt: skip
    c_flags = (*os.environ.get("LYNX_NATIVE_CFLAGS", "-O3 -march=native").split(), "-fPIC")
    key_parts = [C_SOURCE.read_text(), CPP_SOURCE.read_text(), " ".join(c_flags + CPP_FLAGS)]
    key_parts += [cc, cxx, *versions, torch.__version__, _cpu_signature()]
    key = hashlib.sha256("\0".join(key_parts).encode()).hexdigest()[:20]
    target = (directory or cache_dir()) / f"lynx_ops_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, out = Path(tmp) / "lynx_cpu.o", Path(tmp) / target.name
        _run([cc, *c_flags, "-c", str(C_SOURCE), "-o", str(obj)])
        cmd = [cxx, *CPP_FLAGS, str(CPP_SOURCE), str(obj), "-o", str(out), *_torch_flags()]
        try:  # OpenMP for ATen's parallel_for (torch's own libgomp), else one thread
            _run(cmd + ["-fopenmp"])
        except RuntimeError:
            _run(cmd)
        _seconds_file(target).write_text(f"{time.perf_counter() - start:.2f}\n")
        os.replace(out, target)  # atomic: concurrent builders race harmlessly
    return target


def _seconds_file(library: Path) -> Path:
    return library.with_name(library.name + ".seconds")


def build_seconds(library: Path) -> float | None:
    """How long building `library` took (recorded by build()), None if not recorded."""
    try:
        return float(_seconds_file(library).read_text())
    except (OSError, ValueError):
        return None


@functools.cache
def available() -> bool:
    """Whether the native kernels are built and registered (LYNX_NATIVE_CPU=0 turns them
    off); the first call builds or finds the library and loads it (logged once if not)."""
    if os.environ.get("LYNX_NATIVE_CPU", "1") == "0":
        return False
    try:
        torch.ops.load_library(str(build()))
    except (OSError, RuntimeError) as exc:
        log.warning("lynx: native CPU kernels unavailable, using traced ones: %s", exc)
        return False
    return True


def experts_dtypes_fit(x: torch.Tensor, *weights: torch.Tensor | None) -> bool:
    """Whether the native experts kernel takes x's dtype, shared by every weight given."""
    return x.dtype in NATIVE_EXPERTS_DTYPES and all(
        w is None or w.dtype == x.dtype for w in weights
    )
