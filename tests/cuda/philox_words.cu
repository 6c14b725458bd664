// Host build of csrc/philox.cuh (no GPU needed): prints, for offsets base..base+n-1,
// the first two uint32 words of the stream and the Gaussian. tests/test_cuda_ext.py
// compares them with anadp/philox.py.
#include <cstdio>
#include <cstdlib>

#include "../../anadp/csrc/philox.cuh"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s KEY BASE N\n", argv[0]);
    return 2;
  }
  const uint64_t key = std::strtoull(argv[1], nullptr, 10), base = std::strtoull(argv[2], nullptr, 10);
  const long n = std::strtol(argv[3], nullptr, 10);
  for (long i = 0; i < n; ++i) {
    uint32_t w0, w1;
    anadp::randint2(key, base + i, w0, w1);
    std::printf("%u %u %.9g\n", w0, w1, anadp::randn(key, base + i));
  }
  return 0;
}
