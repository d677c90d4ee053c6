"""Gradients of one evaluation of the built-in MLP (dl.MLP).

Small CPU float32/float64 evaluations run as host loops recorded as one autograd node (its
backward is the MLP's vector-Jacobian product); forward-mode duals, create_graph and large
evaluations take the generic path of one ATen op per layer. Every case is compared with the same
network written as a torch.nn.Sequential, to 1e-12 in float64.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from test_gradients import _node_names
from test_mlp import ACTIVATIONS, sequential_twin
from torch import nn
from torch.autograd import forward_ad

import diffeqlayers as dl

SHAPES = [(3,), (4, 3), (2, 4, 3)]


def make(activation: str, *, power: float = 1.0, time_input: bool = False, bias: bool = True):
    torch.manual_seed(11)
    return dl.MLP(
        [3, 6, 5, 2], activation, input_power=power, time_input=time_input, bias=bias
    ).double()


class TimeTwin(nn.Module):
    """The twin of a time-input MLP: [x^p, t] into the Linear layers."""

    def __init__(self, mlp: dl.MLP) -> None:
        super().__init__()
        self.p = mlp.spec.input_power
        seq = sequential_twin(mlp)
        self.body = nn.Sequential(*[m for m in seq if m.__class__.__name__ != "Power"])

    def forward(self, t: float, x: torch.Tensor) -> torch.Tensor:
        x = x**self.p if self.p != 1.0 else x
        return self.body(torch.cat([x, torch.full_like(x[..., :1], t)], -1))


def twin_of(mlp: dl.MLP):
    if mlp.spec.time_input:
        twin = TimeTwin(mlp)
        return twin, lambda x, t: twin(t, x)
    twin = sequential_twin(mlp)
    return twin, lambda x, t: twin(x)


def mlp_call(mlp: dl.MLP):
    return (lambda x, t: mlp(t, x)) if mlp.spec.time_input else (lambda x, t: mlp(x))


def linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


CASES = list(itertools.product(sorted(ACTIVATIONS), [1.0, 3.0, 2.5], [False, True], [True, False]))


@pytest.mark.parametrize("activation,power,time_input,bias", CASES)
def test_vjp_equals_the_torch_nn_twin(activation, power, time_input, bias):
    mlp = make(activation, power=power, time_input=time_input, bias=bias)
    twin, f_twin = twin_of(mlp)
    f = mlp_call(mlp)
    for shape in SHAPES:
        # Positive states for the fractional power (negative ones give NaN in both).
        x = torch.rand(shape, dtype=torch.float64) + 0.1 if power == 2.5 else torch.randn(shape)
        x = x.double().requires_grad_()
        x_twin = x.detach().clone().requires_grad_()
        y, y_twin = f(x, 0.7), f_twin(x_twin, 0.7)
        torch.testing.assert_close(y, y_twin, rtol=1e-13, atol=1e-13)
        cot = torch.randn_like(y)
        params = [x, *mlp.parameters()]
        params_twin = [x_twin, *itertools.chain(*((m.weight, m.bias) for m in linears(twin)))]
        params_twin = [p for p in params_twin if p is not None]
        g = torch.autograd.grad(y, params, cot)
        g_twin = torch.autograd.grad(y_twin, params_twin, cot)
        for a, b in zip(g, g_twin):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_one_node_per_small_evaluation_and_generic_ops_otherwise():
    mlp = make("tanh", power=3.0)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = mlp(x)
    assert y.grad_fn.name() == "diffeqlayers::MLPBackward"
    # Its inputs are x and the weights themselves: no other node in between.
    nexts = [fn for fn, _ in y.grad_fn.next_functions]
    assert all(type(fn).__name__ == "AccumulateGrad" for fn in nexts)
    assert len(nexts) == 1 + len(list(mlp.parameters()))
    # float32 too.
    assert (
        mlp.float()(x.detach().float().requires_grad_()).grad_fn.name()
        == "diffeqlayers::MLPBackward"
    )
    mlp.double()
    # A large batch goes to BLAS through the generic path.
    big = torch.randn(4000, 3, dtype=torch.float64, requires_grad=True)
    assert "MLPBackward" not in mlp(big).grad_fn.name()
    # Nothing recorded: no node at all.
    with torch.no_grad():
        assert mlp(x).grad_fn is None


def test_large_batches_take_the_generic_path_with_equal_results():
    mlp = make("silu", power=3.0)
    twin, f_twin = twin_of(mlp)
    x = torch.randn(4000, 3, dtype=torch.float64, requires_grad=True)
    y, y_twin = mlp(x), f_twin(x, 0.0)
    torch.testing.assert_close(y, y_twin, rtol=1e-13, atol=1e-13)
    cot = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, [x], cot)
    (gx_twin,) = torch.autograd.grad(y_twin, [x], cot)
    torch.testing.assert_close(gx, gx_twin, rtol=1e-12, atol=1e-12)


def test_a_weight_changed_in_place_before_backward_is_refused():
    # The node keeps its inputs as saved variables: an in-place change of one between the
    # forward and the backward (an optimizer step in between, say) fails loudly instead of
    # differentiating with the new values; the same holds after backward freed them.
    mlp = make("tanh", power=3.0)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = mlp(x)
    with torch.no_grad():
        mlp.layers[0].weight.add_(0.1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    y = mlp(x)
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()


def test_only_the_inputs_that_require_grad_get_gradients():
    mlp = make("gelu", power=3.0)
    twin, f_twin = twin_of(mlp)
    for p in mlp.parameters():
        p.requires_grad_(False)
    mlp.layers[1].weight.requires_grad_(True)
    x = torch.randn(5, 3, dtype=torch.float64)
    y = mlp(x)
    assert y.grad_fn.name() == "diffeqlayers::MLPBackward"
    y.pow(2).sum().backward()
    f_twin(x, 0.0).pow(2).sum().backward()
    lin_twin = linears(twin)
    torch.testing.assert_close(
        mlp.layers[1].weight.grad, lin_twin[1].weight.grad, rtol=1e-12, atol=1e-12
    )
    assert mlp.layers[0].weight.grad is None and mlp.layers[1].bias.grad is None
    # Only the state.
    for p in mlp.parameters():
        p.requires_grad_(False)
    x = x.clone().requires_grad_()
    x_twin = x.detach().clone().requires_grad_()
    (gx,) = torch.autograd.grad(mlp(x).sum(), [x])
    (gx_twin,) = torch.autograd.grad(f_twin(x_twin, 0.0).sum(), [x_twin])
    torch.testing.assert_close(gx, gx_twin, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_gradcheck_and_gradgradcheck(activation):
    torch.manual_seed(3)
    mlp = dl.MLP([2, 4, 3, 2], activation, input_power=3, time_input=True).double()
    names = [n for n, _ in mlp.named_parameters()]

    def fn(x, *params):
        with torch.nn.utils.stateless._reparametrize_module(mlp, dict(zip(names, params))):
            return mlp(0.3, x)

    # Away from relu's kink, where finite differences are meaningless.
    x = (torch.rand(3, 2, dtype=torch.float64) + 0.2).requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in mlp.parameters()]
    assert "MLPBackward" in fn(x, *params).grad_fn.name()
    assert torch.autograd.gradcheck(fn, (x, *params))
    assert torch.autograd.gradgradcheck(fn, (x, *params))


def test_double_backward_equals_the_twin():
    mlp = make("softplus", power=3.0, time_input=True)
    twin, f_twin = twin_of(mlp)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    (gx,) = torch.autograd.grad(mlp(0.4, x).pow(2).sum(), [x], create_graph=True)
    (gx_twin,) = torch.autograd.grad(f_twin(x_twin, 0.4).pow(2).sum(), [x_twin], create_graph=True)
    torch.testing.assert_close(gx, gx_twin, rtol=1e-12, atol=1e-12)
    gx.pow(2).sum().backward()
    gx_twin.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_twin.grad, rtol=1e-12, atol=1e-12)
    for lin, lin_twin in zip(mlp.layers, linears(twin)):
        torch.testing.assert_close(lin.weight.grad, lin_twin.weight.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lin.bias.grad, lin_twin.bias.grad, rtol=1e-12, atol=1e-12)


def test_forward_mode_duals_take_the_generic_path():
    mlp = make("elu", power=3.0)
    twin, f_twin = twin_of(mlp)
    x = torch.randn(4, 3, dtype=torch.float64)
    v = torch.randn_like(x)
    with forward_ad.dual_level():
        y = mlp(forward_ad.make_dual(x, v))
        y_twin = f_twin(forward_ad.make_dual(x, v), 0.0)
        p, tangent = forward_ad.unpack_dual(y)
        p_twin, tangent_twin = forward_ad.unpack_dual(y_twin)
    torch.testing.assert_close(p, p_twin, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(tangent, tangent_twin, rtol=1e-12, atol=1e-12)


def test_float32_gradients_match_the_twin():
    torch.manual_seed(5)
    mlp = dl.MLP([2, 50, 2], "tanh", input_power=3)
    twin, f_twin = twin_of(mlp)
    x = torch.randn(2, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    mlp(x).pow(2).sum().backward()
    f_twin(x_twin, 0.0).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_twin.grad, rtol=1e-5, atol=1e-6)
    for lin, lin_twin in zip(mlp.layers, linears(twin)):
        torch.testing.assert_close(lin.weight.grad, lin_twin.weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lin.bias.grad, lin_twin.bias.grad, rtol=1e-5, atol=1e-6)


def test_rd_spiral_gradient_equals_the_twin_in_float64():
    torch.manual_seed(100)
    mlp = dl.MLP([2, 50, 2], "tanh", input_power=3).double()
    twin = sequential_twin(mlp)
    u0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    t = torch.linspace(0.0, 1.5, 30, dtype=torch.float64)
    data = torch.linspace(-1.0, 1.0, 60, dtype=torch.float64).reshape(30, 2)
    kw = dict(saveat=t, rtol=1e-3, atol=1e-6)
    sols = {}
    for name, f, module in (("mlp", mlp, mlp), ("twin", lambda u, p, t: twin(u), twin)):
        prob = dl.ODEProblem(f, u0, (0.0, 1.5), module)

        def keep(sol, name=name):
            sols[name] = sol
            return sol.u

        pred = dl.diffeq_rd(module, keep, prob, "tsit5", **kw)
        ((data - pred) ** 2).sum().backward()
    assert sols["mlp"].stats.nfe == sols["twin"].stats.nfe
    # The host loops and the twin's matrix products round f differently (about 1e-16); through
    # the solve (u^3 dynamics, steps up to 0.3) that grows to about 1e-12 relative in the
    # gradient (measured: 1.2e-12 with the initial step by host loops, below 1e-12 before).
    for lin, lin_twin in zip(mlp.layers, linears(twin)):
        torch.testing.assert_close(lin.weight.grad, lin_twin.weight.grad, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(lin.bias.grad, lin_twin.bias.grad, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("sensealg", ["interpolating", "backsolve", "discrete"])
@pytest.mark.parametrize(
    "activation, power, time_input, shape",
    [("tanh", 3.0, False, (2,)), ("softplus", 1.0, True, (4, 2)), ("relu", 1.0, False, (3, 2))],
)
def test_adjoint_vjp_by_host_loops_equals_autograd(sensealg, activation, power, time_input, shape):
    """The adjoints take the MLP's own vector-Jacobian product (no autograd graph): the
    continuous ones for their backward solve, the discrete one to reverse each step by hand.
    The gradients equal those of the same MLP called from Python, whose products go through a
    recorded evaluation and a reverse pass (the discrete adjoint: one replayed step under
    autograd). A tensor the MLP does not use gets a zero gradient both ways."""
    torch.manual_seed(5)
    mlp = dl.MLP([2, 7, 2], activation, input_power=power, time_input=time_input).double()
    unused = torch.ones(3, dtype=torch.float64, requires_grad=True)
    params = [*mlp.parameters(), unused]
    u0 = (0.5 + torch.rand(shape, dtype=torch.float64)).requires_grad_(True)
    kw = dict(saveat=[0.3, 0.7, 1.0], rtol=1e-8, atol=1e-10, sensealg=sensealg)
    python_f = (lambda u, p, t: mlp(t, u)) if time_input else (lambda u, p, t: mlp(u))
    grads, stats = {}, {}
    for name, f in (("native", mlp.rhs), ("autograd", python_f)):
        box = {}

        def keep(sol, box=box):
            box["sol"] = sol
            return sol.u

        prob = dl.ODEProblem(f, u0, (0.0, 1.0), params)
        loss = dl.diffeq_adjoint(params, keep, prob, "dopri5", **kw).pow(2).sum()
        grads[name] = torch.autograd.grad(loss, [u0, *params], allow_unused=True)
        stats[name] = box["sol"].adjoint_stats
    assert stats["native"].nvjp == stats["native"].nvjp_native > 0
    assert stats["autograd"].nvjp_native == 0
    if sensealg != "discrete":
        assert stats["native"].nvjp == stats["autograd"].nvjp
    for a, b in zip(grads["native"], grads["autograd"]):
        a = torch.zeros_like(unused) if a is None else a
        b = torch.zeros_like(unused) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert grads["native"][-1] is None or not grads["native"][-1].any()


@pytest.mark.parametrize("method", ["tsit5", "dopri5", "bosh3", "rk4", "dopri8"])
def test_discrete_adjoint_by_vjp_equals_rd(method):
    """The discrete adjoint reversed by the MLP's products gives diffeq_rd's gradient (the
    discretisation's exact gradient): methods with their own interpolant (tsit5, dopri5) and
    with the cubic Hermite one (FSAL bosh3; rk4 and dopri8, whose f(t + h, u1) is one more
    evaluation), save points inside steps and at the start included."""
    torch.manual_seed(8)
    mlp = dl.MLP([2, 9, 2], "tanh", input_power=3).double()
    u0 = torch.tensor([[1.1, -0.4], [0.3, 0.8]], dtype=torch.float64, requires_grad=True)
    kw = dict(saveat=torch.tensor([0.0, 0.25, 0.6, 1.0], dtype=torch.float64))
    kw.update(dict(dt=0.1) if method == "rk4" else dict(rtol=1e-7, atol=1e-9))
    prob = dl.ODEProblem(mlp, u0, (0.0, 1.0), mlp)
    grads = {}
    for name in ("rd", "discrete"):
        box = {}

        def keep(sol, box=box):
            box["sol"] = sol
            return sol.u

        if name == "rd":
            pred = dl.diffeq_rd(mlp, keep, prob, method, **kw)
        else:
            pred = dl.diffeq_adjoint(mlp, keep, prob, method, sensealg="discrete", **kw)
        loss = (pred.sin() * torch.arange(16.0, dtype=torch.float64).reshape(4, 2, 2)).sum()
        grads[name] = torch.autograd.grad(loss, [u0, *mlp.parameters()])
        if name == "discrete":
            native = box["sol"].adjoint_stats.nvjp_native
            assert native > 0
    for a, b in zip(grads["discrete"], grads["rd"]):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


def rd_problem(batch: tuple[int, ...] = ()):
    torch.manual_seed(3)
    mlp = dl.MLP([2, 16, 2], "tanh").double()
    u0 = torch.randn(*batch, 2, dtype=torch.float64, requires_grad=True)
    return mlp, u0, dl.ODEProblem(mlp, u0, (0.0, 1.0), mlp)


def rd_loss(mlp, prob, **kw):
    saveat = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
    pred = dl.diffeq_rd(mlp, lambda s: s.u, prob, "dopri5", saveat=saveat, rtol=1e-8, **kw)
    return pred.pow(2).sum()


def twin_grads(mlp, u0):
    """The same solve's gradients with the MLP's torch.nn twin as f (autograd's own nodes)."""
    twin = sequential_twin(mlp)
    u = u0.detach().clone().requires_grad_()
    prob = dl.ODEProblem(lambda x, p, t: twin(x), u, (0.0, 1.0), twin)
    rd_loss(twin, prob).backward()
    return [lin.weight.grad for lin in linears(twin)] + [u.grad]


@pytest.mark.parametrize("batch", [(), (3,)])
def test_rd_weight_gradients_gathered_in_sinks_equal_the_twin(batch):
    """Within a recorded solve the evaluations' weight gradients are added in one buffer per
    weight (a GradSinkBackward node) instead of one tensor per evaluation added by the engine."""
    mlp, u0, prob = rd_problem(batch)
    loss = rd_loss(mlp, prob)
    assert "diffeqlayers::GradSinkBackward" in _node_names(loss)
    loss.backward()
    expected = twin_grads(mlp, u0)
    got = [lin.weight.grad for lin in mlp.layers] + [u0.grad]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_rd_sinks_with_retained_graph_partial_and_concurrent_backward():
    mlp, u0, prob = rd_problem()
    loss = rd_loss(mlp, prob)
    params = list(mlp.parameters())
    once = torch.autograd.grad(loss, params, retain_graph=True)
    # The state alone: the sinks are not on the pass's path.
    (gu,) = torch.autograd.grad(loss, [u0], retain_graph=True)
    assert torch.isfinite(gu).all()
    # Again (each pass has its own buffers), then two passes at once from two threads.
    again = torch.autograd.grad(loss, params, retain_graph=True)
    for a, b in zip(once, again):
        assert torch.equal(a, b)
    import threading

    out: list = [None, None]

    def run(i: int) -> None:
        out[i] = torch.autograd.grad(loss, params, retain_graph=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for res in out:
        for a, b in zip(once, res):
            assert torch.equal(a, b)


def test_rd_sinks_under_create_graph_give_the_twin_second_derivative():
    mlp, u0, prob = rd_problem()
    w = mlp.layers[0].weight
    (gw,) = torch.autograd.grad(rd_loss(mlp, prob), [w], create_graph=True)
    (hvp,) = torch.autograd.grad(gw.pow(2).sum(), [u0])
    twin = sequential_twin(mlp)
    u = u0.detach().clone().requires_grad_()
    tw = linears(twin)[0].weight
    prob_twin = dl.ODEProblem(lambda x, p, t: twin(x), u, (0.0, 1.0), twin)
    (gw_twin,) = torch.autograd.grad(rd_loss(twin, prob_twin), [tw], create_graph=True)
    (hvp_twin,) = torch.autograd.grad(gw_twin.pow(2).sum(), [u])
    torch.testing.assert_close(gw, gw_twin, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hvp, hvp_twin, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("bias", [True, False])
def test_double_backward_through_a_chain_of_evaluations_equals_the_twin(bias):
    """create_graph through evaluations whose input has history (as in an unrolled solve): each
    evaluation's vector-Jacobian product holds its input fixed. (Differentiating the generic path
    from the input instead followed the input's history back through every earlier evaluation:
    2^n - 1 backward evaluations for n in a chain, and the weights' gradient counted twice.)"""
    torch.manual_seed(8)
    mlp = dl.MLP([2, 6, 2], "tanh", input_power=3, bias=bias).double()
    twin, f_twin = twin_of(mlp)
    results = []
    for f, module in ((mlp_call(mlp), mlp), (f_twin, twin)):
        x0 = torch.tensor([0.7, -0.4], dtype=torch.float64, requires_grad=True)
        x = x0
        for _ in range(8):
            x = x + 0.1 * f(x, 0.0)
        w = linears(module)[0].weight
        (gw,) = torch.autograd.grad(x.pow(2).sum(), [w], create_graph=True)
        (hx,) = torch.autograd.grad(gw.pow(2).sum(), [x0])
        results.append((gw, hx))
    (gw, hx), (gw_twin, hx_twin) = results
    torch.testing.assert_close(gw, gw_twin, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hx, hx_twin, rtol=1e-10, atol=1e-12)
