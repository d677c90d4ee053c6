"""Bad input and failing solves: the exception type, and a message that names the cause.

Nothing here may crash the interpreter: the risky cases (Python exceptions thrown through the C++
loop, NaN states, step-size underflow, partial solutions) run in this very process, so a
segfault or abort would take the test session down with it.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import (
    FIXED,
    METHODS,
    decay,
    oscillator,
)

import diffeqlayers as dl

U0 = torch.tensor([1.0, 0.0], dtype=torch.float64)


def osc_problem(span=(0.0, 1.0), u0=U0):
    return dl.ODEProblem(oscillator, u0, span)


# ----------------------------------------------------------------------------------------------
# The state and what f returns
# ----------------------------------------------------------------------------------------------


def test_f_returning_another_shape():
    prob = dl.ODEProblem(lambda u, p, t: u[:1], U0, (0.0, 1.0))
    with pytest.raises(ValueError, match=r"f returned shape \[1\] but the state has shape \[2\]"):
        dl.solve(prob, "tsit5")


def test_f_returning_another_dtype():
    prob = dl.ODEProblem(lambda u, p, t: oscillator(u, p, t).float(), U0, (0.0, 1.0))
    with pytest.raises(TypeError, match=r"f returned dtype Float but the state has dtype Double"):
        dl.solve(prob, "rk4", dt=0.1)


@pytest.mark.parametrize("value", [1.0, None, [0.0, 1.0]], ids=["float", "None", "list"])
def test_f_returning_a_non_tensor(value):
    prob = dl.ODEProblem(lambda u, p, t: value, U0, (0.0, 1.0))
    with pytest.raises(
        TypeError, match=r"f must return a torch\.Tensor, got .*" + type(value).__name__
    ):
        dl.solve(prob, "tsit5")


def test_f_returning_a_numpy_array():
    prob = dl.ODEProblem(lambda u, p, t: u.numpy(), U0, (0.0, 1.0))
    with pytest.raises(TypeError, match=r"f must return a torch\.Tensor.*ndarray"):
        dl.solve(prob, "rk4", dt=0.1)


@pytest.mark.parametrize(
    "u0",
    [
        torch.tensor([1, 0]),
        torch.tensor([True, False]),
        torch.tensor([1.0, 0.0], dtype=torch.float16),
    ],
    ids=["int64", "bool", "float16"],
)
def test_non_floating_or_unsupported_u0_dtype(u0):
    with pytest.raises(TypeError, match=r"u0 must be float32 or float64"):
        dl.solve(dl.ODEProblem(oscillator, u0, (0.0, 1.0)), "tsit5")


def test_complex_u0_is_rejected():
    u0 = torch.tensor([1.0 + 0j, 0.0 + 0j])
    with pytest.raises(TypeError, match=r"u0 must be float32 or float64"):
        dl.solve(dl.ODEProblem(oscillator, u0, (0.0, 1.0)), "tsit5")


# (A callable u0 is legitimate: u0(p, t0). What it returns is checked at solve time, in
# test_api.py::test_u0_and_tspan_as_functions_of_p.)
@pytest.mark.parametrize("u0", [[1.0, 0.0], 1.0, "x"], ids=["list", "float", "str"])
def test_u0_not_a_tensor(u0):
    with pytest.raises(TypeError, match=r"u0 must be a torch\.Tensor"):
        dl.ODEProblem(oscillator, u0, (0.0, 1.0))
    with pytest.raises(TypeError, match=r"u0 must be a torch\.Tensor"):
        dl.solve(osc_problem(), "tsit5", u0=u0)


def test_empty_u0():
    with pytest.raises(ValueError, match=r"u0 is empty"):
        dl.solve(
            dl.ODEProblem(oscillator, torch.zeros(0, 2, dtype=torch.float64), (0.0, 1.0)), "tsit5"
        )


def test_u0_and_p_on_different_dtypes():
    prob = dl.ODEProblem(
        decay,
        torch.tensor([1.0], dtype=torch.float32),
        (0.0, 1.0),
        torch.tensor(0.5, dtype=torch.float64),
    )
    with pytest.raises(TypeError, match=r"parameter 0 has dtype Double but u0 has dtype Float"):
        dl.solve(prob, "tsit5")


def test_module_parameters_on_another_dtype_than_u0():
    model = torch.nn.Linear(2, 2)  # float32 weights
    prob = dl.ODEProblem(lambda u, p, t: p(u), U0, (0.0, 1.0), model)
    with pytest.raises(TypeError, match=r"has dtype Float but u0 has dtype Double"):
        dl.solve(prob, "rk4", dt=0.1)


def test_integer_parameters_are_not_a_dtype_clash():
    # Non-floating parameter tensors (indices, counts) are not compared with u0's dtype.
    idx = torch.tensor([1, 0])
    prob = dl.ODEProblem(lambda u, p, t: -u[p], U0, (0.0, 1.0), idx)
    sol = dl.solve(prob, "rk4", dt=0.1)
    assert sol.success


# ----------------------------------------------------------------------------------------------
# Times
# ----------------------------------------------------------------------------------------------


def test_tspan_with_t0_equal_t1():
    with pytest.raises(ValueError, match=r"tspan is empty: t0 == t1"):
        dl.solve(osc_problem(span=(1.0, 1.0)), "tsit5")


@pytest.mark.parametrize("span", [(0.0, math.inf), (math.nan, 1.0)], ids=["inf", "nan"])
def test_tspan_not_finite(span):
    with pytest.raises(ValueError, match=r"tspan holds a non-finite time"):
        dl.solve(osc_problem(span=span), "tsit5")


def test_tspan_not_a_pair():
    with pytest.raises(ValueError, match=r"tspan must be a pair"):
        dl.ODEProblem(oscillator, U0, (0.0, 1.0, 2.0))


def test_tspan_entries_of_the_wrong_kind():
    with pytest.raises(TypeError, match=r"tspan entries must be numbers or tensors, got str"):
        dl.solve(osc_problem(span=("0", 1.0)), "tsit5")
    with pytest.raises(ValueError, match=r"tspan entries must be scalars"):
        dl.solve(osc_problem(span=(torch.tensor([0.0, 1.0]), 1.0)), "tsit5")


@pytest.mark.parametrize(
    "saveat,pattern",
    [
        (
            [0.0, 0.5, 0.3, 1.0],
            r"saveat must be strictly increasing.*saveat\[2\]=0\.3 follows 0\.5",
        ),
        ([0.0, 0.5, 0.5, 1.0], r"saveat holds the time 0\.5 twice"),
        ([], r"saveat is empty"),
        (torch.tensor([], dtype=torch.float64), r"saveat is empty"),
        ([0.0, 0.5, 1.5], r"saveat\[2\]=1\.5 lies outside the span \[0, 1\]"),
        ([-0.5, 0.5], r"saveat\[0\]=-0\.5 lies outside the span"),
        ([0.0, math.nan], r"saveat\[1\] is not finite"),
        (torch.zeros(2, 2, dtype=torch.float64), r"saveat must be 1-D"),
        (0.0, r"saveat as a spacing must be positive"),
        (-0.1, r"saveat as a spacing must be positive"),
        (math.inf, r"saveat as a spacing must be positive"),
    ],
    ids=[
        "not_monotone",
        "duplicate",
        "empty_list",
        "empty_tensor",
        "after_end",
        "before_start",
        "nan",
        "2d",
        "zero_spacing",
        "negative_spacing",
        "inf_spacing",
    ],
)
def test_bad_saveat(saveat, pattern):
    with pytest.raises(ValueError, match=pattern):
        dl.solve(osc_problem(), "tsit5", saveat=saveat)


def test_saveat_in_the_wrong_direction_for_a_backward_solve():
    with pytest.raises(
        ValueError, match=r"saveat must be strictly decreasing \(the direction of tspan\)"
    ):
        dl.solve(osc_problem(span=(1.0, 0.0)), "tsit5", saveat=[0.0, 0.5, 1.0])


def test_saveat_of_the_wrong_type():
    with pytest.raises(
        TypeError, match=r"saveat must be a spacing, a sequence of times or a tensor"
    ):
        dl.solve(osc_problem(), "tsit5", saveat=True)
    with pytest.raises(TypeError, match=r"saveat must hold real numbers"):
        dl.solve(osc_problem(), "tsit5", saveat=torch.tensor([True, False]))


def test_tstops_not_finite():
    with pytest.raises(ValueError, match=r"tstops holds a non-finite time"):
        dl.solve(osc_problem(), "tsit5", tstops=[math.nan])


# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,value", [("rtol", -1e-6), ("atol", -1e-9), ("rtol", math.nan), ("atol", math.inf)]
)
def test_negative_or_non_finite_tolerance(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be a non-negative number"):
        dl.solve(osc_problem(), "tsit5", **{name: value})


def test_both_tolerances_zero():
    with pytest.raises(ValueError, match=r"rtol and atol are both zero"):
        dl.solve(osc_problem(), "tsit5", rtol=0.0, atol=0.0)


def test_one_zero_tolerance_is_allowed():
    # A purely absolute (rtol = 0) or purely relative (atol = 0, state away from 0) tolerance is
    # a valid mixed norm; only both zero is meaningless.
    assert dl.solve(osc_problem(), "tsit5", rtol=0.0, atol=1e-8).success
    prob = dl.ODEProblem(decay, torch.tensor([1.0], dtype=torch.float64), (0.0, 1.0), 1.0)
    assert dl.solve(prob, "tsit5", rtol=1e-8, atol=0.0).success


@pytest.mark.parametrize("dt", [-0.1, 0.0, math.nan])
def test_non_positive_dt(dt):
    with pytest.raises(ValueError, match=r"dt must be positive"):
        dl.solve(osc_problem(), "rk4", dt=dt)


def test_infinite_dt():
    with pytest.raises(ValueError, match=r"dt must be a positive number"):
        dl.solve(osc_problem(), "rk4", dt=math.inf)


@pytest.mark.parametrize("method", FIXED)
def test_fixed_step_method_without_dt(method):
    with pytest.raises(
        ValueError, match=rf"method '{method}' takes fixed steps: give a step size dt"
    ):
        dl.solve(osc_problem(), method)


def test_adaptive_false_without_dt():
    with pytest.raises(ValueError, match=r"method 'tsit5' takes fixed steps: give a step size dt"):
        dl.solve(osc_problem(), "tsit5", adaptive=False)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown method 'rk45'") as info:
        dl.solve(osc_problem(), "rk45")
    for name in METHODS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match=r"unknown method 'nope'"):
        dl.tableau("nope")


def test_method_not_a_string():
    with pytest.raises(TypeError, match=r"solver must be a method name \(str\), got int"):
        dl.solve(osc_problem(), 3)


def test_bad_step_bounds_and_limits():
    with pytest.raises(ValueError, match=r"dt_min \(1\) exceeds dt_max \(0\.1\)"):
        dl.solve(osc_problem(), "tsit5", dt_min=1.0, dt_max=0.1)
    with pytest.raises(ValueError, match=r"dt_max must be positive"):
        dl.solve(osc_problem(), "tsit5", dt_max=0.0)
    with pytest.raises(ValueError, match=r"dt_min must be non-negative"):
        dl.solve(osc_problem(), "tsit5", dt_min=-1.0)
    with pytest.raises(ValueError, match=r"max_num_steps must be positive"):
        dl.solve(osc_problem(), "tsit5", max_num_steps=0)


def test_bad_controller():
    with pytest.raises(ValueError, match=r"controller must be one of \['I', 'PI', 'PID'\]"):
        dl.solve(osc_problem(), "tsit5", controller="X")
    with pytest.raises(TypeError, match=r"controller must be a name or ControllerOptions"):
        dl.solve(osc_problem(), "tsit5", controller=3)


def test_bad_adjoint_options_raise_even_after_good_ones_were_kept():
    """diffeq_adjoint keeps the options of recent configurations: a bad value must still be
    refused after a good one that compares equal to it (True == 1) was kept."""

    def run(**kw):
        return dl.diffeq_adjoint(None, lambda s: s.u, osc_problem(), "tsit5", saveat=[1.0], **kw)

    run(sensealg="discrete", checkpoints=1, adjoint_rtol=1e-6)
    with pytest.raises(ValueError, match=r"checkpoints must be a non-negative integer, got True"):
        run(sensealg="discrete", checkpoints=True, adjoint_rtol=1e-6)
    with pytest.raises(ValueError, match=r"checkpoints must be a non-negative integer, got -1"):
        run(checkpoints=-1)
    with pytest.raises(ValueError, match=r"sensealg must be one of"):
        run(sensealg="magic")
    with pytest.raises(ValueError, match=r"sensealg must be one of"):
        run(sensealg=["discrete"])  # unhashable: checked without the kept options
    with pytest.raises(TypeError, match=r"adjoint_rtol must be a number, got list"):
        run(adjoint_rtol=[1e-6])
    with pytest.raises(ValueError, match=r"adjoint_atol must be non-negative, got -1"):
        run(adjoint_atol=-1.0)
    with pytest.raises(ValueError, match=r"unknown adjoint_method 'nope'"):
        run(adjoint_method="nope")


def test_bad_problem_and_reduction():
    with pytest.raises(TypeError, match=r"prob must be an ODEProblem, got str"):
        dl.solve("problem", "tsit5")
    with pytest.raises(TypeError, match=r"f must be callable"):
        dl.ODEProblem(3, U0, (0.0, 1.0))
    with pytest.raises(TypeError, match=r"reduction must be callable, got int"):
        dl.diffeq_rd(None, 3, osc_problem())


# ----------------------------------------------------------------------------------------------
# Exceptions raised inside callbacks
# ----------------------------------------------------------------------------------------------


class CustomError(Exception):
    pass


@pytest.mark.parametrize("method", ["rk4", "tsit5", "dopri8"])
@pytest.mark.parametrize("exc_type", [ValueError, KeyError, ZeroDivisionError, CustomError])
def test_exception_in_f_propagates_with_its_type_and_a_note(exc_type, method):
    def f(u, p, t):
        if t > 0.5:
            raise exc_type("boom from f")
        return oscillator(u, p, t)

    kwargs = {"dt": 0.1} if method in FIXED else {}
    with pytest.raises(exc_type, match="boom from f") as info:
        dl.solve(dl.ODEProblem(f, U0, (0.0, 1.0)), method, **kwargs)
    assert type(info.value) is exc_type
    notes = getattr(info.value, "__notes__", [])
    assert any(re.search(r"raised by the dynamics f at t=0\.[5-9]", n) for n in notes), notes


def test_exception_in_f_at_the_first_call():
    def f(u, p, t):
        raise RuntimeError("first call fails")

    with pytest.raises(RuntimeError, match="first call fails") as info:
        dl.solve(dl.ODEProblem(f, U0, (0.0, 1.0)), "tsit5")
    assert not isinstance(info.value, dl.SolverError)
    assert any("t=0" in n for n in getattr(info.value, "__notes__", []))


def test_exception_in_f_under_grad_and_with_time_gradients():
    # The extra evaluations of f for tspan gradients run outside the loop; they must propagate
    # exceptions the same way.
    t1 = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)

    def f(u, p, t):
        if t == 1.0:
            raise ArithmeticError("at the end")
        return oscillator(u, p, t)

    with pytest.raises(ArithmeticError, match="at the end"):
        dl.solve(dl.ODEProblem(f, U0, (0.0, t1)), "rk4", dt=0.25)


def test_exception_in_the_error_norm():
    with pytest.raises(ZeroDivisionError) as info:
        dl.solve(osc_problem(), "tsit5", norm=lambda x: 1 / 0)
    assert any("error norm" in n for n in getattr(info.value, "__notes__", []))
    with pytest.raises(TypeError, match=r"norm must return a tensor or a float"):
        dl.solve(osc_problem(), "tsit5", norm=lambda x: "not a number")


def test_solve_still_works_after_a_callback_raised():
    # The error state of the interpreter must be clean after a propagated exception.
    with pytest.raises(ValueError):
        dl.solve(
            dl.ODEProblem(lambda u, p, t: (_ for _ in ()).throw(ValueError("x")), U0, (0.0, 1.0)),
            "tsit5",
        )
    sol = dl.solve(osc_problem(), "rk4", dt=0.1)
    assert sol.success and len(sol) == 11


# ----------------------------------------------------------------------------------------------
# Failing solves: SolverError, its message, and throw_on_failure=False
# ----------------------------------------------------------------------------------------------


def _nan_after_half(u, p, t):
    out = oscillator(u, p, t)
    return out * math.nan if t > 0.5 else out


T_DT = r"at t=[-0-9.e]+, dt=[-0-9.e]+"


@pytest.mark.parametrize("method", METHODS)
def test_nan_in_the_state(method, request):
    kwargs = {"dt": 0.1} if method in FIXED else {}
    with pytest.raises(dl.SolverError, match=r"non-finite \(NaN/Inf\)") as info:
        dl.solve(dl.ODEProblem(_nan_after_half, U0, (0.0, 1.0)), method, **kwargs)
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert re.search(r"failed \(Unstable\) " + T_DT, msg), msg
    t_fail = float(re.search(r"at t=([-0-9.e]+)", msg).group(1))
    if method in FIXED:
        # dt = 0.1: the first step whose stages see t > 0.5 starts at 0.5 (or at 0.6 for euler,
        # whose only stage is at the start of the step).
        assert t_fail == pytest.approx(0.6 if method == "euler" else 0.5, abs=1e-9), msg
    else:
        # Adaptive steps shrink until they reach t = 0.5, the last time where f is finite.
        assert t_fail == pytest.approx(0.5, abs=1e-9), msg


def test_nan_in_u0():
    u0 = torch.tensor([math.nan, 0.0], dtype=torch.float64)
    with pytest.raises(dl.SolverError, match=r"the initial state or f\(t0, u0\) is not finite"):
        dl.solve(dl.ODEProblem(oscillator, u0, (0.0, 1.0)), "tsit5")


def test_check_finite_false_carries_nan_on():
    sol = dl.solve(
        dl.ODEProblem(_nan_after_half, U0, (0.0, 1.0)), "rk4", dt=0.1, check_finite=False
    )
    assert sol.success
    assert bool(torch.isnan(sol.u[-1]).all()) and bool(torch.isfinite(sol.u[:5]).all())


def _blowup(u, p, t):
    return u * u  # u' = u^2, u(0) = 1: u = 1 / (1 - t) blows up at t = 1


def test_step_size_underflow_at_a_singularity():
    prob = dl.ODEProblem(_blowup, torch.tensor([1.0], dtype=torch.float64), (0.0, 2.0))
    with pytest.raises(dl.SolverError, match=r"step size underflow") as info:
        dl.solve(prob, "tsit5")
    msg = str(info.value)
    assert re.search(r"failed \(DtLessThanMin\) " + T_DT, msg), msg
    t_fail = float(re.search(r"at t=([-0-9.e]+)", msg).group(1))
    dt_fail = float(re.search(r"dt=([-0-9.e]+)", msg).group(1))
    assert abs(t_fail - 1.0) < 1e-3 and 0 < dt_fail < 1e-6


def test_dt_min_violation():
    prob = dl.ODEProblem(_blowup, torch.tensor([1.0], dtype=torch.float64), (0.0, 2.0))
    with pytest.raises(dl.SolverError, match=r"below dt_min=0\.001") as info:
        dl.solve(prob, "dopri5", dt_min=1e-3)
    assert re.search(r"\(DtLessThanMin\) " + T_DT, str(info.value))


def test_fixed_step_blowup_is_reported_as_non_finite():
    prob = dl.ODEProblem(_blowup, torch.tensor([1.0], dtype=torch.float64), (0.0, 2.0))
    with pytest.raises(dl.SolverError, match=r"non-finite.*try a smaller dt"):
        dl.solve(prob, "rk4", dt=0.01)


@pytest.mark.parametrize("method,kwargs", [("tsit5", {}), ("rk4", {"dt": 0.01})])
def test_max_num_steps_exceeded(method, kwargs):
    with pytest.raises(dl.SolverError, match=r"max_num_steps \(5\) reached") as info:
        dl.solve(osc_problem(), method, max_num_steps=5, **kwargs)
    assert re.search(r"\(MaxIters\) " + T_DT, str(info.value))
    assert "accepted=5" in str(info.value)


@pytest.mark.parametrize("saveat", [None, [0.0, 0.001, 0.5, 1.0]], ids=["every_step", "list"])
def test_throw_on_failure_false_returns_the_partial_solution(saveat):
    sol = dl.solve(osc_problem(), "tsit5", max_num_steps=5, throw_on_failure=False, saveat=saveat)
    assert sol.retcode == dl.ReturnCode.MaxIters and not sol.success
    assert "max_num_steps (5) reached" in sol.message
    assert sol.stats.naccept == 5
    # What was saved before the failure, and nothing after it.
    t_fail = float(re.search(r"at t=([-0-9.e]+)", sol.message).group(1))
    assert sol.t[0].item() == 0.0 and sol.t[-1].item() <= t_fail + 1e-9
    if saveat is None:
        assert len(sol.t) == 6 and sol.t[-1].item() == pytest.approx(t_fail, abs=1e-9)
    else:
        assert sol.t.tolist() == [0.0, 0.001]
    assert sol.u.shape == (len(sol.t), 2)
    assert "MaxIters" in repr(sol)


def test_throw_on_failure_false_unstable_and_underflow():
    sol = dl.solve(
        dl.ODEProblem(_nan_after_half, U0, (0.0, 1.0)), "rk4", dt=0.1, throw_on_failure=False
    )
    assert sol.retcode == dl.ReturnCode.Unstable
    assert "non-finite" in sol.message
    assert sol.t[-1].item() == pytest.approx(0.5) and bool(torch.isfinite(sol.u).all())

    prob = dl.ODEProblem(_blowup, torch.tensor([1.0], dtype=torch.float64), (0.0, 2.0))
    sol = dl.solve(prob, "tsit5", throw_on_failure=False)
    assert sol.retcode == dl.ReturnCode.DtLessThanMin and "step size underflow" in sol.message
    assert sol.t[-1].item() < 1.0 + 1e-3
    # The part that was solved is right: u = 1 / (1 - t) up to close to the singularity.
    early = sol.t < 0.9
    exact = 1.0 / (1.0 - sol.t[early])
    assert float(((sol.u[early, 0] - exact) / exact).abs().max()) <= 1e-5


def test_partial_dense_solution_evaluates_inside_what_was_solved():
    sol = dl.solve(osc_problem(), "tsit5", max_num_steps=3, dense=True, throw_on_failure=False)
    assert sol.retcode == dl.ReturnCode.MaxIters
    reached = sol.t[-1].item()
    mid = reached / 2
    assert torch.allclose(
        sol(mid),
        torch.tensor([math.cos(mid), -math.sin(mid)], dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )
    with pytest.raises(ValueError, match=r"outside the solved span"):
        sol(0.9)


def test_partial_solution_with_nothing_saved_has_an_empty_state_tensor(request):
    # A solve that fails at t0 before reaching its first save time saved nothing. The Solution
    # promises u of shape [n, *u0.shape]; with n = 0 that is an empty [0, 2] tensor, not None.
    u0 = torch.tensor([math.nan, 0.0], dtype=torch.float64)
    sol = dl.solve(
        dl.ODEProblem(oscillator, u0, (0.0, 1.0)),
        "rk4",
        dt=0.1,
        saveat=[0.5, 1.0],
        throw_on_failure=False,
    )
    assert sol.retcode == dl.ReturnCode.Unstable
    assert len(sol) == 0 and sol.t.shape == (0,)
    assert isinstance(sol.u, torch.Tensor) and sol.u.shape == (0, 2)


def test_solver_error_is_a_runtime_error_subclass():
    assert issubclass(dl.SolverError, RuntimeError)


def test_u0_and_p_on_different_devices():
    # The meta device stands in for a second device on a machine without a GPU: the check is
    # the same comparison of devices that a CUDA/CPU mix would fail.
    u0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    p = torch.ones(4, dtype=torch.float64, device="meta")
    prob = dl.ODEProblem(lambda u, p, t: -u, u0, (0.0, 1.0), p)
    with pytest.raises(ValueError, match="parameter 0 is on meta but u0 is on cpu"):
        dl.solve(prob, "tsit5")
