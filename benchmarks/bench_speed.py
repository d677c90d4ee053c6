"""Speed benchmark (issue 7): solves whose dynamics is the built-in C++ MLP (dl.MLP) against
the same network as a Python f, torchdiffeq and torchode, and the solver's overhead.

1. The foundation's neural ODE training step (Linear(2, 50) -> tanh -> Linear(50, 2), float32,
   u0 = [1, 1], saved every 0.1 on [0, 10], MSE loss against Lotka-Volterra data, rtol 1e-5,
   atol 1e-7): forward and backward. dopri5 everywhere (torchdiffeq 0.2.5 has no tsit5), tsit5
   too where the library has it.
2. DiffEqFlux's spiral benchmark: u0 = [2, 0], t in [0, 1.5] with 30 save points,
   f(u) = Linear(2, 50) -> tanh -> Linear(50, 2) applied to u^3, float32, tsit5 with Julia's
   default tolerances (rtol 1e-3, atol 1e-6), loss = sum((data - prediction)^2), one gradient
   with respect to the parameters, every gradient mode, one thread.
3. The overhead of a solve, (solve time - nfe x time of one f call) / solve time, for a Python f
   and for the C++ MLP, on both problems, with grad off (a plain solve) and on (the forward
   pass of diffeq_rd, which records the graph). One f call is timed as the solve calls it: the
   Python f from Python, the C++ MLP from C++ (_C._time_dynamics), each on a state like the
   solve's (requiring grad when grad is on).

Each time is the median of repeated runs after a warm-up, timed round-robin across the
contenders of a table (in a fresh shuffled order each round) so that drift in the machine's
speed and the state a heavy neighbour leaves behind affect them alike. Writes
benchmarks/results/speed.md (or --out) with the command that produced it. --sections runs
only some tables (for quick checks); then nothing is written unless --out is given.

    python benchmarks/bench_speed.py [--repeats 30] [--threads 1] [--out PATH]
        [--sections training,spiral,overhead,diffrax]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from bench_crossover import block_size  # this folder: the script's own directory is on sys.path
from torch import nn

import diffeqlayers as dl
from diffeqlayers import _C

try:
    import torchdiffeq
except ImportError:  # pragma: no cover - the benchmark needs its peer
    sys.exit("torchdiffeq is not installed: pip install torchdiffeq==0.2.5")
try:
    import torchode
except ImportError:  # optional peer
    torchode = None


def rounds(n: int, repeats: int) -> Iterator[list[int]]:
    """The order of the n functions in each of the rounds: shuffled anew each round (a fixed
    seed), so that no function always runs right after the same one. In a fixed order our
    spiral and training-step gradients, timed right after diffrax's 15 ms BacksolveAdjoint,
    measured 1.32-1.34x diffrax's time call by call (and 0.79-0.86x with the I controller, timed
    after them); the next run, shuffled, 0.92-1.02x (and 0.83-1.18x)."""
    rng = random.Random(0)
    order = list(range(n))
    for _ in range(repeats):
        rng.shuffle(order)
        yield order


def median_times(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median wall time of each function, timed round-robin in shuffled order."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for order in rounds(len(fns), repeats):
        for i in order:
            start = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(b) for b in times]


def warm_times(fns: list[Callable[[], object]], cold: list[float], repeats: int) -> list[float]:
    """Median time per call of each function when it runs in blocks of consecutive calls (about
    20 ms per block, from its call-by-call time ``cold``), the blocks taken round-robin: the
    steady state of a training loop that calls one gradient over and over, as a benchmark harness
    that repeats one function (Julia's BenchmarkTools, timeit) measures it."""
    blocks = [block_size(c) for c in cold]
    times: list[list[float]] = [[] for _ in fns]
    for order in rounds(len(fns), repeats):
        for i in order:
            fn, block = fns[i], blocks[i]
            start = time.perf_counter()
            for _ in range(block):
                fn()
            times[i].append((time.perf_counter() - start) / block)
    return [statistics.median(b) for b in times]


def copy_into(mlp: dl.MLP, net: nn.Sequential) -> None:
    """Gives the Python network the MLP's weights (same network, two implementations)."""
    linears = [m for m in net if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for lin, twin in zip(mlp.layers, linears):
            twin.weight.copy_(lin.weight)
            twin.bias.copy_(lin.bias)


class Cube(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x**3


# ----------------------------------------------------------------------------------------------
# 1. The foundation's training step
# ----------------------------------------------------------------------------------------------


def tensor_loop(fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn with the host loop off: the C++ MLP's solves run on tensors, as before the host loop
    (csrc/integrate/host_rk.cpp), so that one run compares both."""

    def run() -> Any:
        _C._set_host_loop(False)
        try:
            return fn()
        finally:
            _C._set_host_loop(True)

    return run


def lotka_volterra_data(t: torch.Tensor) -> torch.Tensor:
    true = dl.ODEProblem(
        lambda u, p, t: torch.stack([1.5 * u[0] - u[0] * u[1], -3.0 * u[1] + u[0] * u[1]]),
        torch.tensor([1.0, 1.0], dtype=torch.float64),
        (0.0, 10.0),
    )
    return dl.solve(true, "dopri5", saveat=t.double(), rtol=1e-10, atol=1e-10).u.float()


def bench_training_step(repeats: int) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    mlp = dl.MLP([2, 50, 2], "tanh")
    net = nn.Sequential(nn.Linear(2, 50), nn.Tanh(), nn.Linear(50, 2))
    copy_into(mlp, net)
    calls = [0]

    def f_py(u: torch.Tensor, p: object, t: float) -> torch.Tensor:
        calls[0] += 1
        return net(u)

    def f_tdq(t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return net(u)

    t = torch.linspace(0.0, 10.0, 101)
    data = lotka_volterra_data(t)
    u0 = torch.tensor([1.0, 1.0])
    tol = dict(rtol=1e-5, atol=1e-7)
    stats: dict[str, Any] = {}

    def keep(sol: dl.Solution) -> torch.Tensor:
        stats["sol"] = sol
        return sol.u

    def step_dl(f: Any, params: Any, method: str, mode: str) -> Callable[[], float]:
        prob = dl.ODEProblem(f, u0, (0.0, 10.0), params)
        grad_fn = dl.diffeq_rd if mode == "rd" else dl.diffeq_adjoint

        def run() -> float:
            mlp.zero_grad()
            net.zero_grad()
            kw = dict(sensealg=mode) if mode != "rd" else {}
            pred = grad_fn(params, keep, prob, method, saveat=t, **tol, **kw)
            loss = ((pred - data) ** 2).mean()
            loss.backward()
            return loss.item()

        return run

    def step_tdq() -> float:
        net.zero_grad()
        pred = torchdiffeq.odeint(f_tdq, u0, t, method="dopri5", **tol)
        loss = ((pred - data) ** 2).mean()
        loss.backward()
        return loss.item()

    contenders: list[tuple[str, str, str, Callable[[], float]]] = [
        ("torchdiffeq", "dopri5", "reverse mode", step_tdq),
        ("diffeqlayers, Python f", "dopri5", "rd", step_dl(f_py, net, "dopri5", "rd")),
        ("diffeqlayers, C++ MLP", "dopri5", "rd", step_dl(mlp, mlp, "dopri5", "rd")),
        ("diffeqlayers, Python f", "tsit5", "rd", step_dl(f_py, net, "tsit5", "rd")),
        ("diffeqlayers, C++ MLP", "tsit5", "rd", step_dl(mlp, mlp, "tsit5", "rd")),
        ("diffeqlayers, C++ MLP", "dopri5", "discrete", step_dl(mlp, mlp, "dopri5", "discrete")),
        ("diffeqlayers, C++ MLP", "tsit5", "discrete", step_dl(mlp, mlp, "tsit5", "discrete")),
        (
            "diffeqlayers, C++ MLP, tensor loop",
            "tsit5",
            "discrete",
            tensor_loop(step_dl(mlp, mlp, "tsit5", "discrete")),
        ),
        (
            "diffeqlayers, C++ MLP",
            "tsit5",
            "interpolating",
            step_dl(mlp, mlp, "tsit5", "interpolating"),
        ),
    ]
    if torchode is not None:
        term = torchode.ODETerm(lambda t, y: f_tdq(t, y))
        for method, cls in (("dopri5", torchode.Dopri5), ("tsit5", torchode.Tsit5)):
            solver = torchode.AutoDiffAdjoint(
                cls(term=term), torchode.IntegralController(term=term, **tol)
            )

            def step_to(solver: Any = solver) -> float:
                net.zero_grad()
                sol = solver.solve(torchode.InitialValueProblem(y0=u0[None], t_eval=t[None]))
                loss = ((sol.ys[0] - data) ** 2).mean()
                loss.backward()
                return loss.item()

            contenders.append(("torchode", method, "reverse mode", step_to))
    rows = []
    for name, method, mode, fn in contenders:
        calls[0] = 0
        stats.clear()
        loss = fn()
        nfe = stats["sol"].stats.nfe if "sol" in stats else calls[0]
        rows.append(dict(lib=name, method=method, mode=mode, nfe=nfe, note=f"loss {loss:.4f}"))
    runs = [c[3] for c in contenders]
    cold = median_times(runs, repeats)
    for row, seconds, warm in zip(rows, cold, warm_times(runs, cold, repeats)):
        row["time"] = seconds
        row["warm"] = warm
    return rows


# ----------------------------------------------------------------------------------------------
# 2. DiffEqFlux's spiral benchmark
# ----------------------------------------------------------------------------------------------


def spiral_setup() -> tuple[dl.MLP, nn.Sequential, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(100)
    mlp = dl.MLP([2, 50, 2], "tanh", input_power=3)
    net = nn.Sequential(Cube(), nn.Linear(2, 50), nn.Tanh(), nn.Linear(50, 2))
    copy_into(mlp, net)
    u0 = torch.tensor([2.0, 0.0])
    t = torch.linspace(0.0, 1.5, 30)
    true_a = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64)
    truth = dl.ODEProblem(lambda u, p, t: (u**3) @ true_a, u0.double(), (0.0, 1.5))
    data = dl.solve(truth, "tsit5", saveat=t.double(), rtol=1e-10, atol=1e-12).u.float()
    return mlp, net, u0, t, data


SPIRAL_TOL = dict(rtol=1e-3, atol=1e-6)  # OrdinaryDiffEq's defaults, as in the Julia benchmark


def bench_spiral(repeats: int) -> list[dict[str, Any]]:
    mlp, net, u0, t, data = spiral_setup()
    calls = [0]

    def f_py(u: torch.Tensor, p: object, t: float) -> torch.Tensor:
        calls[0] += 1
        return net(u)

    def f_tdq(t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return net(u)

    box: dict[str, Any] = {}

    def keep(sol: dl.Solution) -> torch.Tensor:
        box["sol"] = sol
        return sol.u

    fns = {
        "rd": dl.diffeq_rd,
        "fd": dl.diffeq_fd,
        "interpolating": lambda *a, **k: dl.diffeq_adjoint(*a, sensealg="interpolating", **k),
        "backsolve": lambda *a, **k: dl.diffeq_adjoint(*a, sensealg="backsolve", **k),
        "discrete": lambda *a, **k: dl.diffeq_adjoint(*a, sensealg="discrete", **k),
        # The backward solve's error control without the parameter-gradient channels.
        "interpolating, seminorm": lambda *a, **k: dl.diffeq_adjoint(
            *a, sensealg="interpolating", seminorm=True, **k
        ),
        "backsolve, seminorm": lambda *a, **k: dl.diffeq_adjoint(
            *a, sensealg="backsolve", seminorm=True, **k
        ),
    }

    def gradient(f: Any, module: nn.Module, mode: str) -> Callable[[], float]:
        prob = dl.ODEProblem(f, u0, (0.0, 1.5), module)

        def run() -> float:
            module.zero_grad()
            pred = fns[mode](module, keep, prob, "tsit5", saveat=t, **SPIRAL_TOL)
            loss = ((data - pred) ** 2).sum()
            loss.backward()
            return loss.item()

        return run

    def tdq(adjoint: bool) -> Callable[[], float]:
        odeint = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint

        class F(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = net

            def forward(self, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
                return f_tdq(t, u)

        func = F()

        def run() -> float:
            net.zero_grad()
            pred = odeint(func, u0, t, method="dopri5", **SPIRAL_TOL)
            loss = ((data - pred) ** 2).sum()
            loss.backward()
            return loss.item()

        return run

    contenders: list[tuple[str, str, str, Callable[[], float]]] = []
    for mode in fns:
        contenders.append(("diffeqlayers, C++ MLP", "tsit5", mode, gradient(mlp, mlp, mode)))
    contenders.append(
        (
            "diffeqlayers, C++ MLP, tensor loop",
            "tsit5",
            "discrete",
            tensor_loop(gradient(mlp, mlp, "discrete")),
        )
    )
    for mode in ("rd", "interpolating"):
        contenders.append(("diffeqlayers, Python f", "tsit5", mode, gradient(f_py, net, mode)))
    contenders.append(("torchdiffeq", "dopri5", "reverse mode", tdq(False)))
    contenders.append(("torchdiffeq", "dopri5", "odeint_adjoint", tdq(True)))
    rows = []
    for name, method, mode, fn in contenders:
        calls[0] = 0
        box.clear()
        loss = fn()
        if "sol" in box:
            sol = box["sol"]
            nfe = sol.stats.nfe
            steps = f"{sol.stats.naccept}+{sol.stats.nreject}"
            adj = sol.adjoint_stats
            back = f"{adj.nfe} (vjp {adj.nvjp})" if adj is not None and adj.done else "-"
        else:
            nfe, steps, back = calls[0], "?", "-"
        rows.append(
            dict(lib=name, method=method, mode=mode, nfe=nfe, steps=steps, back=back, loss=loss)
        )
    runs = [c[3] for c in contenders]
    cold = median_times(runs, repeats)
    for row, seconds, warm in zip(rows, cold, warm_times(runs, cold, repeats)):
        row["time"] = seconds
        row["warm"] = warm
    return rows


def diffrax_gradients(repeats: int, threads: int) -> list[dict[str, Any]]:
    """The same two gradients with JAX + diffrax on the CPU (jit-compiled, float32), when
    installed: the training step (dopri5 and tsit5) and the spiral (tsit5), with diffrax's
    default adjoint (RecursiveCheckpointAdjoint, the discrete adjoint) and BacksolveAdjoint."""
    if threads == 1:
        os.environ.setdefault(
            "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )
    try:
        import diffrax  # noqa: PLC0415  (optional peer)
        import jax  # noqa: PLC0415
        import jax.numpy as jnp  # noqa: PLC0415
    except ImportError:
        return []

    def make(weights: list[torch.Tensor], cube: bool) -> Callable[..., Any]:
        def f(t: Any, y: Any, args: Any) -> Any:
            w0, b0, w1, b1 = args
            x = y**3 if cube else y
            return w1 @ jnp.tanh(w0 @ x + b0) + b1

        return f

    def case(
        name: str,
        mlp: dl.MLP,
        u0: torch.Tensor,
        t1: float,
        t: torch.Tensor,
        data: torch.Tensor,
        cube: bool,
        tol: dict[str, float],
        loss_kind: str,
    ) -> list[dict[str, Any]]:
        params = tuple(jnp.asarray(p.detach().numpy()) for p in mlp.weights())
        term = diffrax.ODETerm(make(mlp.weights(), cube))
        y0 = jnp.asarray(u0.numpy())
        ts = jnp.asarray(t.numpy())
        target = jnp.asarray(data.numpy())
        rows = []
        solvers = [("dopri5", diffrax.Dopri5()), ("tsit5", diffrax.Tsit5())]
        if name == "spiral":
            solvers = solvers[1:]
        adjoints = [
            ("RecursiveCheckpointAdjoint (discrete)", diffrax.RecursiveCheckpointAdjoint()),
            ("BacksolveAdjoint", diffrax.BacksolveAdjoint()),
        ]
        fns, meta = [], []
        for method, solver in solvers:
            for adj_name, adjoint in adjoints:

                def loss(p: Any, solver: Any = solver, adjoint: Any = adjoint) -> Any:
                    sol = diffrax.diffeqsolve(
                        term,
                        solver,
                        0.0,
                        t1,
                        None,
                        y0,
                        args=p,
                        saveat=diffrax.SaveAt(ts=ts),
                        stepsize_controller=diffrax.PIDController(**tol),
                        adjoint=adjoint,
                        max_steps=100_000,
                    )
                    r = (sol.ys - target) ** 2
                    return (r.mean() if loss_kind == "mean" else r.sum()), sol.stats

                grad = jax.jit(jax.grad(loss, has_aux=True))
                g, st = grad(params)
                jax.block_until_ready(g)
                value, _ = jax.jit(loss)(params)

                def run(grad: Any = grad) -> None:
                    jax.block_until_ready(grad(params))

                fns.append(run)
                meta.append(
                    dict(
                        lib="diffrax (JAX, jit)",
                        method=method,
                        mode=adj_name,
                        nfe=f"{int(st['num_steps'])} steps",
                        loss=float(value),
                    )
                )
            # The same gradient here (C++ MLP, discrete adjoint) in the same round-robin, so that
            # the ratio does not depend on how the machine's speed moved between sections.
            prob = dl.ODEProblem(mlp, u0, (0.0, t1), mlp)
            box: dict[str, dl.Solution] = {}

            def keep(sol: dl.Solution, box: dict[str, dl.Solution] = box) -> torch.Tensor:
                box["sol"] = sol
                return sol.u

            # Our default PI controller, and the I controller diffrax's PIDController defaults
            # to (pcoeff 0, icoeff 1), which takes fewer steps on these problems.
            for controller in ("PI", "I"):

                def ours(
                    method: str = method,
                    prob: dl.ODEProblem = prob,
                    keep: Any = keep,
                    controller: str = controller,
                ) -> float:
                    mlp.zero_grad()
                    pred = dl.diffeq_adjoint(
                        mlp,
                        keep,
                        prob,
                        method,
                        saveat=t,
                        sensealg="discrete",
                        controller=controller,
                        **tol,
                    )
                    r = (pred - data) ** 2
                    loss = r.mean() if loss_kind == "mean" else r.sum()
                    loss.backward()
                    return loss.item()

                value = ours()
                st = box["sol"].stats
                fns.append(ours)
                meta.append(
                    dict(
                        lib="diffeqlayers, C++ MLP"
                        + (", controller I" if controller == "I" else ""),
                        method=method,
                        mode="discrete",
                        nfe=f"{st.naccept + st.nreject} steps, nfe {st.nfe}",
                        loss=value,
                    )
                )
        cold = median_times(fns, repeats)
        for m, seconds, warm in zip(meta, cold, warm_times(fns, cold, repeats)):
            m["time"] = seconds
            m["warm"] = warm
            m["case"] = name
            rows.append(m)
        # Ratios to diffrax's discrete adjoint (RecursiveCheckpointAdjoint) of the same method.
        for m in rows:
            if m["case"] != name:
                continue
            ref = next(
                r
                for r in rows
                if r["case"] == name
                and r["method"] == m["method"]
                and r["mode"].startswith("RecursiveCheckpointAdjoint")
            )
            m["ratio"] = (m["time"] / ref["time"], m["warm"] / ref["warm"])
        return rows

    torch.manual_seed(0)
    lv_mlp = dl.MLP([2, 50, 2], "tanh")
    lv_t = torch.linspace(0.0, 10.0, 101)
    rows = case(
        "training step",
        lv_mlp,
        torch.tensor([1.0, 1.0]),
        10.0,
        lv_t,
        lotka_volterra_data(lv_t),
        False,
        dict(rtol=1e-5, atol=1e-7),
        "mean",
    )
    sp_mlp, _, sp_u0, sp_t, sp_data = spiral_setup()
    rows += case("spiral", sp_mlp, sp_u0, 1.5, sp_t, sp_data, True, SPIRAL_TOL, "sum")
    return rows


# ----------------------------------------------------------------------------------------------
# 3. Overhead: (solve time - nfe x time of one f call) / solve time
# ----------------------------------------------------------------------------------------------


def time_python_f(f: Callable[..., torch.Tensor], u: torch.Tensor, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        f(u, None, 0.5)
    return (time.perf_counter() - start) / n


def timed_inside(
    module: Any, prob: dl.ODEProblem, method: str, t: torch.Tensor, tol: dict, grad: bool
) -> float:
    """The overhead with f timed inside the solve: the module called through a Python wrapper
    that times each call (a few microseconds per call, nothing next to a compute-bound f), so
    that f is timed on the states and memory the solve gives it. Median over 5 solves of
    (solve - time in f) / solve."""
    inside: list[float] = []

    def f(u: torch.Tensor, p: object, tt: float) -> torch.Tensor:
        start = time.perf_counter()
        y = module(u)
        inside.append(time.perf_counter() - start)
        return y

    timed = dl.ODEProblem(f, prob.u0, prob.tspan, prob.p)
    shares = []
    for _ in range(5):
        inside.clear()
        start = time.perf_counter()
        with torch.set_grad_enabled(grad):
            dl.solve(timed, method, saveat=t, **tol)
        total = time.perf_counter() - start
        shares.append((total - sum(inside)) / total)
    return statistics.median(shares)


def bench_overhead(repeats: int) -> list[dict[str, Any]]:
    rows = []
    lv_t = torch.linspace(0.0, 10.0, 101)
    torch.manual_seed(0)
    lv_mlp = dl.MLP([2, 50, 2], "tanh")
    lv_net = nn.Sequential(nn.Linear(2, 50), nn.Tanh(), nn.Linear(50, 2))
    copy_into(lv_mlp, lv_net)
    sp_mlp, sp_net, sp_u0, sp_t, _ = spiral_setup()
    problems = [
        (
            "foundation (dopri5, rtol 1e-5)",
            lv_mlp,
            lv_net,
            torch.tensor([1.0, 1.0]),
            (0.0, 10.0),
            lv_t,
            "dopri5",
            dict(rtol=1e-5, atol=1e-7),
        ),
        ("spiral (tsit5, rtol 1e-3)", sp_mlp, sp_net, sp_u0, (0.0, 1.5), sp_t, "tsit5", SPIRAL_TOL),
    ]
    # The compute-bound case: a batch of 4096 states through a 512-wide hidden layer, where f's
    # matrix products dominate and the solver's own work should vanish.
    torch.manual_seed(1)
    cb_mlp = dl.MLP([2, 512, 2], "tanh")
    cb_net = nn.Sequential(nn.Linear(2, 512), nn.Tanh(), nn.Linear(512, 2))
    copy_into(cb_mlp, cb_net)
    problems.append(
        (
            "compute-bound (batch 4096, width 512, dopri5, rtol 1e-5)",
            cb_mlp,
            cb_net,
            torch.rand(4096, 2) * 2 - 1,
            (0.0, 1.0),
            torch.linspace(0.0, 1.0, 11),
            "dopri5",
            dict(rtol=1e-5, atol=1e-7),
        )
    )
    for name, mlp, net, u0, span, t, method, tol in problems:
        big = u0.numel() > 1000
        for grad in (False, True):

            def f_py(u: torch.Tensor, p: object, t: float, net: nn.Module = net) -> torch.Tensor:
                return net(u)

            impls = [("Python f", f_py, net), ("C++ MLP", mlp, mlp)]
            if not grad and not big:
                # A no-grad solve of the small MLP runs on host arrays; the same on tensors.
                impls.append(("C++ MLP, tensor loop", mlp, mlp))
            for impl, f, module in impls:
                prob = dl.ODEProblem(f, u0, span, module)

                def solve(
                    prob: dl.ODEProblem = prob,
                    grad: bool = grad,
                    method: str = method,
                    t: torch.Tensor = t,
                    tol: dict[str, float] = tol,
                ) -> dl.Solution:
                    with torch.set_grad_enabled(grad):
                        return dl.solve(prob, method, saveat=t, **tol)

                if impl.endswith("tensor loop"):
                    solve = tensor_loop(solve)

                nfe = solve().stats.nfe
                (t_solve,) = median_times([solve], min(repeats, 5) if big else repeats)
                u = u0.clone().requires_grad_(grad)
                n = 20 if big else 2000
                with torch.set_grad_enabled(grad):
                    calls = []
                    for _ in range(5):
                        if impl == "Python f":
                            calls.append(time_python_f(f_py, u, n))
                        else:
                            calls.append(_C._time_dynamics(mlp.dynamics(), 0.5, u, n))
                t_f = statistics.median(calls)
                module = net if impl == "Python f" else mlp
                inside = timed_inside(module, prob, method, t, tol, grad) if big else None
                rows.append(
                    dict(
                        problem=name,
                        grad="on (rd forward)" if grad else "off",
                        impl=impl,
                        nfe=nfe,
                        solve=t_solve,
                        f=t_f,
                        overhead=(t_solve - nfe * t_f) / t_solve,
                        inside=inside,
                    )
                )
    return rows


# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help="comma-separated subset of " + ",".join(SECTIONS) + " (default: all)",
    )
    args = parser.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    out = args.out
    if out is None and set(sections) == set(SECTIONS):
        out = os.path.join(os.path.dirname(__file__), "results", "speed.md")
    torch.set_num_threads(args.threads)

    train = spiral = overhead = jax_rows = []
    if "training" in sections:
        print("training step ...", flush=True)
        train = bench_training_step(args.repeats)
    if "spiral" in sections:
        print("spiral ...", flush=True)
        spiral = bench_spiral(args.repeats)
    if "overhead" in sections:
        print("overhead ...", flush=True)
        overhead = bench_overhead(args.repeats)
    if "diffrax" in sections:
        print("diffrax ...", flush=True)
        jax_rows = diffrax_gradients(args.repeats, args.threads)

    lines: list[str] = []
    if train:
        lines += training_table(train)
    if spiral:
        lines += spiral_table(spiral)
    if overhead:
        lines += overhead_table(overhead)
    if jax_rows:
        lines += diffrax_table(jax_rows)
    command = "python benchmarks/bench_speed.py " + " ".join(sys.argv[1:])
    versions = f"torch {torch.__version__}, torchdiffeq {getattr(torchdiffeq, '__version__', '?')}"
    if torchode is not None:
        versions += ", torchode 1.0.1"
    header = [
        "# Speed: the C++ MLP, Python f, torchdiffeq, torchode",
        "",
        f"Command: `{command.strip()}`  ",
        f"{versions}, diffeqlayers {dl.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}, {args.threads} thread(s), median of {args.repeats} runs "
        f"(round-robin, shuffled each round), {os.cpu_count()} CPU(s). Absolute times move "
        "with the machine's load; ratios within one table are more reliable.",
        "",
    ]
    text = "\n".join(header + lines) + "\n"
    print(text)
    if out is not None:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            fh.write(text)
        print(f"wrote {out}")


SECTIONS = ("training", "spiral", "overhead", "diffrax")


def training_table(train: list[dict[str, Any]]) -> list[str]:
    ref = next(r["time"] for r in train if r["lib"] == "torchdiffeq")
    lines = [
        "## 1. The foundation's neural ODE training step",
        "",
        "Linear(2, 50) -> tanh -> Linear(50, 2), float32, u0 = [1, 1], saved every 0.1 on "
        "[0, 10], MSE against Lotka-Volterra data, rtol 1e-5, atol 1e-7; forward + backward. "
        "nfe: the forward solve's evaluations of f. Gradients: rd (reverse mode through the "
        "solver), discrete (the discrete adjoint: the same gradient; with the C++ MLP each step "
        "is reversed by the MLP's own vector-Jacobian products, as diffrax's "
        "RecursiveCheckpointAdjoint reverses its steps), interpolating (continuous adjoint). "
        "time: contenders alternating call by call; warm: blocks of consecutive calls (see 2.).",
        "",
        "| library, f | method | gradient | nfe | time (ms) | warm (ms) | speed-up vs torchdiffeq "
        "| note |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in train:
        lines.append(
            f"| {r['lib']} | {r['method']} | {r['mode']} | {r['nfe']} | {r['time'] * 1e3:.2f} | "
            f"{r['warm'] * 1e3:.2f} | {ref / r['time']:.1f}x | {r['note']} |"
        )
    return lines


def spiral_table(spiral: list[dict[str, Any]]) -> list[str]:
    ref = next(r["time"] for r in spiral if r["lib"] == "torchdiffeq")
    lines = [
        "",
        "## 2. DiffEqFlux's spiral benchmark: one gradient",
        "",
        "u0 = [2, 0], t in [0, 1.5], 30 save points, Linear(2, 50) -> tanh -> Linear(50, 2) on "
        "u^3, float32, rtol 1e-3, atol 1e-6, loss = sum((data - prediction)^2), gradient "
        "with respect to the parameters. The published Julia figure (DiffEqFlux/"
        "SciMLSensitivity benchmark page) is about 1.7 ms on one thread; target here: at most "
        "2 ms with the C++ MLP. torchdiffeq 0.2.5 has no tsit5 (dopri5 there). nfe: forward "
        "solve (fd: one of its passes); backward nfe: evaluations of f in the adjoint's "
        "backward. time: the contenders alternate call by call (each call finds caches and "
        "the allocator as the others left them); warm: blocks of consecutive calls of one "
        "contender (about 20 ms each, round-robin), as a harness that repeats one function "
        "(BenchmarkTools' @btime for the Julia figure) measures.",
        "",
        "| library, f | method | gradient | nfe | steps (acc+rej) | backward nfe | time (ms) "
        "| warm (ms) | speed-up vs torchdiffeq | loss |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in spiral:
        lines.append(
            f"| {r['lib']} | {r['method']} | {r['mode']} | {r['nfe']} | {r['steps']} | "
            f"{r['back']} | {r['time'] * 1e3:.3f} | {r['warm'] * 1e3:.3f} | "
            f"{ref / r['time']:.1f}x | {r['loss']:.4f} |"
        )
    return lines


def overhead_table(overhead: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "## 3. Overhead of a solve: (solve time - nfe x time of one f call) / solve time",
        "",
        "A forward solve (saveat as above); grad on: the forward pass of diffeq_rd (the graph is "
        "recorded, backward not run). One f call is timed as the solve makes it (Python f from "
        "Python, the C++ MLP from C++) on a state requiring grad when grad is on. For the "
        "compute-bound case f's time depends on the memory it runs on (one f call timed alone "
        "on u0 and inside the solve differ by 10% and more from call to call), so the last "
        "column times f inside the solve instead: the network called through a Python wrapper "
        "that times each call, overhead = (solve - time in f) / solve, median of 5 solves.",
        "",
        "| problem | grad | f | nfe | solve (ms) | one f (us) | nfe x f (ms) | overhead "
        "| overhead, f timed inside |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in overhead:
        inside = "-" if r["inside"] is None else f"{r['inside'] * 100:.1f}%"
        lines.append(
            f"| {r['problem']} | {r['grad']} | {r['impl']} | {r['nfe']} | {r['solve'] * 1e3:.3f} "
            f"| {r['f'] * 1e6:.2f} | {r['nfe'] * r['f'] * 1e3:.3f} | {r['overhead'] * 100:.0f}% "
            f"| {inside} |"
        )
    return lines


def diffrax_table(jax_rows: list[dict[str, Any]]) -> list[str]:
    import diffrax  # noqa: PLC0415
    import jax  # noqa: PLC0415

    lines = [
        "",
        f"## 4. The same gradients with JAX {jax.__version__} + diffrax "
        f"{diffrax.__version__} (CPU, jit-compiled, float32)",
        "",
        "Training step and spiral as in 1. and 2. (diffrax's PID controller with its "
        "defaults at the same rtol/atol; its steps differ from ours). diffeqlayers' discrete "
        "adjoint with the C++ MLP runs again here, in the same round-robin as diffrax (the "
        "machine's speed drifts between sections), with its default PI controller and with the "
        "I controller that diffrax's PIDController defaults to; ratio: time over diffrax's "
        "RecursiveCheckpointAdjoint with the same method, call by call / warm (below 1: "
        "faster than diffrax). time and warm as in 2.",
        "",
        "| case | library | method | adjoint | steps | time (ms) | warm (ms) | ratio | loss |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in jax_rows:
        cold, warm = r["ratio"]
        lines.append(
            f"| {r['case']} | {r['lib']} | {r['method']} | {r['mode']} | {r['nfe']} | "
            f"{r['time'] * 1e3:.3f} | {r['warm'] * 1e3:.3f} | {cold:.2f} / {warm:.2f} | "
            f"{r['loss']:.4f} |"
        )
    return lines


if __name__ == "__main__":
    main()
