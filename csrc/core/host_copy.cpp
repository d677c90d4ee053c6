#include "core/host_copy.h"

#include "core/lincomb.h"

namespace diffeqlayers {

torch::Tensor copy_to_device(const torch::Tensor& host, const at::TensorOptions& options) {
  if (!options.device().is_cuda()) return host.to(options, /*non_blocking=*/false, /*copy=*/true);
  torch::Tensor pinned =
      at::empty(host.sizes(), at::TensorOptions().dtype(options.dtype()).pinned_memory(true));
  pinned.copy_(host);  // converts the dtype on the host
  return pinned.to(options.device(), /*non_blocking=*/true);
}

torch::Tensor copy_to_device(const double* v, at::IntArrayRef shape,
                             const at::TensorOptions& options) {
  return copy_to_device(
      torch::from_blob(const_cast<double*>(v), shape, torch::dtype(torch::kFloat64)), options);
}

std::vector<double> host_doubles(const torch::Tensor& x) {
  const int64_t n = x.numel();
  if (x.device().is_cpu() && x.is_contiguous() && plain_strided(x) && !x.is_neg()) {
    if (x.scalar_type() == at::kDouble) {
      const double* p = x.const_data_ptr<double>();
      return std::vector<double>(p, p + n);
    }
    if (x.scalar_type() == at::kFloat) {
      const float* p = x.const_data_ptr<float>();
      return std::vector<double>(p, p + n);
    }
  }
  const torch::Tensor c = x.detach().to(at::kCPU, at::kDouble).contiguous();
  const double* p = c.const_data_ptr<double>();
  return std::vector<double>(p, p + n);
}

torch::Tensor indices_on(const std::vector<int64_t>& idx, const at::Device& device) {
  return copy_to_device(
      torch::from_blob(const_cast<int64_t*>(idx.data()), {static_cast<int64_t>(idx.size())},
                       torch::dtype(torch::kInt64)),
      torch::dtype(torch::kInt64).device(device));
}

}  // namespace diffeqlayers
