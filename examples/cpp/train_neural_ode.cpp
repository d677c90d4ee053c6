// C++ example: train a neural ODE in pure C++ with torch::optim.
//
// Data: the damped spiral u' = A u^3 with A = [[-0.1, 2], [-2, -0.1]] from u0 = [2, 0] on
// [0, 1.5], 30 save points (the classic neural ODE demo). Model: diffeqlayers::NeuralODE whose
// right-hand side is Linear(2, 50) -> tanh -> Linear(50, 2) applied to u^3, trained with Adam
// by reverse mode through the tsit5 solve. Exits non-zero when the loss does not fall, so that
// ctest checks it.
#include <torch/torch.h>

#include <cstdio>

#include "diffeqlayers/diffeqlayers.h"
#include "diffeqlayers/neural_ode.h"

namespace dl = diffeqlayers;

struct CubedMLPImpl : torch::nn::Module {
  CubedMLPImpl()
      : net(register_module("net",
                            torch::nn::Sequential(torch::nn::Linear(2, 50), torch::nn::Tanh(),
                                                  torch::nn::Linear(50, 2)))) {}
  torch::Tensor forward(const torch::Tensor& u) { return net->forward(u.pow(3)); }
  torch::nn::Sequential net;
};
TORCH_MODULE(CubedMLP);

int main() {
  torch::manual_seed(0);
  const torch::Tensor t = torch::linspace(0.0, 1.5, 30, torch::kFloat64);
  const torch::Tensor u0 = torch::tensor({2.0f, 0.0f});
  const torch::Tensor A = torch::tensor({{-0.1f, 2.0f}, {-2.0f, -0.1f}});

  dl::SolveOptions data_opts;
  data_opts.method = "dopri5";
  data_opts.rtol = 1e-9;
  data_opts.atol = 1e-9;
  data_opts.saveat = t;
  torch::Tensor data;
  {
    torch::NoGradGuard no_grad;
    auto truth = [&A](double, const torch::Tensor& u) { return torch::matmul(u.pow(3), A); };
    data = dl::solve(truth, u0, 0.0, 1.5, data_opts).u;
  }

  dl::NeuralODE model(CubedMLP(), dl::NeuralODEOptions(0.0, 1.5).saveat(t).rtol(1e-5).atol(1e-6));
  torch::optim::Adam adam(model->parameters(), torch::optim::AdamOptions(0.01));
  double first = 0.0, last = 0.0;
  for (int it = 1; it <= 150; ++it) {
    adam.zero_grad();
    torch::Tensor loss = (model->forward(u0) - data).pow(2).sum();
    loss.backward();
    adam.step();
    last = loss.item<double>();
    if (it == 1) first = last;
    if (it == 1 || it % 25 == 0)
      std::printf("iter %3d  loss %.5f  nfe %lld\n", it, last,
                  static_cast<long long>(model->last_stats().nfe));
  }
  const bool improved = last < 0.2 * first;
  std::printf("loss %.4f -> %.4f: %s\n", first, last, improved ? "trained" : "NO PROGRESS");
  return improved ? 0 : 1;
}
