// Fixed-step implicit Runge-Kutta methods, torchdiffeq's fixed-grid implicit solvers:
// implicit_euler, implicit_midpoint, trapezoid, radauIIA3, radauIIA5, gl4, gl6, sdirk2 and
// fixed_trbdf2 (odeint's "trbdf2"; solve()'s "trbdf2" is the adaptive ESDIRK method).
//
// One generic step for every tableau (c, A, b): the stage increments Z_i = h sum_j a_ij
// f(t + c_j h, u + Z_j), stacked [s, n] over the flattened state, solve G(Z) = Z - h (A x I) F(Z)
// = 0 by simplified Newton: the iteration matrix I - h (A x J) with J = df/du at the step's start
// (autograd, or SolveOptions::jac) is factorized once per step, and each iteration costs s
// evaluations of f and one LU solve. The iteration starts from Z_i = h c_i f(t, u) and stops when
// the RMS norm of the Newton update scaled by atol + rtol |u| falls below 1e-2 (at most
// SolveOptions::max_iters iterations, whose default of 4 suits Adams; Python's solve() and
// odeint use 10 here; a step that does not converge keeps the last iterate and counts in
// Stats::nnonconverged, as torchdiffeq warns and goes on). The new state is u + h sum_i b_i F_i,
// or u + Z_s for stiffly accurate tableaus (b = last row of A). torchdiffeq solves the same
// stage equations by Broyden's method from an identity Jacobian instead: the two agree to the
// iteration tolerance, not to rounding. Cost per step: one Jacobian (n reverse passes, plus two
// evaluations of f for df/dt, which these methods do not use), one LU of size s n, s
// evaluations of f per iteration, and s more at the end unless the tableau is stiffly accurate.
//
// Under grad mode the iterations are recorded by autograd (with `track`, J's own dependence on u
// and the parameters too), so diffeq_rd differentiates the discrete solve. Forward mode (dual u or
// parameters: diffeq_fd, diffeq_jvp) iterates on primal values and then takes one exact Newton
// correction (newton_correction, jacobian.h: s Jacobians, s evaluations of f and an LU of size
// s n more per step, and s more evaluations for the new state unless stiffly accurate), whose
// tangent is the implicit function theorem's for the converged stage equations: forward and
// reverse mode agree to the iteration's tolerance (reverse mode differentiates the iteration as
// it ran), not to rounding; their values are the iteration's in both.
#include <cmath>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/host_copy.h"
#include "core/lincomb.h"
#include "solvers/jacobian.h"
#include "solvers/stiff.h"

namespace diffeqlayers {
namespace stiff {
namespace {

struct ImplicitTableau {
  MethodInfo info;
  std::vector<double> c;
  std::vector<std::vector<double>> a;  // full s x s
  std::vector<double> b;
  bool stiffly_accurate = false;  // b equals the last row of A: u_new = u + Z_s
  bool explicit_first = false;    // first row of A is zero: Z_1 = 0, F_1 = f(t, u)
};

ImplicitTableau make(const std::string& name, int order, std::vector<double> c,
                     std::vector<std::vector<double>> a, std::vector<double> b,
                     const std::string& reference) {
  ImplicitTableau t;
  t.info = MethodInfo{name, order, 0, nullptr, reference, true};
  t.c = std::move(c);
  t.a = std::move(a);
  t.b = std::move(b);
  const size_t s = t.c.size();
  TORCH_INTERNAL_ASSERT(t.a.size() == s && t.b.size() == s, name, ": tableau sizes differ");
  double bsum = 0.0;
  for (size_t i = 0; i < s; ++i) {
    TORCH_INTERNAL_ASSERT(t.a[i].size() == s, name, ": A is not square");
    double row = 0.0;
    for (double x : t.a[i]) row += x;
    TORCH_INTERNAL_ASSERT(std::abs(row - t.c[i]) < 1e-14, name, ": row ", i, " of A sums to ", row,
                          ", not c = ", t.c[i]);
    bsum += t.b[i];
  }
  TORCH_INTERNAL_ASSERT(std::abs(bsum - 1.0) < 1e-14, name, ": b sums to ", bsum);
  t.stiffly_accurate = true;
  for (size_t j = 0; j < s; ++j) t.stiffly_accurate &= t.a[s - 1][j] == t.b[j];
  t.explicit_first = true;
  for (double x : t.a[0]) t.explicit_first &= x == 0.0;
  return t;
}

// Coefficients: Hairer & Wanner, Solving Ordinary Differential Equations II, 2nd ed., Section
// IV.5: Table 5.1 (Gauss methods of orders 4 and 6), Table 5.5 (Radau IIA of order 3), Table 5.6
// (Radau IIA of order 5); the trapezoidal rule is the 2-stage Lobatto IIIA (Table 5.7). sdirk2:
// R. Alexander, SIAM J. Numer. Anal. 14(6) 1977, the 2-stage L-stable SDIRK with
// gamma = 1 - sqrt(2)/2. TR-BDF2: Hosea & Shampine, Appl. Numer. Math. 20 (1996), the ESDIRK form
// with d = 1 - sqrt(2)/2 (c2 = 2d), w = sqrt(2)/4.
const std::map<std::string, ImplicitTableau>& registry() {
  static const std::map<std::string, ImplicitTableau> reg = [] {
    std::map<std::string, ImplicitTableau> r;
    auto add = [&r](ImplicitTableau t) { r.emplace(t.info.name, std::move(t)); };
    const double s2 = std::sqrt(2.0), s3 = std::sqrt(3.0), s6 = std::sqrt(6.0),
                 s15 = std::sqrt(15.0);
    add(make("implicit_euler", 1, {1.0}, {{1.0}}, {1.0}, "backward Euler"));
    add(make("implicit_midpoint", 2, {0.5}, {{0.5}}, {1.0}, "Gauss, 1 stage (HW II, IV.5)"));
    add(make("trapezoid", 2, {0.0, 1.0}, {{0.0, 0.0}, {0.5, 0.5}}, {0.5, 0.5},
             "Lobatto IIIA, 2 stages (HW II, Table IV.5.7)"));
    add(make("gl4", 4, {0.5 - s3 / 6, 0.5 + s3 / 6}, {{0.25, 0.25 - s3 / 6}, {0.25 + s3 / 6, 0.25}},
             {0.5, 0.5}, "Gauss, 2 stages (HW II, Table IV.5.1)"));
    add(make("gl6", 6, {0.5 - s15 / 10, 0.5, 0.5 + s15 / 10},
             {{5.0 / 36, 2.0 / 9 - s15 / 15, 5.0 / 36 - s15 / 30},
              {5.0 / 36 + s15 / 24, 2.0 / 9, 5.0 / 36 - s15 / 24},
              {5.0 / 36 + s15 / 30, 2.0 / 9 + s15 / 15, 5.0 / 36}},
             {5.0 / 18, 4.0 / 9, 5.0 / 18}, "Gauss, 3 stages (HW II, Table IV.5.1)"));
    add(make("radauIIA3", 3, {1.0 / 3, 1.0}, {{5.0 / 12, -1.0 / 12}, {0.75, 0.25}}, {0.75, 0.25},
             "Radau IIA, 2 stages (HW II, Table IV.5.5)"));
    add(make("radauIIA5", 5, {(4.0 - s6) / 10, (4.0 + s6) / 10, 1.0},
             {{(88.0 - 7.0 * s6) / 360, (296.0 - 169.0 * s6) / 1800, (-2.0 + 3.0 * s6) / 225},
              {(296.0 + 169.0 * s6) / 1800, (88.0 + 7.0 * s6) / 360, (-2.0 - 3.0 * s6) / 225},
              {(16.0 - s6) / 36, (16.0 + s6) / 36, 1.0 / 9}},
             {(16.0 - s6) / 36, (16.0 + s6) / 36, 1.0 / 9},
             "Radau IIA, 3 stages (HW II, Table IV.5.6)"));
    const double g = 1.0 - s2 / 2;
    add(make("sdirk2", 2, {g, 1.0}, {{g, 0.0}, {1.0 - g, g}}, {1.0 - g, g},
             "Alexander 1977, 2-stage L-stable SDIRK"));
    const double d = 1.0 - s2 / 2, w = s2 / 4;
    add(make("fixed_trbdf2", 2, {0.0, 2.0 * d, 1.0}, {{0, 0, 0}, {d, d, 0}, {w, w, d}}, {w, w, d},
             "TR-BDF2 (Bank et al. 1985) in Hosea & Shampine's ESDIRK form, fixed steps"));
    return r;
  }();
  return reg;
}

class ImplicitRK : public Stepper {
 public:
  ImplicitRK(const ImplicitTableau& tab, const Dynamics& f, const SolveOptions& o, Stats& stats,
             bool track)
      : tab_(tab), f_(f), o_(o), stats_(stats), track_(track) {}

  const MethodInfo& info() const override { return tab_.info; }

  StepResult step(double t, const torch::Tensor& u, double h, bool /*new_point*/) override {
    StepResult r;
    const int64_t s = static_cast<int64_t>(tab_.c.size());
    const int64_t n = u.numel();
    // Forward mode (u or f's parameters carry tangents): the iteration runs on primal values and
    // one exact Newton correction gives the stages their tangents (newton_correction).
    const bool u_dual = !track_ && is_dual(u);
    // One dense Jacobian (the Kronecker product below needs the whole matrix); no df/dt (the
    // Newton iteration does not use it: two evaluations of f saved per step).
    const PointDerivatives d = derivatives(f_, o_, t, u_dual ? u.detach() : u, track_, stats_,
                                           /*with_ft=*/false, /*allow_blocks=*/false);
    bool dual = u_dual || d.dual;
    r.f0 = d.f0.reshape(u.sizes());
    torch::Tensor f0 = dual ? d.f0.detach().reshape({-1}) : d.f0.reshape({-1});
    torch::Tensor uflat = dual ? u.detach().reshape({-1}) : u.reshape({-1});
    auto eval = [&](double ti, const torch::Tensor& z) {
      PrimalOnly primal(dual);  // the iteration needs no tangents
      const torch::Tensor v = eval_f(f_, ti, z.reshape(u.sizes()), stats_).reshape({-1});
      return dual ? v.detach() : v;
    };
    // F_i = f(t + c_i h, u + Z_i) at every implicit stage (F_0 = f0 when the first is explicit):
    // one call of SolveOptions::stacked for two or more stages when given (recorded like f).
    const int64_t first = tab_.explicit_first ? 1 : 0;
    auto eval_all = [&](const torch::Tensor& base, const std::vector<torch::Tensor>& Z,
                        std::vector<torch::Tensor>& F) {
      if (first) F[0] = f0;
      if (!o_.stacked || s - first < 2) {
        for (int64_t i = first; i < s; ++i) {
          const size_t si = static_cast<size_t>(i);
          F[si] = eval(t + tab_.c[si] * h, base + Z[si]);
        }
        return;
      }
      std::vector<double> ts;
      std::vector<torch::Tensor> zs;
      for (int64_t i = first; i < s; ++i) {
        const size_t si = static_cast<size_t>(i);
        ts.push_back(t + tab_.c[si] * h);
        zs.push_back((base + Z[si]).reshape(u.sizes()));
      }
      PrimalOnly primal(dual);
      torch::Tensor Fs = eval_stages(f_, o_, ts, at::stack(zs), stats_, verify_);
      if (dual) Fs = Fs.detach();
      for (int64_t i = first; i < s; ++i) F[static_cast<size_t>(i)] = Fs[i - first].reshape({-1});
    };

    std::vector<double> a_flat;
    for (const auto& row : tab_.a) a_flat.insert(a_flat.end(), row.begin(), row.end());
    const torch::Tensor A = copy_to_device(a_flat.data(), {s, s}, u.options());
    // I - h (A x J): [s n, s n].
    LU lu;
    if (!lu.factor(at::kron(A, dual ? d.J[0].detach() : d.J[0]).unsqueeze(0), 1.0, -h, stats_)) {
      r.failure = "the Newton iteration matrix I - h (A x J) is singular";
      return r;
    }
    torch::Tensor scale;
    {
      at::NoGradGuard g;
      scale = uflat.detach().abs().mul(o_.rtol).add(o_.atol);
    }

    // Z [s, n], started at h c_i f(t, u).
    std::vector<torch::Tensor> Z;
    for (int64_t i = 0; i < s; ++i) Z.push_back(f0 * (h * tab_.c[static_cast<size_t>(i)]));
    std::vector<torch::Tensor> F(static_cast<size_t>(s));
    bool converged = false;
    for (int64_t it = 0; it < o_.max_iters && !converged; ++it) {
      eval_all(uflat, Z, F);
      std::vector<torch::Tensor> G;
      for (int64_t i = 0; i < s; ++i) {
        const size_t si = static_cast<size_t>(i);
        std::vector<double> w;
        for (double x : tab_.a[si]) w.push_back(-h * x);
        G.push_back(lincomb(Z[si], F, w));
      }
      const torch::Tensor dZ = lu.solve(at::stack(G)).neg();
      const std::vector<torch::Tensor> parts = dZ.unbind(0);
      for (int64_t i = 0; i < s; ++i)
        Z[static_cast<size_t>(i)] = Z[static_cast<size_t>(i)] + parts[static_cast<size_t>(i)];
      at::NoGradGuard g;
      const torch::Tensor scaled = dZ.detach() / scale;
      const double norm =
          at::linalg_vector_norm(scaled, 2).item<double>() / std::sqrt(static_cast<double>(s * n));
      converged = norm < 1e-2;
    }
    if (!converged) ++stats_.nnonconverged;
    if (dual) {
      // Forward mode: the stages found on primal values take one exact Newton correction, whose
      // tangent is the implicit function theorem's (the values stay the iteration's); the new
      // state below is then built from them and from f evaluated with its tangents.
      std::string why;
      const torch::Tensor Zc =
          newton_correction(f_, o_, stats_, t, h, tab_.c, tab_.a, u, at::stack(Z), why);
      if (!Zc.defined()) {
        r = StepResult();
        r.failure = why;
        return r;
      }
      Z = Zc.unbind(0);
      uflat = u.reshape({-1});
      r.f0 = eval_f(f_, t, u, stats_);
      f0 = r.f0.reshape({-1});
      if (tab_.explicit_first) F[0] = f0;
      dual = false;  // eval keeps the tangents from here on
    }
    if (tab_.stiffly_accurate) {
      r.unew = (uflat + Z.back()).reshape(u.sizes());
    } else {
      // F at the final stages (the iterate Z, not the one before the last update).
      eval_all(uflat, Z, F);
      std::vector<double> w;
      for (double x : tab_.b) w.push_back(h * x);
      r.unew = lincomb(uflat, F, w).reshape(u.sizes());
    }
    return r;
  }

 private:
  const ImplicitTableau& tab_;
  const Dynamics& f_;
  const SolveOptions& o_;
  Stats& stats_;
  bool track_;
  bool verify_ = true;  // the stacked f is still to be checked against f (eval_stages)
};

}  // namespace

bool is_implicit_fixed(const std::string& name) { return registry().count(name) > 0; }

const MethodInfo& implicit_fixed_info(const std::string& name) {
  auto it = registry().find(name);
  TORCH_CHECK_VALUE(it != registry().end(), "unknown fixed-step implicit method '", name, "'");
  return it->second.info;
}

std::unique_ptr<Stepper> make_implicit_fixed(const std::string& name, const Dynamics& f,
                                             const SolveOptions& o, Stats& stats, bool track) {
  auto it = registry().find(name);
  TORCH_CHECK_VALUE(it != registry().end(), "unknown fixed-step implicit method '", name, "'");
  TORCH_CHECK_VALUE(o.max_iters >= 1, "max_iters must be a positive integer, got ", o.max_iters);
  return std::make_unique<ImplicitRK>(it->second, f, o, stats, track);
}

}  // namespace stiff
}  // namespace diffeqlayers
