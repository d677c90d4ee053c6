// Linear combinations of stages, u + sum_j w_j k_j, as one autograd node.
#pragma once

#include <torch/types.h>

#include <vector>

namespace diffeqlayers {

// u + sum_j w[j] * k[j] (u may be undefined: then just the sum; w and k of equal length, at
// least one term). When autograd records, the result is one node whose backward hands grad to
// u and w[j] * grad to each k[j]: a Runge-Kutta stage costs one node instead of one per term,
// which is most of the unrolled graph when f is small. Otherwise it is computed in place into
// one fresh tensor.
torch::Tensor lincomb(const torch::Tensor& u, const std::vector<torch::Tensor>& k,
                      const std::vector<double>& w);

}  // namespace diffeqlayers
