// CPU backend: the Philox Gaussian noise of anadp/philox.py, in one fused loop
// (OpenMP threads, SIMD lanes). The same Philox source as the CUDA kernels
// (csrc/philox.cuh); torch reference: anadp.philox.gaussian. Built on first use
// by anadp/backends/cpu.py (torch.utils.cpp_extension.load, cached); bound in bindings.cpp.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#define __host__
#define __device__
#include "../philox.cuh"
#undef __host__
#undef __device__

// glibc's vector logf / cosf (libmvec), without -ffast-math (whose reassociation would change the
// float roundings the stream is defined by): declared SIMD-callable, used with -fno-math-errno
#if defined(__x86_64__) && defined(__GLIBC__)
extern "C" {
__attribute__((simd("notinbranch"))) float logf(float);
__attribute__((simd("notinbranch"))) float cosf(float);
}
#endif

namespace {

constexpr int64_t kBlock = 1024;  // elements per inner SIMD block (fits in L1 with its temporaries)
constexpr int kLanes = 16;        // log / cos always run kLanes at a time (see add_gaussian_)

inline void philox_lane(uint64_t ctr, uint32_t k0, uint32_t k1, uint32_t& w0, uint32_t& w1) {
  uint32_t c0 = static_cast<uint32_t>(ctr), c1 = static_cast<uint32_t>(ctr >> 32), c2 = 0u, c3 = 0u;
  for (int r = 0; r < 10; ++r) {
    const uint64_t pb = static_cast<uint64_t>(anadp::kRoundB) * c2;
    const uint64_t pa = static_cast<uint64_t>(anadp::kRoundA) * c0;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += anadp::kKeyA;
    k1 += anadp::kKeyB;
  }
  w0 = c0;
  w1 = c1;
}

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// out[i] += std * randn(key, offset0 + i), in place
}  // namespace

namespace anadp_cpu {

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
    const int64_t padded = (m + kLanes - 1) / kLanes * kLanes;  // the lanes past m are drawn and dropped
    alignas(64) float u1[kBlock], th[kBlock], z[kBlock];
#pragma omp simd
    for (int64_t i = 0; i < padded; ++i) {
      uint32_t w0, w1;
      philox_lane(base + static_cast<uint64_t>(b + i), k0, k1, w0, w1);
      u1[i] = std::max(anadp::uint_to_uniform(w0), 1.0e-7f);
      th[i] = anadp::uint_to_uniform(w1) * 6.283185307179586f;
    }
    // log and cos in float, as the torch and Triton streams (libmvec is a few ulp off torch's SLEEF,
    // <= 3.5e-7; in double 27% slower). Fixed groups of kLanes: every element goes through the same
    // vector function (a scalar remainder loop would round differently), so a value depends on its
    // offset only, not on where a call starts or ends
    for (int64_t j = 0; j < padded; j += kLanes) {
#pragma omp simd simdlen(kLanes)
      for (int i = 0; i < kLanes; ++i) z[j + i] = sqrtf(-2.0f * logf(u1[j + i])) * cosf(th[j + i]);
    }
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

// the first two Philox words per offset, as int64 in [0, 2**32): for the bit-equality tests
torch::Tensor philox_words(int64_t key, torch::Tensor offsets) {
  TORCH_CHECK(offsets.device().is_cpu() && offsets.scalar_type() == torch::kInt64 && offsets.is_contiguous(),
              "offsets must be a contiguous CPU int64 tensor");
  const int64_t n = offsets.numel();
  auto out = torch::empty({2, n}, offsets.options());
  const int64_t* off = offsets.data_ptr<int64_t>();
  int64_t* w = out.data_ptr<int64_t>();
  const uint64_t k = static_cast<uint64_t>(key);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t w0, w1;
    philox_lane(static_cast<uint64_t>(off[i]), static_cast<uint32_t>(k), static_cast<uint32_t>(k >> 32), w0, w1);
    w[i] = w0;
    w[n + i] = w1;
  }
  return out;
}

}  // namespace anadp_cpu
