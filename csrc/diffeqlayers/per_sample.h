// Per-sample adaptive step control for batches: every sample of the leading dimension keeps its
// own time, step size, error norm and step controller, so one hard sample does not slow the rest.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <functional>

#include "diffeqlayers/solve.h"

namespace diffeqlayers {

// du/dt = f(t, u) for a batch of independent problems: u is [B, ...] and t a tensor of shape [B]
// (each sample's own time, in u's dtype and on u's device). Row b of the result must depend on
// row b of u and on t[b] only. As for Dynamics, parameters live inside the callable and every op
// it runs under grad mode is recorded.
using BatchDynamics = std::function<torch::Tensor(const torch::Tensor& t, const torch::Tensor& u)>;

// What each sample did.
struct PerSampleStats {
  torch::Tensor naccept;   // [B] int64: accepted steps of each sample
  torch::Tensor nreject;   // [B] int64: rejected steps of each sample
  int64_t iterations = 0;  // loop iterations; each evaluates every stage on the whole batch
};

struct PerSampleSolution {
  // t: [n] the save times (shared); u: [n, B, ...]. stats.nfe counts calls of f (each on the
  // whole batch); stats.naccept and stats.nreject are the sums over the samples.
  Solution solution;
  PerSampleStats sample_stats;
};

// Solves the batch u0 ([B, ...]) from tspan[0] to tspan[1] with one step controller per sample:
// each iteration attempts one step of its own size for every unfinished sample and accepts or
// rejects it by that sample's own error norm (masked updates); the loop ends when every sample
// has reached tspan[1]. Each sample takes the steps a solve of it alone would take (to rounding).
//
// Methods: the explicit adaptive tableaus (methods() with an error estimate). Options as for
// solve(), per sample: max_num_steps bounds each sample's steps, tstops are landed on by every
// sample, options.norm receives the scaled error [B, ...] and must return [B] norms (default:
// the RMS norm over each sample's elements). options.saveat is required (the samples step at
// different times; each interpolates its own steps at the save times). Refused: adaptive =
// false, dense, jac, nonstiff. Under grad mode the unrolled masked loop is recorded (reverse
// mode, gradients with respect to u0, the parameters, tspan and saveat).
PerSampleSolution solve_per_sample(const BatchDynamics& f, const torch::Tensor& u0,
                                   const torch::Tensor& tspan, const SolveOptions& options = {});

}  // namespace diffeqlayers
