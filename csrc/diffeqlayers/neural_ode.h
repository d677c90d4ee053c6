// diffeqlayers::NeuralODE: an ODE whose right-hand side is a torch::nn::Module, as a module.
#pragma once

#include <torch/torch.h>

#include <string>
#include <utility>

#include "diffeqlayers/adjoint.h"
#include "diffeqlayers/solve.h"

namespace diffeqlayers {

struct NeuralODEOptions {
  NeuralODEOptions(double t0 = 0.0, double t1 = 1.0) : t0_(t0), t1_(t1) {}
  TORCH_ARG(double, t0);
  TORCH_ARG(double, t1);
  TORCH_ARG(std::string, method) = "tsit5";
  TORCH_ARG(double, rtol) = 1e-7;
  TORCH_ARG(double, atol) = 1e-9;
  // Fixed step of fixed-step methods, or the first step of adaptive ones (0: automatic).
  TORCH_ARG(double, dt) = 0.0;
  TORCH_ARG(int64_t, max_num_steps) = 100000;
  // Undefined: forward returns x(t1). Otherwise the trajectory [n_times, *x.shape].
  TORCH_ARG(torch::Tensor, saveat) = {};
  // Gradient mode. "rd": reverse mode through the unrolled solver (the solve runs under grad
  // mode and autograd records it). "fd": forward mode (diffeq_fd: the Jacobian with respect to
  // x and the parameters from solves on dual tensors; for few parameters; a custom wrapped
  // module must be Cloneable, the built-in MLP need not). "adjoint" (= "interpolating"),
  // "backsolve", "discrete": the adjoints of adjoint.h, with the options in `adjoint` (its sensealg
  // field is ignored).
  TORCH_ARG(std::string, sensealg) = "rd";
  TORCH_ARG(AdjointOptions, adjoint) = {};
};

// forward(x) solves dx/dt = func(x) from x over [t0, t1]. The wrapped module is registered as
// the submodule "func", so parameters(), named_parameters(), to() and serialisation see it.
class NeuralODEImpl : public torch::nn::Module {
 public:
  template <typename ModuleType>
  NeuralODEImpl(ModuleType func, NeuralODEOptions options)
      : func_(std::move(func)), options_(std::move(options)) {
    register_module("func", func_.ptr());
    check_options();
  }

  torch::Tensor forward(const torch::Tensor& x);

  // Statistics of the most recent forward solve, and (adjoints) of its backward, filled in when
  // backward has run.
  const Stats& last_stats() const { return stats_; }
  std::shared_ptr<AdjointStats> last_adjoint_stats() const { return adjoint_stats_; }
  const NeuralODEOptions& options() const { return options_; }

 private:
  void check_options() const;
  torch::Tensor forward_fd(const torch::Tensor& x, SolveOptions so, const torch::Tensor& span,
                           bool trajectory);

  torch::nn::AnyModule func_;
  NeuralODEOptions options_;
  Stats stats_;
  std::shared_ptr<AdjointStats> adjoint_stats_;
};
TORCH_MODULE(NeuralODE);

}  // namespace diffeqlayers
