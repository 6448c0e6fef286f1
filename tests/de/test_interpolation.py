"""Interpolation of time series: exactness, continuity, missing data, per-sample queries, errors."""

import math

import pytest
import torch

from torchmech.de.interpolation import (
    CubicHermiteInterpolation,
    LinearInterpolation,
    NaturalCubicSpline,
    RectilinearInterpolation,
    fill_missing,
    observational_intensity,
)

DT = torch.float64
ALL = [LinearInterpolation, CubicHermiteInterpolation, NaturalCubicSpline]


def _irregular(T=9):
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.zeros(1), torch.rand(T - 1, generator=g) + 0.2]).cumsum(0).to(DT)


@pytest.mark.parametrize("cls", ALL)
def test_exact_on_linear_data(cls):
    ts = _irregular()
    x = torch.stack([2 * ts - 1, -0.5 * ts + 3], dim=-1).expand(3, -1, -1)
    X = cls(ts, x)
    q = torch.linspace(float(ts[0]), float(ts[-1]), 37, dtype=DT)
    for t in q:
        torch.testing.assert_close(X.evaluate(t), torch.tensor([2 * t - 1, -0.5 * t + 3]).expand(3, 2))
        torch.testing.assert_close(X.derivative(t), torch.tensor([2.0, -0.5], dtype=DT).expand(3, 2))
    assert X.interval == (float(ts[0]), float(ts[-1]))


@pytest.mark.parametrize("cls", ALL)
def test_interpolates_data(cls):
    ts = _irregular()
    x = torch.randn(2, ts.shape[0], 3, dtype=DT)
    X = cls(ts, x)
    for k in range(ts.shape[0]):
        torch.testing.assert_close(X.evaluate(ts[k]), x[:, k])


def test_natural_spline_is_c2_and_accurate():
    ts = _irregular(15)
    x = torch.sin(ts)[None, :, None]
    X = NaturalCubicSpline(ts, x)
    eps = 1e-7
    for k in range(1, ts.shape[0] - 1):
        t = ts[k]
        d_left, d_right = X.derivative(t - eps), X.derivative(t + eps)
        torch.testing.assert_close(d_left, d_right, atol=1e-5, rtol=0)
        # second derivative continuity by differences of the derivative on each side
        s_left = (X.derivative(t - eps) - X.derivative(t - 2 * eps)) / eps
        s_right = (X.derivative(t + 2 * eps) - X.derivative(t + eps)) / eps
        torch.testing.assert_close(s_left, s_right, atol=1e-3, rtol=0)
    # second derivative is zero at both ends
    c = X.c
    assert abs(float(c[..., 0, :])) < 1e-12
    mid = 0.5 * (ts[6] + ts[7])
    assert abs(float(X.evaluate(mid) - math.sin(float(mid)))) < 1e-3


def test_hermite_is_c1_and_not_c2():
    ts = _irregular(10)
    x = (ts ** 2)[None, :, None]
    X = CubicHermiteInterpolation(ts, x)
    eps = 1e-8
    for k in range(1, ts.shape[0] - 1):
        torch.testing.assert_close(X.derivative(ts[k] - eps), X.derivative(ts[k] + eps), atol=1e-6, rtol=0)
    # the right-hand piece does not depend on later data (causality): change x after knot 5
    x2 = x.clone()
    x2[:, 7:] += 10.0
    X2 = CubicHermiteInterpolation(ts, x2)
    t = 0.5 * (ts[4] + ts[5])
    torch.testing.assert_close(X.evaluate(t), X2.evaluate(t))


def test_linear_derivative_is_piecewise_constant():
    ts = torch.tensor([0.0, 1.0, 3.0], dtype=DT)
    x = torch.tensor([[[0.0], [1.0], [5.0]]], dtype=DT)
    X = LinearInterpolation(ts, x)
    torch.testing.assert_close(X.derivative(0.5), torch.tensor([[1.0]], dtype=DT))
    torch.testing.assert_close(X.derivative(2.0), torch.tensor([[2.0]], dtype=DT))
    torch.testing.assert_close(X.evaluate(0.5, 2.0), torch.tensor([[2.5]], dtype=DT))


def test_missing_values_filled_by_linear_interpolation():
    ts = torch.tensor([0.0, 1.0, 2.0, 4.0, 5.0], dtype=DT)
    x = torch.tensor([[[math.nan, 1.0], [1.0, math.nan], [math.nan, 3.0], [5.0, math.nan], [math.nan, math.nan]]],
                     dtype=DT)
    f = fill_missing(ts, x)
    expected = torch.tensor([[[1.0, 1.0], [1.0, 2.0], [7.0 / 3.0, 3.0], [5.0, 3.0], [5.0, 3.0]]], dtype=DT)
    torch.testing.assert_close(f, expected)
    for cls in ALL:
        X = cls(ts, x)
        assert torch.isfinite(X.evaluate(3.3)).all()
        torch.testing.assert_close(X.evaluate(ts[2]), expected[:, 2])
    cnt = observational_intensity(x)
    torch.testing.assert_close(cnt[0, :, 0], torch.tensor([0.0, 1, 1, 2, 2], dtype=DT))
    with pytest.raises(ValueError, match="no observed value"):
        LinearInterpolation(ts, torch.full((1, 5, 1), math.nan, dtype=DT))


def test_rectilinear_path():
    ts = torch.tensor([0.0, 1.0, 3.0], dtype=DT)
    x = torch.tensor([[[1.0], [math.nan], [4.0]]], dtype=DT)
    X = RectilinearInterpolation(ts, x)
    assert X.interval == (0.0, 4.0) and X.channels == 2
    torch.testing.assert_close(X.evaluate(1.0), torch.tensor([[1.0, 1.0]], dtype=DT))  # time moved, value held
    torch.testing.assert_close(X.evaluate(2.0), torch.tensor([[1.0, 1.0]], dtype=DT))  # forward filled
    torch.testing.assert_close(X.evaluate(3.5), torch.tensor([[3.0, 2.5]], dtype=DT))
    torch.testing.assert_close(X.evaluate(4.0), torch.tensor([[3.0, 4.0]], dtype=DT))


@pytest.mark.parametrize("cls", ALL)
def test_per_sample_times_and_gradients(cls):
    ts = _irregular(6)
    x = torch.randn(4, 6, 2, dtype=DT, requires_grad=True)
    X = cls(ts, x)
    t = torch.stack([ts[1], 0.5 * (ts[2] + ts[3]), ts[0], ts[-1]])
    out = X.evaluate(t)
    assert out.shape == (4, 2)
    for b in range(4):
        torch.testing.assert_close(out[b], X.evaluate(t[b])[b])
        torch.testing.assert_close(X.derivative(t)[b], X.derivative(t[b])[b])
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_float32():
    ts = torch.linspace(0, 1, 20)
    x = torch.sin(4 * ts)[None, :, None]
    X = NaturalCubicSpline(ts, x)
    v = X.evaluate(0.33)
    assert v.dtype == torch.float32 and abs(float(v) - math.sin(1.32)) < 1e-3


def test_errors():
    ts = torch.tensor([0.0, 1.0, 2.0], dtype=DT)
    x = torch.zeros(1, 3, 1, dtype=DT)
    with pytest.raises(ValueError, match="strictly increasing"):
        LinearInterpolation(torch.tensor([0.0, 1.0, 1.0]), x)
    with pytest.raises(ValueError, match=r"ts must have shape \(T,\)"):
        LinearInterpolation(torch.tensor([0.0, 1.0]), x)
    with pytest.raises(ValueError, match="outside"):
        LinearInterpolation(ts, x).evaluate(2.5)
    with pytest.raises(ValueError, match="at least 2"):
        NaturalCubicSpline(ts[:1], x[:, :1])
    with pytest.raises(ValueError, match="inf"):
        LinearInterpolation(ts, torch.full((1, 3, 1), math.inf, dtype=DT))
    with pytest.raises(TypeError, match="x must be a tensor"):
        LinearInterpolation(ts, [[1.0]])
    with pytest.raises(ValueError, match="per-sample"):
        LinearInterpolation(ts, x).evaluate(torch.zeros(3, dtype=DT))
