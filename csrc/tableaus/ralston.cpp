// Ralston's second-order method (a21 = 2/3), which minimises the local truncation error bound
// among two-stage second-order methods.
//
// Source: A. Ralston, "Runge-Kutta methods with minimum error bounds", Math. Comp. 16 (1962)
// 431-437, the two-stage case.
#include "tableaus/registry.h"

namespace diffeqlayers {
namespace tableaus {

Tableau make_ralston() {
  Tableau t;
  t.name = "ralston";
  t.order = 2;
  t.c = {0.0, 2.0 / 3.0};
  t.a = {{}, {2.0 / 3.0}};
  t.b = {1.0 / 4.0, 3.0 / 4.0};
  t.reference = "Ralston (1962), Math. Comp. 16:431-437";
  return t;
}

}  // namespace tableaus
}  // namespace diffeqlayers
