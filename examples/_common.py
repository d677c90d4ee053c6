"""Helpers shared by the example scripts (not an example itself).

The scripts import this module as ``_common``: running ``python examples/NAME.py`` puts the
``examples`` folder first on ``sys.path``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional

import torch

import diffeqlayers as dl

#: Where the examples write their plots unless told otherwise (``--out``).
DEFAULT_OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")

#: The seed document's Lotka-Volterra parameters (a, b, c, d).
LV_PARAMS = (1.5, 1.0, 3.0, 1.0)


def lotka_volterra(u: torch.Tensor, p: Any, t: float) -> torch.Tensor:
    """x' = a x - b x y, y' = -c y + d x y with p = (a, b, c, d); the last dimension is (x, y)."""
    x, y = u[..., 0], u[..., 1]
    return torch.stack([p[0] * x - p[1] * x * y, -p[2] * y + p[3] * x * y], dim=-1)


def lv_reference(
    u0: Sequence[float],
    saveat: Any,
    t_end: float = 10.0,
    p: Sequence[float] = LV_PARAMS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """An accurate Lotka-Volterra solution (dopri5, tolerances 1e-10, float64) on ``saveat``.

    Returns ``(t, u)`` as float32 tensors, ``u`` of shape ``[n_times, 2]``: the "data" of the
    neural ODE examples.
    """
    prob = dl.ODEProblem(
        lotka_volterra,
        torch.tensor(list(u0), dtype=torch.float64),
        (0.0, t_end),
        torch.tensor(list(p), dtype=torch.float64),
    )
    if isinstance(saveat, torch.Tensor):
        saveat = saveat.to(torch.float64)
    sol = dl.solve(prob, "dopri5", saveat=saveat, rtol=1e-10, atol=1e-10)
    return sol.t.float(), sol.u.float()


def growing_window(it: int, iters: int, windows: Sequence[float], fraction: float = 0.6) -> float:
    """The time window to fit at iteration ``it`` (1-based) of ``iters``.

    The usual curriculum for oscillators: fit the first window, then extend it; the windows
    grow evenly over the first ``fraction`` of the iterations, and the last one (the whole span)
    is kept for the rest.
    """
    per_window = max(1, int(fraction * iters) // max(1, len(windows) - 1))
    return windows[min((it - 1) // per_window, len(windows) - 1)]


def should_report(it: int, iters: int, every: int) -> bool:
    """Whether to print progress at iteration ``it`` (1-based): the first, every ``every``-th,
    and the last."""
    return it == 1 or it == iters or (every > 0 and it % every == 0)


def pyplot() -> Optional[Any]:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or None (with a note) when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots written")
        return None
    return plt


def save_figure(fig: Any, out_dir: str, name: str) -> str:
    """Writes ``fig`` to ``out_dir/name`` (creating the folder), closes it, prints and returns
    the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    print(f"wrote {path}")
    return path
