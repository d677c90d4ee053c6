"""ROBER (Robertson's chemical kinetics), the classic stiff problem, solved with rodas5 to
t = 1e11 on a log time axis; an explicit method (tsit5) on the same problem runs out of steps at
a tiny t, and the figure marks where.

    y1' = -0.04 y1 + 1e4 y2 y3
    y2' =  0.04 y1 - 1e4 y2 y3 - 3e7 y2^2
    y3' =  3e7 y2^2,                  y(0) = (1, 0, 0)

    python examples/rober.py [--out rober.png]
"""

from __future__ import annotations

import argparse
import math

import torch

import diffeqlayers as dl

K1, K2, K3 = 0.04, 3e7, 1e4


def rober(u, p, t):
    y1, y2, y3 = u[0], u[1], u[2]
    return torch.stack([-K1 * y1 + K3 * y2 * y3, K1 * y1 - K3 * y2 * y3 - K2 * y2**2, K2 * y2**2])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="rober.png")
    ap.add_argument("--explicit-steps", type=int, default=5000)
    args = ap.parse_args()

    prob = dl.ODEProblem(rober, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), (0.0, 1e11))
    times = torch.logspace(-6, 11, 120, dtype=torch.float64)
    sol = dl.solve(prob, "rodas5", rtol=1e-8, atol=1e-14, saveat=times)
    print(f"rodas5: y(1e11) = {sol.u[-1].tolist()}, {sol.stats}")

    explicit = dl.solve(
        prob,
        "tsit5",
        rtol=1e-6,
        atol=1e-10,
        max_num_steps=args.explicit_steps,
        throw_on_failure=False,
    )
    t_fail = explicit.t[-1].item()
    print(f"tsit5: {explicit.retcode} after {explicit.stats.naccept} steps at t = {t_fail:.3g}")
    print(f"  {explicit.message}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    u = sol.u.detach()
    scale = [1.0, 1e4, 1.0]
    for i, label in enumerate(["y1", "y2 x 1e4", "y3"]):
        ax.semilogx(sol.t, u[:, i] * scale[i], label=f"{label} (rodas5)")
    ax.axvline(max(t_fail, 1e-6), color="k", ls="--", lw=1)
    ax.text(
        max(t_fail, 1e-6) * 1.5,
        0.5,
        f"tsit5 stops here\n({explicit.stats.naccept} steps, t = {t_fail:.2g})",
        fontsize=8,
    )
    ax.set_xlabel("t")
    ax.set_title("ROBER: rodas5 to t = 1e11; an explicit method exhausts its steps")
    ax.legend(loc="center left")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    assert math.isclose(u[-1].sum().item(), 1.0, abs_tol=1e-8)


if __name__ == "__main__":
    main()
