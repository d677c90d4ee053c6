"""Gradient modes through the adaptive stiff methods: time and agreement.

A stiff Van der Pol oscillator with three parameters, u0' = p0 u1, u1' = p1 (1 - u0^2) u1 - p2 u0,
p = (1, 100, 1) (mu = 100), u0 = (2, 0), t in [0, 1] saved at 11 points, rtol 1e-6, atol 1e-8,
float64, f in Python. The loss is sum(u^2) over the save points; the gradient is taken with
respect to the 5 inputs (p and u0). For every adaptive stiff method, each gradient mode:
``diffeq_rd`` (reverse mode through the solver), ``diffeq_fd`` (forward mode: the 5 input
directions as one batched tangent), ``diffeq_adjoint`` with the discrete and the interpolating
adjoints. Columns: median time of one gradient (round-robin within a method, one thread), its
ratio to ``diffeq_rd``'s, and the largest relative difference of the gradient from
``diffeq_rd``'s.

    python benchmarks/bench_stiff_gradients.py [--repeats 5] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

import diffeqlayers as dl

METHODS = ["rosenbrock23", "rodas5", "rodas5p", "kvaerno5", "kencarp4", "trbdf2", "radau5"]
TOL = dict(rtol=1e-6, atol=1e-8)


def vdp(u: torch.Tensor, p: torch.Tensor, t: float) -> torch.Tensor:
    return torch.stack([p[0] * u[1], p[1] * (1 - u[0] ** 2) * u[1] - p[2] * u[0]])


def gradient(mode: str, method: str) -> Callable[[], tuple[torch.Tensor, int]]:
    p0 = torch.tensor([1.0, 100.0, 1.0], dtype=torch.float64)
    u00 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    t = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
    box: dict[str, dl.Solution] = {}

    def keep(sol: dl.Solution) -> torch.Tensor:
        box["sol"] = sol
        return sol.u

    def run() -> tuple[torch.Tensor, int]:
        p = p0.clone().requires_grad_()
        u0 = u00.clone().requires_grad_()
        prob = dl.ODEProblem(vdp, u0, (0.0, 1.0), p)
        kw = dict(saveat=t, autonomous=True, **TOL)
        if mode == "rd":
            y = dl.diffeq_rd(p, keep, prob, method, **kw)
        elif mode == "fd":
            y = dl.diffeq_fd(p, keep, prob, method, **kw)
        else:
            y = dl.diffeq_adjoint(p, keep, prob, method, sensealg=mode, **kw)
        (y**2).sum().backward()
        return torch.cat([p.grad, u0.grad]), box["sol"].stats.nfe

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out or os.path.join(os.path.dirname(__file__), "results", "stiff_gradients.md")
    modes = ["rd", "fd", "discrete", "interpolating"]
    lines = [
        "# Gradient modes through the adaptive stiff methods",
        "",
        f"Command: `python benchmarks/bench_stiff_gradients.py {' '.join(sys.argv[1:])}`  ",
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
        f"one thread, median of {args.repeats} runs (round-robin within a method).",
        "",
        "Stiff Van der Pol (mu = 100) on [0, 1], 11 save points, rtol 1e-6, atol 1e-8, float64, "
        "f in Python; gradient of sum(u^2) with respect to 3 parameters and u0 (5 inputs). "
        "nfe: the forward solve's evaluations of f (fd: on dual tensors). ratio: time over "
        "diffeq_rd's. diff: largest relative difference of the gradient from diffeq_rd's.",
        "",
        "| method | mode | nfe | time (ms) | ratio to rd | diff from rd |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for method in METHODS:
        print(method, "...", flush=True)
        fns = {m: gradient(m, method) for m in modes}
        results = {}
        for m, fn in fns.items():
            try:
                results[m] = fn()
            except (RuntimeError, ValueError, NotImplementedError) as e:
                results[m] = e
        ok = [m for m in modes if not isinstance(results[m], Exception)]
        runs = [fns[m] for m in ok]
        for fn in runs:
            fn()
        times: dict[str, list[float]] = {m: [] for m in ok}
        for _ in range(args.repeats):
            for m, fn in zip(ok, runs):
                start = time.perf_counter()
                fn()
                times[m].append(time.perf_counter() - start)
        t_rd = statistics.median(times["rd"])
        g_rd = results["rd"][0]
        for m in modes:
            r = results[m]
            if isinstance(r, Exception):
                msg = str(r).splitlines()[0][:80]
                lines.append(f"| {method} | {m} | - | - | - | refused: {msg} |")
                continue
            g, nfe = r
            t = statistics.median(times[m])
            diff = ((g - g_rd).abs().max() / g_rd.abs().max()).item()
            lines.append(
                f"| {method} | {m} | {nfe} | {t * 1e3:.2f} | {t / t_rd:.2f} | {diff:.1e} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    with open(out, "w") as fh:
        fh.write(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
