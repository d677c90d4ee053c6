// ESDIRK methods (singly diagonally implicit Runge-Kutta with an explicit first stage):
// kvaerno5 (Kvaerno 2004, order 5(4)), kencarp4 (Kennedy & Carpenter 2003, ARK4(3)6L[2]SA, also
// as an IMEX method on split problems) and trbdf2 (Bank et al. 1985 / Hosea & Shampine 1996).
//
// Every implicit stage z - h gamma f(t_i, z) = psi_i is solved by a simplified Newton iteration
// with the iteration matrix W = I - h' gamma J, where J is a Jacobian taken at the start of some
// earlier step and h' the step size W was factored for. J and the LU of W are kept across
// stages and steps: W is refactored when h gamma moved by more than kRefactor relative to h'
// gamma (the iteration still converges with a mismatched W, only more slowly) or when Newton
// converged slowly with a mismatched W; J is refreshed when Newton converged slowly with W
// factored for the step's own h, or failed with a J from an earlier point. A failed Newton
// iteration (divergence, predicted or actual iteration limit) with a fresh J, or a singular W,
// is a step failure: the loop retries with a quarter step.
//
// Gradients (diffeq_rd): the Newton iterations run without grad on detached values. When
// something upstream requires grad, each stage then takes ONE differentiable Newton correction
//   z = z* - W*^-1 (z* - h gamma f(t_i, z*) - psi_i),   W* = I - h gamma J(z*)  (exact, detached)
// from the converged z*, taken as z* + (z - z.detach()): its value is z* itself (so a solve that
// records takes the same steps and values as one that does not, and the discrete adjoint's replay
// from the kept stages is the same map), and its derivative with respect to psi_i and the
// parameters of f is W*^-1 (d psi_i + h gamma df/dp) -- the implicit-function-theorem
// derivative of the stage equation, not that of the iteration. Cost
// under grad: one more Jacobian (n reverse passes through f), one LU and one evaluation of f per
// implicit stage in the forward pass; backward is one pair of triangular solves and one
// vector-Jacobian product of f per stage, with no second-order terms.
#include "solvers/esdirk.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "core/lincomb.h"
#include "integrate/tape.h"
#include "solvers/jacobian.h"

namespace diffeqlayers {
namespace stiff {
namespace {

constexpr int kMaxNewton = 10;      // iterations per stage
constexpr double kRefactor = 0.2;   // refactor W when |h gamma / (h' gamma) - 1| exceeds this
constexpr double kSlowTheta = 0.1;  // a contraction rate above this refreshes J next step
constexpr double kKappa = 0.05;     // Newton tolerance, in units of the error test

std::vector<double> row_plus_gamma(const std::vector<double>& a, double gamma) {
  std::vector<double> r = a;
  r.push_back(gamma);
  return r;
}

EsdirkTableau finish(EsdirkTableau t) {
  if (t.b.empty()) t.b = row_plus_gamma(t.a.back(), t.gamma);  // stiffly accurate
  return t;
}

// ---------------------------------------------------------------------------------------------
// Kvaerno5: A. Kvaerno, "Singly diagonally implicit Runge-Kutta methods with an explicit first
// stage", BIT Numer. Math. 44 (2004) 489-502, the 7-stage order-5(4) method (gamma = 0.26); both
// the solution (stage 7) and the embedded solution (stage 6) are stiffly accurate, so the error
// estimate is z_7 - z_6. Numbers (data only) as printed in the tableau of diffrax
// (diffrax/_solver/kvaerno5.py, Apache-2.0), which transcribes the paper.
const EsdirkTableau& kvaerno5() {
  static const EsdirkTableau t = [] {
    EsdirkTableau t;
    t.gamma = 0.26;
    t.a = {
        {},
        {0.26},
        {0.13, 0.84033320996790809},
        {0.22371961478320505, 0.47675532319799699, -0.06470895363112615},
        {0.16648564323248321, 0.10450018841591720, 0.03631482272098715, -0.13090704451073998},
        {0.13855640231268224, 0.0, -0.04245337201752043, 0.02446657898003141, 0.61943039072480676},
        {0.13659751177640291, 0.0, -0.05496908796538376, -0.04118626728321046, 0.62993304899016403,
         0.06962479448202728}};
    t.bhat = row_plus_gamma(t.a[5], t.gamma);
    t.bhat.push_back(0.0);
    t.c = {0.0, 0.52, 1.230333209967908, 0.8957659843500759, 0.43639360985864756, 1.0, 1.0};
    t.info = MethodInfo{"kvaerno5", 5, 4, nullptr,
                        "Kvaerno, BIT 44 (2004) 489-502, ESDIRK 5(4) with 7 stages"};
    return finish(t);
  }();
  return t;
}

// ---------------------------------------------------------------------------------------------
// KenCarp4: C. A. Kennedy and M. H. Carpenter, "Additive Runge-Kutta schemes for
// convection-diffusion-reaction equations", Appl. Numer. Math. 44 (2003) 139-181, ARK4(3)6L[2]SA:
// the ESDIRK (gamma = 1/4, L-stable, stiffly accurate), its explicit companion, the shared
// weights b and bhat, and the dense output b*_j(theta) = sum_k b*_jk theta^k (k = 1..3, table 5
// of the paper's appendix). Numbers (data only) as printed in diffrax/_solver/kencarp4.py
// (Apache-2.0), which transcribes the paper's rationals.
const EsdirkTableau& kencarp4() {
  static EsdirkTableau t = [] {
    EsdirkTableau t;
    t.gamma = 0.25;
    t.a = {{},
           {0.25},
           {8611.0 / 62500.0, -1743.0 / 31250.0},
           {5012029.0 / 34652500.0, -654441.0 / 2922500.0, 174375.0 / 388108.0},
           {15267082809.0 / 155376265600.0, -71443401.0 / 120774400.0, 730878875.0 / 902184768.0,
            2285395.0 / 8070912.0},
           {82889.0 / 524892.0, 0.0, 15625.0 / 83664.0, 69875.0 / 102672.0, -2260.0 / 8211.0}};
    t.ae = {
        {},
        {0.5},
        {13861.0 / 62500.0, 6889.0 / 62500.0},
        {-116923316275.0 / 2393684061468.0, -2731218467317.0 / 15368042101831.0,
         9408046702089.0 / 11113171139209.0},
        {-451086348788.0 / 2902428689909.0, -2682348792572.0 / 7519795681897.0,
         12662868775082.0 / 11960479115383.0, 3355817975965.0 / 11060851509271.0},
        {647845179188.0 / 3216320057751.0, 73281519250.0 / 8382639484533.0,
         552539513391.0 / 3454668386233.0, 3354512671639.0 / 8306763924573.0, 4040.0 / 17871.0}};
    t.bhat = {4586570599.0 / 29645900160.0, 0.0,
              178811875.0 / 945068544.0,    814220225.0 / 1159782912.0,
              -3700637.0 / 11593932.0,      61727.0 / 225920.0};
    t.c = {0.0, 0.5, 83.0 / 250.0, 31.0 / 50.0, 17.0 / 20.0, 1.0};
    t.interpolant.name = "kencarp4";
    t.interpolant.order = 4;
    t.interpolant.dense_order = 3;
    // b*_jk for theta^1, theta^2, theta^3 (diffrax lists each row from theta^3 down).
    t.interpolant.dense = {
        {6943876665148.0 / 7220017795957.0, -54480133.0 / 30881146.0,
         6818779379841.0 / 7100303317025.0},
        {0.0, 0.0, 0.0},
        {7640104374378.0 / 9702883013639.0, -11436875.0 / 14766696.0,
         2173542590792.0 / 12501825683035.0},
        {-20649996744609.0 / 7521556579894.0, 174696575.0 / 18121608.0,
         -31592104683404.0 / 5083833661969.0},
        {8854892464581.0 / 2390941311638.0, -12120380.0 / 966161.0,
         61146701046299.0 / 7138195549469.0},
        {-11397109935349.0 / 6675773540249.0, 3843.0 / 706.0, -17219254887155.0 / 4939391667607.0}};
    t.info = MethodInfo{"kencarp4", 4, 3, nullptr,
                        "Kennedy & Carpenter, Appl. Numer. Math. 44 (2003) 139-181, "
                        "ARK4(3)6L[2]SA (ESDIRK and explicit companion, own dense output)"};
    return finish(t);
  }();
  static const bool linked = [] {
    t.info.interpolant = &t.interpolant;
    return true;
  }();
  (void)linked;
  return t;
}

// ---------------------------------------------------------------------------------------------
// TR-BDF2: R. E. Bank et al., IEEE Trans. CAD 4 (1985); as an ESDIRK with gamma = 2 - sqrt 2 and
// diagonal d = gamma / 2 (M. E. Hosea and L. F. Shampine, "Analysis and implementation of
// TR-BDF2", Appl. Numer. Math. 20 (1996) 21-37): a trapezoidal stage to t + gamma h, then BDF2,
//   c = (0, gamma, 1), a_2 = (d, d), a_3 = (w, w, d), w = sqrt 2 / 4, b = a_3 (L-stable, order 2),
// with their third-order embedded weights bhat = ((1 - w)/3, (3w + 1)/3, d/3).
const EsdirkTableau& trbdf2() {
  static const EsdirkTableau t = [] {
    EsdirkTableau t;
    const double gamma = 2.0 - std::sqrt(2.0), d = gamma / 2.0, w = std::sqrt(2.0) / 4.0;
    t.gamma = d;
    t.a = {{}, {d}, {w, w}};
    t.bhat = {(1.0 - w) / 3.0, (3.0 * w + 1.0) / 3.0, d / 3.0};
    t.filter_error = true;
    t.c = {0.0, gamma, 1.0};
    t.info = MethodInfo{"trbdf2", 2, 3, nullptr,
                        "Bank et al. 1985; Hosea & Shampine, Appl. Numer. Math. 20 (1996) "
                        "21-37 (gamma = 2 - sqrt 2, third-order embedded estimate)"};
    return finish(t);
  }();
  return t;
}

class EsdirkStepper : public Stepper {
 public:
  EsdirkStepper(const EsdirkTableau& m, const Dynamics& f, const SolveOptions& o, Stats& stats,
                bool track)
      : m_(m), f_(f), o_(o), stats_(stats), track_(track) {
    split_ = static_cast<bool>(o.nonstiff) && !m.ae.empty();
    // Newton stops when its estimated error is below kappa in the units of the error test
    // (atol + rtol |u|); at tiny rtol no tighter than ten roundoffs of u.
    // Fixed steps have no smaller step to fall back on: iterate longer, fail only on divergence.
    fixed_ = !(o.adaptive && m.info.adaptive());
    max_newton_ = fixed_ ? 50 : kMaxNewton;
    kappa_ = o.rtol > 0 ? std::max(kKappa, 10.0 * std::numeric_limits<double>::epsilon() / o.rtol)
                        : kKappa;
  }
  const MethodInfo& info() const override { return m_.info; }

  // The discrete adjoint: the step again from the stage derivatives k_1..k_s the forward solve
  // kept (kencarp4: its dense terms; kvaerno5, trbdf2: after the Hermite interpolant's two f
  // values; a split kencarp4 step: the implicit part's k_i after the dense terms, whose k_i + g_i
  // do not give the stages apart), each stage taking the exact Newton correction diffeq_rd's
  // forward pass takes, so the step's derivative is diffeq_rd's. A split step evaluates the
  // explicit part again at u and at every stage, recorded.
  StepResult replay(double t, const torch::Tensor& u, double h,
                    const std::vector<torch::Tensor>& kept) override {
    const size_t offset = split_ ? m_.stages() : m_.interpolant.dense.empty() ? 2 : 0;
    TORCH_CHECK(kept.size() == offset + m_.stages(), m_.info.name,
                ": the forward solve kept no stages to replay the step from");
    const std::vector<torch::Tensor> stages(kept.begin() + static_cast<std::ptrdiff_t>(offset),
                                            kept.end());
    if (!layout_.n) layout_ = jac_layout(o_, u);
    host_ = false;
    dual_ = false;
    f0_ = eval(t, u, /*grad=*/true);
    g0_ = split_ ? eval_g(t, u) : torch::Tensor();
    given_ = &stages;
    StepResult r;
    std::string why;
    const bool ok = try_step(t, u, h, r, why);
    given_ = nullptr;
    if (!ok) {
      r = StepResult();
      r.failure = why;
    }
    return r;
  }

  StepResult step(double t, const torch::Tensor& u, double h, bool new_point) override {
    if (!layout_.n) {
      layout_ = jac_layout(o_, u);
      host_ = use_host(u, layout_, track_);
    }
    if (new_point || !f0_.defined()) {
      jac_at_point_ = false;
      f0_ = torch::Tensor();
      const bool u_dual = is_dual(u);
      // Gives f0 too (without track, and not for a dual u: J is taken at its primal).
      if (!J_.defined() || refresh_J_) take_jacobian(t, u);
      // (dual_ is the previous point's here: once tangents are known to flow, f0 is evaluated
      // with them, the Jacobian without.)
      if (!f0_.defined()) f0_ = eval(t, u, /*grad=*/track_ || u_dual || dual_);
      // Forward mode: u or the parameters carry tangents (see try_step's Newton correction).
      dual_ = !track_ && (u_dual || is_dual(f0_));
      if (dual_) host_ = false;
      g0_ = split_ ? eval_g(t, u) : torch::Tensor();
      if (host_) {
        uh_ = to_host(u);
        f0h_ = to_host(f0_);
        if (split_) g0h_ = to_host(g0_);
      }
    }
    StepResult r;
    const double hg = h * m_.gamma;
    bool refactored = false, fresh_J = jac_at_point_;
    for (;;) {
      std::string why;
      if (host_ ? try_step_host(t, u, h, r, why) : try_step(t, u, h, r, why)) return r;
      // A failed Newton iteration is retried as after_stages() treats slow convergence: first
      // with W factored for exactly this h (a W kept from a step size within kRefactor slows
      // the iteration by itself), then with a Jacobian taken at this point.
      if (!refactored && lu_hg_ != 0.0 && lu_hg_ != hg) {
        refactored = true;
        force_refactor_ = true;
      } else if (!fresh_J) {
        fresh_J = true;
        take_jacobian(t, u);
      } else {
        r = StepResult();
        r.failure = why;
        return r;
      }
    }
  }

 private:
  // The stages for replay() beside the dense output's terms: kvaerno5 and trbdf2 interpolate by
  // Hermite; kencarp4's dense terms are its stages, except for a split step (k_i + g_i), which
  // keeps the implicit part's k_i.
  bool keeps_stages() const { return o_.keep_stages && (split_ || m_.interpolant.dense.empty()); }

  torch::Tensor eval(double t, const torch::Tensor& z, bool grad) {
    if (grad) return eval_f(f_, t, z, stats_);
    at::NoGradGuard g;
    // Primal values only: with dual parameters f's value would carry a tangent, which the
    // Newton iteration does not need (the correction in try_step gives the stage its tangent).
    PrimalOnly primal;
    return eval_f(f_, t, z.detach(), stats_).detach();
  }
  torch::Tensor eval_g(double t, const torch::Tensor& z) {
    return detail::checked_eval(o_.nonstiff, t, z, stats_.nfe);
  }

  // J at (t, u), detached; refactoring follows. Gives f0 too, except where tangents are known to
  // flow (dual_, from an earlier point): J is then taken on primal values only (PrimalOnly; the
  // Newton matrix needs no tangent) and step() evaluates f0 with its tangent. The first point's
  // Jacobian finds out, from f's value, whether the parameters carry tangents.
  void take_jacobian(double t, const torch::Tensor& u) {
    PrimalOnly primal(dual_);
    PointDerivatives d = derivatives(f_, o_, t, u.detach(), /*track=*/false, stats_,
                                     /*with_ft=*/false);
    J_ = d.J.detach();  // the Newton matrix: primal values only
    if (host_) Jh_ = to_host(J_);
    if (!track_ && !is_dual(u) && !dual_) f0_ = d.dual ? d.f0 : d.f0.detach();
    jac_at_point_ = true;
    refresh_J_ = false;
    lu_hg_ = 0.0;  // refactor
  }

  bool ensure_lu(double hg) {
    if (!force_refactor_ && lu_hg_ != 0.0 && std::abs(hg / lu_hg_ - 1.0) <= kRefactor) return true;
    force_refactor_ = false;
    const bool ok = host_ ? hlu_.factor(Jh_, layout_.blocks, layout_.n, 1.0, -hg, stats_)
                          : lu_.factor(J_, 1.0, -hg, stats_);
    lu_hg_ = ok ? hg : 0.0;
    return ok;
  }

  double norm(const torch::Tensor& x) const {
    return (x * inv_scale_).pow(2).mean().sqrt().item<double>();
  }

  // The contraction bookkeeping of one Newton iteration with update norm nd (Hairer & Wanner
  // II, IV.8): 1 converged, 0 continue, -1 failed (why set).
  int newton_check(int it, double nd, double& prev, std::string& why) {
    if (!std::isfinite(nd)) {
      why = "the Newton iteration produced a non-finite state";
      return -1;
    }
    if (it > 0) {
      double theta = 0.0;
      const bool ok = newton_rate_ok(it, nd, prev, max_newton_, kappa_, fixed_, theta, why);
      theta_max_ = std::max(theta_max_, theta);
      if (!ok) return -1;
      eta_ = theta / (1.0 - theta);
    }
    // The first update of a stage is judged by itself: the rate carried over from earlier
    // stages says little about this stage's predictor, and an unconverged stiff component
    // passes straight into the error estimate (ROBER then crawls at steps far below the
    // accuracy's need). The first rate (second update over first) is trusted only when the
    // second update is itself within the error test (nd <= 1): a large first update is mostly
    // components that one iteration settles, while a stiff remainder may contract slowly with a
    // Jacobian from an earlier point. On ROBER at t = 1 (trbdf2, rtol 1e-6) the first rate read
    // 0.006 where the iteration went on at 0.6, leaving 0.9 of the error test unconverged in y2;
    // the estimate then held the step at 8e-4 and the solve took 9159 steps instead of ~1000.
    const double est = it == 0 ? nd : (it == 1 && nd > 1.0 ? HUGE_VAL : eta_ * nd);
    if (nd == 0.0 || est <= kappa_) return 1;
    prev = nd;
    return 0;
  }

  // Simplified Newton for z - hg f(ti, z) = psi from the predictor z (detached, overwritten).
  bool newton(double ti, double hg, const torch::Tensor& psi, torch::Tensor& z, std::string& why) {
    at::NoGradGuard g;
    eta_ = std::pow(std::max(eta_, std::numeric_limits<double>::epsilon()), 0.8);
    double prev = 0.0;
    for (int it = 0; it < max_newton_; ++it) {
      // Primal values (eval detaches): with dual parameters f's value carries a tangent, which
      // the iteration does not need (the correction gives the stage its tangent).
      torch::Tensor fz = eval(ti, z, /*grad=*/false);
      torch::Tensor G = z - hg * fz - psi;
      torch::Tensor dz = lu_.solve(G).neg_();
      z = z + dz;
      const int state = newton_check(it, norm(dz), prev, why);
      if (state != 0) return state > 0;
    }
    why = "the Newton iteration did not converge in " + std::to_string(max_newton_) + " iterations";
    return false;
  }

  // Forward mode (no recording): the exact correction's tangent from the tangents as plain
  // tensors. With M = I - hg J(z*), the stage's tangent is M^-1 (psi' + hg f'), f' the tangent
  // of f(t, z*) through the parameters alone (z* evaluated without one); then k = (z - psi) / hg
  // on primals and tangents apart. The same values as the correction on dual tensors in
  // try_step (z keeps its converged value), without its arithmetic on duals: in torch 2.13's
  // forward AD an op on a dual tensor costs 150-370 us, a plain one about 4 us. fz: f(t, z*),
  // z* the converged stage (no tangent). False (nothing changed) where a tangent's layout is not
  // handled: the caller takes the dual ops.
  bool tangent_correction(double hg, const LU& exact, const torch::Tensor& psi,
                          const torch::Tensor& fz, torch::Tensor& z, torch::Tensor& k) {
    const torch::Tensor zp = z.detach();
    SplitDuals sd;
    if (!split_duals({psi, fz}, sd)) return false;
    const torch::Tensor &psi_t = sd.tangents[0], &fz_t = sd.tangents[1];
    torch::Tensor rhs = psi_t;
    if (fz_t.defined()) rhs = rhs.defined() ? rhs + hg * fz_t : hg * fz_t;
    const torch::Tensor kp = (zp - sd.primals[0]) / hg;
    if (!rhs.defined()) {  // no tangent reaches this stage
      z = zp;
      k = kp;
      return true;
    }
    const torch::Tensor zt = sd.level >= 0 ? exact.solve_batch(rhs, sd.batch) : exact.solve(rhs);
    const torch::Tensor kt = (psi_t.defined() ? zt - psi_t : zt) / hg;
    z = make_dual(zp, zt, sd.level);
    k = make_dual(kp, kt, sd.level);
    return true;
  }

  // The same iteration on host doubles (use_host): like_ gives f's argument its shape and dtype.
  bool newton_host(double ti, double hg, const std::vector<double>& psi, std::vector<double>& z,
                   const torch::Tensor& like, std::string& why) {
    at::NoGradGuard g;
    eta_ = std::pow(std::max(eta_, std::numeric_limits<double>::epsilon()), 0.8);
    const size_t N = z.size();
    std::vector<double> dz(N);
    double prev = 0.0;
    for (int it = 0; it < max_newton_; ++it) {
      const std::vector<double> fz = to_host(eval_f(f_, ti, from_host(z.data(), like), stats_));
      for (size_t i = 0; i < N; ++i) dz[i] = psi[i] + hg * fz[i] - z[i];  // -(z - hg f - psi)
      hlu_.solve(dz.data());
      double ss = 0.0;
      for (size_t i = 0; i < N; ++i) {
        z[i] += dz[i];
        const double s = dz[i] * inv_scale_h_[i];
        ss += s * s;
      }
      const double nd = N ? std::sqrt(ss / static_cast<double>(N)) : 0.0;
      const int state = newton_check(it, nd, prev, why);
      if (state != 0) return state > 0;
    }
    why = "the Newton iteration did not converge in " + std::to_string(max_newton_) + " iterations";
    return false;
  }

  // After the stages: slow convergence first refactors W for the current step size (a
  // mismatched h explains a contraction of about |h / h' - 1|); slow again with W factored for
  // exactly this h: new J.
  void after_stages(double hg) {
    if (theta_max_ > kSlowTheta) {
      if (hg == lu_hg_)
        refresh_J_ = true;
      else
        force_refactor_ = true;
    }
  }

  bool try_step(double t, const torch::Tensor& u, double h, StepResult& r, std::string& why) {
    const double hg = h * m_.gamma;
    if (!given_ && !ensure_lu(hg)) {
      why = "the iteration matrix I - h gamma J is singular";
      return false;
    }
    {
      at::NoGradGuard g;
      torch::Tensor ua = u.detach().abs();
      inv_scale_ = (ua * o_.rtol + o_.atol).reciprocal();
    }
    theta_max_ = 0.0;
    const size_t s = m_.stages();
    std::vector<torch::Tensor> k(s), gk(s);
    k[0] = f0_;
    if (split_) gk[0] = g0_;
    torch::Tensor z;
    for (size_t i = 1; i < s; ++i) {
      const double ti = t + m_.c[i] * h;
      std::vector<torch::Tensor> terms;
      std::vector<double> w;
      for (size_t j = 0; j < i; ++j) {
        if (m_.a[i][j] != 0.0) {
          terms.push_back(k[j]);
          w.push_back(h * m_.a[i][j]);
        }
        if (split_ && m_.ae[i][j] != 0.0) {
          terms.push_back(gk[j]);
          w.push_back(h * m_.ae[i][j]);
        }
      }
      torch::Tensor psi = lincomb(u, terms, w);
      torch::Tensor psid = psi.detach();
      // Predictor: the previous stage value (u for the first implicit stage). Explicit
      // extrapolations (psi + h gamma k_{i-1}) start far off on ROBER and Van der Pol and make
      // Newton fail or crawl at large steps; the previous stage is robust there.
      z = i == 1 ? u.detach() : z.detach();
      if (given_) {
        // replay(): the forward's converged stage, z_i = psi_i + h gamma k_i from its own k's.
        at::NoGradGuard g;
        std::vector<torch::Tensor> kept;
        std::vector<double> wk;
        for (size_t j = 0; j < i; ++j) {
          if (m_.a[i][j] != 0.0) {
            kept.push_back((*given_)[j]);
            wk.push_back(h * m_.a[i][j]);
          }
          if (split_ && m_.ae[i][j] != 0.0) {  // the explicit part, evaluated again
            kept.push_back(gk[j].detach());
            wk.push_back(h * m_.ae[i][j]);
          }
        }
        kept.push_back((*given_)[i]);
        wk.push_back(hg);
        z = lincomb(u.detach(), kept, wk);
      } else if (!newton(ti, hg, psid, z, why)) {
        eta_ = 1.0;
        return false;
      }
      bool k_done = false;  // the tangent correction gives k_i with z
      if (track_ || dual_) {
        // One differentiable Newton correction with the exact Jacobian at the converged z*: its
        // derivative (reverse mode through the graph, or the tangent of dual values) is the
        // implicit function theorem's, -W^-1 dG, since G(z*) = 0 to Newton's tolerance.
        // J on primal values (its tangent would not be used: forward-over-reverse per row
        // made forward mode through ESDIRK 10-15x diffeq_rd's time), f with its tangent.
        PointDerivatives d;
        {
          PrimalOnly primal;
          d = derivatives(f_, o_, ti, z, /*track=*/false, stats_, /*with_ft=*/false);
        }
        LU exact;
        if (!exact.factor(d.J.detach(), 1.0, -hg, stats_)) {
          why = "the iteration matrix I - h gamma J(z) at a converged stage is singular";
          return false;
        }
        const torch::Tensor fz = eval(ti, z, /*grad=*/true);
        k_done = !track_ && tangent_correction(hg, exact, psi, fz, z, k[i]);
        if (!k_done) {
          // Value z* exactly (the solve's values do not depend on whether it records), the
          // correction's derivative.
          const torch::Tensor zc = z - exact.solve(z - hg * fz - psi);
          z = z.detach() + (zc - zc.detach());
        }
      }
      if (!k_done) k[i] = (z - psi) / hg;
      if (split_) gk[i] = eval_g(ti, z);
    }
    after_stages(hg);

    std::vector<torch::Tensor> kk(s);
    for (size_t j = 0; j < s; ++j) kk[j] = split_ ? k[j] + gk[j] : k[j];
    {
      std::vector<torch::Tensor> terms;
      std::vector<double> w;
      for (size_t j = 0; j < s; ++j)
        if (m_.b[j] != 0.0) {
          terms.push_back(kk[j]);
          w.push_back(h * m_.b[j]);
        }
      // Stiffly accurate without an explicit part: u_new is the last stage itself.
      r.unew = split_ ? lincomb(u, terms, w) : z;
    }
    if (!given_) {
      at::NoGradGuard g;
      std::vector<torch::Tensor> terms;
      std::vector<double> w;
      for (size_t j = 0; j < s; ++j)
        if (m_.b[j] != m_.bhat[j]) {
          terms.push_back(kk[j].detach());
          w.push_back(h * (m_.b[j] - m_.bhat[j]));
        }
      r.err = lincomb(torch::Tensor(), terms, w);
      // trbdf2: the estimate filtered through W^-1 = (I - h gamma J)^-1 (Shampine's device for
      // stiff problems; unfiltered, stiff components inflate it and ROBER crawls at h ~ 1e-2).
      if (m_.filter_error) r.err = lu_.solve(r.err);
    }
    r.f0 = kk[0];
    if (!m_.interpolant.dense.empty()) r.dense_terms = kk;
    if (keeps_stages()) r.stages = split_ ? k : kk;
    return true;
  }

  // try_step on host doubles (use_host: no grad, CPU, small blocks), the same arithmetic.
  bool try_step_host(double t, const torch::Tensor& u, double h, StepResult& r, std::string& why) {
    at::NoGradGuard g;
    const double hg = h * m_.gamma;
    if (!ensure_lu(hg)) {
      why = "the iteration matrix I - h gamma J is singular";
      return false;
    }
    const size_t N = uh_.size();
    inv_scale_h_.resize(N);
    for (size_t i = 0; i < N; ++i) inv_scale_h_[i] = 1.0 / (std::abs(uh_[i]) * o_.rtol + o_.atol);
    theta_max_ = 0.0;
    const size_t s = m_.stages();
    std::vector<std::vector<double>> k(s), gk(s);
    k[0] = f0h_;
    if (split_) gk[0] = g0h_;
    std::vector<double> z = uh_, psi(N);
    for (size_t i = 1; i < s; ++i) {
      const double ti = t + m_.c[i] * h;
      psi = uh_;
      for (size_t j = 0; j < i; ++j) {
        const double w = h * m_.a[i][j];
        if (w != 0.0)
          for (size_t q = 0; q < N; ++q) psi[q] += w * k[j][q];
        if (split_ && m_.ae[i][j] != 0.0) {
          const double we = h * m_.ae[i][j];
          for (size_t q = 0; q < N; ++q) psi[q] += we * gk[j][q];
        }
      }
      // Predictor: the previous stage value (u for the first implicit stage), as in try_step.
      if (!newton_host(ti, hg, psi, z, u, why)) {
        eta_ = 1.0;
        return false;
      }
      k[i].resize(N);
      for (size_t q = 0; q < N; ++q) k[i][q] = (z[q] - psi[q]) / hg;
      if (split_) gk[i] = to_host(eval_g(ti, from_host(z.data(), u)));
    }
    after_stages(hg);

    if (keeps_stages() && split_)  // the implicit part's, before the sum below
      for (size_t j = 0; j < s; ++j) r.stages.push_back(from_host(k[j].data(), u));
    if (split_)
      for (size_t j = 0; j < s; ++j)
        for (size_t q = 0; q < N; ++q) k[j][q] += gk[j][q];
    std::vector<double> unew = z, err(N, 0.0);
    if (split_) {
      unew = uh_;
      for (size_t j = 0; j < s; ++j)
        if (m_.b[j] != 0.0)
          for (size_t q = 0; q < N; ++q) unew[q] += h * m_.b[j] * k[j][q];
    }
    for (size_t j = 0; j < s; ++j)
      if (m_.b[j] != m_.bhat[j])
        for (size_t q = 0; q < N; ++q) err[q] += h * (m_.b[j] - m_.bhat[j]) * k[j][q];
    if (m_.filter_error) hlu_.solve(err.data());
    r.unew = from_host(unew.data(), u);
    r.err = from_host(err.data(), u);
    r.f0 = from_host(k[0].data(), u);
    if (!m_.interpolant.dense.empty()) {
      r.dense_terms.reserve(s);
      for (size_t j = 0; j < s; ++j) r.dense_terms.push_back(from_host(k[j].data(), u));
    }
    if (keeps_stages() && !split_)
      for (size_t j = 0; j < s; ++j) r.stages.push_back(from_host(k[j].data(), u));
    return true;
  }

  const EsdirkTableau& m_;
  const Dynamics& f_;
  const SolveOptions& o_;
  Stats& stats_;
  bool track_;
  bool dual_ = false;  // forward mode: tangents on u or the parameters
  bool split_ = false;
  double kappa_ = 0.03;
  JacLayout layout_;   // n == 0 until the first step
  bool host_ = false;  // stage algebra on host doubles (use_host)

  torch::Tensor J_;     // detached Jacobian, from the start of some step
  LU lu_;               // of I - lu_hg_ J_
  double lu_hg_ = 0.0;  // 0: no valid factorization
  bool jac_at_point_ = false;
  bool refresh_J_ = false;
  torch::Tensor f0_, g0_;  // f and g at the current point
  torch::Tensor inv_scale_;
  // The host path's copies: J_, its LU, u, f0, g0 and the Newton norm's weights.
  std::vector<double> Jh_, uh_, f0h_, g0h_, inv_scale_h_;
  HostLU hlu_;
  double eta_ = 1.0;
  double theta_max_ = 0.0;
  bool force_refactor_ = false;
  bool fixed_ = false;
  int max_newton_ = kMaxNewton;
  const std::vector<torch::Tensor>* given_ = nullptr;  // replay(): the forward's stages
};

}  // namespace

bool is_esdirk(const std::string& name) {
  return name == "kvaerno5" || name == "kencarp4" || name == "trbdf2";
}

const EsdirkTableau& esdirk_tableau(const std::string& name) {
  if (name == "kvaerno5") return kvaerno5();
  if (name == "kencarp4") return kencarp4();
  TORCH_CHECK_VALUE(name == "trbdf2", "unknown ESDIRK method '", name, "'");
  return trbdf2();
}

std::unique_ptr<Stepper> make_esdirk(const std::string& name, const Dynamics& f,
                                     const SolveOptions& o, Stats& stats, bool track) {
  return std::make_unique<EsdirkStepper>(esdirk_tableau(name), f, o, stats, track);
}

}  // namespace stiff
}  // namespace diffeqlayers
