"""The solver on CUDA: results and gradients match the CPU's for every gradient mode and for each
kind of dynamics (Python, the built-in MLP, TorchScript), per-sample steps and the stiff solvers;
the registered operators pass opcheck on CUDA tensors; a fixed-step solve neither synchronizes
with the host nor resists CUDA graph capture. Skipped without a GPU.

DIFFEQLAYERS_CUDA_TESTS_ON=cpu runs the comparisons with "cpu" in place of "cuda": a check of the
tests' own code on a machine without a GPU (the synchronization and graph tests stay skipped).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import diffeqlayers as dl

DEV = torch.device(os.environ.get("DIFFEQLAYERS_CUDA_TESTS_ON", "cuda"))
HAVE_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(DEV.type == "cuda" and not HAVE_CUDA, reason="no CUDA device")
needs_cuda = pytest.mark.skipif(
    DEV.type != "cuda" or not HAVE_CUDA, reason="needs a CUDA device itself"
)
ops = torch.ops.diffeqlayers
F64 = torch.float64
# CPU and CUDA take the same steps; their results differ by the rounding of reductions (matrix
# products, norms) carried through the solve, far below these.
CLOSE = dict(rtol=1e-7, atol=1e-9)
SENSEALGS = ["rd", "fd", "interpolating", "backsolve", "discrete"]


def lotka_volterra(u, p, t):
    x, y = u[..., 0], u[..., 1]
    return torch.stack([p[0] * x - p[1] * x * y, -p[2] * y + p[3] * x * y], dim=-1)


def vdp(u, p, t):
    x, v = u[..., 0], u[..., 1]
    return torch.stack([v, p * (1 - x * x) * v - x], dim=-1)


def assert_all_close(cpu, dev):
    assert len(cpu) == len(dev)
    for a, b in zip(cpu, dev):
        assert b.device.type == DEV.type
        torch.testing.assert_close(b.cpu(), a, **CLOSE)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8", "rk4"])
def test_cuda_matches_cpu(method):
    kw = {"dt": 0.01} if not dl.tableau(method).adaptive else {"rtol": 1e-9, "atol": 1e-9}
    results = []
    for device in ("cpu", DEV):
        p = torch.tensor([1.5, 1.0, 3.0, 1.0], dtype=F64, device=device)
        p.requires_grad_(True)
        u0 = torch.tensor([[1.0, 1.0], [0.5, 2.0]], dtype=F64, device=device)
        prob = dl.ODEProblem(lotka_volterra, u0, (0.0, 3.0), p)
        sol = dl.solve(prob, method, saveat=0.25, dense=True, **kw)
        sol.u.sum().backward()
        results.append(([sol.u.detach(), p.grad, sol(1.3).detach()], sol.stats.nfe))
    (cpu, nfe_cpu), (dev, nfe_dev) = results
    assert nfe_cpu == nfe_dev
    assert_all_close(cpu, dev)


def test_cuda_float32_neural_ode_trains():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    net = net.to(DEV)
    u0 = torch.randn(8, 2, device=DEV)
    prob = dl.ODEProblem(lambda u, p, t: net(u), u0, (0.0, 1.0), net)
    out = dl.diffeq_rd(net, lambda s: s.u[-1], prob, "tsit5", rtol=1e-5, atol=1e-6)
    out.pow(2).mean().backward()
    assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in net.parameters())


# ----------------------------------------------------------------------------------------------
# The registered operators on CUDA tensors
# ----------------------------------------------------------------------------------------------


def _terms(shape, dtype, n, requires_grad=False):
    g = torch.Generator().manual_seed(5)
    return [
        torch.randn(shape, generator=g, dtype=dtype).to(DEV).requires_grad_(requires_grad)
        for _ in range(n)
    ]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_on_cuda(dtype, requires_grad):
    y, *ks = _terms((4, 5), dtype, 4, requires_grad)
    torch.library.opcheck(ops.lincomb.default, (y, ks, [0.5, -1.25, 2.0], 0.1))
    torch.library.opcheck(ops.lincomb.default, (None, ks, [0.5, -1.25, 2.0], 0.1))
    y0, y1, *ks = _terms((2, 3, 4), dtype, 5, requires_grad)
    torch.library.opcheck(ops.error_norm.default, (ks, [0.1, -0.3, 0.2], 0.05, y0, y1, 1e-3, 1e-2))
    if not requires_grad:
        y, *ks = _terms((4, 5), dtype, 3)
        out = torch.empty((4, 5), dtype=dtype, device=DEV)
        torch.library.opcheck(ops.lincomb_into.default, (y, ks, [0.5, -1.25], 0.1), {"out": out})


def test_ops_values_match_cpu():
    y, *ks = _terms((3, 7), F64, 4)
    w, h = [0.5, -1.25, 2.0], 0.1
    cpu = [t.cpu() for t in (y, *ks)]
    assert_all_close(
        [
            ops.lincomb(cpu[0], cpu[1:], w, h),
            ops.error_norm(cpu[1:], w, h, cpu[0], cpu[1], 1e-3, 1e-2),
        ],
        [ops.lincomb(y, ks, w, h), ops.error_norm(ks, w, h, y, ks[0], 1e-3, 1e-2)],
    )


# ----------------------------------------------------------------------------------------------
# Every gradient mode and every kind of dynamics
# ----------------------------------------------------------------------------------------------


def _neural_ode_grads(module, x, sensealg):
    ts = torch.linspace(0.0, 1.0, 5, dtype=F64)
    out = dl.neural_ode(
        module, x, (0.0, 1.0), "tsit5", saveat=ts, sensealg=sensealg, rtol=1e-9, atol=1e-11
    )
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=F64, device=out.device).reshape(out.shape)
    loss = (w * out.sin()).sum()
    return [out.detach(), *torch.autograd.grad(loss, [x, *module.parameters()])]


def _on_both(module_cpu):
    """(module on the CPU, an independent copy on DEV, x on each requiring grad)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, dtype=F64, generator=g)
    return (
        (module_cpu, x.clone().requires_grad_()),
        (copy.deepcopy(module_cpu).to(DEV), x.to(DEV).requires_grad_()),
    )


class TimeField(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(y)) * torch.cos(t)


@pytest.mark.parametrize("sensealg", SENSEALGS)
def test_python_module_every_mode_matches_cpu(sensealg):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    (mc, xc), (md, xd) = _on_both(net)
    assert_all_close(_neural_ode_grads(mc, xc, sensealg), _neural_ode_grads(md, xd, sensealg))


@pytest.mark.parametrize("sensealg", SENSEALGS)
def test_builtin_mlp_every_mode_matches_cpu(sensealg):
    torch.manual_seed(0)
    mlp = dl.MLP([2, 16, 16, 2], "tanh").double()
    (mc, xc), (md, xd) = _on_both(mlp)
    assert_all_close(_neural_ode_grads(mc, xc, sensealg), _neural_ode_grads(md, xd, sensealg))


@pytest.mark.parametrize("sensealg", ["rd", "fd", "interpolating"])
def test_torchscript_module_matches_cpu(sensealg):
    torch.manual_seed(0)
    eager = TimeField().double()
    (_, xc), (md, xd) = _on_both(eager)
    cpu = _neural_ode_grads(torch.jit.script(eager), xc, sensealg)
    assert_all_close(cpu, _neural_ode_grads(torch.jit.script(md), xd, sensealg))


def test_per_sample_steps_match_cpu():
    mu = torch.tensor([0.5, 2.0, 8.0], dtype=F64)
    u0 = torch.tensor([[2.0, 0.0], [1.0, -1.0], [0.5, 0.5]], dtype=F64)
    kw = dict(saveat=torch.linspace(0.0, 3.0, 7, dtype=F64), rtol=1e-8, atol=1e-8)
    out = []
    for device in ("cpu", DEV):
        p = mu.to(device).unsqueeze(-1).requires_grad_()
        prob = dl.ODEProblem(lambda u, p, t: vdp(u, p[..., 0], t), u0.to(device), (0.0, 3.0), p)
        sol = dl.solve(prob, "tsit5", per_sample=True, **kw)
        (grad,) = torch.autograd.grad(sol.u.pow(2).sum(), p)
        out.append((sol.u.detach(), grad, sol.sample_stats.naccept.cpu()))
    (u_c, g_c, n_c), (u_d, g_d, n_d) = out
    assert torch.equal(n_c, n_d) and len(set(n_c.tolist())) > 1  # the samples' own steps
    assert_all_close([u_c, g_c], [u_d, g_d])


@pytest.mark.parametrize("method", ["rosenbrock23", "rodas5", "radau5", "kvaerno5", "kencarp4"])
def test_stiff_methods_match_cpu(method):
    # Van der Pol at mu = 100 (stiff) over a relaxation phase, with the gradient by reverse mode.
    out = []
    for device in ("cpu", DEV):
        mu = torch.tensor(100.0, dtype=F64, device=device, requires_grad=True)
        u0 = torch.tensor([2.0, 0.0], dtype=F64, device=device)
        prob = dl.ODEProblem(vdp, u0, (0.0, 50.0), mu)
        sol = dl.solve(prob, method, saveat=10.0, rtol=1e-6, atol=1e-8)
        (grad,) = torch.autograd.grad(sol.u[-1].sum(), mu)
        out.append(([sol.u.detach(), grad], sol.stats.naccept))
    (cpu, acc_c), (dev, acc_d) = out
    assert acc_c == acc_d
    assert_all_close(cpu, dev)


def test_no_grad_buffers_equal_recorded_solve():
    p = torch.tensor([1.5, 1.0, 3.0, 1.0], dtype=F64, device=DEV)
    u0 = torch.tensor([[1.0, 1.0], [0.5, 2.0]], dtype=F64, device=DEV)
    kw = dict(saveat=0.5, rtol=1e-7, atol=1e-9)
    with torch.no_grad():
        plain = dl.solve(dl.ODEProblem(lotka_volterra, u0, (0.0, 3.0), p), "tsit5", **kw)
    u0g = u0.clone().requires_grad_()
    recorded = dl.solve(dl.ODEProblem(lotka_volterra, u0g, (0.0, 3.0), p), "tsit5", **kw)
    assert torch.equal(plain.u, recorded.u.detach()) and plain.stats.nfe == recorded.stats.nfe


# ----------------------------------------------------------------------------------------------
# Host synchronization and CUDA graphs
# ----------------------------------------------------------------------------------------------


def _fixed_step_problem(mlp=False):
    """128 states through a 2 -> 64 -> 2 tanh network: a Python f, or the built-in MLP."""
    torch.manual_seed(3)
    u0 = torch.rand(128, 2, device=DEV)
    if mlp:
        net = dl.MLP([2, 64, 2], "tanh").to(DEV)
        return dl.ODEProblem(net, u0, (0.0, 1.0), net)
    net = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 2)).to(DEV)
    return dl.ODEProblem(lambda u, p, t: net(u), u0, (0.0, 1.0))


FIXED_KW = dict(dt=0.01, check_finite=False, save_start=False)


@needs_cuda
@pytest.mark.parametrize("mlp", [False, True], ids=["python_f", "builtin_mlp"])
def test_fixed_step_solve_does_not_synchronize(mlp):
    prob = _fixed_step_problem(mlp)
    with torch.no_grad():
        expected = dl.solve(prob, "rk4", **FIXED_KW).u
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            u = dl.solve(prob, "rk4", **FIXED_KW).u
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert torch.equal(u, expected)


@needs_cuda
def test_fixed_step_solve_replays_as_a_cuda_graph():
    prob = _fixed_step_problem()

    def run():
        with torch.no_grad():
            return dl.solve(prob, "rk4", **FIXED_KW).u

    expected = run()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run()
    with torch.no_grad():
        prob.u0.copy_(torch.rand_like(prob.u0))  # new input in the captured buffer
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, run(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(static_out, expected)
