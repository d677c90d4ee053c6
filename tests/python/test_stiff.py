"""Stiff methods (Rosenbrock rosenbrock23, rodas5, rodas5p; ESDIRK kvaerno5, kencarp4, trbdf2;
Radau IIA radau5):
reference solutions of stiff test problems, gradients through the linearly implicit steps and
through the Newton-solved stages, the user Jacobian, IMEX on split problems, and the explicit
methods' failure on a stiff problem.

References: ROBER at t = 1e11 from the IVP Test Set (Mazzia & Magherini), checked here against
scipy's Radau at rtol = 1e-12, atol = 1e-20 with the exact Jacobian (relative agreement 4e-13).
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from torch.autograd import gradcheck

import diffeqlayers as dl

STIFF = ["kencarp4", "kvaerno5", "radau5", "rodas5", "rodas5p", "rosenbrock23", "trbdf2"]
ESDIRK = ["kencarp4", "kvaerno5", "trbdf2"]
# Stages solved by Newton iterations with a Jacobian and LUs kept across steps.
NEWTON = ESDIRK + ["radau5"]

K1, K2, K3 = 0.04, 3e7, 1e4
ROBER_REF = torch.tensor(
    [0.2083340149701255e-07, 0.8333360770334713e-13, 0.9999999791665050], dtype=torch.float64
)


def rober(u, p, t):
    y1, y2, y3 = u[0], u[1], u[2]
    return torch.stack([-K1 * y1 + K3 * y2 * y3, K1 * y1 - K3 * y2 * y3 - K2 * y2**2, K2 * y2**2])


def rober_jacobian(u, p, t):
    """ROBER's Jacobian df/du, written out (for the jac= tests)."""
    y1, y2, y3 = u
    return torch.stack(
        [
            torch.stack([-K1 + 0 * y1, K3 * y3, K3 * y2]),
            torch.stack([K1 + 0 * y1, -K3 * y3 - 2 * K2 * y2, -K3 * y2]),
            torch.stack([0 * y1, 2 * K2 * y2, 0 * y1]),
        ]
    )


def rober_problem(dtype=torch.float64):
    return dl.ODEProblem(rober, torch.tensor([1.0, 0.0, 0.0], dtype=dtype), (0.0, 1e11))


def test_stiff_methods_are_listed():
    assert sorted(dl.stiff_methods()) == STIFF
    # The explicit registry (tableaus) stays separate.
    assert not set(dl.stiff_methods()) & set(dl.methods())


def test_rober_rodas5_matches_the_ivp_test_set():
    sol = dl.solve(rober_problem(), "rodas5", rtol=1e-8, atol=1e-14, saveat=[1e11])
    u = sol.u[-1]
    rel = ((u - ROBER_REF) / ROBER_REF).abs()
    assert rel[0] < 1e-6 and rel[2] < 1e-6, rel
    assert abs(u.sum().item() - 1.0) < 1e-8
    s = sol.stats
    assert s.njac == s.naccept and s.nlu == s.naccept + s.nreject
    assert s.naccept < 2000


@pytest.mark.parametrize("method", ["rodas5p", "rosenbrock23"])
def test_rober_other_stiff_methods(method):
    # Looser tolerances for the second-order rosenbrock23 (its error shrinks like rtol^(1/3)).
    rtol, atol, bound = (1e-8, 1e-14, 1e-6) if method == "rodas5p" else (1e-6, 1e-12, 1e-3)
    sol = dl.solve(rober_problem(), method, rtol=rtol, atol=atol, saveat=[1e11])
    u = sol.u[-1]
    rel = ((u - ROBER_REF) / ROBER_REF).abs()
    assert rel[0] < bound and rel[2] < bound, rel
    assert abs(u.sum().item() - 1.0) < 1e-8


# Van der Pol in the stiff scaling x'' = mu ((1 - x^2) x' - x), mu = 1e3, (x, x')(0) = (2, 0):
# period ~1.61, so [0, 3] is about two periods (four fast transitions). Reference: scipy Radau
# at rtol = atol = 1e-12 with the exact Jacobian (agrees with Radau at 1e-11 to 7e-13 in x and
# with LSODA at 1e-12 to 7e-11) at save times on the slow branches.
VDP_MU = 1e3
VDP_TIMES = [0.5, 1.2, 2.0, 2.8, 3.0]
VDP_REF = torch.tensor(
    [
        [1.597323684590301, -1.0285990209825204],
        [-1.7291337041865964, 0.8685148687236663],
        [1.7632345402034766, -0.8356886816777118],
        [-1.796097998305755, 0.8065755319244694],
        [-1.6177098843091104, 0.9995963604491195],
    ],
    dtype=torch.float64,
)


def vdp(u, p, t):
    return torch.stack([u[1], VDP_MU * ((1 - u[0] ** 2) * u[1] - u[0])])


def test_van_der_pol_rodas5_matches_radau():
    prob = dl.ODEProblem(vdp, torch.tensor([2.0, 0.0], dtype=torch.float64), (0.0, 3.0))
    sol = dl.solve(prob, "rodas5", rtol=1e-6, atol=1e-6, saveat=VDP_TIMES)
    err = (sol.u - VDP_REF).abs().max()
    # Global error within ten times the tolerance (measured: 1.7e-6).
    assert err < 1e-5, err
    assert sol.stats.naccept < 1000


def test_explicit_method_fails_on_rober_naming_t_and_dt():
    with pytest.raises(dl.SolverError) as info:
        dl.solve(rober_problem(), "tsit5", rtol=1e-6, atol=1e-10, max_num_steps=3000)
    msg = str(info.value)
    assert "MaxIters" in msg and "stiff solver" in msg
    t = float(re.search(r"at t=([-+0-9.eE]+)", msg).group(1))
    dt = float(re.search(r"dt=([-+0-9.eE]+)", msg).group(1))
    assert 0 < t < 1e11 and 0 < dt < 1e-2, msg
    # The stiff solver covers the whole span in far fewer steps.
    sol = dl.solve(rober_problem(), "rodas5", rtol=1e-6, atol=1e-10, saveat=[1e11])
    assert sol.stats.naccept + sol.stats.nreject < 3000


def test_stiff_failure_reports_t_dt_and_counts():
    with pytest.raises(dl.SolverError) as info:
        dl.solve(rober_problem(), "rodas5", max_num_steps=20)
    msg = str(info.value)
    assert "rodas5 failed (MaxIters) at t=" in msg and "dt=" in msg
    assert "jacobians=" in msg and "LU factorizations=" in msg


@pytest.mark.parametrize("method", STIFF)
def test_saveat_and_dense_output_on_a_smooth_problem(method):
    # u' = cos(t) u: u = exp(sin t).
    prob = dl.ODEProblem(
        lambda u, p, t: u * math.cos(t), torch.ones(1, dtype=torch.float64), (0.0, 3.0)
    )
    # kvaerno5 interpolates with the cubic Hermite (its steps are long for that at 1e-9);
    # trbdf2 and rosenbrock23 are second order.
    rtol = 1e-6 if method in ("rosenbrock23", "trbdf2", "kvaerno5") else 1e-9
    if method == "rodas5":  # f reads t, which rodas5's error estimate does not see
        with pytest.warns(RuntimeWarning, match="use rodas5p"):
            sol = dl.solve(prob, method, rtol=rtol, atol=rtol, saveat=0.25, dense=True)
        assert sol.stats.ntime_blind == sol.stats.njac > 0
    else:
        sol = dl.solve(prob, method, rtol=rtol, atol=rtol, saveat=0.25, dense=True)
        assert sol.stats.ntime_blind == 0
    t = sol.t
    assert torch.allclose(sol.u[:, 0], torch.exp(torch.sin(t)), atol=200 * rtol, rtol=0)
    for tq in [0.1, 1.37, 2.9]:
        assert abs(sol(tq)[0].item() - math.exp(math.sin(tq))) < 200 * rtol


@pytest.mark.parametrize("method", STIFF)
def test_plain_solve_builds_no_graph(method):
    sol = dl.solve(rober_problem(), method, rtol=1e-4, atol=1e-8, saveat=[1e-2, 1.0])
    assert not sol.u.requires_grad


def test_float32_rober():
    sol = dl.solve(rober_problem(torch.float32), "rodas5", rtol=1e-4, atol=1e-8, saveat=[40.0])
    assert sol.u.dtype == torch.float32
    # IVP Test Set / scipy Radau: y1(40) = 0.7158270687.
    assert abs(sol.u[-1, 0].item() - 0.7158270687) < 1e-3


def test_user_jacobian_matches_autograd():
    kw = dict(rtol=1e-6, atol=1e-10, saveat=[1e3])
    a = dl.solve(rober_problem(), "rodas5", **kw)
    b = dl.solve(rober_problem(), "rodas5", jac=rober_jacobian, **kw)
    assert a.stats.naccept == b.stats.naccept
    assert torch.allclose(a.u, b.u, rtol=1e-10, atol=1e-18)
    assert b.stats.njac == b.stats.naccept


def test_bad_jacobian_inputs():
    with pytest.raises(ValueError, match="jac must return the Jacobian"):
        dl.solve(rober_problem(), "rodas5", jac=lambda u, p, t: torch.eye(2, dtype=u.dtype))
    with pytest.raises(ValueError, match="stiff methods only"):
        dl.solve(rober_problem(), "tsit5", jac=lambda u, p, t: torch.eye(3, dtype=u.dtype))
    with pytest.raises(TypeError, match="jac must be callable"):
        dl.solve(rober_problem(), "rodas5", jac=3)


# A small stiff, nonlinear, non-autonomous problem with parameters for the gradient checks.
def stiff_pair(u, p, t):
    return torch.stack(
        [-p[0] * u[0] + p[1] * u[1] * u[0], -p[2] * (u[1] - torch.cos(u[0])) + math.sin(t)]
    )


@pytest.mark.parametrize("method", STIFF)
def test_gradcheck_fixed_steps_is_exact(method):
    # Fixed steps: reverse mode differentiates exactly the discrete map, including the Jacobian's
    # own dependence on u and p inside every step.
    p = torch.tensor([2.0, 0.5, 50.0], dtype=torch.float64, requires_grad=True)
    u0 = torch.tensor([1.0, 0.3], dtype=torch.float64, requires_grad=True)
    prob = dl.ODEProblem(stiff_pair, u0.detach(), (0.0, 0.3), p.detach())

    # The Newton methods' stages are differentiated through their equations at the converged
    # iterate, while finite differences see the iteration itself: the two differ by the Newton
    # error (measured 6e-9 to 1.5e-8 at the default tolerances), so their stages are solved to
    # near rounding here (rtol, atol set the Newton tolerance of a fixed-step solve): 1.0e-11 to
    # 2.5e-11 measured.
    tol = dict(rtol=1e-12, atol=1e-12) if method in NEWTON else {}

    def out(u0_, p_):
        return dl.diffeq_rd(
            p_,
            lambda s: s.u,
            prob,
            method,
            u0=u0_,
            dt=0.1,
            adaptive=False,
            saveat=[0.13, 0.3],
            **tol,
        )

    # eps = 1e-5: the finite differences see the rounding of df/dt's difference quotient (its
    # weights are about 2.5 / 6e-6 here). rosenbrock23, whose stages carry h d df/dt: the largest
    # difference from reverse mode measured 1.3e-9 at eps = 1e-5, 2.0e-8 at 1e-6 and 1.4e-7 at
    # 1e-7 (noise over eps), 5e-11 to 1e-9 for the Rodas methods.
    assert gradcheck(out, (u0, p), eps=1e-5, atol=1e-8, rtol=1e-6)


def test_gradcheck_adaptive_rodas5():
    # Adaptive: the step sequence is held fixed in reverse mode, so finite differences (which
    # re-pick steps) agree to about the tolerance.
    p = torch.tensor([2.0, 0.5, 50.0], dtype=torch.float64, requires_grad=True)
    u0 = torch.tensor([1.0, 0.3], dtype=torch.float64, requires_grad=True)
    prob = dl.ODEProblem(stiff_pair, u0.detach(), (0.0, 0.3), p.detach())

    def out(u0_, p_):
        return dl.diffeq_rd(p_, lambda s: s.u[-1], prob, "rodas5", u0=u0_, rtol=1e-8, atol=1e-8)

    # stiff_pair depends on t, so rodas5 warns that its error estimate does not see that; the
    # gradient of the steps it takes is still exact, which is what this checks.
    with pytest.warns(RuntimeWarning, match="rodas5p"):
        assert gradcheck(out, (u0, p), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_rober_example_runs_and_writes_a_plot(tmp_path):
    pytest.importorskip("matplotlib")
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "rober.png"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "examples", "rober.py"),
            "--out",
            str(out),
            "--explicit-steps",
            "500",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "tsit5: ReturnCode.MaxIters" in proc.stdout and "at t=" in proc.stdout
    assert out.exists() and out.stat().st_size > 10_000


@pytest.mark.parametrize("method", STIFF)
def test_forward_mode_equals_reverse_mode(method):
    # diffeq_fd through a stiff method: J carries its own tangent (forward-over-reverse through
    # the reverse passes that build it), and ESDIRK stages take theirs from one Newton correction
    # with the exact Jacobian (the implicit function theorem, as diffeq_rd). Same steps, so the
    # gradients agree to rounding: measured 2e-15 (ESDIRK) to 4e-13 (rodas5) relative on this f,
    # which reads t and p (rodas5's time-blind warning is beside the point here).
    p0 = torch.tensor([2.0, 0.5, 50.0], dtype=torch.float64)
    u00 = torch.tensor([1.0, 0.3], dtype=torch.float64)
    prob = dl.ODEProblem(stiff_pair, u00, (0.0, 0.3), p0)
    kw = dict(saveat=[0.1, 0.3], rtol=1e-6, atol=1e-8)
    grads = []
    for fn in [dl.diffeq_rd, dl.diffeq_fd]:
        p = p0.clone().requires_grad_(True)
        u0 = u00.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out = fn(p, lambda s: s.u.pow(2).sum(), prob, method, u0=u0, **kw)
        grads.append(torch.cat(torch.autograd.grad(out, (u0, p))))
    assert torch.allclose(grads[1], grads[0], rtol=1e-10, atol=0), (method, grads)


@pytest.mark.parametrize(
    "method,case",
    [
        ("kvaerno5", "jvp"),
        ("kvaerno5", "independent_batch"),
        ("kencarp4", "imex"),
        ("radau5", "jvp"),
        ("radau5", "independent_batch"),
        ("radauIIA5", "jvp"),
    ],
)
def test_newton_stage_tangents_in_every_layout(method, case):
    # Forward mode gives the Newton-solved stages their tangents by plain ops on the tangents
    # (the exact Newton correction's, M^-1 (psi' + h gamma f') for an ESDIRK stage, -M^-1 G' for
    # radau5's and the fixed-step methods' coupled stages): one unbatched tangent (diffeq_jvp),
    # per-sample Jacobian blocks (independent_batch: a batched solve per block) and IMEX
    # kencarp4. Each against diffeq_rd's derivative in the same direction.
    kw = dict(dt=0.05, adaptive=False) if method == "radauIIA5" else {}
    if case == "imex":
        p0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
        prob, u00 = imex_parametrised(p0), IMEX_U0
    else:
        p0 = torch.tensor([2.0, 0.5, 50.0], dtype=torch.float64)
        u00 = torch.tensor([1.0, 0.3], dtype=torch.float64)
        prob = dl.ODEProblem(stiff_pair, u00, (0.0, 0.3), p0)
        if case == "independent_batch":
            u00 = torch.tensor([[1.0, 0.3], [0.5, -0.2], [2.0, 0.1]], dtype=torch.float64)
            prob = dl.ODEProblem(
                lambda u, p, t: torch.stack(
                    [-p[0] * u[:, 0] + p[1] * u[:, 1] * u[:, 0], -p[2] * (u[:, 1] - u[:, 0].cos())],
                    dim=1,
                ),
                u00,
                (0.0, 0.3),
                p0,
            )
            kw = dict(independent_batch=True)
    kw.update(saveat=[0.1, 0.3], rtol=1e-6, atol=1e-8)
    dp = torch.linspace(0.3, -0.7, p0.numel(), dtype=torch.float64)
    du = torch.full_like(u00, 0.25)

    def out(s):
        return s.u.pow(2).sum()

    y, dy = dl.diffeq_jvp(
        p0, out, prob, method, u0=u00, tangent_p=dp, tangent_u0=du, **kw
    )  # fmt: skip
    p = p0.clone().requires_grad_(True)
    u = u00.clone().requires_grad_(True)
    ref = dl.diffeq_rd(p, out, prob, method, u0=u, **kw)
    gu, gp = torch.autograd.grad(ref, (u, p))
    assert torch.allclose(y, ref.detach(), rtol=1e-12, atol=0)
    # Measured 1.6e-16 to 2.3e-15 relative (both the implicit function theorem's derivative);
    # radauIIA5 2.3e-11 (diffeq_rd differentiates its fixed-step iteration: they agree to the
    # iteration's tolerance).
    bound = 1e-9 if method == "radauIIA5" else 1e-12
    assert torch.allclose(dy, (gu * du).sum() + (gp * dp).sum(), rtol=bound, atol=0), case


# ---------------------------------------------------------------------------------------------
# ESDIRK methods: Newton on each implicit stage, Jacobian and LU reused across steps.


@pytest.mark.parametrize("method", ["kencarp4", "kvaerno5"])
def test_rober_esdirk_matches_the_ivp_test_set(method):
    # kencarp4 is fourth order: one decade tighter for the same accuracy (at rtol 1e-8 it
    # measured 2.9e-6 in y1).
    rtol, atol = (1e-9, 1e-15) if method == "kencarp4" else (1e-8, 1e-14)
    sol = dl.solve(rober_problem(), method, rtol=rtol, atol=atol, saveat=[1e11])
    u = sol.u[-1]
    rel = ((u - ROBER_REF) / ROBER_REF).abs()
    assert rel[0] < 1e-6 and rel[2] < 1e-6, rel
    assert abs(u.sum().item() - 1.0) < 1e-8
    s = sol.stats
    # Jacobians and factorizations are reused across steps (Rosenbrock: one of each per step).
    assert s.njac < s.naccept / 2, s
    assert s.nlu < s.naccept, s


def test_rober_trbdf2():
    # Second order: looser tolerances, as for rosenbrock23.
    sol = dl.solve(rober_problem(), "trbdf2", rtol=1e-6, atol=1e-12, saveat=[1e11])
    u = sol.u[-1]
    rel = ((u - ROBER_REF) / ROBER_REF).abs()
    assert rel[0] < 1e-3 and rel[2] < 1e-3, rel
    assert abs(u.sum().item() - 1.0) < 1e-8


@pytest.mark.parametrize("method", ESDIRK)
def test_esdirk_newton_error_does_not_hold_the_step(method):
    # The Newton iteration stops at a fraction of the error test; if it stops early (a first
    # contraction rate that reads fast while a stiff component, with a Jacobian from an earlier
    # point, still contracts slowly), the unconverged part enters the error estimate and holds
    # the step far below what the accuracy needs. trbdf2 on ROBER at rtol 1e-6 took 9159 steps
    # that way (1698 rejected, 54918 evaluations of f); with every stage solved to roundoff and
    # a fresh Jacobian every step it takes 990 (kvaerno5 141, kencarp4 157).
    natural = {"trbdf2": 990, "kvaerno5": 141, "kencarp4": 157}[method]
    sol = dl.solve(rober_problem(), method, rtol=1e-6, atol=1e-10, saveat=[1e11], autonomous=True)
    s = sol.stats
    assert s.naccept < 1.2 * natural and s.nreject < 0.05 * s.naccept, s


@pytest.mark.parametrize("method", NEWTON)
def test_van_der_pol_esdirk_matches_radau(method):
    prob = dl.ODEProblem(vdp, torch.tensor([2.0, 0.0], dtype=torch.float64), (0.0, 3.0))
    # Global error (x' included) about 10-20 times the tolerance: measured 1.0e-5 and 1.7e-5 at
    # 1e-6, 1.2e-6 and 1.8e-6 at 1e-7 for kvaerno5 and kencarp4 (rodas5: 1.7e-6 at 1e-6);
    # trbdf2 is second order.
    rtol = 1e-7
    sol = dl.solve(prob, method, rtol=rtol, atol=rtol, saveat=VDP_TIMES)
    err = (sol.u - VDP_REF).abs().max()
    bound = 3e-6 if method != "trbdf2" else 1e-4
    assert err < bound, err
    assert sol.stats.njac < sol.stats.naccept / 2, sol.stats


@pytest.mark.parametrize("method", NEWTON)
def test_esdirk_user_jacobian_matches_autograd(method):
    kw = dict(rtol=1e-6, atol=1e-10, saveat=[1e3])
    a = dl.solve(rober_problem(), method, **kw)
    b = dl.solve(rober_problem(), method, jac=rober_jacobian, **kw)
    assert torch.allclose(a.u, b.u, rtol=1e-6, atol=1e-12)
    assert a.stats.njac == b.stats.njac


@pytest.mark.parametrize("method", NEWTON)
def test_esdirk_newton_failure_is_a_rejected_step_not_an_error(method):
    # A large first step on ROBER: Newton must fail or the error test reject, and the loop
    # shrinks the step instead of failing the solve.
    sol = dl.solve(rober_problem(), method, rtol=1e-6, atol=1e-10, dt=1.0, saveat=[10.0])
    assert sol.stats.nreject > 0
    assert abs(sol.u[-1].sum().item() - 1.0) < 1e-8


@pytest.mark.parametrize("method", NEWTON)
def test_gradcheck_adaptive_esdirk(method):
    p = torch.tensor([2.0, 0.5, 50.0], dtype=torch.float64, requires_grad=True)
    u0 = torch.tensor([1.0, 0.3], dtype=torch.float64, requires_grad=True)
    prob = dl.ODEProblem(stiff_pair, u0.detach(), (0.0, 0.3), p.detach())

    def out(u0_, p_):
        return dl.diffeq_rd(p_, lambda s: s.u[-1], prob, method, u0=u0_, rtol=1e-9, atol=1e-9)

    assert gradcheck(out, (u0, p), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_esdirk_gradient_matches_central_differences_of_the_solution():
    # The gradient of the implicit stage equations (one exact Newton correction from the
    # converged stages) against central differences of the adaptive solve itself, which re-picks
    # its steps: agreement to about the tolerance.
    p0 = torch.tensor([2.0, 0.5, 50.0], dtype=torch.float64)
    u0 = torch.tensor([1.0, 0.3], dtype=torch.float64)
    kw = dict(rtol=1e-10, atol=1e-10)

    def loss(p):
        prob = dl.ODEProblem(stiff_pair, u0, (0.0, 1.0), p)
        sol = dl.solve(prob, "kvaerno5", saveat=[0.5, 1.0], **kw)
        return (sol.u[:, 0] ** 2).sum() + sol.u[:, 1].sum()

    p = p0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(p), p)
    fd = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for i in range(3):
            e = 1e-5 * max(1.0, abs(p0[i].item()))
            dp = torch.zeros(3, dtype=torch.float64)
            dp[i] = e
            fd[i] = (loss(p0 + dp) - loss(p0 - dp)) / (2 * e)
    assert torch.allclose(g, fd, rtol=1e-6, atol=1e-8), (g, fd)


# IMEX: u' = S u + N u with S stiff-ish (eigenvalues -20, -60) treated implicitly and N a
# rotation treated explicitly; exact solution expm((S + N) t) u0.
IMEX_S = torch.tensor([[-40.0, 20.0], [20.0, -40.0]], dtype=torch.float64)
IMEX_N = torch.tensor([[0.0, 3.0], [-3.0, 0.0]], dtype=torch.float64)
IMEX_U0 = torch.tensor([1.0, 0.5], dtype=torch.float64)


def imex_problem():
    return dl.SplitODEProblem(
        lambda u, p, t: IMEX_S @ u, lambda u, p, t: IMEX_N @ u, IMEX_U0, (0.0, 1.0)
    )


def test_split_problem_is_an_ode_problem_of_the_sum():
    prob = imex_problem()
    assert isinstance(prob, dl.ODEProblem)
    u = torch.tensor([0.3, -0.2], dtype=torch.float64)
    assert torch.equal(prob.f(u, None, 0.0), IMEX_S @ u + IMEX_N @ u)
    exact = torch.linalg.matrix_exp(IMEX_S + IMEX_N) @ IMEX_U0
    for method in ["tsit5", "rodas5", "kvaerno5"]:
        sol = dl.solve(prob, method, rtol=1e-10, atol=1e-12, saveat=[1.0])
        assert torch.allclose(sol.u[-1], exact, rtol=0, atol=1e-8), method
    with pytest.raises(TypeError, match="f_nonstiff must be callable"):
        dl.SplitODEProblem(lambda u, p, t: u, 3, IMEX_U0, (0.0, 1.0))
    with pytest.raises(ValueError, match="used by kencarp4"):
        dl.solve(prob, "rodas5", jac=lambda u, p, t: IMEX_S)


def test_kencarp4_imex_converges_with_order_4():
    exact = torch.linalg.matrix_exp(IMEX_S + IMEX_N) @ IMEX_U0
    hs, errs = [], []
    for n in [10, 20, 40, 80]:
        sol = dl.solve(
            imex_problem(), "kencarp4", dt=1.0 / n, adaptive=False, rtol=1e-13, atol=1e-13
        )
        hs.append(1.0 / n)
        errs.append((sol.u[-1] - exact).abs().max().item())
    slopes = [math.log(errs[i] / errs[i + 1]) / math.log(2) for i in range(len(errs) - 1)]
    assert all(3.7 < s < 4.4 for s in slopes), (slopes, errs)
    # The explicit part really is explicit: treating everything implicitly gives other numbers
    # (not a rounding-level difference).
    full = dl.solve(
        dl.ODEProblem(imex_problem().f, IMEX_U0, (0.0, 1.0)),
        "kencarp4",
        dt=0.1,
        adaptive=False,
        rtol=1e-13,
        atol=1e-13,
    )
    imex = dl.solve(imex_problem(), "kencarp4", dt=0.1, adaptive=False, rtol=1e-13, atol=1e-13)
    assert (full.u[-1] - imex.u[-1]).abs().max() > 1e-12


def imex_parametrised(p0):
    # The IMEX test problem with p[0] scaling the stiff part and p[1] the explicit rotation, which
    # also reads t (a forcing along the first component).
    return dl.SplitODEProblem(
        lambda u, p, t: p[0] * (IMEX_S @ u),
        lambda u, p, t: p[1] * (IMEX_N @ u) + torch.stack([math.sin(3 * t) + 0 * u[0], 0 * u[1]]),
        IMEX_U0,
        (0.0, 1.0),
        p0,
    )


@pytest.mark.parametrize("sensealg", ["discrete", "interpolating"])
def test_kencarp4_imex_under_the_adjoints(sensealg):
    # Under diffeq_adjoint, kencarp4 steps a split problem as IMEX too (the adjoint's forward
    # solve once took the sum implicitly: other steps than diffeq_rd's). The discrete adjoint
    # rebuilds each step from the implicit part's stages the forward kept, evaluating the
    # explicit part again: diffeq_rd's gradient to rounding. The interpolating adjoint solves
    # the adjoint system of the sum. Save rows inside steps and at the end; gradients for u0, p.
    p0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    prob = imex_parametrised(p0)
    kw = dict(saveat=[0.3, 0.61, 1.0], rtol=1e-8, atol=1e-10)
    weights = torch.arange(1.0, 7.0, dtype=torch.float64).reshape(3, 2)

    def loss(s):
        return (weights * s.u).sum() + s.u[-1].pow(2).sum(), s.stats

    plain = dl.solve(prob, "kencarp4", **kw).stats
    whole = dl.solve(dl.ODEProblem(prob.f, IMEX_U0, (0.0, 1.0), p0), "kencarp4", **kw).stats
    assert plain.naccept != whole.naccept  # the split is visible in the step count
    grads = {}
    for mode in ["rd", sensealg]:
        p = p0.clone().requires_grad_(True)
        u = IMEX_U0.clone().requires_grad_(True)
        if mode == "rd":
            out, stats = dl.diffeq_rd(p, loss, prob, "kencarp4", u0=u, **kw)
        else:
            out, stats = dl.diffeq_adjoint(p, loss, prob, "kencarp4", u0=u, sensealg=mode, **kw)
        assert (stats.naccept, stats.nreject) == (plain.naccept, plain.nreject), (mode, stats)
        grads[mode] = torch.cat(torch.autograd.grad(out, (u, p)))
    if sensealg == "discrete":
        # Measured 1.0e-15 relative.
        assert torch.allclose(grads[sensealg], grads["rd"], rtol=1e-11, atol=0), grads
    else:
        # The adjoint ODE solved to rtol 1e-8: measured 1.9e-7 relative.
        assert torch.allclose(grads[sensealg], grads["rd"], rtol=1e-6, atol=0), grads


def test_kencarp4_imex_discrete_adjoint_passes_gradcheck():
    # Fixed steps: the discrete adjoint of the IMEX steps is the derivative of the discrete map.
    u0 = IMEX_U0.clone().requires_grad_(True)
    p = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    prob = imex_parametrised(p.detach())

    def out(u0_, p_):
        return dl.diffeq_adjoint(
            p_,
            lambda s: s.u,
            prob,
            "kencarp4",
            u0=u0_,
            sensealg="discrete",
            dt=0.1,
            adaptive=False,
            saveat=[0.35, 1.0],
        )

    assert gradcheck(out, (u0, p), eps=1e-6, atol=1e-8, rtol=1e-6)


class _NonstiffBoom(Exception):
    pass


@pytest.mark.parametrize("part", ["f_nonstiff", "jac"])
def test_python_error_in_a_split_part_or_jac_during_backward_propagates(part):
    # The discrete adjoint's replayed IMEX steps call f_nonstiff and jac in backward, on
    # autograd's threads: a Python exception there reaches the caller of backward as itself.
    armed = {"on": False}
    p0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    base = imex_parametrised(p0)

    def g(u, p, t):
        if armed["on"] and part == "f_nonstiff":
            raise _NonstiffBoom("f_nonstiff in backward")
        return base.f_nonstiff(u, p, t)

    def jac(u, p, t):
        if armed["on"]:
            raise _NonstiffBoom("jac in backward")
        return p[0] * IMEX_S

    prob = dl.SplitODEProblem(base.f_stiff, g, IMEX_U0, (0.0, 1.0), p0)
    p = p0.clone().requires_grad_(True)
    out = dl.diffeq_adjoint(
        p, lambda s: s.u.sum(), prob, "kencarp4", sensealg="discrete", saveat=[1.0], jac=jac
    )
    armed["on"] = True
    with pytest.raises(_NonstiffBoom, match="in backward"):
        out.backward()


def test_interpolating_adjoint_with_the_span_past_the_last_save_time():
    # ROBER to 1e11 saved at t <= 10: lambda is zero from 1e11 down to 10 and the backward solve
    # starts there (it once started at 1e11 with a first step below the time's rounding and
    # failed). The same gradient as the solve whose span ends at 10.
    grads = []
    for span in [(0.0, 1e11), (0.0, 10.0)]:
        u = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
        prob = dl.remake(rober_problem(), tspan=span)
        out = dl.diffeq_adjoint(
            None, lambda s: s.u[-1].sum() + s.u[0, 0], prob, "rodas5p", u0=u,
            saveat=[1.0, 10.0], rtol=1e-6, atol=1e-10,
        )  # fmt: skip
        grads.append(torch.autograd.grad(out, u)[0])
    # Measured 0 (the steps up to t = 10 are the same).
    assert torch.allclose(grads[0], grads[1], rtol=1e-12, atol=0), grads


@pytest.mark.parametrize(
    "method,sensealg",
    [("kencarp4", "discrete"), ("rodas5", "discrete"), ("radau5", "interpolating")],
)
def test_user_jacobian_is_used_under_the_adjoints(method, sensealg):
    # jac= reaches the adjoint's forward solve (and the discrete adjoint's replayed steps), as it
    # does a plain solve; the gradients are those with autograd's Jacobian.
    calls = []

    def jac(u, p, t):
        calls.append(t)
        return rober_jacobian(u, p, t)

    kw = dict(saveat=[1.0, 10.0], rtol=1e-6, atol=1e-10, sensealg=sensealg)
    grads = []
    for j in [None, jac]:
        u = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
        out = dl.diffeq_adjoint(
            None, lambda s: s.u[-1].sum() + s.u[0, 0], rober_problem(), method, u0=u, jac=j, **kw
        )
        grads.append(torch.autograd.grad(out, u)[0])
    assert calls
    # Measured 0 (kencarp4, radau5) and 4.2e-13 (rodas5) relative.
    assert torch.allclose(grads[0], grads[1], rtol=1e-10, atol=0), grads


# ---------------------------------------------------------------------------------------------
# Jacobian modes, the host path for small systems, block-diagonal Jacobians of independent
# samples, and the adjoint with a stiff backward solve.


@pytest.mark.parametrize("method", ["rodas5", "kencarp4"])
def test_forward_and_reverse_mode_jacobians_agree(method):
    kw = dict(rtol=1e-6, atol=1e-10, saveat=[1.0, 1e3])
    rev = dl.solve(rober_problem(), method, jac_mode="reverse", **kw)
    fwd = dl.solve(rober_problem(), method, jac_mode="forward", **kw)
    user = dl.solve(rober_problem(), method, jac=rober_jacobian, **kw)
    # The same Jacobian up to rounding: the same steps and the same values to near rounding.
    assert fwd.stats.naccept == rev.stats.naccept == user.stats.naccept
    assert torch.allclose(fwd.u, rev.u, rtol=1e-9, atol=1e-16)
    assert torch.allclose(fwd.u, user.u, rtol=1e-9, atol=1e-16)


def test_forward_mode_jacobian_inside_a_dual_level():
    import torch.autograd.forward_ad as fwAD

    kw = dict(rtol=1e-6, atol=1e-10, saveat=[1.0])
    ref = dl.solve(rober_problem(), "rodas5", **kw)
    with fwAD.dual_level():
        # The level is taken: "auto" falls back to reverse mode, "forward" says why it cannot.
        assert torch.equal(dl.solve(rober_problem(), "rodas5", **kw).u, ref.u)
        with pytest.raises(RuntimeError, match="forward-AD level"):
            dl.solve(rober_problem(), "rodas5", jac_mode="forward", **kw)
    with pytest.raises(ValueError, match="jac_mode must be"):
        dl.solve(rober_problem(), "rodas5", jac_mode="sideways")
    with pytest.raises(ValueError, match="stiff methods only"):
        dl.solve(rober_problem(), "tsit5", jac_mode="forward")


@pytest.mark.parametrize("method", STIFF)
def test_host_path_matches_the_tensor_path(method):
    # Without grad, small CPU systems run their stage algebra on host doubles; under grad (u0
    # requires grad) the same steps run as tensor ops. Same arithmetic: same steps, values equal
    # to near rounding. (The Newton methods' tensor path under grad adds an exact Newton
    # correction per stage, whose value is the converged stage itself: only its derivative
    # counts.)
    u0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    kw = dict(rtol=1e-6, atol=1e-10, saveat=[1.0, 1e3])
    prob = dl.ODEProblem(rober, u0, (0.0, 1e3))
    host = dl.solve(prob, method, **kw)
    tens = dl.solve(prob, method, u0=u0.clone().requires_grad_(True), **kw)
    assert tens.u.requires_grad
    assert host.stats.naccept == tens.stats.naccept
    assert torch.allclose(host.u, tens.u.detach(), rtol=1e-10, atol=1e-16)


def test_kvaerno5_rober_step_count_at_rtol_1e6():
    # The first Newton update of a stage is judged by itself, not by a contraction rate carried
    # over from earlier stages: before, unconverged stiff components reached the error estimate
    # and kvaerno5 took 1244 steps here (367 at rtol 1e-8); now 165, with an error of 3.2e-4
    # (was 4.0e-4).
    sol = dl.solve(rober_problem(), "kvaerno5", rtol=1e-6, atol=1e-10, saveat=[1e11])
    assert sol.stats.naccept < 400, sol.stats
    rel = ((sol.u[-1] - ROBER_REF) / ROBER_REF).abs()
    assert rel[0] < 1e-3 and rel[2] < 1e-3, rel


# A batch of Van der Pol oscillators with different mu (independent samples, state [B, 2]).
VDP_BATCH_MU = torch.tensor([10.0, 100.0, 1000.0, 300.0], dtype=torch.float64)


def vdp_batch(u, p, t):
    x, v = u[..., 0], u[..., 1]
    return torch.stack([v, p * ((1 - x**2) * v - x)], dim=-1)


def vdp_batch_jacobian(u, p, t):
    x, v = u[..., 0], u[..., 1]
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    return torch.stack(
        [torch.stack([zero, one], -1), torch.stack([p * (-2 * x * v - 1), p * (1 - x**2)], -1)],
        dim=-2,
    )


def vdp_batch_problem():
    u0 = torch.tensor([[2.0, 0.0]] * len(VDP_BATCH_MU), dtype=torch.float64)
    return dl.ODEProblem(vdp_batch, u0, (0.0, 1.0), VDP_BATCH_MU)


@pytest.mark.parametrize("method", STIFF)
def test_independent_batch_matches_the_dense_jacobian(method):
    # The second-order methods at a looser tolerance (they take thousands of steps at 1e-7).
    second = method in ("trbdf2", "rosenbrock23")
    tol = 1e-5 if second else 1e-7
    kw = dict(rtol=tol, atol=tol, saveat=[0.3, 1.0])
    dense = dl.solve(vdp_batch_problem(), method, **kw)
    blocks = dl.solve(vdp_batch_problem(), method, independent_batch=True, **kw)
    assert dense.stats.jac_blocks == 1 and blocks.stats.jac_blocks == len(VDP_BATCH_MU)
    # The block Jacobian equals the dense one (f couples no samples): same steps, same values.
    assert blocks.stats.naccept == dense.stats.naccept
    assert torch.allclose(blocks.u, dense.u, rtol=1e-9, atol=1e-12)
    # Each sample against its own solve.
    for b, mu in enumerate(VDP_BATCH_MU):
        one = dl.ODEProblem(
            vdp_batch, torch.tensor([2.0, 0.0], dtype=torch.float64), (0.0, 1.0), mu
        )
        ref = dl.solve(one, "rodas5", rtol=1e-10, atol=1e-10, saveat=[0.3, 1.0])
        assert torch.allclose(blocks.u[:, b], ref.u, rtol=0, atol=1e-2 if second else 1e-5), (
            method,
            b,
        )


@pytest.mark.parametrize("method", ["rodas5", "kvaerno5"])
def test_independent_batch_user_jacobian_and_tensor_path(method):
    kw = dict(rtol=1e-7, atol=1e-7, saveat=[0.3, 1.0])
    auto = dl.solve(vdp_batch_problem(), method, independent_batch=True, **kw)
    user = dl.solve(
        vdp_batch_problem(), method, independent_batch=True, jac=vdp_batch_jacobian, **kw
    )
    assert torch.allclose(auto.u, user.u, rtol=1e-9, atol=1e-12)
    assert user.stats.jac_blocks == len(VDP_BATCH_MU)
    # Under grad the blocks go through batched ATen LU (the tensor path); gradients agree with
    # the dense Jacobian's.
    grads = []
    for independent in (False, True):
        p = VDP_BATCH_MU.clone().requires_grad_(True)
        loss = dl.diffeq_rd(
            p,
            lambda s: (s.u[-1] ** 2).sum(),
            vdp_batch_problem(),
            method,
            independent_batch=independent,
            **kw,
        )
        (g,) = torch.autograd.grad(loss, p)
        grads.append(g)
    assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=1e-10), grads
    with pytest.raises(ValueError, match=r"\[B, n, n\]"):
        dl.solve(
            vdp_batch_problem(),
            method,
            independent_batch=True,
            jac=lambda u, p, t: torch.eye(8, dtype=u.dtype),
        )
    with pytest.raises(ValueError, match="stiff methods only"):
        dl.solve(vdp_batch_problem(), "tsit5", independent_batch=True)


def test_independent_batch_on_rober_with_different_rates():
    # Each sample its own k1 (rate constants as a [B] parameter).
    k1 = torch.tensor([0.04, 0.08, 0.02], dtype=torch.float64)

    def rober_batch(u, p, t):
        y1, y2, y3 = u[:, 0], u[:, 1], u[:, 2]
        return torch.stack(
            [-p * y1 + K3 * y2 * y3, p * y1 - K3 * y2 * y3 - K2 * y2**2, K2 * y2**2], dim=-1
        )

    u0 = torch.tensor([[1.0, 0.0, 0.0]] * 3, dtype=torch.float64)
    prob = dl.ODEProblem(rober_batch, u0, (0.0, 1e5), k1)
    kw = dict(rtol=1e-7, atol=1e-12, saveat=[1e5])
    for method in ["rodas5", "kencarp4"]:
        blocks = dl.solve(prob, method, independent_batch=True, **kw)
        dense = dl.solve(prob, method, **kw)
        assert blocks.stats.jac_blocks == 3
        assert torch.allclose(blocks.u, dense.u, rtol=1e-8, atol=1e-16)
        # Mass is conserved per sample; the first sample is the standard ROBER: y1(1e5) from
        # the IVP Test Set's ROBER (scipy Radau at rtol 1e-12: 1.786592e-2).
        assert torch.allclose(blocks.u[-1].sum(-1), torch.ones(3, dtype=torch.float64), atol=1e-9)
        assert abs(blocks.u[-1, 0, 0].item() / 1.786592e-2 - 1) < 1e-4


# Stiff linear u' = A(p) u, eigenvalues about -1 and -1000, for the adjoint tests.
STIFF_LINEAR_P = torch.tensor([1.0, 0.5, 1000.0], dtype=torch.float64)
STIFF_LINEAR_U0 = torch.tensor([1.0, 2.0], dtype=torch.float64)


def stiff_linear_matrix(p):
    return torch.stack([torch.stack([-p[0], p[1]]), torch.stack([p[1], -p[2]])])


def stiff_linear_problem():
    return dl.ODEProblem(
        lambda u, p, t: stiff_linear_matrix(p) @ u, STIFF_LINEAR_U0, (0.0, 1.0), STIFF_LINEAR_P
    )


@pytest.mark.parametrize("method", ["kvaerno5", "rodas5p", "rosenbrock23"])
def test_adjoint_with_a_stiff_backward_solve_matches_reverse_mode(method):
    # Stiff linear u' = A(p) u with eigenvalues about -1 and -1000: the interpolating adjoint
    # with a stiff method for the backward solve against diffeq_rd through tsit5, and against
    # the exact gradient of L = sum u(1)^2 through matrix_exp. Measured relative errors 1.3e-6
    # (kvaerno5), 2.3e-7 (rodas5p), 3.6e-5 (rosenbrock23, second order).
    p0, u0, prob = STIFF_LINEAR_P, STIFF_LINEAR_U0, stiff_linear_problem()

    def exact(p):
        return (torch.linalg.matrix_exp(stiff_linear_matrix(p)) @ u0).pow(2).sum()

    p = p0.clone().requires_grad_(True)
    (g_exact,) = torch.autograd.grad(exact(p), p)
    kw = dict(saveat=[1.0], rtol=1e-8, atol=1e-10)
    p = p0.clone().requires_grad_(True)
    loss = dl.diffeq_adjoint(
        p, lambda s: s.u.pow(2).sum(), prob, "tsit5", adjoint_method=method, **kw
    )
    (g,) = torch.autograd.grad(loss, p)
    bound = 1e-4 if method == "rosenbrock23" else 1e-5
    assert ((g - g_exact) / g_exact).abs().max() < bound, (method, g, g_exact)
    p = p0.clone().requires_grad_(True)
    rd = dl.diffeq_rd(p, lambda s: s.u.pow(2).sum(), prob, "tsit5", **kw)
    (g_rd,) = torch.autograd.grad(rd, p)
    assert torch.allclose(g_rd, g_exact, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="interpolating"):
        dl.diffeq_adjoint(
            p0.clone().requires_grad_(True),
            lambda s: s.u.sum(),
            prob,
            "tsit5",
            sensealg="backsolve",
            adjoint_method=method,
            **kw,
        )


def test_rodas5_is_refused_for_the_backward_solve():
    # The adjoint system depends on t through u(t), which rodas5's error estimate does not see:
    # with it the gradient above came out 2x off (dL/dp2 2.2e-3 for 8.1e-4) at rtol 1e-8.
    with pytest.raises(ValueError, match="rodas5p"):
        dl.diffeq_adjoint(
            STIFF_LINEAR_P.clone().requires_grad_(True),
            lambda s: s.u.sum(),
            stiff_linear_problem(),
            "tsit5",
            adjoint_method="rodas5",
            saveat=[1.0],
        )


def test_rodas5_error_estimate_does_not_see_time_and_warns():
    # u' = exp(-1000 t), u(1) = (1 - e^-1000) / 1000. rodas5's estimate vanishes for f = f(t)
    # (the last row of its Gamma matrix, rosenbrock.cpp): 5 steps and 52% off at any rtol, with
    # a warning. rodas5p: measured 4.0e-5, 1.3e-6, 2.5e-8 relative at rtol 1e-4, 1e-6, 1e-8.
    exact = (1.0 - math.exp(-1000.0)) / 1000.0
    prob = dl.ODEProblem(
        lambda u, p, t: math.exp(-1000.0 * t) * torch.ones_like(u),
        torch.zeros(1, dtype=torch.float64),
        (0.0, 1.0),
    )
    with pytest.warns(RuntimeWarning, match="rodas5's error estimate does not see"):
        blind = dl.solve(prob, "rodas5", rtol=1e-8, atol=1e-10, saveat=[1.0])
    assert blind.stats.ntime_blind == blind.stats.njac
    assert abs(blind.u[-1].item() - exact) / exact > 0.1  # the defect the warning names
    for rtol, bound in [(1e-4, 4e-4), (1e-6, 1.3e-5), (1e-8, 2.5e-7)]:
        sol = dl.solve(prob, "rodas5p", rtol=rtol, atol=rtol * 1e-2, saveat=[1.0])
        assert abs(sol.u[-1].item() - exact) / exact < bound, (rtol, sol.u[-1].item())
        assert sol.stats.ntime_blind == 0
    # Fixed steps use no error estimate: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dl.solve(prob, "rodas5", dt=1e-3, adaptive=False, saveat=[1.0])


@pytest.mark.parametrize("method", ["rodas5p", "rosenbrock23"])
def test_time_derivative_never_evaluates_f_outside_the_span(method):
    # df/dt is a one-sided difference in the direction of the step: f (here defined on the span
    # only) is never evaluated behind the current t, forwards or backwards.
    def make(t0, t1):
        lo, hi = min(t0, t1), max(t0, t1)
        rate = 50.0 if t1 > t0 else -50.0  # stiff and stable in the direction of the solve

        def f(u, p, t):
            if not lo <= t <= hi:
                raise ValueError(f"f evaluated at t={t} outside [{lo}, {hi}]")
            return -rate * (u - math.sin(t)) + math.cos(t)

        u0 = torch.tensor([math.sin(t0)], dtype=torch.float64)
        return dl.ODEProblem(f, u0, (t0, t1))

    for t0, t1 in [(0.0, 1.0), (1.0, 0.0)]:
        sol = dl.solve(make(t0, t1), method, rtol=1e-7, atol=1e-9, saveat=[t1])
        # u = sin t solves it; started on it, the solve stays on it.
        assert abs(sol.u[-1].item() - math.sin(t1)) < 1e-5, (t0, t1, sol.u[-1].item())


@pytest.mark.parametrize(
    "method", ["rodas5", "rodas5p", "kvaerno5", "kencarp4", "trbdf2", "radau5"]
)
def test_interpolating_adjoint_with_a_stiff_forward_solve(method):
    # The same stiff linear problem (eigenvalues about -1 and -1000) solved forward by a stiff
    # method: the interpolating adjoint takes u(t) from the forward's dense output and solves
    # backwards with the same method (rodas5p after rodas5).
    p0, u0, prob = STIFF_LINEAR_P, STIFF_LINEAR_U0, stiff_linear_problem()

    def exact(p):
        A = stiff_linear_matrix(p)
        return (torch.linalg.matrix_exp(0.5 * A) @ u0).sum() + (
            torch.linalg.matrix_exp(A) @ u0
        ).pow(2).sum()

    def loss(s):
        return s.u[0].sum() + s.u[1].pow(2).sum()

    p = p0.clone().requires_grad_(True)
    (g_exact,) = torch.autograd.grad(exact(p), p)
    kw = dict(saveat=[0.5, 1.0], rtol=1e-8, atol=1e-10)
    p = p0.clone().requires_grad_(True)
    out = dl.diffeq_adjoint(p, loss, prob, method, **kw)
    (g,) = torch.autograd.grad(out, p)
    # Measured relative errors 7.8e-8 (rodas5, rodas5p) to 1.7e-6 (kencarp4); trbdf2 (second
    # order) 1.2e-5.
    bound = 1e-4 if method == "trbdf2" else 2e-5
    assert ((g - g_exact) / g_exact).abs().max() < bound, (g, g_exact)
    # Backsolve would solve the stiff problem backwards.
    with pytest.raises(ValueError, match="interpolating"):
        dl.diffeq_adjoint(
            p0.clone().requires_grad_(True), loss, prob, method, sensealg="backsolve", **kw
        )


@pytest.mark.parametrize(
    "method", ["rodas5", "rodas5p", "rosenbrock23", "radau5", "kvaerno5", "kencarp4", "trbdf2"]
)
def test_discrete_adjoint_with_a_stiff_forward_solve_is_reverse_mode(method):
    # The discrete adjoint replays each Rosenbrock step (a function of t, u and h alone) under
    # autograd, and rebuilds each radau5 and ESDIRK step from the forward's converged stages with
    # the exact Newton corrections diffeq_rd takes: the gradient of the same discrete solve as
    # diffeq_rd's, to rounding. (kvaerno5 and trbdf2 interpolate the rows inside steps with the
    # Hermite interpolant, f at both ends carrying the step's derivative.) Save rows
    # at t0, inside steps (interpolated) and at the end; gradients for u0 and p.
    p0, u0, prob = STIFF_LINEAR_P, STIFF_LINEAR_U0, stiff_linear_problem()
    kw = dict(saveat=[0.0, 0.013, 0.5, 0.77, 1.0], rtol=1e-6, atol=1e-9)
    weights = torch.arange(1.0, 11.0, dtype=torch.float64).reshape(5, 2)

    def loss(s):
        return (weights * s.u).sum() + s.u[-1].pow(2).sum()

    grads = []
    for mode in ["rd", "discrete"]:
        p = p0.clone().requires_grad_(True)
        u = u0.clone().requires_grad_(True)
        if mode == "rd":
            out = dl.diffeq_rd(p, loss, prob, method, u0=u, **kw)
        else:
            out = dl.diffeq_adjoint(p, loss, prob, method, u0=u, sensealg="discrete", **kw)
        grads.append(torch.cat(torch.autograd.grad(out, (u, p))))
    # Measured 7.9e-14 (rosenbrock23) to 2.6e-12 (rodas5p) relative, 1.0e-15 (radau5), 7.7e-15
    # (trbdf2) to 1.3e-13 (kencarp4): the adjoint's forward solve (no graph, host arithmetic for
    # small systems) and diffeq_rd's round differently. (Before the Newton methods' corrections
    # kept the converged values, diffeq_rd's trajectory moved by the Newton error and the ESDIRK
    # methods agreed to 1e-8 only.)
    assert torch.allclose(grads[1], grads[0], rtol=1e-11, atol=0), grads


@pytest.mark.parametrize("mode", ["fd", "discrete"])
def test_forward_mode_and_discrete_adjoint_through_rodas5p_pass_gradcheck(mode):
    # Fixed steps, f reading t and p: diffeq_fd and the discrete adjoint against finite
    # differences.
    p = torch.tensor([2.0, 0.5, 50.0], dtype=torch.float64, requires_grad=True)
    u0 = torch.tensor([1.0, 0.3], dtype=torch.float64, requires_grad=True)
    prob = dl.ODEProblem(stiff_pair, u0.detach(), (0.0, 0.3), p.detach())
    kw = dict(u0=None, dt=0.05, adaptive=False, saveat=[0.13, 0.3])
    if mode == "discrete":
        kw["sensealg"] = "discrete"
    fn = dl.diffeq_fd if mode == "fd" else dl.diffeq_adjoint

    def out(u0_, p_):
        return fn(p_, lambda s: s.u, prob, "rodas5p", **{**kw, "u0": u0_})

    assert gradcheck(out, (u0, p), eps=1e-5, atol=1e-8, rtol=1e-6)


def test_interpolating_adjoint_on_rober_matches_reverse_mode():
    # ROBER with its rate constants as parameters, to t = 100: the interpolating adjoint through
    # rodas5 (backward: rodas5p) against diffeq_rd through kvaerno5. Measured: the
    # logarithmic sensitivities p dL/dp agree to 1.6e-7 relative (1.0e-6 with kvaerno5 backward).
    def f(u, p, t):
        y1, y2, y3 = u[0], u[1], u[2]
        return torch.stack(
            [-p[0] * y1 + p[2] * y2 * y3, p[0] * y1 - p[2] * y2 * y3 - p[1] * y2**2, p[1] * y2**2]
        )

    k = torch.tensor([0.04, 3e7, 1e4], dtype=torch.float64)
    prob = dl.ODEProblem(f, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), (0.0, 100.0), k)

    def loss(s):
        return (s.u[:, 0] + 1e4 * s.u[:, 1]).sum()

    kw = dict(saveat=[1.0, 10.0, 100.0], rtol=1e-7, atol=1e-13)
    grads = []
    for fn, method in [(dl.diffeq_rd, "kvaerno5"), (dl.diffeq_adjoint, "rodas5")]:
        p = k.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(p, loss, prob, method, **kw), p)
        grads.append(g * k)
    assert ((grads[1] - grads[0]) / grads[0]).abs().max() < 1e-5, grads


# autonomous: df/dt = 0 without evaluating f (the Rosenbrock methods' difference quotient costs
# two evaluations of f per Jacobian).


@pytest.mark.parametrize("method", ["rodas5", "rodas5p", "rosenbrock23"])
def test_autonomous_skips_the_two_time_derivative_evaluations(method):
    kw = dict(rtol=1e-6, atol=1e-10, saveat=[1.0, 1e3])
    a = dl.solve(rober_problem(), method, **kw)
    b = dl.solve(rober_problem(), method, autonomous=True, **kw)
    # ROBER does not read t: its difference quotient is exactly 0, so the same arithmetic.
    assert torch.equal(a.u, b.u)
    assert a.stats.naccept == b.stats.naccept and a.stats.njac == b.stats.njac
    assert b.stats.nfe == a.stats.nfe - 2 * a.stats.njac


@pytest.mark.parametrize("method", ["kvaerno5", "implicit_euler", "tsit5"])
def test_autonomous_is_ignored_by_methods_without_df_dt(method):
    u0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    prob = dl.ODEProblem(rober, u0, (0.0, 1.0))
    kw = dict(rtol=1e-5, atol=1e-9, saveat=[1.0])
    if method == "implicit_euler":
        prob = dl.ODEProblem(rober, u0, (0.0, 0.01))
        kw = dict(dt=1e-4, saveat=[0.01])
    if method == "tsit5":  # not stiff yet over this short span
        prob = dl.ODEProblem(rober, u0, (0.0, 1e-3))
        kw["saveat"] = [1e-3]
    a = dl.solve(prob, method, **kw)
    b = dl.solve(prob, method, autonomous=True, **kw)
    assert torch.equal(a.u, b.u) and a.stats.nfe == b.stats.nfe


def forced_decay(u, p, t):
    # u' = -50 (u - cos t) - sin t: u = cos t + (u0 - 1) exp(-50 t). Reads t.
    return -50.0 * (u - math.cos(t)) - math.sin(t)


@pytest.mark.parametrize("method", ["rodas5", "rosenbrock23"])
def test_autonomous_false_keeps_df_dt_for_an_f_that_reads_t(method):
    prob = dl.ODEProblem(forced_decay, torch.tensor([2.0], dtype=torch.float64), (0.0, 3.0))
    exact = math.cos(3.0) + math.exp(-150.0)
    # Large fixed steps: the time derivative enters every step's stages directly.
    kw = dict(dt=0.1, adaptive=False, saveat=[3.0])
    good = dl.solve(prob, method, **kw)
    assert abs(good.u[-1, 0].item() - exact) < 2e-3
    # Declaring this f autonomous drops df/dt = 50 sin t - cos t from the stages: the option is
    # really used (and, as documented, wrong for an f that reads t).
    wrong = dl.solve(prob, method, autonomous=True, **kw)
    # (measured: rodas5 1.0e-6 -> 1.7e-3, rosenbrock23 7.9e-4 -> 5.1e-3)
    assert abs(wrong.u[-1, 0].item() - exact) > 5 * abs(good.u[-1, 0].item() - exact)
    assert wrong.stats.nfe == good.stats.nfe - 2 * good.stats.njac


def test_autonomous_gradients_match():
    # Reverse mode through rodas5 with autonomous=True: the same gradients (df/dt is 0 either way
    # for an f that ignores t, and carries no graph).
    def pair(u, p, t):
        return torch.stack([-p[0] * u[0] + p[1] * u[1] * u[0], -p[2] * (u[1] - torch.cos(u[0]))])

    p = torch.tensor([2.0, 0.5, 50.0], dtype=torch.float64, requires_grad=True)
    u0 = torch.tensor([1.0, 0.3], dtype=torch.float64)
    prob = dl.ODEProblem(pair, u0, (0.0, 0.5), p)
    grads = []
    for autonomous in (False, True):
        y = dl.diffeq_rd(
            p, lambda s: s.u.sum(), prob, "rodas5", rtol=1e-8, atol=1e-8, autonomous=autonomous
        )
        grads.append(torch.autograd.grad(y, p)[0])
    assert torch.allclose(grads[0], grads[1], rtol=1e-12, atol=1e-14)


def test_autonomous_bad_values():
    with pytest.raises(TypeError, match="autonomous must be True, False or None, got 'yes'"):
        dl.solve(rober_problem(), "rodas5", autonomous="yes")
    with pytest.raises(TypeError, match="autonomous must be True, False or None, got 1"):
        dl.solve(rober_problem(), "rodas5", autonomous=1)
    mlp = dl.MLP([2, 8, 2], "tanh", time_input=True, dtype=torch.float64)
    prob = dl.ODEProblem(mlp.rhs, torch.zeros(2, dtype=torch.float64), (0.0, 1.0), mlp)
    with pytest.raises(ValueError, match="autonomous=True, but f reads t"):
        dl.solve(prob, "rodas5", autonomous=True)


@pytest.mark.parametrize("time_input", [False, True])
def test_autonomous_is_known_for_an_mlp(time_input):
    torch.manual_seed(0)
    mlp = dl.MLP([2, 8, 2], "tanh", time_input=time_input, dtype=torch.float64)
    prob = dl.ODEProblem(mlp.rhs, torch.tensor([0.5, -0.2], dtype=torch.float64), (0.0, 1.0), mlp)
    kw = dict(rtol=1e-6, atol=1e-8, saveat=[1.0])
    with torch.no_grad():
        auto = dl.solve(prob, "rodas5p", **kw)
        central = dl.solve(prob, "rodas5p", autonomous=False, **kw)
    extra = 0 if time_input else 2 * central.stats.njac
    assert auto.stats.nfe == central.stats.nfe - extra
    assert torch.allclose(auto.u, central.u, rtol=1e-12, atol=1e-14)


def test_neural_ode_over_a_module_without_time_is_autonomous():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)
    ).double()
    calls = []

    class Counted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            calls.append(1)
            return self.net(x)

    x = torch.tensor([0.5, -0.2], dtype=torch.float64)
    kw = dict(rtol=1e-6, atol=1e-8)
    with torch.no_grad():
        y = dl.neural_ode(Counted(), x, (0.0, 1.0), "rodas5", **kw)
        n_auto = len(calls)
        calls.clear()
        y_central = dl.neural_ode(Counted(), x, (0.0, 1.0), "rodas5", autonomous=False, **kw)
        n_central = len(calls)
        prob = dl.ODEProblem(lambda u, p, t: net(u), x, (0.0, 1.0))
        ref = dl.solve(prob, "rodas5", autonomous=False, saveat=[1.0], **kw)
    assert n_central - n_auto == 2 * ref.stats.njac > 0
    assert torch.allclose(y, y_central, rtol=1e-12, atol=1e-14)


class _NumpySquare(torch.autograd.Function):
    """x * x with a backward in NumPy: cannot run under vmap."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.from_numpy(2.0 * x.detach().numpy() * g.detach().numpy())


@pytest.mark.parametrize("method", ["rodas5", "kvaerno5"])
def test_autograd_jacobian_with_a_python_backward_in_f(method):
    # The reverse-mode Jacobian batches its n reverse passes under vmap, except through graphs
    # with a backward written in Python (taken row by row): both give the same solve.
    rates = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    u0 = torch.ones(3, dtype=torch.float64)
    kw = dict(rtol=1e-8, atol=1e-10, saveat=[1.0])
    plain = dl.solve(dl.ODEProblem(lambda u, p, t: -rates * u * u, u0, (0.0, 1.0)), method, **kw)
    custom = dl.solve(
        dl.ODEProblem(lambda u, p, t: -rates * _NumpySquare.apply(u), u0, (0.0, 1.0)), method, **kw
    )
    assert torch.allclose(custom.u, plain.u, rtol=1e-13, atol=0)
    assert custom.stats.njac == plain.stats.njac
    exact = 1.0 / (1.0 + rates)  # u' = -r u^2, u(0) = 1
    assert torch.allclose(plain.u[-1], exact, rtol=1e-6)


@pytest.mark.parametrize("independent", [False, True])
def test_batched_reverse_jacobian_emits_no_warnings(independent):
    # The batched reverse passes must not fall back (with PyTorch's performance warning) to a
    # loop for any operation of these f.
    import warnings

    prob = vdp_batch_problem() if independent else rober_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = dl.solve(prob, "rodas5", rtol=1e-6, atol=1e-10, independent_batch=independent)
    assert sol.stats.njac > 0


# ---------------------------------------------------------------------------------------------
# radau5: the adaptive Radau IIA method of order 5 (Hairer & Wanner's RADAU5 iteration).


def test_rober_radau5_matches_the_ivp_test_set():
    # The issue's ROBER accuracy, at the same rtol as rodas5's test. Measured 5.3e-9 relative in
    # y1 at rtol 1e-8 (atol 1e-12) with 1037 steps, 157 Jacobians: scipy's Radau at the same
    # tolerances reports 5.3e-9 with 1136 steps, 138 Jacobians (benchmarks/results/stiff.md).
    sol = dl.solve(rober_problem(), "radau5", rtol=1e-8, atol=1e-12, saveat=[1e11], autonomous=True)
    u = sol.u[-1]
    rel = ((u - ROBER_REF) / ROBER_REF).abs()
    assert rel[0] < 1e-7 and rel[2] < 1e-7, rel
    assert abs(u.sum().item() - 1.0) < 1e-8
    s = sol.stats
    assert s.naccept < 1300 and s.nreject < 20, s
    # Jacobians kept across steps while Newton converges fast; LUs refactored when h changes.
    assert s.njac < s.naccept / 4, s
    # Newton: about two updates (three evaluations of f each) per step, plus f(t, u).
    assert s.nfe < 10 * s.naccept, s


def test_radau5_tensor_path_takes_the_host_paths_steps():
    # Small CPU states without grad run the stage algebra on host doubles; 17 uncoupled copies of
    # ROBER (51 states, beyond the host path's block size) run the same iteration as tensor ops.
    # The RMS norms of identical copies equal those of one: same steps, values to rounding.
    kw = dict(rtol=1e-6, atol=1e-10, saveat=[1.0, 1e3, 1e7], autonomous=True)
    one = dl.solve(rober_problem(), "radau5", **kw)

    def rober_copies(u, p, t):
        return rober(u.view(17, 3).T, p, t).T.reshape(-1)

    many = dl.solve(
        dl.ODEProblem(
            rober_copies, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64).repeat(17), (0.0, 1e11)
        ),
        "radau5",
        **kw,
    )
    assert many.stats.naccept == one.stats.naccept and many.stats.nreject == one.stats.nreject
    assert many.stats.nfe == one.stats.nfe
    assert torch.allclose(
        many.u.view(3, 17, 3), one.u.unsqueeze(1).expand(3, 17, 3), rtol=1e-9, atol=1e-15
    )


def test_radau5_dense_output_between_the_steps():
    # The dense output is the collocation polynomial (third order; its convergence order is
    # checked in tests/cpp/test_stiff.cpp): on a smooth problem at a tight tolerance it stays
    # close to the solution everywhere in the span, not only at the steps.
    prob = dl.ODEProblem(
        lambda u, p, t: u * math.cos(t), torch.ones(1, dtype=torch.float64), (0.0, 3.0)
    )
    sol = dl.solve(prob, "radau5", rtol=1e-10, atol=1e-10, dense=True)
    ts = torch.linspace(0.0, 3.0, 61, dtype=torch.float64)
    err = max(abs(sol(t.item())[0].item() - math.exp(math.sin(t.item()))) for t in ts)
    assert err < 1e-7, err


def test_radau5_rd_and_fd_match():
    p0, prob = STIFF_LINEAR_P, stiff_linear_problem()
    kw = dict(saveat=[0.5, 1.0], rtol=1e-8, atol=1e-10)

    def loss(s):
        return s.u[0].sum() + s.u[1].pow(2).sum()

    grads = []
    for fn in [dl.diffeq_rd, dl.diffeq_fd]:
        p = p0.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(fn(p, loss, prob, "radau5", **kw), p)[0])
    # Same steps; the correction's derivative (the implicit function theorem's) in both modes:
    # measured 1.1e-15 relative.
    assert torch.allclose(grads[1], grads[0], rtol=1e-10, atol=0), grads


def test_radau5_backward_solve_for_the_interpolating_adjoint():
    p0, prob = STIFF_LINEAR_P, stiff_linear_problem()
    kw = dict(saveat=[0.5, 1.0], rtol=1e-8, atol=1e-10)

    def loss(s):
        return s.u[0].sum() + s.u[1].pow(2).sum()

    p = p0.clone().requires_grad_(True)
    g_rd = torch.autograd.grad(dl.diffeq_rd(p, loss, prob, "rodas5p", **kw), p)[0]
    p = p0.clone().requires_grad_(True)
    out = dl.diffeq_adjoint(p, loss, prob, "rodas5p", adjoint_method="radau5", **kw)
    g = torch.autograd.grad(out, p)[0]
    # Measured 7.8e-9 relative (the adjoint's own discretisation error at rtol 1e-8).
    assert ((g - g_rd) / g_rd).abs().max() < 1e-6, (g, g_rd)
