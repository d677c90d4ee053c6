// Heun's second-order method (the explicit trapezoidal rule).
//
// Source: K. Heun, "Neue Methode zur approximativen Integration der Differentialgleichungen
// einer unabhaengigen Veraenderlichen", Z. Math. Phys. 45 (1900) 23-38; tableau as in Hairer,
// Norsett & Wanner, Solving ODEs I, Sec. II.1.
#include "tableaus/registry.h"

namespace diffeqlayers {
namespace tableaus {

Tableau make_heun2() {
  Tableau t;
  t.name = "heun2";
  t.order = 2;
  t.c = {0.0, 1.0};
  t.a = {{}, {1.0}};
  t.b = {1.0 / 2.0, 1.0 / 2.0};
  t.reference = "Heun (1900), Z. Math. Phys. 45:23-38 (explicit trapezoidal rule)";
  return t;
}

}  // namespace tableaus
}  // namespace diffeqlayers
