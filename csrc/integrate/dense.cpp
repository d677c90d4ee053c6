// Dense output: interpolation inside one step, and evaluation of a solved trajectory anywhere.
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/autograd_node.h"
#include "core/grad_sinks.h"
#include "core/host_copy.h"
#include "core/host_loops.h"
#include "core/lincomb.h"
#include "diffeqlayers/solve.h"
#include "integrate/interpolation.h"

namespace diffeqlayers {

std::string to_string(ReturnCode code) {
  switch (code) {
    case ReturnCode::Success:
      return "Success";
    case ReturnCode::MaxIters:
      return "MaxIters";
    case ReturnCode::DtLessThanMin:
      return "DtLessThanMin";
    case ReturnCode::Unstable:
      return "Unstable";
  }
  return "Unknown";
}

namespace detail {

// Number of interpolation weights: one per stage (own interpolant) or four (Hermite).
size_t num_weights(const Tableau& tab) { return tab.has_dense() ? tab.dense.size() : 4; }

// The weights at theta of a step of size h: on the stages, u(theta) = u0 + sum_i w_i k_i with
// w_i = h * b_i(theta), b_i(theta) = sum_m dense[i][m] theta^(m+1) (own interpolant); or on
// [u0, u1, f0, f1], the cubic Hermite basis (third order, continuous derivative).
void interpolation_weights(const Tableau& tab, double theta, double h, double* w) {
  if (tab.has_dense()) {
    for (size_t i = 0; i < tab.dense.size(); ++i) {
      double acc = 0.0, p = theta;
      for (double coef : tab.dense[i]) {
        acc += coef * p;
        p *= theta;
      }
      w[i] = h * acc;
    }
    return;
  }
  const double t2 = theta * theta, t3 = t2 * theta;
  w[0] = 2 * t3 - 3 * t2 + 1;
  w[1] = -2 * t3 + 3 * t2;
  w[2] = h * (t3 - 2 * t2 + theta);
  w[3] = h * (t3 - t2);
}

// What the weights multiply: the stages, or [u0, u1, f0, f1]. (DenseStep::k may hold more after
// them: the stages a stiff step keeps for the discrete adjoint, SolveOptions::keep_stages.)
const torch::Tensor& interpolation_term(const Tableau& tab, const DenseStep& step, size_t i) {
  const size_t stages = tab.has_dense() ? num_weights(tab) : 2;  // own: the stages; f0, f1
  TORCH_CHECK(step.k.size() >= stages, "internal: a dense step holds ", step.k.size(),
              " stages, its interpolant needs ", stages);
  if (tab.has_dense()) return step.k[i];
  return i == 0 ? step.u0 : i == 1 ? step.u1 : step.k[i - 2];
}

std::vector<torch::Tensor> interpolation_terms(const Tableau& tab, const DenseStep& step) {
  const size_t n = num_weights(tab);
  std::vector<torch::Tensor> terms;
  terms.reserve(n);
  for (size_t i = 0; i < n; ++i) terms.push_back(interpolation_term(tab, step, i));
  return terms;
}

}  // namespace detail

using detail::interpolation_terms;
using detail::interpolation_weights;
using detail::num_weights;

torch::Tensor interpolate(const Tableau& tab, const DenseStep& step, double theta) {
  if (theta == 0.0) return step.u0;
  if (theta == 1.0) return step.u1;
  std::vector<double> w(num_weights(tab));
  interpolation_weights(tab, theta, step.h, w.data());
  // The own interpolant adds to u0; the Hermite basis already carries u0 and u1.
  return lincomb(tab.has_dense() ? step.u0 : torch::Tensor(), interpolation_terms(tab, step), w);
}

namespace {

// Whether these terms (and base, when defined) are contiguous CPU float/double tensors of one
// shape and dtype without tangents, of at most kLoopInterpolationMax elements: the rows are then
// computed by interpolate_rows_loop, as the host loop computes them.
bool loop_takes(const std::vector<torch::Tensor>& terms, const torch::Tensor& base) {
  const auto dtype = terms[0].scalar_type();
  if ((dtype != at::kFloat && dtype != at::kDouble) ||
      terms[0].numel() > detail::kLoopInterpolationMax)
    return false;
  auto ok = [&](const torch::Tensor& t) {
    return plain_cpu(t, dtype) && t.is_contiguous() && t.sizes() == terms[0].sizes();
  };
  for (const auto& t : terms)
    if (!ok(t)) return false;
  return !base.defined() || ok(base);
}

bool any_records(const std::vector<torch::Tensor>& terms, const torch::Tensor& base) {
  if (!at::GradMode::is_enabled()) return false;
  for (const auto& t : terms)
    if (t.requires_grad()) return true;
  return base.defined() && base.requires_grad();
}

// The m rows by interpolate_rows_loop (loop_takes(terms, base)) in a fresh tensor of `shape`
// (m times the terms' numel elements); w [m, terms] row-major in double, rounded to the dtype as
// a weight tensor would be.
torch::Tensor rows_by_loop(const std::vector<double>& w, int64_t m,
                           const std::vector<torch::Tensor>& terms, const torch::Tensor& base,
                           at::IntArrayRef shape) {
  const int64_t n = terms[0].numel();
  torch::Tensor out = at::empty(shape, terms[0].options());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "diffeqlayers_interpolate", [&] {
    std::vector<const scalar_t*> src;
    src.reserve(terms.size());
    for (const auto& t : terms) src.push_back(t.const_data_ptr<scalar_t>());
    const std::vector<scalar_t> ws(w.begin(), w.end());
    detail::interpolate_rows_loop<scalar_t>(
        out.mutable_data_ptr<scalar_t>(), src, ws.data(), m,
        base.defined() ? base.const_data_ptr<scalar_t>() : nullptr, n);
  });
  return out;
}

// The backward of the save points interpolated in one step, rows = W [m, n] times the n terms
// (plus the base u0 for an interpolant on the stages): term j gets sum_i W[i, j] g[i], the base
// the sum of the rows of g. A contiguous CPU float/double gradient that records nothing takes
// host loops (rows in order, one product and one addition at a time); others ATen's product.
struct InterpolationNode : public torch::autograd::Node {
  InterpolationNode(std::vector<double> w, int64_t m, bool base)
      : w_(std::move(w)), m_(m), base_(base) {}
  std::string name() const override { return "diffeqlayers::InterpolationBackward"; }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grad_out) override {
    const int64_t n = static_cast<int64_t>(w_.size()) / m_;
    torch::autograd::variable_list grads(static_cast<size_t>(n) + (base_ ? 1 : 0));
    const torch::Tensor& g = grad_out[0];
    if (!g.defined()) return grads;
    const auto shape = g.sizes().slice(1);
    auto wanted = [&](int64_t j) { return should_compute_output(static_cast<size_t>(j)); };
    if (host_loop_grad(g)) {
      const int64_t len = g.numel() / m_;
      AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "diffeqlayers_interpolate_backward", [&] {
        const scalar_t* gd = g.const_data_ptr<scalar_t>();
        for (int64_t j = 0; j < n; ++j) {
          if (!wanted(j)) continue;
          // A stage whose gradient is deferred (core/grad_sinks.h): its share is added into the
          // box, handing its emitter an undefined gradient.
          const detail::DepositRole* role =
              roles_.empty() ? nullptr : &roles_[static_cast<size_t>(j)];
          const bool deposit = role != nullptr && role->box && !role->emit &&
                               role->box->matches(g.scalar_type(), len);
          torch::Tensor out = deposit ? role->box->buffer() : at::empty(shape, g.options());
          scalar_t* o = out.mutable_data_ptr<scalar_t>();
          for (int64_t i = 0; i < m_; ++i) {
            const auto wij = static_cast<scalar_t>(w_[static_cast<size_t>(i * n + j)]);
            const scalar_t* gi = gd + i * len;
            if (i == 0 && !deposit) {
              for (int64_t e = 0; e < len; ++e) o[e] = wij * gi[e];
            } else {
              for (int64_t e = 0; e < len; ++e) o[e] += wij * gi[e];
            }
          }
          if (!deposit) grads[static_cast<size_t>(j)] = std::move(out);
        }
        if (base_ && wanted(n)) {
          torch::Tensor out = at::empty(shape, g.options());
          scalar_t* o = out.mutable_data_ptr<scalar_t>();
          std::memcpy(o, gd, sizeof(scalar_t) * static_cast<size_t>(len));
          for (int64_t i = 1; i < m_; ++i)
            for (int64_t e = 0; e < len; ++e) o[e] += gd[i * len + e];
          grads.back() = std::move(out);
        }
      });
      return grads;
    }
    const torch::Tensor g2 = g.reshape({m_, -1});
    const torch::Tensor gk = at::mm(copy_to_device(w_.data(), {m_, n}, g.options()).t(), g2);
    for (int64_t j = 0; j < n; ++j)
      if (wanted(j)) grads[static_cast<size_t>(j)] = gk.select(0, j).view(shape);
    if (base_ && wanted(n)) grads.back() = g2.sum(0).view(shape);
    return grads;
  }

 private:
  std::vector<double> w_;  // [m, n] row-major
  int64_t m_;
  bool base_;

 public:
  std::vector<detail::DepositRole> roles_;  // per input; empty outside a GradSinks scope
};

}  // namespace

torch::Tensor interpolate_many(const Tableau& tab, const DenseStep& step,
                               const std::vector<double>& thetas) {
  const int64_t m = static_cast<int64_t>(thetas.size());
  const bool own = tab.has_dense();
  const int64_t ns = static_cast<int64_t>(num_weights(tab));
  std::vector<double> w(static_cast<size_t>(m * ns));
  for (int64_t j = 0; j < m; ++j)
    interpolation_weights(tab, thetas[static_cast<size_t>(j)], step.h, w.data() + j * ns);
  const torch::Tensor& u0 = step.u0;
  std::vector<int64_t> shape{m};
  for (int64_t d : u0.sizes()) shape.push_back(d);
  const std::vector<torch::Tensor> terms = interpolation_terms(tab, step);
  const torch::Tensor base = own ? u0 : torch::Tensor();
  // Small plain CPU terms: host loops, recorded (when autograd records) as one node
  // (InterpolationNode) instead of the five of a stack, two views, a product and a sum, and
  // without the product's fixed cost, which exceeds its arithmetic on small states.
  if (loop_takes(terms, base)) {
    const bool record = any_records(terms, base);
    torch::Tensor out = rows_by_loop(w, m, terms, base, shape);
    if (record) {
      std::vector<torch::Tensor> inputs = terms;
      if (own) inputs.push_back(u0);
      auto node = detail::make_node<InterpolationNode>(std::move(w), m, own);
      detail::record_node(out, node, inputs);
      if (detail::GradSinks* scope = detail::GradSinks::current())
        node->roles_ = scope->record_reader(node, inputs, /*can_emit=*/false);
    }
    return out;
  }
  const torch::Tensor W = copy_to_device(w.data(), {m, ns}, u0.options());
  // Stack the stages as they are and flatten once: two view nodes per step, not one per stage.
  // Terms the loop takes (the primals of duals here) are combined as in the plain case.
  auto combine = [&](const std::vector<torch::Tensor>& ks, const torch::Tensor& b) {
    if (!any_records(ks, b) && loop_takes(ks, own ? b : torch::Tensor()))
      return rows_by_loop(w, m, ks, own ? b : torch::Tensor(), {m, ks[0].numel()});
    torch::Tensor out = at::mm(W, at::stack(ks).reshape({ns, -1}));  // [m, N] ([m, K N])
    if (own) out = out + b.reshape({1, -1});
    return out;
  };
  // Forward mode without recording: primals and tangents interpolated apart (as lincomb does),
  // the primal exactly as in the plain case.
  if (!at::GradMode::is_enabled() && u0._fw_grad(/*level=*/0).defined()) {
    std::vector<torch::Tensor> all = terms;
    all.push_back(u0);
    SplitDuals parts;
    bool ok = split_duals(all, parts);
    for (size_t j = 0; ok && j < all.size(); ++j)
      ok = parts.tangents[j].defined() && parts.tangents[j].sizes() == parts.tangents[0].sizes();
    if (ok) {
      const torch::Tensor base_p = parts.primals.back(), base_t = parts.tangents.back();
      parts.primals.pop_back();
      parts.tangents.pop_back();
      torch::Tensor primal = combine(parts.primals, base_p).reshape(shape);
      torch::Tensor tangent = combine(parts.tangents, base_t);
      if (parts.level >= 0) {
        std::vector<int64_t> bshape{m, parts.batch};
        bshape.insert(bshape.end(), shape.begin() + 1, shape.end());
        // The batch dimension first, in memory too (vmap refuses views of other layouts).
        tangent = tangent.reshape(bshape).movedim(1, 0).contiguous();
      } else {
        tangent = tangent.reshape(shape);
      }
      return make_dual(primal, tangent, parts.level);
    }
  }
  return combine(terms, u0).reshape(shape);
}

torch::Tensor DenseOutput::operator()(double t) const {
  TORCH_CHECK_VALUE(!steps_.empty(), "the dense output holds no steps");
  const double ta = steps_.front().t0;
  const double tb = steps_.back().t0 + steps_.back().h;
  const double tol = 1e-12 * std::max({1.0, std::abs(ta), std::abs(tb)});
  TORCH_CHECK_VALUE(
      std::isfinite(t) && direction_ * (t - ta) >= -tol && direction_ * (tb - t) >= -tol, "t=", t,
      " is outside the solved span [", ta, ", ", tb, "]");
  // First step whose end lies at or beyond t in the direction of integration.
  auto it = std::lower_bound(steps_.begin(), steps_.end(), t, [&](const DenseStep& s, double x) {
    return direction_ * (s.t0 + s.h - x) < 0;
  });
  if (it == steps_.end()) --it;
  const double theta = std::clamp((t - it->t0) / it->h, 0.0, 1.0);
  return interpolate(*tab_, *it, theta);
}

torch::Tensor Solution::operator()(double t) const {
  TORCH_CHECK_VALUE(dense != nullptr,
                    "this solution kept no dense output: solve with dense=true to evaluate it "
                    "between the saved times");
  return (*dense)(t);
}

}  // namespace diffeqlayers
