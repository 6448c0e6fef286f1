"""Derivative estimators against analytic derivatives, on regular and irregular grids."""

import pytest
import torch

from torchmech.discovery.differentiation import FiniteDifference, SavitzkyGolay, SmoothingSpline, TotalVariation


def signal(t):
    x = torch.stack([torch.sin(t), torch.exp(-t / 3)], -1)
    dx = torch.stack([torch.cos(t), -torch.exp(-t / 3) / 3], -1)
    return x, dx


@pytest.mark.parametrize(
    "est, tol",
    [(FiniteDifference(2), 2e-3), (FiniteDifference(4), 1e-6), (SavitzkyGolay(9, 3), 1e-4),
     (SmoothingSpline(), 1e-2)],
)
def test_clean_irregular_grid(est, tol):
    g = torch.Generator().manual_seed(0)
    t = torch.sort(torch.rand(400, generator=g, dtype=torch.float64))[0] * 6
    x, dx = signal(t)
    d = est(x, t)
    assert d.shape == x.shape and d.dtype == x.dtype
    assert (d - dx).abs().max() < tol


def test_finite_difference_exact_for_polynomials():
    t = torch.tensor([0.0, 0.3, 0.5, 1.2, 1.3, 2.0], dtype=torch.float64)
    x = (1 + 2 * t - t**2)[:, None]
    assert torch.allclose(FiniteDifference(2)(x, t)[:, 0], 2 - 2 * t, atol=1e-12)


def test_total_variation_clean_and_noisy():
    t = torch.linspace(0, 6, 300, dtype=torch.float64)
    x = torch.sin(t)[:, None]
    d = TotalVariation(1e-6)(x, t)[:, 0]
    assert (d - torch.cos(t))[5:-5].abs().max() < 1e-2
    g = torch.Generator().manual_seed(0)
    noisy = x + 0.02 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    err_tv = (TotalVariation(1e-3)(noisy, t)[15:-15, 0] - torch.cos(t[15:-15])).abs().mean()
    err_fd = (FiniteDifference(2)(noisy, t)[15:-15, 0] - torch.cos(t[15:-15])).abs().mean()
    err_sp = (SmoothingSpline()(noisy, t)[15:-15, 0] - torch.cos(t[15:-15])).abs().mean()
    assert err_tv < 0.06 and err_sp < 0.03 and err_fd > 5 * err_tv


def test_batched_scalar_step_and_dtype():
    t = torch.linspace(0, 3, 60)
    x, dx = signal(t)
    xb = torch.stack([x, 2 * x])  # (2, T, D) float32
    for est in (SavitzkyGolay(7, 3), SmoothingSpline(lam=1e-8), TotalVariation(1e-7)):
        d = est(xb, float(t[1] - t[0]))
        assert d.shape == (2, 60, 2) and d.dtype == torch.float32
        assert torch.allclose(d[1], 2 * d[0], rtol=1e-4, atol=1e-4)
        assert (d[0, 3:-3] - dx[3:-3]).abs().max() < 2e-2


def test_bad_inputs():
    x = torch.zeros(10, 2)
    with pytest.raises(ValueError, match="strictly increasing"):
        FiniteDifference()(x, torch.zeros(10))
    with pytest.raises(ValueError, match=r"t: expected shape \(10,\)"):
        FiniteDifference()(x, torch.arange(9.0))
    with pytest.raises(ValueError, match="at least 9 time samples"):
        SavitzkyGolay(9, 3)(x[:5], torch.arange(5.0))
    with pytest.raises(ValueError, match="x: expected finite"):
        FiniteDifference()(torch.full((10, 2), float("nan")), 0.1)
    with pytest.raises(ValueError, match="window"):
        SavitzkyGolay(8, 3)
    with pytest.raises(ValueError, match="alpha"):
        TotalVariation(-1.0)
    with pytest.raises(ValueError, match="time step"):
        FiniteDifference()(x, -0.1)


def test_total_variation_default_suits_order_one_time_scales():
    # Lorenz derivatives vary on time scales of about 0.5: the default alpha must not over-smooth
    from torchmech import systems
    from torchmech.discovery import metrics

    t = torch.linspace(0, 5, 1000, dtype=torch.float64)
    tr = systems.simulate("lorenz", t, y0=[-8.0, 8.0, 27.0], noise=0.01, seed=0)
    exact = systems.get("lorenz").vector_field(t, tr.x_clean)
    assert float(metrics.derivative_r2(TotalVariation()(tr.x, t), exact)) > 0.99


def test_agree_with_independent_references():
    # numpy.gradient (second order, also one-sided second order at the ends) on an irregular grid,
    # and scipy's Savitzky-Golay filter (derivative, 'interp' edges) on a regular one
    import numpy as np
    from scipy.signal import savgol_filter

    g = torch.Generator().manual_seed(1)
    t = torch.cumsum(torch.rand(50, generator=g, dtype=torch.float64) + 0.1, 0)
    x = torch.randn(50, 3, generator=g, dtype=torch.float64)
    ref = np.gradient(x.numpy(), t.numpy(), axis=0, edge_order=2)
    assert np.allclose(FiniteDifference(2)(x, t).numpy(), ref, rtol=1e-10, atol=1e-10)
    dt = 0.05
    ref_sg = savgol_filter(x.numpy(), 11, 3, deriv=1, delta=dt, axis=0, mode="interp")
    assert np.allclose(SavitzkyGolay(11, 3)(x, dt).numpy(), ref_sg, rtol=1e-9, atol=1e-9)


def test_smoothing_spline_matches_scipy():
    # fixed lam: the same spline as scipy's make_smoothing_spline; GCV: nearly the same choice
    import numpy as np
    from scipy.interpolate import make_smoothing_spline

    g = torch.Generator().manual_seed(2)
    t = torch.sort(torch.rand(200, generator=g, dtype=torch.float64))[0] * 6
    y = torch.sin(t) + 0.02 * torch.randn(200, generator=g, dtype=torch.float64)
    for lam in (1e-4, 1e-2):
        ref = make_smoothing_spline(t.numpy(), y.numpy(), lam=lam).derivative()(t.numpy())
        assert np.allclose(SmoothingSpline(lam)(y[:, None], t)[:, 0].numpy(), ref, atol=1e-8)
        values = make_smoothing_spline(t.numpy(), y.numpy(), lam=lam)(t.numpy())
        assert np.allclose(SmoothingSpline(lam).smooth(y[:, None], t)[:, 0].numpy(), values, atol=1e-8)
    ref = make_smoothing_spline(t.numpy(), y.numpy()).derivative()(t.numpy())
    assert np.abs(SmoothingSpline()(y[:, None], t)[:, 0].numpy() - ref).max() < 5e-3
    batch = torch.stack([y, 2 * y], -1)[None].expand(3, -1, -1)  # (3, 200, 2): batched like the derivative
    assert SmoothingSpline().smooth(batch, t).shape == (3, 200, 2)
    with pytest.raises(ValueError, match="lam"):
        SmoothingSpline(lam=-1.0)


def test_weak_form_identity_clean_regular_and_irregular():
    # the weak derivative of x must equal the test-function mean of the true x' (integration by parts)
    from torchmech.discovery.differentiation import WeakForm

    g = torch.Generator().manual_seed(3)
    regular = torch.linspace(0, 6, 400, dtype=torch.float64)
    irregular = torch.sort(torch.rand(400, generator=g, dtype=torch.float64))[0] * 6
    for t, tol in ((regular, 1e-9), (irregular, 5e-3)):
        x, dx = signal(t)
        means_of_dx, weak_dx = WeakForm().weak_system(x, t, dx)  # the "features" are the true derivatives
        assert weak_dx.shape == means_of_dx.shape and weak_dx.shape[-1] == 2
        assert (weak_dx - means_of_dx).abs().max() < tol
        ones, _ = WeakForm().weak_system(x, t, torch.ones(400, 1, dtype=torch.float64))
        assert torch.allclose(ones, torch.ones_like(ones), atol=1e-12)  # unit-integral test functions
    # windows: every `stride` samples, the last one ending at the last sample
    w = WeakForm(width=9, stride=4)
    assert w.weak_system(x, t, x)[0].shape == (1 + (400 - 9) // 4 + 1, 2)


def test_weak_form_pointwise_derivative_batched_float32_and_noise():
    from torchmech.discovery.differentiation import WeakForm

    t = torch.linspace(0, 6, 400, dtype=torch.float64)
    x, dx = signal(t)
    d = WeakForm()(x, t)
    assert d.shape == x.shape and (d - dx)[20:-20].abs().max() < 5e-3
    xb = torch.stack([x, 2 * x]).float()
    db = WeakForm()(xb, float(t[1] - t[0]))
    assert db.dtype == torch.float32 and db.shape == (2, 400, 2)
    assert torch.allclose(db[1], 2 * db[0], rtol=1e-4, atol=1e-5)
    fw, dw = WeakForm().weak_system(xb, t, xb)
    assert fw.dtype == dw.dtype == torch.float32 and fw.shape[0] == 2
    g = torch.Generator().manual_seed(0)
    noisy = x + 0.02 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    err_weak = (WeakForm()(noisy, t) - dx)[20:-20].abs().mean()
    err_fd = (FiniteDifference(2)(noisy, t) - dx)[20:-20].abs().mean()
    assert err_weak < 0.05 and err_fd > 10 * err_weak


def test_weak_form_bad_inputs():
    from torchmech.discovery.differentiation import WeakForm

    for kw in (dict(width=4), dict(width=8), dict(stride=0), dict(power=1)):
        with pytest.raises(ValueError, match=next(iter(kw))):
            WeakForm(**kw)
    x = torch.zeros(20, 2)
    with pytest.raises(ValueError, match="at least 33 time samples"):
        WeakForm()(x, 0.1)
    with pytest.raises(ValueError, match=r"features: expected shape \(40,\) \+ \(F,\)"):
        WeakForm().weak_system(torch.zeros(40, 2), 0.1, torch.zeros(39, 3))


def test_weak_form_fitting_width():
    from torchmech.discovery import WeakForm

    assert [WeakForm.fitting(n).width for n in (100, 33, 32, 31, 6, 5)] == [33, 33, 31, 31, 5, 5]
    assert WeakForm.fitting(100, width=21).width == 21
    # enough windows for the regression: 32 samples and 20 rows wanted -> a short window
    w = WeakForm.fitting(32, min_rows=20)
    assert len(w._starts(32, "cpu")) >= 20 and w.width % 2 == 1
    assert WeakForm.fitting(8, min_rows=1000).width == 5
    t = torch.linspace(0, 1, 32, dtype=torch.float64)
    x = torch.sin(3 * t)[:, None]
    est = WeakForm.fitting(32)
    assert est(x, t).shape == x.shape  # a window of 31 fits a 32-sample series
