"""GPU benchmark: the solver on CUDA against torchdiffeq (and torchode, when installed).

Run by ``benchmarks/gpu_check.sh`` on a machine with a CUDA GPU; without one it says so and
exits. Every time is wall time with ``torch.cuda.synchronize()`` before and after, median of
``--repeats`` runs taken round-robin across the contenders after a warm-up.

1. torchode's Van der Pol batch on the GPU: mu = 2, t in [0, 10], 200 save points, dopri5,
   rtol = atol = 1e-5, float32, forward only, batches of 256 and 4096: diffeqlayers with one
   shared step and with ``per_sample=True``, torchdiffeq, torchode. Loop time per iteration =
   (total - time in f) / iterations, f timed by a wrapper that synchronizes around its body (so
   the totals of these rows include those synchronizations; the loop time is the comparable
   figure).
2. The compute-bound neural ODE: Linear(2, 512) -> tanh -> Linear(512, 2), batch 4096, dopri5
   at rtol 1e-5 on [0, 1], 11 save points, float32: a forward solve (no grad) and a training
   step (diffeq_rd: forward and backward), with the network as a Python nn.Sequential and as
   the built-in ``dl.MLP``, and torchdiffeq. Overhead = (solve - nfe x one f call) / solve,
   one f call timed alone (synchronized, mean of 50).
3. CUDA graphs: a fixed-step rk4 solve (dt = 0.01, the compute-bound network, no grad)
   captured with ``torch.cuda.graph`` and replayed, against the same solve run eagerly; the
   capture's error is reported when it fails (a host synchronization inside the solve makes
   it fail).
4. Host synchronizations: the blocking CUDA runtime calls, scalar reads and kernel launches of
   one no-grad solve, counted by torch.profiler, per loop iteration (adaptive: one
   accept/reject decision per attempted step; fixed steps with check_finite=False: none).

    python benchmarks/bench_gpu.py [--repeats 10] [--out PATH]
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

try:
    import torchdiffeq
except ImportError:  # optional peer
    torchdiffeq = None
try:
    import torchode
except ImportError:  # optional peer
    torchode = None

MU = 2.0
DEVICE = torch.device("cuda")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def medians(fns: list[Callable[[], Any]], repeats: int) -> list[float]:
    """Median synchronized wall time of each function, round-robin after one warm-up each."""
    for fn in fns:
        fn()
    sync()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(b) for b in times]


class TimedF:
    """Wraps f: counts calls and sums the synchronized time spent in its body."""

    def __init__(self, body: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.body = body
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        sync()
        start = time.perf_counter()
        y = self.body(u)
        sync()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return y


def vdp(u: torch.Tensor) -> torch.Tensor:
    x, v = u[..., 0], u[..., 1]
    return torch.stack([v, MU * (1 - x * x) * v - x], dim=-1)


def bench_vdp(batch: int, repeats: int) -> list[dict[str, Any]]:
    dev = DEVICE
    gen = torch.Generator().manual_seed(0)
    u0 = (torch.rand(batch, 2, generator=gen) * 4 - 2).to(dev)
    t = torch.linspace(0.0, 10.0, 200, device=dev)
    tol = dict(rtol=1e-5, atol=1e-5)
    timer = TimedF(vdp)
    out: dict[str, Any] = {}

    def ours(per_sample: bool) -> Callable[[], Any]:
        prob = dl.ODEProblem(lambda u, p, tt: timer(u), u0, (0.0, 10.0))

        def run() -> None:
            with torch.no_grad():
                sol = dl.solve(prob, "dopri5", saveat=t, per_sample=per_sample, **tol)
            s = sol.stats
            out["iters"] = (
                sol.sample_stats.iterations if per_sample else s.naccept + s.nreject,
                s.nfe,
            )

        return run

    contenders: list[tuple[str, Callable[[], Any]]] = [
        ("diffeqlayers, shared step", ours(False)),
        ("diffeqlayers, per sample", ours(True)),
    ]
    if torchdiffeq is not None:

        def tdq() -> None:
            with torch.no_grad():
                torchdiffeq.odeint(lambda tt, u: timer(u), u0, t, method="dopri5", **tol)
            out["iters"] = (None, timer.calls)

        contenders.append(("torchdiffeq", tdq))
    if torchode is not None:
        term = torchode.ODETerm(lambda tt, u: timer(u))
        solver = torchode.AutoDiffAdjoint(
            torchode.Dopri5(term=term), torchode.IntegralController(term=term, **tol)
        )
        t_eval = t.expand(batch, -1)

        def to_run() -> None:
            with torch.no_grad():
                sol = solver.solve(torchode.InitialValueProblem(y0=u0, t_eval=t_eval))
            out["iters"] = (int(sol.stats["n_steps"].max()), timer.calls)

        contenders.append(("torchode", to_run))
    rows = []
    for name, fn in contenders:
        timer.seconds, timer.calls = 0.0, 0
        fn()
        iters, nfe = out["iters"]
        total = medians([fn], repeats)[0]
        # One more run for the time in f (medians() ran the function repeats + 1 times).
        timer.seconds, timer.calls = 0.0, 0
        fn()
        in_f = timer.seconds
        loop = (total - in_f) / iters if iters else None
        rows.append(
            dict(
                case=f"Van der Pol, batch {batch}",
                lib=name,
                iters=iters,
                nfe=nfe,
                total=total,
                in_f=in_f,
                loop=loop,
            )
        )
    return rows


def bench_compute_bound(repeats: int, skip_mlp: bool = False) -> list[dict[str, Any]]:
    dev = DEVICE
    torch.manual_seed(1)
    mlp = dl.MLP([2, 512, 2], "tanh").to(dev)
    net = nn.Sequential(nn.Linear(2, 512), nn.Tanh(), nn.Linear(512, 2)).to(dev)
    with torch.no_grad():
        for lin, twin in zip(mlp.layers, (net[0], net[2])):
            twin.weight.copy_(lin.weight)
            twin.bias.copy_(lin.bias)
    u0 = (torch.rand(4096, 2, generator=torch.Generator().manual_seed(2)) * 2 - 1).to(dev)
    t = torch.linspace(0.0, 1.0, 11, device=dev)
    tol = dict(rtol=1e-5, atol=1e-7)
    target = torch.zeros(11, 4096, 2, device=dev)
    rows = []
    kinds = [("Python f", net, lambda u, p, tt: net(u)), ("C++ MLP", mlp, mlp)]
    for kind, module, f in kinds[:1] if skip_mlp else kinds:
        prob = dl.ODEProblem(f, u0, (0.0, 1.0), module)
        box: dict[str, Any] = {}

        def forward(prob: dl.ODEProblem = prob, box: dict[str, Any] = box) -> None:
            with torch.no_grad():
                box["nfe"] = dl.solve(prob, "dopri5", saveat=t, **tol).stats.nfe

        def train(prob: dl.ODEProblem = prob, module: nn.Module = module) -> None:
            module.zero_grad()
            pred = dl.diffeq_rd(module, lambda s: s.u, prob, "dopri5", saveat=t, **tol)
            ((pred - target) ** 2).mean().backward()

        forward()
        nfe = box["nfe"]
        x = u0.clone()
        with torch.no_grad():
            for _ in range(5):
                module(x)
            sync()
            start = time.perf_counter()
            for _ in range(50):
                module(x)
            sync()
        one_f = (time.perf_counter() - start) / 50
        t_fwd, t_train = medians([forward, train], repeats)
        rows.append(
            dict(
                case="compute-bound forward",
                lib=f"diffeqlayers, {kind}",
                nfe=nfe,
                total=t_fwd,
                overhead=(t_fwd - nfe * one_f) / t_fwd,
                one_f=one_f,
            )
        )
        rows.append(
            dict(
                case="compute-bound training step",
                lib=f"diffeqlayers, {kind}",
                nfe=nfe,
                total=t_train,
                overhead=None,
                one_f=one_f,
            )
        )
    if torchdiffeq is not None:
        calls = [0]

        def f_tdq(tt: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            return net(u)

        def tdq_forward() -> None:
            with torch.no_grad():
                torchdiffeq.odeint(f_tdq, u0, t, method="dopri5", **tol)

        def tdq_train() -> None:
            net.zero_grad()
            pred = torchdiffeq.odeint(f_tdq, u0, t, method="dopri5", **tol)
            ((pred - target) ** 2).mean().backward()

        calls[0] = 0
        tdq_forward()
        nfe = calls[0]
        t_fwd, t_train = medians([tdq_forward, tdq_train], repeats)
        rows.append(
            dict(
                case="compute-bound forward",
                lib="torchdiffeq",
                nfe=nfe,
                total=t_fwd,
                overhead=None,
                one_f=None,
            )
        )
        rows.append(
            dict(
                case="compute-bound training step",
                lib="torchdiffeq",
                nfe=nfe,
                total=t_train,
                overhead=None,
                one_f=None,
            )
        )
    return rows


def bench_graph(repeats: int) -> dict[str, Any]:
    print("CUDA graph ...", flush=True)
    dev = DEVICE
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(2, 512), nn.Tanh(), nn.Linear(512, 2)).to(dev)
    static_u0 = torch.rand(4096, 2, device=dev)
    prob = dl.ODEProblem(lambda u, p, tt: net(u), static_u0, (0.0, 1.0))
    kw = dict(dt=0.01, check_finite=False, save_start=False)

    def eager() -> torch.Tensor:
        with torch.no_grad():
            return dl.solve(prob, "rk4", **kw).u

    reference = eager()
    result: dict[str, Any] = dict(eager=medians([eager], repeats)[0])
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                eager()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = eager()
        graph.replay()
        sync()
        result["max_diff"] = (static_out - reference).abs().max().item()
        result["replay"] = medians([graph.replay], repeats)[0]
    except Exception as e:  # the capture's failure is the result
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    return result


SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
LAUNCH_EVENTS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def count_syncs(fn: Callable[[], Any]) -> dict[str, int]:
    """Runs fn once under the profiler: the host synchronizations it made (CUDA runtime calls
    that block the host), its kernel launches and its scalar reads of tensors
    (aten::_local_scalar_dense, .item())."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    activities = [ProfilerActivity.CPU]
    if DEVICE.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        fn()
        sync()
    counts = {"sync": 0, "item": 0, "launch": 0}
    for ev in prof.events():
        if ev.name in SYNC_EVENTS:
            counts["sync"] += 1
        elif ev.name in LAUNCH_EVENTS:
            counts["launch"] += 1
        elif ev.name == "aten::_local_scalar_dense":
            counts["item"] += 1
    counts["sync"] -= 1 if DEVICE.type == "cuda" else 0  # the sync() above
    return counts


def bench_syncs() -> list[dict[str, Any]]:
    """Host synchronizations per step of a no-grad solve: the adaptive shared-step and
    per-sample loops (one per attempted step is the accept/reject decision) and the fixed-step
    loop with check_finite=False (none)."""
    print("synchronizations ...", flush=True)
    gen = torch.Generator().manual_seed(0)
    u0 = (torch.rand(256, 2, generator=gen) * 4 - 2).to(DEVICE)
    t = torch.linspace(0.0, 10.0, 200)
    prob = dl.ODEProblem(lambda u, p, tt: vdp(u), u0, (0.0, 10.0))
    rows = []
    cases = [
        ("dopri5, adaptive, shared step", dict(saveat=t, rtol=1e-5, atol=1e-5)),
        ("dopri5, adaptive, per sample", dict(saveat=t, rtol=1e-5, atol=1e-5, per_sample=True)),
        ("rk4, dt = 0.01, check_finite=False", dict(dt=0.01, check_finite=False)),
        ("rk4, dt = 0.01, check_finite=True", dict(dt=0.01)),
    ]
    for name, kw in cases:
        method = "rk4" if "dt" in kw else "dopri5"
        box: dict[str, Any] = {}

        def run(kw: dict[str, Any] = kw, method: str = method, box: dict[str, Any] = box) -> None:
            with torch.no_grad():
                box["sol"] = dl.solve(prob, method, **kw)

        run()  # warm-up
        counts = count_syncs(run)
        sol = box["sol"]
        if kw.get("per_sample"):
            iters = sol.sample_stats.iterations
        else:
            iters = sol.stats.naccept + sol.stats.nreject
        rows.append(dict(case=name, iters=iters, **counts))
    return rows


def fmt_ms(x: Any) -> str:
    return "-" if x is None else f"{x * 1e3:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--device",
        default="cuda",
        help="cuda (default); cpu runs the same code paths as a smoke test (no graph capture)",
    )
    parser.add_argument("--batches", default="256,4096", help="Van der Pol batch sizes")
    parser.add_argument("--skip-mlp", action="store_true", help="leave out the C++ MLP rows")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device: nothing to benchmark")
        return
    out = args.out or os.path.join(os.path.dirname(__file__), "results", "gpu.md")
    lines = [
        "# GPU: diffeqlayers on CUDA against torchdiffeq and torchode",
        "",
        f"Command: `python benchmarks/bench_gpu.py {' '.join(sys.argv[1:])}`  ",
        f"{torch.cuda.get_device_name(0) if DEVICE.type == 'cuda' else 'CPU (smoke test)'}, "
        f"torch {torch.__version__} (CUDA {torch.version.cuda}),"
        f" Python {platform.python_version()}; median of {args.repeats} runs, round-robin, "
        "synchronized wall time.",
        "",
        "## 1. Van der Pol batch (forward, f timed inside with synchronization)",
        "",
        "| case | library | iterations | nfe | total (ms) | in f (ms) | loop per iteration (ms) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for batch in (int(b) for b in args.batches.split(",")):
        print(f"Van der Pol, batch {batch} ...", flush=True)
        for r in bench_vdp(batch, args.repeats):
            lines.append(
                f"| {r['case']} | {r['lib']} | {r['iters'] if r['iters'] else '?'} | {r['nfe']} |"
                f" {fmt_ms(r['total'])} | {fmt_ms(r['in_f'])} | {fmt_ms(r['loop'])} |"
            )
    print("compute-bound ...", flush=True)
    lines += [
        "",
        "## 2. Compute-bound neural ODE (batch 4096, width 512, dopri5 at 1e-5)",
        "",
        "| case | library | nfe | time (ms) | one f (ms) | overhead |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in bench_compute_bound(args.repeats, args.skip_mlp):
        ov = "-" if r["overhead"] is None else f"{r['overhead']:.1%}"
        lines.append(
            f"| {r['case']} | {r['lib']} | {r['nfe']} | {fmt_ms(r['total'])} |"
            f" {fmt_ms(r['one_f'])} | {ov} |"
        )
    g = (
        bench_graph(args.repeats)
        if DEVICE.type == "cuda"
        else {"eager": None, "error": "not on CUDA"}
    )
    lines += ["", "## 3. CUDA graph capture of a fixed-step rk4 solve (100 steps, no grad)", ""]
    if "error" in g:
        lines.append(f"Eager {fmt_ms(g['eager'])} ms; capture failed: `{g['error']}`")
    else:
        lines.append(
            f"Eager {fmt_ms(g['eager'])} ms, graph replay {fmt_ms(g['replay'])} ms "
            f"(max difference from eager {g['max_diff']:.2e})"
        )
    lines += [
        "",
        "## 4. Host synchronizations per solve (no grad, Van der Pol batch 256, profiler count)",
        "",
        "Blocking CUDA runtime calls (" + ", ".join(SYNC_EVENTS) + "), scalar reads "
        "(aten::_local_scalar_dense) and kernel launches (f's included) during one solve, "
        "against its loop iterations.",
        "",
        "| solve | iterations | synchronizations | per iteration | scalar reads "
        "| kernel launches per iteration |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in bench_syncs():
        lines.append(
            f"| {r['case']} | {r['iters']} | {r['sync']} | {r['sync'] / max(r['iters'], 1):.2f} |"
            f" {r['item']} | {r['launch'] / max(r['iters'], 1):.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    with open(out, "w") as fh:
        fh.write(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
