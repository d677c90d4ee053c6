"""solve(): options in Python, the loop in C++."""

from __future__ import annotations

import functools
import math
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch

from . import _C
from .mlp import MLPRhs
from .problem import ODEProblem, SplitODEProblem, parameter_tensors
from .script import ScriptRhs
from .solution import SampleStats, Solution

_ADAMS = frozenset(_C.adams_methods())

# SolveOptions' defaults, read once from the extension: solve() sets only the options that
# differ from them (each assignment is a call into the extension, and a small solve notices).
_OPTION_DEFAULTS = _C.SolveOptions()
_DEFAULTS = types.SimpleNamespace(
    **{
        name: getattr(_OPTION_DEFAULTS, name)
        for name in (
            "rtol",
            "atol",
            "adaptive",
            "dt_min",
            "dt_max",
            "max_num_steps",
            "dense",
            "save_start",
            "check_finite",
            "throw_on_failure",
        )
    }
)
del _OPTION_DEFAULTS

_CONTROLLERS = {
    "I": _C.ControllerOptions.I,
    "PI": _C.ControllerOptions.PI,
    "PID": _C.ControllerOptions.PID,
}


def methods() -> list[str]:
    """Names of the available methods (fixed step: euler, midpoint, ...; adaptive: dopri5, ...)."""
    return list(_C.methods())


def stiff_methods() -> list[str]:
    """Names of the stiff methods: Rosenbrock ``rosenbrock23``, ``rodas5``, ``rodas5p``; ESDIRK
    (Newton on each implicit stage) ``kvaerno5``, ``kencarp4`` (IMEX on a
    :class:`SplitODEProblem`), ``trbdf2``; Radau IIA ``radau5`` (order 5, its three coupled
    stages by Newton on Hairer & Wanner's transformed system)."""
    return list(_C.stiff_methods())


def adams_methods() -> list[str]:
    """Names of the fixed-grid Adams methods: ``explicit_adams`` (Adams-Bashforth) and
    ``implicit_adams`` (Adams-Bashforth-Moulton), torchdiffeq's. Give them ``dt``."""
    return list(_C.adams_methods())


# The fixed-step implicit Runge-Kutta methods (csrc/solvers/implicit_fixed.cpp).
_IMPLICIT_FIXED = (
    "implicit_euler",
    "implicit_midpoint",
    "trapezoid",
    "sdirk2",
    "fixed_trbdf2",
    "radauIIA3",
    "radauIIA5",
    "gl4",
    "gl6",
)


def implicit_fixed_methods() -> list[str]:
    """Names of the fixed-step implicit Runge-Kutta methods, torchdiffeq's fixed-grid implicit
    solvers: ``implicit_euler``, ``implicit_midpoint``, ``trapezoid``, ``sdirk2``,
    ``fixed_trbdf2`` (torchdiffeq's ``trbdf2``), ``radauIIA3``, ``radauIIA5``, ``gl4``, ``gl6``.
    Give them ``dt``; their stages are solved by simplified Newton (see :func:`solve`)."""
    return list(_IMPLICIT_FIXED)


def _positive_int(name: str, value: Any, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


@functools.lru_cache(maxsize=64)
def _number_span(t0: float, t1: float) -> torch.Tensor:
    """(t0, t1) as a float64 tensor, kept for the next solve over the same span: the solves
    read it and never write into it or return it (sol.t is built from its values). Made
    outside inference mode, so that a span first used there serves recorded solves too."""
    with torch.inference_mode(False):
        return torch.tensor([t0, t1], dtype=torch.float64)


def _span_tensor(tspan: Sequence[Any]) -> torch.Tensor:
    """(t0, t1) as a float64 tensor, keeping the graph of entries that require grad."""
    t0, t1 = tspan
    if type(t0) in (int, float) and type(t1) in (int, float):  # the common case, kept
        return _number_span(float(t0), float(t1))
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in tspan):
        return torch.tensor([float(x) for x in tspan], dtype=torch.float64)
    parts = []
    for x in tspan:
        if isinstance(x, torch.Tensor):
            if x.numel() != 1:
                raise ValueError(f"tspan entries must be scalars, got shape {tuple(x.shape)}")
            if x.is_complex() or x.dtype == torch.bool:
                raise TypeError(f"tspan entries must be real numbers, got {x.dtype}")
            parts.append(x.reshape(()).to(torch.float64))
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            parts.append(torch.tensor(float(x), dtype=torch.float64))
        else:
            raise TypeError(f"tspan entries must be numbers or tensors, got {type(x).__name__}")
    return torch.stack(parts)


def _save_times(saveat: Any, span: torch.Tensor) -> Optional[torch.Tensor]:
    """saveat as a tensor of times: a number is a spacing (t0, t0 +- dt, ..., t1 included).

    With a spacing, the times are functions of the span: when tspan entries require grad, so
    do the save times built from them (the first is t0, the last t1, the others t0 + k dt).
    """
    if saveat is None:
        return None
    if isinstance(saveat, torch.Tensor):
        return saveat.reshape(-1) if saveat.dim() == 0 else saveat
    if isinstance(saveat, (int, float)) and not isinstance(saveat, bool):
        step = float(saveat)
        if not (step > 0 and math.isfinite(step)):
            raise ValueError(f"saveat as a spacing must be positive, got {saveat}")
        t0, t1 = (float(x) for x in span.detach())
        length = abs(t1 - t0)
        n = int(math.floor(length / step * (1 + 1e-12)))
        direction = 1.0 if t1 > t0 else -1.0
        offsets = [direction * k * step for k in range(n + 1)]
        ends_on_t1 = abs(t0 + offsets[-1] - t1) <= 1e-9 * max(1.0, length)
        if ends_on_t1:
            offsets.pop()
        times = span[0] + torch.tensor(offsets, dtype=torch.float64)
        return torch.cat([times, span[1:]])
    if isinstance(saveat, Sequence):
        return torch.as_tensor([float(x) for x in saveat], dtype=torch.float64)
    raise TypeError(f"saveat must be a spacing, a sequence of times or a tensor, got {saveat!r}")


def _autonomous(autonomous: Optional[bool], f: Any) -> bool:
    """The checked ``autonomous`` option: None becomes what is known about ``f``."""
    if autonomous is not None and not isinstance(autonomous, bool):
        raise TypeError(f"autonomous must be True, False or None, got {autonomous!r}")
    takes_time = None  # unknown
    if isinstance(f, MLPRhs):
        takes_time = bool(f.mlp.takes_time)
    elif isinstance(f, ScriptRhs):
        takes_time = f.takes_time
    if autonomous and takes_time:
        raise ValueError(
            f"autonomous=True, but f reads t: {f!r} takes the time as an input "
            "(time_input=True, or a TorchScript forward (t, x)); drop autonomous or the time input"
        )
    if autonomous is None:
        return takes_time is False
    return autonomous


def solve(
    prob: ODEProblem,
    solver: str = "tsit5",
    *,
    saveat: Union[None, float, Sequence[float], torch.Tensor] = None,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    dt: Optional[float] = None,
    adaptive: bool = True,
    dt_min: float = 0.0,
    dt_max: float = math.inf,
    max_num_steps: int = 100_000,
    controller: Union[str, _C.ControllerOptions] = "PI",
    norm: Optional[Callable[[torch.Tensor], Any]] = None,
    tstops: Sequence[float] = (),
    dense: bool = False,
    save_start: bool = True,
    check_finite: bool = True,
    throw_on_failure: bool = True,
    u0: Optional[torch.Tensor] = None,
    jac: Optional[Callable[[torch.Tensor, Any, float], torch.Tensor]] = None,
    jac_mode: str = "auto",
    autonomous: Optional[bool] = None,
    independent_batch: bool = False,
    vectorized: bool = False,
    max_order: Optional[int] = None,
    max_iters: Optional[int] = None,
    per_sample: bool = False,
    _adjoint: Optional[tuple[_C.AdjointOptions, list[torch.Tensor], list[torch.Tensor]]] = None,
) -> Solution:
    """Solve an :class:`ODEProblem`.

    Under grad mode the solve is recorded by autograd: backpropagating through its outputs
    differentiates the unrolled solver (reverse mode, as :func:`diffeq_rd`).

    Args:
        prob: the problem.
        solver: a method name (see :func:`methods`): fixed step ``euler``, ``midpoint``,
            ``heun2``, ``heun3``, ``ralston``, ``rk4``; adaptive ``adaptive_heun``,
            ``fehlberg2``, ``bosh3``, ``dopri5``, ``tsit5``, ``dopri8``; stiff (see
            :func:`stiff_methods`) Rosenbrock ``rosenbrock23``, ``rodas5``, ``rodas5p`` and
            ESDIRK ``kvaerno5``, ``kencarp4``, ``trbdf2`` (on a :class:`SplitODEProblem`,
            ``kencarp4`` is IMEX: ``f_stiff`` implicit, ``f_nonstiff`` explicit; every other
            method solves the sum), adaptive Radau IIA ``radau5``; fixed-grid Adams (see
            :func:`adams_methods`) ``explicit_adams``, ``implicit_adams``; fixed-step implicit
            Runge-Kutta (see :func:`implicit_fixed_methods`) ``implicit_euler``,
            ``implicit_midpoint``, ``trapezoid``, ``sdirk2``, ``fixed_trbdf2``, ``radauIIA3``,
            ``radauIIA5``, ``gl4``, ``gl6``.
        saveat: where to save: a spacing (``0.1`` saves at t0, t0 + 0.1, ..., t1), or times
            (a sequence or 1-D tensor, strictly monotone along the span, possibly requiring
            grad). None saves every step.
        rtol, atol: tolerances of the mixed error norm (adaptive methods).
        dt: the step size of fixed-step methods (or with ``adaptive=False``); the first step of
            adaptive ones (None: chosen automatically).
        adaptive: False steps an adaptive method with the fixed ``dt``.
        dt_min, dt_max: bounds on the step size; falling below dt_min is a failure.
        max_num_steps: the most steps (accepted + rejected) before failing.
        controller: ``"I"``, ``"PI"`` (default), ``"PID"`` or a :class:`ControllerOptions`.
        norm: maps the scaled error tensor to a number (default: RMS norm).
        tstops: times the steps must land on exactly.
        dense: keep every step so that ``sol(t)`` evaluates anywhere in the span.
        save_start: with ``saveat=None``, include t0.
        check_finite: fail when the state becomes NaN/Inf instead of carrying it on.
        throw_on_failure: False returns the partial solution with its ``retcode`` instead of
            raising :class:`SolverError`.
        u0: overrides ``prob.u0``.
        jac: stiff and fixed-step implicit methods only: the Jacobian df/du, called as
            ``jac(u, p, t)`` and returning an ``[n, n]`` tensor over the flattened state
            (``n = u.numel()``). None: built by autograd (the rows' reverse passes batched
            into one under vmap; one pass per row through a Python ``autograd.Function``). For
            kencarp4 on a :class:`SplitODEProblem`, the Jacobian of ``f_stiff`` alone.
        jac_mode: stiff methods, how autograd builds the Jacobian: ``"reverse"`` (the
            vector-Jacobian products of all rows in one batched pass), ``"forward"`` (one
            evaluation of f on dual tensors per column) or ``"auto"`` (default: reverse mode,
            which measured 10-16x faster than forward mode for n = 3 to 32 with f in Python;
            see ``csrc/solvers/jacobian.cpp``).
            Under grad mode (reverse mode through the solve) the Jacobian is always built in
            reverse mode.
        autonomous: declares that ``f`` does not depend on ``t``. The Rosenbrock methods
            (``rosenbrock23``, ``rodas5``, ``rodas5p``) then take df/dt = 0 instead of a central
            difference, which costs two evaluations of ``f`` per Jacobian; the other methods
            need no df/dt and ignore it. None (default): True where the library knows that
            ``f`` ignores ``t`` (a :class:`diffeqlayers.MLP` without ``time_input``, a
            TorchScript module whose forward takes ``(x)`` only; :func:`neural_ode` and
            :class:`NeuralODE` over a module without ``takes_time``), otherwise False.
            Declaring True for an ``f`` that reads ``t`` gives wrong results with the Rosenbrock
            methods.
        independent_batch: stiff methods: the leading dimension of the state holds independent
            systems (f of one sample never reads another's state). Jacobians are then
            per-sample blocks ``[B, n, n]`` with batched LU factorizations instead of one dense
            ``[B n, B n]`` matrix (``stats.jac_blocks`` is ``B``); a ``jac`` must then return
            the blocks ``[B, n, n]``. Declaring it for coupled samples drops the coupling from
            the Jacobian: wrong results for the Rosenbrock methods, slow Newton for the ESDIRK
            and Radau ones.
        vectorized: ``radau5`` and the fixed-step implicit Runge-Kutta methods (those with
            two or more implicit stages: ``radauIIA3``, ``radauIIA5``, ``gl4``, ``gl6``,
            ``sdirk2``): ``f`` also takes several states stacked along a new leading
            dimension, as ``f(u, p, t)`` with ``u`` of shape ``[m, *u0.shape]`` and ``t`` a
            tensor ``[m, 1, ..., 1]`` (one time per state, broadcasting against ``u``, in the
            state's dtype), returning ``[m, *u0.shape]`` (scipy's ``solve_ivp`` has an option of
            the same name). Each Newton update then evaluates radau5's three stages in one call
            instead of three (the fixed-step methods: all their implicit stages): for a small
            state, where a call of ``f`` costs about the same for one state or three, the
            iteration's cost of ``f`` drops up to 3x. An ``f`` written with ``u[..., i]`` and
            ``torch.stack(..., dim=-1)`` is vectorized; one written with ``u[i]`` is not. The
            first stack of distinct states is checked against ``f`` on each state (one more
            evaluation per state; ValueError when they differ beyond rounding). Autograd
            Jacobians then take one reverse pass through one call on ``n`` copies of the state
            (no vmap; ``n`` evaluations in ``nfe``). ``stats.nstacked`` counts the stacked
            calls (``nfe`` counts the states). Gradients
            are unchanged: every mode differentiates the same stages. A native ``f``
            (:class:`MLP`, a TorchScript module) must then ignore ``t``.
        max_order: Adams methods only: the highest order the step history may reach, 1 to 12
            (default 12, torchdiffeq's): the first two steps are 3/8-rule RK4, then
            Adams-Bashforth of order 3, 4, ... up to ``max_order - 1``; below 4, every step is
            RK4.
        max_iters: ``implicit_adams`` only: the most Adams-Moulton corrector iterations per
            step (default 4, torchdiffeq's). They stop when successive increments agree to
            ``rtol``/``atol``; steps that do not are counted in ``stats.nnonconverged`` and a
            :class:`RuntimeWarning` is issued (the solve goes on, as in torchdiffeq).
            Fixed-step implicit methods: the most simplified-Newton iterations per step
            (default 10; the Jacobian is taken once per step, at its start). They stop when the
            RMS norm of the Newton update scaled by ``atol + rtol |u|`` is below 0.01; steps
            that do not are counted and warned about in the same way.
        per_sample: per-sample step control for a batch (default False: one step size for the
            whole state, cheapest when the samples are alike). The leading dimension of the
            state is a batch of independent problems; each sample keeps its own time, step
            size, error norm (RMS over its own elements; a ``norm`` must map the scaled error
            ``[B, ...]`` to ``[B]``) and controller, and is accepted or rejected on its own
            (masked updates), so one hard sample does not slow the others: each takes the
            steps a solve of it alone would take. ``f(u, p, t)`` then receives ``t`` as a
            tensor of shape ``[B]`` (each sample's own time, in the state's dtype), not a
            float, and row ``b`` of its result must depend on row ``b`` of ``u`` only. Needs
            an explicit adaptive method (``adaptive_heun``, ``fehlberg2``, ``bosh3``,
            ``dopri5``, ``tsit5``, ``dopri8``) and ``saveat``; not with ``dense`` or
            ``adaptive=False``. Gradients: reverse mode through the unrolled loop (this
            function under grad mode, :func:`diffeq_rd`) and forward mode
            (:func:`diffeq_fd`, :func:`diffeq_jvp`); :func:`diffeq_adjoint` refuses it.
            ``max_num_steps`` bounds each sample's steps. ``sol.stats`` holds the calls of f
            (``nfe``, each on the whole batch) and the steps summed over the samples;
            ``sol.sample_stats`` each sample's ``naccept`` and ``nreject`` and the number of
            loop ``iterations``.
        _adjoint: private: the adjoint's options and the parameters it differentiates
            (:func:`diffeq_adjoint` adds the tensors in ``p``, which it has already listed).

    Returns:
        A :class:`Solution`: ``sol.t`` ``[n]``, ``sol.u`` ``[n, *u0.shape]``, ``sol.stats``.

    Raises:
        TypeError, ValueError: bad arguments, each naming what is wrong.
        SolverError: the solve failed (the message gives t, dt and the cause).
    """
    if not isinstance(prob, ODEProblem):
        raise TypeError(f"prob must be an ODEProblem, got {type(prob).__name__}")
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a method name (str), got {type(solver).__name__}")
    state, tspan = prob.resolve()
    if u0 is not None:
        state = u0
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"u0 must be a torch.Tensor, got {type(state).__name__}")
    span = _span_tensor(tspan)

    # Only the options that differ from SolveOptions' defaults (_DEFAULTS) are set.
    opts = _C.SolveOptions()
    opts.method = solver
    if rtol != _DEFAULTS.rtol:
        opts.rtol = float(rtol)
    if atol != _DEFAULTS.atol:
        opts.atol = float(atol)
    if dt is not None:
        opts.dt = float(dt)
        if not dt > 0:
            raise ValueError(f"dt must be positive (its sign follows tspan), got {dt}")
    if adaptive is not _DEFAULTS.adaptive:
        opts.adaptive = bool(adaptive)
    if dt_min != _DEFAULTS.dt_min:
        opts.dt_min = float(dt_min)
    if dt_max != _DEFAULTS.dt_max:
        opts.dt_max = float(dt_max)
    if max_num_steps != _DEFAULTS.max_num_steps:
        opts.max_num_steps = int(max_num_steps)
    if isinstance(controller, str):
        if controller not in _CONTROLLERS:
            raise ValueError(
                f"controller must be one of {sorted(_CONTROLLERS)}, got {controller!r}"
            )
        if controller != "PI":
            opts.controller = _CONTROLLERS[controller]()
    elif isinstance(controller, _C.ControllerOptions):
        opts.controller = controller
    else:
        raise TypeError(f"controller must be a name or ControllerOptions, got {controller!r}")
    times = _save_times(saveat, span)
    if times is not None:
        opts.saveat = times
    if not (isinstance(tstops, tuple) and not tstops):  # () is SolveOptions' default
        opts.tstops = [float(x) for x in tstops]
    if dense is not _DEFAULTS.dense:
        opts.dense = bool(dense)
    if save_start is not _DEFAULTS.save_start:
        opts.save_start = bool(save_start)
    if check_finite is not _DEFAULTS.check_finite:
        opts.check_finite = bool(check_finite)
    if throw_on_failure is not _DEFAULTS.throw_on_failure:
        opts.throw_on_failure = bool(throw_on_failure)
    # The tensors in p (checked for dtype and device against u0); diffeq_adjoint has them.
    p_given = _adjoint is not None and len(_adjoint) > 2
    opts.params = _adjoint[2] if p_given else parameter_tensors(prob.p)

    f, p = prob.f, prob.p

    def rhs(t: float, u: torch.Tensor) -> torch.Tensor:
        return f(u, p, t)

    # Dynamics evaluated in C++ (the built-in MLP, a TorchScript module): the solve then never
    # enters Python per step.
    native = f.native_dynamics() if isinstance(f, (MLPRhs, ScriptRhs)) else None

    jac_rhs = None
    if jac is not None:
        if not callable(jac):
            raise TypeError(f"jac must be callable as jac(u, p, t), got {type(jac).__name__}")
        if solver not in _C.stiff_methods() and solver not in _IMPLICIT_FIXED:
            raise ValueError(
                f"jac is used by the stiff methods only (and the fixed-step implicit ones), not "
                f"by {solver!r}"
            )
        if isinstance(prob, SplitODEProblem) and solver != "kencarp4":
            raise ValueError(
                "jac of a SplitODEProblem is the Jacobian of f_stiff, used by kencarp4 (IMEX) "
                f"only; {solver!r} solves f_stiff + f_nonstiff: drop jac or use kencarp4"
            )

        def jac_rhs(t: float, u: torch.Tensor) -> torch.Tensor:
            return jac(u, p, t)

    if not isinstance(jac_mode, str) or jac_mode not in ("auto", "forward", "reverse"):
        raise ValueError(f"jac_mode must be 'auto', 'forward' or 'reverse', got {jac_mode!r}")
    if jac_mode != "auto" and solver not in _C.stiff_methods():
        raise ValueError(f"jac_mode is an option of the stiff methods only, not of {solver!r}")
    if jac_mode != "auto":
        opts.jac_mode = jac_mode
    if _autonomous(autonomous, f):
        opts.autonomous = True
    if not isinstance(independent_batch, bool):
        raise TypeError(f"independent_batch must be a bool, got {type(independent_batch).__name__}")
    if independent_batch:
        if solver not in _C.stiff_methods():
            raise ValueError(
                f"independent_batch is an option of the stiff methods only, not of {solver!r}"
            )
        if state.dim() < 1 or state.shape[0] < 1:
            raise ValueError(
                "independent_batch needs a state with a leading batch dimension, got shape "
                f"{tuple(state.shape)}"
            )
    if independent_batch:
        opts.independent_batch = True

    if not isinstance(vectorized, bool):
        raise TypeError(f"vectorized must be a bool, got {type(vectorized).__name__}")
    if vectorized and solver != "radau5" and solver not in _IMPLICIT_FIXED:
        raise ValueError(
            "vectorized is used by radau5 and the fixed-step implicit Runge-Kutta methods only "
            f"(their stages evaluated in one call of f), not by {solver!r}"
        )

    adams = solver in _ADAMS
    implicit_fixed = solver in _IMPLICIT_FIXED
    if max_order is not None:
        if not adams:
            raise ValueError(f"max_order is an option of the Adams methods only, not of {solver!r}")
        opts.max_order = _positive_int("max_order", max_order, 1, 12)
    if max_iters is not None:
        if not (adams or implicit_fixed):
            raise ValueError(
                "max_iters is an option of the Adams and fixed-step implicit methods only, not "
                f"of {solver!r}"
            )
        opts.max_iters = _positive_int("max_iters", max_iters, 1)
    elif implicit_fixed:
        opts.max_iters = 10

    if per_sample:
        if _adjoint is not None:
            raise ValueError(
                "per_sample=True is not supported by diffeq_adjoint; use diffeq_rd (reverse "
                "mode through the unrolled per-sample loop) or diffeq_fd"
            )
        if saveat is None:
            raise ValueError(
                "per_sample=True needs saveat: the samples step at different times, so there "
                "are no common step times to save at"
            )
        if isinstance(prob, SplitODEProblem) and solver == "kencarp4":
            raise ValueError("per_sample=True supports the explicit adaptive methods, not kencarp4")

        def batch_rhs(t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            return f(u, p, t)

        raw, naccept, nreject, iterations = _C.solve_per_sample(batch_rhs, state, span, opts, norm)
        return Solution(raw, sample_stats=SampleStats(naccept, nreject, iterations))

    nonstiff_rhs = None
    if isinstance(prob, SplitODEProblem) and solver == "kencarp4":
        # IMEX: the implicit part is f_stiff alone, the explicit part goes along separately.
        f_stiff, f_nonstiff = prob.f_stiff, prob.f_nonstiff

        def rhs(t: float, u: torch.Tensor) -> torch.Tensor:
            return f_stiff(u, p, t)

        def nonstiff_rhs(t: float, u: torch.Tensor) -> torch.Tensor:
            return f_nonstiff(u, p, t)

    stacked_rhs = None
    if vectorized:
        # A native f takes the stack itself (the binding refuses one that reads t).
        if native is not None:
            stacked_rhs = native
        else:

            def stacked_rhs(t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
                return f(u, p, t)

    if _adjoint is not None:
        options, params = _adjoint[0], _adjoint[1]
        sol = Solution(
            _C.solve_adjoint(
                native or rhs,
                state,
                span,
                params,
                opts,
                options,
                norm,
                jac_rhs,
                nonstiff_rhs,
                stacked_rhs,
            )
        )
        _warn_time_blind(solver, sol)
        return sol
    sol = Solution(
        _C.solve(native or rhs, state, span, opts, norm, jac_rhs, nonstiff_rhs, stacked_rhs)
    )
    _warn_time_blind(solver, sol)
    if sol.stats.nnonconverged:
        warnings.warn(
            f"{solver}: the {'Newton' if implicit_fixed else 'corrector'} iteration did not "
            "converge within max_iters="
            f"{opts.max_iters} in {sol.stats.nnonconverged} of {sol.stats.naccept} steps; the "
            "solution may be inaccurate (take smaller steps or raise max_iters)",
            RuntimeWarning,
            stacklevel=2,
        )
    return sol


def _warn_time_blind(solver: str, sol: Solution) -> None:
    """Warns when rodas5 solved an f that depends on t explicitly (see Stats.ntime_blind)."""
    if sol.stats.ntime_blind:
        warnings.warn(
            f"{solver}: f depends on t explicitly (df/dt != 0 at {sol.stats.ntime_blind} of "
            f"{sol.stats.njac} Jacobians), and rodas5's error estimate does not see that "
            "dependence, so the steps are not controlled for it (u' = exp(-1000 t) ends 52% off "
            "at any rtol); use rodas5p",
            RuntimeWarning,
            stacklevel=3,
        )
