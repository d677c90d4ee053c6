// The Jacobian of f (autograd or user-supplied), df/dt and LU factorizations for the stiff
// steppers.
#include "solvers/jacobian.h"

#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <limits>
#include <sstream>

#include "integrate/tape.h"

namespace diffeqlayers {
namespace stiff {

std::string fmt(double x) {
  std::ostringstream s;
  s.precision(10);
  s << x;
  return s.str();
}

torch::Tensor eval_f(const Dynamics& f, double t, const torch::Tensor& u, Stats& stats) {
  return detail::checked_eval(f, t, u, stats.nfe);
}

namespace {

torch::Tensor user_jacobian(const Jacobian& jac, double t, const torch::Tensor& u) {
  const int64_t n = u.numel();
  torch::Tensor J = jac(t, u);
  TORCH_CHECK_TYPE(J.defined(), "jac returned no tensor (at t=", fmt(t), ")");
  TORCH_CHECK_VALUE(J.numel() == n * n && (J.dim() == 2 || J.dim() == 2 * u.dim()),
                    "jac must return the Jacobian as an [n, n] matrix with n = u.numel() = ", n,
                    " (or shaped [*u.shape, *u.shape]), got shape ", J.sizes(), " (at t=", fmt(t),
                    ")");
  TORCH_CHECK_TYPE(J.scalar_type() == u.scalar_type(), "jac returned dtype ", J.scalar_type(),
                   " but the state has dtype ", u.scalar_type());
  TORCH_CHECK_VALUE(J.device() == u.device(), "jac returned a tensor on ", J.device(),
                    " but the state is on ", u.device());
  return J.reshape({n, n});
}

}  // namespace

PointDerivatives derivatives(const Dynamics& f, const Jacobian& jac, double t,
                             const torch::Tensor& u, bool track, Stats& stats, bool with_ft) {
  PointDerivatives d;
  const int64_t n = u.numel();
  ++stats.njac;
  if (jac) {
    d.f0 = eval_f(f, t, u, stats);
    if (track) {
      d.J = user_jacobian(jac, t, u);
    } else {
      at::NoGradGuard g;
      d.J = user_jacobian(jac, t, u.detach());
    }
  } else {
    // Record one evaluation of f on a variable that requires grad. When tracking and u is
    // already part of the graph, differentiate with respect to u itself so that J keeps its
    // dependence on what u depends on.
    torch::Tensor uv = (track && u.requires_grad()) ? u : u.detach().requires_grad_(true);
    torch::Tensor fu;
    {
      at::AutoGradMode enable(true);
      fu = eval_f(f, t, uv, stats);
    }
    if (!fu.requires_grad()) {
      d.J = at::zeros({n, n}, u.options().requires_grad(false));  // f does not depend on u
    } else {
      at::AutoGradMode enable(true);
      torch::Tensor flat = fu.reshape({-1});
      torch::Tensor eye = at::eye(n, u.options().requires_grad(false));
      std::vector<torch::Tensor> rows;
      rows.reserve(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) {
        auto g = torch::autograd::grad({flat}, {uv}, {eye[i]}, /*retain_graph=*/true,
                                       /*create_graph=*/track, /*allow_unused=*/true);
        rows.push_back(g[0].defined() ? g[0].reshape({-1}) : at::zeros_like(eye[i]));
      }
      d.J = at::stack(rows);
    }
    d.f0 = track ? fu : fu.detach();
    if (!track) d.J = d.J.detach();
  }
  if (!with_ft) return d;
  // df/dt by a central difference, exact for f quadratic in t up to rounding; d = eps^(1/3)
  // max(1, |t|) balances its truncation error O(d^2) against rounding O(eps / d). The steps are
  // exactly representable: (t + d) - t.
  const double eps = u.scalar_type() == at::kDouble ? std::numeric_limits<double>::epsilon()
                                                    : std::numeric_limits<float>::epsilon();
  double dt = std::cbrt(eps) * std::max(1.0, std::abs(t));
  dt = (t + dt) - t;
  auto central = [&](const torch::Tensor& x) {
    return ((eval_f(f, t + dt, x, stats) - eval_f(f, t - dt, x, stats)) / (2.0 * dt)).reshape({-1});
  };
  if (track) {
    d.ft = central(u);
  } else {
    at::NoGradGuard g;
    d.ft = central(u.detach());
  }
  return d;
}

bool LU::factor(const torch::Tensor& matrix, Stats& stats) {
  ++stats.nlu;
  auto [l, p, info] = at::linalg_lu_factor_ex(matrix);
  // One host synchronisation: singular (info > 0) or non-finite factors.
  torch::Tensor bad = at::logical_or(info.ne(0), at::logical_not(at::isfinite(l.detach()).all()));
  if (bad.item<bool>()) return false;
  lu = l;
  pivots = p;
  return true;
}

torch::Tensor LU::solve(const torch::Tensor& rhs) const {
  return at::linalg_lu_solve(lu, pivots, rhs.reshape({-1, 1})).reshape(rhs.sizes());
}

}  // namespace stiff
}  // namespace diffeqlayers
