// Adams methods (explicit_adams, implicit_adams) through the public solve() API: their
// coefficients against the classical tables, convergence orders, statistics and option checks.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "diffeqlayers/adams.h"
#include "diffeqlayers/solve.h"

namespace diffeqlayers {
namespace stiff {
// csrc/solvers/adams.cpp (exported for tests): the weights with k history derivatives.
std::vector<double> adams_coefficients(bool implicit, int64_t k);
}  // namespace stiff

namespace {

TEST(Adams, CoefficientsMatchTheClassicalTables) {
  // Hairer, Norsett & Wanner, Solving ODEs I, Tables III.1.1 (Adams-Bashforth) and III.1.2
  // (Adams-Moulton).
  const std::vector<double> ab2{3.0 / 2, -1.0 / 2};
  const std::vector<double> ab4{55.0 / 24, -59.0 / 24, 37.0 / 24, -9.0 / 24};
  const std::vector<double> am4{9.0 / 24, 19.0 / 24, -5.0 / 24, 1.0 / 24};
  const std::vector<double> am5{251.0 / 720, 646.0 / 720, -264.0 / 720, 106.0 / 720, -19.0 / 720};
  auto expect_near = [](const std::vector<double>& got, const std::vector<double>& want) {
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-15) << i;
  };
  expect_near(stiff::adams_coefficients(false, 2), ab2);
  expect_near(stiff::adams_coefficients(false, 4), ab4);
  expect_near(stiff::adams_coefficients(true, 3), am4);
  expect_near(stiff::adams_coefficients(true, 4), am5);
  // Consistency (the weights sum to one) and exactness on polynomials of the method's degree:
  // for f = s^q (s in step units, f_{n-i} at s = -i, f_{n+1} at s = 1) the step integrates to
  // 1/(q+1) (from s = 0 to 1) for every q below the order.
  for (int64_t k = 1; k <= 11; ++k) {
    const std::vector<double> ab = stiff::adams_coefficients(false, k);
    const std::vector<double> am = stiff::adams_coefficients(true, k);
    // (The sums cancel: the bound is relative to the sum of the terms' magnitudes.)
    for (int q = 0; q < k; ++q) {
      double s = 0.0, mag = 1.0;
      for (size_t i = 0; i < ab.size(); ++i) {
        s += ab[i] * std::pow(-static_cast<double>(i), q);
        mag += std::abs(ab[i] * std::pow(static_cast<double>(i), q));
      }
      EXPECT_NEAR(s, 1.0 / (q + 1), 1e-14 * mag) << "AB k=" << k << " q=" << q;
    }
    for (int q = 0; q <= k; ++q) {
      double s = 0.0, mag = 1.0;
      for (size_t i = 0; i < am.size(); ++i) {
        s += am[i] * std::pow(1.0 - static_cast<double>(i), q);
        mag += std::abs(am[i] * std::pow(1.0 - static_cast<double>(i), q));
      }
      EXPECT_NEAR(s, 1.0 / (q + 1), 1e-14 * mag) << "AM k=" << k << " q=" << q;
    }
  }
}

// u' = cos(t) u, u(0) = 1: u = exp(sin t).
double final_error(const std::string& method, double dt, int64_t max_order) {
  SolveOptions o;
  o.method = method;
  o.dt = dt;
  o.max_order = max_order;
  o.rtol = 1e-12;  // steers only implicit_adams' corrector: tight enough not to matter
  o.atol = 1e-14;
  Solution sol = solve([](double t, const torch::Tensor& u) { return u * std::cos(t); },
                       torch::ones({1}, torch::kFloat64), 0.0, 2.0, o);
  return std::abs(sol.u[-1][0].item<double>() - std::exp(std::sin(2.0)));
}

TEST(Adams, ConvergenceOrders) {
  // explicit_adams with max_order 5 ends as AB4 (order 4); implicit_adams corrects with
  // Adams-Moulton of order 5 (see tests/python/test_adams.py for the start-up's share). The
  // slopes settle slowly (4.7, 4.6, 4.4, 4.25 for explicit_adams from dt = 0.04 to 0.0025):
  // small steps.
  for (const auto& [method, order] : std::vector<std::pair<std::string, double>>{
           {"explicit_adams", 4.0}, {"implicit_adams", 5.0}}) {
    const double e1 = final_error(method, 0.005, 5), e2 = final_error(method, 0.0025, 5);
    EXPECT_NEAR(std::log2(e1 / e2), order, 0.3) << method;
  }
}

TEST(Adams, StatsAndOptionChecks) {
  SolveOptions o;
  o.method = "explicit_adams";
  o.dt = 0.1;
  auto f = [](double, const torch::Tensor& u) { return -u; };
  const torch::Tensor u0 = torch::ones({2}, torch::kFloat64);
  Solution sol = solve(f, u0, 0.0, 1.0, o);
  EXPECT_EQ(sol.stats.naccept, 10);
  EXPECT_EQ(sol.stats.nfe, 2 * 4 + 8);  // two RK4 steps, then one evaluation per step
  EXPECT_TRUE(is_adams_method("implicit_adams"));
  EXPECT_FALSE(is_adams_method("rk4"));
  o.max_order = 13;
  EXPECT_THROW(solve(f, u0, 0.0, 1.0, o), c10::ValueError);
  o.max_order = 12;
  o.dt = 0.0;
  EXPECT_THROW(solve(f, u0, 0.0, 1.0, o), c10::ValueError);
}

}  // namespace
}  // namespace diffeqlayers
