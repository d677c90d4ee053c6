"""Crossover benchmark: gradient time of forward mode (diffeq_fd) against unrolled reverse mode
(diffeq_rd) and the interpolating adjoint (diffeq_adjoint) as the number of parameters grows.
One run of this script.

1. Lotka-Volterra, the 4 parameters (a, b, c, d), u0 = [1, 1], t in [0, 10] saved every 0.1.
2. u' = A u with A n x n (n^2 parameters), n = 2 ... 32, A = -I + 0.5 G / sqrt(n) with G
   standard normal (seeded), u0 = ones / sqrt(n), t in [0, 1] saved every 0.1.

Both: tsit5, rtol 1e-6, atol 1e-9, float64, f in Python, loss = sum of squares of the saved
states, time of loss + backward (the gradient with respect to the parameters only). Each time is
the median of round-robin repeats after a warm-up (fewer repeats for slow cases, see
--budget), once with the modes alternating call by call and once in blocks of consecutive
calls of one mode (the warm steady state of a training loop). Forward mode costs one dual
solve per chunk of 32 parameters (the chunk's directions travel as one batched tangent, see
csrc/sensitivity/forward_mode.cpp), reverse mode one recorded solve plus a backward pass;
forward mode's per-op tangent work grows with the parameter count, so reverse mode wins for
many parameters. The adjoint records nothing in the forward solve and
solves the adjoint ODE backwards: its cost hardly depends on the parameter count, but each
backward stage is a vector-Jacobian product through f.

Writes benchmarks/results/crossover.md (table) and crossover.png (plot) by default:

    python benchmarks/bench_crossover.py [--threads 1] [--nmax 32] [--budget 2.0] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

import diffeqlayers as dl

TOL = {"rtol": 1e-6, "atol": 1e-9}
SIZES = [2, 3, 4, 6, 8, 12, 16, 24, 32]


def median_times(
    fns: list[Callable[[], object]], budget: float, max_repeats: int = 15, block: int = 1
) -> list:
    """Median wall time per call of each function, timed round-robin after a warm-up; repeats
    until ``budget`` seconds are spent (at least once, at most ``max_repeats``). Each timed
    sample is ``block`` consecutive calls of one function (block 1: the functions alternate call
    by call, so each call starts with caches warmed by the others; larger blocks: the steady
    state of a training loop that calls one gradient mode over and over)."""
    start = time.perf_counter()
    for fn in fns:
        fn()  # warm-up
    warm = time.perf_counter() - start
    repeats = max(1, min(max_repeats, int(budget / max(warm * block, 1e-9))))
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            t0 = time.perf_counter()
            for _ in range(block):
                fn()
            bucket.append((time.perf_counter() - t0) / block)
    return [statistics.median(b) for b in times]


def block_size(seconds_per_call: float, target: float = 0.02) -> int:
    """Consecutive calls per timed sample so that a sample lasts about ``target`` seconds."""
    return max(1, min(50, round(target / max(seconds_per_call, 1e-9))))


def gradient_fn(mode: Callable, prob: dl.ODEProblem, p: torch.Tensor, saveat: float):
    """One gradient of sum(u(t_i)^2) with respect to p by the given mode."""

    def run() -> torch.Tensor:
        q = p.detach().clone().requires_grad_()
        loss = mode(q, lambda s: (s.u**2).sum(), prob, "tsit5", saveat=saveat, **TOL)
        loss.backward()
        return q.grad

    return run


def lotka_volterra(u: torch.Tensor, p: torch.Tensor, t: float) -> torch.Tensor:
    x, y = u[0], u[1]
    return torch.stack([p[0] * x - p[1] * x * y, -p[2] * y + p[3] * x * y])


def linear(u: torch.Tensor, a: torch.Tensor, t: float) -> torch.Tensor:
    return a @ u


def cases(nmax: int) -> list[tuple[str, dl.ODEProblem, torch.Tensor, float]]:
    out = []
    p = torch.tensor([1.5, 1.0, 3.0, 1.0], dtype=torch.float64)
    u0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    out.append(("Lotka-Volterra", dl.ODEProblem(lotka_volterra, u0, (0.0, 10.0), p), p, 0.1))
    gen = torch.Generator().manual_seed(0)
    for n in SIZES:
        if n > nmax:
            break
        g = torch.randn(n, n, generator=gen, dtype=torch.float64)
        a = -torch.eye(n, dtype=torch.float64) + 0.5 * g / math.sqrt(n)
        u0 = torch.ones(n, dtype=torch.float64) / math.sqrt(n)
        out.append((f"u' = A u, n={n}", dl.ODEProblem(linear, u0, (0.0, 1.0), a), a, 0.1))
    return out


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lin = [r for r in rows if r["name"].startswith("u'")]
    lv = [r for r in rows if not r["name"].startswith("u'")]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for key, label, color in (
        ("fd", "diffeq_fd (forward)", "C0"),
        ("rd", "diffeq_rd", "C1"),
        ("ad", "interpolating adjoint", "C2"),
    ):
        ax.plot(
            [r["nparams"] for r in lin],
            [r[key] * 1e3 for r in lin],
            "o-",
            color=color,
            label=f"{label}, u' = A u",
        )
        ax.plot(
            [r["nparams"] for r in lv],
            [r[key] * 1e3 for r in lv],
            "s",
            color=color,
            markersize=9,
            label=f"{label}, Lotka-Volterra",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of parameters")
    ax.set_ylabel("gradient time [ms]")
    ax.set_title("Forward mode, reverse mode, adjoint (tsit5, float64, CPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nmax", type=int, default=32, help="largest n of u' = A u")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per case for repeats")
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--out", default=os.path.join(here, "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for name, prob, p, saveat in cases(args.nmax):
        fd_fn = gradient_fn(dl.diffeq_fd, prob, p, saveat)
        rd_fn = gradient_fn(dl.diffeq_rd, prob, p, saveat)
        ad_fn = gradient_fn(dl.diffeq_adjoint, prob, p, saveat)  # interpolating, the default
        g_fd, g_rd, g_ad = fd_fn(), rd_fn(), ad_fn()
        rel = ((g_fd - g_rd).abs().max() / g_rd.abs().max()).item()
        rel_ad = ((g_ad - g_rd).abs().max() / g_rd.abs().max()).item()
        t_fd, t_rd, t_ad = median_times([fd_fn, rd_fn, ad_fn], args.budget)
        block = block_size(min(t_fd, t_rd, t_ad))
        w_fd, w_rd, w_ad = (
            median_times([fd_fn, rd_fn, ad_fn], args.budget, block=block)
            if block > 1
            else (t_fd, t_rd, t_ad)
        )
        steps = dl.solve(prob, "tsit5", saveat=saveat, **TOL).stats
        row = {
            "name": name,
            "nparams": p.numel(),
            "fd": t_fd,
            "rd": t_rd,
            "ad": t_ad,
            "rel": rel,
            "rel_ad": rel_ad,
            "block": block,
            "wfd": w_fd,
            "wrd": w_rd,
            "wad": w_ad,
            "steps": steps.naccept + steps.nreject,
            "nfe": steps.nfe,
        }
        rows.append(row)
        print(
            f"{name:18s} {p.numel():5d} params  fd {t_fd * 1e3:9.2f} ms  rd {t_rd * 1e3:9.2f} ms"
            f"  adjoint {t_ad * 1e3:9.2f} ms  fd/rd {t_fd / t_rd:6.2f}  warm (blocks of {block}):"
            f" fd/rd {w_fd / w_rd:6.2f}  |g_fd - g_rd|/|g| "
            f"{rel:.1e}",
            file=sys.stderr,
        )

    os.makedirs(args.out, exist_ok=True)
    md = os.path.join(args.out, "crossover.md")
    png = os.path.join(args.out, "crossover.png")
    plot(rows, png)
    cmd = "python benchmarks/bench_crossover.py" + (
        "" if sys.argv[1:] == [] else " " + " ".join(sys.argv[1:])
    )
    lines = [
        "# Crossover: forward mode (diffeq_fd), reverse mode (diffeq_rd), interpolating adjoint",
        "",
        f"Command: `{cmd}`",
        "",
        f"torch {torch.__version__}, diffeqlayers {dl.__version__}, Python "
        f"{platform.python_version()}, {platform.machine()}, {args.threads} thread(s). "
        "tsit5, rtol 1e-6, atol 1e-9, float64, f in Python; time of loss + backward, median "
        "of round-robin repeats after a warm-up, timed two ways: the three modes alternating "
        "call by call (columns [ms] and 'fd / rd'), and, where a call takes under 20 ms, "
        "round-robin blocks of consecutive calls of one mode lasting about 20 ms each "
        "('warm': the steady state of a training loop that calls one mode over and over; "
        "'block' calls per sample). The adjoint (diffeq_adjoint, interpolating) "
        "approximates the gradient to the tolerance (last column); fd and rd are exact for the "
        "discretisation.",
        "",
        "| problem | parameters | steps | nfe (plain solve) | diffeq_fd [ms] | diffeq_rd [ms] "
        "| adjoint [ms] | fd / rd | fastest | block | warm fd [ms] | warm rd [ms] "
        "| warm adjoint [ms] | warm fd / rd | warm fastest "
        "| max rel. diff. fd vs rd | adjoint vs rd |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]

    def fastest(r: dict, prefix: str = "") -> str:
        key = min(("fd", "rd", "ad"), key=lambda k: r[prefix + k])
        return key.replace("ad", "adjoint")

    for r in rows:
        lines.append(
            f"| {r['name']} | {r['nparams']} | {r['steps']} | {r['nfe']} | {r['fd'] * 1e3:.2f} "
            f"| {r['rd'] * 1e3:.2f} | {r['ad'] * 1e3:.2f} | {r['fd'] / r['rd']:.2f} | "
            f"{fastest(r)} | {r['block']} | {r['wfd'] * 1e3:.2f} | {r['wrd'] * 1e3:.2f} "
            f"| {r['wad'] * 1e3:.2f} | {r['wfd'] / r['wrd']:.2f} | {fastest(r, 'w')} | "
            f"{r['rel']:.1e} | {r['rel_ad']:.1e} |"
        )
    lines += ["", "![crossover](crossover.png)", ""]
    with open(md, "w") as fh:
        fh.write("\n".join(lines))
    print(f"wrote {md} and {png}", file=sys.stderr)


if __name__ == "__main__":
    main()
