// The Jacobian of f (autograd in forward or reverse mode, or user-supplied), df/dt and LU
// factorizations for the stiff steppers, as tensors or on host doubles.
#include "solvers/jacobian.h"

#include "core/host_copy.h"
#include "core/lincomb.h"

#include <ATen/LegacyVmapMode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/forward_grad.h>
#include <torch/csrc/autograd/function.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <typeinfo>
#include <unordered_set>
#include <vector>

#include "integrate/tape.h"

namespace diffeqlayers {
namespace stiff {

torch::Tensor eval_f(const Dynamics& f, double t, const torch::Tensor& u, Stats& stats) {
  return detail::checked_eval(f, t, u, stats.nfe);
}

namespace {

// One call of o.stacked on the states Z [m, *shape] at the times ts (m of them), counted (one
// stacked call, m evaluations) and checked for shape, dtype and device.
torch::Tensor call_stacked(const SolveOptions& o, const std::vector<double>& ts,
                           const torch::Tensor& Z, Stats& stats) {
  const int64_t m = static_cast<int64_t>(ts.size());
  std::vector<int64_t> tshape(static_cast<size_t>(Z.dim()), 1);
  tshape[0] = m;
  const torch::Tensor T = copy_to_device(ts.data(), tshape, Z.options().requires_grad(false));
  // Formatted only for an error message.
  auto where = [&] { return " (times " + fmt(ts.front()) + " to " + fmt(ts.back()) + ")"; };
  torch::Tensor out = o.stacked(T, Z);
  ++stats.nstacked;
  stats.nfe += m;
  TORCH_CHECK_TYPE(out.defined(), "the vectorized f returned no tensor", where());
  TORCH_CHECK_VALUE(out.sizes() == Z.sizes(), "the vectorized f returned shape ", out.sizes(),
                    " for a stack of ", m, " states of shape ", Z.sizes(),
                    ": it must take states stacked along a new leading dimension (and t as a "
                    "tensor [m, 1, ...]) and return one result per state",
                    where());
  TORCH_CHECK_TYPE(out.scalar_type() == Z.scalar_type(), "the vectorized f returned dtype ",
                   out.scalar_type(), " but the state has dtype ", Z.scalar_type(), where());
  TORCH_CHECK_VALUE(out.device() == Z.device(), "the vectorized f returned a tensor on ",
                    out.device(), " but the state is on ", Z.device(), where());
  return out;
}

}  // namespace

torch::Tensor eval_stages(const Dynamics& f, const SolveOptions& o, const std::vector<double>& ts,
                          const torch::Tensor& Z, Stats& stats, bool& verify) {
  const int64_t m = static_cast<int64_t>(ts.size());
  TORCH_INTERNAL_ASSERT(Z.dim() >= 1 && Z.size(0) == m, "eval_stages: ", m, " times for ",
                        Z.sizes());
  auto one_by_one = [&] {
    std::vector<torch::Tensor> rows;
    for (int64_t i = 0; i < m; ++i)
      rows.push_back(eval_f(f, ts[static_cast<size_t>(i)], Z[i], stats));
    return at::stack(rows);
  };
  if (!o.stacked) return one_by_one();
  torch::Tensor out = call_stacked(o, ts, Z, stats);
  // Checked at the first stack of distinct states (a first Newton update from zero increments
  // stacks u three times, where an f that mixes rows could still agree).
  if (verify && m > 1 &&
      !at::equal(Z.detach().narrow(0, 1, m - 1), Z.detach()[0].expand_as(Z.narrow(0, 1, m - 1)))) {
    verify = false;
    at::NoGradGuard g;
    PrimalOnly primal;
    const torch::Tensor want = one_by_one().detach();
    const torch::Tensor got = out.detach();
    // Rounding (a matrix product over three rows instead of one) moves results by a few units in
    // the last place of their scale; a vectorized f that mixes rows moves them by O(1).
    const double scale = want.abs().max().item<double>();
    const double diff = (got - want).abs().max().item<double>();
    const double eps = Z.scalar_type() == torch::kFloat64 ? std::numeric_limits<double>::epsilon()
                                                          : std::numeric_limits<float>::epsilon();
    const double tol = std::sqrt(eps) * scale;
    // A non-finite f is left to the Newton iteration, which fails the step with its reason.
    TORCH_CHECK_VALUE(!std::isfinite(diff) || diff <= tol, "vectorized=True, but f on a stack of ",
                      m, " states differs from f on each state by up to ", fmt(diff),
                      " (largest |f| ", fmt(scale), "; allowed ", fmt(tol),
                      "): f must treat the leading dimension as independent states, reading "
                      "them as u[..., i] rather than u[i], and t as a tensor [m, 1, ...]");
  }
  return out;
}

JacLayout jac_layout(const SolveOptions& o, const torch::Tensor& u, bool allow_blocks) {
  JacLayout l;
  l.n = u.numel();
  if (allow_blocks && o.independent_batch) {
    TORCH_CHECK_VALUE(u.dim() >= 1 && u.size(0) >= 1,
                      "independent_batch needs a state with a leading batch dimension, got shape ",
                      u.sizes());
    l.blocks = u.size(0);
    l.n = u.numel() / l.blocks;
  }
  return l;
}

namespace {

// The most elements (block size x state size) of the stack of copies of u that a vectorized f's
// Jacobian is taken on (above: the usual reverse mode, one call of f).
constexpr int64_t kStackedMaxElements = int64_t{1} << 16;

// "auto" takes forward mode for blocks of at most this size. Forward mode would pay off where a
// reverse pass costs more than an evaluation of f on dual tensors, but measured with f in
// Python (rodas5, one Jacobian per step, CPU): forward mode took 11x reverse mode's time on
// ROBER (n = 3), 10x on u' = D u + tanh(W u) with n = 8 and 16x with n = 32 (entering and
// leaving the forward-AD level and dual-tensor dispatch per column). So "auto" is reverse mode.
constexpr int64_t kForwardMaxN = 0;

torch::Tensor user_jacobian(const Jacobian& jac, double t, const torch::Tensor& u,
                            const JacLayout& l) {
  torch::Tensor J = jac(t, u);
  TORCH_CHECK_TYPE(J.defined(), "jac returned no tensor (at t=", fmt(t), ")");
  if (l.blocks > 1) {
    TORCH_CHECK_VALUE(J.dim() == 3 && J.size(0) == l.blocks && J.size(1) == l.n && J.size(2) == l.n,
                      "with independent_batch, jac must return the per-sample Jacobians as [B, n, "
                      "n] = [",
                      l.blocks, ", ", l.n, ", ", l.n, "], got shape ", J.sizes(), " (at t=", fmt(t),
                      ")");
  } else {
    const int64_t n = l.n;
    TORCH_CHECK_VALUE(J.numel() == n * n && (J.dim() == 2 || J.dim() == 2 * u.dim()),
                      "jac must return the Jacobian as an [n, n] matrix with n = u.numel() = ", n,
                      " (or shaped [*u.shape, *u.shape]), got shape ", J.sizes(), " (at t=", fmt(t),
                      ")");
  }
  TORCH_CHECK_TYPE(J.scalar_type() == u.scalar_type(), "jac returned dtype ", J.scalar_type(),
                   " but the state has dtype ", u.scalar_type());
  TORCH_CHECK_VALUE(J.device() == u.device(), "jac returned a tensor on ", J.device(),
                    " but the state is on ", u.device());
  return J.reshape({l.blocks, l.n, l.n});
}

// The forward-AD level for the duration of one Jacobian; `ok` false when another level is
// active (inside torch.autograd.forward_ad.dual_level, diffeq_fd, torch.func.jvp).
struct DualLevel {
  DualLevel() {
    using torch::autograd::ForwardADLevel;
    if (ForwardADLevel::try_get_by_idx(0) != nullptr) return;
    try {
      idx = ForwardADLevel::get_next_idx();
      ok = true;
    } catch (const c10::Error&) {
      ok = false;  // lost a race with a level entered elsewhere
    }
  }
  ~DualLevel() {
    if (ok) torch::autograd::ForwardADLevel::release_idx(idx);
  }
  DualLevel(const DualLevel&) = delete;
  DualLevel& operator=(const DualLevel&) = delete;
  uint64_t idx = 0;
  bool ok = false;
};

// Forward mode: column j of every block from one evaluation of f on u + e_j eps (e_j: 1 at
// entry j of each block). False (nothing computed) when no forward-AD level is available.
bool forward_jacobian(const Dynamics& f, double t, const torch::Tensor& u, const JacLayout& l,
                      Stats& stats, PointDerivatives& d) {
  DualLevel level;
  if (!level.ok) return false;
  const auto lvl = static_cast<int64_t>(level.idx);
  const torch::Tensor primal = u.detach().contiguous();
  std::vector<torch::Tensor> cols;
  cols.reserve(static_cast<size_t>(l.n));
  for (int64_t j = 0; j < l.n; ++j) {
    torch::Tensor tangent = at::zeros({l.blocks, l.n}, primal.options());
    tangent.select(1, j).fill_(1.0);
    torch::Tensor out =
        eval_f(f, t, at::_make_dual(primal, tangent.view(primal.sizes()), lvl), stats);
    auto unpacked = at::_unpack_dual(out, lvl);
    if (j == 0) d.f0 = std::get<0>(unpacked).detach().clone();
    const torch::Tensor& tan = std::get<1>(unpacked);
    cols.push_back(tan.defined() ? tan.reshape({l.blocks, l.n}).clone()
                                 : at::zeros({l.blocks, l.n}, primal.options()));
  }
  d.J = at::stack(cols, 2);
  return true;
}

// Set once a batched reverse pass met an operation without a legacy-vmap batching rule (its
// backward then loops over the seeds inside PyTorch's fallback, slower than separate passes):
// from then on this process takes one reverse pass per row.
std::atomic<bool> batched_rows_fell_back{false};

// Keeps the warnings of one batched reverse pass: the fallback's performance warning is noted
// (and not shown: the rows are still right), every other warning goes on to the handler that was
// in place.
class BatchedPassWarnings : public c10::WarningHandler {
 public:
  BatchedPassWarnings() : prev_(c10::WarningUtils::get_warning_handler()) {}
  void process(const c10::Warning& w) override {
    if (w.msg().find("batching rule") != std::string::npos)
      fell_back = true;
    else
      prev_->process(w);
  }
  bool fell_back = false;

 private:
  c10::WarningHandler* prev_;
};

// Whether the graph behind fu holds a backward written in Python (a torch.autograd.Function of
// the user's; its node type is torch::autograd::PyNode, not visible from this library). Such a
// backward may not run under vmap (NumPy, data access), and a Python exception raised there
// cannot be discarded here without the interpreter: those graphs take one pass per row.
bool has_python_backward(const torch::Tensor& fu) {
  std::vector<torch::autograd::Node*> todo{fu.grad_fn().get()};
  std::unordered_set<torch::autograd::Node*> seen;
  while (!todo.empty()) {
    torch::autograd::Node* node = todo.back();
    todo.pop_back();
    if (node == nullptr || !seen.insert(node).second) continue;
    if (std::strstr(typeid(*node).name(), "PyNode") != nullptr) return true;
    for (const auto& e : node->next_edges()) todo.push_back(e.function.get());
  }
  return false;
}

// All n rows of every block from one batched reverse pass (batched_vjps): seeds e_1..e_n in
// every block. Measured with f in Python, rodas5 (one Jacobian per step), rtol 1e-6, median of 7
// alternating runs: whole solves 0.75x the time of one pass per row on ROBER (n = 3), 0.86x on
// Van der Pol (n = 2); same values to the bit. Not under `track` (J must then be
// differentiable: create_graph). False (rows undefined): the caller takes one pass per row.
bool batched_rows(const torch::Tensor& fu, const torch::Tensor& uv, const JacLayout& l,
                  torch::Tensor& rows) {
  // seeds[i] = e_i in every block, shaped like fu.
  std::vector<int64_t> shape{l.n};
  for (int64_t d : fu.sizes()) shape.push_back(d);
  const torch::Tensor seeds = at::eye(l.n, fu.options().requires_grad(false))
                                  .unsqueeze(1)
                                  .expand({l.n, l.blocks, l.n})
                                  .reshape(shape);
  std::vector<torch::Tensor> grads;
  if (!batched_vjps(fu, {uv}, seeds, grads)) return false;
  // [n (row i), blocks, n (column j)] -> J[b][i][j].
  rows = grads[0].reshape({l.n, l.blocks, l.n}).permute({1, 0, 2}).contiguous();
  return true;
}

}  // namespace

bool batched_vjps(const torch::Tensor& out, const std::vector<torch::Tensor>& inputs,
                  const torch::Tensor& seeds, std::vector<torch::Tensor>& grads) {
  grads.clear();
  if (batched_rows_fell_back.load(std::memory_order_relaxed)) return false;
  if (has_python_backward(out)) return false;
  const int64_t k = seeds.size(0);
  BatchedPassWarnings warnings;
  try {
    c10::WarningUtils::WarningHandlerGuard guard(&warnings);
    const int64_t level = at::impl::VmapMode::increment_nesting();
    struct Leave {
      ~Leave() { at::impl::VmapMode::decrement_nesting(); }
    } leave;
    std::vector<torch::Tensor> g =
        torch::autograd::grad({out}, inputs, {at::_add_batch_dim(seeds, 0, level)},
                              /*retain_graph=*/true, /*create_graph=*/false,
                              /*allow_unused=*/true);
    for (size_t i = 0; i < inputs.size(); ++i) {
      std::vector<int64_t> shape{k};
      for (int64_t d : inputs[i].sizes()) shape.push_back(d);
      grads.push_back(g[i].defined() ? at::_remove_batch_dim(g[i], level, k, 0)
                                     : at::zeros(shape, inputs[i].options().requires_grad(false)));
    }
  } catch (const c10::Error&) {
    // A backward that cannot run under vmap. The graph was retained: the caller's passes one
    // seed at a time reuse it, and an error that is not vmap's comes back from them.
    batched_rows_fell_back = true;
    grads.clear();
    return false;
  }
  if (warnings.fell_back) batched_rows_fell_back = true;
  return true;
}

namespace {

// Reverse mode: row i of every block from one vector-Jacobian product with e_i.
//
// Dual tensors (forward mode: diffeq_fd, diffeq_jvp, a caller's forward-AD level): when u or the
// parameters f reads carry tangents, J must carry its own tangent, d/de J(u + e du, p + e dp),
// for the step's tangent to be the exact derivative of the discrete step. The reverse passes
// give it: their backward formulas run on the dual values f saved, so each row comes out dual
// (forward-over-reverse; no create_graph needed). Then nothing may be detached (detach drops the
// tangent): f(t, u) is evaluated once more without recording, and the rows, computed without a
// graph, are kept as they are.
void reverse_jacobian(const Dynamics& f, double t, const torch::Tensor& u, const JacLayout& l,
                      bool track, Stats& stats, PointDerivatives& d) {
  // Record one evaluation of f on a variable that requires grad. When tracking and u is already
  // part of the graph, differentiate with respect to u itself so that J keeps its dependence on
  // what u depends on. A dual u stays dual: its primal becomes the variable.
  // (wrt: what the rows differentiate; for a dual u, the leaf under its dual view.)
  torch::Tensor uv, wrt;
  if (track && u.requires_grad()) {
    uv = wrt = u;
  } else if (is_dual(u)) {
    auto [primal, tangent] = at::_unpack_dual(u, /*level=*/0);
    wrt = primal.detach().requires_grad_(true);
    at::AutoGradMode enable(true);
    uv = at::_make_dual(wrt, tangent, /*level=*/0);
  } else {
    uv = wrt = u.detach().requires_grad_(true);
  }
  torch::Tensor fu;
  {
    at::AutoGradMode enable(true);
    fu = eval_f(f, t, uv, stats);
  }
  d.dual = !track && (is_dual(u) || is_dual(fu));
  if (!fu.requires_grad()) {
    d.J = at::zeros({l.blocks, l.n, l.n}, u.options().requires_grad(false));  // f ignores u
  } else if (torch::Tensor all; !track && !d.dual && batched_rows(fu, wrt, l, all)) {
    d.J = all;
  } else {
    at::AutoGradMode enable(true);
    // Seeds: row i of one identity matrix (a view, no allocation per row), broadcast over the
    // blocks, seeding fu itself (a reshape of fu would add a node to every reverse pass).
    const torch::Tensor eye = at::eye(l.n, u.options().requires_grad(false));
    std::vector<torch::Tensor> rows;
    rows.reserve(static_cast<size_t>(l.n));
    for (int64_t i = 0; i < l.n; ++i) {
      torch::Tensor seed = eye.select(0, i);
      seed =
          l.blocks == 1 ? seed.view(fu.sizes()) : seed.expand({l.blocks, l.n}).reshape(fu.sizes());
      auto g = torch::autograd::grad({fu}, {wrt}, {seed}, /*retain_graph=*/i + 1 < l.n || track,
                                     /*create_graph=*/track, /*allow_unused=*/true);
      rows.push_back(g[0].defined() ? g[0].reshape({l.blocks, l.n})
                                    : at::zeros({l.blocks, l.n}, eye.options()));
    }
    d.J = at::stack(rows, 1);
  }
  if (d.dual) {
    at::NoGradGuard g;
    d.f0 = eval_f(f, t, u, stats);
    return;
  }
  d.f0 = track ? fu : fu.detach();
  if (!track) d.J = d.J.detach();
}

// Reverse mode through one call of the vectorized f (SolveOptions::stacked) on n copies of u,
// n the block size: row i of the stack seeded with e_i (over every block) gives row i of each
// block's Jacobian, in one plain reverse pass (no vmap, whose batching rules cost more than the
// pass on small f's). False, with nothing set, when f's result carries a forward-mode tangent
// (the caller's paths handle those).
bool stacked_jacobian(const SolveOptions& o, double t, const torch::Tensor& u, const JacLayout& l,
                      Stats& stats, PointDerivatives& d) {
  std::vector<int64_t> shape{l.n};
  shape.insert(shape.end(), u.sizes().begin(), u.sizes().end());
  const torch::Tensor U = u.detach().unsqueeze(0).expand(shape).clone().requires_grad_(true);
  torch::Tensor fu;
  {
    at::AutoGradMode enable(true);
    fu = call_stacked(o, std::vector<double>(static_cast<size_t>(l.n), t), U, stats);
  }
  if (is_dual(fu)) return false;
  torch::Tensor J;
  if (fu.requires_grad()) {
    const torch::Tensor seeds = at::eye(l.n, u.options().requires_grad(false))
                                    .unsqueeze(1)
                                    .expand({l.n, l.blocks, l.n})
                                    .reshape(fu.sizes());
    auto g = torch::autograd::grad({fu}, {U}, {seeds}, /*retain_graph=*/false,
                                   /*create_graph=*/false, /*allow_unused=*/true);
    if (g[0].defined()) J = g[0].reshape({l.n, l.blocks, l.n}).permute({1, 0, 2}).contiguous();
  }
  d.J = J.defined() ? J : at::zeros({l.blocks, l.n, l.n}, u.options().requires_grad(false));
  d.f0 = fu[0].detach();
  d.dual = false;
  return true;
}

}  // namespace

bool is_dual(const torch::Tensor& x) { return x.defined() && x._fw_grad(/*level=*/0).defined(); }

PointDerivatives derivatives(const Dynamics& f, const SolveOptions& o, double t,
                             const torch::Tensor& u, bool track, Stats& stats, bool with_ft,
                             bool allow_blocks, double dir) {
  PointDerivatives d;
  const JacLayout l = jac_layout(o, u, allow_blocks);
  ++stats.njac;
  stats.jac_blocks = l.blocks;
  if (o.jac) {
    d.f0 = eval_f(f, t, u, stats);
    d.dual = !track && (is_dual(u) || is_dual(d.f0));
    if (track) {
      d.J = user_jacobian(o.jac, t, u, l);
    } else {
      at::NoGradGuard g;
      // Dual: the user's jac on the dual state, so that J carries its tangent.
      d.J = user_jacobian(o.jac, t, d.dual ? u : u.detach(), l);
    }
  } else {
    TORCH_CHECK_VALUE(o.jac_mode == "auto" || o.jac_mode == "forward" || o.jac_mode == "reverse",
                      "jac_mode must be 'auto', 'forward' or 'reverse', got '", o.jac_mode, "'");
    // Reverse mode costs one recorded evaluation of f and n reverse passes, forward mode n
    // evaluations of f on dual tensors. Through the solve (track) J must itself be
    // differentiable in reverse mode: reverse mode then.
    const bool forward =
        !track && (o.jac_mode == "forward" || (o.jac_mode == "auto" && l.n <= kForwardMaxN));
    bool done = false;
    // A vectorized f (radau5, the fixed-step implicit methods): one reverse pass through one
    // stacked call, when the Jacobian need not be differentiable and n copies of the state stay
    // small.
    if (o.stacked && !track && o.jac_mode != "forward" && !is_dual(u) &&
        l.n * u.numel() <= kStackedMaxElements) {
      done = stacked_jacobian(o, t, u, l, stats, d);
    }
    if (!done && forward) {
      at::NoGradGuard g;
      done = forward_jacobian(f, t, u, l, stats, d);
      TORCH_CHECK(done || o.jac_mode == "auto",
                  "jac_mode='forward' needs PyTorch's forward-AD level, which is in use (inside "
                  "torch.autograd.forward_ad.dual_level, torch.func.jvp or diffeq_fd); use "
                  "jac_mode='reverse'");
    }
    if (!done) reverse_jacobian(f, t, u, l, track, stats, d);
  }
  if (!with_ft) return d;
  if (o.autonomous) {
    // Declared independent of t: df/dt = 0 without evaluating f (a difference quotient would
    // cost two evaluations of f and give exactly 0 for such an f anyway).
    d.ft = at::zeros({l.size()}, u.options().requires_grad(false));
    return d;
  }
  // df/dt by a second-order difference on the side the step goes, (-3 f(t) + 4 f(t + d) -
  // f(t + 2 d)) / 2d with d = dir eps^(1/3) max(1, |t|): exact for f quadratic in t up to
  // rounding, its truncation error O(d^2) balanced against rounding O(eps / d). One-sided so that
  // f is never evaluated behind t: at the start of the span that would lie outside it (the
  // adjoint's backward solve reads u(t) from the forward solution, defined on the span only).
  // The steps are exactly representable: (t + d) - t.
  const double eps = u.scalar_type() == at::kDouble ? std::numeric_limits<double>::epsilon()
                                                    : std::numeric_limits<float>::epsilon();
  double dt = (dir < 0 ? -1.0 : 1.0) * std::cbrt(eps) * std::max(1.0, std::abs(t));
  dt = (t + dt) - t;
  const double dt2 = (t + 2.0 * dt) - t;
  auto one_sided = [&](const torch::Tensor& x, const torch::Tensor& f0) {
    torch::Tensor f1 = eval_f(f, t + dt, x, stats), f2 = eval_f(f, t + dt2, x, stats);
    // The derivative at 0 of the quadratic through (0, f0), (dt, f1), (dt2, f2) (dt2 = 2 dt but
    // for rounding), on the differences from f0 so that an autonomous f gives exactly 0.
    const double w1 = dt2 / (dt * (dt2 - dt)), w2 = -dt / (dt2 * (dt2 - dt));
    return lincomb(torch::Tensor(), {f1 - f0, f2 - f0}, {w1, w2}).reshape({-1});
  };
  if (track) {
    d.ft = one_sided(u, d.f0);
  } else {
    at::NoGradGuard g;
    // Dual values keep their tangents (detach would drop them).
    d.ft = d.dual ? one_sided(u, d.f0) : one_sided(u.detach(), d.f0.detach());
  }
  return d;
}

bool LU::factor(const torch::Tensor& J, double alpha, double beta, Stats& stats) {
  ++stats.nlu;
  const int64_t n = J.size(-1);
  torch::Tensor matrix = at::eye(n, J.options().requires_grad(false)).mul_(alpha) + beta * J;
  auto [l, p, info] = at::linalg_lu_factor_ex(matrix);
  // One host synchronisation: singular (info > 0) or non-finite factors.
  torch::Tensor bad =
      at::logical_or(info.ne(0).any(), at::logical_not(at::isfinite(l.detach()).all()));
  if (bad.item<bool>()) return false;
  lu = l;
  pivots = p;
  return true;
}

torch::Tensor LU::solve(const torch::Tensor& rhs) const {
  const int64_t n = lu.size(-1);
  const torch::Tensor b = lu.dim() == 3 ? rhs.reshape({lu.size(0), n, 1}) : rhs.reshape({n, 1});
  return at::linalg_lu_solve(lu, pivots, b).reshape(rhs.sizes());
}

torch::Tensor LU::solve_batch(const torch::Tensor& rhs, int64_t batch) const {
  const int64_t n = lu.size(-1);
  if (lu.dim() == 3) {  // blocks: [blocks, n, batch]
    const int64_t blocks = lu.size(0);
    torch::Tensor b = rhs.reshape({batch, blocks, n}).permute({1, 2, 0});
    return at::linalg_lu_solve(lu, pivots, b).permute({2, 0, 1}).reshape(rhs.sizes());
  }
  torch::Tensor b = rhs.reshape({batch, n}).t();  // [n, batch]
  return at::linalg_lu_solve(lu, pivots, b).t().reshape(rhs.sizes());
}

bool use_host(const torch::Tensor& u, const JacLayout& layout, bool track) {
  return !track && u.device().is_cpu() &&
         (u.scalar_type() == at::kDouble || u.scalar_type() == at::kFloat) &&
         layout.n <= kHostMaxBlock && !is_dual(u);
}

std::vector<double> to_host(const torch::Tensor& x) {
  const torch::Tensor c = x.detach().cpu().contiguous();
  std::vector<double> v(static_cast<size_t>(c.numel()));
  if (c.scalar_type() == at::kDouble) {
    if (!v.empty()) std::memcpy(v.data(), c.data_ptr<double>(), v.size() * sizeof(double));
  } else if (c.scalar_type() == at::kFloat) {
    const float* p = c.data_ptr<float>();
    for (size_t i = 0; i < v.size(); ++i) v[i] = p[i];
  } else {
    const torch::Tensor d = c.to(at::kDouble);
    if (!v.empty()) std::memcpy(v.data(), d.data_ptr<double>(), v.size() * sizeof(double));
  }
  return v;
}

torch::Tensor from_host(const double* x, const torch::Tensor& like) {
  torch::Tensor out = at::empty(like.sizes(), like.options().requires_grad(false));
  const int64_t n = out.numel();
  if (out.scalar_type() == at::kDouble) {
    if (n > 0) std::memcpy(out.data_ptr<double>(), x, static_cast<size_t>(n) * sizeof(double));
  } else {
    TORCH_INTERNAL_ASSERT(out.scalar_type() == at::kFloat);
    float* p = out.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(x[i]);
  }
  return out;
}

bool HostLU::factor(const std::vector<double>& J, int64_t nblocks, int64_t size, double alpha,
                    double beta, Stats& stats) {
  ++stats.nlu;
  blocks = nblocks;
  n = size;
  a.resize(J.size());
  piv.resize(static_cast<size_t>(blocks * n));
  for (size_t i = 0; i < J.size(); ++i) a[i] = beta * J[i];
  for (int64_t b = 0; b < blocks; ++b) {
    double* A = a.data() + b * n * n;
    int64_t* P = piv.data() + b * n;
    for (int64_t i = 0; i < n; ++i) A[i * n + i] += alpha;
    for (int64_t k = 0; k < n; ++k) {
      int64_t p = k;
      double best = std::abs(A[k * n + k]);
      for (int64_t i = k + 1; i < n; ++i)
        if (std::abs(A[i * n + k]) > best) {
          best = std::abs(A[i * n + k]);
          p = i;
        }
      if (!(best > 0.0) || !std::isfinite(best)) return false;  // singular or NaN
      P[k] = p;
      if (p != k)
        for (int64_t j = 0; j < n; ++j) std::swap(A[k * n + j], A[p * n + j]);
      const double inv = 1.0 / A[k * n + k];
      for (int64_t i = k + 1; i < n; ++i) {
        const double m = A[i * n + k] * inv;
        A[i * n + k] = m;
        if (m != 0.0)
          for (int64_t j = k + 1; j < n; ++j) A[i * n + j] -= m * A[k * n + j];
      }
    }
    for (int64_t i = 0; i < n * n; ++i)
      if (!std::isfinite(A[i])) return false;
  }
  return true;
}

void HostLU::solve(double* x) const {
  for (int64_t b = 0; b < blocks; ++b) {
    const double* A = a.data() + b * n * n;
    const int64_t* P = piv.data() + b * n;
    double* y = x + b * n;
    for (int64_t k = 0; k < n; ++k)
      if (P[k] != k) std::swap(y[k], y[P[k]]);
    for (int64_t i = 1; i < n; ++i) {
      double s = y[i];
      for (int64_t j = 0; j < i; ++j) s -= A[i * n + j] * y[j];
      y[i] = s;
    }
    for (int64_t i = n - 1; i >= 0; --i) {
      double s = y[i];
      for (int64_t j = i + 1; j < n; ++j) s -= A[i * n + j] * y[j];
      y[i] = s / A[i * n + i];
    }
  }
}

}  // namespace stiff
}  // namespace diffeqlayers
