// Stiff (linearly implicit and implicit) methods: which names solve() dispatches to them.
#pragma once

#include <string>
#include <vector>

namespace diffeqlayers {

// True for a method solved by the stiff steppers (csrc/solvers) rather than an explicit tableau:
// Rosenbrock "rosenbrock23", "rodas5", "rodas5p" (a fresh Jacobian every step) and ESDIRK
// "kvaerno5", "kencarp4", "trbdf2" (simplified Newton on each implicit stage, Jacobian and LU
// reused across steps; kencarp4 is IMEX with SolveOptions::nonstiff). solve() dispatches on the
// name; the options are the same (plus SolveOptions::jac), and Stats counts Jacobians (njac) and
// LU factorizations (nlu).
bool is_stiff_method(const std::string& name);
// Names of the stiff methods, sorted.
std::vector<std::string> stiff_methods();

}  // namespace diffeqlayers
