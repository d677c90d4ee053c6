"""Forward-mode gradients: diffeq_fd (a Jacobian by dual-number solves) and diffeq_jvp."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import torch
import torch.autograd.forward_ad as fwAD

from . import _C
from .problem import ODEProblem, remake
from .solution import Solution
from .solve import solve

__all__ = ["diffeq_fd", "diffeq_jvp"]


# ----------------------------------------------------------------------------------------------
# Parameters as a flat list of tensors and back
# ----------------------------------------------------------------------------------------------


def _flatten(p: Any) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], Any]]:
    """The tensors inside ``p`` (tensor, list/tuple/dict of them, nested) and a rebuilder.

    Non-tensor leaves (numbers, strings, None) are kept as they are by the rebuilder.
    """
    if isinstance(p, torch.Tensor):
        return [p], lambda ts: ts[0]
    if isinstance(p, (list, tuple)):
        parts = [_flatten(v) for v in p]
        counts = [len(leaves) for leaves, _ in parts]

        def rebuild_seq(ts: list[torch.Tensor]) -> Any:
            out, i = [], 0
            for (_, rb), n in zip(parts, counts):
                out.append(rb(ts[i : i + n]))
                i += n
            return type(p)(out) if isinstance(p, list) or type(p) is tuple else type(p)(*out)

        return [t for leaves, _ in parts for t in leaves], rebuild_seq
    if isinstance(p, dict):
        keys = list(p)
        parts = [_flatten(p[k]) for k in keys]
        counts = [len(leaves) for leaves, _ in parts]

        def rebuild_dict(ts: list[torch.Tensor]) -> Any:
            out, i = {}, 0
            for k, (_, rb), n in zip(keys, parts, counts):
                out[k] = rb(ts[i : i + n])
                i += n
            return type(p)(out)

        return [t for leaves, _ in parts for t in leaves], rebuild_dict
    return [], lambda ts: p


def _module_parameters(module: torch.nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    """The module's distinct parameters (tied ones once) and their first names."""
    names, tensors, seen = [], [], set()
    for name, t in module.named_parameters():
        if id(t) not in seen:
            seen.add(id(t))
            names.append(name)
            tensors.append(t)
    return names, tensors


@contextlib.contextmanager
def _swapped_parameters(
    module: torch.nn.Module, originals: list[torch.Tensor], replacements: list[torch.Tensor]
) -> Iterator[None]:
    """Temporarily replaces the module's parameters (every alias of a tied one) in place.

    Swapping, rather than torch.func.functional_call, lets the user's ``f(u, p, t)`` receive
    the module itself as ``p`` and call it however it likes (``p(u)``, ``p.layer(u)``, ...).
    The module is modified while the solve runs: do not use it from another thread meanwhile.
    """
    by_id = {id(o): r for o, r in zip(originals, replacements)}
    saved = []
    for sub in module.modules():
        for attr, t in list(sub._parameters.items()):
            if t is not None and id(t) in by_id:
                saved.append((sub, attr, t))
    try:
        for sub, attr, t in saved:
            sub._parameters[attr] = by_id[id(t)]
        yield
    finally:
        for sub, attr, t in saved:
            sub._parameters[attr] = t


def _split_params(p: Any) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], Any], Any]:
    """(leaves, rebuild, module): for a module, rebuild returns the module itself and the
    solve must run inside ``_swapped_parameters``."""
    if isinstance(p, torch.nn.Module):
        _, tensors = _module_parameters(p)
        return tensors, lambda ts: p, p
    leaves, rebuild = _flatten(p)
    return leaves, rebuild, None


def _check_times(span: Sequence[Any], solve_kwargs: dict[str, Any]) -> None:
    """Forward mode pushes directions through u0 and p only: times that carry a gradient (a
    tspan entry or saveat tensor requiring grad, or a tspan computed from p) would be silently
    treated as constants, so they are refused."""
    for x in span:
        if isinstance(x, torch.Tensor) and x.requires_grad:
            raise ValueError(
                "forward mode differentiates with respect to p and u0 only, but a tspan entry "
                "requires grad (or is computed from p); use diffeq_rd for gradients with respect "
                "to the times"
            )
    saveat = solve_kwargs.get("saveat")
    if isinstance(saveat, torch.Tensor) and saveat.requires_grad:
        raise ValueError(
            "forward mode differentiates with respect to p and u0 only, but saveat requires "
            "grad; use diffeq_rd for gradients with respect to the times"
        )


def _closure(
    prob: ODEProblem,
    solver: str,
    reduction: Callable[[Solution], Any],
    rebuild: Callable[[list[torch.Tensor]], Any],
    module: Optional[torch.nn.Module],
    originals: list[torch.Tensor],
    u0_from_p: bool,
    solve_kwargs: dict[str, Any],
) -> Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]:
    """fn(u0, params) -> reduction(solve(...)) with the given (dual) tensors, for the C++ side.

    With ``u0_from_p`` the problem's ``u0(p, t0)`` is evaluated on the dual parameters inside
    the solve (so its dependence on p is differentiated) and the u0 argument is ignored.
    """

    def fn(u0: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        ctx = (
            _swapped_parameters(module, originals, params)
            if module is not None
            else contextlib.nullcontext()
        )
        with ctx:
            sol = solve(
                remake(prob, p=rebuild(params)),
                solver,
                u0=None if u0_from_p else u0,
                **solve_kwargs,
            )
            out = reduction(sol)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"diffeq_fd's reduction must return a tensor, got {type(out).__name__}")
        return out

    return fn


def _check_not_nested(who: str) -> None:
    """Refuses to run under torch.func transforms or inside a forward-AD level.

    The C++ side checks the level too (it is process-global, so that check also covers other
    threads); this one gives the error before the tensors reach C++, where functorch's wrapped
    tensors would fail with an obscure message.
    """
    if fwAD._current_level >= 0:
        raise RuntimeError(
            f"{who} needs PyTorch's forward-AD level, and another forward-AD level is already "
            "active: it cannot run inside torch.func.jvp, torch.func.jacfwd or "
            "torch.autograd.forward_ad.dual_level(). Call it outside, or use diffeq_rd there."
        )
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise RuntimeError(
            f"{who} cannot run inside torch.func transforms (jvp, jacfwd, vmap, grad): it is a "
            "C++ autograd Function, which they refuse. Call it outside, or use diffeq_rd."
        )


def _prepare(
    p: Any, reduction: Any, prob: Any, solver: Any, u0: Any, solve_kwargs: dict[str, Any]
) -> tuple[torch.Tensor, bool]:
    """Checks the arguments; returns the initial state and whether it is computed from p."""
    if not callable(reduction):
        raise TypeError(f"reduction must be callable, got {type(reduction).__name__}")
    if not isinstance(prob, ODEProblem):
        raise TypeError(f"prob must be an ODEProblem, got {type(prob).__name__}")
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a method name (str), got {type(solver).__name__}")
    state, span = remake(prob, p=p).resolve()
    u0_from_p = u0 is None and callable(prob.u0)
    if u0 is not None:
        state = u0
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"u0 must be a torch.Tensor, got {type(state).__name__}")
    _check_times(span, solve_kwargs)
    # A u0 computed from p gets its directions through p: as an input it is a constant.
    return (state.detach() if u0_from_p else state), u0_from_p


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def diffeq_fd(
    p: Any,
    reduction: Callable[[Solution], torch.Tensor],
    prob: ODEProblem,
    solver: str = "tsit5",
    *,
    u0: Optional[torch.Tensor] = None,
    chunk_size: int = 0,
    vectorize: bool = True,
    **solve_kwargs: Any,
) -> torch.Tensor:
    """Solve ``prob`` with parameters ``p`` and return ``reduction(solution)``; gradients by
    forward mode.

    Same signature as :func:`diffeq_rd`. The Jacobian of the output with respect to every
    scalar of ``p`` (the tensors that require grad) and of ``u0`` (when it requires grad) is
    built by solving on dual tensors, one solve per chunk of scalar inputs (the chunk's
    directions travel together as one batched tangent): cheap for few parameters and
    memory-light (nothing is recorded for autograd during the solve), then backward returns
    ``grad . J``.
    Step-size control sees primal values only, so every pass takes exactly the plain solve's
    steps, and the gradient equals :func:`diffeq_rd`'s up to rounding.

    With grad mode off, or when nothing requires grad, this is a plain solve.

    Args:
        p: the parameters passed to ``f(u, p, t)``: a tensor, a (nested) list/tuple/dict of
            tensors, or an ``nn.Module`` (its parameters are swapped for dual tensors in place
            while the solves run, so ``f`` receives the module itself; do not use the module
            from another thread meanwhile).
        reduction: maps the :class:`Solution` to a floating tensor (the output).
        prob: the problem.
        solver: the method name.
        u0: overrides the initial condition; differentiated when it requires grad.
        chunk_size: directions per pass (0: the default, 32); the unit between Ctrl-C checks.
            Memory for tangents grows with it.
        vectorize: carry a chunk's directions in one pass as a batched tangent (PyTorch's
            legacy vmap). False: one direction per pass. Batching falls back to that by
            itself when ``f`` or the reduction uses an op without batching support.
        **solve_kwargs: passed to :func:`solve` (``saveat``, ``rtol``, ``atol``, ``dt``, ...).

    Raises:
        RuntimeError: called inside ``torch.func.jvp``/``jacfwd`` or
            ``torch.autograd.forward_ad.dual_level()`` (PyTorch has one forward-AD level), or
            from inside another diffeq_fd. Calls from several threads are serialised.
        ValueError: ``tspan`` or ``saveat`` require grad (use :func:`diffeq_rd`).
    """
    _check_not_nested("diffeq_fd")
    state, u0_from_p = _prepare(p, reduction, prob, solver, u0, solve_kwargs)
    leaves, rebuild, module = _split_params(p)
    wants = [t for t in [state, *leaves] if t.requires_grad and t.is_floating_point()]
    if not torch.is_grad_enabled() or not wants:
        with torch.no_grad():
            return reduction(solve(remake(prob, p=p), solver, u0=u0, **solve_kwargs))
    fn = _closure(prob, solver, reduction, rebuild, module, leaves, u0_from_p, solve_kwargs)
    return _C.diffeq_fd(fn, state, leaves, int(chunk_size), bool(vectorize))


def diffeq_jvp(
    p: Any,
    reduction: Callable[[Solution], torch.Tensor],
    prob: ODEProblem,
    solver: str = "tsit5",
    *,
    tangent_p: Any = None,
    tangent_u0: Optional[torch.Tensor] = None,
    u0: Optional[torch.Tensor] = None,
    **solve_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The output of :func:`diffeq_fd` and its directional derivative, in one dual solve.

    Returns ``(y, dy)`` with ``y = reduction(solve(prob with p, u0))`` and ``dy = J_p tangent_p +
    J_u0 tangent_u0``. Nothing is recorded for autograd.

    Args:
        p: the parameters, as for :func:`diffeq_fd`.
        reduction, prob, solver, u0, **solve_kwargs: as for :func:`diffeq_fd`.
        tangent_p: the direction for ``p``: the same structure as ``p`` (a tensor, list, dict;
            for an ``nn.Module`` a dict from parameter name to tensor, or a sequence in
            ``parameters()`` order). None entries (or None) are zero.
        tangent_u0: the direction for ``u0`` (None: zero).

    Raises:
        RuntimeError: nested in another forward-AD level, as for :func:`diffeq_fd`.
        ValueError: a tangent's shape differs from its primal's.
    """
    _check_not_nested("diffeq_jvp")
    state, u0_from_p = _prepare(p, reduction, prob, solver, u0, solve_kwargs)
    leaves, rebuild, module = _split_params(p)
    tangents: list[Optional[torch.Tensor]]
    if tangent_p is None:
        tangents = [None] * len(leaves)
    elif module is not None:
        names, _ = _module_parameters(module)
        if isinstance(tangent_p, dict):
            unknown = set(tangent_p) - set(names)
            if unknown:
                raise ValueError(f"tangent_p names unknown parameters: {sorted(unknown)}")
            tangents = [tangent_p.get(n) for n in names]
        elif isinstance(tangent_p, Sequence):
            tangents = list(tangent_p)
        else:
            raise TypeError("for an nn.Module p, tangent_p must be a dict or a sequence")
    else:
        tangents = list(_flatten(tangent_p)[0]) if tangent_p is not None else []
    if len(tangents) != len(leaves):
        raise ValueError(
            f"tangent_p holds {len(tangents)} tensors but p holds {len(leaves)}: give one "
            "tangent per parameter tensor, in the same structure"
        )
    if u0_from_p and tangent_u0 is not None:
        raise ValueError("tangent_u0 given, but prob.u0 is a function of p: give tangent_p only")
    fn = _closure(prob, solver, reduction, rebuild, module, leaves, u0_from_p, solve_kwargs)
    y, dy = _C.jvp(fn, state, leaves, tangent_u0, tangents)
    return y, dy
