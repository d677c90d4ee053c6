// Tests of the Butcher tableau registry: structure, validation, and the order conditions.
#include <gtest/gtest.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "diffeqlayers/tableau.h"

namespace diffeqlayers {
namespace {

// ---- rooted trees and order conditions ---------------------------------------------------------
// A method has order p iff b . Phi(t) = 1 / gamma(t) for every rooted tree t with at most p nodes
// (Butcher). Checking the conditions directly pins every coefficient down to rounding, which a
// convergence test cannot do: it would not notice a typo in the 15th digit, nor one that only
// matters for non-autonomous or nonlinear problems its test problem does not exercise.

struct Tree {
  int order;
  double gamma;
  std::vector<int> children;  // indices into the same list, all smaller than this tree's
};

// Every rooted tree with up to max_order nodes, sorted by order. A tree is the multiset of its
// root's subtrees; enumerating children in non-increasing index order yields each multiset once.
std::vector<Tree> rooted_trees(int max_order) {
  std::vector<Tree> trees = {{1, 1.0, {}}};
  for (int n = 2; n <= max_order; ++n) {
    std::vector<Tree> fresh;
    std::vector<int> children;
    const int known = static_cast<int>(trees.size());
    // Fill `remaining` nodes with subtrees of index <= max_index.
    std::function<void(int, int)> extend = [&](int remaining, int max_index) {
      if (remaining == 0) {
        double gamma = n;
        for (int c : children) gamma *= trees[c].gamma;
        fresh.push_back({n, gamma, children});
        return;
      }
      for (int i = max_index; i >= 0; --i) {
        if (trees[i].order > remaining) continue;
        children.push_back(i);
        extend(remaining - trees[i].order, i);
        children.pop_back();
      }
    };
    extend(n - 1, known - 1);
    trees.insert(trees.end(), fresh.begin(), fresh.end());
  }
  return trees;
}

// Phi(t)_i for every tree: Phi(leaf) = 1, Phi([t1..tm])_i = prod_k (A Phi(t_k))_i.
std::vector<std::vector<double>> elementary_weights(const Tableau& tab,
                                                    const std::vector<Tree>& trees) {
  const int s = tab.stages();
  std::vector<std::vector<double>> phi(trees.size(), std::vector<double>(s, 1.0));
  std::vector<std::vector<double>> a_phi(trees.size(), std::vector<double>(s, 0.0));
  for (size_t t = 0; t < trees.size(); ++t) {
    for (int c : trees[t].children) {
      for (int i = 0; i < s; ++i) phi[t][i] *= a_phi[c][i];
    }
    for (int i = 0; i < s; ++i) {
      for (int j = 0; j < i; ++j) a_phi[t][i] += tab.a[i][j] * phi[t][j];
    }
  }
  return phi;
}

// The largest |w . Phi(t) - scale^order(t) / gamma(t)| over the trees of exactly `order` nodes.
double max_residual(const std::vector<double>& w, const std::vector<Tree>& trees,
                    const std::vector<std::vector<double>>& phi, int order, double scale = 1.0) {
  double worst = 0.0;
  for (size_t t = 0; t < trees.size(); ++t) {
    if (trees[t].order != order) continue;
    double sum = 0.0;
    for (size_t i = 0; i < w.size(); ++i) sum += w[i] * phi[t][i];
    worst = std::max(worst, std::abs(sum - std::pow(scale, order) / trees[t].gamma));
  }
  return worst;
}

std::vector<double> embedded_weights(const Tableau& tab) {
  std::vector<double> b_hat(tab.b.size());
  for (size_t i = 0; i < b_hat.size(); ++i) b_hat[i] = tab.b[i] - tab.b_err[i];
  return b_hat;
}

std::vector<double> dense_weights(const Tableau& tab, double theta) {
  std::vector<double> w(tab.dense.size(), 0.0);
  for (size_t i = 0; i < w.size(); ++i) {
    double p = theta;
    for (double coef : tab.dense[i]) {
      w[i] += coef * p;
      p *= theta;
    }
  }
  return w;
}

// Coefficients are decimals or rationals rounded to double; sums of products of coefficients of
// size up to ~50 (dopri8, tsit5) then carry absolute rounding of ~1e-14.
constexpr double kConditionTol = 1e-12;
// A violated condition of the next order is far from rounding for every built-in method (the
// smallest, dopri8's at order 9, is ~1e-5).
constexpr double kViolatedTol = 1e-8;

TEST(RootedTrees, CountsMatchTheKnownSequence) {
  // Number of rooted trees with n nodes: OEIS A000081.
  const std::vector<int> expected = {1, 1, 2, 4, 9, 20, 48, 115, 286};
  const auto trees = rooted_trees(9);
  for (int n = 1; n <= 9; ++n) {
    const auto count =
        std::count_if(trees.begin(), trees.end(), [n](const Tree& t) { return t.order == n; });
    EXPECT_EQ(count, expected[n - 1]) << "order " << n;
  }
}

// ---- per-method tests --------------------------------------------------------------------------

class TableauTest : public ::testing::TestWithParam<std::string> {};

TEST_P(TableauTest, ValidatesAndIsConsistent) {
  const Tableau& tab = tableau(GetParam());
  EXPECT_NO_THROW(tab.validate());
  EXPECT_EQ(tab.name, GetParam());
  EXPECT_FALSE(tab.reference.empty());
  const int s = tab.stages();
  ASSERT_GE(s, 1);
  ASSERT_EQ(static_cast<int>(tab.a.size()), s);
  ASSERT_EQ(static_cast<int>(tab.b.size()), s);
  EXPECT_EQ(tab.c[0], 0.0);
  double sum_b = 0.0;
  for (int i = 0; i < s; ++i) {
    ASSERT_EQ(static_cast<int>(tab.a[i].size()), i);
    double row = 0.0;
    for (double x : tab.a[i]) row += x;
    EXPECT_NEAR(row, tab.c[i], 1e-14) << "row " << i;
    sum_b += tab.b[i];
  }
  EXPECT_NEAR(sum_b, 1.0, 1e-14);
  if (tab.adaptive()) {
    ASSERT_EQ(static_cast<int>(tab.b_err.size()), s);
    double sum_err = 0.0;
    for (double x : tab.b_err) sum_err += x;
    EXPECT_NEAR(sum_err, 0.0, 1e-14);
    EXPECT_GE(tab.embedded_order, 1);
    EXPECT_NE(tab.embedded_order, tab.order);
  } else {
    EXPECT_EQ(tab.embedded_order, 0);
  }
  if (tab.has_dense()) {
    EXPECT_GE(tab.dense_order, 1);
    ASSERT_EQ(static_cast<int>(tab.dense.size()), s);
    const std::vector<double> at_one = dense_weights(tab, 1.0);
    for (int i = 0; i < s; ++i) EXPECT_NEAR(at_one[i], tab.b[i], 1e-13) << "stage " << i;
  } else {
    EXPECT_EQ(tab.dense_order, 0);
  }
}

TEST_P(TableauTest, FsalMatchesTheDefinition) {
  const Tableau& tab = tableau(GetParam());
  bool expected = tab.stages() >= 2 && tab.c.back() == 1.0 && tab.b.back() == 0.0;
  for (int j = 0; expected && j + 1 < tab.stages(); ++j) {
    expected = tab.a.back()[j] == tab.b[j];
  }
  EXPECT_EQ(tab.fsal(), expected);
}

TEST_P(TableauTest, ControllerOrderIsSane) {
  const Tableau& tab = tableau(GetParam());
  const int q = tab.controller_order();
  if (tab.adaptive()) {
    // The error estimate is O(h^(min(p, p_hat) + 1)).
    EXPECT_EQ(q, std::min(tab.order, tab.embedded_order) + 1);
  } else {
    EXPECT_EQ(q, tab.order + 1);
  }
  EXPECT_GE(q, 2);
  EXPECT_LE(q, tab.order + 1);
}

TEST_P(TableauTest, SatisfiesOrderConditionsOfExactlyItsOrder) {
  const Tableau& tab = tableau(GetParam());
  const auto trees = rooted_trees(tab.order + 1);
  const auto phi = elementary_weights(tab, trees);
  for (int n = 1; n <= tab.order; ++n) {
    EXPECT_LT(max_residual(tab.b, trees, phi, n), kConditionTol) << "order condition, n = " << n;
  }
  EXPECT_GT(max_residual(tab.b, trees, phi, tab.order + 1), kViolatedTol)
      << "b satisfies the conditions of order " << tab.order + 1 << ": is order too low?";
}

INSTANTIATE_TEST_SUITE_P(AllMethods, TableauTest, ::testing::ValuesIn(methods()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

// The methods with an error estimate, and those with an interpolant of their own.
std::vector<std::string> methods_where(bool (Tableau::*has)() const) {
  std::vector<std::string> out;
  for (const std::string& name : methods()) {
    if ((tableau(name).*has)()) out.push_back(name);
  }
  return out;
}

class EmbeddedTest : public ::testing::TestWithParam<std::string> {};
class DenseTest : public ::testing::TestWithParam<std::string> {};

TEST_P(EmbeddedTest, WeightsHaveTheEmbeddedOrder) {
  const Tableau& tab = tableau(GetParam());
  const auto trees = rooted_trees(tab.embedded_order + 1);
  const auto phi = elementary_weights(tab, trees);
  const std::vector<double> b_hat = embedded_weights(tab);
  for (int n = 1; n <= tab.embedded_order; ++n) {
    EXPECT_LT(max_residual(b_hat, trees, phi, n), kConditionTol) << "n = " << n;
  }
  // Also catches a flipped sign convention: b + b_err would not even be consistent.
  EXPECT_GT(max_residual(b_hat, trees, phi, tab.embedded_order + 1), kViolatedTol);
}

TEST_P(DenseTest, InterpolantHasTheDenseOrder) {
  const Tableau& tab = tableau(GetParam());
  // Continuous order q: sum_i b_i(theta) Phi_i(t) = theta^|t| / gamma(t) for |t| <= q, all theta.
  const auto trees = rooted_trees(tab.dense_order + 1);
  const auto phi = elementary_weights(tab, trees);
  double violated = 0.0;
  for (double theta : {0.1, 0.25, 0.37, 0.5, 0.8, 1.0}) {
    const std::vector<double> w = dense_weights(tab, theta);
    for (int n = 1; n <= tab.dense_order; ++n) {
      EXPECT_LT(max_residual(w, trees, phi, n, theta), kConditionTol)
          << "theta = " << theta << ", n = " << n;
    }
    violated = std::max(violated, max_residual(w, trees, phi, tab.dense_order + 1, theta));
  }
  EXPECT_GT(violated, kViolatedTol);
}

INSTANTIATE_TEST_SUITE_P(AdaptiveMethods, EmbeddedTest,
                         ::testing::ValuesIn(methods_where(&Tableau::adaptive)),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });
INSTANTIATE_TEST_SUITE_P(DenseMethods, DenseTest,
                         ::testing::ValuesIn(methods_where(&Tableau::has_dense)),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

// ---- known facts about particular methods ------------------------------------------------------

struct Known {
  const char* name;
  int stages;
  int order;
  int embedded_order;
  bool fsal;
  bool dense;
};

TEST(Tableaus, KnownMethodsHaveTheirTextbookShape) {
  const std::vector<Known> known = {
      {"euler", 1, 1, 0, false, false},         {"midpoint", 2, 2, 0, false, false},
      {"heun2", 2, 2, 0, false, false},         {"heun3", 3, 3, 0, false, false},
      {"ralston", 2, 2, 0, false, false},       {"rk4", 4, 4, 0, false, false},
      {"adaptive_heun", 2, 2, 1, false, false}, {"fehlberg2", 3, 2, 1, false, false},
      {"bosh3", 4, 3, 2, true, false},          {"dopri5", 7, 5, 4, true, true},
      {"tsit5", 7, 5, 4, true, true},           {"dopri8", 13, 8, 7, false, false},
  };
  for (const Known& k : known) {
    SCOPED_TRACE(k.name);
    const Tableau& tab = tableau(k.name);
    EXPECT_EQ(tab.stages(), k.stages);
    EXPECT_EQ(tab.order, k.order);
    EXPECT_EQ(tab.embedded_order, k.embedded_order);
    EXPECT_EQ(tab.adaptive(), k.embedded_order > 0);
    EXPECT_EQ(tab.fsal(), k.fsal);
    EXPECT_EQ(tab.has_dense(), k.dense);
    if (k.dense) {
      EXPECT_EQ(tab.dense_order, 4);
    }
  }
  EXPECT_EQ(methods().size(), known.size()) << "a new method: add it to this table";
}

TEST(Tableaus, SpotCheckCoefficients) {
  // A few literal values from the papers, so that a reordering of stages cannot go unnoticed.
  const Tableau& dp5 = tableau("dopri5");
  EXPECT_DOUBLE_EQ(dp5.a[4][0], 19372.0 / 6561.0);
  EXPECT_DOUBLE_EQ(dp5.b[2], 500.0 / 1113.0);
  EXPECT_DOUBLE_EQ(dp5.b_err[6], -1.0 / 40.0);  // b_7 - b_hat_7 = 0 - 1/40
  const Tableau& ts5 = tableau("tsit5");
  EXPECT_DOUBLE_EQ(ts5.c[1], 0.161);
  EXPECT_DOUBLE_EQ(ts5.b[1], 0.01);
  EXPECT_DOUBLE_EQ(ts5.b_err[6], -1.0 / 66.0);
  const Tableau& bs3 = tableau("bosh3");
  EXPECT_DOUBLE_EQ(bs3.b_err[3], -1.0 / 8.0);
  const Tableau& dp8 = tableau("dopri8");
  EXPECT_DOUBLE_EQ(dp8.c[8], 5490023248.0 / 9719169821.0);
  EXPECT_DOUBLE_EQ(dp8.b[12], 0.25);
}

// ---- registry ----------------------------------------------------------------------------------

TEST(Registry, MethodsAreSortedAndUnique) {
  const std::vector<std::string> names = methods();
  ASSERT_FALSE(names.empty());
  EXPECT_TRUE(std::is_sorted(names.begin(), names.end()));
  EXPECT_EQ(std::adjacent_find(names.begin(), names.end()), names.end());
}

TEST(Registry, LookupReturnsTheSameObject) { EXPECT_EQ(&tableau("dopri5"), &tableau("dopri5")); }

TEST(Registry, UnknownNameThrowsValueErrorListingTheKnownNames) {
  try {
    tableau("nope");
    FAIL() << "no exception";
  } catch (const c10::ValueError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("nope"), std::string::npos) << msg;
    for (const std::string& name : methods()) {
      EXPECT_NE(msg.find(name), std::string::npos) << name << " missing from: " << msg;
    }
  }
  EXPECT_THROW(tableau("nope"), c10::Error);
  EXPECT_THROW(tableau("DOPRI5"), c10::Error);  // names are case-sensitive
}

// ---- validate() --------------------------------------------------------------------------------

// validate() on a corrupted copy must throw std::invalid_argument naming the method and `what`.
void expect_invalid(const Tableau& tab, const std::string& what) {
  try {
    tab.validate();
    ADD_FAILURE() << "validate() accepted a tableau with: " << what;
  } catch (const std::invalid_argument& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(tab.name), std::string::npos) << msg;
    EXPECT_NE(msg.find(what), std::string::npos) << msg;
  }
}

TEST(Validate, RejectsBrokenTableaus) {
  const Tableau good = tableau("dopri5");
  {
    Tableau t = good;
    t.a[3][1] += 1e-6;
    expect_invalid(t, "row sum of a[3]");
  }
  {
    Tableau t = good;
    t.b[0] += 1e-6;
    expect_invalid(t, "sum of b");
  }
  {
    Tableau t = good;
    t.b_err[0] += 1e-6;
    expect_invalid(t, "sum of b_err");
  }
  {
    Tableau t = good;
    t.a[2].push_back(0.0);
    expect_invalid(t, "a[2] has 3 entries");
  }
  {
    Tableau t = good;
    t.b.pop_back();
    expect_invalid(t, "b has 6 entries");
  }
  {
    Tableau t = good;
    t.b_err.pop_back();
    expect_invalid(t, "b_err has 6 entries");
  }
  {
    Tableau t = good;
    t.dense[1].push_back(0.0);
    expect_invalid(t, "dense[1] has 5 coefficients");
  }
  {
    Tableau t = good;
    t.dense[2][0] += 1e-6;
    expect_invalid(t, "theta = 1");
  }
  {
    Tableau t = good;
    t.dense.pop_back();
    expect_invalid(t, "dense has 6 rows");
  }
  {
    Tableau t = good;
    t.c.push_back(1.0);
    expect_invalid(t, "a has 7 rows");
  }
  {
    Tableau t = tableau("rk4");
    t.embedded_order = 3;
    expect_invalid(t, "embedded_order");
  }
}

TEST(Validate, NamesUnnamedTableaus) {
  Tableau t = tableau("euler");
  t.name.clear();
  t.b = {2.0};
  try {
    t.validate();
    FAIL() << "no exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("<unnamed>"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace diffeqlayers
