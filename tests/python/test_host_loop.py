"""The host loop (csrc/integrate/host_rk.cpp): small CPU solves of the built-in MLP that record
no gradient run on plain arrays, and the discrete adjoint reverses their steps there; so do
small solves of any f given as tensors (a Python f) with grad mode off, f called on a copy of
each stage. They must take the tensor loop's steps exactly and give the same values; the tensor
loop is reached here through the same MLP called from Python with the host loop switched off
(_C._set_host_loop)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import diffeqlayers as dl
from diffeqlayers import _C

EXPLICIT = ["euler", "rk4", "heun3", "adaptive_heun", "fehlberg2", "bosh3", "dopri5", "tsit5"]
FIXED = {"euler", "rk4", "heun3"}


def mlp_and_state(dtype: torch.dtype) -> tuple[dl.MLP, torch.Tensor]:
    torch.manual_seed(3)
    mlp = dl.MLP([2, 16, 2], "tanh").to(dtype)
    u0 = torch.tensor([[1.0, 0.5], [0.2, -0.3], [-0.7, 0.9]], dtype=dtype)
    return mlp, u0


@contextlib.contextmanager
def tensor_loop_only():
    _C._set_host_loop(False)
    try:
        yield
    finally:
        _C._set_host_loop(True)


def both(mlp: dl.MLP, u0: torch.Tensor, span, method: str, **kw) -> tuple[dl.Solution, ...]:
    """The same solve with the native MLP (host loop) and the MLP called from Python on the
    tensor loop."""
    native = dl.ODEProblem(mlp.rhs, u0, span)
    python = dl.ODEProblem(lambda u, p, t: mlp(u), u0, span)
    host = dl.solve(native, method, **kw)
    with tensor_loop_only():
        return host, dl.solve(python, method, **kw)


def solved(grad_fn, p, prob: dl.ODEProblem, method: str, **kw) -> tuple[torch.Tensor, dl.Solution]:
    """grad_fn(p, reduction, prob, method, **kw) (diffeq_rd, diffeq_adjoint) with the reduction
    returning the saved states, and the Solution the reduction saw."""
    box = {}

    def keep(sol):
        box["sol"] = sol
        return sol.u

    out = grad_fn(p, keep, prob, method, **kw)
    return out, box["sol"]


@pytest.mark.parametrize("method", ["euler", "bosh3", "dopri5", "tsit5", "dopri8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_python_f_takes_the_host_loop_without_grad(method, dtype):
    # A Python f with grad mode off: the host loop, f called on a fresh tensor per stage; the
    # tensor loop's steps and values, bitwise. Under grad mode, and in forward mode (f's value
    # carries a tangent: the host loop hands the solve back before its first step), tensors.
    mlp, u0 = mlp_and_state(dtype)
    seen = []

    def f(u, p, t):
        seen.append(u)
        return mlp(u)

    prob = dl.ODEProblem(f, u0, (0.0, 2.0))
    kw = dict(dt=0.05) if method == "euler" else dict(rtol=1e-6, atol=1e-8)
    kw["saveat"] = torch.linspace(0.0, 2.0, 17, dtype=torch.float64)
    with torch.no_grad():
        host = dl.solve(prob, method, **kw)
        with tensor_loop_only():
            tensors = dl.solve(prob, method, **kw)
    assert host.stats.host_loop and not tensors.stats.host_loop
    assert (host.stats.naccept, host.stats.nreject, host.stats.nfe) == (
        tensors.stats.naccept,
        tensors.stats.nreject,
        tensors.stats.nfe,
    )
    assert torch.equal(host.u, tensors.u)
    # Each call got a tensor of its own (f may keep it), of the state's shape and dtype.
    assert len({x.data_ptr() for x in seen[:5]}) == 5
    assert all(x.shape == u0.shape and x.dtype == dtype for x in seen)
    assert not dl.solve(prob, method, **kw).stats.host_loop  # grad mode on
    # Forward mode: the directional derivative in the weights' direction w is diffeq_rd's.
    prob_p = dl.ODEProblem(lambda u, p, t: p(u), u0, (0.0, 2.0))
    w = torch.ones_like(mlp.layers[0].weight)
    _, dy = dl.diffeq_jvp(mlp, lambda s: s.u, prob_p, method,
                          tangent_p={"layers.0.weight": w}, **kw)  # fmt: skip
    r = torch.linspace(-1.0, 1.0, dy.numel(), dtype=dtype).reshape(dy.shape)
    loss = dl.diffeq_rd(mlp, lambda s: (s.u * r).sum(), prob_p, method, **kw)
    (gw,) = torch.autograd.grad(loss, mlp.layers[0].weight)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose((dy * r).sum(), (gw * w).sum(), rtol=tol, atol=0)


@pytest.mark.parametrize("sensealg", ["interpolating", "backsolve"])
@pytest.mark.parametrize("method", ["tsit5", "dopri5", "bosh3", "dopri8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_continuous_adjoints_on_host_equal_the_tensor_loop(sensealg, method, dtype):
    """The interpolating and backsolve adjoints' backward solves with the MLP's host
    vector-Jacobian product as their right-hand side take the tensor loop's steps and give its
    gradients bitwise, for u0, every weight and a tensor the MLP does not read (zero); with the
    seminorm too (the RMS norm over the state's prefix on both)."""
    mlp, u0 = mlp_and_state(dtype)
    unused = torch.ones(2, dtype=dtype, requires_grad=True)
    params = [*mlp.parameters(), unused]
    target = torch.linspace(-1, 1, 8, dtype=dtype).reshape(4, 1, 2)

    def run(**kw):
        x0 = u0.clone().requires_grad_(True)
        prob = dl.ODEProblem(mlp.rhs, x0, (0.0, 1.5), params)
        out, sol = solved(
            dl.diffeq_adjoint,
            params,
            prob,
            method,
            saveat=[0.0, 0.4, 0.77, 1.5],
            rtol=1e-6,
            atol=1e-8,
            sensealg=sensealg,
            **kw,
        )
        loss = ((out - target) ** 2).sum()
        grads = torch.autograd.grad(loss, [x0, *params], allow_unused=True)
        return grads, sol.adjoint_stats

    steps = {}
    for seminorm in (False, True):
        host, host_stats = run(seminorm=seminorm)
        with tensor_loop_only():
            tensors, tensor_stats = run(seminorm=seminorm)
        assert host_stats.host_loop and not tensor_stats.host_loop
        assert host_stats.naccept == tensor_stats.naccept > 0
        assert host_stats.nreject == tensor_stats.nreject
        assert host_stats.nvjp == tensor_stats.nvjp == host_stats.nvjp_native
        for a, b in zip(host, tensors):
            assert (a is None and b is None) or torch.equal(a, b)
        assert host[-1] is None or not host[-1].any()
        steps[seminorm] = host_stats.naccept + host_stats.nreject
    # The seminorm leaves the weights' channels out of error control: never more steps.
    assert steps[True] <= steps[False]


def test_interpolating_adjoint_backward_failure_on_host_reads_as_on_tensors():
    """A backward solve that fails on host arrays (too many steps at a tight adjoint tolerance)
    raises what the tensor loop raises: the adjoint named, with t, dt and the cause."""
    mlp, u0 = mlp_and_state(torch.float64)

    def failure() -> str:
        prob = dl.ODEProblem(mlp.rhs, u0, (0.0, 1.5), mlp)
        out = dl.diffeq_adjoint(
            mlp,
            lambda s: s.u,
            prob,
            "tsit5",
            saveat=[0.5, 1.5],
            max_num_steps=30,
            adjoint_rtol=1e-13,
            adjoint_atol=1e-15,
        )
        with pytest.raises(RuntimeError) as err:
            out.sum().backward()
        return str(err.value)

    host = failure()
    with tensor_loop_only():
        tensors = failure()
    assert "the backward solve of the interpolating adjoint failed" in host
    assert "t=" in host and "dt=" in host
    assert host == tensors


@pytest.mark.parametrize("method", EXPLICIT + ["dopri8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("save", ["saveat", "every step", "backwards with tstops"])
def test_host_loop_takes_the_tensor_loops_steps(method, dtype, save):
    mlp, u0 = mlp_and_state(dtype)
    span = (2.0, 0.0) if save.startswith("backwards") else (0.0, 2.0)
    kw = dict(dt=0.05) if method in FIXED else dict(rtol=1e-6, atol=1e-8)
    if method == "dopri8":
        kw = dict(rtol=1e-10, atol=1e-12)
    if save != "every step":
        kw["saveat"] = torch.linspace(span[0], span[1], 17, dtype=torch.float64)
    if save.startswith("backwards"):
        kw["tstops"] = [1.234, 0.5]
    with torch.no_grad():
        host, tensors = both(mlp, u0, span, method, **kw)
    assert host.stats.host_loop and not tensors.stats.host_loop
    assert (host.stats.naccept, host.stats.nreject, host.stats.nfe) == (
        tensors.stats.naccept,
        tensors.stats.nreject,
        tensors.stats.nfe,
    )
    assert host.stats.naccept > 3
    assert torch.equal(host.t, tensors.t)
    # Bitwise: the same stage loops, error norm and interpolation product.
    assert torch.equal(host.u, tensors.u)
    assert host.u.shape == (len(host.t), *u0.shape)


def test_host_loop_only_where_nothing_is_recorded():
    mlp, u0 = mlp_and_state(torch.float64)
    prob = dl.ODEProblem(mlp.rhs, u0, (0.0, 1.0))
    # The MLP's weights require grad: under grad mode the solve is recorded (diffeq_rd).
    sol = dl.solve(prob, "tsit5", saveat=0.25)
    assert not sol.stats.host_loop and sol.u.requires_grad
    with torch.no_grad():
        sol = dl.solve(prob, "tsit5", saveat=0.25)
    assert sol.stats.host_loop
    # A custom norm, dense output and too large a state keep the tensor loop.
    with torch.no_grad():
        assert not dl.solve(prob, "tsit5", norm=lambda e: e.abs().max()).stats.host_loop
        assert not dl.solve(prob, "tsit5", dense=True).stats.host_loop
        big = dl.ODEProblem(mlp.rhs, torch.ones(4096, 2, dtype=torch.float64), (0.0, 0.1))
        assert not dl.solve(big, "tsit5").stats.host_loop
    for p in mlp.parameters():
        p.requires_grad_(False)
    assert dl.solve(prob, "tsit5", saveat=0.25).stats.host_loop


def test_host_loop_fails_as_the_tensor_loop_does():
    # u' = W2 (W1 u^3 + b1) + b2 with large weights blows up in finite time.
    torch.manual_seed(0)
    mlp = dl.MLP([2, 4, 2], "identity", input_power=3).double()
    with torch.no_grad():
        for p in mlp.parameters():
            p.abs_().mul_(3.0)
    u0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    for kw in (dict(max_num_steps=5), dict(), dict(dt=0.5, adaptive=False)):
        with torch.no_grad():
            host, tensors = both(
                mlp, u0, (0.0, 10.0), "dopri5", throw_on_failure=False, saveat=1.0, **kw
            )
        assert host.stats.host_loop
        assert host.retcode == tensors.retcode != dl.ReturnCode.Success
        assert host.message == tensors.message
        assert "t=" in host.message and "dt=" in host.message
        assert torch.equal(host.t, tensors.t) and torch.equal(host.u, tensors.u)
        with torch.no_grad(), pytest.raises(dl.SolverError, match="dopri5 failed") as err:
            dl.solve(dl.ODEProblem(mlp.rhs, u0, (0.0, 10.0)), "dopri5", saveat=1.0, **kw)
        assert str(err.value) == host.message


@pytest.mark.parametrize("method", EXPLICIT)
@pytest.mark.parametrize("checkpoints", [0, 3])
def test_discrete_adjoint_on_host_equals_reverse_mode(method, checkpoints):
    """The discrete adjoint's host reversal against diffeq_rd through the tensor loop: the same
    gradient to rounding, for u0, every weight and a tensor the MLP does not read (zero)."""
    mlp, u0 = mlp_and_state(torch.float64)
    u0 = u0.clone().requires_grad_(True)
    unused = torch.ones(2, dtype=torch.float64, requires_grad=True)
    params = [*mlp.parameters(), unused]
    kw = dict(dt=0.1) if method in FIXED else dict(rtol=1e-7, atol=1e-9)
    # Save times at t0, inside steps and at the end.
    kw["saveat"] = [0.0, 0.13, 0.4, 0.77, 1.5]
    target = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(3, 2)
    grads, stats = {}, {}
    for mode in ("rd", "discrete"):
        prob = dl.ODEProblem(mlp.rhs, u0, (0.0, 1.5), params)
        if mode == "rd":
            out, sol = solved(dl.diffeq_rd, params, prob, method, **kw)
        else:
            out, sol = solved(
                dl.diffeq_adjoint,
                params,
                prob,
                method,
                sensealg="discrete",
                checkpoints=checkpoints,
                **kw,
            )
        loss = ((out - target) ** 2).sum() + out[2].sin().sum()
        grads[mode] = torch.autograd.grad(loss, [u0, *params], allow_unused=True)
        stats[mode] = sol
    assert stats["discrete"].stats.host_loop and stats["discrete"].adjoint_stats.host_loop
    assert not stats["rd"].stats.host_loop
    assert stats["discrete"].adjoint_stats.nvjp == stats["discrete"].adjoint_stats.nvjp_native > 0
    for a, b in zip(grads["discrete"], grads["rd"]):
        a = torch.zeros(2, dtype=torch.float64) if a is None else a
        b = torch.zeros(2, dtype=torch.float64) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
    assert not grads["discrete"][-1].any()


@pytest.mark.parametrize("method", EXPLICIT + ["dopri8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_discrete_adjoint_from_the_forwards_stages_equals_evaluating_them_again(method, dtype):
    """With one checkpoint per step the forward keeps every step's stages and the MLP's
    activations at them, and the backward takes its products from those (no evaluation of f
    for the stages); with a checkpoint cap it evaluates them again. The same gradient, bitwise."""
    mlp, u0 = mlp_and_state(dtype)
    kw = dict(dt=0.1) if method in FIXED else dict(rtol=1e-5, atol=1e-7)
    grads, nfe = {}, {}
    for checkpoints in (0, 1000):  # 1000: a cap the solve never reaches (no thinning)
        u0r = u0.clone().requires_grad_(True)
        mlp.zero_grad()
        prob = dl.ODEProblem(mlp.rhs, u0r, (0.0, 1.5), mlp)
        out, sol = solved(
            dl.diffeq_adjoint,
            mlp,
            prob,
            method,
            saveat=[0.0, 0.4, 1.5],
            sensealg="discrete",
            checkpoints=checkpoints,
            **kw,
        )
        (out.sin() * torch.arange(6, dtype=dtype).reshape(3, 2)).sum().backward()
        grads[checkpoints] = [u0r.grad, *(p.grad for p in mlp.parameters())]
        nfe[checkpoints] = sol.adjoint_stats.nfe
    for a, b in zip(grads[0], grads[1000]):
        assert torch.equal(a, b)
    assert nfe[1000] > 0
    # Only the Hermite interpolant's f(t + h, u1) products of methods without an own
    # interpolant (and not first-same-as-last) still evaluate f.
    if method in ("tsit5", "dopri5", "bosh3"):
        assert nfe[0] == 0
    else:
        assert nfe[0] < nfe[1000]


def test_discrete_adjoint_on_host_float32_and_gradcheck():
    """float32 against reverse mode (to float32 rounding), and float64 gradcheck of the host
    reversal with fixed steps (a smooth function of u0)."""
    mlp, u0 = mlp_and_state(torch.float32)
    u0 = u0.clone().requires_grad_(True)
    prob = dl.ODEProblem(mlp.rhs, u0, (0.0, 1.0), mlp)
    kw = dict(saveat=[0.3, 1.0], rtol=1e-5, atol=1e-7)
    g_rd = torch.autograd.grad(
        dl.diffeq_rd(mlp, lambda s: s.u, prob, "tsit5", **kw).square().sum(), [u0]
    )[0]
    out, sol = solved(dl.diffeq_adjoint, mlp, prob, "tsit5", sensealg="discrete", **kw)
    g_d = torch.autograd.grad(out.square().sum(), [u0])[0]
    assert sol.adjoint_stats.host_loop
    torch.testing.assert_close(g_d, g_rd, rtol=2e-5, atol=1e-6)

    mlp64 = dl.MLP([2, 5, 2], "softplus", input_power=3).double()
    u64 = torch.tensor([0.6, -0.4], dtype=torch.float64, requires_grad=True)

    def solve_u(u):
        problem = dl.ODEProblem(mlp64.rhs, u, (0.0, 1.0), mlp64)
        return dl.diffeq_adjoint(
            mlp64, lambda s: s.u, problem, "rk4", sensealg="discrete", dt=0.1, saveat=[0.25, 1.0]
        )

    assert torch.autograd.gradcheck(solve_u, (u64,))
