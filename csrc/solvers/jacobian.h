// Internal to csrc/solvers: f with checks, the Jacobian df/du (autograd or user-supplied), the
// time derivative df/dt, and LU factorizations of the iteration matrix.
#pragma once

#include <torch/types.h>

#include <string>

#include "diffeqlayers/solve.h"

namespace diffeqlayers {
namespace stiff {

std::string fmt(double x);

// f(t, u), counted, its shape, dtype and device checked against u.
torch::Tensor eval_f(const Dynamics& f, double t, const torch::Tensor& u, Stats& stats);

// f and its derivatives at one point, over the flattened state.
struct PointDerivatives {
  torch::Tensor f0;  // f(t, u), shaped like u
  torch::Tensor J;   // [n, n], J[i][j] = d f_i / d u_j
  torch::Tensor ft;  // [n], d f / d t
};

// With `track`, J and ft stay differentiable with respect to u and the parameters (so that
// reverse mode through a step that uses them is exact for the discretisation); otherwise they
// are constants. Autograd builds J one row per reverse pass: n vector-Jacobian products on one
// recorded evaluation of f, suited to the small and medium systems stiff problems usually are.
// df/dt is a central difference (f(t + d, u) - f(t - d, u)) / 2d with d = eps^(1/3) max(1, |t|)
// (Dynamics take t as a double, so autograd cannot see it): two more evaluations of f per
// Jacobian, exactly zero for autonomous f. Without `with_ft` (the implicit Runge-Kutta methods
// need no df/dt) ft stays undefined and those two evaluations are skipped.
PointDerivatives derivatives(const Dynamics& f, const Jacobian& jac, double t,
                             const torch::Tensor& u, bool track, Stats& stats, bool with_ft = true);

// An LU factorization of an [n, n] matrix and solves with it. Differentiable (reverse mode
// through linalg_lu_factor_ex / linalg_lu_solve costs one more factorization-sized product per
// factorization and a pair of triangular solves per solve).
struct LU {
  torch::Tensor lu, pivots;
  // Factorizes; false when the matrix is singular (or not finite).
  bool factor(const torch::Tensor& matrix, Stats& stats);
  // Solves matrix x = rhs for rhs shaped like the state; returns x shaped like rhs.
  torch::Tensor solve(const torch::Tensor& rhs) const;
};

}  // namespace stiff
}  // namespace diffeqlayers
