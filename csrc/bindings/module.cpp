// The pybind11 module diffeqlayers._C: the only place where Python meets the C++ core.
//
// The solve runs with the GIL released; each call of a Python f (or norm) takes it back for the
// duration of the call (python_callbacks.h).
#include <torch/extension.h>

#include <sstream>

#include "bindings/native_dynamics.h"
#include "bindings/python_callbacks.h"
#include "diffeqlayers/diffeqlayers.h"

namespace py = pybind11;
using namespace diffeqlayers;

namespace diffeqlayers::bindings {

namespace {

// A Python callable g(t, u) -> tensor (the dynamics f, a Jacobian jac) as a C++ function; `who`
// names it in a TypeError for a non-tensor result, `what` in the note added to an exception it
// raises. Both messages, with t, are formatted only when needed: g runs once per evaluation.
std::function<torch::Tensor(double, const torch::Tensor&)> python_of_t_u(py::object g,
                                                                         const char* who,
                                                                         const char* what) {
  auto holder = std::make_shared<PyHolder>(std::move(g));
  return [holder, who, what](double t, const torch::Tensor& u) -> torch::Tensor {
    return call_python(
        [&] {
          py::object out = holder->obj(t, u);
          if (THPVariable_Check(out.ptr())) return THPVariable_Unpack(out.ptr());
          return returned_tensor(out, who, " (at t=" + std::to_string(t) + ")");
        },
        [t, what] { return std::string("raised by ") + what + " at t=" + std::to_string(t); });
  };
}

}  // namespace

Dynamics python_dynamics(py::object f) {
  return python_of_t_u(std::move(f), "f", "the dynamics f");
}

Jacobian python_jacobian(py::object jac) {
  return python_of_t_u(std::move(jac), "jac", "the Jacobian jac");
}

StackedDynamics stacked_from(py::object stacked, const SolveOptions& options) {
  if (py::isinstance<NativeDynamics>(stacked)) {
    // The built-in MLP and TorchScript modules map leading dimensions through: f itself takes
    // the stack, when it does not read t (one t per row would be needed).
    TORCH_CHECK_VALUE(options.autonomous,
                      "vectorized=True with a native f (the built-in MLP, a TorchScript module) "
                      "needs an f that ignores t (autonomous)");
    Dynamics f = stacked.cast<const NativeDynamics&>().f;
    return [f](const torch::Tensor&, const torch::Tensor& u) { return f(0.0, u); };
  }
  auto holder = std::make_shared<PyHolder>(std::move(stacked));
  return [holder](const torch::Tensor& t, const torch::Tensor& u) -> torch::Tensor {
    return call_python(
        [&] {
          py::object out = holder->obj(t, u);
          if (THPVariable_Check(out.ptr())) return THPVariable_Unpack(out.ptr());
          return returned_tensor(out, "the vectorized f", " (on a stack of states)");
        },
        "raised by the dynamics f on a stack of states (vectorized=True)");
  };
}

ErrorNorm python_norm(py::object norm) {
  auto holder = std::make_shared<PyHolder>(std::move(norm));
  return [holder](const torch::Tensor& x) -> torch::Tensor {
    return call_python(
        [&] {
          py::object out = holder->obj(x);
          if (THPVariable_Check(out.ptr())) return THPVariable_Unpack(out.ptr());
          if (!py::isinstance<py::float_>(out) && !py::isinstance<py::int_>(out))
            throw py::type_error("norm must return a tensor or a float");
          return torch::tensor(out.cast<double>(), torch::dtype(torch::kFloat64));
        },
        "raised by the error norm");
  };
}

}  // namespace diffeqlayers::bindings

namespace {

using bindings::python_dynamics;
using bindings::python_jacobian;
using bindings::python_norm;
using bindings::without_gil;

Solution solve_py(py::object f, const torch::Tensor& u0, const torch::Tensor& tspan,
                  SolveOptions options, py::object norm, py::object jac, py::object nonstiff,
                  py::object stacked) {
  // A NativeDynamics (the built-in MLP) runs without the GIL for the whole solve.
  Dynamics dyn = bindings::dynamics_from(std::move(f), nullptr, &options);
  if (!norm.is_none()) options.norm = python_norm(std::move(norm));
  // The Jacobian of the stiff methods: a callable like f, called as jac(t, u).
  if (!jac.is_none()) options.jac = python_jacobian(std::move(jac));
  // A split problem's explicitly treated part (kencarp4 IMEX), called like f.
  if (!nonstiff.is_none()) options.nonstiff = python_dynamics(std::move(nonstiff));
  // radau5's stacked stages: f(t [m, 1, ...], u [m, *shape]).
  if (!stacked.is_none()) options.stacked = bindings::stacked_from(std::move(stacked), options);
  return without_gil([&] { return solve(dyn, u0, tspan, options); });
}

}  // namespace

void bind_forward_mode(py::module& m);  // bind_forward_mode.cpp
void bind_adjoint(py::module& m);       // bind_adjoint.cpp
void bind_mlp(py::module& m);           // bind_mlp.cpp
void bind_per_sample(py::module& m);    // bind_per_sample.cpp
void bind_script(py::module& m);        // bind_script.cpp

PYBIND11_MODULE(_C, m) {
  m.doc() = "diffeqlayers C++ core: explicit Runge-Kutta solvers on torch tensors";

  py::register_exception<SolverError>(m, "SolverError", PyExc_RuntimeError);

  py::enum_<ReturnCode>(m, "ReturnCode")
      .value("Success", ReturnCode::Success)
      .value("MaxIters", ReturnCode::MaxIters)
      .value("DtLessThanMin", ReturnCode::DtLessThanMin)
      .value("Unstable", ReturnCode::Unstable);

  py::class_<ControllerOptions>(m, "ControllerOptions")
      .def(py::init<>())
      .def_readwrite("beta1", &ControllerOptions::beta1)
      .def_readwrite("beta2", &ControllerOptions::beta2)
      .def_readwrite("beta3", &ControllerOptions::beta3)
      .def_readwrite("safety", &ControllerOptions::safety)
      .def_readwrite("factor_min", &ControllerOptions::factor_min)
      .def_readwrite("factor_max", &ControllerOptions::factor_max)
      .def_static("I", &ControllerOptions::I)
      .def_static("PI", &ControllerOptions::PI)
      .def_static("PID", &ControllerOptions::PID)
      .def("__repr__", [](const ControllerOptions& c) {
        std::ostringstream s;
        s << "ControllerOptions(beta1=" << c.beta1 << ", beta2=" << c.beta2 << ", beta3=" << c.beta3
          << ", safety=" << c.safety << ", factor_min=" << c.factor_min
          << ", factor_max=" << c.factor_max << ")";
        return s.str();
      });

  py::class_<SolveOptions>(m, "SolveOptions")
      .def(py::init<>())
      .def_readwrite("method", &SolveOptions::method)
      .def_readwrite("rtol", &SolveOptions::rtol)
      .def_readwrite("atol", &SolveOptions::atol)
      .def_readwrite("dt", &SolveOptions::dt)
      .def_readwrite("adaptive", &SolveOptions::adaptive)
      .def_readwrite("dt_min", &SolveOptions::dt_min)
      .def_readwrite("dt_max", &SolveOptions::dt_max)
      .def_readwrite("max_num_steps", &SolveOptions::max_num_steps)
      .def_readwrite("controller", &SolveOptions::controller)
      .def_readwrite("saveat", &SolveOptions::saveat)
      .def_readwrite("save_start", &SolveOptions::save_start)
      .def_readwrite("tstops", &SolveOptions::tstops)
      .def_readwrite("dense", &SolveOptions::dense)
      .def_readwrite("check_finite", &SolveOptions::check_finite)
      .def_readwrite("throw_on_failure", &SolveOptions::throw_on_failure)
      .def_readwrite("params", &SolveOptions::params)
      .def_readwrite("max_order", &SolveOptions::max_order)
      .def_readwrite("max_iters", &SolveOptions::max_iters)
      .def_readwrite("jac_mode", &SolveOptions::jac_mode)
      .def_readwrite("autonomous", &SolveOptions::autonomous)
      .def_readwrite("independent_batch", &SolveOptions::independent_batch);

  py::class_<Stats>(m, "Stats")
      .def_readonly("nfe", &Stats::nfe)
      .def_readonly("nstacked", &Stats::nstacked)
      .def_readonly("naccept", &Stats::naccept)
      .def_readonly("nreject", &Stats::nreject)
      .def_readonly("njac", &Stats::njac)
      .def_readonly("nlu", &Stats::nlu)
      .def_readonly("nnonconverged", &Stats::nnonconverged)
      .def_readonly("ntime_blind", &Stats::ntime_blind)
      .def_readonly("host_loop", &Stats::host_loop)
      .def_readonly("jac_blocks", &Stats::jac_blocks)
      .def("__repr__", [](const Stats& s) {
        return "Stats(nfe=" + std::to_string(s.nfe) + ", naccept=" + std::to_string(s.naccept) +
               ", nreject=" + std::to_string(s.nreject) +
               (s.njac || s.nlu
                    ? ", njac=" + std::to_string(s.njac) + ", nlu=" + std::to_string(s.nlu)
                    : std::string()) +
               (s.nnonconverged ? ", nnonconverged=" + std::to_string(s.nnonconverged)
                                : std::string()) +
               (s.ntime_blind ? ", ntime_blind=" + std::to_string(s.ntime_blind) : std::string()) +
               (s.nstacked ? ", nstacked=" + std::to_string(s.nstacked) : std::string()) + ")";
      });

  py::class_<Solution>(m, "Solution")
      .def_readonly("t", &Solution::t)
      .def_readonly("u", &Solution::u)
      .def_readonly("stats", &Solution::stats)
      .def_readonly("retcode", &Solution::retcode)
      .def_readonly("message", &Solution::message)
      .def_readonly("dt_next", &Solution::dt_next)
      .def_readonly("adjoint_stats", &Solution::adjoint_stats)
      .def_property_readonly("has_dense", [](const Solution& s) { return s.dense != nullptr; })
      .def("evaluate", [](const Solution& s, double t) { return s(t); }, py::arg("t"));

  py::class_<Tableau>(m, "Tableau")
      .def_readonly("name", &Tableau::name)
      .def_readonly("order", &Tableau::order)
      .def_readonly("embedded_order", &Tableau::embedded_order)
      .def_readonly("c", &Tableau::c)
      .def_readonly("a", &Tableau::a)
      .def_readonly("b", &Tableau::b)
      .def_readonly("b_err", &Tableau::b_err)
      .def_readonly("dense_order", &Tableau::dense_order)
      .def_readonly("reference", &Tableau::reference)
      .def_property_readonly("stages", &Tableau::stages)
      .def_property_readonly("adaptive", &Tableau::adaptive)
      .def_property_readonly("fsal", &Tableau::fsal)
      .def_property_readonly("has_dense", &Tableau::has_dense);

  m.def("tableau", &tableau, py::arg("name"), py::return_value_policy::reference,
        "The Butcher tableau registered under a method name.");
  m.def("methods", &methods, "Names of the registered methods.");
  m.def("stiff_methods", &stiff_methods, "Names of the stiff (Rosenbrock and ESDIRK) methods.");
  m.def("adams_methods", &adams_methods, "Names of the fixed-grid Adams methods.");
  m.def("solve", &solve_py, py::arg("f"), py::arg("u0"), py::arg("tspan"), py::arg("options"),
        py::arg("norm") = py::none(), py::arg("jac") = py::none(), py::arg("nonstiff") = py::none(),
        py::arg("stacked") = py::none(),
        "Solve du/dt = f(t, u) from tspan[0] to tspan[1]; f is called as f(t: float, u: Tensor).");

  bind_forward_mode(m);
  bind_adjoint(m);
  bind_mlp(m);
  bind_per_sample(m);
  bind_script(m);
}
