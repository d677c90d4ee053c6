// Python bindings of solve_per_sample: f is called as f(t, u) with t a tensor of shape [B].
#include <torch/extension.h>

#include <string>
#include <utility>

#include "bindings/python_callbacks.h"
#include "diffeqlayers/per_sample.h"

namespace py = pybind11;
using namespace diffeqlayers;

namespace {

using bindings::call_python;
using bindings::PyHolder;
using bindings::returned_tensor;
using bindings::without_gil;

BatchDynamics python_batch_dynamics(py::object f) {
  auto holder = std::make_shared<PyHolder>(std::move(f));
  return [holder](const torch::Tensor& t, const torch::Tensor& u) -> torch::Tensor {
    return call_python(
        [&] { return returned_tensor(holder->obj(t, u), "f", " (per-sample solve)"); },
        "raised by the dynamics f in a per-sample solve, where t is a tensor of shape [B] "
        "(each sample's own time), not a float");
  };
}

py::tuple solve_per_sample_py(py::object f, const torch::Tensor& u0, const torch::Tensor& tspan,
                              SolveOptions options, py::object norm) {
  BatchDynamics dyn = python_batch_dynamics(std::move(f));
  if (!norm.is_none()) options.norm = bindings::python_norm(std::move(norm));
  PerSampleSolution out = without_gil([&] { return solve_per_sample(dyn, u0, tspan, options); });
  return py::make_tuple(out.solution, out.sample_stats.naccept, out.sample_stats.nreject,
                        out.sample_stats.iterations);
}

}  // namespace

void bind_per_sample(py::module& m) {
  m.def("solve_per_sample", &solve_per_sample_py, py::arg("f"), py::arg("u0"), py::arg("tspan"),
        py::arg("options"), py::arg("norm") = py::none(),
        "Solve a batch u0 [B, ...] with one step controller per sample; f is called as "
        "f(t: Tensor[B], u: Tensor). Returns (Solution, naccept [B], nreject [B], iterations).");
}
