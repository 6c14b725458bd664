// Per-sample squared gradient norms without per-sample gradients in memory.
// Reference: anadp/records.py (LinearRecord.sq_norm, the bias DenseRecord,
// EmbeddingRecord.sq_norm); the same in Triton: kernels/norms.py.
// Each block writes one partial; the caller sums them (no atomics, no zeroing).
#include "launchers.h"
#include "update.cuh"

namespace anadp {

// block (b, t): sum_u (a_t . a_u)(g_t . g_u) and sum_u g_t . g_u (the bias norm's row t)
__global__ void ghost_norm_kernel(int64_t T, int64_t d, int64_t p, const float* A, int64_t sab, int64_t sat,
                                  const float* G, int64_t sgb, int64_t sgt, float* w_part, float* b_part) {
  const int64_t b = blockIdx.x, t = blockIdx.y;
  const float* at = A + b * sab + t * sat;
  const float* gt = G + b * sgb + t * sgt;
  float w = 0.0f, bias = 0.0f;
  for (int64_t u = 0; u < T; ++u) {
    const float* au = A + b * sab + u * sat;
    const float* gu = G + b * sgb + u * sgt;
    float aa = 0.0f, gg = 0.0f;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) aa += at[j] * au[j];
    for (int64_t j = threadIdx.x; j < p; j += blockDim.x) gg += gt[j] * gu[j];
    aa = block_sum(aa);
    gg = block_sum(gg);
    w += aa * gg;
    bias += gg;
  }
  if (threadIdx.x == 0) {
    w_part[b * T + t] = w;
    b_part[b * T + t] = bias;
  }
}

// block (b, i): rows i*kPTile.. of the (p, d) per-sample gradient sum_t g_t a_t^T, one element per thread step
__global__ void instantiated_norm_kernel(int64_t T, int64_t d, int64_t p, const float* A, int64_t sab, int64_t sat,
                                         const float* G, int64_t sgb, int64_t sgt, float* w_part, float* b_part) {
  const int64_t b = blockIdx.x, i0 = static_cast<int64_t>(blockIdx.y) * kPTile;
  const int64_t rows = min(static_cast<int64_t>(kPTile), p - i0);
  float w = 0.0f, bias = 0.0f;
  for (int64_t k = threadIdx.x; k < rows * d; k += blockDim.x) {
    const int64_t i = i0 + k / d, j = k % d;
    float s = 0.0f;
    for (int64_t t = 0; t < T; ++t) s += G[b * sgb + t * sgt + i] * A[b * sab + t * sat + j];
    w += s * s;
  }
  for (int64_t k = threadIdx.x; k < rows; k += blockDim.x) {
    float s = 0.0f;
    for (int64_t t = 0; t < T; ++t) s += G[b * sgb + t * sgt + i0 + k];
    bias += s * s;
  }
  w = block_sum(w);
  bias = block_sum(bias);
  if (threadIdx.x == 0) {
    w_part[b * gridDim.y + blockIdx.y] = w;
    b_part[b * gridDim.y + blockIdx.y] = bias;
  }
}

// block (b, t): sum over u with idx_u == idx_t of g_t . g_u
__global__ void embedding_norm_kernel(int64_t T, int64_t d, const int64_t* idx, int64_t sib, int64_t sit,
                                      const float* G, int64_t sgb, int64_t sgt, float* part) {
  const int64_t b = blockIdx.x, t = blockIdx.y;
  const int64_t row = idx[b * sib + t * sit];
  const float* gt = G + b * sgb + t * sgt;
  float total = 0.0f;
  for (int64_t u = 0; u < T; ++u) {
    if (idx[b * sib + u * sit] != row) continue;  // the same for every thread of the block
    const float* gu = G + b * sgb + u * sgt;
    float gg = 0.0f;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) gg += gt[j] * gu[j];
    total += block_sum(gg);
  }
  if (threadIdx.x == 0) part[b * T + t] = total;
}

cudaError_t launch_linear_sq_norms(bool ghost, int64_t B, int64_t T, int64_t d, int64_t p, const float* A,
                                   int64_t stride_ab, int64_t stride_at, const float* G, int64_t stride_gb,
                                   int64_t stride_gt, float* w_part, float* b_part, cudaStream_t stream) {
  if (B == 0 || T == 0) return cudaSuccess;
  if (ghost) {
    const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(T));
    ghost_norm_kernel<<<grid, kThreads, 0, stream>>>(T, d, p, A, stride_ab, stride_at, G, stride_gb, stride_gt,
                                                     w_part, b_part);
  } else {
    const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>((p + kPTile - 1) / kPTile));
    instantiated_norm_kernel<<<grid, kThreads, 0, stream>>>(T, d, p, A, stride_ab, stride_at, G, stride_gb,
                                                            stride_gt, w_part, b_part);
  }
  return cudaGetLastError();
}

cudaError_t launch_embedding_sq_norms(int64_t B, int64_t T, int64_t d, const int64_t* idx, int64_t stride_ib,
                                      int64_t stride_it, const float* G, int64_t stride_gb, int64_t stride_gt,
                                      float* part, cudaStream_t stream) {
  if (B == 0 || T == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(T));
  embedding_norm_kernel<<<grid, kThreads, 0, stream>>>(T, d, idx, stride_ib, stride_it, G, stride_gb, stride_gt, part);
  return cudaGetLastError();
}

}  // namespace anadp
