// Linear combinations of stages, u + sum_j w_j k_j, as one autograd node.
#include "core/lincomb.h"

#include <ATen/Dispatch.h>
#include <ATen/LegacyBatchedTensorImpl.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdlib>
#include <string>

#include "core/host_loops.h"
#include "kernels/ops.h"

namespace diffeqlayers {
namespace {

using detail::combine_loop;

// sum_j w[j] * terms[j] as one loop over the elements, for contiguous CPU float/double terms of
// one dtype and size; undefined otherwise. Every combination of the explicit solvers runs through
// combine_no_grad (the recorded LinComb node's forward included; forward mode combines its
// primals here too), so the modes agree bitwise on the primal values. (Only the fallback of
// lincomb() for duals of unusual tangent layouts takes ATen ops instead.) Per element the sum
// is taken in term order, one product and one addition at a time. That can differ in the last
// bit from the ATen fallback below, whose add(a, b, alpha) fuses the multiply-add where the CPU
// has FMA. One loop instead of one ATen op per term is what makes small states cheap: the
// dispatcher and the allocation of every intermediate cost more than the arithmetic there.
// (The loop is detail::combine_loop, core/host_loops.h, shared with the host loop of small solves.)

// Whether combine_fused_into takes these terms and this output.
bool fusable(at::TensorList terms, const torch::Tensor& out) {
  const torch::Tensor& first = terms[0];
  if (!first.device().is_cpu() || !first.is_contiguous()) return false;
  const auto dtype = first.scalar_type();
  if (dtype != at::kDouble && dtype != at::kFloat) return false;
  for (const auto& t : terms)
    if (t.scalar_type() != dtype || t.sizes() != first.sizes() || !t.device().is_cpu() ||
        !t.is_contiguous() || t.is_neg() || t.is_conj() || !plain_strided(t))
      return false;
  return !out.defined() ||
         (out.scalar_type() == dtype && out.sizes() == first.sizes() && out.device().is_cpu() &&
          out.is_contiguous() && !out.is_neg() && !out.is_conj());
}

// The fused loop into `out` (fusable(terms, out), out not overlapping any term).
void combine_fused_into(const torch::Tensor& out, at::TensorList terms, at::ArrayRef<double> w) {
  const int64_t n = out.numel();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "diffeqlayers_lincomb", [&] {
    std::vector<const scalar_t*> src;
    src.reserve(terms.size());
    for (const auto& t : terms) src.push_back(t.const_data_ptr<scalar_t>());
    // The weights are rounded to the state's dtype, as an ATen scalar multiplier would be.
    std::vector<scalar_t> sw(w.begin(), w.end());
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 32768, [&](int64_t begin, int64_t end) {
      combine_loop<scalar_t>(dst, src, sw, begin, end);
    });
  });
}

torch::Tensor combine_fused(at::TensorList terms, at::ArrayRef<double> w) {
  if (!fusable(terms, torch::Tensor())) return {};
  torch::Tensor out = at::empty_like(terms[0], at::MemoryFormat::Contiguous);
  combine_fused_into(out, terms, w);
  return out;
}

// sum_j w[j] * terms[j] by out-of-place ATen ops: terms may broadcast against each other (an
// unbatched tangent against batched ones), and dual terms carry their tangents through it.
torch::Tensor combine_out_of_place(at::TensorList terms, at::ArrayRef<double> w) {
  torch::Tensor out = at::mul(terms[0], w[0]);
  for (size_t j = 1; j < terms.size(); ++j) out = at::add(out, terms[j], w[j]);
  return out;
}

// sum_j w[j] * terms[j] into one fresh tensor.
torch::Tensor combine_no_grad(at::TensorList terms, at::ArrayRef<double> w) {
  if (torch::Tensor fused = combine_fused(terms, w); fused.defined()) return fused;
  torch::Tensor out;
  size_t j = 1;
  if (terms.size() > 1 && w[0] == 1.0) {
    out = at::add(terms[0], terms[1], w[1]);
    j = 2;
  } else {
    out = at::mul(terms[0], w[0]);
  }
  for (; j < terms.size(); ++j) out.add_(terms[j], w[j]);
  return out;
}

// The dual case (forward mode: diffeq_fd, diffeq_jvp). Plain ATen ops on dual tensors would also
// carry the tangents, but every op would pay the dual dispatch, and, for batched tangents, the
// vmap dispatch too, twice per term (the product and the sum). Here the primal and the tangent
// are combined separately (the tangent of a linear combination is the same combination of the
// tangents) and paired once at the end. Returns undefined when a term's tangent has a layout
// this path does not handle; the caller then uses plain ops.
torch::Tensor lincomb_dual(const std::vector<torch::Tensor>& terms, const std::vector<double>& w) {
  SplitDuals parts;
  // The fused loop reads the duals' data in place, which is their primals' (no primal tensors
  // to make and free); other layouts combine the primals split off as tensors.
  const bool in_place = fusable(terms, torch::Tensor());
  if (!split_duals(terms, parts, /*with_primals=*/!in_place)) return {};
  std::vector<torch::Tensor> tangents;
  std::vector<double> tw;
  for (size_t j = 0; j < terms.size(); ++j) {
    if (!parts.tangents[j].defined()) continue;
    tangents.push_back(parts.tangents[j]);
    tw.push_back(w[j]);
  }
  torch::Tensor out;
  if (in_place) {
    out = at::empty(terms[0].sizes(), terms[0].options());
    combine_fused_into(out, terms, w);
  } else {
    out = combine_no_grad(parts.primals, w);
  }
  if (tangents.empty()) return out;
  bool same = true;
  for (const auto& t : tangents) same = same && t.sizes() == tangents[0].sizes();
  // combine_no_grad accumulates in place, which needs terms of one shape.
  torch::Tensor tan = same ? combine_no_grad(tangents, tw) : combine_out_of_place(tangents, tw);
  return make_dual(out, tan, parts.level);
}

}  // namespace

bool plain_strided(const torch::Tensor& t) {
  static const c10::DispatchKeySet wrappers(
      {c10::DispatchKey::Batched, c10::DispatchKey::FuncTorchBatched,
       c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::Python,
       c10::DispatchKey::Functionalize});
  return t.layout() == at::kStrided && !t.key_set().has_any(wrappers);
}

bool plain_cpu(const torch::Tensor& x, at::ScalarType dtype) {
  return x.device().is_cpu() && x.scalar_type() == dtype && plain_strided(x) && !x.is_conj() &&
         !x.is_neg() && !x._fw_grad(/*level=*/0).defined();
}

bool host_loop_grad(const torch::Tensor& g) {
  const auto dtype = g.scalar_type();
  return (dtype == at::kFloat || dtype == at::kDouble) && plain_cpu(g, dtype) &&
         g.is_contiguous() && !(at::GradMode::is_enabled() && g.requires_grad());
}

bool positions_by_identity(at::TensorList wrt, at::TensorList params, std::vector<int64_t>& which) {
  which.assign(wrt.size(), -1);
  std::vector<bool> taken(params.size(), false);
  for (size_t i = 0; i < wrt.size(); ++i)
    for (size_t j = 0; j < params.size(); ++j)
      if (wrt[i].unsafeGetTensorImpl() == params[j].unsafeGetTensorImpl()) {
        if (taken[j]) return false;
        taken[j] = true;
        which[i] = static_cast<int64_t>(j);
      }
  return true;
}

bool split_duals(const std::vector<torch::Tensor>& terms, SplitDuals& out, bool with_primals) {
  out.primals.clear();
  out.tangents.clear();
  out.level = -1;
  out.batch = 0;
  for (const auto& term : terms) {
    // The primal as variable_data() (a tensor on the same storage without autograd meta) where
    // the term is a plain strided tensor, instead of _unpack_dual's differentiable view: that
    // view costs dispatches through the autograd and view kernels and a view record to build and
    // to free, several times the combination itself on small states. The primal is only read
    // here. The tangent is the same one _unpack_dual returns.
    torch::Tensor p;
    if (with_primals)
      p = plain_strided(term) ? torch::Tensor(term.variable_data()) : term._fw_primal(/*level=*/0);
    torch::Tensor t = term._fw_grad(/*level=*/0);
    out.primals.push_back(std::move(p));
    const at::BatchedTensorImpl* impl = t.defined() ? at::maybeGetBatchedImpl(t) : nullptr;
    if (impl == nullptr) {
      out.tangents.push_back(t);
      continue;
    }
    const auto bdims = impl->bdims();
    if (bdims.size() != 1 || (out.level >= 0 && bdims[0].level() != out.level)) return false;
    torch::Tensor v =
        bdims[0].dim() == 0 ? impl->value() : impl->value().movedim(bdims[0].dim(), 0);
    if (out.level >= 0 && v.size(0) != out.batch) return false;
    out.level = bdims[0].level();
    out.batch = v.size(0);
    out.tangents.push_back(std::move(v));
  }
  return true;
}

torch::Tensor make_dual(const torch::Tensor& primal, const torch::Tensor& tangent, int64_t level) {
  return at::_make_dual(primal, level >= 0 ? at::addBatchDim(tangent, level, 0) : tangent,
                        /*level=*/0);
}

torch::Tensor lincomb(const torch::Tensor& u, const std::vector<torch::Tensor>& k,
                      const std::vector<double>& w, const torch::Tensor& buffer) {
  TORCH_INTERNAL_ASSERT(!k.empty() && k.size() == w.size());
  std::vector<torch::Tensor> terms;
  std::vector<double> weights;
  terms.reserve(k.size() + 1);
  weights.reserve(k.size() + 1);
  if (u.defined()) {
    terms.push_back(u);
    weights.push_back(1.0);
  }
  terms.insert(terms.end(), k.begin(), k.end());
  weights.insert(weights.end(), w.begin(), w.end());
  bool record = false, dual = false;
  for (const auto& t : terms) {
    record = record || t.requires_grad();
    dual = dual || t._fw_grad(/*level=*/0).defined();
  }
  record = record && at::GradMode::is_enabled();
  // C++ autograd Functions have no forward-mode formula: dual tensors take plain ATen ops,
  // which carry tangents (and record reverse mode too, one node per term).
  if (dual && !record) {
    torch::Tensor out = lincomb_dual(terms, weights);
    if (out.defined()) return out;
  }
  if (dual) return combine_out_of_place(terms, weights);
  // Recorded on plain CPU terms: the node without the dispatcher (the same values and gradients
  // as the registered operator's, at a fraction of its cost per stage).
  if (record && fusable(terms, torch::Tensor()))
    return kernels::lincomb_recorded(terms, std::move(weights));
  // For benchmarks only (as solve.cpp's bench_unfused): the unrecorded combination called
  // directly, as before the registered operator.
  static const bool unfused = [] {
    const char* e = std::getenv("DIFFEQLAYERS_BENCH_UNFUSED");
    return e != nullptr && std::string(e) == "1";
  }();
  if (!record && unfused) return combine_no_grad(terms, weights);
  // The registered operator: its Autograd kernel records one node (LinComb in
  // csrc/kernels/ops.cpp) when a term requires grad, else it runs the fused loop, into the
  // buffer when the caller lends one.
  if (!record && buffer.defined()) {
    kernels::lincomb_into(std::nullopt, terms, weights, 1.0, buffer);
    return buffer;
  }
  return kernels::lincomb(std::nullopt, terms, weights, 1.0);
}

torch::Tensor combine_terms(at::TensorList terms, at::ArrayRef<double> w) {
  return combine_no_grad(terms, w);
}

void combine_terms_into(const torch::Tensor& out, at::TensorList terms, at::ArrayRef<double> w) {
  if (fusable(terms, out)) return combine_fused_into(out, terms, w);
  // The ATen ops of combine_no_grad's fallback, written into out (terms broadcast to it).
  size_t j = 1;
  if (terms.size() > 1 && w[0] == 1.0) {
    torch::Tensor o = out;  // add_out takes a mutable reference; the tensor is the same
    at::add_out(o, terms[0], terms[1], w[1]);
    j = 2;
  } else {
    out.copy_(terms[0]).mul_(w[0]);
  }
  for (; j < terms.size(); ++j) out.add_(terms[j], w[j]);
}

bool all_finite(const torch::Tensor& t) {
  const auto dtype = t.scalar_type();
  if (t.device().is_cpu() && plain_strided(t) && t.is_contiguous() &&
      (dtype == at::kDouble || dtype == at::kFloat)) {
    bool ok = true;
    AT_DISPATCH_FLOATING_TYPES(dtype, "diffeqlayers_all_finite", [&] {
      ok = detail::all_finite_loop(t.const_data_ptr<scalar_t>(), t.numel());
    });
    return ok;
  }
  at::NoGradGuard g;
  return std::isfinite(detached(t).sum().item<double>());
}

}  // namespace diffeqlayers
