// Optimizer arithmetic of the fused update: torch's foreach SGD / Adam / AdamW
// in float32, hyperparameters from one row of anadp/update_table.py's table
// (the same sequence as kernels/update.py).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace anadp {

// columns of a row (anadp/update_table.py)
enum Col { LR, WD, BETA1, BETA2, EPS, STEP_SIZE, BC2_SQRT, FLAG, FIRST, NOISE_STD, INV_DENOM,
           ONE_MINUS_BETA1, ONE_MINUS_BETA2, DECAY, N_COLS };
enum Kind { SGD = 0, ADAM = 1 };

__device__ inline float to_float(float x) { return x; }
__device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ inline float to_float(__half x) { return __half2float(x); }
template <typename T> __device__ inline T from_float(float x);
template <> __device__ inline float from_float<float>(float x) { return x; }
template <> __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ inline __half from_float<__half>(float x) { return __float2half_rn(x); }

// SGD with weight decay, momentum (dampening, nesterov); buf is read unless this is its first step
__device__ inline float sgd(float p, float g, float* buf, const float* row) {
  g += row[WD] * p;
  const float momentum = row[BETA1];
  if (momentum != 0.0f) {
    const float b = row[FIRST] != 0.0f ? g : *buf * momentum + row[ONE_MINUS_BETA1] * g;
    *buf = b;
    g = row[FLAG] != 0.0f ? g + momentum * b : b;
  }
  return p - row[LR] * g;
}

// Adam (L2 weight decay) or AdamW (FLAG: decoupled), bias-corrected
__device__ inline float adam(float p, float g, float* m, float* v, const float* row) {
  if (row[FLAG] != 0.0f) {
    p *= row[DECAY];
  } else {
    g += row[WD] * p;
  }
  const float mm = *m + row[ONE_MINUS_BETA1] * (g - *m);  // lerp, as torch
  const float vv = *v * row[BETA2] + row[ONE_MINUS_BETA2] * (g * g);
  *m = mm;
  *v = vv;
  return p - row[STEP_SIZE] * (mm / (sqrtf(vv) / row[BC2_SQRT] + row[EPS]));
}

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
