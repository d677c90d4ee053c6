// Numbers in error messages.
#pragma once

#include <string>

namespace diffeqlayers::detail {

// x with 10 significant digits: the times and step sizes that error messages report.
std::string fmt(double x);

}  // namespace diffeqlayers::detail
