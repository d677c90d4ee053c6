// The explicit Runge-Kutta loop on host arrays and the discrete adjoint's reversal of its steps:
// see host_rk.h for when they run and why.
#include "integrate/host_rk.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "core/host_loops.h"
#include "core/lincomb.h"
#include "integrate/explicit_loop.h"
#include "integrate/interpolation.h"

namespace diffeqlayers::detail {
namespace {

template <typename T>
const HostFunctions<T>& functions(const HostDynamics& host);
template <>
const HostFunctions<float>& functions<float>(const HostDynamics& host) {
  return host.f32;
}
template <>
const HostFunctions<double>& functions<double>(const HostDynamics& host) {
  return host.f64;
}

// Linear combinations as the tensor loop makes them: lincomb(u, {k_j : w_j != 0}, {h w_j})
// runs combine_loop over [u, k_j...] with weights [1, h w_j...] rounded to T.
template <typename T>
class Combiner {
 public:
  explicit Combiner(int64_t n) : n_(n) {}

  // out = u + h sum_{j < nk} w[j] k_j over the nonzero weights, k_j = k + j n (u may be null:
  // just the sum; no nonzero weight: u itself, or zeros).
  void stage(T* out, const T* u, double h, const std::vector<double>& w, const T* k, size_t nk) {
    begin();
    if (u) add(u, 1.0);
    for (size_t j = 0; j < nk; ++j)
      if (w[j] != 0.0) add(k + static_cast<int64_t>(j) * n_, h * w[j]);
    into(out);
  }

  void begin() {
    src_.clear();
    w_.clear();
  }
  void add(const T* x, double w) {
    src_.push_back(x);
    w_.push_back(static_cast<T>(w));
  }
  bool empty() const { return src_.empty(); }
  // out = the combination added so far (out may alias no term); zeros when there is none,
  // the term itself when its weight is 1.
  void into(T* out) {
    if (src_.empty()) {
      std::fill(out, out + n_, T(0));
    } else if (src_.size() == 1 && w_[0] == T(1)) {
      if (out != src_[0]) std::memcpy(out, src_[0], sizeof(T) * static_cast<size_t>(n_));
    } else {
      combine_loop<T>(out, src_, w_, 0, n_);
    }
  }

 private:
  int64_t n_;
  std::vector<const T*> src_;
  std::vector<T> w_;
};

// A plain tensor holding a copy of n values.
template <typename T>
torch::Tensor to_tensor(const T* x, const std::vector<int64_t>& shape,
                        const torch::TensorOptions& opts) {
  torch::Tensor out = at::empty(shape, opts);
  std::memcpy(out.mutable_data_ptr<T>(), x, sizeof(T) * static_cast<size_t>(out.numel()));
  return out;
}

template <typename T>
Solution run(const HostFunctions<T>& hf, const Dynamics& f, const Tableau& tab,
             const SolveOptions& o, const torch::Tensor& u0, double t0, double t1,
             const std::vector<double>& saveat, Tape* tape) {
  const int64_t n = u0.numel();
  const std::vector<int64_t> shape = u0.sizes().vec();
  const torch::TensorOptions opts = u0.options();
  const int dir = t1 > t0 ? 1 : -1;
  const bool adaptive = tab.adaptive() && o.adaptive;
  const auto s = static_cast<size_t>(tab.stages());
  const bool fsal = tab.fsal();
  const bool every = saveat.empty();
  const std::vector<double> stops = step_stops(o, tab, t0, t1, saveat);
  size_t stop_idx = 0;
  Stats stats;
  stats.host_loop = true;
  Combiner<T> comb(n);

  std::vector<T> u(u0.const_data_ptr<T>(), u0.const_data_ptr<T>() + n), unew(n), y(n), kn(n);
  // The stages, stacked: k_i = kb + i n (one matrix for the interpolation's product).
  std::vector<T> kstack(s * static_cast<size_t>(n));
  T* const kb = kstack.data();
  auto k = [&](size_t i) { return kb + static_cast<int64_t>(i) * n; };
  // [u0, u1, f0, f1] stacked, for the cubic Hermite interpolant's matrix product (states beyond
  // kLoopInterpolationMax; smaller ones are interpolated by a loop over the four arrays).
  std::vector<T> hermite(
      tab.has_dense() || n <= kLoopInterpolationMax ? 0 : 4 * static_cast<size_t>(n));

  // Saved rows: every step's state (grown), or one row per save time (allocated once).
  std::vector<double> out_t;
  std::vector<T> rows;
  torch::Tensor out;
  std::vector<int64_t> out_shape{static_cast<int64_t>(saveat.size())};
  out_shape.insert(out_shape.end(), shape.begin(), shape.end());
  if (!every) out = at::empty(out_shape, opts);
  T* out_data = every ? nullptr : out.mutable_data_ptr<T>();
  auto save_row = [&](double ts, const T* x) {
    if (every) {
      rows.insert(rows.end(), x, x + n);
    } else {
      std::memcpy(out_data + static_cast<int64_t>(out_t.size()) * n, x,
                  sizeof(T) * static_cast<size_t>(n));
    }
    out_t.push_back(ts);
  };
  size_t save_idx = 0;
  if (!every) {
    out_t.reserve(saveat.size());
    if (tape) tape->saves.reserve(saveat.size());
  }
  if (every) {
    if (o.save_start) {
      save_row(t0, u.data());
      if (tape) tape->saves.push_back({-1, 0.0});
    }
  } else {
    while (save_idx < saveat.size() && dir * (saveat[save_idx] - t0) <= 0) {
      save_row(saveat[save_idx++], u.data());
      if (tape) tape->saves.push_back({-1, 0.0});
    }
  }
  double t = t0;
  double h_next = 0.0;

  auto finish = [&](ReturnCode code, const std::string& msg) {
    if (tape) {
      tape->u_end = to_tensor(u.data(), shape, opts);
      tape->t_end = t;
    }
    Solution sol;
    sol.retcode = code;
    sol.message = msg;
    sol.stats = stats;
    sol.t = torch::tensor(out_t, torch::dtype(torch::kFloat64));
    const auto m = static_cast<int64_t>(out_t.size());
    if (every) {
      std::vector<int64_t> rs{m};
      rs.insert(rs.end(), shape.begin(), shape.end());
      sol.u = m > 0 ? to_tensor(rows.data(), rs, opts) : at::empty(rs, opts);
    } else {
      sol.u = m == out.size(0) ? out : out.narrow(0, 0, m).clone();
    }
    sol.dt_next = h_next;
    return sol;
  };
  auto fail = [&](ReturnCode code, double dt, const std::string& why) {
    const std::string msg = failure_message(tab.name, code, t, dt, why, stats);
    if (o.throw_on_failure) throw SolverError(code, t, dt, msg);
    return finish(code, msg);
  };

  // Stages kept for the discrete adjoint (Tape::host_stages): f's kept values at each stage of
  // the current step (stage 0's carried over from the previous step's end, as k_0 is).
  const size_t ks =
      tape && tape->keep_host_stages && tape->store_states && tape->cap == 0 && hf.f_keep
          ? static_cast<size_t>(hf.kept_size(n))
          : 0;
  std::vector<T> kept(s * ks), kept_new(ks);
  size_t kept_bytes = 0;
  // y = f(ti, yi), keeping f's values in `keep` when stages are kept.
  auto eval = [&](double ti, const T* yi, T* y, T* keep) {
    if (ks > 0) {
      hf.f_keep(ti, n, yi, y, keep);
    } else {
      hf.f(ti, n, yi, y);
    }
    ++stats.nfe;
  };

  eval(t, u.data(), k(0), kept.data());
  if (o.check_finite && (!all_finite_loop(k(0), n) || !all_finite_loop(u.data(), n)))
    return fail(ReturnCode::Unstable, 0.0,
                "the initial state or f(t0, u0) is not finite (NaN/Inf)");

  // The tensor loop's first step, on views of the host arrays; its trial evaluation of f by the
  // host function (bitwise f's, and without f's tensor ops).
  const Dynamics host_f = [&](double ti, const torch::Tensor& x) {
    if (!(x.numel() == n && x.is_contiguous() && plain_cpu(x, opts.dtype().toScalarType())))
      return f(ti, x);
    torch::Tensor y = at::empty_like(x);
    hf.f(ti, n, x.const_data_ptr<T>(), y.mutable_data_ptr<T>());
    return y;
  };
  double h = first_step(host_f, tab, o, t0, t1, torch::from_blob(u.data(), shape, opts),
                        torch::from_blob(k(0), shape, opts), {}, stats.nfe);

  StepController controller(o.controller, tab.controller_order());
  double fixed_base = t0;
  int64_t fixed_n = 0;
  int64_t last_nonfinite = -1000;
  // The error estimate's nonzero weights.
  std::vector<size_t> err_idx;
  for (size_t j = 0; j < s; ++j)
    if (!tab.b_err.empty() && tab.b_err[j] != 0.0) err_idx.push_back(j);
  std::vector<const T*> ke;
  std::vector<T> we;
  const auto nw = static_cast<int64_t>(num_weights(tab));
  std::vector<double> thetas;
  std::vector<T> wt;  // interpolation weights in T

  while (t != t1) {
    if (stats.naccept + stats.nreject >= o.max_num_steps)
      return fail(ReturnCode::MaxIters, dir * h, max_steps_why(o));
    if ((adaptive && (h < o.dt_min || t + dir * h == t)) || !(h > 0)) {
      const bool unstable = stats.naccept + stats.nreject - last_nonfinite <= 50;
      return fail(unstable ? ReturnCode::Unstable : ReturnCode::DtLessThanMin, dir * h,
                  underflow_why(o, unstable));
    }
    const auto [tnew, hh, lands] =
        step_target(adaptive, t, h, dir, stops[stop_idx], fixed_base, fixed_n);

    // The stages; with FSAL the last stage point is the new state.
    for (size_t i = 1; i < s; ++i) {
      T* yi = fsal && i + 1 == s ? unew.data() : y.data();
      comb.stage(yi, u.data(), hh, tab.a[i], kb, i);
      eval(t + tab.c[i] * hh, yi, k(i), kept.data() + i * ks);
    }
    if (!fsal) comb.stage(unew.data(), u.data(), hh, tab.b, kb, s);

    if (adaptive) {
      ke.clear();
      we.clear();
      for (size_t j : err_idx) {
        ke.push_back(k(j));
        we.push_back(static_cast<T>(hh * tab.b_err[j]));
      }
      // Over the leading norm_prefix elements when given (SolveOptions), as the tensor loop.
      const int64_t nn = o.norm_prefix > 0 ? o.norm_prefix : n;
      const double total = error_sum_sq<T>(ke, we, u.data(), unew.data(), static_cast<T>(o.atol),
                                           static_cast<T>(o.rtol), 0, nn);
      // kernels::error_norm returns the norm in the state's dtype.
      const auto err =
          static_cast<double>(static_cast<T>(std::sqrt(total / static_cast<double>(nn))));
      bool finite = !o.check_finite || all_finite_loop(unew.data(), n);
      finite = finite && std::isfinite(err);
      if (!finite) last_nonfinite = stats.naccept + stats.nreject;
      if (!control_step(controller, o, err, finite, hh, lands, h, h_next)) {
        ++stats.nreject;
        continue;
      }
    } else if (o.check_finite && !all_finite_loop(unew.data(), n)) {
      return fail(ReturnCode::Unstable, hh,
                  "the state became non-finite (NaN/Inf); try a smaller dt");
    }
    ++stats.naccept;
    if (tape) {
      const bool keep = tape->keeps(tape->steps());
      tape->record(t, hh, keep ? to_tensor(u.data(), shape, opts) : torch::Tensor(),
                   torch::Tensor());
      const size_t bytes = s * (static_cast<size_t>(n) + ks) * sizeof(T);
      if (ks > 0 && kept_bytes + bytes <= Tape::kHostStageBytes) {
        torch::Tensor st = at::empty({static_cast<int64_t>(bytes / sizeof(T))}, opts);
        T* d = st.mutable_data_ptr<T>();
        std::memcpy(d, kb, s * static_cast<size_t>(n) * sizeof(T));
        std::memcpy(d + s * static_cast<size_t>(n), kept.data(), s * ks * sizeof(T));
        tape->host_stages.emplace(tape->steps() - 1, std::move(st));
        kept_bytes += bytes;
      }
    }
    const int64_t step_idx = stats.naccept - 1;

    // f at the new state: the last stage (FSAL), or evaluated now when the next step or the
    // Hermite interpolant needs it.
    const bool last = lands && stop_idx + 1 == stops.size();
    const bool needs_interp =
        !every && save_idx < saveat.size() && dir * (saveat[save_idx] - tnew) < 0;
    const T* knew = nullptr;
    if (fsal) {
      knew = k(s - 1);
    } else if (!last || (needs_interp && !tab.has_dense())) {
      eval(tnew, unew.data(), kn.data(), kept_new.data());
      knew = kn.data();
    }

    if (every) {
      save_row(tnew, unew.data());
      if (tape) tape->saves.push_back({step_idx, 1.0});
    } else {
      // The save points inside the step, as interpolate_many computes them (the same matrix
      // product, so the same rounding): W [m, weights] times the stacked terms, plus u0 for the
      // own interpolant.
      thetas.clear();
      while (save_idx < saveat.size() && dir * (saveat[save_idx] - tnew) < 0) {
        const double ts = saveat[save_idx++];
        thetas.push_back((ts - t) / hh);
        if (tape) tape->saves.push_back({step_idx, thetas.back()});
        out_t.push_back(ts);
      }
      if (!thetas.empty()) {
        const auto m = static_cast<int64_t>(thetas.size());
        std::vector<double> w(static_cast<size_t>(m * nw));
        for (int64_t r = 0; r < m; ++r)
          interpolation_weights(tab, thetas[static_cast<size_t>(r)], hh, w.data() + r * nw);
        // The weights rounded to T here, as the tensor loop's .to(dtype) rounds them, without a
        // conversion op per step.
        wt.resize(w.size());
        for (size_t e = 0; e < w.size(); ++e) wt[e] = static_cast<T>(w[e]);
        T* dst = out_data + (static_cast<int64_t>(out_t.size()) - m) * n;
        if (n <= kLoopInterpolationMax) {
          std::vector<const T*> terms;
          if (tab.has_dense()) {
            for (int64_t j = 0; j < nw; ++j) terms.push_back(kb + j * n);
          } else {
            terms = {u.data(), unew.data(), k(0), knew};
          }
          interpolate_rows_loop<T>(dst, terms, wt.data(), m, tab.has_dense() ? u.data() : nullptr,
                                   n);
        } else {
          const torch::Tensor W = torch::from_blob(wt.data(), {m, nw}, opts);
          const T* terms = kb;
          if (!tab.has_dense()) {
            const T* basis[4] = {u.data(), unew.data(), k(0), knew};
            for (int64_t j = 0; j < 4; ++j)
              std::memcpy(hermite.data() + j * n, basis[j], sizeof(T) * static_cast<size_t>(n));
            terms = hermite.data();
          }
          const torch::Tensor R =
              at::mm(W, torch::from_blob(const_cast<T*>(terms), {nw, n}, opts)).contiguous();
          const T* r = R.const_data_ptr<T>();
          if (tab.has_dense()) {
            for (int64_t e = 0; e < m * n; ++e) dst[e] = r[e] + u[static_cast<size_t>(e % n)];
          } else {
            std::memcpy(dst, r, sizeof(T) * static_cast<size_t>(m * n));
          }
        }
      }
      if (save_idx < saveat.size() && saveat[save_idx] == tnew) {
        save_row(saveat[save_idx++], unew.data());
        if (tape) tape->saves.push_back({step_idx, 1.0});
      }
    }

    t = tnew;
    std::swap(u, unew);
    if (knew != nullptr) {
      std::memcpy(k(0), knew, sizeof(T) * static_cast<size_t>(n));
      if (ks > 0)
        std::memcpy(kept.data(), fsal ? kept.data() + (s - 1) * ks : kept_new.data(),
                    sizeof(T) * ks);
    }
    if (!adaptive) ++fixed_n;
    if (lands) {
      ++stop_idx;
      fixed_base = t;
      fixed_n = 0;
    }
  }
  return finish(ReturnCode::Success, "");
}

// The reverse of one step (reverse_step_by_vjp's formulas, adjoint.cpp) on host arrays: lam
// (dL/du1 on entry) becomes dL/du at the step's start; the parameter products are added into
// dparams. G holds the incoming gradients of the save points inside the step at thetas.
template <typename T>
class StepReverser {
 public:
  StepReverser(const HostFunctions<T>& hf, const Tableau& tab, int64_t n, AdjointStats& stats)
      : hf_(hf),
        tab_(tab),
        n_(n),
        ns_(static_cast<size_t>(tab.stages())),
        stats_(stats),
        comb_(n),
        y_(ns_, std::vector<T>(static_cast<size_t>(n))),
        k_(ns_ * static_cast<size_t>(n)),
        kept_(hf.f_keep ? ns_ : 0,
              std::vector<T>(hf.f_keep ? static_cast<size_t>(hf.kept_size(n)) : 0)),
        ybar_(ns_, std::vector<T>(static_cast<size_t>(n))),
        q_(num_weights(tab), std::vector<T>(static_cast<size_t>(n))),
        u1bar_(n),
        kbar_(n),
        fu_(n),
        tmp_(n) {}

  // stored: the step's stages and f's kept values at them from the forward loop
  // (Tape::host_stages), or null: then the stages are evaluated again here.
  void reverse(double t, double h, const T* u, std::vector<T>& lam,
               const std::vector<double>& thetas, const std::vector<const T*>& G,
               const std::vector<T*>& dparams, const T* stored) {
    const Tableau& tab = tab_;
    const bool own = tab.has_dense();
    const size_t m = thetas.size();
    const size_t ws = q_.size();
    const size_t ks = kept_.empty() ? 0 : kept_[0].size();
    // What stage i's product reads: the stages (stacked) and, where kept, f's values at stage i.
    const T* kp = stored ? stored : k_.data();
    std::vector<const T*> kept_at(ns_, nullptr);
    for (size_t i = 0; i < ns_; ++i) {
      comb_.stage(y_[i].data(), u, h, tab.a[i], kp, i);
      if (stored) {
        kept_at[i] = stored + ns_ * static_cast<size_t>(n_) + i * ks;
        continue;
      }
      // The last stage of an FSAL method feeds only the interpolant.
      if (i + 1 < ns_ || m > 0 || !tab.fsal()) {
        T* ki = k_.data() + static_cast<int64_t>(i) * n_;
        if (hf_.f_keep) {
          hf_.f_keep(t + tab.c[i] * h, n_, y_[i].data(), ki, kept_[i].data());
          kept_at[i] = kept_[i].data();
        } else {
          hf_.f(t + tab.c[i] * h, n_, y_[i].data(), ki);
        }
        ++stats_.nfe;
      }
    }
    // Q_q = sum_r W[r][q] G_r.
    if (m > 0) {
      std::vector<double> w(ws * m);
      for (size_t r = 0; r < m; ++r) interpolation_weights(tab, thetas[r], h, w.data() + r * ws);
      for (size_t q = 0; q < ws; ++q) {
        comb_.begin();
        for (size_t r = 0; r < m; ++r) comb_.add(G[r], w[r * ws + q]);
        comb_.into(q_[q].data());
      }
    }
    // u1bar = lam (+ Q_1 and, Hermite without FSAL, the u-product of f(t + h, u1) with Q_3).
    const bool hermite = m > 0 && !own;
    if (hermite && !tab.fsal()) {
      comb_.stage(tmp_.data(), u, h, tab.b, kp, ns_);
      product(t + h, tmp_.data(), q_[3].data(), kbar_.data(), dparams);
    }
    comb_.begin();
    comb_.add(lam.data(), 1.0);
    if (hermite) comb_.add(q_[1].data(), 1.0);
    if (hermite && !tab.fsal()) comb_.add(kbar_.data(), 1.0);
    comb_.into(u1bar_.data());
    std::vector<bool> have(ns_, false);
    for (size_t i = ns_; i-- > 0;) {
      comb_.begin();
      if (m > 0 && own) comb_.add(q_[i].data(), 1.0);
      if (hermite && i == 0) comb_.add(q_[2].data(), 1.0);
      if (hermite && tab.fsal() && i + 1 == ns_) comb_.add(q_[3].data(), 1.0);
      if (tab.b[i] != 0.0) comb_.add(u1bar_.data(), h * tab.b[i]);
      for (size_t j = i + 1; j < ns_; ++j)
        if (have[j] && tab.a[j][i] != 0.0) comb_.add(ybar_[j].data(), h * tab.a[j][i]);
      if (comb_.empty()) continue;
      comb_.into(kbar_.data());
      if (kept_at[i]) {
        hf_.vjp_kept(n_, y_[i].data(), kept_at[i], kbar_.data(), ybar_[i].data(), dparams);
        ++stats_.nvjp;
        ++stats_.nvjp_native;
      } else {
        product(t + tab.c[i] * h, y_[i].data(), kbar_.data(), ybar_[i].data(), dparams);
      }
      have[i] = true;
    }
    // dL/du = u1bar + (sum_r G_r [own] or Q_0 [Hermite]) + sum_i ybar_i.
    comb_.begin();
    comb_.add(u1bar_.data(), 1.0);
    if (m > 0 && own) {
      std::fill(tmp_.begin(), tmp_.end(), T(0));
      for (size_t r = 0; r < m; ++r)
        for (int64_t e = 0; e < n_; ++e) tmp_[static_cast<size_t>(e)] += G[r][e];
      comb_.add(tmp_.data(), 1.0);
    } else if (m > 0) {
      comb_.add(q_[0].data(), 1.0);
    }
    for (size_t i = 0; i < ns_; ++i)
      if (have[i]) comb_.add(ybar_[i].data(), 1.0);
    comb_.into(lam.data());
  }

 private:
  // ybar = kbar^T df/dy at (t, y); the parameter products added into dparams.
  void product(double t, const T* y, const T* kbar, T* ybar, const std::vector<T*>& dparams) {
    hf_.vjp(t, n_, y, kbar, fu_.data(), ybar, dparams);
    ++stats_.nfe;
    ++stats_.nvjp;
    ++stats_.nvjp_native;
  }

  const HostFunctions<T>& hf_;
  const Tableau& tab_;
  int64_t n_;
  size_t ns_;
  AdjointStats& stats_;
  Combiner<T> comb_;
  std::vector<std::vector<T>> y_;
  std::vector<T> k_;                  // the stages, stacked
  std::vector<std::vector<T>> kept_;  // per stage, what f_keep kept for its product
  std::vector<std::vector<T>> ybar_, q_;
  std::vector<T> u1bar_, kbar_, fu_, tmp_;
};

template <typename T>
void backward(const HostDynamics& host, const Tableau& tab, const Tape& tape,
              const std::vector<std::vector<std::pair<int64_t, double>>>& rows,
              const std::function<torch::Tensor(int64_t)>& state,
              const std::function<void(int64_t)>& release, const torch::Tensor& Gc,
              const std::vector<T*>& dparams, int64_t n, std::vector<T>& lam, AdjointStats& stats) {
  StepReverser<T> rev(functions<T>(host), tab, n, stats);
  const T* G = Gc.defined() ? Gc.const_data_ptr<T>() : nullptr;
  auto add_row = [&](int64_t row) {
    for (int64_t e = 0; e < n; ++e) lam[static_cast<size_t>(e)] += G[row * n + e];
  };
  std::vector<double> thetas;
  std::vector<const T*> Gr;
  for (int64_t j = tape.steps() - 1; j >= 0; --j) {
    thetas.clear();
    Gr.clear();
    if (G)
      for (const auto& [row, theta] : rows[static_cast<size_t>(j + 1)]) {
        if (theta == 1.0) {
          add_row(row);
        } else {
          thetas.push_back(theta);
          Gr.push_back(G + row * n);
        }
      }
    const torch::Tensor uj = state(j).contiguous();
    const auto ju = static_cast<size_t>(j);
    const auto kept = tape.host_stages.find(j);
    rev.reverse(tape.t[ju], tape.h[ju], uj.const_data_ptr<T>(), lam, thetas, Gr, dparams,
                kept != tape.host_stages.end() ? kept->second.const_data_ptr<T>() : nullptr);
    ++stats.replayed_steps;
    release(j);
  }
  if (G)
    for (const auto& [row, theta] : rows[0]) add_row(row);
}

// Off: every solve runs on tensors (set_host_loop_enabled, for benchmarks).
std::atomic<bool> host_loop_on{true};

}  // namespace

void set_host_loop_enabled(bool on) { host_loop_on.store(on); }

namespace {

// What either host loop needs of a solve: switched on, the default norm, no dense output, a
// float or double state without a forward-mode tangent.
bool host_loop_possible(const SolveOptions& o, const torch::Tensor& u0) {
  return host_loop_on.load(std::memory_order_relaxed) && !o.norm && !o.dense && u0.defined() &&
         (u0.scalar_type() == at::kFloat || u0.scalar_type() == at::kDouble) &&
         !u0._fw_grad(/*level=*/0).defined();
}

}  // namespace

bool host_loop_applies(const SolveOptions& o, const torch::Tensor& u0) {
  if (!o.host || !host_loop_possible(o, u0)) return false;
  if (!o.host->applies || !o.host->applies(u0)) return false;
  if (at::GradMode::is_enabled()) {
    if (u0.requires_grad()) return false;
    for (const auto& p : o.host->params)
      if (p.defined() && p.requires_grad()) return false;
  }
  return true;
}

namespace {

// Thrown by tensor_host's f where the tensor path must run instead.
struct NeedsTensorPath {};

// The largest state the tensor f adapter takes: beyond it the tensor loop's ops are no longer
// dominated by their fixed cost.
constexpr int64_t kTensorHostMax = 1024;

template <typename T>
HostFunctions<T> tensor_host(const Dynamics& f, const torch::Tensor& u0) {
  HostFunctions<T> h;
  h.f = [f, shape = u0.sizes().vec(), opts = u0.options()](double t, int64_t n, const T* u, T* y) {
    // A fresh tensor per call, as the tensor loop's stages are: f may keep or change it.
    torch::Tensor x = to_tensor(u, shape, opts);
    int64_t counted = 0;  // the host loop counts its evaluations itself
    const torch::Tensor out = checked_eval(f, t, x, counted);
    if (out.requires_grad() || out._fw_grad(/*level=*/0).defined()) throw NeedsTensorPath{};
    const torch::Tensor c = out.contiguous();
    std::memcpy(y, c.const_data_ptr<T>(), sizeof(T) * static_cast<size_t>(n));
  };
  return h;
}

}  // namespace

bool host_integrate_tensor_f(const Dynamics& f, const Tableau& tab, const SolveOptions& o,
                             const torch::Tensor& u0, double t0, double t1,
                             const std::vector<double>& saveat, Tape* tape, Solution& sol) {
  if (o.host || !host_loop_possible(o, u0) || at::GradMode::is_enabled() || !u0.device().is_cpu() ||
      u0.numel() > kTensorHostMax)
    return false;
  const Tape before = tape ? *tape : Tape();
  const torch::Tensor uc = u0.contiguous();
  try {
    if (uc.scalar_type() == at::kFloat) {
      sol = run<float>(tensor_host<float>(f, uc), f, tab, o, uc, t0, t1, saveat, tape);
    } else {
      sol = run<double>(tensor_host<double>(f, uc), f, tab, o, uc, t0, t1, saveat, tape);
    }
  } catch (const NeedsTensorPath&) {
    if (tape) *tape = before;
    return false;
  }
  return true;
}

Solution host_integrate(const Dynamics& f, const Tableau& tab, const SolveOptions& o,
                        const torch::Tensor& u0, double t0, double t1,
                        const std::vector<double>& saveat, Tape* tape) {
  at::NoGradGuard no_grad;
  const torch::Tensor uc = u0.contiguous();
  if (uc.scalar_type() == at::kFloat)
    return run<float>(o.host->f32, f, tab, o, uc, t0, t1, saveat, tape);
  return run<double>(o.host->f64, f, tab, o, uc, t0, t1, saveat, tape);
}

bool host_discrete_backward(const HostDynamics& host, const Tableau& tab, const Tape& tape,
                            const std::vector<std::vector<std::pair<int64_t, double>>>& rows,
                            const std::function<torch::Tensor(int64_t)>& state,
                            const std::function<void(int64_t)>& release, const torch::Tensor& G,
                            const std::vector<torch::Tensor>& wrt,
                            const std::vector<int64_t>& shape, torch::Tensor& lam,
                            std::vector<torch::Tensor>& gp, AdjointStats& stats) {
  if (!host_loop_on.load(std::memory_order_relaxed) || !tape.u_end.defined() || !host.applies ||
      !host.applies(tape.u_end))
    return false;
  const auto dtype = tape.u_end.scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble) return false;
  if (G.defined() && (G.scalar_type() != dtype || !G.device().is_cpu())) return false;
  // The host products write into one buffer per host tensor: each differentiated tensor must be
  // one of them at most once (a tensor f does not read gets zeros, as a reverse pass gives).
  std::vector<int64_t> which;
  if (!positions_by_identity(wrt, host.params, which)) return false;
  for (size_t i = 0; i < wrt.size(); ++i)
    if (which[i] >= 0 &&
        (gp[i].scalar_type() != dtype || !gp[i].is_contiguous() || !gp[i].device().is_cpu()))
      return false;
  at::NoGradGuard no_grad;
  const torch::Tensor Gc = G.defined() ? G.contiguous() : G;
  const int64_t n = tape.u_end.numel();
  const torch::TensorOptions opts = tape.u_end.options();
  AT_DISPATCH_FLOATING_TYPES(dtype, "diffeqlayers_host_discrete_backward", [&] {
    std::vector<scalar_t*> dparams(host.params.size(), nullptr);
    for (size_t i = 0; i < wrt.size(); ++i)
      if (which[i] >= 0)
        dparams[static_cast<size_t>(which[i])] = gp[i].template mutable_data_ptr<scalar_t>();
    std::vector<scalar_t> lv(static_cast<size_t>(n), scalar_t(0));
    backward<scalar_t>(host, tab, tape, rows, state, release, Gc, dparams, n, lv, stats);
    lam = to_tensor(lv.data(), shape, opts);
  });
  stats.host_loop = true;
  return true;
}

}  // namespace diffeqlayers::detail
