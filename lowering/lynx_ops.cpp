// The CPU kernels of lynx::route_affinity_cpu, lynx::route_scored_affinity_cpu and
// lynx::experts, registered with the dispatcher in C++ so that a compiled graph calls them
// without going through Python.
//
// The schemas (and the fake kernels used while tracing) are declared in lowering/ops.py;
// this file only adds the CPU implementations. The arithmetic is the C code of
// lowering/lynx_cpu.c, linked into the same shared library. Built once per machine against
// the installed torch's headers by cpu_native.build().
//
// The routing ops take the score dtypes the C kernel computes in and say what is wrong
// otherwise (the CPU lowering emits them only for constants.NATIVE_ROUTE_DTYPES).
// lynx::experts computes float32 and bfloat16 in the C kernel; every other dtype (and
// weights or biases in another dtype than x) runs reference.experts_general_reference's loop
// in ATen. Per-expert biases and the swiglu_clamped activation are taken on every path.

#include <limits>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gather.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <numeric>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

extern "C" {
int64_t lynx_topk_rows(const float *probs, int64_t n, int64_t e, int64_t k, int64_t *ids);
int64_t lynx_affinity_ids(const float *logits, const float *probs, const int64_t *exact_ids,
                          int64_t n, int64_t e, int64_t k, double alpha, double beta,
                          int64_t k0, int64_t *ids, uint8_t *same);
int64_t lynx_scored_affinity_ids(const float *scores, const int64_t *exact_ids, int64_t n,
                                 int64_t e, int64_t k, int space, double alpha, double beta,
                                 int64_t k0, int64_t *ids, uint8_t *same);
int lynx_experts(const float *x, const uint16_t *xb, const int64_t *ids, const float *weights,
                 const void *const *w_up, const void *const *w_gate, const void *const *w_down,
                 const int64_t *rows, const void *const *b_up, const void *const *b_gate,
                 const void *const *b_down, const int64_t *bstrides, const uint8_t *take, int64_t n,
                 int64_t k, int64_t e, int64_t d, int64_t u, int64_t i, int gated, int act,
                 float alpha, float limit, int dt, int round_mid, float *out);
int lynx_bf16_dot(void);
}

namespace {

bool route_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// A float rounded to the scores' dtype T and back (T = float: unchanged).
template <typename T>
inline float in_dtype(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// reference.route_reference's weights in the scores' dtype T, computed as the model computes
// them in T (each sum and quotient rounded to T): rows marked `same` keep the exact top-k's
// weights, the others get their final experts' probabilities renormalised ("renorm") or
// rescaled to the exact top-k's mass ("mass").
template <typename T>
void route_weights(const float *probs, const int64_t *exact, const int64_t *ids,
                   const uint8_t *same, int64_t n, int64_t e, int64_t k, bool renorm, T *out) {
  for (int64_t t = 0; t < n; ++t) {
    const float *p = probs + t * e;
    const int64_t *ex = exact + t * k, *fin = ids + t * k;
    float exact_mass = 0.0f, final_mass = 0.0f;
    for (int64_t s = 0; s < k; ++s) exact_mass += p[ex[s]], final_mass += p[fin[s]];
    exact_mass = in_dtype<T>(exact_mass), final_mass = in_dtype<T>(final_mass);
    T *w = out + t * k;
    if (same[t]) {
      for (int64_t s = 0; s < k; ++s)
        w[s] = static_cast<T>(renorm ? p[ex[s]] / exact_mass : p[ex[s]]);
    } else if (renorm) {
      for (int64_t s = 0; s < k; ++s) w[s] = static_cast<T>(p[fin[s]] / final_mass);
    } else {
      const float scale = in_dtype<T>(exact_mass / final_mass);
      for (int64_t s = 0; s < k; ++s) w[s] = static_cast<T>(p[fin[s]] * scale);
    }
  }
}

// lynx::route with the affinity policy, after the softmax: the model's top-k (ties to the
// lower index), AffinityBinning's ranking (each token's own top-k0 first), kept set and
// remap, and the weights, in one call.
std::tuple<at::Tensor, at::Tensor> route_affinity_cpu(const at::Tensor &logits,
                                                      const at::Tensor &probs, int64_t top_k,
                                                      double alpha, std::optional<double> beta,
                                                      bool renorm, int64_t k0) {
  TORCH_CHECK(logits.dim() == 2 && probs.sizes() == logits.sizes(),
              "lynx::route_affinity_cpu: logits and probs must both be [N, E]; got ",
              logits.sizes(), " and ", probs.sizes());
  const bool dtypes_fit =
      route_dtype(logits.scalar_type()) && probs.scalar_type() == logits.scalar_type();
  TORCH_CHECK_TYPE(dtypes_fit,
                   "lynx::route_affinity_cpu computes on float32, bfloat16 or float16 scores, "
                   "probs in the logits' dtype; got ", logits.scalar_type(), " and ",
                   probs.scalar_type(), " (use reference.route_reference for others)");
  const int64_t n = logits.size(0), e = logits.size(1), k = top_k;
  TORCH_CHECK_VALUE(1 <= k && k <= e,
                    "lynx::route_affinity_cpu: want 1 <= top_k <= E; got top_k = ", k, ", E = ", e);
  TORCH_CHECK_VALUE(k0 >= 0, "lynx::route_affinity_cpu: want k0 >= 0; got ", k0);
  at::Tensor ids = at::empty({n, k}, logits.options().dtype(at::kLong));
  at::Tensor weights = at::empty({n, k}, probs.options());
  if (n == 0) return {weights, ids};
  at::Tensor lg = logits.to(at::kFloat).contiguous(), pr = probs.to(at::kFloat).contiguous();
  std::vector<int64_t> exact(static_cast<size_t>(n * k));
  std::vector<uint8_t> same(static_cast<size_t>(n));
  const float *pp = pr.data_ptr<float>();
  int64_t status = lynx_topk_rows(pp, n, e, k, exact.data());
  if (status >= 0)
    status = lynx_affinity_ids(lg.data_ptr<float>(), pp, exact.data(), n, e, k, alpha,
                               beta.has_value() ? *beta : -1.0, k0, ids.data_ptr<int64_t>(),
                               same.data());
  TORCH_CHECK(status >= 0, "lynx::route_affinity_cpu: out of memory for its scratch buffers");
  const int64_t *fin = ids.data_ptr<int64_t>();
  switch (probs.scalar_type()) {
    case at::kFloat:
      route_weights(pp, exact.data(), fin, same.data(), n, e, k, renorm,
                    weights.data_ptr<float>());
      break;
    case at::kBFloat16:
      route_weights(pp, exact.data(), fin, same.data(), n, e, k, renorm,
                    weights.data_ptr<at::BFloat16>());
      break;
    default:
      route_weights(pp, exact.data(), fin, same.data(), n, e, k, renorm,
                    weights.data_ptr<at::Half>());
  }
  return {weights, ids};
}

// lynx::route_scored with the affinity policy: the model's top-k of the scores (ties to the
// lower index), AffinityBinning's ranking in the score space (each token's own top-k0
// first), kept set and remap; the values are the scores at the final ids, in their dtype.
std::tuple<at::Tensor, at::Tensor> route_scored_affinity_cpu(const at::Tensor &scores,
                                                             int64_t top_k,
                                                             c10::string_view space,
                                                             double alpha,
                                                             std::optional<double> beta,
                                                             int64_t k0) {
  TORCH_CHECK(scores.dim() == 2, "lynx::route_scored_affinity_cpu: scores must be [N, E]; got ",
              scores.sizes());
  TORCH_CHECK_TYPE(route_dtype(scores.scalar_type()),
                   "lynx::route_scored_affinity_cpu computes on float32, bfloat16 or float16 "
                   "scores; got ", scores.scalar_type(),
                   " (use reference.route_scored_reference for others)");
  static const char *const spaces[] = {"logit", "prob", "score"};  // lynx_cpu.c's SPACE_*
  int space_code = -1;
  for (int c = 0; c < 3; ++c)
    if (space == spaces[c]) space_code = c;
  TORCH_CHECK_VALUE(space_code >= 0, "lynx::route_scored_affinity_cpu: unknown score space '",
                    std::string(space), "'; valid: logit, prob, score");
  const int64_t n = scores.size(0), e = scores.size(1), k = top_k;
  TORCH_CHECK_VALUE(1 <= k && k <= e, "lynx::route_scored_affinity_cpu: want 1 <= top_k <= E; ",
                    "got top_k = ", k, ", E = ", e);
  TORCH_CHECK_VALUE(k0 >= 0, "lynx::route_scored_affinity_cpu: want k0 >= 0; got ", k0);
  at::Tensor ids = at::empty({n, k}, scores.options().dtype(at::kLong));
  if (n == 0) return {at::empty({n, k}, scores.options()), ids};
  at::Tensor sc = scores.to(at::kFloat).contiguous();
  std::vector<int64_t> exact(static_cast<size_t>(n * k));
  std::vector<uint8_t> same(static_cast<size_t>(n));
  const float *sp = sc.data_ptr<float>();
  int64_t status = lynx_topk_rows(sp, n, e, k, exact.data());
  if (status >= 0)
    status = lynx_scored_affinity_ids(sp, exact.data(), n, e, k, space_code, alpha,
                                      beta.has_value() ? *beta : -1.0, k0,
                                      ids.data_ptr<int64_t>(), same.data());
  TORCH_CHECK(status >= 0, "lynx::route_scored_affinity_cpu: out of memory for its scratch buffers");
  return {at::gather(scores, 1, ids), ids};
}

// Activation codes: constants.ACTIVATION_NAMES' order, which lynx_cpu.c switches on.
enum Activation { kSilu = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3, kSwigluClamped = 4, kRelu2 = 5 };

int activation_code(c10::string_view activation) {
  static const char *const names[] = {"silu", "gelu", "gelu_tanh", "relu", "swiglu_clamped",
                                      "relu2"};
  for (int c = 0; c < 6; ++c)
    if (activation == names[c]) return c;
  TORCH_CHECK_VALUE(false, "lynx::experts: unknown activation '", std::string(activation),
                    "'; valid: silu, gelu, gelu_tanh, relu, swiglu_clamped, relu2");
  return -1;
}

// The activation's parameters (reference.swiglu_clamped's alpha and limit; limit +inf when
// the op is given none).
struct ActParams {
  int act;
  double alpha, limit;
};

at::Tensor activate(const at::Tensor &h, int act) {
  switch (act) {
    case kSilu: return at::silu(h);
    case kGelu: return at::gelu(h);
    case kGeluTanh: return at::gelu(h, "tanh");
    case kRelu2: return h.relu().square();
    default: return h.relu();
  }
}

// reference.expert_activation for a gated expert, gate/up [m, I] (views are fine).
at::Tensor gate_times_up(const at::Tensor &gate, const at::Tensor &up, const ActParams &p) {
  if (p.act != kSwigluClamped) return activate(gate, p.act).mul(up);
  const at::Tensor g = gate.clamp_max(p.limit), u = up.clamp(-p.limit, p.limit);
  return u.add(1).mul(g.mul(g.mul(p.alpha).sigmoid()));
}

// One projection's (or one bias's) experts, as the kernels read them in place: a stacked
// tensor [E, ...] (a parameter, or a view of one), or E separate tensors of the same shape
// and strides (an nn.ModuleList's per-expert nn.Linear weights, for lynx::experts_list);
// none when neither is given. Sizes and strides are of one expert's tensor.
struct Experts {
  const at::Tensor *stacked = nullptr;
  at::TensorList list;

  static Experts of(const std::optional<at::Tensor> &t) { return {t ? &*t : nullptr, {}}; }
  bool defined() const { return stacked != nullptr || !list.empty(); }
  explicit operator bool() const { return defined(); }
  int64_t count() const { return stacked ? stacked->size(0) : static_cast<int64_t>(list.size()); }
  int64_t dim() const { return stacked ? stacked->dim() - 1 : list[0].dim(); }
  int64_t size(int64_t d) const { return stacked ? stacked->size(d + 1) : list[0].size(d); }
  int64_t stride(int64_t d) const { return stacked ? stacked->stride(d + 1) : list[0].stride(d); }
  at::ScalarType dtype() const { return stacked ? stacked->scalar_type() : list[0].scalar_type(); }
  // expert j's tensor (a view of the stacked one)
  at::Tensor operator[](int64_t j) const { return stacked ? stacked->select(0, j) : list[j]; }
  // expert j's first element
  const void *ptr(int64_t j) const {
    if (!stacked) return list[j].data_ptr();
    return static_cast<const char *>(stacked->data_ptr()) +
           j * stacked->stride(0) * static_cast<int64_t>(stacked->element_size());
  }
};

// h + the expert's bias row (no bias: h unchanged).
at::Tensor plus_bias(const at::Tensor &h, const Experts &bias, int64_t j) {
  return bias ? h.add(bias[j].to(h.scalar_type())) : h;
}

// The per-expert biases of one call, each [width] per expert or none.
struct Biases {
  const Experts &up, &gate, &down;
};

// The expert's hidden activation [m, I] from its up projection hu [m, U] and, with a split
// gate, its gate projection hg [m, I] (biases added first; a fused b_up's halves go to the
// gate and up halves of hu).
at::Tensor hidden(at::Tensor hu, std::optional<at::Tensor> hg, const Biases &b, int64_t j,
                  int64_t i, bool gated, const ActParams &p) {
  hu = plus_bias(hu, b.up, j);
  if (hg) return gate_times_up(plus_bias(*hg, b.gate, j), hu, p);
  if (!gated) return activate(hu, p.act);
  return gate_times_up(hu.narrow(1, 0, i), hu.narrow(1, i, i), p);
}

// A split gate that is the even rows of one [E, 2I, d] matrix whose odd rows are w_up (an
// interleaved gate/up: GPT-OSS's gate_up_proj, passed as views [:, 0::2] and [:, 1::2]):
// that matrix, as a view of the same storage, or undefined (also for per-expert tensors).
// One GEMM against it reads both in place, where at::mm would copy a gate or up view whose
// rows are 2 elements apart.
at::Tensor interleaved_gate_up(const Experts &gate, const Experts &up) {
  if (!gate.stacked || !up.stacked) return {};
  const at::Tensor &w_gate = *gate.stacked, &w_up = *up.stacked;
  if (!w_gate.is_alias_of(w_up) || w_gate.strides() != w_up.strides()) return {};
  const int64_t row = w_gate.stride(1);
  if (row % 2 != 0 || w_up.storage_offset() - w_gate.storage_offset() != row / 2) return {};
  return w_gate.as_strided({w_up.size(0), 2 * w_up.size(1), w_up.size(2)},
                           {w_gate.stride(0), row / 2, w_gate.stride(2)});
}

// reference.experts_general_reference in ATen, for the dtypes the C kernel does not compute
// on: per touched expert, its tokens' rows through its matrices (read in place; cast to x's
// dtype only where they differ, as the reference does), the weighted sum in float32.
at::Tensor experts_aten(const at::Tensor &x, const at::Tensor &ids, const at::Tensor &weights,
                        const Experts &w_up, const Experts &w_gate, const Experts &w_down,
                        const Biases &b, const ActParams &p, bool gated) {
  const int64_t n = x.size(0), k = ids.size(1), e = w_up.count(), i = w_down.size(1);
  const at::ScalarType dt = x.scalar_type();
  at::Tensor out = at::zeros({n, x.size(1)}, x.options().dtype(at::kFloat));
  at::Tensor idc = ids.contiguous();
  const int64_t *id = idc.data_ptr<int64_t>();
  std::map<int64_t, std::vector<int64_t>> slots;  // expert -> its (token, slot) positions
  for (int64_t s = 0; s < n * k; ++s) {
    TORCH_CHECK_INDEX(0 <= id[s] && id[s] < e, "lynx::experts: expert ids must be in [0, ", e,
                      ")");
    slots[id[s]].push_back(s);
  }
  const at::Tensor flat_w = weights.reshape({-1});
  for (const auto &[expert, pos] : slots) {
    at::Tensor slot = at::empty({static_cast<int64_t>(pos.size())}, idc.options());
    std::copy(pos.begin(), pos.end(), slot.data_ptr<int64_t>());
    const at::Tensor token = slot.div(k, "floor");
    const at::Tensor xt = x.index_select(0, token);
    std::optional<at::Tensor> hg;
    if (w_gate) hg = xt.matmul(w_gate[expert].to(dt).t());
    const at::Tensor h = hidden(xt.matmul(w_up[expert].to(dt).t()), hg, b, expert, i, gated, p);
    const at::Tensor y = plus_bias(h.matmul(w_down[expert].to(dt).t()), b.down, expert)
                             .to(at::kFloat);
    out.index_add_(0, token, y.mul(flat_w.index_select(0, slot).to(at::kFloat).unsqueeze(1)));
  }
  return out.to(dt);
}

// Tokens per expert from which lynx::experts runs an expert as GEMMs (at::mm) rather than the
// streaming kernel: where the two cross at real sizes on this project's CPU (AVX512-BF16, no
// AMX), measured in docs/perf-notes.md (cpu v10; float32 since cpu v12, whose streaming path
// beat at::mm up to ~48 tokens). -DLYNX_GEMM_TOKENS_BF16=... (and _F32)
// override them, for measuring the crossing elsewhere.
#ifndef LYNX_GEMM_TOKENS_BF16
#define LYNX_GEMM_TOKENS_BF16 32
#endif
#ifndef LYNX_GEMM_TOKENS_F32
#define LYNX_GEMM_TOKENS_F32 64
#endif
constexpr int64_t kGemmTokensBF16 = LYNX_GEMM_TOKENS_BF16;
constexpr int64_t kGemmTokensF32 = LYNX_GEMM_TOKENS_F32;
// Streamed weights from which an unevenly dealt call slices every expert across the threads
// (below, the slices' extra partial sums and shorter rows cost more than the imbalance).
#ifndef LYNX_SLICE_BYTES
#define LYNX_SLICE_BYTES (4 << 20)
#endif
constexpr int64_t kSliceBytes = LYNX_SLICE_BYTES;

// Whether an optional per-expert bias is [E, width] (or absent).
bool bias_fits(const std::optional<at::Tensor> &b, int64_t e, int64_t width) {
  return !b || (b->dim() == 2 && b->size(0) == e && b->size(1) == width);
}

// The streamed parts' float32 outputs [parts, n, d] as one [n, d] in dtype dt: part 0 itself
// for a single float32 part, else summed in part order and rounded once, as at::sum over
// dim 0 then .to(dt) would (c10::BFloat16 rounds to nearest even, as that conversion does),
// in one pass: at decode sizes every ATen call costs ~0.1 ms with the caches cold
// (benchmarks/cpu_call_overhead.py), more than this loop.
at::Tensor combine_parts(const at::Tensor &partial, at::ScalarType dt) {
  const int64_t parts = partial.size(0), n = partial.size(1), d = partial.size(2);
  if (parts == 1 && dt == at::kFloat) return partial[0];
  at::Tensor res = at::empty({n, d}, partial.options().dtype(dt));
  const float *p = partial.data_ptr<float>();
  const int64_t m = n * d;
  const auto sum = [&](int64_t r) {
    float v = p[r];
    for (int64_t q = 1; q < parts; ++q) v += p[q * m + r];
    return v;
  };
  if (dt == at::kFloat) {
    float *o = res.data_ptr<float>();
    for (int64_t r = 0; r < m; ++r) o[r] = sum(r);
  } else {
    c10::BFloat16 *o = res.data_ptr<c10::BFloat16>();
    for (int64_t r = 0; r < m; ++r) o[r] = c10::BFloat16(sum(r));
  }
  return res;
}

// lynx::experts and lynx::experts_list once their inputs are checked: x [n, d], ids and
// weights [n, k], each projection's E experts (w_up [U, d], w_gate [I, d] or none, w_down
// [d, I] per expert) and biases ([U], [I], [d] per expert, or none).
at::Tensor experts_core(const at::Tensor &x, const at::Tensor &ids, const at::Tensor &weights,
                        const Experts &w_up, const Experts &w_gate, const Experts &w_down,
                        const Experts &b_up, const Experts &b_gate, const Experts &b_down,
                        const ActParams &params, bool gated) {
  const Biases biases{b_up, b_gate, b_down};
  const int act = params.act;
  const at::ScalarType dt = x.scalar_type();
  const int64_t n = x.size(0), d = x.size(1), e = w_up.count(), u = w_up.size(0);
  const int64_t i = w_down.size(1), k = ids.size(1);
  const auto in_dt = [&](const Experts &t) { return !t || t.dtype() == dt; };
  const bool native = (dt == at::kFloat || dt == at::kBFloat16) && in_dt(w_up) &&
                      in_dt(w_down) && in_dt(w_gate) && in_dt(b_up) && in_dt(b_gate) &&
                      in_dt(b_down);
  if (!native) return experts_aten(x, ids, weights, w_up, w_gate, w_down, biases, params, gated);
  if (n == 0) return at::zeros({n, d}, x.options());
  at::Tensor idc = ids.contiguous();
  const int64_t *id = idc.data_ptr<int64_t>();
  std::vector<int64_t> count(static_cast<size_t>(e), 0);
  for (int64_t s = 0; s < n * k; ++s) {
    TORCH_CHECK_INDEX(0 <= id[s] && id[s] < e, "lynx::experts: expert ids must be in [0, ", e,
                      ")");
    ++count[id[s]];
  }
  // Per touched expert, the way that is fastest at its token count (known here, on the
  // host: no sync): the streaming kernel reads the weights once at the memory floor while
  // tokens are few; from kGemmTokens on, its arithmetic costs more than the read and the
  // expert runs as GEMMs on views of its weights (oneDNN/MKL through at::mm). Weights whose
  // rows are not contiguous (a transposed layout) always take the GEMMs: they read strided
  // operands in place, where the streaming kernel would need a copy.
  const auto rows_contiguous = [](const Experts &w) { return w.stride(1) == 1; };
  const bool streamable = rows_contiguous(w_up) && rows_contiguous(w_down) &&
                          (!w_gate || rows_contiguous(w_gate));
  // bf16 GEMMs only where the CPU multiplies bf16 in hardware (AVX512-BF16, as this build's
  // dot products): without it ATen's bf16 at::mm widens in software and lost to the
  // streaming kernel at every token count measured (Zen 3, AVX2: by 3.0-6.3x at 4 to 128
  // tokens, cpu v15 in docs/perf-notes.md), so every bf16 expert streams there.
  const int64_t gemm_tokens = dt == at::kFloat ? kGemmTokensF32
                              : lynx_bf16_dot() ? kGemmTokensBF16
                                                : std::numeric_limits<int64_t>::max();
  std::vector<int64_t> stream, gemm;  // touched experts by way
  for (int64_t j = 0; j < e; ++j) {
    if (count[j] == 0) continue;
    (streamable && count[j] < gemm_tokens ? stream : gemm).push_back(j);
  }
  const int64_t expert_bytes = (u * d + (w_gate ? i * d : 0) + d * i) * x.element_size();
  // float32 accumulator of the GEMM experts (and the streamed ones' sum beside them)
  at::Tensor out = gemm.empty() ? at::Tensor() : at::zeros({n, d}, x.options().dtype(at::kFloat));
  if (!stream.empty()) {
    // The tokens as the kernel reads them: bf16 rows for its AVX512-BF16 dot products (bf16
    // weights, where the build has them), else float32; the weights as float32 (a copy on
    // the host, not an ATen call: each costs ~0.1 ms at decode with the caches cold).
    const bool bf16_dot = dt == at::kBFloat16 && lynx_bf16_dot();
    at::Tensor xs = bf16_dot ? at::Tensor() : x.to(at::kFloat).contiguous();
    at::Tensor xb = dt == at::kBFloat16 ? x.contiguous() : at::Tensor();
    std::vector<float> wts(static_cast<size_t>(n * k));
    {
      const at::Tensor wc = weights.contiguous();
      switch (wc.scalar_type()) {
        case at::kFloat: std::copy_n(wc.data_ptr<float>(), n * k, wts.begin()); break;
        case at::kBFloat16:
          std::copy_n(wc.data_ptr<c10::BFloat16>(), n * k, wts.begin());
          break;
        case at::kHalf: std::copy_n(wc.data_ptr<c10::Half>(), n * k, wts.begin()); break;
        default: {
          const at::Tensor wf = wc.to(at::kFloat);
          std::copy_n(wf.data_ptr<float>(), n * k, wts.begin());
        }
      }
    }
    // Each expert's matrices and bias rows where they lie (the kernel takes one pointer per
    // expert), with the row strides of the matrices and the element strides of the biases.
    const auto pointers = [&](const Experts &t) {
      std::vector<const void *> p(t ? static_cast<size_t>(e) : 0);
      for (size_t j = 0; j < p.size(); ++j) p[j] = t.ptr(static_cast<int64_t>(j));
      return p;
    };
    const std::vector<const void *> pu = pointers(w_up), pg = pointers(w_gate),
                                    pd = pointers(w_down), pbu = pointers(b_up),
                                    pbg = pointers(b_gate), pbd = pointers(b_down);
    const auto data = [](const std::vector<const void *> &p) {
      return p.empty() ? nullptr : p.data();
    };
    const int64_t rows[3] = {w_up.stride(0), w_gate ? w_gate.stride(0) : 0, w_down.stride(0)};
    const auto bstride = [](const Experts &b) { return b ? b.stride(0) : int64_t{0}; };
    const int64_t bstrides[3] = {bstride(b_up), bstride(b_gate), bstride(b_down)};
    const int code = dt == at::kFloat ? 0 : 1;  // the C kernel's weight dtype
    // With torch's intra-op threads, the streamed experts are dealt out to the threads (each
    // reads its experts' weights once, into its own output), then the outputs are summed. Below
    // 1 MiB of weights in all, a thread only pays with at least 4 token-expert slots.
    const int64_t stream_slots = [&] {
      int64_t c = 0;
      for (int64_t j : stream) c += count[j];
      return c;
    }();
    const int64_t threads = at::get_num_threads();
    const int64_t stream_bytes = expert_bytes * static_cast<int64_t>(stream.size());
    int64_t parts = std::min<int64_t>(threads, stream.size());
    if (stream_bytes < (int64_t{1} << 20))
      parts = std::min<int64_t>(parts, stream_slots / 4);
    parts = std::max<int64_t>(parts, 1);
    // Dealt by work, not by count: most work first, each to the least loaded thread. An
    // expert costs its read (1) plus its tokens' arithmetic past the first two (the kernel is
    // compute-bound from ~3 tokens: cpu v10 in docs/perf-notes.md), 1/2 read per token.
    std::vector<std::vector<uint8_t>> take(parts, std::vector<uint8_t>(e, 0));
    std::vector<int64_t> by_work(stream);
    const auto work = [&](int64_t j) { return 2 + std::max<int64_t>(count[j] - 2, 0); };
    std::stable_sort(by_work.begin(), by_work.end(),
                     [&](int64_t a, int64_t b) { return work(a) > work(b); });
    std::vector<int64_t> load(parts, 0);
    for (int64_t j : by_work) {
      const int64_t part = std::min_element(load.begin(), load.end()) - load.begin();
      take[part][j] = 1, load[part] += work(j);
    }
    // Whole experts keep each thread on whole rows. Where that deal leaves the busiest
    // thread more than 1/8 above an even share (a few large experts: Mixtral's 2 to 8 on 2
    // threads), every thread takes a slice of every streamed expert's intermediate dim
    // instead, as tensor parallelism would: its gate/up rows and the matching columns of
    // the down projection, whose partial sums at::sum_out adds. Equal reads per thread at
    // any expert count; worth it from kSliceBytes of streamed weights.
    const int64_t total = std::accumulate(load.begin(), load.end(), int64_t{0});
    const int64_t busiest = *std::max_element(load.begin(), load.end());
    const int64_t chunk = ((i + threads - 1) / threads + 31) & ~int64_t{31};  // 64 B aligned
    const bool slice = threads > 1 && stream_bytes >= kSliceBytes && chunk < i &&
                       busiest * threads * 8 > total * 9;
    if (slice) parts = threads;
    at::Tensor partial = at::empty({parts, n, d}, x.options().dtype(at::kFloat));
    std::vector<int> status(parts, 0);
    // One part's call of the C kernel: per-expert pointers to the weights and biases (with
    // their strides), the experts it takes, the up and intermediate widths it computes, into
    // partial[part].
    auto call = [&](int64_t part, const void *const *wu, const void *const *wg,
                    const void *const *wd, const int64_t *st, const void *const *bu,
                    const void *const *bg, const void *const *bd, const int64_t *bst,
                    const uint8_t *takes, int64_t width_u, int64_t width_i) {
      status[part] = lynx_experts(
          xs.defined() ? xs.data_ptr<float>() : nullptr,
          xb.defined() ? static_cast<const uint16_t *>(xb.data_ptr()) : nullptr, id, wts.data(),
          wu, wg, wd, st, bu, bg, bd, bst, takes, n, k, e, d, width_u, width_i, gated ? 1 : 0,
          act, static_cast<float>(params.alpha), static_cast<float>(params.limit), code, code,
          partial.data_ptr<float>() + part * n * d);
    };
    auto run = [&](int64_t part) {  // whole experts: take[part]
      call(part, pu.data(), data(pg), pd.data(), rows, data(pbu), data(pbg), data(pbd),
           bstrides, take[part].data(), u, i);
    };
    std::vector<uint8_t> streamed;  // a sliced call's experts: every streamed one
    if (slice) {
      streamed.assign(e, 0);
      for (int64_t j : stream) streamed[j] = 1;
    }
    const int64_t esz = static_cast<int64_t>(x.element_size());
    // Part p's slice [i0, i1) of the intermediate dim, as a split-gate call on views: a
    // fused [gate; up] matrix becomes its two halves' rows, the down projection the slice's
    // columns (rows stay rows[2] apart), biases the matching elements; b_down is added once.
    auto run_slice = [&](int64_t part) {
      float *dst = partial.data_ptr<float>() + part * n * d;
      const int64_t i0 = part * chunk, i1 = std::min(i, i0 + chunk), width = i1 - i0;
      if (width <= 0) {
        std::fill(dst, dst + n * d, 0.0f);
        return;
      }
      // each expert's pointers moved `offset` elements on (empty stays empty)
      const auto moved = [&](const std::vector<const void *> &p, int64_t offset) {
        std::vector<const void *> q(p.size());
        for (size_t j = 0; j < p.size(); ++j)
          q[j] = static_cast<const char *>(p[j]) + offset * esz;
        return q;
      };
      const bool fused = gated && !w_gate;
      const std::vector<const void *> wg = w_gate ? moved(pg, i0 * rows[1])
                                           : fused ? moved(pu, i0 * rows[0])
                                                   : std::vector<const void *>();
      const std::vector<const void *> wu = moved(pu, (fused ? i + i0 : i0) * rows[0]);
      const std::vector<const void *> wd = moved(pd, i0);
      const int64_t st[3] = {rows[0], fused ? rows[0] : rows[1], rows[2]};
      const std::vector<const void *> bu = moved(pbu, (fused ? i + i0 : i0) * bstrides[0]);
      const std::vector<const void *> bg = b_gate ? moved(pbg, i0 * bstrides[1])
                                           : fused ? moved(pbu, i0 * bstrides[0])
                                                   : std::vector<const void *>();
      const int64_t bst[3] = {bstrides[0], b_gate ? bstrides[1] : bstrides[0], bstrides[2]};
      call(part, wu.data(), data(wg), wd.data(), st, data(bu), data(bg),
           part == 0 ? data(pbd) : nullptr, bst, streamed.data(), width, width);
    };
    if (parts == 1) {
      run(0);
    } else {
      at::parallel_for(0, parts, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t part = lo; part < hi; ++part) slice ? run_slice(part) : run(part);
      });
    }
    for (int st : status) TORCH_CHECK(st == 0, "lynx::experts: out of memory for its scratch buffers");
    if (gemm.empty()) return combine_parts(partial, dt);
    at::sum_out(out, partial, 0);
  }
  if (!gemm.empty()) {
    // Each GEMM expert in x's dtype, as the model computes it (bf16: oneDNN's bf16 GEMMs,
    // each product rounded to bf16); the weighted combine in fp32.
    std::vector<std::vector<int64_t>> slots(static_cast<size_t>(e));  // gemm experts' slots
    std::vector<uint8_t> is_gemm(static_cast<size_t>(e), 0);
    for (int64_t j : gemm) is_gemm[j] = 1, slots[j].reserve(count[j]);
    for (int64_t s = 0; s < n * k; ++s)
      if (is_gemm[id[s]]) slots[id[s]].push_back(s);
    const at::Tensor flat_w = weights.reshape({-1});
    const at::Tensor gate_up = interleaved_gate_up(w_gate, w_up);
    auto run_gemm = [&](int64_t j, at::Tensor &dst) {
      at::Tensor slot = at::empty({count[j]}, idc.options());
      std::copy(slots[j].begin(), slots[j].end(), slot.data_ptr<int64_t>());
      const at::Tensor token = slot.div(k, "floor");
      const at::Tensor xt = x.index_select(0, token);
      // views: the weights are read in place (an interleaved gate/up as one GEMM, its
      // output's even and odd columns the gate and up projections)
      at::Tensor hu;
      std::optional<at::Tensor> hg;
      if (gate_up.defined()) {
        const at::Tensor both = at::mm(xt, gate_up[j].t());  // [m, 2I]
        hg = both.slice(1, 0, 2 * i, 2), hu = both.slice(1, 1, 2 * i, 2);
      } else {
        hu = at::mm(xt, w_up[j].t());
        if (w_gate) hg = at::mm(xt, w_gate[j].t());
      }
      const at::Tensor h = hidden(hu, hg, biases, j, i, gated, params);
      const at::Tensor y = plus_bias(at::mm(h, w_down[j].t()), b_down, j).to(at::kFloat);
      dst.index_add_(0, token, y.mul(flat_w.index_select(0, slot).to(at::kFloat).unsqueeze(1)));
    };
    // As many GEMM experts as threads or more: dealt out to the threads, one single-threaded
    // GEMM each into its own output (Mixtral-8x7B at batch 64, 2 threads: one expert's
    // [16 x 4096] x [4096 x 28672] split over both threads ran 1.35x slower than Inductor's
    // grouped_mm); fewer: one after the other, each GEMM on all threads.
    const int64_t threads = at::get_num_threads();
    if (threads > 1 && static_cast<int64_t>(gemm.size()) >= threads) {
      at::Tensor partial = at::zeros({threads, n, d}, out.options());
      at::parallel_for(0, threads, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t part = lo; part < hi; ++part) {
          at::Tensor dst = partial[part];
          for (size_t r = part; r < gemm.size(); r += threads) run_gemm(gemm[r], dst);
        }
      });
      out.add_(partial.sum(0));
    } else {
      for (int64_t j : gemm) run_gemm(j, out);
    }
  }
  return dt == at::kFloat ? out : out.to(dt);
}

// The activation's code and parameters, checked against the op's arguments.
ActParams act_params(c10::string_view activation, bool gated, std::optional<double> act_alpha,
                     std::optional<double> act_limit) {
  const int act = activation_code(activation);
  TORCH_CHECK_VALUE(act != kSwigluClamped ? !act_alpha && !act_limit : gated && act_alpha,
                    "lynx::experts: swiglu_clamped needs gated=True and act_alpha; the other "
                    "activations take neither act_alpha nor act_limit");
  return {act, act_alpha.value_or(1.0),
          act_limit.value_or(std::numeric_limits<double>::infinity())};
}

at::Tensor experts(const at::Tensor &x, const at::Tensor &ids, const at::Tensor &weights,
                   const at::Tensor &w_up, const std::optional<at::Tensor> &w_gate,
                   const at::Tensor &w_down, c10::string_view activation, bool gated,
                   const std::optional<at::Tensor> &b_up, const std::optional<at::Tensor> &b_gate,
                   const std::optional<at::Tensor> &b_down, std::optional<double> act_alpha,
                   std::optional<double> act_limit) {
  const ActParams params = act_params(activation, gated, act_alpha, act_limit);
  TORCH_CHECK(x.dim() == 2 && w_up.dim() == 3 && w_down.dim() == 3 && ids.dim() == 2,
              "lynx::experts: want x [N, d], ids [N, k], w_up [E, U, d], w_down [E, d, I]");
  const int64_t n = x.size(0), d = x.size(1), e = w_up.size(0), u = w_up.size(1);
  const int64_t i = w_down.size(2);
  const int64_t want_u = gated && !w_gate ? 2 * i : i;
  const bool gate_fits =
      !w_gate || (w_gate->dim() == 3 && w_gate->size(0) == e && w_gate->size(1) == i &&
                  w_gate->size(2) == d);
  TORCH_CHECK(u == want_u && w_up.size(2) == d && w_down.size(0) == e && w_down.size(1) == d &&
                  gate_fits && ids.size(0) == n && weights.sizes() == ids.sizes(),
              "lynx::experts: inconsistent shapes x ", x.sizes(), ", ids ", ids.sizes(),
              ", weights ", weights.sizes(), ", w_up ", w_up.sizes(), ", w_down ",
              w_down.sizes(), " (gated=", gated, ", split gate ", w_gate.has_value(),
              "): want w_up [E, ", want_u, ", ", d, "] and w_down [E, ", d, ", I]");
  TORCH_CHECK(bias_fits(b_up, e, u) && bias_fits(b_gate, e, i) && bias_fits(b_down, e, d) &&
                  (!b_gate || w_gate),
              "lynx::experts: want biases b_up [E, ", u, "], b_gate [E, ", i,
              "] (with a split gate only) and b_down [E, ", d, "]");
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, "lynx::experts: ids must be int64");
  return experts_core(x, ids, weights, Experts{&w_up, {}}, Experts::of(w_gate),
                      Experts{&w_down, {}}, Experts::of(b_up), Experts::of(b_gate),
                      Experts::of(b_down), params, gated);
}

// Whether `list` is E tensors (or none, where `optional`) of one shape, dtype and strides.
void check_list(at::TensorList list, int64_t e, at::IntArrayRef shape, bool optional,
                const char *name) {
  TORCH_CHECK(list.size() == static_cast<size_t>(e) || (optional && list.empty()),
              "lynx::experts_list: ", name, " holds ", list.size(), " tensors; want one per "
              "expert (", e, ")", optional ? " or none" : "");
  for (const at::Tensor &t : list)
    TORCH_CHECK(t.sizes() == shape && t.strides() == list[0].strides() &&
                    t.scalar_type() == list[0].scalar_type() && t.device() == list[0].device(),
                "lynx::experts_list: every tensor of ", name, " must be ", shape,
                " with the first one's dtype and strides; got ", t.sizes(), " ", t.scalar_type(),
                " strides ", t.strides(), " against ", list[0].strides());
}

// lynx::experts with each projection's experts (and biases) as separate tensors, one per
// expert: empty lists for an absent split gate or bias.
at::Tensor experts_list(const at::Tensor &x, const at::Tensor &ids, const at::Tensor &weights,
                        at::TensorList w_up, at::TensorList w_gate, at::TensorList w_down,
                        at::TensorList b_up, at::TensorList b_gate, at::TensorList b_down,
                        c10::string_view activation, bool gated, std::optional<double> act_alpha,
                        std::optional<double> act_limit) {
  const ActParams params = act_params(activation, gated, act_alpha, act_limit);
  TORCH_CHECK(x.dim() == 2 && ids.dim() == 2 && weights.sizes() == ids.sizes() &&
                  ids.size(0) == x.size(0) && !w_up.empty() && w_up[0].dim() == 2 &&
                  !w_down.empty() && w_down[0].dim() == 2,
              "lynx::experts_list: want x [N, d], ids and weights [N, k], per-expert w_up "
              "[U, d] and w_down [d, I]; got x ", x.sizes(), ", ids ", ids.sizes(),
              ", weights ", weights.sizes());
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, "lynx::experts_list: ids must be int64");
  const int64_t d = x.size(1), e = static_cast<int64_t>(w_up.size()), i = w_down[0].size(1);
  const bool split = !w_gate.empty();
  const int64_t u = gated && !split ? 2 * i : i;
  check_list(w_up, e, {u, d}, false, "w_up");
  check_list(w_gate, e, {i, d}, true, "w_gate");
  check_list(w_down, e, {d, i}, false, "w_down");
  check_list(b_up, e, {u}, true, "b_up");
  check_list(b_gate, e, {i}, true, "b_gate");
  check_list(b_down, e, {d}, true, "b_down");
  TORCH_CHECK_VALUE(!split || gated, "lynx::experts_list: a split gate needs gated=True");
  TORCH_CHECK_VALUE(b_gate.empty() || split, "lynx::experts_list: b_gate needs w_gate");
  const auto of = [](at::TensorList l) { return Experts{nullptr, l}; };
  return experts_core(x, ids, weights, of(w_up), of(w_gate), of(w_down), of(b_up), of(b_gate),
                      of(b_down), params, gated);
}

}  // namespace

TORCH_LIBRARY_IMPL(lynx, CPU, m) {
  m.impl("route_affinity_cpu", &route_affinity_cpu);
  m.impl("route_scored_affinity_cpu", &route_scored_affinity_cpu);
  m.impl("experts", &experts);
  m.impl("experts_list", &experts_list);
}

// Inference ops: their autograd kernel on CPU is torch's C++ "not implemented" fallback
// (an error only if a gradient is asked for), so a call from a compiled graph never enters
// the Python autograd kernel custom_op registers for every device (measured 9.3 -> 4.6 us
// per lynx::experts call at decode sizes).
TORCH_LIBRARY_IMPL(lynx, AutogradCPU, m) {
  m.impl("route_affinity_cpu", torch::autograd::autogradNotImplementedFallback());
  m.impl("route_scored_affinity_cpu", torch::autograd::autogradNotImplementedFallback());
  m.impl("experts", torch::autograd::autogradNotImplementedFallback());
  m.impl("experts_list", torch::autograd::autogradNotImplementedFallback());
}
