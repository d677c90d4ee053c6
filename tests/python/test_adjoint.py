"""The adjoints (diffeq_adjoint): gradcheck for each, agreement with diffeq_rd, options,
checkpoint caps, time gradients, the layers and odeint_adjoint, errors and threads.

What "agreement" means differs by adjoint. The discrete adjoint differentiates the solver's own
steps, so it equals diffeq_rd's gradient to rounding. The interpolating and backsolve adjoints
solve the continuous adjoint ODE with their own steps, so they approximate the exact gradient to
the tolerances, as diffeq_rd's gradient (of the discretisation) does: they agree with it to about
the tolerance, not to rounding.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import FIXED, GLOBAL_ERROR_FACTOR, LV_PARAMS, METHODS, lotka_volterra
from torch import nn
from torch.autograd import gradcheck

import diffeqlayers as dl

SENSEALGS = ["interpolating", "backsolve", "discrete"]


def _lv(span=(0.0, 10.0)):
    p = torch.tensor(LV_PARAMS, dtype=torch.float64, requires_grad=True)
    u0 = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    return p, u0, dl.ODEProblem(lotka_volterra, u0.detach(), span, p.detach())


def _grads(fn, p, u0, prob, method, reduction=None, **kwargs):
    reduction = reduction or (lambda s: s.u.pow(2).sum())
    loss = fn(p, reduction, prob, method, u0=u0, **kwargs)
    return torch.autograd.grad(loss, (u0, p))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------------------------
# gradcheck (float64)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sensealg", SENSEALGS)
def test_gradcheck(sensealg):
    p, u0, prob = _lv((0.0, 0.25))
    rtol = 1e-11
    # Discrete: the derivative of the discretisation, as diffeq_rd's gradcheck. Continuous
    # adjoints: the exact derivative to the (adjoint) tolerance; the finite difference of the
    # adaptive solve differs from either by about the global error, GLOBAL_ERROR_FACTOR * rtol.
    check = {"eps": 1e-6, "atol": GLOBAL_ERROR_FACTOR["tsit5"] * rtol + 1e-8, "rtol": 1e-6}

    def f(u0_, p_):
        return dl.diffeq_adjoint(
            p_, lambda s: s.u, prob, "tsit5", u0=u0_, saveat=[0.1, 0.2, 0.25],
            rtol=rtol, atol=rtol, sensealg=sensealg,
        )  # fmt: skip

    assert gradcheck(f, (u0, p), **check)


@pytest.mark.parametrize("sensealg", SENSEALGS)
def test_gradcheck_fixed_step_and_backwards_in_time(sensealg):
    # rk4 with a fixed step, from t = 0.3 back to 0: every piece of the machinery in the other
    # direction. Fixed steps make the discrete adjoint exact for finite differences; the
    # continuous ones carry the rk4 error of the adjoint solve (dt^4 ~ 1e-8).
    p, u0, prob = _lv((0.3, 0.0))
    atol = 1e-8 if sensealg == "discrete" else 1e-6

    def f(u0_, p_):
        return dl.diffeq_adjoint(
            p_, lambda s: s.u, prob, "rk4", u0=u0_, saveat=[0.2, 0.05], dt=0.01, sensealg=sensealg
        )

    assert gradcheck(f, (u0, p), eps=1e-6, atol=atol, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Agreement with diffeq_rd
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("saveat", ["spacing", "uneven", "every_step"])
def test_discrete_equals_rd_to_rounding(method, saveat):
    p, u0, prob = _lv((0.0, 2.0))
    # Low-order adaptive methods get looser tolerances, so that the steps stay few.
    tol = {2: 1e-5, 3: 1e-7}.get(dl.tableau(method).order, 1e-8)
    kwargs = {"dt": 0.02} if method in FIXED else {"rtol": tol, "atol": tol}
    kwargs["saveat"] = {
        "spacing": 0.1,
        "uneven": torch.tensor([0.0, 0.013, 0.4, 0.41, 1.7, 2.0], dtype=torch.float64),
        "every_step": None,
    }[saveat]
    g_rd = _grads(dl.diffeq_rd, p, u0, prob, method, **kwargs)
    g_ad = _grads(dl.diffeq_adjoint, p, u0, prob, method, sensealg="discrete", **kwargs)
    for a, b in zip(g_ad, g_rd):
        assert _rel(a, b) < 1e-10


@pytest.mark.parametrize("sensealg", ["interpolating", "backsolve"])
def test_continuous_adjoints_match_rd_on_lotka_volterra(sensealg):
    # The criterion: 1e-6 relative at rtol = atol = 1e-10.
    p, u0, prob = _lv()
    kw = {"saveat": 0.1, "rtol": 1e-10, "atol": 1e-10}
    g_rd = _grads(dl.diffeq_rd, p, u0, prob, "tsit5", **kw)
    g_ad = _grads(dl.diffeq_adjoint, p, u0, prob, "tsit5", sensealg=sensealg, **kw)
    for a, b in zip(g_ad, g_rd):
        assert _rel(a, b) < 1e-6


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sensealg", ["interpolating", "backsolve"])
def test_every_method_with_the_continuous_adjoints(method, sensealg):
    # Against the exact gradient (tight dopri8 reverse mode): fixed-step methods are as accurate
    # as their order allows at dt = 0.01, i.e. C dt^order; adaptive ones as GLOBAL_ERROR_FACTOR
    # times their tolerance (the adjoint solve uses the same method and tolerance).
    p, u0, prob = _lv((0.0, 1.0))
    g_ref = _grads(dl.diffeq_rd, p, u0, prob, "dopri8", saveat=0.25, rtol=1e-13, atol=1e-13)
    order = dl.tableau(method).order
    if method in FIXED:
        kw, bound = {"dt": 0.01}, 10.0 * 0.01**order
    else:
        tol = {2: 1e-6, 3: 1e-8}.get(order, 1e-10)
        kw, bound = {"rtol": tol, "atol": tol}, 10 * GLOBAL_ERROR_FACTOR[method] * tol
    g = _grads(dl.diffeq_adjoint, p, u0, prob, method, saveat=0.25, sensealg=sensealg, **kw)
    for a, b in zip(g, g_ref):
        assert _rel(a, b) < bound


# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sensealg", ["interpolating", "discrete"])
def test_checkpoint_cap_gives_the_same_gradient_with_fewer_states(sensealg):
    p, u0, prob = _lv()
    kw = {"saveat": 0.5, "rtol": 1e-8, "atol": 1e-8, "sensealg": sensealg}
    runs = {}
    for cap in (0, 5):
        keep = []
        loss = dl.diffeq_adjoint(
            p, lambda s, keep=keep: (keep.append(s), s.u.pow(2).sum())[1], prob, "tsit5", u0=u0,
            checkpoints=cap, **kw,
        )  # fmt: skip
        runs[cap] = (torch.autograd.grad(loss, (u0, p)), keep[0])
    (g_all, sol_all), (g_cap, sol_cap) = runs[0], runs[5]
    steps = sol_all.stats.naccept
    assert sol_all.adjoint_stats.checkpoints == steps
    assert sol_cap.adjoint_stats.checkpoints <= 5
    # Discrete: thinned checkpoints cost recomputing the states between them (the interpolating
    # adjoint replays every step once in either case, from the nearest checkpoint).
    if sensealg == "discrete":
        assert sol_cap.adjoint_stats.replayed_steps > sol_all.adjoint_stats.replayed_steps
    # Replays repeat the forward's arithmetic exactly: the gradients agree to rounding.
    for a, b in zip(g_cap, g_all):
        assert _rel(a, b) < 1e-12


def test_seminorm_takes_fewer_backward_steps_for_the_same_gradient():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2)).double()
    x = torch.randn(16, 2, dtype=torch.float64)
    stats, grads = {}, {}
    for semi in (False, True):
        keep = []
        net.zero_grad()
        prob = dl.ODEProblem(lambda u, p, t: p(u), x, (0.0, 2.0), net)
        loss = dl.diffeq_adjoint(
            net, lambda s, keep=keep: (keep.append(s), s.u[-1].pow(2).sum())[1], prob, "dopri5",
            saveat=[2.0], rtol=1e-6, atol=1e-6, sensealg="backsolve", seminorm=semi,
        )  # fmt: skip
        loss.backward()
        stats[semi] = keep[0].adjoint_stats
        grads[semi] = torch.cat([q.grad.reshape(-1) for q in net.parameters()])
    assert stats[True].naccept + stats[True].nreject < stats[False].naccept + stats[False].nreject
    assert _rel(grads[True], grads[False]) < 1e-4


def test_adjoint_tolerances_and_method_are_used():
    p, u0, prob = _lv()
    g_rd = _grads(dl.diffeq_rd, p, u0, prob, "tsit5", saveat=0.5, rtol=1e-10, atol=1e-10)
    stats = {}
    for name, extra in {
        "default": {},
        "loose": {"adjoint_rtol": 1e-5, "adjoint_atol": 1e-5},
        "dopri8": {"adjoint_method": "dopri8"},
    }.items():
        keep = []
        loss = dl.diffeq_adjoint(
            p, lambda s, keep=keep: (keep.append(s), s.u.pow(2).sum())[1], prob, "tsit5", u0=u0,
            saveat=0.5, rtol=1e-10, atol=1e-10, **extra,
        )  # fmt: skip
        g = torch.autograd.grad(loss, (u0, p))
        stats[name] = keep[0].adjoint_stats
        err = max(_rel(a, b) for a, b in zip(g, g_rd))
        assert err < (1e-3 if name == "loose" else 1e-7), (name, err)
    assert stats["loose"].naccept < stats["default"].naccept
    assert stats["dopri8"].naccept < stats["default"].naccept  # a higher order, fewer steps


# ----------------------------------------------------------------------------------------------
# Inputs: times, u0 from p, modules, batches
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sensealg", SENSEALGS)
def test_gradients_with_respect_to_the_times(sensealg):
    p = torch.tensor(LV_PARAMS, dtype=torch.float64)
    u0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    grads = {}
    for mode in ("rd", sensealg):
        t0 = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
        t1 = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
        ts = torch.tensor([0.5, 0.9], dtype=torch.float64, requires_grad=True)
        prob = dl.ODEProblem(lotka_volterra, u0, (t0, t1), p)
        fn = dl.diffeq_rd if mode == "rd" else dl.diffeq_adjoint
        kw = {} if mode == "rd" else {"sensealg": sensealg}
        out = fn(p, lambda s: s.u.pow(2).sum(), prob, "tsit5", saveat=ts, rtol=1e-10, atol=1e-10,
                 **kw)  # fmt: skip
        a = fn(p, lambda s: s.u[-1].sum(), prob, "tsit5", rtol=1e-10, atol=1e-10, **kw)
        grads[mode] = torch.autograd.grad(out + a, (t0, t1, ts))
    for a, b in zip(grads[sensealg], grads["rd"]):
        assert _rel(a, b) < 1e-6


def test_u0_computed_from_p_gets_its_gradient():
    p = torch.tensor([*LV_PARAMS, 1.2], dtype=torch.float64, requires_grad=True)

    def f(u, q, t):
        return lotka_volterra(u, q[:4], t)

    prob = dl.ODEProblem(f, lambda q, t0: torch.stack([q[4], q[4] * 0 + 1.0]), (0.0, 3.0), p)
    red = lambda s: s.u.pow(2).sum()  # noqa: E731
    g_rd = torch.autograd.grad(dl.diffeq_rd(p, red, prob, saveat=0.5), p)[0]
    g_ad = torch.autograd.grad(dl.diffeq_adjoint(p, red, prob, saveat=0.5), p)[0]
    assert g_rd[4] != 0 and _rel(g_ad, g_rd) < 1e-6


@pytest.mark.parametrize("sensealg", ["rd", "adjoint", "interpolating", "backsolve", "discrete"])
def test_neural_ode_layer_all_sensealgs(sensealg):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    ref = dl.NeuralODE(net, (0.0, 1.0), sensealg="rd", rtol=1e-10, atol=1e-10)
    net.zero_grad()
    ref(x).pow(2).sum().backward()
    g_ref = [q.grad.clone() for q in net.parameters()]
    layer = dl.NeuralODE(net, (0.0, 1.0), sensealg=sensealg, rtol=1e-10, atol=1e-10)
    net.zero_grad()
    xg = x.clone().requires_grad_(True)
    model = nn.Sequential(layer, nn.Linear(3, 1).double())
    model(xg).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    net.zero_grad()
    layer(x).pow(2).sum().backward()
    bound = 1e-12 if sensealg in ("rd", "discrete") else 1e-6
    for a, b in zip([q.grad for q in net.parameters()], g_ref):
        assert _rel(a, b) < bound


def test_parameters_restricted_by_adjoint_params():
    # Gradients reach adjoint_params only: a tensor f uses but that is not listed gets none.
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    prob = dl.ODEProblem(lambda u, p, t: -p[0] * u + p[1], torch.ones(2, dtype=torch.float64),
                         (0.0, 1.0), [a, b])  # fmt: skip
    out = dl.diffeq_adjoint([a, b], lambda s: s.u[-1].sum(), prob, adjoint_params=[a])
    (ga,) = torch.autograd.grad(out, [a])
    # d/da of 2 * (e^{-a} + b (1 - e^{-a}) / a) at t = 1
    ea = torch.exp(-a.detach())
    exact = 2 * (-ea + b.detach() * (ea * a.detach() - (1 - ea)) / a.detach() ** 2)
    assert abs(float(ga - exact)) < 1e-7
    out = dl.diffeq_adjoint([a, b], lambda s: s.u[-1].sum(), prob, adjoint_params=[a])
    with pytest.raises(RuntimeError):
        torch.autograd.grad(out, [b])  # b is not an input of the adjoint's graph


# ----------------------------------------------------------------------------------------------
# odeint_adjoint
# ----------------------------------------------------------------------------------------------


class _Func(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2).double()

    def forward(self, t, y):
        return torch.tanh(self.lin(y)) * torch.cos(t)


@pytest.mark.parametrize("sensealg", SENSEALGS)
def test_odeint_adjoint_matches_odeint(sensealg):
    from diffeqlayers.odeint import odeint, odeint_adjoint

    torch.manual_seed(1)
    func = _Func()
    y0 = torch.randn(2, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0.0, 2.0, 6, dtype=torch.float64)
    params = [y0, *func.parameters()]
    g_rd = torch.autograd.grad(odeint(func, y0, t, rtol=1e-10, atol=1e-10).sum(), params)
    out = odeint_adjoint(func, y0, t, rtol=1e-10, atol=1e-10, sensealg=sensealg)
    g_ad = torch.autograd.grad(out.sum(), params)
    for a, b in zip(g_ad, g_rd):
        assert _rel(a, b) < (1e-10 if sensealg == "discrete" else 1e-6)


def test_odeint_adjoint_matches_torchdiffeq():
    tdq = pytest.importorskip("torchdiffeq")
    from diffeqlayers.odeint import odeint_adjoint

    torch.manual_seed(2)
    func = _Func()
    y0 = torch.randn(2, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0.0, 2.0, 6, dtype=torch.float64)
    params = [y0, *func.parameters()]
    kw = {"rtol": 1e-9, "atol": 1e-9, "method": "dopri5"}
    ours = torch.autograd.grad(odeint_adjoint(func, y0, t, **kw).pow(2).sum(), params)
    theirs = torch.autograd.grad(tdq.odeint_adjoint(func, y0, t, **kw).pow(2).sum(), params)
    for a, b in zip(ours, theirs):
        assert _rel(a, b) < 1e-6
    semi = odeint_adjoint(func, y0, t, adjoint_options={"norm": "seminorm"}, **kw)
    for a, b in zip(torch.autograd.grad(semi.pow(2).sum(), params), theirs):
        assert _rel(a, b) < 1e-6


# ----------------------------------------------------------------------------------------------
# Errors, Python exceptions in backward, threads
# ----------------------------------------------------------------------------------------------


def test_bad_options_raise_clear_errors():
    p, u0, prob = _lv((0.0, 1.0))
    red = lambda s: s.u.sum()  # noqa: E731
    with pytest.raises(ValueError, match="sensealg"):
        dl.diffeq_adjoint(p, red, prob, sensealg="quadrature")
    with pytest.raises(ValueError, match="adjoint_method"):
        dl.diffeq_adjoint(p, red, prob, adjoint_method="nope")
    with pytest.raises(ValueError, match="adjoint_rtol"):
        dl.diffeq_adjoint(p, red, prob, adjoint_rtol=-1.0)
    with pytest.raises(ValueError, match="checkpoints"):
        dl.diffeq_adjoint(p, red, prob, checkpoints=-2)
    with pytest.raises(ValueError, match="dense"):
        dl.diffeq_adjoint(p, red, prob, dense=True)
    with pytest.raises(ValueError, match="sensealg"):
        dl.NeuralODE(nn.Linear(2, 2), sensealg="adjointt")


def test_double_backward_is_refused():
    p, u0, prob = _lv((0.0, 1.0))
    out = dl.diffeq_adjoint(p, lambda s: s.u.pow(2).sum(), prob, u0=u0)
    with pytest.raises(RuntimeError, match="twice"):
        torch.autograd.grad(out, p, create_graph=True)


def test_in_place_change_of_a_parameter_before_backward_is_refused():
    p, u0, prob = _lv((0.0, 1.0))
    out = dl.diffeq_adjoint(p, lambda s: s.u.pow(2).sum(), prob, u0=u0)
    with torch.no_grad():
        p.add_(0.1)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.backward()


class _Boom(Exception):
    pass


@pytest.mark.parametrize("sensealg", SENSEALGS)
def test_python_exception_in_f_during_backward_propagates(sensealg):
    p, u0, prob = _lv((0.0, 1.0))
    state = {"armed": False}

    def f(u, q, t):
        if state["armed"]:
            raise _Boom("raised inside backward")
        return lotka_volterra(u, q, t)

    prob = dl.ODEProblem(f, u0.detach(), (0.0, 1.0), p)
    out = dl.diffeq_adjoint(p, lambda s: s.u.pow(2).sum(), prob, u0=u0, sensealg=sensealg)
    state["armed"] = True
    with pytest.raises(_Boom, match="inside backward"):
        out.backward()
    state["armed"] = False
    # The library is still usable afterwards.
    out = dl.diffeq_adjoint(p, lambda s: s.u.pow(2).sum(), prob, u0=u0, sensealg=sensealg)
    out.backward()
    assert torch.isfinite(p.grad).all()


def test_backward_from_several_threads():
    p, u0, prob = _lv((0.0, 3.0))
    expected = {
        s: _grads(dl.diffeq_adjoint, p, u0, prob, "tsit5", saveat=0.5, sensealg=s)
        for s in SENSEALGS
    }
    errors, results = [], {}

    def work(i):
        try:
            s = SENSEALGS[i % 3]
            results[i] = (s, _grads(dl.diffeq_adjoint, p, u0, prob, "tsit5", saveat=0.5,
                                    sensealg=s))  # fmt: skip
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert len(results) == 6
    for s, g in results.values():
        for a, b in zip(g, expected[s]):
            assert torch.equal(a, b)


def test_no_grad_is_a_plain_solve():
    p, u0, prob = _lv((0.0, 1.0))
    with torch.no_grad():
        out = dl.diffeq_adjoint(p, lambda s: s.u, prob, saveat=0.5)
    ref = dl.solve(prob, saveat=0.5).u
    assert not out.requires_grad and torch.equal(out, ref.detach())


def test_forward_values_equal_a_plain_solve():
    p, u0, prob = _lv()
    ref = dl.solve(prob, "dopri5", saveat=0.1).u
    for s in SENSEALGS:
        out = dl.diffeq_adjoint(p, lambda sol: sol.u, prob, "dopri5", u0=u0, saveat=0.1,
                                sensealg=s)  # fmt: skip
        assert torch.equal(out.detach(), ref)


@pytest.mark.parametrize("sensealg", SENSEALGS)
def test_span_past_the_last_save_time(sensealg):
    # Lotka-Volterra solved to t = 10, saved up to t = 3: lambda is zero from 10 down to 3, where
    # the backward solve starts. The gradient is that of the span ending at 3, to the tolerance
    # (the steps near t = 3 differ: one ends there, the other interpolates).
    grads = []
    for end in [10.0, 3.0]:
        p, u0, prob = _lv((0.0, end))
        grads.append(
            torch.cat(
                _grads(
                    dl.diffeq_adjoint,
                    p,
                    u0,
                    prob,
                    "tsit5",
                    saveat=[1.0, 2.0, 3.0],
                    rtol=1e-9,
                    atol=1e-9,
                    sensealg=sensealg,
                )  # fmt: skip
            )
        )
    # Measured 4.8e-11 (interpolating) to 1.7e-10 (discrete).
    assert _rel(grads[0], grads[1]) < 1e-8, grads
