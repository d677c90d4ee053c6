// Stiff methods through the public solve() API: convergence orders of the solution and of the
// dense output (the harness of test_convergence.cpp), the user-supplied Jacobian, and Stats.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "diffeqlayers/solve.h"
#include "diffeqlayers/stiff.h"

namespace diffeqlayers {
namespace {

struct Problem {
  Dynamics f;
  double (*exact)(double t);
  double t0;
  double t1;
};

// Non-autonomous, so that the df/dt terms (d_i) of the Rosenbrock methods are exercised.
// u' = u - t^2 + 1, u(0) = 1/2: u = (t + 1)^2 - e^t / 2.
Problem polynomial_forcing() {
  return {[](double t, const torch::Tensor& u) { return u - (t * t - 1.0); },
          [](double t) { return (t + 1.0) * (t + 1.0) - 0.5 * std::exp(t); }, 0.0, 2.0};
}

// u' = cos(t) u, u(0) = 1: u = exp(sin t).
Problem exp_sin() {
  return {[](double t, const torch::Tensor& u) { return u * std::cos(t); },
          [](double t) { return std::exp(std::sin(t)); }, 0.0, 2.0};
}

torch::Tensor initial_value(const Problem& p) {
  return torch::full({1}, p.exact(p.t0), torch::dtype(torch::kFloat64));
}

double fitted_slope(const std::vector<double>& h, const std::vector<double>& err) {
  const double n = static_cast<double>(h.size());
  double sx = 0, sy = 0, sxx = 0, sxy = 0;
  for (size_t i = 0; i < h.size(); ++i) {
    const double x = std::log(h[i]), y = std::log(err[i]);
    sx += x;
    sy += y;
    sxx += x * x;
    sxy += x * y;
  }
  return (n * sxy - sx * sy) / (n * sxx - sx * sx);
}

std::string describe(const std::vector<double>& h, const std::vector<double>& err) {
  std::ostringstream out;
  out.precision(3);
  for (size_t i = 0; i < h.size(); ++i) out << " h=" << h[i] << ":err=" << err[i];
  return out.str();
}

SolveOptions fixed_step(const std::string& method, double h) {
  SolveOptions o;
  o.method = method;
  o.adaptive = false;
  o.dt = h;
  return o;
}

struct Setup {
  Problem (*problem)();
  std::vector<int> steps;
  int order;
};

// Step counts chosen so that errors stay well above the df/dt central difference's floor
// (~1e-11) and inside the asymptotic regime.
const std::map<std::string, Setup>& end_time_setups() {
  static const std::map<std::string, Setup> setups = {
      {"rosenbrock23", {polynomial_forcing, {16, 32, 64, 128, 256}, 2}},
      {"rodas5", {polynomial_forcing, {4, 6, 8, 12, 16}, 5}},
      {"rodas5p", {exp_sin, {8, 12, 16, 24, 32}, 5}},
  };
  return setups;
}

// Own interpolants: rosenbrock23 second order; the Rodas interpolants fourth order, so the
// interpolated global error is O(h^min(5, 4 + 1)).
const std::map<std::string, Setup>& dense_setups() {
  static const std::map<std::string, Setup> setups = {
      {"rosenbrock23", {exp_sin, {16, 32, 64, 128, 256}, 2}},
      {"rodas5", {exp_sin, {4, 6, 8, 12, 16}, 5}},
      {"rodas5p", {exp_sin, {8, 12, 16, 24, 32}, 5}},
  };
  return setups;
}

constexpr double kSlopeTol = 0.3;

class StiffConvergenceTest : public ::testing::TestWithParam<std::string> {};

TEST_P(StiffConvergenceTest, EndTimeErrorHasTheMethodsOrder) {
  const std::string& name = GetParam();
  const auto it = end_time_setups().find(name);
  ASSERT_NE(it, end_time_setups().end()) << "no convergence setup for '" << name << "': add one";
  const Problem p = it->second.problem();
  std::vector<double> hs, errs;
  for (int n : it->second.steps) {
    const double h = (p.t1 - p.t0) / n;
    const Solution sol = solve(p.f, initial_value(p), p.t0, p.t1, fixed_step(name, h));
    ASSERT_TRUE(sol.success()) << sol.message;
    EXPECT_EQ(sol.stats.naccept, n);
    EXPECT_EQ(sol.stats.njac, n);
    EXPECT_EQ(sol.stats.nlu, n);
    const double err = std::abs(sol.u[-1][0].item<double>() - p.exact(p.t1));
    ASSERT_GT(err, 1e-11) << "error near the df/dt difference floor: use larger steps (h = " << h
                          << ")";
    hs.push_back(h);
    errs.push_back(err);
  }
  EXPECT_NEAR(fitted_slope(hs, errs), it->second.order, kSlopeTol) << describe(hs, errs);
}

TEST_P(StiffConvergenceTest, DenseOutputHasTheExpectedOrder) {
  const std::string& name = GetParam();
  const auto it = dense_setups().find(name);
  ASSERT_NE(it, dense_setups().end()) << "no dense-output setup for '" << name << "': add one";
  const Problem p = it->second.problem();
  std::vector<double> hs, errs;
  for (int n : it->second.steps) {
    const double h = (p.t1 - p.t0) / n;
    SolveOptions o = fixed_step(name, h);
    o.dense = true;
    const Solution sol = solve(p.f, initial_value(p), p.t0, p.t1, o);
    ASSERT_TRUE(sol.success()) << sol.message;
    ASSERT_TRUE(sol.dense != nullptr);
    double worst = 0.0;
    for (int step = 0; step < n; ++step) {
      const double t = p.t0 + (step + 0.37) * h;
      worst = std::max(worst, std::abs(sol(t)[0].item<double>() - p.exact(t)));
    }
    ASSERT_GT(worst, 1e-11) << "error near rounding: use larger steps (h = " << h << ")";
    hs.push_back(h);
    errs.push_back(worst);
  }
  EXPECT_NEAR(fitted_slope(hs, errs), it->second.order, kSlopeTol) << describe(hs, errs);
}

INSTANTIATE_TEST_SUITE_P(StiffMethods, StiffConvergenceTest, ::testing::ValuesIn(stiff_methods()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

// A user-supplied Jacobian gives the same steps as the autograd one (up to rounding), and the
// stiff linear problem u' = -1000 (u - cos t) is solved in few steps. rodas5p rather than rodas5:
// Rodas5's embedded estimate is unreliable on exactly this kind of forcing (Steinebach 2023,
// BIT 63:27, the motivation for Rodas5P); rodas5 takes ~2700 steps here at rtol 1e-8.
TEST(StiffSolve, UserJacobianMatchesAutograd) {
  Dynamics f = [](double t, const torch::Tensor& u) { return -1000.0 * (u - std::cos(t)); };
  SolveOptions o;
  o.method = "rodas5p";
  o.rtol = 1e-8;
  o.atol = 1e-10;
  const torch::Tensor u0 = torch::zeros({1}, torch::kFloat64);
  const Solution a = solve(f, u0, 0.0, 10.0, o);
  o.jac = [](double, const torch::Tensor& u) {
    return -1000.0 * torch::eye(u.numel(), u.options());
  };
  const Solution b = solve(f, u0, 0.0, 10.0, o);
  ASSERT_TRUE(a.success() && b.success());
  EXPECT_EQ(a.stats.naccept, b.stats.naccept);
  EXPECT_NEAR(a.u[-1][0].item<double>(), b.u[-1][0].item<double>(), 1e-12);
  // Exact: u = (1e6 cos t + 1e3 sin t - 1e6 e^(-1000 t)) / (1e6 + 1).
  const double exact = (1e6 * std::cos(10.0) + 1e3 * std::sin(10.0)) / (1e6 + 1.0);
  EXPECT_NEAR(b.u[-1][0].item<double>(), exact, 1e-7);
  // Stiffness does not limit the step: an explicit method's stability region (|h lambda| <~ 3.5
  // for tsit5, lambda = -1000) alone forces more than 2800 steps over [0, 10]; rodas5p takes
  // 222 here, set by the accuracy of the cos(t) forcing.
  EXPECT_LT(a.stats.naccept, 400);
  EXPECT_EQ(a.stats.njac, a.stats.naccept);  // a retry after a rejection keeps J
  EXPECT_EQ(a.stats.nlu, a.stats.naccept + a.stats.nreject);
}

TEST(StiffSolve, BadJacobianShapeIsAClearError) {
  Dynamics f = [](double, const torch::Tensor& u) { return -u; };
  SolveOptions o;
  o.method = "rosenbrock23";
  o.jac = [](double, const torch::Tensor&) { return torch::eye(3, torch::kFloat64); };
  try {
    solve(f, torch::ones({2}, torch::kFloat64), 0.0, 1.0, o);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("jac must return the Jacobian"), std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace diffeqlayers
