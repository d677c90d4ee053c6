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

// Forward mode (dual tensors at level 0, as diffeq_fd and diffeq_jvp make them), for code that
// combines many duals: the primals and tangents are taken apart once, combined with plain ops, and
// paired again, instead of every op paying the dual (and vmap) dispatch.
struct SplitDuals {
  std::vector<torch::Tensor> primals;
  // Per term: the tangent as a plain tensor, a batched (vmap) tangent as its physical tensor with
  // the batch dimension first; undefined where the term has no tangent.
  std::vector<torch::Tensor> tangents;
  int64_t level = -1;  // the vmap level of batched tangents (-1: none is batched)
  int64_t batch = 0;   // their batch size
};

// false when some tangent has a layout this does not handle (then use plain ops on the duals).
bool split_duals(const std::vector<torch::Tensor>& terms, SplitDuals& out);

// The dual of `primal` and `tangent` (batched at `level` along dimension 0 when level >= 0).
torch::Tensor make_dual(const torch::Tensor& primal, const torch::Tensor& tangent, int64_t level);

}  // namespace diffeqlayers
