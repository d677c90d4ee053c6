"""NeuralODE and neural_ode: an ODE layer that behaves as an nn.Module."""

import io
import math

import pytest
import torch
from torch import nn

import diffeqlayers as dl


class Decay(nn.Module):
    """dx/dt = -a x with a learnable rate: x(T) = x0 exp(-a T)."""

    def __init__(self, a: float = 0.5) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.a * x


def test_output_is_the_final_state_with_the_input_shape():
    layer = dl.NeuralODE(Decay(0.5), tspan=(0.0, 2.0), rtol=1e-10, atol=1e-12)
    x = torch.randn(5, 3, dtype=torch.float64)
    y = layer(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, x * math.exp(-1.0), rtol=1e-8, atol=1e-10)


def test_saveat_gives_the_trajectory_time_first():
    layer = dl.NeuralODE(Decay(1.0), tspan=(0.0, 1.0), saveat=0.25, rtol=1e-10, atol=1e-12)
    x = torch.ones(4, 2, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (5, 4, 2)
    times = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    torch.testing.assert_close(y[:, 0, 0], torch.exp(-times), rtol=1e-8, atol=1e-10)


def test_gradient_reaches_the_module_parameters():
    # d x(T) / d a = -T x(T) for dx/dt = -a x.
    decay = Decay(0.3)
    layer = dl.NeuralODE(decay, tspan=(0.0, 2.0), rtol=1e-11, atol=1e-12)
    x = torch.tensor([1.5], dtype=torch.float64)
    layer(x).sum().backward()
    expected = -2.0 * 1.5 * math.exp(-0.6)
    assert decay.a.grad is not None
    assert abs(decay.a.grad.item() - expected) < 1e-8
    assert [p is decay.a for p in layer.parameters()] == [True]


def test_inside_sequential_trains_with_an_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 8),
        dl.NeuralODE(
            nn.Sequential(nn.Linear(8, 8), nn.Tanh()), tspan=(0.0, 1.0), rtol=1e-5, atol=1e-6
        ),
        nn.Linear(8, 1),
    )
    x = torch.randn(64, 3)
    target = x.sum(dim=1, keepdim=True).sin()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = ((model(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_state_dict_round_trips_and_to_dtype_works():
    torch.manual_seed(1)
    layer = dl.NeuralODE(nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2)))
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    other = dl.NeuralODE(nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2)))
    other.load_state_dict(torch.load(buf))
    x = torch.randn(3, 2)
    torch.testing.assert_close(layer(x), other(x))
    layer64 = layer.to(torch.float64)
    y = layer64(x.double())
    assert y.dtype == torch.float64
    torch.testing.assert_close(y.float(), other(x), rtol=1e-4, atol=1e-5)


def test_functional_form_and_time_dependent_module():
    class Forced(nn.Module):
        takes_time = True

        def forward(self, t: float, x: torch.Tensor) -> torch.Tensor:
            return torch.full_like(x, t)  # x(t) = x0 + t^2 / 2

    x = torch.zeros(2, dtype=torch.float64)
    y = dl.neural_ode(Forced(), x, (0.0, 2.0), "rk4", dt=0.1)
    torch.testing.assert_close(y, torch.full_like(x, 2.0))


def test_bad_arguments():
    with pytest.raises(ValueError, match="sensealg"):
        dl.NeuralODE(Decay(), sensealg="nope")
    with pytest.raises(TypeError, match="module must be callable"):
        dl.NeuralODE(42)
    with pytest.raises(ValueError, match="tspan"):
        dl.NeuralODE(Decay(), tspan=(0.0, 1.0, 2.0))


def test_forward_mode_layer_matches_reverse_mode():
    torch.manual_seed(2)
    grads = {}
    for sensealg in ("rd", "fd"):
        torch.manual_seed(3)
        func = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        layer = dl.NeuralODE(func, tspan=(0.0, 1.0), sensealg=sensealg, rtol=1e-10, atol=1e-12)
        x = torch.tensor([[0.5, -1.0], [1.0, 0.2]], dtype=torch.float64)
        layer(x).pow(2).sum().backward()
        grads[sensealg] = torch.cat([p.grad.reshape(-1) for p in layer.parameters()])
    torch.testing.assert_close(grads["fd"], grads["rd"], rtol=1e-9, atol=1e-12)
