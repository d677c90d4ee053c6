// Forward-mode sensitivities: the solver run on dual tensors (diffeq_fd's Jacobian, and JVPs).
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

namespace diffeqlayers {

// Builds the dynamics from the given u0 and parameters, solves and reduces the solution to one
// tensor. Called once per forward-mode pass with dual tensors (same primals, different
// tangents); it must use the tensors it is given, not copies captured elsewhere, or their
// tangents are lost.
using SolveAndReduce =
    std::function<torch::Tensor(const torch::Tensor& u0, const std::vector<torch::Tensor>& params)>;

struct ForwardModeOptions {
  // Directions (scalar entries of u0 and of the parameters that require grad) per chunk; 0:
  // the default (see forward_mode.cpp for why chunks exist and how the size was chosen).
  int64_t chunk_size = 0;
  // Carry each chunk's directions in one pass as a batched tangent; false: one direction per
  // pass (also the automatic fallback when an op cannot run on batched tangents).
  bool vectorize = true;
  // Called when a batched pass failed, before falling back (the bindings clear the pending
  // Python error there). Empty: none.
  std::function<void()> on_vectorize_failure;
  // Called after each chunk with (directions done, total); may throw to abandon the solve
  // (the bindings use it to honour Ctrl-C). Empty: none.
  std::function<void(int64_t, int64_t)> on_chunk;
};

// y = solve_and_reduce(u0, params), differentiable with respect to u0 (when it requires grad) and
// to every parameter that requires grad. The Jacobian dy/d(inputs) is built in forward mode, one
// solve per chunk of scalar input directions (batched tangents), with exactly the steps of the
// plain solve (step-size control sees primal values only); backward returns grad_y . J.
// Differentiating twice is not supported.
//
// Forward AD has one process-global level: calls are serialised (a second thread waits), and a
// call made while a level is already active (inside torch.func.jvp or fwAD.dual_level) throws.
torch::Tensor diffeq_fd(const SolveAndReduce& solve_and_reduce, const torch::Tensor& u0,
                        const std::vector<torch::Tensor>& params,
                        const ForwardModeOptions& options = {});

// The output and its Jacobian [y.numel(), n] with respect to the n scalar entries of the inputs
// that require grad (u0 first, then the parameters in order, each flattened row-major), without
// recording anything for autograd.
std::pair<torch::Tensor, torch::Tensor> forward_jacobian(const SolveAndReduce& solve_and_reduce,
                                                         const torch::Tensor& u0,
                                                         const std::vector<torch::Tensor>& params,
                                                         const ForwardModeOptions& options = {});

// One directional derivative: (y, dy) for tangents of u0 and of the parameters (undefined
// tangents count as zero; defined ones must match their primal's shape). One solve.
std::pair<torch::Tensor, torch::Tensor> jvp(const SolveAndReduce& solve_and_reduce,
                                            const torch::Tensor& u0,
                                            const std::vector<torch::Tensor>& params,
                                            const torch::Tensor& tangent_u0,
                                            const std::vector<torch::Tensor>& tangent_params);

}  // namespace diffeqlayers
