// Internal (not installed): the element loops behind the fused CPU operators (lincomb,
// error_norm, all_finite), shared by those tensor kernels and by the host loop of small solves
// (integrate/host_rk.cpp), so that both compute the same values bitwise.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

namespace diffeqlayers::detail {

// out[m] = sum_j w[j] * src[j][m] over [begin, end): one product and one addition at a time, in
// term order, with the first two terms fused into one pass when w[0] == 1 (u + w1 k1 + ...).
template <typename scalar_t>
void combine_loop(scalar_t* out, const std::vector<const scalar_t*>& src,
                  const std::vector<scalar_t>& w, int64_t begin, int64_t end) {
  const scalar_t* t0 = src[0];
  size_t j = 1;
  if (src.size() > 1 && w[0] == scalar_t(1)) {
    const scalar_t* t1 = src[1];
    const scalar_t w1 = w[1];
    for (int64_t m = begin; m < end; ++m) out[m] = t0[m] + w1 * t1[m];
    j = 2;
  } else {
    const scalar_t w0 = w[0];
    for (int64_t m = begin; m < end; ++m) out[m] = t0[m] * w0;
  }
  for (; j < src.size(); ++j) {
    const scalar_t* tj = src[j];
    const scalar_t wj = w[j];
    for (int64_t m = begin; m < end; ++m) out[m] += wj * tj[m];
  }
}

// The save points inside a step up to this many state elements are interpolated by
// interpolate_rows_loop, beyond it by one matrix product (the tensor loop and the host loop take
// the same rule, so that they agree bitwise).
constexpr int64_t kLoopInterpolationMax = 1024;

// rows[i][e] = sum_j w[i * nt + j] * terms[j][e] for i < m, e < n (nt = terms.size()), then
// + base[e] when base is given: one product and one addition at a time in term order, base last
// (as the product's result plus u0 was added before).
template <typename scalar_t>
void interpolate_rows_loop(scalar_t* rows, const std::vector<const scalar_t*>& terms,
                           const scalar_t* w, int64_t m, const scalar_t* base, int64_t n) {
  const size_t nt = terms.size();
  for (int64_t i = 0; i < m; ++i) {
    scalar_t* out = rows + i * n;
    const scalar_t* wi = w + i * static_cast<int64_t>(nt);
    const scalar_t* t0 = terms[0];
    const scalar_t w0 = wi[0];
    for (int64_t e = 0; e < n; ++e) out[e] = w0 * t0[e];
    for (size_t j = 1; j < nt; ++j) {
      const scalar_t* tj = terms[j];
      const scalar_t wj = wi[j];
      for (int64_t e = 0; e < n; ++e) out[e] += wj * tj[e];
    }
    if (base != nullptr)
      for (int64_t e = 0; e < n; ++e) out[e] = out[e] + base[e];
  }
}

// Sum over [begin, end) of s^2, s = e / (max(|y0|, |y1|) * rtol + atol) with e the combination
// of the stages taken as combine_loop takes it (so e equals the solver's error estimate
// bitwise), accumulated in double.
template <typename scalar_t>
double error_sum_sq(const std::vector<const scalar_t*>& k, const std::vector<scalar_t>& w,
                    const scalar_t* y0, const scalar_t* y1, scalar_t atol, scalar_t rtol,
                    int64_t begin, int64_t end) {
  const size_t nk = k.size();
  double acc = 0.0;
  for (int64_t m = begin; m < end; ++m) {
    scalar_t e;
    size_t j = 1;
    if (nk > 1 && w[0] == scalar_t(1)) {
      e = k[0][m] + w[1] * k[1][m];
      j = 2;
    } else {
      e = k[0][m] * w[0];
    }
    for (; j < nk; ++j) e += w[j] * k[j][m];
    const scalar_t a0 = std::abs(y0[m]), a1 = std::abs(y1[m]);
    // NaN propagates, as in at::maximum.
    const scalar_t mx = std::isnan(a1) ? a1 : (a0 < a1 ? a1 : a0);
    const double s = static_cast<double>(e / (mx * rtol + atol));
    acc += s * s;
  }
  return acc;
}

// Whether every x[i] is finite: x * 0 is NaN exactly where x is infinite or NaN, and NaN
// survives the sum.
template <typename scalar_t>
bool all_finite_loop(const scalar_t* x, int64_t n) {
  scalar_t acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += x[i] * scalar_t(0);
  return std::isfinite(static_cast<double>(acc));
}

}  // namespace diffeqlayers::detail
