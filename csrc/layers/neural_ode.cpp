// diffeqlayers::NeuralODE: an ODE whose right-hand side is a torch::nn::Module, as a module.
#include "diffeqlayers/neural_ode.h"

namespace diffeqlayers {

void NeuralODEImpl::check_options() const {
  TORCH_CHECK_VALUE(options_.sensealg() == "rd", "NeuralODE: sensealg must be \"rd\", got \"",
                    options_.sensealg(), "\"");
  TORCH_CHECK_VALUE(options_.t0() != options_.t1(),
                    "NeuralODE: the span is empty (t0 == t1 == ", options_.t0(), ")");
}

torch::Tensor NeuralODEImpl::forward(const torch::Tensor& x) {
  SolveOptions so;
  so.method = options_.method();
  so.rtol = options_.rtol();
  so.atol = options_.atol();
  so.dt = options_.dt();
  so.max_num_steps = options_.max_num_steps();
  const bool trajectory = options_.saveat().defined();
  so.saveat = trajectory ? options_.saveat()
                         : torch::tensor({options_.t1()}, torch::dtype(torch::kFloat64));
  for (const auto& p : parameters()) so.params.push_back(p);
  Dynamics f = [this](double, const torch::Tensor& u) { return func_.forward(u); };
  Solution sol = solve(f, x, options_.t0(), options_.t1(), so);
  stats_ = sol.stats;
  return trajectory ? sol.u : sol.u[0];
}

}  // namespace diffeqlayers
