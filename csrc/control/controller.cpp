// Step-size control: the PID controller and Hairer & Wanner's automatic initial step.
#include "control/controller.h"

#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/lincomb.h"
#include "integrate/explicit_loop.h"

namespace diffeqlayers {

StepController::StepController(const ControllerOptions& options, int order)
    : opt_(options), q_(static_cast<double>(order)) {
  TORCH_CHECK_VALUE(opt_.safety > 0 && opt_.safety <= 1,
                    "controller safety must be in (0, 1], got ", opt_.safety);
  TORCH_CHECK_VALUE(opt_.factor_min > 0 && opt_.factor_min < 1,
                    "controller factor_min must be in (0, 1), got ", opt_.factor_min);
  TORCH_CHECK_VALUE(opt_.factor_max > 1, "controller factor_max must exceed 1, got ",
                    opt_.factor_max);
  TORCH_CHECK_VALUE(opt_.beta1 > 0, "controller beta1 must be positive, got ", opt_.beta1);
}

double StepController::propose(double err, bool accepted) {
  // Floor the error so that a zero error (a step that is exact in the embedded pair, e.g.
  // u' = 0) gives the largest growth rather than inf or NaN.
  const double e = std::max(err, 1e-10);
  double factor;
  if (accepted) {
    factor = opt_.safety * std::pow(e, -opt_.beta1 / q_) * std::pow(e1_, -opt_.beta2 / q_) *
             std::pow(e2_, -opt_.beta3 / q_);
    factor = std::clamp(factor, opt_.factor_min, opt_.factor_max);
    // Right after a rejection, do not grow again (Hairer & Wanner, IV.2): avoids oscillating
    // between rejected large steps and accepted small ones.
    if (last_rejected_) factor = std::min(factor, 1.0);
    // The history is floored at 1e-4, as in Hairer's DOPRI5 (facold): on smooth problems whose
    // errors are far below tolerance, the memory term would otherwise hold the growth back.
    e2_ = e1_;
    e1_ = std::max(e, 1e-4);
  } else {
    // On rejection only the elementary (integral) part is meaningful.
    factor = std::clamp(opt_.safety * std::pow(e, -1.0 / q_), opt_.factor_min, 1.0);
  }
  last_rejected_ = !accepted;
  return factor;
}

namespace {

// A contiguous plain_cpu tensor (core/lincomb.h): readable in place.
bool host_readable(const torch::Tensor& x, at::ScalarType dtype) {
  return plain_cpu(x, dtype) && x.is_contiguous();
}

// initial_step with the RMS norm by host loops (one pass per norm, no temporaries): the
// quotients in the state's dtype, their squares summed in double. An f(t0 + h0, u1) that the
// loops cannot read (another layout or size) takes the tensor ops for its norm.
template <typename T>
double initial_step_rms_host(const Dynamics& f, double t0, const torch::Tensor& u0,
                             const torch::Tensor& f0, int order, int direction, double span,
                             double rtol, double atol, int64_t prefix, int64_t& nfe) {
  const int64_t n = u0.numel();
  const int64_t nn = prefix > 0 ? prefix : n;  // the elements the norm covers
  const T* u = u0.const_data_ptr<T>();
  const T* k0 = f0.const_data_ptr<T>();
  std::vector<T> scale(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    scale[static_cast<size_t>(i)] = std::abs(u[i]) * static_cast<T>(rtol) + static_cast<T>(atol);
  auto rms = [&](auto&& value) {
    double acc = 0.0;
    for (int64_t i = 0; i < nn; ++i) {
      const auto q = static_cast<double>(static_cast<T>(value(i) / scale[static_cast<size_t>(i)]));
      acc += q * q;
    }
    return std::sqrt(acc / static_cast<double>(nn));
  };
  const double d0 = rms([&](int64_t i) { return u[i]; });
  const double d1 = rms([&](int64_t i) { return k0[i]; });
  TORCH_CHECK_VALUE(std::isfinite(d0) && std::isfinite(d1),
                    "the error norm of the initial state or of f(t0, u0) is not a finite, "
                    "non-negative number (got ",
                    d0, " and ", d1, "): check the norm");
  const double h0 = initial_step_trial(d0, d1, span);
  torch::Tensor u1 = at::empty_like(u0);
  T* p1 = u1.mutable_data_ptr<T>();
  const auto w = static_cast<T>(direction * h0);
  for (int64_t i = 0; i < n; ++i) p1[i] = u[i] + w * k0[i];
  // Detached: f may read parameters that carry tangents (forward mode).
  const torch::Tensor k1 = f(t0 + direction * h0, u1).detach();
  ++nfe;
  double d2;
  if (k1.numel() == n && host_readable(k1, u0.scalar_type())) {
    const T* pk = k1.const_data_ptr<T>();
    d2 = rms([&](int64_t i) { return pk[i] - k0[i]; }) / h0;
  } else {
    const torch::Tensor st = torch::from_blob(scale.data(), u0.sizes(), u0.options());
    d2 = detail::rms_norm((k1 - f0) / st, prefix).item<double>() / h0;
  }
  return initial_step_final(h0, d1, d2, order, span);
}

}  // namespace

double initial_step(const Dynamics& f, double t0, const torch::Tensor& u0, const torch::Tensor& f0,
                    int order, int direction, double span, double rtol, double atol,
                    const std::function<double(const torch::Tensor&)>& norm, int64_t norm_prefix,
                    int64_t& nfe) {
  at::NoGradGuard no_grad;
  // Primal values only (detach drops autograd history and forward-mode tangents alike), so
  // that a forward-mode solve starts with the step of the plain one.
  const torch::Tensor u = u0.detach();
  const torch::Tensor k0 = f0.detach();
  const auto dtype = u.scalar_type();
  if (!norm && (dtype == at::kFloat || dtype == at::kDouble) && host_readable(u, dtype) &&
      host_readable(k0, dtype) && k0.numel() == u.numel()) {
    double h = 0.0;
    AT_DISPATCH_FLOATING_TYPES(dtype, "diffeqlayers_initial_step", [&] {
      h = initial_step_rms_host<scalar_t>(f, t0, u, k0, order, direction, span, rtol, atol,
                                          norm_prefix, nfe);
    });
    return h;
  }
  const std::function<double(const torch::Tensor&)> rms = [norm_prefix](const torch::Tensor& x) {
    return detail::rms_norm(x, norm_prefix).item<double>();
  };
  const auto& nrm = norm ? norm : rms;
  const torch::Tensor scale = u.abs().mul_(rtol).add_(atol);
  const double d0 = nrm(u / scale);
  const double d1 = nrm(k0 / scale);
  TORCH_CHECK_VALUE(std::isfinite(d0) && std::isfinite(d1) && d0 >= 0 && d1 >= 0,
                    "the error norm of the initial state or of f(t0, u0) is not a finite, "
                    "non-negative number (got ",
                    d0, " and ", d1, "): check the norm");
  const double h0 = initial_step_trial(d0, d1, span);
  const torch::Tensor u1 = at::add(u, k0, direction * h0);
  const torch::Tensor k1 = f(t0 + direction * h0, u1);
  ++nfe;
  const double d2 = nrm((k1.detach() - k0) / scale) / h0;
  return initial_step_final(h0, d1, d2, order, span);
}

double initial_step_trial(double d0, double d1, double span) {
  const double h0 = (d0 < 1e-5 || d1 < 1e-5) ? 1e-6 : 0.01 * d0 / d1;
  return std::min(h0, span);
}

double initial_step_final(double h0, double d1, double d2, int order, double span) {
  const double dmax = std::max(d1, d2);
  const double h1 =
      dmax <= 1e-15 ? std::max(1e-6, h0 * 1e-3) : std::pow(0.01 / dmax, 1.0 / (order + 1));
  double h = std::min(100 * h0, h1);
  if (!std::isfinite(h) || h <= 0) h = h0;
  return std::min(h, span);
}

}  // namespace diffeqlayers
