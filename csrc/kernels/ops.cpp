// The registered operators diffeqlayers::lincomb, lincomb_into and error_norm: schemas,
// CPU kernels (one fused loop over the elements, no temporaries), CUDA kernels, Meta kernels
// (shapes only, for fake tensors and torch.compile) and Autograd kernels.
//
// The CUDA kernels are compositions of ATen ops, not hand-written .cu kernels: the build
// (setup.py's CppExtension, CMake's CXX-only project) compiles no CUDA sources, and a CPU-only
// torch could not link them. The ops run on the current stream like any ATen op.
#include "kernels/ops.h"

#include <ATen/Dispatch.h>
#include <ATen/ExpandUtils.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "core/autograd_node.h"
#include "core/grad_sinks.h"
#include "core/host_copy.h"
#include "core/host_loops.h"
#include "core/lincomb.h"

namespace diffeqlayers::kernels {
namespace {

using detail::error_sum_sq;
using detail::make_node;
using detail::record_node;

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using LinCombFn = torch::Tensor(const std::optional<torch::Tensor>&, at::TensorList,
                                at::ArrayRef<double>, double);
using LinCombIntoFn = void(const std::optional<torch::Tensor>&, at::TensorList,
                           at::ArrayRef<double>, double, const torch::Tensor&);
using ErrorNormFn = torch::Tensor(at::TensorList, at::ArrayRef<double>, double,
                                  const torch::Tensor&, const torch::Tensor&, double, double);

const c10::TypedOperatorHandle<LinCombFn>& lincomb_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("diffeqlayers::lincomb", "")
                             .typed<LinCombFn>();
  return op;
}

const c10::TypedOperatorHandle<LinCombIntoFn>& lincomb_into_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("diffeqlayers::lincomb_into", "")
                             .typed<LinCombIntoFn>();
  return op;
}

const c10::TypedOperatorHandle<ErrorNormFn>& error_norm_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("diffeqlayers::error_norm", "")
                             .typed<ErrorNormFn>();
  return op;
}

// Weights travel as one non-tensor argument (a bare std::vector<double> would be iterated by
// the argument extractor and counted as one input per element).
struct Weights {
  std::vector<double> w;
};

// The terms of a combination, checked: [y, ks...] with weights [1, h * w...], and the shape they
// broadcast to.
struct Terms {
  std::vector<torch::Tensor> t;
  std::vector<double> w;
  c10::SymDimVector shape;  // symbolic under fake tensors (the Meta kernels)
  bool same_shape = true;
};

void check_term(const char* op, const char* name, size_t i, const torch::Tensor& t,
                const torch::Tensor& ref) {
  TORCH_CHECK_TYPE(t.defined(), op, ": ", name, "[", i, "] is undefined");
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, "[", i, "] has dtype ",
                   t.scalar_type(), " but ks[0] has dtype ", ref.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, "[", i, "] is on ", t.device(),
                    " but ks[0] is on ", ref.device());
}

void check_weights(const char* op, at::TensorList ks, at::ArrayRef<double> weights, double h) {
  TORCH_CHECK_VALUE(!ks.empty(), op, ": ks is empty (give at least one term)");
  TORCH_CHECK_VALUE(weights.size() == ks.size(), op, ": ", ks.size(), " terms in ks but ",
                    weights.size(), " weights");
  TORCH_CHECK_VALUE(std::isfinite(h), op, ": h must be finite, got ", h);
  for (size_t j = 0; j < weights.size(); ++j)
    TORCH_CHECK_VALUE(std::isfinite(weights[j]), op, ": weights[", j, "] is not finite");
  TORCH_CHECK_TYPE(ks[0].defined(), op, ": ks[0] is undefined");
  TORCH_CHECK_TYPE(at::isFloatingType(ks[0].scalar_type()), op,
                   ": the terms must be floating-point tensors, got ", ks[0].scalar_type());
}

Terms gather(const char* op, const std::optional<torch::Tensor>& y, at::TensorList ks,
             at::ArrayRef<double> weights, double h) {
  check_weights(op, ks, weights, h);
  Terms g;
  g.t.reserve(ks.size() + 1);
  g.w.reserve(ks.size() + 1);
  if (y.has_value() && y->defined()) {
    check_term(op, "y", 0, *y, ks[0]);
    g.t.push_back(*y);
    g.w.push_back(1.0);
  }
  for (size_t j = 0; j < ks.size(); ++j) {
    check_term(op, "ks", j, ks[j], ks[0]);
    g.t.push_back(ks[j]);
    g.w.push_back(h * weights[j]);
  }
  g.shape.assign(g.t[0].sym_sizes().begin(), g.t[0].sym_sizes().end());
  for (const auto& t : g.t) {
    if (t.sym_sizes() == c10::SymIntArrayRef(g.shape)) continue;
    g.same_shape = false;
    g.shape = at::infer_size_symdimvector(g.shape, t.sym_sizes());
  }
  return g;
}

void check_out(const char* op, const Terms& g, const torch::Tensor& out) {
  TORCH_CHECK_TYPE(out.defined(), op, ": out is undefined");
  TORCH_CHECK_TYPE(out.scalar_type() == g.t[0].scalar_type(), op, ": out has dtype ",
                   out.scalar_type(), " but the terms have dtype ", g.t[0].scalar_type());
  TORCH_CHECK_VALUE(out.device() == g.t[0].device(), op, ": out is on ", out.device(),
                    " but the terms are on ", g.t[0].device());
  TORCH_CHECK_VALUE(out.sym_sizes() == c10::SymIntArrayRef(g.shape), op, ": out has shape ",
                    out.sym_sizes(), " but the result has shape ", c10::SymIntArrayRef(g.shape));
  for (const auto& t : g.t)
    TORCH_CHECK_VALUE(at::get_overlap_status(out, t) == at::MemOverlapStatus::No, op,
                      ": out overlaps an input (give a separate buffer)");
}

// --- lincomb: CPU and CUDA -------------------------------------------------------------------
// combine_terms runs the fused loop on contiguous CPU float/double terms and ATen ops otherwise
// (CUDA, other layouts and dtypes), so one kernel serves both devices.

torch::Tensor lincomb_kernel(const std::optional<torch::Tensor>& y, at::TensorList ks,
                             at::ArrayRef<double> weights, double h) {
  Terms g = gather("diffeqlayers::lincomb", y, ks, weights, h);
  if (g.same_shape) return combine_terms(g.t, g.w);
  torch::Tensor out = at::empty_symint(g.shape, g.t[0].options());
  combine_terms_into(out, g.t, g.w);
  return out;
}

void lincomb_into_kernel(const std::optional<torch::Tensor>& y, at::TensorList ks,
                         at::ArrayRef<double> weights, double h, const torch::Tensor& out) {
  Terms g = gather("diffeqlayers::lincomb_into", y, ks, weights, h);
  check_out("diffeqlayers::lincomb_into", g, out);
  combine_terms_into(out, g.t, g.w);
}

torch::Tensor lincomb_meta(const std::optional<torch::Tensor>& y, at::TensorList ks,
                           at::ArrayRef<double> weights, double h) {
  Terms g = gather("diffeqlayers::lincomb", y, ks, weights, h);
  return at::empty_symint(g.shape, g.t[0].options());
}

void lincomb_into_meta(const std::optional<torch::Tensor>& y, at::TensorList ks,
                       at::ArrayRef<double> weights, double h, const torch::Tensor& out) {
  Terms g = gather("diffeqlayers::lincomb_into", y, ks, weights, h);
  TORCH_CHECK_TYPE(out.defined(), "diffeqlayers::lincomb_into: out is undefined");
  TORCH_CHECK_VALUE(out.sym_sizes() == c10::SymIntArrayRef(g.shape),
                    "diffeqlayers::lincomb_into: out has shape ", out.sym_sizes(),
                    " but the result has shape ", c10::SymIntArrayRef(g.shape));
}

// The gradients of a combination sum_j w_j terms_j: w_j * g for each term (g itself where w_j is
// 1), undefined where `wanted` says the caller needs none (or g is undefined). Shared by the
// registered operator's node (LinComb) and the solver's direct one (LinCombNode).
variable_list lincomb_grads(const torch::Tensor& g, const std::vector<double>& w,
                            const std::function<bool(size_t)>& wanted) {
  variable_list grads(w.size());
  if (!g.defined()) return grads;
  // A contiguous CPU float/double grad that records nothing (no create_graph): each g * w_j by
  // a host loop into a fresh tensor, w_j rounded to g's dtype as ATen's product rounds it (the
  // same bits). The ATen route below (a weight tensor from host data, a broadcast product, an
  // unbind) cost 4-5x the arithmetic here on small states: with the foundation's small neural
  // ODE a quarter of the solver's share of a diffeq_rd training step.
  if (host_loop_grad(g)) {
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "diffeqlayers_lincomb_backward", [&] {
      const scalar_t* src = g.const_data_ptr<scalar_t>();
      const int64_t numel = g.numel();
      for (size_t j = 0; j < w.size(); ++j) {
        if (!wanted(j)) continue;
        if (w[j] == 1.0) {
          grads[j] = g;
          continue;
        }
        torch::Tensor out = at::empty(g.sizes(), g.options());
        scalar_t* dst = out.mutable_data_ptr<scalar_t>();
        const auto c = static_cast<scalar_t>(w[j]);
        at::parallel_for(0, numel, 32768, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) dst[i] = src[i] * c;
        });
        grads[j] = std::move(out);
      }
    });
    return grads;
  }
  // Traced (fake or functional tensors: torch.compile, opcheck): a tensor built from host data
  // has no place there, so one product per term.
  if (g.key_set().has(c10::DispatchKey::Python) ||
      g.key_set().has(c10::DispatchKey::Functionalize)) {
    for (size_t j = 0; j < w.size(); ++j)
      if (wanted(j)) grads[j] = w[j] == 1.0 ? g : at::mul(g, w[j]);
    return grads;
  }
  // Every g * w_j from one broadcast multiplication by the weights in g's dtype: the same
  // products as separate g * w_j (which round w_j to g's dtype too), without converting a
  // scalar to a tensor per term, which costs more than the product on small states.
  const int64_t n = static_cast<int64_t>(w.size());
  std::vector<int64_t> shape(static_cast<size_t>(g.dim()) + 1, 1);
  shape[0] = n;
  torch::Tensor wt = copy_to_device(w.data(), {n}, g.options()).view(shape);
  std::vector<torch::Tensor> scaled = at::mul(g.unsqueeze(0), wt).unbind(0);
  for (size_t j = 0; j < w.size(); ++j)
    if (wanted(j)) grads[j] = w[j] == 1.0 ? g : scaled[j];
  return grads;
}

// --- lincomb: autograd -------------------------------------------------------------------------

// One node for the whole combination; its backward hands grad to y and h * w_j * grad to each
// k_j (broadcast terms get the sum over their broadcast dimensions from the engine).
struct LinComb : public torch::autograd::Function<LinComb> {
  // The terms come as a TensorList: the argument type the extractor expands into one input per
  // tensor (a std::vector would count as a single non-tensor argument). Every term is defined:
  // the autograd machinery needs a device for each input.
  static torch::Tensor forward(AutogradContext* ctx, at::TensorList terms, const Weights& weights) {
    ctx->saved_data["w"] = weights.w;
    at::AutoDispatchBelowADInplaceOrView below;
    return lincomb_op().call(std::nullopt, terms, weights.w, 1.0);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const std::vector<double> w = ctx->saved_data["w"].toDoubleVector();
    variable_list grads = lincomb_grads(grad_out[0], w, [](size_t) { return true; });
    grads.emplace_back();  // the weights
    return grads;
  }
};

// The same node without the dispatcher and the custom-Function machinery, for the solver's own
// combinations of plain CPU terms (lincomb_recorded): a node per stage is most of the unrolled
// graph of a small f, and the generic route (two dispatches, the terms checked twice, the
// weights boxed into the context) cost more than the arithmetic and the node together.
//
// Within a recorded solve (a GradSinks scope, core/grad_sinks.h) it also takes part in the
// deferred gradients of the stages: a term it reads after the term's first reader gets its
// share added into the term's DepositBox (host loops) instead of returned, and a term it reads
// first it emits, with the deposits and whatever came through its extra inputs added.
struct LinCombNode : public torch::autograd::Node {
  explicit LinCombNode(std::vector<double> w) : w_(std::move(w)) {}
  std::string name() const override { return "diffeqlayers::LinCombBackward"; }
  variable_list apply(variable_list&& grad_out) override {
    const torch::Tensor& g = grad_out[0];
    if (roles_.empty())
      return lincomb_grads(g, w_, [this](size_t j) { return should_compute_output(j); });
    const bool host = g.defined() && host_loop_grad(g);
    auto deposits = [&](size_t j) {
      const detail::DepositRole& r = roles_[j];
      return host && r.box && !r.emit && r.box->matches(g.scalar_type(), g.numel());
    };
    variable_list grads =
        lincomb_grads(g, w_, [&](size_t j) { return should_compute_output(j) && !deposits(j); });
    for (size_t j = 0; j < w_.size(); ++j) {
      const detail::DepositRole& r = roles_[j];
      if (!r.box) continue;
      if (!should_compute_output(j)) {
        if (r.emit) r.box->take();  // drops this pass's deposits, if any
        continue;
      }
      if (!r.emit) {
        if (deposits(j)) r.box->add(g, w_[j]);
        continue;
      }
      grads[j] = r.box->emit(grads[j], grad_out[r.slot]);
    }
    return grads;
  }
  std::vector<detail::DepositRole> roles_;  // per term; empty outside a GradSinks scope

 private:
  std::vector<double> w_;
};

bool any_requires_grad(const std::optional<torch::Tensor>& y, at::TensorList ks) {
  if (!at::GradMode::is_enabled()) return false;
  if (y.has_value() && y->defined() && y->requires_grad()) return true;
  for (const auto& k : ks)
    if (k.defined() && k.requires_grad()) return true;
  return false;
}

torch::Tensor lincomb_autograd(const std::optional<torch::Tensor>& y, at::TensorList ks,
                               at::ArrayRef<double> weights, double h) {
  if (!any_requires_grad(y, ks)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return lincomb_op().call(y, ks, weights, h);
  }
  Terms g = gather("diffeqlayers::lincomb", y, ks, weights, h);
  return LinComb::apply(at::TensorList(g.t), Weights{std::move(g.w)});
}

void lincomb_into_autograd(const std::optional<torch::Tensor>& y, at::TensorList ks,
                           at::ArrayRef<double> weights, double h, const torch::Tensor& out) {
  TORCH_CHECK(!any_requires_grad(y, ks) && !(at::GradMode::is_enabled() && out.requires_grad()),
              "diffeqlayers::lincomb_into writes into out and doesn't support automatic "
              "differentiation, but one of the arguments requires grad (use "
              "diffeqlayers::lincomb, or run under torch.no_grad())");
  {
    at::AutoDispatchBelowADInplaceOrView below;
    lincomb_into_op().call(y, ks, weights, h, out);
  }
  torch::autograd::impl::bump_version(out);
}

// --- error_norm: CPU and CUDA ------------------------------------------------------------------

void check_error_inputs(at::TensorList ks, at::ArrayRef<double> weights, double h,
                        const torch::Tensor& y0, const torch::Tensor& y1, double atol,
                        double rtol) {
  const char* op = "diffeqlayers::error_norm";
  check_weights(op, ks, weights, h);
  TORCH_CHECK_VALUE(std::isfinite(atol) && atol >= 0, op,
                    ": atol must be a non-negative number, got ", atol);
  TORCH_CHECK_VALUE(std::isfinite(rtol) && rtol >= 0, op,
                    ": rtol must be a non-negative number, got ", rtol);
  TORCH_CHECK_VALUE(atol > 0 || rtol > 0, op, ": atol and rtol are both zero");
  for (size_t j = 0; j < ks.size(); ++j) {
    check_term(op, "ks", j, ks[j], ks[0]);
    TORCH_CHECK_VALUE(ks[j].sym_sizes() == ks[0].sym_sizes(), op, ": ks[", j, "] has shape ",
                      ks[j].sym_sizes(), " but ks[0] has shape ", ks[0].sym_sizes());
  }
  check_term(op, "y0", 0, y0, ks[0]);
  check_term(op, "y1", 0, y1, ks[0]);
  TORCH_CHECK_VALUE(y0.sym_sizes() == ks[0].sym_sizes() && y1.sym_sizes() == ks[0].sym_sizes(), op,
                    ": y0 (shape ", y0.sym_sizes(), ") and y1 (shape ", y1.sym_sizes(),
                    ") must have the shape of the terms, ", ks[0].sym_sizes());
  TORCH_CHECK_VALUE(ks[0].sym_numel() != 0, op, ": the terms are empty");
}

std::vector<double> scaled_weights(at::ArrayRef<double> weights, double h) {
  std::vector<double> hw(weights.begin(), weights.end());
  for (double& x : hw) x *= h;
  return hw;
}

// ATen ops (CUDA, and CPU tensors the fused loop does not take): the error as the solver's
// combination, the scale, and the norm accumulated in double.
torch::Tensor error_norm_aten(at::TensorList ks, at::ArrayRef<double> weights, double h,
                              const torch::Tensor& y0, const torch::Tensor& y1, double atol,
                              double rtol) {
  check_error_inputs(ks, weights, h, y0, y1, atol, rtol);
  torch::Tensor err = combine_terms(ks, scaled_weights(weights, h));
  torch::Tensor scale = at::maximum(y0.abs(), y1.abs()).mul_(rtol).add_(atol);
  torch::Tensor scaled = err.div_(scale);
  const double n = static_cast<double>(scaled.numel());
  return at::linalg_vector_norm(scaled, 2, std::nullopt, false, at::kDouble)
      .div_(std::sqrt(n))
      .to(y0.scalar_type());
}

bool error_fusable(at::TensorList ks, const torch::Tensor& y0, const torch::Tensor& y1) {
  const auto dtype = y0.scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble) return false;
  auto plain = [](const torch::Tensor& t) {
    return t.device().is_cpu() && t.is_contiguous() && !t.is_neg() && !t.is_conj();
  };
  if (!plain(y0) || !plain(y1)) return false;
  for (const auto& k : ks)
    if (!plain(k)) return false;
  return true;
}

torch::Tensor error_norm_cpu(at::TensorList ks, at::ArrayRef<double> weights, double h,
                             const torch::Tensor& y0, const torch::Tensor& y1, double atol,
                             double rtol) {
  check_error_inputs(ks, weights, h, y0, y1, atol, rtol);
  if (!error_fusable(ks, y0, y1)) return error_norm_aten(ks, weights, h, y0, y1, atol, rtol);
  const int64_t n = y0.numel();
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES(y0.scalar_type(), "diffeqlayers_error_norm", [&] {
    std::vector<const scalar_t*> k;
    k.reserve(ks.size());
    for (const auto& kj : ks) k.push_back(kj.const_data_ptr<scalar_t>());
    // Rounded to the dtype as ATen's scalar arguments are.
    std::vector<scalar_t> w;
    w.reserve(ks.size());
    for (double x : weights) w.push_back(static_cast<scalar_t>(h * x));
    const scalar_t* p0 = y0.const_data_ptr<scalar_t>();
    const scalar_t* p1 = y1.const_data_ptr<scalar_t>();
    const auto a = static_cast<scalar_t>(atol);
    const auto r = static_cast<scalar_t>(rtol);
    // Fixed blocks summed in order: the same result whatever the number of threads.
    constexpr int64_t block = 32768;
    const int64_t nblocks = (n + block - 1) / block;
    if (nblocks == 1) {
      total = error_sum_sq<scalar_t>(k, w, p0, p1, a, r, 0, n);
      return;
    }
    std::vector<double> part(static_cast<size_t>(nblocks));
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        part[static_cast<size_t>(b)] =
            error_sum_sq<scalar_t>(k, w, p0, p1, a, r, b * block, std::min(n, (b + 1) * block));
    });
    for (double x : part) total += x;
  });
  return at::scalar_tensor(std::sqrt(total / static_cast<double>(n)), y0.options());
}

torch::Tensor error_norm_meta(at::TensorList ks, at::ArrayRef<double> weights, double h,
                              const torch::Tensor& y0, const torch::Tensor& y1, double atol,
                              double rtol) {
  check_error_inputs(ks, weights, h, y0, y1, atol, rtol);
  return at::empty({}, y0.options());
}

// --- error_norm: autograd ----------------------------------------------------------------------

// n = sqrt(mean(s^2)), s = e / c, e = sum_j w_j k_j, c = atol + rtol * max(|y0|, |y1|):
// dn/ds = s / (N n), ds/dk_j = w_j / c, ds/dc = -s / c, and max splits its gradient evenly
// between y0 and y1 at ties (as at::maximum's derivative does). At n = 0 the gradient is taken
// as zero.
struct ErrorNorm : public torch::autograd::Function<ErrorNorm> {
  static torch::Tensor forward(AutogradContext* ctx, at::TensorList ks, const Weights& weights,
                               const torch::Tensor& y0, const torch::Tensor& y1, double atol,
                               double rtol) {
    torch::Tensor n;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      n = error_norm_op().call(ks, weights.w, 1.0, y0, y1, atol, rtol);
    }
    std::vector<torch::Tensor> saved(ks.begin(), ks.end());
    saved.push_back(y0);
    saved.push_back(y1);
    saved.push_back(n);
    ctx->save_for_backward(saved);
    ctx->saved_data["w"] = weights.w;
    ctx->saved_data["atol"] = atol;
    ctx->saved_data["rtol"] = rtol;
    return n;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<double> w = ctx->saved_data["w"].toDoubleVector();
    const double rtol = ctx->saved_data["rtol"].toDouble();
    const double atol = ctx->saved_data["atol"].toDouble();
    const size_t nk = w.size();
    variable_list grads(nk + 5);
    const torch::Tensor& g = grad_out[0];
    if (!g.defined()) return grads;
    std::vector<torch::Tensor> ks(saved.begin(), saved.begin() + static_cast<int64_t>(nk));
    const torch::Tensor& y0 = saved[nk];
    const torch::Tensor& y1 = saved[nk + 1];
    const torch::Tensor& n = saved[nk + 2];
    torch::Tensor e = at::mul(ks[0], w[0]);
    for (size_t j = 1; j < nk; ++j) e = at::add(e, ks[j], w[j]);
    torch::Tensor a0 = y0.abs(), a1 = y1.abs();
    torch::Tensor c = at::maximum(a0, a1) * rtol + atol;
    torch::Tensor s = e / c;
    // The element count as a (possibly symbolic) scalar: fake tensors trace this too.
    const c10::Scalar count(s.sym_numel());
    torch::Tensor coef = at::where(n > 0, g / n.mul(count), at::zeros_like(n));
    torch::Tensor gs = s * coef;        // dL/ds
    torch::Tensor ge = gs / c;          // dL/de
    torch::Tensor gm = -ge * s * rtol;  // dL/d max(|y0|, |y1|)
    torch::Tensor half = at::eq(a0, a1).to(g.scalar_type()) * 0.5;
    for (size_t j = 0; j < nk; ++j) grads[j] = ge * w[j];
    grads[nk + 1] = gm * (at::gt(a0, a1).to(g.scalar_type()) + half) * at::sgn(y0);
    grads[nk + 2] = gm * (at::gt(a1, a0).to(g.scalar_type()) + half) * at::sgn(y1);
    return grads;
  }
};

torch::Tensor error_norm_autograd(at::TensorList ks, at::ArrayRef<double> weights, double h,
                                  const torch::Tensor& y0, const torch::Tensor& y1, double atol,
                                  double rtol) {
  bool record = at::GradMode::is_enabled() &&
                ((y0.defined() && y0.requires_grad()) || (y1.defined() && y1.requires_grad()));
  record = record || any_requires_grad(std::nullopt, ks);
  if (!record) {
    at::AutoDispatchBelowADInplaceOrView below;
    return error_norm_op().call(ks, weights, h, y0, y1, atol, rtol);
  }
  check_error_inputs(ks, weights, h, y0, y1, atol, rtol);
  return ErrorNorm::apply(ks, Weights{scaled_weights(weights, h)}, y0, y1, atol, rtol);
}

}  // namespace

TORCH_LIBRARY(diffeqlayers, m) {
  m.def("lincomb(Tensor? y, Tensor[] ks, float[] weights, float h=1.0) -> Tensor");
  // Into a preallocated buffer (returning nothing: custom operators may not return aliases of
  // their inputs).
  m.def(
      "lincomb_into(Tensor? y, Tensor[] ks, float[] weights, float h=1.0, *, Tensor(a!) out) -> "
      "()");
  m.def(
      "error_norm(Tensor[] ks, float[] weights, float h, Tensor y0, Tensor y1, float atol, "
      "float rtol) -> Tensor");
}

TORCH_LIBRARY_IMPL(diffeqlayers, CPU, m) {
  m.impl("lincomb", &lincomb_kernel);
  m.impl("lincomb_into", &lincomb_into_kernel);
  m.impl("error_norm", &error_norm_cpu);
}

TORCH_LIBRARY_IMPL(diffeqlayers, CUDA, m) {
  m.impl("lincomb", &lincomb_kernel);
  m.impl("lincomb_into", &lincomb_into_kernel);
  m.impl("error_norm", &error_norm_aten);
}

TORCH_LIBRARY_IMPL(diffeqlayers, Meta, m) {
  m.impl("lincomb", &lincomb_meta);
  m.impl("lincomb_into", &lincomb_into_meta);
  m.impl("error_norm", &error_norm_meta);
}

TORCH_LIBRARY_IMPL(diffeqlayers, Autograd, m) {
  m.impl("lincomb", &lincomb_autograd);
  m.impl("lincomb_into", &lincomb_into_autograd);
  m.impl("error_norm", &error_norm_autograd);
}

torch::Tensor lincomb(const std::optional<torch::Tensor>& y, at::TensorList ks,
                      at::ArrayRef<double> weights, double h) {
  return lincomb_op().call(y, ks, weights, h);
}

void lincomb_into(const std::optional<torch::Tensor>& y, at::TensorList ks,
                  at::ArrayRef<double> weights, double h, const torch::Tensor& out) {
  lincomb_into_op().call(y, ks, weights, h, out);
}

torch::Tensor error_norm(at::TensorList ks, at::ArrayRef<double> weights, double h,
                         const torch::Tensor& y0, const torch::Tensor& y1, double atol,
                         double rtol) {
  return error_norm_op().call(ks, weights, h, y0, y1, atol, rtol);
}

torch::Tensor lincomb_recorded(at::TensorList terms, std::vector<double> weights) {
  RECORD_FUNCTION("diffeqlayers::lincomb", std::vector<c10::IValue>());
  torch::Tensor out = combine_terms(terms, weights);
  auto node = make_node<LinCombNode>(std::move(weights));
  record_node(out, node, terms);
  if (detail::GradSinks* scope = detail::GradSinks::current())
    node->roles_ = scope->record_reader(node, terms, /*can_emit=*/true);
  return out;
}

}  // namespace diffeqlayers::kernels
