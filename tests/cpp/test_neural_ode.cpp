// GoogleTest: diffeqlayers::NeuralODE as a torch::nn::Module.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <string>

#include "diffeqlayers/mlp.h"
#include "diffeqlayers/neural_ode.h"

namespace dl = diffeqlayers;

namespace {
// dx/dt = -a x with a learnable a: x(T) = x0 exp(-a T), d x(T)/da = -T x(T).
struct DecayImpl : torch::nn::Module {
  DecayImpl() { a = register_parameter("a", torch::tensor({0.5}, torch::kFloat64)); }
  torch::Tensor forward(const torch::Tensor& x) { return -a * x; }
  torch::Tensor a;
};
TORCH_MODULE(Decay);

// Linear(2, 8) -> tanh -> Linear(8, 2), Cloneable (forward mode clones the wrapped module).
struct SmallNetImpl : torch::nn::Cloneable<SmallNetImpl> {
  SmallNetImpl() { reset(); }
  void reset() override {
    l1 = register_module("l1", torch::nn::Linear(2, 8));
    l2 = register_module("l2", torch::nn::Linear(8, 2));
  }
  torch::Tensor forward(const torch::Tensor& x) { return l2(torch::tanh(l1(x))); }
  torch::nn::Linear l1{nullptr}, l2{nullptr};
};
TORCH_MODULE(SmallNet);
}  // namespace

TEST(NeuralODE, FinalStateGradientAndParameters) {
  Decay decay;
  dl::NeuralODE layer(decay, dl::NeuralODEOptions(0.0, 2.0).rtol(1e-11).atol(1e-12));
  ASSERT_EQ(layer->parameters().size(), 1u);
  EXPECT_EQ(layer->named_parameters().begin()->key(), "func.a");
  auto x = torch::tensor({1.5, -2.0}, torch::kFloat64);
  auto y = layer->forward(x);
  ASSERT_EQ(y.sizes(), x.sizes());
  EXPECT_NEAR(y[0].item<double>(), 1.5 * std::exp(-1.0), 1e-9);
  y.sum().backward();
  EXPECT_NEAR(decay->a.grad().item<double>(), -2.0 * (1.5 - 2.0) * std::exp(-1.0), 1e-8);
  EXPECT_GT(layer->last_stats().nfe, 0);
}

TEST(NeuralODE, TrajectoryAndBadOptions) {
  auto t = torch::tensor({0.0, 0.5, 1.0}, torch::kFloat64);
  dl::NeuralODE layer(Decay(), dl::NeuralODEOptions(0.0, 1.0).saveat(t).method("rk4").dt(0.01));
  auto y = layer->forward(torch::ones({4, 2}, torch::kFloat64));
  ASSERT_EQ(y.sizes(), (std::vector<int64_t>{3, 4, 2}));
  EXPECT_NEAR(y[2][0][0].item<double>(), std::exp(-0.5), 1e-9);
  EXPECT_THROW(dl::NeuralODE(Decay(), dl::NeuralODEOptions(0.0, 1.0).sensealg("nope")),
               c10::ValueError);
  EXPECT_THROW(dl::NeuralODE(Decay(), dl::NeuralODEOptions(1.0, 1.0)), c10::ValueError);
}

TEST(NeuralODE, AdjointSensealgsGiveTheAnalyticGradient) {
  for (const char* sensealg : {"adjoint", "interpolating", "backsolve", "discrete"}) {
    Decay decay;
    dl::NeuralODE layer(decay,
                        dl::NeuralODEOptions(0.0, 2.0).rtol(1e-11).atol(1e-12).sensealg(sensealg));
    auto x = torch::tensor({1.5, -2.0}, torch::kFloat64);
    layer->forward(x).sum().backward();
    EXPECT_NEAR(decay->a.grad().item<double>(), -2.0 * (1.5 - 2.0) * std::exp(-1.0), 1e-8)
        << sensealg;
    ASSERT_NE(layer->last_adjoint_stats(), nullptr) << sensealg;
    EXPECT_TRUE(layer->last_adjoint_stats()->done) << sensealg;
  }
}

// Forward mode (sensealg "fd") against reverse mode on the same network: the same discrete
// solution, so the gradients agree to rounding. A Cloneable module (cloned per pass) and
// the built-in MLP (dual weights passed directly).
TEST(NeuralODE, ForwardModeMatchesReverseMode) {
  torch::manual_seed(3);
  SmallNet net;
  net->to(torch::kFloat64);
  dl::MLP mlp(dl::MLPOptions({2, 8, 2}).activation("tanh"));
  mlp->to(torch::kFloat64);
  auto saveat = torch::tensor({0.0, 0.4, 1.0}, torch::kFloat64);
  auto x0 = torch::tensor({0.5, -0.3}, torch::kFloat64);
  for (bool use_mlp : {false, true}) {
    std::vector<std::vector<torch::Tensor>> grads;
    std::vector<torch::Tensor> outs;
    std::vector<int64_t> steps;
    for (const char* sensealg : {"rd", "fd"}) {
      auto opts =
          dl::NeuralODEOptions(0.0, 1.0).rtol(1e-9).atol(1e-10).saveat(saveat).sensealg(sensealg);
      dl::NeuralODE layer = use_mlp ? dl::NeuralODE(mlp, opts) : dl::NeuralODE(net, opts);
      layer->zero_grad();
      auto x = x0.clone().requires_grad_();
      auto y = layer->forward(x);
      (y * y).sum().backward();
      std::vector<torch::Tensor> g{x.grad().clone()};
      for (const auto& p : layer->parameters()) g.push_back(p.grad().clone());
      grads.push_back(g);
      outs.push_back(y.detach());
      EXPECT_GT(layer->last_stats().nfe, 0);
      steps.push_back(layer->last_stats().naccept);
    }
    // The same steps. The module gives bitwise equal outputs; the MLP does not, since rd
    // evaluates it by host loops and fd (on dual weights) by ATen ops, which round differently
    // (measured: 3.4e-14 on values up to 0.5).
    EXPECT_EQ(steps[0], steps[1]) << use_mlp;
    if (use_mlp)
      EXPECT_TRUE(torch::allclose(outs[0], outs[1], 1e-12, 1e-13))
          << (outs[0] - outs[1]).abs().max().item<double>();
    else
      EXPECT_TRUE(torch::equal(outs[0], outs[1]));
    ASSERT_EQ(grads[0].size(), grads[1].size());
    for (size_t i = 0; i < grads[0].size(); ++i)
      EXPECT_TRUE(torch::allclose(grads[1][i], grads[0][i], 1e-10, 1e-12))
          << "use_mlp " << use_mlp << " tensor " << i;
  }
}

// A module that is not Cloneable cannot take forward mode: a clear error, not a wrong gradient.
TEST(NeuralODE, ForwardModeNeedsACloneableModule) {
  dl::NeuralODE layer(Decay(), dl::NeuralODEOptions(0.0, 1.0).sensealg("fd"));
  auto x = torch::tensor({1.0}, torch::kFloat64);
  EXPECT_THROW(layer->forward(x), c10::NotImplementedError);
}

// The adjoints take the MLP's own vector-Jacobian product (AdjointOptions::vjp: the continuous
// ones per step of the backward solve, the discrete one to reverse each step) and give the
// gradient that autograd gives; NeuralODE over the MLP passes it on.
TEST(NeuralODE, MLPVectorJacobianProductInTheAdjoint) {
  torch::manual_seed(4);
  dl::MLP mlp(dl::MLPOptions({2, 6, 2}).activation("tanh").input_power(3.0));
  mlp->to(torch::kFloat64);
  auto x0 = torch::tensor({0.8, -0.4}, torch::kFloat64);
  auto span = torch::tensor({0.0, 1.0}, torch::kFloat64);
  dl::SolveOptions so;
  so.rtol = 1e-9;
  so.atol = 1e-11;
  so.saveat = torch::tensor({0.5, 1.0}, torch::kFloat64);
  for (const std::string sensealg : {"interpolating", "backsolve", "discrete"}) {
    std::vector<std::vector<torch::Tensor>> grads;
    std::vector<std::shared_ptr<dl::AdjointStats>> stats;
    for (bool native : {false, true}) {
      dl::AdjointOptions ao;
      ao.sensealg = sensealg;
      if (native) ao.vjp = mlp->vjp();
      auto x = x0.clone().requires_grad_();
      dl::Solution sol = dl::solve_adjoint(mlp->dynamics(), x, span, mlp->parameters(), so, ao);
      std::vector<torch::Tensor> inputs{x};
      for (const auto& p : mlp->parameters()) inputs.push_back(p);
      grads.push_back(torch::autograd::grad({(sol.u * sol.u).sum()}, inputs));
      stats.push_back(sol.adjoint_stats);
    }
    EXPECT_EQ(stats[0]->nvjp_native, 0) << sensealg;
    EXPECT_GT(stats[1]->nvjp, 0) << sensealg;
    EXPECT_EQ(stats[1]->nvjp_native, stats[1]->nvjp) << sensealg;
    // The discrete adjoint replays whole steps under autograd without the hook.
    if (sensealg != "discrete") {
      EXPECT_EQ(stats[0]->nvjp, stats[1]->nvjp) << sensealg;
    }
    for (size_t i = 0; i < grads[0].size(); ++i)
      EXPECT_TRUE(torch::allclose(grads[1][i], grads[0][i], 1e-12, 1e-13))
          << sensealg << " tensor " << i;
  }
  dl::NeuralODE layer(mlp, dl::NeuralODEOptions(0.0, 1.0).sensealg("interpolating"));
  layer->forward(x0.clone()).sum().backward();
  ASSERT_NE(layer->last_adjoint_stats(), nullptr);
  EXPECT_GT(layer->last_adjoint_stats()->nvjp_native, 0);
}
