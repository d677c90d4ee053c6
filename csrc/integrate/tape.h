// Internal (not installed): a solve's accepted steps recorded on a tape, and their exact replay.
//
// The adjoints (sensitivity/adjoint.cpp) run the forward solve without recording autograd
// graphs and keep only what the tape holds: the start time and signed size of every accepted
// step (two doubles each) and the state at the start of some of them (checkpoints). Replaying a
// step from its start state with its recorded size repeats the forward's arithmetic exactly
// (same stages, same values), so the replayed states, stages and interpolants are bitwise those
// of the forward solve.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "diffeqlayers/solve.h"

namespace diffeqlayers::detail {

class BufferPool;  // integrate/buffer_pool.h

// Where one saved output row came from.
struct SaveRef {
  int64_t step;  // index of the accepted step; -1: the initial state itself
  double theta;  // inside the step (0 < theta < 1, interpolated), or exactly 1: its end state
};

struct Tape {
  // Keep states at all (false: times and sizes only, as the backsolve adjoint needs).
  bool store_states = true;
  // The most checkpoints kept (0: one per step). When exceeded, every other one is dropped and
  // the stride doubles ("thinning"), so at most cap states are held whatever the step count; a
  // replay then recomputes up to stride - 1 steps from the checkpoint before the one it wants.
  int64_t cap = 0;
  int64_t stride = 1;
  std::vector<double> t, h;                      // per accepted step: start time, signed size
  std::map<int64_t, torch::Tensor> checkpoints;  // step index -> state at its start (detached)
  std::vector<SaveRef> saves;                    // per output row
  torch::Tensor u_end;                           // the state after the last accepted step
  double t_end = 0.0;
  // The discrete adjoint over host dynamics that keep what their products need
  // (HostFunctions::f_keep): per accepted step, its stages k_1..k_s and what f kept at each, as
  // the host loop computed them ([s (n + kept_size(n))] values of the state's dtype), so that the
  // backward takes its products without evaluating f again. Only with one checkpoint per step
  // (cap 0), and up to kHostStageBytes in all: later steps have none and are evaluated again.
  bool keep_host_stages = false;
  std::map<int64_t, torch::Tensor> host_stages;
  static constexpr size_t kHostStageBytes = size_t{64} << 20;

  int64_t steps() const { return static_cast<int64_t>(t.size()); }
  // Whether record() keeps the start state of the step with index j (the next one recorded when
  // j == steps()): u may be left undefined otherwise.
  bool keeps(int64_t j) const { return store_states && j % stride == 0; }
  // Records an accepted step from (t0, u) of signed size hh that ended in (t0 + hh, unew). An
  // undefined unew leaves u_end to the caller (who sets it once the loop ends).
  void record(double t0, double hh, const torch::Tensor& u, const torch::Tensor& unew);
};

// Evaluates f, counts it, and checks what it returned against the state (shape, dtype, device).
torch::Tensor checked_eval(const Dynamics& f, double t, const torch::Tensor& u, int64_t& nfe);

// One step of the explicit Runge-Kutta method `tab` from (t, u) of signed size hh: fills
// k[0..s-1] (k[0] = f(t, u)) and returns the new state, built as the integrator builds it.
// Under grad mode the step is recorded by autograd; combinations that record nothing write into
// buffers from `pool` when one is given.
torch::Tensor rk_step(const Dynamics& f, const Tableau& tab, double t, double hh,
                      const torch::Tensor& u, std::vector<torch::Tensor>& k, int64_t& nfe,
                      BufferPool* pool = nullptr);

// A replayed step as the forward solve saw it: its dense data (u0, u1, and the stages of the
// own interpolant or {f(t, u0), f(t + hh, u1)} for cubic Hermite). With dense = false only u0
// and u1 are filled (k empty).
DenseStep replay_step(const Dynamics& f, const Tableau& tab, double t, double hh,
                      const torch::Tensor& u, bool dense, int64_t& nfe);

// The Solution of a finished or failed loop from what it saved: rows stacked (one state per
// entry) or blocks concatenated ([m, *shape] per entry), an empty [0, *shape] when nothing was
// saved, and the dense output over `interpolant` when options.dense kept steps. Shared by the
// explicit integrator and the stiff loop.
Solution assemble_solution(ReturnCode code, const std::string& msg, const Stats& stats,
                           const std::vector<double>& out_t,
                           const std::vector<torch::Tensor>& out_u,
                           std::vector<DenseStep>& dense_steps,
                           const std::vector<int64_t>& state_shape,
                           const torch::TensorOptions& state_options, bool rows, bool dense,
                           const Tableau* interpolant, int dir);

// The checked span, method and save times of a solve (everything solve() validates).
struct Prepared {
  double t0 = 0.0, t1 = 0.0;
  const Tableau* tab = nullptr;  // null for the stiff methods (csrc/solvers), which have none
  bool stiff = false;
  std::vector<double> saveat;
};
Prepared prepare(const Dynamics& f, const torch::Tensor& u0, const torch::Tensor& tspan,
                 const SolveOptions& options);

// The options every loop checks (tolerances, dt and its bounds, max_num_steps, tstops), for a
// method that steps adaptively or not; raises ValueError naming the option.
void check_step_options(const SolveOptions& o, bool adaptive, const std::string& method);
// SolveOptions::norm_prefix within the state's size, without a norm, for an explicit method.
void check_norm_prefix(const SolveOptions& o, const torch::Tensor& u0, bool stiff);

// Runs `core` from the (checked) problem, attaching the exact-flow time terms that give
// gradients with respect to tspan and saveat: u0 - (t0 - t0.detach()) f(t0, u0) goes in, and
// each saved row gets + (t_i - t_i.detach()) f(t_i, u_i). `core` receives that start state.
Solution solve_with_time_terms(const Dynamics& f, const torch::Tensor& u0,
                               const torch::Tensor& tspan, const SolveOptions& options,
                               const Prepared& prep,
                               const std::function<Solution(const torch::Tensor&)>& core);

// The integration loop of solve() on a checked problem, without time terms; records the
// accepted steps and the origin of every output row on `tape` when it is given.
Solution integrate(const Dynamics& f, const torch::Tensor& u0, const Prepared& prep,
                   const SolveOptions& options, Tape* tape);

}  // namespace diffeqlayers::detail
