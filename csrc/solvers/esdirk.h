// Internal to csrc/solvers: the tableaus of the ESDIRK methods (kvaerno5, kencarp4, trbdf2), in a
// form the tests can check (row sums, order conditions, the interpolant at theta = 1).
#pragma once

#include <string>
#include <vector>

#include "diffeqlayers/tableau.h"
#include "solvers/stiff.h"

namespace diffeqlayers {
namespace stiff {

// A singly diagonally implicit Runge-Kutta method with an explicit first stage:
//   z_1 = u,  z_i = u + h sum_{j<i} a_ij k_j + h gamma k_i  (i > 1),  k_i = f(t + c_i h, z_i),
//   u_new = u + h sum_i b_i k_i,  error = h sum_i (b_i - bhat_i) k_i.
// With an explicit companion tableau ae (additive / IMEX methods, kencarp4) a split problem
// f + g adds h sum_{j<i} ae_ij g_j to every stage and g_i to every k_i in u_new.
struct EsdirkTableau {
  MethodInfo info;
  Tableau interpolant;  // used when interpolant.dense is non-empty
  double gamma = 0;
  std::vector<std::vector<double>> a;   // a[i]: the i entries a_ij, j < i (a[0] empty)
  std::vector<std::vector<double>> ae;  // explicit companion (empty: none)
  std::vector<double> b, bhat, c;       // c as published (the tests compare it with row sums)
  bool filter_error = false;            // error estimate multiplied by (I - h gamma J)^-1
  size_t stages() const { return c.size(); }
};

bool is_esdirk(const std::string& name);
const EsdirkTableau& esdirk_tableau(const std::string& name);
std::unique_ptr<Stepper> make_esdirk(const std::string& name, const Dynamics& f,
                                     const SolveOptions& o, Stats& stats, bool track);

}  // namespace stiff
}  // namespace diffeqlayers
