"""TorchScript modules as dynamics: solves that run the scripted forward in C++, without Python."""

from __future__ import annotations

from typing import Any

import torch

from . import _C

__all__ = ["ScriptRhs", "is_script_module"]


def is_script_module(obj: Any) -> bool:
    """Whether ``obj`` is a TorchScript module (``torch.jit.script`` of an ``nn.Module``)."""
    return isinstance(obj, torch.jit.ScriptModule)


def required_arguments(module: torch.jit.ScriptModule) -> int:
    """The number of arguments of ``module.forward`` without default values, self excluded."""
    args = module.forward.schema.arguments[1:]
    return sum(1 for a in args if not a.has_default_value())


class ScriptRhs:
    """``f(u, p, t) = module(u)`` or ``module(t, u)`` for a TorchScript module, which
    :func:`diffeqlayers.solve` runs in C++ through the module's ``torch::jit::Module``: the solve
    releases the GIL for its whole length and never calls Python per step, in every gradient
    mode.

    The module's ``forward`` must take ``(u)`` or ``(t, u)`` (further arguments need defaults)
    and return a tensor shaped like ``u``; ``t`` declared ``float`` is passed as a float, ``t``
    declared ``Tensor`` (the type of an unannotated TorchScript argument) as a 0-dim tensor of
    ``u``'s dtype and device. ``p`` is ignored: the module uses its own parameters, read at every
    call (pass the module as ``p`` so that forward mode and the adjoints differentiate them).

    Raises:
        TypeError: ``module`` is not a TorchScript module, or its forward has another signature.
    """

    __slots__ = ("_native", "module", "takes_time")

    def __init__(self, module: torch.jit.ScriptModule) -> None:
        if not is_script_module(module):
            raise TypeError(
                f"expected a TorchScript module (torch.jit.script of an nn.Module), got "
                f"{type(module).__name__}"
            )
        takes_time, _, _ = _C.script_signature(module)  # TypeError naming what is wrong
        self.module = module
        self.takes_time = bool(takes_time)
        self._native = _C.script_dynamics(module)

    def __call__(self, u: torch.Tensor, p: Any, t: float) -> torch.Tensor:
        # The same C++ call as the solves make (so t is passed the same way).
        return self._native(float(t), u)

    def native_dynamics(self) -> _C.NativeDynamics:
        """The C++ dynamics (they read the module's parameters at each call)."""
        return self._native

    # The C++ dynamics do not pickle: rebuild them from the module.
    def __reduce__(self) -> tuple[Any, ...]:
        return (ScriptRhs, (self.module,))

    def __repr__(self) -> str:
        return f"ScriptRhs({self.module.original_name})"
