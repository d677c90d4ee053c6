// diffeqlayers::MLP: the built-in multilayer perceptron for dynamics (see diffeqlayers/mlp.h).
#include "diffeqlayers/mlp.h"

#include <cmath>
#include <sstream>
#include <utility>

namespace diffeqlayers {

namespace {

struct ActivationName {
  Activation a;
  const char* name;
};
constexpr ActivationName kActivations[] = {
    {Activation::Tanh, "tanh"},         {Activation::ReLU, "relu"},
    {Activation::Softplus, "softplus"}, {Activation::Sigmoid, "sigmoid"},
    {Activation::GELU, "gelu"},         {Activation::ELU, "elu"},
    {Activation::SiLU, "silu"},         {Activation::Identity, "identity"},
};

// A gradient may be recorded through x: then no op on it may run in place.
bool records(const torch::Tensor& x) {
  return x.requires_grad() || x._fw_grad(/*level=*/0).defined();
}

// The activation, in place on x when nothing is recorded (x is always the fresh output of the
// preceding linear layer, owned by nobody else). The functions and their default arguments are
// those of torch.nn's modules (Softplus(beta=1, threshold=20), ELU(alpha=1), GELU exact).
torch::Tensor activate(Activation a, torch::Tensor x) {
  const bool inplace = !records(x);
  switch (a) {
    case Activation::Tanh:
      return inplace ? x.tanh_() : at::tanh(x);
    case Activation::ReLU:
      return inplace ? x.relu_() : at::relu(x);
    case Activation::Softplus:
      return at::softplus(x, 1.0, 20.0);
    case Activation::Sigmoid:
      return inplace ? x.sigmoid_() : at::sigmoid(x);
    case Activation::GELU:
      return inplace ? at::gelu_(x) : at::gelu(x);
    case Activation::ELU:
      return inplace ? at::elu_(x) : at::elu(x);
    case Activation::SiLU:
      return inplace ? at::silu_(x) : at::silu(x);
    case Activation::Identity:
      return x;
  }
  TORCH_INTERNAL_ASSERT(false, "unknown activation");
  return x;
}

// x W^T + b as one fused op: addmv for a single state, addmm for a batch (leading dimensions
// flattened).
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor* b) {
  if (x.dim() == 1) return b ? at::addmv(*b, w, x) : at::mv(w, x);
  if (x.dim() == 2) return b ? at::addmm(*b, x, w.t()) : at::mm(x, w.t());
  std::vector<int64_t> shape = x.sizes().vec();
  torch::Tensor flat = x.reshape({-1, shape.back()});
  torch::Tensor y = b ? at::addmm(*b, flat, w.t()) : at::mm(flat, w.t());
  shape.back() = w.size(0);
  return y.view(shape);
}

}  // namespace

Activation activation_from_string(const std::string& name) {
  for (const auto& e : kActivations)
    if (name == e.name) return e.a;
  std::string known;
  for (const auto& e : kActivations) known += std::string(known.empty() ? "" : ", ") + e.name;
  TORCH_CHECK_VALUE(false, "MLP: unknown activation \"", name, "\"; available: ", known);
  return Activation::Identity;
}

std::string to_string(Activation a) {
  for (const auto& e : kActivations)
    if (e.a == a) return e.name;
  return "?";
}

std::vector<std::string> mlp_activations() {
  std::vector<std::string> out;
  for (const auto& e : kActivations) out.emplace_back(e.name);
  return out;
}

int64_t MLPSpec::in_features(int64_t layer) const {
  return sizes[static_cast<size_t>(layer)] + (layer == 0 && time_input ? 1 : 0);
}

void MLPSpec::check() const {
  TORCH_CHECK_VALUE(sizes.size() >= 2,
                    "MLP: sizes must hold at least the input and output sizes, got ", sizes.size(),
                    " entries");
  for (size_t i = 0; i < sizes.size(); ++i)
    TORCH_CHECK_VALUE(sizes[i] > 0, "MLP: sizes[", i, "] must be positive, got ", sizes[i]);
  TORCH_CHECK_VALUE(activations.size() + 2 == sizes.size(), "MLP: ", sizes.size() - 2,
                    " hidden layer(s) need as many activations, got ", activations.size());
  TORCH_CHECK_VALUE(std::isfinite(input_power) && input_power != 0.0,
                    "MLP: input_power must be a finite non-zero number, got ", input_power);
}

void MLPSpec::check_params(at::TensorList params) const {
  const int64_t per = bias ? 2 : 1;
  TORCH_CHECK_VALUE(static_cast<int64_t>(params.size()) == per * num_layers(), "MLP ", repr(),
                    " takes ", per * num_layers(), " weight tensors (",
                    bias ? "weight and bias of each layer" : "one weight per layer", "), got ",
                    params.size());
  for (int64_t i = 0; i < num_layers(); ++i) {
    const torch::Tensor& w = params[static_cast<size_t>(per * i)];
    const int64_t out = sizes[static_cast<size_t>(i + 1)];
    TORCH_CHECK_TYPE(w.defined(), "MLP: the weight of layer ", i, " is undefined");
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == out && w.size(1) == in_features(i),
                      "MLP: the weight of layer ", i, " must have shape [", out, ", ",
                      in_features(i), "], got ", w.sizes());
    TORCH_CHECK_TYPE(w.is_floating_point(), "MLP: the weight of layer ", i,
                     " must be floating point, got ", w.scalar_type());
    const torch::Tensor& w0 = params[0];
    TORCH_CHECK_TYPE(w.scalar_type() == w0.scalar_type() && w.device() == w0.device(),
                     "MLP: the weights must share one dtype and device; layer ", i, " has ",
                     w.scalar_type(), " on ", w.device(), ", layer 0 ", w0.scalar_type(), " on ",
                     w0.device());
    if (bias) {
      const torch::Tensor& b = params[static_cast<size_t>(per * i + 1)];
      TORCH_CHECK_TYPE(b.defined(), "MLP: the bias of layer ", i, " is undefined");
      TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == out, "MLP: the bias of layer ", i,
                        " must have shape [", out, "], got ", b.sizes());
      TORCH_CHECK_TYPE(b.scalar_type() == w0.scalar_type() && b.device() == w0.device(),
                       "MLP: the bias of layer ", i, " has ", b.scalar_type(), " on ", b.device(),
                       " but the weights are ", w0.scalar_type(), " on ", w0.device());
    }
  }
}

std::string MLPSpec::repr() const {
  std::ostringstream s;
  s << "(sizes=[";
  for (size_t i = 0; i < sizes.size(); ++i) s << (i ? ", " : "") << sizes[i];
  s << "], activations=[";
  for (size_t i = 0; i < activations.size(); ++i) s << (i ? ", " : "") << to_string(activations[i]);
  s << "]";
  if (input_power != 1.0) s << ", input_power=" << input_power;
  if (time_input) s << ", time_input=true";
  if (!bias) s << ", bias=false";
  s << ")";
  return s.str();
}

MLPSpec make_mlp_spec(std::vector<int64_t> sizes, const std::string& activation,
                      const std::vector<std::string>& activations, double input_power,
                      bool time_input, bool bias) {
  MLPSpec spec;
  spec.sizes = std::move(sizes);
  const size_t hidden = spec.sizes.size() >= 2 ? spec.sizes.size() - 2 : 0;
  if (activations.empty()) {
    spec.activations.assign(hidden, activation_from_string(activation));
  } else {
    for (const auto& a : activations) spec.activations.push_back(activation_from_string(a));
  }
  spec.input_power = input_power;
  spec.time_input = time_input;
  spec.bias = bias;
  spec.check();
  return spec;
}

torch::Tensor mlp_forward(const MLPSpec& spec, at::TensorList params, double t,
                          const torch::Tensor& u) {
  TORCH_CHECK_VALUE(u.dim() >= 1 && u.size(-1) == spec.sizes[0], "MLP ", spec.repr(),
                    " takes states whose last dimension is ", spec.sizes[0], ", got shape ",
                    u.sizes());
  TORCH_CHECK_TYPE(u.scalar_type() == params[0].scalar_type(), "MLP: the state has dtype ",
                   u.scalar_type(), " but the weights have ", params[0].scalar_type());
  // Integer powers go to ATen's pow kernel as torch's u ** p does (exact same rounding).
  torch::Tensor x = spec.input_power == 1.0 ? u : at::pow(u, spec.input_power);
  if (spec.time_input) {
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = 1;
    x = at::cat({x, at::full(shape, t, x.options())}, -1);
  }
  const int64_t n = spec.num_layers();
  const size_t per = spec.bias ? 2 : 1;
  for (int64_t i = 0; i < n; ++i) {
    const size_t j = per * static_cast<size_t>(i);
    x = linear(x, params[j], spec.bias ? &params[j + 1] : nullptr);
    if (i + 1 < n) x = activate(spec.activations[static_cast<size_t>(i)], std::move(x));
  }
  return x;
}

Dynamics mlp_dynamics(const MLPSpec& spec, std::vector<torch::Tensor> params) {
  spec.check();
  spec.check_params(params);
  return [spec, params = std::move(params)](double t, const torch::Tensor& u) {
    return mlp_forward(spec, params, t, u);
  };
}

MLPImpl::MLPImpl(MLPOptions options_)
    : options(std::move(options_)),
      spec_(make_mlp_spec(options.sizes(), options.activation(), options.activations(),
                          options.input_power(), options.time_input(), options.bias())) {
  for (int64_t i = 0; i < spec_.num_layers(); ++i)
    layers_->push_back(torch::nn::Linear(
        torch::nn::LinearOptions(spec_.in_features(i), spec_.sizes[static_cast<size_t>(i + 1)])
            .bias(spec_.bias)));
  layers_ = register_module("layers", layers_);
}

std::vector<torch::Tensor> MLPImpl::weights() const {
  std::vector<torch::Tensor> out;
  for (const auto& m : *layers_) {
    const auto* lin = m->as<torch::nn::LinearImpl>();
    out.push_back(lin->weight);
    if (spec_.bias) out.push_back(lin->bias);
  }
  return out;
}

torch::Tensor MLPImpl::forward(const torch::Tensor& u) {
  TORCH_CHECK_VALUE(!spec_.time_input,
                    "MLP: this MLP takes time as an input; call forward_at(t, u)");
  return forward_at(0.0, u);
}

torch::Tensor MLPImpl::forward_at(double t, const torch::Tensor& u) {
  const std::vector<torch::Tensor> w = weights();
  spec_.check_params(w);
  return mlp_forward(spec_, w, t, u);
}

Dynamics MLPImpl::dynamics() const { return mlp_dynamics(spec_, weights()); }

void MLPImpl::pretty_print(std::ostream& stream) const {
  stream << "diffeqlayers::MLP" << spec_.repr();
}

}  // namespace diffeqlayers
