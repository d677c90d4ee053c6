// Newton helpers shared by the implicit steppers (solvers/jacobian.h): the rate test of the
// simplified iteration, and the one differentiable Newton correction of an implicit Runge-Kutta
// step's converged stages by which radau5 and the fixed-step implicit methods give their stages
// the implicit function theorem's derivative in reverse and forward mode.
#include <cmath>
#include <string>
#include <vector>

#include "core/host_copy.h"
#include "core/lincomb.h"
#include "solvers/jacobian.h"

namespace diffeqlayers {
namespace stiff {

bool newton_rate_ok(int it, double nd, double prev, int max_updates, double kappa, bool fixed,
                    double& theta, std::string& why) {
  theta = prev > 0 ? nd / prev : 0.0;
  if (theta >= 0.99) {
    why = "the Newton iteration diverged (contraction " + fmt(theta) + ")";
    return false;
  }
  if (!fixed && it < max_updates - 1 &&
      std::pow(theta, max_updates - 1 - it) / (1.0 - theta) * nd > kappa) {
    why = "the Newton iteration converges too slowly (contraction " + fmt(theta) + ")";
    return false;
  }
  return true;
}

namespace {

// M^-1 X for stage rows X [s, N] (N = B n, per-sample blocks of n), in M's layout [B, s n]; with
// `batch` >= 0, X [batch, s, N] holds that many right-hand sides (solved at once). Same shape out.
torch::Tensor solve_stages(const LU& exact, const torch::Tensor& X, int64_t s, int64_t B, int64_t n,
                           int64_t batch = -1) {
  if (batch < 0)
    return exact.solve(X.view({s, B, n}).permute({1, 0, 2}).reshape({B, s * n}))
        .view({B, s, n})
        .permute({1, 0, 2})
        .reshape({s, B * n});
  return exact
      .solve_batch(X.view({batch, s, B, n}).permute({0, 2, 1, 3}).reshape({batch, B * s * n}),
                   batch)
      .view({batch, B, s, n})
      .permute({0, 2, 1, 3})
      .reshape({batch, s, B * n});
}

// Forward mode without recording: the correction's tangent from the stage derivatives' tangents
// F'_j as plain tensors, -M^-1 G' with G'_i = -h sum_j a_ij F'_j, and Z* as its value; the same
// as the correction on dual tensors below, without its arithmetic on duals (in torch 2.13's
// forward AD an op on a dual tensor costs 150-370 us, a plain one about 4 us). Undefined where F
// records for reverse mode, carries no tangent, or has a tangent layout split_duals does not
// handle: the caller takes the dual ops.
torch::Tensor tangent_correction(const LU& exact, double h,
                                 const std::vector<std::vector<double>>& A,
                                 const std::vector<torch::Tensor>& F, const torch::Tensor& Zstar,
                                 int64_t B, int64_t n) {
  const auto s = static_cast<int64_t>(F.size());
  std::vector<torch::Tensor> used;
  bool record = false, dual = false;
  for (const auto& Fj : F)
    if (Fj.defined()) {
      used.push_back(Fj);
      record = record || Fj.requires_grad();
      dual = dual || is_dual(Fj);
    }
  if (!dual || (record && at::GradMode::is_enabled())) return torch::Tensor();
  SplitDuals sd;
  if (!split_duals(used, sd, /*with_primals=*/false)) return torch::Tensor();
  std::vector<torch::Tensor> Ft(static_cast<size_t>(s));
  for (size_t j = 0, q = 0; j < F.size(); ++j)
    if (F[j].defined()) Ft[j] = sd.tangents[q++];
  const int64_t N = B * n;
  const std::vector<int64_t> shape =
      sd.level >= 0 ? std::vector<int64_t>{sd.batch, N} : std::vector<int64_t>{N};
  std::vector<torch::Tensor> Gt;  // G'_i, each of `shape`, stacked along dimension 1 if batched
  for (int64_t i = 0; i < s; ++i) {
    torch::Tensor g;
    for (int64_t j = 0; j < s; ++j) {
      const double a = A[static_cast<size_t>(i)][static_cast<size_t>(j)];
      const torch::Tensor& t = Ft[static_cast<size_t>(j)];
      if (a == 0.0 || !t.defined()) continue;
      g = g.defined() ? g.add(t, -h * a) : t.mul(-h * a);
    }
    Gt.push_back(g.defined() ? g.expand(shape) : at::zeros(shape, Zstar.options()));
  }
  const torch::Tensor dZt =
      sd.level < 0 ? solve_stages(exact, at::stack(Gt), s, B, n)
                   : solve_stages(exact, at::stack(Gt, 1), s, B, n, sd.batch);  // [batch, s, N]
  return make_dual(Zstar.detach(), dZt.neg(), sd.level);
}

}  // namespace

torch::Tensor newton_correction(const Dynamics& f, const SolveOptions& o, Stats& stats, double t,
                                double h, const std::vector<double>& c,
                                const std::vector<std::vector<double>>& A, const torch::Tensor& u,
                                const torch::Tensor& Zstar, std::string& why) {
  const auto s = static_cast<int64_t>(c.size());
  const int64_t N = u.numel();
  const JacLayout l = jac_layout(o, u);
  const int64_t B = l.blocks, n = l.n;
  const torch::Tensor ud = u.detach().reshape({N});
  std::vector<bool> used(static_cast<size_t>(s), false);  // column j of A is not zero
  std::vector<double> a_flat;
  for (int64_t i = 0; i < s; ++i)
    for (int64_t j = 0; j < s; ++j) {
      const double a = A[static_cast<size_t>(i)][static_cast<size_t>(j)];
      a_flat.push_back(a);
      if (a != 0.0) used[static_cast<size_t>(j)] = true;
    }
  // The exact Jacobians at the converged stages (primal values, detached).
  std::vector<torch::Tensor> Js;
  {
    PrimalOnly primal;
    for (int64_t j = 0; j < s; ++j) {
      if (!used[static_cast<size_t>(j)]) {
        Js.push_back(at::zeros({B, n, n}, ud.options()));
        continue;
      }
      const PointDerivatives d =
          derivatives(f, o, t + c[static_cast<size_t>(j)] * h, (ud + Zstar[j]).reshape(u.sizes()),
                      /*track=*/false, stats, /*with_ft=*/false);
      Js.push_back(d.J.detach());
    }
  }
  const torch::Tensor Am = copy_to_device(a_flat.data(), {s, s}, ud.options());
  // K[b, i, a, j, c] = A_ij J_j[b, a, c]: block b of (A x I) diag(J_1, ..., J_s), [B, s n, s n].
  const torch::Tensor K =
      at::einsum("ij,jbac->biajc", {Am, at::stack(Js)}).reshape({B, s * n, s * n});
  LU exact;
  if (!exact.factor(K, 1.0, -h, stats)) {
    why = "the iteration matrix I - h (A x J) at the converged stages is singular";
    return torch::Tensor();
  }
  // G(Z*) with u (and f's parameters) carrying grad or tangents.
  const torch::Tensor uf = u.reshape({N});
  std::vector<torch::Tensor> F(static_cast<size_t>(s));
  for (int64_t j = 0; j < s; ++j)
    if (used[static_cast<size_t>(j)])
      F[static_cast<size_t>(j)] =
          eval_f(f, t + c[static_cast<size_t>(j)] * h, (uf + Zstar[j]).reshape(u.sizes()), stats)
              .reshape({N});
  if (torch::Tensor Z = tangent_correction(exact, h, A, F, Zstar, B, n); Z.defined()) return Z;
  std::vector<torch::Tensor> G;
  for (int64_t i = 0; i < s; ++i) {
    std::vector<torch::Tensor> terms;
    std::vector<double> w;
    for (int64_t j = 0; j < s; ++j) {
      const double a = A[static_cast<size_t>(i)][static_cast<size_t>(j)];
      if (a != 0.0) {
        terms.push_back(F[static_cast<size_t>(j)]);
        w.push_back(-h * a);
      }
    }
    G.push_back(terms.empty() ? Zstar[i] : lincomb(Zstar[i], terms, w));  // row of A zero
  }
  // Value Zstar exactly (a solve that records takes the same values as one that does not), the
  // correction's derivative.
  const torch::Tensor Z = Zstar - solve_stages(exact, at::stack(G), s, B, n);
  return Zstar.detach() + (Z - Z.detach());
}

}  // namespace stiff
}  // namespace diffeqlayers
