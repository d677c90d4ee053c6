"""The fixed-step implicit Runge-Kutta methods (implicit_euler, ..., gl6): convergence orders on
a problem with a known solution, stability on a stiff problem, gradients, the odeint names and
errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import diffeqlayers as dl

F64 = torch.float64

ORDERS = {
    "implicit_euler": 1,
    "implicit_midpoint": 2,
    "trapezoid": 2,
    "sdirk2": 2,
    "fixed_trbdf2": 2,
    "radauIIA3": 3,
    "gl4": 4,
    "radauIIA5": 5,
    "gl6": 6,
}


def growth(u, p, t):
    """u' = 0.8 cos(t) u (1 + 0.1 u): non-linear and non-autonomous; see exact() for u."""
    return 0.8 * math.cos(t) * u * (1 + 0.1 * u)


def exact(u0, t):
    # Logistic in s = 0.8 sin t: u / (1 + 0.1 u) = u0 / (1 + 0.1 u0) exp(s).
    k = u0 / (1 + 0.1 * u0) * math.exp(0.8 * math.sin(t))
    return k / (1 - 0.1 * k)


U0 = torch.tensor([0.5, -0.3], dtype=F64)


def final_error(method, dt):
    prob = dl.ODEProblem(growth, U0, (0.0, 2.0))
    sol = dl.solve(prob, method, dt=dt, rtol=1e-13, atol=1e-15, max_iters=50)
    return float((sol.u[-1] - exact(U0, 2.0)).abs().max())


def test_methods_are_listed():
    assert sorted(dl.implicit_fixed_methods()) == sorted(ORDERS)


@pytest.mark.parametrize("method", sorted(ORDERS))
def test_convergence_order(method):
    order = ORDERS[method]
    dts = [0.2, 0.1, 0.05] if order >= 5 else [0.04, 0.02, 0.01]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Newton converges in every step
        errs = [final_error(method, dt) for dt in dts]
    slopes = [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]
    assert all(abs(s - order) < 0.3 for s in slopes), (method, errs, slopes)


@pytest.mark.parametrize("method", ["implicit_euler", "sdirk2", "fixed_trbdf2", "radauIIA5"])
def test_stiff_problem_with_large_steps(method):
    # u' = -1000 (u - cos t): explicit methods need h < 2e-3; L-stable ones follow the slow
    # solution u ~ cos t + 1e-3 sin t with h = 0.1.
    prob = dl.ODEProblem(
        lambda u, p, t: -1000.0 * (u - math.cos(t)), torch.zeros(1, dtype=F64), (0.0, 2.0)
    )
    sol = dl.solve(prob, method, dt=0.1)
    slow = math.cos(2.0) + 1e-3 * math.sin(2.0)
    assert abs(float(sol.u[-1, 0]) - slow) < 2e-3
    assert sol.stats.njac == sol.stats.naccept  # one Jacobian per step


@pytest.mark.parametrize("method", ["radauIIA3", "gl4", "trapezoid"])
def test_gradcheck(method):
    u0 = torch.tensor([0.4, -0.2], dtype=F64, requires_grad=True)
    p = torch.tensor(0.9, dtype=F64, requires_grad=True)

    def final(u0, p):
        prob = dl.ODEProblem(
            lambda u, p, t: -p * u * u + torch.sin(u) * math.cos(t), u0, (0.0, 1.0), p
        )
        # Zero tolerances: every step takes all max_iters iterations (a smooth discrete map).
        return dl.solve(prob, method, dt=0.25, rtol=0.0, atol=0.0, max_iters=4).u[-1]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert torch.autograd.gradcheck(final, (u0, p))


def test_user_jacobian_matches_autograd():
    a = torch.tensor([[-2.0, 1.0], [0.5, -3.0]], dtype=F64)
    prob = dl.ODEProblem(lambda u, p, t: a @ u, torch.tensor([1.0, 2.0], dtype=F64), (0.0, 1.0))
    auto = dl.solve(prob, "radauIIA5", dt=0.1)
    given = dl.solve(prob, "radauIIA5", dt=0.1, jac=lambda u, p, t: a)
    assert float((auto.u - given.u).abs().max()) < 1e-13
    assert float((given.u[-1] - torch.linalg.matrix_exp(a) @ prob.u0).abs().max()) < 1e-6


def test_odeint_names_and_options():
    y0 = torch.tensor([0.5, -0.3], dtype=F64)
    t = torch.linspace(0.0, 2.0, 5, dtype=F64)

    def f(t, y):
        return growth(y, None, float(t))

    ref = torch.stack([exact(y0, float(x)) for x in t])
    for method in ("implicit_euler", "trbdf2", "gl6", "radauIIA5"):
        out = dl.odeint(f, y0, t, method=method, options={"step_size": 0.01, "max_iters": 20})
        bound = 2e-2 if method == "implicit_euler" else 1e-4
        assert float((out - ref).abs().max()) < bound, method
    with pytest.raises(ValueError, match="max_order"):
        dl.odeint(f, y0, t, method="gl4", options={"max_order": 4})
    with pytest.raises(NotImplementedError, match="gl4"):
        dl.odeint_adjoint(f, y0, t, method="gl4", adjoint_params=())
    prob = dl.ODEProblem(growth, y0, (0.0, 1.0))
    with pytest.raises(ValueError, match="dt"):
        dl.solve(prob, "gl4")
    with pytest.raises(ValueError, match="max_iters"):
        dl.solve(prob, "gl4", dt=0.1, max_iters=0)
    with pytest.warns(RuntimeWarning, match="Newton iteration did not converge"):
        dl.solve(prob, "gl4", dt=0.1, max_iters=1, rtol=1e-14, atol=1e-14)


def stiff_growth(u, p, t):
    """A stiff, non-linear f reading t and p: relaxation at rate p[1] towards a moving target."""
    return torch.stack(
        [p[0] * math.cos(t) * u[0] * (1 + 0.1 * u[1]), -p[1] * (u[1] - torch.sin(u[0]) - t)]
    )


@pytest.mark.parametrize("method", sorted(ORDERS))
def test_forward_mode_matches_reverse_mode(method):
    # diffeq_fd: the stages found on primal values take one exact Newton correction, whose tangent
    # is the implicit function theorem's; diffeq_rd differentiates the iteration as it ran. With
    # the iteration run to near rounding (tolerances 1e-13, up to 50 iterations) the two agree:
    # measured at most 7.7e-14 relative over the methods (fixed_trbdf2). Save rows inside steps
    # (the Hermite interpolant, with f(t, u) and f(t + h, u_new) carrying tangents) and at step
    # ends.
    p0 = torch.tensor([0.8, 30.0], dtype=F64)
    y0 = torch.tensor([0.5, -0.3], dtype=F64)
    prob = dl.ODEProblem(stiff_growth, y0, (0.0, 1.0), p0)
    kw = dict(dt=0.1, saveat=[0.55, 1.0], rtol=1e-13, atol=1e-13, max_iters=50)
    grads = []
    for fn in [dl.diffeq_rd, dl.diffeq_fd]:
        p = p0.clone().requires_grad_(True)
        u0 = y0.clone().requires_grad_(True)
        out = fn(p, lambda s: s.u.pow(2).sum(), prob, method, u0=u0, **kw)
        grads.append(torch.cat(torch.autograd.grad(out, (u0, p))))
    assert torch.allclose(grads[1], grads[0], rtol=1e-11, atol=0), grads
