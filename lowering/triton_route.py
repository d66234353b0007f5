"""Triton routing kernel: softmax, top-k, kept set (affinity / OEA / static), remap, weights.

One launch, no host sync, no data-dependent shapes (CUDA-graph safe). The grid covers the
tokens in tiles of BLOCK_T; every program first derives the batch's kept set from ALL
tokens (the cross-token part: votes, chosen experts, union), redundantly, then routes its
own tile. Redundancy costs one extra read of the logits per program (a few KiB at decode
sizes, from L2) and buys a single launch without inter-CTA synchronisation or scratch
buffers.

Agreement with `reference.route_reference` (the specification):
  - each token's own top-k0 is chosen first (affinity), or joins the kept set (oea,
    static); the remap ranks kept usable experts first (class 2 * usable + kept);
  - affinity bins are computed in fp64 from the same operations (alpha is passed as its
    fp64 bit pattern, Triton would otherwise narrow a Python float to fp32);
  - popularity is the same exact int64 key (`reference.popularity_key`), with the bin
    count `reference.popularity_bins` derived in the kernel from the token count;
  - every ranking follows the documented order: primary keys descending, then probability
    (rounded to the logits dtype, as the model computes it) descending, then lower index;
  - rows with NaN or a non-finite maximum keep the exact routing and do not vote.
Exact id agreement needs the probabilities to round identically; both sides compute
softmax in fp32 and round once, so they can differ only when an exp lands within one
rounding of a boundary, which can swap two experts whose probabilities are one ulp apart.
torch.topk itself leaves the order of equal probabilities unspecified (the reference's
exact policy inherits that); this kernel always puts the lower index first.

Shapes: logits [N, E] (fp32, fp16 or bf16, rows contiguous along experts) ->
weights [N, k] in the logits dtype, ids int64 [N, k]. Tuned for N <= 1024, E <= 512,
k <= 16; larger N is correct but serialises the cross-token pass.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl
from lynx_compile.lowering import reference
from lynx_compile.lowering.constants import (
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    DEFAULT_BUDGET,
    MIN_BIN,
    POLICY_CODES,
    TRITON_DTYPES,
    default_k0,
)
from lynx_compile.lowering.constants import ROUTE_MAX_EXPERTS as MAX_EXPERTS
from lynx_compile.lowering.constants import ROUTE_MAX_TOP_K as MAX_TOP_K
from triton.language.extra import libdevice

_EXACT = tl.constexpr(POLICY_CODES["exact"])
_AFFINITY = tl.constexpr(POLICY_CODES["affinity"])
_OEA = tl.constexpr(POLICY_CODES["oea"])
_STATIC = tl.constexpr(POLICY_CODES["static"])
_MIN_BIN = tl.constexpr(MIN_BIN)  # the bin of a -inf logit
_INT_FLOOR = tl.constexpr(-(2**62))  # below every int64 ranking key used here
_KEY_LIMIT = tl.constexpr(2**62)  # the popularity numeral must stay below this


@triton.jit
def _load_scores(logits_ptr, stride_t, rows, cols, num_tokens, num_experts, PRECISE_EXP):
    """One token tile: (probs [BT, BE] fp32 holding dtype-rounded softmax, NaN on invalid
    rows; logits [BT, BE] fp32, -inf in padding; row max [BT]; valid [BT])."""
    in_row = rows < num_tokens
    mask = in_row[:, None] & (cols < num_experts)[None, :]
    raw = tl.load(
        logits_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :],
        mask=mask,
        other=float("-inf"),
    )
    logits = raw.to(tl.float32)
    is_nan = logits != logits
    has_nan = tl.max(is_nan.to(tl.int32), axis=1) > 0
    row_max = tl.max(tl.where(is_nan, float("-inf"), logits), axis=1)
    valid = in_row & ~has_nan & (row_max > float("-inf")) & (row_max < float("inf"))
    safe_max = tl.where(valid, row_max, 0.0)
    shifted = tl.where(valid[:, None], logits - safe_max[:, None], float("-inf"))
    # libdevice's expf is the one torch's CUDA softmax uses; tl.exp is an approximation
    # (the interpreter has no libdevice, and numpy's exp is already accurate)
    expd = libdevice.exp(shifted) if PRECISE_EXP else tl.exp(shifted)
    denom = tl.sum(expd, axis=1)
    # softmax of a row with NaN or a non-finite maximum is NaN everywhere (as in torch)
    probs = tl.where(valid[:, None], expd / tl.where(valid, denom, 1.0)[:, None], float("nan"))
    probs = probs.to(raw.dtype).to(tl.float32)  # the model's scores live in its dtype
    return probs, logits, row_max, valid


@triton.jit
def _affinity_bins(logits, row_max, valid, alpha_bits, beta_floor, HAS_BETA: tl.constexpr):
    """q [BT, BE] int64 <= 0 exactly as reference.affinity_bins (0 on invalid rows; a -inf
    logit gets MIN_BIN, below the floor)."""
    alpha = alpha_bits.to(tl.float64, bitcast=True)
    safe_max = tl.where(valid, row_max, 0.0).to(tl.float64)
    shifted = alpha * (logits.to(tl.float64) - safe_max[:, None])
    q = tl.where(shifted == float("-inf"), _MIN_BIN, tl.math.ceil(shifted))
    q = tl.where(valid[:, None] & (q == q), q, 0.0)
    q = tl.minimum(tl.maximum(q, _MIN_BIN), 0.0).to(tl.int64)
    if HAS_BETA:
        q = tl.where(logits == float("-inf"), q, tl.maximum(q, -beta_floor))
    return q


@triton.jit
def _popularity_bins(num_tokens, beta_floor, HAS_BETA: tl.constexpr):
    """reference.popularity_bins: the largest b with N**b <= 2**62 (>= 1), capped by beta."""
    power = tl.full([], 1, tl.int64)
    limit = tl.full([], _KEY_LIMIT, tl.int64) // num_tokens
    bins = tl.full([], 0, tl.int32)
    for _ in range(62):
        fits = power <= limit
        power = tl.where(fits, power * num_tokens, power)
        bins += fits.to(tl.int32)
    bins = tl.where(num_tokens <= 1, 1, tl.maximum(bins, 1))
    if HAS_BETA:
        bins = tl.minimum(bins, beta_floor + 1)
    return bins


@triton.jit
def _votes(q, valid, num_tokens, bins):
    """vote [BT, BE] int64 = N**(bins-1-depth) for depth = -q < bins, else 0; 0 if invalid."""
    depth = tl.minimum(-q, bins)
    place = tl.zeros_like(q)
    power = tl.full([], 1, tl.int64)
    for p in range(bins):
        place = tl.where(depth == bins - 1 - p, power, place)
        power = power * num_tokens
    return tl.where(valid[:, None], place, 0)


@triton.jit
def _narrow_int(cand, key):
    """Keep, per row, the candidates whose int key equals the row's best candidate key."""
    best = tl.max(tl.where(cand, key, tl.full([], _INT_FLOOR, tl.int64)), axis=1)
    return cand & (key == best[:, None])


@triton.jit
def _narrow_float(cand, key):
    """Keep, per row, the candidates whose float key equals the row's best candidate key."""
    best = tl.max(tl.where(cand, key, float("-inf")), axis=1)
    return cand & (key == best[:, None])


@triton.jit
def _lowest(cand, cols, BLOCK_E: tl.constexpr):
    """Per row, the lowest candidate column [BT] and its one-hot mask [BT, BE]."""
    idx = tl.min(tl.where(cand, cols[None, :], BLOCK_E), axis=1)
    return idx, cols[None, :] == idx[:, None]


@triton.jit
def route_kernel(
    logits_ptr,
    weights_ptr,
    ids_ptr,
    stride_t,
    num_tokens,
    num_experts,
    top_k,
    keep_k0,
    keep_budget,
    alpha_bits,
    beta_floor,
    POLICY: tl.constexpr,
    HAS_BETA: tl.constexpr,
    RENORM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISE_EXP: tl.constexpr,
):
    """Route tokens [pid*BLOCK_T, (pid+1)*BLOCK_T): writes weights and ids [N, top_k]."""
    cols = tl.arange(0, BLOCK_E)
    in_col = cols < num_experts
    tile_rows = tl.arange(0, BLOCK_T)
    # kept[e] = 1 when expert e is in the batch's kept set K (unused by the exact policy)
    kept = tl.zeros([BLOCK_E], dtype=tl.int32)
    if POLICY == _AFFINITY:
        bins = _popularity_bins(num_tokens, beta_floor, HAS_BETA)
        votes = tl.zeros([BLOCK_E], dtype=tl.int64)
        for start in range(0, num_tokens, BLOCK_T):
            rows = start + tile_rows
            probs, logits, row_max, valid = _load_scores(
                logits_ptr, stride_t, rows, cols, num_tokens, num_experts, PRECISE_EXP
            )
            q = _affinity_bins(logits, row_max, valid, alpha_bits, beta_floor, HAS_BETA)
            votes += tl.sum(_votes(q, valid, num_tokens, bins), axis=0)
        for start in range(0, num_tokens, BLOCK_T):
            rows = start + tile_rows
            probs, logits, row_max, valid = _load_scores(
                logits_ptr, stride_t, rows, cols, num_tokens, num_experts, PRECISE_EXP
            )
            q = _affinity_bins(logits, row_max, valid, alpha_bits, beta_floor, HAS_BETA)
            pop = votes[None, :] - _votes(q, valid, num_tokens, bins)  # others' votes only
            avail = valid[:, None] & in_col[None, :]
            for _ in range(keep_k0):  # each token's own top-k0 first (the protected choice)
                _, pick = _lowest(_narrow_float(avail, probs), cols, BLOCK_E)
                avail = avail & ~pick
                kept = tl.maximum(kept, tl.max(pick.to(tl.int32), axis=0))
            for _ in range(top_k - keep_k0):
                cand = _narrow_float(_narrow_int(_narrow_int(avail, q), pop), probs)
                _, pick = _lowest(cand, cols, BLOCK_E)
                avail = avail & ~pick
                kept = tl.maximum(kept, tl.max(pick.to(tl.int32), axis=0))
    elif POLICY != _EXACT:  # oea's kept set, static's protected experts: own top-k0
        for start in range(0, num_tokens, BLOCK_T):
            rows = start + tile_rows
            probs, logits, row_max, valid = _load_scores(
                logits_ptr, stride_t, rows, cols, num_tokens, num_experts, PRECISE_EXP
            )
            avail = valid[:, None] & in_col[None, :]
            for _ in range(keep_k0):
                _, pick = _lowest(_narrow_float(avail, probs), cols, BLOCK_E)
                avail = avail & ~pick
                kept = tl.maximum(kept, tl.max(pick.to(tl.int32), axis=0))
    if POLICY == _STATIC:
        totals = tl.zeros([BLOCK_E], dtype=tl.float32)
        for start in range(0, num_tokens, BLOCK_T):
            rows = start + tile_rows
            probs, logits, row_max, valid = _load_scores(
                logits_ptr, stride_t, rows, cols, num_tokens, num_experts, PRECISE_EXP
            )
            totals += tl.sum(tl.where(valid[:, None], probs, 0.0), axis=0)
        # the reference sums in the logits dtype: round the total once, like torch.sum
        totals = totals.to(logits_ptr.dtype.element_ty).to(tl.float32)
        avail = in_col
        for _ in range(keep_budget):
            best = tl.max(tl.where(avail, totals, float("-inf")), axis=0)
            idx = tl.min(tl.where(avail & (totals == best), cols, BLOCK_E), axis=0)
            avail = avail & (cols != idx)
            kept = tl.where(cols == idx, 1, kept)

    rows = tl.program_id(0) * BLOCK_T + tile_rows
    in_row = rows < num_tokens
    probs, logits, row_max, valid = _load_scores(
        logits_ptr, stride_t, rows, cols, num_tokens, num_experts, PRECISE_EXP
    )
    # invalid rows rank NaN first, then lower index, like a NaN-first top-k
    rank_probs = tl.where(valid[:, None], probs, float("inf"))
    slots = tl.arange(0, BLOCK_K)[None, :]
    exact_ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int64)
    exact_vals = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    exact_set = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
    avail = in_row[:, None] & in_col[None, :]
    for j in range(top_k):
        idx, pick = _lowest(_narrow_float(avail, rank_probs), cols, BLOCK_E)
        avail = avail & ~pick
        exact_set = tl.where(pick, 1, exact_set)
        exact_ids = tl.where(slots == j, idx[:, None].to(tl.int64), exact_ids)
        val = tl.sum(tl.where(pick, probs, 0.0), axis=1)
        exact_vals = tl.where(slots == j, val[:, None], exact_vals)
    out_dtype = weights_ptr.dtype.element_ty
    exact_mass = tl.sum(exact_vals, axis=1).to(out_dtype).to(tl.float32)
    if RENORM:
        exact_w = (exact_vals / exact_mass[:, None]).to(out_dtype).to(tl.float32)
    else:
        exact_w = exact_vals
    out_ids = exact_ids
    out_w = exact_w
    if POLICY != _EXACT:
        # remap class 2 * usable + kept (usable: a finite logit), then probability, index
        usable = (logits > float("-inf")).to(tl.int32)
        rank_class = 2 * usable + kept[None, :]
        final_ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int64)
        final_vals = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
        final_set = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
        avail = in_row[:, None] & in_col[None, :]
        for j in range(top_k):
            cand = _narrow_float(_narrow_int(avail, rank_class.to(tl.int64)), rank_probs)
            idx, pick = _lowest(cand, cols, BLOCK_E)
            avail = avail & ~pick
            final_set = tl.where(pick, 1, final_set)
            final_ids = tl.where(slots == j, idx[:, None].to(tl.int64), final_ids)
            val = tl.sum(tl.where(pick, probs, 0.0), axis=1)
            final_vals = tl.where(slots == j, val[:, None], final_vals)
        final_mass = tl.sum(final_vals, axis=1).to(out_dtype).to(tl.float32)
        if RENORM:
            moved_w = final_vals / final_mass[:, None]
        else:
            scale = (exact_mass / final_mass).to(out_dtype).to(tl.float32)
            moved_w = final_vals * scale[:, None]
        moved_w = moved_w.to(out_dtype).to(tl.float32)
        # same expert set (or an invalid row): keep the exact ids and weights bit for bit
        same = (tl.sum((final_set != exact_set).to(tl.int32), axis=1) == 0) | ~valid
        same = same | (num_tokens == 1)  # a batch of one token routes exactly
        out_ids = tl.where(same[:, None], exact_ids, final_ids)
        out_w = tl.where(same[:, None], exact_w, moved_w)
    out_mask = in_row[:, None] & (slots < top_k)
    offsets = rows[:, None].to(tl.int64) * top_k + slots
    tl.store(ids_ptr + offsets, out_ids, mask=out_mask)
    tl.store(weights_ptr + offsets, out_w.to(out_dtype), mask=out_mask)


def _block_tokens(num_tokens: int, block_e: int, interpreted: bool) -> int:
    """Tokens per tile. GPU: <= 2048 scores per tile (registers of 4 warps), a function of
    the expert count only, so one compiled kernel serves every batch size. Interpreter:
    one tile, because every program repeats the cross-token pass in Python."""
    if interpreted:
        return triton.next_power_of_2(max(num_tokens, 1))
    return max(1, min(64, 2048 // block_e))


def _empty(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the wrapper allocates comes from here, so tests can poison them."""
    return torch.empty(shape, dtype=dtype, device=device)


def _size_hint(n) -> int:
    """A concrete value for a possibly symbolic size; used only for performance choices."""
    return n if isinstance(n, int) else int(n.node.hint)


def check_route_args(logits: torch.Tensor, top_k: int, policy: str, weights: str) -> None:
    """Raise ValueError (what was wrong, what to do) for inputs the kernel does not take."""
    reference.check_route(logits, top_k, policy, weights)
    if logits.dtype not in TRITON_DTYPES:
        raise ValueError(f"the Triton router takes fp32/fp16/bf16 logits, got {logits.dtype}")
    if logits.shape[1] > MAX_EXPERTS or top_k > MAX_TOP_K:
        raise ValueError(
            f"the Triton router handles <= {MAX_EXPERTS} experts and top_k <= {MAX_TOP_K}, "
            f"got {logits.shape[1]} experts, top_k {top_k}; use torch.ops.lynx.route"
        )


def route(
    logits: torch.Tensor,
    top_k: int,
    policy: str = "exact",
    alpha: float = DEFAULT_ALPHA,
    beta: float | None = DEFAULT_BETA,
    k0: int | None = None,
    budget: int = DEFAULT_BUDGET,
    weights: str = "renorm",
    wrap=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] -> (weights [N, k] in logits' dtype, ids int64 [N, k]), one launch.

    k0: each token's own top-k0 experts, always kept (None: the policy's default).
    `wrap` turns the kernel into what launches it (torch.library.wrap_triton while a
    compiled graph is traced, see triton_ops.py); None launches it directly.
    """
    check_route_args(logits, top_k, policy, weights)
    if policy == "affinity" and not alpha > 0:
        raise ValueError(f"affinity needs alpha > 0, got {alpha}")
    if k0 is None:
        k0 = default_k0(policy)
    num_tokens, num_experts = logits.shape
    out_w = _empty((num_tokens, top_k), logits.dtype, logits.device)
    out_ids = _empty((num_tokens, top_k), torch.int64, logits.device)
    if num_tokens == 0:
        return out_w, out_ids
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    block_e = triton.next_power_of_2(num_experts)
    interpreted = logits.device.type == "cpu"
    block_t = _block_tokens(_size_hint(num_tokens), block_e, interpreted)
    kernel = route_kernel if wrap is None else wrap(route_kernel)
    kernel[(triton.cdiv(num_tokens, block_t),)](
        logits,
        out_w,
        out_ids,
        logits.stride(0),
        num_tokens,
        num_experts,
        top_k,
        min(k0, top_k),
        min(max(budget, top_k), num_experts),
        struct.unpack("<q", struct.pack("<d", float(alpha)))[0],
        0 if beta is None else math.floor(beta),
        POLICY=POLICY_CODES[policy],
        HAS_BETA=beta is not None,
        RENORM=weights == "renorm",
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(top_k),
        PRECISE_EXP=not interpreted,
        num_warps=4,
    )
    return out_w, out_ids
