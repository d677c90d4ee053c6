"""Fused operators benchmark (issue 7, item 2): the solver's overhead on inference solves with
two builds of diffeqlayers, and the per-call cost of torch.ops.diffeqlayers.lincomb and
.error_norm against the ATen op sequences they replace.

1. Overhead of an inference solve (grad off), (solve time - nfe x time of one f call) / solve
   time, for a small neural ODE: the C++ MLP (dl.MLP) and the same network as a Python f, on
   the foundation problem (Linear(2, 50) -> tanh -> Linear(50, 2), float32, dopri5, rtol 1e-5,
   atol 1e-7, saved every 0.1 on [0, 10]) and DiffEqFlux's spiral (u^3 input, tsit5, rtol 1e-3,
      atol 1e-6, 30 save points on [0, 1.5]), each also with a batch of 64 states. Each variant
   (--variant LABEL=DIR[:VAR=VALUE], DIR a folder holding the package `diffeqlayers`, VAR an
   environment variable to set) runs in its own subprocess, since two builds cannot be
   imported into one process; the variants alternate round after round (--rounds), and each
   case's time is the median over all rounds' repeats. DIFFEQLAYERS_BENCH_UNFUSED=1 makes a
   build run its loop as before the fused operators (no buffer reuse, the error norm as ATen
   ops, the unrecorded combination called directly instead of through the dispatcher).
2. Per call, timed in C++ (an inline extension calling the operators through the dispatcher,
   so Python's call overhead is not counted): lincomb (fresh result, and into a buffer) against
   ATen's add/add_ sequence, error_norm against the ATen sequence (combination, abs, maximum,
   mul_, add_, div_, linalg_vector_norm, div), at several state sizes, float32.

        python benchmarks/bench_fused_ops.py --variant before=PKG:DIFFEQLAYERS_BENCH_UNFUSED=1 \
        --variant after=PKG [--rounds 5] [--repeats 10] [--out PATH]

Writes a markdown table (default benchmarks/results/fused_ops.md) with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

CASES = ["foundation", "foundation x64", "spiral", "spiral x64"]


# ----------------------------------------------------------------------------------------------
# 1. Worker: one round of the overhead measurement with whatever diffeqlayers is importable.
# ----------------------------------------------------------------------------------------------


def worker(repeats: int) -> None:
    import torch
    from torch import nn

    import diffeqlayers as dl
    from diffeqlayers import _C

    torch.set_num_threads(1)
    torch.manual_seed(0)

    def net_and_mlp(power: int) -> tuple[dl.MLP, nn.Sequential]:
        mlp = dl.MLP([2, 50, 2], "tanh", input_power=power)
        net = nn.Sequential(nn.Linear(2, 50), nn.Tanh(), nn.Linear(50, 2))
        with torch.no_grad():
            net[0].weight.copy_(mlp.layers[0].weight)
            net[0].bias.copy_(mlp.layers[0].bias)
            net[2].weight.copy_(mlp.layers[1].weight)
            net[2].bias.copy_(mlp.layers[1].bias)
        return mlp, net

    lv_mlp, lv_net = net_and_mlp(1)
    sp_mlp, sp_net = net_and_mlp(3)
    g = torch.Generator().manual_seed(1)
    lv_u0 = torch.tensor([1.0, 1.0])
    sp_u0 = torch.tensor([2.0, 0.0])
    problems = {
        "foundation": (
            lv_mlp,
            lv_net,
            1,
            lv_u0,
            (0.0, 10.0),
            torch.linspace(0, 10, 101),
            "dopri5",
            dict(rtol=1e-5, atol=1e-7),
        ),
        "foundation x64": (
            lv_mlp,
            lv_net,
            1,
            lv_u0 + 0.1 * torch.rand(64, 2, generator=g),
            (0.0, 10.0),
            torch.linspace(0, 10, 101),
            "dopri5",
            dict(rtol=1e-5, atol=1e-7),
        ),
        "spiral": (
            sp_mlp,
            sp_net,
            3,
            sp_u0,
            (0.0, 1.5),
            torch.linspace(0, 1.5, 30),
            "tsit5",
            dict(rtol=1e-3, atol=1e-6),
        ),
        "spiral x64": (
            sp_mlp,
            sp_net,
            3,
            sp_u0 + 0.1 * torch.rand(64, 2, generator=g),
            (0.0, 1.5),
            torch.linspace(0, 1.5, 30),
            "tsit5",
            dict(rtol=1e-3, atol=1e-6),
        ),
    }
    result = {}
    for name, (mlp, net, power, u0, span, t, method, tol) in problems.items():

        def f_py(u, p, t, net=net, power=power):
            return net(u**power if power != 1 else u)

        for impl, f, module in (("Python f", f_py, net), ("C++ MLP", mlp, mlp)):
            prob = dl.ODEProblem(f, u0, span, module)

            def solve(prob=prob, method=method, t=t, tol=tol):
                with torch.no_grad():
                    return dl.solve(prob, method, saveat=t, **tol)

            nfe = solve().stats.nfe
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                solve()
                times.append(time.perf_counter() - start)
            with torch.no_grad():
                if impl == "Python f":
                    n = 500
                    start = time.perf_counter()
                    for _ in range(n):
                        f_py(u0, None, 0.5)
                    t_f = (time.perf_counter() - start) / n
                else:
                    t_f = _C._time_dynamics(mlp.dynamics(), 0.5, u0, 2000)
            result[f"{name}|{impl}"] = dict(nfe=nfe, solves=times, f=t_f)
    print(json.dumps(result))


def overhead(pkgs: dict[str, str], rounds: int, repeats: int) -> dict:
    """pkgs: label -> DIR[:VAR=VALUE]."""
    acc: dict[str, dict] = {label: {} for label in pkgs}
    for r in range(rounds):
        order = list(pkgs.items()) if r % 2 == 0 else list(reversed(pkgs.items()))
        for label, spec in order:
            path, _, setting = spec.partition(":")
            env = dict(os.environ, PYTHONPATH=path)
            env.pop("DIFFEQLAYERS_BENCH_UNFUSED", None)
            if setting:
                var, _, value = setting.partition("=")
                env[var] = value
            out = subprocess.run(
                [sys.executable, __file__, "--worker", "--repeats", str(repeats)],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            res = json.loads(out.strip().splitlines()[-1])
            for key, v in res.items():
                slot = acc[label].setdefault(key, dict(nfe=v["nfe"], solves=[], f=[]))
                assert slot["nfe"] == v["nfe"], (label, key, slot["nfe"], v["nfe"])
                slot["solves"] += v["solves"]
                slot["f"].append(v["f"])
            print(f"round {r + 1}/{rounds}: {label} done", flush=True)
    return acc


# ----------------------------------------------------------------------------------------------
# 2. Per-call cost in C++.
# ----------------------------------------------------------------------------------------------

CPP = r"""
#include <torch/extension.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <chrono>

using Opt = std::optional<at::Tensor>;
using W = at::ArrayRef<double>;
using LinCombFn = at::Tensor(const Opt&, at::TensorList, W, double);
using LinCombIntoFn = void(const Opt&, at::TensorList, W, double, const at::Tensor&);
using ErrorNormFn =
    at::Tensor(at::TensorList, W, double, const at::Tensor&, const at::Tensor&, double, double);

template <typename F> double per_call(F&& fn, int64_t n) {
  for (int i = 0; i < 10; ++i) fn();
  auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < n; ++i) fn();
  std::chrono::duration<double> dt = std::chrono::steady_clock::now() - start;
  return dt.count() / n;
}

// y + sum_j (h w_j) k_j: the operator, the operator into a buffer, and ATen's add/add_.
std::vector<double> time_lincomb(at::Tensor y, std::vector<at::Tensor> ks, std::vector<double> w,
                                 double h, int64_t n) {
  at::NoGradGuard g;
  auto& d = c10::Dispatcher::singleton();
  auto op = d.findSchemaOrThrow("diffeqlayers::lincomb", "").typed<LinCombFn>();
    auto op_into = d.findSchemaOrThrow("diffeqlayers::lincomb_into", "").typed<LinCombIntoFn>();
  at::Tensor buf = at::empty_like(y);
  std::optional<at::Tensor> yo = y;
  double t_op = per_call([&] { return op.call(yo, ks, w, h); }, n);
    double t_out = per_call([&] { op_into.call(yo, ks, w, h, buf); return 0; }, n);
  double t_aten = per_call([&] {
    at::Tensor out = at::add(y, ks[0], h * w[0]);
    for (size_t j = 1; j < ks.size(); ++j) out.add_(ks[j], h * w[j]);
    return out;
  }, n);
  return {t_op, t_out, t_aten};
}

// The RMS error norm: the operator against the ATen sequence the solver ran before.
std::vector<double> time_error_norm(std::vector<at::Tensor> ks, std::vector<double> w, double h,
                                    at::Tensor y0, at::Tensor y1, double atol, double rtol,
                                    int64_t n) {
  at::NoGradGuard g;
  auto& d = c10::Dispatcher::singleton();
  auto op = d.findSchemaOrThrow("diffeqlayers::error_norm", "").typed<ErrorNormFn>();
  double t_op = per_call([&] { return op.call(ks, w, h, y0, y1, atol, rtol).item<double>(); }, n);
  double t_aten = per_call([&] {
    at::Tensor err = at::mul(ks[0], h * w[0]);
    for (size_t j = 1; j < ks.size(); ++j) err.add_(ks[j], h * w[j]);
    at::Tensor scale = at::maximum(y0.abs(), y1.abs()).mul_(rtol).add_(atol);
    at::Tensor s = err.div_(scale);
    return (at::linalg_vector_norm(s, 2) / std::sqrt(double(s.numel()))).item<double>();
  }, n);
  return {t_op, t_aten};
}
"""


def per_call_costs() -> list[dict]:
    import torch
    from torch.utils.cpp_extension import load_inline

    import diffeqlayers  # noqa: F401  (registers the operators)

    torch.set_num_threads(1)
    ext = load_inline("bench_fused_ops_ext", CPP, functions=["time_lincomb", "time_error_norm"])
    rows = []
    g = torch.Generator().manual_seed(0)
    # dopri5's last stage combination (6 stages with a nonzero weight) and error weights (6).
    w = [35 / 384, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.1]
    we = [71 / 57600, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40]
    for numel in (2, 128, 4096, 100_000):
        n = 20000 if numel <= 4096 else 500
        y0, y1, *ks = [torch.randn(numel, generator=g) for _ in range(8)]
        lc = ext.time_lincomb(y0, ks[:6], w, 0.01, n)
        en = ext.time_error_norm(ks[:6], we, 0.01, y0, y1, 1e-7, 1e-5, n)
        rows.append(
            dict(numel=numel, op=lc[0], op_out=lc[1], aten=lc[2], en_op=en[0], en_aten=en[1])
        )
    return rows


# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=DIR[:VAR=VAL]")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-per-call", action="store_true")
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "fused_ops.md")
    )
    args = parser.parse_args()
    if args.worker:
        worker(args.repeats)
        return
    pkgs = dict(p.split("=", 1) for p in args.variant)
    lines = [
        "# Fused operators: solver overhead and per-call cost",
        "",
        "Command: `python benchmarks/bench_fused_ops.py " + " ".join(sys.argv[1:]) + "`  ",
        f"Python {platform.python_version()}, {platform.machine()}, 1 thread; a shared "
        "machine (other jobs running), so absolute times are noisy: compare within a table.",
        "",
    ]
    if pkgs:
        acc = overhead(pkgs, args.rounds, args.repeats)
        labels = list(pkgs)
        lines += [
            "## Overhead of an inference solve (grad off)",
            "",
            "(solve - nfe x f) / solve; builds alternate round-robin in subprocesses, "
            f"{args.rounds} rounds x {args.repeats} solves, median.",
            "",
            "| case | f | nfe | "
            + " | ".join(f"{lb} solve (ms)" for lb in labels)
            + " | "
            + " | ".join(f"{lb} overhead" for lb in labels)
            + " | "
            + f"{labels[-1]} / {labels[0]} time |",
            "|---|---|---:|" + "---:|" * (2 * len(labels) + 1),
        ]
        for case in CASES:
            for impl in ("C++ MLP", "Python f"):
                key = f"{case}|{impl}"
                solve = [statistics.median(acc[lb][key]["solves"]) for lb in labels]
                f = statistics.median([x for lb in labels for x in acc[lb][key]["f"]])
                nfe = acc[labels[0]][key]["nfe"]
                ov = [(s - nfe * f) / s for s in solve]
                lines.append(
                    f"| {case} | {impl} | {nfe} | "
                    + " | ".join(f"{1e3 * s:.3f}" for s in solve)
                    + " | "
                    + " | ".join(f"{o:.0%}" for o in ov)
                    + f" | {solve[-1] / solve[0]:.2f} |"
                )
        lines.append("")
    if not args.skip_per_call:
        rows = per_call_costs()
        lines += [
            "## Per call, timed in C++ (float32, 6 stages, no grad)",
            "",
            "| numel | lincomb op (us) | lincomb_into (us) | ATen add/add_ (us) | "
            "error_norm op (us) | ATen error norm (us) | norm: ATen / op |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['numel']} | {1e6 * r['op']:.2f} | {1e6 * r['op_out']:.2f} | "
                f"{1e6 * r['aten']:.2f} | {1e6 * r['en_op']:.2f} | {1e6 * r['en_aten']:.2f} | "
                f"{r['en_aten'] / r['en_op']:.1f} |"
            )
        lines.append("")
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
