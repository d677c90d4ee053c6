// GoogleTest: TorchScript modules as dynamics (diffeqlayers/script_dynamics.h), built in C++.
#include <gtest/gtest.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <cmath>
#include <string>

#include "diffeqlayers/script_dynamics.h"

namespace dl = diffeqlayers;

namespace {

torch::jit::Module scripted(const std::string& source) {
  torch::jit::Module m("Dynamics");
  m.register_parameter("rate", torch::tensor(0.7, torch::kFloat64).requires_grad_(), false);
  m.define(source);
  return m;
}

torch::Tensor u0() { return torch::tensor({1.0, -2.0}, torch::kFloat64); }

dl::SolveOptions tight() {
  dl::SolveOptions o;
  o.method = "dopri5";
  o.rtol = 1e-11;
  o.atol = 1e-13;
  return o;
}

}  // namespace

TEST(ScriptDynamics, DecayMatchesTheSameOpsAsALambdaAndTheExactSolution) {
  auto m = scripted("def forward(self, u):\n    return -self.rate * u\n");
  torch::Tensor rate = m.attr("rate").toTensor();
  auto sol = dl::solve(dl::script_dynamics(m), u0(), 0.0, 2.0, tight());
  auto ref = dl::solve([rate](double, const torch::Tensor& u) { return -rate * u; }, u0(), 0.0, 2.0,
                       tight());
  EXPECT_TRUE(torch::equal(sol.u, ref.u));
  EXPECT_EQ(sol.stats.nfe, ref.stats.nfe);
  EXPECT_LT((sol.u[-1] - u0() * std::exp(-0.7 * 2.0)).abs().max().item<double>(), 1e-10);
}

TEST(ScriptDynamics, TimeAsFloatOrTensor) {
  for (const char* source : {"def forward(self, t: float, u):\n    return u * t\n",
                             "def forward(self, t, u):\n    return u * t\n"}) {
    auto m = scripted(source);
    auto sig = dl::script_signature(m);
    EXPECT_TRUE(sig.takes_time);
    EXPECT_EQ(sig.time_as_tensor, std::string(source).find("float") == std::string::npos);
    auto sol = dl::solve(dl::script_dynamics(m), u0(), 0.0, 1.5, tight());
    // u' = t u: u(t) = u0 exp(t^2 / 2).
    EXPECT_LT((sol.u[-1] - u0() * std::exp(1.5 * 1.5 / 2)).abs().max().item<double>(), 1e-9);
  }
}

TEST(ScriptDynamics, GradientsReachTheModulesParameters) {
  auto m = scripted("def forward(self, u):\n    return -self.rate * u\n");
  torch::Tensor rate = m.attr("rate").toTensor();
  auto sol = dl::solve(dl::script_dynamics(m), u0(), 0.0, 1.0, tight());
  auto grad = torch::autograd::grad({sol.u[-1].sum()}, {rate})[0];
  // d/da of sum(u0) exp(-a t) at t = 1.
  const double expected = -u0().sum().item<double>() * std::exp(-0.7);
  EXPECT_NEAR(grad.item<double>(), expected, 1e-9);
}

TEST(ScriptDynamics, BadSignaturesRaiseTypeErrors) {
  const char* bad[] = {
      "def forward(self, a, b, c):\n    return a\n",
      "def forward(self, u: int) -> int:\n    return u\n",
      "def forward(self, t: int, u):\n    return u\n",
      "def forward(self, u):\n    return (u, u)\n",
  };
  for (const char* source : bad) {
    auto m = scripted(source);
    EXPECT_THROW(dl::script_dynamics(m), c10::TypeError) << source;
  }
  torch::jit::Module no_forward("Empty");
  EXPECT_THROW(dl::script_signature(no_forward), c10::TypeError);
}

TEST(ScriptDynamics, WrongOutputShapeAndErrorsInTheScript) {
  auto shape = scripted("def forward(self, u):\n    return u[:1]\n");
  EXPECT_THROW(dl::solve(dl::script_dynamics(shape), u0(), 0.0, 1.0, tight()), c10::ValueError);
  // An op failing inside the script (a size mismatch) once t > 0.5.
  auto fails = scripted(
      "def forward(self, t: float, u):\n"
      "    if t > 0.5:\n"
      "        return u + torch.zeros(3, dtype=u.dtype)\n"
      "    return -u\n");
  try {
    dl::solve(dl::script_dynamics(fails), u0(), 0.0, 1.0, tight());
    FAIL() << "expected an exception";
  } catch (const std::exception& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("must match the size"), std::string::npos) << what;
    EXPECT_NE(what.find("TorchScript dynamics at t=0.5"), std::string::npos) << what;
  }
}
