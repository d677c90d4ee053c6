// Dynamics from a TorchScript module (see diffeqlayers/script_dynamics.h).
#include "diffeqlayers/script_dynamics.h"
#include "core/format.h"

#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/csrc/jit/runtime/jit_exception.h>

#include <sstream>
#include <stdexcept>
#include <utility>
#include <vector>

namespace diffeqlayers {

namespace {

using detail::fmt;

// "__torch__.MyField", without the compilation unit's address that repr_str() appends.
std::string type_name(const torch::jit::Module& module) {
  const auto& name = module.type()->name();
  return name ? name->qualifiedName() : module.type()->repr_str();
}

bool is_tensor(const c10::TypePtr& type) { return type->kind() == c10::TypeKind::TensorType; }

}  // namespace

ScriptSignature script_signature(const torch::jit::Module& module) {
  auto forward = module.find_method("forward");
  TORCH_CHECK_TYPE(forward.has_value(), "the TorchScript module ", type_name(module),
                   " has no forward method to use as the dynamics");
  const c10::FunctionSchema& schema = forward->function().getSchema();
  ScriptSignature sig;
  {
    std::ostringstream s;
    s << schema;
    sig.schema = s.str();
  }
  // arguments()[0] is self; those after the ones we pass must have defaults.
  const auto& args = schema.arguments();
  size_t required = 0;
  for (size_t i = 1; i < args.size(); ++i)
    if (!args[i].default_value().has_value()) required = i;
  TORCH_CHECK_TYPE(required == 1 || required == 2,
                   "the dynamics' TorchScript forward must take (u) or (t, u) besides self (any "
                   "further arguments with default values), got ",
                   sig.schema);
  sig.takes_time = required == 2;
  const c10::Argument& u = args[required];
  TORCH_CHECK_TYPE(is_tensor(u.type()), "the state argument '", u.name(),
                   "' of the dynamics' TorchScript forward must be a Tensor, got ",
                   u.type()->repr_str(), " in ", sig.schema);
  if (sig.takes_time) {
    const c10::Argument& t = args[1];
    const auto kind = t.type()->kind();
    TORCH_CHECK_TYPE(kind == c10::TypeKind::FloatType || kind == c10::TypeKind::NumberType ||
                         kind == c10::TypeKind::TensorType,
                     "the time argument '", t.name(),
                     "' of the dynamics' TorchScript forward(t, u) must be a float or a Tensor, "
                     "got ",
                     t.type()->repr_str(), " in ", sig.schema);
    sig.time_as_tensor = kind == c10::TypeKind::TensorType;
  }
  const auto& returns = schema.returns();
  TORCH_CHECK_TYPE(returns.size() == 1 && is_tensor(returns[0].type()),
                   "the dynamics' TorchScript forward must return a Tensor, got ", sig.schema);
  return sig;
}

Dynamics script_dynamics(torch::jit::Module module) {
  const ScriptSignature sig = script_signature(module);
  torch::jit::Method forward = module.get_method("forward");
  return [forward, sig](double t, const torch::Tensor& u) -> torch::Tensor {
    // The unoptimised plan: the profiling executor would, after a few calls, specialise the graph
    // to the profiled inputs and wrap differentiable stretches in DifferentiableGraph nodes whose
    // backward is TorchScript's own symbolic gradient. Unoptimised, the scripted ops run one by
    // one as in eager mode, so reverse mode, the adjoints' vector-Jacobian products and forward
    // mode's dual tensors all go through ATen's autograd formulas, and the results are those of
    // the same nn.Module called from Python. The flag is thread-local.
    torch::jit::GraphOptimizerEnabledGuard unoptimised(false);
    std::vector<c10::IValue> args;
    args.reserve(2);
    if (sig.takes_time) {
      if (sig.time_as_tensor)
        args.emplace_back(at::scalar_tensor(t, u.options()));
      else
        args.emplace_back(t);
    }
    args.emplace_back(u);
    c10::IValue out;
    try {
      out = forward(std::move(args));
    } catch (c10::Error& e) {
      e.add_context("in the TorchScript dynamics at t=" + fmt(t));
      throw;
    } catch (const torch::jit::JITException& e) {
      // A `raise` in the script: keep the exception's Python class, add the time.
      throw torch::jit::JITException(
          std::string(e.what()) + "\n(in the TorchScript dynamics at t=" + fmt(t) + ")",
          e.getPythonClassName(), e.getOriginalMsg());
    } catch (const std::runtime_error& e) {
      // An op that failed inside the script: the interpreter reports it as a runtime_error
      // carrying the TorchScript traceback.
      throw std::runtime_error(std::string(e.what()) +
                               "\n(in the TorchScript dynamics at t=" + fmt(t) + ")");
    }
    TORCH_CHECK_TYPE(out.isTensor(), "the dynamics' TorchScript forward returned ", out.tagKind(),
                     " instead of a Tensor (at t=", fmt(t), ")");
    return std::move(out).toTensor();
  };
}

}  // namespace diffeqlayers
