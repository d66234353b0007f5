"""The native CPU kernels (lowering/lynx_cpu.c) and the ops that call them.

On CPU, per-op overhead bounds a decode step: the traced AffinityBinning route is ~20
small kernels and four sorts per layer, and the traced sparse experts gather one weight
copy per (token, slot), so their work follows the N*k assignments, not the experts
touched, which is what AffinityBinning reduces. The C kernels do each in one call:

- `lynx::affinity_ids_cpu(logits, probs, exact_ids, alpha, beta) -> (ids, same)`:
  reference.affinity_ids (AffinityBinning's ranking, kept set and remap).
- `lynx::experts_cpu(x, ids, weights, w_up, w_gate, w_down, activation, gated) -> out`:
  reference.experts_general_reference; each touched expert's weights are read once.

The C source is compiled once per machine with the system C compiler (the one Inductor
needs on CPU anyway) into a cache directory ($LYNX_CACHE_DIR, else
$XDG_CACHE_HOME/lynx_compile, else ~/.cache/lynx_compile), keyed by the source, the flags,
the compiler and the CPU. The ops are registered with torch.library.Library (a lighter
call path than custom_op: ~9 us against ~22 us per call inside a compiled graph) and fall
back to the reference when the library cannot be built, so they are always correct;
`available()` tells the CPU lowering whether emitting them is worth it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from lynx_compile.lowering import reference

log = logging.getLogger("lynx_compile")

SOURCE = Path(__file__).resolve().parent / "lynx_cpu.c"
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-shared")
ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
WEIGHT_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the C kernel's dt codes
ROUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # exact in float32


def cache_dir() -> Path:
    """Where built libraries live."""
    if os.environ.get("LYNX_CACHE_DIR"):
        return Path(os.environ["LYNX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lynx_compile"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
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


def build(directory: Path | None = None) -> Path:
    """Compile lynx_cpu.c into `directory` (default cache_dir()), or find it built there:
    the shared library's path. Raises RuntimeError on failure."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), " ".join(FLAGS), cc, version, _cpu_signature()]).encode()
    ).hexdigest()[:20]
    target = (directory or cache_dir()) / f"lynx_cpu_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run(
            [cc, *FLAGS, str(SOURCE), "-o", str(out), "-lm"], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SOURCE.name}:\n{proc.stderr.strip()}")
        os.replace(out, target)  # atomic: concurrent builders race harmlessly
    return target


_P = ctypes.c_void_p
_I = ctypes.c_int64


@functools.cache
def _lib() -> ctypes.CDLL | None:
    """The loaded library, or None (logged once) when it cannot be built here."""
    if os.environ.get("LYNX_NATIVE_CPU", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError) as exc:
        log.warning("lynx: native CPU kernels unavailable, using traced ones: %s", exc)
        return None
    lib.lynx_affinity_ids.restype = ctypes.c_int64
    lib.lynx_affinity_ids.argtypes = [_P, _P, _P, _I, _I, _I, ctypes.c_double]
    lib.lynx_affinity_ids.argtypes += [ctypes.c_double, _P, _P]
    lib.lynx_experts.restype = ctypes.c_int
    lib.lynx_experts.argtypes = [_P] * 6 + [_I] * 6 + [ctypes.c_int] * 4 + [_P]
    return lib


def available() -> bool:
    """Whether the native kernels are built and loaded (LYNX_NATIVE_CPU=0 turns them off)."""
    return _lib() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# ----------------------------------------------------------------------- the ops

_LIB = torch.library.Library("lynx", "FRAGMENT")
_LIB.define(
    "affinity_ids_cpu(Tensor logits, Tensor probs, Tensor exact_ids, float alpha, float? beta)"
    " -> (Tensor, Tensor)"
)
_LIB.define(
    "experts_cpu(Tensor x, Tensor ids, Tensor weights, Tensor w_up, Tensor? w_gate,"
    " Tensor w_down, str activation, bool gated) -> Tensor"
)


def affinity_ids_cpu(logits, probs, exact_ids, alpha, beta):
    """reference.affinity_ids on CPU tensors, one C call: (ids int64 [N, k], same bool [N, 1])."""
    lib = _lib()
    n, e = logits.shape
    k = exact_ids.shape[1]
    if lib is None or logits.dtype not in ROUTE_DTYPES or n == 0:
        return reference.affinity_ids(logits, probs, exact_ids, alpha, beta)
    lg = logits.float().contiguous()
    pr = probs.float().contiguous()
    ex = exact_ids.contiguous()
    ids = torch.empty(n, k, dtype=torch.int64)
    same = torch.empty(n, 1, dtype=torch.bool)
    kept = lib.lynx_affinity_ids(
        lg.data_ptr(), pr.data_ptr(), ex.data_ptr(), n, e, k, float(alpha),
        -1.0 if beta is None else float(beta), ids.data_ptr(), same.data_ptr(),
    )  # fmt: skip
    if kept < 0:
        raise MemoryError("lynx affinity_ids_cpu: out of memory for its scratch buffers")
    return ids, same


def experts_dtypes_fit(x: torch.Tensor, *weights: torch.Tensor | None) -> bool:
    """Whether the native experts kernel takes x's dtype, shared by every weight given."""
    return x.dtype in WEIGHT_DTYPES and all(w is None or w.dtype == x.dtype for w in weights)


def experts_cpu(x, ids, weights, w_up, w_gate, w_down, activation, gated):
    """reference.experts_general_reference on CPU tensors, one C call: [N, d] in x's dtype."""
    lib = _lib()
    fits = experts_dtypes_fit(x, w_up, w_gate, w_down) and activation in ACTIVATION_CODES
    if lib is None or not fits:  # the reference also says what is wrong with an activation
        return reference.experts_general_reference(
            x, ids, weights, w_gate, w_up, w_down, activation, gated
        )
    n, d = x.shape
    e, u, _ = w_up.shape
    i = w_down.shape[2]
    want_u = 2 * i if gated and w_gate is None else i
    if u != want_u or w_up.shape[2] != d or w_down.shape[:2] != (e, d):
        raise ValueError(
            f"lynx experts_cpu: inconsistent shapes x {tuple(x.shape)}, w_up "
            f"{tuple(w_up.shape)}, w_down {tuple(w_down.shape)} (gated={gated}, split gate "
            f"{w_gate is not None}): want w_up [E, {want_u}, {d}] and w_down [E, {d}, I]"
        )
    xs = x.float().contiguous()
    wts = weights.float().contiguous()
    idc = ids.contiguous()
    ws = [w if w is None else w.contiguous() for w in (w_up, w_gate, w_down)]
    out = torch.empty(n, d, dtype=torch.float32)
    dt = WEIGHT_DTYPES[x.dtype]
    status = lib.lynx_experts(
        xs.data_ptr(), idc.data_ptr(), wts.data_ptr(), _ptr(ws[0]), _ptr(ws[1]), _ptr(ws[2]),
        n, ids.shape[1], e, d, u, i, int(gated), ACTIVATION_CODES[activation], dt, dt == 1,
        out.data_ptr(),
    )  # fmt: skip
    if status == -2:
        raise IndexError(f"lynx experts_cpu: expert ids must be in [0, {e}), got {ids.tolist()}")
    if status != 0:
        raise MemoryError("lynx experts_cpu: out of memory for its scratch buffers")
    return out if x.dtype == torch.float32 else out.to(x.dtype)


_LIB.impl("affinity_ids_cpu", affinity_ids_cpu, "CPU")
_LIB.impl("experts_cpu", experts_cpu, "CPU")


@torch.library.register_fake("lynx::affinity_ids_cpu", lib=_LIB)
def _affinity_ids_fake(logits, probs, exact_ids, alpha, beta):
    same = exact_ids.new_empty((exact_ids.shape[0], 1), dtype=torch.bool)
    return torch.empty_like(exact_ids), same


@torch.library.register_fake("lynx::experts_cpu", lib=_LIB)
def _experts_fake(x, ids, weights, w_up, w_gate, w_down, activation, gated):
    return torch.empty_like(x)
