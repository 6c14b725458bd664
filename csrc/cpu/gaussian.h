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

// glibc's vector logf / cosf / sinf (libmvec), without -ffast-math (whose reassociation would change the
// float roundings the stream is defined by): declared SIMD-callable, used with -fno-math-errno
#if defined(__x86_64__) && defined(__GLIBC__)
extern "C" {
__attribute__((simd("notinbranch"))) float logf(float);
__attribute__((simd("notinbranch"))) float cosf(float);
__attribute__((simd("notinbranch"))) float sinf(float);
}
#endif

namespace anadp_cpu {

constexpr int64_t kBlock = 1024;  // elements per inner SIMD block (fits in L1 with its temporaries)
constexpr int kLanes = 16;        // log / cos always run kLanes at a time (see gaussian_block)

// Philox 4x32-10 of counter (ctr_lo, ctr_hi, 0, 0): the four words (one SIMD lane)
inline void philox_lane(uint64_t ctr, uint32_t k0, uint32_t k1, uint32_t& w0, uint32_t& w1, uint32_t& w2,
                        uint32_t& w3) {
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
  w2 = c2;
  w3 = c3;
}

// c = r cos t, s = r sin t, r = sqrt(-2 log u), for n a multiple of kLanes. log, cos and sin in float, as
// the torch and Triton streams (libmvec is a few ulp off torch's SLEEF, <= 3.5e-7; in double 27% slower).
// Fixed groups of kLanes: every element goes through the same vector function (a scalar remainder loop
// would round differently), so a value depends on its offset only, not on where a call starts or ends.
// noinline: inlined into gaussian_block, GCC did not vectorize the calls (3.4x slower per element)
__attribute__((noinline)) inline void box_muller(const float* u, const float* t, float* c, float* s, int64_t n) {
  for (int64_t j = 0; j < n; j += kLanes) {
#pragma omp simd simdlen(kLanes)
    for (int i = 0; i < kLanes; ++i) {
      const float r = sqrtf(-2.0f * logf(u[j + i]));
      c[j + i] = r * cosf(t[j + i]);
      s[j + i] = r * sinf(t[j + i]);
    }
  }
}

// z[i] = element base + i of the stream of key (k0, k1) for i < m, m <= kBlock: elements 4j .. 4j + 3
// are randn4x(key, j) (csrc/philox.cuh), so one Philox call per four elements; z holds kBlock floats
inline void gaussian_block(uint32_t k0, uint32_t k1, uint64_t base, int64_t m, float* z) {
  constexpr int64_t kCounters = kBlock / 4 + kLanes;  // base need not be a multiple of 4: one counter more
  const uint64_t j0 = base >> 2;
  const int64_t skip = static_cast<int64_t>(base & 3);
  const int64_t counters = (skip + m + 3) / 4;
  const int64_t padded = (counters + kLanes - 1) / kLanes * kLanes;  // lanes past `counters`: drawn, dropped
  // per counter: the two Box-Muller pairs' uniforms, then their outputs (r cos, r sin of each pair)
  alignas(64) float u0[kCounters], t0[kCounters], u1[kCounters], t1[kCounters];
  alignas(64) float c0[kCounters], s0[kCounters], c1[kCounters], s1[kCounters];
#pragma omp simd
  for (int64_t i = 0; i < padded; ++i) {
    uint32_t w0, w1, w2, w3;
    philox_lane(j0 + static_cast<uint64_t>(i), k0, k1, w0, w1, w2, w3);
    u0[i] = std::max(anadp::uint_to_uniform(w0), 1.0e-7f);
    t0[i] = 6.283185307179586f * anadp::uint_to_uniform(w1);
    u1[i] = std::max(anadp::uint_to_uniform(w2), 1.0e-7f);
    t1[i] = 6.283185307179586f * anadp::uint_to_uniform(w3);
  }
  box_muller(u0, t0, c0, s0, padded);
  box_muller(u1, t1, c1, s1, padded);
  // into element order: element 4j + q is component q of counter j
  int64_t i = 0;
  if (skip == 0) {  // the usual case (blocks start at multiples of 4): whole counters, a SIMD interleave
    for (int64_t j = 0; j < m / 4; ++j) {
      z[4 * j] = c0[j];
      z[4 * j + 1] = s0[j];
      z[4 * j + 2] = c1[j];
      z[4 * j + 3] = s1[j];
    }
    i = m / 4 * 4;
  }
  for (; i < m; ++i) {
    const int64_t e = skip + i, j = e >> 2, q = e & 3;
    z[i] = q == 0 ? c0[j] : q == 1 ? s0[j] : q == 2 ? c1[j] : s1[j];
  }
}

}  // namespace anadp_cpu
