"""Foundation benchmark: diffeqlayers against torchdiffeq on the seed's problems, one run.

1. Lotka-Volterra (x' = 1.5x - xy, y' = -3y + xy, u0 = [1, 1], t in [0, 10], saved every 0.1),
   dopri5, rtol 1e-6, atol 1e-9, float64: one solve.
2. One training step of the demo's neural ODE (Linear(2, 50) -> tanh -> Linear(50, 2), f in
   Python, float32, saved every 0.1 on [0, 10], MSE loss): forward and backward, reverse mode
   through the solver (diffeq_rd here, torchdiffeq.odeint there), dopri5 on both (torchdiffeq
   0.2.5 has no tsit5), plus tsit5 for diffeqlayers alone.

Same f body, method, tolerances and thread count on both sides; each time is the median of
repeated runs after a warm-up. Writes a markdown table (benchmarks/results/foundation.md by
default) with the command that produced it.

    python benchmarks/bench_foundation.py [--repeats 30] [--threads 1] [--out PATH]
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
from torch import nn

import diffeqlayers as dl

try:
    import torchdiffeq
except ImportError:  # pragma: no cover - the benchmark needs its peer
    sys.exit("torchdiffeq is not installed: pip install torchdiffeq==0.2.5")


class Counter:
    """Counts calls of f (nfe), identically on both sides."""

    def __init__(self) -> None:
        self.n = 0


def median_times(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median wall time of each function, timed round-robin so that drift in the machine's
    speed (other processes, frequency changes) affects every contender alike."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(b) for b in times]


def bench_lotka_volterra(repeats: int) -> list[dict]:
    calls = Counter()

    def f_dl(u: torch.Tensor, p: object, t: float) -> torch.Tensor:
        calls.n += 1
        x, y = u[0], u[1]
        return torch.stack([1.5 * x - x * y, -3.0 * y + x * y])

    def f_tdq(t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        calls.n += 1
        x, y = u[0], u[1]
        return torch.stack([1.5 * x - x * y, -3.0 * y + x * y])

    u0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    t = torch.linspace(0.0, 10.0, 101, dtype=torch.float64)
    prob = dl.ODEProblem(f_dl, u0, (0.0, 10.0))
    tol = dict(rtol=1e-6, atol=1e-9)

    def run_dl() -> torch.Tensor:
        return dl.solve(prob, "dopri5", saveat=t, **tol).u

    def run_tdq() -> torch.Tensor:
        return torchdiffeq.odeint(f_tdq, u0, t, method="dopri5", **tol)

    reference = dl.solve(prob, "dopri8", saveat=t, rtol=1e-13, atol=1e-13).u
    contenders = (("diffeqlayers", run_dl), ("torchdiffeq", run_tdq))
    rows = []
    for name, fn in contenders:
        calls.n = 0
        err = (fn() - reference).abs().max().item()
        rows.append(
            dict(
                case="LV solve",
                lib=name,
                method="dopri5",
                nfe=calls.n,
                note=f"max error vs reference {err:.1e}",
            )
        )
    for row, seconds in zip(rows, median_times([fn for _, fn in contenders], repeats)):
        row["time"] = seconds
    return rows


def bench_training_step(repeats: int) -> list[dict]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 50), nn.Tanh(), nn.Linear(50, 2))
    calls = Counter()

    def f_dl(u: torch.Tensor, p: object, t: float) -> torch.Tensor:
        calls.n += 1
        return net(u)

    def f_tdq(t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        calls.n += 1
        return net(u)

    t = torch.linspace(0.0, 10.0, 101)
    true = dl.ODEProblem(
        lambda u, p, t: torch.stack([1.5 * u[0] - u[0] * u[1], -3.0 * u[1] + u[0] * u[1]]),
        torch.tensor([1.0, 1.0], dtype=torch.float64),
        (0.0, 10.0),
    )
    data = dl.solve(true, "dopri5", saveat=t.double(), rtol=1e-10, atol=1e-10).u.float()
    u0 = torch.tensor([1.0, 1.0])
    prob = dl.ODEProblem(f_dl, u0, (0.0, 10.0), list(net.parameters()))
    tol = dict(rtol=1e-5, atol=1e-7)  # the demo's tolerances

    def step_dl(method: str) -> Callable[[], float]:
        def run() -> float:
            net.zero_grad()
            pred = dl.diffeq_rd(
                list(net.parameters()), lambda s: s.u, prob, method, saveat=t, **tol
            )
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

    contenders = (
        ("diffeqlayers", "dopri5", step_dl("dopri5")),
        ("torchdiffeq", "dopri5", step_tdq),
        ("diffeqlayers", "tsit5", step_dl("tsit5")),
    )
    rows = []
    for name, method, fn in contenders:
        calls.n = 0
        loss = fn()
        rows.append(
            dict(
                case="training step", lib=name, method=method, nfe=calls.n, note=f"loss {loss:.4f}"
            )
        )
    for row, seconds in zip(rows, median_times([c[2] for c in contenders], repeats)):
        row["time"] = seconds
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "foundation.md")
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for bench in (bench_lotka_volterra, bench_training_step):
        print(f"running {bench.__name__} ...", flush=True)
        rows += bench(args.repeats)

    ref = {r["case"]: r["time"] for r in rows if r["lib"] == "torchdiffeq"}
    # nfe of the training step counts the forward solve only (backward re-evaluates nothing).
    lines = [
        "| case | library | method | nfe | time (ms) | speed-up vs torchdiffeq | note |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        speedup = ref[r["case"]] / r["time"]
        lines.append(
            f"| {r['case']} | {r['lib']} | {r['method']} | {r['nfe']} | "
            f"{r['time'] * 1e3:.2f} | {speedup:.2f}x | {r['note']} |"
        )
    command = "python benchmarks/bench_foundation.py " + " ".join(sys.argv[1:])
    header = [
        "# Foundation benchmark: diffeqlayers vs torchdiffeq",
        "",
        f"Command: `{command.strip()}`  ",
        f"torch {torch.__version__}, torchdiffeq {getattr(torchdiffeq, '__version__', '?')}, "
        f"diffeqlayers {dl.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}, {args.threads} thread(s), median of {args.repeats} runs.",
        "",
    ]
    text = "\n".join(header + lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
