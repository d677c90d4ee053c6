// The Heun-Euler 2(1) pair: Heun's explicit trapezoidal rule propagated, explicit Euler embedded.
//
// Source: both members are in Hairer, Norsett & Wanner, Solving ODEs I, Sec. II.1; the pairing for
// step-size control is the simplest embedded formula of Sec. II.4 (torchdiffeq's adaptive_heun).
#include "tableaus/registry.h"

namespace diffeqlayers {
namespace tableaus {

Tableau make_adaptive_heun() {
  Tableau t;
  t.name = "adaptive_heun";
  t.order = 2;
  t.embedded_order = 1;
  t.c = {0.0, 1.0};
  t.a = {{}, {1.0}};
  t.b = {1.0 / 2.0, 1.0 / 2.0};
  const std::vector<double> b_hat = {1.0, 0.0};  // explicit Euler
  t.b_err = embedded_error(t.b, b_hat);
  t.reference =
      "Heun (1900) with embedded explicit Euler; Hairer, Norsett & Wanner, Solving "
      "ODEs I, Sec. II.4";
  return t;
}

}  // namespace tableaus
}  // namespace diffeqlayers
