"""Per-sample step control (solve(..., per_sample=True)): each sample of the batch keeps its own
time, step size, error norm and controller.

The reference for every sample is the shared-step solver on that sample alone: the per-sample
loop makes the same step-size decisions (same controller, initial step and stops), so each
sample's accepted and rejected step counts equal the standalone solve's, and the results agree
to rounding (the stage combinations are grouped differently: h * sum_j a_ij k_j instead of
sum_j (h a_ij) k_j), far below the tolerances.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ADAPTIVE
from torch.autograd import gradcheck

import diffeqlayers as dl

F64 = torch.float64


def T(x):
    """A float64 tensor."""
    return torch.tensor(x, dtype=F64)


def linspace(a, b, n):
    return torch.linspace(a, b, n, dtype=F64)


def vdp(u, mu, t):
    """Van der Pol, one mu per sample: u [B, 2], mu [B]."""
    x, y = u[..., 0], u[..., 1]
    return torch.stack([y, mu * (1 - x * x) * y - x], dim=-1)


def forced_decay(u, k, t):
    """u' = -k u + sin(t): uses t, a float (standalone) or a [B] tensor (per sample)."""
    t = torch.as_tensor(t, dtype=u.dtype).reshape(-1, 1)
    return -k[:, None] * u + torch.sin(t)


def forced_decay_exact(t, k, u0):
    """Exact solution of u' = -k u + sin t, u(0) = u0, at the times t: [n, B, 1]."""
    t = t[:, None, None]
    k = k[None, :, None]
    particular = (k * torch.sin(t) - torch.cos(t)) / (1 + k * k)
    c = u0[None] + 1 / (1 + k * k)
    return particular + c * torch.exp(-k * t)


VDP_MU = T([0.5, 2.0, 8.0])
VDP_U0 = T([[2.0, 0.0], [1.0, 1.0], [0.5, -1.0]])


def standalone(f, u0, p, span, method, **kw):
    """Each sample solved alone by the shared-step solver: (u [n, B, ...], naccept, nreject)."""
    us, acc, rej = [], [], []
    for b in range(u0.shape[0]):
        sol = dl.solve(dl.ODEProblem(f, u0[b : b + 1], span, p[b : b + 1]), method, **kw)
        us.append(sol.u[:, 0])
        acc.append(sol.stats.naccept)
        rej.append(sol.stats.nreject)
    return torch.stack(us, dim=1), acc, rej


@pytest.mark.parametrize("method", ADAPTIVE)
def test_matches_standalone_solves_step_for_step(method):
    # Van der Pol with mu from mild to stiffish: the samples need very different step counts.
    tol = {"adaptive_heun": 1e-3, "fehlberg2": 1e-4, "bosh3": 1e-5}.get(method, 1e-7)
    kw = {"saveat": linspace(0.0, 2.0, 9), "rtol": tol, "atol": tol}
    span = (0.0, 2.0)
    sol = dl.solve(dl.ODEProblem(vdp, VDP_U0, span, VDP_MU), method, per_sample=True, **kw)
    ref, acc, rej = standalone(vdp, VDP_U0, VDP_MU, span, method, **kw)
    assert sol.u.shape == (9, 3, 2)
    torch.testing.assert_close(sol.t, kw["saveat"])
    assert sol.sample_stats.naccept.tolist() == acc
    assert sol.sample_stats.nreject.tolist() == rej
    assert sol.stats.naccept == sum(acc) and sol.stats.nreject == sum(rej)
    # The slowest sample sets the number of iterations of the batched loop.
    assert sol.sample_stats.iterations == max(a + r for a, r in zip(acc, rej))
    torch.testing.assert_close(sol.u, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["tsit5", "dopri5"])
def test_time_dependent_f_gets_each_samples_time(method):
    # Decay rates 0.1 to 100: the fast ones need many more steps early on, so the samples'
    # times differ at every iteration; a wrong t would spoil the forcing term sin(t).
    k = T([0.1, 1.0, 10.0, 100.0])
    u0 = T([[1.0], [-0.5], [2.0], [0.3]])
    times = linspace(0.0, 2.0, 21)
    kw = {"saveat": times, "rtol": 1e-8, "atol": 1e-10}
    sol = dl.solve(dl.ODEProblem(forced_decay, u0, (0.0, 2.0), k), method, per_sample=True, **kw)
    torch.testing.assert_close(sol.u, forced_decay_exact(times, k, u0), rtol=1e-7, atol=1e-8)
    ref, acc, rej = standalone(forced_decay, u0, k, (0.0, 2.0), method, **kw)
    assert sol.sample_stats.naccept.tolist() == acc
    assert sol.sample_stats.nreject.tolist() == rej
    torch.testing.assert_close(sol.u, ref, rtol=1e-10, atol=1e-12)
    # The easy samples take fewer steps than the hard one.
    steps = sol.sample_stats.naccept.tolist()
    assert steps == sorted(steps) and steps[0] < steps[-1]


def test_easy_samples_are_not_slowed_by_a_hard_one():
    # Adding a hard sample (mu = 10) to three easy ones (mu = 0.1) leaves the easy samples' steps
    # and results as they were per sample, while the shared step takes more steps for all.
    easy_mu, easy_u0 = T([0.1, 0.1, 0.1]), T([[1.0, 0.0], [0.5, 0.5], [-1.0, 0.2]])
    mu = torch.cat([easy_mu, T([10.0])])
    u0 = torch.cat([easy_u0, T([[1.0, 0.0]])])
    kw = {"saveat": linspace(0.0, 5.0, 6), "rtol": 1e-6, "atol": 1e-6}
    easy = dl.ODEProblem(vdp, easy_u0, (0.0, 5.0), easy_mu)
    mixed = dl.ODEProblem(vdp, u0, (0.0, 5.0), mu)
    per_easy = dl.solve(easy, "tsit5", per_sample=True, **kw)
    per_mixed = dl.solve(mixed, "tsit5", per_sample=True, **kw)
    acc = per_mixed.sample_stats.naccept.tolist()
    assert acc[:3] == per_easy.sample_stats.naccept.tolist()
    assert max(acc[:3]) * 3 < acc[3]
    torch.testing.assert_close(per_mixed.u[:, :3], per_easy.u, rtol=1e-12, atol=1e-12)
    shared_easy = dl.solve(easy, "tsit5", **kw).stats.naccept
    shared_mixed = dl.solve(mixed, "tsit5", **kw).stats.naccept
    assert shared_mixed > 3 * shared_easy


def test_backwards_in_time_and_tstops():
    k = T([0.5, 20.0])
    u0 = T([[1.0], [1.0]])
    times = T([1.0, 0.7, 0.25, 0.0])
    kw = {"saveat": times, "rtol": 1e-8, "atol": 1e-10, "tstops": [0.5]}
    prob = dl.ODEProblem(forced_decay, u0, (1.0, 0.0), k)
    sol = dl.solve(prob, "dopri5", per_sample=True, **kw)
    ref, acc, _ = standalone(forced_decay, u0, k, (1.0, 0.0), "dopri5", **kw)
    assert sol.sample_stats.naccept.tolist() == acc
    torch.testing.assert_close(sol.u, ref, rtol=1e-10, atol=1e-12)


def test_float32_state():
    u0 = VDP_U0.float()
    kw = {"saveat": linspace(0.0, 2.0, 5), "rtol": 1e-5, "atol": 1e-6}
    sol = dl.solve(
        dl.ODEProblem(vdp, u0, (0.0, 2.0), VDP_MU.float()), "tsit5", per_sample=True, **kw
    )
    ref = dl.solve(dl.ODEProblem(vdp, VDP_U0, (0.0, 2.0), VDP_MU), "tsit5", per_sample=True, **kw)
    assert sol.u.dtype == torch.float32
    torch.testing.assert_close(sol.u.double(), ref.u, rtol=1e-4, atol=1e-4)


def test_custom_norm_per_sample():
    # A max norm over each sample's elements; the standalone solve gets the same norm.
    def max_norm(x):
        return x.reshape(x.shape[0], -1).abs().amax(dim=1)

    kw = {"saveat": linspace(0.0, 2.0, 5), "rtol": 1e-7, "atol": 1e-7, "norm": max_norm}
    sol = dl.solve(dl.ODEProblem(vdp, VDP_U0, (0.0, 2.0), VDP_MU), "dopri5", per_sample=True, **kw)
    ref, acc, _ = standalone(vdp, VDP_U0, VDP_MU, (0.0, 2.0), "dopri5", **kw)
    assert sol.sample_stats.naccept.tolist() == acc
    torch.testing.assert_close(sol.u, ref, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------


def _final(mu, u0, method="tsit5", per_sample=True, **kw):
    prob = dl.ODEProblem(vdp, u0, (0.0, 0.3), mu)
    kw.setdefault("saveat", T([0.0, 0.1, 0.3]))
    kw.setdefault("rtol", 1e-9)
    kw.setdefault("atol", 1e-9)
    return dl.diffeq_rd(mu, lambda s: s.u[1:], prob, method, u0=u0, per_sample=per_sample, **kw)


def test_gradcheck_reverse_mode():
    mu = T([0.5, 3.0]).requires_grad_()
    u0 = T([[1.0, 0.5], [2.0, -1.0]]).requires_grad_()
    # As in test_gradients.py: finite differences re-solve with perturbed steps, so they match
    # the discrete derivative to about the global error (10 * rtol) plus their own rounding.
    check = {"eps": 1e-6, "atol": 10 * 1e-9 + 1e-8, "rtol": 1e-6}
    assert gradcheck(lambda m, u: _final(m, u)[-1], (mu, u0), **check)


def test_reverse_mode_equals_standalone_reverse_mode():
    # Both differentiate the same steps: the gradients agree to rounding.
    mu = T([0.5, 3.0, 1.0]).requires_grad_()
    u0 = VDP_U0.clone().requires_grad_()
    w = torch.randn(2, 3, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    kw = {"rtol": 1e-6, "atol": 1e-6}
    (g_mu, g_u0) = torch.autograd.grad((_final(mu, u0, **kw) * w).sum(), (mu, u0))
    for b in range(3):
        mb = mu.detach()[b : b + 1].clone().requires_grad_()
        ub = u0.detach()[b : b + 1].clone().requires_grad_()
        out = _final(mb, ub, per_sample=False, **kw)
        gm, gu = torch.autograd.grad((out * w[:, b : b + 1]).sum(), (mb, ub))
        torch.testing.assert_close(g_mu[b : b + 1], gm, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(g_u0[b : b + 1], gu, rtol=1e-9, atol=1e-11)


def test_time_gradients_match_shared_solver():
    # d/dt1 of the final state is f(t1, u(t1)) for every sample, through the same exact-flow
    # terms as the shared solver.
    mu, u0 = VDP_MU[:2], VDP_U0[:2]
    t1 = T(1.0).requires_grad_()
    kw = {"rtol": 1e-8, "atol": 1e-8, "saveat": 0.5}
    grads = []
    for per_sample in (True, False):
        prob = dl.ODEProblem(vdp, u0, (0.0, t1), mu)
        out = dl.solve(prob, "tsit5", per_sample=per_sample, **kw).u[-1]
        grads.append(torch.autograd.grad(out.sum(), t1)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)


def test_forward_mode_matches_reverse_mode():
    mu = T([0.5, 3.0])
    u0 = VDP_U0[:2]
    prob = dl.ODEProblem(vdp, u0, (0.0, 0.3), mu)
    kw = {"saveat": [0.0, 0.3], "rtol": 1e-6, "atol": 1e-6, "per_sample": True}

    def loss(s):
        return (s.u[-1] ** 2).sum()

    mu_rd = mu.clone().requires_grad_()
    (g_rd,) = torch.autograd.grad(dl.diffeq_rd(mu_rd, loss, prob, "tsit5", **kw), mu_rd)
    mu_fd = mu.clone().requires_grad_()
    (g_fd,) = torch.autograd.grad(dl.diffeq_fd(mu_fd, loss, prob, "tsit5", **kw), mu_fd)
    torch.testing.assert_close(g_fd, g_rd, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Failures and bad input
# ----------------------------------------------------------------------------------------------


def _prob(u0=VDP_U0, mu=VDP_MU):
    return dl.ODEProblem(vdp, u0, (0.0, 1.0), mu)


def test_failure_names_the_sample():
    mu = T([0.5, 1000.0])  # the second is stiff: tsit5 needs many steps
    prob = _prob(VDP_U0[:2], mu)
    with pytest.raises(dl.SolverError, match=r"sample 1 .*max_num_steps \(50\)"):
        dl.solve(prob, "tsit5", saveat=[0.0, 0.5, 1.0], per_sample=True, max_num_steps=50)
    sol = dl.solve(
        prob,
        "tsit5",
        saveat=[0.0, 0.5, 1.0],
        per_sample=True,
        max_num_steps=50,
        throw_on_failure=False,
    )
    assert sol.retcode == dl.ReturnCode.MaxIters and "sample 1" in sol.message
    # Only the rows every sample reached: here the initial one.
    assert sol.u.shape[1:] == (2, 2) and len(sol) == sol.u.shape[0] < 3
    assert sol.sample_stats.naccept[0] > 0


def test_non_finite_initial_state_is_refused():
    u0 = VDP_U0.clone()
    u0[2, 0] = math.nan
    with pytest.raises(dl.SolverError, match="sample 2 .*not finite"):
        dl.solve(_prob(u0), "tsit5", saveat=[0.0, 1.0], per_sample=True)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"u0": T(1.0)}, ValueError, r"batched state u0 of shape \[B, \.\.\.\]"),
        ({"saveat": None}, ValueError, "needs saveat"),
        ({"dense": True}, ValueError, "dense"),
        ({"adaptive": False, "dt": 0.1}, ValueError, "adaptive=false"),
        ({"solver": "rk4", "dt": 0.1}, ValueError, "'rk4' takes fixed steps"),
        ({"solver": "rodas5"}, ValueError, "explicit adaptive methods.*not 'rodas5'"),
        ({"solver": "explicit_adams", "dt": 0.1}, ValueError, "not 'explicit_adams'"),
        ({"solver": "nope"}, ValueError, "nope"),
        ({"norm": lambda x: x.abs().max()}, ValueError, r"one value per sample \(\[B\] = \[3\]\)"),
    ],
)
def test_bad_input_raises_clearly(kwargs, exc, match):
    kwargs = dict(kwargs)
    solver = kwargs.pop("solver", "tsit5")
    kwargs.setdefault("saveat", [0.0, 1.0])
    with pytest.raises(exc, match=match):
        dl.solve(_prob(), solver, per_sample=True, **kwargs)


def test_adjoint_is_refused():
    mu = VDP_MU.clone().requires_grad_()
    with pytest.raises(ValueError, match="per_sample=True is not supported by diffeq_adjoint"):
        dl.diffeq_adjoint(
            mu, lambda s: s.u.sum(), _prob(), "tsit5", saveat=[0.0, 1.0], per_sample=True
        )


def test_float_only_f_gets_a_note():
    def needs_float_t(u, p, t):
        return -u * math.cos(t)

    with pytest.raises((TypeError, ValueError)) as info:
        dl.solve(
            dl.ODEProblem(needs_float_t, VDP_U0, (0.0, 1.0)),
            "tsit5",
            saveat=[0.0, 1.0],
            per_sample=True,
        )
    assert any("t is a tensor of shape [B]" in n for n in getattr(info.value, "__notes__", []))


def test_f_returning_wrong_shape():
    with pytest.raises(
        ValueError, match=r"f returned shape \[3\] but the state has shape \[3, 2\]"
    ):
        dl.solve(
            dl.ODEProblem(lambda u, p, t: u[:, 0], VDP_U0, (0.0, 1.0)),
            "tsit5",
            saveat=[0.0, 1.0],
            per_sample=True,
        )


def test_large_state_save_points():
    # A state large enough, with enough save points per step (about 14), that the save-point
    # interpolation takes its batched matrix-product path instead of the broadcast one.
    k = T([0.5, 3.0])
    u0 = torch.rand(2, 8_000, dtype=F64, generator=torch.Generator().manual_seed(1)) + 0.5
    times = linspace(0.0, 1.0, 201)
    prob = dl.ODEProblem(lambda u, p, t: -p[:, None] * u, u0, (0.0, 1.0), k)
    kw = {"saveat": times, "rtol": 1e-8, "atol": 1e-10}
    sol = dl.solve(prob, "tsit5", per_sample=True, **kw)
    exact = u0[None] * torch.exp(-k[None, :, None] * times[:, None, None])
    torch.testing.assert_close(sol.u, exact, rtol=1e-7, atol=1e-9)
    ref, acc, _ = standalone(lambda u, p, t: -p[:, None] * u, u0, k, (0.0, 1.0), "tsit5", **kw)
    assert sol.sample_stats.naccept.tolist() == acc
    torch.testing.assert_close(sol.u, ref, rtol=1e-10, atol=1e-12)
