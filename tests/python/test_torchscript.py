"""TorchScript dynamics: torch.jit.script(module) as f, run from C++ without Python per step.

Each gradient mode is compared with the same nn.Module called from Python (the eager module and
its scripted copy share their parameter tensors): same values and gradients to 1e-12 in float64.
That no Python runs during a solve is shown two ways: a profile hook sees no Python call while
the C++ solve (or backward) runs, and a solve finishes while another thread holds the GIL.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time

import pytest
import torch
from torch import nn

import diffeqlayers as dl

# torch 2.13 deprecates torch.jit.script (in favour of torch.compile / torch.export), which
# still works; what is tested here is that scripted modules keep working as dynamics.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

SENSEALGS = ["rd", "fd", "interpolating", "backsolve", "discrete"]
TOL = dict(rtol=1e-12, atol=1e-12)


class Field(nn.Module):
    """forward(x): a small tanh MLP."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.l1 = nn.Linear(2, width)
        self.l2 = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x)))


class TimeField(nn.Module):
    """forward(t: float, x), called with t a float from Python and from C++."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.l1 = nn.Linear(2, width)
        self.l2 = nn.Linear(width, 2)
        self.takes_time = True

    def forward(self, t: float, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x))) * (1.0 + 0.25 * t)


class TensorTimeField(nn.Module):
    """forward(t, y) with t unannotated (a Tensor for TorchScript): torchdiffeq's convention."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, t, y):  # noqa: ANN001
        return torch.tanh(self.lin(y)) * torch.cos(t)


def pair(cls: type, seed: int = 0, **kw):
    """(eager module, its scripted copy): the same parameter tensors, float64."""
    torch.manual_seed(seed)
    eager = cls(**kw).double()
    return eager, torch.jit.script(eager)


def x0(batch: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, dtype=torch.float64, generator=g)


def loss_and_grads(module: nn.Module, x: torch.Tensor, sensealg: str, **kw):
    ts = torch.linspace(0.0, 1.0, 5, dtype=torch.float64)
    out = dl.neural_ode(
        module, x, (0.0, 1.0), "tsit5", saveat=ts, sensealg=sensealg, rtol=1e-9, atol=1e-11, **kw
    )
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape)
    loss = (w * out.sin()).sum()
    grads = torch.autograd.grad(loss, [x, *module.parameters()])
    return out.detach(), grads


# ----------------------------------------------------------------------------------------------
# Same results as the eager module, every gradient mode
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Field, TimeField])
@pytest.mark.parametrize("sensealg", SENSEALGS)
def test_neural_ode_equals_eager_module(cls: type, sensealg: str) -> None:
    eager, scripted = pair(cls)
    assert isinstance(dl.ODEProblem(scripted, x0(), (0.0, 1.0), scripted).f, dl.script.ScriptRhs)
    x = x0().requires_grad_()
    out_e, grads_e = loss_and_grads(eager, x, sensealg)
    out_s, grads_s = loss_and_grads(scripted, x, sensealg)
    torch.testing.assert_close(out_s, out_e, **TOL)
    assert len(grads_s) == len(grads_e) == 1 + len(list(eager.parameters()))
    for gs, ge in zip(grads_s, grads_e):
        assert ge.abs().max() > 0
        torch.testing.assert_close(gs, ge, **TOL)


@pytest.mark.parametrize(
    "grad_fn",
    [dl.diffeq_rd, dl.diffeq_fd, dl.diffeq_adjoint],
    ids=["rd", "fd", "adjoint"],
)
def test_odeproblem_forms_equal_eager(grad_fn) -> None:
    """ODEProblem(scripted, u0, tspan, scripted) with solve and the diffeq_* functions, against
    the eager module as f(u, p, t) = p(u)."""
    eager, scripted = pair(Field)
    u0 = x0()
    red = lambda sol: (sol.u**2).sum()  # noqa: E731
    kw = dict(saveat=0.25, rtol=1e-9, atol=1e-11)
    sol_s = dl.solve(dl.ODEProblem(scripted, u0, (0.0, 1.0), scripted), "dopri5", **kw)
    sol_e = dl.solve(dl.ODEProblem(lambda u, p, t: p(u), u0, (0.0, 1.0), eager), "dopri5", **kw)
    torch.testing.assert_close(sol_s.u, sol_e.u, **TOL)
    assert sol_s.stats.nfe == sol_e.stats.nfe
    prob_s = dl.ODEProblem(scripted, u0, (0.0, 1.0), scripted)
    prob_e = dl.ODEProblem(lambda u, p, t: p(u), u0, (0.0, 1.0), eager)
    params = list(eager.parameters())
    g_s = torch.autograd.grad(grad_fn(scripted, red, prob_s, "dopri5", **kw), params)
    g_e = torch.autograd.grad(grad_fn(eager, red, prob_e, "dopri5", **kw), params)
    for a, b in zip(g_s, g_e):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("adjoint", [False, True])
def test_odeint_with_tensor_time_equals_eager(adjoint: bool) -> None:
    """odeint(scripted, ...) gets t as a 0-dim tensor, as the eager func does."""
    eager, scripted = pair(TensorTimeField)
    y = x0().requires_grad_()
    t = torch.linspace(0.0, 2.0, 4, dtype=torch.float64)
    solver = dl.odeint_adjoint if adjoint else dl.odeint
    outs = []
    for func in (eager, scripted):
        ys = solver(func, y, t, rtol=1e-9, atol=1e-11, method="dopri5")
        outs.append((ys, torch.autograd.grad(ys.sum(), [y, *eager.parameters()])))
    (ys_e, g_e), (ys_s, g_s) = outs
    torch.testing.assert_close(ys_s, ys_e, **TOL)
    for a, b in zip(g_s, g_e):
        torch.testing.assert_close(a, b, **TOL)


def test_float32_and_fixed_step() -> None:
    torch.manual_seed(0)
    eager = Field()
    scripted = torch.jit.script(eager)
    x = torch.randn(4, 2)
    for kw in (dict(solver="rk4", dt=0.1), dict(solver="tsit5", rtol=1e-5, atol=1e-7)):
        a = dl.neural_ode(scripted, x, (0.0, 1.0), **kw)
        b = dl.neural_ode(eager, x, (0.0, 1.0), **kw)
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Gradients against finite differences
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sensealg", SENSEALGS)
def test_gradcheck(sensealg: str) -> None:
    _, scripted = pair(TimeField, width=3)
    params = list(scripted.parameters())
    x = x0(batch=2).requires_grad_()

    def fn(x, *ps):  # the parameters reach the solve through the module, as in training
        return dl.neural_ode(
            scripted, x, (0.0, 0.5), "dopri5", sensealg=sensealg, rtol=1e-10, atol=1e-12
        )

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# No Python during the solve
# ----------------------------------------------------------------------------------------------


class PythonCallsInside:
    """A profile hook counting Python function calls made while the C++ solve (``_C.solve``,
    ``_C.solve_adjoint``) or autograd's backward (``run_backward``) runs on this thread."""

    def __init__(self) -> None:
        self.depth = 0
        self.entered = 0
        self.calls: list[str] = []

    @staticmethod
    def _watched(fn) -> bool:  # noqa: ANN001
        return (
            fn is dl._C.solve
            or fn is dl._C.solve_adjoint
            or (getattr(fn, "__name__", "") == "run_backward")
        )

    def __call__(self, frame, event, arg):  # noqa: ANN001
        if event == "c_call" and self._watched(arg):
            self.depth += 1
            self.entered += 1
        elif event in ("c_return", "c_exception") and self._watched(arg):
            self.depth -= 1
        elif event == "call" and self.depth > 0:
            self.calls.append(frame.f_code.co_name)


def count_python_calls(module: nn.Module, sensealg: str) -> PythonCallsInside:
    x = x0().requires_grad_()
    hook = PythonCallsInside()
    sys.setprofile(hook)
    try:
        out = dl.neural_ode(module, x, (0.0, 1.0), "tsit5", sensealg=sensealg)
        out.sum().backward()
    finally:
        sys.setprofile(None)
    return hook


@pytest.mark.parametrize("sensealg", SENSEALGS)
def test_no_python_calls_during_solve(sensealg: str) -> None:
    eager, scripted = pair(Field)
    # The hook sees the eager module's Python calls (in backward too, for the adjoints)...
    control = count_python_calls(eager, sensealg)
    assert control.entered > 0
    assert "forward" in control.calls
    # ... and none with the scripted module, forward solve and backward alike.
    hook = count_python_calls(scripted, sensealg)
    assert hook.entered >= 2  # the solve(s) and backward
    assert hook.calls == []


class Gated(nn.Module):
    """Counts its calls in a buffer, and its first call waits until `gate` is set (from another
    thread, through raw memory) so that the test knows the solve is under way."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))
        self.register_buffer("gate", torch.ones((), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1.0)
        while bool(self.gate == 0.0):
            pass
        return torch.tanh(self.lin(x))


def calls_while_gil_held(module: nn.Module, nfe: int, patience: float) -> float:
    """Starts a solve in a thread; once f has been called, holds the GIL in this thread until f
    has been called nfe times or `patience` seconds have passed. Returns the count reached."""
    calls = ctypes.c_double.from_address(module.calls.data_ptr())
    gate = ctypes.c_double.from_address(module.gate.data_ptr())
    module.calls.zero_()
    module.gate.zero_()
    f = module if dl.script.is_script_module(module) else (lambda u, p, t: module(u))
    prob = dl.ODEProblem(f, x0(), (0.0, 1.0), module)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            dl.solve(prob, "rk4", dt=0.01)
        except BaseException as e:  # reported below
            errors.append(e)

    worker = threading.Thread(target=work)
    interval = sys.getswitchinterval()
    worker.start()
    try:
        start = time.monotonic()
        while calls.value == 0 and worker.is_alive() and time.monotonic() < start + 60:
            time.sleep(1e-4)  # lets the worker take the GIL and reach f
        assert calls.value > 0, f"f was never called: {errors}"
        sys.setswitchinterval(1000.0)  # from now on this thread keeps the GIL
        gate.value = 1.0
        deadline = time.monotonic() + patience
        while calls.value < nfe and time.monotonic() < deadline:
            pass
        reached = calls.value
    finally:
        gate.value = 1.0
        sys.setswitchinterval(interval)
        worker.join()
    assert not errors, errors
    return reached


def test_solve_runs_while_another_thread_holds_the_gil() -> None:
    torch.manual_seed(0)
    eager = Gated().double()
    scripted = torch.jit.script(eager)
    nfe = dl.solve(dl.ODEProblem(scripted, x0(), (0.0, 1.0), scripted), "rk4", dt=0.01).stats.nfe
    assert nfe == 400
    # The scripted module's solve needs no GIL: it completes while this thread holds it.
    assert calls_while_gil_held(scripted, nfe, patience=60.0) == nfe
    # Control: the eager module's solve needs the GIL for every call, so it stalls meanwhile.
    assert calls_while_gil_held(eager, nfe, patience=0.3) < nfe


def test_two_threads_solve_at_once() -> None:
    eager, scripted = pair(Field)
    inputs = [x0(seed=s).requires_grad_() for s in (1, 2)]

    def run(x):
        out = dl.neural_ode(scripted, x, (0.0, 1.0), "tsit5", rtol=1e-9, atol=1e-11)
        return out.detach(), torch.autograd.grad(out.sum(), [x, *scripted.parameters()])

    expected = [run(x) for x in inputs]
    results: list = [None, None]
    barrier = threading.Barrier(2)

    def work(i: int) -> None:
        barrier.wait()
        for _ in range(5):
            results[i] = run(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for (out, grads), (out_ref, grads_ref) in zip(results, expected):
        torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sensealg", ["rd", "adjoint"])
def test_training_reduces_the_loss(sensealg: str) -> None:
    torch.manual_seed(0)
    layer = dl.NeuralODE(
        torch.jit.script(Field(width=16)),
        tspan=(0.0, 1.0),
        sensealg=sensealg,
        rtol=1e-5,
        atol=1e-7,
    )
    x = torch.randn(32, 2)
    target = torch.stack([x[:, 1], -x[:, 0]], dim=-1)  # a quarter turn, roughly
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = ((layer(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


class FourArgs(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor):
        return a


class IntState(nn.Module):
    def forward(self, x: int) -> int:
        return x


class IntTime(nn.Module):
    def forward(self, t: int, x: torch.Tensor) -> torch.Tensor:
        return x


class ReturnsTuple(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


class UPT(nn.Module):
    def forward(self, u: torch.Tensor, p: torch.Tensor, t: float) -> torch.Tensor:
        return -p * u


class WrongShape(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :1]


class Raises(nn.Module):
    def forward(self, t: float, x: torch.Tensor) -> torch.Tensor:
        if t > 0.5:
            raise ValueError("past t = 0.5")
        return -x


@pytest.mark.parametrize(
    ("cls", "match"),
    [
        (FourArgs, r"must take \(u\) or \(t, u\)"),
        (IntState, "must be a Tensor"),
        (IntTime, "must be a float or a Tensor"),
        (ReturnsTuple, "must return a Tensor"),
    ],
)
def test_bad_signature(cls: type, match: str) -> None:
    m = torch.jit.script(cls())
    with pytest.raises(TypeError, match=match):
        dl.ODEProblem(m, x0(), (0.0, 1.0), m)
    with pytest.raises(TypeError, match=match):
        dl.NeuralODE(m)
    with pytest.raises(TypeError, match=match):
        dl.neural_ode(m, x0())


def test_u_p_t_module_stays_a_python_f() -> None:
    """A scripted forward(u, p, t) is the package's f(u, p, t), called from Python as before;
    neural_ode (which calls module(x)) refuses it."""
    m = torch.jit.script(UPT())
    p = torch.tensor(0.5, dtype=torch.float64)
    sol = dl.solve(dl.ODEProblem(m, x0(), (0.0, 1.0), p), "tsit5", rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sol.u[-1], x0() * torch.exp(-p), rtol=1e-8, atol=1e-10)
    with pytest.raises(TypeError, match=r"\(u\) or \(t, u\)"):
        dl.neural_ode(m, x0())


def test_wrong_output_shape() -> None:
    m = torch.jit.script(WrongShape())
    with pytest.raises(ValueError, match="f returned shape"):
        dl.neural_ode(m, x0())


def test_error_inside_the_script_names_the_time() -> None:
    m = torch.jit.script(Raises())
    # torch.jit.Error, as when the scripted module raises called from Python.
    with pytest.raises(torch.jit.Error, match="past t = 0.5") as info:
        dl.neural_ode(m, x0(), (0.0, 1.0))
    assert "in the TorchScript dynamics at t=0.5" in str(info.value)


class FailsInside(nn.Module):
    def forward(self, t: float, x: torch.Tensor) -> torch.Tensor:
        if t > 0.5:
            return x + torch.zeros(3, dtype=x.dtype)  # x is [3, 2]: a size mismatch
        return -x


def test_op_failing_inside_the_script_names_the_time() -> None:
    with pytest.raises(RuntimeError, match=r"(?s)must match the size.*dynamics at t=0\.5"):
        dl.neural_ode(torch.jit.script(FailsInside()), x0(), (0.0, 1.0))


def test_takes_time_must_match_the_signature() -> None:
    class Liar(Field):
        def __init__(self) -> None:
            super().__init__()
            self.takes_time = True

    with pytest.raises(ValueError, match="takes_time"):
        dl.neural_ode(torch.jit.script(Liar().double()), x0())


def test_odeint_needs_t_and_y() -> None:
    m = torch.jit.script(Field().double())
    with pytest.raises(TypeError, match=r"func\(t, y\)"):
        dl.odeint(m, x0(), torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_not_a_script_module() -> None:
    with pytest.raises(TypeError, match="TorchScript module"):
        dl._C.script_dynamics(Field())
