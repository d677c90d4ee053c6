"""Forward-mode gradients (diffeq_fd) and JVPs (diffeq_jvp).

diffeq_fd and diffeq_rd differentiate the same discrete solution (same steps: step-size control
sees primal values only), so they agree to rounding, far below the solver tolerance; finite
differences re-solve with other steps, so against them the tolerance matters (see
test_gradients.py).
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import LV_PARAMS, decay, lotka_volterra
from torch.autograd import gradcheck

import diffeqlayers as dl

F64 = torch.float64


def _lv_problem():
    u0 = torch.tensor([1.0, 1.0], dtype=F64)
    p = torch.tensor(LV_PARAMS, dtype=F64)
    return dl.ODEProblem(lotka_volterra, u0, (0.0, 5.0), p), u0, p


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _loss(sol):
    return (sol.u**2).sum()


@pytest.mark.parametrize("method", ["tsit5", "dopri5", "rk4"])
def test_lotka_volterra_matches_reverse_mode(method):
    prob, u0, p = _lv_problem()
    kwargs = {"saveat": 0.5, "rtol": 1e-8, "atol": 1e-10}
    if method == "rk4":
        kwargs["dt"] = 0.05
    grads = []
    for mode in (dl.diffeq_fd, dl.diffeq_rd):
        pp = p.clone().requires_grad_()
        uu = u0.clone().requires_grad_()
        y = mode(pp, _loss, prob, method, u0=uu, **kwargs)
        y.backward()
        grads.append((y.detach(), pp.grad, uu.grad))
    (y_fd, gp_fd, gu_fd), (y_rd, gp_rd, gu_rd) = grads
    assert torch.equal(y_fd, y_rd)
    assert _rel(gp_fd, gp_rd) < 1e-10
    assert _rel(gu_fd, gu_rd) < 1e-10


def test_vector_output_and_parameter_structures():
    # A dict of parameters, one of them not requiring grad, and a vector output: the full
    # vector-Jacobian product must match reverse mode.
    prob, u0, _ = _lv_problem()

    def f(u, p, t):
        return lotka_volterra(u, torch.cat([p["ab"], p["cd"]]), t)

    prob = dl.remake(prob, f=f)
    grads = []
    for mode in (dl.diffeq_fd, dl.diffeq_rd):
        ab = torch.tensor(LV_PARAMS[:2], dtype=F64, requires_grad=True)
        cd = torch.tensor(LV_PARAMS[2:], dtype=F64)
        y = mode({"ab": ab, "cd": cd}, lambda s: s.u, prob, "tsit5", saveat=[1.0, 2.0, 3.0])
        g = torch.linspace(-1, 1, y.numel(), dtype=F64).reshape(y.shape)
        y.backward(g)
        grads.append(ab.grad)
    assert _rel(grads[0], grads[1]) < 1e-10


def test_neural_ode_matches_reverse_mode():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(F64)
    u0 = torch.tensor([[0.5, -0.3], [1.0, 0.2]], dtype=F64)
    prob = dl.ODEProblem(lambda u, p, t: p(u), u0, (0.0, 1.0), net)
    grads = []
    for mode in (dl.diffeq_fd, dl.diffeq_rd):
        net.zero_grad()
        uu = u0.clone().requires_grad_()
        y = mode(net, _loss, prob, "tsit5", u0=uu, saveat=0.25, rtol=1e-8, atol=1e-10)
        y.backward()
        grads.append([q.grad.clone() for q in net.parameters()] + [uu.grad])
    for a, b in zip(*grads):
        assert _rel(a, b) < 1e-10
    # The module's own parameters are back in place after the dual solves.
    assert all(isinstance(q, torch.nn.Parameter) for q in net.parameters())


@pytest.mark.parametrize("method", ["rk4", "tsit5"])
def test_gradcheck(method):
    prob, u0, p = _lv_problem()
    prob = dl.remake(prob, tspan=(0.0, 0.5))
    if method == "rk4":
        kwargs, check = {"dt": 0.05}, {"atol": 1e-7, "rtol": 1e-6}
    else:
        kwargs, check = {"rtol": 1e-11, "atol": 1e-12}, {"atol": 1e-6, "rtol": 1e-5}

    def final_state(u0_, p_):
        return dl.diffeq_fd(p_, lambda s: s.u[-1], prob, method, u0=u0_, **kwargs)

    assert gradcheck(final_state, (u0.requires_grad_(), p.requires_grad_()), **check)


@pytest.mark.parametrize("vectorize", [True, False], ids=["batched", "one-by-one"])
def test_steps_are_those_of_the_plain_solve(vectorize):
    prob, u0, p = _lv_problem()
    plain = dl.solve(prob, "tsit5", rtol=1e-6, atol=1e-8)
    seen = []

    def reduction(sol):
        seen.append((sol.t.clone(), sol.stats.naccept, sol.stats.nreject))
        return sol.u[-1]

    pp = p.clone().requires_grad_()
    uu = u0.clone().requires_grad_()
    y = dl.diffeq_fd(pp, reduction, prob, "tsit5", u0=uu, rtol=1e-6, atol=1e-8, vectorize=vectorize)
    # Batched: one pass for the 6 scalar inputs (2 in u0, 4 in p); else one pass each.
    assert len(seen) == (1 if vectorize else 6)
    for t, naccept, nreject in seen:
        assert torch.equal(t, plain.t)
        assert (naccept, nreject) == (plain.stats.naccept, plain.stats.nreject)
    assert torch.equal(y.detach(), plain.u[-1])


def test_chunk_size_and_batching_do_not_change_the_result():
    prob, u0, p = _lv_problem()
    outs = []
    for chunk, vectorize in ((1, True), (3, True), (0, True), (100, True), (0, False)):
        pp = p.clone().requires_grad_()
        uu = u0.clone().requires_grad_()
        y = dl.diffeq_fd(
            pp, _loss, prob, "tsit5", u0=uu, saveat=0.5, chunk_size=chunk, vectorize=vectorize
        )
        y.backward()
        outs.append(torch.cat([pp.grad, uu.grad]))
    for g in outs[1:]:
        assert _rel(g, outs[0]) < 1e-12


def test_ops_without_batching_support_fall_back_to_one_direction_per_pass():
    # Writing into a plain buffer: whether or not batched tangents support it, the gradient
    # must be right (the batched pass falls back to one direction per pass when an op fails).
    def f(u, p, t):
        out = torch.empty_like(u)
        out[0] = p[0] * u[0] - p[1] * u[0] * u[1]
        out[1] = -p[2] * u[1] + p[3] * u[0] * u[1]
        return out

    prob, _, p = _lv_problem()
    prob = dl.remake(prob, f=f)
    grads = []
    for mode in (dl.diffeq_fd, dl.diffeq_rd):
        pp = p.clone().requires_grad_()
        mode(pp, _loss, prob, "tsit5", saveat=0.5).backward()
        grads.append(pp.grad)
    assert _rel(grads[0], grads[1]) < 1e-10


def _batching_fallback_warnings(fn) -> list[str]:
    """The legacy vmap's warnings about ops without a batching rule (each such op runs once
    per direction of a chunk in a loop) raised while fn runs."""
    import warnings

    torch._C._debug_only_display_vmap_fallback_warnings(True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch._C._debug_only_display_vmap_fallback_warnings(False)
    return [str(w.message) for w in caught if "batching rule" in str(w.message)]


def test_sum_reduction_takes_no_per_direction_loop():
    # The reduction's .sum() and the solver's own checks run on batched tangents: each must be
    # one batched op, not the fallback's loop over the chunk's directions.
    prob, _, p = _lv_problem()

    def run():
        pp = p.clone().requires_grad_()
        dl.diffeq_fd(pp, _loss, prob, "tsit5", saveat=0.5).backward()

    assert _batching_fallback_warnings(run) == []


def test_sum_batching_rule_matches_a_loop():
    # diffeqlayers registers aten::sum for the legacy vmap (torch has a rule only for sum over
    # explicit dims); the registration happens on the first diffeq_fd / diffeq_jvp call.
    from torch._vmap_internals import _vmap

    prob, _, p = _lv_problem()
    pp = p.clone().requires_grad_()
    dl.diffeq_fd(pp, _loss, prob, "tsit5", saveat=0.5)
    x = torch.arange(60, dtype=F64).reshape(3, 4, 5) / 7
    assert torch.equal(_vmap(lambda v: v.sum())(x), torch.stack([v.sum() for v in x]))
    # Two batch levels, batch dimensions not leading, and 0-d logical tensors.
    assert torch.equal(_vmap(_vmap(lambda v: v.sum()), in_dims=1)(x), x.sum(2).t().contiguous())
    assert torch.equal(_vmap(lambda v: v.sum())(x[:, 0, 0]), x[:, 0, 0])
    # sum's dtype rules: integers sum to int64; an explicit dtype is honoured.
    xi = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    got = _vmap(lambda v: v.sum())(xi)
    assert got.dtype == torch.int64 and torch.equal(got, xi.sum(1))
    got = _vmap(lambda v: v.sum())(xi[:, 0])
    assert got.dtype == torch.int64 and torch.equal(got, xi[:, 0].long())
    got = _vmap(lambda v: v.sum(dtype=F64))(xi)
    assert got.dtype == F64 and torch.equal(got, xi.sum(1, dtype=F64))


def test_nested_in_dual_level_raises():
    prob, _, p = _lv_problem()
    pp = p.clone().requires_grad_()
    with fwAD.dual_level():
        with pytest.raises(RuntimeError, match="forward-AD level is already active"):
            dl.diffeq_fd(pp, _loss, prob, "tsit5")
        with pytest.raises(RuntimeError, match="forward-AD level is already active"):
            dl.diffeq_jvp(p, _loss, prob, "tsit5", tangent_p=torch.ones_like(p))
    # Nothing leaked: both forward AD and diffeq_fd work afterwards.
    with fwAD.dual_level():
        pass
    dl.diffeq_fd(pp, _loss, prob, "tsit5").backward()
    assert pp.grad is not None


def test_nested_in_torch_func_jvp_raises():
    prob, _, p = _lv_problem()

    def g(p_):
        return dl.diffeq_fd(p_, _loss, prob, "tsit5")

    with pytest.raises(RuntimeError, match="torch.func.jvp"):
        torch.func.jvp(g, (p,), (torch.ones_like(p),))


def test_nested_in_itself_raises():
    prob, _, p = _lv_problem()

    # (Under the outer call's no-grad forward an inner diffeq_fd is a plain solve, which is
    # right; with grad forced on it would need a second level.)
    def inner(sol):
        q = p.clone().requires_grad_()
        with torch.enable_grad():
            return dl.diffeq_fd(q, _loss, prob, "tsit5") * sol.u[-1].sum()

    with pytest.raises(RuntimeError, match="nested"):
        dl.diffeq_fd(p.clone().requires_grad_(), inner, prob, "tsit5")


def test_two_threads_serialise_and_give_right_answers():
    prob, _, p = _lv_problem()
    scales = [1.0, 1.1, 0.9, 1.2]

    def grad_of(scale, mode):
        q = (p * scale).requires_grad_()
        mode(q, _loss, prob, "tsit5", saveat=0.5).backward()
        return q.grad

    expected = [grad_of(s, dl.diffeq_rd) for s in scales]
    results: dict[int, torch.Tensor] = {}
    errors = []

    def work(i):
        try:
            for _ in range(2):
                results[i] = grad_of(scales[i], dl.diffeq_fd)
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(scales))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, e in enumerate(expected):
        assert _rel(results[i], e) < 1e-10


def test_jvp_matches_jacobian_and_finite_differences():
    prob, u0, p = _lv_problem()
    kwargs = {"saveat": [1.0, 2.0], "rtol": 1e-10, "atol": 1e-12}
    vp = torch.tensor([0.3, -0.2, 0.1, 0.4], dtype=F64)
    vu = torch.tensor([-0.5, 0.25], dtype=F64)
    y, dy = dl.diffeq_jvp(
        p, lambda s: s.u, prob, "tsit5", tangent_p=vp, tangent_u0=vu, u0=u0, **kwargs
    )
    plain = dl.solve(prob, "tsit5", **kwargs).u
    assert torch.equal(y, plain)
    # J . v from the reverse-mode Jacobian.
    jac = torch.autograd.functional.jacobian(
        lambda uu, pp: dl.diffeq_rd(pp, lambda s: s.u, prob, "tsit5", u0=uu, **kwargs), (u0, p)
    )
    jv = torch.einsum("...i,i->...", jac[0], vu) + torch.einsum("...i,i->...", jac[1], vp)
    assert _rel(dy, jv) < 1e-10
    # Central finite difference (re-solves: agreement to about the tolerance).
    eps = 1e-6
    plus = dl.solve(dl.remake(prob, p=p + eps * vp), "tsit5", u0=u0 + eps * vu, **kwargs).u
    minus = dl.solve(dl.remake(prob, p=p - eps * vp), "tsit5", u0=u0 - eps * vu, **kwargs).u
    assert _rel(dy, (plus - minus) / (2 * eps)) < 1e-6


def test_jvp_module_tangents_by_name():
    torch.manual_seed(1)
    net = torch.nn.Linear(2, 2).to(F64)
    u0 = torch.tensor([1.0, -1.0], dtype=F64)
    prob = dl.ODEProblem(lambda u, p, t: torch.tanh(p(u)), u0, (0.0, 1.0), net)
    tw = torch.randn(2, 2, dtype=F64)
    _, dy_named = dl.diffeq_jvp(net, lambda s: s.u[-1], prob, tangent_p={"weight": tw})
    _, dy_list = dl.diffeq_jvp(net, lambda s: s.u[-1], prob, tangent_p=[tw, None])
    assert torch.equal(dy_named, dy_list)
    with pytest.raises(ValueError, match="unknown parameters"):
        dl.diffeq_jvp(net, lambda s: s.u[-1], prob, tangent_p={"nope": tw})


def test_decay_rate_jvp_is_analytic():
    a = torch.tensor(0.7, dtype=F64)
    u0 = torch.tensor([2.0], dtype=F64)
    prob = dl.ODEProblem(decay, u0, (0.0, 1.5), a)
    _, dy = dl.diffeq_jvp(
        a,
        lambda s: s.u[-1],
        prob,
        "tsit5",
        tangent_p=torch.tensor(1.0, dtype=F64),
        rtol=1e-11,
        atol=1e-12,
    )
    expected = -1.5 * 2.0 * torch.exp(torch.tensor(-0.7 * 1.5, dtype=F64))
    assert abs(dy.item() - expected.item()) < 1e-8


def test_bad_inputs_raise_clear_errors():
    prob, _, p = _lv_problem()
    pp = p.clone().requires_grad_()
    with pytest.raises(TypeError, match="reduction must return a tensor"):
        dl.diffeq_fd(pp, lambda s: 1.0, prob, "tsit5")
    with pytest.raises(ValueError, match="tspan"):
        dl.diffeq_fd(pp, _loss, dl.remake(prob, tspan=(0.0, torch.tensor(1.0, requires_grad=True))))
    with pytest.raises(ValueError, match="shape"):
        dl.diffeq_jvp(p, _loss, prob, tangent_p=torch.ones(3, dtype=F64))

    def bad_f(u, p_, t):
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        dl.diffeq_fd(pp, _loss, dl.remake(prob, f=bad_f))
    # The level was released despite the error.
    dl.diffeq_fd(pp, _loss, prob, "tsit5").backward()


def test_no_grad_is_a_plain_solve():
    prob, _, p = _lv_problem()
    with torch.no_grad():
        y = dl.diffeq_fd(p.clone().requires_grad_(), _loss, prob, "tsit5")
    assert not y.requires_grad
    assert torch.equal(y, _loss(dl.solve(prob, "tsit5")))


def test_double_backward_raises_instead_of_a_wrong_answer():
    prob, _, p = _lv_problem()
    pp = p.clone().requires_grad_()
    y = dl.diffeq_fd(pp, _loss, prob, "tsit5")
    with pytest.raises(RuntimeError, match="differentiating twice"):
        torch.autograd.grad(y, pp, create_graph=True)


def test_u0_as_a_function_of_p_is_differentiated():
    # u0(p, t0) = (p[0], p[1]): its dependence on p must reach the gradient, as in diffeq_rd.
    prob, _, p = _lv_problem()
    prob = dl.remake(prob, u0=lambda q, t0: q[:2] / 1.5)
    grads = []
    for mode in (dl.diffeq_fd, dl.diffeq_rd):
        pp = p.clone().requires_grad_()
        mode(pp, _loss, prob, "tsit5", saveat=0.5).backward()
        grads.append(pp.grad)
    assert _rel(grads[0], grads[1]) < 1e-10
    with pytest.raises(ValueError, match="tspan"):
        dl.diffeq_fd(
            p.clone().requires_grad_(), _loss, dl.remake(prob, tspan=lambda q: (0.0, q[0]))
        )


@pytest.mark.parametrize("method", ["tsit5", "dopri5", "bosh3", "rk4", "dopri8"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batched_pass_survives_save_points(method, dtype):
    # The solver combines stages and interpolates save points on the primal and the batched
    # tangent apart (core/lincomb.cpp, integrate/dense.cpp); that must keep the one batched pass
    # (no silent fall-back to one pass per direction) and agree with reverse mode.
    prob, u0, p = _lv_problem()
    u0, p = u0.to(dtype), p.to(dtype)
    prob = dl.remake(prob, u0=u0, p=p)
    kwargs = {"saveat": [0.0, 0.3, 0.35, 1.7, 4.0], "rtol": 1e-7, "atol": 1e-9}
    if method == "rk4":
        kwargs["dt"] = 0.1
    passes = []

    def reduction(sol):
        passes.append(1)
        return (sol.u**2).sum(dim=1)

    pp, uu = p.clone().requires_grad_(), u0.clone().requires_grad_()
    y_fd = dl.diffeq_fd(pp, reduction, prob, method, u0=uu, **kwargs)
    jac_fd = [torch.autograd.grad(y_fd[i], (pp, uu), retain_graph=True) for i in range(5)]
    assert len(passes) == 1
    qq, vv = p.clone().requires_grad_(), u0.clone().requires_grad_()
    y_rd = dl.diffeq_rd(qq, lambda s: (s.u**2).sum(dim=1), prob, method, u0=vv, **kwargs)
    assert torch.equal(y_fd.detach(), y_rd.detach())
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for i in range(5):
        g_rd = torch.autograd.grad(y_rd[i], (qq, vv), retain_graph=True)
        for a, b in zip(jac_fd[i], g_rd):
            assert _rel(a.double(), b.double()) < tol
