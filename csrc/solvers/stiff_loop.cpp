// The integration loop of the stiff methods: step control, saveat, dense output and failures, as
// in csrc/integrate/solve.cpp, around a Stepper (csrc/solvers/stiff.h) instead of a tableau.
//
// Step-size decisions run without grad on detached values; the steps themselves are recorded by
// autograd under grad mode (reverse mode through the solve).
#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "control/controller.h"
#include "diffeqlayers/stiff.h"
#include "integrate/tape.h"
#include "solvers/esdirk.h"
#include "solvers/jacobian.h"
#include "solvers/stiff.h"

namespace diffeqlayers {

namespace stiff {
// rosenbrock.cpp
bool is_rosenbrock(const std::string& name);
const MethodInfo& rosenbrock_info(const std::string& name);
std::unique_ptr<Stepper> make_rosenbrock(const std::string& name, const Dynamics& f,
                                         const SolveOptions& o, Stats& stats, bool track);
// adams.cpp
bool is_adams(const std::string& name);
const MethodInfo& adams_info(const std::string& name);
std::unique_ptr<Stepper> make_adams(const std::string& name, const Dynamics& f,
                                    const SolveOptions& o, Stats& stats);
// implicit_fixed.cpp
bool is_implicit_fixed(const std::string& name);
const MethodInfo& implicit_fixed_info(const std::string& name);
std::unique_ptr<Stepper> make_implicit_fixed(const std::string& name, const Dynamics& f,
                                             const SolveOptions& o, Stats& stats, bool track);
}  // namespace stiff

bool is_stiff_method(const std::string& name) {
  return stiff::is_rosenbrock(name) || stiff::is_esdirk(name) || stiff::is_radau(name);
}

std::vector<std::string> stiff_methods() {
  return {"kencarp4", "kvaerno5", "radau5", "rodas5", "rodas5p", "rosenbrock23", "trbdf2"};
}

namespace stiff {

const MethodInfo& method_info(const std::string& name) {
  if (is_adams(name)) return adams_info(name);
  if (is_implicit_fixed(name)) return implicit_fixed_info(name);
  TORCH_CHECK_VALUE(is_stiff_method(name), "unknown stiff method '", name, "'");
  if (is_esdirk(name)) return esdirk_tableau(name).info;
  if (is_radau(name)) return radau_info(name);
  return rosenbrock_info(name);
}

std::unique_ptr<Stepper> make_stepper(const std::string& name, const Dynamics& f,
                                      const SolveOptions& o, Stats& stats, bool track) {
  if (is_adams(name)) return make_adams(name, f, o, stats);
  if (is_implicit_fixed(name)) return make_implicit_fixed(name, f, o, stats, track);
  TORCH_CHECK_VALUE(is_stiff_method(name), "unknown stiff method '", name, "'");
  if (is_esdirk(name)) return make_esdirk(name, f, o, stats, track);
  if (is_radau(name)) return make_radau(name, f, o, stats, track);
  return make_rosenbrock(name, f, o, stats, track);
}

const Tableau& hermite() {
  static const Tableau tab = [] {
    Tableau t;
    t.name = "hermite";
    t.order = 3;
    return t;
  }();
  return tab;
}

namespace {

// States up to this many elements take the error norm's host loop.
constexpr int64_t kHostNorm = 1 << 16;

torch::Tensor norm_tensor(const SolveOptions& o, const torch::Tensor& scaled) {
  if (!o.norm)
    return at::linalg_vector_norm(scaled, 2) / std::sqrt(static_cast<double>(scaled.numel()));
  torch::Tensor n = o.norm(scaled);
  TORCH_CHECK_VALUE(n.numel() == 1, "norm must return a scalar, got a tensor of shape ", n.sizes());
  return n.reshape({});
}

}  // namespace

std::pair<double, bool> step_error(const SolveOptions& o, const torch::Tensor& u,
                                   const torch::Tensor& unew, const torch::Tensor& err) {
  at::NoGradGuard no_grad;
  if (!o.norm && u.device().is_cpu() && u.numel() <= kHostNorm &&
      (u.scalar_type() == at::kDouble || u.scalar_type() == at::kFloat)) {
    // Small CPU states: the RMS norm in a loop (a dozen ATen calls cost more than the sums).
    const std::vector<double> a = to_host(u), b = to_host(unew), e = to_host(err);
    double ss = 0.0, total = 0.0;
    for (size_t i = 0; i < a.size(); ++i) {
      const double q = e[i] / (std::max(std::abs(a[i]), std::abs(b[i])) * o.rtol + o.atol);
      ss += q * q;
      total += b[i];
    }
    const double n = a.empty() ? 0.0 : std::sqrt(ss / static_cast<double>(a.size()));
    return {n, !o.check_finite || std::isfinite(total)};
  }
  torch::Tensor ud = u.detach(), und = unew.detach();
  torch::Tensor scale = at::maximum(ud.abs(), und.abs()).mul_(o.rtol).add_(o.atol);
  torch::Tensor n = norm_tensor(o, err.detach() / scale);
  torch::Tensor both = at::stack({n.to(at::kDouble), und.sum().to(at::kDouble)}).cpu();
  const double* v = both.data_ptr<double>();
  return {v[0], !o.check_finite || std::isfinite(v[1])};
}

namespace {

class Loop {
 public:
  Loop(const Dynamics& f, const SolveOptions& o, const MethodInfo& m) : f_(f), o_(o), m_(m) {}

  Solution run(torch::Tensor u, double t0, double t1, const std::vector<double>& saveat) {
    state_shape_ = u.sizes().vec();
    state_options_ = u.options();
    const int dir = t1 > t0 ? 1 : -1;
    const bool adaptive = m_.adaptive() && o_.adaptive;
    const bool want_every_step = saveat.empty();
    const Tableau& interp = m_.interpolant ? *m_.interpolant : hermite();

    // Record the Jacobian's dependence on u and the parameters only when something upstream
    // requires grad: probe f once on a detached state.
    bool track = false;
    if (m_.uses_jacobian && at::GradMode::is_enabled()) {
      track = u.requires_grad();
      if (!track) track = stiff::eval_f(f_, t0, u.detach(), stats).requires_grad();
    }
    std::unique_ptr<Stepper> stepper = make_stepper(m_.name, f_, o_, stats, track);

    std::vector<double> stops;
    for (double ts : o_.tstops)
      if (dir * (ts - t0) > 0 && dir * (t1 - ts) > 0) stops.push_back(ts);
    // Step onto save points when the interpolant is much less accurate than the method.
    if (adaptive && m_.interpolant_order() + 1 < m_.order)
      for (double ts : saveat)
        if (dir * (ts - t0) > 0 && dir * (t1 - ts) > 0) stops.push_back(ts);
    std::sort(stops.begin(), stops.end(), [&](double a, double b) { return dir * (a - b) < 0; });
    stops.erase(std::unique(stops.begin(), stops.end()), stops.end());
    stops.push_back(t1);
    size_t stop_idx = 0;

    std::vector<double> out_t;
    std::vector<torch::Tensor> out_u;
    size_t save_idx = 0;
    if (want_every_step) {
      if (o_.save_start) {
        out_t.push_back(t0);
        out_u.push_back(u);
      }
    } else {
      while (save_idx < saveat.size() && dir * (saveat[save_idx] - t0) <= 0) {
        out_t.push_back(saveat[save_idx++]);
        out_u.push_back(u.unsqueeze(0));
      }
    }
    std::vector<DenseStep> dense_steps;

    double t = t0;
    double h;
    if (!adaptive || o_.dt > 0) {
      h = o_.dt;
    } else {
      at::NoGradGuard g;
      torch::Tensor f0 = stiff::eval_f(f_, t0, u.detach(), stats);
      if (o_.check_finite && !std::isfinite(f0.sum().item<double>() + u.sum().item<double>()))
        return fail(ReturnCode::Unstable, t, 0.0,
                    "the initial state or f(t0, u0) is not finite (NaN/Inf)", out_t, out_u,
                    dense_steps);
      h = initial_step(
          f_, t0, u, f0, m_.order, dir, std::abs(t1 - t0), o_.rtol, o_.atol,
          [this](const torch::Tensor& x) { return norm_tensor(o_, x).item<double>(); },
          /*norm_prefix=*/0, stats.nfe);
    }
    h = std::min(h, o_.dt_max);

    StepController controller(o_.controller, m_.controller_order());
    double fixed_base = t0;
    int64_t fixed_n = 0;
    int64_t last_nonfinite = -1000;
    bool new_point = true;
    std::string last_failure;

    while (t != t1) {
      if (stats.naccept + stats.nreject >= o_.max_num_steps) {
        return fail(ReturnCode::MaxIters, t, dir * h,
                    "max_num_steps (" + std::to_string(o_.max_num_steps) +
                        ") reached before the end of the span; raise max_num_steps or loosen "
                        "the tolerances" +
                        (last_failure.empty() ? "" : " (last step failure: " + last_failure + ")"),
                    out_t, out_u, dense_steps);
      }
      if ((adaptive && (h < o_.dt_min || t + dir * h == t)) || !(h > 0)) {
        const bool unstable = stats.naccept + stats.nreject - last_nonfinite <= 50;
        return fail(unstable ? ReturnCode::Unstable : ReturnCode::DtLessThanMin, t, dir * h,
                    unstable ? "the state became non-finite (NaN/Inf) and shrinking the step did "
                               "not help"
                             : "step size underflow (below dt_min=" + fmt(o_.dt_min) +
                                   " or machine precision)" +
                                   (last_failure.empty() ? std::string()
                                                         : "; last step failure: " + last_failure),
                    out_t, out_u, dense_steps);
      }
      const double stop = stops[stop_idx];
      double tnew, hh;
      bool lands;
      if (!adaptive) {
        tnew = fixed_base + dir * h * static_cast<double>(fixed_n + 1);
        lands = dir * (tnew - stop) >= -1e-12 * h;
        if (lands) tnew = stop;
        hh = tnew - t;
      } else {
        lands = h >= std::abs(stop - t) * (1 - 1e-12);
        tnew = lands ? stop : t + dir * h;
        hh = lands ? stop - t : dir * h;
      }

      StepResult r = stepper->step(t, u, hh, new_point);
      new_point = false;
      if (!r.failure.empty()) {
        // Singular iteration matrix or a failed nonlinear solve: retry with a quarter step.
        last_failure = r.failure;
        ++stats.nreject;
        if (!adaptive)
          return fail(ReturnCode::Unstable, t, hh, r.failure + "; try a smaller dt", out_t, out_u,
                      dense_steps);
        controller.propose(1e10, false);
        h = std::abs(hh) * 0.25;
        continue;
      }

      if (adaptive) {
        auto [err, finite] = step_error(o_, u, r.unew, r.err);
        finite = finite && std::isfinite(err);
        if (!finite) last_nonfinite = stats.naccept + stats.nreject;
        const bool accepted = finite && err <= 1.0;
        const double factor = finite ? controller.propose(err, accepted)
                                     : (controller.propose(1e10, false), o_.controller.factor_min);
        if (!accepted) {
          ++stats.nreject;
          h = std::abs(hh) * factor;
          continue;
        }
        const double h_unclipped = h;
        h = std::min(std::abs(hh) * factor, o_.dt_max);
        if (lands && factor >= 1.0) h = std::min(std::max(h, h_unclipped), o_.dt_max);
      } else if (o_.check_finite) {
        at::NoGradGuard g;
        if (!std::isfinite(r.unew.sum().item<double>()))
          return fail(ReturnCode::Unstable, t, hh,
                      "the state became non-finite (NaN/Inf); try a smaller dt", out_t, out_u,
                      dense_steps);
      }
      ++stats.naccept;
      last_failure.clear();

      const bool needs_interp = o_.dense || (!want_every_step && save_idx < saveat.size() &&
                                             dir * (saveat[save_idx] - tnew) < 0);
      DenseStep step;
      if (needs_interp) {
        step.t0 = t;
        step.h = hh;
        step.u0 = u;
        step.u1 = r.unew;
        step.k = m_.interpolant
                     ? r.dense_terms
                     : std::vector<torch::Tensor>{r.f0, stiff::eval_f(f_, tnew, r.unew, stats)};
        // The discrete adjoint's stages after the interpolant's terms (Stepper::replay).
        if (o_.dense && o_.keep_stages)
          step.k.insert(step.k.end(), r.stages.begin(), r.stages.end());
      }
      if (want_every_step) {
        out_t.push_back(tnew);
        out_u.push_back(r.unew);
      } else {
        std::vector<double> thetas;
        while (save_idx < saveat.size() && dir * (saveat[save_idx] - tnew) < 0) {
          const double ts = saveat[save_idx++];
          out_t.push_back(ts);
          thetas.push_back((ts - t) / hh);
        }
        if (!thetas.empty()) out_u.push_back(interpolate_many(interp, step, thetas));
        if (save_idx < saveat.size() && saveat[save_idx] == tnew) {
          out_t.push_back(saveat[save_idx++]);
          out_u.push_back(r.unew.unsqueeze(0));
        }
      }
      if (o_.dense) dense_steps.push_back(std::move(step));

      t = tnew;
      u = r.unew;
      new_point = true;
      if (!adaptive) ++fixed_n;
      if (lands) {
        ++stop_idx;
        fixed_base = t;
        fixed_n = 0;
      }
    }
    return finish(ReturnCode::Success, "", out_t, out_u, dense_steps, dir, want_every_step);
  }

  Stats stats;

 private:
  Solution fail(ReturnCode code, double t, double dt, const std::string& why,
                std::vector<double>& out_t, std::vector<torch::Tensor>& out_u,
                std::vector<DenseStep>& dense_steps) {
    std::string msg = m_.name + " failed (" + to_string(code) + ") at t=" + fmt(t) +
                      ", dt=" + fmt(dt) + ": " + why + " [nfe=" + std::to_string(stats.nfe) +
                      ", accepted=" + std::to_string(stats.naccept) +
                      ", rejected=" + std::to_string(stats.nreject) +
                      ", jacobians=" + std::to_string(stats.njac) +
                      ", LU factorizations=" + std::to_string(stats.nlu) + "]";
    if (o_.throw_on_failure) throw SolverError(code, t, dt, msg);
    return finish(code, msg, out_t, out_u, dense_steps, dt >= 0 ? 1 : -1, !o_.saveat.defined());
  }

  Solution finish(ReturnCode code, const std::string& msg, std::vector<double>& out_t,
                  std::vector<torch::Tensor>& out_u, std::vector<DenseStep>& dense_steps, int dir,
                  bool rows) {
    return detail::assemble_solution(code, msg, stats, out_t, out_u, dense_steps, state_shape_,
                                     state_options_, rows, o_.dense,
                                     m_.interpolant ? m_.interpolant : &hermite(), dir);
  }

  const Dynamics& f_;
  const SolveOptions& o_;
  const MethodInfo& m_;
  std::vector<int64_t> state_shape_;
  torch::TensorOptions state_options_;
};

}  // namespace

Solution solve_stiff(const Dynamics& f, const torch::Tensor& u, double t0, double t1,
                     const std::vector<double>& saveat, const SolveOptions& o) {
  const MethodInfo& m = method_info(o.method);
  detail::check_step_options(o, m.adaptive() && o.adaptive, m.name);
  // Forward mode (dual tensors): the Rosenbrock steppers carry the tangents through their
  // Jacobians (jacobian.h, PointDerivatives::dual); the ESDIRK, Radau and fixed-step implicit
  // steppers iterate on primal values and give the stages their tangents by one exact Newton
  // correction (newton_correction).
  Loop loop(f, o, m);
  return loop.run(u, t0, t1, saveat);
}

}  // namespace stiff
}  // namespace diffeqlayers
