// The public solve API: dynamics, options, the Solution it returns, and solve() itself.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "diffeqlayers/tableau.h"

namespace diffeqlayers {

// du/dt = f(t, u). Parameters live inside the callable (a closure or a module); under grad mode
// every op the callable runs is recorded by autograd, which is how diffeq_rd differentiates.
using Dynamics = std::function<torch::Tensor(double t, const torch::Tensor& u)>;

// The same f on m states at once (SolveOptions::stacked): u is [m, *state_shape], t the m times
// as a tensor [m, 1, ..., 1] (u.dim() dimensions, the state's dtype and device, broadcasting
// against u), and the result is [m, *state_shape] with row i = f(t_i, u_i).
using StackedDynamics =
    std::function<torch::Tensor(const torch::Tensor& t, const torch::Tensor& u)>;

// The Jacobian df/du at (t, u) for the stiff methods, as an [n, n] matrix over the flattened
// state (n = u.numel(), row i = d f_i / d u). Optional: without it, autograd builds it.
using Jacobian = std::function<torch::Tensor(double t, const torch::Tensor& u)>;

// Maps the scaled error err / (atol + rtol * max(|u|, |u_new|)) to a non-negative scalar; a
// step is accepted when the result is <= 1. Default: root mean square over all elements.
using ErrorNorm = std::function<torch::Tensor(const torch::Tensor& scaled_error)>;

// Step-size controller, in the PID form of Soderlind (2003):
//   factor = safety * e_n^(-beta1/q) * e_{n-1}^(-beta2/q) * e_{n-2}^(-beta3/q),
// where e_n is the current error norm and q the method's controller order. The factor is
// clipped to [factor_min, factor_max] and to at most 1 right after a rejection.
struct ControllerOptions {
  double beta1 = 0.85;
  double beta2 = -0.2;
  double beta3 = 0.0;
  double safety = 0.9;
  double factor_min = 0.2;
  double factor_max = 10.0;

  // Integral (elementary) controller, as in torchdiffeq.
  static ControllerOptions I() { return {1.0, 0.0, 0.0}; }
  // PI controller with the coefficients of Hairer's DOPRI5 code (beta = 0.04: exponents 0.17 on
  // the current error and 0.04 on the previous one for q = 5; Hairer, Norsett & Wanner, Solving
  // ODEs I, II.4 and the dopri5 sources): the default. Gustafsson's stronger smoothing
  // (0.7, -0.4) is available by setting the fields; on smooth problems it grows steps slowly.
  static ControllerOptions PI() { return {0.85, -0.2, 0.0}; }
  // Soderlind's H211PI-like PID filter with a derivative term.
  static ControllerOptions PID() { return {0.49, -0.34, 0.1}; }
};

// The same dynamics on raw host arrays, for small solves on the CPU: a solve that records
// nothing (inference, the adjoints' forward solves) then runs its whole loop on plain arrays, and
// the discrete adjoint reverses its steps there, with no tensor op per stage. It must compute f
// exactly as the Dynamics it accompanies does (bitwise: the host and tensor paths then take the
// same steps). The built-in MLP supplies one (mlp_host in mlp.h); SolveOptions::host takes it.
template <typename T>
struct HostFunctions {
  // y = f(t, u) for a state of n elements (contiguous, as the state tensor lays them out).
  std::function<void(double t, int64_t n, const T* u, T* y)> f;
  // fu = f(t, u), du = lambda^T df/du, and lambda^T df/dparams[i] added into dparams[i] for every
  // entry that is not null (one entry per HostDynamics::params, laid out as that tensor).
  std::function<void(double t, int64_t n, const T* u, const T* lambda, T* fu, T* du,
                     const std::vector<T*>& dparams)>
      vjp;
  // Optional, all three or none: y = f(t, u) keeping in `kept` (kept_size(n) values) what a
  // vector-Jacobian product at the same (t, u) needs (the MLP's activations), and that product
  // from it, without evaluating f again. The discrete adjoint's backward evaluates each stage of
  // a step and then takes the product there: a third of its evaluations saved.
  std::function<int64_t(int64_t n)> kept_size;
  std::function<void(double t, int64_t n, const T* u, T* y, T* kept)> f_keep;
  std::function<void(int64_t n, const T* u, const T* kept, const T* lambda, T* du,
                     const std::vector<T*>& dparams)>
      vjp_kept;
};

struct HostDynamics {
  // Whether the host functions take this state (CPU, dtype, size). Checked once per solve.
  std::function<bool(const torch::Tensor& u)> applies;
  HostFunctions<float> f32;
  HostFunctions<double> f64;
  // Every tensor f reads: a solve that records a gradient for one of them runs on tensors.
  std::vector<torch::Tensor> params;
};

struct SolveOptions {
  std::string method = "tsit5";
  double rtol = 1e-7;
  double atol = 1e-9;
  // Fixed step size for fixed-step methods (required there) or when adaptive == false;
  // the first step for adaptive methods (0: Hairer & Wanner's automatic initial step).
  double dt = 0.0;
  bool adaptive = true;  // ignored (false) for methods without an error estimate
  double dt_min = 0.0;
  double dt_max = std::numeric_limits<double>::infinity();
  int64_t max_num_steps = 100000;  // accepted + rejected steps
  ControllerOptions controller = ControllerOptions::PI();
  ErrorNorm norm;  // empty: RMS norm
  // With the RMS norm (norm empty), explicit Runge-Kutta methods: the norm covers only the first
  // norm_prefix elements of the flattened state, a seminorm (the adjoints' seminorm option sets it
  // so that error control leaves out the parameter-gradient channels at the end of their state),
  // in the step errors and the automatic initial step alike. 0: every element.
  int64_t norm_prefix = 0;
  // Times at which to save, strictly monotone in the direction of integration and inside the
  // span. Undefined: save at every step (t0 included when save_start). May require grad: the
  // output at each time then has the gradient <grad, f(t_i, u(t_i))> with respect to it.
  torch::Tensor saveat;
  bool save_start = true;
  // Times that steps must land on exactly (discontinuities in f, for instance).
  std::vector<double> tstops;
  // Keep every step's stages so that Solution::operator() evaluates the solution anywhere.
  bool dense = false;
  // With dense: the ESDIRK methods without an interpolant of their own (kvaerno5, trbdf2), and
  // kencarp4 on a split problem, also keep their converged stages (the implicit part's), after
  // the interpolant's terms in DenseStep::k (set by the discrete adjoint, which rebuilds each
  // step from them; s more tensors per step).
  bool keep_stages = false;
  // Stop with an error when the state becomes NaN/Inf (adaptive methods first try smaller steps).
  bool check_finite = true;
  // Throw SolverError on failure; otherwise return the partial Solution with its retcode.
  bool throw_on_failure = true;
  // Tensors the dynamics use as parameters; checked for dtype and device against u0.
  std::vector<torch::Tensor> params;
  // Stiff methods (stiff_methods()): a user-supplied Jacobian df/du; empty: built by autograd.
  Jacobian jac;
  // Stiff methods, the autograd Jacobian: "forward" (one forward-mode pass per column, on dual
  // tensors), "reverse" (one vector-Jacobian product per row) or "auto" (by block size, see
  // csrc/solvers/jacobian.cpp; reverse mode, measured faster at every size tried). Reverse mode
  // through the solve always records reverse-mode Jacobians.
  std::string jac_mode = "auto";
  // Stiff methods: f does not depend on t. The Rosenbrock methods then take df/dt = 0 instead of
  // its one-sided difference quotient (two evaluations of f per Jacobian); the other methods need
  // no df/dt and ignore it. Declaring it for an f that reads t gives wrong results.
  bool autonomous = false;
  // Stiff methods: the leading dimension of the state holds independent systems (f of one sample
  // never reads another sample's state). Jacobians are then per-sample blocks [B, n, n] (n the
  // size of one sample) with batched LU factorizations, instead of one dense (B n) x (B n)
  // matrix; a user jac returns the blocks [B, n, n]. Declaring it for coupled samples leaves
  // out the coupling from the Jacobian (wrong for Rosenbrock methods, slow Newton for ESDIRK).
  bool independent_batch = false;
  // Adams methods (adams_methods()): the highest order the step history may reach (1 to 12,
  // torchdiffeq's max_order; below 4 every step is RK4), and the most corrector iterations per
  // step of implicit_adams (torchdiffeq's max_iters).
  int64_t max_order = 12;
  int64_t max_iters = 4;
  // A split problem u' = f(t, u) + nonstiff(t, u): kencarp4 treats f implicitly and nonstiff
  // explicitly (IMEX, its additive tableau pair; the Jacobian, jac included, is that of f alone);
  // every other method solves the sum. Empty: no split.
  Dynamics nonstiff;
  // radau5 and the fixed-step implicit Runge-Kutta methods: f on stacked states
  // (StackedDynamics), so that each Newton update evaluates its stages (radau5's three, all the
  // implicit ones of a fixed-step method) in one call instead of one call each. For a small state
  // a call of f costs about the same for one state or three (its cost is per operation), so this
  // cuts the Newton iteration's cost of f by up to 3x. Its first stack of distinct states in a
  // solve is checked against f on each state (more evaluations, counted; ValueError when they
  // differ beyond rounding). Autograd Jacobians (not recorded) then take one reverse pass through
  // one call on n copies of the state (n the block size; n evaluations in nfe). Stats::nstacked
  // counts its calls (nfe counts the states). The Rosenbrock and ESDIRK methods, given it, take
  // their Jacobians that way too, with no check (they stack only copies of one state; Python's
  // solve does not pass it to them: measured, it bought them nothing); the explicit methods
  // ignore it. Empty: one call per stage.
  StackedDynamics stacked;
  // f on host arrays (see HostDynamics): explicit methods run on it when the solve records nothing,
  // the state is small and on the CPU, and norm is the default; empty: always tensors.
  std::shared_ptr<const HostDynamics> host;
};

enum class ReturnCode { Success, MaxIters, DtLessThanMin, Unstable };
std::string to_string(ReturnCode code);

struct Stats {
  int64_t nfe = 0;  // evaluations of f
  // Calls of SolveOptions::stacked, each of m states that nfe counts (the stages: m = 3 for
  // radau5, the implicit stages of a fixed-step method; an autograd Jacobian: m = n, the block
  // size; the one check against f: m single calls as well).
  int64_t nstacked = 0;
  int64_t naccept = 0;  // accepted steps
  int64_t nreject = 0;  // rejected steps
  int64_t njac = 0;     // Jacobians of f (stiff methods)
  int64_t nlu = 0;      // LU factorizations (stiff methods)
  // Stiff methods: the diagonal blocks of each Jacobian and LU (1: one dense matrix; B with
  // SolveOptions::independent_batch).
  int64_t jac_blocks = 0;
  // Steps whose corrector iteration did not converge within max_iters (implicit_adams); the
  // solve goes on with the last iterate, as torchdiffeq does (it warns).
  int64_t nnonconverged = 0;
  // Adaptive rodas5: Jacobians at which df/dt was not zero. Its error estimate does not see f's
  // explicit dependence on t (rosenbrock.cpp), so such a solve's steps are not controlled for it
  // (Python warns; rodas5p is the method for such f).
  int64_t ntime_blind = 0;
  // The loop ran on host arrays (SolveOptions::host; see its conditions there).
  bool host_loop = false;
};

// A failed solve: the message names the cause, t and dt.
class SolverError : public std::runtime_error {
 public:
  SolverError(ReturnCode code, double t, double dt, const std::string& what)
      : std::runtime_error(what), code(code), t(t), dt(dt) {}
  ReturnCode code;
  double t;
  double dt;
};

// Everything needed to evaluate the solution inside one accepted step.
struct DenseStep {
  double t0 = 0.0;
  double h = 0.0;
  torch::Tensor u0, u1;
  std::vector<torch::Tensor> k;  // the stages (own interpolant) or {f(t0,u0), f(t0+h,u1)} (Hermite)
};

class DenseOutput {
 public:
  DenseOutput(const Tableau* tab, std::vector<DenseStep> steps, int direction)
      : tab_(tab), steps_(std::move(steps)), direction_(direction) {}
  // The solution at time t, which must lie in the solved span.
  torch::Tensor operator()(double t) const;
  const std::vector<DenseStep>& steps() const { return steps_; }

 private:
  const Tableau* tab_;
  std::vector<DenseStep> steps_;
  int direction_;
};

// Interpolates inside one step at theta in [0, 1]: the tableau's own interpolant when it has
// one, otherwise the cubic Hermite through (u0, f0) and (u1, f1). Differentiable.
torch::Tensor interpolate(const Tableau& tab, const DenseStep& step, double theta);

// The same at several thetas of one step at once, stacked: [thetas.size(), *u0.shape]. One matrix
// product over the stacked stages, so that many save points in a step add few autograd nodes.
torch::Tensor interpolate_many(const Tableau& tab, const DenseStep& step,
                               const std::vector<double>& thetas);

struct AdjointStats;  // adjoint.h

struct Solution {
  torch::Tensor t;  // [n] float64, the saved times
  torch::Tensor u;  // [n, *u0.shape], the saved states
  Stats stats;
  ReturnCode retcode = ReturnCode::Success;
  std::string message;
  std::shared_ptr<DenseOutput> dense;  // set when SolveOptions::dense
  // Adaptive solves: the step size the controller proposed after the last accepted step (a good
  // first step for a continuation of the solve). 0 for fixed steps.
  double dt_next = 0.0;
  // Set by solve_adjoint (adjoint.h): the backward solve's statistics, filled in by backward.
  std::shared_ptr<AdjointStats> adjoint_stats;

  bool success() const { return retcode == ReturnCode::Success; }
  // Dense evaluation; requires SolveOptions::dense.
  torch::Tensor operator()(double t) const;
};

// Solves du/dt = f(t, u), u(tspan[0]) = u0, from tspan[0] to tspan[1] (either direction).
// tspan holds two numbers; either may require grad (gradients with respect to the span).
// Under grad mode the whole solve is recorded by autograd (reverse mode through the solver).
Solution solve(const Dynamics& f, const torch::Tensor& u0, const torch::Tensor& tspan,
               const SolveOptions& options = {});
// Convenience overload with a plain span.
Solution solve(const Dynamics& f, const torch::Tensor& u0, double t0, double t1,
               const SolveOptions& options = {});

namespace detail {
template <typename M, typename = void>
struct forward_takes_time : std::false_type {};
template <typename M>
struct forward_takes_time<
    M, std::void_t<decltype(std::declval<M&>()->forward(0.0, std::declval<torch::Tensor>()))>>
    : std::true_type {};
}  // namespace detail

// Dynamics from a torch::nn::Module holder whose forward takes (t, u) or just (u).
// (C++17 detection rather than a C++20 requires-clause: torch <= 2.12 builds with C++17.)
template <typename ModuleHolder>
Dynamics module_dynamics(ModuleHolder module) {
  return [module](double t, const torch::Tensor& u) mutable -> torch::Tensor {
    if constexpr (detail::forward_takes_time<ModuleHolder>::value) {
      return module->forward(t, u);
    } else {
      return module->forward(u);
    }
  };
}

}  // namespace diffeqlayers
