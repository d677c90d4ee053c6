// Python bindings of TorchScript dynamics (diffeqlayers/script_dynamics.h): a torch.jit
// ScriptModule becomes native dynamics, which the solves run without the GIL.
#include <torch/csrc/jit/python/module_python.h>
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>

#include "bindings/native_dynamics.h"
#include "diffeqlayers/script_dynamics.h"

namespace py = pybind11;
using namespace diffeqlayers;
using bindings::NativeDynamics;

namespace {

// The C++ module behind a torch.jit.ScriptModule (or its `_c`, a torch._C.ScriptModule).
torch::jit::Module script_module(const py::object& obj) {
  if (std::optional<torch::jit::Module> m = torch::jit::as_module(obj)) return *m;
  if (py::isinstance(obj, py::module_::import("torch._C").attr("ScriptModule")))
    return py::cast<torch::jit::Module>(obj);
  throw py::type_error("expected a TorchScript module (torch.jit.script of an nn.Module), got " +
                       py::str(py::type::of(obj)).cast<std::string>());
}

}  // namespace

void bind_script(py::module& m) {
  m.def(
      "script_signature",
      [](const py::object& module) {
        ScriptSignature s = script_signature(script_module(module));
        return std::make_tuple(s.takes_time, s.time_as_tensor, s.schema);
      },
      py::arg("module"),
      "(takes_time, time_as_tensor, schema) of a ScriptModule's forward as dynamics; TypeError "
      "when it is not forward(u) or forward(t, u) returning a Tensor.");
  m.def(
      "script_dynamics",
      [](const py::object& module) {
        torch::jit::Module mod = script_module(module);
        const auto& qualified = mod.type()->name();
        std::string name = qualified ? qualified->qualifiedName() : mod.type()->repr_str();
        return NativeDynamics{script_dynamics(std::move(mod)), "TorchScript " + name};
      },
      py::arg("module"),
      "Native dynamics f(t, u) = module.forward([t,] u), run by the TorchScript interpreter; the "
      "module's parameters are read at each call.");
}
