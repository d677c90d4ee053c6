"""A neural ODE learned from irregularly sampled, noisy observations of a spiral.

The system: a damped pendulum, theta' = omega, omega' = -sin(theta) - 0.15 omega, from
(theta, omega) = (2, 0) over t in [0, 15]; its phase portrait is a spiral into the origin.
It is observed at ``--samples`` times drawn uniformly at random and sorted (plus t = 0), with
Gaussian noise. Nothing has to be resampled onto a grid: the random times go to the solver as an
uneven ``saveat`` tensor, and the neural ODE (du/dt = NN(u), NN = Linear(2, 64) -> tanh ->
Linear(64, 2), tsit5, reverse mode) is fitted at exactly those times. Training: Adam on a time
window that grows to the whole span over the first 60% of the iterations.

Prints the loss as it trains, then the error at the observation times and on an even grid of 301
times that were never observed (compared with the noise-free truth); writes
irregular_sampling.png (time series and phase plane: truth, observations, learned model) and
irregular_sampling_loss.png.

    python examples/irregular_sampling.py               # full run
    python examples/irregular_sampling.py --iters 10    # a quick smoke run
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from _common import DEFAULT_OUT_DIR, growing_window, pyplot, save_figure, should_report
from torch import nn

import diffeqlayers as dl

T_END = 15.0
U0 = (2.0, 0.0)
DAMPING = 0.15
SOLVE_KW: dict[str, Any] = dict(rtol=1e-5, atol=1e-7, max_num_steps=20_000)


def pendulum(u: torch.Tensor, p: Any, t: float) -> torch.Tensor:
    """The damped pendulum, (theta, omega)' = (omega, -sin(theta) - DAMPING omega)."""
    theta, omega = u[..., 0], u[..., 1]
    return torch.stack([omega, -torch.sin(theta) - DAMPING * omega], dim=-1)


def truth(t: torch.Tensor) -> torch.Tensor:
    """The noise-free trajectory at the times ``t`` (dopri5, tolerances 1e-10, float64)."""
    prob = dl.ODEProblem(pendulum, torch.tensor(U0, dtype=torch.float64), (0.0, T_END))
    return dl.solve(prob, "dopri5", saveat=t.double(), rtol=1e-10, atol=1e-10).u.float()


def sample_times(n: int, generator: torch.Generator) -> torch.Tensor:
    """t = 0 and ``n`` distinct random times in (0, T_END], sorted: an uneven ``saveat``."""
    t = torch.rand(n, generator=generator, dtype=torch.float64) * T_END
    t = torch.unique(t.clamp_min(1e-3))  # sorted; duplicates (vanishingly unlikely) removed
    return torch.cat([torch.zeros(1, dtype=torch.float64), t]).float()


def predict(net: nn.Module, u0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The neural ODE's trajectory from ``u0`` at the (possibly uneven) times ``t``."""
    return dl.neural_ode(net, u0, (0.0, float(t[-1])), "tsit5", saveat=t, **SOLVE_KW)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=500, help="Adam iterations in total")
    parser.add_argument("--lr", type=float, default=0.01, help="Adam learning rate")
    parser.add_argument("--samples", type=int, default=60, help="number of random times")
    parser.add_argument("--noise", type=float, default=0.02, help="std of the observation noise")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the weights")
    parser.add_argument("--print-every", type=int, default=50, help="print the loss every N")
    parser.add_argument("--out", default=DEFAULT_OUT_DIR, help="folder for the PNGs")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead

    gen = torch.Generator().manual_seed(args.seed)
    t_obs = sample_times(args.samples, gen)
    clean = truth(t_obs)
    obs = clean + args.noise * torch.randn(clean.shape, generator=gen)
    gaps = t_obs.diff()
    print(
        f"{len(t_obs)} observations on [0, {T_END:g}]: gaps between {gaps.min().item():.3f} and "
        f"{gaps.max().item():.3f} (mean {gaps.mean().item():.3f}), noise std {args.noise:g}"
    )

    net = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 2))
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    windows = [3.0, 6.0, 9.0, 12.0, T_END]
    losses: list[float] = []
    start = time.perf_counter()
    for it in range(1, args.iters + 1):
        window = growing_window(it, args.iters, windows)
        n = int((t_obs <= window).sum())
        pred = predict(net, obs[0], t_obs[:n])
        loss = ((pred - obs[:n]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if should_report(it, args.iters, args.print_every):
            print(
                f"iter {it:5d}  window [0, {window:4.1f}] ({n:3d} observations)  "
                f"loss {loss.item():.6f}  ({time.perf_counter() - start:6.1f} s)",
                flush=True,
            )
    print(f"training time: {time.perf_counter() - start:.1f} s for {args.iters} iterations")

    t_grid = torch.linspace(0.0, T_END, 301)
    with torch.no_grad():
        fit_obs = predict(net, obs[0], t_obs)
        fit_grid = predict(net, obs[0], t_grid)
        true_grid = truth(t_grid)
    mse_obs = ((fit_obs - obs) ** 2).mean().item()
    mse_clean = ((fit_obs - clean) ** 2).mean().item()
    mse_grid = ((fit_grid - true_grid) ** 2).mean().item()
    print(f"final loss at the observation times (vs noisy data): {mse_obs:.6f}")
    print(
        f"mse vs the noise-free truth: at the observation times {mse_clean:.6f}, "
        f"on an even grid of {len(t_grid)} unobserved times {mse_grid:.6f}"
    )

    plt = pyplot()
    if plt is None:
        return
    fig, (ax_t, ax_p) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for i, (name, color) in enumerate((("theta", "tab:blue"), ("omega", "tab:red"))):
        ax_t.plot(t_grid, true_grid[:, i], "-", color=color, lw=3, alpha=0.3, label=f"true {name}")
        ax_t.plot(t_obs, obs[:, i], "o", ms=4, color=color, label=f"observed {name}")
        ax_t.plot(t_grid, fit_grid[:, i], "--", color=color, label=f"neural ODE {name}")
    ymin = ax_t.get_ylim()[0]
    ax_t.plot(t_obs, torch.full_like(t_obs, ymin), "|", color="black", ms=10, label="sample times")
    ax_t.set_xlabel("t")
    ax_t.set_title(f"{len(t_obs)} random observation times; MSE on an even grid {mse_grid:.1e}")
    ax_t.legend(ncol=2, fontsize=8)
    ax_p.plot(
        true_grid[:, 0], true_grid[:, 1], "-", color="tab:green", lw=3, alpha=0.4, label="true"
    )
    ax_p.plot(obs[:, 0], obs[:, 1], "o", ms=4, color="gray", label="observations")
    ax_p.plot(fit_grid[:, 0], fit_grid[:, 1], "--", color="black", label="neural ODE")
    ax_p.set_xlabel("theta")
    ax_p.set_ylabel("omega")
    ax_p.set_title("Phase plane: a damped pendulum's spiral")
    ax_p.legend(fontsize=8)
    save_figure(fig, args.out, "irregular_sampling.png")

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.semilogy(range(1, len(losses) + 1), losses, lw=1)
    ax.set_xlabel("Adam iteration")
    ax.set_ylabel("mean squared error (current window)")
    ax.set_title("Training loss on irregular samples (window grows to the whole span)")
    ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, args.out, "irregular_sampling_loss.png")


if __name__ == "__main__":
    main()
