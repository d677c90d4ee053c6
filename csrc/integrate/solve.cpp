// The integration loop: one engine for every explicit Runge-Kutta tableau, fixed or adaptive.
//
// Under grad mode the loop is plain tensor algebra, so autograd records the unrolled solve
// (diffeq_rd). Step-size decisions (error norms, the initial step) run without grad: the step
// sequence is a function of the primal values only, as in torchdiffeq and diffrax.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <sstream>

#include "control/controller.h"
#include "core/format.h"
#include "core/grad_sinks.h"
#include "core/host_copy.h"
#include "core/lincomb.h"
#include "diffeqlayers/adams.h"
#include "diffeqlayers/solve.h"
#include "diffeqlayers/stiff.h"
#include "integrate/buffer_pool.h"
#include "integrate/explicit_loop.h"
#include "integrate/host_rk.h"
#include "integrate/tape.h"
#include "kernels/ops.h"
#include "solvers/stiff.h"

namespace diffeqlayers {
namespace stiff {
bool is_implicit_fixed(const std::string& name);  // csrc/solvers/implicit_fixed.cpp
}  // namespace stiff
namespace {

// For benchmarks only (benchmarks/bench_fused_ops.py): DIFFEQLAYERS_BENCH_UNFUSED=1 runs the loop
// as it ran before the fused operators (no buffer reuse, the error norm as ATen ops), so that
// one build measures both. Read once.
bool bench_unfused() {
  static const bool v = [] {
    const char* e = std::getenv("DIFFEQLAYERS_BENCH_UNFUSED");
    return e != nullptr && std::string(e) == "1";
  }();
  return v;
}

// u + h * sum_j w[j] k[j] over the first n stages, skipping zero weights (u may be undefined:
// then just the sum). With a pool, a path that records nothing writes into one of its buffers.
torch::Tensor combine(const torch::Tensor& u, double h, const std::vector<double>& w,
                      const std::vector<torch::Tensor>& k, size_t n,
                      detail::BufferPool* pool = nullptr) {
  std::vector<torch::Tensor> terms;
  std::vector<double> weights;
  terms.reserve(n);
  weights.reserve(n);
  for (size_t j = 0; j < n; ++j) {
    if (w[j] == 0.0) continue;
    terms.push_back(k[j]);
    weights.push_back(h * w[j]);
  }
  if (terms.empty()) return u.defined() ? u : at::zeros_like(k[0]);
  return lincomb(u, terms, weights, pool ? pool->get(u) : torch::Tensor());
}

using detail::fmt;

class Integrator {
 public:
  Integrator(const Dynamics& f, const Tableau& tab, const SolveOptions& o,
             detail::Tape* tape = nullptr)
      : f_(f), tab_(tab), o_(o), tape_(tape) {}

  torch::Tensor eval(double t, const torch::Tensor& u) {
    return detail::checked_eval(f_, t, u, stats.nfe);
  }

  // The norm of a scaled error as a 0-d tensor (no host synchronisation): the user's, checked to
  // give one number, or the RMS norm.
  torch::Tensor norm_tensor(const torch::Tensor& scaled) const {
    if (!o_.norm) return detail::rms_norm(scaled, o_.norm_prefix);
    torch::Tensor n = o_.norm(scaled);
    TORCH_CHECK_VALUE(n.numel() == 1, "norm must return a scalar, got a tensor of shape ",
                      n.sizes());
    return n.reshape({});
  }

  double norm(const torch::Tensor& scaled) const { return norm_tensor(scaled).item<double>(); }

  // Error norm of a step and whether the new state is finite, with one host synchronisation.
  std::pair<double, bool> step_error(const torch::Tensor& u, const torch::Tensor& unew,
                                     const std::vector<torch::Tensor>& k, double h) {
    at::NoGradGuard no_grad;
    // Detached stages: the error (hence the step sequence) depends on primal values only, also
    // for dual tensors in forward mode (detach() drops tangents), and stays off the slow path
    // that mixing duals with plain tensors takes.
    std::vector<torch::Tensor> kd;
    kd.reserve(k.size());
    for (const auto& kj : k) kd.push_back(detached(kj));
    torch::Tensor ud = detached(u), und = detached(unew);
    torch::Tensor n;
    if (o_.norm || bench_unfused()) {
      torch::Tensor err = combine(torch::Tensor(), h, tab_.b_err, kd, kd.size());
      torch::Tensor scale = at::maximum(ud.abs(), und.abs()).mul_(o_.rtol).add_(o_.atol);
      n = norm_tensor(err.div_(scale));
      if (bench_unfused() && o_.check_finite) {
        torch::Tensor both = at::stack({n.to(at::kDouble), und.sum().to(at::kDouble)}).cpu();
        const double* v = both.data_ptr<double>();
        return {v[0], std::isfinite(v[1])};
      }
    } else {
      // The RMS norm as one operator (one pass over the stages on the CPU, no temporaries), over
      // the leading norm_prefix elements when given (views: the host loop's sums, SolveOptions).
      auto head = [this](const torch::Tensor& x) { return detail::norm_head(x, o_.norm_prefix); };
      std::vector<torch::Tensor> ke;
      std::vector<double> we;
      for (size_t j = 0; j < kd.size(); ++j) {
        if (tab_.b_err[j] == 0.0) continue;
        ke.push_back(head(kd[j]));
        we.push_back(tab_.b_err[j]);
      }
      n = kernels::error_norm(ke, we, h, head(ud), head(und), o_.atol, o_.rtol);
    }
    if (!o_.check_finite) return {n.item<double>(), true};
    if (und.device().is_cpu()) return {n.item<double>(), all_finite(und)};
    torch::Tensor both = at::stack({n.to(at::kDouble), und.sum().to(at::kDouble)}).cpu();
    const double* v = both.data_ptr<double>();
    return {v[0], std::isfinite(v[1])};
  }

  Solution run(torch::Tensor u, double t0, double t1, const std::vector<double>& saveat) {
    state_shape_ = u.sizes().vec();
    state_options_ = u.options();
    const int dir = t1 > t0 ? 1 : -1;
    const bool adaptive = tab_.adaptive() && o_.adaptive;
    const int s = tab_.stages();
    const bool fsal = tab_.fsal();
    const bool want_every_step = saveat.empty();

    const std::vector<double> stops = detail::step_stops(o_, tab_, t0, t1, saveat);
    size_t stop_idx = 0;

    std::vector<double> out_t;
    // Saving every step: one state per entry. With saveat: blocks [m, *shape] of consecutive
    // save times, concatenated at the end.
    std::vector<torch::Tensor> out_u;
    size_t save_idx = 0;
    if (want_every_step) {
      if (o_.save_start) {
        out_t.push_back(t0);
        out_u.push_back(u);
        if (tape_) tape_->saves.push_back({-1, 0.0});
      }
    } else {
      while (save_idx < saveat.size() && dir * (saveat[save_idx] - t0) <= 0) {
        out_t.push_back(saveat[save_idx++]);
        out_u.push_back(u.unsqueeze(0));
        if (tape_) tape_->saves.push_back({-1, 0.0});
      }
    }
    if (tape_) {
      tape_->u_end = detached(u);
      tape_->t_end = t0;
    }
    std::vector<DenseStep> dense_steps;

    // A recorded solve on the CPU: the built-in modules' weight gradients gather in one sink per
    // weight, and the stages' gradients are deferred to their first readers (core/grad_sinks.h).
    detail::GradSinks::Scope sinks(at::GradMode::is_enabled() && u.device().is_cpu());
    double t = t0;
    torch::Tensor k1 = eval(t, u);
    detail::GradSinks::share_if_open(k1);
    if (o_.check_finite) {
      if (!all_finite(k1) || !all_finite(u))
        return fail(ReturnCode::Unstable, t, 0.0,
                    "the initial state or f(t0, u0) is not finite (NaN/Inf)", out_t, out_u,
                    dense_steps);
    }

    std::function<double(const torch::Tensor&)> nrm;  // empty: the RMS norm
    if (o_.norm) nrm = [this](const torch::Tensor& x) { return norm(x); };
    double h = detail::first_step(f_, tab_, o_, t0, t1, u, k1, nrm, stats.nfe);

    StepController controller(o_.controller, tab_.controller_order());
    // Fixed steps are placed at base + n * h, so that many steps do not accumulate rounding.
    double fixed_base = t0;
    int64_t fixed_n = 0;
    // Attempt number of the last step rejected for a non-finite state: an underflow soon after
    // one is reported as instability, not as a too-small step.
    int64_t last_nonfinite = -1000;
    std::vector<torch::Tensor> k(static_cast<size_t>(s));

    while (t != t1) {
      if (stats.naccept + stats.nreject >= o_.max_num_steps) {
        return fail(ReturnCode::MaxIters, t, dir * h, detail::max_steps_why(o_), out_t, out_u,
                    dense_steps);
      }
      if ((adaptive && (h < o_.dt_min || t + dir * h == t)) || !(h > 0)) {
        const bool unstable = stats.naccept + stats.nreject - last_nonfinite <= 50;
        return fail(unstable ? ReturnCode::Unstable : ReturnCode::DtLessThanMin, t, dir * h,
                    detail::underflow_why(o_, unstable), out_t, out_u, dense_steps);
      }
      const auto [tnew, hh, lands] =
          detail::step_target(adaptive, t, h, dir, stops[stop_idx], fixed_base, fixed_n);

      k[0] = k1;
      torch::Tensor unew =
          detail::rk_step(f_, tab_, t, hh, u, k, stats.nfe, bench_unfused() ? nullptr : &pool_);

      bool accepted = true;
      if (adaptive) {
        auto [err, finite] = step_error(u, unew, k, hh);
        finite = finite && std::isfinite(err);
        if (!finite) last_nonfinite = stats.naccept + stats.nreject;
        accepted = detail::control_step(controller, o_, err, finite, hh, lands, h, h_next_);
        if (!accepted) {
          ++stats.nreject;
          continue;
        }
      } else if (o_.check_finite) {
        if (!all_finite(unew))
          return fail(ReturnCode::Unstable, t, hh,
                      "the state became non-finite (NaN/Inf); try a smaller dt", out_t, out_u,
                      dense_steps);
      }
      ++stats.naccept;
      if (tape_) tape_->record(t, hh, u, unew);
      const int64_t step_idx = stats.naccept - 1;

      // f at the new state: the last stage (FSAL), or evaluated now when the next step or the
      // Hermite interpolant needs it.
      const bool last = lands && stop_idx + 1 == stops.size();
      const bool needs_interp = o_.dense || (!want_every_step && save_idx < saveat.size() &&
                                             dir * (saveat[save_idx] - tnew) < 0);
      torch::Tensor knew;
      if (fsal) {
        knew = k[s - 1];
      } else if (!last || (needs_interp && !tab_.has_dense())) {
        knew = eval(tnew, unew);
        detail::GradSinks::share_if_open(knew);
      }

      DenseStep step;
      if (needs_interp) {
        step.t0 = t;
        step.h = hh;
        step.u0 = u;
        step.u1 = unew;
        step.k = tab_.has_dense() ? k : std::vector<torch::Tensor>{k[0], knew};
      }
      if (want_every_step) {
        out_t.push_back(tnew);
        out_u.push_back(unew);
        if (tape_) tape_->saves.push_back({step_idx, 1.0});
      } else {
        // Save points inside the step in one block; one at the step's end is u_new itself.
        std::vector<double> thetas;
        while (save_idx < saveat.size() && dir * (saveat[save_idx] - tnew) < 0) {
          const double ts = saveat[save_idx++];
          out_t.push_back(ts);
          thetas.push_back((ts - t) / hh);
          if (tape_) tape_->saves.push_back({step_idx, thetas.back()});
        }
        if (!thetas.empty()) out_u.push_back(interpolate_many(tab_, step, thetas));
        if (save_idx < saveat.size() && saveat[save_idx] == tnew) {
          out_t.push_back(saveat[save_idx++]);
          out_u.push_back(unew.unsqueeze(0));
          if (tape_) tape_->saves.push_back({step_idx, 1.0});
        }
      }
      if (o_.dense) dense_steps.push_back(std::move(step));

      t = tnew;
      u = unew;
      k1 = knew;
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
    const std::string msg = detail::failure_message(tab_.name, code, t, dt, why, stats);
    if (o_.throw_on_failure) throw SolverError(code, t, dt, msg);
    return finish(code, msg, out_t, out_u, dense_steps, dt >= 0 ? 1 : -1, !o_.saveat.defined());
  }

  Solution finish(ReturnCode code, const std::string& msg, std::vector<double>& out_t,
                  std::vector<torch::Tensor>& out_u, std::vector<DenseStep>& dense_steps, int dir,
                  bool rows) {
    Solution sol =
        detail::assemble_solution(code, msg, stats, out_t, out_u, dense_steps, state_shape_,
                                  state_options_, rows, o_.dense, &tab_, dir);
    sol.dt_next = h_next_;
    return sol;
  }

  const Dynamics& f_;
  const Tableau& tab_;
  const SolveOptions& o_;
  detail::Tape* tape_;
  // Stage and state buffers, reused across steps by the combinations that record nothing
  // (inference, the adjoints' forward solves).
  detail::BufferPool pool_;
  double h_next_ = 0.0;  // the controller's proposal after the last accepted step
  std::vector<int64_t> state_shape_;
  torch::TensorOptions state_options_;
};

void check_state(const torch::Tensor& u0, const SolveOptions& o) {
  TORCH_CHECK_TYPE(u0.defined(), "u0 is undefined");
  TORCH_CHECK_TYPE(u0.scalar_type() == at::kFloat || u0.scalar_type() == at::kDouble,
                   "u0 must be float32 or float64, got ", u0.scalar_type());
  TORCH_CHECK_VALUE(u0.numel() > 0, "u0 is empty (shape ", u0.sizes(), ")");
  for (size_t i = 0; i < o.params.size(); ++i) {
    const auto& p = o.params[i];
    if (!p.defined()) continue;
    TORCH_CHECK_VALUE(p.device() == u0.device(), "parameter ", i, " is on ", p.device(),
                      " but u0 is on ", u0.device());
    TORCH_CHECK_TYPE(!p.is_floating_point() || p.scalar_type() == u0.scalar_type(), "parameter ", i,
                     " has dtype ", p.scalar_type(), " but u0 has dtype ", u0.scalar_type());
  }
}

// The save times as doubles, checked: 1-D, finite, strictly monotone along the span, inside it.
std::vector<double> check_saveat(const torch::Tensor& saveat, double t0, double t1) {
  std::vector<double> out;
  if (!saveat.defined()) return out;
  TORCH_CHECK_TYPE(!saveat.is_complex() && saveat.scalar_type() != at::kBool,
                   "saveat must hold real numbers, got ", saveat.scalar_type());
  TORCH_CHECK_VALUE(saveat.dim() <= 1, "saveat must be 1-D, got shape ", saveat.sizes());
  TORCH_CHECK_VALUE(saveat.numel() > 0, "saveat is empty");
  out = host_doubles(saveat);
  const int dir = t1 > t0 ? 1 : -1;
  // float32 times are accepted within their own rounding of the span's ends.
  const double rel = saveat.scalar_type() == at::kDouble ? 1e-12 : 1e-6;
  const double tol = rel * std::max({1.0, std::abs(t0), std::abs(t1)});
  for (size_t i = 0; i < out.size(); ++i) {
    TORCH_CHECK_VALUE(std::isfinite(out[i]), "saveat[", i, "] is not finite");
    TORCH_CHECK_VALUE(dir * (out[i] - t0) >= -tol && dir * (t1 - out[i]) >= -tol, "saveat[", i,
                      "]=", out[i], " lies outside the span [", t0, ", ", t1, "]");
    out[i] = dir > 0 ? std::clamp(out[i], t0, t1) : std::clamp(out[i], t1, t0);
    if (i > 0) {
      TORCH_CHECK_VALUE(out[i] != out[i - 1], "saveat holds the time ", out[i], " twice");
      TORCH_CHECK_VALUE(dir * (out[i] - out[i - 1]) > 0, "saveat must be strictly ",
                        dir > 0 ? "increasing" : "decreasing", " (the direction of tspan); saveat[",
                        i, "]=", out[i], " follows ", out[i - 1]);
    }
  }
  return out;
}

}  // namespace

namespace detail {

std::vector<double> step_stops(const SolveOptions& o, const Tableau& tab, double t0, double t1,
                               const std::vector<double>& saveat) {
  const int dir = t1 > t0 ? 1 : -1;
  std::vector<double> stops;
  for (double ts : o.tstops)
    if (dir * (ts - t0) > 0 && dir * (t1 - ts) > 0) stops.push_back(ts);
  // An interpolant much less accurate than the method (cubic Hermite on dopri8's long steps)
  // would spoil the save points: step onto them instead.
  const int interp_order = tab.has_dense() ? tab.dense_order : 3;
  if (tab.adaptive() && o.adaptive && interp_order + 1 < tab.order)
    for (double ts : saveat)
      if (dir * (ts - t0) > 0 && dir * (t1 - ts) > 0) stops.push_back(ts);
  std::sort(stops.begin(), stops.end(), [&](double a, double b) { return dir * (a - b) < 0; });
  stops.erase(std::unique(stops.begin(), stops.end()), stops.end());
  stops.push_back(t1);
  return stops;
}

double first_step(const Dynamics& f, const Tableau& tab, const SolveOptions& o, double t0,
                  double t1, const torch::Tensor& u0, const torch::Tensor& f0,
                  const std::function<double(const torch::Tensor&)>& norm, int64_t& nfe) {
  double h = o.dt;
  if (tab.adaptive() && o.adaptive && !(o.dt > 0))
    h = initial_step(f, t0, u0, f0, tab.order, t1 > t0 ? 1 : -1, std::abs(t1 - t0), o.rtol, o.atol,
                     norm, o.norm_prefix, nfe);
  return std::min(h, o.dt_max);
}

StepTarget step_target(bool adaptive, double t, double h, int dir, double stop, double fixed_base,
                       int64_t fixed_n) {
  StepTarget s{};
  if (!adaptive) {
    // Fixed steps are placed at base + n * h, so that many steps do not accumulate rounding.
    s.tnew = fixed_base + dir * h * static_cast<double>(fixed_n + 1);
    s.lands = dir * (s.tnew - stop) >= -1e-12 * h;
    if (s.lands) s.tnew = stop;
    s.hh = s.tnew - t;
  } else {
    s.lands = h >= std::abs(stop - t) * (1 - 1e-12);
    s.tnew = s.lands ? stop : t + dir * h;
    s.hh = s.lands ? stop - t : dir * h;
  }
  return s;
}

bool control_step(StepController& controller, const SolveOptions& o, double err, bool finite,
                  double hh, bool lands, double& h, double& h_next) {
  const bool accepted = finite && err <= 1.0;
  const double factor = finite ? controller.propose(err, accepted)
                               : (controller.propose(1e10, false), o.controller.factor_min);
  if (!accepted) {
    h = std::abs(hh) * factor;
    return false;
  }
  const double h_unclipped = h;
  h = std::min(std::abs(hh) * factor, o.dt_max);
  // A step clipped short to land on a stop says little about the step size the solution
  // allows: when it wanted to grow, resume from the step proposed before clipping.
  if (lands && factor >= 1.0) h = std::min(std::max(h, h_unclipped), o.dt_max);
  h_next = h;
  return true;
}

std::string max_steps_why(const SolveOptions& o) {
  return "max_num_steps (" + std::to_string(o.max_num_steps) +
         ") reached before the end of the span; raise max_num_steps, loosen the tolerances, or, "
         "if the problem is stiff, use a stiff solver";
}

std::string underflow_why(const SolveOptions& o, bool unstable) {
  return unstable ? "the state became non-finite (NaN/Inf) and shrinking the step did not help"
                  : "step size underflow (below dt_min=" + fmt(o.dt_min) +
                        " or machine precision); the problem may be stiff or have a singularity";
}

std::string failure_message(const std::string& method, ReturnCode code, double t, double dt,
                            const std::string& why, const Stats& stats) {
  return method + " failed (" + to_string(code) + ") at t=" + fmt(t) + ", dt=" + fmt(dt) + ": " +
         why + " [nfe=" + std::to_string(stats.nfe) +
         ", accepted=" + std::to_string(stats.naccept) +
         ", rejected=" + std::to_string(stats.nreject) + "]";
}

torch::Tensor norm_head(const torch::Tensor& x, int64_t prefix) {
  return prefix > 0 ? x.reshape({-1}).narrow(0, 0, prefix) : x;
}

torch::Tensor rms_norm(const torch::Tensor& x, int64_t prefix) {
  const torch::Tensor v = norm_head(x, prefix);
  return at::linalg_vector_norm(v, 2) / std::sqrt(static_cast<double>(v.numel()));
}

torch::Tensor checked_eval(const Dynamics& f, double t, const torch::Tensor& u, int64_t& nfe) {
  torch::Tensor out = f(t, u);
  ++nfe;
  TORCH_CHECK_TYPE(out.defined(), "f returned no tensor (at t=", fmt(t), ")");
  TORCH_CHECK_VALUE(out.sizes() == u.sizes(), "f returned shape ", out.sizes(),
                    " but the state has shape ", u.sizes(), " (at t=", fmt(t), ")");
  TORCH_CHECK_TYPE(out.scalar_type() == u.scalar_type(), "f returned dtype ", out.scalar_type(),
                   " but the state has dtype ", u.scalar_type(), " (at t=", fmt(t), ")");
  TORCH_CHECK_VALUE(out.device() == u.device(), "f returned a tensor on ", out.device(),
                    " but the state is on ", u.device(), " (at t=", fmt(t), ")");
  return out;
}

torch::Tensor rk_step(const Dynamics& f, const Tableau& tab, double t, double hh,
                      const torch::Tensor& u, std::vector<torch::Tensor>& k, int64_t& nfe,
                      BufferPool* pool) {
  const int s = tab.stages();
  if (!k[0].defined()) k[0] = checked_eval(f, t, u, nfe);
  torch::Tensor ui;
  for (int i = 1; i < s; ++i) {
    ui = combine(u, hh, tab.a[i], k, static_cast<size_t>(i), pool);
    k[i] = checked_eval(f, t + tab.c[i] * hh, ui, nfe);
    // Read by the later stage combinations, the step's end and its save points: its gradient
    // is deferred while a recorded solve runs (core/grad_sinks.h).
    GradSinks::share_if_open(k[i]);
  }
  // With FSAL the last stage was evaluated at u_new itself.
  if (tab.fsal()) return ui;
  return combine(u, hh, tab.b, k, static_cast<size_t>(s), pool);
}

DenseStep replay_step(const Dynamics& f, const Tableau& tab, double t, double hh,
                      const torch::Tensor& u, bool dense, int64_t& nfe) {
  std::vector<torch::Tensor> k(static_cast<size_t>(tab.stages()));
  DenseStep step;
  step.t0 = t;
  step.h = hh;
  step.u0 = u;
  step.u1 = rk_step(f, tab, t, hh, u, k, nfe);
  if (dense) {
    step.k = tab.has_dense()
                 ? std::move(k)
                 : std::vector<torch::Tensor>{
                       k[0], tab.fsal() ? k.back() : checked_eval(f, t + hh, step.u1, nfe)};
  }
  return step;
}

Solution assemble_solution(ReturnCode code, const std::string& msg, const Stats& stats,
                           const std::vector<double>& out_t,
                           const std::vector<torch::Tensor>& out_u,
                           std::vector<DenseStep>& dense_steps,
                           const std::vector<int64_t>& state_shape,
                           const torch::TensorOptions& state_options, bool rows, bool dense,
                           const Tableau* interpolant, int dir) {
  Solution sol;
  sol.retcode = code;
  sol.message = msg;
  sol.stats = stats;
  sol.t = torch::tensor(out_t, torch::dtype(torch::kFloat64));
  if (!out_u.empty()) {
    sol.u = rows ? at::stack(out_u) : at::cat(out_u);
  } else {
    std::vector<int64_t> shape{0};
    for (int64_t d : state_shape) shape.push_back(d);
    sol.u = at::empty(shape, state_options);
  }
  if (dense && !dense_steps.empty())
    sol.dense = std::make_shared<DenseOutput>(interpolant, std::move(dense_steps), dir);
  return sol;
}

void Tape::record(double t0, double hh, const torch::Tensor& u, const torch::Tensor& unew) {
  const int64_t j = steps();
  t.push_back(t0);
  h.push_back(hh);
  if (unew.defined()) u_end = detached(unew);
  t_end = t0 + hh;
  if (!store_states) return;
  if (keeps(j)) checkpoints.emplace(j, detached(u));
  if (cap > 0 && static_cast<int64_t>(checkpoints.size()) > cap) {
    stride *= 2;
    for (auto it = checkpoints.begin(); it != checkpoints.end();)
      it = it->first % stride != 0 ? checkpoints.erase(it) : std::next(it);
  }
}

void check_step_options(const SolveOptions& o, bool adaptive, const std::string& method) {
  TORCH_CHECK_VALUE(std::isfinite(o.rtol) && o.rtol >= 0,
                    "rtol must be a non-negative number, got ", o.rtol);
  TORCH_CHECK_VALUE(std::isfinite(o.atol) && o.atol >= 0,
                    "atol must be a non-negative number, got ", o.atol);
  TORCH_CHECK_VALUE(!adaptive || o.rtol > 0 || o.atol > 0,
                    "rtol and atol are both zero: an adaptive solve needs a positive tolerance");
  TORCH_CHECK_VALUE(std::isfinite(o.dt) && o.dt >= 0,
                    "dt must be a positive number (its sign follows tspan), got ", o.dt);
  TORCH_CHECK_VALUE(adaptive || o.dt > 0, "method '", method,
                    "' takes fixed steps: give a step size dt > 0");
  TORCH_CHECK_VALUE(o.dt_min >= 0, "dt_min must be non-negative, got ", o.dt_min);
  TORCH_CHECK_VALUE(o.dt_max > 0, "dt_max must be positive, got ", o.dt_max);
  TORCH_CHECK_VALUE(o.dt_min <= o.dt_max, "dt_min (", o.dt_min, ") exceeds dt_max (", o.dt_max,
                    ")");
  TORCH_CHECK_VALUE(o.max_num_steps > 0, "max_num_steps must be positive, got ", o.max_num_steps);
  for (double ts : o.tstops) TORCH_CHECK_VALUE(std::isfinite(ts), "tstops holds a non-finite time");
}

void check_norm_prefix(const SolveOptions& o, const torch::Tensor& u0, bool stiff) {
  if (o.norm_prefix == 0) return;
  TORCH_CHECK_VALUE(o.norm_prefix > 0 && o.norm_prefix <= u0.numel(),
                    "norm_prefix must lie in [0, ", u0.numel(), "] (the state's elements), got ",
                    o.norm_prefix);
  TORCH_CHECK_VALUE(!o.norm,
                    "norm_prefix restricts the RMS norm: give norm or norm_prefix, "
                    "not both");
  TORCH_CHECK_VALUE(!stiff, "norm_prefix is supported by the explicit Runge-Kutta methods, not '",
                    o.method, "'");
}

Prepared prepare(const Dynamics& f, const torch::Tensor& u0, const torch::Tensor& tspan,
                 const SolveOptions& options) {
  TORCH_CHECK_TYPE(static_cast<bool>(f), "f (the dynamics) is empty");
  check_state(u0, options);
  TORCH_CHECK_TYPE(tspan.defined(), "tspan is undefined");
  TORCH_CHECK_VALUE(tspan.numel() == 2, "tspan must hold two times (t0, t1), got shape ",
                    tspan.sizes());
  const std::vector<double> span = host_doubles(tspan);
  Prepared prep;
  prep.t0 = span[0];
  prep.t1 = span[1];
  TORCH_CHECK_VALUE(std::isfinite(prep.t0) && std::isfinite(prep.t1),
                    "tspan holds a non-finite time");
  TORCH_CHECK_VALUE(prep.t0 != prep.t1, "tspan is empty: t0 == t1 == ", prep.t0);
  // Stiff, Adams and fixed-step implicit methods (csrc/solvers) check their own options and
  // run their own loop.
  prep.stiff = is_stiff_method(options.method) || is_adams_method(options.method) ||
               stiff::is_implicit_fixed(options.method);
  if (!prep.stiff) {
    prep.tab = &tableau(options.method);
    check_step_options(options, prep.tab->adaptive() && options.adaptive, prep.tab->name);
  }
  check_norm_prefix(options, u0, prep.stiff);
  prep.saveat = check_saveat(options.saveat, prep.t0, prep.t1);
  return prep;
}

Solution solve_with_time_terms(const Dynamics& f, const torch::Tensor& u0,
                               const torch::Tensor& tspan, const SolveOptions& options,
                               const Prepared& prep,
                               const std::function<Solution(const torch::Tensor&)>& core) {
  // Gradients with respect to the times. The exact flow satisfies d u(t_i)/d t_i = f(t_i, u_i)
  // and d u(t_i)/d t0 = -(d u(t_i)/d u0) f(t0, u0). Both are attached as zero-valued terms
  // (t - t.detach()) * f, so values are untouched and autograd adds the right products.
  const bool grad_on = at::GradMode::is_enabled();
  torch::Tensor tspan_flat = tspan.reshape({-1});
  torch::Tensor u = u0;
  int64_t extra_nfe = 0;
  auto time_term = [&](const torch::Tensor& tt, double tv, const torch::Tensor& uv) {
    torch::Tensor fv;
    {
      at::NoGradGuard g;
      fv = f(tv, uv.detach()).detach();
      ++extra_nfe;
    }
    return (tt - tt.detach()).to(uv.scalar_type()) * fv;
  };
  if (grad_on && tspan.requires_grad()) u = u + -time_term(tspan_flat[0], prep.t0, u0);

  Solution sol = core(u);

  if (grad_on && sol.u.defined()) {
    // Output-time terms: each saved state moves with its own time.
    torch::Tensor times;
    if (options.saveat.defined() && options.saveat.requires_grad()) {
      times = options.saveat.reshape({-1});
    } else if (!options.saveat.defined() && tspan.requires_grad() &&
               sol.retcode == ReturnCode::Success) {
      // Saving every step: only the last time (t1) is a user time with a gradient.
      const int64_t n = sol.u.size(0);
      std::vector<torch::Tensor> rows(sol.u.unbind(0));
      rows[n - 1] = rows[n - 1] + time_term(tspan_flat[1], prep.t1, rows[n - 1]);
      sol.u = at::stack(rows);
    }
    if (times.defined()) {
      std::vector<torch::Tensor> rows(sol.u.unbind(0));
      const double* tv = sol.t.data_ptr<double>();
      for (size_t i = 0; i < rows.size() && static_cast<int64_t>(i) < times.numel(); ++i)
        rows[i] = rows[i] + time_term(times[i], tv[i], rows[i]);
      sol.u = at::stack(rows);
    }
  }
  sol.stats.nfe += extra_nfe;
  return sol;
}

Solution integrate(const Dynamics& f, const torch::Tensor& u0, const Prepared& prep,
                   const SolveOptions& options, Tape* tape) {
  if (prep.stiff) {
    TORCH_CHECK(tape == nullptr, "internal: the stiff methods keep no step tape");
    return stiff::solve_stiff(f, u0, prep.t0, prep.t1, prep.saveat, options);
  }
  // Small CPU solves that record nothing, with dynamics on host arrays: the host loop, which
  // takes the same steps (integrate/host_rk.h).
  if (!bench_unfused() && host_loop_applies(options, u0))
    return host_integrate(f, *prep.tab, options, u0, prep.t0, prep.t1, prep.saveat, tape);
  // The same loop for dynamics given as tensors, where nothing records.
  if (Solution sol; !bench_unfused() && host_integrate_tensor_f(f, *prep.tab, options, u0, prep.t0,
                                                                prep.t1, prep.saveat, tape, sol))
    return sol;
  Integrator integ(f, *prep.tab, options, tape);
  return integ.run(u0, prep.t0, prep.t1, prep.saveat);
}

}  // namespace detail

Solution solve(const Dynamics& f, const torch::Tensor& u0, const torch::Tensor& tspan,
               const SolveOptions& options) {
  if (options.nonstiff) {
    // A split problem: kencarp4 takes the parts apart (IMEX); every other method solves the
    // sum, and so do the time terms (they need the whole right-hand side).
    TORCH_CHECK_TYPE(static_cast<bool>(f), "f (the dynamics) is empty");
    const Dynamics& g = options.nonstiff;
    Dynamics sum = [f, g](double t, const torch::Tensor& u) { return f(t, u) + g(t, u); };
    SolveOptions o = options;
    o.nonstiff = Dynamics();
    o.host = nullptr;  // f's alone
    if (options.method != "kencarp4") return solve(sum, u0, tspan, o);
    const detail::Prepared prep = detail::prepare(f, u0, tspan, options);
    return detail::solve_with_time_terms(
        sum, u0, tspan, options, prep,
        [&](const torch::Tensor& u) { return detail::integrate(f, u, prep, options, nullptr); });
  }
  const detail::Prepared prep = detail::prepare(f, u0, tspan, options);
  return detail::solve_with_time_terms(f, u0, tspan, options, prep, [&](const torch::Tensor& u) {
    return detail::integrate(f, u, prep, options, nullptr);
  });
}

Solution solve(const Dynamics& f, const torch::Tensor& u0, double t0, double t1,
               const SolveOptions& options) {
  return solve(f, u0, torch::tensor({t0, t1}, torch::dtype(torch::kFloat64)), options);
}

}  // namespace diffeqlayers
