// CPU backend: the fused update (noise + scale + statistic + SGD / Adam / AdamW) of a list of
// tensors in one call, the contract of csrc/multi_tensor_update.cu and kernels/multi_tensor.py:
// per element grad = (clipped sum + noise_std z) * inv_denom, the statistic summed over grad, then
// the optimizer's arithmetic (update_math.h, shared with the CUDA kernels). One call replaces the
// torch path's noise call, scaling, p.grad assignments and the wrapped optimizer's ~20 foreach
// ops over every tensor. Torch reference: DPOptimizer.privatize + apply.
#include <torch/extension.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <vector>

#include "../update_math.h"
#include "gaussian.h"

namespace {

// the privatized gradient of a block into gr: (clipped sum + std z) * inv
inline void privatize_block(const float* g, const float* z, float* gr, int64_t n, float std, float inv) {
  if (z != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) gr[i] = (g[i] + std * z[i]) * inv;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) gr[i] = g[i] * inv;
  }
}

// w = Adam's update of w for a block, in place (SIMD lanes)
template <bool kDecoupled, bool kCorrected>
inline void adam_block(float* w, const float* gr, float* m, float* v, int64_t n, const float* r) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) w[i] = anadp::adam_as<kDecoupled, kCorrected>(w[i], gr[i], m + i, v + i, r);
}

// returns the block's sum of the statistic; adds the sum of the first moment's squares after the update
// (Adam's m, SGD's momentum buffer) to *m_sq. Passes over the block (in L1): privatize, statistic,
// update, moment; each a SIMD loop where the arithmetic allows (IEEE add / mul / div / sqrt round the
// same in every lane, so the parameters are those of the scalar loop; the two sums are reassociated
// over the lanes, a fixed order)
template <typename P>
double update_block(P* p, float* g, float* m, float* v, int64_t b, int64_t n, const float* row, int kind,
                    bool noise, bool stat_sq, bool store, uint32_t k0, uint32_t k1, double* m_sq) {
  alignas(64) float z[anadp_cpu::kBlock];
  alignas(64) float gr[anadp_cpu::kBlock];
  alignas(64) float w[anadp_cpu::kBlock];
  if (noise) anadp_cpu::gaussian_block(k0, k1, static_cast<uint64_t>(b), n, z);
  privatize_block(g + b, noise ? z : nullptr, gr, n, row[anadp::NOISE_STD], row[anadp::INV_DENOM]);
  if (store) std::copy(gr, gr + n, g + b);  // the privatized gradient, for p.grad
  for (int64_t i = 0; i < n; ++i) w[i] = static_cast<float>(p[b + i]);
  float local = 0.0f;
  if (stat_sq) {
#pragma omp simd reduction(+ : local)
    for (int64_t i = 0; i < n; ++i) local += gr[i] * gr[i];
  } else {
#pragma omp simd reduction(+ : local)
    for (int64_t i = 0; i < n; ++i) local += std::fabs(w[i] * gr[i]);
  }
  if (kind == anadp::SGD) {
    for (int64_t i = 0; i < n; ++i) {
      float unused = 0.0f;
      w[i] = anadp::sgd(w[i], gr[i], row[anadp::BETA1] != 0.0f ? m + b + i : &unused, row);
    }
  } else {
    float r[anadp::N_COLS];  // a local copy: the stores to m and v cannot alias it
    std::copy(row, row + anadp::N_COLS, r);
    const bool decoupled = r[anadp::FLAG] != 0.0f, corrected = r[anadp::NOISE_VAR] > 0.0f;
    if (decoupled && corrected) {
      adam_block<true, true>(w, gr, m + b, v + b, n, r);
    } else if (decoupled) {
      adam_block<true, false>(w, gr, m + b, v + b, n, r);
    } else if (corrected) {
      adam_block<false, true>(w, gr, m + b, v + b, n, r);
    } else {
      adam_block<false, false>(w, gr, m + b, v + b, n, r);
    }
  }
  for (int64_t i = 0; i < n; ++i) p[b + i] = static_cast<P>(w[i]);  // BFloat16 / Half: nearest even
  if (m != nullptr) {
    float sq = 0.0f;
    const float* mb = m + b;
#pragma omp simd reduction(+ : sq)
    for (int64_t i = 0; i < n; ++i) sq += mb[i] * mb[i];
    *m_sq += sq;
  }
  return local;
}

}  // namespace

namespace anadp_cpu {

// returns (2, tensors) float64: each tensor's sum of the statistic (grad^2 if stat == 1, else |p grad|);
// store_grad: the privatized gradient overwrites the clipped sum in grads; the second row of the result
// holds each tensor's sum of squares of its first moment after the update (0 without one: the allocation
// reads it, torch._foreach_norm of the moments was ~5% of a BERT-base step's host time)
torch::Tensor multi_tensor_update(std::vector<torch::Tensor> params, std::vector<torch::Tensor> grads,
                                  std::vector<c10::optional<torch::Tensor>> ms,
                                  std::vector<c10::optional<torch::Tensor>> vs, std::vector<int64_t> keys,
                                  torch::Tensor rows, int64_t kind, bool noise, int64_t stat, bool store_grad) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && ms.size() == n && vs.size() == n && keys.size() == n, "one entry per tensor");
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == torch::kFloat32 && rows.is_contiguous() &&
                  rows.dim() == 2 && rows.size(0) == static_cast<int64_t>(n) && rows.size(1) == anadp::N_COLS,
              "rows must be a contiguous float32 CPU tensor of (tensors, N_COLS)");
  TORCH_CHECK(kind == anadp::SGD || kind == anadp::ADAM, "kind must be SGD or ADAM");
  // the work items: blocks of kBlock elements of every tensor, spread over the threads
  std::vector<int64_t> item_tensor, item_start;
  for (size_t t = 0; t < n; ++t) {
    const auto& p = params[t];
    TORCH_CHECK(p.device().is_cpu() && p.is_contiguous(), "parameters must be contiguous CPU tensors");
    const auto d = p.scalar_type();
    TORCH_CHECK(d == torch::kFloat32 || d == torch::kBFloat16 || d == torch::kHalf,
                "parameters must be float32, bfloat16 or float16");
    TORCH_CHECK(grads[t].scalar_type() == torch::kFloat32 && grads[t].is_contiguous() && grads[t].numel() == p.numel(),
                "grads must be contiguous float32 tensors shaped as the parameters");
    for (const auto* s : {&ms[t], &vs[t]}) {
      TORCH_CHECK(!s->has_value() || ((*s)->scalar_type() == torch::kFloat32 && (*s)->is_contiguous() &&
                                      (*s)->numel() == p.numel()),
                  "optimizer state must be contiguous float32 tensors shaped as the parameters");
    }
    TORCH_CHECK(kind == anadp::SGD || (ms[t].has_value() && vs[t].has_value()), "Adam needs both moments");
    for (int64_t b = 0; b < p.numel(); b += kBlock) {
      item_tensor.push_back(static_cast<int64_t>(t));
      item_start.push_back(b);
    }
  }
  const int64_t items = static_cast<int64_t>(item_tensor.size());
  std::vector<double> partial(items), moment(items, 0.0);
  const float* row0 = rows.data_ptr<float>();
#pragma omp parallel for schedule(static) if (items > 64)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t t = item_tensor[it], b = item_start[it];
    const auto& p = params[t];
    const int64_t len = std::min(kBlock, p.numel() - b);
    float* m = ms[t].has_value() ? ms[t]->data_ptr<float>() : nullptr;
    float* v = vs[t].has_value() ? vs[t]->data_ptr<float>() : nullptr;
    const uint64_t k = static_cast<uint64_t>(keys[t]);
    const uint32_t k0 = static_cast<uint32_t>(k), k1 = static_cast<uint32_t>(k >> 32);
    const float* row = row0 + t * anadp::N_COLS;
    float* g = grads[t].data_ptr<float>();
    const bool sq = stat == 1;
    switch (p.scalar_type()) {
      case torch::kFloat32:
        partial[it] = update_block(p.data_ptr<float>(), g, m, v, b, len, row, kind, noise, sq, store_grad, k0, k1, &moment[it]);
        break;
      case torch::kBFloat16:
        partial[it] = update_block(p.data_ptr<c10::BFloat16>(), g, m, v, b, len, row, kind, noise, sq, store_grad, k0, k1, &moment[it]);
        break;
      case torch::kHalf:
        partial[it] = update_block(p.data_ptr<c10::Half>(), g, m, v, b, len, row, kind, noise, sq, store_grad, k0, k1, &moment[it]);
        break;
      default:
        break;  // refused before the loop
    }
  }
  auto out = torch::zeros({2, static_cast<int64_t>(n)}, torch::kFloat64);
  double* o = out.data_ptr<double>();
  for (int64_t it = 0; it < items; ++it) {
    o[item_tensor[it]] += partial[it];
    o[n + item_tensor[it]] += moment[it];
  }
  return out;
}

}  // namespace anadp_cpu
