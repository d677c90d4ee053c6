"""The result of a solve: saved times and states, statistics, return code, dense evaluation."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch

from . import _C


@dataclasses.dataclass(frozen=True)
class SampleStats:
    """What each sample of a ``per_sample=True`` solve did.

    Attributes:
        naccept: accepted steps of each sample, an int64 tensor of shape ``[B]``.
        nreject: rejected steps of each sample, ``[B]``.
        iterations: iterations of the batched loop; each evaluates every stage of the method
            on the whole batch, so it is the number of steps of the slowest sample (accepted
            plus rejected), and ``nfe`` is about ``iterations`` times the stages per step.
    """

    naccept: torch.Tensor
    nreject: torch.Tensor
    iterations: int


class Solution:
    """The solution of an ODE problem.

    Attributes:
        t: the saved times, a float64 tensor of shape ``[n]``.
        u: the saved states, shape ``[n, *u0.shape]`` (time first, as in torchdiffeq).
        stats: ``nfe`` (evaluations of f), ``naccept`` and ``nreject`` (steps); ``host_loop``:
            the solve ran on plain host arrays (the built-in MLP on a small CPU state, recording
            no gradient: inference and the adjoints' forward solves), not tensor ops.
        retcode: a :class:`diffeqlayers.ReturnCode`; ``Success`` unless the solve was asked not
            to raise on failure (``throw_on_failure=False``).
        message: why the solve failed, with ``t`` and ``dt``; empty on success.
        adjoint_stats: for a solve differentiated by an adjoint (:func:`diffeq_adjoint`), what
            its backward did (``nfe``, ``nvjp``, ``nvjp_native`` (products made by the
            dynamics' own vector-Jacobian product, the built-in MLP's, without autograd),
            ``naccept``, ``nreject``, ``replayed_steps``, ``checkpoints``, ``host_loop``:
            backward ran on host arrays, the discrete adjoint's reversed steps or the
            interpolating adjoint's right-hand side), filled in once backward has run
            (``done``); otherwise None.
        sample_stats: for a ``per_sample=True`` solve, each sample's steps
            (:class:`SampleStats`); otherwise None.

    ``sol(t)`` evaluates the solution anywhere in the span when it was solved with
    ``dense=True`` (differentiably, under grad mode).

    Indexing is time first, like ``sol.u``: ``sol[j]`` is the state at the j-th saved time and
    ``sol[:, i]`` is component i over time, so for Lotka-Volterra ``x(t)`` is ``sol[:, 0]``
    (DifferentialEquations.jl's ``sol[1, :]``, with the axes in PyTorch's order).
    """

    def __init__(self, raw: _C.Solution, sample_stats: Optional[SampleStats] = None) -> None:
        self._raw = raw
        self.t: torch.Tensor = raw.t
        self.u: torch.Tensor = raw.u
        self.stats = raw.stats
        self.sample_stats = sample_stats

    # Read from the C++ solution when asked for (each read is a call into the extension).
    @property
    def retcode(self) -> _C.ReturnCode:
        return self._raw.retcode

    @property
    def message(self) -> str:
        return self._raw.message

    @property
    def adjoint_stats(self) -> Optional[_C.AdjointStats]:
        return self._raw.adjoint_stats

    @property
    def success(self) -> bool:
        return self.retcode == _C.ReturnCode.Success

    def __call__(self, t: Union[float, torch.Tensor]) -> torch.Tensor:
        """The solution at time ``t`` (a number, or a 1-D tensor of times: then stacked)."""
        if not self._raw.has_dense:
            raise ValueError(
                "this solution kept no dense output: solve with dense=True to evaluate it "
                "between the saved times"
            )
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return torch.stack([self._raw.evaluate(float(x)) for x in t.detach().reshape(-1)])
        return self._raw.evaluate(float(t))

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.u[index]

    def plot(self, ax: Any = None, labels: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """Plot every state component against time with matplotlib; returns the Axes.

        Batched states are flattened: each of the ``u0.numel()`` components gets a line.
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "Solution.plot needs matplotlib: pip install matplotlib "
                "(or the extra: pip install 'diffeqlayers[plot]')"
            ) from err
        if ax is None:
            _, ax = plt.subplots()
        t = self.t.detach().cpu().numpy()
        u = self.u.detach().cpu().reshape(len(self), -1).numpy()
        for i in range(u.shape[1]):
            label = labels[i] if labels is not None and i < len(labels) else f"u[{i}]"
            ax.plot(t, u[:, i], label=label, **kwargs)
        ax.set_xlabel("t")
        ax.legend()
        return ax

    def __len__(self) -> int:
        return int(self.t.numel())

    def __repr__(self) -> str:
        shape: Any = tuple(self.u.shape) if self.u is not None else None
        return (
            f"Solution(retcode={self.retcode.name}, n={len(self)}, u.shape={shape}, "
            f"stats={self.stats})"
        )
