// Stiff (linearly implicit and implicit) methods: which names solve() dispatches to them.
#pragma once

#include <string>
#include <vector>

namespace diffeqlayers {

// True for a method solved by the stiff steppers (csrc/solvers) rather than an explicit tableau:
// "rosenbrock23", "rodas5", "rodas5p". solve() dispatches on the name; the options are the same
// (plus SolveOptions::jac), and Stats counts Jacobians (njac) and LU factorizations (nlu).
bool is_stiff_method(const std::string& name);
// Names of the stiff methods, sorted.
std::vector<std::string> stiff_methods();

}  // namespace diffeqlayers
