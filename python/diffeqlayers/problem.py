"""Problem definitions in the style of DifferentialEquations.jl: f(u, p, t), u0, tspan, p."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch

TimeLike = Union[float, int, torch.Tensor]
_UNSET: Any = object()


@dataclasses.dataclass(frozen=True)
class ODEProblem:
    """The initial value problem ``du/dt = f(u, p, t)``, ``u(tspan[0]) = u0``.

    Args:
        f: the dynamics, called as ``f(u, p, t)`` with ``u`` a tensor shaped like ``u0``, ``p``
            the problem's parameters and ``t`` a Python float. Any callable, an ``nn.Module``
            included; it must return a tensor of ``u``'s shape, dtype and device. A
            :class:`diffeqlayers.MLP` is taken as ``f(u, p, t) = mlp(u)`` and evaluated in C++
            (pass it as ``p`` too, so that forward mode and the adjoints differentiate it), and
            so is a TorchScript module (``torch.jit.script(module)``) whose forward takes
            ``(u)`` or ``(t, u)`` (see :class:`diffeqlayers.script.ScriptRhs`); one whose
            forward takes ``(u, p, t)`` is called from Python like any ``f``.
        u0: the initial state, a float32 or float64 tensor of any shape (batch dimensions
            included), or a function ``u0(p, t0)`` returning one, so that p can set it.
        tspan: ``(t0, t1)``; ``t1 < t0`` integrates backwards in time. Entries may be tensors
            that require grad. Or a function ``tspan(p)`` returning such a pair.
        p: the parameters: a tensor, a sequence or dict of tensors, an ``nn.Module``, or None.
    """

    f: Callable[..., torch.Tensor]
    u0: Union[torch.Tensor, Callable[[Any, TimeLike], torch.Tensor]]
    tspan: Union[tuple[TimeLike, TimeLike], Callable[[Any], Sequence[TimeLike]]]
    p: Any = None

    def __post_init__(self) -> None:
        ScriptRhs, is_script_module, required_arguments = _script_names()
        if isinstance(self.f, _mlp_class()):
            # The built-in MLP as f(u, p, t) = mlp(u): solves run it in C++.
            object.__setattr__(self, "f", self.f.rhs)
        elif is_script_module(self.f) and required_arguments(self.f) != 3:
            # A TorchScript forward(u) or forward(t, u): solves run it in C++ (TypeError here
            # for any other signature); forward(u, p, t) stays a Python-called f.
            object.__setattr__(self, "f", ScriptRhs(self.f))
        if not callable(self.f):
            raise TypeError(f"f must be callable as f(u, p, t), got {type(self.f).__name__}")
        if not isinstance(self.u0, torch.Tensor) and not callable(self.u0):
            raise TypeError(
                f"u0 must be a torch.Tensor or a function u0(p, t0), got {type(self.u0).__name__}"
            )
        if not callable(self.tspan):
            object.__setattr__(self, "tspan", _check_span(self.tspan))

    def resolve(self) -> tuple[torch.Tensor, tuple[TimeLike, TimeLike]]:
        """The initial state and the span, evaluating them from ``p`` where they are functions."""
        tspan = _check_span(self.tspan(self.p)) if callable(self.tspan) else self.tspan
        u0 = self.u0(self.p, tspan[0]) if callable(self.u0) else self.u0
        if not isinstance(u0, torch.Tensor):
            raise TypeError(f"u0(p, t0) must return a torch.Tensor, got {type(u0).__name__}")
        return u0, tspan


class SplitODEProblem(ODEProblem):
    """The split problem ``du/dt = f_stiff(u, p, t) + f_nonstiff(u, p, t)``.

    ``kencarp4`` solves it as an IMEX method: ``f_stiff`` implicitly (its Jacobian alone is
    taken, and a ``jac`` given to :func:`solve` must be that of ``f_stiff``), ``f_nonstiff``
    explicitly with the method's explicit companion tableau. Every other method solves the sum
    ``f = f_stiff + f_nonstiff`` (``prob.f``), so the problem works wherever an
    :class:`ODEProblem` does.

    Args:
        f_stiff, f_nonstiff: the two parts, each called as ``f(u, p, t)`` like
            :class:`ODEProblem`'s ``f``.
        u0, tspan, p: as for :class:`ODEProblem`.
    """

    f_stiff: Callable[..., torch.Tensor]
    f_nonstiff: Callable[..., torch.Tensor]

    def __init__(
        self,
        f_stiff: Callable[..., torch.Tensor],
        f_nonstiff: Callable[..., torch.Tensor],
        u0: Union[torch.Tensor, Callable[[Any, TimeLike], torch.Tensor]],
        tspan: Union[tuple[TimeLike, TimeLike], Callable[[Any], Sequence[TimeLike]]],
        p: Any = None,
    ) -> None:
        for name, part in (("f_stiff", f_stiff), ("f_nonstiff", f_nonstiff)):
            if not callable(part):
                raise TypeError(
                    f"{name} must be callable as {name}(u, p, t), got {type(part).__name__}"
                )
        object.__setattr__(self, "f_stiff", f_stiff)
        object.__setattr__(self, "f_nonstiff", f_nonstiff)

        def f(u: torch.Tensor, p: Any, t: float) -> torch.Tensor:
            return f_stiff(u, p, t) + f_nonstiff(u, p, t)

        super().__init__(f, u0, tspan, p)


def _check_span(tspan: Any) -> tuple[TimeLike, TimeLike]:
    if not isinstance(tspan, (Sequence, torch.Tensor)) or len(tspan) != 2:
        raise ValueError(f"tspan must be a pair (t0, t1), got {tspan!r}")
    return tuple(tspan)


def remake(
    prob: ODEProblem, *, f: Any = _UNSET, u0: Any = _UNSET, tspan: Any = _UNSET, p: Any = _UNSET
) -> ODEProblem:
    """A copy of ``prob`` with the given fields replaced (DifferentialEquations.jl's ``remake``)."""
    changes = {
        name: value
        for name, value in (("f", f), ("u0", u0), ("tspan", tspan), ("p", p))
        if value is not _UNSET
    }
    if isinstance(prob, SplitODEProblem):
        if "f" in changes:
            raise ValueError("remake of a SplitODEProblem cannot replace f: build a new problem")
        return SplitODEProblem(
            prob.f_stiff,
            prob.f_nonstiff,
            changes.get("u0", prob.u0),
            changes.get("tspan", prob.tspan),
            changes.get("p", prob.p),
        )
    return dataclasses.replace(prob, **changes)


@functools.cache
def _script_names() -> tuple[Any, Any, Any]:
    """script's ScriptRhs, is_script_module and required_arguments, imported on first use
    (script imports the extension; problem stays light) and then kept."""
    from .script import ScriptRhs, is_script_module, required_arguments  # noqa: PLC0415

    return ScriptRhs, is_script_module, required_arguments


@functools.cache
def _mlp_class() -> type:
    """diffeqlayers.MLP, imported on first use (mlp imports the extension; problem stays light)
    and then kept: an import statement per solve cost more than parameter_tensors' own work."""
    from .mlp import MLP  # noqa: PLC0415

    return MLP


def parameter_tensors(p: Any) -> list[torch.Tensor]:
    """The tensors inside ``p`` (a tensor, module, sequence or dict of them), in order."""
    if p is None:
        return []
    if isinstance(p, torch.Tensor):
        return [p]
    if isinstance(p, torch.nn.Module):
        if type(p) is _mlp_class():  # its parameters in order, without nn.Module's generators
            return p.weights()
        return list(p.parameters())
    if isinstance(p, dict):
        return [t for v in p.values() for t in parameter_tensors(v)]
    if isinstance(p, (list, tuple)):
        return [t for v in p for t in parameter_tensors(v)]
    return []
