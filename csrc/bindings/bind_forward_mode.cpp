// Python bindings of forward mode (diffeq_fd's Jacobian Function and JVPs) with a Python closure.
//
// The C++ side runs with the GIL released: our calls are serialised on a mutex (the forward-AD
// level is process-global), and a thread waiting there must not hold the GIL that the running
// closure needs. Each call of the closure takes the GIL back, as python_dynamics in module.cpp
// does for f.
#include <torch/extension.h>

#include <string>
#include <utility>
#include <vector>

#include "bindings/python_callbacks.h"
#include "diffeqlayers/forward_mode.h"

namespace py = pybind11;
using namespace diffeqlayers;

namespace {

using bindings::call_python;
using bindings::PyHolder;
using bindings::PythonErrorPending;
using bindings::returned_tensor;
using bindings::without_gil;

SolveAndReduce python_closure(py::object fn) {
  auto holder = std::make_shared<PyHolder>(std::move(fn));
  return [holder](const torch::Tensor& u0, const std::vector<torch::Tensor>& params) {
    return call_python([&] { return returned_tensor(holder->obj(u0, params), "the reduction"); });
  };
}

ForwardModeOptions python_options(int64_t chunk_size, bool vectorize) {
  ForwardModeOptions o;
  o.chunk_size = chunk_size;
  o.vectorize = vectorize;
  // Between chunks: let Ctrl-C (and other pending signals) stop a long Jacobian.
  // A failed batched pass left its Python error set; the unbatched retry reports its own.
  o.on_vectorize_failure = [] {
    py::gil_scoped_acquire gil;
    PyErr_Clear();
  };
  o.on_chunk = [](int64_t, int64_t) {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) throw PythonErrorPending();
  };
  return o;
}

}  // namespace

void bind_forward_mode(py::module& m) {
  m.def(
      "diffeq_fd",
      [](py::object fn, const torch::Tensor& u0, const std::vector<torch::Tensor>& params,
         int64_t chunk_size, bool vectorize) {
        SolveAndReduce closure = python_closure(std::move(fn));
        ForwardModeOptions options = python_options(chunk_size, vectorize);
        return without_gil([&] { return diffeq_fd(closure, u0, params, options); });
      },
      py::arg("fn"), py::arg("u0"), py::arg("params"), py::arg("chunk_size") = 0,
      py::arg("vectorize") = true,
      "fn(u0, params) -> Tensor, differentiable w.r.t. u0 and params by a forward-mode Jacobian.");
  m.def(
      "forward_jacobian",
      [](py::object fn, const torch::Tensor& u0, const std::vector<torch::Tensor>& params,
         int64_t chunk_size, bool vectorize) {
        SolveAndReduce closure = python_closure(std::move(fn));
        ForwardModeOptions options = python_options(chunk_size, vectorize);
        return without_gil([&] { return forward_jacobian(closure, u0, params, options); });
      },
      py::arg("fn"), py::arg("u0"), py::arg("params"), py::arg("chunk_size") = 0,
      py::arg("vectorize") = true,
      "(y, J): fn's output and its Jacobian [y.numel(), n] w.r.t. inputs requiring grad.");
  m.def(
      "jvp",
      [](py::object fn, const torch::Tensor& u0, const std::vector<torch::Tensor>& params,
         const std::optional<torch::Tensor>& tangent_u0,
         const std::vector<std::optional<torch::Tensor>>& tangent_params) {
        SolveAndReduce closure = python_closure(std::move(fn));
        std::vector<torch::Tensor> tp;
        for (const auto& t : tangent_params) tp.push_back(t.has_value() ? *t : torch::Tensor());
        torch::Tensor tu = tangent_u0.has_value() ? *tangent_u0 : torch::Tensor();
        return without_gil([&] { return jvp(closure, u0, params, tu, tp); });
      },
      py::arg("fn"), py::arg("u0"), py::arg("params"), py::arg("tangent_u0"),
      py::arg("tangent_params"), "(y, dy): fn's output and its directional derivative.");
}
