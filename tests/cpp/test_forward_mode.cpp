// GoogleTest: forward-mode Jacobians (diffeq_fd, forward_jacobian, jvp) against reverse mode and
// the analytic derivative on u' = -a u.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <vector>

#include "diffeqlayers/forward_mode.h"
#include "diffeqlayers/solve.h"

namespace dl = diffeqlayers;

namespace {

torch::Tensor f64(std::vector<double> v) { return torch::tensor(v, torch::dtype(torch::kFloat64)); }

dl::SolveOptions options() {
  dl::SolveOptions o;
  o.method = "tsit5";
  o.rtol = 1e-9;
  o.atol = 1e-11;
  o.saveat = f64({0.5, 1.0, 2.0});
  return o;
}

// u' = -a u (a a vector, elementwise), saved at three times; the output is every saved state.
torch::Tensor solve_decay(const torch::Tensor& u0, const std::vector<torch::Tensor>& params) {
  const torch::Tensor a = params[0];
  dl::Dynamics f = [a](double, const torch::Tensor& u) { return -a * u; };
  return dl::solve(f, u0, 0.0, 2.0, options()).u;
}

}  // namespace

TEST(ForwardMode, GradientMatchesReverseMode) {
  const torch::Tensor a0 = f64({0.7, 1.3});
  const torch::Tensor u00 = f64({2.0, -1.0});
  const torch::Tensor weights = torch::linspace(-1.0, 1.0, 6, torch::kFloat64).reshape({3, 2});

  torch::Tensor a_fd = a0.clone().requires_grad_(), u_fd = u00.clone().requires_grad_();
  torch::Tensor y_fd = dl::diffeq_fd(solve_decay, u_fd, {a_fd});
  (y_fd * weights).sum().backward();

  torch::Tensor a_rd = a0.clone().requires_grad_(), u_rd = u00.clone().requires_grad_();
  torch::Tensor y_rd = solve_decay(u_rd, {a_rd});
  (y_rd * weights).sum().backward();

  EXPECT_TRUE(torch::equal(y_fd.detach(), y_rd.detach()));
  EXPECT_LT((a_fd.grad() - a_rd.grad()).abs().max().item<double>(),
            1e-12 * a_rd.grad().abs().max().item<double>());
  EXPECT_LT((u_fd.grad() - u_rd.grad()).abs().max().item<double>(),
            1e-12 * u_rd.grad().abs().max().item<double>());
}

TEST(ForwardMode, JacobianIsAnalyticAndChunkingIsInvisible) {
  const torch::Tensor a = f64({0.7, 1.3}).requires_grad_();
  const torch::Tensor u0 = f64({2.0, -1.0});  // no grad: only a's two columns
  dl::ForwardModeOptions one;
  one.chunk_size = 1;
  int64_t calls = 0;
  one.on_chunk = [&calls](int64_t, int64_t) { ++calls; };
  auto [y, jac] = dl::forward_jacobian(solve_decay, u0, {a}, one);
  auto [y2, jac2] = dl::forward_jacobian(solve_decay, u0, {a});  // batched: one pass
  dl::ForwardModeOptions unbatched;
  unbatched.vectorize = false;
  auto [y3, jac3] = dl::forward_jacobian(solve_decay, u0, {a}, unbatched);
  EXPECT_EQ(calls, 2);
  ASSERT_EQ(jac.sizes(), (std::vector<int64_t>{6, 2}));
  EXPECT_TRUE(torch::equal(y, y2));
  EXPECT_LT((jac - jac2).abs().max().item<double>(), 1e-14);
  EXPECT_TRUE(torch::equal(jac, jac3));
  // d u_j(t) / d a_k = -t u0_j exp(-a_j t) when j == k, else 0.
  const std::vector<double> ts{0.5, 1.0, 2.0}, av{0.7, 1.3}, uv{2.0, -1.0};
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 2; ++j)
      for (int k = 0; k < 2; ++k) {
        const double expected = j == k ? -ts[i] * uv[j] * std::exp(-av[j] * ts[i]) : 0.0;
        EXPECT_NEAR(jac[i * 2 + j][k].item<double>(), expected, 1e-8);
      }
}

TEST(ForwardMode, JvpIsJacobianTimesTangent) {
  const torch::Tensor a = f64({0.7, 1.3}).requires_grad_();
  const torch::Tensor u0 = f64({2.0, -1.0}).requires_grad_();
  auto [y, jac] = dl::forward_jacobian(solve_decay, u0, {a});
  const torch::Tensor tu = f64({0.5, 0.25}), ta = f64({-1.0, 2.0});
  auto [y2, dy] = dl::jvp(solve_decay, u0, {a}, tu, {ta});
  EXPECT_TRUE(torch::equal(y, y2));
  const torch::Tensor expected = at::matmul(jac, at::cat({tu, ta})).reshape(dy.sizes());
  EXPECT_LT((dy - expected).abs().max().item<double>(), 1e-13);
  EXPECT_THROW(dl::jvp(solve_decay, u0, {a}, f64({1.0}), {ta}), c10::ValueError);
}
