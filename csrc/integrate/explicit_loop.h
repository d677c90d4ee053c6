// Internal (not installed): the pieces of the explicit Runge-Kutta loop that do not touch the
// state, shared by the tensor loop (integrate/solve.cpp) and the host loop (integrate/host_rk.cpp)
// so that both take the same steps and fail with the same messages.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "control/controller.h"
#include "diffeqlayers/solve.h"

namespace diffeqlayers::detail {

// The times steps must land on, in the direction of integration, ending with t1: the user's
// tstops inside the span and, for a method whose interpolant is much less accurate than its
// steps (cubic Hermite on dopri8), the save times too.
std::vector<double> step_stops(const SolveOptions& o, const Tableau& tab, double t0, double t1,
                               const std::vector<double>& saveat);

// The first step size of an explicit loop: dt for fixed steps or when given, otherwise
// initial_step's (norm: the error norm, empty for the RMS norm); at most dt_max. f0 = f(t0, u0).
double first_step(const Dynamics& f, const Tableau& tab, const SolveOptions& o, double t0,
                  double t1, const torch::Tensor& u0, const torch::Tensor& f0,
                  const std::function<double(const torch::Tensor&)>& norm, int64_t& nfe);

// Where the next step goes from t: to t + dir h (adaptive) or the next point of the fixed grid
// base + dir h (n + 1), clipped to land on `stop` when it reaches it.
struct StepTarget {
  double tnew;  // the step's end
  double hh;    // its signed size
  bool lands;   // it ends on `stop`
};
StepTarget step_target(bool adaptive, double t, double h, int dir, double stop, double fixed_base,
                       int64_t fixed_n);

// The step-size decision of an adaptive step of signed size hh with error norm err: whether it
// is accepted, and the size of the next try in h (and, when accepted, in h_next).
bool control_step(StepController& controller, const SolveOptions& o, double err, bool finite,
                  double hh, bool lands, double& h, double& h_next);

// Why a loop stops before t1: max_num_steps exhausted; a step size below dt_min or machine
// precision (`unstable`: right after a non-finite state, which is then the reason).
std::string max_steps_why(const SolveOptions& o);
std::string underflow_why(const SolveOptions& o, bool unstable);
// "<method> failed (<code>) at t=..., dt=...: <why> [nfe=..., accepted=..., rejected=...]".
std::string failure_message(const std::string& method, ReturnCode code, double t, double dt,
                            const std::string& why, const Stats& stats);

// What the RMS error norm covers: x flattened, its first `prefix` elements, when prefix is
// positive (SolveOptions::norm_prefix); x itself otherwise.
torch::Tensor norm_head(const torch::Tensor& x, int64_t prefix);
// The default error norm: the root mean square of norm_head(x, prefix), a 0-d tensor of x's
// dtype.
torch::Tensor rms_norm(const torch::Tensor& x, int64_t prefix = 0);

}  // namespace diffeqlayers::detail
