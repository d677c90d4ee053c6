// Dynamics given as a TorchScript module (torch.jit.script of an nn.Module, or a module built in
// C++), run by the TorchScript interpreter: a solve with such an f never calls Python.
#pragma once

#include <torch/script.h>

#include <string>

#include "diffeqlayers/solve.h"

namespace diffeqlayers {

// How a scripted forward takes its arguments, read from its schema.
struct ScriptSignature {
  // forward(t, u) rather than forward(u).
  bool takes_time = false;
  // t is declared Tensor (the type of an unannotated TorchScript argument): it is passed as a
  // 0-dim tensor of u's dtype and device (torchdiffeq's convention); declared float, as a double.
  bool time_as_tensor = false;
  // The schema, for messages.
  std::string schema;
};

// Reads and checks the module's forward: besides self it must take (u) or (t, u) (any further
// arguments need default values), u a Tensor, t a float or a Tensor, and return a Tensor. Throws
// a TypeError (c10::TypeError) naming what is wrong otherwise, or when there is no forward.
ScriptSignature script_signature(const torch::jit::Module& module);

// f(t, u) = module.forward(u) or module.forward(t, u), after checking the signature once.
//
// The module is shared, not copied: its parameters are read at every call, so tensors swapped
// into it between calls (forward mode's dual parameters, an optimizer's in-place updates) are the
// ones used, and gradients reach the module's own parameters. Each call runs the graph executor's
// unoptimised plan, i.e. the scripted ops one by one as eager mode would (see the .cpp for why).
// A forward that raises, or returns something other than a Tensor, throws with the time `t` added
// to the message. Safe to call from several threads at once, as TorchScript methods are.
Dynamics script_dynamics(torch::jit::Module module);

}  // namespace diffeqlayers
