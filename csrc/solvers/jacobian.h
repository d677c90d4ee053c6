// Internal to csrc/solvers: f with checks, the Jacobian df/du (autograd, forward or reverse mode,
// or user-supplied), the time derivative df/dt, and LU factorizations of the iteration matrix,
// as tensors or, for small systems on the CPU without grad, as plain loops on host doubles.
#pragma once

#include <torch/types.h>

#include <string>
#include <vector>

#include "core/format.h"
#include "diffeqlayers/solve.h"

namespace diffeqlayers {
namespace stiff {

using detail::fmt;  // core/format.h

// f(t, u), counted, its shape, dtype and device checked against u.
torch::Tensor eval_f(const Dynamics& f, double t, const torch::Tensor& u, Stats& stats);

// f at m states at once: Z [m, *shape] (u's shape), row i at time ts[i]; returns [m, *shape].
// With o.stacked, one call of it (counted in stats.nstacked, its m states in nfe), checked for
// shape, dtype and device, and, while `verify` (cleared at the first stack of distinct rows),
// against f on each row, which must agree up to rounding (ValueError otherwise). Without it, m
// calls of f.
torch::Tensor eval_stages(const Dynamics& f, const SolveOptions& o, const std::vector<double>& ts,
                          const torch::Tensor& Z, Stats& stats, bool& verify);

// How the Jacobian of a state u is laid out: `blocks` diagonal blocks of size n x n (blocks = 1:
// the dense Jacobian over the flattened state; blocks = u.size(0) with
// SolveOptions::independent_batch). `allow_blocks` false forces the dense layout.
struct JacLayout {
  int64_t blocks = 1;
  int64_t n = 0;  // size of one block
  int64_t size() const { return blocks * n; }
};
JacLayout jac_layout(const SolveOptions& o, const torch::Tensor& u, bool allow_blocks = true);

// f and its derivatives at one point, over the flattened state.
struct PointDerivatives {
  torch::Tensor f0;  // f(t, u), shaped like u
  torch::Tensor J;   // [blocks, n, n], J[b][i][j] = d f_{b n + i} / d u_{b n + j}
  torch::Tensor ft;  // [blocks n], d f / d t
  // u or f(t, u) carries a forward-mode tangent (and not `track`): f0, J and ft carry theirs
  // (J's from forward-over-reverse), and must not be detached or taken to the host.
  bool dual = false;
};

// x carries a forward-mode tangent at PyTorch's (single) forward-AD level.
bool is_dual(const torch::Tensor& x);

// Forward-mode tangents switched off for the scope (c10::AutoFwGradMode): nothing computed in it
// carries one, even where u or f's parameters are dual, and is_dual() is false in it. For what
// needs primal values only (the Newton iteration's evaluations and matrices, the Jacobian of an
// exact Newton correction): a Jacobian then costs one batched reverse pass, as without
// tangents, instead of forward-over-reverse per row, and an evaluation propagates no tangents
// only to drop them. PrimalOnly(false) leaves the mode as it is.
struct PrimalOnly {
  explicit PrimalOnly(bool on = true)
      : mode(!on && c10::AutogradState::get_tls_state().get_fw_grad_mode()) {}
  c10::AutoFwGradMode mode;
};

// With `track`, J and ft stay differentiable with respect to u and the parameters (so that
// reverse mode through a step that uses them is exact for the discretisation); otherwise they
// are constants. Autograd builds J (SolveOptions::jac_mode) in reverse mode, one row per
// vector-Jacobian product on one recorded evaluation of f, or in forward mode, one column per
// evaluation of f on dual tensors; with blocks, one product gives that row (column) of every
// block. "auto" is reverse mode (measured faster, jacobian.cpp); `track` always uses reverse
// mode. Forward mode needs the process-global forward-AD level: taken elsewhere, "auto" falls
// back to reverse mode and "forward" raises.
// df/dt is a second-order one-sided difference (-3 f(t, u) + 4 f(t + d, u) - f(t + 2d, u)) / 2d
// with d = eps^(1/3) max(1, |t|) taken on the side of `dir` (the sign of the step: f is never
// evaluated behind t). Dynamics take t as a double, so autograd cannot see it: two more
// evaluations of f per Jacobian, exactly zero for autonomous f. With SolveOptions::autonomous, ft
// is zero without evaluating f. Without `with_ft` (the implicit Runge-Kutta methods need no df/dt)
// ft stays undefined and those two evaluations are skipped.
PointDerivatives derivatives(const Dynamics& f, const SolveOptions& o, double t,
                             const torch::Tensor& u, bool track, Stats& stats, bool with_ft = true,
                             bool allow_blocks = true, double dir = 1.0);

// An LU factorization of the iteration matrix alpha I + beta J (J: [blocks, n, n], batched over
// the blocks) and solves with it. Differentiable (reverse mode through linalg_lu_factor_ex /
// linalg_lu_solve costs one more factorization-sized product per factorization and a pair of
// triangular solves per solve).
struct LU {
  torch::Tensor lu, pivots;
  // Factorizes; false when the matrix is singular (or not finite).
  bool factor(const torch::Tensor& J, double alpha, double beta, Stats& stats);
  // Solves matrix x = rhs for rhs shaped like the state; returns x shaped like rhs.
  torch::Tensor solve(const torch::Tensor& rhs) const;
  // The same for `batch` right-hand sides at once, rhs [batch, *state] (a vmap-batched tangent's
  // physical tensor): one solve with them as the columns.
  torch::Tensor solve_batch(const torch::Tensor& rhs, int64_t batch) const;
};

// The vector-Jacobian products of `out` with each of the k seeds in `seeds` ([k, *out.shape]),
// with respect to every tensor in `inputs`, from ONE reverse pass: the seeds batched under a
// legacy vmap level (what torch.autograd.grad(is_grads_batched=True) does), so f's graph is
// walked once and each backward formula runs on [k, ...] gradients. grads[i] is
// [k, *inputs[i].shape] (zeros where out does not depend on inputs[i]). The graph is retained.
// False (grads empty) where the graph holds a backward written in Python (a user's
// torch.autograd.Function: it may not run under vmap, and its exception could not be discarded
// without the interpreter) and, for the rest of the process, once a pass failed under vmap or
// met an operation without a batching rule (PyTorch's performance warning is kept from the
// user; the products are right either way): the caller then takes one pass per seed.
bool batched_vjps(const torch::Tensor& out, const std::vector<torch::Tensor>& inputs,
                  const torch::Tensor& seeds, std::vector<torch::Tensor>& grads);

// One differentiable Newton correction of the converged stage increments Zstar ([s, N] for the
// flattened state, detached) of an implicit Runge-Kutta step (matrix A, nodes c) from (t, u):
//   Z = Zstar - M^-1 G(Zstar),  G(Z) = Z - h (A x I) F(u + Z),  F_j = f(t + c_j h, u + Z_j),
//   M = I - h (A x I) diag(J(u + Zstar_j))  (exact Jacobians at the stages, detached; blocks
//   with SolveOptions::independent_batch).
// Returned as Zstar + (Z - Z.detach()): its value is Zstar itself (a solve that records takes the
// values of one that does not); where u or f's parameters carry grad (reverse mode) or
// forward-mode tangents, its derivative is the implicit function theorem's, M^-1 (-dG), not that
// of the iteration that found Zstar. Stages whose column of A is zero cost
// neither a Jacobian nor an evaluation. Cost: one Jacobian and one evaluation of f per stage, one
// LU of size s n. Returns an undefined tensor (why set) when M is singular.
torch::Tensor newton_correction(const Dynamics& f, const SolveOptions& o, Stats& stats, double t,
                                double h, const std::vector<double>& c,
                                const std::vector<std::vector<double>>& A, const torch::Tensor& u,
                                const torch::Tensor& Zstar, std::string& why);

// The rate test of a simplified Newton iteration (Hairer & Wanner II, IV.8) after update `it` > 0
// with scaled norm nd, the previous update's norm prev: theta = nd / prev. Fails (false, why set)
// on divergence (theta >= 0.99) and, unless `fixed` (fixed steps have no smaller step to fall
// back on), when the updates left (max_updates - 1 - it) are predicted to miss kappa.
bool newton_rate_ok(int it, double nd, double prev, int max_updates, double kappa, bool fixed,
                    double& theta, std::string& why);

// Small systems on the CPU without grad: the steppers do their stage algebra and linear algebra
// on host doubles in plain loops, calling into ATen only to evaluate f. For states of a few
// elements each ATen call (microseconds of dispatch, allocation and checks) costs far more than
// its arithmetic. True for float32/float64 CPU states, blocks of at most kHostMaxBlock rows,
// nothing to record for autograd (!track) and no forward-mode tangents.
constexpr int64_t kHostMaxBlock = 48;
bool use_host(const torch::Tensor& u, const JacLayout& layout, bool track);
// The flattened values of x as doubles.
std::vector<double> to_host(const torch::Tensor& x);
// A new tensor with like's shape, dtype and device holding x (like.numel() values).
torch::Tensor from_host(const double* x, const torch::Tensor& like);

// alpha I + beta J factorized by Gaussian elimination with partial pivoting, block by block.
struct HostLU {
  int64_t blocks = 0, n = 0;
  std::vector<double> a;  // L and U of each block, row-major
  std::vector<int64_t> piv;
  // J: blocks * n * n values (row-major blocks). False when a pivot is zero or not finite.
  bool factor(const std::vector<double>& J, int64_t blocks, int64_t n, double alpha, double beta,
              Stats& stats);
  // Overwrites x (blocks * n values) with the solution.
  void solve(double* x) const;
};

}  // namespace stiff
}  // namespace diffeqlayers
