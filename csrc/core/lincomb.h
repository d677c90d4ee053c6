// Linear combinations of stages, u + sum_j w_j k_j, as one autograd node.
#pragma once

#include <torch/types.h>

#include <vector>

namespace diffeqlayers {

// u + sum_j w[j] * k[j] (u may be undefined: then just the sum; w and k of equal length, at
// least one term). When autograd records, the result is one node whose backward hands grad to
// u and w[j] * grad to each k[j]: a Runge-Kutta stage costs one node instead of one per term,
// which is most of the unrolled graph when f is small. Otherwise it is computed in place into
// one fresh tensor, or into `buffer` when one is given (a tensor of the result's shape, dtype
// and device that overlaps no term and that nothing else reads afterwards: the no-grad paths
// recycle their stage buffers this way). The buffer is ignored when the result records a graph
// or carries tangents: those paths never write in place. Both run the registered operator
// diffeqlayers::lincomb (csrc/kernels/ops.cpp).
torch::Tensor lincomb(const torch::Tensor& u, const std::vector<torch::Tensor>& k,
                      const std::vector<double>& w, const torch::Tensor& buffer = {});

// sum_j w[j] * terms[j], unrecorded (the kernels of diffeqlayers::lincomb): one fused loop for
// contiguous CPU float/double terms of one shape, ATen ops otherwise. Every mode's primal
// combination goes through here, so the modes agree bitwise.
torch::Tensor combine_terms(at::TensorList terms, at::ArrayRef<double> w);
// The same into `out` (the terms' broadcast shape, overlapping no term).
void combine_terms_into(const torch::Tensor& out, at::TensorList terms, at::ArrayRef<double> w);

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
// with_primals=false leaves out.primals undefined, for callers that read a dual's data in place
// (a dual's data is its primal's: _make_dual aliases the primal).
bool split_duals(const std::vector<torch::Tensor>& terms, SplitDuals& out,
                 bool with_primals = true);

// The dual of `primal` and `tangent` (batched at `level` along dimension 0 when level >= 0).
torch::Tensor make_dual(const torch::Tensor& primal, const torch::Tensor& tangent, int64_t level);

// A dense strided tensor with no wrapper (vmap, functorch, Python subclass, functionalisation)
// in its dispatch keys: its data is its primal's, readable in place (variable_data(), data_ptr).
bool plain_strided(const torch::Tensor& t);

// A plain_strided CPU tensor of this dtype, not a lazily conjugated or negated view, carrying no
// forward-mode tangent: its elements can be read (and written) in place by host loops.
bool plain_cpu(const torch::Tensor& x, at::ScalarType dtype);

// Whether a backward can read its incoming gradient g by host loops: g is a contiguous plain_cpu
// float/double tensor, and the backward records nothing (no create_graph with g requiring grad).
bool host_loop_grad(const torch::Tensor& g);

// For each tensor of wrt, the position in params of the very same tensor (by identity), or -1.
// Returns false, leaving which unspecified, when two entries of wrt are one tensor of params
// (one accumulation buffer per tensor of params could not serve both).
bool positions_by_identity(at::TensorList wrt, at::TensorList params, std::vector<int64_t>& which);

// t without autograd history or tangents: t itself when it has none (no autograd metadata),
// else t.detach(). Saves the detach's dispatch and view on the plain tensors of no-grad solves.
inline torch::Tensor detached(const torch::Tensor& t) {
  return t.defined() && t.unsafeGetTensorImpl()->autograd_meta() != nullptr ? t.detach() : t;
}

// Whether every value of t (its primal's, for a dual) is finite. Contiguous plain CPU
// float/double tensors are read in a host loop; others take a sum and one synchronisation.
bool all_finite(const torch::Tensor& t);

}  // namespace diffeqlayers
