"""What a diffeq_rd training step costs beyond f, against eager PyTorch's own floor.

The foundation's small neural ODE (Linear(2, 50) -> tanh -> Linear(50, 2), u0 = [1, 1],
float32, dopri5 on [0, 10] saved every 0.1, rtol 1e-5, atol 1e-7, loss on the last save point,
38 evaluations of f), one thread, timed three ways in one process, round-robin:

- rd: the diffeq_rd training step (forward solve recorded, backward);
- f38 + backward: its 38 calls of f under grad on one input and one backward pass through them
  (f's own cost: what bench_overhead.py's f-cost model charges);
- f38 chained: the same 38 calls chained as an explicit solver chains them, x <- x + 0.01 f(x),
  and one backward: the smallest graph any solver recording f's calls in eager PyTorch makes
  (one product and one sum per call).

    python benchmarks/bench_rd_floor.py [--repeats 15] [--inner 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import diffeqlayers as dl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="rounds (median taken)")
    parser.add_argument("--inner", type=int, default=20, help="calls per timing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 50), nn.Tanh(), nn.Linear(50, 2))
    u0 = torch.tensor([1.0, 1.0])

    def f(u: torch.Tensor, p: object, t: float) -> torch.Tensor:
        return net(u)

    prob = dl.ODEProblem(f, u0, (0.0, 10.0), net)
    saveat = torch.linspace(0, 10, 101)
    target = torch.zeros(2)
    nfe = {}

    def rd() -> None:
        net.zero_grad(set_to_none=True)

        def reduction(sol: dl.Solution) -> torch.Tensor:
            nfe["rd"] = sol.stats.nfe
            return ((sol.u[-1] - target) ** 2).mean()

        loss = dl.diffeq_rd(net, reduction, prob, "dopri5", saveat=saveat, rtol=1e-5, atol=1e-7)
        loss.backward()

    rd()
    n = nfe["rd"]

    def f_alone() -> None:
        net.zero_grad(set_to_none=True)
        ug = u0.clone().requires_grad_()
        outs = [f(ug, None, 0.0) for _ in range(n)]
        torch.autograd.backward(outs, [torch.ones_like(u0)] * n, inputs=[ug, *net.parameters()])

    def f_chained() -> None:
        net.zero_grad(set_to_none=True)
        x = u0.clone().requires_grad_()
        for _ in range(n):
            x = x + 0.01 * f(x, None, 0.0)
        x.sum().backward()

    fns = {"rd": rd, f"f{n} + backward": f_alone, f"f{n} chained": f_chained}
    for fn in fns.values():
        for _ in range(args.inner):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(args.inner):
                fn()
            times[name].append((time.perf_counter() - start) / args.inner)
    base = statistics.median(times[f"f{n} + backward"])
    print(
        f"torch {torch.__version__}, one thread, nfe {n}, median of {args.repeats} x {args.inner}"
    )
    print("| run | time (ms) | beyond f's calls |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {t * 1e3:.3f} | {(t - base) / t:.1%} |")


if __name__ == "__main__":
    main()
