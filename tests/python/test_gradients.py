"""Reverse-mode gradients through diffeq_rd / solve: gradcheck for every method, analytic
gradients, nn.Module parameters, and gradients with respect to the times.

Why finite differences match reverse mode only to about the tolerance for adaptive methods:
reverse mode differentiates the discrete solution with the step sequence held fixed (step-size
decisions are made without grad, as in torchdiffeq and diffrax), while a finite difference
re-solves with perturbed inputs, so the controller picks slightly different steps. The output's
dependence on the step sizes is of the size of the local errors, i.e. of the tolerance; hence
the gradcheck atol of an adaptive method is GLOBAL_ERROR_FACTOR * rtol (plus 1e-8 for the
rounding of a central difference with eps = 1e-6 on outputs ~1), and tight tolerances are used.
Fixed-step methods are differentiated exactly (the same discrete map), so there only the finite
difference's own error (~1e-10) remains.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    FIXED,
    GLOBAL_ERROR_FACTOR,
    LV_PARAMS,
    METHODS,
    accuracy_kwargs,
    decay,
    error_bound,
    lotka_volterra,
    max_abs_err,
    oscillator,
)
from torch.autograd import gradcheck

import diffeqlayers as dl

# Tolerances of the adaptive gradchecks: as tight as the method's cost allows on a short span
# (order 2 methods need ~sqrt(1/rtol) steps, so they get looser ones and a matching atol).
GRADCHECK_RTOL = {
    "adaptive_heun": 1e-6,
    "fehlberg2": 1e-7,
    "bosh3": 1e-8,
    "dopri5": 1e-11,
    "tsit5": 1e-11,
    "dopri8": 1e-12,
}


def _grad_settings(method):
    """(solve kwargs, gradcheck kwargs) for a float64 gradcheck of `method`."""
    if method in FIXED:
        return {"dt": 0.05}, {"eps": 1e-6, "atol": 1e-8, "rtol": 1e-6}
    rtol = GRADCHECK_RTOL[method]
    check = {"eps": 1e-6, "atol": GLOBAL_ERROR_FACTOR[method] * rtol + 1e-8, "rtol": 1e-6}
    # Low-order methods take hundreds of steps even at these tolerances: check a random
    # projection of the Jacobian (gradcheck's fast mode) rather than every column, and leave the
    # undefined-grad check (the same code path for every method) to the cheaper gradchecks.
    if dl.tableau(method).order <= 3:
        check.update(fast_mode=True, check_undefined_grad=False)
    return {"rtol": rtol, "atol": rtol}, check


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_u0_and_params_lotka_volterra(method):
    kwargs, check = _grad_settings(method)
    p = torch.tensor(LV_PARAMS, dtype=torch.float64, requires_grad=True)
    u0 = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    prob = dl.ODEProblem(lotka_volterra, u0.detach(), (0.0, 0.25), p.detach())

    def final_state(u0_, p_):
        return dl.diffeq_rd(p_, lambda sol: sol.u[-1], prob, method, u0=u0_, **kwargs)

    assert gradcheck(final_state, (u0, p), **check)


@pytest.mark.parametrize("method", ["euler", "rk4", "tsit5"])
def test_gradcheck_backwards_in_time(method):
    kwargs, check = _grad_settings(method)
    p = torch.tensor(LV_PARAMS, dtype=torch.float64, requires_grad=True)
    u0 = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    prob = dl.ODEProblem(lotka_volterra, u0.detach(), (0.25, 0.0), p.detach())

    def final_state(u0_, p_):
        return dl.diffeq_rd(p_, lambda sol: sol.u[-1], prob, method, u0=u0_, **kwargs)

    assert gradcheck(final_state, (u0, p), **check)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("method", METHODS)
def test_gradient_through_interpolated_save_points(method, dtype, request):
    # u' = -a u: u(t_i) = u0 exp(-a t_i), so d sum_i u(t_i) / d u0_j = sum_i exp(-a t_i) and
    # d sum_{i,j} u_j(t_i) / d a = -sum_{i,j} t_i u0_j exp(-a t_i). The save times lie strictly
    # inside steps (the fixed dt = 0.02 does not divide them), so every saved state except the
    # last comes from the interpolant. The gradient of the discrete solution differs from the
    # exact one by the solution's own error bound (relative, since the problem is linear in
    # u0), times ~T for the derivative with respect to a; 4 * bound covers both.
    a = torch.tensor(0.8, dtype=dtype, requires_grad=True)
    u0 = torch.tensor([1.0, 0.5], dtype=dtype, requires_grad=True)
    times = [0.13, 0.5, 0.77, 1.0]
    prob = dl.ODEProblem(decay, u0, (0.0, 1.0), a)
    kwargs = accuracy_kwargs(method, dtype)
    sol = dl.solve(prob, method, saveat=times, **kwargs)
    g_u0, g_a = torch.autograd.grad(sol.u.sum(), (u0, a))

    t = torch.tensor(times, dtype=torch.float64)
    e = torch.exp(-0.8 * t)
    exact_u0 = torch.full((2,), float(e.sum()), dtype=torch.float64)
    exact_a = -float((t * e).sum()) * 1.5
    bound = 4 * error_bound(method, dtype, 1.0, sol.stats.naccept)
    assert max_abs_err(g_u0, exact_u0) <= bound, (g_u0, exact_u0)
    assert abs(float(g_a) - exact_a) <= bound * 1.5, (float(g_a), exact_a)


@pytest.mark.parametrize("method", ["rk4", "heun3", "tsit5", "dopri5", "bosh3"])
def test_gradcheck_with_interpolated_save_points(method):
    # The same as test_gradcheck_u0_and_params_lotka_volterra, but every output is a state saved
    # between steps: the interpolant (own or Hermite) must be differentiated correctly too.
    kwargs, check = _grad_settings(method)
    p = torch.tensor(LV_PARAMS, dtype=torch.float64, requires_grad=True)
    u0 = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    prob = dl.ODEProblem(lotka_volterra, u0.detach(), (0.0, 0.25), p.detach())

    def saved(u0_, p_):
        return dl.diffeq_rd(
            p_, lambda sol: sol.u, prob, method, u0=u0_, saveat=[0.07, 0.19], **kwargs
        )

    assert gradcheck(saved, (u0, p), **check)


@pytest.mark.parametrize("method", METHODS)
def test_decay_rate_gradient_matches_analytic(method):
    # d u(T) / d a = -T u0 exp(-a T) for u' = -a u (saving every step: no interpolation).
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    u0 = torch.tensor([2.0], dtype=torch.float64)
    T = 1.5
    prob = dl.ODEProblem(decay, u0, (0.0, T), a)
    out = dl.diffeq_rd(
        a, lambda sol: sol.u[-1].sum(), prob, method, **accuracy_kwargs(method, torch.float64)
    )
    (g,) = torch.autograd.grad(out, a)
    exact = -T * 2.0 * math.exp(-0.7 * T)
    # Relative to |exact| ~ 1.05: the solution's error bound times ~T (see above) covers it.
    bound = 4 * error_bound(method, torch.float64, T, 0)
    assert abs(float(g) - exact) <= bound, (float(g), exact)


def test_float32_gradient_matches_analytic():
    a = torch.tensor(0.7, dtype=torch.float32, requires_grad=True)
    u0 = torch.tensor([2.0], dtype=torch.float32, requires_grad=True)
    prob = dl.ODEProblem(decay, u0, (0.0, 1.0), a)
    out = dl.diffeq_rd(a, lambda sol: sol.u[-1].sum(), prob, "tsit5", rtol=1e-6, atol=1e-8)
    g_a, g_u0 = torch.autograd.grad(out, (a, u0))
    assert g_a.dtype == torch.float32
    # tsit5 at rtol 1e-6 (K = 10) plus float32 rounding.
    assert abs(float(g_a) - (-2.0 * math.exp(-0.7))) <= 1e-5 + 1e-5
    assert abs(float(g_u0) - math.exp(-0.7)) <= 1e-5 + 1e-5


def test_gradient_through_dense_output():
    a = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    u0 = torch.tensor([1.0, 3.0], dtype=torch.float64, requires_grad=True)
    prob = dl.ODEProblem(decay, u0, (0.0, 1.0), a)
    sol = dl.solve(prob, "tsit5", dense=True, rtol=1e-10, atol=1e-12)
    value = sol(0.37).sum()
    g_u0, g_a = torch.autograd.grad(value, (u0, a))
    e = math.exp(-0.8 * 0.37)
    # tsit5's own 4th-order interpolant on steps of ~0.05 at rtol 1e-10: error well below 1e-8.
    assert max_abs_err(g_u0, torch.full((2,), e, dtype=torch.float64)) <= 1e-8
    assert abs(float(g_a) - (-0.37 * 4.0 * e)) <= 1e-8


def test_batched_u0_gradient_has_its_shape():
    u0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    prob = dl.ODEProblem(oscillator, u0, (0.0, 1.0))
    sol = dl.solve(prob, "rk4", dt=0.01)
    (g,) = torch.autograd.grad(sol.u[-1][:, 0].sum(), u0)
    # x(1) = x0 cos 1 + y0 sin 1 for every member.
    expected = torch.tensor([math.cos(1.0), math.sin(1.0)], dtype=torch.float64).expand(3, 2)
    assert g.shape == (3, 2)
    assert max_abs_err(g, expected) <= 1e-9  # rk4, dt = 0.01: T h^4 = 1e-8 bound, ~1e-10 seen


def test_no_graph_without_grad():
    u0 = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    prob = dl.ODEProblem(oscillator, u0, (0.0, 1.0))
    with torch.no_grad():
        sol = dl.solve(prob, "tsit5", saveat=[0.5, 1.0])
    assert not sol.u.requires_grad
    sol = dl.solve(prob, "tsit5", saveat=[0.5, 1.0])
    assert sol.u.requires_grad


# ----------------------------------------------------------------------------------------------
# nn.Module parameters
# ----------------------------------------------------------------------------------------------


class MLPField(torch.nn.Module):
    def __init__(self, hidden=8):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.l1 = torch.nn.Linear(2, hidden, dtype=torch.float64)
        self.l2 = torch.nn.Linear(hidden, 2, dtype=torch.float64)
        with torch.no_grad():
            for prm in self.parameters():
                prm.copy_(torch.randn(prm.shape, generator=gen, dtype=torch.float64) * 0.5)

    def forward(self, u):
        return self.l2(torch.tanh(self.l1(u)))


def _mlp_dynamics(u, p, t):
    return p(u)


def _module_grads(model, method, **kwargs):
    prob = dl.ODEProblem(
        _mlp_dynamics, torch.tensor([0.5, -0.3], dtype=torch.float64), (0.0, 1.0), model
    )
    model.zero_grad()
    loss = dl.diffeq_rd(model, lambda sol: (sol.u[-1] ** 2).sum(), prob, method, **kwargs)
    loss.backward()
    return loss.detach(), [prm.grad.clone() for prm in model.parameters()]


@pytest.fixture(scope="module")
def rk4_module_reference():
    model = MLPField()
    return _module_grads(model, "rk4", dt=2e-3)


@pytest.mark.parametrize("method", ["tsit5", "dopri5", "dopri8"])
def test_module_parameter_gradients_match_fine_rk4(method, rk4_module_reference):
    # Reference: rk4 at dt = 2e-3 (global error ~ T h^4 ~ 2e-11). Both gradients are those of
    # discrete solutions within ~1e-9 of the exact one (rtol 1e-10, K = 10), so they agree to
    # ~1e-8 for O(1) gradients.
    model = MLPField()
    ref_loss, ref = rk4_module_reference
    loss, grads = _module_grads(model, method, rtol=1e-10, atol=1e-12)
    assert abs(float(loss - ref_loss)) <= 1e-8
    for g, r in zip(grads, ref):
        assert g.shape == r.shape
        assert max_abs_err(g, r) <= 1e-8


def test_gradcheck_module_parameters():
    # Every weight of a small MLP as a gradcheck input, through torch.func.functional_call.
    model = MLPField(hidden=4)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(prm.detach().clone().requires_grad_(True) for prm in model.parameters())
    u0 = torch.tensor([0.5, -0.3], dtype=torch.float64)

    def final_state(*ps):
        weights = dict(zip(names, ps))

        def f(u, p, t):
            return torch.func.functional_call(model, weights, (u,))

        prob = dl.ODEProblem(f, u0, (0.0, 1.0))
        return dl.solve(prob, "rk4", dt=0.1).u[-1]

    assert gradcheck(final_state, params, eps=1e-6, atol=1e-8, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Gradients with respect to the times
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("span", [(0.0, 2.0), (2.0, 0.0)], ids=["forward", "backward"])
@pytest.mark.parametrize(
    "method,kwargs", [("rk4", {"dt": 0.01}), ("tsit5", {"rtol": 1e-10, "atol": 1e-12})]
)
def test_saveat_gradient_is_f_at_the_saved_state(method, kwargs, span):
    # d/dt_i sum(u(t_i)) = sum(f(t_i, u(t_i))) for the flow of the ODE.
    times = [0.3, 0.95, 1.6] if span[1] > span[0] else [1.6, 0.95, 0.3]
    ts = torch.tensor(times, dtype=torch.float64, requires_grad=True)
    prob = dl.ODEProblem(oscillator, torch.tensor([1.0, 0.5], dtype=torch.float64), span)
    sol = dl.solve(prob, method, saveat=ts, **kwargs)
    assert sol.t.tolist() == times
    (g,) = torch.autograd.grad(sol.u.sum(), ts)
    expected = torch.stack([oscillator(sol.u[i].detach(), None, times[i]).sum() for i in range(3)])
    assert max_abs_err(g, expected) <= 1e-12


@pytest.mark.parametrize(
    "method,kwargs,atol",
    [
        # rk4, dt = 0.01: the finite difference differentiates the cubic Hermite interpolant,
        # whose derivative is within h^3 |u4| / (72 sqrt 3) ~ 8e-9 |u4| of u' (u4: the fourth
        # derivative, up to ~100 on this orbit): <= 1e-6.
        ("rk4", {"dt": 0.01}, 1e-6),
        # tsit5 at rtol 1e-10: own 4th-order interpolant, derivative error O(h^4) on h ~ 0.05.
        ("tsit5", {"rtol": 1e-10, "atol": 1e-12}, 1e-6),
    ],
)
def test_gradcheck_saveat_times(method, kwargs, atol):
    prob = dl.ODEProblem(
        lotka_volterra,
        torch.tensor([1.0, 1.0], dtype=torch.float64),
        (0.0, 1.0),
        torch.tensor(LV_PARAMS, dtype=torch.float64),
    )
    ts = torch.tensor([0.123, 0.456, 0.789], dtype=torch.float64, requires_grad=True)

    def saved(times):
        return dl.solve(prob, method, saveat=times, **kwargs).u

    assert gradcheck(saved, (ts,), eps=1e-6, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("saveat", [None, [0.9, 1.2]], ids=["every_step", "list"])
@pytest.mark.parametrize("span", [(0.5, 1.5), (1.5, 0.5)], ids=["forward", "backward"])
@pytest.mark.parametrize(
    "method,kwargs",
    [
        ("rk4", {"dt": 0.01}),
        ("tsit5", {"rtol": 1e-10, "atol": 1e-12}),
        ("dopri5", {"rtol": 1e-10, "atol": 1e-12}),
    ],
)
def test_tspan_gradients_match_analytic(method, kwargs, span, saveat):
    # u(t) = u0 exp(-a (t - t0)): d u(t1)/d t0 = a u(t1), d u(t1)/d t1 = -a u(t1), and a state
    # saved at a fixed time t_s inside the span depends on t0 only: d u(t_s)/d t0 = a u(t_s).
    a = 0.7
    t0 = torch.tensor(span[0], dtype=torch.float64, requires_grad=True)
    t1 = torch.tensor(span[1], dtype=torch.float64, requires_grad=True)
    u0 = torch.tensor([2.0], dtype=torch.float64)
    prob = dl.ODEProblem(decay, u0, (t0, t1), a)
    if saveat is not None and span[1] < span[0]:
        saveat = saveat[::-1]
    sol = dl.solve(prob, method, saveat=saveat, **kwargs)
    last = sol.u[-1].sum()
    g0, g1 = torch.autograd.grad(last, (t0, t1), allow_unused=True)
    t_last = float(sol.t[-1])
    u_last = 2.0 * math.exp(-a * (t_last - span[0]))
    # Both methods are accurate to ~1e-9 here (rk4: T h^4 = 1e-8 bound).
    assert abs(float(g0) - a * u_last) <= 1e-8
    if saveat is None:
        assert t_last == span[1]
        assert abs(float(g1) - (-a * u_last)) <= 1e-8
    else:
        # A fixed save time does not move with t1.
        assert g1 is None or float(g1) == 0.0


def test_gradcheck_tspan_entries():
    # Fixed steps: perturbing t1 by eps shortens or lengthens the last step, perturbing t0 moves
    # the start; the discrete map stays smooth, and its derivative is within O(h^4) of the exact
    # one, which is what reverse mode returns (it uses f at the ends).
    prob_u0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    p = torch.tensor(LV_PARAMS, dtype=torch.float64)

    def final_state(t0, t1):
        prob = dl.ODEProblem(lotka_volterra, prob_u0, (t0, t1), p)
        return dl.solve(prob, "rk4", dt=0.01).u[-1]

    t0 = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    t1 = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    # Reverse mode gives the exact flow's time derivatives (f at the ends, propagated by the
    # discrete sensitivity); the finite difference sees the discrete map. rk4 at h = 0.01 makes
    # them differ by ~h^4 * |derivatives| ~ 1e-7.
    assert gradcheck(final_state, (t0, t1), eps=1e-6, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Second derivatives
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,kwargs", [("rk4", {"dt": 0.01}), ("tsit5", {"rtol": 1e-10, "atol": 1e-12})]
)
def test_second_derivative_matches_analytic(method, kwargs):
    # d^2 u(T) / d a^2 = T^2 u0 exp(-a T) for u' = -a u; also through interpolated save points.
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    prob = dl.ODEProblem(decay, torch.tensor([2.0], dtype=torch.float64), (0.0, 1.5), a)
    out = dl.diffeq_rd(a, lambda s: s.u.sum(), prob, method, saveat=[0.33, 1.5], **kwargs)
    (g,) = torch.autograd.grad(out, a, create_graph=True)
    (h,) = torch.autograd.grad(g, a)
    exact = 2.0 * sum(t * t * math.exp(-0.7 * t) for t in (0.33, 1.5))
    # Both methods are within ~1e-9 of the exact solution; derivatives with respect to a of
    # this linear problem inherit that, times O(T^2).
    assert abs(float(h) - exact) <= 1e-8


def test_gradgradcheck_fixed_step():
    p = torch.tensor(LV_PARAMS, dtype=torch.float64, requires_grad=True)
    u0 = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    prob = dl.ODEProblem(lotka_volterra, u0.detach(), (0.0, 0.25), p.detach())

    def saved(u0_, p_):
        return dl.diffeq_rd(p_, lambda s: s.u, prob, "rk4", u0=u0_, dt=0.05, saveat=[0.12, 0.25])

    assert torch.autograd.gradgradcheck(saved, (u0, p), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_parameter_captured_by_a_closure_gets_its_gradient():
    # Everything f does is recorded, so a tensor f closes over (not passed as p) is differentiated
    # too: d u(T)/d a = -T u0 exp(-a T).
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    prob = dl.ODEProblem(
        lambda u, p, t: -a * u, torch.tensor([2.0], dtype=torch.float64), (0.0, 1.5)
    )
    sol = dl.solve(prob, "tsit5", rtol=1e-10, atol=1e-12, saveat=[0.5, 1.5])
    (g,) = torch.autograd.grad(sol.u[-1].sum(), a)
    assert abs(float(g) - (-1.5 * 2.0 * math.exp(-0.7 * 1.5))) <= 1e-8


def test_t0_and_saveat_gradients_together():
    # u' = -u, u(t0) = 1: u(t_i) = exp(-(t_i - t0)); d/dt0 sum_i u(t_i) = sum_i u(t_i) and
    # d/dt_i = -u(t_i).
    t0 = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    ts = torch.tensor([0.5, 1.0], dtype=torch.float64, requires_grad=True)
    prob = dl.ODEProblem(lambda u, p, t: -u, torch.tensor([1.0], dtype=torch.float64), (t0, 1.0))
    sol = dl.solve(prob, "rk4", dt=0.01, saveat=ts)
    g0, gs = torch.autograd.grad(sol.u.sum(), (t0, ts))
    e = [math.exp(-0.5), math.exp(-1.0)]
    # rk4 at h = 0.01: ~1e-10.
    assert abs(float(g0) - sum(e)) <= 1e-9
    assert max_abs_err(gs, -torch.tensor(e, dtype=torch.float64)) <= 1e-9


# ----------------------------------------------------------------------------------------------
# The solver's own autograd nodes
# ----------------------------------------------------------------------------------------------


def _node_names(out: torch.Tensor) -> set[str]:
    seen, names, todo = set(), set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        todo.extend(nxt for nxt, _ in node.next_functions)
    return names


@pytest.mark.parametrize("method", ["dopri5", "rk4"])  # own interpolant, cubic Hermite
def test_direct_nodes_match_the_registered_operator(method):
    # On plain CPU stages the solver records its combinations and interpolations as nodes made
    # directly (diffeqlayers::LinCombBackward, InterpolationBackward); stages the direct path
    # does not take (here non-contiguous ones: f returns a transposed view) go through the
    # registered operator diffeqlayers::lincomb and ATen's ops. Both must differentiate alike.
    a = torch.tensor([[-0.5, 1.0], [-1.0, -0.3]], dtype=torch.float64)
    u0 = torch.tensor([[1.0, 0.2], [-0.4, 0.7]], dtype=torch.float64)
    kwargs = {"dt": 0.05} if method == "rk4" else {"rtol": 1e-8, "atol": 1e-10}

    def grads(transposed: bool):
        p = a.clone().requires_grad_()
        x0 = u0.clone().requires_grad_()

        def f(u, p, t):
            out = (p @ u).t().contiguous()
            return out.t() if transposed else out.t().contiguous()

        prob = dl.ODEProblem(f, x0, (0.0, 1.0), p)
        sol = dl.solve(prob, method, saveat=[0.31, 0.77, 1.0], **kwargs)
        names = _node_names(sol.u)
        loss = sol.u * torch.linspace(-1, 1, sol.u.numel(), dtype=torch.float64).view_as(sol.u)
        gp, gx = torch.autograd.grad(loss.sum(), [p, x0])
        return names, gp, gx

    direct, gp_d, gx_d = grads(False)
    generic, gp_g, gx_g = grads(True)
    assert {"diffeqlayers::LinCombBackward", "diffeqlayers::InterpolationBackward"} <= direct
    assert "diffeqlayers::LinCombBackward" not in generic
    assert "diffeqlayers::InterpolationBackward" not in generic
    assert torch.allclose(gp_d, gp_g, rtol=1e-12, atol=1e-13)
    assert torch.allclose(gx_d, gx_g, rtol=1e-12, atol=1e-13)


def test_long_recorded_chain_is_freed():
    # 100 000 recorded steps: a chain of 100 000 direct nodes, freed when the solution goes (the
    # graph is torn down without recursion, or this would overflow the stack); its gradient is
    # the exact one of the discrete map, (1 - p dt)^n.
    p = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    prob = dl.ODEProblem(lambda u, p, t: -p * u, torch.ones(1, dtype=torch.float64), (0.0, 1.0), p)
    sol = dl.solve(prob, "euler", dt=1e-5, saveat=[1.0], max_num_steps=200_000)
    assert sol.stats.naccept == 100_000
    (g,) = torch.autograd.grad(sol.u.sum(), p)
    n, dt = 100_000, 1e-5
    assert torch.allclose(g, torch.tensor([-n * dt * (1 - 0.5 * dt) ** (n - 1)], dtype=p.dtype))
    del sol


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_save_points_agree_across_the_interpolation_loops_size_limit(method):
    # Save points inside a step are interpolated by a host loop up to 1024 state elements and by
    # a matrix product beyond: an uncoupled system solved whole (1100 elements) and its first 8
    # components alone, on the same fixed steps, give the same save points and gradients.
    a = torch.tensor(0.8, dtype=torch.float64)
    big0 = torch.linspace(0.5, 1.5, 1100, dtype=torch.float64)

    def run(u0):
        p = a.clone().requires_grad_()
        prob = dl.ODEProblem(lambda u, p, t: -p * u + torch.sin(u), u0, (0.0, 1.0), p)
        sol = dl.solve(prob, method, dt=0.1, adaptive=False, saveat=[0.23, 0.55, 0.61, 1.0])
        (g,) = torch.autograd.grad(sol.u[:, :8].sum(), p)
        return sol.u[:, :8].detach(), g

    u_big, g_big = run(big0)
    u_small, g_small = run(big0[:8].clone())
    assert torch.allclose(u_big, u_small, rtol=1e-14, atol=1e-15)
    assert torch.allclose(g_big, g_small, rtol=1e-13, atol=1e-15)


def test_deferred_stage_gradients_with_rejected_steps_and_retained_graphs():
    # In a recorded solve each stage's gradient is handed on by its first reader, the next
    # stage combination, after the later readers deposit their shares (core/grad_sinks.h). A
    # rejected step's first reader still hands on the shares the retried step deposited. The
    # result must equal the generic path's (non-contiguous stages: no deposits), also when the
    # graph is differentiated again, or for the state alone.
    mu = torch.tensor(8.0, dtype=torch.float64)
    u0 = torch.tensor([2.0, 0.0], dtype=torch.float64)

    def run(transposed: bool):
        p = mu.clone().requires_grad_()
        x0 = u0.clone().requires_grad_()

        def f(u, p, t):
            out = torch.stack([u[1], p * (1 - u[0] ** 2) * u[1] - u[0]]).view(1, 2)
            return out.t().view(2) if not transposed else out.expand(2, 2)[0]

        prob = dl.ODEProblem(f, x0, (0.0, 3.0), p)
        # A first step far too large: rejected, retried smaller.
        sol = dl.solve(
            prob, "dopri5", saveat=torch.linspace(0, 3, 17), rtol=1e-6, atol=1e-8, dt=1.0
        )
        loss = (sol.u**2).sum()
        first = torch.autograd.grad(loss, [p, x0], retain_graph=True)
        again = torch.autograd.grad(loss, [p, x0], retain_graph=True)
        (alone,) = torch.autograd.grad(loss, [x0])
        return sol, first, again, alone

    sol, first, again, alone = run(False)
    assert sol.stats.nreject > 0
    _, first_g, _, _ = run(True)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert torch.equal(alone, first[1])
    for a, b in zip(first, first_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "rk4"])
def test_f_returning_its_input_differentiates(method):
    # f(u) = u: the first stage is the state itself, read twice by the first stage combination
    # (as the state and as the stage); d/du0 of u(0.5) + u(1) is e^0.5 + e.
    u0 = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    prob = dl.ODEProblem(lambda u, p, t: u, u0, (0.0, 1.0))
    kwargs = {"dt": 0.01} if method == "rk4" else {"rtol": 1e-10, "atol": 1e-12}
    sol = dl.solve(prob, method, saveat=[0.5, 1.0], **kwargs)
    sol.u.sum().backward()
    expected = torch.full((2,), math.exp(0.5) + math.e, dtype=torch.float64)
    torch.testing.assert_close(u0.grad, expected, rtol=1e-8, atol=0)
