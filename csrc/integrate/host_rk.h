// Internal (not installed): the explicit Runge-Kutta loop on host arrays, and the discrete
// adjoint's reversal of its steps there, for small solves on the CPU whose dynamics come with
// host functions (SolveOptions::host; the built-in MLP's).
//
// For a neural ODE of a few states the tensor loop pays a dispatch, an allocation and a
// tensor per stage combination, error norm and save point: several microseconds each, against
// about one for an evaluation of a 2 -> 50 -> 2 MLP. Here the state, the stages and the outputs
// are plain arrays, combined by the very loops the tensor kernels run (core/host_loops.h), so
// the host loop takes the same steps as the tensor loop, bitwise (save points inside a step
// agree to rounding: the tensor loop interpolates them with one matrix product).
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "diffeqlayers/adjoint.h"
#include "diffeqlayers/solve.h"
#include "integrate/tape.h"

namespace diffeqlayers::detail {

// For benchmarks (benchmarks/bench_speed.py, as _C._set_host_loop): false runs every solve on
// tensors, so that one build measures both loops. Process-wide; on by default.
void set_host_loop_enabled(bool on);

// Whether the host loop runs this solve: options.host applies to u0 (CPU, float/double, small;
// no tangents), the solve records no gradient (grad mode off, or neither u0 nor any of the host
// dynamics' tensors requires grad), the error norm is the default and no dense output is asked.
bool host_loop_applies(const SolveOptions& o, const torch::Tensor& u0);

// Any dynamics given as tensors (a Python f, a TorchScript module, a C++ function) on a small CPU
// state, in a solve with grad mode off (inference, the adjoints' forward solves), with the
// default norm and no dense output: the host loop runs it too, f called on a tensor copy of
// each host stage (one allocation and two copies per evaluation instead of the tensor loop's
// ops per stage combination, error norm and save point). Returns false, with nothing to undo,
// where f's value turns out to carry a forward-mode tangent (diffeq_fd: the caller runs the
// tensor loop); sol is set otherwise.
bool host_integrate_tensor_f(const Dynamics& f, const Tableau& tab, const SolveOptions& o,
                             const torch::Tensor& u0, double t0, double t1,
                             const std::vector<double>& saveat, Tape* tape, Solution& sol);

// The explicit loop of integrate() on host arrays (host_loop_applies must hold). f is the same
// dynamics as tensors, used for the initial step only (so that it is the tensor loop's).
Solution host_integrate(const Dynamics& f, const Tableau& tab, const SolveOptions& o,
                        const torch::Tensor& u0, double t0, double t1,
                        const std::vector<double>& saveat, Tape* tape);

// The discrete adjoint's backward by host loops: the tape's steps reversed last to first by the
// host vector-Jacobian products (the formulas of reverse_step_by_vjp, adjoint.cpp). rows[j + 1]
// holds (output row, theta) for the rows step j produced (rows[0]: those at t0); state(j) is the
// state at the start of step j and release(j) drops what the replay keeps from step j on.
// On success sets lam = dL/du0 and adds the parameter gradients into gp (one per wrt, zeros on
// entry) and returns true; returns false, having done nothing, where it does not apply (wrt
// holds one of the host dynamics' tensors twice, dtype or layout).
bool host_discrete_backward(const HostDynamics& host, const Tableau& tab, const Tape& tape,
                            const std::vector<std::vector<std::pair<int64_t, double>>>& rows,
                            const std::function<torch::Tensor(int64_t)>& state,
                            const std::function<void(int64_t)>& release, const torch::Tensor& G,
                            const std::vector<torch::Tensor>& wrt,
                            const std::vector<int64_t>& shape, torch::Tensor& lam,
                            std::vector<torch::Tensor>& gp, AdjointStats& stats);

}  // namespace diffeqlayers::detail
