// The solver's pure tensor kernels as registered operators (torch.ops.diffeqlayers.*), called
// through the dispatcher so that autograd, CUDA and fake tensors each find their kernel.
#pragma once

#include <torch/types.h>

#include <optional>
#include <vector>

namespace diffeqlayers::kernels {

// diffeqlayers::lincomb(Tensor? y, Tensor[] ks, float[] weights, float h=1.) -> Tensor:
// y + sum_j (h * weights[j]) * ks[j] (without y: just the sum). Each h * weights[j] is taken in
// double, then rounded to the dtype; per element the terms are added in order. Terms of one
// dtype and device; shapes broadcast.
torch::Tensor lincomb(const std::optional<torch::Tensor>& y, at::TensorList ks,
                      at::ArrayRef<double> weights, double h);

// diffeqlayers::lincomb_into(..., *, Tensor(a!) out) -> (): the same written into out, which
// must have the result's shape, dtype and device and overlap no input. No autograd.
void lincomb_into(const std::optional<torch::Tensor>& y, at::TensorList ks,
                  at::ArrayRef<double> weights, double h, const torch::Tensor& out);

// The combination sum_j weights[j] * terms[j] recorded by autograd as one node, without the
// dispatcher: for the solver's combinations when a term requires grad and all are contiguous CPU
// float/double tensors of one shape and dtype with no tangents (the caller checks; the result
// equals lincomb's bitwise, and so does the gradient).
torch::Tensor lincomb_recorded(at::TensorList terms, std::vector<double> weights);

// diffeqlayers::error_norm(Tensor[] ks, float[] weights, float h, Tensor y0, Tensor y1,
// float atol, float rtol) -> Tensor: the RMS norm of the scaled error estimate of a step,
//   e = sum_j (h * weights[j]) * ks[j],  s = e / (atol + rtol * max(|y0|, |y1|)),
//   sqrt(mean(s^2)),
// a 0-d tensor of the dtype of the inputs (all of one shape, dtype and device). NaN anywhere
// gives NaN.
torch::Tensor error_norm(at::TensorList ks, at::ArrayRef<double> weights, double h,
                         const torch::Tensor& y0, const torch::Tensor& y1, double atol,
                         double rtol);

}  // namespace diffeqlayers::kernels
