"""Neural ODE layers: an ODE whose right-hand side is an nn.Module, as an nn.Module."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Callable, Union

import torch
from torch import nn

from .adjoint import diffeq_adjoint
from .forward import diffeq_fd
from .mlp import MLP
from .problem import ODEProblem
from .script import ScriptRhs, is_script_module
from .sensitivity import diffeq_rd

# Gradient modes by name: "adjoint" is the interpolating adjoint.
_SENSEALGS: dict[str, Callable[..., Any]] = {
    "rd": diffeq_rd,
    "fd": diffeq_fd,
    "adjoint": functools.partial(diffeq_adjoint, sensealg="interpolating"),
    "interpolating": functools.partial(diffeq_adjoint, sensealg="interpolating"),
    "backsolve": functools.partial(diffeq_adjoint, sensealg="backsolve"),
    "discrete": functools.partial(diffeq_adjoint, sensealg="discrete"),
}


def _sensealg(name: str) -> Callable[..., Any]:
    if name not in _SENSEALGS:
        raise ValueError(f"sensealg must be one of {sorted(_SENSEALGS)}, got {name!r}")
    return _SENSEALGS[name]


def _takes_time(module: Callable[..., torch.Tensor]) -> bool:
    return bool(getattr(module, "takes_time", False))


def _script_rhs(module: torch.jit.ScriptModule) -> ScriptRhs:
    """A TorchScript module as dynamics: forward(x) or forward(t, x) by its schema, which a
    ``takes_time`` attribute, if the module has one, must agree with."""
    rhs = ScriptRhs(module)
    declared = getattr(module, "takes_time", None)
    if declared is not None and bool(declared) != rhs.takes_time:
        raise ValueError(
            f"the TorchScript module's takes_time is {bool(declared)} but its forward takes "
            f"{'(t, x)' if rhs.takes_time else '(x)'}: {module.forward.schema}"
        )
    return rhs


def neural_ode(
    module: Callable[..., torch.Tensor],
    x: torch.Tensor,
    tspan: Sequence[Union[float, torch.Tensor]] = (0.0, 1.0),
    solver: str = "tsit5",
    *,
    saveat: Union[None, float, Sequence[float], torch.Tensor] = None,
    sensealg: str = "rd",
    **solve_kwargs: Any,
) -> torch.Tensor:
    """Solve ``dx/dt = module(x)`` from ``x`` over ``tspan`` and return the result.

    Args:
        module: the right-hand side, called as ``module(x)``; a module with a true attribute
            ``takes_time`` is called as ``module(t, x)`` instead. A :class:`diffeqlayers.MLP`
            or a TorchScript module (``torch.jit.script(module)``, forward ``(x)`` or
            ``(t, x)`` by its signature) runs in C++: the solve never calls Python per step.
        x: the initial state, ``[batch, *features]`` or any shape ``module`` accepts.
        tspan: ``(t0, t1)``.
        solver: a method name (see :func:`diffeqlayers.methods`).
        saveat: None returns ``x(t1)`` (shape of ``x``); otherwise the trajectory at the save
            times, ``[n_times, *x.shape]`` (time first, as torchdiffeq).
        sensealg: the gradient mode: ``"rd"`` (reverse mode through the solver), ``"fd"``
            (forward mode, best for few parameters), or an adjoint (memory that does not grow
            with the steps): ``"adjoint"`` (= ``"interpolating"``), ``"backsolve"``,
            ``"discrete"``; see :func:`diffeqlayers.diffeq_adjoint`, whose options
            (``adjoint_rtol``, ``checkpoints``, ...) pass through the keyword arguments.
        **solve_kwargs: ``rtol``, ``atol``, ``dt``, ... as for :func:`diffeqlayers.solve`.
    """
    grad_fn = _sensealg(sensealg)
    if isinstance(module, MLP):
        f: Callable[[torch.Tensor, Any, float], torch.Tensor] = module.rhs  # runs in C++
    elif is_script_module(module):
        f = _script_rhs(module)  # runs in C++ too
    elif _takes_time(module):

        def f(u: torch.Tensor, p: Any, t: float) -> torch.Tensor:
            return module(t, u)

    else:

        def f(u: torch.Tensor, p: Any, t: float) -> torch.Tensor:
            return module(u)

        # f ignores t: the Rosenbrock methods can skip df/dt (see solve's autonomous).
        solve_kwargs.setdefault("autonomous", True)

    # The module itself is p: forward mode swaps its parameters for dual tensors in place, which
    # reaches f through the module (a list of its tensors would not).
    params = module if isinstance(module, nn.Module) else None
    prob = ODEProblem(f, x, tuple(tspan), params)
    if saveat is None:
        end = tspan[1]
        last = end.reshape(1) if isinstance(end, torch.Tensor) else [float(end)]
        return grad_fn(params, lambda sol: sol.u[-1], prob, solver, saveat=last, **solve_kwargs)
    return grad_fn(params, lambda sol: sol.u, prob, solver, saveat=saveat, **solve_kwargs)


class NeuralODE(nn.Module):
    """A neural ODE layer: ``forward(x)`` solves ``dx/dt = module(x)`` from ``x``.

    Without ``saveat`` the output is ``x(t1)``, with the shape of ``x``, so the layer drops into
    ``nn.Sequential`` as an ``x -> x(T)`` map. With ``saveat`` the output is the trajectory
    ``[n_times, *x.shape]`` (time first). Batches are just leading dimensions of ``x``; the
    wrapped module's parameters are this layer's parameters (optimizers, ``state_dict``,
    ``.to(device or dtype)`` all work as for any module).

    Args:
        module: the right-hand side (``module(x)``, or ``module(t, x)`` when it has a true
            attribute ``takes_time``). A :class:`diffeqlayers.MLP` or a TorchScript module
            (forward ``(x)`` or ``(t, x)``) runs in C++, without Python per step.
        tspan: ``(t0, t1)``.
        solver: a method name.
        saveat: None, a spacing, or save times.
        sensealg: the gradient mode: ``"rd"`` (reverse mode through the solver), ``"fd"``
            (forward mode, best for few parameters), or an adjoint (memory that does not grow
            with the steps): ``"adjoint"`` (= ``"interpolating"``), ``"backsolve"``,
            ``"discrete"``; see :func:`diffeqlayers.diffeq_adjoint`, whose options
            (``adjoint_rtol``, ``checkpoints``, ...) pass through the keyword arguments.
        rtol, atol: tolerances of adaptive methods.
        **solve_kwargs: further options of :func:`diffeqlayers.solve` (``dt``, ``max_num_steps``,
            ``controller``, ...).

    Example::

        model = nn.Sequential(nn.Linear(4, 8), NeuralODE(nn.Sequential(nn.Linear(8, 8),
                              nn.Tanh()), tspan=(0.0, 1.0)), nn.Linear(8, 2))
    """

    def __init__(
        self,
        module: nn.Module,
        tspan: Sequence[float] = (0.0, 1.0),
        solver: str = "tsit5",
        saveat: Union[None, float, Sequence[float]] = None,
        sensealg: str = "rd",
        rtol: float = 1e-7,
        atol: float = 1e-9,
        **solve_kwargs: Any,
    ) -> None:
        super().__init__()
        if not callable(module):
            raise TypeError(f"module must be callable, got {type(module).__name__}")
        _sensealg(sensealg)  # fail at construction, not at the first forward
        if is_script_module(module):
            _script_rhs(module)  # likewise for a TorchScript forward of the wrong signature
        if len(tspan) != 2:
            raise ValueError(f"tspan must be a pair (t0, t1), got {tspan!r}")
        self.module = module
        self.tspan = (float(tspan[0]), float(tspan[1]))
        self.solver = solver
        self.saveat = saveat
        self.sensealg = sensealg
        self.solve_kwargs = dict(rtol=rtol, atol=atol, **solve_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return neural_ode(
            self.module,
            x,
            self.tspan,
            self.solver,
            saveat=self.saveat,
            sensealg=self.sensealg,
            **self.solve_kwargs,
        )

    def extra_repr(self) -> str:
        return (
            f"tspan={self.tspan}, solver={self.solver!r}, sensealg={self.sensealg!r}, "
            f"saveat={self.saveat!r}, rtol={self.solve_kwargs['rtol']}, "
            f"atol={self.solve_kwargs['atol']}"
        )
