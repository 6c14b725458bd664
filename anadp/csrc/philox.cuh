// Philox 4x32-10 and the Gaussian of triton.language.randn, bit for bit the
// stream of anadp/philox.py and of the Triton kernels: element e of a noise
// group with 64-bit key k is randn(k, e), counter (e_lo, e_hi, 0, 0).
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

__host__ __device__ inline float randn(uint64_t key, uint64_t offset) {
  uint32_t w0, w1;
  randint2(key, offset, w0, w1);
  const float u1 = fmaxf(uint_to_uniform(w0), 1.0e-7f);
  const float th = uint_to_uniform(w1) * 6.283185307179586f;
  return sqrtf(-2.0f * logf(u1)) * cosf(th);
}

}  // namespace anadp
