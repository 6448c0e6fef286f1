"""NeuRLP solutions against closed forms and scipy: error size, observed convergence order, float32 accuracy."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from torchmech.mnn import solve_linear_ode

f64 = torch.float64


def grid(h, t_end, dtype=f64):
    T = int(round(t_end / h)) + 1
    return torch.arange(T, dtype=dtype) * h, torch.full((T - 1,), h, dtype=dtype)


def oscillator(h, zeta, omega, *, central, method="banded", t_end=5.0, dtype=f64):
    """u'' + 2 zeta omega u' + omega^2 u = 0, u(0) = 1, u'(0) = 0, time-invariant coefficients."""
    t, steps = grid(h, t_end, dtype)
    c = torch.tensor([omega ** 2, 2 * zeta * omega, 1.0], dtype=dtype).reshape(1, 1, 1, 3)
    rhs = torch.zeros(1, 1, dtype=dtype)
    init = torch.tensor([[[1.0, 0.0]]], dtype=dtype)
    u = solve_linear_ode(c, rhs, init, steps, central=central, method=method)
    return t, u[:, 0, :]  # (T, K)


def oscillator_exact(t, zeta, omega):
    """Closed form (value, first, second derivative) of the under-damped oscillator from u(0)=1, u'(0)=0."""
    wd = omega * math.sqrt(1 - zeta ** 2)
    e = torch.exp(-zeta * omega * t)
    u = e * (torch.cos(wd * t) + zeta * omega / wd * torch.sin(wd * t))
    du = -(omega ** 2) / wd * e * torch.sin(wd * t)
    ddu = -2 * zeta * omega * du - omega ** 2 * u
    return torch.stack([u, du, ddu], -1)


def observed_order(hs, errs):
    """Least-squares slope of log(err) against log(h)."""
    return float(np.polyfit(np.log(hs), np.log(errs), 1)[0])


HS = [0.1, 0.05, 0.025]


@pytest.mark.parametrize("central", [True, False])
def test_harmonic_oscillator_matches_cos(central):
    t, u = oscillator(0.025, 0.0, 1.0, central=central)
    exact = torch.stack([torch.cos(t), -torch.sin(t), -torch.cos(t)], -1)
    err = (u - exact).abs().max(0).values
    # value and first derivative: measured 5.0e-4 / 3.4e-4 (central) and 3.7e-4 / 5.3e-4 (not) at h = 0.025
    assert err[0] < 1e-3 and err[1] < 1e-3, err
    assert err[2] < 1e-2, err  # second derivative, not pinned by any row directly
    # the initial values are pinned
    assert abs(u[0, 0].item() - 1.0) < 1e-6 and abs(u[0, 1].item()) < 1e-6


@pytest.mark.parametrize("method", ["banded", "parallel", "lapack", "native"])
@pytest.mark.parametrize("central", [True, False])
def test_harmonic_oscillator_second_order_convergence(central, method):
    """u'' + u = 0 over one period against cos t, for u, u' and u'' at h = 0.1, 0.05, 0.025."""
    errs = []
    for h in HS:
        t, u = oscillator(h, 0.0, 1.0, central=central, method=method, t_end=2 * math.pi)
        exact = torch.stack([torch.cos(t), -torch.sin(t), -torch.cos(t)], -1)
        errs.append((u - exact).abs().max(0).values)
    errs = torch.stack(errs)  # (len(HS), K)
    # Measured: 1.99-2.01 for all three orders, with and without central rows; 5e-4..6.5e-4 at h = 0.025.
    for k in range(3):
        assert 1.85 < observed_order(HS, errs[:, k].tolist()) < 2.15, errs
    assert (errs[-1] < 1e-3).all(), errs


@pytest.mark.parametrize("method", ["banded", "parallel", "lapack", "native"])
@pytest.mark.parametrize("central", [True, False])
def test_damped_oscillator_second_order_convergence(central, method):
    zeta, omega = 0.1, 2.0
    e0, e1 = [], []
    for h in HS:
        t, u = oscillator(h, zeta, omega, central=central, method=method)
        err = (u - oscillator_exact(t, zeta, omega)).abs().max(0).values
        e0.append(err[0].item())
        e1.append(err[1].item())
    # Measured: 1.99-2.01 for values and derivatives, with and without central rows.
    for errs in (e0, e1):
        assert 1.85 < observed_order(HS, errs) < 2.15, (e0, e1)
    assert e0[-1] < 3e-3 and e1[-1] < 6e-3, (e0, e1)


def _time_varying(h, central, method, t_end=6.0):
    """u'' + (1 + 0.5 sin t) u' + (2 + cos t) u = sin 2t, u(0) = 1, u'(0) = -0.5, per-step coefficients."""
    t, steps = grid(h, t_end)
    T = t.shape[0]
    c = torch.stack([2 + torch.cos(t), 1 + 0.5 * torch.sin(t), torch.ones_like(t)], -1).reshape(T, 1, 1, 3)
    rhs = torch.sin(2 * t).reshape(T, 1)
    init = torch.tensor([[[1.0, -0.5]]], dtype=f64)
    u = solve_linear_ode(c, rhs, init, steps, central=central, method=method)[:, 0, :]

    def f(s, y):
        return [y[1], math.sin(2 * s) - (1 + 0.5 * math.sin(s)) * y[1] - (2 + math.cos(s)) * y[0]]

    sol = solve_ivp(f, (0.0, t_end), [1.0, -0.5], t_eval=t.numpy(), rtol=1e-11, atol=1e-11, method="DOP853")
    assert sol.success
    ref = torch.from_numpy(sol.y.T)
    ddref = torch.tensor([f(s, y)[1] for s, y in zip(t.tolist(), sol.y.T)], dtype=f64)
    return u, torch.cat([ref, ddref[:, None]], -1)


@pytest.mark.parametrize("method", ["banded", "parallel", "lapack", "native"])
@pytest.mark.parametrize("central", [True, False])
def test_time_varying_against_solve_ivp(central, method):
    e0, e1 = [], []
    for h in HS:
        u, ref = _time_varying(h, central, method)
        err = (u - ref).abs().max(0).values
        e0.append(err[0].item())
        e1.append(err[1].item())
    # Measured orders 1.97-2.02; errors 4.9e-4 (value) and 9e-4..1.1e-3 (derivative) at h = 0.025.
    for errs in (e0, e1):
        assert 1.85 < observed_order(HS, errs) < 2.15, (e0, e1)
    assert e0[-1] < 1e-3 and e1[-1] < 2e-3, (e0, e1)


def _coupled(h, central, method, t_end=6.0):
    """x' = -0.3 x + 2 y, y' = -2 x - 0.3 y + sin t as a K = 2, D = 2, E = 2 system."""
    t, steps = grid(h, t_end)
    c = torch.zeros(1, 2, 2, 2, dtype=f64)
    c[0, 0, 0, 1], c[0, 0, 0, 0], c[0, 0, 1, 0] = 1.0, 0.3, -2.0  # x' + 0.3 x - 2 y = 0
    c[0, 1, 1, 1], c[0, 1, 0, 0], c[0, 1, 1, 0] = 1.0, 2.0, 0.3  # y' + 2 x + 0.3 y = sin t
    rhs = torch.stack([torch.zeros_like(t), torch.sin(t)], -1)
    init = torch.tensor([[[1.0], [0.0]]], dtype=f64)  # T0 = 1, D = 2, K0 = 1
    u = solve_linear_ode(c, rhs, init, steps, central=central, method=method)

    def f(s, y):
        return [-0.3 * y[0] + 2 * y[1], -2 * y[0] - 0.3 * y[1] + math.sin(s)]

    sol = solve_ivp(f, (0.0, t_end), [1.0, 0.0], t_eval=t.numpy(), rtol=1e-11, atol=1e-11, method="DOP853")
    assert sol.success
    ref = torch.from_numpy(sol.y.T)
    dref = torch.tensor([f(s, y) for s, y in zip(t.tolist(), sol.y.T)], dtype=f64)
    return u, ref, dref


@pytest.mark.parametrize("central", [True, False])
def test_coupled_first_order_system_against_solve_ivp(central):
    e0, e1 = [], []
    for h in HS:
        u, ref, dref = _coupled(h, central, "parallel")
        assert u.shape == (ref.shape[0], 2, 2)
        e0.append((u[..., 0] - ref).abs().max().item())
        e1.append((u[..., 1] - dref).abs().max().item())
    # Measured orders: 2.05-2.15 with central rows, 1.88-1.98 without.
    for errs in (e0, e1):
        assert 1.8 < observed_order(HS, errs) < 2.25, (e0, e1)
    bound = 2e-3 if central else 8e-3  # measured 1.3e-3 / 5.9e-3 (value) at h = 0.025
    assert e0[-1] < bound and e1[-1] < 2 * bound, (e0, e1)


def test_derivatives_are_consistent_with_values():
    """u[..., 1] is the derivative of u[..., 0]: compare with a finite difference of the solved values."""
    t, u = oscillator(0.01, 0.1, 2.0, central=True)
    fd = (u[2:, 0] - u[:-2, 0]) / 0.02
    assert (fd - u[1:-1, 1]).abs().max() < 1e-3
    exact = oscillator_exact(t, 0.1, 2.0)
    assert (u[:, 1] - exact[:, 1]).abs().max() < 1e-3


def _float32_vs_float64(central, method):
    """Damped oscillator, T = 1000, h = 0.01, float32 solve against the float64 one (banded, float64)."""
    _, u64 = oscillator(0.01, 0.1, 2.0, central=central, method="banded", t_end=9.99)
    _, u32 = oscillator(0.01, 0.1, 2.0, central=central, method=method, t_end=9.99, dtype=torch.float32)
    return u32, u64


@pytest.mark.parametrize("method", ["banded", "parallel", "lapack", "native", "auto"])
@pytest.mark.parametrize("central", [True, False])
def test_float32_matches_float64(central, method):
    """Damped oscillator, T = 1000, h = 0.01: float32 agrees with float64 (measured 1.4e-7..1.5e-7 relative)."""
    u32, u64 = _float32_vs_float64(central, method)
    assert u64.shape == (1000, 3) and u32.dtype == torch.float32
    assert torch.isfinite(u32).all()
    rel = ((u32.double() - u64).norm() / u64.norm()).item()
    assert rel < 1e-3, rel
    # the per-component view: derivatives too, not just the bulk norm
    for k in range(3):
        rel_k = ((u32[:, k].double() - u64[:, k]).abs().max() / u64[:, k].abs().max()).item()
        assert rel_k < 1e-3, (k, rel_k)


@pytest.mark.parametrize("central", [True, False])
def test_float32_matches_float64_dense(central):
    """The dense reference solves float32 problems in float64 (a float32 dense Cholesky measured 1.1e-2 and 0.77
    relative here); what is left is float32 rounding of the result: measured 1.4e-7 / 2.9e-7 relative."""
    u32, u64 = _float32_vs_float64(central, "dense")
    assert u32.dtype == torch.float32
    rel = ((u32.double() - u64).norm() / u64.norm()).item()
    assert rel < 1e-6, rel
    for k in range(3):
        rel_k = ((u32[:, k].double() - u64[:, k]).abs().max() / u64[:, k].abs().max()).item()
        assert rel_k < 1e-6, (k, rel_k)


def test_float32_per_step_batched_matches_float64():
    """Per-sample per-step coefficients, a batch of 4, T = 1000, float32 vs float64, parallel backend."""
    g = torch.Generator().manual_seed(0)
    B, T = 4, 1000
    t = torch.arange(T, dtype=f64) * 0.01
    omega = 1.0 + torch.rand(B, 1, generator=g, dtype=f64)
    c = torch.stack([omega ** 2 * (1 + 0.2 * torch.sin(t)), 0.3 * omega.expand(B, T), torch.ones(B, T, dtype=f64)],
                    -1).reshape(B, T, 1, 1, 3)
    rhs = torch.cos(t).expand(B, T).reshape(B, T, 1)
    init = torch.randn(B, 1, 1, 2, generator=g, dtype=f64)
    steps = torch.full((B, T - 1), 0.01, dtype=f64)
    u64 = solve_linear_ode(c, rhs, init, steps, method="parallel")
    u32 = solve_linear_ode(*(x.float() for x in (c, rhs, init, steps)), method="parallel")
    rel = ((u32.double() - u64).norm() / u64.norm()).item()
    assert rel < 1e-3, rel


@pytest.fixture
def low_precision_factor(monkeypatch):
    """Factorise float32 problems in float32 with float64 CG refinement, as off the CPU (see _factor_dtype)."""
    import torchmech.mnn.solve as solve_mod

    monkeypatch.setattr(solve_mod, "_factor_dtype", lambda low, hi, device: low)


@pytest.mark.parametrize("method", ["banded", "parallel", "lapack", "native"])
@pytest.mark.parametrize("central", [True, False])
def test_float32_factor_with_cg_refinement_matches_float64(low_precision_factor, central, method):
    """The float32-factor + float64-CG path (used off the CPU) is as accurate as the CPU's float64 factor."""
    u32, u64 = _float32_vs_float64(central, method)
    assert u32.dtype == torch.float32
    rel = ((u32.double() - u64).norm() / u64.norm()).item()
    assert rel < 1e-6, rel


def test_float32_factor_with_cg_refinement_gradients(low_precision_factor):
    """Gradients through the float32-factor path agree with those of the float64 solve."""
    g = torch.Generator().manual_seed(3)
    B, T = 3, 300
    c = torch.randn(B, T, 1, 1, 3, generator=g, dtype=f64)
    c[..., 2] = 1.0 + 0.5 * torch.rand(B, T, 1, 1, generator=g, dtype=f64)
    rhs = torch.randn(B, T, 1, generator=g, dtype=f64)
    init = torch.randn(B, 1, 1, 2, generator=g, dtype=f64)
    steps = 0.01 * (1 + 0.1 * torch.rand(B, T - 1, generator=g, dtype=f64))
    w = torch.randn(B, T, 1, 3, generator=g, dtype=f64)
    grads = {}
    for dt in (torch.float32, f64):
        xs = [x.to(dt).requires_grad_() for x in (c, rhs, init, steps)]
        u = solve_linear_ode(*xs, method="parallel")
        (u * w.to(dt)).sum().backward()
        grads[dt] = [x.grad.double() for x in xs]
    for a, b in zip(grads[torch.float32], grads[f64]):
        assert ((a - b).norm() / b.norm()).item() < 1e-4


@pytest.mark.parametrize("method", ["banded", "parallel", "lapack", "native"])
@pytest.mark.parametrize("dtype", [f64, torch.float32])
def test_ill_conditioned_long_grids_still_solve(method, dtype):
    """Long grids make the Taylor rows' normal matrix ill-conditioned without making it singular: its smallest
    eigenvalue (unit diagonal) is 8.9e-12 for u'' + u = 0 without central rows at T = 1001, and 5.8e-13 for
    u''' + u = 0 at T = 1001. A floor of 1e3 eps T (2.2e-10) rejected both as 'singular'; they solve to their
    discretisation error (singular systems sit at <= 1.1e-16, see test_errors)."""
    t, steps = grid(0.002, 2.0, dtype)  # T = 1001
    c = torch.tensor([1.0, 0.0, 1.0], dtype=dtype).reshape(1, 1, 1, 3)
    init = torch.tensor([[[1.0, 0.0]]], dtype=dtype)
    u = solve_linear_ode(c, torch.zeros(1, 1, dtype=dtype), init, steps, central=False, method=method)
    assert (u[:, 0, 0].double() - torch.cos(t.double())).abs().max() < 1e-5  # measured 3e-7 to 1.3e-6
    t, steps = grid(0.01, 10.0, dtype)  # T = 1001
    c = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=dtype).reshape(1, 1, 1, 4)
    init = torch.tensor([[[1.0, -1.0, 1.0]]], dtype=dtype)
    u = solve_linear_ode(c, torch.zeros(1, 1, dtype=dtype), init, steps, central=True, method=method)
    assert (u[:, 0, 0].double() - torch.exp(-t.double())).abs().max() < 1e-3  # measured 3.5e-4


def test_ill_conditioned_solves_warn():
    """Accepted, but with rounding errors that can show (smallest eigenvalue 2.1e-13 here): a RuntimeWarning
    says so; a well-conditioned solve stays quiet."""
    t, steps = grid(0.001, 3.0)  # T = 3001, no central rows
    c = torch.tensor([1.0, 0.0, 1.0], dtype=f64).reshape(1, 1, 1, 3)
    init = torch.tensor([[[1.0, 0.0]]], dtype=f64)
    with pytest.warns(RuntimeWarning, match="ill-conditioned .* relative errors up to"):
        solve_linear_ode(c, torch.zeros(1, 1, dtype=f64), init, steps, central=False, method="banded")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        oscillator(0.025, 0.1, 1.0, central=True)
