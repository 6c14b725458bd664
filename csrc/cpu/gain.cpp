// anadp's allocation: projected Adam ascent of the expected step gain on log x (x = 1 / w), the loop
// of anadp.allocation.NoiseAllocator._best_for_step (its numpy reference, same operations in the same
// order; sums run left to right where numpy's are pairwise, so results agree to rounding). Its
// ~300 iterations on arrays of one entry per noise group cost ~25 numpy calls each in Python.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

// glibc's vector exp (libmvec), so that the loops over the groups run in SIMD lanes (as noise.cpp's
// log / cos): the sums' order changes, which the numpy reference tolerates (1e-10 in its test)
#if defined(__x86_64__) && defined(__GLIBC__)
extern "C" {
__attribute__((simd("notinbranch"))) double exp(double);
}
#endif

namespace {

// Denormals flushed to zero in this thread while the maximizer runs, restored after: as the ascent
// converges its squared gradients fall below 1e-308, and denormal arithmetic made the loop 4x slower.
// A value that small changes nothing the maximizer returns (its numpy reference keeps them).
struct FlushDenormals {
#if defined(__x86_64__)
  unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040u); }  // flush-to-zero and denormals-are-zero
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

}  // namespace

namespace anadp_cpu {

// gradient of the gain at log_x (see NoiseAllocator.step_gain_grad): c_k - x_k^2 G_k^2 / N^2 sum_g c_g
static void gain_grad(const std::vector<double>& log_x, const double* G2, double G2_rest, const double* alpha,
                      const double* d, const double* root, double n, bool adaptive, std::vector<double>& x2,
                      std::vector<double>& c, std::vector<double>& out) {
  const size_t k = log_x.size();
  double N2 = 0.0;
  double* xx = x2.data();
  const double* lx = log_x.data();
#pragma omp simd reduction(+ : N2)
  for (size_t g = 0; g < k; ++g) {
    xx[g] = exp(2 * lx[g]);
    N2 += xx[g] * G2[g];
  }
  N2 += G2_rest;
  double csum = 0.0;
  double* cc = c.data();
#pragma omp simd reduction(+ : csum)
  for (size_t g = 0; g < k; ++g) {
    const double u = xx[g] * alpha[g] / (d[g] * N2);
    const double s = std::sqrt(u + 1e-300);
    const double r = s / n;
    const double q = 1 + r * r;
    const double dphi = adaptive ? 1 / (q * std::sqrt(q)) : 1.0;  // q^-1.5 without pow (its cost)
    cc[g] = root[g] * dphi * (u / (n * s));
    csum += cc[g];
  }
  double* o = out.data();
#pragma omp simd
  for (size_t g = 0; g < k; ++g) o[g] = cc[g] - xx[g] * G2[g] / N2 * csum;
}

torch::Tensor maximize_gain(torch::Tensor log_x0, torch::Tensor G2, double G2_rest, torch::Tensor alpha,
                            torch::Tensor d, double n, bool adaptive, double lo, double hi, int64_t iterations) {
  for (const auto& t : {log_x0, G2, alpha, d})
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat64 && t.is_contiguous() &&
                    t.numel() == log_x0.numel(), "maximize_gain takes contiguous float64 CPU tensors of one length");
  const FlushDenormals flush;
  const size_t k = log_x0.numel();
  const double *g2 = G2.data_ptr<double>(), *a = alpha.data_ptr<double>(), *dd = d.data_ptr<double>();
  std::vector<double> log_x(log_x0.data_ptr<double>(), log_x0.data_ptr<double>() + k), root(k), m(k, 0.0),
      v(k, 0.0), x2(k), c(k), grad(k);
  for (size_t g = 0; g < k; ++g) root[g] = std::sqrt(a[g] * dd[g]);
  const double b1 = 0.9, b2 = 0.999, eps = 1e-8;
  for (int64_t i = 0; i < iterations; ++i) {
    const double lr = 0.1 * (1 - static_cast<double>(i) / iterations) + 1e-3;
    gain_grad(log_x, g2, G2_rest, a, dd, root.data(), n, adaptive, x2, c, grad);
    const double t = static_cast<double>(i + 1);
    const double corr1 = 1 - std::pow(b1, t), corr2 = std::sqrt(1 - std::pow(b2, t));
    double *mm = m.data(), *vv = v.data(), *lx = log_x.data();
    const double* gd = grad.data();
#pragma omp simd
    for (size_t g = 0; g < k; ++g) {
      const double gr = -gd[g];
      mm[g] = b1 * mm[g] + (1 - b1) * gr;
      vv[g] = b2 * vv[g] + (1 - b2) * gr * gr;
      lx[g] = std::clamp(lx[g] - lr / corr1 * mm[g] / (std::sqrt(vv[g]) / corr2 + eps), lo, hi);
    }
  }
  auto out = torch::empty({static_cast<int64_t>(k)}, log_x0.options());
  std::copy(log_x.begin(), log_x.end(), out.data_ptr<double>());
  return out;
}

}  // namespace anadp_cpu
