"""Gradient modes with one signature: switching method is changing one name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

from .problem import ODEProblem, remake
from .solution import Solution
from .solve import solve


def diffeq_rd(
    p: Any,
    reduction: Callable[[Solution], Any],
    prob: ODEProblem,
    solver: str = "tsit5",
    *,
    u0: Optional[torch.Tensor] = None,
    **solve_kwargs: Any,
) -> Any:
    """Solve ``prob`` with parameters ``p`` and return ``reduction(solution)``, differentiably.

    Reverse mode through the unrolled solver: every operation of every accepted step is
    recorded by autograd, so backward gives gradients with respect to ``p`` (tensors or an
    ``nn.Module``'s parameters), ``u0`` and the times (``tspan`` entries and ``saveat`` tensors
    that require grad). Memory grows with the number of steps; exact for the discretisation.

    Args:
        p: the parameters passed to ``f(u, p, t)`` (replaces ``prob.p``).
        reduction: maps the :class:`Solution` to the output, e.g. ``lambda sol: sol.u``.
        prob: the problem.
        solver: the method name.
        u0: overrides the initial condition (e.g. the output of a previous layer).
        **solve_kwargs: passed to :func:`solve` (``saveat``, ``rtol``, ``atol``, ``dt``, ...).
    """
    if not callable(reduction):
        raise TypeError(f"reduction must be callable, got {type(reduction).__name__}")
    prob = remake(prob, p=p)
    sol = solve(prob, solver, u0=u0, **solve_kwargs)
    return reduction(sol)
