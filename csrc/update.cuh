// The fused update's device side: dtype conversions and the block reduction; the
// arithmetic and the table's columns are in update_math.h (shared with the CPU kernel).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "update_math.h"

namespace anadp {

__device__ inline float to_float(float x) { return x; }
__device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ inline float to_float(__half x) { return __half2float(x); }
template <typename T> __device__ inline T from_float(float x);
template <> __device__ inline float from_float<float>(float x) { return x; }
template <> __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ inline __half from_float<__half>(float x) { return __float2half_rn(x); }

// sum over the block, returned to every thread (blockDim.x a multiple of 32, at most 1024)
__device__ inline float block_sum(float x) {
  __shared__ float warp_sums[32];
  for (int o = 16; o > 0; o /= 2) x += __shfl_down_sync(0xffffffffu, x, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // warp_sums may still be read from the previous call
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += warp_sums[w];
  return total;
}

}  // namespace anadp
