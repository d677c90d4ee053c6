// Fehlberg's low-order pair RK1(2): three stages, solutions of order 1 and 2.
//
// Source: E. Fehlberg, "Low-order classical Runge-Kutta formulas with stepsize control and their
// application to some heat transfer problems", NASA Technical Report R-315 (1969), the RK1(2)
// formula: c = (0, 1/2, 1), a21 = 1/2, a31 = 1/256, a32 = 255/256; first-order weights
// (1/256, 255/256, 0), second-order weights (1/512, 255/256, 1/512).
//
// Fehlberg propagated the first-order solution, whose weights equal the last row of a (FSAL).
// Like torchdiffeq's "fehlberg2" we propagate the second-order solution instead (local
// extrapolation) and use the first-order one only for the error estimate. The method is then not
// FSAL: the third stage is f at the first-order solution, not at the propagated one.
#include "tableaus/registry.h"

namespace diffeqlayers {
namespace tableaus {

Tableau make_fehlberg2() {
  Tableau t;
  t.name = "fehlberg2";
  t.order = 2;
  t.embedded_order = 1;
  t.c = {0.0, 1.0 / 2.0, 1.0};
  t.a = {{}, {1.0 / 2.0}, {1.0 / 256.0, 255.0 / 256.0}};
  t.b = {1.0 / 512.0, 255.0 / 256.0, 1.0 / 512.0};
  const std::vector<double> b_hat = {1.0 / 256.0, 255.0 / 256.0, 0.0};
  t.b_err = embedded_error(t.b, b_hat);
  t.reference = "Fehlberg (1969), NASA TR R-315, RK1(2); second-order solution propagated";
  return t;
}

}  // namespace tableaus
}  // namespace diffeqlayers
