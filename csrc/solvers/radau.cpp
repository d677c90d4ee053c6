// Radau IIA of order 5 with step-size control: radau5 (Hairer & Wanner, Solving Ordinary
// Differential Equations II, 2nd ed., Section IV.8, the method of their code RADAU5).
//
// The stage increments Z_i = z_i - u (i = 1..3) solve Z = h (A x I) F(u + Z), F_i = f(t + c_i h,
// u + Z_i), with the Radau IIA matrix A of HW's Table IV.5.6 (c = ((4 - sqrt 6)/10,
// (4 + sqrt 6)/10, 1); stiffly accurate: u_new = u + Z_3). A^-1 has one real eigenvalue gamma and
// a complex pair alpha +- i beta; with T^-1 A^-1 T = [[gamma, 0, 0], [0, alpha, beta],
// [0, -beta, alpha]] simplified Newton in W = (T^-1 x I) Z splits the 3n x 3n iteration matrix
// h^-1 (A^-1 x I) - I x J into the real n x n matrix gamma/h I - J and the 2n x 2n matrix
// [[alpha/h I - J, beta/h I], [-beta/h I, alpha/h I - J]] (the complex matrix (alpha - i beta)/h I
// - J in real form: twice the flops of complex arithmetic, the same LU code on both paths). T,
// gamma, alpha and beta are computed from A when first used and checked.
//
// Newton: starting values from the last accepted step's collocation polynomial (zero on the first
// step); converged when eta ||dW|| <= kappa, eta = theta / (1 - theta) from the previous update
// (at the first update of a step, the last rate of the step before, raised to the power 0.8),
// kappa = max(10 eps / rtol, min(0.03, sqrt(rtol))) (HW's defaults), ||.|| the RMS norm scaled by
// atol + rtol |u|; at most 7 updates. Each update evaluates f at the three stages: one call of
// SolveOptions::stacked on the stacked states when given (a small f costs per operation, not per
// element: up to 3x less time in f), otherwise three calls. Divergence (theta >= 0.99), a predicted
// miss of kappa within the updates left, or a singular matrix fail the attempt: it is retried once
// with a Jacobian taken at this point, then the loop quarters the step. J is kept across steps and
// refreshed after a step whose Newton iteration took more than 2 updates at a rate above 1e-3 (HW's
// THET); the LUs are refactored whenever h changes. (RADAU5 keeps h, and so the LUs, when the
// controller proposes a factor within [1, 1.2]; this loop's controller decides h alone, and LUs
// kept for a step up to 1.2x off slowed Newton to rates near 0.1: on ROBER at rtol 1e-8, 12132
// evaluations of f instead of 7779 with refactoring, for the same 1033 steps. A Jacobian kept while
// the rate stayed below 0.1 saved Jacobians (23 against 157) but cost more in evaluations of f:
// 0.89 s against 0.57 s.)
//
// Error estimate (HW (8.19)-(8.20)): err = (I - h gamma0 J)^-1 (h gamma0 f(t, u) + sum_i e_i Z_i),
// gamma0 = 1 / gamma, from the embedded third-order formula u + h (gamma0 f(t, u) + sum_i bhat_i
// F_i), e = A^-T (bhat - b), h F = (A^-1 x I) Z; on the first step and after a rejection an
// estimate above 1 is recomputed with f(t, u + err) in place of f(t, u) (HW's device: the filter
// alone leaves stiff components in the estimate there). Dense output: the collocation polynomial
// through u and the three stages (third order).
//
// Gradients: as the ESDIRK methods (esdirk.cpp), Newton runs without grad on detached values;
// when something upstream requires grad (or carries forward-mode tangents) the converged Z* then
// takes ONE differentiable Newton correction Z = Z* - M^-1 G(Z*), G(Z) = Z - h (A x I) F(u + Z),
// with the exact matrix M = I - h (A x I) diag(J(z_1*), J(z_2*), J(z_3*)) (detached): its
// derivative is the implicit function theorem's (newton_correction, jacobian.h). Cost under grad:
// three more Jacobians, one LU of size 3n and three evaluations of f per step in the forward
// pass. The discrete adjoint replays each step from the forward solve's converged stages (its
// dense output holds Z* / h) with the same correction (replay), so its gradient is diffeq_rd's.
#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "solvers/jacobian.h"
#include "solvers/stiff.h"

namespace diffeqlayers {
namespace stiff {
namespace {

using Mat3 = std::array<std::array<double, 3>, 3>;

constexpr int kMaxNewton = 7;        // HW's NIT
constexpr double kFastTheta = 1e-3;  // HW's THET: a slower rate refreshes J

Mat3 inverse3(const Mat3& m) {
  Mat3 r{};
  const double det = m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) -
                     m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0]) +
                     m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]);
  TORCH_INTERNAL_ASSERT(det != 0.0, "radau5: singular 3 x 3 matrix");
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) {
      // Cofactor of (j, i) over det.
      const int r0 = (j + 1) % 3, r1 = (j + 2) % 3, c0 = (i + 1) % 3, c1 = (i + 2) % 3;
      r[i][j] = (m[r0][c0] * m[r1][c1] - m[r0][c1] * m[r1][c0]) / det;
    }
  return r;
}

Mat3 product(const Mat3& a, const Mat3& b) {
  Mat3 r{};
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j)
      for (int k = 0; k < 3; ++k) r[i][j] += a[i][k] * b[k][j];
  return r;
}

struct Radau5 {
  MethodInfo info;
  Tableau interpolant;  // the collocation polynomial over dense_terms Z_i / h
  std::array<double, 3> c{}, e{};
  Mat3 A{}, T{}, Tinv{};
  std::vector<double> c_vec;  // c and A as newton_correction takes them
  std::vector<std::vector<double>> a_rows;
  double gamma = 0, alpha = 0, beta = 0;

  // L_j(theta): the collocation polynomial's weight of Z_j (L_j(c_i) = delta_ij, L_j(0) = 0).
  double weight(int j, double theta) const {
    const std::vector<double>& d = interpolant.dense[static_cast<size_t>(j)];
    return theta * (d[0] + theta * (d[1] + theta * d[2]));
  }
};

const Radau5& radau5() {
  static const Radau5 r = [] {
    Radau5 r;
    const double s6 = std::sqrt(6.0);
    r.c = {(4.0 - s6) / 10, (4.0 + s6) / 10, 1.0};
    r.A = {{{(88.0 - 7.0 * s6) / 360, (296.0 - 169.0 * s6) / 1800, (-2.0 + 3.0 * s6) / 225},
            {(296.0 + 169.0 * s6) / 1800, (88.0 + 7.0 * s6) / 360, (-2.0 - 3.0 * s6) / 225},
            {(16.0 - s6) / 36, (16.0 + s6) / 36, 1.0 / 9}}};
    const Mat3 Ainv = inverse3(r.A);
    r.c_vec.assign(r.c.begin(), r.c.end());
    for (const auto& row : r.A) r.a_rows.emplace_back(row.begin(), row.end());

    // Eigenvalues and vectors of A^-1 (3 x 3 doubles, once).
    torch::Tensor Ai = torch::empty({3, 3}, torch::kFloat64);
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) Ai[i][j] = Ainv[i][j];
    auto [vals, vecs] = at::linalg_eig(Ai);
    const torch::Tensor re = at::real(vals), im = at::imag(vals);
    int ir = 0, ic = -1;
    for (int i = 0; i < 3; ++i) {
      if (std::abs(im[i].item<double>()) < std::abs(im[ir].item<double>())) ir = i;
      if (im[i].item<double>() > 0) ic = i;
    }
    TORCH_INTERNAL_ASSERT(ic >= 0 && ic != ir, "radau5: A^-1 has no complex eigenvalue pair");
    r.gamma = re[ir].item<double>();
    r.alpha = re[ic].item<double>();
    r.beta = im[ic].item<double>();
    // Columns of T: the real eigenvector (scaled real), then the real and imaginary parts of the
    // eigenvector of alpha + i beta: A^-1 (v_r + i v_i) = (alpha + i beta)(v_r + i v_i).
    const torch::Tensor v0 = vecs.select(1, ir), vc = vecs.select(1, ic);
    const torch::Tensor v0r = at::real(v0 / v0[at::argmax(v0.abs())]);
    for (int i = 0; i < 3; ++i) {
      r.T[i][0] = v0r[i].item<double>();
      r.T[i][1] = at::real(vc[i]).item<double>();
      r.T[i][2] = at::imag(vc[i]).item<double>();
    }
    r.Tinv = inverse3(r.T);
    const Mat3 L = product(r.Tinv, product(Ainv, r.T));
    const Mat3 want = {{{r.gamma, 0, 0}, {0, r.alpha, r.beta}, {0, -r.beta, r.alpha}}};
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j)
        TORCH_INTERNAL_ASSERT(std::abs(L[i][j] - want[i][j]) < 1e-12,
                              "radau5: T^-1 A^-1 T is not block diagonal");

    // Embedded weights: gamma0 [k == 1] + sum_i bhat_i c_i^(k-1) = 1/k for k = 1, 2, 3.
    const double gamma0 = 1.0 / r.gamma;
    Mat3 V{};
    for (int i = 0; i < 3; ++i) {
      V[0][i] = 1.0;
      V[1][i] = r.c[i];
      V[2][i] = r.c[i] * r.c[i];
    }
    const Mat3 Vinv = inverse3(V);
    const std::array<double, 3> rhs = {1.0 - gamma0, 0.5, 1.0 / 3};
    std::array<double, 3> bdiff{};
    for (int i = 0; i < 3; ++i) {
      double bhat = 0.0;
      for (int k = 0; k < 3; ++k) bhat += Vinv[i][k] * rhs[k];
      bdiff[i] = bhat - r.A[2][i];  // b = last row of A
    }
    for (int j = 0; j < 3; ++j) {
      r.e[j] = 0.0;
      for (int i = 0; i < 3; ++i) r.e[j] += bdiff[i] * Ainv[i][j];  // e = A^-T (bhat - b)
    }

    // L_j(theta) = theta (theta - c_k)(theta - c_l) / (c_j (c_j - c_k)(c_j - c_l)), {k, l} the
    // other two nodes: coefficients of theta, theta^2, theta^3.
    r.interpolant.name = "radau5";
    r.interpolant.order = 5;
    r.interpolant.dense_order = 3;
    for (int j = 0; j < 3; ++j) {
      const double a = r.c[(j + 1) % 3], b = r.c[(j + 2) % 3];
      const double den = r.c[j] * (r.c[j] - a) * (r.c[j] - b);
      r.interpolant.dense.push_back({a * b / den, -(a + b) / den, 1.0 / den});
    }
    r.info = MethodInfo{"radau5", 5, 3, &r.interpolant,
                        "Radau IIA, 3 stages, order 5, adaptive (Hairer & Wanner II, IV.8: "
                        "RADAU5's transformed Newton iteration and error estimate)"};
    return r;
  }();
  return r;
}

class Radau5Stepper : public Stepper {
 public:
  Radau5Stepper(const Dynamics& f, const SolveOptions& o, Stats& stats, bool track)
      : m_(radau5()), f_(f), o_(o), stats_(stats), track_(track) {
    // Fixed steps have no smaller step to fall back on: iterate longer, fail only on divergence.
    fixed_ = !o.adaptive;
    max_newton_ = fixed_ ? 50 : kMaxNewton;
    const double eps = std::numeric_limits<double>::epsilon();
    kappa_ = o.rtol > 0 ? std::max(10.0 * eps / o.rtol, std::min(0.03, std::sqrt(o.rtol))) : 0.03;
  }
  const MethodInfo& info() const override { return m_.info; }

  // The forward's converged stages are its dense terms times h (no correction without grad):
  // the correction at them gives the step's value and derivative as diffeq_rd's forward pass did.
  StepResult replay(double t, const torch::Tensor& u, double h,
                    const std::vector<torch::Tensor>& dense_terms) override {
    TORCH_CHECK(dense_terms.size() == 3, "radau5: a replayed step needs its 3 stages");
    const int64_t N = u.numel();
    std::vector<torch::Tensor> zs;
    for (const auto& k : dense_terms) zs.push_back(k.detach().reshape({N}) * h);
    StepResult r;
    std::string why;
    const torch::Tensor Z =
        newton_correction(f_, o_, stats_, t, h, m_.c_vec, m_.a_rows, u, at::stack(zs), why);
    if (!Z.defined()) {
      r.failure = why;
      return r;
    }
    r.unew = (u.reshape({N}) + Z[2]).reshape(u.sizes());
    for (int i = 0; i < 3; ++i) r.dense_terms.push_back((Z[i] / h).reshape(u.sizes()));
    return r;
  }

  StepResult step(double t, const torch::Tensor& u, double h, bool new_point) override {
    if (!layout_.n) {
      layout_ = jac_layout(o_, u);
      host_ = use_host(u, layout_, track_);
    }
    if (new_point || !f0_.defined()) {
      // The last attempt was accepted: its collocation polynomial predicts the next stages.
      if (f0_.defined() && cand_h_ != 0.0) {
        prev_h_ = cand_h_;
        prev_Zh_ = cand_Zh_;
        prev_Z_ = cand_Z_;
      }
      jac_at_point_ = false;
      f0_ = torch::Tensor();
      // f0 and J are primal values only once tangents are known to flow (dual_, from an
      // earlier point); the first point's Jacobian finds out whether the parameters carry them.
      bool f0_dual = false;
      if (!J_.defined() || refresh_J_) {
        f0_dual = take_jacobian(t, u);
      } else {
        f0_ = eval(t, u, /*grad=*/false);
      }
      // Forward mode: u or the parameters carry tangents (the correction gives them to Z).
      dual_ = !track_ && (is_dual(u) || f0_dual || dual_);
      if (dual_) host_ = false;
      if (host_) {
        uh_ = to_host(u);
        f0h_ = to_host(f0_);
      }
    }
    cand_h_ = 0.0;
    // HW: on the first step and after a rejection an estimate above 1 is recomputed.
    const bool recheck = prev_h_ == 0.0 || !new_point;
    StepResult r;
    bool fresh_J = jac_at_point_;
    for (;;) {
      std::string why;
      if (host_ ? try_step_host(t, u, h, recheck, r, why) : try_step(t, u, h, recheck, r, why))
        return r;
      eta_ = 1.0;
      if (fresh_J) {
        r = StepResult();
        r.failure = why;
        return r;
      }
      fresh_J = true;
      take_jacobian(t, u);
    }
  }

 private:
  torch::Tensor eval(double t, const torch::Tensor& z, bool grad) {
    if (grad) return eval_f(f_, t, z, stats_);
    at::NoGradGuard g;
    PrimalOnly primal;  // the Newton iteration needs no tangents
    return eval_f(f_, t, z.detach(), stats_).detach();
  }

  // f at the three stages u + Z_i (Zu [3, N] or [3, *shape], the states), as [3, N], detached:
  // one call of SolveOptions::stacked when given, otherwise three of f.
  torch::Tensor eval_stack(double t, double h, const torch::Tensor& Zu, const torch::Tensor& u) {
    at::NoGradGuard g;
    PrimalOnly primal;  // the Newton iteration needs no tangents
    const std::vector<double> ts{t + m_.c[0] * h, t + m_.c[1] * h, t + m_.c[2] * h};
    return eval_stages(f_, o_, ts, Zu.detach().reshape(stack_like(u).sizes()), stats_, verify_)
        .detach()
        .reshape({3, u.numel()});
  }

  // An (uninitialised) [3, *shape] tensor of u's dtype and device: the layout of three states.
  const torch::Tensor& stack_like(const torch::Tensor& u) {
    if (!stack_like_.defined() || stack_like_.sizes().slice(1) != u.sizes()) {
      std::vector<int64_t> shape{3};
      shape.insert(shape.end(), u.sizes().begin(), u.sizes().end());
      stack_like_ = at::empty(shape, u.options().requires_grad(false));
    }
    return stack_like_;
  }

  // J at (t, u), detached, and f0; the LUs are refactored next. Returns whether f(t, u) carries a
  // forward-mode tangent (dual parameters); false where tangents are known to flow (dual_, from
  // an earlier point): J is then taken on primal values only.
  bool take_jacobian(double t, const torch::Tensor& u) {
    PrimalOnly primal(dual_);
    PointDerivatives d = derivatives(f_, o_, t, u.detach(), /*track=*/false, stats_,
                                     /*with_ft=*/false);
    J_ = d.J.detach();
    if (host_) Jh_ = to_host(J_);
    f0_ = d.f0.detach();
    if (host_) f0h_ = to_host(f0_);
    jac_at_point_ = true;
    refresh_J_ = false;
    lu_h_ = 0.0;
    return d.dual;
  }

  // The LUs of gamma/h I - J and of the real form of (alpha - i beta)/h I - J, for step h.
  bool ensure_lu(double h) {
    if (lu_h_ == h) return true;
    const int64_t B = layout_.blocks, n = layout_.n;
    const double a = m_.alpha / h, b = m_.beta / h;
    const int64_t nlu = stats_.nlu;
    bool ok;
    if (host_) {
      std::vector<double> M(static_cast<size_t>(B * 4 * n * n), 0.0);
      for (int64_t k = 0; k < B; ++k) {
        double* Mk = M.data() + k * 4 * n * n;
        const double* Jk = Jh_.data() + k * n * n;
        for (int64_t i = 0; i < n; ++i) {
          for (int64_t j = 0; j < n; ++j) {
            Mk[i * 2 * n + j] = -Jk[i * n + j];
            Mk[(n + i) * 2 * n + n + j] = -Jk[i * n + j];
          }
          Mk[i * 2 * n + i] += a;
          Mk[(n + i) * 2 * n + n + i] += a;
          Mk[i * 2 * n + n + i] = b;
          Mk[(n + i) * 2 * n + i] = -b;
        }
      }
      ok = hlu1_.factor(Jh_, B, n, m_.gamma / h, -1.0, stats_) &&
           hlu2_.factor(M, B, 2 * n, 0.0, 1.0, stats_);
    } else {
      const torch::Tensor I = at::eye(n, J_.options()).expand({B, n, n});
      const torch::Tensor d = I * a - J_;
      const torch::Tensor M = at::cat({at::cat({d, I * b}, 2), at::cat({I * -b, d}, 2)}, 1);
      ok = lu1_.factor(J_, m_.gamma / h, -1.0, stats_) && lu2_.factor(M, 0.0, 1.0, stats_);
    }
    // Stats::nlu counts the pair as one factorization of the iteration matrix (as RADAU5 and
    // scipy's Radau count it).
    stats_.nlu = nlu + 1;
    lu_h_ = ok ? h : 0.0;
    return ok;
  }

  // The contraction bookkeeping of one Newton update with scaled norm nd: 1 converged, 0
  // continue, -1 failed (why set).
  int newton_check(int it, double nd, double& prev, std::string& why) {
    if (!std::isfinite(nd)) {
      why = "the Newton iteration produced a non-finite state";
      return -1;
    }
    if (it > 0) {
      if (!newton_rate_ok(it, nd, prev, max_newton_, kappa_, fixed_, theta_, why)) return -1;
      eta_ = theta_ / (1.0 - theta_);
    }
    prev = std::max(nd, std::numeric_limits<double>::min());
    return (nd == 0.0 || eta_ * nd <= kappa_) ? 1 : 0;
  }

  // Starting values: the last accepted step's collocation polynomial at t + c_i h, as increments
  // from u (= u_prev + Z_prev,3), P[i][j] its weights on Z_prev,j.
  Mat3 extrapolation(double h) const {
    Mat3 P{};
    for (int i = 0; i < 3; ++i) {
      const double theta = 1.0 + m_.c[i] * h / prev_h_;
      for (int j = 0; j < 3; ++j) P[i][j] = m_.weight(j, theta) - (j == 2 ? 1.0 : 0.0);
    }
    return P;
  }

  void after_newton(int updates) { refresh_J_ = updates > 2 && theta_ > kFastTheta; }

  torch::Tensor mat(const Mat3& M, const torch::Tensor& like) const {
    torch::Tensor r = torch::empty({3, 3}, torch::kFloat64);
    double* p = r.data_ptr<double>();
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) p[i * 3 + j] = M[i][j];
    return r.to(like.options().requires_grad(false));
  }

  bool try_step(double t, const torch::Tensor& u, double h, bool recheck, StepResult& r,
                std::string& why) {
    if (!ensure_lu(h)) {
      why = "an iteration matrix (gamma/h I - J or (alpha - i beta)/h I - J) is singular";
      return false;
    }
    const int64_t N = u.numel(), B = layout_.blocks, n = layout_.n;
    torch::Tensor ud = u.detach().reshape({N});
    torch::Tensor Z;  // [3, N], detached
    {
      at::NoGradGuard g;
      const torch::Tensor inv_scale = (ud.abs() * o_.rtol + o_.atol).reciprocal();
      Z = prev_h_ != 0.0 ? at::mm(mat(extrapolation(h), ud), prev_Z_)
                         : at::zeros({3, N}, ud.options());
      const torch::Tensor Tinv = mat(m_.Tinv, ud), T = mat(m_.T, ud);
      torch::Tensor W = at::mm(Tinv, Z);
      eta_ = std::pow(std::max(eta_, std::numeric_limits<double>::epsilon()), 0.8);
      double prev = 0.0;
      int it = 0;
      for (;; ++it) {
        if (it == max_newton_) {
          why = "the Newton iteration did not converge in " + std::to_string(max_newton_) +
                " updates";
          return false;
        }
        const torch::Tensor G = at::mm(Tinv, eval_stack(t, h, ud.unsqueeze(0) + Z, u));
        const torch::Tensor R1 = G[0] - W[0] * (m_.gamma / h);
        const torch::Tensor R2 = G[1] - (W[1] * m_.alpha + W[2] * m_.beta) / h;
        const torch::Tensor R3 = G[2] - (W[2] * m_.alpha - W[1] * m_.beta) / h;
        const torch::Tensor d1 = lu1_.solve(R1);
        const torch::Tensor d23 = lu2_.solve(at::cat({R2.view({B, n}), R3.view({B, n})}, 1));
        const torch::Tensor dW =
            at::stack({d1, d23.narrow(1, 0, n).reshape({N}), d23.narrow(1, n, n).reshape({N})});
        const double nd = (dW * inv_scale).pow(2).mean().sqrt().item<double>();
        const int state = newton_check(it, nd, prev, why);
        if (state < 0) return false;
        W = W + dW;
        Z = at::mm(T, W);
        if (state > 0) break;
      }
      after_newton(it + 1);
    }
    cand_Z_ = Z;
    cand_h_ = h;

    torch::Tensor Zc = Z;
    if (track_ || dual_) {
      // One differentiable Newton correction with the exact matrix at the converged stages.
      Zc = newton_correction(f_, o_, stats_, t, h, m_.c_vec, m_.a_rows, u, Z, why);
      if (!Zc.defined()) return false;
    }
    r.unew = (u.reshape({N}) + Zc[2]).reshape(u.sizes());
    for (int i = 0; i < 3; ++i) r.dense_terms.push_back((Zc[i] / h).reshape(u.sizes()));
    r.f0 = f0_;
    if (!fixed_) {
      at::NoGradGuard g;
      const double ge = h / m_.gamma;  // h gamma0
      const torch::Tensor ez = Z[0] * m_.e[0] + Z[1] * m_.e[1] + Z[2] * m_.e[2];
      const double back = m_.gamma / lu_h_;
      torch::Tensor err = lu1_.solve(f0_.reshape({N}) * ge + ez) * back;
      const torch::Tensor unew = r.unew.detach().reshape({N});
      if (recheck && step_error(o_, ud, unew, err).first > 1.0) {
        const torch::Tensor f1 = eval(t, (ud + err).reshape(u.sizes()), false).reshape({N});
        err = lu1_.solve(f1 * ge + ez) * back;
      }
      r.err = err.reshape(u.sizes());
    }
    return true;
  }

  // try_step on host doubles (use_host: no grad, no tangents, CPU, small blocks).
  bool try_step_host(double t, const torch::Tensor& u, double h, bool recheck, StepResult& r,
                     std::string& why) {
    at::NoGradGuard g;
    if (!ensure_lu(h)) {
      why = "an iteration matrix (gamma/h I - J or (alpha - i beta)/h I - J) is singular";
      return false;
    }
    const size_t N = uh_.size(), n = static_cast<size_t>(layout_.n);
    std::vector<double> inv_scale(N);
    for (size_t q = 0; q < N; ++q) inv_scale[q] = 1.0 / (std::abs(uh_[q]) * o_.rtol + o_.atol);
    // Y = M X for [3, N] arrays.
    auto apply = [N](const Mat3& M, const std::vector<double>& X, std::vector<double>& Y) {
      Y.assign(3 * N, 0.0);
      for (size_t i = 0; i < 3; ++i)
        for (size_t j = 0; j < 3; ++j)
          if (M[i][j] != 0.0)
            for (size_t q = 0; q < N; ++q) Y[i * N + q] += M[i][j] * X[j * N + q];
    };
    std::vector<double> Z, W, F(3 * N), G, z(N), d1(N), d23(2 * N);
    if (prev_h_ != 0.0)
      apply(extrapolation(h), prev_Zh_, Z);
    else
      Z.assign(3 * N, 0.0);
    apply(m_.Tinv, Z, W);
    eta_ = std::pow(std::max(eta_, std::numeric_limits<double>::epsilon()), 0.8);
    double prev = 0.0;
    int it = 0;
    for (;; ++it) {
      if (it == max_newton_) {
        why =
            "the Newton iteration did not converge in " + std::to_string(max_newton_) + " updates";
        return false;
      }
      for (size_t i = 0; i < 3; ++i)
        for (size_t q = 0; q < N; ++q) F[i * N + q] = uh_[q] + Z[i * N + q];
      F = to_host(eval_stack(t, h, from_host(F.data(), stack_like(u)), u));
      apply(m_.Tinv, F, G);
      for (size_t q = 0; q < N; ++q) {
        d1[q] = G[q] - W[q] * (m_.gamma / h);
        const size_t b = q / n, a = q % n;
        d23[b * 2 * n + a] = G[N + q] - (W[N + q] * m_.alpha + W[2 * N + q] * m_.beta) / h;
        d23[b * 2 * n + n + a] = G[2 * N + q] - (W[2 * N + q] * m_.alpha - W[N + q] * m_.beta) / h;
      }
      hlu1_.solve(d1.data());
      hlu2_.solve(d23.data());
      double ss = 0.0;
      for (size_t q = 0; q < N; ++q) {
        const size_t b = q / n, a = q % n;
        const double dw[3] = {d1[q], d23[b * 2 * n + a], d23[b * 2 * n + n + a]};
        for (size_t i = 0; i < 3; ++i) {
          W[i * N + q] += dw[i];
          const double s = dw[i] * inv_scale[q];
          ss += s * s;
        }
      }
      const double nd = N ? std::sqrt(ss / static_cast<double>(3 * N)) : 0.0;
      const int state = newton_check(it, nd, prev, why);
      if (state < 0) return false;  // W's update is discarded with the attempt
      apply(m_.T, W, Z);
      if (state > 0) break;
    }
    after_newton(it + 1);
    cand_Zh_ = Z;
    cand_h_ = h;

    std::vector<double> unew(N);
    for (size_t q = 0; q < N; ++q) unew[q] = uh_[q] + Z[2 * N + q];
    r.unew = from_host(unew.data(), u);
    for (size_t i = 0; i < 3; ++i) {
      std::vector<double> k(Z.begin() + static_cast<std::ptrdiff_t>(i * N),
                            Z.begin() + static_cast<std::ptrdiff_t>((i + 1) * N));
      for (double& x : k) x /= h;
      r.dense_terms.push_back(from_host(k.data(), u));
    }
    r.f0 = f0_;
    if (!fixed_) {
      const double ge = h / m_.gamma, back = m_.gamma / lu_h_;
      std::vector<double> ez(N), err(N);
      for (size_t q = 0; q < N; ++q)
        ez[q] = Z[q] * m_.e[0] + Z[N + q] * m_.e[1] + Z[2 * N + q] * m_.e[2];
      auto filtered = [&](const std::vector<double>& f) {
        for (size_t q = 0; q < N; ++q) err[q] = f[q] * ge + ez[q];
        hlu1_.solve(err.data());
        for (double& x : err) x *= back;
      };
      filtered(f0h_);
      // The loop's own error test (once per solve and after rejections: tensors are fine).
      if (recheck && step_error(o_, u, r.unew, from_host(err.data(), u)).first > 1.0) {
        for (size_t q = 0; q < N; ++q) z[q] = uh_[q] + err[q];
        filtered(to_host(eval_f(f_, t, from_host(z.data(), u), stats_)));
      }
      r.err = from_host(err.data(), u);
    }
    return true;
  }

  const Radau5& m_;
  const Dynamics& f_;
  const SolveOptions& o_;
  Stats& stats_;
  bool track_;
  bool dual_ = false;
  bool fixed_ = false;
  int max_newton_ = kMaxNewton;
  double kappa_ = 0.03;
  JacLayout layout_;   // n == 0 until the first step
  bool host_ = false;  // stage algebra on host doubles (use_host)

  torch::Tensor J_, f0_;  // detached
  torch::Tensor stack_like_;
  bool verify_ = true;  // the stacked f is still to be checked against f (eval_stages)
  LU lu1_, lu2_;
  HostLU hlu1_, hlu2_;
  double lu_h_ = 0.0;  // the step the LUs were factored for (0: none)
  bool jac_at_point_ = false;
  bool refresh_J_ = false;
  double eta_ = 1.0, theta_ = 0.0;
  std::vector<double> Jh_, uh_, f0h_;
  // The last accepted step's stages (tensor [3, N] or host 3N values) and size, and the current
  // attempt's, promoted when the loop moves on.
  torch::Tensor prev_Z_, cand_Z_;
  std::vector<double> prev_Zh_, cand_Zh_;
  double prev_h_ = 0.0, cand_h_ = 0.0;
};

}  // namespace

bool is_radau(const std::string& name) { return name == "radau5"; }

const MethodInfo& radau_info(const std::string& name) {
  TORCH_CHECK_VALUE(is_radau(name), "unknown Radau method '", name, "'");
  return radau5().info;
}

std::unique_ptr<Stepper> make_radau(const std::string& name, const Dynamics& f,
                                    const SolveOptions& o, Stats& stats, bool track) {
  TORCH_CHECK_VALUE(is_radau(name), "unknown Radau method '", name, "'");
  return std::make_unique<Radau5Stepper>(f, o, stats, track);
}

}  // namespace stiff
}  // namespace diffeqlayers
