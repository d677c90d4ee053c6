// The registered operators called from C++ and the buffer pool of the no-grad loops.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>

#include "core/lincomb.h"
#include "diffeqlayers/diffeqlayers.h"
#include "integrate/buffer_pool.h"
#include "kernels/ops.h"

namespace dl = diffeqlayers;

TEST(FusedOps, LincombMatchesAtenAndWritesIntoOut) {
  torch::manual_seed(0);
  const auto opts = torch::dtype(torch::kFloat64);
  torch::Tensor y = torch::randn({5, 3}, opts);
  std::vector<torch::Tensor> ks = {torch::randn({5, 3}, opts), torch::randn({5, 3}, opts)};
  const std::vector<double> w = {0.25, -1.5};
  const double h = 0.2;
  torch::Tensor ref = y + h * w[0] * ks[0] + h * w[1] * ks[1];
  torch::Tensor got = dl::kernels::lincomb(y, ks, w, h);
  EXPECT_TRUE(torch::allclose(got, ref, 1e-14, 1e-14));
  torch::Tensor out = torch::empty({5, 3}, opts);
  dl::kernels::lincomb_into(y, ks, w, h, out);
  EXPECT_TRUE(torch::equal(out, got));
  EXPECT_THROW(dl::kernels::lincomb_into(y, ks, w, h, ks[0]), c10::Error);  // out overlaps
}

TEST(FusedOps, ErrorNormMatchesAten) {
  torch::manual_seed(1);
  const auto opts = torch::dtype(torch::kFloat32);
  std::vector<torch::Tensor> ks = {torch::randn({40}, opts), torch::randn({40}, opts)};
  torch::Tensor y0 = torch::randn({40}, opts), y1 = torch::randn({40}, opts);
  const std::vector<double> w = {0.3, -0.2};
  torch::Tensor e = 0.1 * w[0] * ks[0] + 0.1 * w[1] * ks[1];
  torch::Tensor scale = 1e-3 + 1e-2 * torch::maximum(y0.abs(), y1.abs());
  const double ref = (e / scale).pow(2).mean().sqrt().item<double>();
  const double got = dl::kernels::error_norm(ks, w, 0.1, y0, y1, 1e-3, 1e-2).item<double>();
  EXPECT_NEAR(got, ref, 1e-5 * ref);
  EXPECT_THROW(dl::kernels::error_norm(ks, {1.0}, 0.1, y0, y1, 1e-3, 1e-2), c10::Error);
}

TEST(BufferPool, HandsOutOnlyUnreferencedBuffers) {
  dl::detail::BufferPool pool;
  torch::Tensor like = torch::zeros({3}, torch::kFloat64);
  void* first = nullptr;
  {
    torch::Tensor a = pool.get(like);
    first = a.data_ptr();
  }
  torch::Tensor b = pool.get(like);
  EXPECT_EQ(b.data_ptr(), first);  // released, so handed out again
  torch::Tensor c = pool.get(like);
  EXPECT_NE(c.data_ptr(), b.data_ptr());  // b is still held
  void* c_ptr = c.data_ptr();
  torch::Tensor view = c.view({1, 3});
  c = torch::Tensor();
  torch::Tensor d = pool.get(like);
  EXPECT_NE(d.data_ptr(), c_ptr);  // a view keeps c's storage in use
  EXPECT_NE(d.data_ptr(), b.data_ptr());
  torch::Tensor e = pool.get(torch::zeros({4}, torch::kFloat32));
  EXPECT_EQ(e.sizes(), torch::IntArrayRef({4}));
  EXPECT_EQ(e.scalar_type(), torch::kFloat32);
}

TEST(BufferPool, NoGradSolveEqualsRecordedSolve) {
  auto f = [](double, const torch::Tensor& u) { return torch::stack({u[1], -u[0]}); };
  torch::Tensor u0 = torch::tensor({1.0, 0.0}, torch::kFloat64);
  dl::SolveOptions o;
  o.method = "tsit5";
  dl::Solution plain;
  {
    torch::NoGradGuard g;
    plain = dl::solve(f, u0, 0.0, 5.0, o);
  }
  dl::Solution recorded = dl::solve(f, u0.clone().requires_grad_(true), 0.0, 5.0, o);
  ASSERT_TRUE(recorded.u.requires_grad());
  EXPECT_TRUE(torch::equal(plain.u, recorded.u.detach()));
  EXPECT_NEAR(plain.u[-1][0].item<double>(), std::cos(5.0), 1e-5);
}

// all_finite: the host loop (contiguous CPU float/double) and the summing fallback agree on NaN
// and +-Inf; large finite values whose sum overflows pass the host loop, which checks values,
// not their sum.
TEST(FusedOps, AllFiniteChecksEveryValue) {
  const double inf = std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (auto dtype : {torch::kFloat64, torch::kFloat32}) {
    auto x = torch::ones({5, 3}, dtype);
    EXPECT_TRUE(diffeqlayers::all_finite(x));
    EXPECT_TRUE(diffeqlayers::all_finite(x.t()));  // non-contiguous: the fallback
    for (double bad : {nan, inf, -inf}) {
      auto y = x.clone();
      y[3][1] = bad;
      EXPECT_FALSE(diffeqlayers::all_finite(y)) << bad;
      EXPECT_FALSE(diffeqlayers::all_finite(y.t())) << bad;
    }
    auto big = torch::full({4}, dtype == torch::kFloat32 ? 3e38 : 1.7e308, dtype);
    EXPECT_TRUE(diffeqlayers::all_finite(big));
  }
  EXPECT_TRUE(diffeqlayers::all_finite(torch::empty({0}, torch::kFloat64)));
}
