// Internal (not installed): the interpolation weights of dense.cpp, for loops that interpolate
// with a different theta per sample (the per-sample loop).
#pragma once

#include <torch/types.h>

#include <cstddef>
#include <vector>

#include "diffeqlayers/solve.h"

namespace diffeqlayers::detail {

// Number of interpolation weights: one per stage (own interpolant) or four (cubic Hermite).
size_t num_weights(const Tableau& tab);

// The weights at theta of a step of size h, written to w[0 .. num_weights(tab)): on the stages
// (own interpolant, added to u0) or on [u0, u1, f0, f1] (cubic Hermite).
void interpolation_weights(const Tableau& tab, double theta, double h, double* w);

// What the weights multiply: the step's stages, or [u0, u1, f0, f1].
std::vector<torch::Tensor> interpolation_terms(const Tableau& tab, const DenseStep& step);
// Term i (< num_weights(tab)) of interpolation_terms, without making the list.
const torch::Tensor& interpolation_term(const Tableau& tab, const DenseStep& step, size_t i);

}  // namespace diffeqlayers::detail
