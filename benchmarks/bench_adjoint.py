"""Memory and backward time of the adjoints, against reverse mode and torchdiffeq's adjoint.

The problem is the foundation's neural ODE (Linear(2, 50) -> tanh -> Linear(50, 2), float32,
a batch of 64 states), its weights fitted to the Lotka-Volterra vector field (a regression on
the field, no ODE solve) so that the trajectories oscillate and the number of steps grows with
the span. Loss: the sum of squares of u(T).

1. Peak memory against the number of steps (spans chosen for about 1e2, 1e3 and 1e4 accepted
   dopri5 steps at rtol = atol = 1e-6): diffeq_rd and the three adjoints, the interpolating and
   discrete ones also with at most 100 checkpoints ("name:100"). Each configuration
   runs in its own process, and two figures are reported for one forward + backward: the peak
   of the memory allocated on the heap (glibc's mallinfo2, sampled every 2 ms by a thread),
   above its level just before, which counts what the solve holds; and the growth of the
   process's peak resident memory (ru_maxrss), which also counts what the allocator keeps
   after fragmentation.
2. Forward and backward time and nfe against torchdiffeq.odeint_adjoint on the same problem
   (dopri5, same tolerances, the ~1e3-step span), one thread, medians over repeats.

    python benchmarks/bench_adjoint.py   # writes benchmarks/results/adjoint{,_memory}.md, .png
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Optional

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
RTOL = ATOL = 1e-6
BATCH = 64
# "name:C" is the adjoint `name` with at most C checkpoints.
MODES = ["rd", "interpolating", "interpolating:100", "backsolve", "discrete", "discrete:100"]


def lv_field(u: torch.Tensor) -> torch.Tensor:
    x, y = u[..., 0], u[..., 1]
    return torch.stack([1.5 * x - x * y, -3.0 * y + x * y], dim=-1)


def make_model() -> tuple[nn.Module, torch.Tensor]:
    """The demo's network, fitted to the Lotka-Volterra field on [0.2, 5]^2; and a batch of
    initial states around the LV orbit through (1, 1)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 50), nn.Tanh(), nn.Linear(50, 2))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(1500):
        u = 0.2 + 4.8 * torch.rand(256, 2)
        loss = (net(u) - lv_field(u)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x0 = torch.tensor([1.0, 1.0]) + 0.1 * torch.randn(BATCH, 2)
    return net, x0


def rhs(u, p, t):
    return p(u)


def run_dl(net, x0, T, mode, stats=None):
    """One forward + backward with diffeqlayers; returns (forward s, backward s)."""
    import diffeqlayers as dl

    prob = dl.ODEProblem(rhs, x0, (0.0, T), net)
    keep = []

    def red(sol):
        keep.append(sol)
        return sol.u[-1].pow(2).sum()

    kw = dict(saveat=[T], rtol=RTOL, atol=ATOL, max_num_steps=10**6)
    net.zero_grad()
    t0 = time.perf_counter()
    if mode == "rd":
        loss = dl.diffeq_rd(net, red, prob, "dopri5", **kw)
    else:
        name, _, cap = mode.partition(":")
        loss = dl.diffeq_adjoint(net, red, prob, "dopri5", sensealg=name,
                                 checkpoints=int(cap or 0), **kw)  # fmt: skip
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    if stats is not None:
        sol = keep[0]
        stats.update(steps=sol.stats.naccept, nfe_fwd=sol.stats.nfe)
        a = sol.adjoint_stats
        stats.update(nfe_bwd=a.nfe if a is not None else None,
                     bwd_steps=a.naccept if a is not None else None)  # fmt: skip
    return t1 - t0, t2 - t1


class Counted(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.nfe = 0

    def forward(self, t, u):
        self.nfe += 1
        return self.net(u)


def run_tdq(net, x0, T, stats=None):
    import torchdiffeq

    func = Counted(net)
    t = torch.tensor([0.0, T])
    net.zero_grad()
    t0 = time.perf_counter()
    out = torchdiffeq.odeint_adjoint(func, x0, t, rtol=RTOL, atol=ATOL, method="dopri5")
    t1 = time.perf_counter()
    nfe_fwd = func.nfe
    out[-1].pow(2).sum().backward()
    t2 = time.perf_counter()
    if stats is not None:
        stats.update(nfe_fwd=nfe_fwd, nfe_bwd=func.nfe - nfe_fwd)
    return t1 - t0, t2 - t1


def span_for_steps(net, x0, target):
    """The span T whose dopri5 solve takes about `target` accepted steps (bisection)."""
    import diffeqlayers as dl

    def steps(T):
        with torch.no_grad():
            prob = dl.ODEProblem(rhs, x0, (0.0, T), net)
            return dl.solve(prob, "dopri5", saveat=[T], rtol=RTOL, atol=ATOL,
                            max_num_steps=10**6).stats.naccept  # fmt: skip

    lo, hi = 0.1, 1.0
    while steps(hi) < target:
        lo, hi = hi, hi * 2
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if steps(mid) < target else (lo, mid)
        if abs(steps(hi) - target) <= 0.02 * target:
            break
    return hi


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


def heap_in_use() -> Optional[Callable[[], int]]:
    """Bytes allocated through malloc now (glibc >= 2.33), or None where unavailable."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None

    def used() -> int:
        m = libc.mallinfo2()
        return int(m.uordblks + m.hblkhd)

    return used


def child(mode: str, T: float) -> None:
    """Measures one configuration in this (fresh) process and prints JSON."""
    torch.set_num_threads(1)
    net, x0 = make_model()
    # Everything up to here (the fit included) counts as the baseline.
    used = heap_in_use()
    peak, stop = [0], threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], used())
            time.sleep(0.002)

    base = used() if used else 0
    sampler = threading.Thread(target=poll) if used else None
    if sampler:
        sampler.start()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stats = {}
    if mode == "torchdiffeq":
        fwd, bwd = run_tdq(net, x0, T, stats)
    else:
        fwd, bwd = run_dl(net, x0, T, mode, stats)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sampler:
        stop.set()
        sampler.join()
    stats.update(mode=mode, T=T, peak_mib=(after - before) / 1024.0, fwd=fwd, bwd=bwd,
                 heap_mib=(peak[0] - base) / 2**20 if used else None)  # fmt: skip
    print(json.dumps(stats))


def measure(mode, T):
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(T)], capture_output=True,
                         text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs=2, metavar=("MODE", "T"), help=argparse.SUPPRESS)
    ap.add_argument("--targets", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-timing", action="store_true", help="measure memory only")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    if args.child:
        child(args.child[0], float(args.child[1]))
        return
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    net, x0 = make_model()
    spans = {n: span_for_steps(net, x0, n) for n in args.targets}
    print("spans:", {n: round(T, 3) for n, T in spans.items()}, flush=True)

    # 1. Memory.
    mem = []
    for n, T in spans.items():
        for mode in MODES:
            r = measure(mode, T)
            mem.append(r)
            print(f"steps ~{n:>6}: {mode:>17}  heap +{r['heap_mib']:8.2f} MiB  "
                  f"rss +{r['peak_mib']:8.1f} MiB  "
                  f"(steps {r['steps']}, fwd {r['fwd']:.2f} s, bwd {r['bwd']:.2f} s)",
                  flush=True)  # fmt: skip

    header = (
        f"`{' '.join(['python', 'benchmarks/bench_adjoint.py', *sys.argv[1:]])}` (torch "
        f"{torch.__version__}, one thread). Neural ODE Linear(2,50)-tanh-Linear(50,2), float32, "
        f"batch {BATCH}, dopri5, rtol = atol = {RTOL:g}, loss = sum u(T)^2."
    )
    lines = ["# Adjoints: peak memory against the number of steps", "", header, ""]
    for key, title in (
        ("heap_mib", "Peak heap memory in use above the level before the solve (MiB, mallinfo2)"),
        ("peak_mib", "Growth of the process's peak resident memory (MiB, ru_maxrss)"),
    ):
        lines += [f"### {title}", "", "| steps | " + " | ".join(MODES) + " |",
                  "|---|" + "---|" * len(MODES)]  # fmt: skip
        for n in spans:
            rs = {r["mode"]: r for r in mem if r["T"] == spans[n]}
            cells = [f"{rs[m][key]:.2f}" if rs[m][key] is not None else "-" for m in MODES]
            lines.append(f"| {rs['rd']['steps']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("![memory](adjoint_memory.png)")
    path = os.path.join(args.out, "adjoint_memory.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")
    plot_memory(mem, os.path.join(args.out, "adjoint_memory.png"))
    if args.skip_timing:
        return

    # 2. Time against torchdiffeq.odeint_adjoint, on the middle span.
    T = spans[sorted(spans)[len(spans) // 2]]
    timing = {}
    try:
        import torchdiffeq  # noqa: F401

        have_tdq = True
    except ImportError:
        have_tdq = False
        print("torchdiffeq is not installed: no comparison")
    runners = {m: (lambda m=m, s=None: run_dl(net, x0, T, m, s)) for m in MODES if m != "rd"}
    if have_tdq:
        runners["torchdiffeq"] = lambda s=None: run_tdq(net, x0, T, s)
    for name, fn in runners.items():  # warm up, and collect nfe
        st = {}
        fn(s=st)
        timing[name] = {"stats": st, "fwd": [], "bwd": []}
    for _ in range(args.repeats):  # round robin
        for name, fn in runners.items():
            f, b = fn()
            timing[name]["fwd"].append(f)
            timing[name]["bwd"].append(b)
    lines = [
        "# Adjoints: backward time against torchdiffeq.odeint_adjoint",
        "",
        header,
        "",
        f"T = {T:.3g} (about {sorted(spans)[len(spans) // 2]} steps), medians of "
        f"{args.repeats} round-robin repeats.",
        "",
        "| method | forward ms | backward ms | forward nfe | backward nfe | backward speed-up vs "
        "torchdiffeq |",
        "|---|---|---|---|---|---|",
    ]
    ref = statistics.median(timing["torchdiffeq"]["bwd"]) if have_tdq else None
    for name, tm in timing.items():
        f = statistics.median(tm["fwd"]) * 1e3
        b = statistics.median(tm["bwd"]) * 1e3
        st = tm["stats"]
        ratio = f"{ref * 1e3 / b:.2f}x" if ref else "-"
        lines.append(f"| {name} | {f:.1f} | {b:.1f} | {st.get('nfe_fwd')} | {st.get('nfe_bwd')} "
                     f"| {ratio} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    path = os.path.join(args.out, "adjoint.md")
    with open(path, "w") as fh:
        fh.write(text)
    print(text)
    print(f"wrote {path}")


def plot_memory(mem: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m in MODES:
        rs = sorted((r for r in mem if r["mode"] == m), key=lambda r: r["steps"])
        if rs and rs[0]["heap_mib"] is not None:
            ax.plot([r["steps"] for r in rs], [max(r["heap_mib"], 0.01) for r in rs], "o-",
                    label=m)  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("accepted steps")
    ax.set_ylabel("peak heap memory above baseline (MiB)")
    ax.set_title("Neural ODE: memory of one gradient")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
