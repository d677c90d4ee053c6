// Shared by the convergence tests (test_convergence.cpp, test_stiff.cpp): test problems with
// exact solutions, their initial values, and the least-squares order fit.
#pragma once

#include <torch/torch.h>

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "diffeqlayers/solve.h"

namespace diffeqlayers::convergence {

// Test problems with exact solutions. Both below are non-autonomous, so a wrong node c_i (or a
// wrong df/dt term of a Rosenbrock method) shows up.
struct Problem {
  Dynamics f;
  double (*exact)(double t);
  double t0;
  double t1;
};

// u' = u - t^2 + 1, u(0) = 1/2: u = (t + 1)^2 - e^t / 2 (Burden & Faires' textbook example).
// Its error expansion reaches the asymptotic regime early for the fifth-order pairs, whose
// principal error coefficients are tuned small enough that the next term dominates for long on
// many problems.
inline Problem polynomial_forcing() {
  return {[](double t, const torch::Tensor& u) { return u - (t * t - 1.0); },
          [](double t) { return (t + 1.0) * (t + 1.0) - 0.5 * std::exp(t); }, 0.0, 2.0};
}

// u' = cos(t) u, u(0) = 1: u = exp(sin t). Used for dopri8 (whose error on the problem above
// approaches h^8 from below only at errors near rounding) and for the dense output, where the
// maximum over steps of the interpolation error varies smoothly with h.
inline Problem exp_sin() {
  return {[](double t, const torch::Tensor& u) { return u * std::cos(t); },
          [](double t) { return std::exp(std::sin(t)); }, 0.0, 2.0};
}

inline torch::Tensor initial_value(const Problem& p) {
  return torch::full({1}, p.exact(p.t0), torch::dtype(torch::kFloat64));
}

// Least-squares slope of log(err) against log(h).
inline double fitted_slope(const std::vector<double>& h, const std::vector<double>& err) {
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

inline std::string describe(const std::vector<double>& h, const std::vector<double>& err) {
  std::ostringstream out;
  out.precision(3);
  for (size_t i = 0; i < h.size(); ++i) out << " h=" << h[i] << ":err=" << err[i];
  return out.str();
}

// How far a fitted slope may be from the method's order.
constexpr double kSlopeTol = 0.3;

}  // namespace diffeqlayers::convergence
