/* The CPU kernels of lynx_compile: AffinityBinning selection and the sparse experts.
 *
 * Plain C, linked into the op library that lowering/lynx_ops.cpp registers with torch's
 * dispatcher (built once per machine by lowering/cpu_native.py). Each function computes
 * what its reference in lowering/reference.py computes (tests check equality of ids and
 * closeness of outputs); see that file for the specification.
 *
 * Each call is single-threaded: at decode sizes one layer's work is a few microseconds of
 * arithmetic over weights read once per touched expert, bound by how fast a core streams
 * them from memory. lynx_ops.cpp deals the experts out to torch's intra-op threads
 * (lynx_experts' take mask), so each thread streams its own experts, and runs experts with
 * many tokens as oneDNN/BLAS GEMMs instead.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* AVX-512 code paths (F, BW, VL, DQ: every AVX-512 CPU since Skylake-SP) under
 * -march=native; plain C elsewhere. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__)
#include <immintrin.h>
#define LYNX_AVX512 1
#endif

#define MIN_BIN (-(1LL << 30))

/* ------------------------------------------------------------ AffinityBinning ids */

/* Is candidate a (bin qa, popularity pa, prob fa, index ia) preferred to b? Branch-free. */
static inline int better(int64_t qa, int64_t pa, float fa, int64_t ia,
                         int64_t qb, int64_t pb, float fb, int64_t ib) {
  return (qa > qb) | ((qa == qb) & ((pa > pb) | ((pa == pb) & ((fa > fb) | ((fa == fb) & (ia < ib))))));
}

/* Integer power without overflow checks (callers keep b**p <= 2**62). */
static inline int64_t ipow(int64_t b, int64_t p) {
  int64_t r = 1;
  while (p-- > 0) r *= b;
  return r;
}

/* The maximum of row[0..e) and whether the row may be remapped (no NaN, finite maximum). */
static inline float row_max(const float *row, int64_t e, uint8_t *valid) {
  float mx = -INFINITY;
  int nan = 0;
  int64_t j = 0;
#ifdef LYNX_AVX512
  __m512 vmx = _mm512_set1_ps(-INFINITY);
  __mmask16 vnan = 0;
  for (; j < e; j += 16) {
    __mmask16 m = e - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (e - j)) - 1u);
    __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m, row + j);
    vnan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    vmx = _mm512_max_ps(vmx, v);
  }
  mx = _mm512_reduce_max_ps(vmx);
  nan = vnan != 0;
#endif
  for (; j < e; ++j) {
    nan |= row[j] != row[j];
    mx = row[j] > mx ? row[j] : mx;
  }
  *valid = !nan && isfinite(mx);
  return mx;
}

/* Affinity bins q[j] = ceil(alpha * (row[j] - mx)) in double (NaN, from alpha 0 times -inf:
 * 0), clamped to [floor_q, 0]; a -inf logit (a masked expert) gets MIN_BIN, below the floor. */
static inline void row_bins(const float *row, int64_t e, double alpha, double mx,
                            double floor_q, int64_t *q) {
  int64_t j = 0;
#ifdef LYNX_AVX512
  const __m512d va = _mm512_set1_pd(alpha), vm = _mm512_set1_pd(mx);
  const __m512d lo = _mm512_set1_pd(floor_q), zero = _mm512_setzero_pd();
  for (; j < e; j += 8) {
    __mmask8 m = e - j >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << (e - j)) - 1u);
    __m512d c = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, row + j));
    c = _mm512_roundscale_pd(_mm512_mul_pd(va, _mm512_sub_pd(c, vm)),
                             _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
    c = _mm512_mask_blend_pd(_mm512_cmp_pd_mask(c, c, _CMP_UNORD_Q), c, zero);
    const __mmask8 masked = _mm512_cmp_pd_mask(c, _mm512_set1_pd(-INFINITY), _CMP_EQ_OQ);
    c = _mm512_min_pd(_mm512_max_pd(c, lo), zero);
    c = _mm512_mask_blend_pd(masked, c, _mm512_set1_pd((double)MIN_BIN));
    _mm512_mask_storeu_epi64(q + j, m, _mm512_cvtpd_epi64(c));
  }
#endif
  for (; j < e; ++j) {
    double c = ceil(alpha * ((double)row[j] - mx));
    c = c != c ? 0.0 : c;
    const int masked = c == -INFINITY;
    c = c < floor_q ? floor_q : c;
    q[j] = masked ? MIN_BIN : (int64_t)(c > 0.0 ? 0.0 : c);
  }
}

/* Each row's top-k of probs [n, e] into ids [n, k], best first: higher probability, then
 * lower index; NaN ranks above every number (only rows that keep their exact routing hold
 * NaN). The order torch.topk leaves unspecified, fixed as the Triton route kernel fixes it.
 * Callers keep 1 <= k <= e. Returns 0, or -1 when out of memory. */
int64_t lynx_topk_rows(const float *probs, int64_t n, int64_t e, int64_t k, int64_t *ids) {
  float top[64], *vals = k <= 64 ? top : malloc(sizeof(float) * (size_t)k);
  if (!vals) return -1;
  for (int64_t t = 0; t < n; ++t) {
    const float *row = probs + t * e;
    int64_t *out = ids + t * k, have = 0;
    for (int64_t j = 0; j < e; ++j) {
      const float v = row[j] != row[j] ? INFINITY : row[j];
      if (have == k) {
        if (!(v > vals[k - 1])) continue; /* ties keep the lower index already held */
        --have;
      }
      int64_t pos = have++;
      while (pos > 0 && v > vals[pos - 1]) {
        vals[pos] = vals[pos - 1];
        out[pos] = out[pos - 1];
        --pos;
      }
      vals[pos] = v;
      out[pos] = j;
    }
  }
  if (vals != top) free(vals);
  return 0;
}

/* Is expert a (remap class ca = 2 * usable + kept, prob fa) preferred to b in the remap?
 * Index order is the caller's (it scans experts in ascending index). */
static inline int remap_better(int ca, float fa, int cb, float fb) {
  return (ca > cb) | ((ca == cb) & (fa > fb));
}

/* Order-preserving bits of a number (not NaN): a < b exactly when float_order(a) <
 * float_order(b), and -0 equals +0 (the reference compares values, not bits). */
static inline uint32_t float_order(float v) {
  uint32_t b;
  v += 0.0f; /* -0 + 0 is +0 */
  memcpy(&b, &v, sizeof b);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

/* Scratch for one routing call: bins q and popularity [n, e], vote totals [e], the kept and
 * taken sets [e], the rows that may be remapped [n]. */
typedef struct {
  int64_t *q, *pop, *total;
  uint8_t *kept, *taken, *valid;
} route_scratch;

static int scratch_alloc(route_scratch *s, int64_t n, int64_t e) {
  size_t words = (size_t)(2 * n * e + e), bytes = (size_t)(2 * e + n);
  s->q = malloc(words * sizeof(int64_t) + bytes);
  if (!s->q) return -1;
  s->pop = s->q + n * e, s->total = s->pop + n * e;
  s->kept = (uint8_t *)(s->total + e), s->taken = s->kept + e, s->valid = s->taken + e;
  return 0;
}

/* AffinityBinning after the bins, shared by softmax and scored routers:
 *   s->q, s->valid  the bins [n, e] (MIN_BIN: an expert that never votes) and the rows that
 *                   may be remapped [n], filled by the caller
 *   f               [n, e] float32 ranking score after the bins and in the remap: the
 *                   probabilities (softmax routers) or the scores themselves
 *   u               [n, e] float32, an expert is usable where u > -inf (logits or scores)
 *   scored          remap class kept & usable (route_scored_reference) instead of
 *                   2 * usable + kept (route_reference)
 * and the rest as lynx_affinity_ids. Returns the kept set's size. */
static int64_t affinity_after_bins(route_scratch *s, const float *f, const float *u,
                                   const int64_t *exact_ids, int64_t n, int64_t e, int64_t k,
                                   double beta, int64_t k0, int scored, int64_t *ids,
                                   uint8_t *same) {
  int64_t *q = s->q, *pop = s->pop, *total = s->total;
  uint8_t *kept = s->kept, *taken = s->taken, *valid = s->valid;
  const double floor_q = beta < 0 ? (double)MIN_BIN : -floor(beta);
  /* Popularity key (reference.popularity_key): the other tokens' votes as a base-B numeral,
   * one digit per bin: a vote in bin depth p is worth B**(bins-1-p), none below `bins`. */
  int64_t batch = n, bins = 1;
  if (batch > 1) {
    bins = (int64_t)floor(62.0 / log2((double)batch));
    bins = bins < 1 ? 1 : bins;
  }
  if (beta >= 0 && bins > (int64_t)floor(beta) + 1) bins = (int64_t)floor(beta) + 1;
  int64_t place[64] = {0}; /* worth of a vote by depth, 0 from depth `bins` on */
  for (int64_t p = 0; p < bins && p < 64; ++p) place[p] = ipow(batch, bins - 1 - p);
  memset(total, 0, sizeof(int64_t) * (size_t)e);
  for (int64_t t = 0; t < n; ++t) {
    int64_t *own = pop + t * e;
    const int64_t *qt = q + t * e;
    if (!valid[t]) {
      memset(own, 0, sizeof(int64_t) * (size_t)e);
      continue;
    }
    for (int64_t j = 0; j < e; ++j) {
      int64_t depth = -qt[j];
      own[j] = place[depth < 63 ? depth : 63];
      total[j] += own[j];
    }
  }
  for (int64_t t = 0; t < n * e; t += e)
    for (int64_t j = 0; j < e; ++j) pop[t + j] = total[j] - pop[t + j];
  /* Kept set: union over valid tokens of their own top-k0 (exact_ids' first k0) and their
   * best k - k0 other experts by (q, pop, f, lower index). One pass per token keeps its
   * best so far, best first (insertion: most experts fail the first comparison with the
   * current last). With beta <= 2 the four keys pack into one 128-bit integer: the bin in
   * 2 bits above pop (< B**bins <= 2**62), 1 + q - floor(q) for a bin, 0 for MIN_BIN (so a
   * masked expert still ranks by pop, f and index, below every bin), then f's order bits
   * and the complemented index. */
  const int packed = beta >= 0 && floor(beta) <= 2 && k <= 64;
  const int64_t own = k0 < k ? k0 : k, pick = k - own;
  memset(kept, 0, (size_t)e);
  memset(taken, 0, (size_t)e);
  for (int64_t t = 0; t < n; ++t) {
    if (!valid[t]) continue;
    const int64_t *qt = q + t * e, *pt = pop + t * e;
    const float *ft = f + t * e;
    for (int64_t s2 = 0; s2 < own; ++s2)
      kept[exact_ids[t * k + s2]] = 1, taken[exact_ids[t * k + s2]] = 1;
    int64_t *top = ids + t * k, have = 0; /* the output row is free scratch until the remap */
    if (pick > 0 && packed) {
      unsigned __int128 kb[64]; /* the keys of top[0..have) */
      for (int64_t j = 0; j < e; ++j) {
        if (taken[j]) continue; /* protected: chosen already */
        const uint64_t bin = qt[j] == MIN_BIN ? 0 : (uint64_t)(qt[j] - (int64_t)floor_q + 1);
        const uint64_t hi = (bin << 62) | (uint64_t)pt[j];
        const uint64_t lo = ((uint64_t)float_order(ft[j]) << 32) | (uint32_t)~(uint32_t)j;
        const unsigned __int128 key = ((unsigned __int128)hi << 64) | lo;
        if (have == pick) {
          if (key <= kb[pick - 1]) continue;
          --have;
        }
        int64_t pos = have++;
        while (pos > 0 && key > kb[pos - 1]) {
          kb[pos] = kb[pos - 1];
          top[pos] = top[pos - 1];
          --pos;
        }
        kb[pos] = key;
        top[pos] = j;
      }
    } else if (pick > 0) {
      for (int64_t j = 0; j < e; ++j) {
        if (taken[j]) continue; /* protected: chosen already */
        if (have == pick) {
          int64_t w = top[pick - 1];
          if (!better(qt[j], pt[j], ft[j], j, qt[w], pt[w], ft[w], w)) continue;
          --have;
        }
        int64_t pos = have++;
        while (pos > 0) {
          int64_t w = top[pos - 1];
          if (!better(qt[j], pt[j], ft[j], j, qt[w], pt[w], ft[w], w)) break;
          top[pos] = w;
          --pos;
        }
        top[pos] = j;
      }
    }
    for (int64_t s2 = 0; s2 < pick; ++s2) kept[top[s2]] = 1;
    for (int64_t s2 = 0; s2 < own; ++s2) taken[exact_ids[t * k + s2]] = 0;
  }
  int64_t kept_count = 0;
  for (int64_t j = 0; j < e; ++j) kept_count += kept[j];
  /* Final experts: each valid token's top-k by (remap class, f, lower index), kept usable
   * experts first (the class: see `scored`). */
  for (int64_t t = 0; t < n; ++t) {
    int64_t *out = ids + t * k;
    const int64_t *ex = exact_ids + t * k;
    if (!valid[t]) {
      memcpy(out, ex, sizeof(int64_t) * (size_t)k);
      same[t] = 1;
      continue;
    }
    const float *ft = f + t * e, *lt = u + t * e;
    /* The common case first: the model's own top-k is all kept and usable and no other kept
     * usable expert ranks above its weakest member w by (f, lower index); then it is the
     * answer. */
    memset(taken, 0, (size_t)e);
    int all_kept = 1;
    int64_t w = ex[0];
    for (int64_t s2 = 0; s2 < k; ++s2) {
      int64_t j = ex[s2];
      taken[j] = 1, all_kept &= kept[j] & (lt[j] > -INFINITY);
      w = ft[j] < ft[w] || (ft[j] == ft[w] && j > w) ? j : w;
    }
    if (all_kept) {
      const float pw = ft[w];
      int beaten = 0;
      for (int64_t j = 0; j < e; ++j)
        beaten |= kept[j] & (lt[j] > -INFINITY) & !taken[j] &
                  ((ft[j] > pw) | ((ft[j] == pw) & (j < w)));
      if (!beaten) {
        memcpy(out, ex, sizeof(int64_t) * (size_t)k);
        same[t] = 1;
        continue;
      }
    }
#define REMAP_CLASS(j) \
  (scored ? (kept[j] & (lt[j] > -INFINITY)) : 2 * (lt[j] > -INFINITY) + kept[j])
    int64_t have = 0; /* top-k by (class, f, lower index), by insertion */
    int cls[64], *cl = k <= 64 ? cls : NULL; /* the classes of out[0..have) */
    for (int64_t j = 0; j < e; ++j) {
      const int cj = REMAP_CLASS(j);
      if (have == k) {
        int64_t v = out[k - 1];
        if (!remap_better(cj, ft[j], cl ? cl[k - 1] : REMAP_CLASS(v), ft[v])) continue;
        --have;
      }
      int64_t pos = have++;
      while (pos > 0) {
        int64_t v = out[pos - 1];
        int cv = cl ? cl[pos - 1] : REMAP_CLASS(v);
        if (!remap_better(cj, ft[j], cv, ft[v])) break;
        out[pos] = v;
        if (cl) cl[pos] = cv;
        --pos;
      }
      out[pos] = j;
      if (cl) cl[pos] = cj;
    }
#undef REMAP_CLASS
    /* Same expert set as the model's top-k (marked in `taken` above): keep its ids (and
     * order) bit for bit. */
    int is_same = 1;
    for (int64_t s2 = 0; s2 < k; ++s2) is_same &= taken[out[s2]];
    same[t] = (uint8_t)is_same;
    if (is_same) memcpy(out, ex, sizeof(int64_t) * (size_t)k);
  }
  return kept_count;
}

enum { SPACE_SOFTMAX = -1, SPACE_LOGIT = 0, SPACE_PROB = 1, SPACE_SCORE = 2 };

/* What a scored router's bins are taken on (reference.score_bins): the score (a logit),
 * its log (a probability), or 4 x the score (a sigmoid, maybe plus a bias): 4 is
 * constants.SCORE_BINS_PER_UNIT. */
static inline double ranked_score(float v, int space) {
  return space == SPACE_PROB ? log((double)v) : space == SPACE_SCORE ? 4.0 * (double)v : (double)v;
}

/* A scored router's bins of one valid row (reference.score_bins): they hang from the row's
 * largest finite ranked score; a non-finite one (-inf, log of 0) gets MIN_BIN and never
 * votes. `ranked` is scratch for e doubles. */
static void scored_row_bins(const float *row, int64_t e, int space, double alpha,
                            double floor_q, double *ranked, int64_t *q) {
  double mx = -INFINITY;
  for (int64_t j = 0; j < e; ++j) {
    ranked[j] = ranked_score(row[j], space);
    if (isfinite(ranked[j]) && ranked[j] > mx) mx = ranked[j];
  }
  for (int64_t j = 0; j < e; ++j) {
    if (!isfinite(ranked[j])) {
      q[j] = MIN_BIN;
      continue;
    }
    double c = ceil(alpha * (ranked[j] - mx));
    c = c != c ? 0.0 : c;
    c = c < floor_q ? floor_q : c;
    q[j] = (int64_t)(c > 0.0 ? 0.0 : c);
  }
}

/* Both routers' AffinityBinning: `binned` [n, e] is what the bins and validity are taken
 * on (softmax routers: the logits, SPACE_SOFTMAX; scored ones: the scores, in `space`), `f`
 * what ranks after the bins (the probabilities, or the scores). */
static int64_t affinity_route(const float *binned, const float *f, int space,
                              const int64_t *exact_ids, int64_t n, int64_t e, int64_t k,
                              double alpha, double beta, int64_t k0, int64_t *ids,
                              uint8_t *same) {
  if (n == 1) { /* a batch of one token routes exactly: nothing to share */
    memcpy(ids, exact_ids, sizeof(int64_t) * (size_t)k);
    same[0] = 1;
    return k;
  }
  route_scratch s;
  if (scratch_alloc(&s, n, e)) return -1;
  const double floor_q = beta < 0 ? (double)MIN_BIN : -floor(beta);
  double *ranked = (double *)s.pop; /* scratch until the popularity key is built */
  for (int64_t t = 0; t < n; ++t) {
    const float *row = binned + t * e;
    int64_t *qt = s.q + t * e;
    /* Rows that may be remapped: finite maximum, no NaN. */
    float mx = row_max(row, e, &s.valid[t]);
    if (!s.valid[t]) {
      memset(qt, 0, sizeof(int64_t) * (size_t)e);
    } else if (space == SPACE_SOFTMAX) {
      row_bins(row, e, alpha, (double)mx, floor_q, qt);
    } else {
      scored_row_bins(row, e, space, alpha, floor_q, ranked, qt);
    }
  }
  const int scored = space != SPACE_SOFTMAX;
  int64_t kept = affinity_after_bins(&s, f, binned, exact_ids, n, e, k, beta, k0, scored, ids, same);
  free(s.q);
  return kept;
}

/* Affinity routing for n tokens over e experts (reference.route_reference, policy
 * "affinity", everything after the softmax and the model's top-k):
 *   logits, probs  [n, e] float32 (exact conversions of the model's dtype)
 *   exact_ids      [n, k] int64, the model's own top-k (best first, ties to the lower index)
 *   k0             each token's own top-k0 (exact_ids' first k0) always chosen (0: none)
 *   ids (out)      [n, k] int64, final experts (exact_ids where the set is unchanged)
 *   same (out)     [n] uint8, 1 where the token keeps its exact experts
 *   beta < 0 means no floor on the bins.
 * Callers keep 1 <= k <= e and exact_ids in [0, e) (lynx_topk_rows' output). Returns the
 * number of experts in the batch's kept set, or -1 when out of memory.
 */
int64_t lynx_affinity_ids(const float *logits, const float *probs, const int64_t *exact_ids,
                          int64_t n, int64_t e, int64_t k, double alpha, double beta,
                          int64_t k0, int64_t *ids, uint8_t *same) {
  return affinity_route(logits, probs, SPACE_SOFTMAX, exact_ids, n, e, k, alpha, beta, k0, ids,
                        same);
}

/* Affinity routing of a scored router (reference.route_scored_reference, policy "affinity",
 * everything after the model's top-k):
 *   scores     [n, e] float32 (exact conversions of the model's dtype)
 *   space      SPACE_LOGIT, SPACE_PROB or SPACE_SCORE: what the bins are taken on
 * and the rest as lynx_affinity_ids, the scores ranking where the probabilities do there. */
int64_t lynx_scored_affinity_ids(const float *scores, const int64_t *exact_ids, int64_t n,
                                 int64_t e, int64_t k, int space, double alpha, double beta,
                                 int64_t k0, int64_t *ids, uint8_t *same) {
  return affinity_route(scores, scores, space, exact_ids, n, e, k, alpha, beta, k0, ids, same);
}

/* ------------------------------------------------------------------ sparse experts */

/* constants.ACTIVATION_NAMES' codes, in the order they were added: elementwise ones, and
 * ACT_SWIGLU_CLAMPED, gated with a combine of its own (see swiglu_clamped below).
 * ACT_RELU2 is relu(v)**2 (NemotronH), its square rounded once as torch.square does. */
enum {
  ACT_SILU = 0,
  ACT_GELU = 1,
  ACT_GELU_TANH = 2,
  ACT_RELU = 3,
  ACT_SWIGLU_CLAMPED = 4,
  ACT_RELU2 = 5
};

static inline float act_fn(float v, int act) {
  switch (act) {
    case ACT_SILU: return v / (1.0f + expf(-v));
    case ACT_GELU: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case ACT_GELU_TANH: {
      float inner = 0.79788456080286536f * (v + 0.044715f * v * v * v);
      return 0.5f * v * (1.0f + tanhf(inner));
    }
    case ACT_RELU2: return v > 0.0f ? v * v : 0.0f;
    default: return v > 0.0f ? v : 0.0f;
  }
}

static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static inline float round_bf16(float f) { /* round to nearest even, as torch does */
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if (isnan(f)) return f;
  u += 0x7FFFu + ((u >> 16) & 1u);
  u &= 0xFFFF0000u;
  memcpy(&f, &u, sizeof f);
  return f;
}

/* reference.swiglu_clamped for one element (GPT-OSS): g clamped above and u on both sides
 * at limit (+inf: unclamped; NaN passes as in torch.clamp), then (u + 1) * g * sigmoid(alpha
 * g); round_mid rounds each intermediate to bf16 where the bf16 model rounds it. */
static inline float swiglu_clamped(float g, float u, float alpha, float limit, int round_mid) {
  g = g > limit ? limit : g;
  u = u > limit ? limit : (u < -limit ? -limit : u);
  float ga = g * alpha;
  if (round_mid) ga = round_bf16(ga);
  float sg = 1.0f / (1.0f + expf(-ga));
  if (round_mid) sg = round_bf16(sg);
  float glu = g * sg, u1 = u + 1.0f;
  if (round_mid) glu = round_bf16(glu), u1 = round_bf16(u1);
  return u1 * glu;
}

/* 1: bf16 weights on the portable path go through matmul_rows_pairs (cpu v15);
 * -DLYNX_BF16_PAIRS=0 keeps load_w's widening there, for measuring the two. */
#ifndef LYNX_BF16_PAIRS
#define LYNX_BF16_PAIRS 1
#endif
#if defined(LYNX_AVX512) || !LYNX_BF16_PAIRS
#define PAIRS 0
#else
#define PAIRS 1
#endif

/* 8-float vectors (GCC/Clang vector extensions: AVX2 or AVX-512 under -march=native,
 * plain SSE or scalar code elsewhere). aligned(4): loads from any float address. */
typedef float vf __attribute__((vector_size(32), aligned(4)));
typedef uint16_t vh __attribute__((vector_size(16), aligned(2)));
typedef uint32_t vu __attribute__((vector_size(32)));
#define VL 8

static inline __attribute__((always_inline)) vf load_w(const void *w, int64_t off, int dt) {
  if (dt == 0) return *(const vf *)((const float *)w + off);
  vu bits = __builtin_convertvector(*(const vh *)((const uint16_t *)w + off), vu) << 16;
  vf f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

static inline float load_w1(const void *w, int64_t off, int dt) {
  return dt == 0 ? ((const float *)w)[off] : bf16_to_f32(((const uint16_t *)w)[off]);
}

#if defined(__clang__)
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int32_t vi __attribute__((vector_size(32)));
#define SHUF(a, b, ...) __builtin_shuffle(a, b, (vi){__VA_ARGS__})
#endif

/* The 8 lane sums of a0..a7 as one vector, [sum a0, sum a2, sum a1, sum a3, sum a4,
 * sum a6, sum a5, sum a7] (callers pass their accumulators in that order to get them in
 * order): a transpose-and-add tree, 14 shuffles and 7 adds for 8 dot products. */
static inline __attribute__((always_inline)) vf reduce8(vf a0, vf a1, vf a2, vf a3, vf a4,
                                                        vf a5, vf a6, vf a7) {
  vf t0 = SHUF(a0, a1, 0, 1, 2, 3, 8, 9, 10, 11) + SHUF(a0, a1, 4, 5, 6, 7, 12, 13, 14, 15);
  vf t1 = SHUF(a2, a3, 0, 1, 2, 3, 8, 9, 10, 11) + SHUF(a2, a3, 4, 5, 6, 7, 12, 13, 14, 15);
  vf t2 = SHUF(a4, a5, 0, 1, 2, 3, 8, 9, 10, 11) + SHUF(a4, a5, 4, 5, 6, 7, 12, 13, 14, 15);
  vf t3 = SHUF(a6, a7, 0, 1, 2, 3, 8, 9, 10, 11) + SHUF(a6, a7, 4, 5, 6, 7, 12, 13, 14, 15);
  vf u0 = SHUF(t0, t1, 0, 1, 8, 9, 4, 5, 12, 13) + SHUF(t0, t1, 2, 3, 10, 11, 6, 7, 14, 15);
  vf u1 = SHUF(t2, t3, 0, 1, 8, 9, 4, 5, 12, 13) + SHUF(t2, t3, 2, 3, 10, 11, 6, 7, 14, 15);
  return SHUF(u0, u1, 0, 2, 4, 6, 8, 10, 12, 14) + SHUF(u0, u1, 1, 3, 5, 7, 9, 11, 13, 15);
}

static inline float hsum(vf v) {
  float s = 0.0f;
  for (int l = 0; l < VL; ++l) s += v[l];
  return s;
}

/* out[t * ostride + r] = the lane sum of acc[t][r] plus the columns c0..len-1 in scalar
 * code, for the vector blocks below (8 rows: one transpose-and-add tree). */
static inline __attribute__((always_inline)) void store_rows(const int TB, const int RB,
                                                             vf acc[3][8], const float *const *x,
                                                             const void *w, int64_t r0,
                                                             int64_t c0, int64_t len, int64_t ld,
                                                             int dt, float *out,
                                                             int64_t ostride) {
  for (int t = 0; t < TB; ++t) {
    if (RB == 8) {
      vf *a = acc[t];
      vf sums = reduce8(a[0], a[2], a[1], a[3], a[4], a[6], a[5], a[7]);
      memcpy(out + t * ostride, &sums, sizeof sums);
    } else {
      for (int r = 0; r < RB; ++r) out[t * ostride + r] = hsum(acc[t][r]);
    }
    for (int r = 0; r < RB; ++r)
      for (int64_t cc = c0; cc < len; ++cc)
        out[t * ostride + r] += x[t][cc] * load_w1(w, (r0 + r) * ld + cc, dt);
  }
}

/* out[t * ostride + r] = dot(x[t], w[r0 + r]) for TB tokens and RB (8 or 1) weight rows of
 * length len, ld elements apart: each weight vector is loaded once for all TB tokens, with TB*RB vector
 * accumulators. Always inlined with constant TB and RB so they stay in registers. */
static inline __attribute__((always_inline)) void block(const int TB, const int RB,
                                                        const float *const *x, const void *w,
                                                        int64_t r0, int64_t len, int64_t ld,
                                                        int dt, float *out, int64_t ostride) {
  vf acc[3][8];
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < RB; ++r) acc[t][r] = (vf){0};
  int64_t c = 0;
  for (; c + VL <= len; c += VL) {
    vf xv[3];
    for (int t = 0; t < TB; ++t) xv[t] = *(const vf *)(x[t] + c);
    for (int r = 0; r < RB; ++r) {
      vf wv = load_w(w, (r0 + r) * ld + c, dt);
      for (int t = 0; t < TB; ++t) acc[t][r] += xv[t] * wv;
    }
  }
  store_rows(TB, RB, acc, x, w, r0, c, len, ld, dt, out, ostride);
}

#ifdef LYNX_AVX512
/* AVX-512 path: 16-float vectors, 32 registers (24 accumulators fit), masked loads for the
 * vector tail (no scalar loop) and a 16-lane transpose-and-add tree. */

static inline __attribute__((always_inline)) __m512 load16(const void *w, int64_t off, int dt,
                                                           __mmask16 m) {
  if (dt == 0) return _mm512_maskz_loadu_ps(m, (const float *)w + off);
  __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)w + off);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* The 8 lane sums of a0..a7 in order: 128-bit block shuffles twice, then within blocks,
 * 16 shuffles and 8 adds for 8 dot products. */
static inline __attribute__((always_inline)) __m256 reduce8z(__m512 a0, __m512 a1, __m512 a2,
                                                             __m512 a3, __m512 a4, __m512 a5,
                                                             __m512 a6, __m512 a7) {
  /* [a(0+2), a(1+3), b(0+2), b(1+3)] in 128-bit blocks */
#define PAIR(a, b) _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE))
  __m512 t01 = PAIR(a0, a1), t23 = PAIR(a2, a3), t45 = PAIR(a4, a5), t67 = PAIR(a6, a7);
#undef PAIR
  /* one 4-lane partial per block: [a0, a1, a2, a3] and [a4, a5, a6, a7] */
  __m512 u0 = _mm512_add_ps(_mm512_shuffle_f32x4(t01, t23, 0x88), _mm512_shuffle_f32x4(t01, t23, 0xDD));
  __m512 u1 = _mm512_add_ps(_mm512_shuffle_f32x4(t45, t67, 0x88), _mm512_shuffle_f32x4(t45, t67, 0xDD));
  /* block l: [a_l pair, a_l pair, a_{l+4} pair, a_{l+4} pair] */
  __m512 v = _mm512_add_ps(_mm512_shuffle_ps(u0, u1, 0x44), _mm512_shuffle_ps(u0, u1, 0xEE));
  v = _mm512_add_ps(v, _mm512_permute_ps(v, 0xB1)); /* block l: [a_l, a_l, a_l+4, a_l+4] */
  const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps256(_mm512_permutexvar_ps(idx, v));
}

/* out[t * ostride + r] = dot(x[t], w[r0 + r]) for TB tokens and RB (8 or 1) rows of length
 * len, ld elements apart, stored straight into the caller's output rows. */
static inline __attribute__((always_inline)) void blockz(const int TB, const int RB,
                                                         const float *const *x, const void *w,
                                                         int64_t r0, int64_t len, int64_t ld,
                                                         int dt, float *out, int64_t ostride) {
  __m512 acc[3][8];
  const float *xp[3];
  for (int t = 0; t < TB; ++t) {
    xp[t] = x[t];
    for (int r = 0; r < RB; ++r) acc[t][r] = _mm512_setzero_ps();
  }
  const __mmask16 all = 0xFFFF;
  int64_t c = 0;
  for (; c + 16 <= len; c += 16) {
    __m512 xv[3];
    for (int t = 0; t < TB; ++t) xv[t] = _mm512_loadu_ps(xp[t] + c);
    for (int r = 0; r < RB; ++r) {
      __m512 wv = load16(w, (r0 + r) * ld + c, dt, all);
      /* Keep the weight vector in a register for the TB FMAs: left alone, GCC folds the
       * load into every FMA (TB loads of it; 11-22% slower at 1-8 tokens per expert). */
      __asm__("" : "+v"(wv));
      for (int t = 0; t < TB; ++t) acc[t][r] = _mm512_fmadd_ps(xv[t], wv, acc[t][r]);
    }
  }
  if (c < len) {
    __mmask16 m = (__mmask16)((1u << (len - c)) - 1u);
    __m512 xv[3];
    for (int t = 0; t < TB; ++t) xv[t] = _mm512_maskz_loadu_ps(m, xp[t] + c);
    for (int r = 0; r < RB; ++r) {
      __m512 wv = load16(w, (r0 + r) * ld + c, dt, m);
      for (int t = 0; t < TB; ++t) acc[t][r] = _mm512_fmadd_ps(xv[t], wv, acc[t][r]);
    }
  }
  for (int t = 0; t < TB; ++t) {
    if (RB == 8) {
      __m512 *a = acc[t];
      __m256 sums = reduce8z(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]);
      _mm256_storeu_ps(out + t * ostride, sums);
    } else {
      out[t * ostride] = _mm512_reduce_add_ps(acc[t][0]);
    }
  }
}


/* The 4 lane sums of a0..a3 in order: halves added, then two rounds of pairwise adds. */
static inline __attribute__((always_inline)) __m128 reduce4z(__m512 a0, __m512 a1, __m512 a2,
                                                             __m512 a3) {
#define HALF(a) _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1))
  __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(HALF(a0), HALF(a1)), _mm256_hadd_ps(HALF(a2), HALF(a3)));
#undef HALF
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* blockbf4 for float32 weights and tokens (MODE_F32): TB (1 to 6) tokens against RB (4 or
 * 1) rows in column order, 16 weights per fused multiply-add, the next rows (pfw, or NULL)
 * prefetched into L2 at the same column, one block ahead. */
static inline __attribute__((always_inline)) void blockf4(const int TB, const int RB,
                                                          const float *const *x, const float *w,
                                                          int64_t r0, int64_t len, int64_t ld,
                                                          float *out, int64_t ostride,
                                                          const float *pfw) {
  __m512 acc[6][4];
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < RB; ++r) acc[t][r] = _mm512_setzero_ps();
  const float *wr = w + r0 * ld;
  int64_t c = 0;
  for (; c + 16 <= len; c += 16) {
    if (pfw)
      for (int r = 0; r < RB; ++r) _mm_prefetch((const char *)(pfw + r * ld + c), _MM_HINT_T1);
    __m512 wv[4];
    for (int r = 0; r < RB; ++r) wv[r] = _mm512_loadu_ps(wr + r * ld + c);
    for (int t = 0; t < TB; ++t) {
      __m512 xv = _mm512_loadu_ps(x[t] + c);
      for (int r = 0; r < RB; ++r) acc[t][r] = _mm512_fmadd_ps(xv, wv[r], acc[t][r]);
    }
  }
  if (c < len) {
    const __mmask16 m = (__mmask16)((1u << (len - c)) - 1u);
    __m512 wv[4];
    for (int r = 0; r < RB; ++r) wv[r] = _mm512_maskz_loadu_ps(m, wr + r * ld + c);
    for (int t = 0; t < TB; ++t) {
      __m512 xv = _mm512_maskz_loadu_ps(m, x[t] + c);
      for (int r = 0; r < RB; ++r) acc[t][r] = _mm512_fmadd_ps(xv, wv[r], acc[t][r]);
    }
  }
  for (int t = 0; t < TB; ++t) {
    if (RB == 4)
      _mm_storeu_ps(out + t * ostride, reduce4z(acc[t][0], acc[t][1], acc[t][2], acc[t][3]));
    else
      out[t * ostride] = _mm512_reduce_add_ps(acc[t][0]);
  }
}

/* y[t * rows + r] = dot(x[t], w[r]) for m tokens of type T against every row of w, through
 * BLOCK (blockf4 or blockbf4): 4-row groups, the tokens in near-equal blocks of 1 to 6, the
 * first block's pass prefetching the next group (later blocks find it in L1/L2). */
#define COLUMN_DRIVER(NAME, T, BLOCK)                                                          \
  static void NAME(const T *const *x, int64_t m, const T *w, int64_t rows, int64_t len,       \
                   int64_t ld, float *y) {                                                    \
    const int64_t nb = (m + 5) / 6, base = m / nb, extra = m % nb;                             \
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {                                                 \
      const int rb = r0 + 4 <= rows ? 4 : 1;                                                   \
      const int64_t rend = rb == 4 ? r0 + 4 : rows;                                            \
      const T *pfw = rend + 4 <= rows ? w + rend * ld : NULL;                                  \
      int64_t t0 = 0;                                                                          \
      for (int64_t b = 0; b < nb; ++b) {                                                       \
        const int64_t tb = base + (b < extra);                                                 \
        const T *const *xt = x + t0;                                                           \
        for (int64_t r = r0; r < rend; r += rb) {                                              \
          float *o = y + t0 * rows + r;                                                        \
          const T *p = b == 0 && rb == 4 ? pfw : NULL;                                         \
          switch (tb * 16 + rb) { /* constant shapes: accumulators stay in registers */       \
            case 6 * 16 + 4: BLOCK(6, 4, xt, w, r, len, ld, o, rows, p); break;                \
            case 5 * 16 + 4: BLOCK(5, 4, xt, w, r, len, ld, o, rows, p); break;                \
            case 4 * 16 + 4: BLOCK(4, 4, xt, w, r, len, ld, o, rows, p); break;                \
            case 3 * 16 + 4: BLOCK(3, 4, xt, w, r, len, ld, o, rows, p); break;                \
            case 2 * 16 + 4: BLOCK(2, 4, xt, w, r, len, ld, o, rows, p); break;                \
            case 1 * 16 + 4: BLOCK(1, 4, xt, w, r, len, ld, o, rows, p); break;                \
            case 6 * 16 + 1: BLOCK(6, 1, xt, w, r, len, ld, o, rows, NULL); break;             \
            case 5 * 16 + 1: BLOCK(5, 1, xt, w, r, len, ld, o, rows, NULL); break;             \
            case 4 * 16 + 1: BLOCK(4, 1, xt, w, r, len, ld, o, rows, NULL); break;             \
            case 3 * 16 + 1: BLOCK(3, 1, xt, w, r, len, ld, o, rows, NULL); break;             \
            case 2 * 16 + 1: BLOCK(2, 1, xt, w, r, len, ld, o, rows, NULL); break;             \
            default: BLOCK(1, 1, xt, w, r, len, ld, o, rows, NULL); break;                     \
          }                                                                                    \
        }                                                                                      \
        t0 += tb;                                                                              \
      }                                                                                        \
    }                                                                                          \
  }

/* float32 tokens and weights (MODE_F32). */
COLUMN_DRIVER(matmul_rows_f32_many, float, blockf4)

#if defined(__AVX512BF16__)
#define LYNX_BF16DOT 1
/* blockz for bf16 tokens and weights with AVX512-BF16 dot products: each vdpbf16ps takes 32
 * weights straight from memory (no widening) and adds pairs of exact bf16 x bf16 products
 * into 16 float lanes, twice blockz's multiply-adds per instruction and a quarter of its
 * uops per weight byte. matmul_rows_dt calls it for one token only: two or more take
 * matmul_rows_bf_many's 4-row column blocks with prefetch (cpu v12). */
static inline __attribute__((always_inline)) void blockbf(const int TB, const int RB,
                                                          const uint16_t *const *x,
                                                          const uint16_t *w, int64_t r0,
                                                          int64_t len, int64_t ld, float *out,
                                                          int64_t ostride) {
  __m512 acc[3][8];
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < RB; ++r) acc[t][r] = _mm512_setzero_ps();
  /* Row by row: the 8 rows are one contiguous run of memory, walked in address order, one
   * stream for the hardware prefetcher (8-row column order walks 8 streams that each end
   * at a page; Zen 4 streamed 14 GB/s that way, 23 GB/s this way); two accumulators per
   * token halve the dependency chains. */
  const int64_t full = len & ~(int64_t)63;
  const __mmask32 m = (__mmask32)((1ull << (len & 31)) - 1ull);
  for (int r = 0; r < RB; ++r) {
    const uint16_t *wr = w + (r0 + r) * ld;
    __m512 acc2[3];
    for (int t = 0; t < TB; ++t) acc2[t] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c < full; c += 64) {
      __m512i w0 = _mm512_loadu_si512(wr + c), w1 = _mm512_loadu_si512(wr + c + 32);
      for (int t = 0; t < TB; ++t) {
        acc[t][r] = _mm512_dpbf16_ps(acc[t][r], (__m512bh)_mm512_loadu_si512(x[t] + c), (__m512bh)w0);
        acc2[t] = _mm512_dpbf16_ps(acc2[t], (__m512bh)_mm512_loadu_si512(x[t] + c + 32), (__m512bh)w1);
      }
    }
    if (c + 32 <= len) {
      __m512i w0 = _mm512_loadu_si512(wr + c);
      for (int t = 0; t < TB; ++t)
        acc[t][r] = _mm512_dpbf16_ps(acc[t][r], (__m512bh)_mm512_loadu_si512(x[t] + c), (__m512bh)w0);
      c += 32;
    }
    if (c < len) {
      __m512i w0 = _mm512_maskz_loadu_epi16(m, wr + c);
      for (int t = 0; t < TB; ++t)
        acc2[t] = _mm512_dpbf16_ps(acc2[t], (__m512bh)_mm512_maskz_loadu_epi16(m, x[t] + c), (__m512bh)w0);
    }
    for (int t = 0; t < TB; ++t) acc[t][r] = _mm512_add_ps(acc[t][r], acc2[t]);
  }
  for (int t = 0; t < TB; ++t) {
    if (RB == 8) {
      __m512 *a = acc[t];
      _mm256_storeu_ps(out + t * ostride, reduce8z(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]));
    } else {
      out[t * ostride] = _mm512_reduce_add_ps(acc[t][0]);
    }
  }
}

/* Two to six tokens (TB) against RB (4 or 1) rows in column order: each 32-weight vector
 * feeds TB dot products, each token vector RB of them (TB * RB <= 24 accumulators, in
 * registers). Column order walks RB rows at once, streams the hardware prefetcher trains on
 * too late at decode lengths, so pfw (or NULL) names the rows read after these: each
 * iteration prefetches their line at the same column into L2, one block ahead. On Zen 4 from
 * DRAM, 1 thread, 4 to 6 tokens: 17-21 GB/s against 9-10 for 8-row blocks of 3 tokens and
 * the rest (cpu v12 in docs/perf-notes.md). */
static inline __attribute__((always_inline)) void blockbf4(const int TB, const int RB,
                                                           const uint16_t *const *x,
                                                           const uint16_t *w, int64_t r0,
                                                           int64_t len, int64_t ld, float *out,
                                                           int64_t ostride, const uint16_t *pfw) {
  __m512 acc[6][4];
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < RB; ++r) acc[t][r] = _mm512_setzero_ps();
  const uint16_t *wr = w + r0 * ld;
  int64_t c = 0;
  for (; c + 32 <= len; c += 32) {
    if (pfw)
      for (int r = 0; r < RB; ++r) _mm_prefetch((const char *)(pfw + r * ld + c), _MM_HINT_T1);
    __m512i wv[4];
    for (int r = 0; r < RB; ++r) wv[r] = _mm512_loadu_si512(wr + r * ld + c);
    for (int t = 0; t < TB; ++t) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(x[t] + c);
      for (int r = 0; r < RB; ++r) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], xv, (__m512bh)wv[r]);
    }
  }
  if (c < len) {
    const __mmask32 m = (__mmask32)((1ull << (len - c)) - 1ull);
    __m512i wv[4];
    for (int r = 0; r < RB; ++r) wv[r] = _mm512_maskz_loadu_epi16(m, wr + r * ld + c);
    for (int t = 0; t < TB; ++t) {
      __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x[t] + c);
      for (int r = 0; r < RB; ++r) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], xv, (__m512bh)wv[r]);
    }
  }
  for (int t = 0; t < TB; ++t) {
    if (RB == 4)
      _mm_storeu_ps(out + t * ostride, reduce4z(acc[t][0], acc[t][1], acc[t][2], acc[t][3]));
    else
      out[t * ostride] = _mm512_reduce_add_ps(acc[t][0]);
  }
}

/* bf16 tokens and weights (MODE_BF16DOT), two tokens or more (one streams row by row). */
COLUMN_DRIVER(matmul_rows_bf_many, uint16_t, blockbf4)
#endif

/* exp(v) for 16 lanes: v = n ln2 + r with |r| <= ln2/2 (ln2 in two parts), a degree-6
 * polynomial for exp(r) (relative error ~2e-7, as glibc's expf within float tolerance) and
 * scalef for 2**n, which gives inf and 0 past float's range; NaN stays NaN. */
static inline __m512 exp16(__m512 v) {
  v = _mm512_max_ps(_mm512_min_ps(v, _mm512_set1_ps(100.0f)), _mm512_set1_ps(-110.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), v);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.3981999507e-3f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

/* round to bf16 (nearest even) per lane, NaN kept: round_bf16 for 16 lanes */
static inline __m512 round_bf16_16(__m512 f) {
  __m512i u = _mm512_castps_si512(f);
  __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  r = _mm512_and_si512(r, _mm512_set1_epi32((int)0xFFFF0000u));
  __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  return _mm512_mask_blend_ps(nan, _mm512_castsi512_ps(r), f);
}

/* act_fn for 16 lanes (silu, gelu_tanh, relu, relu2; erf's gelu returns 0: callers use
 * scalars) */
static inline __m512 act16(__m512 v, int act) {
  const __m512 one = _mm512_set1_ps(1.0f);
  switch (act) {
    case ACT_SILU: return _mm512_div_ps(v, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), v))));
    case ACT_GELU_TANH: {
      __m512 v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
      __m512 inner = _mm512_mul_ps(_mm512_set1_ps(0.79788456080286536f),
                                   _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), v3, v));
      /* 1 + tanh(z) = 2 - 2 / (exp(2z) + 1) */
      __m512 e2 = exp16(_mm512_add_ps(inner, inner));
      __m512 t1 = _mm512_sub_ps(_mm512_set1_ps(2.0f),
                                _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e2, one)));
      return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v), t1);
    }
    case ACT_RELU: return _mm512_max_ps(v, _mm512_setzero_ps());
    case ACT_RELU2: {
      __m512 r = _mm512_max_ps(v, _mm512_setzero_ps());
      return _mm512_mul_ps(r, r);
    }
    default: return _mm512_setzero_ps();
  }
}
#endif

#ifdef LYNX_AVX512
#define BLOCK blockz
#else
#define BLOCK block
#endif

/* The kernel's three ways of computing: MODE_F32 (float32 weights), MODE_BF16 (bf16 weights
 * widened to float32 against float32 tokens) and MODE_BF16DOT (bf16 tokens and weights in
 * AVX512-BF16 dot products; only where the build has them). */
enum { MODE_F32 = 0, MODE_BF16 = 1, MODE_BF16DOT = 2 };

static inline __attribute__((always_inline)) void block_mode(const int mode, const int TB,
                                                             const int RB, const void *const *x,
                                                             const void *w, int64_t r0,
                                                             int64_t len, int64_t ld, float *out,
                                                             int64_t ostride) {
#ifdef LYNX_BF16DOT
  if (mode == MODE_BF16DOT) {
    blockbf(TB, RB, (const uint16_t *const *)x, (const uint16_t *)w, r0, len, ld, out, ostride);
    return;
  }
#endif
  BLOCK(TB, RB, (const float *const *)x, w, r0, len, ld, mode, out, ostride);
}

/* Software prefetch of the weights, PF_AHEAD bytes ahead of the kernel, over the touched
 * experts' matrices in the order it reads them (the hardware streamer stops at each 4 KB
 * page and at each matrix; at decode sizes one block's dot products are too short to hide
 * a cache miss). */
#define PF_AHEAD 8192
typedef struct {
  const char **ptr; /* segment starts */
  size_t *len;      /* segment bytes */
  int64_t nseg, seg;
  size_t off;
} pf_stream;

static inline void pf_run(pf_stream *p, size_t bytes) {
  while (bytes > 0 && p->seg < p->nseg) {
    size_t left = p->len[p->seg] - p->off, take = left < bytes ? left : bytes;
    const char *base = p->ptr[p->seg] + p->off;
    for (size_t o = 0; o < take; o += 64) __builtin_prefetch(base + o, 0, 3);
    p->off += take, bytes -= take;
    if (p->off == p->len[p->seg]) p->seg++, p->off = 0;
  }
}

/* y[t * rows + r] = dot(x[t], w[r]) for m tokens and all rows of w [rows, len] (rows ld
 * elements apart): the weight matrix is streamed once (8 rows at a time, kept in L1 while
 * every token uses them). x[t] are float32 rows, or bf16 rows in MODE_BF16DOT. */
static inline __attribute__((always_inline)) void matmul_rows_dt(
    const void *const *x, int64_t m, const void *w, int64_t rows, int64_t len, int64_t ld,
    const int mode, float *y, pf_stream *pf) {
#ifdef LYNX_AVX512
  if (mode == MODE_F32) {
    matmul_rows_f32_many((const float *const *)x, m, (const float *)w, rows, len, ld, y);
    return;
  }
#endif
#ifdef LYNX_BF16DOT
  if (mode == MODE_BF16DOT && m >= 2) {
    matmul_rows_bf_many((const uint16_t *const *)x, m, (const uint16_t *)w, rows, len, ld, y);
    return;
  }
#endif
  size_t esz = mode == MODE_F32 ? sizeof(float) : sizeof(uint16_t);
  const int64_t blocks = (m + 2) / 3; /* token blocks per row group */
  for (int64_t r0 = 0; r0 < rows; r0 += 8) {
    int full = r0 + 8 <= rows;
    /* This group's bytes, prefetched in one share per token block: one burst per group
     * filled the line-fill buffers and stalled the core (~10% slower at 8 tokens). */
    const size_t group = (size_t)((full ? 8 : rows - r0) * ld) * esz;
    const size_t share = group / (size_t)blocks;
    for (int64_t t0 = 0; t0 < m; t0 += 3) {
      pf_run(pf, t0 + 3 < m ? share : group - share * (size_t)(blocks - 1));
      int64_t tb = m - t0 < 3 ? m - t0 : 3;
      const void *const *xt = x + t0;
      int rb = full ? 8 : 1;
      for (int64_t r = r0; r < (full ? r0 + 8 : rows); r += rb) {
        float *o = y + t0 * rows + r;
        switch (tb * 16 + rb) { /* constant block shapes, so accumulators stay in registers */
          case 3 * 16 + 8: block_mode(mode, 3, 8, xt, w, r, len, ld, o, rows); break;
          case 2 * 16 + 8: block_mode(mode, 2, 8, xt, w, r, len, ld, o, rows); break;
          case 1 * 16 + 8: block_mode(mode, 1, 8, xt, w, r, len, ld, o, rows); break;
          case 3 * 16 + 1: block_mode(mode, 3, 1, xt, w, r, len, ld, o, rows); break;
          case 2 * 16 + 1: block_mode(mode, 2, 1, xt, w, r, len, ld, o, rows); break;
          default: block_mode(mode, 1, 1, xt, w, r, len, ld, o, rows); break;
        }
      }
    }
  }
}

#if PAIRS
/* MODE_BF16 on the portable path (AVX2 and older: no AVX-512): 16 bf16 weights per 32-byte
 * load, widened without shuffles: in each 32-bit lane, bits << 16 is the even column as a
 * float32 and bits & 0xffff0000 the odd one. Each token's row is deinterleaved to match
 * once per matrix (xp: per 16 columns, the 8 even ones then the 8 odd ones), so a weight
 * pair costs a load, two integer ops and two multiply-adds, where load_w's widening took
 * three shuffles per 8 weights (cpu v15: on Zen 3 the shuffles, not DRAM, bounded it).
 * The sums are float32 as before, in another order. */
typedef uint32_t vu2 __attribute__((vector_size(32), aligned(2)));

static inline __attribute__((always_inline)) void blockp(const int TB, const int RB,
                                                         const float *const *xp,
                                                         const float *const *x,
                                                         const uint16_t *w, int64_t r0,
                                                         int64_t len, int64_t ld, float *out,
                                                         int64_t ostride, const uint16_t *pfw) {
  vf acc[3][8];
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < RB; ++r) acc[t][r] = (vf){0};
  const int64_t n16 = len & ~(int64_t)15;
  const uint16_t *wr = w + r0 * ld;
  for (int64_t c = 0; c < n16; c += 16) {
    if (pfw && (c & 31) == 0)
      for (int r = 0; r < RB; ++r) __builtin_prefetch(pfw + r * ld + c, 0, 2);
    for (int r = 0; r < RB; ++r) {
      const vu2 bits = *(const vu2 *)(wr + r * ld + c);
      const vu lo = bits << 16, hi = bits & 0xffff0000u;
      vf we, wo;
      memcpy(&we, &lo, sizeof we);
      memcpy(&wo, &hi, sizeof wo);
      for (int t = 0; t < TB; ++t) {
        acc[t][r] += *(const vf *)(xp[t] + c) * we;
        acc[t][r] += *(const vf *)(xp[t] + c + 8) * wo;
      }
    }
  }
  store_rows(TB, RB, acc, x, w, r0, n16, len, ld, 1, out, ostride);
}

/* y[t * rows + r] = dot(x[t], w[r]) for m float32 tokens against every bf16 row of w
 * through blockp: 8-row groups (one token: 8 rows at once; two or three: two 4-row halves,
 * so the accumulators fit AVX2's 16 registers), tokens in blocks of up to 3, the first
 * block's pass prefetching the next group at the same column. xp: m * len floats. */
static void matmul_rows_pairs(const float *const *x, int64_t m, const uint16_t *w, int64_t rows,
                              int64_t len, int64_t ld, float *y, float *xp) {
  const int64_t n16 = len & ~(int64_t)15;
  for (int64_t t = 0; t < m; ++t) {
    float *dst = xp + t * len;
    for (int64_t c = 0; c < n16; c += 16)
      for (int j = 0; j < 8; ++j) dst[c + j] = x[t][c + 2 * j], dst[c + 8 + j] = x[t][c + 2 * j + 1];
  }
  for (int64_t r0 = 0; r0 < rows; r0 += 8) {
    const int full = r0 + 8 <= rows;
    const uint16_t *pfw = full && r0 + 16 <= rows ? w + (r0 + 8) * ld : NULL;
    for (int64_t t0 = 0; t0 < m; t0 += 3) {
      const int tb = m - t0 < 3 ? (int)(m - t0) : 3;
      const float *xt[3], *xpt[3];
      for (int t = 0; t < tb; ++t) xt[t] = x[t0 + t], xpt[t] = xp + (t0 + t) * len;
      const uint16_t *pf = t0 == 0 ? pfw : NULL;
      float *o = y + t0 * rows + r0;
      if (!full) {
        for (int64_t r = r0; r < rows; ++r, ++o) {
          switch (tb) {
            case 3: blockp(3, 1, xpt, xt, w, r, len, ld, o, rows, NULL); break;
            case 2: blockp(2, 1, xpt, xt, w, r, len, ld, o, rows, NULL); break;
            default: blockp(1, 1, xpt, xt, w, r, len, ld, o, rows, NULL); break;
          }
        }
      } else if (tb == 1) {
        blockp(1, 8, xpt, xt, w, r0, len, ld, o, rows, pf);
      } else {
        for (int h = 0; h < 8; h += 4) {
          const uint16_t *ph = pf ? pf + h * ld : NULL;
          if (tb == 3) blockp(3, 4, xpt, xt, w, r0 + h, len, ld, o + h, rows, ph);
          else blockp(2, 4, xpt, xt, w, r0 + h, len, ld, o + h, rows, ph);
        }
      }
    }
  }
}
#endif

/* matmul_rows_dt compiled once per mode (a constant in each copy). */
static void matmul_rows(const void *const *x, int64_t m, const void *w, int64_t rows,
                        int64_t len, int64_t ld, int mode, float *y, pf_stream *pf, float *xp) {
#if PAIRS
  if (mode == MODE_BF16) {
    matmul_rows_pairs((const float *const *)x, m, (const uint16_t *)w, rows, len, ld, y, xp);
    return;
  }
#endif
  (void)xp;
  if (mode == MODE_F32) matmul_rows_dt(x, m, w, rows, len, ld, MODE_F32, y, pf);
#ifdef LYNX_BF16DOT
  else if (mode == MODE_BF16DOT) matmul_rows_dt(x, m, w, rows, len, ld, MODE_BF16DOT, y, pf);
#endif
  else matmul_rows_dt(x, m, w, rows, len, ld, MODE_BF16, y, pf);
}

/* 1 where this build computes bf16 weights with AVX512-BF16 dot products (MODE_BF16DOT):
 * lynx_experts then reads only xb, and its caller may pass x = NULL for bf16 weights. */
int lynx_bf16_dot(void) {
#ifdef LYNX_BF16DOT
  return 1;
#else
  return 0;
#endif
}

/* Sparse experts (reference.experts_general_reference) for n tokens of width d:
 *   x        [n, d] float32 (bf16 inputs are widened by the caller); NULL where xb is
 *            given and the build has the dot products (lynx_bf16_dot), which read xb only
 *   xb       [n, d] the same tokens in bf16, or NULL: with bf16 weights and round_mid, the
 *            build's AVX512-BF16 dot products take them (MODE_BF16DOT)
 *   ids      [n, k] int64 in [0, e); weights [n, k] float32
 *   w_up     e pointers, expert j's [u, d] matrix at w_up[j]; w_gate e pointers to [i, d] or
 *            NULL; w_down e pointers to [d, i]; dtype dt (0 f32, 1 bf16); rows contiguous,
 *            read in place (one stacked parameter's experts, or separate tensors): rows
 *            holds the row strides in elements of w_up, w_gate, w_down (3 values)
 *   gated    1: h = act(gate) * up with gate/up the halves of x @ w_up[e].T (u = 2i), or
 *            gate = x @ w_gate[e].T when w_gate is given (u = i); 0: h = act(x @ w_up[e].T)
 *   b_up, b_gate, b_down  e pointers each to the experts' biases [u], [i], [d] in dt, or
 *            NULL: added after their projections; bstrides holds the element stride of each
 *            (3 values: any strides, e.g. an interleaved gate/up's bias views)
 *   act      constants.ACTIVATION_NAMES' code; ACT_SWIGLU_CLAMPED takes alpha and limit
 *            (+inf: unclamped) and combines gate and up as swiglu_clamped above
 *   take     [e] or NULL: computes only the touched experts j with take[j] != 0 (callers
 *            deal experts out to threads, each into its own output, and sum the outputs)
 *   out      [n, d] float32, overwritten: sum over slots of weight * (h @ w_down[e].T)
 * Work and weight reads follow the experts touched: each one's weights are read once for
 * all of its tokens. round_mid rounds intermediates to bf16 as a bf16 model does.
 * Returns 0; -1 when scratch memory could not be allocated; -2 for an id outside [0, e).
 */
int lynx_experts(const float *x, const uint16_t *xb, const int64_t *ids, const float *weights,
                 const void *const *w_up, const void *const *w_gate, const void *const *w_down,
                 const int64_t *rows, const void *const *b_up, const void *const *b_gate,
                 const void *const *b_down, const int64_t *bstrides, const uint8_t *take, int64_t n,
                 int64_t k, int64_t e, int64_t d, int64_t u, int64_t i, int gated, int act,
                 float alpha, float limit, int dt, int round_mid, float *out) {
  int64_t slots = n * k;
  memset(out, 0, sizeof(float) * (size_t)(n * d));
  if (slots == 0) return 0;
  int mode = dt == 0 ? MODE_F32 : MODE_BF16;
#ifdef LYNX_BF16DOT
  if (dt == 1 && round_mid && xb) mode = MODE_BF16DOT;
#endif
  /* Two scratch blocks. The first: counts [e + 1], fill [e], order [slots], row pointers
   * [2 slots], prefetch segments [3 e] and their lengths [3 e]. The second, sized by the
   * most tokens one computed expert takes (mx, known after the sort): h [mx, max(u, d)]
   * (up projection, then down projection), a [mx, i], xp [mx, max(d, i)] (the tokens'
   * deinterleaved rows, matmul_rows_pairs only) and a's bf16 copy ab [mx, i]
   * (MODE_BF16DOT): a prompt's thousands of slots do not multiply the buffers per expert. */
  size_t ints = (size_t)(2 * e + 1 + slots + 3 * e), ptrs = (size_t)(2 * slots + 3 * e);
  char *scratch = malloc(ints * sizeof(int64_t) + ptrs * sizeof(void *));
  if (!scratch) return -1;
  int64_t *count = (int64_t *)scratch, *fill = count + e + 1, *order = fill + e;
  const void **xrow = (const void **)(order + slots), **arow = xrow + slots;
  const char **seg = (const char **)(arow + slots);
  size_t *seglen = (size_t *)(seg + 3 * e);
  /* Counting sort of the slots by expert (stable: token order within an expert). */
  memset(count, 0, sizeof(int64_t) * (size_t)(e + 1));
  for (int64_t s = 0; s < slots; ++s) {
    if (ids[s] < 0 || ids[s] >= e) {
      free(scratch);
      return -2;
    }
    count[ids[s] + 1]++;
  }
  for (int64_t j = 0; j < e; ++j) count[j + 1] += count[j];
  memcpy(fill, count, sizeof(int64_t) * (size_t)e);
  for (int64_t s = 0; s < slots; ++s) order[fill[ids[s]]++] = s;
  int64_t mx = 0;
  for (int64_t j = 0; j < e; ++j)
    if (!take || take[j]) mx = count[j + 1] - count[j] > mx ? count[j + 1] - count[j] : mx;
  const int64_t hw = u > d ? u : d, xpw = PAIRS && mode == MODE_BF16 ? (d > i ? d : i) : 0;
  const size_t work = (size_t)(mx * (hw + i + xpw)) * sizeof(float) +
                      (size_t)(mx * i) * sizeof(uint16_t);
  float *h = malloc(work ? work : 1); /* mx 0: every touched expert is another thread's */
  if (!h) {
    free(scratch);
    return -1;
  }
  float *a = h + mx * hw, *xp = a + mx * i;
  uint16_t *ab = (uint16_t *)(xp + mx * xpw);
  size_t esz = dt == 0 ? sizeof(float) : sizeof(uint16_t);
  const int64_t up_r = rows[0], gate_r = rows[1], down_r = rows[2];
  /* The weights in the order they are read, prefetched PF_AHEAD bytes ahead. */
  pf_stream pf = {seg, seglen, 0, 0, 0};
  for (int64_t j = 0; j < e; ++j) {
    if (count[j + 1] == count[j] || (take && !take[j])) continue;
    seg[pf.nseg] = (const char *)w_up[j];
    seglen[pf.nseg++] = (size_t)((u - 1) * up_r + d) * esz;
    if (w_gate) {
      seg[pf.nseg] = (const char *)w_gate[j];
      seglen[pf.nseg++] = (size_t)((i - 1) * gate_r + d) * esz;
    }
    seg[pf.nseg] = (const char *)w_down[j];
    seglen[pf.nseg++] = (size_t)((d - 1) * down_r + i) * esz;
  }
  /* This stream serves MODE_BF16 and the portable build only: MODE_BF16DOT's one token
   * rows are left to the hardware prefetcher (software prefetch on top made them slower,
   * cpu v10), and the AVX-512 column blocks (MODE_BF16DOT from two tokens, MODE_F32)
   * prefetch the next row group themselves (cpu v12). */
  if (mode == MODE_BF16DOT || (PAIRS && mode == MODE_BF16)) pf.nseg = 0;
#ifdef LYNX_AVX512
  if (mode == MODE_F32) pf.nseg = 0;
#endif
  pf_run(&pf, PF_AHEAD);
  const char *const *next = seg; /* the matrices to compute, in the order listed above */
  for (int64_t j = 0; j < e; ++j) {
    int64_t lo = count[j], m = count[j + 1] - lo;
    if (m == 0 || (take && !take[j])) continue;
    const int64_t *grp = order + lo;
    const char *wu = *next++, *wg = w_gate ? *next++ : NULL, *wd = *next++;
    /* This expert's bias rows (NULL: none) and their element strides: the gate's is b_gate
     * with a split gate, else b_up's first half (gated) or all of it (plain). */
    const char *bu = b_up ? (const char *)b_up[j] : NULL;
    const char *bd = b_down ? (const char *)b_down[j] : NULL;
    const char *bg = wg ? (b_gate ? (const char *)b_gate[j] : NULL) : bu;
    const int64_t bu_s = bstrides[0], bg_s = wg ? bstrides[1] : bstrides[0], bd_s = bstrides[2];
    const int64_t bu_off = wg || !gated ? 0 : i * bu_s; /* the up half of a fused b_up */
    for (int64_t t = 0; t < m; ++t)
      xrow[t] = mode == MODE_BF16DOT ? (const void *)(xb + (grp[t] / k) * d)
                                     : (const void *)(x + (grp[t] / k) * d);
    /* Up (and gate) projection: h [m, u], gate [m, i] into a when split. */
    matmul_rows(xrow, m, wu, u, d, up_r, mode, h, &pf, xp);
    const float *gsrc = h, *usrc = gated ? h + i : NULL; /* fused [gate; up] halves */
    int64_t gstride = u;
    if (wg) {
      matmul_rows(xrow, m, wg, i, d, gate_r, mode, a, &pf, xp);
      gsrc = a, gstride = i, usrc = h;
    }
    /* Activation a [m, i] (in place over a split gate: each element is read first), and
     * its bf16 bits in ab for MODE_BF16DOT (exact: a is rounded to bf16 there). */
    for (int64_t t = 0; t < m; ++t) {
      int64_t r = 0;
#ifdef LYNX_AVX512
      /* erf has no vector form here, and biases and ACT_SWIGLU_CLAMPED take the scalar loop */
      if (act != ACT_GELU && act != ACT_SWIGLU_CLAMPED && !bg && !(usrc && bu))
        for (; r < i; r += 16) {
          __mmask16 mk = i - r >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (i - r)) - 1u);
          __m512 g = _mm512_maskz_loadu_ps(mk, gsrc + t * gstride + r);
          if (round_mid) g = round_bf16_16(g);
          __m512 v = act16(g, act);
          if (usrc) {
            __m512 up = _mm512_maskz_loadu_ps(mk, usrc + t * u + r);
            if (round_mid) v = round_bf16_16(v), up = round_bf16_16(up);
            v = _mm512_mul_ps(v, up);
          }
          if (round_mid) v = round_bf16_16(v);
          _mm512_mask_storeu_ps(a + t * i + r, mk, v);
          if (mode == MODE_BF16DOT) {
            __m256i bits = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16));
            _mm256_mask_storeu_epi16(ab + t * i + r, mk, bits);
          }
        }
#endif
      for (; r < i; ++r) {
        float g = gsrc[t * gstride + r];
        if (round_mid) g = round_bf16(g);
        if (bg) g += load_w1(bg, r * bg_s, dt), g = round_mid ? round_bf16(g) : g;
        float up = 0.0f;
        if (usrc) {
          up = usrc[t * u + r];
          if (round_mid) up = round_bf16(up);
          if (bu) up += load_w1(bu, bu_off + r * bu_s, dt), up = round_mid ? round_bf16(up) : up;
        }
        float v;
        if (act == ACT_SWIGLU_CLAMPED) {
          v = swiglu_clamped(g, up, alpha, limit, round_mid);
        } else {
          v = act_fn(g, act);
          if (usrc) v = (round_mid ? round_bf16(v) : v) * up;
        }
        v = round_mid ? round_bf16(v) : v;
        a[t * i + r] = v;
        uint32_t bits;
        memcpy(&bits, &v, sizeof bits);
        ab[t * i + r] = (uint16_t)(bits >> 16);
      }
    }
    /* Down projection [m, d] into h, then the weighted combine, accumulated in float32. */
    for (int64_t t = 0; t < m; ++t)
      arow[t] = mode == MODE_BF16DOT ? (const void *)(ab + t * i) : (const void *)(a + t * i);
    matmul_rows(arow, m, wd, d, i, down_r, mode, h, &pf, xp);
    for (int64_t t = 0; t < m; ++t) {
      float *o = out + (grp[t] / k) * d;
      float wt = weights[grp[t]];
      const float *y = h + t * d;
      if (bd) {
        for (int64_t r = 0; r < d; ++r) {
          float yr = (round_mid ? round_bf16(y[r]) : y[r]) + load_w1(bd, r * bd_s, dt);
          o[r] += wt * (round_mid ? round_bf16(yr) : yr);
        }
      } else {
        for (int64_t r = 0; r < d; ++r) o[r] += wt * (round_mid ? round_bf16(y[r]) : y[r]);
      }
    }
  }
  free(h);
  free(scratch);
  return 0;
}
