// GoogleTest: the adjoints from C++ (solve_adjoint) against reverse mode through the solver and
// the analytic gradient of u' = -a u; a module's parameters; checkpoint caps; bad options.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <string>
#include <vector>

#include "diffeqlayers/adjoint.h"
#include "diffeqlayers/solve.h"

namespace dl = diffeqlayers;

namespace {

torch::Tensor f64(std::vector<double> v) { return torch::tensor(v, torch::dtype(torch::kFloat64)); }

dl::SolveOptions options(const std::string& method = "tsit5") {
  dl::SolveOptions o;
  o.method = method;
  o.rtol = 1e-10;
  o.atol = 1e-10;
  o.saveat = f64({0.5, 1.0, 2.0});
  return o;
}

double rel(const torch::Tensor& a, const torch::Tensor& b) {
  return ((a - b).norm() / b.norm()).item<double>();
}

// Lotka-Volterra with parameters p; gradients of sum(u^2) over the saved rows w.r.t. (u0, p).
// With split, as a split problem: the linear terms f, the interactions SolveOptions::nonstiff.
std::vector<torch::Tensor> lv_grads(const std::string& mode, dl::SolveOptions o,
                                    int64_t checkpoints = 0, bool split = false) {
  torch::Tensor p = f64({1.5, 1.0, 3.0, 1.0}).requires_grad_();
  torch::Tensor u0 = f64({1.0, 1.0}).requires_grad_();
  dl::Dynamics f = [p](double, const torch::Tensor& u) {
    return torch::stack({p[0] * u[0] - p[1] * u[0] * u[1], -p[2] * u[1] + p[3] * u[0] * u[1]});
  };
  if (split) {
    f = [p](double, const torch::Tensor& u) { return torch::stack({p[0] * u[0], -p[2] * u[1]}); };
    o.nonstiff = [p](double, const torch::Tensor& u) {
      return torch::stack({-p[1] * u[0] * u[1], p[3] * u[0] * u[1]});
    };
  }
  dl::Solution sol;
  if (mode == "rd") {
    sol = dl::solve(f, u0, 0.0, 2.0, o);
  } else {
    dl::AdjointOptions a;
    a.sensealg = mode;
    a.checkpoints = checkpoints;
    sol = dl::solve_adjoint(f, u0, f64({0.0, 2.0}), {p}, o, a);
  }
  sol.u.pow(2).sum().backward();
  if (mode != "rd") {
    EXPECT_TRUE(sol.adjoint_stats->done);
    EXPECT_GT(sol.adjoint_stats->nfe, 0);
  }
  return {u0.grad(), p.grad()};
}

}  // namespace

TEST(Adjoint, DiscreteEqualsReverseModeToRounding) {
  for (const char* method : {"rk4", "bosh3", "dopri5", "tsit5", "dopri8"}) {
    dl::SolveOptions o = options(method);
    if (std::string(method) == "rk4") o.dt = 0.01;
    auto rd = lv_grads("rd", o);
    auto ad = lv_grads("discrete", o);
    for (size_t i = 0; i < rd.size(); ++i) EXPECT_LT(rel(ad[i], rd[i]), 1e-12) << method;
  }
}

TEST(Adjoint, DiscreteThroughRosenbrockEqualsReverseModeToRounding) {
  // A Rosenbrock step takes a fresh Jacobian, so the discrete adjoint replays it alone from the
  // forward's dense output, differentiating the Jacobian as reverse mode does.
  for (const char* method : {"rodas5", "rodas5p", "rosenbrock23"}) {
    dl::SolveOptions o = options(method);
    o.rtol = o.atol = 1e-6;
    auto rd = lv_grads("rd", o);
    auto ad = lv_grads("discrete", o);
    for (size_t i = 0; i < rd.size(); ++i) EXPECT_LT(rel(ad[i], rd[i]), 1e-10) << method;
  }
}

TEST(Adjoint, SplitProblemsUnderTheAdjoints) {
  // kencarp4 steps a split problem as IMEX under the adjoints too; the discrete adjoint rebuilds
  // each step from the implicit part's stages and evaluates the explicit part again. Every other
  // method solves the sum.
  for (const char* method : {"kencarp4", "rodas5"}) {
    dl::SolveOptions o = options(method);
    o.rtol = o.atol = 1e-6;
    auto rd = lv_grads("rd", o, 0, true);
    auto ad = lv_grads("discrete", o, 0, true);
    auto in = lv_grads("interpolating", o, 0, true);
    for (size_t i = 0; i < rd.size(); ++i) {
      EXPECT_LT(rel(ad[i], rd[i]), 1e-10) << method;
      EXPECT_LT(rel(in[i], rd[i]), 1e-4) << method;
    }
  }
}

TEST(Adjoint, ContinuousAdjointsMatchReverseMode) {
  auto rd = lv_grads("rd", options());
  for (const char* mode : {"interpolating", "backsolve"}) {
    auto ad = lv_grads(mode, options());
    for (size_t i = 0; i < rd.size(); ++i) EXPECT_LT(rel(ad[i], rd[i]), 1e-7) << mode;
  }
}

TEST(Adjoint, CheckpointCapIsInvisibleInTheGradient) {
  for (const char* mode : {"interpolating", "discrete"}) {
    auto all = lv_grads(mode, options());
    auto capped = lv_grads(mode, options(), 3);
    for (size_t i = 0; i < all.size(); ++i) EXPECT_LT(rel(capped[i], all[i]), 1e-12) << mode;
  }
}

TEST(Adjoint, AnalyticGradientOfDecay) {
  // u' = -a u, L = u(2): dL/da = -2 u0 exp(-2a), dL/du0 = exp(-2a).
  for (const char* mode : {"interpolating", "backsolve", "discrete"}) {
    torch::Tensor a = f64({0.7}).requires_grad_();
    torch::Tensor u0 = f64({2.0}).requires_grad_();
    dl::Dynamics f = [a](double, const torch::Tensor& u) { return -a * u; };
    dl::SolveOptions o = options();
    o.saveat = f64({2.0});
    dl::AdjointOptions ao;
    ao.sensealg = mode;
    dl::Solution sol = dl::solve_adjoint(f, u0, f64({0.0, 2.0}), {a}, o, ao);
    sol.u.sum().backward();
    EXPECT_NEAR(a.grad().item<double>(), -2 * 2.0 * std::exp(-1.4), 1e-8) << mode;
    EXPECT_NEAR(u0.grad().item<double>(), std::exp(-1.4), 1e-8) << mode;
  }
}

TEST(Adjoint, ModuleParametersGetGradients) {
  torch::manual_seed(0);
  torch::nn::Sequential net(torch::nn::Linear(2, 8), torch::nn::Tanh(), torch::nn::Linear(8, 2));
  net->to(torch::kFloat64);
  torch::Tensor x = torch::randn({4, 2}, torch::kFloat64);
  // (Sequential's variadic forward would also take (t, u): call it with u only.)
  dl::Dynamics f = [net](double, const torch::Tensor& u) mutable { return net->forward(u); };
  dl::SolveOptions o = options();
  o.saveat = f64({1.0});
  std::vector<torch::Tensor> ref;
  dl::solve(f, x, 0.0, 1.0, o).u.pow(2).sum().backward();
  for (auto& q : net->parameters()) {
    ref.push_back(q.grad().clone());
    q.mutable_grad().zero_();
  }
  dl::Solution sol = dl::solve_adjoint(f, x, f64({0.0, 1.0}), net->parameters(), o);
  sol.u.pow(2).sum().backward();
  auto params = net->parameters();
  for (size_t i = 0; i < params.size(); ++i) EXPECT_LT(rel(params[i].grad(), ref[i]), 1e-7);
}

TEST(Adjoint, BadOptionsAreRefused) {
  torch::Tensor a = f64({0.7}).requires_grad_();
  dl::Dynamics f = [a](double, const torch::Tensor& u) { return -a * u; };
  dl::AdjointOptions bad;
  bad.sensealg = "quadrature";
  EXPECT_THROW(dl::solve_adjoint(f, f64({1.0}), f64({0.0, 1.0}), {a}, options(), bad),
               c10::ValueError);
  dl::SolveOptions dense = options();
  dense.dense = true;
  EXPECT_THROW(dl::solve_adjoint(f, f64({1.0}), f64({0.0, 1.0}), {a}, dense), c10::ValueError);
  // An ESDIRK step shares Jacobians and LUs with earlier steps: no discrete adjoint through it.
  dl::AdjointOptions discrete;
  discrete.sensealg = "discrete";
  EXPECT_THROW(
      dl::solve_adjoint(f, f64({1.0}), f64({0.0, 1.0}), {a}, options("kvaerno5"), discrete),
      c10::ValueError);
  dl::AdjointOptions method;
  method.method = "nope";
  EXPECT_THROW(dl::solve_adjoint(f, f64({1.0}), f64({0.0, 1.0}), {a}, options(), method),
               c10::Error);
}
