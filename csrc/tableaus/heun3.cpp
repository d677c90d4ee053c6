// Heun's third-order method (three stages, c = 0, 1/3, 2/3).
//
// Source: K. Heun, Z. Math. Phys. 45 (1900) 23-38; tableau as in Hairer, Norsett & Wanner,
// Solving ODEs I, Sec. II.1.
#include "tableaus/registry.h"

namespace diffeqlayers {
namespace tableaus {

Tableau make_heun3() {
  Tableau t;
  t.name = "heun3";
  t.order = 3;
  t.c = {0.0, 1.0 / 3.0, 2.0 / 3.0};
  t.a = {{}, {1.0 / 3.0}, {0.0, 2.0 / 3.0}};
  t.b = {1.0 / 4.0, 0.0, 3.0 / 4.0};
  t.reference =
      "Heun (1900), Z. Math. Phys. 45:23-38; Hairer, Norsett & Wanner, Solving ODEs I, "
      "Sec. II.1";
  return t;
}

}  // namespace tableaus
}  // namespace diffeqlayers
