// find_package consumer check: solve u' = -u, u(0) = 1 on [0, 1] and compare with exp(-t).
#include <cmath>
#include <cstdio>

#include "diffeqlayers/diffeqlayers.h"

int main() {
  const auto u0 = torch::ones({3}, torch::kFloat64);
  diffeqlayers::SolveOptions options;
  options.method = "tsit5";
  options.rtol = 1e-8;
  options.atol = 1e-10;
  const auto sol = diffeqlayers::solve([](double /*t*/, const torch::Tensor& u) { return -u; }, u0,
                                       0.0, 1.0, options);

  const double got = sol.u[-1][0].item<double>();
  const double want = std::exp(-1.0);
  const double t_end = sol.t[-1].item<double>();
  std::printf("u(%g) = %.12f, exp(-1) = %.12f, nfe = %lld\n", t_end, got, want,
              static_cast<long long>(sol.stats.nfe));
  if (!sol.success() || std::abs(t_end - 1.0) > 1e-12 || std::abs(got - want) > 1e-6) {
    std::fprintf(stderr, "consumer test FAILED\n");
    return 1;
  }
  std::printf("consumer test passed\n");
  return 0;
}
