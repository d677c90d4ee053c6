#include "core/format.h"

#include <sstream>

namespace diffeqlayers::detail {

std::string fmt(double x) {
  std::ostringstream s;
  s.precision(10);
  s << x;
  return s.str();
}

}  // namespace diffeqlayers::detail
