"""diffeqlayers: differential-equation solvers as differentiable layers for PyTorch.

The solver loop is C++ on ``torch::Tensor`` (``diffeqlayers._C``); this package is the Python
face of it::

    import diffeqlayers as dl
    prob = dl.ODEProblem(f, u0, (0.0, 10.0), p)        # f(u, p, t)
    sol = dl.solve(prob, "tsit5", saveat=0.1)           # sol.t, sol.u, sol.stats
    loss = dl.diffeq_rd(p, lambda s: s.u.sum(), prob, "tsit5", saveat=0.1)
    loss = dl.diffeq_adjoint(p, lambda s: s.u.sum(), prob, "tsit5", saveat=0.1)  # same, adjoint
"""

import torch  # noqa: F401  (loads libtorch before the extension that links it)

from ._C import AdjointStats, ControllerOptions, ReturnCode, SolverError, Tableau, tableau
from .adjoint import adjoint_sensealgs, diffeq_adjoint
from .forward import diffeq_fd, diffeq_jvp
from .layers import NeuralODE, neural_ode
from .mlp import MLP, mlp_activations
from .odeint import odeint, odeint_adjoint, odeint_event
from .problem import ODEProblem, SplitODEProblem, remake
from .sensitivity import diffeq_rd
from .solution import SampleStats, Solution
from .solve import adams_methods, implicit_fixed_methods, methods, solve, stiff_methods

__all__ = [
    "AdjointStats",
    "MLP",
    "ControllerOptions",
    "NeuralODE",
    "ODEProblem",
    "ReturnCode",
    "SampleStats",
    "Solution",
    "SolverError",
    "SplitODEProblem",
    "Tableau",
    "adams_methods",
    "adjoint_sensealgs",
    "diffeq_adjoint",
    "diffeq_fd",
    "diffeq_jvp",
    "diffeq_rd",
    "implicit_fixed_methods",
    "methods",
    "mlp_activations",
    "neural_ode",
    "odeint",
    "odeint_adjoint",
    "odeint_event",
    "remake",
    "solve",
    "stiff_methods",
    "tableau",
]
__version__ = "0.1.0"
