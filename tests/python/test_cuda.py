"""The same solver on CUDA: results and gradients match the CPU. Skipped without a GPU."""

import pytest
import torch

import diffeqlayers as dl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def lotka_volterra(u, p, t):
    x, y = u[..., 0], u[..., 1]
    return torch.stack([p[0] * x - p[1] * x * y, -p[2] * y + p[3] * x * y], dim=-1)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8", "rk4"])
def test_cuda_matches_cpu(method):
    kw = {"dt": 0.01} if not dl.tableau(method).adaptive else {"rtol": 1e-9, "atol": 1e-9}
    results = {}
    for device in ("cpu", "cuda"):
        p = torch.tensor([1.5, 1.0, 3.0, 1.0], dtype=torch.float64, device=device)
        p.requires_grad_(True)
        u0 = torch.tensor([[1.0, 1.0], [0.5, 2.0]], dtype=torch.float64, device=device)
        prob = dl.ODEProblem(lotka_volterra, u0, (0.0, 3.0), p)
        sol = dl.solve(prob, method, saveat=0.25, dense=True, **kw)
        assert sol.u.device.type == device
        sol.u.sum().backward()
        results[device] = (sol.u.detach().cpu(), p.grad.cpu(), sol(1.3).detach().cpu())
    for a, b in zip(results["cpu"], results["cuda"]):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_cuda_float32_neural_ode_trains():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    net = net.cuda()
    u0 = torch.randn(8, 2, device="cuda")
    prob = dl.ODEProblem(lambda u, p, t: net(u), u0, (0.0, 1.0), net)
    out = dl.diffeq_rd(net, lambda s: s.u[-1], prob, "tsit5", rtol=1e-5, atol=1e-6)
    out.pow(2).mean().backward()
    assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in net.parameters())
