// Optimizer arithmetic of the fused update: torch's foreach SGD / Adam / AdamW
// in float32, hyperparameters from one row of anadp/update_table.py's table
// (the same sequence as kernels/update.py). Host and device: the CUDA kernels
// (update.cuh) and the CPU fused update (cpu/update.cpp) share it.
#pragma once
#include <cmath>

#ifdef __CUDACC__
#define ANADP_HD __host__ __device__
#else
#define ANADP_HD
#endif

namespace anadp {

// columns of a row (anadp/update_table.py)
enum Col { LR, WD, BETA1, BETA2, EPS, STEP_SIZE, BC2_SQRT, FLAG, FIRST, NOISE_STD, INV_DENOM,
           ONE_MINUS_BETA1, ONE_MINUS_BETA2, DECAY, NOISE_VAR, VAR_FLOOR, N_COLS };
enum Kind { SGD = 0, ADAM = 1 };

// SGD with weight decay, momentum (dampening, nesterov); buf is read unless this is its first step
ANADP_HD inline float sgd(float p, float g, float* buf, const float* row) {
  g += row[WD] * p;
  const float momentum = row[BETA1];
  if (momentum != 0.0f) {
    const float b = row[FIRST] != 0.0f ? g : *buf * momentum + row[ONE_MINUS_BETA1] * g;
    *buf = b;
    g = row[FLAG] != 0.0f ? g + momentum * b : b;
  }
  return p - row[LR] * g;
}

// Adam (L2 weight decay) or AdamW (kDecoupled), bias-corrected; with kCorrected (NOISE_VAR > 0) the noise's
// variance is taken out of v_hat, floored at VAR_FLOOR (anadp/adam_correction.py). Branch-free for a given
// pair, so that a loop over elements vectorizes (cpu/update.cpp)
template <bool kDecoupled, bool kCorrected>
ANADP_HD inline float adam_as(float p, float g, float* m, float* v, const float* row) {
  if (kDecoupled) {
    p *= row[DECAY];
  } else {
    g += row[WD] * p;
  }
  const float mm = *m + row[ONE_MINUS_BETA1] * (g - *m);  // lerp, as torch
  const float vv = *v * row[BETA2] + row[ONE_MINUS_BETA2] * (g * g);
  *m = mm;
  *v = vv;
  if (kCorrected) {
    const float vhat = vv / (row[BC2_SQRT] * row[BC2_SQRT]);
    return p - row[STEP_SIZE] * (mm / (sqrtf(fmaxf(vhat - row[NOISE_VAR], row[VAR_FLOOR])) + row[EPS]));
  }
  return p - row[STEP_SIZE] * (mm / (sqrtf(vv) / row[BC2_SQRT] + row[EPS]));
}

// adam_as for the row's flags (FLAG: decoupled weight decay; NOISE_VAR > 0: the noise correction)
ANADP_HD inline float adam(float p, float g, float* m, float* v, const float* row) {
  if (row[FLAG] != 0.0f) {
    return row[NOISE_VAR] > 0.0f ? adam_as<true, true>(p, g, m, v, row) : adam_as<true, false>(p, g, m, v, row);
  }
  return row[NOISE_VAR] > 0.0f ? adam_as<false, true>(p, g, m, v, row) : adam_as<false, false>(p, g, m, v, row);
}

}  // namespace anadp
