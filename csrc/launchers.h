// Host launchers of the csrc/ kernels: raw device pointers and a stream, so that
// the .cu files need no torch headers (bindings.cpp adapts tensors to them).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace anadp {

constexpr int kThreads = 256;

// dtype: 0 float32, 1 bfloat16, 2 float16 (parameters; grads and state are float32). kind: 0 SGD, 1 Adam.
// stat: what sens sums over the privatized gradient, 0 |p * grad| (p before the update), 1 grad^2.
cudaError_t launch_multi_tensor_update(int dtype, int kind, bool noise, int stat, int64_t n_tiles, int64_t tile,
                                       const int32_t* tile_tensor, const int64_t* tile_start,
                                       const int64_t* p_addr, const int64_t* g_addr, const int64_t* m_addr,
                                       const int64_t* v_addr, const int64_t* numel, const int64_t* keys,
                                       const float* rows, float* sens, cudaStream_t stream);

// the first two uint32 words of tl.randint4x(key, offsets[i]) (bit-equality tests)
cudaError_t launch_philox_randint(uint64_t key, int64_t n, const int64_t* offsets, int32_t* out, cudaStream_t stream);

}  // namespace anadp
