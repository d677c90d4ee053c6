// diffeqlayers::NeuralODE: an ODE whose right-hand side is a torch::nn::Module, as a module.
#include "diffeqlayers/neural_ode.h"

#include "diffeqlayers/mlp.h"

namespace diffeqlayers {

namespace {
// The adjoint named by a NeuralODE sensealg ("adjoint" is the interpolating one); empty for "rd".
std::string adjoint_kind(const std::string& sensealg) {
  if (sensealg == "rd") return "";
  if (sensealg == "adjoint") return "interpolating";
  for (const auto& name : adjoint_sensealgs())
    if (name == sensealg) return name;
  TORCH_CHECK_VALUE(false, "NeuralODE: sensealg must be \"rd\", \"adjoint\", \"interpolating\", ",
                    "\"backsolve\" or \"discrete\", got \"", sensealg, "\"");
  return "";
}
}  // namespace

void NeuralODEImpl::check_options() const {
  adjoint_kind(options_.sensealg());
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
  // The built-in MLP is evaluated directly (no AnyModule dispatch; time input included).
  Dynamics f = func_.ptr()->as<MLPImpl>() != nullptr
                   ? func_.ptr()->as<MLPImpl>()->dynamics()
                   : Dynamics([this](double, const torch::Tensor& u) { return func_.forward(u); });
  const std::string kind = adjoint_kind(options_.sensealg());
  const torch::Tensor span =
      torch::tensor({options_.t0(), options_.t1()}, torch::dtype(torch::kFloat64));
  Solution sol;
  if (kind.empty()) {
    sol = solve(f, x, span, so);
  } else {
    AdjointOptions ao = options_.adjoint();
    ao.sensealg = kind;
    sol = solve_adjoint(f, x, span, parameters(), so, ao);
  }
  stats_ = sol.stats;
  adjoint_stats_ = sol.adjoint_stats;
  return trajectory ? sol.u : sol.u[0];
}

}  // namespace diffeqlayers
