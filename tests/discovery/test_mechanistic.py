"""MNN-based discovery: the NeuRLP least-squares fit, thresholding cycles and the network denoiser."""

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from torchmech.discovery.library import PolynomialLibrary
from torchmech.discovery.mechanistic import fit_mechanistic, make_windows

LIB = PolynomialLibrary(degree=2)
NAMES = LIB.feature_names(n_variables=3)


def lorenz_data(noise, seed=0, n=1000):
    def f(_t, s):
        x, y, z = s
        return [10 * (y - x), x * (28 - z) - y, x * y - 8 / 3 * z]

    t = np.linspace(0, 10, n)
    sol = solve_ivp(f, (0, 10), [-8, 8, 27], t_eval=t, rtol=1e-11, atol=1e-11)
    x = torch.tensor(sol.y.T)
    g = torch.Generator().manual_seed(seed)
    return torch.tensor(t), x + noise * x.std(0) * torch.randn(x.shape, generator=g, dtype=x.dtype)


def lorenz_truth():
    true = torch.zeros(3, len(NAMES), dtype=torch.float64)
    i = {n: k for k, n in enumerate(NAMES)}
    true[0, i["x"]], true[0, i["y"]] = -10, 10
    true[1, i["x"]], true[1, i["y"]], true[1, i["x*z"]] = 28, -1, -1
    true[2, i["z"]], true[2, i["x*y"]] = -8 / 3, 1
    return true


def check_lorenz(coef, max_median):
    true = lorenz_truth()
    assert torch.equal(coef != 0, true != 0), f"support differs:\n{coef}"
    rel = ((coef - true).abs() / true.abs())[true != 0]
    assert rel.median() < max_median, rel


def test_windows_cover_every_sample():
    t = torch.arange(10.0)
    x = torch.arange(10.0)[:, None]
    w, h = make_windows([x], [t], window=4, stride=3)
    assert w.shape == (3, 4, 1) and h.shape == (3, 3)
    assert w[-1, -1, 0] == 9 and torch.all(h == 1)


def test_recovers_linear_system_exactly_from_clean_data():
    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64)
    t = torch.linspace(0, 10, 801, dtype=torch.float64)
    lam, V = torch.linalg.eig(A)
    x = (V @ torch.diag_embed(torch.exp(lam * t[:, None].to(lam.dtype))) @ torch.linalg.solve(V, torch.tensor([2.0, 0.0], dtype=lam.dtype))).real
    lib = PolynomialLibrary(degree=2)
    fit = fit_mechanistic([x], [t], lib, threshold=0.05, denoise=None, progress=False)
    names = lib.feature_names(n_variables=2)
    got = fit.coefficients[:, [names.index("x"), names.index("y")]]
    assert torch.allclose(got, A, rtol=0, atol=2e-3)
    assert int(fit.mask.sum()) == 4


def test_lorenz_with_noise_exact_least_squares():
    t, x = lorenz_data(0.01)
    fit = fit_mechanistic([x], [t], LIB, threshold=0.5, cycles=4, denoise=None, progress=False)
    check_lorenz(fit.coefficients, 0.01)
    assert [h["cycle"] for h in fit.history] == [1, 2, 3, 4, "final"]


def test_lorenz_network_denoiser_short_run():
    t, x = lorenz_data(0.01, seed=1)
    fit = fit_mechanistic([x], [t], LIB, threshold=0.5, cycles=3, iterations=30, denoise="network", progress=False)
    check_lorenz(fit.coefficients, 0.02)


def test_warm_start_mask_is_persistent():
    t, x = lorenz_data(0.0)
    init = lorenz_truth()
    fit = fit_mechanistic([x], [t], LIB, threshold=1e-3, cycles=2, denoise=None, init_coefficients=init,
                          progress=False)
    assert not (fit.coefficients[init == 0] != 0).any()


def test_bad_arguments():
    t, x = lorenz_data(0.0, n=50)
    with pytest.raises(ValueError, match="denoise must be"):
        fit_mechanistic([x], [t], LIB, threshold=0.1, denoise="kalman")
    with pytest.raises(ValueError, match="at least window = 64 samples"):
        fit_mechanistic([x], [t], LIB, threshold=0.1, window=64)
    with pytest.raises(ValueError, match="init_coefficients must have shape"):
        fit_mechanistic([x], [t], LIB, threshold=0.1, init_coefficients=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="learn_step=True needs"):
        fit_mechanistic([x], [t], LIB, threshold=0.1, denoise=None, learn_step=True)
