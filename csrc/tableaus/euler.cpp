// The explicit Euler method (order 1), as a one-stage tableau.
//
// Source: L. Euler, Institutionum calculi integralis (1768); in Butcher form e.g. Hairer, Norsett
// & Wanner, Solving Ordinary Differential Equations I (2nd ed., 1993), Sec. II.1.
#include "tableaus/registry.h"

namespace diffeqlayers {
namespace tableaus {

Tableau make_euler() {
  Tableau t;
  t.name = "euler";
  t.order = 1;
  t.c = {0.0};
  t.a = {{}};
  t.b = {1.0};
  t.reference = "Euler (1768); Hairer, Norsett & Wanner, Solving ODEs I, Sec. II.1";
  return t;
}

}  // namespace tableaus
}  // namespace diffeqlayers
