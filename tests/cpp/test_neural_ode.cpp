// GoogleTest: diffeqlayers::NeuralODE as a torch::nn::Module.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

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
