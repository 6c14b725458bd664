// Noise + optimizer update + ANADP sensitivity for a list of tensors in one launch
// (apex's multi_tensor_apply idea): block c handles tile c of tensor tile_tensor[c].
// Reference: the torch backend (DPOptimizer.privatize + NoiseAllocator + torch's step);
// the same kernel in Triton: kernels/multi_tensor.py.
#include "launchers.h"
#include "philox.cuh"
#include "update.cuh"

namespace anadp {

template <typename P, int KIND, bool NOISE>
__global__ void multi_tensor_update_kernel(int64_t tile, const int32_t* __restrict__ tile_tensor,
                                           const int64_t* __restrict__ tile_start, const int64_t* p_addr,
                                           const int64_t* g_addr, const int64_t* m_addr, const int64_t* v_addr,
                                           const int64_t* numel, const int64_t* keys, const float* __restrict__ rows,
                                           bool stat_sq, float* sens) {
  const int t = tile_tensor[blockIdx.x];
  const int64_t start = tile_start[blockIdx.x];
  const int64_t end = min(start + tile, numel[t]);
  P* __restrict__ p = reinterpret_cast<P*>(p_addr[t]);
  const float* __restrict__ g = reinterpret_cast<const float*>(g_addr[t]);
  float* __restrict__ m = reinterpret_cast<float*>(m_addr[t]);
  float* __restrict__ v = reinterpret_cast<float*>(v_addr[t]);
  const uint64_t key = static_cast<uint64_t>(keys[t]);
  // the hyperparameters once, into registers: read through a pointer, every store to p, m or v below
  // (which may alias it as far as the compiler knows) would make it read them again per element
  float row[N_COLS];
#pragma unroll
  for (int k = 0; k < N_COLS; ++k) row[k] = rows[static_cast<int64_t>(t) * N_COLS + k];
  float local = 0.0f;
  // each thread takes four consecutive elements: one Philox call gives their four Gaussians (randn4);
  // tiles start at multiples of 4 (the launcher refuses other tile sizes)
  for (int64_t e0 = start + 4 * static_cast<int64_t>(threadIdx.x); e0 < end; e0 += 4 * static_cast<int64_t>(blockDim.x)) {
    float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (NOISE) randn4(key, static_cast<uint64_t>(e0) >> 2, z);
#pragma unroll
    for (int q = 0; q < 4; ++q) {  // unrolled, no break: z stays in registers
      const int64_t e = e0 + q;
      if (e < end) {
        float grad = g[e];
        if (NOISE) grad += row[NOISE_STD] * z[q];
        grad *= row[INV_DENOM];
        float w = to_float(p[e]);
        local += stat_sq ? grad * grad : fabsf(w * grad);
        if (KIND == SGD) {
          float unused = 0.0f;
          w = sgd(w, grad, row[BETA1] != 0.0f ? m + e : &unused, row);
        } else {
          w = adam(w, grad, m + e, v + e, row);
        }
        p[e] = from_float<P>(w);
      }
    }
  }
  const float total = block_sum(local);
  if (threadIdx.x == 0) sens[blockIdx.x] = total;
}

template <typename P>
static cudaError_t launch_typed(int kind, bool noise, bool stat_sq, int64_t n_tiles, int64_t tile, const int32_t* ct,
                                const int64_t* cs, const int64_t* pa, const int64_t* ga, const int64_t* ma,
                                const int64_t* va, const int64_t* numel, const int64_t* keys, const float* rows,
                                float* sens, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(n_tiles)), block(kThreads);
  if (kind == SGD && noise)
    multi_tensor_update_kernel<P, SGD, true><<<grid, block, 0, stream>>>(tile, ct, cs, pa, ga, ma, va, numel, keys, rows, stat_sq, sens);
  else if (kind == SGD)
    multi_tensor_update_kernel<P, SGD, false><<<grid, block, 0, stream>>>(tile, ct, cs, pa, ga, ma, va, numel, keys, rows, stat_sq, sens);
  else if (noise)
    multi_tensor_update_kernel<P, ADAM, true><<<grid, block, 0, stream>>>(tile, ct, cs, pa, ga, ma, va, numel, keys, rows, stat_sq, sens);
  else
    multi_tensor_update_kernel<P, ADAM, false><<<grid, block, 0, stream>>>(tile, ct, cs, pa, ga, ma, va, numel, keys, rows, stat_sq, sens);
  return cudaGetLastError();
}

cudaError_t launch_multi_tensor_update(int dtype, int kind, bool noise, int stat, int64_t n_tiles, int64_t tile,
                                       const int32_t* tile_tensor, const int64_t* tile_start,
                                       const int64_t* p_addr, const int64_t* g_addr, const int64_t* m_addr,
                                       const int64_t* v_addr, const int64_t* numel, const int64_t* keys,
                                       const float* rows, float* sens, cudaStream_t stream) {
  if (n_tiles == 0) return cudaSuccess;
  if (kind != SGD && kind != ADAM) return cudaErrorInvalidValue;
  if (tile % 4 != 0) return cudaErrorInvalidValue;  // a thread's four elements share one Philox counter
  if (stat != 0 && stat != 1) return cudaErrorInvalidValue;
  const bool sq = stat == 1;
  switch (dtype) {
    case 0: return launch_typed<float>(kind, noise, sq, n_tiles, tile, tile_tensor, tile_start, p_addr, g_addr,
                                       m_addr, v_addr, numel, keys, rows, sens, stream);
    case 1: return launch_typed<__nv_bfloat16>(kind, noise, sq, n_tiles, tile, tile_tensor, tile_start, p_addr,
                                               g_addr, m_addr, v_addr, numel, keys, rows, sens, stream);
    case 2: return launch_typed<__half>(kind, noise, sq, n_tiles, tile, tile_tensor, tile_start, p_addr, g_addr,
                                        m_addr, v_addr, numel, keys, rows, sens, stream);
    default: return cudaErrorInvalidValue;
  }
}

__global__ void philox_randint_kernel(uint64_t key, int64_t n, const int64_t* offsets, int32_t* out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  uint32_t w0, w1;
  randint2(key, static_cast<uint64_t>(offsets[i]), w0, w1);
  out[i] = static_cast<int32_t>(w0);
  out[n + i] = static_cast<int32_t>(w1);
}

cudaError_t launch_philox_randint(uint64_t key, int64_t n, const int64_t* offsets, int32_t* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  philox_randint_kernel<<<static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(key, n, offsets, out);
  return cudaGetLastError();
}

}  // namespace anadp
