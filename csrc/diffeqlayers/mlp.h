// diffeqlayers::MLP: a built-in multilayer perceptron for dynamics, evaluated entirely in C++.
//
// A solve whose f is this MLP never leaves C++ per step (the Python bindings release the GIL for
// the whole solve). The evaluation is a free function of an architecture (MLPSpec) and a list of
// weight tensors, so that the Python module can hand its own nn.Parameters to C++ (the same
// at::Tensor objects: autograd, forward-mode duals and the adjoints reach them) and the C++
// module (MLPImpl) can use its registered parameters.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "diffeqlayers/adjoint.h"
#include "diffeqlayers/solve.h"

namespace diffeqlayers {

enum class Activation { Tanh, ReLU, Softplus, Sigmoid, GELU, ELU, SiLU, Identity };

// "tanh", "relu", "softplus", "sigmoid", "gelu", "elu", "silu", "identity"; throws ValueError
// naming the accepted names otherwise.
Activation activation_from_string(const std::string& name);
std::string to_string(Activation a);
std::vector<std::string> mlp_activations();

// The architecture of an MLP, without its weights.
//   x = u^input_power (elementwise; skipped when 1), then [x, t] when time_input,
//   then Linear(sizes[0] (+1), sizes[1]) -> act[0] -> Linear(sizes[1], sizes[2]) -> act[1] ...
//   -> Linear(sizes[n-2], sizes[n-1]) (no activation after the last layer).
// The weights are {W0, b0, W1, b1, ...} (or {W0, W1, ...} without bias), W_i of shape
// [sizes[i+1], sizes[i] (+1 for i = 0 with time_input)], as torch.nn.Linear stores them.
struct MLPSpec {
  std::vector<int64_t> sizes;
  std::vector<Activation> activations;  // one per hidden layer: sizes.size() - 2 entries
  double input_power = 1.0;
  bool time_input = false;
  bool bias = true;

  int64_t num_layers() const { return static_cast<int64_t>(sizes.size()) - 1; }
  int64_t in_features(int64_t layer) const;  // of Linear number `layer` (time input included)
  // Throws ValueError naming the problem (too few sizes, non-positive sizes, wrong number of
  // activations, non-finite power).
  void check() const;
  // Throws naming the tensor when `params` do not fit the spec (count, shapes, dtype/device).
  void check_params(at::TensorList params) const;
  std::string repr() const;
};

// Builds a spec with the same activation on every hidden layer, or one per hidden layer
// (`activations` non-empty: then `activation` is ignored). Checked.
MLPSpec make_mlp_spec(std::vector<int64_t> sizes, const std::string& activation,
                      const std::vector<std::string>& activations = {}, double input_power = 1.0,
                      bool time_input = false, bool bias = true);

// The MLP at (t, u) with these weights. u is [..., sizes[0]] (any leading batch dimensions, or
// none). Every op is differentiable; no op is in place when a gradient may be recorded (requires
// grad or a forward-mode tangent), otherwise the activations run in place on the fresh output of
// the preceding linear layer. Does not check `params` (see MLPSpec::check_params): call it once
// per solve, not per step.
torch::Tensor mlp_forward(const MLPSpec& spec, at::TensorList params, double t,
                          const torch::Tensor& u);

// Dynamics f(t, u) = mlp_forward(spec, params, t, u), after checking the spec and the weights
// once. The closure holds the given tensors (shallow copies: the same storage and autograd
// identity, so gradients reach the originals).
Dynamics mlp_dynamics(const MLPSpec& spec, std::vector<torch::Tensor> params);

// The MLP's vector-Jacobian product by its host loops (one forward keeping the activations, one
// backward; no autograd graph), for AdjointOptions::vjp: it applies where mlp_forward takes the
// host loops (CPU float/double, small evaluations) and knows the weights by identity (these very
// tensors); elsewhere it returns false and autograd makes the product.
DynamicsVjp mlp_vjp(const MLPSpec& spec, std::vector<torch::Tensor> params);

// The MLP on host arrays (HostDynamics, for SolveOptions::host): the same host loops as
// mlp_forward and mlp_vjp, bitwise; it applies where mlp_forward takes those loops (CPU
// float/double, small evaluations) and the MLP maps the state to its own shape.
std::shared_ptr<const HostDynamics> mlp_host(const MLPSpec& spec,
                                             std::vector<torch::Tensor> params);

// The three above over the same weights, checked once and sharing one copy of the spec and the
// weight list (what a solve of the MLP takes, at a third of the three calls' cost).
struct MLPFunctions {
  Dynamics f;
  DynamicsVjp vjp;
  std::shared_ptr<const HostDynamics> host;
};
MLPFunctions mlp_functions(const MLPSpec& spec, std::vector<torch::Tensor> params);

struct MLPOptions {
  /* implicit */ MLPOptions(std::vector<int64_t> sizes) : sizes_(std::move(sizes)) {}
  TORCH_ARG(std::vector<int64_t>, sizes);
  // The activation of every hidden layer, unless `activations` gives one per hidden layer.
  TORCH_ARG(std::string, activation) = "tanh";
  TORCH_ARG(std::vector<std::string>, activations) = {};
  // Elementwise power applied to u before the first layer (3 for DiffEqFlux's spiral).
  TORCH_ARG(double, input_power) = 1.0;
  // Append t as one more input feature of the first layer.
  TORCH_ARG(bool, time_input) = false;
  TORCH_ARG(bool, bias) = true;
};

// The MLP as a torch::nn::Module: submodule "layers" holds torch::nn::Linear modules, so the
// parameters are named "layers.0.weight", "layers.0.bias", ... as in the Python diffeqlayers.MLP
// (state dicts carry over) and initialised as torch.nn.Linear initialises them.
// NeuralODE recognises it and calls mlp_dynamics directly (time input included).
class MLPImpl : public torch::nn::Module {
 public:
  explicit MLPImpl(MLPOptions options);

  // The MLP at u (without time input). A time-input MLP needs forward_at.
  torch::Tensor forward(const torch::Tensor& u);
  // The MLP at (t, u).
  torch::Tensor forward_at(double t, const torch::Tensor& u);

  void pretty_print(std::ostream& stream) const override;

  const MLPSpec& spec() const { return spec_; }
  // {W0, b0, W1, b1, ...} as mlp_forward takes them (the registered parameters themselves).
  std::vector<torch::Tensor> weights() const;
  // f(t, u) for solve(): the MLP with the current parameters, checked once.
  Dynamics dynamics() const;
  // mlp_vjp over these weights, for AdjointOptions::vjp.
  DynamicsVjp vjp() const;
  // mlp_host over these weights, for SolveOptions::host.
  std::shared_ptr<const HostDynamics> host() const;

  MLPOptions options;

 private:
  MLPSpec spec_;
  torch::nn::ModuleList layers_;
};
TORCH_MODULE(MLP);

}  // namespace diffeqlayers
