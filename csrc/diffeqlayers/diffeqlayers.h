// Umbrella header of the diffeqlayers C++ API.
#pragma once

#include "diffeqlayers/adams.h"
#include "diffeqlayers/adjoint.h"
#include "diffeqlayers/forward_mode.h"
#include "diffeqlayers/per_sample.h"
#include "diffeqlayers/solve.h"
#include "diffeqlayers/stiff.h"
#include "diffeqlayers/tableau.h"
