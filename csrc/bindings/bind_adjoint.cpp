// Python bindings of the adjoints (solve_adjoint) with a Python f.
//
// The forward solve runs with the GIL released, as solve() does. Backward runs inside
// PyTorch's autograd engine, also without the GIL: each call of f there takes it back (as every
// callback does), and a Python exception raised by f in backward travels through the engine as
// torch's own python_error, which the engine hands back to the Python caller of backward()
// unchanged (type, message and traceback).
#include <torch/csrc/Exceptions.h>
#include <torch/extension.h>

#include <string>
#include <utility>
#include <vector>

#include "bindings/native_dynamics.h"
#include "bindings/python_callbacks.h"
#include "diffeqlayers/adjoint.h"

namespace py = pybind11;
using namespace diffeqlayers;

namespace {

using bindings::without_gil;

// f for backward's calls: a Python error leaves as python_error, which the autograd engine
// knows how to carry back to Python.
Dynamics backward_dynamics(const Dynamics& f) {
  return [f](double t, const torch::Tensor& u) -> torch::Tensor {
    try {
      return f(t, u);
    } catch (bindings::PythonErrorPending&) {
      py::gil_scoped_acquire gil;
      python_error err;
      err.persist();
      throw err;
    }
  };
}

}  // namespace

void bind_adjoint(py::module& m) {
  py::class_<AdjointOptions>(m, "AdjointOptions")
      .def(py::init<>())
      .def_readwrite("sensealg", &AdjointOptions::sensealg)
      .def_readwrite("method", &AdjointOptions::method)
      .def_readwrite("rtol", &AdjointOptions::rtol)
      .def_readwrite("atol", &AdjointOptions::atol)
      .def_readwrite("seminorm", &AdjointOptions::seminorm)
      .def_readwrite("checkpoints", &AdjointOptions::checkpoints);

  py::class_<AdjointStats, std::shared_ptr<AdjointStats>>(m, "AdjointStats")
      .def_readonly("done", &AdjointStats::done)
      .def_readonly("nfe", &AdjointStats::nfe)
      .def_readonly("nvjp", &AdjointStats::nvjp)
      .def_readonly("nvjp_native", &AdjointStats::nvjp_native)
      .def_readonly("host_loop", &AdjointStats::host_loop)
      .def_readonly("naccept", &AdjointStats::naccept)
      .def_readonly("nreject", &AdjointStats::nreject)
      .def_readonly("replayed_steps", &AdjointStats::replayed_steps)
      .def_readonly("checkpoints", &AdjointStats::checkpoints)
      .def("__repr__", [](const AdjointStats& s) {
        return "AdjointStats(done=" + std::string(s.done ? "True" : "False") +
               ", nfe=" + std::to_string(s.nfe) + ", nvjp=" + std::to_string(s.nvjp) +
               ", nvjp_native=" + std::to_string(s.nvjp_native) +
               ", naccept=" + std::to_string(s.naccept) + ", nreject=" + std::to_string(s.nreject) +
               ", replayed_steps=" + std::to_string(s.replayed_steps) +
               ", checkpoints=" + std::to_string(s.checkpoints) + ")";
      });

  m.def("adjoint_sensealgs", &adjoint_sensealgs, "Names of the adjoint methods.");
  m.def(
      "solve_adjoint",
      [](py::object f, const torch::Tensor& u0, const torch::Tensor& tspan,
         const std::vector<torch::Tensor>& params, SolveOptions options, AdjointOptions adjoint,
         py::object norm, py::object jac, py::object nonstiff, py::object stacked) {
        // Native dynamics bring their own vector-Jacobian product (the MLP's host loops).
        if (!adjoint.vjp && py::isinstance<bindings::NativeDynamics>(f))
          adjoint.vjp = f.cast<const bindings::NativeDynamics&>().vjp;
        bool native = false;
        Dynamics dyn = bindings::dynamics_from(std::move(f), &native, &options);
        // Native dynamics raise C++ exceptions only, which the engine transports as they are.
        if (!native) adjoint.backward_dynamics = backward_dynamics(dyn);
        if (!norm.is_none()) options.norm = bindings::python_norm(std::move(norm));
        // The stiff methods' Jacobian and a split problem's explicit part, as solve() takes
        // them; the discrete adjoint's replayed steps call them in backward too.
        if (!jac.is_none()) {
          options.jac = bindings::python_jacobian(std::move(jac));
          adjoint.backward_jac = backward_dynamics(options.jac);
        }
        if (!nonstiff.is_none()) {
          options.nonstiff = bindings::python_dynamics(std::move(nonstiff));
          adjoint.backward_nonstiff = backward_dynamics(options.nonstiff);
        }
        // radau5's stacked stages, in the forward solve's Newton iterations only (the backward
        // replays steps from their converged stages and solves a system of its own).
        if (!stacked.is_none())
          options.stacked = bindings::stacked_from(std::move(stacked), options);
        return without_gil([&] { return solve_adjoint(dyn, u0, tspan, params, options, adjoint); });
      },
      py::arg("f"), py::arg("u0"), py::arg("tspan"), py::arg("params"), py::arg("options"),
      py::arg("adjoint"), py::arg("norm") = py::none(), py::arg("jac") = py::none(),
      py::arg("nonstiff") = py::none(), py::arg("stacked") = py::none(),
      "solve() whose saved states are differentiable by an adjoint method; f(t, u).");
}
