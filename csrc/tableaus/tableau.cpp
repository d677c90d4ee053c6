// Tableau's checks (fsal, controller order, validate) and the registry of built-in methods.
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "diffeqlayers/tableau.h"
#include "tableaus/registry.h"

namespace diffeqlayers {
namespace {

// Coefficients copied from papers carry rounding of order 1e-16 relative to their magnitude, so
// sums are compared with a tolerance scaled by the sum of absolute values (dopri8 has weights of
// size ~50 whose sums cancel to O(1)).
bool sum_close(const std::vector<double>& v, double target, double tol) {
  double sum = 0.0;
  double abs_sum = 0.0;
  for (double x : v) {
    sum += x;
    abs_sum += std::abs(x);
  }
  return std::abs(sum - target) <= tol * std::max(1.0, abs_sum);
}

double sum_of(const std::vector<double>& v) {
  double sum = 0.0;
  for (double x : v) sum += x;
  return sum;
}

[[noreturn]] void fail(const Tableau& tab, const std::string& what) {
  const std::string name = tab.name.empty() ? std::string("<unnamed>") : tab.name;
  throw std::invalid_argument("invalid Butcher tableau '" + name + "': " + what);
}

std::string str(double x) {
  std::ostringstream out;
  out.precision(17);
  out << x;
  return out.str();
}

bool all_finite(const std::vector<double>& v) {
  return std::all_of(v.begin(), v.end(), [](double x) { return std::isfinite(x); });
}

}  // namespace

bool Tableau::fsal() const {
  const int s = stages();
  // One stage cannot be FSAL: its only stage is f at the start of the step.
  if (s < 2 || static_cast<int>(a.size()) != s || static_cast<int>(b.size()) != s) return false;
  // A tolerance of a few ulps rather than ==, so that a row written as a different but equal
  // expression still counts; reusing the stage is then exact up to rounding.
  constexpr double kTol = 1e-15;
  if (std::abs(c.back() - 1.0) > kTol || std::abs(b.back()) > kTol) return false;
  const std::vector<double>& last = a.back();
  for (int j = 0; j < s - 1; ++j) {
    if (std::abs(last[j] - b[j]) > kTol * std::max(1.0, std::abs(b[j]))) return false;
  }
  return true;
}

int Tableau::controller_order() const {
  // The error estimate h * sum b_err k is dominated by the lower of the two orders' local
  // errors, O(h^(min(p, p_hat) + 1)). Without an estimate there is no controller; order + 1
  // still gives the behaviour of the local error, which is what an initial-step heuristic needs.
  if (!adaptive()) return order + 1;
  return std::min(order, embedded_order) + 1;
}

void Tableau::validate(double tol) const {
  const int s = stages();
  if (s < 1) fail(*this, "no stages (c is empty)");
  if (order < 1) fail(*this, "order must be >= 1, got " + std::to_string(order));
  if (static_cast<int>(a.size()) != s) {
    fail(*this,
         "a has " + std::to_string(a.size()) + " rows but c has " + std::to_string(s) + " stages");
  }
  if (static_cast<int>(b.size()) != s) {
    fail(*this, "b has " + std::to_string(b.size()) + " entries but there are " +
                    std::to_string(s) + " stages");
  }
  if (!all_finite(c) || !all_finite(b) || !all_finite(b_err)) {
    fail(*this, "non-finite coefficient in c, b or b_err");
  }
  for (int i = 0; i < s; ++i) {
    if (static_cast<int>(a[i].size()) != i) {
      fail(*this, "a[" + std::to_string(i) + "] has " + std::to_string(a[i].size()) +
                      " entries, expected " + std::to_string(i) + " (explicit method)");
    }
    if (!all_finite(a[i])) fail(*this, "non-finite coefficient in a[" + std::to_string(i) + "]");
    // Row-sum condition: every stage is consistent with t + c_i h.
    if (!sum_close(a[i], c[i], tol)) {
      fail(*this, "row sum of a[" + std::to_string(i) + "] is " + str(sum_of(a[i])) + " but c[" +
                      std::to_string(i) + "] is " + str(c[i]));
    }
  }
  if (!sum_close(b, 1.0, tol)) fail(*this, "sum of b is " + str(sum_of(b)) + ", expected 1");

  if (adaptive()) {
    if (static_cast<int>(b_err.size()) != s) {
      fail(*this, "b_err has " + std::to_string(b_err.size()) + " entries but there are " +
                      std::to_string(s) + " stages");
    }
    // b and b_hat are both consistent (sum 1), so their difference sums to 0.
    if (!sum_close(b_err, 0.0, tol)) {
      fail(*this, "sum of b_err is " + str(sum_of(b_err)) + ", expected 0");
    }
    if (embedded_order < 1) fail(*this, "an adaptive method needs embedded_order >= 1");
  } else if (embedded_order != 0) {
    fail(*this, "embedded_order is " + std::to_string(embedded_order) +
                    " but there is no error estimate (b_err is empty)");
  }

  if (has_dense()) {
    if (static_cast<int>(dense.size()) != s) {
      fail(*this, "dense has " + std::to_string(dense.size()) + " rows but there are " +
                      std::to_string(s) + " stages");
    }
    const std::size_t degree = dense[0].size();
    if (degree == 0) fail(*this, "dense rows are empty");
    for (int i = 0; i < s; ++i) {
      if (dense[i].size() != degree) {
        fail(*this, "dense[" + std::to_string(i) + "] has " + std::to_string(dense[i].size()) +
                        " coefficients but dense[0] has " + std::to_string(degree));
      }
      if (!all_finite(dense[i])) {
        fail(*this, "non-finite coefficient in dense[" + std::to_string(i) + "]");
      }
      // b_i(1) = b_i: the interpolant ends on the propagated solution, so the dense output is
      // continuous across steps.
      if (!sum_close(dense[i], b[i], tol)) {
        fail(*this, "interpolant at theta = 1 gives b_" + std::to_string(i) +
                        "(1) = " + str(sum_of(dense[i])) + " but b[" + std::to_string(i) + "] is " +
                        str(b[i]));
      }
    }
    if (dense_order < 1) fail(*this, "an own interpolant needs dense_order >= 1");
  } else if (dense_order != 0) {
    fail(*this, "dense_order is " + std::to_string(dense_order) + " but dense is empty");
  }
}

namespace {

// Built once, on first use (thread-safe static initialisation), and validated then: a typo in a
// coefficient file fails the first solve loudly rather than giving quietly wrong answers.
const std::map<std::string, Tableau>& registry() {
  static const std::map<std::string, Tableau> table = [] {
    std::map<std::string, Tableau> m;
    const std::vector<std::pair<std::string, Tableau>> entries = {
        {"euler", tableaus::make_euler()},
        {"midpoint", tableaus::make_midpoint()},
        {"heun2", tableaus::make_heun2()},
        {"heun3", tableaus::make_heun3()},
        {"ralston", tableaus::make_ralston()},
        {"rk4", tableaus::make_rk4()},
        {"adaptive_heun", tableaus::make_adaptive_heun()},
        {"fehlberg2", tableaus::make_fehlberg2()},
        {"bosh3", tableaus::make_bosh3()},
        {"dopri5", tableaus::make_dopri5()},
        {"tsit5", tableaus::make_tsit5()},
        {"dopri8", tableaus::make_dopri8()},
    };
    for (const auto& entry : entries) {
      Tableau tab = entry.second;
      tab.name = entry.first;
      tab.validate();
      m.emplace(entry.first, std::move(tab));
    }
    return m;
  }();
  return table;
}

}  // namespace

const Tableau& tableau(const std::string& name) {
  const auto& table = registry();
  const auto it = table.find(name);
  if (it == table.end()) {
    std::string known;
    for (const auto& entry : table) known += (known.empty() ? "" : ", ") + entry.first;
    TORCH_CHECK_VALUE(false, "unknown method '", name, "'; known methods: ", known);
  }
  return it->second;
}

std::vector<std::string> methods() {
  std::vector<std::string> names;
  for (const auto& entry : registry()) names.push_back(entry.first);
  return names;  // std::map iterates in sorted order
}

}  // namespace diffeqlayers
