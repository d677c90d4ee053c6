"""Accuracy against exact solutions: every method, both dtypes, both directions, every saveat form.

Error bounds come from conftest.error_bound (order-p theory for fixed steps, a global-error
factor times rtol for adaptive methods, plus float32 rounding); see the comments there.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    ADAPTIVE,
    FIXED,
    METHODS,
    accuracy_kwargs,
    decay,
    decay_exact,
    error_bound,
    max_abs_err,
    oscillator,
    oscillator_exact,
)

import diffeqlayers as dl

DTYPES = [torch.float64, torch.float32]
SPANS = {"forward": (0.0, 2.0), "backward": (2.0, 0.0)}
# Uneven save times inside (0, 2), ends included, some very close to each other or to the ends.
UNEVEN = [0.0, 0.013, 0.3, 0.31, 1.1, 1.75, 1.9999, 2.0]


def _expected_times(mode: str, span: tuple[float, float]) -> list[float] | None:
    t0, t1 = span
    if mode == "spacing":
        step = 0.25 if t1 > t0 else -0.25
        return [t0 + k * step for k in range(9)]
    if mode in ("list", "tensor"):
        return UNEVEN if t1 > t0 else UNEVEN[::-1]
    return None


def _saveat_arg(mode: str, span: tuple[float, float]):
    times = _expected_times(mode, span)
    if mode == "spacing":
        return 0.25
    if mode == "list":
        return list(times)
    if mode == "tensor":
        return torch.tensor(times, dtype=torch.float64)
    return None


@pytest.mark.parametrize("mode", ["spacing", "list", "tensor", "every_step"])
@pytest.mark.parametrize("direction", list(SPANS))
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("method", METHODS)
def test_oscillator_matches_exact_solution(method, dtype, direction, mode, request):
    span = SPANS[direction]
    u0 = torch.tensor([1.0, 0.5], dtype=dtype)
    prob = dl.ODEProblem(oscillator, u0, span)
    sol = dl.solve(prob, method, saveat=_saveat_arg(mode, span), **accuracy_kwargs(method, dtype))

    assert sol.success and sol.retcode == dl.ReturnCode.Success and sol.message == ""
    assert sol.t.dtype == torch.float64 and sol.t.dim() == 1
    assert sol.u.dtype == dtype
    assert sol.u.shape == (len(sol.t), 2)
    expected_t = _expected_times(mode, span)
    if expected_t is not None:
        assert sol.t.tolist() == pytest.approx(expected_t, abs=1e-14)
    else:
        # Every step: starts at t0, ends exactly at t1, strictly monotone along the span.
        assert sol.t[0].item() == span[0] and sol.t[-1].item() == span[1]
        d = torch.diff(sol.t) * (1 if span[1] > span[0] else -1)
        assert bool((d > 0).all())
        assert len(sol.t) == sol.stats.naccept + 1
    # Saved times are exactly the ends when asked for them.
    assert sol.t[0].item() == span[0] and sol.t[-1].item() == span[1]
    assert torch.equal(sol.u[0], u0)

    err = max_abs_err(sol.u, oscillator_exact(u0, sol.t, t0=span[0]))
    bound = error_bound(method, dtype, abs(span[1] - span[0]), sol.stats.naccept)
    assert err <= bound, f"{method} error {err:.3e} exceeds {bound:.3e}"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(4, 2), (4, 3, 2)], ids=["B2", "B32"])
def test_batched_states(method, shape, request):
    gen = torch.Generator().manual_seed(0)
    u0 = torch.randn(shape, generator=gen, dtype=torch.float64) / 2
    prob = dl.ODEProblem(oscillator, u0, (0.0, 2.0))
    sol = dl.solve(prob, method, saveat=[0.0, 0.7, 2.0], **accuracy_kwargs(method, torch.float64))
    assert sol.u.shape == (3, *shape)
    err = max_abs_err(sol.u, oscillator_exact(u0, sol.t))
    assert err <= error_bound(method, torch.float64, 2.0, sol.stats.naccept)


@pytest.mark.parametrize("method", FIXED)
def test_fixed_step_batch_equals_separate_solves(method):
    # Fixed steps do not depend on the state, and every op is elementwise: the batched solve must
    # give each member exactly the values of its own solve.
    gen = torch.Generator().manual_seed(1)
    u0 = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    batched = dl.solve(dl.ODEProblem(oscillator, u0, (0.0, 1.0)), method, dt=0.1)
    for i in range(5):
        single = dl.solve(dl.ODEProblem(oscillator, u0[i], (0.0, 1.0)), method, dt=0.1)
        assert torch.equal(batched.t, single.t)
        assert torch.equal(batched.u[:, i], single.u)


@pytest.mark.parametrize("method", METHODS)
def test_convergence_order(method):
    # Error at the end of the oscillator over (0, 4) with steps dt and dt/2 (adaptive tableaus
    # stepped with adaptive=False): the ratio must show the tableau's order p. Linear problems can
    # show a little more than p (the stability polynomial may match exp(z) beyond order p), so
    # the window is [p - 0.2, p + 1.5]. Step sizes keep errors well above rounding.
    order = dl.tableau(method).order
    dt = {1: 0.1, 2: 0.1, 3: 0.1, 4: 0.1, 5: 0.2, 8: 0.5}[order]
    u0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    prob = dl.ODEProblem(oscillator, u0, (0.0, 4.0))
    errs = []
    for h in (dt, dt / 2):
        sol = dl.solve(prob, method, dt=h, adaptive=False, saveat=[4.0])
        errs.append(max_abs_err(sol.u[-1], oscillator_exact(u0, 4.0)))
    observed = math.log2(errs[0] / errs[1])
    assert order - 0.2 <= observed <= order + 1.5, (method, errs, observed)


@pytest.mark.parametrize("method", FIXED)
def test_fixed_step_count_and_stats(method):
    tab = dl.tableau(method)
    prob = dl.ODEProblem(decay, torch.tensor([1.0], dtype=torch.float64), (0.0, 1.0), 0.5)
    sol = dl.solve(prob, method, dt=0.1)
    assert sol.stats.naccept == 10 and sol.stats.nreject == 0
    assert len(sol.t) == 11
    assert sol.t.tolist() == pytest.approx([0.1 * k for k in range(11)], abs=1e-14)
    # Every stage of every step, the step's end state reused as the next step's first stage:
    # stages * naccept evaluations in all.
    assert sol.stats.nfe == tab.stages * sol.stats.naccept
    # A span that is not a multiple of dt ends with a short step that lands exactly on t1.
    sol = dl.solve(remake_span(prob, (0.0, 1.05)), method, dt=0.1)
    assert sol.stats.naccept == 11 and sol.t[-1].item() == 1.05
    assert sol.t[-1].item() - sol.t[-2].item() == pytest.approx(0.05, abs=1e-12)


def remake_span(prob, span):
    return dl.remake(prob, tspan=span)


@pytest.mark.parametrize("method", ADAPTIVE)
def test_adaptive_stats(method):
    tab = dl.tableau(method)
    u0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    prob = dl.ODEProblem(oscillator, u0, (0.0, 2.0))
    # A first step across the whole span is far too large for rtol=1e-5: it must be rejected.
    sol = dl.solve(prob, method, rtol=1e-5, atol=1e-7, dt=2.0)
    s = sol.stats
    assert s.nreject >= 1 and s.naccept >= 1 and s.nfe > 0
    assert len(sol.t) == s.naccept + 1
    if tab.fsal:
        # f(t0, u0), then stages - 1 new evaluations per attempted step (the last stage is f at
        # the new state and serves as the next first stage).
        assert s.nfe == 1 + (tab.stages - 1) * (s.naccept + s.nreject)
    else:
        # stages - 1 per attempt, plus f at each accepted state but the last.
        assert s.nfe == 1 + (tab.stages - 1) * (s.naccept + s.nreject) + (s.naccept - 1)
    # Rejected first step or not, the result meets the method's accuracy.
    err = max_abs_err(sol.u, oscillator_exact(u0, sol.t))
    assert err <= (10 if method != "fehlberg2" else 200) * 1e-5


def test_save_start_false():
    u0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    prob = dl.ODEProblem(oscillator, u0, (0.0, 1.0))
    full = dl.solve(prob, "rk4", dt=0.25)
    no_start = dl.solve(prob, "rk4", dt=0.25, save_start=False)
    assert no_start.t.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert torch.equal(no_start.u, full.u[1:])
    assert len(no_start) == no_start.stats.naccept


def test_spacing_that_does_not_divide_the_span_ends_at_t1():
    prob = dl.ODEProblem(decay, torch.tensor([1.0], dtype=torch.float64), (0.0, 1.0), 1.0)
    sol = dl.solve(prob, "tsit5", saveat=0.3, rtol=1e-10, atol=1e-12)
    assert sol.t.tolist() == pytest.approx([0.0, 0.3, 0.6, 0.9, 1.0], abs=1e-15)
    assert sol.t[-1].item() == 1.0
    assert max_abs_err(sol.u, decay_exact(prob.u0, 1.0, sol.t)) <= 1e-9


def test_spacing_with_rounding_does_not_add_a_sliver():
    # 0.1 * 10 is not exactly 1 in binary; the spacing must still give 11 points ending at t1.
    prob = dl.ODEProblem(decay, torch.tensor([1.0], dtype=torch.float64), (0.0, 1.0), 1.0)
    sol = dl.solve(prob, "rk4", dt=0.05, saveat=0.1)
    assert len(sol.t) == 11 and sol.t[-1].item() == 1.0


def test_float32_saveat_tensor_within_rounding_of_the_ends():
    # float32(0.7) = 0.69999998808 lies below t0 = 0.7 and float32(2.7) = 2.7000000477 above
    # t1 = 2.7: a float32 time grid must still be accepted for the float64 span (the ends within
    # float32 rounding) and its first and last points snapped onto the span's ends.
    u0 = torch.tensor([1.0, 0.0], dtype=torch.float32)
    prob = dl.ODEProblem(oscillator, u0, (0.7, 2.7))
    times = torch.linspace(0.7, 2.7, 12, dtype=torch.float32)
    assert times[0].item() < 0.7 and times[-1].item() > 2.7
    sol = dl.solve(prob, "tsit5", saveat=times, rtol=1e-5, atol=1e-7)
    assert len(sol.t) == 12
    assert sol.t[0].item() == 0.7 and sol.t[-1].item() == 2.7
    assert torch.equal(sol.t[1:-1], times[1:-1].double())
    # tsit5 at rtol 1e-5 (K = 10) plus float32 rounding of ~20 steps.
    assert max_abs_err(sol.u, oscillator_exact(u0, sol.t, t0=0.7)) <= 1e-4 + 1e-5


# ----------------------------------------------------------------------------------------------
# tstops
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", list(SPANS))
@pytest.mark.parametrize("method", ["rk4", "euler", "tsit5", "dopri5", "bosh3", "dopri8"])
def test_tstops_are_landed_on_exactly(method, direction):
    span = SPANS[direction]
    stops = [0.3, 1.234567, 1.9]
    prob = dl.ODEProblem(oscillator, torch.tensor([1.0, 0.0], dtype=torch.float64), span)
    kwargs = {"dt": 0.1} if method in FIXED else {"rtol": 1e-6, "atol": 1e-8}
    # Stops outside the span (and at its ends) are ignored, in any order, duplicates allowed.
    sol = dl.solve(prob, method, tstops=[1.9, 5.0, 0.3, -1.0, 1.234567, 0.3], **kwargs)
    times = sol.t.tolist()
    for ts in stops:
        assert ts in times, f"tstop {ts} not among the step times"
    assert times[0] == span[0] and times[-1] == span[1]
    assert all(min(span) <= t <= max(span) for t in times)
    d = torch.diff(sol.t) * (1 if span[1] > span[0] else -1)
    assert bool((d > 0).all())
    err = max_abs_err(sol.u, oscillator_exact(prob.u0, sol.t, t0=span[0]))
    # Fixed: T h^p (steps cut short at the stops only shrink the error); adaptive: K * rtol.
    order = dl.tableau(method).order
    assert err <= (2.0 * 0.1**order if method in FIXED else 10 * 1e-6)


def test_tstop_at_a_kink_makes_rk4_exact():
    # u' = |t - 1/2|: u(t) = integral_0^t |s - 1/2| ds, so u(1) = 1/4. Within each piece the
    # integrand is linear and rk4 (Simpson's rule for quadrature) integrates it exactly; a step
    # across the kink at 1/2 does not. With a stop at 1/2 the result is exact up to rounding.
    def kink(u, p, t):
        return torch.full_like(u, abs(t - 0.5))

    prob = dl.ODEProblem(kink, torch.zeros(1, dtype=torch.float64), (0.0, 1.0))
    with_stop = dl.solve(prob, "rk4", dt=0.35, tstops=[0.5], saveat=[1.0])
    without = dl.solve(prob, "rk4", dt=0.35, saveat=[1.0])
    assert abs(with_stop.u[-1].item() - 0.25) <= 1e-15
    assert abs(without.u[-1].item() - 0.25) > 1e-3


# ----------------------------------------------------------------------------------------------
# dense output
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", list(SPANS))
@pytest.mark.parametrize("method", METHODS)
def test_dense_output_matches_exact_solution(method, direction):
    span = SPANS[direction]
    u0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    prob = dl.ODEProblem(oscillator, u0, span)
    sol = dl.solve(
        prob, method, dense=True, saveat=[span[1]], **accuracy_kwargs(method, torch.float64)
    )
    # Arbitrary times, mostly strictly between the steps, the ends included.
    gen = torch.Generator().manual_seed(2)
    times = torch.cat(
        [torch.tensor([0.0, 2.0]), 2.0 * torch.rand(40, generator=gen, dtype=torch.float64)]
    )
    values = sol(times)
    assert values.shape == (42, 2) and values.dtype == torch.float64
    err = max_abs_err(values, oscillator_exact(u0, times, t0=span[0]))
    bound = error_bound(method, torch.float64, 2.0, sol.stats.naccept)
    if not dl.tableau(method).has_dense and dl.tableau(method).order > 4:
        # dopri8 has no own interpolant: between steps it uses the cubic Hermite interpolant,
        # whose error is at most h^4 / 384 * max|u''''| (|u''''| = |u| <= |u0| = 1.118 for the
        # oscillator), added to the error at the step ends. h is the longest step taken.
        steps = dl.solve(prob, method, **accuracy_kwargs(method, torch.float64)).t
        h = float(steps.diff().abs().max())
        bound += h**4 / 384 * float(u0.norm())
    assert err <= bound, f"{method} dense error {err:.3e} exceeds {bound:.3e}"
    # Scalar evaluation agrees with the stacked one, and hits the ends exactly.
    assert torch.equal(sol(float(times[5])), values[5])
    assert torch.equal(sol(span[0]), u0)


@pytest.mark.parametrize("direction", list(SPANS))
def test_dense_output_outside_the_span_raises(direction):
    span = SPANS[direction]
    prob = dl.ODEProblem(oscillator, torch.tensor([1.0, 0.0], dtype=torch.float64), span)
    sol = dl.solve(prob, "tsit5", dense=True)
    for bad in (-0.1, 2.1, 100.0, float("nan")):
        with pytest.raises(ValueError, match="outside the solved span"):
            sol(bad)
    with pytest.raises(ValueError, match="outside the solved span"):
        sol(torch.tensor([0.5, 2.5], dtype=torch.float64))


def test_evaluating_a_solution_without_dense_output_raises():
    prob = dl.ODEProblem(oscillator, torch.tensor([1.0, 0.0], dtype=torch.float64), (0.0, 1.0))
    sol = dl.solve(prob, "tsit5")
    with pytest.raises(ValueError, match="dense=True"):
        sol(0.5)


# ----------------------------------------------------------------------------------------------
# dt_max
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ADAPTIVE)
def test_dt_max_is_respected(method):
    prob = dl.ODEProblem(oscillator, torch.tensor([1.0, 0.0], dtype=torch.float64), (0.0, 2.0))
    free = dl.solve(prob, method, rtol=1e-3, atol=1e-5)
    natural = float(torch.diff(free.t).max())
    dt_max = natural / 2
    capped = dl.solve(prob, method, rtol=1e-3, atol=1e-5, dt_max=dt_max)
    steps = torch.diff(capped.t)
    assert float(steps.max()) <= dt_max * (1 + 1e-12)
    assert capped.stats.naccept > free.stats.naccept  # the cap was binding
    # Backwards in time too.
    back = dl.solve(dl.remake(prob, tspan=(2.0, 0.0)), method, rtol=1e-3, atol=1e-5, dt_max=dt_max)
    assert float((-torch.diff(back.t)).max()) <= dt_max * (1 + 1e-12)


def test_dt_max_caps_a_given_first_step():
    prob = dl.ODEProblem(oscillator, torch.tensor([1.0, 0.0], dtype=torch.float64), (0.0, 1.0))
    sol = dl.solve(prob, "dopri5", dt=0.5, dt_max=0.01, rtol=1e-3)
    assert float(torch.diff(sol.t).max()) <= 0.01 * (1 + 1e-12)
