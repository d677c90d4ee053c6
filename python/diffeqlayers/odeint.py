"""A drop-in for torchdiffeq's ``odeint``, ``odeint_adjoint`` and ``odeint_event``.

The signatures, defaults, option names and return conventions are those of torchdiffeq 0.2.5::

    from diffeqlayers.odeint import odeint      # instead of: from torchdiffeq import odeint
    ys = odeint(func, y0, t, rtol=1e-7, atol=1e-9, method="dopri5")   # [len(t), *y0.shape]

The solve itself is diffeqlayers' C++ loop (:func:`diffeqlayers.solve`); ``odeint``'s gradients
are reverse mode through the solver (autograd records every step, as
:func:`diffeqlayers.diffeq_rd`), ``odeint_adjoint``'s come from an adjoint solved backwards (as
:func:`diffeqlayers.diffeq_adjoint`).

What differs from torchdiffeq (details in the docstrings of :func:`odeint` and
:func:`odeint_adjoint`):

* ``tsit5`` and ``ralston`` are available in addition (``tsit5`` is in torchdiffeq's master,
  not in 0.2.5).
* ``explicit_adams``, ``implicit_adams`` (alias ``fixed_adams``) follow torchdiffeq's algorithm
  step for step (3/8-rule RK4 start-up, Adams-Bashforth of growing order up to
  ``max_order - 1``, Adams-Moulton corrector by at most ``max_iters`` functional iterations) and
  agree with it to rounding; their steps run in C++. They are not available in
  ``odeint_adjoint`` (:class:`NotImplementedError`; ``odeint`` differentiates through them).
* The fixed-grid implicit methods of torchdiffeq's master (``implicit_euler``, ...,
  ``trbdf2``) solve their stages by simplified Newton with an autograd Jacobian instead of
  Broyden's method, in C++; not in ``odeint_adjoint`` either. (torchdiffeq's ``gl4`` tableau
  has a wrong node c_2; this one is Hairer & Wanner's.)
* ``scipy_solver`` calls ``scipy.integrate.solve_ivp`` as torchdiffeq does (``solver``,
  default ``"LSODA"``); options other than ``solver`` are passed on to ``solve_ivp`` instead of
  only ``min_step``/``max_step``, a failed solve raises :class:`diffeqlayers.SolverError`, and a
  warning says that the (detached) result has no gradients when the inputs require grad.
* ``rk4`` is the classic RK4 tableau; torchdiffeq's ``rk4`` is Kutta's 3/8 rule. Both are order
  4, so the results agree to the methods' accuracy, not to rounding.
* The step-size controller, initial-step heuristic and dense interpolants are diffeqlayers'
  own: adaptive results agree with torchdiffeq's to the tolerance, not to rounding.
* Per-element (tensor) ``rtol``/``atol`` are not supported; scalars are.
* Unknown options raise :class:`ValueError` (torchdiffeq only warns and ignores them), and so
  do ``perturb=True`` and ``min_step > 0``, which diffeqlayers cannot honour.
* ``max_num_steps`` counts every step of the whole solve (torchdiffeq: per output interval).
* ``odeint_adjoint`` runs torchdiffeq's algorithm (backsolve) by default and also offers the
  interpolating and discrete adjoints (``sensealg=``); of ``adjoint_options`` only
  ``norm="seminorm"`` changes the backward solve, which otherwise follows the forward's options.
  With ``event_fn`` it differentiates through the solver instead.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional, Union

import torch
from torch import nn

from . import _C
from .adjoint import adjoint_options as adjoint_options_for
from .adjoint import checked_adjoint_params
from .problem import ODEProblem
from .script import ScriptRhs, is_script_module
from .solution import Solution
from .solve import solve

State = Union[torch.Tensor, tuple[torch.Tensor, ...]]
Func = Callable[[torch.Tensor, State], State]
EventFn = Callable[[torch.Tensor, State], torch.Tensor]

# Methods shared with torchdiffeq (plus diffeqlayers' tsit5 and ralston), by kind.
_ADAPTIVE = ("dopri8", "dopri5", "tsit5", "bosh3", "fehlberg2", "adaptive_heun")
_FIXED = ("euler", "midpoint", "heun2", "heun3", "ralston", "rk4")
# The fixed-grid Adams methods ("fixed_adams" is torchdiffeq's old name of implicit_adams).
_ADAMS = ("explicit_adams", "implicit_adams", "fixed_adams")
# The fixed-grid implicit Runge-Kutta methods (torchdiffeq's master, after 0.2.5); odeint's
# "trbdf2" is solve()'s "fixed_trbdf2" (solve()'s "trbdf2" is an adaptive ESDIRK method).
_IMPLICIT = (
    "implicit_euler",
    "implicit_midpoint",
    "trapezoid",
    "radauIIA3",
    "radauIIA5",
    "gl4",
    "gl6",
    "sdirk2",
    "trbdf2",
)
_ALIASES = {"fixed_adams": "implicit_adams", "trbdf2": "fixed_trbdf2"}
# scipy.integrate.solve_ivp behind torchdiffeq's interface (no gradients).
_SCIPY = "scipy_solver"
_METHODS = _ADAPTIVE + _FIXED + _ADAMS + _IMPLICIT + (_SCIPY,)

# torchdiffeq's options for each kind of method ("norm" is accepted by both; the fixed-grid
# solvers ignore it there too). "dtype" is accepted by both (see odeint's docstring).
_ADAPTIVE_OPTIONS = frozenset(
    {
        "norm",
        "first_step",
        "step_t",
        "jump_t",
        "safety",
        "ifactor",
        "dfactor",
        "max_num_steps",
        "min_step",
        "max_step",
        "dtype",
    }
)
_FIXED_OPTIONS = frozenset({"norm", "step_size", "grid_constructor", "interp", "perturb", "dtype"})
_ADAMS_OPTIONS = _FIXED_OPTIONS | {"max_iters", "max_order"}
_IMPLICIT_OPTIONS = _FIXED_OPTIONS | {"max_iters"}
# scipy_solver: torchdiffeq ignores these (and so does diffeqlayers); every other option
# goes to scipy.integrate.solve_ivp (min_step, max_step, first_step, ...).
_SCIPY_IGNORED = frozenset({"norm", "grid_points", "eps", "dtype"})

# torchdiffeq's default max_num_steps (it counts per output interval; this is effectively "no
# limit" either way).
_MAX_NUM_STEPS = 2**31 - 1


# ----------------------------------------------------------------------------------------------
# Input normalisation
# ----------------------------------------------------------------------------------------------


class _Flat:
    """Flattens a tensor or tuple-of-tensors state into one 1-D tensor and back."""

    def __init__(self, y0: State) -> None:
        if isinstance(y0, torch.Tensor):
            self.shapes: Optional[list[torch.Size]] = None
            self.y0 = y0
            return
        if not isinstance(y0, tuple):
            raise TypeError(
                f"y0 must be a torch.Tensor or a tuple of them, got {type(y0).__name__}"
            )
        if len(y0) == 0 or not all(isinstance(y, torch.Tensor) for y in y0):
            raise TypeError("a tuple y0 must hold one or more torch.Tensors")
        dtypes = {y.dtype for y in y0}
        devices = {y.device for y in y0}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(
                "the tensors of a tuple y0 must share dtype and device, got "
                f"{sorted(map(str, dtypes))} on {sorted(map(str, devices))}"
            )
        self.shapes = [y.shape for y in y0]
        self.y0 = torch.cat([y.reshape(-1) for y in y0])

    def unflatten(self, flat: torch.Tensor, lead: tuple[int, ...] = ()) -> State:
        """``flat`` ``[*lead, n]`` as the user's state (a tuple of ``[*lead, *shape_i]``)."""
        if self.shapes is None:
            return flat
        parts = []
        start = 0
        for shape in self.shapes:
            stop = start + shape.numel()
            parts.append(flat[..., start:stop].reshape((*lead, *shape)))
            start = stop
        return tuple(parts)

    def flatten(self, value: State, what: str) -> torch.Tensor:
        """The user's ``value`` (shaped like the state) as one flat tensor."""
        if self.shapes is None:
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{what} must return a torch.Tensor, got {type(value).__name__}")
            return value
        if not isinstance(value, (tuple, list)) or len(value) != len(self.shapes):
            raise TypeError(
                f"{what} must return a tuple of {len(self.shapes)} tensors (one per state "
                f"tensor), got {type(value).__name__}"
            )
        return torch.cat([v.reshape(-1) for v in value])


def _scalar_tol(name: str, tol: Any, flat: _Flat) -> float:
    """rtol/atol as one float; per-element or differing tuple tolerances are not supported."""
    if isinstance(tol, tuple) and flat.shapes is not None:
        values = {_scalar_tol(name, x, _Flat(flat.y0)) for x in tol}
        if len(tol) != len(flat.shapes):
            raise ValueError(f"a tuple {name} must have one entry per tensor of y0")
        if len(values) != 1:
            raise ValueError(
                f"{name} differs between the tensors of y0 ({sorted(values)}): diffeqlayers "
                "supports one scalar tolerance"
            )
        return values.pop()
    if isinstance(tol, torch.Tensor):
        if tol.requires_grad:
            raise ValueError(f"{name} cannot require gradient")
        if tol.numel() != 1:
            raise ValueError(
                f"{name} must be a scalar: per-element tolerances (shape {tuple(tol.shape)}) are "
                "not supported by diffeqlayers"
            )
        return float(tol)
    if isinstance(tol, (int, float)) and not isinstance(tol, bool):
        return float(tol)
    raise TypeError(f"{name} must be a number or a scalar tensor, got {type(tol).__name__}")


def _check_t(t: Any) -> torch.Tensor:
    """Validates t (1-D, floating, strictly monotone) as torchdiffeq does, with clear errors."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
    if not torch.is_floating_point(t):
        raise TypeError(f"t must be a floating point tensor, got {t.dtype}")
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"t must be a non-empty 1-D tensor, got shape {tuple(t.shape)}")
    if t.numel() > 1:
        d = t.detach()[1:] > t.detach()[:-1]
        e = t.detach()[1:] < t.detach()[:-1]
        if not (bool(d.all()) or bool(e.all())):
            raise ValueError("t must be strictly increasing or strictly decreasing")
    return t


def _check_method(method: Optional[str]) -> str:
    if method is None:
        return "dopri5"
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {type(method).__name__}")
    if method not in _METHODS:
        raise ValueError(f"invalid method {method!r}; must be one of {', '.join(_METHODS)}")
    return method


def _check_options(method: str, options: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"options must be a dict, got {type(options).__name__}")
    options = dict(options)
    if method == _SCIPY:
        solver = options.get("solver", "LSODA")
        if not isinstance(solver, (str, type)):
            raise TypeError(
                "option solver must be the name of a scipy.integrate.solve_ivp method (e.g. "
                f"'LSODA', 'RK45', 'BDF') or an OdeSolver class, got {type(solver).__name__}"
            )
        return options
    if method in _ADAPTIVE:
        allowed = _ADAPTIVE_OPTIONS
    elif method in _ADAMS:
        allowed = _ADAMS_OPTIONS
    elif method in _IMPLICIT:
        allowed = _IMPLICIT_OPTIONS
    else:
        allowed = _FIXED_OPTIONS
    unknown = sorted(set(options) - allowed)
    if unknown:
        kind = "adaptive" if method in _ADAPTIVE else "fixed-grid"
        raise ValueError(
            f"unknown option(s) {unknown} for the {kind} method {method!r}; valid options: "
            f"{sorted(allowed)}"
        )
    dtype = options.get("dtype", torch.float64)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"option dtype must be torch.float32 or torch.float64, got {dtype!r}")
    if options.get("perturb", False):
        raise ValueError(
            "option perturb=True is not supported: diffeqlayers evaluates f exactly at the step "
            "ends (use jump_t with an adaptive method to step onto discontinuities)"
        )
    if options.get("min_step", 0) not in (0, 0.0):
        raise ValueError(
            "option min_step > 0 is not supported: torchdiffeq accepts any step of size min_step "
            "whatever its error, whereas diffeqlayers never accepts a step that fails the "
            "tolerance; leave min_step unset"
        )
    interp = options.get("interp", "linear")
    if interp not in ("linear", "cubic"):
        raise ValueError(f"option interp must be 'linear' or 'cubic', got {interp!r}")
    if options.get("step_size") is not None and options.get("grid_constructor") is not None:
        raise ValueError("step_size and grid_constructor are mutually exclusive options")
    norm = options.get("norm")
    if norm is not None and not callable(norm):
        raise TypeError(f"option norm must be callable, got {type(norm).__name__}")
    for name, low, high in (("max_order", 1, 12), ("max_iters", 1, None)):
        if name not in options:
            continue
        value = options[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"option {name} must be an integer, got {type(value).__name__}")
        if value < low or (high is not None and value > high):
            bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise ValueError(f"option {name} must be {bounds}, got {value}")
    if options.get("max_order", 12) < 4:
        warnings.warn(
            f"max_order={options['max_order']} is below 4, so {method} reduces to RK4 (the "
            "3/8 rule)",
            stacklevel=4,
        )
    return options


def _positive(name: str, value: Any) -> float:
    x = float(value)
    if not (x > 0 and math.isfinite(x)):
        raise ValueError(f"option {name} must be a positive finite number, got {value!r}")
    return x


def _times(name: str, value: Any) -> list[float]:
    """step_t / jump_t as a list of floats."""
    if isinstance(value, torch.Tensor):
        return [float(x) for x in value.detach().reshape(-1)]
    try:
        return [float(x) for x in value]
    except TypeError:
        raise TypeError(f"option {name} must be a tensor or sequence of times") from None


# ----------------------------------------------------------------------------------------------
# The solve
# ----------------------------------------------------------------------------------------------


class _Setup:
    """Everything odeint needs, normalised once: the flat state, the wrapped func, the options."""

    def __init__(
        self,
        func: Func,
        y0: State,
        rtol: Any,
        atol: Any,
        method: Optional[str],
        options: Optional[Mapping[str, Any]],
    ) -> None:
        if not callable(func):
            raise TypeError(f"func must be callable as func(t, y), got {type(func).__name__}")
        self.flat = _Flat(y0)
        checked = _check_method(method)
        self.options = _check_options(checked, options)
        # The name solve() knows (fixed_adams is implicit_adams).
        self.method = _ALIASES.get(checked, checked)
        self.adaptive = self.method in _ADAPTIVE
        self.rtol = _scalar_tol("rtol", rtol, self.flat)
        self.atol = _scalar_tol("atol", atol, self.flat)
        y = self.flat.y0
        self.user_func = func
        flat = self.flat

        def f(u: torch.Tensor, p: Any, t: float) -> torch.Tensor:
            # torchdiffeq hands func the time as a 0-dim tensor of the state's dtype.
            tt = torch.tensor(t, dtype=u.dtype, device=u.device)
            return flat.flatten(func(tt, flat.unflatten(u)), "func")

        if is_script_module(func) and flat.shapes is None:
            # A TorchScript func(t, y) on a tensor state: the solves run it in C++, without
            # Python per step (t passed the same way, as a 0-dim tensor unless declared float).
            script_rhs = ScriptRhs(func)
            if not script_rhs.takes_time:
                raise TypeError(
                    "odeint calls func(t, y), but the TorchScript module's forward takes one "
                    f"argument: {func.forward.schema}"
                )
            f = script_rhs
        self.f = f
        self.norm = self._norm()
        self.y0 = y

    def _norm(self) -> Optional[Callable[[torch.Tensor], Any]]:
        """The error norm. Both libraries apply it to error / (atol + rtol * max(|y0|, |y1|))
        and accept a step when it is <= 1, so a torchdiffeq norm means the same here. For tuple
        states torchdiffeq's norm takes the tuple, and its default is the max over the tensors
        of their RMS norms: both are reproduced on the flat error."""
        norm = self.options.get("norm")
        flat = self.flat
        if flat.shapes is None:
            return norm
        if norm is None:

            def mixed(scaled: torch.Tensor) -> torch.Tensor:
                parts = flat.unflatten(scaled)
                return torch.stack([p.pow(2).mean().sqrt() for p in parts]).max()

            return mixed

        def tupled(scaled: torch.Tensor) -> Any:
            return norm(flat.unflatten(scaled))

        return tupled

    def solve_kwargs(self, t: torch.Tensor) -> dict[str, Any]:
        """Keyword arguments of :func:`diffeqlayers.solve` from torchdiffeq's options."""
        o = self.options
        kw: dict[str, Any] = {"rtol": self.rtol, "atol": self.atol, "norm": self.norm}
        if self.adaptive:
            controller = _C.ControllerOptions.I()  # torchdiffeq's controller
            controller.safety = float(o.get("safety", 0.9))
            controller.factor_max = float(o.get("ifactor", 10.0))
            controller.factor_min = float(o.get("dfactor", 0.2))
            kw["controller"] = controller
            if o.get("first_step") is not None:
                kw["dt"] = _positive("first_step", o["first_step"])
            if o.get("max_step") is not None:
                kw["dt_max"] = float(o["max_step"])
            kw["max_num_steps"] = int(o.get("max_num_steps", _MAX_NUM_STEPS))
            stops: list[float] = []
            for name in ("step_t", "jump_t"):
                if o.get(name) is not None:
                    stops += _times(name, o[name])
            if len(set(stops)) != len(stops):
                raise ValueError("step_t and jump_t must not repeat any time between them")
            kw["tstops"] = stops
        elif self.method in _ADAMS or self.method in _IMPLICIT or self.method == "fixed_trbdf2":
            for name in ("max_order", "max_iters"):
                if name in o:
                    kw[name] = o[name]
        return kw


def _fixed_grid(setup: _Setup, t: torch.Tensor) -> tuple[Optional[float], list[float], bool]:
    """(dt, tstops, grid_is_t) reproducing torchdiffeq's time grid for fixed-grid methods.

    With ``step_size`` torchdiffeq's grid is ``t[0] + k * step_size`` with the last point moved
    to ``t[-1]``; the fixed steps here are placed the same way (``t0 + k * dt``, the last one cut
    to ``t1``). Without it the grid is ``t`` itself, or what ``grid_constructor(func, y0, t)``
    returns: its points become tstops, with dt the largest spacing, so that every step goes
    exactly from one grid point to the next.
    """
    o = setup.options
    if o.get("step_size") is not None:
        return _positive("step_size", o["step_size"]), [], False
    td = t.detach()
    constructor = o.get("grid_constructor")
    if constructor is None:
        grid, grid_is_t = td, True
    else:
        if not callable(constructor):
            raise TypeError("option grid_constructor must be callable as (func, y0, t) -> grid")

        def flat_func(tt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return setup.f(y, None, float(tt))

        grid = torch.as_tensor(constructor(flat_func, setup.y0, td)).detach()
        grid = grid.to(torch.float64).reshape(-1)
        if grid.numel() < 2 or grid[0] != td[0].double() or grid[-1] != td[-1].double():
            raise ValueError(
                "grid_constructor must return a grid starting at t[0], ending at t[-1]"
            )
        steps = grid[1:] - grid[:-1]
        if not (bool((steps > 0).all()) or bool((steps < 0).all())):
            raise ValueError("the grid from grid_constructor must be strictly monotone")
        grid_is_t = grid.numel() == td.numel() and bool((grid == td.double()).all())
    grid = grid.to(torch.float64)
    dt = float((grid[1:] - grid[:-1]).abs().max())
    return dt, [float(x) for x in grid[1:-1]], grid_is_t


def _linear_at(sol: Solution, t: torch.Tensor) -> torch.Tensor:
    """torchdiffeq's default ``interp="linear"`` for fixed grids: the solution at each ``t``
    interpolated linearly between the step ends around it (exactly a step end's state on one)."""
    grid = sol.t.to(torch.float64)
    direction = 1.0 if float(grid[-1]) >= float(grid[0]) else -1.0
    key = grid * direction
    rows = []
    for tj in t:
        x = float(tj.detach()) * direction
        i = int(torch.searchsorted(key, torch.tensor([x], dtype=torch.float64), right=False))
        if i < len(key) and float(key[i]) == x:
            rows.append(sol.u[i])
            continue
        i = min(max(i, 1), len(key) - 1)
        g0, g1 = grid[i - 1], grid[i]
        w = ((tj.to(torch.float64) - g0) / (g1 - g0)).to(sol.u.dtype)
        rows.append(sol.u[i - 1] + w * (sol.u[i] - sol.u[i - 1]))
    return torch.stack(rows)


def _solve_at(
    setup: _Setup,
    t: torch.Tensor,
    adjoint: Optional[tuple[_C.AdjointOptions, list[torch.Tensor]]] = None,
) -> torch.Tensor:
    """The flat solution at every time of t, ``[len(t), n]``; differentiated by the given
    adjoint (options, parameters) instead of reverse mode when one is given."""
    t64 = t.to(torch.float64)  # keeps t's graph: gradients with respect to t flow through saveat
    span = (t64[0], t64[-1])
    prob = ODEProblem(setup.f, setup.y0, span)
    kw = setup.solve_kwargs(t)
    kw["_adjoint"] = adjoint
    if setup.adaptive:
        return solve(prob, setup.method, saveat=t64, **kw).u
    dt, tstops, grid_is_t = _fixed_grid(setup, t)
    nsteps = len(tstops) + 2 + int(abs(float(t64[-1].detach() - t64[0].detach())) / dt)
    kw.update(dt=dt, tstops=tstops, max_num_steps=max(100_000, 2 * nsteps + 10))
    if grid_is_t or setup.options.get("interp", "linear") == "cubic":
        # Between step ends the core interpolates fixed-step methods with the cubic Hermite
        # through (y0, f0) and (y1, f1): torchdiffeq's interp="cubic".
        return solve(prob, setup.method, saveat=t64, **kw).u
    sol = solve(prob, setup.method, saveat=None, **kw)
    return _linear_at(sol, t)


def odeint(
    func: Func,
    y0: State,
    t: torch.Tensor,
    *,
    rtol: Any = 1e-7,
    atol: Any = 1e-9,
    method: Optional[str] = None,
    options: Optional[Mapping[str, Any]] = None,
    event_fn: Optional[EventFn] = None,
) -> Any:
    """Integrate ``dy/dt = func(t, y)``, ``y(t[0]) = y0``: torchdiffeq's ``odeint``.

    Args:
        func: the dynamics, called as ``func(t, y)`` with ``t`` a 0-dim tensor of ``y``'s dtype
            and ``y`` shaped like ``y0`` (a tuple when ``y0`` is one); returns dy/dt likewise.
            Its parameters (an ``nn.Module``'s, or tensors it closes over) get gradients.
        y0: the initial state: a float32/float64 tensor of any shape, or a tuple of them.
        t: 1-D tensor of times, strictly increasing or decreasing; ``t[0]`` is the initial time.
            It may require grad (gradients with respect to every time, ``t[0]`` included).
        rtol, atol: scalar tolerances (numbers or one-element tensors).
        method: ``dopri5`` (default), ``dopri8``, ``bosh3``, ``fehlberg2``, ``adaptive_heun``,
            ``tsit5`` (adaptive); ``euler``, ``midpoint``, ``heun2``, ``heun3``, ``rk4``,
            ``ralston``, ``explicit_adams``, ``implicit_adams`` (= ``fixed_adams``) (fixed
            grid); ``implicit_euler``, ``implicit_midpoint``, ``trapezoid``, ``sdirk2``,
            ``trbdf2``, ``radauIIA3``, ``radauIIA5``, ``gl4``, ``gl6`` (fixed grid, implicit:
            torchdiffeq's master has them, 0.2.5 not); ``scipy_solver``
            (``scipy.integrate.solve_ivp``, no gradients).
        options: torchdiffeq's options for the method:

            * adaptive: ``first_step`` (the first step), ``max_step``, ``safety``,
              ``ifactor``, ``dfactor`` (torchdiffeq's integral controller, used here too),
              ``max_num_steps`` (counted over the whole solve here, per output interval in
              torchdiffeq), ``norm``, ``step_t``, ``jump_t``, ``dtype``; ``min_step`` only as 0.
            * fixed grid: ``step_size``, ``grid_constructor``, ``interp``, ``norm`` (ignored, as
              in torchdiffeq), ``dtype``; ``perturb`` only as False.
            * Adams methods: the fixed-grid options and ``max_order`` (1 to 12, default 12:
              the order of the Adams-Bashforth steps grows by one per step from 3 to
              ``max_order - 1`` after two RK4 steps; below 4 every step is RK4, with a
              warning, as in torchdiffeq) and ``max_iters`` (``implicit_adams``: corrector
              iterations per step, default 4; the iteration stops when successive increments
              ``dy`` agree, ``max |dy_old - dy| / (atol + rtol max(|dy_old|, |dy|)) < 1``, so
              ``rtol``/``atol`` matter here too; a step that does not converge keeps its last
              iterate, drops the oldest history entry and raises a :class:`RuntimeWarning`,
              as torchdiffeq does). Steps of unequal length (a grid from ``t`` or
              ``grid_constructor``) use the constant-step Adams coefficients, as in torchdiffeq.
              With ``event_fn`` the solve runs in stretches of doubling length and the Adams
              history restarts (two RK4 steps) at each; torchdiffeq keeps it.
            * fixed-grid implicit methods: the fixed-grid options and ``max_iters`` (default
              10): their stage equations are solved by simplified Newton with the Jacobian
              df/du at the step's start (autograd), stopping when the RMS norm of the update
              scaled by ``atol + rtol |y|`` is below 0.01 (torchdiffeq uses Broyden's method
              from an identity Jacobian with an absolute residual tolerance, default 100
              iterations): results agree to the iteration tolerance. A step that does not
              converge goes on with a :class:`RuntimeWarning`, as in torchdiffeq.
            * ``scipy_solver``: ``solver`` (a ``solve_ivp`` method name or ``OdeSolver``
              class, default ``"LSODA"``); ``norm``, ``grid_points``, ``eps`` and ``dtype``
              are ignored (as in torchdiffeq) and everything else (``min_step``,
              ``max_step``, ``first_step``, ...) goes to ``solve_ivp``. ``func`` runs under
              ``torch.no_grad()`` on CPU NumPy copies of the state; no events.

            ``norm`` maps the scaled error ``err / (atol + rtol * max(|y0|, |y1|))`` to a
            scalar and a step is accepted when it is <= 1, as in torchdiffeq (for tuple states
            it receives the tuple; the default is then the max of the tensors' RMS norms).

            ``step_t`` and ``jump_t`` become stops that steps land on exactly. For ``step_t``
            this is torchdiffeq's behaviour. For ``jump_t`` torchdiffeq evaluates the stage at
            the end of the step onto a jump just before it (left limit) and re-evaluates f just
            after it (right limit) to start the next step. Here a jump time is only a stop: f is
            evaluated once there, at ``t + 1 * h`` (the stop up to one rounding, so possibly an
            ulp before it), and first-same-as-last methods reuse that value as the first stage
            of the next step. The two therefore agree whenever f is continuous at the jump.
            At a true discontinuity the steps still never straddle it (so the order of the
            method is kept on both sides), but the first stage after it may see the value
            before the jump: an O(h * jump size) error in that one step, which the error
            estimate does not see. For fixed-grid methods ``jump_t`` is not an option, as in
            torchdiffeq.

            ``grid_constructor(func, y0, t)`` (torchdiffeq's arguments, with the flat state
            when ``y0`` is a tuple) gives the grid; its points become stops with the largest
            spacing as step, so the steps are exactly the grid's intervals.

            ``interp`` (fixed grid, as torchdiffeq): ``"linear"`` (default) interpolates
            linearly between the step ends around an output time, ``"cubic"`` uses the cubic
            Hermite through the states and derivatives at both ends (same formula).

            ``dtype`` is torchdiffeq's dtype for times; here times are always float64
            internally (so float32 and float64 are accepted and mean the same).
        event_fn: ``event_fn(t, y)`` returns a tensor; the solve stops where it first
            crosses zero (any element, torchdiffeq's convention). ``t`` must then have two
            entries: ``t[0]`` is the initial time, ``t[1]`` only the direction (and the first
            stretch solved). Returns ``(event_t, solution)``, see below.

    Returns:
        Without ``event_fn``: the solution at every ``t``, ``[len(t), *y0.shape]`` (a tuple of
        ``[len(t), *y0[i].shape]`` for tuple states; ``y0[None]`` when ``len(t) == 1``).
        With it: ``(event_t, solution)``, ``event_t`` a 0-dim tensor of ``t``'s dtype and
        ``solution`` ``[2, *y0.shape]`` holding ``y0`` and the state at ``event_t``. The event
        time is located by bisection on the dense interpolant to near machine precision
        (torchdiffeq stops at ``atol``). As in torchdiffeq, ``event_t`` carries no gradient
        and the state at it is differentiable at fixed ``event_t``; use :func:`odeint_event`
        for gradients through the event time.

    Raises:
        TypeError, ValueError: bad arguments or options, naming what is wrong.
        NotImplementedError: events with ``scipy_solver``.
        ImportError: ``scipy_solver`` without scipy installed.
        diffeqlayers.SolverError: the solve failed.
    """
    t = _check_t(t)
    setup = _Setup(func, y0, rtol, atol, method, options)
    if setup.method == _SCIPY:
        if event_fn is not None:
            raise NotImplementedError(
                "scipy_solver does not handle events (event_fn), as in torchdiffeq; use an "
                "adaptive method such as dopri5"
            )
        return setup.flat.unflatten(_scipy_solve(setup, t), (len(t),))
    if event_fn is not None:
        if len(t) != 2:
            raise ValueError(f"event handling requires len(t) == 2, got len(t) = {len(t)}")
        event_t, flat_sol = _integrate_until_event(setup, t, event_fn)
        return event_t, setup.flat.unflatten(flat_sol, (2,))
    if len(t) == 1:
        flat_sol = setup.y0[None]
    else:
        flat_sol = _solve_at(setup, t)
    return setup.flat.unflatten(flat_sol, (len(t),))


# ----------------------------------------------------------------------------------------------
# scipy_solver
# ----------------------------------------------------------------------------------------------


def _scipy_solve(setup: _Setup, t: torch.Tensor) -> torch.Tensor:
    """torchdiffeq's ``scipy_solver``: ``scipy.integrate.solve_ivp`` on the flat state, saved at
    ``t``. No gradients: ``func`` runs under ``torch.no_grad()`` and the result is detached (a
    :class:`UserWarning` says so when the inputs require grad)."""
    try:
        from scipy.integrate import solve_ivp
    except ImportError as e:
        raise ImportError(
            "method 'scipy_solver' needs scipy (pip install scipy); the other methods do not"
        ) from e
    y0 = setup.y0
    if torch.is_grad_enabled() and (y0.requires_grad or t.requires_grad):
        warnings.warn(
            "scipy_solver gives no gradients (as in torchdiffeq): its result is detached from "
            "y0, t and func's parameters; use another method to differentiate the solve",
            stacklevel=3,
        )
    if len(t) == 1:
        return y0.detach()[None].clone()
    kwargs = {k: v for k, v in setup.options.items() if k not in _SCIPY_IGNORED}
    solver = kwargs.pop("solver", "LSODA")
    times = t.detach().to(torch.float64).cpu().numpy()
    dtype, device, shape = y0.dtype, y0.device, y0.shape

    def rhs(tt: float, y: Any) -> Any:
        with torch.no_grad():
            u = torch.tensor(y, dtype=dtype, device=device).reshape(shape)
            return setup.f(u, None, float(tt)).detach().reshape(-1).cpu().numpy()

    sol = solve_ivp(
        rhs,
        t_span=(float(times[0]), float(times[-1])),
        y0=y0.detach().reshape(-1).cpu().numpy(),
        t_eval=times,
        method=solver,
        rtol=setup.rtol,
        atol=setup.atol,
        **kwargs,
    )
    if not sol.success or sol.y.shape[1] != len(times):
        reached = float(sol.t[-1]) if len(sol.t) else float(times[0])
        raise _C.SolverError(
            f"scipy_solver ({solver}) failed at t={reached:.10g} (solving from "
            f"t={float(times[0]):.10g} to {float(times[-1]):.10g}): {sol.message}"
        )
    return torch.as_tensor(sol.y.T).to(device=device, dtype=dtype).reshape((len(times), *shape))


# ----------------------------------------------------------------------------------------------
# Events
# ----------------------------------------------------------------------------------------------


def _event_value(setup: _Setup, event_fn: EventFn, t: float, u: torch.Tensor) -> torch.Tensor:
    tt = torch.tensor(t, dtype=u.dtype, device=u.device)
    value = event_fn(tt, setup.flat.unflatten(u))
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"event_fn must return a tensor, got {type(value).__name__}")
    return value


def _integrate_until_event(
    setup: _Setup, t: torch.Tensor, event_fn: EventFn
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solves in stretches of growing length with dense output until event_fn changes sign,
    then bisects on the dense interpolant. Returns (event_t, flat [y0, y(event_t)])."""
    t0, t_dir = (float(x) for x in t.detach())
    direction = 1.0 if t_dir > t0 else -1.0
    length = abs(t_dir - t0)
    kw = setup.solve_kwargs(t)
    max_steps = kw.pop("max_num_steps", _MAX_NUM_STEPS)
    if not setup.adaptive:
        step = setup.options.get("step_size")
        if step is None:
            raise ValueError("event handling with a fixed-grid method requires option step_size")
        kw["dt"] = _positive("step_size", step)
        # Stretches of whole steps, so the grid stays t0 + k * step_size.
        length = math.ceil(length / kw["dt"]) * kw["dt"]
    y0 = setup.y0

    with torch.no_grad():
        # torchdiffeq's convention for several events: make each positive at t0 and watch
        # their minimum, so the first element to cross zero ends the solve.
        signs = torch.sign(_event_value(setup, event_fn, t0, y0))

        def g(tt: float, u: torch.Tensor) -> float:
            return float((_event_value(setup, event_fn, tt, u) * signs).min())

        g0 = g(t0, y0)
    if g0 == 0:
        return t[0].detach().clone(), torch.stack([y0, y0])

    # The first stretch starts at t[0] itself so that the states carry its gradient.
    tc: Union[float, torch.Tensor] = t[0].to(torch.float64)
    uc, steps_used = y0, 0
    while True:
        t1 = float(tc.detach() if isinstance(tc, torch.Tensor) else tc) + direction * length
        prob = ODEProblem(setup.f, uc, (tc, t1))
        sol = solve(
            prob, setup.method, saveat=None, dense=True, max_num_steps=max_steps - steps_used, **kw
        )
        steps_used += sol.stats.naccept + sol.stats.nreject
        times = [float(x) for x in sol.t]
        with torch.no_grad():
            values = [g(tt, u) for tt, u in zip(times, sol.u)]
        hit = next((i for i, v in enumerate(values) if i > 0 and v <= 0), None)
        if hit is not None:
            break
        tc, uc = times[-1], sol.u[-1]
        if setup.adaptive and len(times) > 1:
            kw["dt"] = abs(times[-1] - times[-2])  # resume with the last step size
        length *= 2

    lo, hi = times[hit - 1], times[hit]
    if values[hit] == 0:
        event = hi
    else:
        with torch.no_grad():
            # Bisection keeps the bracket [lo, hi] with g(lo) > 0 >= g(hi) down to a few ulps.
            for _ in range(200):
                mid = 0.5 * (lo + hi)
                if mid in (lo, hi) or abs(hi - lo) <= 4 * math.ulp(max(abs(lo), abs(hi))):
                    break
                if g(mid, sol(mid)) > 0:
                    lo = mid
                else:
                    hi = mid
        event = hi
    y_event = sol.u[hit] if event == times[hit] else sol(event)
    event_t = torch.tensor(event, dtype=t.dtype, device=t.device)
    return event_t, torch.stack([y0, y_event])


class _EventGradient(torch.autograd.Function):
    """Passes (event_t, state) through unchanged and, in backward, adds the implicit-function
    gradient of the event time: with g(t*, y(t*)) = 0, dt*/dy = -(dg/dy) / (dg/dt + dg/dy . f),
    and a gradient on t* also reaches y(t*) through dy(t*)/dt* = f."""

    @staticmethod
    def forward(
        ctx: Any,
        func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        event: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        event_t: torch.Tensor,
        state: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.func, ctx.event = func, event
        ctx.save_for_backward(event_t, state)
        return event_t.detach().clone(), state.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad_t: torch.Tensor, grad_state: torch.Tensor) -> Any:
        event_t, state = ctx.saved_tensors
        with torch.enable_grad():
            tt = event_t.detach().clone().requires_grad_(True)
            yy = state.detach().clone().requires_grad_(True)
            value = ctx.event(tt, yy)
            dg_dt, dg_dy = torch.autograd.grad(value, (tt, yy), allow_unused=True)
        dg_dt = torch.zeros_like(tt) if dg_dt is None else dg_dt
        dg_dy = torch.zeros_like(yy) if dg_dy is None else dg_dy
        with torch.no_grad():
            f = ctx.func(event_t.detach(), state.detach())
            total_dt = dg_dt + (dg_dy * f).sum()
            # d loss / d t*, counting the state's dependence on the time it is taken at.
            g_t = grad_t + (grad_state * f).sum()
            g_state = grad_state + dg_dy * (-g_t / total_dt)
        return None, None, None, g_state.to(state.dtype)


def odeint_event(
    func: Func,
    y0: State,
    t0: torch.Tensor,
    *,
    event_fn: EventFn,
    reverse_time: bool = False,
    odeint_interface: Callable[..., Any] = odeint,
    **kwargs: Any,
) -> tuple[torch.Tensor, State]:
    """Solve from ``t0`` until ``event_fn(t, y)`` crosses zero, with gradients through the
    event time: torchdiffeq's ``odeint_event``.

    Args:
        func, y0: as for :func:`odeint`.
        t0: the initial time, a tensor (0-dim or one element).
        event_fn: ``event_fn(t, y) -> tensor``; the solve stops at its first zero crossing.
        reverse_time: integrate towards decreasing time.
        odeint_interface: :func:`odeint` or :func:`odeint_adjoint`.
        **kwargs: passed to ``odeint_interface`` (``rtol``, ``atol``, ``method``, ...).

    Returns:
        ``(event_t, solution)``: ``solution`` ``[2, *y0.shape]`` (``y0`` and the state at the
        event). Backward gives the gradients of both with respect to ``y0``, ``t0`` and
        ``func``'s parameters, the event time's dependence on them included (implicit function
        theorem on ``event_fn(t*, y(t*)) = 0``).
    """
    if not isinstance(t0, torch.Tensor):
        raise TypeError(f"t0 must be a torch.Tensor, got {type(t0).__name__}")
    step = -1.0 if reverse_time else 1.0
    t = torch.cat([t0.reshape(-1), t0.reshape(-1).detach() + step])
    event_t, solution = odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)

    flat = _Flat(y0)

    def flat_func(tt: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return flat.flatten(func(tt.to(u.dtype), flat.unflatten(u)), "func")

    with torch.no_grad():
        signs = torch.sign(event_fn(t[0].to(flat.y0.dtype), y0))

    def flat_event(tt: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        # The combined event (min over elements made positive at t0), as located.
        return (event_fn(tt, flat.unflatten(u)) * signs).min()

    if flat.shapes is None:
        state = solution[-1]
    else:
        state = torch.cat([s[-1].reshape(-1) for s in solution])
    event_t, state = _EventGradient.apply(flat_func, flat_event, event_t, state)
    if flat.shapes is None:
        return event_t, torch.cat([solution[:-1], state[None]])
    parts = flat.unflatten(state)
    return event_t, tuple(torch.cat([s[:-1], p[None]]) for s, p in zip(solution, parts))


# ----------------------------------------------------------------------------------------------
# Adjoint interface
# ----------------------------------------------------------------------------------------------


def odeint_adjoint(
    func: Func,
    y0: State,
    t: torch.Tensor,
    *,
    rtol: Any = 1e-7,
    atol: Any = 1e-9,
    method: Optional[str] = None,
    options: Optional[Mapping[str, Any]] = None,
    event_fn: Optional[EventFn] = None,
    adjoint_rtol: Any = None,
    adjoint_atol: Any = None,
    adjoint_method: Optional[str] = None,
    adjoint_options: Optional[Mapping[str, Any]] = None,
    adjoint_params: Optional[Iterable[torch.Tensor]] = None,
    sensealg: str = "backsolve",
) -> Any:
    """torchdiffeq's ``odeint_adjoint``: :func:`odeint` whose gradients come from an adjoint.

    By default the same algorithm as torchdiffeq (``sensealg="backsolve"``): the augmented
    state ``[y, a, ∂L/∂θ]`` is solved backwards from the end, ``y`` reset to the forward value
    at every time of ``t``. ``sensealg`` (an extension of torchdiffeq's signature) selects
    ``"interpolating"`` (checkpoints and dense output of the forward solve instead of solving
    ``y`` backwards: accurate on chaotic and unstable problems) or ``"discrete"`` (the exact
    gradient of the forward discretisation, one stored state per step); see
    :func:`diffeqlayers.diffeq_adjoint`. As in torchdiffeq, gradients reach ``y0``, ``t`` and
    ``adjoint_params`` only, not other tensors ``func`` captures.

    Args:
        func, y0, t, rtol, atol, method, options: as for :func:`odeint`, except that the
            Adams methods and ``scipy_solver`` are refused (:class:`NotImplementedError`): the
            adjoints here replay Runge-Kutta steps (use :func:`odeint` for the Adams methods).
        event_fn: as for :func:`odeint`; with an event the solve is differentiated in reverse
            mode (through the solver), not by an adjoint.
        adjoint_rtol, adjoint_atol: tolerances of the adjoint solve (default: rtol, atol).
        adjoint_method: its method (default: method).
        adjoint_options: its options, checked as torchdiffeq checks them; ``norm="seminorm"``
            switches on the seminorm (error control ignores the parameter channels). Other
            options of the backward solve follow the forward's (controller, step bounds, the
            step size of fixed-grid methods).
        adjoint_params: the parameters to differentiate; required unless ``func`` is an
            ``nn.Module`` (``()`` when there are none). Default: ``func``'s parameters that
            require grad.
        sensealg: ``"backsolve"`` (default), ``"interpolating"`` or ``"discrete"``.
    """
    if adjoint_params is None and not isinstance(func, nn.Module):
        raise ValueError(
            "func must be an nn.Module to find the adjoint parameters; otherwise pass them as "
            "adjoint_params (adjoint_params=() when there are none)"
        )
    if adjoint_params is not None:
        params = checked_adjoint_params(adjoint_params)
    else:
        params = [p for p in func.parameters() if p.requires_grad]
    if adjoint_method is None:
        adjoint_method = method
    if adjoint_method != method and options is not None and adjoint_options is None:
        raise ValueError(
            "adjoint_method differs from method and options were given: pass adjoint_options "
            "too (they cannot be inferred from options)"
        )
    checked = _check_method(adjoint_method)
    for name in {_check_method(method), checked}:
        if name in _ADAMS or name in _IMPLICIT or name == _SCIPY:
            raise NotImplementedError(
                f"odeint_adjoint does not support {name!r} yet: the adjoints of diffeqlayers "
                "run Runge-Kutta methods"
                + (
                    "; scipy_solver gives no gradients at all"
                    if name == _SCIPY
                    else "; odeint with it differentiates through the solver (reverse mode)"
                )
            )
    seminorm = False
    if adjoint_options is not None:
        norm = adjoint_options.get("norm")
        seminorm = isinstance(norm, str) and norm == "seminorm"
        rest = {k: v for k, v in adjoint_options.items() if not (k == "norm" and seminorm)}
        _check_options(checked, rest)
    tols = {}
    for name, tol in (("adjoint_rtol", adjoint_rtol), ("adjoint_atol", adjoint_atol)):
        if tol is not None:
            tols[name] = _scalar_tol(name, tol, _Flat(y0))
    if event_fn is not None:
        return odeint(
            func, y0, t, rtol=rtol, atol=atol, method=method, options=options, event_fn=event_fn
        )
    t = _check_t(t)
    setup = _Setup(func, y0, rtol, atol, method, options)
    if len(t) == 1:
        return setup.flat.unflatten(setup.y0[None], (1,))
    adjoint = adjoint_options_for(
        sensealg,
        adjoint_rtol=tols.get("adjoint_rtol"),
        adjoint_atol=tols.get("adjoint_atol"),
        adjoint_method=None if checked == setup.method else checked,
        seminorm=seminorm,
    )
    flat_sol = _solve_at(setup, t, (adjoint, params))
    return setup.flat.unflatten(flat_sol, (len(t),))


__all__ = ["odeint", "odeint_adjoint", "odeint_event"]
