// Dense output: interpolation inside one step, and evaluation of a solved trajectory anywhere.
#include <algorithm>
#include <cmath>

#include "core/lincomb.h"
#include "diffeqlayers/solve.h"

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

torch::Tensor interpolate(const Tableau& tab, const DenseStep& step, double theta) {
  if (theta == 0.0) return step.u0;
  if (theta == 1.0) return step.u1;
  const double h = step.h;
  std::vector<torch::Tensor> terms;
  std::vector<double> w;
  if (tab.has_dense()) {
    // u0 + h * sum_i b_i(theta) k_i with b_i(theta) = sum_m dense[i][m] theta^(m+1).
    for (size_t i = 0; i < tab.dense.size(); ++i) {
      double acc = 0.0, p = theta;
      for (double coef : tab.dense[i]) {
        acc += coef * p;
        p *= theta;
      }
      if (acc == 0.0) continue;
      terms.push_back(step.k[i]);
      w.push_back(h * acc);
    }
    return terms.empty() ? step.u0 : lincomb(step.u0, terms, w);
  }
  // Cubic Hermite through (u0, f0) and (u1, f1): third order, continuous derivative.
  const double t2 = theta * theta, t3 = t2 * theta;
  terms = {step.u0, step.u1, step.k[0], step.k[1]};
  w = {2 * t3 - 3 * t2 + 1, -2 * t3 + 3 * t2, h * (t3 - 2 * t2 + theta), h * (t3 - t2)};
  return lincomb(torch::Tensor(), terms, w);
}

torch::Tensor interpolate_many(const Tableau& tab, const DenseStep& step,
                               const std::vector<double>& thetas) {
  const int64_t m = static_cast<int64_t>(thetas.size());
  const bool own = tab.has_dense();
  // Rows of weights on the stacked stages (own interpolant), or on [u0, u1, f0, f1] (Hermite).
  const int64_t ns = own ? static_cast<int64_t>(tab.dense.size()) : 4;
  std::vector<double> w(static_cast<size_t>(m * ns), 0.0);
  const double h = step.h;
  for (int64_t j = 0; j < m; ++j) {
    const double th = thetas[static_cast<size_t>(j)];
    double* row = w.data() + j * ns;
    if (own) {
      for (int64_t i = 0; i < ns; ++i) {
        double acc = 0.0, p = th;
        for (double coef : tab.dense[static_cast<size_t>(i)]) {
          acc += coef * p;
          p *= th;
        }
        row[i] = h * acc;
      }
    } else {
      const double t2 = th * th, t3 = t2 * th;
      row[0] = 2 * t3 - 3 * t2 + 1;
      row[1] = -2 * t3 + 3 * t2;
      row[2] = h * (t3 - 2 * t2 + th);
      row[3] = h * (t3 - t2);
    }
  }
  const torch::Tensor& u0 = step.u0;
  // copy=true: from_blob does not own w, and mm saves W for backward.
  torch::Tensor W = torch::from_blob(w.data(), {m, ns}, torch::dtype(torch::kFloat64))
                        .to(u0.options(), /*non_blocking=*/false, /*copy=*/true);
  // Stack the stages as they are and flatten once: two view nodes per step, not one per stage.
  const std::vector<torch::Tensor> parts =
      own ? step.k : std::vector<torch::Tensor>{u0, step.u1, step.k[0], step.k[1]};
  torch::Tensor out = at::mm(W, at::stack(parts).reshape({ns, -1}));  // [m, N]
  if (own) out = out + u0.reshape({1, -1});
  std::vector<int64_t> shape{m};
  for (int64_t d : u0.sizes()) shape.push_back(d);
  return out.reshape(shape);
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
