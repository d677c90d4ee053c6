"""Stiff benchmark: diffeqlayers' stiff methods (ESDIRK kvaerno5, kencarp4, trbdf2 and Radau IIA
radau5 with Newton and Jacobian/LU reuse; Rosenbrock rodas5, rodas5p, rosenbrock23) against
scipy.integrate.solve_ivp (Radau, BDF, LSODA) on two stiff problems, as a work-precision table, in
one process run.

1. ROBER (k1 = 0.04, k2 = 3e7, k3 = 1e4), u0 = (1, 0, 0), t in [0, 1e11]; error: the largest
   relative error of y1, y3 at t = 1e11 against the IVP Test Set reference (Mazzia & Magherini).
2. Van der Pol x'' = mu ((1 - x^2) x' - x), mu = 1e3, (x, x') = (2, 0), t in [0, 3] (about two
   periods); error: the largest absolute error of x at t = 0.5, 1.2, 2.0, 2.8, 3.0 against scipy
   Radau at rtol = atol = 1e-11 (computed once here).

Every solver runs at the same tolerance levels, half a decade apart (ROBER: rtol 1e-4, 3e-5,
1e-5, ..., 1e-8 with atol = rtol * 1e-4; Van der Pol: rtol = atol = 1e-4, ..., 1e-8), float64, f
in Python for both libraries. (At equal error a method is charged with its cheapest level whose
error is no larger than the scipy run's: with levels two decades apart, a method whose error at a
level landed just above a scipy run's was charged with its next level, 100x tighter; a decade
apart, radau5's error at rtol 1e-4 on ROBER (1.2e-3) lay just above Radau's (2.9e-4) and its next
level cost 1.4-2.9x as much.)
diffeqlayers gets f as a torch function of the state tensor (rober_t, vdp_t) and builds its
Jacobians by autograd (reverse mode: one recorded evaluation of f, counted in nfe, and one
reverse pass with the n seeds batched under vmap); kencarp4, rodas5 and radau5 run a second time
with the exact Jacobian as a torch function (jac=, built from the same Python floats as scipy's),
rows "(exact jac)", and rodas5, rodas5p and radau5 with f as a TorchScript module of the same
operations (RoberScript, VdpScript: called from C++, no Python per call), rows
"(TorchScript f)". scipy runs twice per method: "scipy X" with a NumPy/Python-float f and the exact
Jacobian (rober_np, rober_jac, ...), and "scipy X (torch f)" with the same torch f as
diffeqlayers (ndarray -> torch.from_numpy -> f -> .numpy()) and an autograd Jacobian of it
(torch.autograd.functional.jacobian, also one recorded f and n reverse passes), so that both
libraries pay for the same f and the same kind of Jacobian. Both problems are autonomous and
diffeqlayers is told so (autonomous=True, as Hairer's RODAS takes IFCN = 0): the Rosenbrock
methods then skip the df/dt central difference, which scipy's Radau, BDF and LSODA never need.

Before and after the solves, the cost of one call of each f and Jacobian is measured as each
solver calls it (median over 200 batches of the CPU time, time.thread_time, of 50 back-to-back
calls, 10 for the autograd Jacobian, on the initial state; scipy's with solve_ivp's np.asarray
wrapper); the smaller of the two measurements is used. One call
of the torch f costs about 20x the NumPy one (results/stiff.md has the measured costs), so the
evaluations of f alone can take longer than a whole scipy solve with the NumPy f at equal error;
the tables separate that cost from the rest.

Reports steps, nfe, Jacobians, LU factorizations, error and the best CPU time (time.thread_time)
of --repeats runs, with f time = nfe x the cost of one call of that row's f and solver time =
time - f time (floored at 0; it includes the Jacobians, for diffeqlayers all but the recorded f).
Then, at equal error, the time of each diffeqlayers method relative to each scipy run (both
variants): the fastest diffeqlayers run (over the tolerance levels) whose error is at most that
scipy run's error, divided by the scipy run's time; and the same with solver times on both
sides, which compares the solver loops without the cost of f.

    python benchmarks/bench_stiff.py [--repeats 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import scipy
import torch
from scipy.integrate import solve_ivp

import diffeqlayers as dl
from diffeqlayers.script import ScriptRhs

K1, K2, K3 = 0.04, 3e7, 1e4
ROBER_REF = np.array([0.2083340149701255e-07, 0.8333360770334713e-13, 0.9999999791665050])
MU = 1e3
VDP_TIMES = [0.5, 1.2, 2.0, 2.8, 3.0]
# Tolerance levels: rtol = 10^-e.
LEVELS = [4, 4.5, 5, 5.5, 6, 6.5, 7, 7.5, 8]


# The torch f's are vectorized (components read as u[..., i], results stacked on the last
# dimension): the same operations on one state, and radau5's vectorized=True rows may call them on
# its three stages at once.
def rober_t(u, p, t):
    y1, y2, y3 = u[..., 0], u[..., 1], u[..., 2]
    return torch.stack(
        [-K1 * y1 + K3 * y2 * y3, K1 * y1 - K3 * y2 * y3 - K2 * y2**2, K2 * y2**2], dim=-1
    )


def rober_np(t, y):
    return [
        -K1 * y[0] + K3 * y[1] * y[2],
        K1 * y[0] - K3 * y[1] * y[2] - K2 * y[1] ** 2,
        K2 * y[1] ** 2,
    ]


def rober_jac(t, y):
    return [
        [-K1, K3 * y[2], K3 * y[1]],
        [K1, -K3 * y[2] - 2 * K2 * y[1], -K3 * y[1]],
        [0.0, 2 * K2 * y[1], 0.0],
    ]


def vdp_t(u, p, t):
    x, y = u[..., 0], u[..., 1]
    return torch.stack([y, MU * ((1 - x**2) * y - x)], dim=-1)


class RoberScript(torch.nn.Module):
    """rober_t as a TorchScript module (the same operations): diffeqlayers calls it from C++."""

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        k1, k2, k3 = 0.04, 3e7, 1e4  # K1, K2, K3 (TorchScript reads no globals)
        y1, y2, y3 = u[..., 0], u[..., 1], u[..., 2]
        return torch.stack(
            [-k1 * y1 + k3 * y2 * y3, k1 * y1 - k3 * y2 * y3 - k2 * y2**2, k2 * y2**2], dim=-1
        )


class VdpScript(torch.nn.Module):
    """vdp_t as a TorchScript module (the same operations)."""

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        mu = 1e3  # MU
        x, y = u[..., 0], u[..., 1]
        return torch.stack([y, mu * ((1 - x**2) * y - x)], dim=-1)


def vdp_np(t, y):
    return [y[1], MU * ((1 - y[0] ** 2) * y[1] - y[0])]


def vdp_jac(t, y):
    return [[0.0, 1.0], [MU * (-2 * y[0] * y[1] - 1), MU * (1 - y[0] ** 2)]]


def torch_f_for_scipy(f_t):
    """The torch f for solve_ivp: ndarray -> torch.from_numpy -> f_t -> ndarray (no autograd)."""

    def fun(t, y):
        with torch.no_grad():
            return f_t(torch.from_numpy(y), None, t).numpy()

    return fun


def torch_jac_for_scipy(f_t):
    """The autograd Jacobian of the torch f for solve_ivp: one recorded evaluation of f and n
    reverse passes (torch.autograd.functional.jacobian), as diffeqlayers' reverse mode does."""

    def jac(t, y):
        with torch.enable_grad():
            return torch.autograd.functional.jacobian(
                lambda x: f_t(x, None, t), torch.from_numpy(y)
            ).numpy()

    return jac


def per_call(fn, batches=200, calls=50):
    """Median over `batches` of the CPU time (time.thread_time) of `calls` back-to-back calls of
    fn, divided by `calls`: the cost of one call (after 4 * calls warm-up calls)."""
    for _ in range(4 * calls):
        fn()
    out = []
    for _ in range(batches):
        t0 = time.thread_time()
        for _ in range(calls):
            fn()
        out.append((time.thread_time() - t0) / calls)
    return float(np.median(out))


def call_costs(prob):
    """Cost of one call of each f and Jacobian as each solver calls it (seconds): the torch f on
    a float64 tensor with grad mode off (diffeqlayers calls it from C++ with p = None and a float
    t inside the caller's no_grad; the C++ -> Python call itself is not included); scipy's f and
    Jacobian wrapped as solve_ivp wraps them (np.asarray(fun(t, y), dtype=float)) on the ndarray
    state, the torch f for scipy with its own per-call no_grad."""
    f_t = prob["f_t"]
    u = torch.tensor(prob["u0"], dtype=torch.float64)
    y = np.array(prob["u0"], dtype=float)
    f_np, jac_np = prob["f_np"], prob["jac"]
    f_tw, jac_tw = torch_f_for_scipy(f_t), torch_jac_for_scipy(f_t)
    # Three states stacked, as radau5 with vectorized=True calls f (t: a [3, 1] tensor).
    u3, t3 = u.expand(3, -1).clone(), torch.zeros(3, 1, dtype=torch.float64)
    with torch.no_grad():
        torch_f = per_call(lambda: f_t(u, None, 0.0))
        torch_f3 = per_call(lambda: f_t(u3, None, t3))
        # The scripted f as the solve calls it, from C++: _time_dynamics times 50 calls there
        # (wall clock, GIL released) and returns the mean; the median over 200 batches.
        native = ScriptRhs(prob["f_script"]).native_dynamics()
        dl._C._time_dynamics(native, 0.0, u, 200)
        script_f = float(np.median([dl._C._time_dynamics(native, 0.0, u, 50) for _ in range(200)]))
        script_f3 = float(
            np.median([dl._C._time_dynamics(native, 0.0, u3, 50) for _ in range(200)])
        )
    return {
        "torch f": torch_f,
        "script f": script_f,
        "torch f x3": torch_f3,
        "script f x3": script_f3,
        "numpy f": per_call(lambda: np.asarray(f_np(0.0, y), dtype=float)),
        "torch f for scipy": per_call(lambda: np.asarray(f_tw(0.0, y), dtype=float)),
        "exact jac": per_call(lambda: np.asarray(jac_np(0.0, y), dtype=float)),
        "autograd jac": per_call(lambda: np.asarray(jac_tw(0.0, y), dtype=float), 100, 10),
    }


PROBLEMS = {
    "ROBER": dict(
        f_t=rober_t,
        f_script=torch.jit.script(RoberScript()),
        f_np=rober_np,
        jac=rober_jac,
        u0=[1.0, 0.0, 0.0],
        span=(0.0, 1e11),
        times=[1e11],
        tols=[(10.0**-e, 10.0 ** -(e + 4)) for e in LEVELS],
    ),
    "Van der Pol mu=1e3": dict(
        f_t=vdp_t,
        f_script=torch.jit.script(VdpScript()),
        f_np=vdp_np,
        jac=vdp_jac,
        u0=[2.0, 0.0],
        span=(0.0, 3.0),
        times=VDP_TIMES,
        tols=[(10.0**-e, 10.0**-e) for e in LEVELS],
    ),
}
DL_METHODS = ["kvaerno5", "kencarp4", "trbdf2", "radau5", "rodas5", "rodas5p", "rosenbrock23"]
# Also run with the exact Jacobian as a torch function (jac=), as scipy X gets it: no autograd.
DL_EXACT_JAC = ["kencarp4", "rodas5", "radau5"]
# Also run with f as a TorchScript module of the same operations (called from C++, no Python per
# call; autograd Jacobian).
DL_SCRIPT = ["rodas5", "rodas5p", "radau5"]
# radau5 with vectorized=True (its three stages in one call of f), with the torch f and the
# TorchScript f: (column suffix, script).
DL_VECTORIZED = [(" (vectorized)", False), (" (vectorized, TorchScript f)", True)]
DL_COLUMNS = (
    DL_METHODS
    + [f"{m} (exact jac)" for m in DL_EXACT_JAC]
    + [f"{m} (TorchScript f)" for m in DL_SCRIPT]
    + [f"radau5{suffix}" for suffix, _ in DL_VECTORIZED]
)
SCIPY_METHODS = ["Radau", "BDF", "LSODA"]
# scipy with its NumPy f and exact Jacobian, and with diffeqlayers' torch f and an autograd
# Jacobian (the same f and the same kind of Jacobian diffeqlayers gets).
SCIPY_VARIANTS = ["numpy", "torch"]
# rosenbrock23 takes very many steps at tight tolerances: only the looser levels.
LOOSE_ONLY = {"rosenbrock23": 1e-6}


def error(name, y):
    if name == "ROBER":
        rel = np.abs((y[-1] - ROBER_REF) / ROBER_REF)
        return max(rel[0], rel[2])
    return float(np.max(np.abs(y[:, 0] - VDP_REF[:, 0])))


def exact_jac_t(jac):
    """The exact Jacobian (Python floats) as a torch function for diffeqlayers' jac=."""

    def jac_t(u, p, t):
        return torch.tensor(jac(t, u.tolist()), dtype=u.dtype)

    return jac_t


def run_dl(name, prob, method, rtol, atol, exact_jac=False, script=False, vectorized=False):
    f = prob["f_script"] if script else prob["f_t"]
    p = dl.ODEProblem(f, torch.tensor(prob["u0"], dtype=torch.float64), prob["span"])
    with torch.no_grad():
        sol = dl.solve(
            p,
            method,
            rtol=rtol,
            atol=atol,
            saveat=prob["times"],
            max_num_steps=1_000_000,
            autonomous=True,
            jac=exact_jac_t(prob["jac"]) if exact_jac else None,
            vectorized=vectorized,
        )
    s = sol.stats
    return dict(
        steps=s.naccept,
        rejected=s.nreject,
        nfe=s.nfe,
        nstacked=s.nstacked,
        njac=s.njac,
        nlu=s.nlu,
        err=error(name, sol.u.numpy()),
    )


def run_scipy(name, prob, method, rtol, atol, variant="numpy"):
    if variant == "numpy":
        fun, jac = prob["f_np"], prob["jac"]
    else:
        fun, jac = torch_f_for_scipy(prob["f_t"]), torch_jac_for_scipy(prob["f_t"])
    sol = solve_ivp(
        fun,
        prob["span"],
        prob["u0"],
        method=method,
        rtol=rtol,
        atol=atol,
        jac=jac,
        dense_output=True,
    )
    assert sol.status == 0, sol.message
    y = sol.sol(prob["times"]).T
    return dict(
        steps=len(sol.t) - 1,
        rejected=None,
        nfe=sol.nfev,
        nstacked=0,
        njac=sol.njev,
        nlu=sol.nlu,
        err=error(name, y),
    )


def timed(fn, repeats):
    # CPU time of this thread (the solves run on it; the GIL is released, not the thread): on a
    # shared machine wall time also counts the time other processes hold the cores.
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.thread_time()
        out = fn()
        best = min(best, time.thread_time() - t0)
    out["time"] = best
    return out


def main():
    global VDP_REF
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    ref = solve_ivp(
        vdp_np,
        (0.0, 3.0),
        [2.0, 0.0],
        method="Radau",
        rtol=1e-11,
        atol=1e-11,
        jac=vdp_jac,
        t_eval=VDP_TIMES,
    )
    VDP_REF = ref.y.T
    # Costs of one call, measured before and after the solves (the machine may be shared): the
    # smaller of the two is used.
    costs_before = {name: call_costs(prob) for name, prob in PROBLEMS.items()}
    print(costs_before, flush=True)
    rows = []

    def add(name, rtol, solver, r, f_kind):
        r["f_kind"] = f_kind
        rows.append((name, rtol, solver, r))
        print(rows[-1], flush=True)

    for name, prob in PROBLEMS.items():
        for rtol, atol in prob["tols"]:
            for method in DL_METHODS:
                if rtol < LOOSE_ONLY.get(method, 0.0):
                    continue
                r = timed(
                    lambda n=name, q=prob, m=method, r=rtol, a=atol: run_dl(n, q, m, r, a),
                    args.repeats,
                )
                add(name, rtol, f"diffeqlayers {method}", r, "torch f")
            for method in DL_EXACT_JAC:
                r = timed(
                    lambda n=name, q=prob, m=method, r=rtol, a=atol: run_dl(n, q, m, r, a, True),
                    args.repeats,
                )
                add(name, rtol, f"diffeqlayers {method} (exact jac)", r, "torch f")
            for method in DL_SCRIPT:
                r = timed(
                    lambda n=name, q=prob, m=method, r=rtol, a=atol: run_dl(
                        n, q, m, r, a, script=True
                    ),
                    args.repeats,
                )
                add(name, rtol, f"diffeqlayers {method} (TorchScript f)", r, "script f")
            for suffix, script in DL_VECTORIZED:
                r = timed(
                    lambda n=name, q=prob, r=rtol, a=atol, sc=script: run_dl(
                        n, q, "radau5", r, a, script=sc, vectorized=True
                    ),
                    args.repeats,
                )
                add(
                    name,
                    rtol,
                    f"diffeqlayers radau5{suffix}",
                    r,
                    "script f" if script else "torch f",
                )
            for variant in SCIPY_VARIANTS:
                for method in SCIPY_METHODS:
                    r = timed(
                        lambda n=name, q=prob, m=method, r=rtol, a=atol, v=variant: run_scipy(
                            n, q, m, r, a, v
                        ),
                        args.repeats,
                    )
                    if variant == "numpy":
                        add(name, rtol, f"scipy {method}", r, "numpy f")
                    else:
                        add(name, rtol, f"scipy {method} (torch f)", r, "torch f for scipy")
    costs_after = {name: call_costs(prob) for name, prob in PROBLEMS.items()}
    print(costs_after, flush=True)
    costs = {
        name: {k: min(v, costs_after[name][k]) for k, v in c.items()}
        for name, c in costs_before.items()
    }
    for name, _, _, r in rows:
        # Vectorized rows: the stacked calls are the stages' (3 states each) and one per Jacobian
        # (n copies of the state, n = 3 for ROBER, 2 for Van der Pol), each costed as a call on
        # three stacked states; the rest of nfe are single calls.
        one, stacked = costs[name][r["f_kind"]], r["nstacked"]
        three = costs[name][r["f_kind"] + " x3"] if stacked else 0.0
        jac_calls = r["njac"] if stacked else 0
        singles = r["nfe"] - 3 * (stacked - jac_calls) - len(PROBLEMS[name]["u0"]) * jac_calls
        r["f_time"] = singles * one + stacked * three
        r["solver_time"] = max(0.0, r["time"] - r["f_time"])
    fmt = lambda x: "-" if x is None else str(x)  # noqa: E731
    # nfe, and for the vectorized rows the stacked calls among them ("1715 (466 stacked)").
    nfe_cell = lambda r: f"{r['nfe']} ({r['nstacked']} stacked)" if r["nstacked"] else str(r["nfe"])  # noqa: E731
    us = lambda x: f"{x * 1e6:.1f}"  # noqa: E731
    lines = [
        "# Stiff solvers: diffeqlayers stiff methods vs scipy.integrate.solve_ivp",
        "",
        f"`python benchmarks/bench_stiff.py --repeats {args.repeats}`; torch "
        f"{torch.__version__}, scipy {scipy.__version__}, NumPy {np.__version__}, 1 thread, "
        f"{platform.processor() or platform.machine()}; times are "
        "CPU times of the solving thread (time.thread_time), the best of the repeats. "
        "Steps: accepted steps (scipy reports no rejections); scipy values at the save "
        "times from its dense output. Error: ROBER max relative "
        "error of y1, y3 at 1e11 vs the IVP Test Set; Van der Pol max |x error| at "
        "t = 0.5, 1.2, 2.0, 2.8, 3.0 vs scipy Radau at 1e-11. 'scipy X' gets a NumPy f and the "
        "exact Jacobian (Python lists); 'scipy X (torch f)' gets diffeqlayers' torch f "
        "(ndarray -> torch.from_numpy -> f -> .numpy(), under no_grad) and its autograd Jacobian "
        "(torch.autograd.functional.jacobian: one recorded f and n reverse passes). "
        "diffeqlayers builds the Jacobian by autograd in reverse mode too (in C++, one recorded "
        "f and one reverse pass with the n seeds batched under vmap; the recorded f counts in "
        "its nfe, scipy's njev evaluations do not count in its nfe), or, in the rows marked "
        "'(exact jac)', takes the exact Jacobian as a torch function (jac=, torch.tensor of "
        "the same Python lists scipy gets); rows marked '(TorchScript f)' get the same f as a "
        "TorchScript module (torch.jit.script of the same operations, called from C++ without "
        "Python) with autograd Jacobians; rows marked '(vectorized...)' run radau5 with "
        "vectorized=True: each Newton update evaluates its three stages in one call of f on "
        "the stacked states (the torch f's here are written vectorized, u[..., i], for every "
        "row), nfe still counting states. diffeqlayers is told that f is autonomous "
        "(autonomous=True: no df/dt evaluations).",
        "",
        "## Cost of one call",
        "",
        "Median over 200 batches (100 for the autograd Jacobian) of the CPU time of 50 "
        "back-to-back calls (10 for the autograd Jacobian), divided by the batch size, on the "
        "initial state, measured before and after all solves: the smaller of the two, which "
        "the f times below use, then (before, after). torch f: the torch "
        "function on a float64 tensor with grad mode off, as diffeqlayers calls f inside "
        "solve under no_grad (the C++ -> Python call itself not included). The scipy columns "
        "include solve_ivp's own wrapper (np.asarray(fun(t, y), dtype=float)) on the ndarray "
        "state; the wrapped torch f enters and leaves no_grad on every call. TorchScript f: the "
        "same operations scripted, called from C++ as the solve calls it (50 calls timed in "
        "C++ by wall clock, diffeqlayers._C._time_dynamics, per batch), under no_grad. "
        "x3: one call on three states stacked ([3, n], t a [3, 1] tensor for the torch f), "
        "as radau5 with vectorized=True makes it.",
        "",
        "| problem | torch f [us] | TorchScript f from C++ [us] | torch f x3 [us] | "
        "TorchScript f x3 [us] | NumPy f [us] | "
        "torch f wrapped for scipy [us] | exact Jacobian [us] | "
        "autograd Jacobian for scipy [us] |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    kinds = [
        "torch f",
        "script f",
        "torch f x3",
        "script f x3",
        "numpy f",
        "torch f for scipy",
        "exact jac",
        "autograd jac",
    ]
    for name, c in costs.items():
        cells = [
            f"{us(c[k])} ({us(costs_before[name][k])}, {us(costs_after[name][k])})" for k in kinds
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Work-precision",
        "",
        "f time = nfe x the cost of one call of that row's f (table above: torch f for "
        "diffeqlayers, TorchScript f for its '(TorchScript f)' rows, NumPy f for 'scipy X', "
        "the wrapped torch f for 'scipy X (torch f)'; the vectorized rows: nstacked stacked "
        "calls, the stages' on 3 states and one per Jacobian on n copies of the state (n = 3 "
        "ROBER, 2 Van der Pol), all costed as the call on three states, and the rest of nfe "
        "single calls); "
        "solver time = time - f time, floored at 0: everything but the evaluations of f, "
        "Jacobians included (for scipy's autograd Jacobians all of their cost, for "
        "diffeqlayers' all but the recorded f).",
        "",
        "| problem | rtol | solver | steps | rejected | nfe | Jacobians | LUs | error | "
        "time [s] | f time [s] | solver time [s] |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rtol, solver, r in rows:
        lines.append(
            f"| {name} | {rtol:.1e} | {solver} | {fmt(r['steps'])} | {fmt(r['rejected'])} | "
            f"{nfe_cell(r)} | {r['njac']} | {r['nlu']} | {r['err']:.2e} | {r['time']:.3f} | "
            f"{r['f_time']:.3f} | {r['solver_time']:.3f} |"
        )

    def ratio_table(key):
        out = [
            "| problem | scipy run (rtol, error) | " + " | ".join(DL_COLUMNS) + " |",
            "|---|---|" + "---|" * len(DL_COLUMNS),
        ]
        for name, rtol, solver, r in rows:
            if not solver.startswith("scipy"):
                continue
            cells = []
            for method in DL_COLUMNS:
                vals = [
                    q[key]
                    for n2, _, s2, q in rows
                    if n2 == name and s2 == f"diffeqlayers {method}" and q["err"] <= r["err"]
                ]
                if not vals:
                    cells.append("-")
                elif r[key] > 0:
                    cells.append(f"{min(vals) / r[key]:.2f}")
                else:
                    cells.append("inf")
            out.append(
                f"| {name} | {solver[6:]} ({rtol:.1e}, {r['err']:.1e}) | "
                + " | ".join(cells)
                + " |"
            )
        return out

    # Work-precision: time at equal (or better) error relative to each scipy run.
    lines += [
        "",
        "## Time at equal error",
        "",
        "For each scipy run, the fastest run of the diffeqlayers method "
        "(any tolerance level) with an error no larger, as a ratio of times (< 1: diffeqlayers "
        "faster; '-': no run of the method reached that error).",
        "",
    ]
    lines += ratio_table("time")
    lines += [
        "",
        "## Solver time at equal error",
        "",
        "As above with solver time (time - f time) in place of time, on both sides: the "
        "smallest solver time of the diffeqlayers method's runs with an error no larger, over "
        "the scipy run's solver time ('inf': the scipy run's solver time floored at 0).",
        "",
    ]
    lines += ratio_table("solver_time")
    # The rows the notes discuss: rodas5, radau5 and scipy Radau, BDF (both f) at rtol 1e-6.
    focus = [
        f"diffeqlayers {m}{v}"
        for m in ["rodas5", "radau5"]
        for v in ["", " (exact jac)", " (TorchScript f)"]
    ]
    focus += [f"diffeqlayers radau5{suffix}" for suffix, _ in DL_VECTORIZED]
    focus += ["scipy Radau", "scipy BDF", "scipy Radau (torch f)", "scipy BDF (torch f)"]
    lines += [
        "",
        "## rtol 1e-6 in brief",
        "",
        "rodas5, radau5 and scipy Radau, BDF at rtol 1e-6 (rows of the table above), with f's "
        "share "
        "of the time.",
        "",
        "| problem | solver | nfe | error | time [s] | f time [s] | solver time [s] | f share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rtol, solver, r in rows:
        if rtol == 1e-6 and solver in focus:
            lines.append(
                f"| {name} | {solver} | {nfe_cell(r)} | {r['err']:.2e} | {r['time']:.3f} | "
                f"{r['f_time']:.3f} | {r['solver_time']:.3f} | "
                f"{min(1.0, r['f_time'] / r['time']):.0%} |"
            )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "stiff.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


VDP_REF = None

if __name__ == "__main__":
    main()
