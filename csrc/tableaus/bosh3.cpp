// The Bogacki-Shampine 3(2) pair: four stages, FSAL (MATLAB's ode23).
//
// Source: P. Bogacki & L. F. Shampine, "A 3(2) pair of Runge-Kutta formulas", Appl. Math. Lett.
// 2(4) (1989) 321-325.
#include "tableaus/registry.h"

namespace diffeqlayers {
namespace tableaus {

Tableau make_bosh3() {
  Tableau t;
  t.name = "bosh3";
  t.order = 3;
  t.embedded_order = 2;
  t.c = {0.0, 1.0 / 2.0, 3.0 / 4.0, 1.0};
  t.a = {{}, {1.0 / 2.0}, {0.0, 3.0 / 4.0}, {2.0 / 9.0, 1.0 / 3.0, 4.0 / 9.0}};
  t.b = {2.0 / 9.0, 1.0 / 3.0, 4.0 / 9.0, 0.0};
  const std::vector<double> b_hat = {7.0 / 24.0, 1.0 / 4.0, 1.0 / 3.0, 1.0 / 8.0};
  t.b_err = embedded_error(t.b, b_hat);
  t.reference = "Bogacki & Shampine (1989), Appl. Math. Lett. 2(4):321-325";
  return t;
}

}  // namespace tableaus
}  // namespace diffeqlayers
