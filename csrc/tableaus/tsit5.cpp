// Tsitouras' 5(4) pair (FSAL, 7 stages) with its own interpolant of order 4.
//
// Source: Ch. Tsitouras, "Runge-Kutta pairs of order 5(4) satisfying only the first column
// simplifying assumption", Computers & Mathematics with Applications 62(2) (2011) 770-775:
// the coefficient table (c, a, b, b_hat) and the continuous extension b_i(theta), which the
// paper gives in factored form and which we expand here. The paper's coefficients are decimals,
// the solution of its order conditions; they are given to about 20 digits below.
#include "tableaus/registry.h"

namespace diffeqlayers {
namespace tableaus {

Tableau make_tsit5() {
  Tableau t;
  t.name = "tsit5";
  t.order = 5;
  t.embedded_order = 4;
  t.c = {0.0, 0.161, 0.327, 0.9, 0.98002554090450968573, 1.0, 1.0};
  t.a = {
      {},
      {0.161},
      {-0.008480655492356988544, 0.3354806554923569885},
      {2.897153057105493432, -6.359448489975074843, 4.362295432869581411},
      {5.325864828439256604, -11.74888356406282788, 7.495539342889836208, -0.09249506636175524926},
      {5.861455442946420029, -12.92096931784710929, 8.159367898576158643, -0.07158497328140099722,
       -0.02826905039406838291},
      {0.09646076681806522952, 0.01, 0.4798896504144995748, 1.379008574103741893,
       -3.290069515436080680, 2.324710524099773982},
  };
  t.b = {0.09646076681806522952,
         0.01,
         0.4798896504144995748,
         1.379008574103741893,
         -3.290069515436080680,
         2.324710524099773982,
         0.0};
  const std::vector<double> b_hat = {0.09468075576583945807,
                                     0.009183565540343253097,
                                     0.4877705284247615708,
                                     1.234297566930478986,
                                     -2.707712349983525455,
                                     1.866628418170587036,
                                     1.0 / 66.0};
  t.b_err = embedded_error(t.b, b_hat);

  // The paper's b_i(theta), factored; polynomials in increasing powers of theta.
  const std::vector<double> th = {0.0, 1.0};                               // theta
  const std::vector<double> th2 = {0.0, 0.0, 1.0};                         // theta^2
  auto lin = [](double root) { return std::vector<double>{-root, 1.0}; };  // theta - root
  auto quad = [](double p, double q) { return std::vector<double>{q, p, 1.0}; };
  auto scale = [](double k, std::vector<double> p) {
    for (double& x : p) x *= k;
    return p;
  };
  const std::vector<std::vector<double>> poly = {
      scale(-1.0530884977290216, poly_mul(poly_mul(th, lin(1.3299890189751412)),
                                          quad(-1.4364028541716351, 0.7139816917074209))),
      scale(0.1017, poly_mul(th2, quad(-2.1966568338249754, 1.2949852507374631))),
      scale(2.490627285651252793, poly_mul(th2, quad(-2.38535645472061657, 1.57803468208092486))),
      scale(-16.54810288924490272,
            poly_mul(th2, poly_mul(lin(1.21712927295533244), lin(0.61620406037800089)))),
      scale(47.37952196281928122,
            poly_mul(th2, poly_mul(lin(1.203071208372362603), lin(0.658047292653547382)))),
      scale(-34.87065786149660974, poly_mul(th2, poly_mul(lin(1.2), lin(0.666666666666666667)))),
      scale(2.5, poly_mul(th2, poly_mul(lin(1.0), lin(0.6)))),
  };
  // Every b_i(theta) vanishes at theta = 0; drop the constant term (dense[i][m] is the
  // coefficient of theta^(m+1)).
  t.dense.resize(7);
  for (int i = 0; i < 7; ++i) t.dense[i].assign(poly[i].begin() + 1, poly[i].end());
  t.dense_order = 4;
  t.reference = "Tsitouras (2011), Comput. Math. Appl. 62:770-775, pair and interpolant";
  return t;
}

}  // namespace tableaus
}  // namespace diffeqlayers
