// Adjoint sensitivities: gradients of a solve by solving backwards instead of recording the
// unrolled solver (diffeq_adjoint).
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "diffeqlayers/solve.h"

namespace diffeqlayers {

// A hand-written vector-Jacobian product of f, for the adjoints: the continuous ones
// (interpolating, backsolve) need one per step of their backward solve, the discrete one reverses
// each step by them. Given (t, u), lambda shaped like u and the tensors differentiated (wrt), it
// sets fu = f(t, u), du = lambda^T df/du and the parameter products and returns true; or returns
// false, changing nothing, where it does not apply (dtype, device, size): then the product is a
// reverse pass through one recorded evaluation of f. dp empty on entry: it sets
// dp[i] = lambda^T df/dwrt[i] (zeros for tensors f does not use); dp holding one tensor per wrt
// (contiguous, of u's dtype): it adds the products into them in place. mlp_vjp (mlp.h) is the
// built-in MLP's.
using DynamicsVjp = std::function<bool(
    double t, const torch::Tensor& u, const torch::Tensor& lambda, at::TensorList wrt,
    torch::Tensor& fu, torch::Tensor& du, std::vector<torch::Tensor>& dp)>;

// The three adjoints. For a loss L of the saved states u(t_i):
//  * "interpolating" (the default): the forward solve keeps checkpoints (states at the start of
//    accepted steps). The adjoint ODE  dlambda/dt = -(df/du)^T lambda,  dg/dt = -(df/dp)^T lambda
//    is solved backwards with its own adaptive steps; u(t) comes from replaying each forward step
//    from its checkpoint (exactly the forward's arithmetic) and evaluating that step's dense
//    output. Accurate to the tolerances even where backsolve is not (chaotic, unstable systems).
//    (dopri8 has no interpolant of its order: there u(t) costs a partial step of the method.)
//    A stiff forward solve (rodas5, kvaerno5, ...; interpolating only) keeps its whole dense
//    output instead of checkpoints (every step with its stages; `checkpoints` does not apply);
//    its backward solve defaults to the forward's method, rodas5p after rodas5 (whose error
//    estimate does not see the adjoint system's dependence on t through u(t)).
//  * "backsolve": the augmented state [u, lambda, g] solved backwards from the end, u reset to
//    the saved value at every output time (the adjoint of Chen et al. 2018, torchdiffeq's
//    odeint_adjoint). Stores nothing but the outputs; wrong where the backward solve of u is
//    unstable (Lorenz over long spans, stiff problems).
//  * "discrete": the discrete adjoint of the solver itself, checkpointed. The forward keeps the
//    accepted steps (t, dt, u); backward replays each step under autograd, last to first, and
//    chains the vector-Jacobian products (with AdjointOptions::vjp, it reverses each step by
//    hand through f's own products instead: no autograd graph). Equals diffeq_rd's gradient to
//    rounding, storing one state per step (or fewer with checkpoints > 0) instead of the whole
//    graph. With a Rosenbrock forward solve (fresh Jacobian every step, so a step is a function
//    of (t, u, h) alone) it replays each step from the forward's dense output, differentiating
//    the Jacobian too; a Newton method's step (ESDIRK, radau5: Jacobians and LUs shared across
//    steps) is rebuilt from the converged stages the forward kept, with diffeq_rd's exact Newton
//    corrections. A split problem (SolveOptions::nonstiff) runs kencarp4 as IMEX here too.
struct AdjointOptions {
  std::string sensealg = "interpolating";
  // The backward solve (interpolating, backsolve): method and tolerances; empty / negative:
  // those of the forward solve (rodas5p after rodas5). A stiff method here runs with
  // "interpolating" only, and may not be rodas5 (its error estimate is blind to t).
  std::string method;
  double rtol = -1.0;
  double atol = -1.0;
  // Error control of the backward solve ignores the parameter-gradient channels (Kidger, Chen &
  // Lyons 2021, "Hey, that's not an ODE"): they do not feed back into the dynamics, so their
  // error need not limit the steps.
  bool seminorm = false;
  // The most states the forward solve keeps (interpolating, discrete); 0: one per step. Fewer
  // checkpoints cost recomputation: see Tape::cap in integrate/tape.h.
  int64_t checkpoints = 0;
  // The dynamics used by backward's calls, when they must differ from f (the Python bindings
  // transport exceptions differently on autograd's threads). Empty: f.
  Dynamics backward_dynamics;
  // Likewise SolveOptions::nonstiff and SolveOptions::jac for backward's calls (the discrete
  // adjoint's replayed stiff steps call them). Empty: those of the options.
  Dynamics backward_nonstiff;
  Jacobian backward_jac;
  // f's own vector-Jacobian product (see DynamicsVjp), used where it applies. Empty: autograd.
  DynamicsVjp vjp;
};

// What backward did; solve_adjoint returns it empty and backward fills it in.
struct AdjointStats {
  bool done = false;           // backward has run
  int64_t nfe = 0;             // evaluations of f in backward (replays, vector-Jacobian products)
  int64_t nvjp = 0;            // vector-Jacobian products of f (each includes one evaluation of f)
  int64_t nvjp_native = 0;     // of those, made by AdjointOptions::vjp (no autograd graph)
  int64_t naccept = 0;         // accepted steps of the backward solves (interpolating, backsolve)
  int64_t nreject = 0;         // rejected steps of the backward solves
  int64_t replayed_steps = 0;  // forward steps recomputed from checkpoints
  int64_t checkpoints = 0;     // states the forward solve kept
  // Backward ran on host arrays (HostDynamics): discrete, the steps were reversed there;
  // interpolating, the backward solves' right-hand side was f's host vector-Jacobian product.
  bool host_loop = false;
};

// solve(f, u0, tspan, options) whose saved states are differentiable by the adjoint method
// chosen in `adjoint`: with respect to u0, to every tensor in `params` that requires grad (f
// must use exactly these tensors: gradients reach nothing else f captures), and to the times
// (tspan entries, saveat) through exact-flow terms as in solve(). sol.adjoint_stats is filled in
// by backward. Under no-grad mode, or when nothing requires grad, this is solve().
// Dense output (options.dense) carries no gradient here and is refused; differentiating twice
// is not supported.
Solution solve_adjoint(const Dynamics& f, const torch::Tensor& u0, const torch::Tensor& tspan,
                       const std::vector<torch::Tensor>& params, const SolveOptions& options = {},
                       const AdjointOptions& adjoint = {});

// The names accepted in AdjointOptions::sensealg.
std::vector<std::string> adjoint_sensealgs();

}  // namespace diffeqlayers
