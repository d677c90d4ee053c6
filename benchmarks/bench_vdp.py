"""Van der Pol batch benchmark (torchode's): per-sample against shared step control.

A batch of 256 Van der Pol oscillators x'' = mu (1 - x^2) x' - x with mu = 2, initial states
drawn uniformly from [-2, 2]^2 (seed 0), solved on t in [0, 10] (a little under two periods;
the period is about 7.6 for mu = 2) with 200 save points (linspace(0, 10, 200)), dopri5,
rtol = atol = 1e-5, float32, forward only (no gradient), one thread. With --device cuda the
same benchmark runs on the GPU (torchode's own setting): every torch contender on CUDA, diffrax
on JAX's GPU backend, and f's wrapper synchronizes before and after its body so that the time in
f is the GPU's (those synchronizations are in the totals too).

Contenders (peers are optional imports; a missing one is skipped):
- diffeqlayers, shared step: one step size for the whole [256, 2] state (the default);
- diffeqlayers, per sample: solve(..., per_sample=True), each sample its own steps;
- torchdiffeq 0.2.5 (shared step, its only mode);
- torchode (per sample), eager, and compiled with torch.compile when --compile is given;
- diffrax (JAX, jit, CPU): jax.vmap over the samples (per sample, as torchode) and the batch
  as one state (shared step).

Columns: loop iterations (a shared-step solver's attempted steps; a per-sample solver's
iterations of its batched loop, i.e. the slowest sample's attempted steps), the mean accepted
steps per sample, nfe (calls of f, each on the whole batch), total time, time in f (f's own
time, summed by a wrapper around its body; not measurable inside a jit-compiled solver), and
the loop time per iteration, (total - time in f) / iterations: what the solver itself costs per
step. Each library uses its default step-size controller (named in the table), so step counts
differ; the per-iteration loop time is the comparable figure. The error column is the largest
deviation from a float64 reference solve (rtol 1e-10) over all samples and save points.

Times are medians of --repeats runs, taken round-robin across the contenders after a warm-up,
in one process. Writes benchmarks/results/vdp.md (or --out) with the command that produced it.

    python benchmarks/bench_vdp.py [--repeats 10] [--compile] [--device cpu|cuda] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import diffeqlayers as dl

BATCH = 256
MU = 2.0
T1 = 10.0
N_SAVE = 200
TOL = 1e-5
DEVICE = torch.device("cpu")  # set by --device


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


class Timer:
    """Accumulates the time spent inside a function and counts its calls."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def reset(self) -> None:
        self.seconds = 0.0
        self.calls = 0


def vdp_torch(y: torch.Tensor) -> torch.Tensor:
    x, v = y[:, 0], y[:, 1]
    return torch.stack([v, MU * (1 - x * x) * v - x], dim=1)


def timed(fn: Callable[[torch.Tensor], torch.Tensor], timer: Timer) -> Callable[..., Any]:
    def wrapped(y: torch.Tensor) -> torch.Tensor:
        sync()
        start = time.perf_counter()
        out = fn(y)
        sync()
        timer.seconds += time.perf_counter() - start
        timer.calls += 1
        return out

    return wrapped


def problem(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    y0 = (torch.rand(BATCH, 2, generator=gen, dtype=torch.float64) * 4 - 2).to(DEVICE, dtype)
    t_eval = torch.linspace(0.0, T1, N_SAVE, dtype=torch.float64)
    return y0, t_eval


class Contender:
    """One solver setup: run() solves once and returns (ys [N_SAVE, B, 2], stats dict)."""

    def __init__(self, name: str, controller: str, run: Callable[[], Any], timer: Timer | None):
        self.name = name
        self.controller = controller
        self.run = run
        self.timer = timer
        self.totals: list[float] = []
        self.f_times: list[float] = []
        self.stats: dict[str, Any] = {}
        self.ys: torch.Tensor | None = None


def diffeqlayers_contenders(y0: torch.Tensor, t_eval: torch.Tensor) -> list[Contender]:
    out = []
    for per_sample in (False, True):
        timer = Timer()
        f = timed(vdp_torch, timer)

        def rhs(u: torch.Tensor, p: Any, t: Any, f: Any = f) -> torch.Tensor:
            return f(u)

        prob = dl.ODEProblem(rhs, y0, (0.0, T1))

        def run(prob: Any = prob, per_sample: bool = per_sample) -> Any:
            with torch.no_grad():
                sol = dl.solve(
                    prob, "dopri5", saveat=t_eval, rtol=TOL, atol=TOL, per_sample=per_sample
                )
            if per_sample:
                ss = sol.sample_stats
                stats = dict(
                    iterations=ss.iterations,
                    mean_accept=float(ss.naccept.double().mean()),
                    nfe=sol.stats.nfe,
                )
            else:
                stats = dict(
                    iterations=sol.stats.naccept + sol.stats.nreject,
                    mean_accept=float(sol.stats.naccept),
                    nfe=sol.stats.nfe,
                )
            return sol.u, stats

        name = "diffeqlayers, per sample" if per_sample else "diffeqlayers, shared step"
        out.append(Contender(name, "PI (Hairer's)", run, timer))
    return out


def torchdiffeq_contender(y0: torch.Tensor, t_eval: torch.Tensor) -> list[Contender]:
    try:
        import torchdiffeq  # noqa: PLC0415  (optional peer)
    except ImportError:
        return []
    timer = Timer()
    f = timed(vdp_torch, timer)
    t = t_eval.to(y0)

    def rhs(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return f(y)

    def run() -> Any:
        with torch.no_grad():
            ys = torchdiffeq.odeint(rhs, y0, t, method="dopri5", rtol=TOL, atol=TOL)
        # torchdiffeq reports no step counts: dopri5 (FSAL) costs 2 evaluations to start (f0
        # and the initial step) and 6 per attempted step.
        return ys, dict(iterations=(timer.calls - 2) // 6, mean_accept=None, nfe=timer.calls)

    return [Contender("torchdiffeq 0.2.5", "I", run, timer)]


def torchode_contenders(
    y0: torch.Tensor, t_eval: torch.Tensor, compile_it: bool
) -> list[Contender]:
    try:
        import torchode as to  # noqa: PLC0415  (optional peer)
    except ImportError:
        return []
    out = []
    modes = [False, True] if compile_it else [False]
    for compiled in modes:
        timer = Timer()
        f = vdp_torch if compiled else timed(vdp_torch, timer)

        def rhs(t: torch.Tensor, y: torch.Tensor, f: Any = f) -> torch.Tensor:
            return f(y)

        term = to.ODETerm(rhs)
        step = to.Dopri5(term=term)
        controller = to.IntegralController(atol=TOL, rtol=TOL, term=term)
        solver = to.AutoDiffAdjoint(step, controller)
        if compiled:
            # torch.compile(module) would compile forward(), which solve() does not go through.
            solver.solve = torch.compile(solver.solve)
        t_batch = t_eval.to(y0).expand(BATCH, -1)
        ivp = to.InitialValueProblem(y0=y0, t_eval=t_batch)

        def run(solver: Any = solver, ivp: Any = ivp, timer: Timer = timer) -> Any:
            with torch.no_grad():
                sol = solver.solve(ivp)
            st = sol.stats
            return sol.ys.transpose(0, 1), dict(
                iterations=int(st["n_steps"].max()),
                mean_accept=float(st["n_accepted"].double().mean()),
                nfe=int(st["n_f_evals"].max()),
            )

        name = "torchode, torch.compile" if compiled else "torchode, eager"
        out.append(Contender(name, "I (IntegralController)", run, None if compiled else timer))
    return out


def diffrax_contenders(y0: torch.Tensor, t_eval: torch.Tensor) -> list[Contender]:
    if DEVICE.type == "cpu":
        os.environ.setdefault(
            "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )
    else:  # share the GPU with torch: allocate as needed, not 75% of the memory up front
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        import diffrax  # noqa: PLC0415  (optional peer)
        import jax  # noqa: PLC0415
        import jax.numpy as jnp  # noqa: PLC0415
    except ImportError:
        return []
    backend = jax.default_backend()
    if (DEVICE.type == "cuda") != (backend == "gpu"):
        print(f"diffrax skipped: JAX's backend is {backend}, the benchmark's device {DEVICE}")
        return []

    def f(t: Any, y: Any, args: Any) -> Any:
        x, v = y[..., 0], y[..., 1]
        return jnp.stack([v, MU * (1 - x * x) * v - x], axis=-1)

    ts = jnp.asarray(t_eval.numpy(), dtype=jnp.float32)

    def solve_one(y: Any) -> Any:
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(f),
            diffrax.Dopri5(),
            0.0,
            T1,
            None,
            y,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.PIDController(rtol=TOL, atol=TOL),
            max_steps=100_000,
        )
        return sol.ys, sol.stats["num_steps"], sol.stats["num_accepted_steps"]

    y = jnp.asarray(y0.cpu().numpy())
    out = []
    for name, fn in (
        ("diffrax, vmap (per sample)", jax.jit(jax.vmap(solve_one))),
        ("diffrax, batch as one state", jax.jit(solve_one)),
    ):
        jax.block_until_ready(fn(y))  # compile

        def run(fn: Any = fn, per_sample: bool = "vmap" in name) -> Any:
            ys, steps, acc = jax.block_until_ready(fn(y))
            ys = torch.from_numpy(jax.device_get(ys).copy())
            if per_sample:
                ys = ys.transpose(0, 1)
            steps = torch.as_tensor(jax.device_get(steps).copy())
            acc = torch.as_tensor(jax.device_get(acc).copy())
            # Dopri5 is FSAL: 6 new evaluations per attempted step, 2 to start.
            its = int(steps.max())
            return ys, dict(iterations=its, mean_accept=float(acc.double().mean()), nfe=6 * its + 2)

        out.append(Contender(name, "I (PIDController default)", run, None))
    return out


def reference(y0: torch.Tensor, t_eval: torch.Tensor) -> torch.Tensor:
    prob = dl.ODEProblem(lambda u, p, t: vdp_torch(u), y0.cpu().double(), (0.0, T1))
    with torch.no_grad():
        return dl.solve(prob, "tsit5", saveat=t_eval, rtol=1e-10, atol=1e-10).u


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="also torch.compile torchode")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=None, help="default: results/vdp.md (vdp_gpu.md on cuda)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_vdp: --device cuda, but torch sees no CUDA device")
    if args.out is None:
        name = "vdp_gpu.md" if DEVICE.type == "cuda" else "vdp.md"
        args.out = os.path.join(os.path.dirname(__file__), "results", name)
    torch.set_num_threads(1)

    y0, t_eval = problem(torch.float32)
    ref = reference(y0, t_eval)
    contenders = diffeqlayers_contenders(y0, t_eval)
    contenders += torchdiffeq_contender(y0, t_eval)
    compile_note = ""
    contenders += torchode_contenders(y0, t_eval, args.compile)
    contenders += diffrax_contenders(y0, t_eval)

    for c in contenders:  # warm-up (and torch.compile's compilation)
        start = time.perf_counter()
        c.ys, c.stats = c.run()
        c.ys = c.ys.cpu()
        if c.name == "torchode, torch.compile":
            compile_note = f"torch.compile's first call took {time.perf_counter() - start:.1f} s."
        print(f"warm-up {c.name}: {c.stats}", flush=True)
    for _ in range(args.repeats):
        for c in contenders:
            if c.timer:
                c.timer.reset()
            sync()
            start = time.perf_counter()
            c.run()
            sync()
            c.totals.append(time.perf_counter() - start)
            c.f_times.append(c.timer.seconds if c.timer else float("nan"))

    base = next(c for c in contenders if c.name == "diffeqlayers, shared step")
    base_total = statistics.median(base.totals)
    base_loop = (base_total - statistics.median(base.f_times)) / base.stats["iterations"]
    if DEVICE.type == "cuda":
        where = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    else:
        where = (
            f"{platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, "
            f"torch {torch.__version__}, one thread"
        )
    lines = [
        "# Van der Pol batch benchmark (torchode's)"
        + (" on the GPU" if DEVICE.type == "cuda" else ""),
        "",
        f"Command: `python benchmarks/bench_vdp.py --repeats {args.repeats}"
        f"{' --compile' if args.compile else ''}"
        f"{' --device cuda' if DEVICE.type == 'cuda' else ''}` ({where}; medians of round-robin "
        "repeats).",
        "",
        f"B = {BATCH} Van der Pol oscillators, mu = {MU}, y0 ~ U[-2, 2]^2 (seed 0), t in [0, "
        f"{T1:g}], {N_SAVE} save points, dopri5, rtol = atol = {TOL:g}, float32, no gradient. "
        "iterations: attempted steps of a shared-step solver, or iterations of a per-sample "
        "solver's batched loop (the slowest sample's attempted steps); accepted/sample: mean "
        "accepted steps per sample; loop/iter = (total - time in f) / iterations. Ratios are "
        "to diffeqlayers' shared-step solve. " + compile_note,
        "",
        "| contender | controller | iterations | accepted/sample | nfe | total (ms) | in f (ms) "
        "| loop/iter (us) | total / dl shared | loop/iter / dl shared | max err |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in contenders:
        total = statistics.median(c.totals)
        f_time = statistics.median(c.f_times)
        its = c.stats["iterations"]
        loop = (total - f_time) / its if c.timer else total / its
        acc = c.stats["mean_accept"]
        err = float((c.ys.double() - ref).abs().max())
        lines.append(
            f"| {c.name} | {c.controller} | {its} | "
            f"{'-' if acc is None else f'{acc:.1f}'} | {c.stats['nfe']} | {total * 1e3:.1f} | "
            f"{'n/a' if not c.timer else f'{f_time * 1e3:.1f}'} | "
            f"{loop * 1e6:.0f}{'' if c.timer else ' (total/iter)'} | {total / base_total:.2f} | "
            f"{loop / base_loop:.2f} | {err:.1e} |"
        )
    lines += [
        "",
        "Time in f is n/a where f runs inside a compiled program (diffrax under jit, torchode "
        "under torch.compile); their loop/iter column is then total / iterations, f included. "
        "torchdiffeq reports no step counts: its iterations are (nfe - 2) / 6.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    sys.exit(main())
