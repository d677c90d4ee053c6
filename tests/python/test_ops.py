"""The registered operators torch.ops.diffeqlayers.lincomb(.out) and .error_norm: opcheck
(schema, autograd registration, fake tensors), values against ATen expressions, gradcheck, bad
input; and the solver's reuse of stage buffers on paths that record no gradient."""

from __future__ import annotations

import pytest
import torch

import diffeqlayers as dl

ops = torch.ops.diffeqlayers
SHAPES = [(3,), (4, 5), (2, 3, 4)]
DTYPES = [torch.float32, torch.float64]


def terms(shape, dtype, n, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(shape, generator=g, dtype=dtype).requires_grad_(requires_grad) for _ in range(n)
    ]


def lincomb_ref(y, ks, w, h):
    out = sum(h * wj * kj.to(torch.float64) for wj, kj in zip(w, ks))
    if y is not None:
        out = out + y.to(torch.float64)
    return out


def error_norm_ref(ks, w, h, y0, y1, atol, rtol):
    e = sum(h * wj * kj.to(torch.float64) for wj, kj in zip(w, ks))
    scale = atol + rtol * torch.maximum(y0.abs(), y1.abs()).to(torch.float64)
    return torch.sqrt(torch.mean((e / scale) ** 2))


# ----------------------------------------------------------------------------------------------
# opcheck
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_y", [True, False])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_lincomb(shape, dtype, with_y, requires_grad):
    y, *ks = terms(shape, dtype, 4, requires_grad)
    torch.library.opcheck(ops.lincomb.default, (y if with_y else None, ks, [0.5, -1.25, 2.0], 0.1))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_lincomb_into(shape, dtype):
    y, *ks = terms(shape, dtype, 3)
    out = torch.empty(shape, dtype=dtype)
    torch.library.opcheck(ops.lincomb_into.default, (y, ks, [0.5, -1.25], 0.1), {"out": out})


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_error_norm(shape, dtype, requires_grad):
    y0, y1, *ks = terms(shape, dtype, 5, requires_grad)
    torch.library.opcheck(ops.error_norm.default, (ks, [0.1, -0.3, 0.2], 0.05, y0, y1, 1e-3, 1e-2))


# ----------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lincomb_values(shape, dtype):
    y, *ks = terms(shape, dtype, 5)
    w, h = [0.3, -1.5, 2.25, 0.125], 0.07
    ref = lincomb_ref(y, ks, w, h).to(dtype)
    torch.testing.assert_close(ops.lincomb(y, ks, w, h), ref)
    torch.testing.assert_close(ops.lincomb(None, ks, w, h), (ref - y).to(dtype))
    out = torch.full(shape, float("nan"), dtype=dtype)
    assert ops.lincomb_into(y, ks, w, h, out=out) is None
    assert torch.equal(out, ops.lincomb(y, ks, w, h))


def test_lincomb_fused_matches_fallback_order():
    """The fused loop and the ATen fallback (non-contiguous terms) add the terms in the same
    order; without FMA both round alike, and within one ulp either way."""
    y, *ks = terms((6, 4), torch.float64, 4)
    w = [0.5, -0.25, 3.0]
    fused = ops.lincomb(y, ks, w, 0.3)
    strided = ops.lincomb(y.t().contiguous().t(), [k.t().contiguous().t() for k in ks], w, 0.3)
    torch.testing.assert_close(fused, strided, rtol=1e-15, atol=1e-15)


def test_lincomb_broadcasts():
    y = torch.randn(4, 3, dtype=torch.float64)
    k0 = torch.randn(3, dtype=torch.float64)
    k1 = torch.randn(4, 1, dtype=torch.float64)
    out = ops.lincomb(y, [k0, k1], [2.0, -1.0], 0.5)
    torch.testing.assert_close(out, y + k0 - 0.5 * k1)


@pytest.mark.parametrize("shape", SHAPES + [(70000,)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_error_norm_values(shape, dtype):
    y0, y1, *ks = terms(shape, dtype, 6)
    args = (ks, [0.1, -0.3, 0.2, 0.05], 0.05, y0, y1, 1e-3, 1e-2)
    n = ops.error_norm(*args)
    assert n.dim() == 0 and n.dtype == dtype
    torch.testing.assert_close(n, error_norm_ref(*args).to(dtype))
    # Non-contiguous inputs take the ATen kernel: the same value to rounding.
    nc = [t.flip(0) for t in (y0, y1, *ks)]
    args_nc = (nc[2:], args[1], args[2], nc[0], nc[1], args[5], args[6])
    torch.testing.assert_close(ops.error_norm(*args_nc), n)


def test_error_norm_matches_solver_error_estimate():
    """The error term is the solver's combination bitwise: the norm of a single element is
    |e| / scale with e from lincomb."""
    ks = terms((1,), torch.float64, 7, seed=3)
    w = [0.0012, 0.0, -0.0041, 0.0187, -0.0226, 0.0011, -0.025]
    y0 = torch.tensor([0.7], dtype=torch.float64)
    y1 = torch.tensor([-0.9], dtype=torch.float64)
    h = 0.013
    e = ops.lincomb(None, ks, w, h)
    expected = (e.abs() / (0.9 * 1e-6 + 1e-9)).reshape(())
    assert torch.equal(ops.error_norm(ks, w, h, y0, y1, 1e-9, 1e-6), expected)


def test_error_norm_propagates_nan():
    y0, y1, *ks = terms((5,), torch.float64, 4)
    y1[2] = float("nan")
    assert torch.isnan(ops.error_norm(ks, [1.0, 2.0], 0.1, y0, y1, 1e-6, 1e-3))
    y0, y1, *ks = terms((5,), torch.float32, 4)
    ks[1][3] = float("nan")
    assert torch.isnan(ops.error_norm(ks, [1.0, 2.0], 0.1, y0, y1, 1e-6, 1e-3))


def test_meta_shapes():
    ks = [torch.empty(2, 3, device="meta", dtype=torch.float64) for _ in range(3)]
    out = ops.lincomb(ks[0], ks[1:], [1.0, 2.0], 0.5)
    assert out.device.type == "meta" and out.shape == (2, 3) and out.dtype == torch.float64
    n = ops.error_norm(ks, [1.0, 2.0, 3.0], 0.5, ks[0], ks[1], 1e-6, 1e-3)
    assert n.device.type == "meta" and n.shape == () and n.dtype == torch.float64


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_y", [True, False])
def test_lincomb_gradcheck(with_y):
    y, *ks = terms((3, 2), torch.float64, 4, requires_grad=True)

    def fn(y, *ks):
        return ops.lincomb(y if with_y else None, list(ks), [0.5, -2.0, 1.5], 0.3)

    assert torch.autograd.gradcheck(fn, (y, *ks))
    assert torch.autograd.gradgradcheck(fn, (y, *ks))


@pytest.mark.parametrize("dtype", DTYPES)
def test_lincomb_backward_loop_matches_aten_products(dtype):
    """A contiguous CPU grad takes the host loop; a strided one the ATen products. Same bits,
    and a weight of 1 hands the grad itself on."""
    y, *ks = terms((5, 3), dtype, 4, requires_grad=True)
    w = [0.3, -1.7, 1.0 / 3.0]
    h = 0.7
    g = torch.randn(5, 3, dtype=dtype)
    strided = torch.empty(5, 6, dtype=dtype)[:, ::2]
    strided.copy_(g)
    assert not strided.is_contiguous()
    out = ops.lincomb(y, ks, w, h)
    loop = torch.autograd.grad(out, [y, *ks], g, retain_graph=True)
    aten = torch.autograd.grad(out, [y, *ks], strided)
    for a, b, wj in zip(loop, aten, [1.0, *w]):
        assert torch.equal(a, b)
        assert torch.equal(a, g * torch.tensor(h * wj, dtype=dtype) if wj != 1.0 else g)


def test_lincomb_gradcheck_broadcast():
    y = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    k0 = torch.randn(3, dtype=torch.float64, requires_grad=True)
    k1 = torch.randn(4, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda y, a, b: ops.lincomb(y, [a, b], [2.0, -1.0], 0.5), (y, k0, k1)
    )


def test_error_norm_gradcheck():
    y0, y1, *ks = terms((4, 3), torch.float64, 5, requires_grad=True)

    def fn(y0, y1, *ks):
        return ops.error_norm(list(ks), [0.2, -0.7, 0.4], 0.3, y0, y1, 1e-2, 0.5)

    assert torch.autograd.gradcheck(fn, (y0, y1, *ks))


def test_error_norm_grad_matches_reference():
    y0, y1, *ks = terms((6,), torch.float64, 4, requires_grad=True)
    args = (ks, [0.2, -0.7], 0.3, y0, y1, 1e-2, 0.5)
    got = torch.autograd.grad(ops.error_norm(*args), [y0, y1, *ks])
    want = torch.autograd.grad(error_norm_ref(*args), [y0, y1, *ks])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_lincomb_into_refuses_grad():
    y, *ks = terms((3,), torch.float64, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="automatic differentiation"):
        ops.lincomb_into(y, ks, [1.0, 1.0], 0.5, out=torch.empty(3, dtype=torch.float64))
    out = torch.empty(3, dtype=torch.float64)
    with torch.no_grad():
        ops.lincomb_into(y, ks, [1.0, 1.0], 0.5, out=out)
    torch.testing.assert_close(out, (y + 0.5 * ks[0] + 0.5 * ks[1]).detach())


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_bad_input():
    y, *ks = terms((3,), torch.float64, 3)
    with pytest.raises(ValueError, match="2 terms in ks but 1 weights"):
        ops.lincomb(y, ks, [1.0], 1.0)
    with pytest.raises(ValueError, match="ks is empty"):
        ops.lincomb(y, [], [], 1.0)
    with pytest.raises(TypeError, match="dtype"):
        ops.lincomb(y, [ks[0], ks[1].float()], [1.0, 1.0], 1.0)
    with pytest.raises(TypeError, match="floating-point"):
        ops.lincomb(None, [torch.ones(3, dtype=torch.int64)], [1.0], 1.0)
    with pytest.raises(ValueError, match="not finite"):
        ops.lincomb(y, ks, [1.0, float("nan")], 1.0)
    with pytest.raises(RuntimeError):
        ops.lincomb(y, [ks[0], torch.ones(4, dtype=torch.float64)], [1.0, 1.0], 1.0)
    with pytest.raises(ValueError, match="out has shape"):
        ops.lincomb_into(y, ks, [1.0, 1.0], 1.0, out=torch.empty(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="overlaps"):
        ops.lincomb_into(y, ks, [1.0, 1.0], 1.0, out=ks[0])
    with pytest.raises(ValueError, match="atol"):
        ops.error_norm(ks, [1.0, 1.0], 1.0, y, y, -1.0, 1e-3)
    with pytest.raises(ValueError, match="both zero"):
        ops.error_norm(ks, [1.0, 1.0], 1.0, y, y, 0.0, 0.0)
    with pytest.raises(ValueError, match="shape"):
        ops.error_norm(ks, [1.0, 1.0], 1.0, y, torch.ones(4, dtype=torch.float64), 1e-6, 1e-3)


# ----------------------------------------------------------------------------------------------
# The solver's buffers
# ----------------------------------------------------------------------------------------------


def lotka_volterra(u, p, t):
    x, y = u[..., 0], u[..., 1]
    return torch.stack([1.5 * x - x * y, -3.0 * y + x * y], dim=-1)


@pytest.mark.parametrize("method", ["tsit5", "dopri5", "bosh3", "rk4"])
@pytest.mark.parametrize("saveat", [None, 0.5])
def test_no_grad_solve_equals_recorded_solve(method, saveat):
    """The no-grad loop writes into recycled buffers; the recorded loop allocates. Same bits."""
    u0 = torch.tensor([[1.0, 1.0], [0.5, 2.0]], dtype=torch.float64)
    kw = dict(saveat=saveat, rtol=1e-7, atol=1e-9, dense=True)
    if method == "rk4":
        kw["dt"] = 0.01
    prob = dl.ODEProblem(lotka_volterra, u0, (0.0, 3.0))
    with torch.no_grad():
        plain = dl.solve(prob, method, **kw)
    u0g = u0.clone().requires_grad_(True)
    recorded = dl.solve(dl.ODEProblem(lotka_volterra, u0g, (0.0, 3.0)), method, **kw)
    assert recorded.u.requires_grad
    assert torch.equal(plain.t, recorded.t) and torch.equal(plain.u, recorded.u.detach())
    ts = torch.linspace(0.0, 3.0, 17, dtype=torch.float64)
    assert torch.equal(plain(ts), recorded(ts).detach())
    assert plain.stats.nfe == recorded.stats.nfe


def test_buffers_held_by_f_are_not_overwritten():
    """u' = u by an f that keeps every state it is given and returns the input itself, a view of
    it or a new tensor in turn: no kept tensor may change after the call, and the result must
    not depend on the reuse."""
    kept = []

    def f(u, p, t):
        kept.append((u, u.clone()))
        if len(kept) % 3 == 0:
            return u
        if len(kept) % 3 == 1:
            return u.view(u.shape)
        return u * 1.0

    u0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    with torch.no_grad():
        sol = dl.solve(dl.ODEProblem(f, u0, (0.0, 1.0)), "tsit5", saveat=0.25)
    assert len(kept) == sol.stats.nfe
    for u, copy in kept:
        assert torch.equal(u, copy)
    kept.clear()
    ref = dl.solve(
        dl.ODEProblem(f, u0.clone().requires_grad_(True), (0.0, 1.0)), "tsit5", saveat=0.25
    )
    assert torch.equal(sol.u, ref.u.detach())
