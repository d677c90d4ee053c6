// Dynamics that live in C++ (the built-in MLP), handed to Python as an opaque object that the
// solve entry points accept in place of a Python f: such a solve never enters Python per step.
#pragma once

#include <torch/extension.h>

#include <functional>
#include <memory>
#include <string>
#include <utility>

#include "diffeqlayers/adjoint.h"
#include "diffeqlayers/solve.h"

namespace diffeqlayers::bindings {

namespace py = pybind11;

struct NativeDynamics {
  Dynamics f;
  std::string what;  // for repr and error messages
  DynamicsVjp vjp;   // f's own vector-Jacobian product for the adjoints (empty: autograd's)
  std::shared_ptr<const HostDynamics> host;  // f on host arrays (SolveOptions::host), or empty
  // Re-checks what f holds (the MLP's weights: shapes, dtypes, devices) before each solve, so
  // that a NativeDynamics kept between solves (MLP.dynamics caches it while the module holds
  // the same parameter tensors) sees a `.data` swap or a dtype change; empty: nothing to check.
  std::function<void()> check;

  // This, after check().
  const NativeDynamics& checked() const {
    if (check) check();
    return *this;
  }
};

Dynamics python_dynamics(py::object f);    // module.cpp
Jacobian python_jacobian(py::object jac);  // module.cpp
// SolveOptions::stacked from a Python callable stacked(t, u) or a NativeDynamics (whose f takes
// the stack itself; needs options.autonomous). module.cpp.
StackedDynamics stacked_from(py::object stacked, const SolveOptions& options);

// f as Dynamics: a NativeDynamics as itself, anything else as a Python callable f(t, u) that
// takes the GIL per call. `native` is set to whether f was native; `options`, when given, gets
// a native f's host functions.
inline Dynamics dynamics_from(py::object f, bool* native = nullptr,
                              SolveOptions* options = nullptr) {
  const bool is_native = py::isinstance<NativeDynamics>(f);
  if (native) *native = is_native;
  // Its host functions, unless the options bring their own.
  if (!is_native) return python_dynamics(std::move(f));
  const NativeDynamics& nd = f.cast<const NativeDynamics&>().checked();
  if (options != nullptr && !options->host) options->host = nd.host;
  return nd.f;
}

}  // namespace diffeqlayers::bindings
