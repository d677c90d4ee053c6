"""MLP: a built-in multilayer perceptron whose solves never enter Python per step."""

from __future__ import annotations

from collections.abc import Sequence
from operator import is_
from typing import Any, Optional, Union

import torch
from torch import nn

from . import _C

__all__ = ["MLP", "MLPRhs", "mlp_activations"]


def mlp_activations() -> list[str]:
    """The activations :class:`MLP` knows: tanh, relu, softplus, sigmoid, gelu, elu, silu,
    identity (with torch.nn's defaults: Softplus(beta=1, threshold=20), ELU(alpha=1), exact
    GELU)."""
    return list(_C.mlp_activations())


class MLP(nn.Module):
    """A multilayer perceptron evaluated in C++, for dynamics ``dx/dt = mlp(x)``.

    ``Linear(sizes[0], sizes[1]) -> act -> Linear(sizes[1], sizes[2]) -> act ... ->
    Linear(sizes[-2], sizes[-1])``, applied to ``x ** input_power`` (elementwise) and, with
    ``time_input``, to ``[x, t]``. The weights are ordinary ``nn.Parameter`` s of ``nn.Linear``
    submodules (``layers.0.weight``, ``layers.0.bias``, ...), initialised as ``nn.Linear`` does:
    optimizers, ``state_dict``, ``.to()`` and ``.double()`` work as for any module.

    When the dynamics of a solve is this MLP -- ``NeuralODE(mlp)``, ``neural_ode(mlp, ...)``, or
    an :class:`ODEProblem` whose ``f`` is ``mlp`` (or ``mlp.rhs``) -- the solve calls the C++
    evaluation directly with the GIL released for the whole solve, never entering Python per
    step, in every gradient mode (``diffeq_rd``, ``diffeq_fd``, the adjoints). The C++ side
    receives the module's own parameter tensors, so gradients reach them as usual.

    Args:
        sizes: ``[in, hidden..., out]``; ``in`` counts the state's features (the time input, if
            any, comes on top).
        activation: the activation of every hidden layer (see :func:`mlp_activations`).
        activations: one activation per hidden layer instead (overrides ``activation``).
        input_power: the elementwise power applied to the state before the first layer (3 in
            DiffEqFlux's spiral example); 1 skips it.
        time_input: append ``t`` to the first layer's input; the module is then called as
            ``mlp(t, x)`` (``takes_time`` is True, which :func:`neural_ode` honours).
        bias: whether the linear layers have biases.
        device, dtype: of the parameters.

    Example::

        f = dl.MLP([2, 50, 2], "tanh", input_power=3)
        layer = dl.NeuralODE(f, tspan=(0.0, 1.5), saveat=torch.linspace(0, 1.5, 30))
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: str = "tanh",
        *,
        activations: Optional[Sequence[str]] = None,
        input_power: float = 1.0,
        time_input: bool = False,
        bias: bool = True,
        device: Union[None, str, torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
            raise TypeError(f"sizes must be a sequence of integers, got {sizes!r}")
        if any(isinstance(s, bool) or not isinstance(s, int) for s in sizes):
            raise TypeError(f"sizes must hold integers, got {list(sizes)!r}")
        if not isinstance(activation, str):
            raise TypeError(f"activation must be a name, got {activation!r}")
        if activations is not None and (
            isinstance(activations, str) or any(not isinstance(a, str) for a in activations)
        ):
            raise TypeError(f"activations must be a sequence of names, got {activations!r}")
        if isinstance(input_power, bool) or not isinstance(input_power, (int, float)):
            raise TypeError(f"input_power must be a number, got {input_power!r}")
        self._config = dict(
            sizes=[int(s) for s in sizes],
            activation=activation,
            activations=list(activations or []),
            input_power=float(input_power),
            time_input=bool(time_input),
            bias=bool(bias),
        )
        self._spec = _C.MLPSpec(**self._config)  # ValueError for bad sizes or activations
        self.layers = nn.ModuleList(
            nn.Linear(
                self._spec.in_features(i), sizes[i + 1], bias=bias, device=device, dtype=dtype
            )
            for i in range(len(sizes) - 1)
        )
        self.takes_time = bool(time_input)

    # The spec is a C++ object: rebuild it on unpickling and deep copies.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_spec"]
        state.pop("_native", None)  # C++ dynamics, rebuilt on use
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._spec = _C.MLPSpec(**self._config)

    @property
    def spec(self) -> _C.MLPSpec:
        """The architecture (sizes, activations, input power, time input, bias)."""
        return self._spec

    def weights(self) -> list[torch.Tensor]:
        """``[W0, b0, W1, b1, ...]``: the parameters as the C++ evaluation takes them (the
        tensors currently registered, so swapped-in tensors, as forward mode uses, count)."""
        # Read from the modules' parameter dicts (where forward mode swaps its tensors in):
        # nn.Module attribute lookups cost more than the solve of a small problem notices.
        out = []
        bias = self._config["bias"]
        for lin in self._modules["layers"]._modules.values():
            params = lin._parameters
            out.append(params["weight"])
            if bias:
                out.append(params["bias"])
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As :meth:`torch.nn.Module.zero_grad`; clearing (``set_to_none``, the default) walks
        the weights directly instead of nn.Module's generators (2 us against 18 us measured
        for a 2-50-2 network, per training step)."""
        if set_to_none and type(self) is MLP and not self._parameters and len(self._modules) == 1:
            for w in self.weights():
                if w.grad is not None:
                    w.grad = None
            return
        super().zero_grad(set_to_none)

    def forward(self, *args: Any) -> torch.Tensor:
        """``mlp(x)``, or ``mlp(t, x)`` with ``time_input`` (``t`` a number)."""
        if self.takes_time:
            if len(args) != 2:
                raise TypeError("this MLP takes time as an input: call it as mlp(t, x)")
            t, x = args
            t = float(t)
        else:
            if len(args) != 1:
                raise TypeError(f"MLP.forward takes one tensor x, got {len(args)} arguments")
            (x,), t = args, 0.0
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"MLP input must be a torch.Tensor, got {type(x).__name__}")
        return _C.mlp_forward(self._spec, self.weights(), t, x)

    def dynamics(self) -> _C.NativeDynamics:
        """Native dynamics ``f(t, u)`` with the current parameters, for ``_C.solve``.

        Kept between calls while the module holds the same parameter objects (one built per
        solve and a new span tensor cost a small training step about 5%); each solve checks
        the kept tensors' shapes, dtypes and devices again in C++, so ``.data`` assignments
        and ``.double()`` are seen. Tensors swapped in for the parameters (forward mode's) get
        dynamics of their own.
        """
        weights = self.weights()
        kept = self.__dict__.get("_native")
        if kept is not None and len(kept[0]) == len(weights) and all(map(is_, kept[0], weights)):
            return kept[1]
        native = _C.mlp_dynamics(self._spec, weights)
        # Kept only for the module's own parameters: swapped-in tensors may carry a graph.
        if all(isinstance(w, nn.Parameter) for w in weights):
            self.__dict__["_native"] = (weights, native)
        return native

    @property
    def rhs(self) -> MLPRhs:
        """This MLP as ``f(u, p, t)`` for an :class:`ODEProblem` (``p`` is ignored: the MLP uses
        its own parameters; pass the MLP as ``p`` so that forward mode and the adjoints
        differentiate them)."""
        return MLPRhs(self)

    def extra_repr(self) -> str:
        c = self._config
        acts = c["activations"] or [c["activation"]] * (len(c["sizes"]) - 2)
        parts = [f"sizes={c['sizes']}", f"activations={acts}"]
        if c["input_power"] != 1.0:
            parts.append(f"input_power={c['input_power']:g}")
        if c["time_input"]:
            parts.append("time_input=True")
        return ", ".join(parts)


class MLPRhs:
    """``f(u, p, t) = mlp(u)`` (or ``mlp(t, u)``) that :func:`diffeqlayers.solve` recognises
    and runs in C++ (see :class:`MLP`)."""

    __slots__ = ("mlp",)

    def __init__(self, mlp: MLP) -> None:
        self.mlp = mlp

    def __call__(self, u: torch.Tensor, p: Any, t: float) -> torch.Tensor:
        return self.mlp(t, u) if self.mlp.takes_time else self.mlp(u)

    def native_dynamics(self) -> _C.NativeDynamics:
        """The C++ dynamics with the MLP's current parameters."""
        return self.mlp.dynamics()

    def __repr__(self) -> str:
        return f"MLPRhs({self.mlp!r})"
