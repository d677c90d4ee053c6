// GoogleTest: the built-in MLP (diffeqlayers/mlp.h) alone and as NeuralODE dynamics.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <string>
#include <vector>

#include "diffeqlayers/mlp.h"
#include "diffeqlayers/neural_ode.h"
#include "integrate/host_rk.h"

namespace dl = diffeqlayers;

namespace {

// The same network written with torch::nn modules, for comparison: Linear -> tanh -> Linear,
// applied to u^3.
struct SpiralNetImpl : torch::nn::Module {
  SpiralNetImpl() {
    l1 = register_module("l1", torch::nn::Linear(2, 16));
    l2 = register_module("l2", torch::nn::Linear(16, 2));
  }
  torch::Tensor forward(const torch::Tensor& u) { return l2(torch::tanh(l1(u.pow(3)))); }
  torch::nn::Linear l1{nullptr}, l2{nullptr};
};
TORCH_MODULE(SpiralNet);

// An MLP and a SpiralNet with the same float64 weights.
std::pair<dl::MLP, SpiralNet> twins() {
  torch::manual_seed(3);
  dl::MLP mlp(dl::MLPOptions({2, 16, 2}).activation("tanh").input_power(3));
  mlp->to(torch::kFloat64);
  SpiralNet net;
  net->to(torch::kFloat64);
  torch::NoGradGuard g;
  auto w = mlp->weights();
  net->l1->weight.copy_(w[0]);
  net->l1->bias.copy_(w[1]);
  net->l2->weight.copy_(w[2]);
  net->l2->bias.copy_(w[3]);
  return {mlp, net};
}

}  // namespace

TEST(MLP, ParametersAreNamedAsInPython) {
  dl::MLP mlp(dl::MLPOptions({3, 8, 8, 1}).activations({"relu", "softplus"}));
  std::vector<std::string> names;
  for (const auto& p : mlp->named_parameters()) names.push_back(p.key());
  EXPECT_EQ(names, (std::vector<std::string>{"layers.0.weight", "layers.0.bias", "layers.1.weight",
                                             "layers.1.bias", "layers.2.weight", "layers.2.bias"}));
  EXPECT_EQ(mlp->weights()[0].sizes(), (std::vector<int64_t>{8, 3}));
}

TEST(MLP, ForwardMatchesTorchModulesForEveryActivation) {
  torch::manual_seed(0);
  auto x = torch::randn({5, 3}, torch::kFloat64);
  for (const auto& name : dl::mlp_activations()) {
    dl::MLP mlp(dl::MLPOptions({3, 7, 2}).activation(name));
    mlp->to(torch::kFloat64);
    auto w = mlp->weights();
    auto h = torch::nn::functional::linear(x, w[0], w[1]);
    torch::Tensor a;
    if (name == "tanh") a = torch::tanh(h);
    if (name == "relu") a = torch::relu(h);
    if (name == "softplus") a = torch::softplus(h);
    if (name == "sigmoid") a = torch::sigmoid(h);
    if (name == "gelu") a = torch::gelu(h);
    if (name == "elu") a = torch::elu(h);
    if (name == "silu") a = torch::silu(h);
    if (name == "identity") a = h;
    ASSERT_TRUE(a.defined()) << name;
    auto expected = torch::nn::functional::linear(a, w[2], w[3]);
    EXPECT_TRUE(torch::allclose(mlp->forward(x), expected, 1e-13, 1e-13)) << name;
    // Unbatched input (addmv) and extra batch dimensions (flattened addmm), with and without
    // grad (in-place activations there).
    EXPECT_TRUE(torch::allclose(mlp->forward(x[1]), expected[1], 1e-13, 1e-13)) << name;
    torch::NoGradGuard g;
    EXPECT_TRUE(torch::allclose(mlp->forward(x.reshape({5, 1, 3})), expected.reshape({5, 1, 2}),
                                1e-13, 1e-13))
        << name;
  }
}

TEST(MLP, TimeInputAndPower) {
  dl::MLP mlp(dl::MLPOptions({2, 4, 2}).time_input(true).input_power(2).activation("silu"));
  mlp->to(torch::kFloat64);
  auto w = mlp->weights();
  EXPECT_EQ(w[0].sizes(), (std::vector<int64_t>{4, 3}));
  auto u = torch::tensor({0.3, -1.2}, torch::kFloat64);
  const double t = 0.7;
  auto in = torch::cat({u.pow(2), torch::tensor({t}, torch::kFloat64)});
  auto expected = torch::addmv(w[3], w[2], torch::silu(torch::addmv(w[1], w[0], in)));
  EXPECT_TRUE(torch::allclose(mlp->forward_at(t, u), expected, 1e-14, 1e-14));
  EXPECT_THROW(mlp->forward(u), c10::ValueError);  // needs t
}

TEST(MLP, BadArgumentsRaiseClearErrors) {
  try {
    dl::MLP(dl::MLPOptions({2, 4, 2}).activation("swish"));
    FAIL() << "expected an error";
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("unknown activation \"swish\""), std::string::npos);
  }
  EXPECT_THROW(dl::MLP(dl::MLPOptions({2})), c10::ValueError);
  EXPECT_THROW(dl::MLP(dl::MLPOptions({2, 0, 2})), c10::ValueError);
  EXPECT_THROW(dl::MLP(dl::MLPOptions({2, 4, 4, 2}).activations({"tanh"})), c10::ValueError);
  dl::MLP mlp(dl::MLPOptions({2, 4, 2}));
  try {
    mlp->forward(torch::ones({3}));
    FAIL() << "expected an error";
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("last dimension is 2"), std::string::npos);
  }
  // Weights that do not fit the architecture.
  auto w = mlp->weights();
  w[2] = torch::zeros({2, 5});
  EXPECT_THROW(dl::mlp_dynamics(mlp->spec(), w), c10::ValueError);
  w.pop_back();
  EXPECT_THROW(dl::mlp_dynamics(mlp->spec(), w), c10::ValueError);
}

TEST(MLP, NeuralODEGradientsMatchTheSameNetworkAsModules) {
  auto t = torch::linspace(0.0, 1.5, 30, torch::kFloat64);
  auto u0 = torch::tensor({2.0, 0.0}, torch::kFloat64);
  for (const char* sensealg : {"rd", "interpolating", "backsolve", "discrete"}) {
    auto [mlp, net] = twins();
    auto opts = dl::NeuralODEOptions(0.0, 1.5).saveat(t).rtol(1e-8).atol(1e-10).sensealg(sensealg);
    dl::NeuralODE a(mlp, opts), b(net, opts);
    auto ya = a->forward(u0), yb = b->forward(u0);
    // The MLP evaluates by host loops, whose sums round differently from ATen's matrix products:
    // rounding-level differences in f, grown by the solve (measured: at most 2.4e-12 on values
    // up to 2). Identical arithmetic would agree bitwise.
    const double diff = (ya - yb).abs().max().item<double>();
    EXPECT_TRUE(torch::allclose(ya, yb, 1e-11, 1e-12)) << sensealg << " max difference " << diff;
    EXPECT_EQ(a->last_stats().nfe, b->last_stats().nfe) << sensealg;
    ya.pow(2).sum().backward();
    yb.pow(2).sum().backward();
    auto w = mlp->weights();
    std::vector<torch::Tensor> v{net->l1->weight, net->l1->bias, net->l2->weight, net->l2->bias};
    for (size_t i = 0; i < w.size(); ++i) {
      ASSERT_TRUE(w[i].grad().defined()) << sensealg << " " << i;
      EXPECT_TRUE(torch::allclose(w[i].grad(), v[i].grad(), 1e-11, 1e-12)) << sensealg << " " << i;
    }
  }
}

TEST(MLP, TimeInputThroughNeuralODE) {
  // dx/dt = MLP(x, t) with a time-input MLP: the layer passes t (checked against the same MLP
  // called by hand inside solve()).
  dl::MLP mlp(dl::MLPOptions({2, 6, 2}).time_input(true));
  mlp->to(torch::kFloat64);
  dl::NeuralODE layer(mlp, dl::NeuralODEOptions(0.0, 1.0).rtol(1e-10).atol(1e-12));
  auto x = torch::tensor({0.5, -0.5}, torch::kFloat64);
  auto y = layer->forward(x);
  dl::SolveOptions so;
  so.rtol = 1e-10;
  so.atol = 1e-12;
  so.saveat = torch::tensor({1.0}, torch::kFloat64);
  auto ref = dl::solve([&](double t, const torch::Tensor& u) { return mlp->forward_at(t, u); }, x,
                       0.0, 1.0, so);
  EXPECT_TRUE(torch::allclose(y, ref.u[0], 1e-13, 1e-13));
}

TEST(MLP, HostLoopTakesTheTensorLoopsStepsAndReversesThemForTheDiscreteAdjoint) {
  // SolveOptions::host (the MLP on host arrays): a solve that records nothing runs on plain
  // arrays and must equal the tensor loop bitwise; the discrete adjoint then reverses the steps
  // there and must equal reverse mode through the tensor loop to rounding.
  auto [mlp, net] = twins();
  (void)net;
  auto u0 = torch::tensor({{2.0, 0.0}, {0.5, -1.0}}, torch::kFloat64);
  dl::SolveOptions so;
  so.method = "tsit5";
  so.rtol = 1e-8;
  so.atol = 1e-10;
  so.saveat = torch::tensor({0.0, 0.2, 0.7, 1.5}, torch::kFloat64);
  dl::Dynamics f = mlp->dynamics();
  dl::SolveOptions host = so;
  host.host = mlp->host();
  {
    torch::NoGradGuard g;
    dl::Solution a = dl::solve(f, u0, 0.0, 1.5, host);
    // The tensor loop (without the switch, a tensor f takes the host loop too, f called on a
    // tensor copy of each stage: host_integrate_tensor_f).
    dl::detail::set_host_loop_enabled(false);
    dl::Solution b = dl::solve(f, u0, 0.0, 1.5, so);
    dl::detail::set_host_loop_enabled(true);
    dl::Solution c = dl::solve(f, u0, 0.0, 1.5, so);
    EXPECT_TRUE(c.stats.host_loop);
    EXPECT_EQ(c.stats.nfe, b.stats.nfe);
    EXPECT_TRUE(torch::equal(c.u, b.u));
    EXPECT_TRUE(a.stats.host_loop);
    EXPECT_FALSE(b.stats.host_loop);
    EXPECT_EQ(a.stats.nfe, b.stats.nfe);
    EXPECT_EQ(a.stats.naccept, b.stats.naccept);
    EXPECT_TRUE(torch::equal(a.u, b.u));
    EXPECT_TRUE(torch::equal(a.t, b.t));
  }
  const std::vector<torch::Tensor> w = mlp->weights();
  auto span = torch::tensor({0.0, 1.5}, torch::kFloat64);
  auto grads = [&](bool adjoint) {
    torch::Tensor u = u0.clone().requires_grad_(true);
    dl::AdjointOptions ao;
    ao.sensealg = "discrete";
    ao.vjp = mlp->vjp();
    dl::Solution s =
        adjoint ? dl::solve_adjoint(f, u, span, w, host, ao) : dl::solve(f, u, span, so);
    if (adjoint) {
      EXPECT_TRUE(s.stats.host_loop);
    } else {
      EXPECT_FALSE(s.stats.host_loop);
    }
    std::vector<torch::Tensor> inputs{u};
    inputs.insert(inputs.end(), w.begin(), w.end());
    auto g = torch::autograd::grad({s.u.sin().sum()}, inputs);
    if (adjoint) {
      EXPECT_TRUE(s.adjoint_stats->host_loop);
    }
    return g;
  };
  auto gd = grads(true), gr = grads(false);
  for (size_t i = 0; i < gd.size(); ++i)
    EXPECT_TRUE(torch::allclose(gd[i], gr[i], 1e-11, 1e-13)) << "input " << i;
}
