"""Fit the Lotka-Volterra parameters so that the populations stay at 1 (the seed's first example).

The ODE solve is the whole "network": p -> x(t) on t = 0, 0.1, ..., 10 for
x' = p0 x - p1 x y, y' = -p2 y + p3 x y, u0 = [1, 1], starting from p = [2.2, 1.0, 2.0, 0.4].
The loss is sum_t (x(t) - 1)^2 and Adam (lr 0.1) minimises it for 100 iterations, once with
each gradient mode (reverse mode through the solver, diffeq_rd, and forward mode, diffeq_fd).
The loss is zero exactly when both populations are constant 1 (p0 = p1 and p2 = p3).

Prints the loss every few iterations, the final p, how far the fitted populations are from 1
and the time per mode; writes lv_fit_trajectory.png and lv_fit_loss.png.

    python examples/lotka_volterra_fit.py                    # both modes, 100 iterations each
    python examples/lotka_volterra_fit.py --sensealg rd      # one mode
    python examples/lotka_volterra_fit.py --iters 5          # a quick smoke run
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import DEFAULT_OUT_DIR, lotka_volterra, pyplot, save_figure, should_report

import diffeqlayers as dl

# The gradient modes to compare, by name (they share one signature).
SENSEALGS: dict[str, Callable[..., Any]] = {
    "rd": dl.diffeq_rd,
    "fd": dl.diffeq_fd,
    "adjoint": dl.diffeq_adjoint,
}

P0 = (2.2, 1.0, 2.0, 0.4)
U0 = (1.0, 1.0)
TSPAN = (0.0, 10.0)
SAVEAT = 0.1
SOLVE_KW: dict[str, Any] = dict(saveat=SAVEAT, rtol=1e-7, atol=1e-9)


def make_problem() -> dl.ODEProblem:
    return dl.ODEProblem(
        lotka_volterra,
        torch.tensor(U0, dtype=torch.float64),
        TSPAN,
        torch.tensor(P0, dtype=torch.float64),
    )


def fmt(p: torch.Tensor, digits: int = 4) -> str:
    return "[" + ", ".join(f"{v:.{digits}f}" for v in p.tolist()) + "]"


def prey_loss(sol: dl.Solution) -> torch.Tensor:
    """The reduction: sum over the saved times of (x(t) - 1)^2, x the first component."""
    return ((sol.u[:, 0] - 1.0) ** 2).sum()


def fit(
    name: str, prob: dl.ODEProblem, iters: int, lr: float, print_every: int
) -> tuple[torch.Tensor, list[float], float]:
    """Adam on p with gradient mode ``name``; returns the final p, the losses and the seconds."""
    grad_fn = SENSEALGS[name]
    p = torch.tensor(P0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([p], lr=lr)
    losses: list[float] = []
    start = time.perf_counter()
    for it in range(1, iters + 1):
        loss = grad_fn(p, prey_loss, prob, "tsit5", **SOLVE_KW)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if should_report(it, iters, print_every):
            print(f"[{name}] iter {it:4d}  loss {loss.item():.6e}", flush=True)
    seconds = time.perf_counter() - start
    return p.detach().clone(), losses, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=100, help="Adam iterations per mode")
    parser.add_argument("--lr", type=float, default=0.1, help="Adam learning rate")
    parser.add_argument(
        "--sensealg",
        nargs="+",
        choices=list(SENSEALGS),
        default=list(SENSEALGS),
        help="gradient modes to run, one fit each (default: all)",
    )
    parser.add_argument("--print-every", type=int, default=10, help="print the loss every N")
    parser.add_argument("--out", default=DEFAULT_OUT_DIR, help="folder for the PNGs")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a 2-vector ODE: threads only add overhead

    prob = make_problem()
    with torch.no_grad():
        initial = prey_loss(dl.solve(prob, "tsit5", **SOLVE_KW)).item()
    print(f"initial p = {list(P0)}, loss {initial:.6e}")

    results: dict[str, tuple[torch.Tensor, list[float], float, dl.Solution]] = {}
    for name in args.sensealg:
        p, losses, seconds = fit(name, prob, args.iters, args.lr, args.print_every)
        with torch.no_grad():
            sol = dl.solve(dl.remake(prob, p=p), "tsit5", **SOLVE_KW)
        results[name] = (p, losses, seconds, sol)
        dev = (sol.u - 1.0).abs().max().item()
        print(f"[{name}] final loss {prey_loss(sol).item():.6e}  p = {fmt(p)}")
        print(f"[{name}] max |u(t) - 1| over [0, 10] (x and y): {dev:.3e}")
        print(
            f"[{name}] time: {seconds:.2f} s for {args.iters} iterations "
            f"({1e3 * seconds / max(1, args.iters):.1f} ms per iteration)"
        )

    print("time per mode: " + ", ".join(f"{n} {r[2]:.2f} s" for n, r in results.items()))

    plt = pyplot()
    if plt is None:
        return
    # The fitted trajectory of each mode, with the starting one for contrast.
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    with torch.no_grad():
        start_sol = dl.solve(prob, "tsit5", **SOLVE_KW)
    for ax, (name, (p, _, _, sol)) in zip(axes[0], results.items()):
        for i, (label, color) in enumerate((("prey x", "tab:blue"), ("predator y", "tab:red"))):
            ax.plot(
                start_sol.t,
                start_sol.u[:, i],
                ":",
                color=color,
                alpha=0.6,
                label=f"{label}, initial p",
            )
            ax.plot(sol.t, sol.u[:, i], "-", color=color, lw=2, label=f"{label}, fitted p")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_ylim(0, 6)
        ax.set_xlabel("t")
        ax.set_ylabel("population")
        ax.set_title(f"{name}: p = {fmt(p, 2)}")
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle("Lotka-Volterra fitted so that the populations stay at 1")
    save_figure(fig, args.out, "lv_fit_trajectory.png")

    fig, ax = plt.subplots(figsize=(6.5, 4))
    # The modes compute the same gradient up to rounding, so their curves may coincide: dashes
    # of different lengths keep each one visible.
    styles = ["-", "--", ":", "-."]
    for k, (name, (_, losses, seconds, _)) in enumerate(results.items()):
        ax.semilogy(
            range(1, len(losses) + 1),
            losses,
            styles[k % len(styles)],
            lw=2.5 - 0.5 * (k % 3),
            label=f"{name} ({seconds:.1f} s)",
        )
    ax.set_xlabel("Adam iteration")
    ax.set_ylabel("loss  sum (x(t) - 1)^2")
    ax.set_title(f"Loss per gradient mode (Adam, lr {args.lr:g})")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, args.out, "lv_fit_loss.png")


if __name__ == "__main__":
    main()
