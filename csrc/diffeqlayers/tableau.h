// Butcher tableaus as data: one struct per explicit Runge-Kutta method, and the registry.
#pragma once

#include <string>
#include <vector>

namespace diffeqlayers {

// An explicit Runge-Kutta method, stored in double precision.
//
//   stage i:  U_i = u + h * sum_{j<i} a[i][j] k_j,   k_i = f(t + c[i] h, U_i)
//   solution: u_new = u + h * sum_i b[i] k_i
//   error:    err   = h * sum_i b_err[i] k_i          (b_err = b - b_hat)
//   dense:    u(t + theta h) = u + h * sum_i b_i(theta) k_i,
//             b_i(theta) = sum_{m=0}^{deg-1} dense[i][m] * theta^(m+1)
//
// The loop never asks a tableau for its name, only what it can do: adaptive() (has an error
// estimate), fsal() (last stage is f at the new solution), has_dense() (own interpolant; cubic
// Hermite otherwise).
struct Tableau {
  std::string name;
  int order = 0;           // order of the propagated solution (b)
  int embedded_order = 0;  // order of b_hat; 0 when there is no error estimate
  std::vector<double> c;
  std::vector<std::vector<double>> a;  // a[i] has exactly i entries (strictly lower triangular)
  std::vector<double> b;
  std::vector<double> b_err;               // empty for fixed-step methods
  std::vector<std::vector<double>> dense;  // empty: cubic Hermite interpolation
  int dense_order = 0;                     // order of the own interpolant, when there is one
  std::string reference;                   // where the coefficients come from

  int stages() const { return static_cast<int>(c.size()); }
  bool adaptive() const { return !b_err.empty(); }
  bool has_dense() const { return !dense.empty(); }
  // First same as last: the last row of a equals b and c.back() == 1, so the last stage is
  // f(t + h, u_new) and doubles as the next step's first stage.
  bool fsal() const;
  // Order used by the step-size controller: the error estimate behaves like h^(q)
  // with q = min(order, embedded_order) + 1.
  int controller_order() const;
  // Throws std::invalid_argument naming the method and the failed condition (row sums equal c,
  // sum b = 1, sum b_err = 0, sizes, dense(theta = 1) = b).
  void validate(double tol = 1e-12) const;
};

// The method registered under `name`; throws c10::ValueError listing the known methods.
const Tableau& tableau(const std::string& name);
// Names of all registered methods, sorted.
std::vector<std::string> methods();

}  // namespace diffeqlayers
