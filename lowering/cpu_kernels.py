"""CPU kernel of the sparse experts: tokens sorted by expert, one grouped GEMM per projection.

The reference (reference.experts_reference) loops over touched experts in Python, which
costs ~10 small ops per expert; here every projection is one torch._grouped_mm over the
expert groups (empty groups cost nothing, so the work still follows the experts touched),
and the weighted combine is one index_add_. Same math as the reference; tested against it.
Falls back to the reference where grouped_mm is unavailable (older torch) or refuses a dtype.
"""

from __future__ import annotations

import torch
from lynx_compile.lowering import reference

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _grouped(x_sorted: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x_sorted [M, in] grouped by expert, w [E, out, in] -> [M, out] (x @ w[e].T per group)."""
    return torch._grouped_mm(x_sorted, w.transpose(1, 2), offs=offsets)


def interleaved_gate_up(w_gate: torch.Tensor | None, w_up: torch.Tensor) -> torch.Tensor | None:
    """The [E, 2I, d] matrix a split gate and up are the even and odd rows of (an
    interleaved gate/up: GPT-OSS's gate_up_proj, passed as views [:, 0::2] and [:, 1::2]),
    as a view of the same storage; None otherwise. One grouped GEMM against it reads both in
    place (grouped_mm refuses a view whose rows are 2 elements apart; lynx_ops.cpp does the
    same with at::mm)."""
    if w_gate is None or w_gate.stride() != w_up.stride():
        return None
    if w_gate.untyped_storage().data_ptr() != w_up.untyped_storage().data_ptr():
        return None
    row = w_gate.stride(1)
    if row % 2 or w_up.storage_offset() - w_gate.storage_offset() != row // 2:
        return None
    e, i, d = w_up.shape
    return w_gate.as_strided((e, 2 * i, d), (w_gate.stride(0), row // 2, w_gate.stride(2)))


def _plus_bias(h: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """h [M, out] + each row's expert bias, bias [E, out] gathered at rows [M] (biases are
    [E, out]: the gather is M small rows, never a weight copy)."""
    return h if bias is None else h + bias[rows].to(h.dtype)


def experts_grouped(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str,
    gated: bool,
    w_gate: torch.Tensor | None = None,
    *,
    b_up: torch.Tensor | None = None,
    b_gate: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    alpha: float | None = None,
    limit: float | None = None,
) -> torch.Tensor:
    """Sparse experts, x [N, d], ids/weights [N, k] -> [N, d]; see
    reference.experts_general_reference (biases, alpha and limit as there)."""
    biases = dict(b_up=b_up, b_gate=b_gate, b_down=b_down, alpha=alpha, limit=limit)
    if not _HAS_GROUPED_MM or x.shape[0] == 0 or w_up.dtype != x.dtype:
        return reference.experts_general_reference(
            x, ids, weights, w_gate, w_up, w_down, activation, gated, **biases
        )
    reference.check_activation(activation, gated, alpha, limit)
    num_experts, k = w_up.shape[0], ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # assignments grouped by expert
    token = order // k
    expert = flat[order]
    # tokens per expert with a static shape (bincount sizes its output by the largest id:
    # a host sync on CUDA)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device)
    counts = counts.index_add(0, flat, torch.ones_like(flat))
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    xs = x[token]  # [N*k, d]
    gate_up = interleaved_gate_up(w_gate, w_up)
    try:
        if gate_up is not None:  # [N*k, 2I]: gate and up its even and odd columns
            both = _grouped(xs, gate_up, offsets)
            gate, h = both[:, 0::2], both[:, 1::2]
        else:
            h = _grouped(xs, w_up, offsets)
            gate = None if w_gate is None else _grouped(xs, w_gate, offsets)
        h = _plus_bias(h, b_up, expert)
        gate = None if gate is None else _plus_bias(gate, b_gate, expert)
        h = reference.expert_activation(h, gate, activation, gated, alpha, limit)
        y = _plus_bias(_grouped(h.contiguous(), w_down, offsets), b_down, expert)
    except RuntimeError:  # a dtype/layout this build's CPU grouped_mm does not take
        return reference.experts_general_reference(
            x, ids, weights, w_gate, w_up, w_down, activation, gated, **biases
        )
    w = weights.reshape(-1)[order].to(torch.float32)
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, token, y.to(torch.float32) * w[:, None])
    return out.to(x.dtype)


def experts_gathered(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str,
    gated: bool,
    w_gate: torch.Tensor | None = None,
    *,
    b_up: torch.Tensor | None = None,
    b_gate: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    alpha: float | None = None,
    limit: float | None = None,
) -> torch.Tensor:
    """Sparse experts with static shapes: each (token, slot) gathers its expert's weights.

    Traceable (no host sync, no data-dependent shape), so Inductor compiles it into C++
    loops that read the gathered weights in place; this is what the CPU lowering of
    lynx::experts decomposes into where the native kernel does not run. Work follows the
    N*k assignments, not the experts touched: on CPU at decode sizes the weights sit in
    cache and per-op overhead dominates.
    """
    reference.check_activation(activation, gated, alpha, limit)
    n, k = ids.shape
    flat = ids.reshape(-1)  # [N*k]
    xs = x.repeat_interleave(k, dim=0).unsqueeze(-1)  # [N*k, d, 1]

    def project(w, b, rows):  # [N*k, out] = w[e] @ row (+ b[e]) per slot
        y = torch.bmm(w[flat].to(x.dtype), rows).squeeze(-1)
        return _plus_bias(y, b, flat)

    h = project(w_up, b_up, xs)  # [N*k, U]
    gate = None if w_gate is None else project(w_gate, b_gate, xs)
    h = reference.expert_activation(h, gate, activation, gated, alpha, limit)
    y = project(w_down, b_down, h.unsqueeze(-1))  # [N*k, d]
    y = y.to(torch.float32) * weights.reshape(-1, 1).to(torch.float32)
    return y.view(n, k, -1).sum(dim=1).to(x.dtype)
