// diffeqlayers::NeuralODE: an ODE whose right-hand side is a torch::nn::Module, as a module.
#include "diffeqlayers/neural_ode.h"

#include "diffeqlayers/forward_mode.h"
#include "diffeqlayers/mlp.h"

namespace diffeqlayers {

namespace {
// The adjoint named by a NeuralODE sensealg ("adjoint" is the interpolating one); empty for "rd"
// and "fd".
std::string adjoint_kind(const std::string& sensealg) {
  if (sensealg == "rd" || sensealg == "fd") return "";
  if (sensealg == "adjoint") return "interpolating";
  for (const auto& name : adjoint_sensealgs())
    if (name == sensealg) return name;
  TORCH_CHECK_VALUE(false,
                    "NeuralODE: sensealg must be \"rd\", \"fd\", \"adjoint\", \"interpolating\", ",
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
  const std::string kind = adjoint_kind(options_.sensealg());
  const torch::Tensor span =
      torch::tensor({options_.t0(), options_.t1()}, torch::dtype(torch::kFloat64));
  if (options_.sensealg() == "fd") return forward_fd(x, so, span, trajectory);
  // The built-in MLP is evaluated directly (no AnyModule dispatch; time input included), on
  // host arrays for solves that record nothing (inference, the adjoints), with its own
  // vector-Jacobian product for the continuous adjoints: all three over one checked state.
  const MLPImpl* mlp = func_.ptr()->as<MLPImpl>();
  MLPFunctions fs;
  if (mlp != nullptr) {
    fs = mlp_functions(mlp->spec(), mlp->weights());
    so.host = fs.host;
  } else {
    fs.f = [this](double, const torch::Tensor& u) { return func_.forward(u); };
  }
  Solution sol;
  if (kind.empty()) {
    sol = solve(fs.f, x, span, so);
  } else {
    AdjointOptions ao = options_.adjoint();
    ao.sensealg = kind;
    if (!ao.vjp) ao.vjp = fs.vjp;  // empty unless the built-in MLP
    sol = solve_adjoint(fs.f, x, span, parameters(), so, ao);
  }
  stats_ = sol.stats;
  adjoint_stats_ = sol.adjoint_stats;
  return trajectory ? sol.u : sol.u[0];
}

// Forward mode: diffeq_fd runs the solve on dual tensors (u0 and the parameters), so the dynamics
// must read the dual parameters it is handed, not the module's own. The built-in MLP takes its
// weights as arguments; any other module is cloned per pass (one pass per chunk of directions)
// and the clone's parameters are given the passes' tangents, which needs a Cloneable module
// (every torch::nn module is; a custom one derives from torch::nn::Cloneable).
torch::Tensor NeuralODEImpl::forward_fd(const torch::Tensor& x, SolveOptions so,
                                        const torch::Tensor& span, bool trajectory) {
  MLPImpl* mlp = func_.ptr()->as<MLPImpl>();
  const std::vector<torch::Tensor> params = mlp != nullptr ? mlp->weights() : parameters();
  auto reduce = [&, trajectory](const Dynamics& f, const torch::Tensor& u0,
                                const std::vector<torch::Tensor>& ps) {
    SolveOptions o = so;
    o.params = ps;
    Solution sol = solve(f, u0, span, o);
    stats_ = sol.stats;
    return trajectory ? sol.u : sol.u[0];
  };
  SolveAndReduce fn;
  if (mlp != nullptr) {
    fn = [&, mlp](const torch::Tensor& u0, const std::vector<torch::Tensor>& ps) {
      return reduce(mlp_dynamics(mlp->spec(), ps), u0, ps);
    };
  } else {
    fn = [&](const torch::Tensor& u0, const std::vector<torch::Tensor>& ps) {
      torch::nn::AnyModule copy;
      try {
        copy = func_.clone();
      } catch (const c10::Error& e) {
        TORCH_CHECK_NOT_IMPLEMENTED(false,
                                    "NeuralODE with sensealg \"fd\" clones the wrapped "
                                    "module for each forward-mode pass: ",
                                    e.what_without_backtrace());
      }
      std::vector<torch::Tensor> own = copy.ptr()->parameters();
      TORCH_CHECK(own.size() == ps.size(), "NeuralODE: the cloned module has ", own.size(),
                  " parameters, the original ", ps.size());
      for (size_t i = 0; i < own.size(); ++i) {
        own[i].set_requires_grad(false);
        torch::Tensor tangent = std::get<1>(at::_unpack_dual(ps[i], /*level=*/0));
        if (tangent.defined()) own[i]._set_fw_grad(tangent, /*level=*/0, /*is_inplace_op=*/false);
      }
      Dynamics f = [copy](double, const torch::Tensor& u) mutable { return copy.forward(u); };
      return reduce(f, u0, ps);
    };
  }
  adjoint_stats_.reset();
  return diffeq_fd(fn, x, params);
}

}  // namespace diffeqlayers
