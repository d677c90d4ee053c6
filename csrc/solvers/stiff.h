// Internal to csrc/solvers: the interface of the stiff steppers and the loop that drives them.
#pragma once

#include <torch/types.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "diffeqlayers/solve.h"
#include "diffeqlayers/tableau.h"

namespace diffeqlayers {
namespace stiff {

struct MethodInfo {
  std::string name;
  int order = 0;           // order of the propagated solution
  int embedded_order = 0;  // order of the embedded solution (0: no error estimate)
  // The method's own continuous extension in Tableau::dense form (u0 + h sum_i b_i(theta) k_i
  // over StepResult::dense_terms), or nullptr for the cubic Hermite interpolant.
  const Tableau* interpolant = nullptr;
  std::string reference;
  // The stepper uses df/du (the loop then decides whether to record its dependence on u and the
  // parameters) and refuses dual tensors; false for steppers that only evaluate f (Adams).
  bool uses_jacobian = true;

  bool adaptive() const { return embedded_order > 0; }
  // The error estimate behaves like h^(min(p, p_hat) + 1).
  int controller_order() const {
    return (adaptive() ? std::min(order, embedded_order) : order) + 1;
  }
  int interpolant_order() const { return interpolant ? interpolant->dense_order : 3; }
};

struct StepResult {
  torch::Tensor unew;
  torch::Tensor err;                       // local error estimate (undefined: none)
  std::vector<torch::Tensor> dense_terms;  // what info().interpolant weighs
  torch::Tensor f0;                        // f(t, u), for the Hermite interpolant
  // kvaerno5, trbdf2 with SolveOptions::keep_stages: the stage derivatives k_i of the step
  // (k_1 = f(t, u)), from which replay() rebuilds it.
  std::vector<torch::Tensor> stages;
  std::string failure;  // non-empty: the step could not be computed; the loop shrinks dt
};

class Stepper {
 public:
  virtual ~Stepper() = default;
  virtual const MethodInfo& info() const = 0;
  // One step of signed size h from (t, u). new_point is false when (t, u) is the point of the
  // previous call (a retry after a rejection): derivatives computed there may be reused.
  virtual StepResult step(double t, const torch::Tensor& u, double h, bool new_point) = 0;
  // The discrete adjoint: the accepted step from (t, u) of size h again, differentiable, given
  // what the forward solve kept of that step (DenseStep::k). The default steps afresh (a
  // Rosenbrock step is a function of (t, u, h) alone); radau5 and the ESDIRK methods rebuild
  // their stages from the forward's converged ones.
  virtual StepResult replay(double t, const torch::Tensor& u, double h,
                            const std::vector<torch::Tensor>& /*kept*/) {
    return step(t, u, h, /*new_point=*/true);
  }
};

// The registered stepper for `name` (is_stiff_method(name) must hold). `track`: record the
// Jacobian's own dependence on u and the parameters (reverse mode through the solve).
std::unique_ptr<Stepper> make_stepper(const std::string& name, const Dynamics& f,
                                      const SolveOptions& o, Stats& stats, bool track);
const MethodInfo& method_info(const std::string& name);

// radau.cpp: the adaptive Radau IIA method of order 5 (radau5).
bool is_radau(const std::string& name);
const MethodInfo& radau_info(const std::string& name);
std::unique_ptr<Stepper> make_radau(const std::string& name, const Dynamics& f,
                                    const SolveOptions& o, Stats& stats, bool track);

// The cubic Hermite interpolant (a Tableau without dense coefficients) on [u0, u1, f0, f1], for
// the methods without an interpolant of their own.
const Tableau& hermite();

// The adaptive loop's error test: the norm (SolveOptions::norm, default RMS) of err scaled by
// atol + rtol max(|u|, |u_new|), and whether u_new is finite (or check_finite is off).
std::pair<double, bool> step_error(const SolveOptions& o, const torch::Tensor& u,
                                   const torch::Tensor& unew, const torch::Tensor& err);

// Checks the options (as solve() does for explicit methods) and runs the stiff loop from
// (t0, u) to t1. saveat is already checked and converted to doubles.
Solution solve_stiff(const Dynamics& f, const torch::Tensor& u, double t0, double t1,
                     const std::vector<double>& saveat, const SolveOptions& o);

}  // namespace stiff
}  // namespace diffeqlayers
