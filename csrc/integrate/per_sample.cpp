// The per-sample loop: explicit adaptive Runge-Kutta on a batch whose samples each keep their own
// time, step size, error norm and step controller.
//
// Every iteration attempts one step for every unfinished sample, each of its own size. The stages
// are evaluated on the whole batch at once (f sees a tensor of per-sample times) and each
// sample's step is accepted or rejected by its own error norm through masked updates
// (torch::where), so that under grad mode the recorded graph is plain tensor algebra, as in the
// shared-step loop (solve.cpp). Step-size decisions run on the host, one StepController per
// sample: the per-sample error norms come back in one transfer per iteration, and each sample
// follows the step sequence a solve of it alone would (same controller, initial step and stops),
// to rounding. Finished samples ride along with a zero step until the last one is done.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <sstream>

#include "control/controller.h"
#include "core/format.h"
#include "core/host_copy.h"
#include "core/lincomb.h"
#include "diffeqlayers/adams.h"
#include "diffeqlayers/per_sample.h"
#include "diffeqlayers/stiff.h"
#include "integrate/interpolation.h"
#include "integrate/tape.h"

namespace diffeqlayers {
namespace stiff {
bool is_implicit_fixed(const std::string& name);  // csrc/solvers/implicit_fixed.cpp
}  // namespace stiff
namespace {

using detail::fmt;

// sum_j w[j] k[j] over the first n stages, skipping zero weights; undefined when all are zero.
torch::Tensor stage_sum(const std::vector<double>& w, const std::vector<torch::Tensor>& k,
                        size_t n) {
  std::vector<torch::Tensor> terms;
  std::vector<double> weights;
  for (size_t j = 0; j < n; ++j) {
    if (w[j] == 0.0) continue;
    terms.push_back(k[j]);
    weights.push_back(w[j]);
  }
  if (terms.empty()) return {};
  return lincomb(torch::Tensor(), terms, weights);
}

std::string adaptive_method_list() {
  std::string out;
  for (const auto& name : methods()) {
    if (!tableau(name).adaptive()) continue;
    out += (out.empty() ? "" : ", ") + name;
  }
  return out;
}

class PerSampleIntegrator {
 public:
  PerSampleIntegrator(const BatchDynamics& f, const Tableau& tab, const SolveOptions& o)
      : f_(f), tab_(tab), o_(o) {}

  Solution run(torch::Tensor u, double t0, double t1, const std::vector<double>& saveat);

  PerSampleStats sample_stats() const {
    PerSampleStats s;
    s.naccept = torch::tensor(naccept_, torch::dtype(torch::kInt64));
    s.nreject = torch::tensor(nreject_, torch::dtype(torch::kInt64));
    s.iterations = iterations_;
    return s;
  }

 private:
  torch::Tensor eval(const torch::Tensor& t, const torch::Tensor& u) {
    torch::Tensor out = f_(t, u);
    ++stats_.nfe;
    TORCH_CHECK_TYPE(out.defined(), "f returned no tensor (per-sample solve)");
    TORCH_CHECK_VALUE(out.sizes() == u.sizes(), "f returned shape ", out.sizes(),
                      " but the state has shape ", u.sizes(), " (per-sample solve)");
    TORCH_CHECK_TYPE(out.scalar_type() == u.scalar_type(), "f returned dtype ", out.scalar_type(),
                     " but the state has dtype ", u.scalar_type(), " (per-sample solve)");
    TORCH_CHECK_VALUE(out.device() == u.device(), "f returned a tensor on ", out.device(),
                      " but the state is on ", u.device(), " (per-sample solve)");
    return out;
  }

  // Host values as a tensor of `shape` in the state's dtype and on its device.
  torch::Tensor to_state(const std::vector<double>& v, at::IntArrayRef shape) const {
    return copy_to_device(v.data(), shape, options_);
  }
  // One value per sample, shaped to broadcast against the state: [B, 1, ..., 1].
  torch::Tensor column(const std::vector<double>& v) const { return to_state(v, col_shape_); }

  // A [B] tensor (any dtype, any device) on the host.
  static std::vector<double> host(const torch::Tensor& x) { return host_doubles(x); }

  // The error norm of each sample's scaled error: [B].
  torch::Tensor norms(const torch::Tensor& scaled) const {
    if (!o_.norm) {
      return at::linalg_vector_norm(scaled.reshape({batch_, -1}), 2, {1}) /
             std::sqrt(static_cast<double>(scaled.numel() / batch_));
    }
    torch::Tensor n = o_.norm(scaled);
    TORCH_CHECK_VALUE(
        n.numel() == batch_, "with per_sample, norm must return one value per sample ([B] = [",
        batch_, "]) for the scaled error of shape ", scaled.sizes(), ", got shape ", n.sizes());
    return n.reshape({batch_});
  }

  // Hairer & Wanner's initial step for each sample (control/controller.cpp's formulas), with
  // one evaluation of f on the whole batch.
  std::vector<double> initial_steps(double t0, const torch::Tensor& u0, const torch::Tensor& f0,
                                    int dir, double span) {
    at::NoGradGuard no_grad;
    const torch::Tensor u = u0.detach(), k0 = f0.detach();
    const torch::Tensor scale = u.abs().mul_(o_.rtol).add_(o_.atol);
    const std::vector<double> d0 = host(norms(u / scale)), d1 = host(norms(k0 / scale));
    std::vector<double> h0(batch_), t_trial(batch_), hcol(batch_);
    for (int64_t b = 0; b < batch_; ++b) {
      TORCH_CHECK_VALUE(std::isfinite(d0[b]) && std::isfinite(d1[b]) && d0[b] >= 0 && d1[b] >= 0,
                        "the error norm of the initial state or of f(t0, u0) of sample ", b,
                        " is not a finite, non-negative number (got ", d0[b], " and ", d1[b],
                        "): check the norm");
      h0[b] = initial_step_trial(d0[b], d1[b], span);
      t_trial[b] = t0 + dir * h0[b];
      hcol[b] = dir * h0[b];
    }
    const torch::Tensor k1 = eval(to_state(t_trial, {batch_}), u + column(hcol) * k0).detach();
    const std::vector<double> d2 = host(norms((k1 - k0) / scale));
    std::vector<double> h(batch_);
    for (int64_t b = 0; b < batch_; ++b)
      h[b] = initial_step_final(h0[b], d1[b], d2[b] / h0[b], tab_.order, span);
    return h;
  }

  // Records a failure of sample b; throws unless the options ask for the partial solution.
  void fail(ReturnCode code, int64_t b, double t, double dt, const std::string& why) {
    std::string msg =
        "per-sample " + tab_.name + " failed (" + to_string(code) + ") for sample " +
        std::to_string(b) + " at t=" + fmt(t) + ", dt=" + fmt(dt) + ": " + why + " [sample " +
        std::to_string(b) + ": accepted=" + std::to_string(naccept_[b]) +
        ", rejected=" + std::to_string(nreject_[b]) + "; nfe=" + std::to_string(stats_.nfe) + "]";
    if (o_.throw_on_failure) throw SolverError(code, t, dt, msg);
    code_ = code;
    message_ = msg;
  }

  const BatchDynamics& f_;
  const Tableau& tab_;
  const SolveOptions& o_;
  int64_t batch_ = 0;
  std::vector<int64_t> col_shape_;
  torch::TensorOptions options_;
  Stats stats_;
  std::vector<int64_t> naccept_, nreject_;
  int64_t iterations_ = 0;
  ReturnCode code_ = ReturnCode::Success;
  std::string message_;
};

Solution PerSampleIntegrator::run(torch::Tensor u, double t0, double t1,
                                  const std::vector<double>& saveat) {
  batch_ = u.size(0);
  const int64_t B = batch_;
  options_ = u.options();
  col_shape_.assign(static_cast<size_t>(u.dim()), 1);
  col_shape_[0] = B;
  naccept_.assign(B, 0);
  nreject_.assign(B, 0);
  const int dir = t1 > t0 ? 1 : -1;
  const int s = tab_.stages();
  const bool fsal = tab_.fsal();
  const bool own_dense = tab_.has_dense();

  // Stops every sample lands on, as in the shared loop: tstops inside the span, the save times
  // when the interpolant is much less accurate than the method, then t1.
  std::vector<double> stops;
  for (double ts : o_.tstops)
    if (dir * (ts - t0) > 0 && dir * (t1 - ts) > 0) stops.push_back(ts);
  const int interp_order = own_dense ? tab_.dense_order : 3;
  if (interp_order + 1 < tab_.order)
    for (double ts : saveat)
      if (dir * (ts - t0) > 0 && dir * (t1 - ts) > 0) stops.push_back(ts);
  std::sort(stops.begin(), stops.end(), [&](double a, double b) { return dir * (a - b) < 0; });
  stops.erase(std::unique(stops.begin(), stops.end()), stops.end());
  stops.push_back(t1);

  // Output: blocks [m, B, ...] of candidate rows (interpolants, step ends, the initial state),
  // and per save time and sample the row (counted over all blocks) that holds its value;
  // gathered into [n, B, ...] at the end.
  const int64_t nsave = static_cast<int64_t>(saveat.size());
  std::vector<torch::Tensor> pieces;
  int64_t rows_held = 0;
  std::vector<int64_t> piece_of(static_cast<size_t>(nsave * B), -1);
  std::vector<int64_t> save_idx(B, 0);
  {
    int64_t j = 0;
    while (j < nsave && dir * (saveat[j] - t0) <= 0) {
      for (int64_t b = 0; b < B; ++b) piece_of[j * B + b] = 0;
      ++j;
    }
    if (j > 0) {
      pieces.push_back(u.unsqueeze(0));
      rows_held = 1;
    }
    std::fill(save_idx.begin(), save_idx.end(), j);
  }

  std::vector<double> t(B, t0);
  torch::Tensor k1 = eval(to_state(t, {B}), u);
  if (o_.check_finite) {
    at::NoGradGuard g;
    const std::vector<double> sums =
        host(k1.detach().reshape({B, -1}).sum(1) + u.detach().reshape({B, -1}).sum(1));
    for (int64_t b = 0; b < B && code_ == ReturnCode::Success; ++b)
      if (!std::isfinite(sums[b]))
        fail(ReturnCode::Unstable, b, t0, 0.0,
             "the initial state or f(t0, u0) is not finite (NaN/Inf)");
  }

  std::vector<double> h(B, o_.dt);
  if (o_.dt <= 0 && code_ == ReturnCode::Success)
    h = initial_steps(t0, u, k1, dir, std::abs(t1 - t0));
  for (double& hb : h) hb = std::min(hb, o_.dt_max);

  std::vector<StepController> controllers(B,
                                          StepController(o_.controller, tab_.controller_order()));
  std::vector<size_t> stop_idx(B, 0);
  std::vector<int64_t> last_nonfinite(B, -1000);
  std::vector<char> active(B, 1);
  std::vector<double> hh(B), tnew(B), stage_t(static_cast<size_t>(s) * B);
  std::vector<char> lands(B), accepted(B);
  std::vector<torch::Tensor> k(static_cast<size_t>(s));
  int64_t n_active = B;

  while (n_active > 0 && code_ == ReturnCode::Success) {
    // Each sample's attempt: its own size, clipped to land on its next stop; zero when done.
    for (int64_t b = 0; b < B; ++b) {
      if (!active[b]) {
        hh[b] = 0.0;
        tnew[b] = t[b];
        continue;
      }
      const int64_t steps = naccept_[b] + nreject_[b];
      if (steps >= o_.max_num_steps) {
        fail(ReturnCode::MaxIters, b, t[b], dir * h[b],
             "max_num_steps (" + std::to_string(o_.max_num_steps) +
                 ") reached before the end of the span; raise max_num_steps, loosen the "
                 "tolerances, or, if the problem is stiff, use a stiff solver");
        break;
      }
      if (h[b] < o_.dt_min || t[b] + dir * h[b] == t[b] || !(h[b] > 0)) {
        const bool unstable = steps - last_nonfinite[b] <= 50;
        fail(unstable ? ReturnCode::Unstable : ReturnCode::DtLessThanMin, b, t[b], dir * h[b],
             unstable ? "the state became non-finite (NaN/Inf) and shrinking the step did not "
                        "help"
                      : "step size underflow (below dt_min=" + fmt(o_.dt_min) +
                            " or machine precision); the problem may be stiff or have a "
                            "singularity");
        break;
      }
      const double stop = stops[stop_idx[b]];
      lands[b] = h[b] >= std::abs(stop - t[b]) * (1 - 1e-12);
      tnew[b] = lands[b] ? stop : t[b] + dir * h[b];
      hh[b] = lands[b] ? stop - t[b] : dir * h[b];
    }
    if (code_ != ReturnCode::Success) break;
    ++iterations_;

    // The stages on the whole batch: U_i = u + h_b * sum_j a_ij k_j, at times t_b + c_i h_b.
    for (int i = 0; i < s; ++i)
      for (int64_t b = 0; b < B; ++b) stage_t[i * B + b] = t[b] + tab_.c[i] * hh[b];
    const torch::Tensor times = to_state(stage_t, {s, B});
    const torch::Tensor hcol = column(hh);
    k[0] = k1;
    torch::Tensor ui;
    for (int i = 1; i < s; ++i) {
      torch::Tensor sum = stage_sum(tab_.a[i], k, static_cast<size_t>(i));
      ui = sum.defined() ? at::addcmul(u, hcol, sum) : u;
      k[i] = eval(times[i], ui);
    }
    torch::Tensor unew;
    if (fsal) {
      unew = ui;  // the last stage was evaluated at u_new itself
    } else {
      torch::Tensor sum = stage_sum(tab_.b, k, static_cast<size_t>(s));
      unew = sum.defined() ? at::addcmul(u, hcol, sum) : u;
    }

    // Each sample's error norm and whether its new state is finite, in one transfer.
    std::vector<double> err, finite_sum;
    {
      at::NoGradGuard no_grad;
      std::vector<torch::Tensor> kd;
      kd.reserve(k.size());
      for (const auto& kj : k) kd.push_back(kj.detach());
      torch::Tensor e = stage_sum(tab_.b_err, kd, kd.size());
      const torch::Tensor ud = u.detach(), und = unew.detach();
      if (!e.defined()) e = at::zeros_like(ud);
      torch::Tensor scale = at::maximum(ud.abs(), und.abs()).mul_(o_.rtol).add_(o_.atol);
      torch::Tensor n = norms(e.mul_(hcol).div_(scale));
      if (o_.check_finite) {
        const std::vector<double> both =
            host(at::stack({n.to(at::kDouble), und.reshape({B, -1}).sum(1).to(at::kDouble)}));
        err.assign(both.begin(), both.begin() + B);
        finite_sum.assign(both.begin() + B, both.end());
      } else {
        err = host(n);
      }
    }

    // Accept or reject, sample by sample, with the shared loop's rules.
    int64_t n_accepted = 0;
    for (int64_t b = 0; b < B; ++b) {
      accepted[b] = 0;
      if (!active[b]) continue;
      const bool finite =
          std::isfinite(err[b]) && (finite_sum.empty() || std::isfinite(finite_sum[b]));
      if (!finite) last_nonfinite[b] = naccept_[b] + nreject_[b];
      const bool ok = finite && err[b] <= 1.0;
      StepController& ctrl = controllers[b];
      const double factor =
          finite ? ctrl.propose(err[b], ok) : (ctrl.propose(1e10, false), o_.controller.factor_min);
      if (!ok) {
        ++nreject_[b];
        h[b] = std::abs(hh[b]) * factor;
        continue;
      }
      const double h_unclipped = h[b];
      h[b] = std::min(std::abs(hh[b]) * factor, o_.dt_max);
      // As in the shared loop: a step clipped to land on a stop resumes from the step proposed
      // before clipping when it wanted to grow.
      if (lands[b] && factor >= 1.0) h[b] = std::min(std::max(h[b], h_unclipped), o_.dt_max);
      ++naccept_[b];
      accepted[b] = 1;
      ++n_accepted;
    }
    if (n_accepted == 0) continue;

    // Masked update; no masking (no extra graph nodes) when every sample moved.
    const bool all_moved = n_accepted == B;
    torch::Tensor mask;
    if (!all_moved) {
      static_assert(sizeof(bool) == sizeof(char), "accepted holds 0/1 bytes read as bool");
      mask =
          copy_to_device(torch::from_blob(accepted.data(), col_shape_, torch::dtype(torch::kBool)),
                         torch::dtype(torch::kBool).device(options_.device()));
    }
    const torch::Tensor u_old = u;
    const torch::Tensor k_first = k[0];
    u = all_moved ? unew : at::where(mask, unew, u);
    std::vector<double> t_after(B);
    for (int64_t b = 0; b < B; ++b) {
      t_after[b] = accepted[b] ? tnew[b] : t[b];
      if (accepted[b] && lands[b]) ++stop_idx[b];
    }

    // Save points each accepted sample passed: inside its step (interpolated with its own theta)
    // or at its end (u_new itself).
    std::vector<std::vector<std::pair<int64_t, double>>> inside(B);
    std::vector<int64_t> at_end;
    size_t most_inside = 0;
    for (int64_t b = 0; b < B; ++b) {
      if (!accepted[b]) continue;
      int64_t& j = save_idx[b];
      while (j < nsave && dir * (saveat[j] - tnew[b]) < 0) {
        inside[b].push_back({j, (saveat[j] - t[b]) / hh[b]});
        ++j;
      }
      most_inside = std::max(most_inside, inside[b].size());
      if (j < nsave && saveat[j] == tnew[b]) {
        at_end.push_back(j * B + b);
        ++j;
      }
    }

    // f at the new states: the last stage (FSAL), or evaluated when the next step or the Hermite
    // interpolant needs it. For samples that did not move it is f at their unchanged state.
    int64_t still_active = 0;
    for (int64_t b = 0; b < B; ++b)
      if (active[b] && !(accepted[b] && lands[b] && stop_idx[b] == stops.size())) ++still_active;
    torch::Tensor knew;
    if (fsal) {
      knew = all_moved ? k[s - 1] : at::where(mask, k[s - 1], k1);
    } else if (still_active > 0 || (most_inside > 0 && !own_dense)) {
      knew = eval(to_state(t_after, {B}), u);
    }

    if (most_inside > 0) {
      // All of this iteration's interpolations at once: rank r of every sample's save points
      // inside its step is row r of one block [m, B, ...], the per-sample weights [m, nw, B]
      // applied to the stacked terms [nw, B, ...]. Broadcast and summed while the product is
      // small (cheaper than many tiny matrix products); a batched product [B, m, nw] x
      // [B, nw, N] for large states.
      DenseStep step;
      step.u0 = u_old;
      step.u1 = unew;
      step.k = own_dense ? k : std::vector<torch::Tensor>{k_first, knew};
      const std::vector<torch::Tensor> terms = detail::interpolation_terms(tab_, step);
      const int64_t nw = static_cast<int64_t>(detail::num_weights(tab_));
      const int64_t m = static_cast<int64_t>(most_inside);
      const int64_t n_per = u_old.numel() / B;
      const bool broadcast = m * nw * B * n_per <= (int64_t{1} << 20);
      std::vector<double> w(static_cast<size_t>(B * m * nw), 0.0), wb(static_cast<size_t>(nw));
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t r = 0; r < static_cast<int64_t>(inside[b].size()); ++r) {
          const auto [j, theta] = inside[b][r];
          detail::interpolation_weights(tab_, theta, hh[b], wb.data());
          for (int64_t i = 0; i < nw; ++i)
            w[broadcast ? (r * nw + i) * B + b : (b * m + r) * nw + i] = wb[i];
          piece_of[j * B + b] = rows_held + r;
        }
      }
      const torch::Tensor stacked = at::stack(terms);  // [nw, B, ...]
      std::vector<int64_t> shape{m};
      shape.insert(shape.end(), u_old.sizes().begin(), u_old.sizes().end());
      torch::Tensor y;
      if (broadcast) {
        std::vector<int64_t> wshape{m, nw};
        wshape.insert(wshape.end(), col_shape_.begin(), col_shape_.end());
        y = (to_state(w, wshape) * stacked.unsqueeze(0)).sum(1);
      } else {
        y = at::bmm(to_state(w, {B, m, nw}), stacked.reshape({nw, B, -1}).transpose(0, 1))
                .transpose(0, 1)
                .reshape(shape);
      }
      // The own interpolant adds to u0; the Hermite basis already carries u0 and u1.
      pieces.push_back(own_dense ? y + u_old.unsqueeze(0) : y);
      rows_held += m;
    }
    if (!at_end.empty()) {
      for (int64_t idx : at_end) piece_of[idx] = rows_held;
      pieces.push_back(unew.unsqueeze(0));
      rows_held += 1;
    }

    for (int64_t b = 0; b < B; ++b) {
      if (!accepted[b]) continue;
      t[b] = tnew[b];
      if (lands[b] && stop_idx[b] == stops.size()) {
        active[b] = 0;
        --n_active;
      }
    }
    k1 = knew;
  }

  // Rows every sample reached (all of them unless a sample failed).
  const int64_t rows = *std::min_element(save_idx.begin(), save_idx.end());
  std::vector<double> out_t(saveat.begin(), saveat.begin() + rows);
  std::vector<torch::Tensor> out_u;
  if (rows > 0) {
    // Row r of sample b is row piece_of[r, b] * B + b of the blocks flattened to [rows_held * B,
    // N]: one index_select (whose backward is one index_add).
    std::vector<int64_t> flat(static_cast<size_t>(rows * B));
    for (int64_t i = 0; i < rows * B; ++i) flat[i] = piece_of[i] * B + i % B;
    const torch::Tensor all = at::cat(pieces);  // [rows_held, B, ...]
    const torch::Tensor which = indices_on(flat, all.device());
    std::vector<int64_t> shape{rows};
    shape.insert(shape.end(), all.sizes().begin() + 1, all.sizes().end());
    out_u.push_back(all.reshape({rows_held * B, -1}).index_select(0, which).reshape(shape));
  }
  stats_.naccept = std::accumulate(naccept_.begin(), naccept_.end(), int64_t{0});
  stats_.nreject = std::accumulate(nreject_.begin(), nreject_.end(), int64_t{0});
  std::vector<DenseStep> no_steps;
  return detail::assemble_solution(code_, message_, stats_, out_t, out_u, no_steps, u.sizes().vec(),
                                   options_, /*rows=*/false, /*dense=*/false, &tab_, dir);
}

}  // namespace

PerSampleSolution solve_per_sample(const BatchDynamics& f, const torch::Tensor& u0,
                                   const torch::Tensor& tspan, const SolveOptions& options) {
  TORCH_CHECK_TYPE(static_cast<bool>(f), "f (the dynamics) is empty");
  TORCH_CHECK_TYPE(u0.defined(), "u0 is undefined");
  TORCH_CHECK_VALUE(u0.dim() >= 1 && u0.size(0) >= 1,
                    "per_sample needs a batched state u0 of shape [B, ...] (the leading "
                    "dimension is the batch of independent samples), got shape ",
                    u0.sizes());
  const std::string& m = options.method;
  TORCH_CHECK_VALUE(!is_stiff_method(m) && !is_adams_method(m) && !stiff::is_implicit_fixed(m),
                    "per_sample supports the explicit adaptive methods (", adaptive_method_list(),
                    "), not '", m, "'");
  TORCH_CHECK_VALUE(options.norm_prefix == 0,
                    "per_sample takes no norm_prefix (each sample's norm covers its whole state)");
  const Tableau& tab = tableau(m);  // unknown names: an error listing the methods
  TORCH_CHECK_VALUE(tab.adaptive() && options.adaptive, "per_sample needs adaptive steps, but ",
                    tab.adaptive() ? "adaptive=false was given" : "'" + m + "' takes fixed steps",
                    ": with fixed steps every sample takes the same steps, so solve without "
                    "per_sample (adaptive methods: ",
                    adaptive_method_list(), ")");
  TORCH_CHECK_VALUE(options.saveat.defined(),
                    "per_sample needs saveat: the samples step at different times, so there are "
                    "no common step times to save at (give the save times; each sample "
                    "interpolates its own steps there)");
  TORCH_CHECK_VALUE(!options.dense,
                    "per_sample does not keep dense output (dense=true); give saveat instead");
  TORCH_CHECK_VALUE(!options.jac, "jac is used by the stiff methods only, not by per_sample");
  TORCH_CHECK_VALUE(!options.nonstiff,
                    "per_sample does not take a split problem (nonstiff); pass the sum as f");

  const int64_t B = u0.size(0);
  // f at one time shared by every sample: for the checks and the time-gradient terms.
  Dynamics common_time = [&f, B](double t, const torch::Tensor& u) {
    return f(at::full({B}, t, u.options()), u);
  };
  const detail::Prepared prep = detail::prepare(common_time, u0, tspan, options);
  PerSampleSolution out;
  out.solution = detail::solve_with_time_terms(
      common_time, u0, tspan, options, prep, [&](const torch::Tensor& u) {
        PerSampleIntegrator integ(f, *prep.tab, options);
        Solution sol = integ.run(u, prep.t0, prep.t1, prep.saveat);
        out.sample_stats = integ.sample_stats();
        return sol;
      });
  return out;
}

}  // namespace diffeqlayers
