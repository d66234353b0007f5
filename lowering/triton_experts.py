"""Triton sparse experts: group tokens by expert on the GPU, two grouped GEMMs, combine.

Four launches, no host sync, every grid sized from shapes only (CUDA-graph safe):
  1. group    one program: per-expert counts, row offsets padded to BLOCK_M, the sorted
              (token, slot) list and a tile -> expert table, plus the live tile count;
  2. up       grid (max tiles, I / BLOCK_N): h = act(x W_gate^T) * (x W_up^T) for one
              expert tile and one column block; tiles past the live count exit at once;
  3. down     grid (max tiles, d / BLOCK_N): y = (h W_down^T) * routing weight, written
              per (token, slot) row, so no atomics;
  4. combine  grid (N, d / BLOCK_D): out[t] = sum over slots of y, in slot order
              (deterministic), fp32 accumulation, one cast.
Each program of a GEMM streams its expert's column block exactly once per tile; at
decode sizes an expert has one tile, so each touched expert's weights cross HBM once and
untouched experts are never read. The column split gives the CTAs that fill the HBM
pipes (Mixtral up: 8 experts x 224 blocks; Qwen3-30B-A3B down: ~120 x 32).

Shapes: x [N, d]; ids, weights [N, k]; w_up [E, U, d] with U = 2I (gated: [gate; up]
halves, HF chunk(2) order) or I; w_down [E, d, I] -> out [N, d] in x's dtype. ids must
lie in [0, E) (checked only by the reference path: checking here would sync).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from lynx_compile.lowering import reference
from lynx_compile.lowering.constants import ACTIVATION_CODES, TRITON_DTYPES
from lynx_compile.lowering.launch_configs import ExpertsConfig, experts_config

_SILU = tl.constexpr(ACTIVATION_CODES["silu"])
_GELU = tl.constexpr(ACTIVATION_CODES["gelu"])
_GELU_TANH = tl.constexpr(ACTIVATION_CODES["gelu_tanh"])


@triton.jit
def group_kernel(
    ids_ptr,
    counts_ptr,
    row_start_ptr,
    sorted_ptr,
    tile_expert_ptr,
    num_tiles_ptr,
    num_assign,
    num_experts,
    max_tiles_per_expert,
    BLOCK_M: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Bucket the N*k assignments by expert, ascending assignment index inside a bucket."""
    experts = tl.arange(0, BLOCK_E)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(0, num_assign, BLOCK_A):
        assign = start + tl.arange(0, BLOCK_A)
        ids = tl.load(ids_ptr + assign, mask=assign < num_assign, other=-1)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_start = tl.cumsum(tiles, axis=0) - tiles
    row_start = tile_start * BLOCK_M
    in_range = experts < num_experts
    tl.store(counts_ptr + experts, counts, mask=in_range)
    tl.store(row_start_ptr + experts, row_start, mask=in_range)
    tl.store(num_tiles_ptr, tl.sum(tiles, axis=0))
    for j in range(max_tiles_per_expert):
        tl.store(tile_expert_ptr + tile_start + j, experts, mask=in_range & (j < tiles))
    filled = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(0, num_assign, BLOCK_A):
        assign = start + tl.arange(0, BLOCK_A)
        ids = tl.load(ids_ptr + assign, mask=assign < num_assign, other=-1)
        onehot = (ids[:, None] == experts[None, :]).to(tl.int32)  # [BLOCK_A, BLOCK_E]
        before = tl.cumsum(onehot, axis=0) - onehot  # earlier same-expert rows in this chunk
        dest = (row_start + filled)[None, :] + before
        pos = tl.sum(onehot * dest, axis=1)
        tl.store(sorted_ptr + pos, assign, mask=tl.sum(onehot, axis=1) > 0)
        filled += tl.sum(onehot, axis=0)


@triton.jit
def _tile_rows(tile, sorted_ptr, counts_ptr, row_start_ptr, tile_expert_ptr, BLOCK_M):
    """The expert of a tile, its sorted rows [BLOCK_M], which are live, and their assignments."""
    expert = tl.load(tile_expert_ptr + tile)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    live = rows - tl.load(row_start_ptr + expert) < tl.load(counts_ptr + expert)
    assign = tl.load(sorted_ptr + rows, mask=live, other=0)
    return expert.to(tl.int64), rows, live, assign


@triton.jit
def _activate(h, ACTIVATION: tl.constexpr):
    """Elementwise activation in fp32 (tanh via exp: the interpreter has no tanh)."""
    if ACTIVATION == _SILU:
        return h * tl.sigmoid(h)
    elif ACTIVATION == _GELU:
        return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACTIVATION == _GELU_TANH:
        inner = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        return h * tl.sigmoid(2.0 * inner)  # 0.5 * (1 + tanh(z)) == sigmoid(2z)
    else:
        return tl.maximum(h, 0.0)


@triton.jit
def up_kernel(
    x_ptr,
    w_ptr,
    h_ptr,
    sorted_ptr,
    counts_ptr,
    row_start_ptr,
    tile_expert_ptr,
    num_tiles_ptr,
    top_k,
    hidden,
    inter,
    stride_xt,
    stride_we,
    stride_wn,
    stride_wk,
    stride_ht,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """h[rows, cols] for one expert tile and one block of I columns (gate and up fused)."""
    tile = tl.program_id(0)
    if tile >= tl.load(num_tiles_ptr):
        return
    expert, rows, live, assign = _tile_rows(
        tile, sorted_ptr, counts_ptr, row_start_ptr, tile_expert_ptr, BLOCK_M
    )
    token = (assign // top_k).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    w_base = w_ptr + expert * stride_we
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, hidden, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_ok = ks < hidden
        x = tl.load(
            x_ptr + token[:, None] * stride_xt + ks[None, :],
            mask=live[:, None] & k_ok[None, :],
            other=0.0,
        )
        w_mask = k_ok[:, None] & col_ok[None, :]
        w_gate = tl.load(
            w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wk, mask=w_mask, other=0.0
        )  # [BLOCK_K, BLOCK_N]
        acc_gate = tl.dot(x, w_gate.to(x.dtype), acc_gate, input_precision=PRECISION)
        if GATED:
            w_up = tl.load(
                w_base + (cols[None, :] + inter) * stride_wn + ks[:, None] * stride_wk,
                mask=w_mask,
                other=0.0,
            )
            acc_up = tl.dot(x, w_up.to(x.dtype), acc_up, input_precision=PRECISION)
    h = _activate(acc_gate, ACTIVATION)
    if GATED:
        h = h * acc_up
    tl.store(
        h_ptr + rows[:, None].to(tl.int64) * stride_ht + cols[None, :],
        h.to(h_ptr.dtype.element_ty),
        mask=live[:, None] & col_ok[None, :],
    )


@triton.jit
def down_kernel(
    h_ptr,
    w_ptr,
    route_w_ptr,
    y_ptr,
    sorted_ptr,
    counts_ptr,
    row_start_ptr,
    tile_expert_ptr,
    num_tiles_ptr,
    hidden,
    inter,
    stride_ht,
    stride_we,
    stride_wn,
    stride_wk,
    stride_yt,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y[assign, cols] = (h W_down^T)[rows, cols] * routing weight, one d-column block."""
    tile = tl.program_id(0)
    if tile >= tl.load(num_tiles_ptr):
        return
    expert, rows, live, assign = _tile_rows(
        tile, sorted_ptr, counts_ptr, row_start_ptr, tile_expert_ptr, BLOCK_M
    )
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    w_base = w_ptr + expert * stride_we
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, inter, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_ok = ks < inter
        h = tl.load(
            h_ptr + rows[:, None].to(tl.int64) * stride_ht + ks[None, :],
            mask=live[:, None] & k_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(h, w.to(h.dtype), acc, input_precision=PRECISION)
    route_w = tl.load(route_w_ptr + assign, mask=live, other=0.0).to(tl.float32)
    # the reference rounds the expert output to x's dtype before weighting it
    y = acc.to(h_ptr.dtype.element_ty).to(tl.float32) * route_w[:, None]
    tl.store(
        y_ptr + assign[:, None].to(tl.int64) * stride_yt + cols[None, :],
        y,
        mask=live[:, None] & col_ok[None, :],
    )


@triton.jit
def combine_kernel(
    y_ptr,
    out_ptr,
    top_k,
    hidden,
    stride_yt,
    stride_ot,
    BLOCK_D: tl.constexpr,
):
    """out[t, cols] = sum_j y[t*k + j, cols], in slot order, fp32 then one cast."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = cols < hidden
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in range(top_k):
        acc += tl.load(y_ptr + (token * top_k + j) * stride_yt + cols, mask=ok, other=0.0)
    tl.store(out_ptr + token * stride_ot + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _empty(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the wrapper allocates comes from here, so tests can poison them."""
    return torch.empty(shape, dtype=dtype, device=device)


def _size_hint(n) -> int:
    """A concrete value for a possibly symbolic size; used only for performance choices."""
    return n if isinstance(n, int) else int(n.node.hint)


@functools.cache
def _gpu_name(device: torch.device) -> str:
    """The name launch configs are stored under ("cpu" under the interpreter)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return device.type  # also fake CUDA tensors traced on a machine without CUDA
    return torch.cuda.get_device_name(device)


def max_tiles(num_assign, num_experts: int, block_m: int):
    """Upper bound on expert tiles: full tiles plus at most one partial tile per expert."""
    return triton.cdiv(num_assign, block_m) + torch.sym_min(num_experts, num_assign)


def check_experts_args(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str,
    gated: bool,
) -> None:
    """Raise ValueError (what was wrong, what to do) for inputs the kernels do not take."""
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"unknown activation {activation!r}; valid: {sorted(ACTIVATION_CODES)}")
    if x.dtype not in TRITON_DTYPES:
        raise ValueError(f"the Triton experts take fp32/fp16/bf16 activations, got {x.dtype}")
    if x.dim() != 2 or ids.dim() != 2 or ids.shape != weights.shape or ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"expected x [N, d], ids and weights [N, k]; got x {tuple(x.shape)}, "
            f"ids {tuple(ids.shape)}, weights {tuple(weights.shape)}"
        )
    num_experts, up_rows, hidden = w_up.shape
    inter = up_rows // 2 if gated else up_rows
    if (
        hidden != x.shape[1]
        or (gated and up_rows % 2)
        or tuple(w_down.shape) != (num_experts, hidden, inter)
    ):
        raise ValueError(
            f"expected w_up [E, {'2I' if gated else 'I'}, d={x.shape[1]}] and w_down [E, d, I]; "
            f"got w_up {tuple(w_up.shape)}, w_down {tuple(w_down.shape)} (gated={gated})"
        )


def experts(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str = "silu",
    gated: bool = True,
    config: ExpertsConfig | None = None,
    wrap=None,
) -> torch.Tensor:
    """x [N, d], ids/weights [N, k], w_up [E, U, d], w_down [E, d, I] -> out [N, d] (x dtype).

    `config` overrides the stored/default launch config (the tuner passes candidates);
    `wrap` turns each kernel into what launches it (wrap_triton while a compiled graph
    is traced, see triton_ops.py).
    """
    check_experts_args(x, ids, weights, w_up, w_down, activation, gated)
    num_tokens, hidden = x.shape
    top_k = ids.shape[1]
    num_experts, up_rows, _ = w_up.shape
    inter = up_rows // 2 if gated else up_rows
    if num_tokens == 0 or top_k == 0:
        return torch.zeros_like(x)
    dev = x.device
    if config is None:
        config = experts_config(
            num_experts, hidden, inter, _size_hint(num_tokens), top_k, x.dtype, _gpu_name(x.device)
        )
    launch = (lambda kernel: kernel) if wrap is None else wrap
    x = x if x.stride(1) == 1 else x.contiguous()
    flat_ids = ids.reshape(-1).contiguous()
    flat_w = weights.reshape(-1).contiguous()
    num_assign = num_tokens * top_k
    block_m = config.block_m
    tiles = max_tiles(num_assign, num_experts, block_m)
    counts = _empty((num_experts,), torch.int32, dev)
    row_start = _empty((num_experts,), torch.int32, dev)
    sorted_assign = _empty((tiles * block_m,), torch.int32, dev)
    tile_expert = _empty((tiles,), torch.int32, dev)
    num_tiles = _empty((1,), torch.int32, dev)
    block_e = triton.next_power_of_2(num_experts)
    launch(group_kernel)[(1,)](
        flat_ids,
        counts,
        row_start,
        sorted_assign,
        tile_expert,
        num_tiles,
        num_assign,
        num_experts,
        triton.cdiv(num_assign, block_m),
        BLOCK_M=block_m,
        BLOCK_A=max(1, 8192 // block_e),  # a function of E only: one compile per E
        BLOCK_E=block_e,
        num_warps=4,
    )
    # fp32 keeps full precision (the reference's fp32 matmul); 16-bit inputs ignore it
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    h = _empty((tiles * block_m, inter), x.dtype, dev)
    launch(up_kernel)[(tiles, triton.cdiv(inter, config.up.block_n))](
        x,
        w_up,
        h,
        sorted_assign,
        counts,
        row_start,
        tile_expert,
        num_tiles,
        top_k,
        hidden,
        inter,
        x.stride(0),
        w_up.stride(0),
        w_up.stride(1),
        w_up.stride(2),
        h.stride(0),
        ACTIVATION=ACTIVATION_CODES[activation],
        GATED=gated,
        PRECISION=precision,
        BLOCK_M=block_m,
        BLOCK_N=config.up.block_n,
        BLOCK_K=config.up.block_k,
        num_warps=config.up.num_warps,
        num_stages=config.up.num_stages,
    )
    y = _empty((num_assign, hidden), torch.float32, dev)
    launch(down_kernel)[(tiles, triton.cdiv(hidden, config.down.block_n))](
        h,
        w_down,
        flat_w,
        y,
        sorted_assign,
        counts,
        row_start,
        tile_expert,
        num_tiles,
        hidden,
        inter,
        h.stride(0),
        w_down.stride(0),
        w_down.stride(1),
        w_down.stride(2),
        y.stride(0),
        PRECISION=precision,
        BLOCK_M=block_m,
        BLOCK_N=config.down.block_n,
        BLOCK_K=config.down.block_k,
        num_warps=config.down.num_warps,
        num_stages=config.down.num_stages,
    )
    block_d = min(1024, triton.next_power_of_2(hidden))
    out = _empty((num_tokens, hidden), x.dtype, dev)
    launch(combine_kernel)[(num_tokens, triton.cdiv(hidden, block_d))](
        y,
        out,
        top_k,
        hidden,
        y.stride(0),
        out.stride(0),
        BLOCK_D=block_d,
        num_warps=4,
    )
    return out


def experts_touched_bytes(ids: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> int:
    """Bytes of weights the touched experts hold (the decode traffic floor); syncs."""
    per_expert = w_up[0].numel() * w_up.element_size() + w_down[0].numel() * w_down.element_size()
    return reference.distinct_experts(ids) * per_expert
