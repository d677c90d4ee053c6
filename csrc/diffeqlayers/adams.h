// Adams multistep methods on a fixed grid: which names solve() dispatches to them.
#pragma once

#include <string>
#include <vector>

namespace diffeqlayers {

// True for "explicit_adams" (Adams-Bashforth) and "implicit_adams" (Adams-Bashforth-Moulton
// predictor-corrector), torchdiffeq's fixed-grid Adams methods. They take fixed steps (give
// SolveOptions::dt); SolveOptions::max_order and max_iters configure them.
bool is_adams_method(const std::string& name);
// Their names, sorted.
std::vector<std::string> adams_methods();

}  // namespace diffeqlayers
