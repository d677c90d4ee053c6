"""Consistency: determinism, float32 vs float64, methods against each other, and against scipy and
torchdiffeq when they are installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    LV_PARAMS,
    METHODS,
    accuracy_kwargs,
    lotka_volterra,
    lv_numpy,
    max_abs_err,
)

import diffeqlayers as dl

LV_U0 = [1.0, 1.0]
LV_T = 5.0
LV_TIMES = np.linspace(0.0, LV_T, 11)


def lv_problem(dtype=torch.float64, span=(0.0, LV_T)):
    return dl.ODEProblem(
        lotka_volterra, torch.tensor(LV_U0, dtype=dtype), span, torch.tensor(LV_PARAMS, dtype=dtype)
    )


@pytest.mark.parametrize("method", METHODS)
def test_same_solve_twice_is_bitwise_identical(method):
    kwargs = accuracy_kwargs(method, torch.float64)
    prob = lv_problem(span=(0.0, 1.0))
    a = dl.solve(prob, method, saveat=[0.3, 1.0], **kwargs)
    b = dl.solve(prob, method, saveat=[0.3, 1.0], **kwargs)
    assert torch.equal(a.t, b.t) and torch.equal(a.u, b.u)
    assert (a.stats.nfe, a.stats.naccept, a.stats.nreject) == (
        b.stats.nfe,
        b.stats.naccept,
        b.stats.nreject,
    )


def test_gradients_twice_are_identical():
    def grad():
        p = torch.tensor(LV_PARAMS, dtype=torch.float64, requires_grad=True)
        out = dl.diffeq_rd(
            p, lambda s: s.u[-1].sum(), lv_problem(span=(0.0, 1.0)), "tsit5", rtol=1e-8, atol=1e-8
        )
        (g,) = torch.autograd.grad(out, p)
        return g

    assert torch.equal(grad(), grad())


@pytest.mark.parametrize("method", ["rk4", "tsit5", "dopri5", "bosh3"])
def test_float32_agrees_with_float64(method):
    # Same settings in both dtypes: the float32 result differs from the float64 one by float32
    # rounding accumulated over the steps (~1e-7 relative per step), plus, for adaptive methods,
    # the difference of two solutions that each meet rtol = 1e-5 (K = 10: 1e-4 with |u| <= ~7).
    kwargs = {"dt": 0.01} if method == "rk4" else {"rtol": 1e-5, "atol": 1e-7}
    s64 = dl.solve(lv_problem(torch.float64, (0.0, 2.0)), method, saveat=[0.5, 1.0, 2.0], **kwargs)
    s32 = dl.solve(lv_problem(torch.float32, (0.0, 2.0)), method, saveat=[0.5, 1.0, 2.0], **kwargs)
    assert s32.u.dtype == torch.float32
    scale = float(s64.u.abs().max())
    steps = max(s32.stats.naccept, s64.stats.naccept)
    rounding = 4 * torch.finfo(torch.float32).eps * steps * scale
    tol = rounding if method == "rk4" else rounding + 2 * 10 * 1e-5 * scale
    assert max_abs_err(s32.u, s64.u) <= tol


def test_high_order_methods_agree_at_tight_tolerance():
    # Each is within ~K * rtol of the exact solution (K = 10, |u| <= ~7 on this orbit), so any two
    # are within 2 * 10 * 1e-11 * 7 = 1.4e-9. Saving every step of each and comparing at the
    # common end point avoids interpolation.
    ends = {}
    for method in ("dopri5", "tsit5", "dopri8"):
        sol = dl.solve(lv_problem(), method, rtol=1e-11, atol=1e-11)
        ends[method] = sol.u[-1]
    assert max_abs_err(ends["dopri5"], ends["tsit5"]) <= 1.4e-9
    assert max_abs_err(ends["dopri5"], ends["dopri8"]) <= 1.4e-9
    assert max_abs_err(ends["tsit5"], ends["dopri8"]) <= 1.4e-9


@pytest.fixture(scope="module")
def lv_reference():
    # tsit5 at rtol 1e-12 with a stop at every save time, so that no save point is interpolated.
    return dl.solve(
        lv_problem(),
        "tsit5",
        rtol=1e-12,
        atol=1e-12,
        saveat=torch.tensor(LV_TIMES),
        tstops=LV_TIMES.tolist(),
    )


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8"])
def test_high_order_methods_agree_at_save_points(method, lv_reference, request):
    # The same comparison at interior save points: every method's interpolant must keep the
    # solution's accuracy there.
    sol = dl.solve(lv_problem(), method, rtol=1e-10, atol=1e-10, saveat=torch.tensor(LV_TIMES))
    # rtol 1e-10, K = 10, |u| <= ~7: 7e-9; the reference is ~100 times closer.
    assert max_abs_err(sol.u, lv_reference.u) <= 7e-9


def test_scipy_agrees_on_lotka_volterra():
    integrate = pytest.importorskip("scipy.integrate")
    ref = integrate.solve_ivp(
        lv_numpy, (0.0, LV_T), LV_U0, method="DOP853", rtol=1e-10, atol=1e-10, t_eval=LV_TIMES
    )
    assert ref.success
    for method in ("dopri5", "tsit5"):
        sol = dl.solve(lv_problem(), method, rtol=1e-10, atol=1e-10, saveat=torch.tensor(LV_TIMES))
        # Both solutions are within ~K * rtol * |u| (K = 10, |u| <= ~7) of the exact one.
        assert np.abs(sol.u.numpy() - ref.y.T).max() <= 2 * 10 * 1e-10 * 7, method


def test_torchdiffeq_agrees_with_dopri5():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    p = torch.tensor(LV_PARAMS, dtype=torch.float64)
    u0 = torch.tensor(LV_U0, dtype=torch.float64)
    times = torch.tensor(LV_TIMES)
    for rtol in (1e-6, 1e-8):
        theirs = torchdiffeq.odeint(
            lambda t, u: lotka_volterra(u, p, t), u0, times, method="dopri5", rtol=rtol, atol=rtol
        )
        ours = dl.solve(lv_problem(), "dopri5", rtol=rtol, atol=rtol, saveat=times)
        # Same method and tolerance, different controllers and interpolants: the two solutions
        # differ by the sum of their global errors, each ~K * rtol * |u| (K = 10, |u| <= ~7).
        assert max_abs_err(ours.u, theirs) <= 2 * 10 * rtol * 7, rtol


def test_torchdiffeq_gradients_agree():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    u0 = torch.tensor(LV_U0, dtype=torch.float64)
    p1 = torch.tensor(LV_PARAMS, dtype=torch.float64, requires_grad=True)
    theirs = torchdiffeq.odeint(
        lambda t, u: lotka_volterra(u, p1, t),
        u0,
        torch.tensor([0.0, 1.0], dtype=torch.float64),
        method="dopri5",
        rtol=1e-10,
        atol=1e-10,
    )[-1].sum()
    (g1,) = torch.autograd.grad(theirs, p1)
    p2 = torch.tensor(LV_PARAMS, dtype=torch.float64, requires_grad=True)
    ours = dl.diffeq_rd(
        p2, lambda s: s.u[-1].sum(), lv_problem(span=(0.0, 1.0)), "dopri5", rtol=1e-10, atol=1e-10
    )
    (g2,) = torch.autograd.grad(ours, p2)
    # Both differentiate a discrete solution within ~1e-9 of the exact one.
    assert max_abs_err(g1, g2) <= 1e-7
