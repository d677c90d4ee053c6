"""radau5 with a vectorized f (``vectorized=True``): its three stages in one call of f.

The stacked call must give radau5 the same numbers as three calls (for an f of elementwise
operations, bitwise: the same steps, the same solution), count its states in nfe and its calls in
nstacked, carry every gradient mode, and refuse an f that is not vectorized with a message that
says how to write one.
"""

from __future__ import annotations

import math

import pytest
import torch

import diffeqlayers as dl

K1, K2, K3 = 0.04, 3e7, 1e4
ROBER_REF = torch.tensor(
    [0.2083340149701255e-07, 0.8333360770334713e-13, 0.9999999791665050], dtype=torch.float64
)


def rober_v(u, p, t):
    """ROBER, vectorized: the components as u[..., i], the result stacked on the last dim."""
    y1, y2, y3 = u[..., 0], u[..., 1], u[..., 2]
    return torch.stack(
        [-K1 * y1 + K3 * y2 * y3, K1 * y1 - K3 * y2 * y3 - K2 * y2**2, K2 * y2**2], dim=-1
    )


def rober_rows(u, p, t):
    """ROBER written with u[i]: right for one state, wrong for a stack (it mixes the rows)."""
    y1, y2, y3 = u[0], u[1], u[2]
    return torch.stack([-K1 * y1 + K3 * y2 * y3, K1 * y1 - K3 * y2 * y3 - K2 * y2**2, K2 * y2**2])


def forced(u, p, t):
    """A stiff pair that reads t and p; t is a float or a [m, 1] tensor (vectorized)."""
    t = torch.as_tensor(t, dtype=u.dtype)
    x, y = u[..., 0], u[..., 1]
    tt = t[..., 0] if t.dim() else t
    return torch.stack([-p[0] * x + p[1] * x * y, -p[2] * (y - torch.cos(x)) + torch.sin(tt)], -1)


def rober_problem(f=rober_v):
    return dl.ODEProblem(f, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), (0.0, 1e11))


def test_rober_takes_the_same_steps_and_counts_the_calls():
    kw = dict(rtol=1e-7, atol=1e-10, saveat=[1e-2, 1e2, 1e6, 1e11])
    plain = dl.solve(rober_problem(), "radau5", **kw)
    stacked = dl.solve(rober_problem(), "radau5", vectorized=True, **kw)
    # Elementwise operations round the same on one state or three: the same iteration exactly.
    assert torch.equal(stacked.u, plain.u)
    a, b = stacked.stats, plain.stats
    assert (a.naccept, a.nreject, a.njac, a.nlu) == (b.naccept, b.nreject, b.njac, b.nlu)
    # Three states per stacked call, plus the one-time check of a stack against f on each state;
    # each Jacobian is one reverse pass through f on 3 copies of the state (3 evaluations, not 1).
    assert a.nstacked > a.njac > 0 and b.nstacked == 0
    assert a.nfe == b.nfe + 3 + 2 * a.njac
    calls = a.nfe - 2 * a.nstacked
    assert calls < 0.5 * b.nfe, (calls, b.nfe)
    # The Jacobians through the stacked f equal the usual ones: the same steps, Jacobians, LUs.
    assert (a.naccept, a.njac) == (b.naccept, b.njac)
    end = stacked.u[-1]
    rel = ((end - ROBER_REF).abs() / ROBER_REF)[[0, 2]].max()
    assert rel < 1e-6 and abs(end.sum().item() - 1.0) < 1e-8
    assert "nstacked=" in repr(a)


def test_an_f_that_reads_t_gets_one_time_per_state():
    p = torch.tensor([2.0, 0.5, 50.0], dtype=torch.float64)
    prob = dl.ODEProblem(forced, torch.tensor([1.0, 0.3], dtype=torch.float64), (0.0, 2.0), p)
    seen = []

    def spy(u, p, t):
        if isinstance(t, torch.Tensor):
            seen.append((tuple(t.shape), t.dtype, tuple(u.shape)))
        return forced(u, p, t)

    kw = dict(rtol=1e-8, atol=1e-10, saveat=[0.5, 1.0, 2.0])
    plain = dl.solve(prob, "radau5", **kw)
    stacked = dl.solve(dl.remake(prob, f=spy), "radau5", vectorized=True, **kw)
    # The stages (3 states) and the Jacobians (2 copies of the state, n = 2).
    assert set(seen) == {((3, 1), torch.float64, (3, 2)), ((2, 1), torch.float64, (2, 2))}
    # sin of a [3] tensor and of a float may differ in the last place: same solution to rounding.
    assert torch.allclose(stacked.u, plain.u, rtol=1e-12, atol=1e-14)


def test_an_f_that_mixes_the_rows_is_refused():
    with pytest.raises(ValueError, match=r"vectorized=True, but f on a stack of 3 states differs"):
        dl.solve(rober_problem(rober_rows), "radau5", vectorized=True)
    with pytest.raises(ValueError, match=r"u\[\.\.\., i\] rather than u\[i\]"):
        dl.solve(rober_problem(rober_rows), "radau5", vectorized=True)


def test_a_wrong_shape_or_type_or_option_is_refused():
    def flat(u, p, t):
        return rober_v(u, p, t).reshape(-1)

    with pytest.raises(ValueError, match=r"vectorized f returned shape \[9\] for a stack of 3"):
        dl.solve(rober_problem(flat), "radau5", vectorized=True)

    def not_a_tensor(u, p, t):
        return rober_v(u, p, t) if u.dim() == 1 else u.tolist()

    with pytest.raises(TypeError, match="vectorized f must return a torch.Tensor"):
        dl.solve(rober_problem(not_a_tensor), "radau5", vectorized=True)
    with pytest.raises(
        ValueError, match="vectorized is used by radau5 and the fixed-step implicit"
    ):
        dl.solve(rober_problem(), "kvaerno5", vectorized=True)
    with pytest.raises(TypeError, match="vectorized must be a bool"):
        dl.solve(rober_problem(), "radau5", vectorized=1)

    def raises(u, p, t):
        if u.dim() == 2:
            raise KeyError("from the stack")
        return rober_v(u, p, t)

    with pytest.raises(KeyError, match="from the stack") as info:
        dl.solve(rober_problem(raises), "radau5", vectorized=True)
    assert any("stack of states" in n for n in getattr(info.value, "__notes__", []))


@pytest.mark.parametrize("mode", ["rd", "fd", "interpolating", "discrete"])
def test_gradients_equal_those_without_it(mode):
    # The stacked call serves the Newton iteration, which runs on detached values; the gradients
    # come from the corrections at the converged stages, the same with or without it.
    p0 = torch.tensor([2.0, 0.5, 50.0], dtype=torch.float64)
    u00 = torch.tensor([1.0, 0.3], dtype=torch.float64)
    prob = dl.ODEProblem(forced, u00, (0.0, 0.5), p0)
    kw = dict(saveat=[0.1, 0.3, 0.5], rtol=1e-7, atol=1e-9)
    grads = []
    for vectorized in (False, True):
        p = p0.clone().requires_grad_(True)
        u0 = u00.clone().requires_grad_(True)

        def loss(s):
            return s.u.pow(2).sum()

        if mode == "rd":
            out = dl.diffeq_rd(p, loss, prob, "radau5", u0=u0, vectorized=vectorized, **kw)
        elif mode == "fd":
            out = dl.diffeq_fd(p, loss, prob, "radau5", u0=u0, vectorized=vectorized, **kw)
        else:
            out = dl.diffeq_adjoint(
                p, loss, prob, "radau5", u0=u0, sensealg=mode, vectorized=vectorized, **kw
            )
        grads.append(torch.cat(torch.autograd.grad(out, (u0, p))))
    assert torch.isfinite(grads[0]).all()
    assert torch.allclose(grads[1], grads[0], rtol=1e-10, atol=0), grads


def test_native_dynamics_take_the_stack():
    class Rober(torch.nn.Module):
        def forward(self, u: torch.Tensor) -> torch.Tensor:
            y1, y2, y3 = u[..., 0], u[..., 1], u[..., 2]
            return torch.stack(
                [-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2**2, 3e7 * y2**2],
                dim=-1,
            )

    scripted = torch.jit.script(Rober())
    u0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    prob = dl.ODEProblem(scripted, u0, (0.0, 1e5))
    kw = dict(rtol=1e-6, atol=1e-10, saveat=[1.0, 1e5])
    plain = dl.solve(prob, "radau5", **kw)
    stacked = dl.solve(prob, "radau5", vectorized=True, **kw)
    assert stacked.stats.nstacked > 0
    assert torch.equal(stacked.u, plain.u)

    mlp = dl.MLP([2, 16, 2], "tanh", dtype=torch.float64)
    prob = dl.ODEProblem(mlp, torch.tensor([0.5, -0.2], dtype=torch.float64), (0.0, 1.0))
    plain = dl.solve(prob, "radau5", rtol=1e-8, atol=1e-10)
    stacked = dl.solve(prob, "radau5", rtol=1e-8, atol=1e-10, vectorized=True)
    assert stacked.stats.nstacked > 0
    # A matrix product over three rows may round differently from three: rounding-level agreement.
    assert torch.allclose(stacked.u, plain.u, rtol=1e-10, atol=1e-12)
    assert math.isfinite(stacked.u.sum().item())

    # A native f that reads t gets no times on the stack: refused.
    timed = dl.MLP([2, 16, 2], "tanh", time_input=True, dtype=torch.float64)
    prob = dl.ODEProblem(timed, torch.tensor([0.5, -0.2], dtype=torch.float64), (0.0, 1.0))
    with pytest.raises(ValueError, match="native f .* needs an f that ignores t"):
        dl.solve(prob, "radau5", vectorized=True)


@pytest.mark.parametrize("method", ["radauIIA3", "radauIIA5", "gl4", "gl6", "sdirk2"])
def test_fixed_step_implicit_methods_stack_their_stages(method):
    # The same Newton iterations on the same stages: the same solution (elementwise f: to the
    # bit) and the same reverse-mode gradient, with the implicit stages in one call each update.
    p0 = torch.tensor([2.0, 0.5, 50.0], dtype=torch.float64)
    u00 = torch.tensor([1.0, 0.3], dtype=torch.float64)
    prob = dl.ODEProblem(forced, u00, (0.0, 0.5), p0)
    kw = dict(dt=0.05, saveat=[0.25, 0.5])
    outs, grads, stats = [], [], []
    for vectorized in (False, True):
        p = p0.clone().requires_grad_(True)
        sol = dl.solve(dl.remake(prob, p=p), method, vectorized=vectorized, **kw)
        outs.append(sol.u.detach())
        stats.append(sol.stats)
        grads.append(torch.autograd.grad(sol.u.pow(2).sum(), p)[0])
    assert torch.allclose(outs[1], outs[0], rtol=1e-13, atol=1e-15)
    assert torch.allclose(grads[1], grads[0], rtol=1e-11, atol=0), grads
    assert stats[0].nstacked == 0 and stats[1].nstacked > 0
    assert stats[1].naccept == stats[0].naccept == 10


def test_independent_batch_jacobian_blocks_through_the_stack():
    # Two ROBER systems with different rates as a batch [2, 3]: the Jacobian's per-sample blocks
    # from one reverse pass through f on 3 copies of the batch equal the usual ones.
    k = torch.tensor([[0.04, 3e7, 1e4], [0.08, 1e7, 2e4]], dtype=torch.float64)

    def batch_rober(u, p, t):
        y1, y2, y3 = u[..., 0], u[..., 1], u[..., 2]
        a, b, c = k[:, 0], k[:, 1], k[:, 2]
        return torch.stack(
            [-a * y1 + c * y2 * y3, a * y1 - c * y2 * y3 - b * y2**2, b * y2**2], dim=-1
        )

    u0 = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    prob = dl.ODEProblem(batch_rober, u0, (0.0, 1e5))
    kw = dict(rtol=1e-7, atol=1e-11, saveat=[1.0, 1e3, 1e5], independent_batch=True)
    plain = dl.solve(prob, "radau5", **kw)
    stacked = dl.solve(prob, "radau5", vectorized=True, **kw)
    assert plain.stats.jac_blocks == stacked.stats.jac_blocks == 2
    assert (stacked.stats.naccept, stacked.stats.njac) == (plain.stats.naccept, plain.stats.njac)
    assert torch.equal(stacked.u, plain.u)
