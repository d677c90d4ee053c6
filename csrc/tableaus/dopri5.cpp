// The Dormand-Prince 5(4) pair RK5(4)7M (FSAL, 7 stages) with Shampine's order-4 interpolant.
//
// Sources:
//   J. R. Dormand & P. J. Prince, "A family of embedded Runge-Kutta formulae", J. Comput. Appl.
//   Math. 6(1) (1980) 19-26, method RK5(4)7M: c, a, b and the embedded weights b_hat. The same
//   table is in Hairer, Norsett & Wanner, Solving ODEs I (2nd ed.), Sec. II.5 (DOPRI5).
//   L. F. Shampine, "Some practical Runge-Kutta formulas", Math. Comp. 46(173) (1986) 135-150:
//   the continuous extension of order 4, in the form of Hairer, Norsett & Wanner, Sec. II.6, and
//   of Hairer's DOPRI5 code (its coefficients d1, d3..d7), which we expand into powers of theta.
#include "tableaus/registry.h"

namespace diffeqlayers {
namespace tableaus {

Tableau make_dopri5() {
  Tableau t;
  t.name = "dopri5";
  t.order = 5;
  t.embedded_order = 4;
  t.c = {0.0, 1.0 / 5.0, 3.0 / 10.0, 4.0 / 5.0, 8.0 / 9.0, 1.0, 1.0};
  t.a = {
      {},
      {1.0 / 5.0},
      {3.0 / 40.0, 9.0 / 40.0},
      {44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0},
      {19372.0 / 6561.0, -25360.0 / 2187.0, 64448.0 / 6561.0, -212.0 / 729.0},
      {9017.0 / 3168.0, -355.0 / 33.0, 46732.0 / 5247.0, 49.0 / 176.0, -5103.0 / 18656.0},
      {35.0 / 384.0, 0.0, 500.0 / 1113.0, 125.0 / 192.0, -2187.0 / 6784.0, 11.0 / 84.0},
  };
  t.b = {35.0 / 384.0, 0.0, 500.0 / 1113.0, 125.0 / 192.0, -2187.0 / 6784.0, 11.0 / 84.0, 0.0};
  const std::vector<double> b_hat = {
      5179.0 / 57600.0, 0.0,       7571.0 / 16695.0, 393.0 / 640.0, -92097.0 / 339200.0,
      187.0 / 2100.0,   1.0 / 40.0};
  t.b_err = embedded_error(t.b, b_hat);

  // Hairer's form of the interpolant, with s = theta, y1 - y0 = h sum b_i k_i:
  //   y(s) = y0 + s (y1 - y0) + s (1 - s) [h k1 - (y1 - y0)]
  //        + s^2 (1 - s) [2 (y1 - y0) - h k1 - h k7] + s^2 (1 - s)^2 h sum d_i k_i.
  // Collecting the coefficient of h k_i by powers of s (delta_ij the Kronecker delta):
  //   s^1: delta_i1
  //   s^2: 3 b_i - 2 delta_i1 - delta_i7 + d_i
  //   s^3: -2 b_i + delta_i1 + delta_i7 - 2 d_i
  //   s^4: d_i
  // which sums to b_i at s = 1.
  const std::vector<double> d = {-12715105075.0 / 11282082432.0,  0.0,
                                 87487479700.0 / 32700410799.0,   -10690763975.0 / 1880347072.0,
                                 701980252875.0 / 199316789632.0, -1453857185.0 / 822651844.0,
                                 69997945.0 / 29380423.0};
  t.dense.resize(7);
  for (int i = 0; i < 7; ++i) {
    const double first = i == 0 ? 1.0 : 0.0;
    const double last = i == 6 ? 1.0 : 0.0;
    t.dense[i] = {first, 3.0 * t.b[i] - 2.0 * first - last + d[i],
                  -2.0 * t.b[i] + first + last - 2.0 * d[i], d[i]};
  }
  t.dense_order = 4;
  t.reference =
      "Dormand & Prince (1980), J. Comput. Appl. Math. 6:19-26, RK5(4)7M; dense output "
      "of order 4 from Shampine (1986), Math. Comp. 46:135-150";
  return t;
}

}  // namespace tableaus
}  // namespace diffeqlayers
