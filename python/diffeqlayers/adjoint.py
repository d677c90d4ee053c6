"""Adjoint gradients: diffeq_adjoint (interpolating, backsolve and discrete adjoints)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch

from . import _C
from .problem import ODEProblem, parameter_tensors, remake
from .solution import Solution
from .solve import solve

__all__ = ["adjoint_sensealgs", "diffeq_adjoint"]


def adjoint_sensealgs() -> list[str]:
    """The adjoint methods: ``interpolating`` (the default), ``backsolve``, ``discrete``."""
    return list(_C.adjoint_sensealgs())


def _distinct(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(tensors, list) and len(set(map(id, tensors))) == len(tensors):
        return tensors  # the common case, checked without a Python loop
    out, seen = [], set()
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def checked_adjoint_params(adjoint_params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The given parameters as a list of distinct tensors; TypeError for anything else."""
    params = list(adjoint_params)
    bad = [type(x).__name__ for x in params if not isinstance(x, torch.Tensor)]
    if bad:
        raise TypeError(f"adjoint_params must hold tensors, got {bad}")
    return _distinct(params)


def _tolerance(name: str, value: Any) -> float:
    if value is None:
        return -1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value >= 0:
        raise ValueError(f"{name} must be non-negative, got {value}")
    return float(value)


_SENSEALGS = frozenset(_C.adjoint_sensealgs())


@functools.lru_cache(maxsize=1)
def _known_methods() -> frozenset[str]:
    return frozenset(_C.methods()) | frozenset(_C.stiff_methods())


def adjoint_options(
    sensealg: str = "interpolating",
    *,
    adjoint_rtol: Optional[float] = None,
    adjoint_atol: Optional[float] = None,
    adjoint_method: Optional[str] = None,
    seminorm: bool = False,
    checkpoints: int = 0,
) -> _C.AdjointOptions:
    """The checked options of an adjoint (see :func:`diffeq_adjoint` for their meaning)."""
    if not isinstance(sensealg, str) or sensealg not in _SENSEALGS:
        raise ValueError(
            f"sensealg must be one of {adjoint_sensealgs()} for diffeq_adjoint, got {sensealg!r}"
        )
    if adjoint_method is not None and not isinstance(adjoint_method, str):
        raise TypeError(f"adjoint_method must be a method name, got {adjoint_method!r}")
    known = _known_methods()
    if adjoint_method is not None and adjoint_method not in known:
        raise ValueError(f"unknown adjoint_method {adjoint_method!r}; available: {sorted(known)}")
    if isinstance(checkpoints, bool) or not isinstance(checkpoints, int) or checkpoints < 0:
        raise ValueError(f"checkpoints must be a non-negative integer, got {checkpoints!r}")
    o = _C.AdjointOptions()
    o.sensealg = sensealg
    o.method = adjoint_method or ""
    o.rtol = _tolerance("adjoint_rtol", adjoint_rtol)
    o.atol = _tolerance("adjoint_atol", adjoint_atol)
    o.seminorm = bool(seminorm)
    o.checkpoints = int(checkpoints)
    return o


def _options_from(
    sensealg: str,
    adjoint_rtol: Optional[float],
    adjoint_atol: Optional[float],
    adjoint_method: Optional[str],
    seminorm: bool,
    checkpoints: int,
) -> _C.AdjointOptions:
    """adjoint_options with positional arguments."""
    return adjoint_options(
        sensealg,
        adjoint_rtol=adjoint_rtol,
        adjoint_atol=adjoint_atol,
        adjoint_method=adjoint_method,
        seminorm=seminorm,
        checkpoints=checkpoints,
    )


# The options of the last few configurations, kept (typed: True and 1 stay apart): a training
# loop asks for the same ones every step. Safe to share: the solves copy them.
_kept_adjoint_options = functools.lru_cache(maxsize=32, typed=True)(_options_from)


def diffeq_adjoint(
    p: Any,
    reduction: Callable[[Solution], Any],
    prob: ODEProblem,
    solver: str = "tsit5",
    *,
    u0: Optional[torch.Tensor] = None,
    sensealg: str = "interpolating",
    adjoint_rtol: Optional[float] = None,
    adjoint_atol: Optional[float] = None,
    adjoint_method: Optional[str] = None,
    seminorm: bool = False,
    checkpoints: int = 0,
    adjoint_params: Optional[Iterable[torch.Tensor]] = None,
    **solve_kwargs: Any,
) -> Any:
    """Solve ``prob`` with parameters ``p`` and return ``reduction(solution)``; gradients by an
    adjoint method.

    Same signature as :func:`diffeq_rd` and :func:`diffeq_fd`, plus the adjoint's options.
    The forward solve records no autograd graph; backward solves the adjoint problem:

    * ``"interpolating"`` (default): the forward keeps checkpoints (the state at the start of
      every accepted step, or fewer with ``checkpoints``); backward solves the adjoint ODE
      ``dλ/dt = -(∂f/∂u)ᵀλ`` with its own adaptive steps, getting ``u(t)`` by replaying forward
      steps from their checkpoints and evaluating their dense output. Accurate to the
      tolerances on chaotic and unstable problems.
    * ``"backsolve"``: solves ``[u, λ, ∂L/∂p]`` backwards from the end, resetting ``u`` to the
      saved value at each output time (torchdiffeq's ``odeint_adjoint``). Least memory, but
      wrong where solving ``u`` backwards is unstable (Lorenz over long spans, stiff problems).
    * ``"discrete"``: replays the solver's accepted steps under autograd, last to first: the
      gradient of the discretisation, equal to :func:`diffeq_rd`'s to rounding, with one
      stored state per step (or fewer with ``checkpoints``) instead of the whole graph (small
      CPU solves of :class:`MLP` with one checkpoint per step also keep each step's stages and
      the network's activations at them, about 3 KB per step for a 2-50-2 network and at most
      64 MiB, so that the backward evaluates nothing again). It also takes a Rosenbrock
      forward solve (``rodas5``, ``rodas5p``, ``rosenbrock23``): each step, with its fresh
      Jacobian, is replayed from the forward's dense output; and a ``radau5`` or ESDIRK one
      (``kvaerno5``, ``kencarp4``, ``trbdf2``): each step is rebuilt from the converged
      stages the forward solve keeps, by the exact Newton corrections
      :func:`diffeq_rd` takes.

    Gradients reach ``u0`` (when it requires grad), the parameters, and the times (``tspan``
    entries and ``saveat`` tensors that require grad). The reduction must use ``sol.u`` (and
    ``sol.t``): dense output (``dense=True``) carries no gradient here and is refused.

    Args:
        p: the parameters passed to ``f(u, p, t)`` (replaces ``prob.p``).
        reduction: maps the :class:`Solution` to the output, e.g. ``lambda sol: sol.u``.
        prob: the problem.
        solver: the method name.
        u0: overrides the initial condition.
        sensealg: ``"interpolating"``, ``"backsolve"`` or ``"discrete"``.
        adjoint_rtol, adjoint_atol: tolerances of the backward solve (default: the forward's).
        adjoint_method: method of the backward solve (default: the forward's). A stiff
            method (``rodas5p``, ``rosenbrock23``, ``kvaerno5``, ``kencarp4``, ``trbdf2``,
            ``radau5``) solves the adjoint of a stiff problem with
            ``sensealg="interpolating"``; the Jacobian of the adjoint system comes from autograd
            (the reverse passes of f's components, batched into one where the graph allows).
            ``rodas5`` is refused here: its error estimate does not see an explicit dependence
            on t, and the adjoint system depends on t through u(t). A stiff forward solve
            (``rodas5``, ``kvaerno5``, ...) runs with ``sensealg="interpolating"`` or
            ``"discrete"``: it keeps its whole dense output (every step with its stages) in
            place of checkpoints, and its backward solve defaults to the same method,
            ``rodas5p`` after ``rodas5``.
        seminorm: error control of the backward solve ignores the parameter-gradient channels
            (Kidger, Chen & Lyons 2021): fewer backward steps, same accuracy in practice.
        checkpoints: the most states the forward solve keeps (interpolating, discrete); 0 keeps
            one per step. Fewer cost recomputation in backward.
        adjoint_params: the tensors to differentiate (default: every tensor in ``p``, or the
            module's parameters). ``f`` must reach its parameters through these tensors:
            gradients do not reach other tensors ``f`` captures.
        **solve_kwargs: passed to :func:`solve` (``saveat``, ``rtol``, ``atol``, ``dt``, ...).

    The :class:`Solution` handed to ``reduction`` has ``adjoint_stats``, which backward fills
    in (evaluations of f, vector-Jacobian products, steps).

    Raises:
        ValueError: an unknown sensealg or adjoint_method, bad tolerances, ``dense=True``.
        RuntimeError: from backward, when the backward solve fails (the message names the
            adjoint, the cause, t and dt; autograd turns the :class:`SolverError` into a plain
            RuntimeError); an exception raised by ``f`` during backward propagates as itself.
        RuntimeError: backward with ``create_graph=True`` (use :func:`diffeq_rd`), or a
            parameter modified in place between forward and backward.
    """
    if not callable(reduction):
        raise TypeError(f"reduction must be callable, got {type(reduction).__name__}")
    args = (sensealg, adjoint_rtol, adjoint_atol, adjoint_method, seminorm, checkpoints)
    try:
        options = _kept_adjoint_options(*args)
    except TypeError:  # an unhashable argument: the checks name it
        options = _options_from(*args)
    p_tensors = parameter_tensors(p)
    if adjoint_params is not None:
        params = checked_adjoint_params(adjoint_params)
    else:
        params = _distinct(p_tensors)
    if p is not prob.p:
        prob = remake(prob, p=p)
    sol = solve(prob, solver, u0=u0, _adjoint=(options, params, p_tensors), **solve_kwargs)
    return reduction(sol)
