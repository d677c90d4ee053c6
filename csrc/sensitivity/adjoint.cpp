// The adjoints (diffeq_adjoint): a C++ autograd Function whose forward runs the solve without
// recording a graph, keeping what its backward needs on a tape (integrate/tape.h), and whose
// backward solves the adjoint problem (interpolating, backsolve) or replays the solver's steps
// in reverse (discrete). See adjoint.h for what each one is and when to use it.
//
// Conventions. For a loss L of the saved rows u(t_i), lambda(t) = dL/du(t) obeys
//   dlambda/dt = -(df/du)^T lambda        between output times,
//   lambda(t_i^-) = lambda(t_i^+) + dL/du(t_i)   at each output time,
// and dL/dp = int_{t0}^{t1} lambda^T df/dp dt, carried as g with dg/dt = -(df/dp)^T lambda,
// g(t1) = 0, dL/dp = g(t0). The vector-Jacobian products lambda^T df/du and lambda^T df/dp come
// from one reverse-mode pass through one evaluation of f (vjp() below).
#include "diffeqlayers/adjoint.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "core/host_copy.h"
#include "core/host_loops.h"
#include "core/lincomb.h"
#include "diffeqlayers/adams.h"
#include "diffeqlayers/stiff.h"
#include "integrate/explicit_loop.h"
#include "integrate/host_rk.h"
#include "integrate/interpolation.h"
#include "integrate/tape.h"
#include "solvers/esdirk.h"
#include "solvers/jacobian.h"
#include "solvers/stiff.h"

namespace diffeqlayers {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

enum class Kind { Interpolating, Backsolve, Discrete };

const std::vector<std::string>& kind_names() {
  static const std::vector<std::string> names{"interpolating", "backsolve", "discrete"};
  return names;
}

Kind kind_of(const std::string& name) {
  const auto& names = kind_names();
  for (size_t i = 0; i < names.size(); ++i)
    if (names[i] == name) return static_cast<Kind>(i);
  TORCH_CHECK_VALUE(false, "unknown adjoint sensealg '", name,
                    "'; choose interpolating (the default), backsolve or discrete");
  return Kind::Interpolating;  // not reached
}

// Everything backward needs. The autograd graph keeps it alive (a capsule in saved_data), so
// the dynamics, the tape and the parameters live exactly as long as the graph.
struct AdjointState : torch::CustomClassHolder {
  Dynamics f;   // forward solve
  Dynamics fb;  // backward's calls
  SolveOptions options;
  // The discrete adjoint's replayed stiff steps: the stepper's f and options, with backward's
  // callbacks (for IMEX kencarp4, f_stiff, with f_nonstiff in replay_options.nonstiff, while f
  // and fb are the sum).
  Dynamics f_replay;
  SolveOptions replay_options;
  AdjointOptions adjoint;
  detail::Prepared prep;
  Kind kind = Kind::Interpolating;
  std::vector<torch::Tensor> params;  // as given: f uses these very tensors
  std::vector<int64_t> versions;      // their version counters at forward time
  detail::Tape tape;
  // A stiff forward solve (interpolating adjoint only): its whole dense output takes the place
  // of the tape's checkpoints and replays (the stiff steppers keep Jacobians and factorizations
  // across steps, so a step cannot be replayed alone). Memory: every step with its stages.
  std::shared_ptr<DenseOutput> fwd_dense;
  torch::Tensor out;  // the saved rows (backsolve resets u to them)
  std::vector<double> out_t;
  std::vector<int64_t> shape;  // of the state
  Solution meta;               // the forward solution without u (times, stats, retcode)
  std::shared_ptr<AdjointStats> stats = std::make_shared<AdjointStats>();
};

struct AdjointArgs {
  c10::intrusive_ptr<AdjointState> state;
};

// f(t, u) and the products lambda^T df/du, lambda^T df/dp_i (zeros where f does not use them):
// by f's own product (`native`, AdjointOptions::vjp) where it applies, else from one evaluation
// of f under grad mode and one reverse pass. With `into` (one fresh tensor per entry of wrt) the
// parameter products are added into it in place and dp stays empty.
struct Vjp {
  torch::Tensor fu, du;
  std::vector<torch::Tensor> dp;
};

Vjp vjp(const Dynamics& f, const DynamicsVjp& native, double t, const torch::Tensor& u,
        const torch::Tensor& lambda, const std::vector<torch::Tensor>& wrt, AdjointStats& stats,
        std::vector<torch::Tensor>* into = nullptr) {
  if (native) {
    Vjp r;
    std::vector<torch::Tensor>& dp = into ? *into : r.dp;
    if (native(t, u, lambda, wrt, r.fu, r.du, dp)) {
      TORCH_CHECK(
          r.fu.defined() && r.du.defined() && r.du.sizes() == u.sizes() && dp.size() == wrt.size(),
          "AdjointOptions::vjp returned true without setting fu, du (shaped like u) and "
          "one dp per differentiated tensor");
      ++stats.nfe;
      ++stats.nvjp;
      ++stats.nvjp_native;
      return r;
    }
  }
  at::AutoGradMode grad_on(true);
  torch::Tensor ul = u.detach().requires_grad_(true);
  torch::Tensor out = detail::checked_eval(f, t, ul, stats.nfe);
  ++stats.nvjp;
  Vjp r;
  r.fu = out.detach();
  std::vector<torch::Tensor> inputs{ul};
  inputs.insert(inputs.end(), wrt.begin(), wrt.end());
  std::vector<torch::Tensor> grads(inputs.size());
  if (out.requires_grad())
    grads = torch::autograd::grad({out}, inputs, {lambda}, /*retain_graph=*/false,
                                  /*create_graph=*/false, /*allow_unused=*/true);
  r.du = grads[0].defined() ? grads[0] : at::zeros_like(u);
  for (size_t i = 0; i < wrt.size(); ++i) {
    const torch::Tensor& g = grads[i + 1];
    if (!into)
      r.dp.push_back(g.defined() ? g : at::zeros_like(wrt[i]));
    else if (g.defined())
      (*into)[i].add_(g);
  }
  return r;
}

torch::Tensor flat_cat(const std::vector<torch::Tensor>& ts, const torch::TensorOptions& opts) {
  if (ts.empty()) return at::empty({0}, opts);
  std::vector<torch::Tensor> flat;
  flat.reserve(ts.size());
  for (const auto& t : ts) flat.push_back(t.reshape({-1}).to(opts.dtype()));
  return at::cat(flat);
}

// The Jacobian of the interpolating adjoint's right-hand side for a stiff backward solve: with
// y = [lambda, g] and y' = [-J^T lambda, -Jp^T lambda] (J = df/du, Jp = df/dp at u(t)),
//   dy'/dy = [[-J^T, 0], [-Jp^T, 0]]   ((m + np) x (m + np)),
// column i of its first block column being -(row i of [J | Jp]): the reverse passes of every
// f_i through one recorded evaluation of f, batched into one (stiff::batched_vjps) where they
// can be, else m passes.
torch::Tensor adjoint_jacobian(const Dynamics& f, double t, const torch::Tensor& u,
                               const std::vector<torch::Tensor>& wrt, int64_t np,
                               const torch::TensorOptions& opts, AdjointStats& stats) {
  const int64_t m = u.numel();
  torch::Tensor A = at::zeros({m + np, m + np}, opts);
  at::AutoGradMode grad_on(true);
  torch::Tensor ul = u.detach().requires_grad_(true);
  torch::Tensor out = detail::checked_eval(f, t, ul, stats.nfe).reshape({-1});
  if (!out.requires_grad()) return A;
  std::vector<torch::Tensor> inputs{ul};
  inputs.insert(inputs.end(), wrt.begin(), wrt.end());
  std::vector<torch::Tensor> grads;
  if (stiff::batched_vjps(out, inputs, at::eye(m, out.options().requires_grad(false)), grads)) {
    stats.nvjp += m;
    std::vector<torch::Tensor> parts;  // [m (seed), m + np]
    for (size_t k = 0; k < grads.size(); ++k)
      parts.push_back(grads[k].reshape({m, -1}).to(opts.dtype()));
    A.narrow(1, 0, m).copy_(at::cat(parts, 1).t().neg());
    return A;
  }
  std::vector<torch::Tensor> cols;
  cols.reserve(static_cast<size_t>(m));
  for (int64_t i = 0; i < m; ++i) {
    torch::Tensor seed = at::zeros({m}, out.options().requires_grad(false));
    seed[i] = 1.0;
    std::vector<torch::Tensor> gr = torch::autograd::grad({out}, inputs, {seed},
                                                          /*retain_graph=*/true,
                                                          /*create_graph=*/false,
                                                          /*allow_unused=*/true);
    ++stats.nvjp;
    std::vector<torch::Tensor> parts;
    parts.push_back(gr[0].defined() ? gr[0].reshape({-1}) : at::zeros({m}, opts));
    for (size_t k = 0; k < wrt.size(); ++k)
      parts.push_back(gr[k + 1].defined() ? gr[k + 1].reshape({-1}) : at::zeros_like(wrt[k]));
    cols.push_back(flat_cat(parts, opts).neg());
  }
  A.narrow(1, 0, m).copy_(at::stack(cols, 1));
  return A;
}

// The forward solution replayed from the tape's checkpoints: the state at the start of any
// accepted step, and u(t) anywhere in the solved span from the dense output of its step.
// Two levels, so that memory stays bounded by the checkpoints plus one segment of states: a
// state that is not a checkpoint is recomputed with the states of its whole segment (from the
// checkpoint before it up to the next one; with one checkpoint per step there is nothing to
// recompute), and a step's dense data (its stages) is recomputed from its state when first
// needed and kept in a small cache. Backward walks against the direction of integration, so
// the entries farthest along it are dropped first.
class Replay {
 public:
  Replay(const AdjointState& s, AdjointStats& stats) : s_(s), tape_(s.tape), stats_(stats) {
    dir_ = s.prep.t1 > s.prep.t0 ? 1 : -1;
  }

  torch::Tensor state(int64_t j) {
    auto it = tape_.checkpoints.find(j);
    if (it != tape_.checkpoints.end()) return it->second;
    auto st = states_.find(j);
    if (st == states_.end()) {
      fill_states(j);
      st = states_.find(j);
    }
    return st->second;
  }

  const DenseStep& step(int64_t j) {
    auto it = dense_.find(j);
    if (it == dense_.end()) {
      TORCH_CHECK(j >= 0 && j < tape_.steps(), "internal: replay of step ", j, " of ",
                  tape_.steps());
      const torch::Tensor u = state(j);
      host_terms_.erase(j);  // a step made anew: its terms' data with it
      at::NoGradGuard no_grad;
      const auto ju = static_cast<size_t>(j);
      it = dense_
               .emplace(j, detail::replay_step(s_.fb, *s_.prep.tab, tape_.t[ju], tape_.h[ju], u,
                                               /*dense=*/true, stats_.nfe))
               .first;
      ++stats_.replayed_steps;
    }
    return it->second;
  }

  // u(t) from the dense output of the step holding t. A method whose interpolant is much less
  // accurate than its steps (cubic Hermite on dopri8's long steps: the criterion by which the
  // forward solve steps onto save points) gets u(t) from a step of the method itself from the
  // step's start to t instead: accurate to the method's order, at the cost of its stages.
  torch::Tensor at(double t) {
    if (s_.fwd_dense) {
      at::NoGradGuard no_grad;
      return (*s_.fwd_dense)(
          std::clamp(t, std::min(s_.prep.t0, tape_.t_end), std::max(s_.prep.t0, tape_.t_end)));
    }
    const Point p = point(t);
    const DenseStep& st = *p.st;
    const Tableau& tab = *s_.prep.tab;
    torch::Tensor u;
    if (p.by_step) {
      at::NoGradGuard no_grad;
      std::vector<torch::Tensor> k(static_cast<size_t>(tab.stages()));
      k[0] = st.k[0];  // f(t_j, u_j), kept by the replay for the Hermite interpolant
      u = detail::rk_step(s_.fb, tab, st.t0, t - st.t0, st.u0, k, stats_.nfe);
    } else {
      u = interpolate(tab, st, p.theta);
    }
    trim(p.j);
    return u;
  }

  // at(t) into out (m elements) by host loops, computed as the combination at(t) makes
  // (combine_loop, the weights rounded to T): where the step's dense output is the method's own
  // interpolant or the cubic Hermite one on contiguous CPU tensors of m elements. False (nothing
  // written) where at(t) must run instead.
  template <typename T>
  bool at_host(double t, int64_t m, T* out) {
    if (s_.fwd_dense) return false;
    const Point p = point(t);
    if (p.by_step) return false;
    const DenseStep& st = *p.st;
    const double theta = p.theta;
    const Tableau& tab = *s_.prep.tab;
    const auto dtype = c10::CppTypeToScalarType<T>::value;
    auto readable = [&](const torch::Tensor& x) {
      return x.numel() == m && x.is_contiguous() && plain_cpu(x, dtype);
    };
    if (theta == 0.0 || theta == 1.0) {
      const torch::Tensor& x = theta == 0.0 ? st.u0 : st.u1;
      if (!readable(x)) return false;
      std::memcpy(out, x.const_data_ptr<T>(), sizeof(T) * static_cast<size_t>(m));
    } else {
      // The terms of interpolation_terms, read in place (the own interpolant adds them to u0),
      // their data looked up once per step. Scratch kept per thread: this runs per stage.
      const std::vector<const void*>& terms = host_terms(p.j, st, readable);
      if (terms.empty()) return false;
      const size_t nw = detail::num_weights(tab);
      const size_t lead = tab.has_dense() ? 1 : 0;
      thread_local std::vector<double> w;
      thread_local std::vector<const T*> src;
      thread_local std::vector<T> sw;
      w.resize(nw);
      src.clear();
      sw.clear();
      detail::interpolation_weights(tab, theta, st.h, w.data());
      for (size_t i = 0; i < terms.size(); ++i) {
        src.push_back(static_cast<const T*>(terms[i]));
        sw.push_back(i < lead ? T(1) : static_cast<T>(w[i - lead]));
      }
      detail::combine_loop<T>(out, src, sw, 0, m);
    }
    trim(p.j);
    return true;
  }

  // Drops what is kept for steps from index j on.
  void release_from(int64_t j) {
    states_.erase(states_.lower_bound(j), states_.end());
    dense_.erase(dense_.lower_bound(j), dense_.end());
    host_terms_.erase(host_terms_.lower_bound(j), host_terms_.end());
  }

 private:
  // Where u(t) comes from: the step j holding t, theta in it, and whether a step of the method
  // from the step's start makes it (by_step; see at()) rather than the step's interpolant.
  struct Point {
    int64_t j;
    const DenseStep* st;
    double theta;
    bool by_step;
  };
  Point point(double t) {
    const int64_t j = locate(t);
    const DenseStep& st = step(j);
    const double theta = std::clamp((t - st.t0) / st.h, 0.0, 1.0);
    const Tableau& tab = *s_.prep.tab;
    return {j, &st, theta, theta > 0.0 && theta < 1.0 && !tab.has_dense() && tab.order > 4};
  }

  // Dense steps kept: enough for a backward step (or a rejected one) that spans several
  // forward steps, few enough that their stages cost little memory.
  static constexpr int64_t kDenseBudget = 32;

  // The step whose span holds t: the last one starting strictly before t (the first if none).
  int64_t locate(double t) const {
    const auto& ts = tape_.t;
    auto it = std::partition_point(ts.begin(), ts.end(),
                                   [&](double start) { return dir_ * (start - t) < 0; });
    const int64_t idx = static_cast<int64_t>(it - ts.begin()) - 1;
    return std::max<int64_t>(idx, 0);
  }

  // The states at the start of every step of the segment holding step j.
  void fill_states(int64_t j) {
    TORCH_CHECK(j >= 0 && j < tape_.steps(), "internal: replay of step ", j, " of ", tape_.steps());
    auto next = tape_.checkpoints.upper_bound(j);
    TORCH_CHECK(next != tape_.checkpoints.begin(), "internal: no checkpoint before step ", j);
    auto start = std::prev(next);
    const int64_t end = std::min(next == tape_.checkpoints.end() ? tape_.steps() : next->first,
                                 j + 1);  // the states up to j are all backward will ask for
    at::NoGradGuard no_grad;
    torch::Tensor u = start->second;
    for (int64_t i = start->first; i < end; ++i) {
      if (i > start->first) states_[i] = u;
      if (i + 1 == end) break;
      const auto iu = static_cast<size_t>(i);
      u = detail::replay_step(s_.fb, *s_.prep.tab, tape_.t[iu], tape_.h[iu], u, false, stats_.nfe)
              .u1;
      ++stats_.replayed_steps;
    }
  }

  // The data of step j's interpolation terms for at_host ([u0,] interpolation_term(i)...), or
  // empty where one is not readable by host loops (then at() runs); kept with the step.
  template <typename Readable>
  const std::vector<const void*>& host_terms(int64_t j, const DenseStep& st,
                                             const Readable& readable) {
    auto it = host_terms_.find(j);
    if (it != host_terms_.end()) return it->second;
    const Tableau& tab = *s_.prep.tab;
    std::vector<const void*> terms;
    bool ok = !tab.has_dense() || readable(st.u0);
    if (ok && tab.has_dense()) terms.push_back(st.u0.const_data_ptr());
    for (size_t i = 0; ok && i < detail::num_weights(tab); ++i) {
      const torch::Tensor& x = detail::interpolation_term(tab, st, i);
      ok = readable(x);
      if (ok) terms.push_back(x.const_data_ptr());
    }
    if (!ok) terms.clear();
    return host_terms_.emplace(j, std::move(terms)).first->second;
  }

  void trim(int64_t current) {
    while (static_cast<int64_t>(dense_.size()) > kDenseBudget) {
      auto last = std::prev(dense_.end());
      if (last->first <= current) break;
      host_terms_.erase(last->first);
      dense_.erase(last);
    }
    states_.erase(states_.upper_bound(current + kDenseBudget), states_.end());
  }

  const AdjointState& s_;
  const detail::Tape& tape_;
  AdjointStats& stats_;
  int dir_ = 1;
  std::map<int64_t, torch::Tensor> states_;                 // recomputed states (not checkpoints)
  std::map<int64_t, std::vector<const void*>> host_terms_;  // see host_terms
  std::map<int64_t, DenseStep> dense_;                      // recomputed steps with their stages
};

// rodas5's error estimate does not see f's explicit dependence on t: the last row of its matrix
// Gamma (U_8 = sum_j gamma_8j k_j, the estimate) is zero before stage 6 and sums to zero over
// stages 6 to 8, which all sit at t + h, so for f = f(t) the estimate vanishes whatever the
// step (rosenbrock.cpp). The adjoint system depends on t through u(t), and rodas5 gave gradients
// 2x off on a stiff linear test with its estimate blind to u(t)'s transient; rodas5p and
// rosenbrock23 estimate that error and are right.
bool time_blind_estimate(const std::string& m) { return m == "rodas5"; }

// The tensors among the parameters that get gradients, and their positions.
std::vector<size_t> grad_params(const std::vector<torch::Tensor>& params) {
  std::vector<size_t> idx;
  for (size_t i = 0; i < params.size(); ++i)
    if (params[i].defined() && params[i].is_floating_point() && params[i].requires_grad())
      idx.push_back(i);
  return idx;
}

struct Grads {
  torch::Tensor u0;
  std::vector<torch::Tensor> params;  // per entry of grad_params()
};

// The adjoint's right-hand side on host arrays, for dynamics with host functions (the built-in
// MLP): interpolating, [lambda, g]' = -[lambda^T df/du, lambda^T df/dp] with u(t) from the
// replay's dense output by host loops (Replay::at_host); backsolve, [u, lambda, g]' = [f(u),
// -lambda^T df/du, -lambda^T df/dp]. The backward solve then runs the host loop
// (integrate/host_rk.h) with one host vector-Jacobian product per evaluation, written straight
// into the derivative, in place of a tensor product, a concatenation and their allocations: the
// same values as the tensor right-hand side, bitwise. `where[i]`: the position of wrt[i] among
// the host function's parameters (-1: f does not read it, its product is zero).
template <typename T>
HostFunctions<T> adjoint_rhs_host(const HostFunctions<T>& hf, Replay* replay, int64_t m,
                                  const std::vector<int64_t>& where,
                                  const std::vector<int64_t>& offsets, size_t nhost,
                                  AdjointStats& stats) {
  HostFunctions<T> out;
  // Backsolve carries u in front ([u, lambda, g]); interpolating replays it.
  const int64_t lead = replay != nullptr ? 0 : m;
  out.f = [&hf, replay, m, lead, where, offsets, nhost, &stats,
           fu = std::vector<T>(static_cast<size_t>(m)), ut = std::vector<T>(static_cast<size_t>(m)),
           dp = std::vector<T*>(nhost)](double t, int64_t n, const T* z, T* y) mutable {
    const T* u = z;
    T* f = fu.data();
    torch::Tensor ukeep;  // u(t) as a tensor where the host loops cannot make it
    if (replay != nullptr) {
      u = ut.data();
      if (!replay->at_host<T>(t, m, ut.data())) {
        ukeep = replay->at(t).contiguous();
        u = ukeep.const_data_ptr<T>();
      }
    } else {
      f = y;  // f(u) is the derivative of u
    }
    T* d = y + lead;                // lambda's derivative, then g's
    std::fill(d + m, y + n, T(0));  // the products are added into these
    std::fill(dp.begin(), dp.end(), nullptr);
    for (size_t i = 0; i < where.size(); ++i)
      if (where[i] >= 0) dp[static_cast<size_t>(where[i])] = d + m + offsets[i];
    hf.vjp(t, m, u, z + lead, f, d, dp);
    for (int64_t i = lead; i < n; ++i) y[i] = -y[i];
    ++stats.nfe;
    ++stats.nvjp;
    ++stats.nvjp_native;
  };
  return out;
}

// Interpolating and backsolve: the adjoint ODE solved backwards between output times.
Grads backward_continuous(AdjointState& s, const torch::Tensor& G) {
  AdjointStats& stats = *s.stats;
  const detail::Tape& tape = s.tape;
  const bool backsolve = s.kind == Kind::Backsolve;
  const auto opts = s.out.options();
  const std::vector<size_t> gi = grad_params(s.params);
  std::vector<torch::Tensor> wrt;
  for (size_t i : gi) wrt.push_back(s.params[i]);
  int64_t m = 1;
  for (int64_t d : s.shape) m *= d;
  int64_t np = 0;
  for (const auto& w : wrt) np += w.numel();

  // The backward solve's options.
  SolveOptions bo;
  bo.method = s.adjoint.method.empty() ? s.options.method : s.adjoint.method;
  // rodas5 forward hands the backward solve to rodas5p (time_blind_estimate).
  if (s.adjoint.method.empty() && time_blind_estimate(bo.method)) bo.method = "rodas5p";
  // A stiff backward solve (interpolating only; every stiff method is adaptive).
  const bool b_stiff = is_stiff_method(bo.method);
  bo.rtol = s.adjoint.rtol >= 0 ? s.adjoint.rtol : s.options.rtol;
  bo.atol = s.adjoint.atol >= 0 ? s.adjoint.atol : s.options.atol;
  bo.adaptive = s.options.adaptive;
  const bool b_adaptive = (b_stiff || tableau(bo.method).adaptive()) && bo.adaptive;
  bo.dt = b_adaptive ? 0.0 : s.options.dt;
  TORCH_CHECK_VALUE(b_adaptive || bo.dt > 0, "the adjoint's backward solve uses the fixed-step ",
                    "method '", bo.method, "': give the forward solve a step size dt");
  bo.dt_min = s.options.dt_min;
  bo.dt_max = s.options.dt_max;
  bo.max_num_steps = s.options.max_num_steps;
  bo.controller = s.options.controller;
  bo.check_finite = true;
  bo.throw_on_failure = true;
  bo.save_start = false;
  // The channels the error control sees: [u,] lambda, and g unless seminorm.
  // The explicit methods take that seminorm as the RMS norm's prefix (also on host arrays), the
  // stiff ones as a norm.
  const int64_t controlled = (backsolve ? 2 * m : m) + (s.adjoint.seminorm ? 0 : np);
  if (s.adjoint.seminorm && np > 0 && !b_stiff) bo.norm_prefix = controlled;
  if (s.adjoint.seminorm && np > 0 && b_stiff)
    bo.norm = [controlled](const torch::Tensor& scaled) {
      return detail::rms_norm(scaled, controlled);
    };

  Replay replay(s, stats);
  const Dynamics& fb = s.fb;
  Dynamics aug;
  if (backsolve) {
    aug = [&](double t, const torch::Tensor& y) {
      torch::Tensor u = y.narrow(0, 0, m).view(s.shape);
      torch::Tensor lam = y.narrow(0, m, m).view(s.shape);
      Vjp r = vjp(fb, s.adjoint.vjp, t, u, lam, wrt, stats);
      return at::cat({r.fu.reshape({-1}), -r.du.reshape({-1}), -flat_cat(r.dp, opts)});
    };
  } else {
    aug = [&](double t, const torch::Tensor& y) {
      torch::Tensor lam = y.narrow(0, 0, m).view(s.shape);
      Vjp r = vjp(fb, s.adjoint.vjp, t, replay.at(t), lam, wrt, stats);
      return at::cat({-r.du.reshape({-1}), -flat_cat(r.dp, opts)});
    };
    if (b_stiff)
      bo.jac = [&](double t, const torch::Tensor&) {
        return adjoint_jacobian(fb, t, replay.at(t), wrt, np, opts, stats);
      };
  }
  // The same right-hand side on host arrays where f has host functions (see adjoint_rhs_host):
  // an explicit backward method, the RMS norm (seminorm: over a prefix), a forward replayed from
  // the tape, and each differentiated tensor at most once among f's parameters.
  std::vector<int64_t> where;
  std::shared_ptr<HostDynamics> aug_host;
  const HostDynamics* fh = s.options.host.get();
  const int64_t lead = backsolve ? m : 0;  // backsolve carries u in front of lambda
  if (!b_stiff && !bo.norm && !s.fwd_dense && fh != nullptr && fh->applies &&
      tape.u_end.defined() && fh->applies(tape.u_end) && !tape.u_end.requires_grad() &&
      positions_by_identity(wrt, fh->params, where)) {
    std::vector<int64_t> offsets;
    int64_t off = 0;
    for (const auto& w : wrt) {
      offsets.push_back(off);
      off += w.numel();
    }
    const auto dtype = tape.u_end.scalar_type();
    aug_host = std::make_shared<HostDynamics>();
    aug_host->applies = [size = lead + m + np, dtype](const torch::Tensor& y) {
      return y.numel() == size && y.scalar_type() == dtype && y.device().is_cpu();
    };
    const size_t nhost = fh->params.size();
    Replay* rp = backsolve ? nullptr : &replay;
    if (dtype == at::kFloat && fh->f32.vjp)
      aug_host->f32 = adjoint_rhs_host<float>(fh->f32, rp, m, where, offsets, nhost, stats);
    else if (dtype == at::kDouble && fh->f64.vjp)
      aug_host->f64 = adjoint_rhs_host<double>(fh->f64, rp, m, where, offsets, nhost, stats);
    else
      aug_host.reset();
    bo.host = aug_host;
  }

  torch::Tensor lam = at::zeros(s.shape, opts);
  torch::Tensor g = at::zeros({np}, opts);
  torch::Tensor u = tape.u_end;
  double cur = tape.t_end;
  // Until the first output's gradient arrives, lambda is exactly zero and so is its right-hand
  // side (linear in lambda): nothing to solve. (A span ending past the last save time, such as
  // ROBER to 1e11 saved at t <= 10, would otherwise start the backward solve at 1e11 with the
  // automatic first step of a zero state, 1e-6, below the time's rounding: step size underflow.)
  bool zero = true;
  // One interval of the backward solve: its failure named as the adjoint's, its steps counted,
  // and the step size it reached carried on to the next interval.
  auto backward_interval = [&](const std::function<Solution()>& run) {
    Solution r;
    try {
      r = run();
    } catch (const SolverError& e) {
      throw SolverError(e.code, e.t, e.dt,
                        std::string("the backward solve of the ") +
                            kind_names()[static_cast<size_t>(s.kind)] +
                            " adjoint failed: " + e.what());
    }
    stats.naccept += r.stats.naccept;
    stats.nreject += r.stats.nreject;
    if (b_adaptive && r.dt_next > 0) bo.dt = r.dt_next;
    return r;
  };
  auto integrate_to = [&](double tb) {
    if (tb == cur) return;
    if (zero) {
      cur = tb;  // backsolve: u is reset to the saved value there
      return;
    }
    std::vector<torch::Tensor> parts;
    if (backsolve) parts.push_back(u.reshape({-1}));
    parts.push_back(lam.reshape({-1}));
    parts.push_back(g);
    torch::Tensor y = at::cat(parts);
    bo.saveat = torch::tensor({tb}, torch::dtype(torch::kFloat64));
    const Solution r = backward_interval([&] { return solve(aug, y, cur, tb, bo); });
    if (aug_host && r.stats.host_loop) stats.host_loop = true;
    torch::Tensor yb = r.u[-1];
    int64_t off = 0;
    if (backsolve) {
      u = yb.narrow(0, 0, m).view(s.shape);
      off = m;
    }
    lam = yb.narrow(0, off, m).view(s.shape);
    g = yb.narrow(0, off + m, np);
    cur = tb;
  };
  const int64_t n = static_cast<int64_t>(s.out_t.size());
  // With the right-hand side on host arrays: the whole walk over the output times there too, on
  // one state [u (backsolve), lambda, g] (u reset to the saved rows and the jumps lambda +=
  // dL/du(t_i) by loops, each interval the host loop called directly), as the tensor walk below
  // computes it, without its tensor ops per interval.
  const int64_t size = lead + m + np;
  const auto dtype = opts.dtype().toScalarType();
  const torch::Tensor Gc = G.defined() && aug_host ? G.contiguous() : G;
  const torch::Tensor rows = backsolve && aug_host ? s.out.contiguous() : torch::Tensor();
  torch::Tensor y = aug_host ? at::zeros({size}, opts) : torch::Tensor();
  if (aug_host && (!Gc.defined() || plain_cpu(Gc, dtype)) &&
      (!rows.defined() || plain_cpu(rows, dtype)) && detail::host_loop_applies(bo, y)) {
    const Tableau& btab = tableau(bo.method);
    detail::check_step_options(bo, btab.adaptive() && bo.adaptive, btab.name);
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "diffeqlayers_adjoint_walk", [&] {
      scalar_t* z = y.mutable_data_ptr<scalar_t>();
      auto integrate_host = [&](double tb) {
        if (tb == cur) return;
        if (zero) {
          cur = tb;
          return;
        }
        const Solution r = backward_interval(
            [&] { return detail::host_integrate(aug, btab, bo, y, cur, tb, {tb}, nullptr); });
        stats.host_loop = true;
        const torch::Tensor last = r.u.contiguous();
        std::memcpy(z, last.const_data_ptr<scalar_t>() + (last.numel() - size),
                    sizeof(scalar_t) * static_cast<size_t>(size));
        cur = tb;
      };
      const scalar_t* gd = Gc.defined() ? Gc.const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* saved = rows.defined() ? rows.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* zl = z + lead;
      if (saved != nullptr)  // u at the end: the tape's, as the tensor walk starts
        std::memcpy(z, tape.u_end.contiguous().const_data_ptr<scalar_t>(),
                    sizeof(scalar_t) * static_cast<size_t>(m));
      for (int64_t i = n - 1; i >= 0; --i) {
        integrate_host(s.out_t[static_cast<size_t>(i)]);
        if (saved != nullptr)
          std::memcpy(z, saved + i * m, sizeof(scalar_t) * static_cast<size_t>(m));
        if (gd != nullptr) {
          for (int64_t k = 0; k < m; ++k) zl[k] = zl[k] + gd[i * m + k];
          zero = false;
        }
      }
      integrate_host(s.prep.t0);
    });
    lam = y.narrow(0, lead, m).view(s.shape);
    g = y.narrow(0, lead + m, np);
  } else {
    for (int64_t i = n - 1; i >= 0; --i) {
      integrate_to(s.out_t[static_cast<size_t>(i)]);
      if (backsolve) u = s.out[i];
      if (G.defined()) {
        lam = lam + G[i];
        zero = false;
      }
    }
    integrate_to(s.prep.t0);
  }

  Grads out;
  out.u0 = lam;
  int64_t off = 0;
  for (const auto& w : wrt) {
    out.params.push_back(g.narrow(0, off, w.numel()).view(w.sizes()).to(w.scalar_type()));
    off += w.numel();
  }
  return out;
}

// The reverse of one explicit Runge-Kutta step by f's own vector-Jacobian products
// (AdjointOptions::vjp; vjp() falls back to autograd per call where the hook declines). For the
// step from u of size h,
//   y_i = u + h sum_{l<i} a_il k_l,  k_i = f(t + c_i h, y_i),  u1 = u + h sum_i b_i k_i,
// and its save points u(theta_r): the own interpolant u + sum_i w_ri k_i, or the cubic Hermite
// one w_r0 u + w_r1 u1 + w_r2 f(t, u) + w_r3 f(t + h, u1) (f(t + h, u1) = k_s for FSAL methods,
// one more evaluation of f otherwise). Given lam = dL/du1 and G_r = dL/du(theta_r), with
// Q = W^T G (W: the m x n weights, one mm for all save points of the step), the stages are
// reversed last to first, each kbar_i one combination:
//   kbar_i = Q_i [own] + Q_2 [Hermite, i = 0] + Q_3 [Hermite FSAL, i = s] + h b_i u1bar
//            + sum_{j>i} h a_ji ybar_j,
//   (ybar_i, pbar_i) = vjp(y_i, kbar_i),
//   dL/du = u1bar + (sum_r G_r [own] or Q_0 [Hermite]) + sum_i ybar_i,  dL/dp += sum_i pbar_i,
// with u1bar = lam (+ Q_1 and, without FSAL, the u-product of f(t + h, u1) with Q_3 [Hermite]).
// For FSAL methods u1 is the last stage point and b its row of a; the formulas hold as written
// (b_s = 0). The stages are recomputed from u as the forward computed them.
torch::Tensor reverse_step_by_vjp(AdjointState& s, const std::vector<torch::Tensor>& wrt, double t,
                                  double h, const torch::Tensor& u, const torch::Tensor& lam,
                                  const std::vector<double>& thetas, const torch::Tensor& Gr,
                                  std::vector<torch::Tensor>& gp) {
  AdjointStats& stats = *s.stats;
  const Tableau& tab = *s.prep.tab;
  const bool own = tab.has_dense();
  const size_t ns = static_cast<size_t>(tab.stages());
  const auto m = static_cast<int64_t>(thetas.size());
  at::NoGradGuard no_grad;
  // ybar = kbar^T df/dy at (tt, yy), the parameter products added into gp (fresh zeros).
  auto product = [&](double tt, const torch::Tensor& yy, const torch::Tensor& kbar) {
    return vjp(s.fb, s.adjoint.vjp, tt, yy, kbar, wrt, stats, &gp).du;
  };
  std::vector<torch::Tensor> y(ns), k(ns);
  for (size_t i = 0; i < ns; ++i) {
    std::vector<torch::Tensor> terms;
    std::vector<double> w;
    for (size_t l = 0; l < i; ++l)
      if (tab.a[i][l] != 0.0) {
        terms.push_back(k[l]);
        w.push_back(h * tab.a[i][l]);
      }
    y[i] = terms.empty() ? u : lincomb(u, terms, w);
    // The last stage of an FSAL method feeds only the interpolant.
    if (i + 1 < ns || m > 0 || !tab.fsal())
      k[i] = detail::checked_eval(s.fb, t + tab.c[i] * h, y[i], stats.nfe);
  }
  const auto ws = static_cast<int64_t>(detail::num_weights(tab));
  std::vector<torch::Tensor> Q;  // row q: sum_r W[r][q] G_r, shaped like the state
  if (m > 0) {
    std::vector<double> w(static_cast<size_t>(m * ws));
    for (int64_t r = 0; r < m; ++r)
      detail::interpolation_weights(tab, thetas[static_cast<size_t>(r)], h, w.data() + r * ws);
    const torch::Tensor W = copy_to_device(w.data(), {m, ws}, lam.options());
    std::vector<int64_t> shape{ws};
    for (int64_t d : lam.sizes()) shape.push_back(d);
    Q = at::mm(W.t(), Gr.reshape({m, -1})).reshape(shape).unbind(0);
  }
  torch::Tensor u1bar = lam;
  if (m > 0 && !own) {
    std::vector<torch::Tensor> terms{Q[1]};
    std::vector<double> w{1.0};
    if (!tab.fsal()) {
      std::vector<double> b;
      for (double bi : tab.b) b.push_back(h * bi);
      terms.push_back(product(t + h, lincomb(u, k, b), Q[3]));
      w.push_back(1.0);
    }
    u1bar = lincomb(lam, terms, w);
  }
  std::vector<torch::Tensor> ybar(ns);
  std::vector<torch::Tensor> uterms{u1bar};
  if (m > 0) uterms.push_back(own ? Gr.sum(0) : Q[0]);
  for (size_t i = ns; i-- > 0;) {
    std::vector<torch::Tensor> terms;
    std::vector<double> w;
    if (m > 0 && own) {
      terms.push_back(Q[i]);
      w.push_back(1.0);
    }
    // Hermite: f(t, u) = k_0 and, FSAL, f(t + h, u1) = k_s.
    if (m > 0 && !own && i == 0) {
      terms.push_back(Q[2]);
      w.push_back(1.0);
    }
    if (m > 0 && !own && tab.fsal() && i + 1 == ns) {
      terms.push_back(Q[3]);
      w.push_back(1.0);
    }
    if (tab.b[i] != 0.0) {
      terms.push_back(u1bar);
      w.push_back(h * tab.b[i]);
    }
    for (size_t j = i + 1; j < ns; ++j)
      if (ybar[j].defined() && tab.a[j][i] != 0.0) {
        terms.push_back(ybar[j]);
        w.push_back(h * tab.a[j][i]);
      }
    if (terms.empty()) continue;
    const torch::Tensor kbar = lincomb(torch::Tensor(), terms, w);
    ybar[i] = product(t + tab.c[i] * h, y[i], kbar);
    uterms.push_back(ybar[i]);
  }
  return lincomb(torch::Tensor(), uterms, std::vector<double>(uterms.size(), 1.0));
}

// Reverses one replayed step: the vector-Jacobian product of lam with its end state u1 plus,
// where save rows lie inside the step (`inner`, interpolated into `inner_out`), of their
// incoming gradients G[inner]. Returns lam at the step's start ul; adds into gp (one per wrt).
torch::Tensor reverse_replayed_step(const torch::Tensor& ul, const torch::Tensor& u1,
                                    const torch::Tensor& inner_out,
                                    const std::vector<int64_t>& inner, const torch::Tensor& lam,
                                    const torch::Tensor& G, const std::vector<torch::Tensor>& wrt,
                                    std::vector<torch::Tensor>& gp) {
  std::vector<torch::Tensor> outs{u1}, gouts{lam};
  if (!inner.empty()) {
    outs.push_back(inner_out);
    gouts.push_back(G.index_select(0, indices_on(inner, G.device())));
  }
  std::vector<torch::Tensor> inputs{ul};
  inputs.insert(inputs.end(), wrt.begin(), wrt.end());
  std::vector<torch::Tensor> gr =
      torch::autograd::grad(outs, inputs, gouts, /*retain_graph=*/false,
                            /*create_graph=*/false, /*allow_unused=*/true);
  for (size_t i = 0; i < wrt.size(); ++i)
    if (gr[i + 1].defined()) gp[i] = gp[i] + gr[i + 1];
  return gr[0].defined() ? gr[0] : at::zeros_like(lam);
}

// Discrete with a stiff forward solve. A Rosenbrock step takes a fresh Jacobian at its own start
// point, so the accepted step is a function of (t, u, h) alone: each is replayed from the
// forward's dense output (which holds every step's start state) with the Jacobian's dependence
// on u and the parameters recorded (track), and reversed by autograd, last to first. A radau5 or
// ESDIRK step (Newton with Jacobians kept across steps) is rebuilt from the converged stages the
// dense output holds (SolveOptions::keep_stages for kvaerno5, trbdf2) by the exact Newton
// corrections diffeq_rd's forward pass takes (Stepper::replay). The save
// rows are assigned to steps exactly as the forward loop did (stiff_loop.cpp): a row inside a
// step comes from that step's interpolant, a row at a step's end is its end state.
// Cost per step: the step's stages and one Jacobian again, plus the reverse pass through them,
// which differentiates the Jacobian too (second derivatives of f, as diffeq_rd does).
Grads backward_discrete_stiff(AdjointState& s, const torch::Tensor& G) {
  AdjointStats& stats = *s.stats;
  const std::vector<size_t> gi = grad_params(s.params);
  std::vector<torch::Tensor> wrt;
  for (size_t i : gi) wrt.push_back(s.params[i]);
  std::vector<torch::Tensor> gp;
  for (const auto& w : wrt) gp.push_back(at::zeros_like(w));

  const std::vector<DenseStep>& steps = s.fwd_dense->steps();
  const auto nsteps = static_cast<int64_t>(steps.size());
  const int dir = s.prep.t1 >= s.prep.t0 ? 1 : -1;
  // rows[j + 1]: the rows step j produced (theta 1: its end state); rows[0]: rows at t0.
  std::vector<std::vector<std::pair<int64_t, double>>> rows(static_cast<size_t>(nsteps + 1));
  {
    size_t r = 0;
    const size_t nrows = s.out_t.size();
    while (r < nrows && dir * (s.out_t[r] - s.prep.t0) <= 0) rows[0].emplace_back(r++, 1.0);
    for (int64_t j = 0; j < nsteps && r < nrows; ++j) {
      const DenseStep& st = steps[static_cast<size_t>(j)];
      const double tnew = st.t0 + st.h;
      auto& here = rows[static_cast<size_t>(j + 1)];
      while (r < nrows && dir * (s.out_t[r] - tnew) < 0) {
        here.emplace_back(r, (s.out_t[r] - st.t0) / st.h);
        ++r;
      }
      if (r < nrows && s.out_t[r] == tnew) here.emplace_back(r++, 1.0);
    }
    TORCH_CHECK(r == nrows, "discrete adjoint: ", nrows - r,
                " saved rows lie beyond the forward solve's steps");
  }

  const stiff::MethodInfo& info = stiff::method_info(s.options.method);
  // kvaerno5 and trbdf2 interpolate save rows inside a step with the cubic Hermite interpolant on
  // f at both ends, as the forward loop did.
  const Tableau& interp = info.interpolant ? *info.interpolant : stiff::hermite();
  Stats step_stats;
  std::unique_ptr<stiff::Stepper> stepper =
      stiff::make_stepper(s.options.method, s.f_replay, s.replay_options, step_stats,
                          /*track=*/true);
  torch::Tensor lam = at::zeros(s.shape, s.out.options());
  for (int64_t j = nsteps - 1; j >= 0; --j) {
    const DenseStep& st = steps[static_cast<size_t>(j)];
    std::vector<int64_t> inner;
    std::vector<double> thetas;
    if (G.defined())
      for (const auto& [row, theta] : rows[static_cast<size_t>(j + 1)]) {
        if (theta == 1.0) {
          lam = lam + G[row];
        } else {
          inner.push_back(row);
          thetas.push_back(theta);
        }
      }
    at::AutoGradMode grad_on(true);
    torch::Tensor ul = st.u0.detach().requires_grad_(true);
    const int64_t nfe_before = step_stats.nfe;
    stiff::StepResult r = stepper->replay(st.t0, ul, st.h, st.k);
    TORCH_CHECK(r.failure.empty(), "discrete adjoint: replaying the step at t=", st.t0,
                ", dt=", st.h, " failed (", r.failure, ") where the forward solve took it");
    stats.nfe += step_stats.nfe - nfe_before;
    ++stats.replayed_steps;
    torch::Tensor inner_out;
    if (!inner.empty()) {
      std::vector<torch::Tensor> k = r.dense_terms;
      if (!info.interpolant) {
        k = {r.f0, stiff::eval_f(s.fb, st.t0 + st.h, r.unew, step_stats)};
        stats.nfe += 1;
      }
      DenseStep replayed{st.t0, st.h, ul, r.unew, k};
      inner_out = interpolate_many(interp, replayed, thetas);
    }
    lam = reverse_replayed_step(ul, r.unew, inner_out, inner, lam, G, wrt, gp);
  }
  if (G.defined())
    for (const auto& [row, theta] : rows[0]) lam = lam + G[row];
  return {lam, gp};
}

// Discrete: the solver's own steps replayed under autograd, last to first; or, for dynamics with
// their own vector-Jacobian product, reversed by hand (reverse_step_by_vjp: no autograd graph).
Grads backward_discrete(AdjointState& s, const torch::Tensor& G) {
  if (s.prep.stiff) return backward_discrete_stiff(s, G);
  AdjointStats& stats = *s.stats;
  const detail::Tape& tape = s.tape;
  const Tableau& tab = *s.prep.tab;
  const std::vector<size_t> gi = grad_params(s.params);
  std::vector<torch::Tensor> wrt;
  for (size_t i : gi) wrt.push_back(s.params[i]);
  std::vector<torch::Tensor> gp;
  for (const auto& w : wrt) gp.push_back(at::zeros_like(w));

  // The output rows of each step (index step + 1; 0 holds the rows equal to the initial state).
  const int64_t nsteps = tape.steps();
  std::vector<std::vector<std::pair<int64_t, double>>> rows(static_cast<size_t>(nsteps + 1));
  for (size_t r = 0; r < tape.saves.size(); ++r)
    rows[static_cast<size_t>(tape.saves[r].step + 1)].emplace_back(static_cast<int64_t>(r),
                                                                   tape.saves[r].theta);

  Replay replay(s, stats);
  torch::Tensor lam;
  // Dynamics on host arrays: every step reversed by host loops (integrate/host_rk.h).
  if (s.options.host &&
      detail::host_discrete_backward(
          *s.options.host, tab, tape, rows, [&](int64_t j) { return replay.state(j); },
          [&](int64_t j) { replay.release_from(j); }, G, wrt, s.shape, lam, gp, stats))
    return {lam, gp};
  lam = at::zeros(s.shape, s.out.options());
  const bool by_vjp = static_cast<bool>(s.adjoint.vjp);
  for (int64_t j = nsteps - 1; j >= 0; --j) {
    std::vector<int64_t> inner;
    std::vector<double> thetas;
    for (const auto& [row, theta] : rows[static_cast<size_t>(j + 1)]) {
      if (theta == 1.0) {
        if (G.defined()) lam = lam + G[row];
      } else {
        inner.push_back(row);
        thetas.push_back(theta);
      }
    }
    if (!G.defined()) {
      inner.clear();
      thetas.clear();
    }
    const torch::Tensor uj = replay.state(j);
    const auto ju = static_cast<size_t>(j);
    if (by_vjp) {
      torch::Tensor Gr =
          inner.empty() ? torch::Tensor() : G.index_select(0, indices_on(inner, G.device()));
      lam = reverse_step_by_vjp(s, wrt, tape.t[ju], tape.h[ju], uj, lam, thetas, Gr, gp);
      ++stats.replayed_steps;
      replay.release_from(j);
      continue;
    }
    at::AutoGradMode grad_on(true);
    torch::Tensor ul = uj.detach().requires_grad_(true);
    DenseStep st =
        detail::replay_step(s.fb, tab, tape.t[ju], tape.h[ju], ul, !inner.empty(), stats.nfe);
    ++stats.replayed_steps;
    const torch::Tensor inner_out =
        inner.empty() ? torch::Tensor() : interpolate_many(tab, st, thetas);
    lam = reverse_replayed_step(ul, st.u1, inner_out, inner, lam, G, wrt, gp);
    replay.release_from(j);
  }
  if (G.defined())
    for (const auto& [row, theta] : rows[0]) lam = lam + G[row];
  return {lam, gp};
}

struct AdjointFunction : public torch::autograd::Function<AdjointFunction> {
  // inputs: the start state, then the parameters.
  static torch::Tensor forward(AutogradContext* ctx, const AdjointArgs& args,
                               at::TensorList inputs) {
    AdjointState& s = *args.state;
    // The state at t0 is kept as a copy, safe from in-place changes of the caller's tensor.
    torch::Tensor u0 = inputs[0].detach().clone();
    s.shape = u0.sizes().vec();
    s.tape.store_states = s.kind != Kind::Backsolve;
    s.tape.cap = s.adjoint.checkpoints;
    s.tape.keep_host_stages = s.kind == Kind::Discrete;
    Solution sol;
    if (s.prep.stiff) {
      SolveOptions o = s.options;
      o.dense = true;
      o.keep_stages = s.kind == Kind::Discrete;  // the ESDIRK replay rebuilds steps from them
      sol = detail::integrate(s.f, u0, s.prep, o, nullptr);
      s.fwd_dense = sol.dense;
      sol.dense = nullptr;
      const auto& steps = s.fwd_dense->steps();
      s.tape.t_end = steps.empty() ? s.prep.t0 : steps.back().t0 + steps.back().h;
      s.stats->checkpoints = static_cast<int64_t>(steps.size());
    } else {
      sol = detail::integrate(s.f, u0, s.prep, s.options, &s.tape);
      s.stats->checkpoints = static_cast<int64_t>(s.tape.checkpoints.size());
    }
    s.out = sol.u.detach();
    s.out_t.assign(sol.t.data_ptr<double>(), sol.t.data_ptr<double>() + sol.t.numel());
    s.meta = sol;
    s.meta.u = torch::Tensor();
    for (const auto& p : s.params) s.versions.push_back(p.defined() ? p._version() : 0);
    ctx->saved_data["state"] = c10::IValue::make_capsule(args.state);
    return sol.u;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "diffeq_adjoint does not support differentiating twice (backward with "
                "create_graph=True); use diffeq_rd for higher derivatives");
    auto s = c10::static_intrusive_pointer_cast<AdjointState>(ctx->saved_data["state"].toCapsule());
    for (size_t i = 0; i < s->params.size(); ++i)
      TORCH_CHECK(!s->params[i].defined() || s->params[i]._version() == s->versions[i],
                  "parameter ", i,
                  " of the adjoint solve was modified in place after the forward solve (an "
                  "optimizer step before backward?); its gradient would be wrong");
    const torch::Tensor& G = grad_out[0];
    Grads g = s->kind == Kind::Discrete ? backward_discrete(*s, G) : backward_continuous(*s, G);
    s->stats->done = true;
    variable_list grads(s->params.size() + 2);  // the non-tensor argument, u0, the parameters
    grads[1] = g.u0;
    const std::vector<size_t> gi = grad_params(s->params);
    for (size_t i = 0; i < gi.size(); ++i) grads[gi[i] + 2] = g.params[i];
    return grads;
  }
};

}  // namespace

std::vector<std::string> adjoint_sensealgs() { return kind_names(); }

Solution solve_adjoint(const Dynamics& f, const torch::Tensor& u0, const torch::Tensor& tspan,
                       const std::vector<torch::Tensor>& params, const SolveOptions& options,
                       const AdjointOptions& adjoint) {
  // A split problem, as solve() takes it: kencarp4 steps forward as IMEX (f implicit, nonstiff
  // explicit); every other method solves the sum. Backward needs the whole right-hand side
  // (the adjoint system, the time terms) and, for kencarp4's replayed steps, the parts.
  Dynamics sum, sum_b;
  if (options.nonstiff) {
    TORCH_CHECK_TYPE(static_cast<bool>(f), "f (the dynamics) is empty");
    auto add = [](Dynamics a, Dynamics b) -> Dynamics {
      return [a, b](double t, const torch::Tensor& u) { return a(t, u) + b(t, u); };
    };
    sum = add(f, options.nonstiff);
    sum_b = add(adjoint.backward_dynamics ? adjoint.backward_dynamics : f,
                adjoint.backward_nonstiff ? adjoint.backward_nonstiff : options.nonstiff);
    if (options.method != "kencarp4") {
      SolveOptions o = options;
      o.nonstiff = Dynamics();
      AdjointOptions a = adjoint;
      a.backward_dynamics = sum_b;
      a.backward_nonstiff = Dynamics();
      a.vjp = nullptr;  // f's own product is not the sum's
      o.host = nullptr;
      return solve_adjoint(sum, u0, tspan, params, o, a);
    }
  }
  const bool split = static_cast<bool>(sum);
  const Kind kind = kind_of(adjoint.sensealg);
  SolveOptions o = options;
  o.params.insert(o.params.end(), params.begin(), params.end());
  const detail::Prepared prep = detail::prepare(f, u0, tspan, o);
  // A stiff forward solve: the interpolating adjoint, from the forward's dense output; the
  // discrete adjoint, which replays each step (Stepper::replay): a Rosenbrock step afresh, a
  // Newton method's (ESDIRK, radau5) from the converged stages the forward kept. A split (IMEX
  // kencarp4) step's stages mix f_stiff and f_nonstiff and are not replayed. Backsolve would
  // integrate the stiff problem backwards (unstable).
  TORCH_CHECK_VALUE(!prep.stiff || is_stiff_method(o.method), "the adjoints do not run the ",
                    is_adams_method(o.method) ? "Adams" : "fixed-step implicit", " method '",
                    o.method,
                    "' (the adaptive stiff methods run with sensealg='interpolating'); "
                    "use diffeq_rd with it");
  TORCH_CHECK_VALUE(!prep.stiff || kind == Kind::Interpolating || kind == Kind::Discrete,
                    "a stiff forward solve ('", o.method,
                    "') runs with sensealg='interpolating' or 'discrete', not '", adjoint.sensealg,
                    "' (backsolve would solve the stiff problem backwards, which is unstable)");
  // A stiff backward solve needs the Jacobian of the adjoint system, built for the
  // interpolating adjoint's [lambda, g] (backsolve would need second derivatives of f too).
  TORCH_CHECK_VALUE(
      adjoint.method.empty() || !is_stiff_method(adjoint.method) || kind == Kind::Interpolating,
      "a stiff adjoint_method ('", adjoint.method,
      "') runs with sensealg='interpolating' only, not '", adjoint.sensealg, "'");
  TORCH_CHECK_VALUE(!time_blind_estimate(adjoint.method),
                    "adjoint_method='rodas5' is refused: its error estimate does not see an "
                    "explicit dependence on t, and the adjoint system depends on t through the "
                    "forward solution u(t), so its steps are not controlled; use 'rodas5p' (or "
                    "kvaerno5)");
  TORCH_CHECK_VALUE(!o.dense,
                    "dense output carries no gradient under an adjoint; save the times you need "
                    "with saveat (or use diffeq_rd for a differentiable dense solution)");
  if (!adjoint.method.empty() && !is_stiff_method(adjoint.method))
    tableau(adjoint.method);  // throws for an unknown name
  TORCH_CHECK_VALUE(adjoint.rtol < 0 || std::isfinite(adjoint.rtol),
                    "adjoint_rtol must be a finite number, got ", adjoint.rtol);
  TORCH_CHECK_VALUE(adjoint.atol < 0 || std::isfinite(adjoint.atol),
                    "adjoint_atol must be a finite number, got ", adjoint.atol);
  TORCH_CHECK_VALUE(adjoint.checkpoints >= 0, "checkpoints must be non-negative, got ",
                    adjoint.checkpoints);
  for (size_t i = 0; i < params.size(); ++i)
    TORCH_CHECK_TYPE(params[i].defined(), "parameter ", i, " is undefined");

  bool wants_grad = u0.requires_grad() || tspan.requires_grad() ||
                    (o.saveat.defined() && o.saveat.requires_grad());
  for (const auto& p : params) wants_grad = wants_grad || p.requires_grad();
  if (!at::GradMode::is_enabled() || !wants_grad) return solve(f, u0, tspan, o);

  auto state = c10::make_intrusive<AdjointState>();
  state->f = f;
  state->fb = split ? sum_b : adjoint.backward_dynamics ? adjoint.backward_dynamics : f;
  state->options = o;
  state->f_replay = adjoint.backward_dynamics ? adjoint.backward_dynamics : f;
  state->replay_options = o;
  if (adjoint.backward_nonstiff) state->replay_options.nonstiff = adjoint.backward_nonstiff;
  if (adjoint.backward_jac) state->replay_options.jac = adjoint.backward_jac;
  state->adjoint = adjoint;
  if (split) state->adjoint.vjp = nullptr;  // f's own product is not the sum's
  state->prep = prep;
  state->kind = kind;
  state->params = params;
  Solution sol = detail::solve_with_time_terms(
      split ? sum : f, u0, tspan, o, prep, [&](const torch::Tensor& u) {
        std::vector<torch::Tensor> inputs{u};
        inputs.insert(inputs.end(), params.begin(), params.end());
        torch::Tensor out = AdjointFunction::apply(AdjointArgs{state}, at::TensorList(inputs));
        Solution s = state->meta;
        s.u = out;
        return s;
      });
  sol.adjoint_stats = state->stats;
  return sol;
}

}  // namespace diffeqlayers
