"""The built-in C++ MLP (dl.MLP): a normal nn.Module whose solves run entirely in C++.

Each gradient mode is compared with the same network written as a Python nn.Sequential (the
solve then calls Python per step): same values and gradients to 1e-12 in float64.
"""

from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import torch
from torch import nn

import diffeqlayers as dl

ACTIVATIONS = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "silu": nn.SiLU,
    "identity": nn.Identity,
}
SENSEALGS = ["rd", "fd", "interpolating", "backsolve", "discrete"]


class Power(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x**self.p


def sequential_twin(mlp: dl.MLP) -> nn.Sequential:
    """The same network as a Python nn.Sequential, sharing no tensors with ``mlp``."""
    spec = mlp.spec
    mods: list[nn.Module] = []
    if spec.input_power != 1.0:
        mods.append(Power(spec.input_power))
    acts = spec.activations
    for i, lin in enumerate(mlp.layers):
        twin = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
        twin = twin.to(lin.weight.dtype)
        with torch.no_grad():
            twin.weight.copy_(lin.weight)
            if lin.bias is not None:
                twin.bias.copy_(lin.bias)
        mods.append(twin)
        if i < len(acts):
            mods.append(ACTIVATIONS[acts[i]]())
    return nn.Sequential(*mods)


def count_python_calls(mlp: dl.MLP) -> list[int]:
    """Counts calls of mlp.forward from Python (a native solve makes none)."""
    calls = [0]
    original = mlp.forward

    def counting(*args):
        calls[0] += 1
        return original(*args)

    mlp.forward = counting
    return calls


def spiral_mlp(hidden: int = 16, seed: int = 0) -> dl.MLP:
    torch.manual_seed(seed)
    return dl.MLP([2, hidden, 2], "tanh", input_power=3).double()


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_forward_equals_the_sequential_twin(activation):
    torch.manual_seed(1)
    mlp = dl.MLP([3, 6, 5, 2], activation, input_power=2).double()
    twin = sequential_twin(mlp)
    for x in (torch.randn(3), torch.randn(4, 3), torch.randn(2, 4, 3)):
        x = x.double()
        torch.testing.assert_close(mlp(x), twin(x), rtol=1e-13, atol=1e-13)
        with torch.no_grad():  # the in-place activations of the no-grad path
            torch.testing.assert_close(mlp(x), twin(x), rtol=1e-13, atol=1e-13)


def test_float32_tanh_of_the_host_loops_is_correctly_rounded_to_half_an_ulp():
    # Small float32 evaluations run as host loops with their own vectorizable tanh
    # (csrc/layers/mlp.cpp, tanh_float). Identity weights make the MLP's output tanh(x) itself
    # (each sum is x * 1 plus exact zeros), which is compared with tanh in float64.
    n = 32
    mlp = dl.MLP([n, n, n], "tanh")
    with torch.no_grad():
        for lin in mlp.layers:
            lin.weight.copy_(torch.eye(n))
            lin.bias.zero_()
    torch.manual_seed(0)
    magnitudes = torch.cat(
        [
            torch.logspace(-45, 1.5, 20000, dtype=torch.float64),  # subnormals to 30
            torch.rand(20000, dtype=torch.float64) * 12,
        ]
    ).float()
    x = torch.cat([magnitudes, -magnitudes])
    # (No infinities: the identity's zeros would make them NaN in the sums.)
    special = torch.tensor([0.0, -0.0, 2.0**-12, -(2.0**-12), 9.0, 9.1, 20.0, 1e30, -1e30])
    x = torch.cat([x, special])
    x = torch.cat([x, torch.zeros((-len(x)) % n)]).reshape(-1, 1, n)
    with torch.no_grad():
        y = torch.cat([mlp(row) for row in x]).flatten()
    x = x.flatten()
    exact = torch.tanh(x.double())
    ulp = (
        torch.finfo(torch.float32).eps
        * exact.abs()
        .float()
        .clamp_min(torch.finfo(torch.float32).tiny)
        .double()
        .log2()
        .floor()
        .exp2()
    )
    err = (y.double() - exact).abs() / ulp.clamp_min(2.0**-149)
    assert err.max().item() <= 0.5 + 1e-9, x[err.argmax()].item()
    assert torch.isnan(mlp(torch.full((n,), float("nan")))).all()


def test_names_state_dict_round_trip_and_copies():
    mlp = dl.MLP([2, 8, 2], "relu", input_power=3)
    assert [n for n, _ in mlp.named_parameters()] == [
        "layers.0.weight",
        "layers.0.bias",
        "layers.1.weight",
        "layers.1.bias",
    ]
    other = dl.MLP([2, 8, 2], "relu", input_power=3)
    other.load_state_dict(mlp.state_dict())
    x = torch.randn(5, 2)
    torch.testing.assert_close(other(x), mlp(x), rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(mlp.state_dict(), buf)
    buf.seek(0)
    third = dl.MLP([2, 8, 2], "relu", input_power=3)
    third.load_state_dict(torch.load(buf))
    torch.testing.assert_close(third(x), mlp(x), rtol=0, atol=0)
    for clone in (copy.deepcopy(mlp), pickle.loads(pickle.dumps(mlp))):
        torch.testing.assert_close(clone(x), mlp(x), rtol=0, atol=0)
        assert clone.spec.sizes == [2, 8, 2]
    with pytest.raises(RuntimeError, match="size mismatch"):
        dl.MLP([2, 9, 2]).load_state_dict(mlp.state_dict())
    assert "input_power=3" in repr(mlp) and "relu" in repr(mlp)


def test_zero_grad_clears_or_zeros_every_parameter_as_nn_module_does():
    torch.manual_seed(0)
    x = torch.randn(3, 2)
    mlp = dl.MLP([2, 8, 2])
    mlp(x).sum().backward()
    assert all(p.grad is not None for p in mlp.parameters())
    mlp.zero_grad()  # set_to_none, the default: the fast path
    assert all(p.grad is None for p in mlp.parameters())
    mlp(x).sum().backward()
    mlp.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in mlp.parameters())
    # Parameters attached beside the layers are cleared too (nn.Module's walk then).
    mlp.extra = nn.Linear(2, 2)
    (mlp(x) + mlp.extra(x)).sum().backward()
    mlp.zero_grad()
    assert all(p.grad is None for p in mlp.parameters())
    assert len(list(mlp.parameters())) == 6


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match='unknown activation "swish"'):
        dl.MLP([2, 4, 2], "swish")
    with pytest.raises(ValueError, match="at least the input and output"):
        dl.MLP([2])
    with pytest.raises(ValueError, match="must be positive"):
        dl.MLP([2, 0, 2])
    with pytest.raises(ValueError, match="need as many activations"):
        dl.MLP([2, 4, 4, 2], activations=["tanh"])
    with pytest.raises(TypeError, match="sizes must hold integers"):
        dl.MLP([2, 4.5, 2])
    mlp = dl.MLP([2, 4, 2])
    prob = dl.ODEProblem(mlp, torch.ones(3), (0.0, 1.0), mlp)
    with pytest.raises(ValueError, match="last dimension is 2, got shape \\[3\\]"):
        dl.solve(prob, "tsit5")
    with pytest.raises(TypeError, match="dtype"):
        dl.neural_ode(mlp, torch.ones(2, dtype=torch.float64))
    # Parameters replaced by tensors that do not fit the architecture.
    mlp.layers[1].weight = nn.Parameter(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="weight of layer 1 must have shape \\[2, 4\\]"):
        dl.neural_ode(mlp, torch.ones(2))
    with pytest.raises(TypeError, match="mlp\\(t, x\\)"):
        dl.MLP([2, 4, 2], time_input=True)(torch.ones(2))


def test_native_solves_never_call_python():
    mlp = spiral_mlp()
    calls = count_python_calls(mlp)
    u0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    for sensealg in SENSEALGS:
        y = dl.neural_ode(mlp, u0, (0.0, 1.5), saveat=0.1, sensealg=sensealg)
        y.sum().backward()
    prob = dl.ODEProblem(mlp, u0, (0.0, 1.5), mlp)
    dl.diffeq_rd(mlp, lambda s: s.u.sum(), prob, saveat=0.5).backward()
    assert calls[0] == 0
    # Called directly, it is an ordinary module.
    mlp(u0)
    assert calls[0] == 1


def test_kept_native_dynamics_follow_the_parameters():
    """MLP.dynamics() is kept while the module holds the same parameters; each solve checks
    the kept tensors again, so in-place updates, `.data` swaps and `.double()` are all seen."""
    torch.manual_seed(5)
    mlp = dl.MLP([2, 8, 2], "tanh")
    assert mlp.dynamics() is mlp.dynamics()
    u0 = torch.tensor([1.0, -0.5])

    def end(m: dl.MLP, u: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return dl.solve(dl.ODEProblem(m, u, (0.0, 1.0)), "tsit5", rtol=1e-6).u[-1]

    def fresh() -> dl.MLP:  # the same weights in a module that has never solved
        other = dl.MLP([2, 8, 2], "tanh", dtype=mlp.layers[0].weight.dtype)
        other.load_state_dict(mlp.state_dict())
        return other

    end(mlp, u0)
    with torch.no_grad():  # as an optimizer steps: in place
        mlp.layers[0].weight.mul_(1.5)
    torch.testing.assert_close(end(mlp, u0), end(fresh(), u0), rtol=0, atol=0)
    mlp.layers[1].bias.data = torch.full((2,), 0.25)  # new storage, same Parameter
    torch.testing.assert_close(end(mlp, u0), end(fresh(), u0), rtol=0, atol=0)
    mlp.double()
    got = end(mlp, u0.double())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, end(fresh(), u0.double()), rtol=0, atol=0)
    # A swap to the wrong shape is refused by the solve, not read out of bounds.
    mlp.layers[0].weight.data = torch.zeros(9, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="weight of layer 0 must have shape"):
        end(mlp, u0.double())
    with pytest.raises(ValueError, match="weight of layer 0 must have shape"):
        mlp.dynamics()(0.0, u0.double())
    # A replaced Parameter gets new dynamics; copies do not carry the C++ object.
    mlp.layers[0].weight = nn.Parameter(torch.ones(8, 2, dtype=torch.float64))
    kept = mlp.dynamics()
    assert kept is mlp.dynamics()
    torch.testing.assert_close(end(mlp, u0.double()), end(fresh(), u0.double()), rtol=0, atol=0)
    for clone in (copy.deepcopy(mlp), pickle.loads(pickle.dumps(mlp))):
        assert clone.dynamics() is not kept
        torch.testing.assert_close(end(clone, u0.double()), end(mlp, u0.double()), rtol=0, atol=0)


@pytest.mark.parametrize("sensealg", SENSEALGS)
def test_every_gradient_mode_equals_the_python_twin(sensealg):
    mlp = spiral_mlp()
    twin = sequential_twin(mlp)
    u0 = torch.tensor([2.0, 0.0], dtype=torch.float64, requires_grad=True)
    u0_twin = u0.detach().clone().requires_grad_()
    t = torch.linspace(0.0, 1.5, 30, dtype=torch.float64)
    kw = dict(saveat=t, sensealg=sensealg, rtol=1e-8, atol=1e-10)
    data = torch.linspace(-1.0, 1.0, 60, dtype=torch.float64).reshape(30, 2)
    y = dl.NeuralODE(mlp, (0.0, 1.5), **kw)(u0)
    y_twin = dl.NeuralODE(twin, (0.0, 1.5), **kw)(u0_twin)
    torch.testing.assert_close(y, y_twin, rtol=1e-12, atol=1e-12)
    ((data - y) ** 2).sum().backward()
    ((data - y_twin) ** 2).sum().backward()
    torch.testing.assert_close(u0.grad, u0_twin.grad, rtol=1e-12, atol=1e-12)
    twin_linears = [m for m in twin if isinstance(m, nn.Linear)]
    for lin, lin_twin in zip(mlp.layers, twin_linears):
        torch.testing.assert_close(lin.weight.grad, lin_twin.weight.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lin.bias.grad, lin_twin.bias.grad, rtol=1e-12, atol=1e-12)


def test_functional_paths_and_time_input():
    torch.manual_seed(2)
    mlp = dl.MLP([2, 5, 2], "softplus", time_input=True).double()
    calls = count_python_calls(mlp)

    def python_f(u, p, t):  # the same dynamics through Python
        x = torch.cat([u, torch.full_like(u[..., :1], t)], -1)
        lin0, lin1 = p.layers
        return lin1(nn.functional.softplus(lin0(x)))

    u0 = torch.tensor([[0.5, -0.3], [1.0, 0.2]], dtype=torch.float64)
    kw = dict(saveat=[0.5, 1.0], rtol=1e-9, atol=1e-11)
    for grad_fn in (dl.diffeq_rd, dl.diffeq_fd, dl.diffeq_adjoint):
        mlp.zero_grad()
        prob = dl.ODEProblem(mlp.rhs, u0, (0.0, 1.0), mlp)
        grad_fn(mlp, lambda s: s.u.pow(2).sum(), prob, "dopri5", **kw).backward()
        native = [p.grad.clone() for p in mlp.parameters()]
        mlp.zero_grad()
        prob = dl.ODEProblem(python_f, u0, (0.0, 1.0), mlp)
        grad_fn(mlp, lambda s: s.u.pow(2).sum(), prob, "dopri5", **kw).backward()
        for a, b in zip(native, mlp.parameters()):
            torch.testing.assert_close(a, b.grad, rtol=1e-12, atol=1e-12)
    assert calls[0] == 0


@pytest.mark.parametrize("sensealg", ["rd", "interpolating", "discrete"])
def test_gradcheck_tiny_mlp(sensealg):
    mlp = spiral_mlp(hidden=3, seed=4)
    names = [n for n, _ in mlp.named_parameters()]

    def fn(u0, *params):
        with torch.nn.utils.stateless._reparametrize_module(mlp, dict(zip(names, params))):
            return dl.neural_ode(
                mlp, u0, (0.0, 0.5), saveat=[0.25, 0.5], sensealg=sensealg, rtol=1e-10, atol=1e-12
            )

    u0 = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in mlp.parameters()]
    assert torch.autograd.gradcheck(fn, (u0, *params), atol=1e-6, rtol=1e-5)


def test_adam_reduces_the_spiral_loss():
    torch.manual_seed(0)
    t = torch.linspace(0.0, 1.5, 30)
    true_a = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])
    truth = dl.ODEProblem(lambda u, p, t: (u**3) @ true_a, torch.tensor([2.0, 0.0]), (0.0, 1.5))
    data = dl.solve(truth, "tsit5", saveat=t, rtol=1e-6, atol=1e-8).u
    layer = dl.NeuralODE(
        dl.MLP([2, 50, 2], "tanh", input_power=3), (0.0, 1.5), saveat=t, rtol=1e-3, atol=1e-6
    )
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = ((data - layer(torch.tensor([2.0, 0.0]))) ** 2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_two_threads_solving_at_once_give_the_serial_results():
    mlps = [spiral_mlp(seed=5), spiral_mlp(seed=6)]
    u0 = torch.tensor([2.0, 0.0], dtype=torch.float64)

    def work(mlp):
        mlp.zero_grad()
        y = dl.neural_ode(mlp, u0, (0.0, 1.5), saveat=0.05, rtol=1e-9, atol=1e-11)
        y.pow(2).sum().backward()
        return y.detach(), [p.grad.clone() for p in mlp.parameters()]

    serial = [work(m) for m in mlps]
    results = [None, None]
    errors = []
    barrier = threading.Barrier(2)

    def run(i):
        try:
            barrier.wait()
            for _ in range(3):
                results[i] = work(mlps[i])
        except BaseException as e:  # handed to the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors
    for (y, g), (y_s, g_s) in zip(results, serial):
        torch.testing.assert_close(y, y_s, rtol=0, atol=0)
        for a, b in zip(g, g_s):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
