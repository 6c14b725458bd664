// Host build of csrc/philox.cuh (no GPU needed): prints, for counters base..base+n-1, the four
// uint32 words of Philox and the stream's four Gaussians (randn4), then randn of the scattered
// elements 4 base + 1, 4 base + 6, ... (one of every five). tests/test_cuda_ext.py compares them
// with anadp/philox.py.
#include <cstdio>
#include <cstdlib>

#include "../../csrc/philox.cuh"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s KEY BASE N\n", argv[0]);
    return 2;
  }
  const uint64_t key = std::strtoull(argv[1], nullptr, 10), base = std::strtoull(argv[2], nullptr, 10);
  const long n = std::strtol(argv[3], nullptr, 10);
  for (long i = 0; i < n; ++i) {
    uint32_t w[4];
    float z[4];
    anadp::randint4(key, base + i, w);
    anadp::randn4(key, base + i, z);
    const float scattered = anadp::randn(key, 4 * base + 1 + 5 * static_cast<uint64_t>(i));
    std::printf("%u %u %u %u %.9g %.9g %.9g %.9g %.9g\n", w[0], w[1], w[2], w[3], z[0], z[1], z[2], z[3], scattered);
  }
  return 0;
}
