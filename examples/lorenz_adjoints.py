"""Why checkpointing matters: the three adjoints on the Lorenz system (the seed's argument).

Lorenz (sigma = 10, rho = 28, beta = 8/3), u0 = [1, 0, 0], loss = sum of u(T). For T in
{1, 5, 20} the gradient of the loss with respect to u0 is computed by each adjoint of
diffeqlayers (interpolating with checkpoints, backsolve, discrete checkpointed) and by reverse
mode through the solver at the same tolerance, and compared with a reference: reverse mode at a
tight tolerance with dopri8, itself checked against float64 central finite differences.

The backsolve adjoint solves u backwards from u(T) together with the adjoint; on a chaotic
system that backward solve diverges from the forward trajectory, and its gradient with it. The
last part shows that directly: solving from u(T) back to t = 0 does not return to u0.

    python examples/lorenz_adjoints.py            # writes examples/out/lorenz_adjoints.{md,png}
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Optional

import torch

import diffeqlayers as dl

SIGMA, RHO, BETA = 10.0, 28.0, 8.0 / 3.0
U0 = [1.0, 0.0, 0.0]


def lorenz(u: torch.Tensor, p: torch.Tensor, t: float) -> torch.Tensor:
    x, y, z = u[0], u[1], u[2]
    return torch.stack([p[0] * (y - x), x * (p[1] - z) - y, x * y - p[2] * z])


def problem(T: float) -> tuple[dl.ODEProblem, torch.Tensor]:
    p = torch.tensor([SIGMA, RHO, BETA], dtype=torch.float64)
    return dl.ODEProblem(lorenz, torch.tensor(U0, dtype=torch.float64), (0.0, T), p), p


def gradient(
    T: float, mode: str, rtol: float, solver: str = "tsit5", max_steps: int = 10**6
) -> tuple[Optional[torch.Tensor], int]:
    """d sum(u(T)) / d u0 by one gradient mode: (gradient, backward nfe or -1); (None, -1) when
    the backward solve failed."""
    prob, p = problem(T)
    u0 = torch.tensor(U0, dtype=torch.float64, requires_grad=True)
    keep: list[dl.Solution] = []

    def reduction(sol: dl.Solution) -> torch.Tensor:
        keep.append(sol)
        return sol.u[-1].sum()

    # The step budget also bounds the backward solves: backsolve's backward solve of u diverges
    # from the trajectory on long spans, and then needs ever smaller steps (or overflows).
    kw = dict(u0=u0, saveat=[T], rtol=rtol, atol=rtol, max_num_steps=max_steps)
    if mode == "rd":
        loss = dl.diffeq_rd(p, reduction, prob, solver, **kw)
    else:
        loss = dl.diffeq_adjoint(p, reduction, prob, solver, sensealg=mode, **kw)
    try:
        (g,) = torch.autograd.grad(loss, u0)
    except RuntimeError as err:  # a failed backward solve surfaces from autograd as RuntimeError
        if "backward solve" not in str(err):
            raise
        print(f"    ({mode}: {str(err)[:200]}...)")
        return None, -1
    stats = keep[0].adjoint_stats
    return g, (stats.nfe if stats is not None else -1)


def finite_difference(T: float, rtol: float, eps: float) -> torch.Tensor:
    """Central differences of sum(u(T)) in each component of u0 (dopri8, tight tolerance)."""
    prob, _ = problem(T)
    out = torch.empty(3, dtype=torch.float64)
    with torch.no_grad():
        for i in range(3):
            vals = []
            for sign in (1.0, -1.0):
                u0 = torch.tensor(U0, dtype=torch.float64)
                u0[i] += sign * eps
                sol = dl.solve(prob, "dopri8", u0=u0, saveat=[T], rtol=rtol, atol=rtol,
                               max_num_steps=10**6)  # fmt: skip
                vals.append(float(sol.u[-1].sum()))
            out[i] = (vals[0] - vals[1]) / (2 * eps)
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=float, nargs="+", default=[1.0, 5.0, 20.0])
    ap.add_argument("--rtol", type=float, default=1e-8, help="tolerance of the compared modes")
    ap.add_argument("--ref-rtol", type=float, default=1e-13, help="tolerance of the reference")
    ap.add_argument("--max-steps", type=int, default=10000,
                    help="step budget of each solve, forward and backward")  # fmt: skip
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)

    modes = ["interpolating", "backsolve", "discrete", "rd"]
    rows, errors = [], {m: [] for m in modes}
    for T in args.T:
        t_start = time.perf_counter()
        ref, _ = gradient(T, "rd", args.ref_rtol, "dopri8", max_steps=10**6)
        fd = finite_difference(T, args.ref_rtol, eps=1e-6)
        print(f"T = {T:g}: reference dL/du0 = {ref.tolist()}  (vs finite differences: "
              f"{rel(ref, fd):.1e} relative)")  # fmt: skip
        row = {"T": T, "ref": ref, "fd": rel(ref, fd)}
        for m in modes:
            g, nfe = gradient(T, m, args.rtol, max_steps=args.max_steps)
            err = rel(g, ref) if g is not None else math.inf
            errors[m].append(err)
            row[m] = (err, nfe)
            print(f"  {m:>13}: relative error {err:.2e}" + (f"  (backward nfe {nfe})" if nfe >= 0
                                                              else ""))  # fmt: skip
        rows.append(row)
        print(f"  ({time.perf_counter() - t_start:.1f} s)")

    # Solving the reversed problem: from u(T) back to t = 0.
    back = []
    for T in args.T:
        prob, p = problem(T)
        uT = dl.solve(prob, "tsit5", saveat=[T], rtol=args.rtol, atol=args.rtol).u[-1]
        rev = dl.ODEProblem(lorenz, uT, (T, 0.0), p)
        sol = dl.solve(rev, "tsit5", rtol=args.rtol, atol=args.rtol, max_num_steps=args.max_steps,
                       throw_on_failure=False)  # fmt: skip
        err = float((sol.u[-1] - torch.tensor(U0, dtype=torch.float64)).norm())
        back.append((T, err, sol))
        print(f"T = {T:g}: solving back from u(T) to t = 0 misses u0 by {err:.2e}")

    lines = [
        f"# Lorenz: gradient of sum(u(T)) w.r.t. u0, tsit5 at rtol = atol = {args.rtol:g}",
        "",
        f"Reference: reverse mode through dopri8 at rtol = atol = {args.ref_rtol:g}; its "
        "agreement with float64 central finite differences (eps = 1e-6) is in the second "
        "column. Entries: relative error of each mode against the reference (backward nfe).",
        "",
        "| T | reference vs FD | interpolating | backsolve | discrete | diffeq_rd |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            "failed" if math.isinf(r[m][0])
            else f"{r[m][0]:.1e} ({r[m][1]})" if r[m][1] >= 0 else f"{r[m][0]:.1e}"
            for m in modes
        ]  # fmt: skip
        lines.append(f"| {r['T']:g} | {r['fd']:.1e} | " + " | ".join(cells) + " |")
    lines += ["", "Solving the reversed problem from u(T) to t = 0 (tsit5, same tolerance):", "",
              "| T | distance of the result from u0 |", "|---|---|"]  # fmt: skip
    lines += [f"| {T:g} | {err:.2e} |" for T, err, _ in back]
    md = os.path.join(args.out, "lorenz_adjoints.md")
    with open(md, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {md}")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.2
    xs = range(len(args.T))
    for i, m in enumerate(modes):
        # A failed backward solve is drawn as a bar at 1 (100% error) with a hatch.
        vals = [e if math.isfinite(e) else 1.0 for e in errors[m]]
        bars = ax1.bar([x + (i - 1.5) * width for x in xs], vals, width, label=m)
        for bar, e in zip(bars, errors[m]):
            if not math.isfinite(e):
                bar.set_hatch("//")
    ax1.set_yscale("log")
    ax1.set_xticks(list(xs), [f"T = {T:g}" for T in args.T])
    ax1.set_ylabel("relative error of dL/du0")
    ax1.set_title(f"Lorenz, tsit5 at tolerance {args.rtol:g} (hatched: failed)")
    ax1.legend()
    T, err, sol = back[-1]
    prob, _ = problem(T)
    fwd = dl.solve(prob, "tsit5", saveat=T / 2000, rtol=args.rtol, atol=args.rtol)
    ax2.plot(fwd.t, fwd.u[:, 0], label="forward from u0")
    ax2.plot(sol.t, sol.u[:, 0], "--", label="backward from u(T)")
    lo, hi = float(fwd.u[:, 0].min()), float(fwd.u[:, 0].max())
    ax2.set_ylim(lo - 0.5 * (hi - lo), hi + 0.5 * (hi - lo))
    if sol.t.numel() and float(sol.t[-1]) != 0.0:
        ax2.axvline(float(sol.t[-1]), color="C1", lw=0.8, ls=":")
        ax2.text(float(sol.t[-1]), hi, f" backward solve\n failed at t={float(sol.t[-1]):.2f}",
                 color="C1", va="top")  # fmt: skip
    ax2.set_xlabel("t")
    ax2.set_ylabel("x(t)")
    ax2.set_title(f"Solving back from u({T:g}) does not retrace the trajectory")
    ax2.legend()
    fig.tight_layout()
    png = os.path.join(args.out, "lorenz_adjoints.png")
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
