"""Stiff methods (rosenbrock23, rodas5, rodas5p): reference solutions of stiff test problems,
gradients through the linearly implicit steps, the user Jacobian, and the explicit methods'
failure on a stiff problem.

References: ROBER at t = 1e11 from the IVP Test Set (Mazzia & Magherini), checked here against
scipy's Radau at rtol = 1e-12, atol = 1e-20 with the exact Jacobian (relative agreement 4e-13).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.autograd import gradcheck

import diffeqlayers as dl

STIFF = ["rodas5", "rodas5p", "rosenbrock23"]

K1, K2, K3 = 0.04, 3e7, 1e4
ROBER_REF = torch.tensor(
    [0.2083340149701255e-07, 0.8333360770334713e-13, 0.9999999791665050], dtype=torch.float64
)


def rober(u, p, t):
    y1, y2, y3 = u[0], u[1], u[2]
    return torch.stack([-K1 * y1 + K3 * y2 * y3, K1 * y1 - K3 * y2 * y3 - K2 * y2**2, K2 * y2**2])


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
    rtol = 1e-9 if method != "rosenbrock23" else 1e-6
    sol = dl.solve(prob, method, rtol=rtol, atol=rtol, saveat=0.25, dense=True)
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
    def jac(u, p, t):
        y1, y2, y3 = u
        return torch.stack(
            [
                torch.stack([-K1 + 0 * y1, K3 * y3, K3 * y2]),
                torch.stack([K1 + 0 * y1, -K3 * y3 - 2 * K2 * y2, -K3 * y2]),
                torch.stack([0 * y1, 2 * K2 * y2, 0 * y1]),
            ]
        )

    kw = dict(rtol=1e-6, atol=1e-10, saveat=[1e3])
    a = dl.solve(rober_problem(), "rodas5", **kw)
    b = dl.solve(rober_problem(), "rodas5", jac=jac, **kw)
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

    def out(u0_, p_):
        return dl.diffeq_rd(
            p_, lambda s: s.u, prob, method, u0=u0_, dt=0.1, adaptive=False, saveat=[0.13, 0.3]
        )

    assert gradcheck(out, (u0, p), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_adaptive_rodas5():
    # Adaptive: the step sequence is held fixed in reverse mode, so finite differences (which
    # re-pick steps) agree to about the tolerance.
    p = torch.tensor([2.0, 0.5, 50.0], dtype=torch.float64, requires_grad=True)
    u0 = torch.tensor([1.0, 0.3], dtype=torch.float64, requires_grad=True)
    prob = dl.ODEProblem(stiff_pair, u0.detach(), (0.0, 0.3), p.detach())

    def out(u0_, p_):
        return dl.diffeq_rd(p_, lambda s: s.u[-1], prob, "rodas5", u0=u0_, rtol=1e-8, atol=1e-8)

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


def test_forward_mode_is_refused_clearly():
    p = torch.tensor([2.0, 0.5, 50.0], dtype=torch.float64)
    prob = dl.ODEProblem(stiff_pair, torch.tensor([1.0, 0.3], dtype=torch.float64), (0.0, 0.3), p)
    with pytest.raises(NotImplementedError, match="forward mode"):
        dl.diffeq_fd(p, lambda s: s.u[-1], prob, "rodas5")
