"""The public API: methods, tableaus, problems, options, Solution, and importing the package."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import (
    METHODS,
    decay,
    decay_exact,
    max_abs_err,
    oscillator,
    oscillator_exact,
)

import diffeqlayers as dl

EXPECTED_METHODS = {
    # name: (order, adaptive)
    "euler": (1, False),
    "midpoint": (2, False),
    "heun2": (2, False),
    "ralston": (2, False),
    "heun3": (3, False),
    "rk4": (4, False),
    "adaptive_heun": (2, True),
    "fehlberg2": (2, True),
    "bosh3": (3, True),
    "dopri5": (5, True),
    "tsit5": (5, True),
    "dopri8": (8, True),
}


def test_importing_the_package_alone_works(request):
    # `import diffeqlayers` must not depend on the user importing torch first: the extension
    # links against torch's shared libraries, which only `import torch` loads.
    env = dict(os.environ)
    out = subprocess.run(
        [sys.executable, "-c", "import diffeqlayers; print(diffeqlayers.methods())"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tsit5" in out.stdout


def test_version():
    assert isinstance(dl.__version__, str) and dl.__version__.count(".") >= 1


def test_solve_defaults_are_the_extensions():
    """solve() sets only the options that differ from SolveOptions' defaults, so its signature's
    defaults must be the extension's: a default changed on one side alone would go unnoticed."""
    solve_module = importlib.import_module("diffeqlayers.solve")
    params = inspect.signature(dl.solve).parameters
    names = vars(solve_module._DEFAULTS)
    assert set(names) >= {"rtol", "atol", "dt_max", "max_num_steps", "check_finite"}
    for name, value in names.items():
        assert params[name].default == value, name
        assert type(params[name].default) is type(value), name


def test_methods_lists_every_documented_method():
    names = dl.methods()
    assert isinstance(names, list) and all(isinstance(n, str) for n in names)
    assert set(names) == set(EXPECTED_METHODS)
    assert names == sorted(names)


@pytest.mark.parametrize("name", sorted(EXPECTED_METHODS))
def test_tableau_properties(name):
    tab = dl.tableau(name)
    order, adaptive = EXPECTED_METHODS[name]
    assert tab.name == name
    assert tab.order == order
    assert tab.adaptive is adaptive
    s = tab.stages
    assert len(tab.c) == s and len(tab.b) == s and len(tab.a) == s
    # Explicit: row i of a has i entries, and rows sum to c (consistency of the stage times).
    for i, row in enumerate(tab.a):
        assert len(row) == i
        assert sum(row) == pytest.approx(tab.c[i], abs=1e-12)
    assert sum(tab.b) == pytest.approx(1.0, abs=1e-12)
    if adaptive:
        assert len(tab.b_err) == s
        assert sum(tab.b_err) == pytest.approx(0.0, abs=1e-12)  # b - b_hat, both consistent
        assert 1 <= tab.embedded_order < 99
    else:
        assert len(tab.b_err) == 0 and tab.embedded_order == 0
    assert isinstance(tab.reference, str) and tab.reference


def test_fsal_and_dense_flags():
    for name in ("bosh3", "dopri5", "tsit5"):
        assert dl.tableau(name).fsal, name
    for name in ("euler", "rk4", "dopri8", "adaptive_heun", "fehlberg2"):
        assert not dl.tableau(name).fsal, name
    for name in ("dopri5", "tsit5"):
        tab = dl.tableau(name)
        assert tab.has_dense and tab.dense_order == 4
    assert not dl.tableau("rk4").has_dense


def test_tableau_is_a_shared_reference():
    assert dl.tableau("tsit5").b == dl.tableau("tsit5").b


# ----------------------------------------------------------------------------------------------
# ODEProblem, remake, parameters
# ----------------------------------------------------------------------------------------------


def test_problem_fields_and_remake():
    u0 = torch.tensor([1.0], dtype=torch.float64)
    prob = dl.ODEProblem(decay, u0, [0.0, 1.0], 0.5)
    assert prob.tspan == (0.0, 1.0)  # any pair becomes a tuple
    other = dl.remake(prob, p=2.0, tspan=(0.0, 2.0))
    assert other.p == 2.0 and other.tspan == (0.0, 2.0) and other.u0 is u0 and other.f is decay
    assert prob.p == 0.5  # unchanged
    with pytest.raises(dataclasses.FrozenInstanceError):
        prob.p = 3.0  # frozen


def test_tspan_given_as_a_tensor_pair():
    u0 = torch.tensor([1.0], dtype=torch.float64)
    prob = dl.ODEProblem(decay, u0, torch.tensor([0.0, 1.0]), 1.0)
    sol = dl.solve(prob, "tsit5", saveat=[1.0], rtol=1e-10, atol=1e-12)
    assert abs(sol.u[-1].item() - math.exp(-1.0)) <= 1e-9


@pytest.mark.parametrize("kind", ["tensor", "list", "dict", "module", "float"])
def test_parameter_containers(kind):
    a = torch.tensor(0.5, dtype=torch.float64)
    if kind == "tensor":
        p, f = a, lambda u, p, t: -p * u
    elif kind == "list":
        p, f = [a, a * 2], lambda u, p, t: -p[0] * u
    elif kind == "dict":
        p, f = {"rate": a}, lambda u, p, t: -p["rate"] * u
    elif kind == "module":
        lin = torch.nn.Linear(1, 1, bias=False, dtype=torch.float64)
        with torch.no_grad():
            lin.weight.fill_(-0.5)
        p, f = lin, lambda u, p, t: p(u)
    else:
        p, f = 0.5, lambda u, p, t: -p * u
    u0 = torch.tensor([2.0], dtype=torch.float64)
    sol = dl.solve(
        dl.ODEProblem(f, u0, (0.0, 1.0), p), "tsit5", saveat=[1.0], rtol=1e-10, atol=1e-12
    )
    assert abs(sol.u[-1].item() - 2.0 * math.exp(-0.5)) <= 1e-9


def test_u0_override_in_solve_and_diffeq_rd():
    prob = dl.ODEProblem(decay, torch.tensor([1.0], dtype=torch.float64), (0.0, 1.0), 1.0)
    other = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    sol = dl.solve(prob, "rk4", dt=0.01, u0=other)
    assert torch.equal(sol.u[0], other.detach())
    out = dl.diffeq_rd(1.0, lambda s: s.u[-1].sum(), prob, "rk4", u0=other, dt=0.01)
    (g,) = torch.autograd.grad(out, other)
    assert abs(float(g) - math.exp(-1.0)) <= 1e-9  # rk4, dt = 0.01: ~1e-11 error


def test_diffeq_rd_returns_what_the_reduction_returns():
    prob = dl.ODEProblem(decay, torch.tensor([1.0], dtype=torch.float64), (0.0, 1.0))
    out = dl.diffeq_rd(
        torch.tensor(1.0, dtype=torch.float64), lambda s: (s.t, s.u), prob, "rk4", dt=0.5
    )
    assert isinstance(out, tuple) and out[0].tolist() == [0.0, 0.5, 1.0]
    # p replaces the problem's parameters.
    assert abs(out[1][-1].item() - math.exp(-1.0)) <= 3e-3  # rk4, dt = 0.5: error ~1e-3


# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "controller", ["I", "PI", "PID", dl.ControllerOptions.PID(), dl.ControllerOptions()]
)
def test_controllers(controller):
    u0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    prob = dl.ODEProblem(oscillator, u0, (0.0, 2.0))
    sol = dl.solve(prob, "dopri5", rtol=1e-8, atol=1e-10, controller=controller)
    assert max_abs_err(sol.u, oscillator_exact(u0, sol.t)) <= 1e-7  # K = 10


def test_controller_options_fields():
    c = dl.ControllerOptions()
    pi = dl.ControllerOptions.PI()
    assert (c.beta1, c.beta2, c.beta3) == (pi.beta1, pi.beta2, pi.beta3) == (0.85, -0.2, 0.0)
    i = dl.ControllerOptions.I()
    assert (i.beta1, i.beta2, i.beta3) == (1.0, 0.0, 0.0)
    c.safety = 0.8
    c.factor_max = 5.0
    assert "safety=0.8" in repr(c) and "factor_max=5" in repr(c)


def test_controller_factor_max_limits_growth():
    prob = dl.ODEProblem(oscillator, torch.tensor([1.0, 0.0], dtype=torch.float64), (0.0, 2.0))
    c = dl.ControllerOptions()
    c.factor_max = 1.5
    sol = dl.solve(prob, "tsit5", dt=1e-4, rtol=1e-3, controller=c)
    h = torch.diff(sol.t)
    # Each accepted step grows by at most factor_max over the previous one (the last step may be
    # shortened to land on t1, which only makes it smaller).
    assert bool((h[1:] <= h[:-1] * 1.5 * (1 + 1e-12)).all())


def test_custom_norm_is_used():
    calls = []

    def max_norm(x):
        calls.append(x.shape)
        return x.abs().max()

    u0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    prob = dl.ODEProblem(oscillator, u0, (0.0, 2.0))
    rms = dl.solve(prob, "dopri5", rtol=1e-6, atol=1e-8)
    mx = dl.solve(prob, "dopri5", rtol=1e-6, atol=1e-8, norm=max_norm)
    assert calls and all(s == (2,) for s in calls)
    # The max norm is >= the RMS norm, so it takes at least as many steps.
    assert mx.stats.naccept >= rms.stats.naccept
    assert max_abs_err(mx.u, oscillator_exact(u0, mx.t)) <= 1e-5
    # A norm returning a Python float works too.
    sol = dl.solve(prob, "dopri5", rtol=1e-6, atol=1e-8, norm=lambda x: float(x.abs().max()))
    assert torch.equal(sol.t, mx.t)


def test_adaptive_method_with_adaptive_false_takes_fixed_steps():
    prob = dl.ODEProblem(oscillator, torch.tensor([1.0, 0.0], dtype=torch.float64), (0.0, 1.0))
    sol = dl.solve(prob, "dopri5", adaptive=False, dt=0.25)
    assert sol.t.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert sol.stats.nreject == 0 and sol.stats.naccept == 4


def test_fixed_step_method_ignores_tolerances():
    prob = dl.ODEProblem(oscillator, torch.tensor([1.0, 0.0], dtype=torch.float64), (0.0, 1.0))
    a = dl.solve(prob, "rk4", dt=0.1)
    b = dl.solve(prob, "rk4", dt=0.1, rtol=1e-1, atol=1e-1)
    assert torch.equal(a.u, b.u)


# ----------------------------------------------------------------------------------------------
# Solution
# ----------------------------------------------------------------------------------------------


def test_solution_attributes():
    u0 = torch.tensor([1.0], dtype=torch.float64)
    prob = dl.ODEProblem(decay, u0, (0.0, 1.0), 1.0)
    sol = dl.solve(prob, "tsit5", saveat=0.5)
    assert isinstance(sol, dl.Solution)
    assert len(sol) == 3
    assert sol.success and sol.retcode == dl.ReturnCode.Success and sol.message == ""
    assert sol.stats.nfe > 0 and sol.stats.naccept > 0 and sol.stats.nreject >= 0
    r = repr(sol)
    assert "Success" in r and "n=3" in r and "(3, 1)" in r
    assert "nfe=" in repr(sol.stats)
    assert max_abs_err(sol.u, decay_exact(u0, 1.0, sol.t)) <= 1e-6


def test_return_codes():
    names = {
        c.name
        for c in (
            dl.ReturnCode.Success,
            dl.ReturnCode.MaxIters,
            dl.ReturnCode.DtLessThanMin,
            dl.ReturnCode.Unstable,
        )
    }
    assert names == {"Success", "MaxIters", "DtLessThanMin", "Unstable"}


def test_scalar_state():
    prob = dl.ODEProblem(decay, torch.tensor(1.0, dtype=torch.float64), (0.0, 1.0), 1.0)
    sol = dl.solve(prob, "tsit5", saveat=[0.5, 1.0], rtol=1e-10, atol=1e-12)
    assert sol.u.shape == (2,)
    assert max_abs_err(sol.u, torch.exp(-sol.t)) <= 1e-9


def test_non_contiguous_u0():
    base = torch.randn(2, 3, dtype=torch.float64)
    u0 = base.t()  # shape [3, 2], not contiguous
    assert not u0.is_contiguous()
    sol = dl.solve(dl.ODEProblem(oscillator, u0, (0.0, 1.0)), "rk4", dt=0.01)
    assert sol.u.shape == (101, 3, 2)
    assert max_abs_err(sol.u[-1], oscillator_exact(u0, 1.0)) <= 1e-9


def test_f_receives_a_float_time_and_the_state():
    seen = []

    def f(u, p, t):
        seen.append((type(t), u.shape, u.dtype, p))
        return -u

    prob = dl.ODEProblem(f, torch.ones(3, dtype=torch.float32), (0.0, 1.0), "params")
    dl.solve(prob, "rk4", dt=0.5)
    assert seen and all(s == (float, (3,), torch.float32, "params") for s in seen)


def test_nested_solve_inside_f():
    # f itself solves an ODE (the GIL is taken back for f, and released again by the inner solve).
    def f(u, p, t):
        inner = dl.solve(dl.ODEProblem(decay, u, (0.0, 0.1), 1.0), "rk4", dt=0.05, saveat=[0.1])
        return inner.u[-1] - u  # = (exp(-0.1) - 1) u up to rk4's error

    prob = dl.ODEProblem(f, torch.tensor([1.0], dtype=torch.float64), (0.0, 1.0))
    sol = dl.solve(prob, "rk4", dt=0.1)
    rate = 1.0 - math.exp(-0.1)
    assert abs(sol.u[-1].item() - math.exp(-rate)) <= 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_every_method_solves_a_tiny_problem_in_float32(method):
    kwargs = {"dt": 0.1} if not dl.tableau(method).adaptive else {"rtol": 1e-4, "atol": 1e-6}
    prob = dl.ODEProblem(decay, torch.tensor([1.0], dtype=torch.float32), (0.0, 1.0), 1.0)
    sol = dl.solve(prob, method, saveat=[1.0], **kwargs)
    assert sol.u.dtype == torch.float32
    assert abs(sol.u[-1].item() - math.exp(-1.0)) <= 0.05  # euler at dt 0.1: error ~0.02


def test_solve_under_inference_mode():
    u0 = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    prob = dl.ODEProblem(oscillator, u0, (0.0, 1.0))
    with torch.inference_mode():
        sol = dl.solve(prob, "tsit5", saveat=[0.5, 1.0], dense=True, rtol=1e-8, atol=1e-10)
        mid = sol(0.25)
    assert not sol.u.requires_grad
    assert max_abs_err(sol.u, oscillator_exact(u0, sol.t)) <= 1e-7
    assert max_abs_err(mid, oscillator_exact(u0, 0.25)) <= 1e-7
    # The span tensor kept for (0.0, 1.0) was first asked for there; recorded solves over the
    # same span, by reverse mode and the adjoints, still differentiate.
    for sensealg in ("rd", "discrete", "interpolating"):
        u0.grad = None
        if sensealg == "rd":
            out = dl.diffeq_rd(None, lambda s: s.u[-1, 0], prob, "tsit5", saveat=[1.0])
        else:
            out = dl.diffeq_adjoint(
                None, lambda s: s.u[-1, 0], prob, "tsit5", saveat=[1.0], sensealg=sensealg
            )
        out.backward()
        # x(1) = cos(1) x0 + sin(1) v0 for the oscillator x'' = -x
        torch.testing.assert_close(
            u0.grad,
            torch.tensor([math.cos(1.0), math.sin(1.0)], dtype=torch.float64),
            rtol=1e-5,
            atol=1e-6,
        )


def test_u0_and_tspan_as_functions_of_p():
    # Everything about a problem can be set by p: u0(p, t0) and tspan(p).
    p = torch.tensor([2.0, 0.5], dtype=torch.float64, requires_grad=True)
    prob = dl.ODEProblem(
        lambda u, p, t: -u,
        lambda p, t0: p[:1] * 1.0,  # u0 = p[0]
        lambda p: (0.0, p[1]),  # t1 = p[1]
        p,
    )
    sol = dl.solve(prob, "tsit5", rtol=1e-11, atol=1e-12)
    assert sol.t[-1].item() == 0.5
    end = sol.u[-1, 0]
    assert abs(end.item() - 2.0 * math.exp(-0.5)) < 1e-9
    end.backward()
    # d/dp0 = exp(-p1), d/dp1 = -p0 exp(-p1) (through t1 = p1, the time gradient)
    assert abs(p.grad[0].item() - math.exp(-0.5)) < 1e-9
    assert abs(p.grad[1].item() + 2.0 * math.exp(-0.5)) < 1e-8
    with pytest.raises(TypeError, match="u0"):
        dl.solve(dl.remake(prob, u0=lambda p, t0: 3.0), "tsit5")
    with pytest.raises(ValueError, match="tspan"):
        dl.solve(dl.remake(prob, tspan=lambda p: (0.0,)), "tsit5")


def test_solution_indexing_is_time_first_and_plot_draws_each_component(tmp_path):
    prob = dl.ODEProblem(lambda u, p, t: -u, torch.tensor([1.0, 2.0], dtype=torch.float64), (0, 1))
    sol = dl.solve(prob, "tsit5", saveat=0.5)
    assert torch.equal(sol[1], sol.u[1]) and torch.equal(sol[:, 0], sol.u[:, 0])
    plt = pytest.importorskip("matplotlib.pyplot")
    ax = sol.plot(labels=["x", "y"])
    assert [line.get_label() for line in ax.get_lines()] == ["x", "y"]
    ax.figure.savefig(tmp_path / "sol.png")
    plt.close(ax.figure)
