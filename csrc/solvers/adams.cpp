// Adams multistep methods on a fixed grid with torchdiffeq's semantics: explicit_adams
// (Adams-Bashforth) and implicit_adams (Adams-Bashforth-Moulton predictor-corrector).
//
// Every step evaluates f at its start and pushes it onto a history of at most max_order - 1
// derivatives (newest first). While the history holds fewer than three, the step is Kutta's
// 3/8-rule RK4 (order 4, so the start-up does not spoil the order); with k >= 3 derivatives it is
// the k-step Adams-Bashforth formula (order k): the order grows by one per step up to
// max_order - 1 (11 by default). implicit_adams corrects that prediction with the Adams-Moulton
// formula of order k + 1 by functional iteration: at most max_iters evaluations of f at the
// step's end, stopping once successive increments dy agree, max over elements of
// |dy_old - dy| / (atol + rtol max(|dy_old|, |dy|)) < 1. A step whose iteration does not
// converge keeps the last iterate, counts in Stats::nnonconverged and drops the oldest
// derivative of the history (so the order grows more slowly), as torchdiffeq does. Steps of
// unequal size (grid points given as tstops) use the constant-step coefficients with the current
// h, again as torchdiffeq does. The loop is the stepper loop of csrc/solvers (stiff_loop.cpp)
// with fixed steps; under grad mode every step, the corrector iterations included, is recorded by
// autograd (reverse mode through the solve).
#include <algorithm>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "core/lincomb.h"
#include "diffeqlayers/adams.h"
#include "solvers/jacobian.h"
#include "solvers/stiff.h"

namespace diffeqlayers {

bool is_adams_method(const std::string& name) {
  return name == "explicit_adams" || name == "implicit_adams";
}

std::vector<std::string> adams_methods() { return {"explicit_adams", "implicit_adams"}; }

namespace stiff {
namespace {

constexpr int64_t kMaxOrder = 12;  // torchdiffeq's largest max_order (and its default)

// Adams coefficients from the backward-difference forms (Hairer, Norsett & Wanner, Solving
// Ordinary Differential Equations I, 2nd ed., Section III.1):
//   Adams-Bashforth, k steps, order k:   y1 = y0 + h sum_{j<k} gamma_j nabla^j f_n,
//     gamma_m + gamma_{m-1}/2 + ... + gamma_0/(m+1) = 1;
//   Adams-Moulton, order k+1:            y1 = y0 + h sum_{j<=k} gamma*_j nabla^j f_{n+1},
//     gamma*_0 = 1, gamma*_m + gamma*_{m-1}/2 + ... + gamma*_0/(m+1) = 0 (m >= 1);
// expanded with nabla^j f_n = sum_i (-1)^i C(j, i) f_{n-i} into weights on f_n, f_{n-1}, ...
// (f_{n+1}, f_n, ... for Adams-Moulton). Computed once in long double (the alternating sums
// cancel a few digits at order 11), then rounded.
struct Coefficients {
  std::vector<std::vector<double>> ab;  // ab[k]: k weights on f_n, ..., f_{n-k+1}
  std::vector<std::vector<double>> am;  // am[k]: k + 1 weights on f_{n+1}, f_n, ..., f_{n-k+1}
};

const Coefficients& coefficients() {
  static const Coefficients c = [] {
    constexpr int K = static_cast<int>(kMaxOrder);
    std::vector<long double> g(K + 1), gs(K + 1);
    for (int m = 0; m <= K; ++m) {
      long double sg = 0, ss = 0;
      for (int i = 0; i < m; ++i) {
        sg += g[i] / (m + 1 - i);
        ss += gs[i] / (m + 1 - i);
      }
      g[m] = 1 - sg;
      gs[m] = (m == 0 ? 1 : 0) - ss;
    }
    std::vector<std::vector<long double>> binom(K + 1, std::vector<long double>(K + 1, 0));
    for (int j = 0; j <= K; ++j) {
      binom[j][0] = 1;
      for (int i = 1; i <= j; ++i) binom[j][i] = binom[j - 1][i - 1] + binom[j - 1][i];
    }
    Coefficients out;
    out.ab.resize(K);
    out.am.resize(K);
    for (int k = 1; k < K; ++k) {
      for (int i = 0; i < k; ++i) {
        long double s = 0;
        for (int j = i; j < k; ++j) s += binom[j][i] * g[j];
        out.ab[k].push_back(static_cast<double>(i % 2 ? -s : s));
      }
      for (int i = 0; i <= k; ++i) {
        long double s = 0;
        for (int j = i; j <= k; ++j) s += binom[j][i] * gs[j];
        out.am[k].push_back(static_cast<double>(i % 2 ? -s : s));
      }
    }
    return out;
  }();
  return c;
}

const MethodInfo& explicit_info() {
  static const MethodInfo info{
      "explicit_adams",
      4,
      0,
      nullptr,
      "Adams-Bashforth of orders 3 to max_order - 1 after two 3/8-rule RK4 steps (Hairer, "
      "Norsett & Wanner, Solving ODEs I, III.1; torchdiffeq's explicit_adams)",
      false};
  return info;
}

const MethodInfo& implicit_info() {
  static const MethodInfo info{
      "implicit_adams",
      4,
      0,
      nullptr,
      "Adams-Bashforth predictor, Adams-Moulton corrector by functional iteration (Hairer, "
      "Norsett & Wanner, Solving ODEs I, III.1; torchdiffeq's implicit_adams)",
      false};
  return info;
}

class Adams : public Stepper {
 public:
  Adams(bool implicit, const Dynamics& f, const SolveOptions& o, Stats& stats)
      : implicit_(implicit),
        f_(f),
        o_(o),
        stats_(stats),
        capacity_(static_cast<size_t>(std::max<int64_t>(o.max_order - 1, 1))) {}

  const MethodInfo& info() const override { return implicit_ ? implicit_info() : explicit_info(); }

  StepResult step(double t, const torch::Tensor& u, double h, bool new_point) override {
    StepResult r;
    r.f0 = eval_f(f_, t, u, stats_);
    if (new_point || history_.empty()) {
      history_.push_front(r.f0);
      if (history_.size() > capacity_) history_.pop_back();
    } else {
      history_.front() = r.f0;  // a retry from the same point
    }
    const int64_t k = std::min<int64_t>(static_cast<int64_t>(history_.size()), o_.max_order - 1);
    if (k < 3) {
      r.unew = rk4_38(t, u, h, r.f0);
      return r;
    }
    const Coefficients& c = coefficients();
    const std::vector<torch::Tensor> hist(history_.begin(), history_.begin() + k);
    torch::Tensor dy = lincomb(torch::Tensor(), hist, scaled(c.ab[k], h, 0));
    if (implicit_) {
      const std::vector<double>& m = c.am[k];
      const torch::Tensor delta = lincomb(torch::Tensor(), hist, scaled(m, h, 1));
      bool converged = false;
      for (int64_t it = 0; it < o_.max_iters && !converged; ++it) {
        const torch::Tensor f1 = eval_f(f_, t + h, u + dy, stats_);
        torch::Tensor dy_new = lincomb(delta, {f1}, {h * m[0]});
        converged = agree(dy, dy_new);
        dy = std::move(dy_new);
      }
      if (!converged) {
        ++stats_.nnonconverged;
        history_.pop_back();
      }
    }
    r.unew = u + dy;
    return r;
  }

 private:
  // h * w[from..], the weights of the history's derivatives.
  static std::vector<double> scaled(const std::vector<double>& w, double h, size_t from) {
    std::vector<double> out;
    for (size_t i = from; i < w.size(); ++i) out.push_back(h * w[i]);
    return out;
  }

  // Kutta's 3/8 rule (Hairer, Norsett & Wanner I, Table II.1.2, right), torchdiffeq's start-up.
  torch::Tensor rk4_38(double t, const torch::Tensor& u, double h, const torch::Tensor& k1) {
    const torch::Tensor k2 = eval_f(f_, t + h / 3.0, lincomb(u, {k1}, {h / 3.0}), stats_);
    const torch::Tensor k3 =
        eval_f(f_, t + 2.0 * h / 3.0, lincomb(u, {k1, k2}, {-h / 3.0, h}), stats_);
    const torch::Tensor k4 = eval_f(f_, t + h, lincomb(u, {k1, k2, k3}, {h, -h, h}), stats_);
    return lincomb(u, {k1, k2, k3, k4}, {h / 8.0, 3.0 * h / 8.0, 3.0 * h / 8.0, h / 8.0});
  }

  // The corrector's convergence test on primal values (max norm, as torchdiffeq).
  bool agree(const torch::Tensor& a, const torch::Tensor& b) const {
    at::NoGradGuard g;
    const torch::Tensor ad = a.detach(), bd = b.detach();
    const torch::Tensor scale = at::maximum(ad.abs(), bd.abs()).mul_(o_.rtol).add_(o_.atol);
    return ((ad - bd).abs_().div_(scale)).max().item<double>() < 1.0;
  }

  bool implicit_;
  const Dynamics& f_;
  const SolveOptions& o_;
  Stats& stats_;
  size_t capacity_;
  std::deque<torch::Tensor> history_;  // f at the starts of the latest steps, newest first
};

}  // namespace

bool is_adams(const std::string& name) { return is_adams_method(name); }

const MethodInfo& adams_info(const std::string& name) {
  TORCH_CHECK_VALUE(is_adams(name), "unknown Adams method '", name, "'");
  return name == "implicit_adams" ? implicit_info() : explicit_info();
}

std::unique_ptr<Stepper> make_adams(const std::string& name, const Dynamics& f,
                                    const SolveOptions& o, Stats& stats) {
  TORCH_CHECK_VALUE(is_adams(name), "unknown Adams method '", name, "'");
  TORCH_CHECK_VALUE(o.max_order >= 1 && o.max_order <= kMaxOrder, "max_order must be in [1, ",
                    kMaxOrder, "], got ", o.max_order);
  TORCH_CHECK_VALUE(o.max_iters >= 1, "max_iters must be a positive integer, got ", o.max_iters);
  return std::make_unique<Adams>(name == "implicit_adams", f, o, stats);
}

// For tests (tests/cpp): the Adams-Bashforth (implicit = false) or Adams-Moulton weights with k
// derivatives of the history.
std::vector<double> adams_coefficients(bool implicit, int64_t k) {
  TORCH_CHECK_VALUE(k >= 1 && k < kMaxOrder, "k must be in [1, ", kMaxOrder - 1, "], got ", k);
  return implicit ? coefficients().am[k] : coefficients().ab[k];
}

}  // namespace stiff
}  // namespace diffeqlayers
