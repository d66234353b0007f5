// The CPU kernels of lynx::route_affinity_cpu and lynx::experts_cpu, registered with the
// dispatcher in C++ so that a compiled graph calls them without going through Python.
//
// The schemas (and the fake kernels used while tracing) are defined in
// lowering/cpu_native.py; this file only adds the CPU implementations. The arithmetic is
// the C code of lowering/lynx_cpu.c, linked into the same shared library. Built once per
// machine against the installed torch's headers by cpu_native.build().
//
// Both ops take the dtypes the C kernels compute in and say what is wrong otherwise: the
// CPU lowering only emits them for inputs that fit (cpu_native.experts_dtypes_fit,
// cpu_native.ROUTE_DTYPES); everything else is traced from the reference.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

extern "C" {
int64_t lynx_topk_rows(const float *probs, int64_t n, int64_t e, int64_t k, int64_t *ids);
int64_t lynx_affinity_ids(const float *logits, const float *probs, const int64_t *exact_ids,
                          int64_t n, int64_t e, int64_t k, double alpha, double beta,
                          int64_t *ids, uint8_t *same);
int lynx_experts(const float *x, const int64_t *ids, const float *weights, const void *w_up,
                 const void *w_gate, const void *w_down, int64_t n, int64_t k, int64_t e,
                 int64_t d, int64_t u, int64_t i, int gated, int act, int dt, int round_mid,
                 int64_t part, int64_t parts, float *out);
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
// lower index), AffinityBinning's ranking, kept set and remap, and the weights, in one call.
std::tuple<at::Tensor, at::Tensor> route_affinity_cpu(const at::Tensor &logits,
                                                      const at::Tensor &probs, int64_t top_k,
                                                      double alpha, std::optional<double> beta,
                                                      bool renorm) {
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
                               beta.has_value() ? *beta : -1.0, ids.data_ptr<int64_t>(),
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

int activation_code(c10::string_view activation) {
  static const char *const names[] = {"silu", "gelu", "gelu_tanh", "relu"};  // lynx_cpu.c order
  for (int c = 0; c < 4; ++c)
    if (activation == names[c]) return c;
  TORCH_CHECK_VALUE(false, "lynx::experts_cpu: unknown activation '", std::string(activation),
                    "'; valid: silu, gelu, gelu_tanh, relu");
  return -1;
}

at::Tensor experts_cpu(const at::Tensor &x, const at::Tensor &ids, const at::Tensor &weights,
                       const at::Tensor &w_up, const std::optional<at::Tensor> &w_gate,
                       const at::Tensor &w_down, c10::string_view activation, bool gated) {
  const int act = activation_code(activation);
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16,
                   "lynx::experts_cpu computes on float32 or bfloat16; got ", dt);
  const bool same_dtype = w_up.scalar_type() == dt && w_down.scalar_type() == dt &&
                          (!w_gate || w_gate->scalar_type() == dt);
  TORCH_CHECK_TYPE(same_dtype, "lynx::experts_cpu: the expert weights must have x's dtype ", dt);
  TORCH_CHECK(x.dim() == 2 && w_up.dim() == 3 && w_down.dim() == 3 && ids.dim() == 2,
              "lynx::experts_cpu: want x [N, d], ids [N, k], w_up [E, U, d], w_down [E, d, I]");
  const int64_t n = x.size(0), d = x.size(1), e = w_up.size(0), u = w_up.size(1);
  const int64_t i = w_down.size(2), k = ids.size(1);
  const int64_t want_u = gated && !w_gate ? 2 * i : i;
  const bool gate_fits =
      !w_gate || (w_gate->dim() == 3 && w_gate->size(0) == e && w_gate->size(1) == i &&
                  w_gate->size(2) == d);
  TORCH_CHECK(u == want_u && w_up.size(2) == d && w_down.size(0) == e && w_down.size(1) == d &&
                  gate_fits && ids.size(0) == n && weights.sizes() == ids.sizes(),
              "lynx::experts_cpu: inconsistent shapes x ", x.sizes(), ", ids ", ids.sizes(),
              ", weights ", weights.sizes(), ", w_up ", w_up.sizes(), ", w_down ",
              w_down.sizes(), " (gated=", gated, ", split gate ", w_gate.has_value(),
              "): want w_up [E, ", want_u, ", ", d, "] and w_down [E, ", d, ", I]");
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, "lynx::experts_cpu: ids must be int64");
  at::Tensor out = at::empty({n, d}, x.options().dtype(at::kFloat));
  if (n > 0) {
    at::Tensor xs = x.to(at::kFloat).contiguous(), wts = weights.to(at::kFloat).contiguous();
    at::Tensor idc = ids.contiguous(), up = w_up.contiguous(), down = w_down.contiguous();
    at::Tensor gate = w_gate ? w_gate->contiguous() : at::Tensor();
    const int code = dt == at::kFloat ? 0 : 1;  // the C kernel's weight dtype
    // With torch's intra-op threads, the touched experts are dealt out to the threads (each
    // reads its experts' weights once, into its own output), then the outputs are summed;
    // at least 4 token-expert slots per thread (one token's experts stay on one thread).
    const int64_t parts =
        std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n * k / 4));
    at::Tensor partial = parts == 1 ? out : at::empty({parts, n, d}, out.options());
    std::vector<int> status(parts, 0);
    auto run = [&](int64_t part) {
      status[part] = lynx_experts(
          xs.data_ptr<float>(), idc.data_ptr<int64_t>(), wts.data_ptr<float>(), up.data_ptr(),
          gate.defined() ? gate.data_ptr() : nullptr, down.data_ptr(), n, k, e, d, u, i,
          gated ? 1 : 0, act, code, code, part, parts, partial.data_ptr<float>() + part * n * d);
    };
    if (parts == 1) {
      run(0);
    } else {
      at::parallel_for(0, parts, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t part = lo; part < hi; ++part) run(part);
      });
      at::sum_out(out, partial, 0);
    }
    for (int st : status) {
      TORCH_CHECK_INDEX(st != -2, "lynx::experts_cpu: expert ids must be in [0, ", e, ")");
      TORCH_CHECK(st == 0, "lynx::experts_cpu: out of memory for its scratch buffers");
    }
  }
  return dt == at::kFloat ? out : out.to(dt);
}

}  // namespace

TORCH_LIBRARY_IMPL(lynx, CPU, m) {
  m.impl("route_affinity_cpu", &route_affinity_cpu);
  m.impl("experts_cpu", &experts_cpu);
}
