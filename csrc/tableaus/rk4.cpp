// The classical fourth-order Runge-Kutta method.
//
// Source: W. Kutta, "Beitrag zur naeherungsweisen Integration totaler Differentialgleichungen",
// Z. Math. Phys. 46 (1901) 435-453; tableau as in Hairer, Norsett & Wanner, Solving ODEs I,
// Sec. II.1.
#include "tableaus/registry.h"

namespace diffeqlayers {
namespace tableaus {

Tableau make_rk4() {
  Tableau t;
  t.name = "rk4";
  t.order = 4;
  t.c = {0.0, 1.0 / 2.0, 1.0 / 2.0, 1.0};
  t.a = {{}, {1.0 / 2.0}, {0.0, 1.0 / 2.0}, {0.0, 0.0, 1.0}};
  t.b = {1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0};
  t.reference = "Kutta (1901), Z. Math. Phys. 46:435-453 (classical RK4)";
  return t;
}

}  // namespace tableaus
}  // namespace diffeqlayers
