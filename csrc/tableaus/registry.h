// Internal to csrc/tableaus: the constructors of the built-in tableaus and small helpers for them.
#pragma once

#include <cstddef>
#include <stdexcept>
#include <vector>

#include "diffeqlayers/tableau.h"

namespace diffeqlayers {
namespace tableaus {

// Fixed-step methods (no error estimate).
Tableau make_euler();
Tableau make_midpoint();
Tableau make_heun2();
Tableau make_heun3();
Tableau make_ralston();
Tableau make_rk4();

// Embedded pairs.
Tableau make_adaptive_heun();
Tableau make_fehlberg2();
Tableau make_bosh3();
Tableau make_dopri5();
Tableau make_tsit5();
Tableau make_dopri8();

// b_err = b - b_hat. Papers publish the two weight vectors; keeping them verbatim in the method
// files and subtracting here keeps every literal traceable to its source.
inline std::vector<double> embedded_error(const std::vector<double>& b,
                                          const std::vector<double>& b_hat) {
  if (b.size() != b_hat.size()) {
    throw std::invalid_argument("embedded_error: b and b_hat differ in length");
  }
  std::vector<double> err(b.size());
  for (std::size_t i = 0; i < b.size(); ++i) err[i] = b[i] - b_hat[i];
  return err;
}

// Product of two polynomials given by their coefficients in increasing powers. Used to expand
// interpolants that papers publish in factored form.
inline std::vector<double> poly_mul(const std::vector<double>& p, const std::vector<double>& q) {
  std::vector<double> r(p.size() + q.size() - 1, 0.0);
  for (std::size_t i = 0; i < p.size(); ++i) {
    for (std::size_t j = 0; j < q.size(); ++j) r[i + j] += p[i] * q[j];
  }
  return r;
}

}  // namespace tableaus
}  // namespace diffeqlayers
