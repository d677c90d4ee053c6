"""The fixed-grid Adams methods (explicit_adams, implicit_adams) through solve(): convergence
orders on a problem with a known solution, gradients (gradcheck, forward vs reverse mode),
options and errors. The comparison with torchdiffeq is in test_odeint.py."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import diffeqlayers as dl

F64 = torch.float64


def growth(u, p, t):
    """u' = p cos(t) u: u(t) = u0 exp(p sin t)."""
    return p * math.cos(t) * u


def growth_exact(u0, p, t):
    return u0 * math.exp(p * math.sin(t))


U0 = torch.tensor([1.0, -0.5], dtype=F64)
T1 = 2.0


def final_error(method, dt, **kw):
    prob = dl.ODEProblem(growth, U0, (0.0, T1), 0.8)
    # rtol/atol only steer implicit_adams' corrector: tight enough not to matter here.
    sol = dl.solve(prob, method, dt=dt, rtol=1e-12, atol=1e-14, **kw)
    return float((sol.u[-1] - growth_exact(U0, 0.8, T1)).abs().max())


def observed_order(method, dt, **kw):
    """log2 of the error ratio between steps dt and dt / 2. The steps are small (the slopes
    settle slowly: explicit_adams with max_order=5 gives 4.71, 4.57, 4.40, 4.25 from dt = 0.04
    down to 0.0025) but errors stay well above rounding (>= 1e-12)."""
    return math.log2(final_error(method, dt, **kw) / final_error(method, dt / 2, **kw))


def test_methods_are_listed():
    assert dl.adams_methods() == ["explicit_adams", "implicit_adams"]
    assert not set(dl.adams_methods()) & set(dl.methods())


# Orders: a fixed number of start-up steps (two RK4 steps, local error O(h^5); one AB3 step, local
# error O(h^4)) then k-step formulas. explicit_adams with max_order=5 is AB4 from the fourth step
# on: global order 4 (the one AB3 step also contributes O(h^4)). implicit_adams with max_order=5
# corrects with Adams-Moulton of order 5 (order 4 on its first Adams step, local error O(h^5)):
# global order 5. With max_order=3 every step is the 3/8-rule RK4: order 4.
@pytest.mark.parametrize(
    "method,max_order,order",
    [("explicit_adams", 5, 4), ("implicit_adams", 5, 5), ("explicit_adams", 3, 4)],
)
def test_convergence_order(method, max_order, order):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the corrector converges here
        slope = observed_order(method, 0.005, max_order=max_order)
    assert abs(slope - order) < 0.3, slope


def test_default_max_order_orders():
    # Default max_order=12: the order grows to 11, but the one AB3 start-up step bounds the
    # global order to 4 asymptotically (implicit_adams: the first Adams-Moulton step is order 4,
    # local error O(h^5), so 5).
    assert abs(observed_order("explicit_adams", 0.005) - 4) < 0.3
    assert abs(observed_order("implicit_adams", 0.005) - 5) < 0.3


def test_nfe_per_step():
    prob = dl.ODEProblem(growth, U0, (0.0, 1.0), 0.8)
    sol = dl.solve(prob, "explicit_adams", dt=0.1)
    # Two RK4 steps (4 evaluations each) then one evaluation per step (at the step's start).
    assert sol.stats.naccept == 10 and sol.stats.nfe == 2 * 4 + 8
    with pytest.warns(RuntimeWarning, match="8 of 10 steps"):
        sol = dl.solve(prob, "implicit_adams", dt=0.1, max_iters=3, rtol=0.0, atol=0.0)
    # Never "converged" with zero tolerances: 1 + max_iters evaluations per Adams step.
    assert sol.stats.nfe == 2 * 4 + 8 * (1 + 3)
    assert sol.stats.nnonconverged == 8


def test_nonconvergence_warns_and_counts():
    prob = dl.ODEProblem(growth, U0, (0.0, 1.0), 0.8)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        sol = dl.solve(prob, "implicit_adams", dt=0.1, max_iters=1, rtol=1e-14, atol=1e-14)
    assert sol.stats.nnonconverged > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = dl.solve(prob, "implicit_adams", dt=0.1)
    assert sol.stats.nnonconverged == 0


def test_saveat_dense_and_backward_time():
    prob = dl.ODEProblem(growth, U0, (T1, 0.0), 0.8)
    sol = dl.solve(prob, "implicit_adams", dt=0.01, saveat=[1.5, 0.77, 0.0], dense=True)
    exact = torch.stack([growth_exact(U0, 0.8, t) / math.exp(0.8 * math.sin(T1)) for t in sol.t])
    assert float((sol.u - exact).abs().max()) < 1e-7
    mid = sol(1.234)
    assert (
        float((mid - growth_exact(U0, 0.8, 1.234) / math.exp(0.8 * math.sin(T1))).abs().max())
        < 1e-7
    )


def _final(method, u0, p, **kw):
    prob = dl.ODEProblem(lambda u, p, t: -p * u * u + torch.sin(u) * math.cos(t), u0, (0.0, 1.0), p)
    return dl.solve(prob, method, dt=0.1, **kw).u[-1]


@pytest.mark.parametrize("method", ["explicit_adams", "implicit_adams"])
def test_gradcheck(method):
    u0 = torch.tensor([0.7, -0.3], dtype=F64, requires_grad=True)
    p = torch.tensor(0.9, dtype=F64, requires_grad=True)
    # Zero tolerances make implicit_adams take all max_iters corrector iterations in every step:
    # the discrete map is then smooth (no iteration count that finite differences could flip).
    kw = {"max_iters": 3, "rtol": 0.0, "atol": 0.0} if method == "implicit_adams" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert torch.autograd.gradcheck(lambda a, b: _final(method, a, b, **kw), (u0, p))


def test_forward_mode_matches_reverse_mode():
    p = torch.tensor(0.9, dtype=F64, requires_grad=True)
    u0 = torch.tensor([0.7, -0.3], dtype=F64)
    prob = dl.ODEProblem(lambda u, p, t: -p * u * u + torch.sin(u), u0, (0.0, 1.0), p)

    def reduction(sol):
        return sol.u[-1].sum()

    for method in dl.adams_methods():
        kw = {"dt": 0.1, "max_iters": 8}
        rd = torch.autograd.grad(dl.diffeq_rd(p, reduction, prob, method, **kw), p)[0]
        fd = torch.autograd.grad(dl.diffeq_fd(p, reduction, prob, method, **kw), p)[0]
        assert abs(float(rd) - float(fd)) < 1e-12


def test_bad_options():
    prob = dl.ODEProblem(growth, U0, (0.0, 1.0), 0.8)
    with pytest.raises(ValueError, match="dt"):
        dl.solve(prob, "explicit_adams")
    with pytest.raises(ValueError, match="max_order"):
        dl.solve(prob, "explicit_adams", dt=0.1, max_order=13)
    with pytest.raises(ValueError, match="max_order"):
        dl.solve(prob, "explicit_adams", dt=0.1, max_order=0)
    with pytest.raises(ValueError, match="max_iters"):
        dl.solve(prob, "implicit_adams", dt=0.1, max_iters=0)
    with pytest.raises(TypeError, match="max_iters"):
        dl.solve(prob, "implicit_adams", dt=0.1, max_iters=2.5)
    with pytest.raises(ValueError, match="Adams methods only"):
        dl.solve(prob, "rk4", dt=0.1, max_order=4)
    with pytest.raises(ValueError, match="Adams method"):
        dl.diffeq_adjoint(0.8, lambda s: s.u.sum(), prob, "explicit_adams", dt=0.1)
