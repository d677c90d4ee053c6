// Python bindings of the built-in MLP (diffeqlayers/mlp.h): its architecture, its evaluation with
// weights given from Python (the module's own nn.Parameters), and native dynamics for solves.
#include <torch/extension.h>

#include <chrono>
#include <string>
#include <utility>
#include <vector>

#include "bindings/native_dynamics.h"
#include "diffeqlayers/mlp.h"
#include "integrate/host_rk.h"

namespace py = pybind11;
using namespace diffeqlayers;
using bindings::NativeDynamics;

void bind_mlp(py::module& m) {
  py::class_<MLPSpec>(m, "MLPSpec")
      .def(py::init([](std::vector<int64_t> sizes, const std::string& activation,
                       const std::vector<std::string>& activations, double input_power,
                       bool time_input, bool bias) {
             return make_mlp_spec(std::move(sizes), activation, activations, input_power,
                                  time_input, bias);
           }),
           py::arg("sizes"), py::arg("activation") = "tanh",
           py::arg("activations") = std::vector<std::string>{}, py::arg("input_power") = 1.0,
           py::arg("time_input") = false, py::arg("bias") = true)
      .def_readonly("sizes", &MLPSpec::sizes)
      .def_property_readonly("activations",
                             [](const MLPSpec& s) {
                               std::vector<std::string> out;
                               for (auto a : s.activations) out.push_back(to_string(a));
                               return out;
                             })
      .def_readonly("input_power", &MLPSpec::input_power)
      .def_readonly("time_input", &MLPSpec::time_input)
      .def_readonly("bias", &MLPSpec::bias)
      .def("in_features", &MLPSpec::in_features, py::arg("layer"))
      .def("check_params", [](const MLPSpec& s,
                              const std::vector<torch::Tensor>& params) { s.check_params(params); })
      .def("__repr__", [](const MLPSpec& s) { return "MLPSpec" + s.repr(); });

  py::class_<NativeDynamics>(m, "NativeDynamics",
                             "Dynamics evaluated in C++; solve() accepts it in place of f.")
      .def("__call__", [](const NativeDynamics& d, double t,
                          const torch::Tensor& u) { return d.checked().f(t, u); })
      .def("__repr__", [](const NativeDynamics& d) { return "NativeDynamics(" + d.what + ")"; });

  m.def("mlp_activations", &mlp_activations, "Names of the MLP's activations.");
  m.def(
      "mlp_forward",
      [](const MLPSpec& spec, const std::vector<torch::Tensor>& params, double t,
         const torch::Tensor& u) {
        spec.check_params(params);
        return mlp_forward(spec, params, t, u);
      },
      py::arg("spec"), py::arg("params"), py::arg("t"), py::arg("u"),
      "The MLP at (t, u) with these weights ([W0, b0, W1, b1, ...]).");
  m.def(
      "mlp_dynamics",
      [](const MLPSpec& spec, std::vector<torch::Tensor> params) {
        std::vector<torch::Tensor> held = params;
        MLPFunctions fs = mlp_functions(spec, std::move(params));
        return NativeDynamics{std::move(fs.f), "MLP" + spec.repr(), std::move(fs.vjp),
                              std::move(fs.host),
                              [spec, held = std::move(held)] { spec.check_params(held); }};
      },
      py::arg("spec"), py::arg("params"),
      "Native dynamics f(t, u) = the MLP with these weights (the same tensors: gradients reach "
      "them); checked here and again by every solve that takes it.");
  // For benchmarks: whether solves may run on host arrays (SolveOptions::host; on by default),
  // so that one build measures the host loop against the tensor loop.
  m.def(
      "_set_host_loop", [](bool on) { diffeqlayers::detail::set_host_loop_enabled(on); },
      py::arg("on"));
  // For benchmarks: the mean seconds of one call of native dynamics, timed in C++ (n calls,
  // the GIL released), so that the Python call overhead is not counted as f's cost.
  m.def(
      "_time_dynamics",
      [](const NativeDynamics& d, double t, const torch::Tensor& u, int64_t n) {
        TORCH_CHECK_VALUE(n > 0, "n must be positive");
        d.checked();
        py::gil_scoped_release release;
        const auto start = std::chrono::steady_clock::now();
        for (int64_t i = 0; i < n; ++i) d.f(t, u);
        const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - start;
        return dt.count() / static_cast<double>(n);
      },
      py::arg("dynamics"), py::arg("t"), py::arg("u"), py::arg("n"));
}
