// The cpu backend's compiled module (anadp/backends/cpu.py builds it on first use).
#include <torch/extension.h>

namespace anadp_cpu {
void add_gaussian_(torch::Tensor out, int64_t key, double std, int64_t offset0);
void add_gaussian_multi_(std::vector<torch::Tensor> outs, std::vector<int64_t> keys, std::vector<double> stds);
torch::Tensor philox_words(int64_t key, torch::Tensor counters);
torch::Tensor multi_tensor_update(std::vector<torch::Tensor> params, std::vector<torch::Tensor> grads,
                                  std::vector<c10::optional<torch::Tensor>> ms,
                                  std::vector<c10::optional<torch::Tensor>> vs, std::vector<int64_t> keys,
                                  torch::Tensor rows, int64_t kind, bool noise, int64_t stat, bool store_grad);
std::vector<int64_t> group_keys(int64_t seed, int64_t step, std::vector<int64_t> groups, int64_t domain);
torch::Tensor maximize_gain(torch::Tensor log_x0, torch::Tensor G2, double G2_rest, torch::Tensor alpha,
                            torch::Tensor d, double n, bool adaptive, double lo, double hi, int64_t iterations);
}  // namespace anadp_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_gaussian_", &anadp_cpu::add_gaussian_, "out += std * randn(key, offset0 + i), in place");
  m.def("add_gaussian_multi_", &anadp_cpu::add_gaussian_multi_, "add_gaussian_ on each tensor with its key and std");
  m.def("philox_words", &anadp_cpu::philox_words, "the four Philox 4x32-10 words per counter");
  m.def("multi_tensor_update", &anadp_cpu::multi_tensor_update,
        "noise + scale + statistic + SGD/Adam update of every tensor (the fused update's contract)");
  m.def("group_keys", &anadp_cpu::group_keys, "anadp.philox.group_key of each group of one (seed, step)");
  m.def("maximize_gain", &anadp_cpu::maximize_gain, "anadp's step-gain maximizer (NoiseAllocator._best_for_step)");
}
