// The Philox Gaussian stream of anadp/philox.py on the CPU, a block at a time (SIMD lanes):
// shared by the noise kernel (noise.cpp) and the fused update (update.cpp).
#pragma once
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

namespace anadp_cpu {

constexpr int64_t kBlock = 1024;  // elements per inner SIMD block (fits in L1 with its temporaries)
constexpr int kLanes = 16;        // log / cos always run kLanes at a time (see gaussian_block)

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

// z[i] = randn(key, base + i) for i < m (m <= kBlock; z holds kBlock floats, lanes past m are scratch)
inline void gaussian_block(uint32_t k0, uint32_t k1, uint64_t base, int64_t m, float* z) {
  const int64_t padded = (m + kLanes - 1) / kLanes * kLanes;  // the lanes past m are drawn and dropped
  alignas(64) float u1[kBlock], th[kBlock];
#pragma omp simd
  for (int64_t i = 0; i < padded; ++i) {
    uint32_t w0, w1;
    philox_lane(base + static_cast<uint64_t>(i), k0, k1, w0, w1);
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
}

}  // namespace anadp_cpu
