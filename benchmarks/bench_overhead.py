"""Overhead benchmark (issue 7): the time a solve spends beyond its calls of f.

    overhead = (time - f cost) / time

for three ways of giving the same network as dynamics: a Python nn.Module f (the solve takes the
GIL and calls Python per evaluation), the built-in C++ MLP (dl.MLP) and a TorchScript module
(torch.jit.script of the same nn.Module, run by the TorchScript interpreter from C++). Two cases:

1. Compute-bound: MLP 2 -> 512 -> 512 -> 2 (tanh), batch 4096, float32, tsit5 on [0, 1] (rtol
   1e-4, atol 1e-6). The issue's target: overhead at most 5% of the solve.
2. Small: the foundation's neural ODE, Linear(2, 50) -> tanh -> Linear(50, 2), u0 = [1, 1] (no
   batch), float32, dopri5 on [0, 10] saved every 0.1 (rtol 1e-5, atol 1e-7). The issue's
   target for a Python f: the time beyond f's own calls at most 10%.

Each case runs a forward (inference) solve with grad off and one training step (forward +
backward of an MSE loss) by diffeq_rd and by the interpolating adjoint, with 1 thread and with
torch's default thread count. The f cost is built from the solve's own counts and one call of f
timed the way the solve makes it:

* grad off: nfe x (one f call: the Python f from Python, the C++ MLP and the TorchScript module
  from C++ through _C._time_dynamics, without the GIL);
* diffeq_rd: nfe x (one f call under grad + its backward, the latter from one backward pass
  through many recorded calls): each call the solve records is backpropagated once;
* interpolating adjoint: (forward nfe + backward's replayed f calls) x (one f call, grad off) +
  backward's vector-Jacobian products x (one f call under grad + its backward).

Times are medians of --repeats runs (the small case after a warm-up), timed round-robin over the
three f's, with f's calls timed right after each run and the overhead taken from the medians, so
that drift in the machine's load affects a run and its f cost alike. The small case also times
3 runs back to back after each ("warm"): f's calls are timed back to back, while a run timed
alone right after the previous f timing's backward pass pays for its freed graph and cold caches
(about 1 ms on the small case here); both overheads are reported. Writes
benchmarks/results/overhead.md (or --out) with the command line.

    python benchmarks/bench_overhead.py [--repeats 2] [--small-repeats 30] [--cases big small]
        [--threads 1 0] [--out PATH]
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
from torch import nn

import diffeqlayers as dl
from diffeqlayers import _C
from diffeqlayers.script import ScriptRhs

IMPLS = ("Python f", "C++ MLP", "TorchScript")
MODES = ("forward (grad off)", "train: diffeq_rd", "train: interpolating adjoint")


def make_case(name: str) -> dict[str, Any]:
    torch.manual_seed(0)
    if name == "big":
        sizes = [2, 512, 512, 2]
        u0 = torch.randn(4096, 2)
        solve_kw: dict[str, Any] = dict(solver="tsit5", rtol=1e-4, atol=1e-6)
        span, saveat = (0.0, 1.0), [1.0]
    else:
        sizes = [2, 50, 2]
        u0 = torch.tensor([1.0, 1.0])
        solve_kw = dict(solver="dopri5", rtol=1e-5, atol=1e-7)
        span, saveat = (0.0, 10.0), torch.linspace(0.0, 10.0, 101).tolist()
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    net = nn.Sequential(*layers)
    mlp = dl.MLP(sizes, "tanh")
    with torch.no_grad():  # the same weights in all three
        for lin, src in zip(mlp.layers, [m for m in net if isinstance(m, nn.Linear)]):
            lin.weight.copy_(src.weight)
            lin.bias.copy_(src.bias)
    script = torch.jit.script(net)  # shares net's parameters
    target = torch.sin(u0) * 0.5
    return dict(
        name=name,
        net=net,
        mlp=mlp,
        script=script,
        u0=u0,
        span=span,
        saveat=saveat,
        solve_kw=solve_kw,
        target=target,
    )


def problem(case: dict[str, Any], impl: str) -> tuple[dl.ODEProblem, nn.Module, Callable]:
    """(problem, parameter module, f(u) as the solve calls it)."""
    net, mlp, script, u0, span = (case[k] for k in ("net", "mlp", "script", "u0", "span"))
    if impl == "Python f":

        def f_py(u: torch.Tensor, p: object, t: float) -> torch.Tensor:
            return net(u)

        return dl.ODEProblem(f_py, u0, span, net), net, lambda u: f_py(u, None, 0.5)
    if impl == "C++ MLP":
        rhs = mlp.rhs
        return dl.ODEProblem(mlp, u0, span, mlp), mlp, lambda u: rhs(u, None, 0.5)
    rhs = ScriptRhs(script)
    return dl.ODEProblem(script, u0, span, script), script, lambda u: rhs(u, None, 0.5)


def time_f(case: dict[str, Any], impl: str, n: int) -> tuple[float, float]:
    """(one f call with grad off, one f call under grad + its backward), in seconds.

    Calls are timed as the solve makes them: the Python f from Python, the native ones from C++
    (_C._time_dynamics, without the GIL). The backward of one call is the time of one backward
    pass through n recorded calls, divided by n, so that Python's per-call cost of starting
    autograd's engine is not counted as f's (inside a solve the engine runs once)."""
    prob, module, f = problem(case, impl)
    u = case["u0"].clone()
    params = list(module.parameters())
    native = None if impl == "Python f" else prob.f.native_dynamics()

    def forward_calls(x: torch.Tensor) -> float:
        if native is not None:
            return _C._time_dynamics(native, 0.5, x, n)
        start = time.perf_counter()
        for _ in range(n):
            f(x)
        return (time.perf_counter() - start) / n

    with torch.no_grad():
        plain = forward_calls(u)
    ug = u.clone().requires_grad_()
    fwd = forward_calls(ug)  # recorded, then dropped
    outs = [f(ug) for _ in range(n)]
    start = time.perf_counter()
    torch.autograd.backward(outs, [torch.ones_like(u)] * n, inputs=[ug, *params])
    return plain, fwd + (time.perf_counter() - start) / n


def runner(case: dict[str, Any], impl: str, mode: str, record: dict[str, Any]) -> Callable:
    prob, module, _ = problem(case, impl)
    kw = dict(case["solve_kw"])
    solver = kw.pop("solver")
    saveat, target = case["saveat"], case["target"]

    def reduction(sol: dl.Solution) -> torch.Tensor:
        record["sol"] = sol
        return ((sol.u[-1] - target) ** 2).mean()

    if mode == MODES[0]:

        def run() -> None:
            with torch.no_grad():
                record["sol"] = dl.solve(prob, solver, saveat=saveat, **kw)

        return run
    grad_fn = dl.diffeq_rd if mode == MODES[1] else dl.diffeq_adjoint

    def step() -> None:
        module.zero_grad(set_to_none=True)
        loss = grad_fn(module, reduction, prob, solver, saveat=saveat, **kw)
        loss.backward()

    return step


def bench(
    case: dict[str, Any], threads: int, repeats: int, n_f: int, warmup: bool, warm: int = 0
) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    rows = []
    for mode in MODES:
        records: dict[str, dict[str, Any]] = {impl: {} for impl in IMPLS}
        fns = [runner(case, impl, mode, records[impl]) for impl in IMPLS]
        if warmup:
            for fn in fns:
                fn()
        times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
        warm_times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
        costs: dict[str, list[tuple[float, float, float]]] = {impl: [] for impl in IMPLS}
        # Round-robin over the three f's; f is timed right after each run, so that both see
        # the same load on a shared machine.
        for _ in range(repeats):
            for impl, fn in zip(IMPLS, fns):
                start = time.perf_counter()
                fn()
                times[impl].append(time.perf_counter() - start)
                # Then `warm` runs back to back, as f's calls are timed (the first run follows
                # the previous f timing's backward pass, whose freed graph and caches it pays
                # for: about 1 ms more for the small case on this machine).
                for _ in range(warm):
                    start = time.perf_counter()
                    fn()
                    warm_times[impl].append(time.perf_counter() - start)
                plain, vjp = time_f(case, impl, n_f)
                sol = records[impl]["sol"]
                nfe = sol.stats.nfe
                if mode == MODES[0]:
                    cost = nfe * plain
                elif mode == MODES[1]:
                    cost = nfe * vjp
                else:
                    adj = sol.adjoint_stats
                    cost = (nfe + adj.nfe) * plain + adj.nvjp * vjp
                costs[impl].append((plain, vjp, cost))
        for impl in IMPLS:
            sol = records[impl]["sol"]
            nfe, steps = sol.stats.nfe, sol.stats.naccept + sol.stats.nreject
            back = ""
            if mode == MODES[2]:
                adj = sol.adjoint_stats
                back = f"{adj.nfe} f + {adj.nvjp} vjp"
            t = statistics.median(times[impl])
            tw = statistics.median(warm_times[impl]) if warm_times[impl] else float("nan")
            plain, vjp, cost = (statistics.median(c[i] for c in costs[impl]) for i in range(3))
            rows.append(
                dict(
                    case=case["name"],
                    threads=threads,
                    mode=mode,
                    impl=impl,
                    nfe=nfe,
                    steps=steps,
                    back=back,
                    time=t,
                    warm=tw,
                    f=plain,
                    vjp=vjp,
                    cost=cost,
                    overhead=(t - cost) / t,
                    overhead_warm=(tw - cost) / tw,
                )
            )
            print(
                f"{case['name']:5s} threads={threads} {mode:30s} {impl:11s} nfe={nfe:4d} "
                f"time={t * 1e3:9.2f} ms  f cost={cost * 1e3:9.2f} ms  "
                f"overhead={(t - cost) / t * 100:5.1f}%",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs per timing, big case")
    parser.add_argument("--small-repeats", type=int, default=30, help="runs per timing, small")
    parser.add_argument("--cases", nargs="+", default=["big", "small"], choices=["big", "small"])
    parser.add_argument(
        "--threads", nargs="+", type=int, default=[1, 0], help="thread counts (0: torch default)"
    )
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "overhead.md")
    )
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    rows = []
    for name in args.cases:
        case = make_case(name)
        for threads in args.threads:
            n = threads or default_threads
            if name == "big":  # seconds per run: no warm-up, f timed with one call
                rows += bench(case, n, args.repeats, n_f=1, warmup=False)
            else:
                rows += bench(case, n, args.small_repeats, n_f=200, warmup=True, warm=3)
        torch.set_num_threads(default_threads)

    lines = [
        "# Overhead of a solve: (time - f cost) / time",
        "",
        "    " + " ".join(["python", *sys.argv]),
        "",
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs (torch default: {default_threads} threads). Wall-clock times; "
        "on a shared machine they are noisy: compare within a table.",
        "",
        "time: the median of the runs, each timed alone right after the previous f timing "
        "(whose backward pass it follows, as a training step follows the last one's). warm "
        "(small case): the median of 3 more runs back to back after each, as f's calls are "
        "timed; overhead, warm compares those with the same f cost.",
        "",
        "f cost: grad off, nfe x one f call (the Python f timed from Python, the C++ MLP and the "
        "TorchScript module from C++ without the GIL); diffeq_rd, nfe x (one f call under grad "
        "+ its backward); interpolating adjoint, (forward nfe + backward's f calls) x one f call "
        "+ backward's vector-Jacobian products x (f under grad + backward). nfe and steps are "
        "the forward solve's (steps: accepted + rejected).",
    ]
    for name in args.cases:
        case_rows = [r for r in rows if r["case"] == name]
        lines += [
            "",
            f"## {make_title(name)}",
            "",
            "| threads | run | f | nfe | steps | backward | time (ms) | warm (ms) | one f (ms) | "
            "f + backward (ms) | f cost (ms) | overhead | overhead, warm |",
            "|---:|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]

        for r in case_rows:
            has_warm = r["warm"] == r["warm"]  # not NaN
            warm = f"{r['warm'] * 1e3:.2f}" if has_warm else "-"
            warm_over = f"{r['overhead_warm'] * 100:.1f}%" if has_warm else "-"
            lines.append(
                f"| {r['threads']} | {r['mode']} | {r['impl']} | {r['nfe']} | {r['steps']} | "
                f"{r['back'] or '-'} | {r['time'] * 1e3:.2f} | {warm} | "
                f"{r['f'] * 1e3:.4f} | {r['vjp'] * 1e3:.4f} | {r['cost'] * 1e3:.2f} | "
                f"{r['overhead'] * 100:.1f}% | {warm_over} |"
            )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


def make_title(name: str) -> str:
    if name == "big":
        return (
            "Compute-bound: MLP 2 -> 512 -> 512 -> 2 (tanh), batch 4096, float32, tsit5 on "
            "[0, 1], rtol 1e-4, atol 1e-6 (target: overhead at most 5%)"
        )
    return (
        "Small: the foundation's neural ODE, Linear(2, 50) -> tanh -> Linear(50, 2), u0 = [1, 1], "
        "float32, dopri5 on [0, 10] saved every 0.1, rtol 1e-5, atol 1e-7 (target for a Python "
        "f: at most 10%)"
    )


if __name__ == "__main__":
    main()
