// Philox 4x32-10 and the Gaussians of triton.language.randn4x, bit for bit the
// stream of anadp/philox.py and of the Triton kernels: elements 4j .. 4j + 3 of
// a noise group with 64-bit key k are randn4x(k, j), counter (j_lo, j_hi, 0, 0),
// Box-Muller on both word pairs.
#pragma once
#include <cmath>
#include <cstdint>

namespace anadp {

constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;      // Weyl key increments

__host__ __device__ inline void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
#ifdef __CUDA_ARCH__  // device pass only: the host compiler does not know the pragma
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    const uint64_t pb = static_cast<uint64_t>(kRoundB) * c[2];
    const uint64_t pa = static_cast<uint64_t>(kRoundA) * c[0];
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c[1] ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c[3] ^ k1;
    c[1] = static_cast<uint32_t>(pb);
    c[3] = static_cast<uint32_t>(pa);
    c[0] = n0;
    c[2] = n2;
    k0 += kKeyA;
    k1 += kKeyB;
  }
}

// the first two words of tl.randint4x(key, offset)
__host__ __device__ inline void randint2(uint64_t key, uint64_t offset, uint32_t& w0, uint32_t& w1) {
  uint32_t c[4] = {static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32), 0u, 0u};
  philox4x32_10(c, static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
  w0 = c[0];
  w1 = c[1];
}

// triton's uint_to_uniform_float: bitcast to int32, fold negatives (-x - 1 == ~x), scale into [0, 1)
__host__ __device__ inline float uint_to_uniform(uint32_t x) {
  const uint32_t folded = (x & 0x80000000u) ? ~x : x;
  return static_cast<float>(static_cast<int32_t>(folded)) * 4.6566127342e-10f;
}

// the four words of tl.randint4x(key, counter)
__host__ __device__ inline void randint4(uint64_t key, uint64_t counter, uint32_t w[4]) {
  w[0] = static_cast<uint32_t>(counter);
  w[1] = static_cast<uint32_t>(counter >> 32);
  w[2] = 0u;
  w[3] = 0u;
  philox4x32_10(w, static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
}

// tl.randn4x(key, counter): elements 4 counter .. 4 counter + 3 of the stream
__host__ __device__ inline void randn4(uint64_t key, uint64_t counter, float z[4]) {
  uint32_t w[4];
  randint4(key, counter, w);
  for (int pair = 0; pair < 2; ++pair) {
    const float u = fmaxf(uint_to_uniform(w[2 * pair]), 1.0e-7f);
    const float th = 6.283185307179586f * uint_to_uniform(w[2 * pair + 1]);
    const float r = sqrtf(-2.0f * logf(u));
    z[2 * pair] = r * cosf(th);
    z[2 * pair + 1] = r * sinf(th);
  }
}

// element e of the stream alone (four Gaussians drawn, one kept: for scattered elements)
__host__ __device__ inline float randn(uint64_t key, uint64_t e) {
  float z[4];
  randn4(key, e >> 2, z);
  return z[e & 3];
}

}  // namespace anadp
