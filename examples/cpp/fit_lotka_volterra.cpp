// C++ example: fit the Lotka-Volterra parameters by backpropagating through the solver.
//
// Data come from p* = (1.5, 1, 3, 1); training starts at p0 = (2.2, 1, 2, 0.4) (the seed's
// parameter-fitting example) and minimises the squared error of the trajectory saved every 0.1
// on [0, 5] with torch::optim::Adam. Gradients are reverse mode through the unrolled tsit5
// solve (the C++ side of diffeq_rd): the solve runs under grad mode and autograd records it.
// Exits non-zero when the fit does not improve, so that ctest checks it.
#include <torch/torch.h>

#include <cstdio>

#include "diffeqlayers/diffeqlayers.h"

namespace dl = diffeqlayers;

int main() {
  torch::manual_seed(0);
  auto opts = torch::dtype(torch::kFloat64);

  auto lotka_volterra = [](const torch::Tensor& p) {
    return [p](double /*t*/, const torch::Tensor& u) {
      auto x = u[0], y = u[1];
      return torch::stack({p[0] * x - p[1] * x * y, -p[2] * y + p[3] * x * y});
    };
  };

  dl::SolveOptions so;
  so.method = "tsit5";
  so.rtol = 1e-6;
  so.atol = 1e-8;
  so.saveat = torch::linspace(0.0, 5.0, 51, opts);
  const torch::Tensor u0 = torch::tensor({1.0, 1.0}, opts);

  torch::Tensor data;
  {
    torch::NoGradGuard no_grad;
    data = dl::solve(lotka_volterra(torch::tensor({1.5, 1.0, 3.0, 1.0}, opts)), u0, 0.0, 5.0, so).u;
  }

  torch::Tensor p = torch::tensor({2.2, 1.0, 2.0, 0.4}, opts).requires_grad_(true);
  torch::optim::Adam adam({p}, torch::optim::AdamOptions(0.1));
  double first = 0.0, last = 0.0;
  for (int it = 1; it <= 150; ++it) {
    adam.zero_grad();
    dl::Solution sol = dl::solve(lotka_volterra(p), u0, 0.0, 5.0, so);
    torch::Tensor loss = (sol.u - data).pow(2).mean();
    loss.backward();
    adam.step();
    last = loss.item<double>();
    if (it == 1) first = last;
    if (it == 1 || it % 25 == 0)
      std::printf("iter %3d  loss %.6e  p = [%.4f, %.4f, %.4f, %.4f]  nfe %lld\n", it, last,
                  p[0].item<double>(), p[1].item<double>(), p[2].item<double>(),
                  p[3].item<double>(), static_cast<long long>(sol.stats.nfe));
  }
  const bool improved = last < 1e-2 * first;
  std::printf("loss %.3e -> %.3e: %s\n", first, last, improved ? "fit improved" : "NO PROGRESS");
  return improved ? 0 : 1;
}
