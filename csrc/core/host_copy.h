// Host values into tensors on the state's device without blocking the host, and back.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <vector>

namespace diffeqlayers {

// v (numel(shape) host doubles, copied) as a tensor of `shape` with `options`' dtype and device.
// On a CUDA device the values go through a pinned staging buffer and a non-blocking copy on the
// current stream: a copy from pageable memory synchronizes the stream with the host, one stall
// per call (measured on an H200, 2026-12-04: the interpolation weights of each step with save
// points made a dopri5 solve synchronize twice per step instead of once). The caching host
// allocator keeps the staging buffer until the copy has run.
torch::Tensor copy_to_device(const double* v, at::IntArrayRef shape,
                             const at::TensorOptions& options);
// A CPU tensor (possibly borrowing host memory) as a new tensor with `options`, the same way.
torch::Tensor copy_to_device(const torch::Tensor& host, const at::TensorOptions& options);
// The values of a real tensor (any dtype and device), in order, as host doubles: read in place
// from a contiguous CPU float or double tensor, else through a converted copy.
std::vector<double> host_doubles(const torch::Tensor& x);
// Indices (int64) onto `device`, the same way.
torch::Tensor indices_on(const std::vector<int64_t>& idx, const at::Device& device);

}  // namespace diffeqlayers
