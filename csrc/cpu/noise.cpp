// CPU backend: the Philox Gaussian noise of anadp/philox.py, in one fused loop
// (OpenMP threads, SIMD lanes; the block generator in gaussian.h). The same Philox source as the
// CUDA kernels (csrc/philox.cuh); torch reference: anadp.philox.gaussian. Built on first use
// by anadp/backends/cpu.py (torch.utils.cpp_extension.load, cached); bound in bindings.cpp.
#include <torch/extension.h>

#include "gaussian.h"

namespace {

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace

namespace anadp_cpu {

// out[i] += std * randn(key, offset0 + i), in place
void add_gaussian_(torch::Tensor out, int64_t key, double std, int64_t offset0) {
  check(out, "out");
  TORCH_CHECK(offset0 >= 0, "offset0 must be >= 0");
  float* o = out.data_ptr<float>();
  const int64_t n = out.numel();
  const uint64_t k = static_cast<uint64_t>(key);
  const uint32_t k0 = static_cast<uint32_t>(k), k1 = static_cast<uint32_t>(k >> 32);
  const float s = static_cast<float>(std);
  const uint64_t base = static_cast<uint64_t>(offset0);
#pragma omp parallel for schedule(static) if (n > 4 * kBlock)
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t m = std::min(kBlock, n - b);
    alignas(64) float z[kBlock];
    gaussian_block(k0, k1, base + static_cast<uint64_t>(b), m, z);
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) o[b + i] += s * z[i];
  }
}

// add_gaussian_ on every tensor of a list, each from element 0 of its own key: one call for all of
// a step's tensors (the Python call per tensor was most of the noise's host time)
void add_gaussian_multi_(std::vector<torch::Tensor> outs, std::vector<int64_t> keys, std::vector<double> stds) {
  TORCH_CHECK(outs.size() == keys.size() && outs.size() == stds.size(), "one key and one std per tensor");
  for (size_t i = 0; i < outs.size(); ++i) add_gaussian_(outs[i], keys[i], stds[i], 0);
}

// anadp.philox.group_key for each group of one (seed, step): Philox of counter (step_lo, step_hi,
// group, domain) under key (seed_lo, seed_hi), words 0 | 1 << 32 (as int64 bits). The Python loop of
// plain-int Philox took ~10 us a key, 2 ms a step for BERT-base's ~200 tensors
std::vector<int64_t> group_keys(int64_t seed, int64_t step, std::vector<int64_t> groups, int64_t domain) {
  const uint64_t s = static_cast<uint64_t>(seed), t = static_cast<uint64_t>(step);
  std::vector<int64_t> out(groups.size());
  for (size_t i = 0; i < groups.size(); ++i) {
    uint32_t c[4] = {static_cast<uint32_t>(t), static_cast<uint32_t>(t >> 32), static_cast<uint32_t>(groups[i]),
                     static_cast<uint32_t>(domain)};
    anadp::philox4x32_10(c, static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32));
    out[i] = static_cast<int64_t>(static_cast<uint64_t>(c[0]) | (static_cast<uint64_t>(c[1]) << 32));
  }
  return out;
}

// the four Philox words per counter, as int64 in [0, 2**32): for the bit-equality tests
torch::Tensor philox_words(int64_t key, torch::Tensor counters) {
  TORCH_CHECK(counters.device().is_cpu() && counters.scalar_type() == torch::kInt64 && counters.is_contiguous(),
              "counters must be a contiguous CPU int64 tensor");
  const int64_t n = counters.numel();
  auto out = torch::empty({4, n}, counters.options());
  const int64_t* ctr = counters.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  const uint64_t k = static_cast<uint64_t>(key);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t w0, w1, w2, w3;
    philox_lane(static_cast<uint64_t>(ctr[i]), static_cast<uint32_t>(k), static_cast<uint32_t>(k >> 32), w0, w1, w2,
                w3);
    o[i] = w0;
    o[n + i] = w1;
    o[2 * n + i] = w2;
    o[3 * n + i] = w3;
  }
  return out;
}

}  // namespace anadp_cpu
