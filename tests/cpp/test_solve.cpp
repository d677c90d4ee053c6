// GoogleTest: the integration loop from C++: accuracy, saveat, dense output, the controller,
// reverse-mode gradients, and bad input raised as exceptions.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

#include "control/controller.h"
#include "diffeqlayers/diffeqlayers.h"

namespace dl = diffeqlayers;

namespace {

torch::Tensor decay_rhs(const torch::Tensor& u) { return -u; }
dl::Dynamics decay() {
  return [](double, const torch::Tensor& u) { return decay_rhs(u); };
}
torch::Tensor f64(std::initializer_list<double> v) {
  return torch::tensor(std::vector<double>(v), torch::dtype(torch::kFloat64));
}

}  // namespace

TEST(Solve, ForwardAndBackwardInTimeMatchExactSolution) {
  for (double sign : {1.0, -1.0}) {
    dl::SolveOptions o;
    o.method = "dopri5";
    o.rtol = o.atol = 1e-10;
    o.saveat = f64({0.0, sign * 0.5, sign * 2.0});
    auto sol = dl::solve(decay(), f64({1.0, 2.0}), 0.0, sign * 2.0, o);
    ASSERT_EQ(sol.u.size(0), 3);
    for (int i = 0; i < 3; ++i) {
      double t = sol.t[i].item<double>();
      auto exact = f64({1.0, 2.0}) * std::exp(-t);
      EXPECT_LT((sol.u[i] - exact).abs().max().item<double>(), 1e-8 * std::exp(std::abs(t)));
    }
  }
}

TEST(Solve, TstopsAreHitExactlyAndEveryStepIsSaved) {
  dl::SolveOptions o;
  o.method = "tsit5";
  o.tstops = {0.3, 0.7};
  auto sol = dl::solve(decay(), f64({1.0}), 0.0, 1.0, o);
  auto t = sol.t;
  EXPECT_EQ(t.size(0), sol.stats.naccept + 1);
  int hits = 0;
  for (int64_t i = 0; i < t.size(0); ++i) {
    double ti = t[i].item<double>();
    hits += (ti == 0.3) + (ti == 0.7);
  }
  EXPECT_EQ(hits, 2);
  EXPECT_EQ(t[-1].item<double>(), 1.0);
}

TEST(Solve, DenseOutputAnywhere) {
  dl::SolveOptions o;
  o.method = "tsit5";
  o.rtol = o.atol = 1e-10;
  o.dense = true;
  auto sol = dl::solve(decay(), f64({1.0}), 0.0, 3.0, o);
  for (double t : {0.0, 0.123, 1.5, 2.999, 3.0})
    EXPECT_NEAR(sol(t).item<double>(), std::exp(-t), 1e-8) << "t=" << t;
  EXPECT_THROW(sol(3.5), c10::Error);
  dl::SolveOptions plain;
  auto sol2 = dl::solve(decay(), f64({1.0}), 0.0, 1.0, plain);
  EXPECT_THROW(sol2(0.5), c10::Error);
}

TEST(Solve, ReverseModeGradientMatchesAnalytic) {
  // u' = -a u, u(T) = u0 exp(-a T): du(T)/da = -T u(T), du(T)/du0 = exp(-a T).
  auto a = f64({0.7}).requires_grad_(true);
  auto u0 = f64({1.3}).requires_grad_(true);
  dl::SolveOptions o;
  o.method = "dopri5";
  o.rtol = o.atol = 1e-11;
  o.saveat = f64({2.0});
  auto sol = dl::solve([a](double, const torch::Tensor& u) { return -a * u; }, u0, 0.0, 2.0, o);
  sol.u.sum().backward();
  const double uT = 1.3 * std::exp(-1.4);
  EXPECT_NEAR(a.grad().item<double>(), -2.0 * uT, 1e-8);
  EXPECT_NEAR(u0.grad().item<double>(), std::exp(-1.4), 1e-8);
}

TEST(Solve, GradientWithRespectToTheSpan) {
  // u(t1) = u0 exp(-(t1 - t0)): d/dt1 = -u(t1), d/dt0 = +u(t1).
  auto span = f64({0.5, 2.0}).requires_grad_(true);
  dl::SolveOptions o;
  o.method = "tsit5";
  o.rtol = o.atol = 1e-11;
  auto sol = dl::solve(decay(), f64({1.0}), span, o);
  sol.u[-1].sum().backward();
  const double uT = std::exp(-1.5);
  EXPECT_NEAR(span.grad()[1].item<double>(), -uT, 1e-8);
  EXPECT_NEAR(span.grad()[0].item<double>(), uT, 1e-8);
}

TEST(Solve, ModuleDynamics) {
  struct LinearImpl : torch::nn::Module {
    torch::Tensor forward(const torch::Tensor& u) { return -u; }
  };
  TORCH_MODULE(Linear);
  struct TimedImpl : torch::nn::Module {
    torch::Tensor forward(double t, const torch::Tensor& u) { return u * 0.0 + t; }
  };
  TORCH_MODULE(Timed);
  dl::SolveOptions o;
  o.method = "rk4";
  o.dt = 0.01;
  auto s1 = dl::solve(dl::module_dynamics(Linear()), f64({1.0}), 0.0, 1.0, o);
  EXPECT_NEAR(s1.u[-1].item<double>(), std::exp(-1.0), 1e-9);
  auto s2 = dl::solve(dl::module_dynamics(Timed()), f64({0.0}), 0.0, 2.0, o);
  EXPECT_NEAR(s2.u[-1].item<double>(), 2.0, 1e-12);  // u = t^2 / 2, exact for rk4
}

TEST(Controller, ShrinksOnRejectionAndGrowsBoundedOnAcceptance) {
  dl::StepController c(dl::ControllerOptions::PI(), 5);
  const double shrink = c.propose(10.0, false);
  EXPECT_LT(shrink, 1.0);
  EXPECT_GE(shrink, 0.2);
  // Right after a rejection the step may not grow.
  EXPECT_LE(c.propose(1e-8, true), 1.0);
  const double grow = c.propose(1e-8, true);
  EXPECT_GT(grow, 1.0);
  EXPECT_LE(grow, 10.0);
  // The I controller is the classic safety * err^(-1/q).
  dl::StepController i(dl::ControllerOptions::I(), 5);
  EXPECT_NEAR(i.propose(0.5, true), 0.9 * std::pow(0.5, -0.2), 1e-12);
  EXPECT_THROW(dl::StepController(dl::ControllerOptions{1.0, 0.0, 0.0, 1.5}, 5), c10::Error);
}

TEST(BadInput, RaisesNamedExceptions) {
  dl::SolveOptions o;
  auto u = f64({1.0});
  EXPECT_THROW(dl::solve(decay(), torch::tensor({1}), 0.0, 1.0, o), c10::TypeError);
  EXPECT_THROW(dl::solve(decay(), torch::empty({0}, torch::kFloat64), 0.0, 1.0, o),
               c10::ValueError);
  EXPECT_THROW(dl::solve(decay(), u, 1.0, 1.0, o), c10::ValueError);
  dl::SolveOptions bad_tol = o;
  bad_tol.rtol = -1;
  EXPECT_THROW(dl::solve(decay(), u, 0.0, 1.0, bad_tol), c10::ValueError);
  dl::SolveOptions fixed;
  fixed.method = "rk4";
  EXPECT_THROW(dl::solve(decay(), u, 0.0, 1.0, fixed), c10::ValueError);  // no dt
  dl::SolveOptions unsorted = o;
  unsorted.saveat = f64({0.5, 0.2});
  EXPECT_THROW(dl::solve(decay(), u, 0.0, 1.0, unsorted), c10::ValueError);
  dl::SolveOptions outside = o;
  outside.saveat = f64({0.5, 1.5});
  EXPECT_THROW(dl::solve(decay(), u, 0.0, 1.0, outside), c10::ValueError);
  dl::SolveOptions unknown = o;
  unknown.method = "nope";
  EXPECT_THROW(dl::solve(decay(), u, 0.0, 1.0, unknown), c10::ValueError);
  auto wrong_shape = [](double, const torch::Tensor& x) { return torch::cat({x, x}); };
  EXPECT_THROW(dl::solve(wrong_shape, u, 0.0, 1.0, o), c10::ValueError);
  auto wrong_dtype = [](double, const torch::Tensor& x) { return x.to(torch::kFloat32); };
  EXPECT_THROW(dl::solve(wrong_dtype, u, 0.0, 1.0, o), c10::TypeError);
  dl::SolveOptions mixed = o;
  mixed.params = {torch::ones({2}, torch::kFloat32)};
  EXPECT_THROW(dl::solve(decay(), u, 0.0, 1.0, mixed), c10::TypeError);
}

TEST(BadInput, SolverFailuresReportTimeAndStep) {
  // u' = u^2, u(0) = 1 blows up at t = 1.
  auto blowup = [](double, const torch::Tensor& u) { return u * u; };
  dl::SolveOptions o;
  o.method = "dopri5";
  try {
    dl::solve(blowup, f64({1.0}), 0.0, 2.0, o);
    FAIL() << "expected a SolverError";
  } catch (const dl::SolverError& e) {
    EXPECT_NEAR(e.t, 1.0, 1e-2);
    EXPECT_NE(std::string(e.what()).find("dt="), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("t="), std::string::npos);
  }
  dl::SolveOptions few = o;
  few.max_num_steps = 5;
  few.throw_on_failure = false;
  auto sol = dl::solve(decay(), f64({1.0}), 0.0, 100.0, few);
  EXPECT_EQ(sol.retcode, dl::ReturnCode::MaxIters);
  EXPECT_NE(sol.message.find("max_num_steps"), std::string::npos);
  // NaN appearing in the state is an instability, not a silent NaN.
  auto nan_later = [](double t, const torch::Tensor& u) { return t > 0.5 ? u * std::nan("") : -u; };
  dl::SolveOptions n = o;
  n.throw_on_failure = false;
  auto sol_nan = dl::solve(nan_later, f64({1.0}), 0.0, 1.0, n);
  EXPECT_EQ(sol_nan.retcode, dl::ReturnCode::Unstable);
  EXPECT_FALSE(torch::isnan(sol_nan.u).any().item<bool>());
}

TEST(Solve, NormPrefixControlsTheLeadingElementsOnly) {
  // [a, b] decays slowly; [c, d] oscillates fast. The RMS norm over the first two elements
  // (norm_prefix = 2) takes the steps of a user norm computing that seminorm, and far fewer
  // than the full norm, which resolves the oscillation.
  auto f = [](double, const torch::Tensor& u) {
    return torch::stack({-u[0], -0.5 * u[1], 50.0 * u[3], -50.0 * u[2]});
  };
  auto u0 = f64({1.0, 2.0, 1.0, 0.0});
  dl::SolveOptions full;
  full.method = "tsit5";
  full.rtol = full.atol = 1e-8;
  dl::SolveOptions prefix = full;
  prefix.norm_prefix = 2;
  dl::SolveOptions user = full;
  user.norm = [](const torch::Tensor& x) { return x.narrow(0, 0, 2).pow(2).mean().sqrt(); };
  const auto a = dl::solve(f, u0, 0.0, 2.0, full);
  const auto b = dl::solve(f, u0, 0.0, 2.0, prefix);
  const auto c = dl::solve(f, u0, 0.0, 2.0, user);
  EXPECT_EQ(b.stats.naccept, c.stats.naccept);
  EXPECT_EQ(b.stats.nreject, c.stats.nreject);
  EXPECT_LT(3 * b.stats.naccept, a.stats.naccept);
  // The controlled elements keep their accuracy.
  const auto exact = f64({std::exp(-2.0), 2.0 * std::exp(-1.0)});
  EXPECT_LT((b.u[-1].narrow(0, 0, 2) - exact).abs().max().item<double>(), 1e-7);

  // Bad values and combinations are named.
  dl::SolveOptions too_long = prefix;
  too_long.norm_prefix = 5;
  EXPECT_THROW(dl::solve(f, u0, 0.0, 1.0, too_long), c10::ValueError);
  dl::SolveOptions negative = prefix;
  negative.norm_prefix = -1;
  EXPECT_THROW(dl::solve(f, u0, 0.0, 1.0, negative), c10::ValueError);
  dl::SolveOptions both = user;
  both.norm_prefix = 2;
  EXPECT_THROW(dl::solve(f, u0, 0.0, 1.0, both), c10::ValueError);
  dl::SolveOptions stiff = prefix;
  stiff.method = "rodas5p";
  EXPECT_THROW(dl::solve(f, u0, 0.0, 1.0, stiff), c10::ValueError);
}
