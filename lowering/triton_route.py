"""Triton routing kernels: top-k, kept set (affinity / OEA / static), remap, for softmax
routers (route_kernel: softmax, top-k, weights) and routers ranked by a score
(route_scored_kernel: sigmoid, sigmoid + bias, grouped, top-k on logits).

One launch, no host sync, no data-dependent shapes (CUDA-graph safe). The grid covers the
tokens in tiles of BLOCK_T; every program first derives the batch's kept set from ALL
tokens (the cross-token part: votes, chosen experts, union; `_kept_set`, shared by both
kernels), redundantly, then routes its own tile. Redundancy costs one extra read of the
scores per program (a few KiB at decode sizes, from L2) and buys a single launch without
inter-CTA synchronisation or scratch buffers.

Agreement with the specification, `reference.route_reference` and
`reference.route_scored_reference(..., ties="lower_index")`:
  - each token's own top-k0 is chosen first (affinity), or joins the kept set (oea,
    static); the remap ranks kept usable experts first: class 2 * usable + kept for
    softmax routers, kept & usable for scored ones (usable: a finite logit / score);
  - affinity bins are computed in fp64 from the same operations (alpha is passed as its
    fp64 bit pattern, Triton would otherwise narrow a Python float to fp32); scored
    routers bin in their space (reference.score_bins: logit, log(prob), 4 * score);
  - popularity is the same exact int64 key (`reference.popularity_key`), with the bin
    count `reference.popularity_bins` derived in the kernel from the token count;
  - every ranking follows the documented order: primary keys descending, then the score
    (softmax probability rounded to the logits dtype, as the model computes it; or the
    router's score) descending, then lower index; scores are compared through an int key
    that orders them as torch.sort does (NaN first, -0.0 equal to 0.0);
  - static ranks batch totals: the softmax routers' in the logits dtype, the scored
    routers' in fp64 (softmax of logits, else the finite scores);
  - rows with NaN or a non-finite maximum keep the exact routing and do not vote.
Exact id agreement needs equal scores on both sides. The scored kernel ranks the given
scores themselves (ids exact; values are the scores gathered at the ids, bit for bit),
except static's fp64 totals, whose summation order differs from torch's: two experts
whose totals lie within an ulp can swap. Softmax routers compute probabilities in fp32 on
both sides and round once, so they can differ only when an exp lands within one rounding
of a boundary, which can swap two experts whose probabilities are one ulp apart.
torch.topk itself leaves the order of equal scores unspecified (the references' default);
these kernels always put the lower index first.

Shapes: logits / scores [N, E] (fp32, fp16 or bf16, rows contiguous along experts) ->
weights / values [N, k] in the input dtype, ids int64 [N, k]. Tuned for N <= 1024,
E <= 512, k <= 16; larger N is correct but serialises the cross-token pass.
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
    SCORE_BINS_PER_UNIT,
    SCORE_SPACES,
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
_INT_FLOOR = tl.constexpr(-(2**31))  # <= every ranking key used here (int32 or int64)
_KEY_LIMIT = tl.constexpr(2**62)  # the popularity numeral must stay below this
_NAN_KEY = tl.constexpr(2**31 - 1)  # the order key of NaN, above +inf's
_CLASS_SHIFT = tl.constexpr(2**33)  # class * this + order key: class first, then the key
SPACE_CODES = {name: code for code, name in enumerate(SCORE_SPACES)}  # route_scored_kernel's
_LOGIT = tl.constexpr(SPACE_CODES["logit"])
_PROB = tl.constexpr(SPACE_CODES["prob"])
_SCORE = tl.constexpr(SPACE_CODES["score"])
_SOFTMAX = tl.constexpr(-1)  # route_kernel's: router logits ranked by their softmax
_SCORE_BINS_PER_UNIT = tl.constexpr(SCORE_BINS_PER_UNIT)  # the "score" space


@triton.jit
def _load_rows(scores_ptr, stride_t, rows, cols, num_tokens, num_experts):
    """One token tile: (raw [BT, BE] in the input dtype, -inf in padding; x [BT, BE] fp32;
    row max [BT] over the non-NaN entries; valid [BT]: in range, no NaN, a finite max)."""
    in_row = rows < num_tokens
    mask = in_row[:, None] & (cols < num_experts)[None, :]
    raw = tl.load(
        scores_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :],
        mask=mask,
        other=float("-inf"),
    )
    x = raw.to(tl.float32)
    is_nan = x != x
    has_nan = tl.max(is_nan.to(tl.int32), axis=1) > 0
    row_max = tl.max(tl.where(is_nan, float("-inf"), x), axis=1)
    valid = in_row & ~has_nan & (row_max > float("-inf")) & (row_max < float("inf"))
    return raw, x, row_max, valid


@triton.jit
def _softmax(x, row_max, valid, PRECISE_EXP: tl.constexpr):
    """softmax of x [BT, BE] along experts in x's dtype; NaN on invalid rows (as in torch)."""
    safe_max = tl.where(valid, row_max, 0.0)
    shifted = tl.where(valid[:, None], x - safe_max[:, None], float("-inf"))
    # libdevice's exp is the one torch's CUDA softmax uses; tl.exp is an approximation
    # (the interpreter has no libdevice, and numpy's exp is already accurate)
    expd = libdevice.exp(shifted) if PRECISE_EXP else tl.exp(shifted)
    denom = tl.sum(expd, axis=1)
    return tl.where(valid[:, None], expd / tl.where(valid, denom, 1.0)[:, None], float("nan"))


@triton.jit
def _order_key(x):
    """int32 [BT, BE] ordering fp32 x as torch.sort does: NaN above +inf, -0.0 equal to 0.0."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: flip the magnitude
    return tl.where(x != x, _NAN_KEY, key)


@triton.jit
def _affinity_bins(logits, row_max, valid, alpha_bits, beta_floor, HAS_BETA: tl.constexpr):
    """q [BT, BE] int64 <= 0 exactly as reference.affinity_bins (0 on invalid rows; a -inf
    logit gets MIN_BIN, below the floor)."""
    alpha = alpha_bits.to(tl.int64).to(tl.float64, bitcast=True)  # a small int came as i32
    safe_max = tl.where(valid, row_max, 0.0).to(tl.float64)
    shifted = alpha * (logits.to(tl.float64) - safe_max[:, None])
    q = tl.where(shifted == float("-inf"), _MIN_BIN, tl.math.ceil(shifted))
    q = tl.where(valid[:, None] & (q == q), q, 0.0)
    q = tl.minimum(tl.maximum(q, _MIN_BIN), 0.0).to(tl.int64)
    if HAS_BETA:
        q = tl.where(logits == float("-inf"), q, tl.maximum(q, -beta_floor))
    return q


@triton.jit
def _load_tile(
    scores_ptr,
    stride_t,
    rows,
    cols,
    num_tokens,
    num_experts,
    alpha_bits,
    beta_floor,
    SPACE: tl.constexpr,
    HAS_BETA: tl.constexpr,
    PRECISE_EXP: tl.constexpr,
):
    """One token tile as the policies see it: (rank [BT, BE] int32, the order key of the
    ranking score; q [BT, BE] int64 affinity bins; mass [BT, BE], what static sums (set on
    valid rows); valid [BT]; usable [BT, BE], a finite logit or score).

    SPACE _SOFTMAX: router logits ranked by their softmax, rounded to the logits' dtype as
    the model computes it (route_kernel). Else a scored router's scores in that space
    (reference.score_bins, reference._static_totals), bins and totals in fp64."""
    raw, x, row_max, valid = _load_rows(scores_ptr, stride_t, rows, cols, num_tokens, num_experts)
    if SPACE == _SOFTMAX:
        mass = _softmax(x, row_max, valid, PRECISE_EXP).to(raw.dtype).to(tl.float32)
        q = _affinity_bins(x, row_max, valid, alpha_bits, beta_floor, HAS_BETA)
        rank = _order_key(mass)
        usable = x > float("-inf")
    else:
        x64 = x.to(tl.float64)
        if SPACE == _PROB:  # bins on log(score); 0 gives -inf, a negative score NaN
            ranked = libdevice.log(x64) if PRECISE_EXP else tl.log(x64)
        elif SPACE == _SCORE:
            ranked = x64 * _SCORE_BINS_PER_UNIT
        else:
            ranked = x64
        binned = (ranked == ranked) & (tl.abs(ranked) < float("inf"))
        ranked = tl.where(binned, ranked, float("-inf"))
        ranked_max = tl.max(ranked, axis=1)  # the bins hang from the finite maximum
        q = _affinity_bins(ranked, ranked_max, ranked_max > float("-inf"), alpha_bits,
                           beta_floor, HAS_BETA)  # fmt: skip
        q = tl.where(binned, q, _MIN_BIN)
        usable = (x == x) & (tl.abs(x) < float("inf"))
        if SPACE == _LOGIT:  # static ranks probabilities: softmax in fp64
            mass = _softmax(x64, row_max.to(tl.float64), valid, PRECISE_EXP)
        else:
            mass = tl.where(usable, x64, 0.0)
        rank = _order_key(x)
    return rank, q, mass, valid, usable


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
    best = tl.max(tl.where(cand, key, _INT_FLOOR), axis=1)  # in the key's own int type
    return cand & (key == best[:, None])


@triton.jit
def _lowest(cand, cols, BLOCK_E: tl.constexpr):
    """Per row, the lowest candidate column [BT] and its one-hot mask [BT, BE]."""
    idx = tl.min(tl.where(cand, cols[None, :], BLOCK_E), axis=1)
    return idx, cols[None, :] == idx[:, None]


@triton.jit
def _keep_best(avail, key, kept, cols, count, BLOCK_E: tl.constexpr):
    """Each row takes its `count` best available columns by (key, lower index) into the
    kept set kept [BE]: (avail without them, kept)."""
    for _ in range(count):
        _, pick = _lowest(_narrow_int(avail, key), cols, BLOCK_E)
        avail = avail & ~pick
        kept = tl.maximum(kept, tl.max(pick.to(tl.int32), axis=0))
    return avail, kept


@triton.jit
def _kept_set(
    scores_ptr,
    stride_t,
    num_tokens,
    num_experts,
    top_k,
    keep_k0,
    keep_budget,
    alpha_bits,
    beta_floor,
    POLICY: tl.constexpr,
    SPACE: tl.constexpr,
    HAS_BETA: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    PRECISE_EXP: tl.constexpr,
):
    """kept [BE] int32: 1 for each expert in the batch's kept set K, from ALL tokens (zeros
    under exact). Every program derives it again: no inter-CTA synchronisation."""
    cols = tl.arange(0, BLOCK_E)
    in_col = cols < num_experts
    tile_rows = tl.arange(0, BLOCK_T)
    kept = tl.zeros([BLOCK_E], dtype=tl.int32)
    if POLICY == _AFFINITY:
        bins = _popularity_bins(num_tokens, beta_floor, HAS_BETA)
        votes = tl.zeros([BLOCK_E], dtype=tl.int64)
        for start in range(0, num_tokens, BLOCK_T):
            _, q, _, valid, _ = _load_tile(
                scores_ptr, stride_t, start + tile_rows, cols, num_tokens, num_experts,
                alpha_bits, beta_floor, SPACE, HAS_BETA, PRECISE_EXP,
            )  # fmt: skip
            votes += tl.sum(_votes(q, valid, num_tokens, bins), axis=0)
        for start in range(0, num_tokens, BLOCK_T):
            rank, q, _, valid, _ = _load_tile(
                scores_ptr, stride_t, start + tile_rows, cols, num_tokens, num_experts,
                alpha_bits, beta_floor, SPACE, HAS_BETA, PRECISE_EXP,
            )  # fmt: skip
            pop = votes[None, :] - _votes(q, valid, num_tokens, bins)  # others' votes only
            avail = valid[:, None] & in_col[None, :]
            # each token's own top-k0 first (the protected choice), then bin, popularity
            avail, kept = _keep_best(avail, rank, kept, cols, keep_k0, BLOCK_E)
            for _ in range(top_k - keep_k0):
                cand = _narrow_int(_narrow_int(_narrow_int(avail, q), pop), rank)
                _, pick = _lowest(cand, cols, BLOCK_E)
                avail = avail & ~pick
                kept = tl.maximum(kept, tl.max(pick.to(tl.int32), axis=0))
    elif POLICY != _EXACT:  # oea's kept set, static's protected experts: own top-k0
        for start in range(0, num_tokens, BLOCK_T):
            rank, _, _, valid, _ = _load_tile(
                scores_ptr, stride_t, start + tile_rows, cols, num_tokens, num_experts,
                alpha_bits, beta_floor, SPACE, HAS_BETA, PRECISE_EXP,
            )  # fmt: skip
            _, kept = _keep_best(valid[:, None] & in_col[None, :], rank, kept, cols, keep_k0,
                                 BLOCK_E)  # fmt: skip
    if POLICY == _STATIC:
        if SPACE == _SOFTMAX:
            totals = tl.zeros([BLOCK_E], dtype=tl.float32)
        else:
            totals = tl.zeros([BLOCK_E], dtype=tl.float64)
        for start in range(0, num_tokens, BLOCK_T):
            _, _, mass, valid, _ = _load_tile(
                scores_ptr, stride_t, start + tile_rows, cols, num_tokens, num_experts,
                alpha_bits, beta_floor, SPACE, HAS_BETA, PRECISE_EXP,
            )  # fmt: skip
            totals += tl.sum(tl.where(valid[:, None], mass, 0.0), axis=0)
        if SPACE == _SOFTMAX:  # route_reference sums in the logits dtype: round once
            totals = totals.to(scores_ptr.dtype.element_ty).to(tl.float32)
        avail = in_col
        for _ in range(keep_budget):
            best = tl.max(tl.where(avail, totals, float("-inf")), axis=0)
            idx = tl.min(tl.where(avail & (totals == best), cols, BLOCK_E), axis=0)
            avail = avail & (cols != idx)
            kept = tl.where(cols == idx, 1, kept)
    return kept


@triton.jit
def _select_topk(
    avail,
    key,
    values,
    top_k,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Each row's top_k available columns by (int key, lower index): (ids [BT, BK] int64,
    values at them [BT, BK] fp32, membership [BT, BE] int32)."""
    cols = tl.arange(0, BLOCK_E)
    slots = tl.arange(0, BLOCK_K)[None, :]
    ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int64)
    vals = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    member = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
    for j in range(top_k):
        idx, pick = _lowest(_narrow_int(avail, key), cols, BLOCK_E)
        avail = avail & ~pick
        member = tl.where(pick, 1, member)
        ids = tl.where(slots == j, idx[:, None].to(tl.int64), ids)
        val = tl.sum(tl.where(pick, values, 0.0), axis=1).to(tl.float32)
        vals = tl.where(slots == j, val[:, None], vals)
    return ids, vals, member


@triton.jit
def _keeps_exact(final_set, exact_set, valid, num_tokens):
    """[BT] rows that keep the exact routing bit for bit: the same expert set, an invalid
    row, or a batch of one token."""
    same = tl.sum((final_set != exact_set).to(tl.int32), axis=1) == 0
    return same | ~valid | (num_tokens == 1)


@triton.jit
def _store_route(out_ptr, ids_ptr, rows, top_k, out, out_ids, num_tokens, BLOCK_K: tl.constexpr):
    """Write rows' outputs out (cast to out_ptr's dtype) and out_ids [BT, BK] into [N, top_k]."""
    slots = tl.arange(0, BLOCK_K)[None, :]
    out_mask = (rows < num_tokens)[:, None] & (slots < top_k)
    offsets = rows[:, None].to(tl.int64) * top_k + slots
    tl.store(ids_ptr + offsets, out_ids, mask=out_mask)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=out_mask)


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
    kept = _kept_set(
        logits_ptr, stride_t, num_tokens, num_experts, top_k, keep_k0, keep_budget,
        alpha_bits, beta_floor, POLICY, _SOFTMAX, HAS_BETA, BLOCK_T, BLOCK_E, PRECISE_EXP,
    )  # fmt: skip
    cols = tl.arange(0, BLOCK_E)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rank, _, probs, valid, usable = _load_tile(
        logits_ptr, stride_t, rows, cols, num_tokens, num_experts, alpha_bits, beta_floor,
        _SOFTMAX, HAS_BETA, PRECISE_EXP,
    )  # fmt: skip
    # invalid rows rank NaN first (all their probabilities), then lower index
    avail = (rows < num_tokens)[:, None] & (cols < num_experts)[None, :]
    exact_ids, exact_vals, exact_set = _select_topk(
        avail, rank, probs, top_k, BLOCK_T, BLOCK_E, BLOCK_K
    )
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
        rank_class = 2 * usable.to(tl.int64) + kept[None, :].to(tl.int64)
        final_ids, final_vals, final_set = _select_topk(
            avail, rank_class * _CLASS_SHIFT + rank, probs, top_k, BLOCK_T, BLOCK_E, BLOCK_K
        )
        final_mass = tl.sum(final_vals, axis=1).to(out_dtype).to(tl.float32)
        if RENORM:
            moved_w = final_vals / final_mass[:, None]
        else:
            scale = (exact_mass / final_mass).to(out_dtype).to(tl.float32)
            moved_w = final_vals * scale[:, None]
        moved_w = moved_w.to(out_dtype).to(tl.float32)
        same = _keeps_exact(final_set, exact_set, valid, num_tokens)
        out_ids = tl.where(same[:, None], exact_ids, final_ids)
        out_w = tl.where(same[:, None], exact_w, moved_w)
    _store_route(weights_ptr, ids_ptr, rows, top_k, out_w, out_ids, num_tokens, BLOCK_K)


@triton.jit
def route_scored_kernel(
    scores_ptr,
    values_ptr,
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
    SPACE: tl.constexpr,
    HAS_BETA: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISE_EXP: tl.constexpr,
):
    """Route tokens [pid*BLOCK_T, (pid+1)*BLOCK_T) by their scores: writes the scores at
    the chosen ids and the ids [N, top_k]."""
    kept = _kept_set(
        scores_ptr, stride_t, num_tokens, num_experts, top_k, keep_k0, keep_budget,
        alpha_bits, beta_floor, POLICY, SPACE, HAS_BETA, BLOCK_T, BLOCK_E, PRECISE_EXP,
    )  # fmt: skip
    cols = tl.arange(0, BLOCK_E)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rank, _, mass, valid, usable = _load_tile(
        scores_ptr, stride_t, rows, cols, num_tokens, num_experts, alpha_bits, beta_floor,
        SPACE, HAS_BETA, PRECISE_EXP,
    )  # fmt: skip
    # the exact top-k: NaN first, then +inf, the scores, -inf; equal ones lower index first
    avail = (rows < num_tokens)[:, None] & (cols < num_experts)[None, :]
    out_ids, _, exact_set = _select_topk(avail, rank, mass, top_k, BLOCK_T, BLOCK_E, BLOCK_K)
    if POLICY != _EXACT:
        # remap: kept experts the token may use (finite score) first, then score, index
        rank_class = (usable & (kept[None, :] > 0)).to(tl.int64)
        final_ids, _, final_set = _select_topk(
            avail, rank_class * _CLASS_SHIFT + rank, mass, top_k, BLOCK_T, BLOCK_E, BLOCK_K
        )
        same = _keeps_exact(final_set, exact_set, valid, num_tokens)
        out_ids = tl.where(same[:, None], out_ids, final_ids)
    # the values are the scores gathered at the ids, bit for bit
    slots = tl.arange(0, BLOCK_K)[None, :]
    gather = (rows < num_tokens)[:, None] & (slots < top_k)
    values = tl.load(scores_ptr + rows[:, None].to(tl.int64) * stride_t + out_ids, mask=gather)
    _store_route(values_ptr, ids_ptr, rows, top_k, values, out_ids, num_tokens, BLOCK_K)


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


def _check_fits(scores: torch.Tensor, top_k: int, what: str, op: str) -> None:
    """ValueError unless the Triton kernels take scores' dtype and the router's shape."""
    if scores.dtype not in TRITON_DTYPES:
        raise ValueError(f"the Triton router takes fp32/fp16/bf16 {what}, got {scores.dtype}")
    if scores.shape[1] > MAX_EXPERTS or top_k > MAX_TOP_K:
        raise ValueError(
            f"the Triton router handles <= {MAX_EXPERTS} experts and top_k <= {MAX_TOP_K}, "
            f"got {scores.shape[1]} experts, top_k {top_k}; use torch.ops.lynx.{op}"
        )


def _check_alpha(policy: str, alpha: float) -> None:
    if policy == "affinity" and not alpha > 0:
        raise ValueError(f"affinity needs alpha > 0, got {alpha}")


def check_route_args(logits: torch.Tensor, top_k: int, policy: str, weights: str) -> None:
    """Raise ValueError (what was wrong, what to do) for inputs the kernel does not take."""
    reference.check_route(logits, top_k, policy, weights)
    _check_fits(logits, top_k, "logits", "route")


def check_route_scored_args(scores: torch.Tensor, top_k: int, space: str, policy: str) -> None:
    """Raise ValueError (what was wrong, what to do) for inputs route_scored does not take."""
    reference.check_logits(scores, top_k)
    reference.check_policy(policy)
    if space not in SPACE_CODES:
        raise ValueError(f"unknown score space {space!r}; valid: {', '.join(SCORE_SPACES)}")
    _check_fits(scores, top_k, "scores", "route_scored")


def _launch(kernel, wrap, scores, outputs, top_k, policy, alpha, beta, k0, budget, **meta):
    """Launch a routing kernel over scores [N, E] into outputs (values [N, k], ids [N, k]);
    meta: the kernel's own meta-parameters."""
    num_tokens, num_experts = scores.shape
    if num_tokens == 0:
        return
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    block_e = triton.next_power_of_2(num_experts)
    interpreted = scores.device.type == "cpu"
    block_t = _block_tokens(_size_hint(num_tokens), block_e, interpreted)
    kernel = kernel if wrap is None else wrap(kernel)
    kernel[(triton.cdiv(num_tokens, block_t),)](
        scores,
        *outputs,
        scores.stride(0),
        num_tokens,
        num_experts,
        top_k,
        min(default_k0(policy) if k0 is None else k0, top_k),
        min(max(budget, top_k), num_experts),
        struct.unpack("<q", struct.pack("<d", float(alpha)))[0],
        0 if beta is None else math.floor(beta),
        POLICY=POLICY_CODES[policy],
        HAS_BETA=beta is not None,
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(top_k),
        PRECISE_EXP=not interpreted,
        num_warps=4,
        **meta,
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
    _check_alpha(policy, alpha)
    num_tokens = logits.shape[0]
    out_w = _empty((num_tokens, top_k), logits.dtype, logits.device)
    out_ids = _empty((num_tokens, top_k), torch.int64, logits.device)
    _launch(
        route_kernel, wrap, logits, (out_w, out_ids), top_k, policy, alpha, beta, k0, budget,
        RENORM=weights == "renorm",
    )  # fmt: skip
    return out_w, out_ids


def route_scored(
    scores: torch.Tensor,
    top_k: int,
    space: str,
    policy: str,
    alpha: float,
    beta: float | None,
    k0: int | None,
    budget: int,
    wrap=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [N, E] -> (scores at ids [N, k] in scores' dtype, ids int64 [N, k]), one launch.

    As reference.route_scored_reference(scores, top_k, space, RoutingPolicy(policy, alpha,
    beta, k0, budget), ties="lower_index"); space: "logit", "prob" or "score" (the units
    of the affinity bins). k0 and wrap as for `route`.
    """
    check_route_scored_args(scores, top_k, space, policy)
    _check_alpha(policy, alpha)
    num_tokens = scores.shape[0]
    values = _empty((num_tokens, top_k), scores.dtype, scores.device)
    ids = _empty((num_tokens, top_k), torch.int64, scores.device)
    _launch(
        route_scored_kernel, wrap, scores, (values, ids), top_k, policy, alpha, beta, k0,
        budget, SPACE=SPACE_CODES[space],
    )  # fmt: skip
    return values, ids
