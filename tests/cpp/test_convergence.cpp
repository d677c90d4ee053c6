// Convergence orders of every registered method through the public solve() API: the solution at
// the end time, the dense output inside steps, and the adaptive path against its tolerance.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "convergence_harness.h"
#include "diffeqlayers/solve.h"

namespace diffeqlayers {
namespace {

using namespace convergence;  // NOLINT: the shared harness

SolveOptions fixed_step(const std::string& method, double h) {
  SolveOptions o;
  o.method = method;
  o.adaptive = false;
  o.dt = h;
  return o;
}

// Step counts over [t0, t1] per method: errors from ~1e-3 down to no less than ~1e-12, so well
// above rounding, and (checked offline against a plain RK loop) in the asymptotic regime.
struct Setup {
  Problem (*problem)();
  std::vector<int> steps;
};

const std::map<std::string, Setup>& end_time_setups() {
  static const std::map<std::string, Setup> setups = {
      {"euler", {polynomial_forcing, {16, 32, 64, 128, 256}}},
      {"midpoint", {polynomial_forcing, {16, 32, 64, 128, 256}}},
      {"heun2", {polynomial_forcing, {16, 32, 64, 128, 256}}},
      {"ralston", {polynomial_forcing, {16, 32, 64, 128, 256}}},
      {"heun3", {polynomial_forcing, {16, 32, 64, 128, 256}}},
      {"rk4", {polynomial_forcing, {8, 16, 32, 64, 128}}},
      {"adaptive_heun", {polynomial_forcing, {16, 32, 64, 128, 256}}},
      {"fehlberg2", {polynomial_forcing, {16, 32, 64, 128, 256}}},
      {"bosh3", {polynomial_forcing, {16, 32, 64, 128, 256}}},
      {"dopri5", {polynomial_forcing, {8, 12, 16, 24, 32, 48, 64}}},
      {"tsit5", {polynomial_forcing, {8, 12, 16, 24, 32, 48, 64}}},
      {"dopri8", {exp_sin, {3, 4, 6, 8, 12}}},
  };
  return setups;
}

// The dense output is checked on exp_sin for every method.
const std::map<std::string, std::vector<int>>& dense_steps() {
  static const std::map<std::string, std::vector<int>> steps = {
      {"euler", {16, 32, 64, 128, 256}},         {"midpoint", {16, 32, 64, 128, 256}},
      {"heun2", {16, 32, 64, 128, 256}},         {"ralston", {16, 32, 64, 128, 256}},
      {"heun3", {16, 32, 64, 128, 256}},         {"rk4", {8, 16, 32, 64, 128}},
      {"adaptive_heun", {16, 32, 64, 128, 256}}, {"fehlberg2", {16, 32, 64, 128, 256}},
      {"bosh3", {16, 32, 64, 128, 256}},         {"dopri5", {8, 12, 16, 24, 32, 48, 64}},
      {"tsit5", {8, 12, 16, 24, 32, 48, 64}},    {"dopri8", {8, 16, 32, 64, 128}},
  };
  return steps;
}

class ConvergenceTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ConvergenceTest, EndTimeErrorHasTheMethodsOrder) {
  const std::string& name = GetParam();
  const Tableau& tab = tableau(name);
  const auto it = end_time_setups().find(name);
  ASSERT_NE(it, end_time_setups().end()) << "no convergence setup for '" << name << "': add one";
  const Problem p = it->second.problem();
  std::vector<double> hs, errs;
  for (int n : it->second.steps) {
    const double h = (p.t1 - p.t0) / n;
    // Fixed steps with b, also for the adaptive methods.
    const Solution sol = solve(p.f, initial_value(p), p.t0, p.t1, fixed_step(name, h));
    ASSERT_TRUE(sol.success()) << sol.message;
    EXPECT_NEAR(sol.t[-1].item<double>(), p.t1, 1e-12);
    const double err = std::abs(sol.u[-1][0].item<double>() - p.exact(p.t1));
    ASSERT_GT(err, 1e-13) << "error at rounding level: use larger steps (h = " << h << ")";
    hs.push_back(h);
    errs.push_back(err);
  }
  EXPECT_NEAR(fitted_slope(hs, errs), tab.order, kSlopeTol) << describe(hs, errs);
}

// Global error of the interpolated value inside a step: the error carried in from the step's
// start, O(h^p), plus the interpolant's own local error, O(h^(q+1)) for an interpolant of order
// q (it is not propagated, so it does not lose a power of h). Expected: min(p, q + 1); cubic
// Hermite has q = 3, so min(p, 4).
TEST_P(ConvergenceTest, DenseOutputHasTheExpectedOrder) {
  const std::string& name = GetParam();
  const Tableau& tab = tableau(name);
  const auto it = dense_steps().find(name);
  ASSERT_NE(it, dense_steps().end()) << "no dense-output setup for '" << name << "': add one";
  const int expected =
      tab.has_dense() ? std::min(tab.order, tab.dense_order + 1) : std::min(tab.order, 4);
  const Problem p = exp_sin();
  std::vector<double> hs, errs;
  for (int n : it->second) {
    const double h = (p.t1 - p.t0) / n;
    SolveOptions o = fixed_step(name, h);
    o.dense = true;
    const Solution sol = solve(p.f, initial_value(p), p.t0, p.t1, o);
    ASSERT_TRUE(sol.success()) << sol.message;
    ASSERT_TRUE(sol.dense != nullptr);
    double worst = 0.0;
    for (int step = 0; step < n; ++step) {
      // Strictly inside every step, away from both ends (theta = 0.37).
      const double t = p.t0 + (step + 0.37) * h;
      worst = std::max(worst, std::abs(sol(t)[0].item<double>() - p.exact(t)));
    }
    ASSERT_GT(worst, 1e-13) << "error at rounding level: use larger steps (h = " << h << ")";
    hs.push_back(h);
    errs.push_back(worst);
  }
  EXPECT_NEAR(fitted_slope(hs, errs), expected, kSlopeTol)
      << (tab.has_dense() ? "own interpolant" : "cubic Hermite") << describe(hs, errs);
}

INSTANTIATE_TEST_SUITE_P(AllMethods, ConvergenceTest, ::testing::ValuesIn(methods()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

// The adaptive path: tightening rtol = atol must tighten the error, which should stay within a
// modest factor of the tolerance (the controller bounds local, not global, errors).
class AdaptiveTest : public ::testing::TestWithParam<std::string> {};

TEST_P(AdaptiveTest, ErrorFollowsTheTolerance) {
  const std::string& name = GetParam();
  const Problem p = exp_sin();
  double previous_err = INFINITY;
  int64_t previous_steps = 0;
  for (double tol : {1e-4, 1e-6, 1e-8, 1e-10}) {
    SolveOptions o;
    o.method = name;
    o.rtol = tol;
    o.atol = tol;
    const Solution sol = solve(p.f, initial_value(p), p.t0, p.t1, o);
    ASSERT_TRUE(sol.success()) << sol.message;
    const double err = std::abs(sol.u[-1][0].item<double>() - p.exact(p.t1));
    EXPECT_LT(err, 100 * tol) << "tol = " << tol;
    // Strictly better each time, unless already at rounding level.
    EXPECT_TRUE(err < previous_err || err < 1e-13)
        << "tol = " << tol << ": err " << err << " after " << previous_err;
    EXPECT_GE(sol.stats.naccept, previous_steps) << "tol = " << tol;
    previous_err = err;
    previous_steps = sol.stats.naccept;
  }
}

INSTANTIATE_TEST_SUITE_P(EmbeddedPairs, AdaptiveTest,
                         ::testing::Values("bosh3", "dopri5", "tsit5", "dopri8"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

}  // namespace
}  // namespace diffeqlayers
