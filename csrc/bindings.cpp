// pybind11 bindings of the csrc/ kernels (module anadp._cuda). Argument checks
// that need no GPU (shapes, tile tables, dtype codes) live in anadp/cuda_ops.py
// and anadp/update_table.py, where the CPU tests reach them; here: device,
// dtype and contiguity of what reaches a raw pointer.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "launchers.h"

namespace {

void check(const torch::Tensor& t, const char* name, torch::ScalarType dtype) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", c10::toString(dtype), ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void ok(cudaError_t e) { TORCH_CHECK(e == cudaSuccess, "anadp CUDA kernel launch failed: ", cudaGetErrorString(e)); }

void multi_tensor_update(torch::Tensor tile_tensor, torch::Tensor tile_start, torch::Tensor p_addr,
                         torch::Tensor g_addr, torch::Tensor m_addr, torch::Tensor v_addr, torch::Tensor numel,
                         torch::Tensor keys, torch::Tensor rows, torch::Tensor sens, int64_t dtype, int64_t kind,
                         bool noise, int64_t tile, int64_t stat) {
  check(tile_tensor, "tile_tensor", torch::kInt32);
  for (auto* t : {&tile_start, &p_addr, &g_addr, &m_addr, &v_addr, &numel, &keys}) check(*t, "table", torch::kInt64);
  check(rows, "rows", torch::kFloat32);
  check(sens, "sens", torch::kFloat32);
  TORCH_CHECK(tile_start.numel() == tile_tensor.numel() && sens.numel() == tile_tensor.numel(),
              "tile tables and sens must have one entry per tile");
  TORCH_CHECK(tile > 0 && tile % 4 == 0, "tile must be a positive multiple of 4 (four elements share a Philox call)");
  TORCH_CHECK(stat == 0 || stat == 1, "stat must be 0 (|p * grad|) or 1 (grad^2)");
  const c10::cuda::CUDAGuard guard(sens.device());
  ok(anadp::launch_multi_tensor_update(
      static_cast<int>(dtype), static_cast<int>(kind), noise, static_cast<int>(stat), tile_tensor.numel(), tile,
      tile_tensor.data_ptr<int32_t>(), tile_start.data_ptr<int64_t>(), p_addr.data_ptr<int64_t>(),
      g_addr.data_ptr<int64_t>(), m_addr.data_ptr<int64_t>(), v_addr.data_ptr<int64_t>(), numel.data_ptr<int64_t>(),
      keys.data_ptr<int64_t>(), rows.data_ptr<float>(), sens.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
}

torch::Tensor philox_randint(int64_t key, torch::Tensor offsets) {
  check(offsets, "offsets", torch::kInt64);
  auto out = torch::empty({2, offsets.numel()}, offsets.options().dtype(torch::kInt32));
  const c10::cuda::CUDAGuard guard(offsets.device());
  ok(anadp::launch_philox_randint(static_cast<uint64_t>(key), offsets.numel(), offsets.data_ptr<int64_t>(),
                                  out.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "anadp CUDA kernels: multi-tensor noise + update, Philox";
  m.def("multi_tensor_update", &multi_tensor_update);
  m.def("philox_randint", &philox_randint);
}
