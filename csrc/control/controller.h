// Step-size control: the PID controller and Hairer & Wanner's automatic initial step.
#pragma once

#include "diffeqlayers/solve.h"

namespace diffeqlayers {

// Keeps the error history of accepted steps and proposes the next step size.
class StepController {
 public:
  StepController(const ControllerOptions& options, int order);

  // Factor by which to multiply dt after a step with error norm `err` (<= 1: accepted).
  // Updates the history on acceptance.
  double propose(double err, bool accepted);

 private:
  ControllerOptions opt_;
  double q_;
  double e1_ = 1.0;  // error norms of the previous two accepted steps
  double e2_ = 1.0;
  bool last_rejected_ = false;
};

// The automatic initial step of Hairer, Norsett & Wanner, Solving ODEs I, II.4 (p. 169):
// compares |u0|, |f0| and an estimate of the second derivative, all in the error norm.
// Costs one evaluation of f. `f0` is f(t0, u0); `norm` returns the scaled error norm, or is
// empty for the RMS norm (then, for plain contiguous CPU states, computed by host loops: the
// explicit tensor and host loops both take this path, so they start with the same step), over
// the first norm_prefix elements of the flattened state when positive (SolveOptions).
double initial_step(const Dynamics& f, double t0, const torch::Tensor& u0, const torch::Tensor& f0,
                    int order, int direction, double span, double rtol, double atol,
                    const std::function<double(const torch::Tensor&)>& norm, int64_t norm_prefix,
                    int64_t& nfe);

// The two formulas of initial_step, for callers that take the norms themselves (the per-sample
// loop, which evaluates f once for the whole batch and then applies them sample by sample).
// The trial step from d0 = ||u0|| and d1 = ||f0|| (scaled norms), at most `span`:
double initial_step_trial(double d0, double d1, double span);
// The step from the trial step h0, d1 and d2 = ||f(t0 + h0, u0 + h0 f0) - f0|| / h0:
double initial_step_final(double h0, double d1, double d2, int order, double span);

}  // namespace diffeqlayers
