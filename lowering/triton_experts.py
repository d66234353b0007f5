"""Triton sparse experts: group tokens by expert on the GPU, two grouped GEMMs, combine.

Five launches, no host sync, every grid sized from shapes only (CUDA-graph safe), and
every choice that depends on the routing made on the GPU, per call:
  1. count    grid (chunks,): each program histograms its chunk of the N*k assignments;
  2. scatter  grid (chunks,): each program sums the chunk histograms (every program
              redundantly: a few KB from L2 at decode), places its own assignments in
              expert order, and program 0 writes the work plan: per tile its expert,
              first sorted row, live rows and row-tile class (16, 32, 64 or 128 rows:
              the smallest that holds the expert's rows, so at most 128 rows per expert
              take one tile and that expert's weights cross HBM once), the live tile
              count, and the down projection's K splits (doubled while tiles x column
              blocks x splits < 2 x SMs);
  3. up       persistent grid (<= programs_per_sm x SMs): programs stride over the live
              (tile, column block) items only; h = act(x W_gate^T) * (x W_up^T);
  4. down     persistent, over live (tile, K split, column block) items: fp32 partial
              sums of h W_down^T per (split, assignment) row, no atomics;
  5. combine  grid (N, d / BLOCK_D): out[t] = sum over slots (in slot order) of
              round(sum over splits) * routing weight, fp32, one cast: deterministic.
Each GEMM body is compiled once per row-tile class inside one kernel and picked per tile
at run time, so a graph traced at one token count serves any other with the right tiles.

Shapes: x [N, d]; ids, weights [N, k]; w_up [E, U, d] with U = 2I (gated: [gate; up]
halves, HF chunk(2) order) or I; w_down [E, d, I] -> out [N, d] in x's dtype. ids must
lie in [0, E) (checked only by the reference path: checking here would sync); an id
outside leaves its slot unwritten.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from lynx_compile.lowering import reference
from lynx_compile.lowering.constants import ACTIVATION_CODES, TRITON_DTYPES
from lynx_compile.lowering.launch_configs import ROW_TILES, ExpertsConfig, experts_config

_SILU = tl.constexpr(ACTIVATION_CODES["silu"])
_GELU = tl.constexpr(ACTIVATION_CODES["gelu"])
_GELU_TANH = tl.constexpr(ACTIVATION_CODES["gelu_tanh"])
_RELU2 = tl.constexpr(ACTIVATION_CODES["relu2"])


@triton.jit
def count_kernel(
    # pointers
    ids_ptr,  # [N*k] expert of each assignment
    chunk_counts_ptr,  # [chunks, BLOCK_E] out: assignments per (chunk, expert)
    # sizes
    num_assign,
    # meta-parameters
    BLOCK_A: tl.constexpr,  # assignments per chunk
    BLOCK_E: tl.constexpr,  # experts, padded to a power of two
):
    """chunk_counts[c, e] = how many of chunk c's assignments go to expert e."""
    chunk = tl.program_id(0)
    offs_a = chunk * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_e = tl.arange(0, BLOCK_E)
    ids = tl.load(ids_ptr + offs_a, mask=offs_a < num_assign, other=-1)
    onehot = (ids[:, None] == offs_e[None, :]).to(tl.int32)  # [BLOCK_A, BLOCK_E]
    tl.store(chunk_counts_ptr + chunk * BLOCK_E + offs_e, tl.sum(onehot, axis=0))


@triton.jit
def scatter_kernel(
    # pointers
    ids_ptr,  # [N*k]
    chunk_counts_ptr,  # [chunks, BLOCK_E] from count_kernel
    sorted_ptr,  # [N*k] out: assignment indices in expert order
    tiles_ptr,  # [4, max_tiles] out: expert, first sorted row, live rows, row class
    plan_ptr,  # [2] out: live tiles, down-projection K splits
    # sizes
    num_assign,
    num_experts,
    num_chunks,
    max_tiles,
    down_col_blocks,  # d / BLOCK_N of the down projection
    down_k_steps,  # I / BLOCK_K of the down projection
    min_down_items,  # 2 x SMs: split K until the down projection has this many items
    max_split,  # planes of the partial-sum buffer
    # meta-parameters
    BLOCK_A: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_C: tl.constexpr,  # chunks summed per step
    MAX_BLOCK_M: tl.constexpr,  # largest row tile
    LOG2_SPLIT: tl.constexpr,  # log2 of the most K splits
):
    """Place this chunk's assignments in expert order (ascending assignment index within an
    expert); program 0 also writes the tile table and the plan."""
    chunk = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    valid_e = offs_e < num_experts
    total = tl.zeros([BLOCK_E], dtype=tl.int32)
    before = tl.zeros([BLOCK_E], dtype=tl.int32)  # this expert's rows in earlier chunks
    for c_start in range(0, num_chunks, BLOCK_C):
        offs_c = c_start + tl.arange(0, BLOCK_C)
        block = tl.load(
            chunk_counts_ptr + offs_c[:, None] * BLOCK_E + offs_e[None, :],
            mask=(offs_c < num_chunks)[:, None],
            other=0,
        )  # [BLOCK_C, BLOCK_E]
        total += tl.sum(block, axis=0)
        before += tl.sum(tl.where((offs_c < chunk)[:, None], block, 0), axis=0)
    total = tl.where(valid_e, total, 0)  # ids outside [0, E) are never placed
    row_start = tl.cumsum(total, axis=0) - total
    offs_a = chunk * BLOCK_A + tl.arange(0, BLOCK_A)
    ids = tl.load(ids_ptr + offs_a, mask=offs_a < num_assign, other=-1)
    onehot = ((ids[:, None] == offs_e[None, :]) & valid_e[None, :]).to(tl.int32)
    rank = tl.cumsum(onehot, axis=0) - onehot  # earlier same-expert rows in this chunk
    dest = tl.sum(onehot * ((row_start + before)[None, :] + rank), axis=1)
    tl.store(sorted_ptr + dest, offs_a, mask=tl.sum(onehot, axis=1) > 0)
    if chunk == 0:
        tiles = (total + MAX_BLOCK_M - 1) // MAX_BLOCK_M
        tile_start = tl.cumsum(tiles, axis=0) - tiles
        for j in range(tl.max(tiles, axis=0)):
            rows = tl.minimum(total - j * MAX_BLOCK_M, MAX_BLOCK_M)
            row_class = (rows > 16).to(tl.int32) + (rows > 32).to(tl.int32)
            row_class += (rows > 64).to(tl.int32)  # rows <= 16 << row_class
            at = tiles_ptr + tile_start + j
            live = j < tiles
            tl.store(at, offs_e, mask=live)
            tl.store(at + max_tiles, row_start + j * MAX_BLOCK_M, mask=live)
            tl.store(at + 2 * max_tiles, rows, mask=live)
            tl.store(at + 3 * max_tiles, row_class, mask=live)
        num_tiles = tl.sum(tiles, axis=0)
        split = 1
        for _ in tl.static_range(LOG2_SPLIT):
            more = (num_tiles * down_col_blocks * split < min_down_items) & (
                2 * split <= tl.minimum(down_k_steps, max_split)
            )
            split = tl.where(more, 2 * split, split)
        tl.store(plan_ptr, num_tiles)
        tl.store(plan_ptr + 1, split)


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
    elif ACTIVATION == _RELU2:
        r = tl.maximum(h, 0.0)
        return r * r
    else:
        return tl.maximum(h, 0.0)


@triton.jit
def _up_tile(
    x_ptr,
    w_base,  # this expert's w_up
    w_desc,  # USE_TMA: a tensor descriptor over w_up as [E * U, d]
    w_row,  # USE_TMA: this expert's first row in it
    h_ptr,
    sorted_ptr,
    row0,  # first sorted row of the tile
    rows,  # live rows
    col0,  # first of the BLOCK_N columns of I
    top_k,
    hidden,
    inter,
    stride_xt,
    stride_wn,
    stride_wk,
    stride_ht,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """h[row0 : row0 + rows, col0 : col0 + BLOCK_N] of one expert tile (gate and up fused).
    With USE_TMA the weight tiles come through the copy engine (zero past d; columns past I
    read the next rows, which only reach columns that are never stored)."""
    offs_m = tl.arange(0, BLOCK_M)
    live = offs_m < rows
    sorted_rows = (row0 + offs_m).to(tl.int64)
    token = (tl.load(sorted_ptr + sorted_rows, mask=live, other=0) // top_k).to(tl.int64)
    offs_n = col0 + tl.arange(0, BLOCK_N)
    col_ok = offs_n < inter
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, hidden, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        k_ok = offs_k < hidden
        x = tl.load(
            x_ptr + token[:, None] * stride_xt + offs_k[None, :],
            mask=live[:, None] & k_ok[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        if USE_TMA:
            w_gate = w_desc.load([w_row + col0, k_start]).T  # [BLOCK_K, BLOCK_N]
        else:
            w_mask = k_ok[:, None] & col_ok[None, :]
            w_ptrs = w_base + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
            w_gate = tl.load(w_ptrs, mask=w_mask, other=0.0)  # [BLOCK_K, BLOCK_N]
        acc_gate = tl.dot(x, w_gate.to(x.dtype), acc_gate, input_precision=PRECISION)
        if GATED:
            if USE_TMA:
                w_up = w_desc.load([w_row + inter + col0, k_start]).T
            else:
                w_up = tl.load(w_ptrs + inter * stride_wn, mask=w_mask, other=0.0)
            acc_up = tl.dot(x, w_up.to(x.dtype), acc_up, input_precision=PRECISION)
    h = _activate(acc_gate, ACTIVATION)
    if GATED:
        h = h * acc_up
    tl.store(
        h_ptr + sorted_rows[:, None] * stride_ht + offs_n[None, :],
        h.to(h_ptr.dtype.element_ty),
        mask=live[:, None] & col_ok[None, :],
    )


@triton.jit
def up_kernel(
    # pointers
    x_ptr,  # [N, d]
    w_ptr,  # [E, U, d]
    h_ptr,  # [N*k, I] out, rows in sorted order
    sorted_ptr,
    tiles_ptr,
    plan_ptr,
    # sizes
    top_k,
    hidden,
    inter,
    max_tiles,
    up_rows,  # U
    w_rows,  # E * U
    # strides
    stride_xt,
    stride_we,
    stride_wn,
    stride_wk,
    stride_ht,
    # meta-parameters
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,  # weight tiles through tensor descriptors (contiguous w_up)
    NUM_ROW_CLASSES: tl.constexpr,  # row tiles 16 << c for c < NUM_ROW_CLASSES
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Persistent: each program takes live (tile, column block) items pid, pid + P, ..."""
    w_desc = w_ptr
    if USE_TMA:
        w_desc = tl.make_tensor_descriptor(
            w_ptr, shape=[w_rows, hidden], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K]
        )
    col_blocks = tl.cdiv(inter, BLOCK_N)
    items = tl.load(plan_ptr) * col_blocks
    for item in range(tl.program_id(0), items, tl.num_programs(0)):
        tile = item // col_blocks
        col0 = (item % col_blocks) * BLOCK_N
        expert = tl.load(tiles_ptr + tile).to(tl.int64)
        row0 = tl.load(tiles_ptr + max_tiles + tile)
        rows = tl.load(tiles_ptr + 2 * max_tiles + tile)
        row_class = tl.load(tiles_ptr + 3 * max_tiles + tile)
        for c in tl.static_range(NUM_ROW_CLASSES):
            if row_class == c:
                _up_tile(
                    x_ptr, w_ptr + expert * stride_we, w_desc, expert.to(tl.int32) * up_rows, h_ptr,
                    sorted_ptr, row0, rows, col0,
                    top_k, hidden, inter, stride_xt, stride_wn, stride_wk, stride_ht,
                    ACTIVATION, GATED, PRECISION, USE_TMA, 16 << c, BLOCK_N, BLOCK_K,
                )  # fmt: skip


@triton.jit
def _down_tile(
    h_ptr,
    w_base,  # this expert's w_down
    w_desc,  # USE_TMA: a tensor descriptor over w_down as [E * d, I]
    w_row,  # USE_TMA: this expert's first row in it
    y_ptr,  # this split's plane of y
    sorted_ptr,
    row0,
    rows,
    col0,
    k_lo,  # this split's K range
    k_hi,
    hidden,
    stride_ht,
    stride_wn,
    stride_wk,
    stride_yt,
    PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y[assignment, col0 : col0 + BLOCK_N] = (h W_down^T) over K in [k_lo, k_hi), fp32.
    With USE_TMA the weight tiles come through the copy engine (zero past I; past k_hi
    they are the next split's finite weights, met by h's zeros)."""
    offs_m = tl.arange(0, BLOCK_M)
    live = offs_m < rows
    sorted_rows = (row0 + offs_m).to(tl.int64)
    assign = tl.load(sorted_ptr + sorted_rows, mask=live, other=0).to(tl.int64)
    offs_n = col0 + tl.arange(0, BLOCK_N)
    col_ok = offs_n < hidden
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(k_lo, k_hi, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        h = tl.load(
            h_ptr + sorted_rows[:, None] * stride_ht + offs_k[None, :],
            mask=live[:, None] & k_ok[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        if USE_TMA:
            w = w_desc.load([w_row + col0, k_start]).T  # [BLOCK_K, BLOCK_N]
        else:
            w = tl.load(
                w_base + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                mask=k_ok[:, None] & col_ok[None, :],
                other=0.0,
            )  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(h, w.to(h.dtype), acc, input_precision=PRECISION)
    tl.store(
        y_ptr + assign[:, None] * stride_yt + offs_n[None, :],
        acc,
        mask=live[:, None] & col_ok[None, :],
    )


@triton.jit
def down_kernel(
    # pointers
    h_ptr,  # [N*k, I]
    w_ptr,  # [E, d, I]
    y_ptr,  # [splits, N*k, d] fp32 out, rows by assignment
    sorted_ptr,
    tiles_ptr,
    plan_ptr,
    # sizes
    hidden,
    inter,
    max_tiles,
    w_rows,  # E * d
    # strides
    stride_ht,
    stride_we,
    stride_wn,
    stride_wk,
    stride_ys,
    stride_yt,
    # meta-parameters
    PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,  # weight tiles through tensor descriptors (contiguous w_down)
    NUM_ROW_CLASSES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Persistent over live (tile, K split, column block) items; the split count is the
    plan's (chosen on the GPU from the live tiles)."""
    w_desc = w_ptr
    if USE_TMA:
        w_desc = tl.make_tensor_descriptor(
            w_ptr, shape=[w_rows, inter], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K]
        )
    col_blocks = tl.cdiv(hidden, BLOCK_N)
    split = tl.load(plan_ptr + 1)
    k_per_split = tl.cdiv(tl.cdiv(inter, BLOCK_K), split) * BLOCK_K
    items = tl.load(plan_ptr) * split * col_blocks
    for item in range(tl.program_id(0), items, tl.num_programs(0)):
        col0 = (item % col_blocks) * BLOCK_N
        tile_split = item // col_blocks
        tile = tile_split // split
        part = tile_split % split
        k_lo = part * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, inter)
        expert = tl.load(tiles_ptr + tile).to(tl.int64)
        row0 = tl.load(tiles_ptr + max_tiles + tile)
        rows = tl.load(tiles_ptr + 2 * max_tiles + tile)
        row_class = tl.load(tiles_ptr + 3 * max_tiles + tile)
        for c in tl.static_range(NUM_ROW_CLASSES):
            if row_class == c:
                _down_tile(
                    h_ptr, w_ptr + expert * stride_we, w_desc, expert.to(tl.int32) * hidden,
                    y_ptr + part.to(tl.int64) * stride_ys, sorted_ptr, row0, rows, col0, k_lo,
                    k_hi, hidden, stride_ht, stride_wn, stride_wk, stride_yt, PRECISION,
                    USE_TMA, 16 << c, BLOCK_N, BLOCK_K,
                )  # fmt: skip


@triton.jit
def combine_kernel(
    # pointers
    y_ptr,  # [splits, N*k, d] fp32
    route_w_ptr,  # [N*k]
    out_ptr,  # [N, d] out
    plan_ptr,
    # sizes
    top_k,
    hidden,
    # strides
    stride_ys,
    stride_yt,
    stride_ot,
    # meta-parameters
    BLOCK_D: tl.constexpr,
):
    """out[t, cols] = sum_j round(sum_s y[s, t*k + j, cols]) * w[t*k + j], in slot order."""
    token = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = offs_d < hidden
    split = tl.load(plan_ptr + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in range(top_k):
        assign = token * top_k + j
        y = tl.zeros([BLOCK_D], dtype=tl.float32)
        for part in range(split):
            y += tl.load(y_ptr + part * stride_ys + assign * stride_yt + offs_d, mask=ok, other=0.0)
        # the reference rounds each expert output to x's dtype before weighting it
        y = y.to(out_ptr.dtype.element_ty).to(tl.float32)
        acc += y * tl.load(route_w_ptr + assign).to(tl.float32)
    tl.store(out_ptr + token * stride_ot + offs_d, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _empty(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the wrapper allocates comes from here, so tests can poison them."""
    return torch.empty(shape, dtype=dtype, device=device)


def _size_hint(n) -> int:
    """A concrete value for a possibly symbolic size; used only for performance choices."""
    return n if isinstance(n, int) else int(n.node.hint)


# Under the interpreter (CPU tensors) a small "SM count" makes the persistent programs loop
# over several items and the down projection split K, so CPU tests run those paths.
INTERPRETER_SMS = 2


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the device the persistent grids are sized for."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _gpu_name(device: torch.device) -> str:
    """The name launch configs are stored under ("cpu" under the interpreter)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return device.type  # also fake CUDA tensors traced on a machine without CUDA
    return torch.cuda.get_device_name(device)


def tma_fits(*weights: torch.Tensor) -> bool:
    """Whether the weights' tiles can come through tensor descriptors: Triton has them, the
    device has the copy engine (sm_90+; or the interpreter), and each weight is contiguous
    with 16-byte aligned rows and base. Device-side descriptors need a scratch allocator,
    set here once (torch's caching allocator)."""
    if not hasattr(tl, "make_tensor_descriptor"):
        return False
    for w in weights:
        if not w.is_contiguous() or w.data_ptr() % 16 or (w.shape[-1] * w.element_size()) % 16:
            return False
    device = weights[0].device
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (9, 0):
            return False
        _set_descriptor_allocator()
    return True


@functools.cache
def _set_descriptor_allocator() -> None:
    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device="cuda")

    triton.set_allocator(alloc)


def max_tiles(num_assign, num_experts: int, block_m: int):
    """Upper bound on expert tiles of at most block_m rows: full tiles plus at most one
    partial tile per expert."""
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
    num_row_classes = ROW_TILES.index(block_m) + 1
    sms = num_sms(dev)
    programs = config.programs_per_sm * sms
    block_e = triton.next_power_of_2(num_experts)
    block_a = max(16, 8192 // block_e)  # a function of E only: one compile per E
    chunks = triton.cdiv(num_assign, block_a)
    tiles = max_tiles(num_assign, num_experts, block_m)

    # 1-2. grouping: assignments in expert order, the tile table and the plan
    chunk_counts = _empty((chunks, block_e), torch.int32, dev)
    launch(count_kernel)[(chunks,)](
        flat_ids, chunk_counts, num_assign, BLOCK_A=block_a, BLOCK_E=block_e, num_warps=4
    )
    sorted_assign = _empty((num_assign,), torch.int32, dev)
    tile_table = _empty((4, tiles), torch.int32, dev)
    plan = _empty((2,), torch.int32, dev)
    down_cols = triton.cdiv(hidden, config.down.block_n)
    # K splits the partial sums have room for: at least N*k / block_m tiles are live, so
    # more splits than 2 x SMs / (those tiles x column blocks) never happen (prefill: 1)
    min_items = triton.cdiv(num_assign, block_m) * down_cols
    splits = torch.sym_min(max(config.split_k, 1), triton.cdiv(2 * sms, min_items))
    launch(scatter_kernel)[(chunks,)](
        flat_ids,
        chunk_counts,
        sorted_assign,
        tile_table,
        plan,
        num_assign,
        num_experts,
        chunks,
        tiles,
        down_cols,
        triton.cdiv(inter, config.down.block_k),
        2 * sms,
        splits,
        BLOCK_A=block_a,
        BLOCK_E=block_e,
        BLOCK_C=max(1, 4096 // block_e),
        MAX_BLOCK_M=block_m,
        LOG2_SPLIT=max(config.split_k, 1).bit_length() - 1,
        num_warps=4,
    )

    use_tma = config.tma and wrap is None and tma_fits(w_up, w_down)

    # 3. up projection and activation, h rows in sorted order
    # fp32 keeps full precision (the reference's fp32 matmul); 16-bit inputs ignore it
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    h = _empty((num_assign, inter), x.dtype, dev)
    up_items = tiles * triton.cdiv(inter, config.up.block_n)
    launch(up_kernel)[(torch.sym_min(up_items, programs),)](
        x,
        w_up,
        h,
        sorted_assign,
        tile_table,
        plan,
        top_k,
        hidden,
        inter,
        tiles,
        up_rows,
        num_experts * up_rows,
        x.stride(0),
        w_up.stride(0),
        w_up.stride(1),
        w_up.stride(2),
        h.stride(0),
        ACTIVATION=ACTIVATION_CODES[activation],
        GATED=gated,
        PRECISION=precision,
        USE_TMA=use_tma,
        NUM_ROW_CLASSES=num_row_classes,
        BLOCK_N=config.up.block_n,
        BLOCK_K=config.up.block_k,
        num_warps=config.up.num_warps,
        num_stages=config.up.num_stages,
    )

    # 4. down projection, split K where the live items would not fill the GPU twice
    y = _empty((splits, num_assign, hidden), torch.float32, dev)
    down_items = tiles * splits * down_cols
    launch(down_kernel)[(torch.sym_min(down_items, programs),)](
        h,
        w_down,
        y,
        sorted_assign,
        tile_table,
        plan,
        hidden,
        inter,
        tiles,
        num_experts * hidden,
        h.stride(0),
        w_down.stride(0),
        w_down.stride(1),
        w_down.stride(2),
        y.stride(0),
        y.stride(1),
        PRECISION=precision,
        USE_TMA=use_tma,
        NUM_ROW_CLASSES=num_row_classes,
        BLOCK_N=config.down.block_n,
        BLOCK_K=config.down.block_k,
        num_warps=config.down.num_warps,
        num_stages=config.down.num_stages,
    )

    # 5. weighted sum over slots (and K splits)
    block_d = min(1024, triton.next_power_of_2(hidden))
    out = _empty((num_tokens, hidden), x.dtype, dev)
    launch(combine_kernel)[(num_tokens, triton.cdiv(hidden, block_d))](
        y,
        flat_w,
        out,
        plan,
        top_k,
        hidden,
        y.stride(0),
        y.stride(1),
        out.stride(0),
        BLOCK_D=block_d,
        num_warps=4,
    )
    return out


def experts_touched_bytes(ids: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> int:
    """Bytes of weights the touched experts hold (the decode traffic floor); syncs."""
    per_expert = w_up[0].numel() * w_up.element_size() + w_down[0].numel() * w_down.element_size()
    return reference.distinct_experts(ids) * per_expert
