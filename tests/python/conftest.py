"""Shared problems with known solutions, method lists and per-method settings.

Every problem's dynamics has the package's signature f(u, p, t). Exact solutions are given as
functions of the time tensor (float64) so that tests compare against them directly.
"""

from __future__ import annotations

import pytest
import torch

import diffeqlayers as dl

METHODS = sorted(dl.methods())
FIXED = [m for m in METHODS if not dl.tableau(m).adaptive]
ADAPTIVE = [m for m in METHODS if dl.tableau(m).adaptive]

LV_PARAMS = [1.5, 1.0, 3.0, 1.0]


# ----------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------


def decay(u, p, t):
    """u' = -a u; p is the rate a (a tensor or a number)."""
    return -p * u


def decay_exact(u0, a, t, t0=0.0):
    """u(t) = u0 exp(-a (t - t0)), stacked along a leading time axis when t is 1-D."""
    t = torch.as_tensor(t, dtype=torch.float64)
    factor = torch.exp(-a * (t - t0))
    return factor.reshape(factor.shape + (1,) * u0.dim()) * u0.to(torch.float64)


def oscillator(u, p, t):
    """u'' = -u as the first-order system (x, y)' = (y, -x); the last dimension is (x, y)."""
    return torch.stack([u[..., 1], -u[..., 0]], dim=-1)


def oscillator_exact(u0, t, t0=0.0):
    """x(t) = x0 cos s + y0 sin s, y(t) = -x0 sin s + y0 cos s with s = t - t0.

    u0 may carry batch dimensions in front of the last (x, y) one; t is a number or 1-D tensor
    (then the result is stacked along a leading time axis).
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    s = (t - t0).reshape(t.shape + (1,) * (u0.dim() - 1))
    u0 = u0.to(torch.float64)
    x0, y0 = u0[..., 0], u0[..., 1]
    c, sn = torch.cos(s), torch.sin(s)
    return torch.stack([x0 * c + y0 * sn, -x0 * sn + y0 * c], dim=-1)


def lotka_volterra(u, p, t):
    """x' = a x - b x y, y' = -c y + d x y with p = (a, b, c, d)."""
    x, y = u[..., 0], u[..., 1]
    return torch.stack([p[0] * x - p[1] * x * y, -p[2] * y + p[3] * x * y], dim=-1)


def lv_numpy(t, u, p=LV_PARAMS):
    """The same right-hand side for scipy (f(t, u) on numpy arrays)."""
    a, b, c, d = p
    x, y = u
    return [a * x - b * x * y, -c * y + d * x * y]


# ----------------------------------------------------------------------------------------------
# Per-method settings with an error bound that follows from theory
# ----------------------------------------------------------------------------------------------

# Global-error factor K of each adaptive method: on the smooth, non-stiff test problems here the
# error at any saved time should be at most K * rtol (with |u| <= ~1 and atol << rtol).
#
# * Methods that propagate the higher-order solution (local extrapolation: bosh3, dopri5, tsit5,
#   dopri8) have a true local error far below the estimated one, and adaptive_heun (Heun with an
#   embedded Euler estimate) keeps its error per unit step near the tolerance; over spans of a
#   few time units K = 10 leaves a margin of several times over the expected ~1 * rtol.
# * fehlberg2 (Fehlberg's RKF1(2)) estimates its error with b_err = (-1/512, 0, 1/512), i.e.
#   err ~ h^2 |u''| / 512. The controller therefore takes h^2 ~ 512 * tol, and the order-2
#   solution it propagates has a local error ~ C3 h^3 |u'''| with C3 <= 1/6, so the global error
#   over a span T is ~ T * C3 * 512 * tol, about 170 * tol for T = 2. K = 200 is that bound, not a
#   fit (torchdiffeq's fehlberg2, the same tableau, shows the same behaviour).
GLOBAL_ERROR_FACTOR = {m: 10.0 for m in ADAPTIVE}
GLOBAL_ERROR_FACTOR["fehlberg2"] = 200.0

# Tolerances used for accuracy tests: tight for high-order methods, looser for order 2/3 ones so
# that the number of steps (and so the test time) stays small.
ACCURACY_RTOL = {
    torch.float64: {
        "adaptive_heun": 1e-5,
        "fehlberg2": 1e-6,
        "bosh3": 1e-7,
        "dopri5": 1e-9,
        "tsit5": 1e-9,
        "dopri8": 1e-9,
    },
    # float32 carries ~7 digits: tolerances below ~1e-6 only add steps and rounding.
    torch.float32: {m: 1e-5 for m in ADAPTIVE},
}

# Fixed step used for accuracy tests of fixed-step methods.
FIXED_DT = 0.02


def accuracy_kwargs(method: str, dtype: torch.dtype) -> dict:
    """solve() keyword arguments for an accuracy test of `method` in `dtype`."""
    if dl.tableau(method).adaptive:
        rtol = ACCURACY_RTOL[dtype][method]
        # atol two orders below rtol: the relative part governs while |u| ~ 1.
        return {"rtol": rtol, "atol": rtol * 1e-2}
    return {"dt": FIXED_DT}


def error_bound(method: str, dtype: torch.dtype, span_length: float, nsteps: int) -> float:
    """A bound on the max-norm error of a solve made with accuracy_kwargs on a problem whose
    solution and derivatives are bounded by 1 (the oscillator, decay with a <= 1).

    Fixed step of order p: the global error of a consistent order-p RK method on such a problem is
    <= C * T * h^p with a local error constant C well below 1 for every tableau here, so T * h^p
    is a bound (interpolation between steps, O(h^4), is far below it for h = 0.02).
    Adaptive: GLOBAL_ERROR_FACTOR * rtol (see above).
    float32 adds the rounding of each step: at most a few ulps (eps = 1.2e-7) of |u| <= 1 per step,
    accumulated linearly (4 * eps per step is a conservative count).
    """
    tab = dl.tableau(method)
    if tab.adaptive:
        bound = GLOBAL_ERROR_FACTOR[method] * ACCURACY_RTOL[dtype][method]
    else:
        bound = span_length * FIXED_DT**tab.order
    if dtype == torch.float32:
        bound += 4 * torch.finfo(torch.float32).eps * (nsteps + 1)
    return bound


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def osc_u0():
    return torch.tensor([1.0, 0.0], dtype=torch.float64)


@pytest.fixture
def lv_params():
    return torch.tensor(LV_PARAMS, dtype=torch.float64)


@pytest.fixture(autouse=True)
def _restore_default_dtype():
    """Tests must not leak a changed default dtype into each other."""
    before = torch.get_default_dtype()
    yield
    torch.set_default_dtype(before)


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().to(torch.float64) - b.detach().to(torch.float64)).abs().max())
