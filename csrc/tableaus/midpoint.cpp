// The explicit midpoint method (Runge 1895), order 2.
//
// Source: C. Runge, "Ueber die numerische Aufloesung von Differentialgleichungen", Math. Ann. 46
// (1895) 167-178; tableau as in Hairer, Norsett & Wanner, Solving ODEs I, Sec. II.1.
#include "tableaus/registry.h"

namespace diffeqlayers {
namespace tableaus {

Tableau make_midpoint() {
  Tableau t;
  t.name = "midpoint";
  t.order = 2;
  t.c = {0.0, 1.0 / 2.0};
  t.a = {{}, {1.0 / 2.0}};
  t.b = {0.0, 1.0};
  t.reference =
      "Runge (1895), Math. Ann. 46:167-178; Hairer, Norsett & Wanner, Solving ODEs I, "
      "Sec. II.1";
  return t;
}

}  // namespace tableaus
}  // namespace diffeqlayers
