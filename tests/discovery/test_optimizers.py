"""Sparse regression: exact recovery on noise-free problems, batching, ensembles and input checks."""

import numpy as np
import pytest
import torch

from torchmech.discovery.optimizers import SR3, STLSQ, EnsembleOptimizer


def sparse_problem(B=6, T=200, F=10, D=3, seed=0, dtype=torch.float64, uneven=True):
    g = torch.Generator().manual_seed(seed)
    Theta = torch.randn(B, T, F, generator=g, dtype=dtype)
    if uneven:  # feature scales from 0.1 to 10
        Theta = Theta * torch.logspace(-1, 1, F, dtype=dtype)
    support = torch.rand(B, F, D, generator=g) < 0.3
    values = (torch.rand(B, F, D, generator=g, dtype=dtype) + 0.5) * torch.randn(B, F, D, generator=g, dtype=dtype).sign()
    Xi = torch.where(support, values, torch.zeros_like(values))
    return Theta, Theta @ Xi, Xi


@pytest.mark.parametrize("opt", [STLSQ(0.2), STLSQ(0.2, alpha=1e-8), STLSQ(0.2, normalize_columns=False),
                                 SR3(0.2), SR3(0.2, thresholder="l1")])
def test_exact_recovery_batched(opt):
    Theta, dX, Xi = sparse_problem()
    coef = opt.fit(Theta, dX).coef_
    assert coef.shape == Xi.shape
    assert torch.equal(coef != 0, Xi != 0)
    assert torch.allclose(coef, Xi, atol=1e-6)
    single = type(opt)(**{k: v for k, v in vars(opt).items() if k in ("threshold",)}).fit(Theta[2], dX[2]).coef_
    assert single.shape == Xi[2].shape and torch.equal(single != 0, Xi[2] != 0)


def test_float32_mask_and_per_problem_threshold():
    Theta, dX, Xi = sparse_problem(dtype=torch.float32)
    coef = STLSQ(0.2).fit(Theta, dX).coef_
    assert coef.dtype == torch.float32 and torch.equal(coef != 0, Xi != 0)
    assert torch.allclose(coef, Xi, atol=1e-4)
    mask = torch.ones(10, dtype=torch.bool)
    mask[0] = False
    assert (STLSQ(0.2).fit(Theta, dX, mask=mask).coef_[:, 0] == 0).all()
    big = STLSQ(torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2, 100.0])).fit(Theta, dX).coef_
    assert (big[5] == 0).all() and torch.equal(big[0] != 0, Xi[0] != 0)


def test_ensemble_inclusion_probabilities():
    Theta, dX, Xi = sparse_problem(B=3, uneven=False)
    g = torch.Generator().manual_seed(1)
    noisy = dX + 0.05 * dX.std() * torch.randn(dX.shape, generator=g, dtype=dX.dtype)
    ens = EnsembleOptimizer(STLSQ(0.2), n_models=40, seed=0).fit(Theta, noisy)
    p = ens.inclusion_probabilities_
    assert p.shape == Xi.shape and ens.coefs_.shape == (3, 40, 10, 3)
    assert (p[Xi != 0] > 0.9).all() and (p[Xi == 0] < 0.1).all()
    assert torch.equal(ens.coef_ != 0, Xi != 0)
    assert (ens.coef_ - Xi).abs().max() < 0.05
    lib = EnsembleOptimizer(SR3(0.2), n_models=30, bagging=False, library_bagging=True, n_drop=2, seed=0)
    q = lib.fit(Theta[0], dX[0]).inclusion_probabilities_
    assert q.shape == (10, 3) and ((q >= 0) & (q <= 1)).all()
    assert (q[Xi[0] != 0] > 0.8).all() and q[Xi[0] == 0].mean() < 0.2
    thresholded = EnsembleOptimizer(STLSQ(0.2), n_models=10, seed=0, inclusion_threshold=0.99).fit(Theta, noisy)
    assert (thresholded.coef_[thresholded.inclusion_probabilities_ < 0.99] == 0).all()


def test_bad_inputs():
    Theta, dX, _ = sparse_problem()
    with pytest.raises(ValueError, match="threshold"):
        STLSQ(-1.0)
    with pytest.raises(ValueError, match="alpha"):
        STLSQ(0.1, alpha=-1)
    with pytest.raises(ValueError, match="dX: expected shape"):
        STLSQ().fit(Theta, dX[:, :5])
    with pytest.raises(ValueError, match="Theta: expected finite"):
        STLSQ().fit(torch.full_like(Theta, float("nan")), dX)
    with pytest.raises(TypeError, match="Theta: expected a torch.Tensor"):
        STLSQ().fit(Theta.numpy(), dX)
    with pytest.raises(ValueError, match="thresholder"):
        SR3(thresholder="l2")
    with pytest.raises(TypeError, match="base"):
        EnsembleOptimizer(base="stlsq")
    with pytest.raises(ValueError, match="n_drop"):
        EnsembleOptimizer(library_bagging=True, n_drop=10).fit(Theta, dX)


def test_threshold_tensor_shapes_are_read_without_guessing():
    # B == D == 3: a (B,) tensor is one threshold per problem, never per target
    Theta, dX, Xi = sparse_problem(B=3, D=3)
    per_problem = STLSQ(torch.tensor([0.2, 100.0, 0.2])).fit(Theta, dX).coef_
    assert (per_problem[1] == 0).all()
    assert torch.equal(per_problem[0] != 0, Xi[0] != 0) and torch.equal(per_problem[2] != 0, Xi[2] != 0)
    per_target = STLSQ(torch.tensor([[0.2, 0.2, 100.0]])).fit(Theta, dX).coef_  # (1, D)
    assert (per_target[..., 2] == 0).all() and torch.equal(per_target[..., :2] != 0, Xi[..., :2] != 0)
    unbatched = SR3(torch.tensor([0.2, 100.0, 0.2])).fit(Theta[0], dX[0]).coef_  # (D,) per target
    assert (unbatched[:, 1] == 0).all() and torch.equal(unbatched[:, 0] != 0, Xi[0, :, 0] != 0)
    with pytest.raises(ValueError, match=r"threshold: expected a number, \(3,\) per problem"):
        STLSQ(torch.tensor([0.1, 0.2])).fit(Theta, dX)


def test_ensemble_with_per_problem_threshold():
    Theta, dX, Xi = sparse_problem(B=4)
    ens = EnsembleOptimizer(STLSQ(torch.tensor([0.2, 0.2, 100.0, 0.2])), n_models=8, seed=0).fit(Theta, dX)
    assert (ens.coef_[2] == 0).all() and (ens.inclusion_probabilities_[2] == 0).all()
    for b in (0, 1, 3):
        assert torch.equal(ens.coef_[b] != 0, Xi[b] != 0)
        assert (ens.inclusion_probabilities_[b][Xi[b] != 0] == 1).all()


def test_auto_ridge_is_plain_least_squares_on_exact_data_even_when_collinear():
    Theta, dX, Xi = sparse_problem(B=3)
    # two nearly collinear extra columns, not in the model
    g = torch.Generator().manual_seed(5)
    extra = Theta[..., :1] + 1e-3 * torch.randn(Theta.shape[:-1] + (1,), generator=g, dtype=Theta.dtype)
    Theta2 = torch.cat([Theta, extra], -1)
    Xi2 = torch.cat([Xi, torch.zeros_like(Xi[:, :1])], 1)
    opt = STLSQ(0.2, alpha="auto").fit(Theta2, Theta2 @ Xi2)
    assert opt.alpha_.shape == (3, 3) and (opt.alpha_ < 1e-12).all()
    assert torch.equal(opt.coef_ != 0, Xi2 != 0) and torch.allclose(opt.coef_, Xi2, atol=1e-6)
    assert opt.alpha == "auto" and "alpha='auto'" in repr(opt)


def test_auto_ridge_matches_its_formula_on_noisy_data():
    # alpha_ = s^2 / (n prior_scale^2), s^2 the mean squared residual of least squares on all features
    Theta, dX, Xi = sparse_problem(B=2, T=300)
    g = torch.Generator().manual_seed(6)
    noisy = dX + 0.5 * torch.randn(dX.shape, generator=g, dtype=dX.dtype)
    ols = torch.linalg.lstsq(Theta, noisy).solution
    s2 = (Theta @ ols - noisy).square().mean(-2)  # (B, D)
    for tau in (1.0, 0.1):
        opt = STLSQ(0.2, alpha="auto", prior_scale=tau).fit(Theta, noisy)
        assert torch.allclose(opt.alpha_, s2 / (300 * tau**2), rtol=1e-6)
    # the ridge shrinks: a tiny prior scale pulls every kept coefficient towards zero
    loose = STLSQ(0.0, alpha="auto", prior_scale=100.0).fit(Theta, noisy).coef_
    tight = STLSQ(0.0, alpha="auto", prior_scale=1e-3).fit(Theta, noisy).coef_
    assert tight.abs().sum() < 0.5 * loose.abs().sum()
    assert torch.allclose(loose, ols, atol=1e-3)
    # unbatched, with sample weights and inside an ensemble
    single = STLSQ(0.2, alpha="auto").fit(Theta[0], noisy[0], sample_weight=torch.ones(300, dtype=Theta.dtype))
    assert single.alpha_.shape == (3,) and torch.allclose(single.alpha_, s2[0] / 300, rtol=1e-6)
    ens = EnsembleOptimizer(STLSQ(0.2, alpha="auto"), n_models=5, seed=0).fit(Theta, noisy)
    assert ens.coef_.shape == Xi.shape and torch.isfinite(ens.coef_).all()


def test_masked_ridge_per_coefficient_weights():
    from torchmech.discovery.optimizers import masked_ridge

    g = torch.Generator().manual_seed(7)
    A = torch.randn(2, 30, 4, generator=g, dtype=torch.float64)
    G = A.transpose(1, 2) @ A / 30
    b = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    alpha = torch.rand(2, 4, 3, generator=g, dtype=torch.float64)
    support = torch.ones(2, 4, 3, dtype=torch.bool)
    support[0, 1, 2] = False
    out = masked_ridge(G, b, support, alpha)
    for i in range(2):
        for d in range(3):
            keep = support[i, :, d]
            Gs = G[i][keep][:, keep] + torch.diag(alpha[i, keep, d])
            ref = torch.linalg.solve(Gs, b[i, keep, d])
            assert torch.allclose(out[i, keep, d], ref) and (out[i, ~keep, d] == 0).all()


def test_auto_ridge_bad_inputs():
    with pytest.raises(ValueError, match="alpha: expected 'auto' or a finite number"):
        STLSQ(0.1, alpha="ridge")
    with pytest.raises(ValueError, match="prior_scale"):
        STLSQ(0.1, alpha="auto", prior_scale=0.0)


def test_sr3_default_recovers_clean_lotka_volterra():
    """With nu = 1 on the unit-RMS problem the relaxation dominated: clean Lotka-Volterra gave x' = 0, y' = 0."""
    from scipy.integrate import solve_ivp

    from torchmech.discovery import SINDy
    from torchmech.discovery.differentiation import FiniteDifference
    from torchmech.discovery.library import PolynomialLibrary

    t = np.linspace(0, 30, 1500)
    f = lambda _t, s: [s[0] - 0.5 * s[0] * s[1], -1.5 * s[1] + 0.75 * s[0] * s[1]]  # noqa: E731
    xs = [torch.tensor(solve_ivp(f, (0, 30), y0, t_eval=t, rtol=1e-10, atol=1e-10).y.T) for y0 in ([2, 1], [1, 3])]
    model = SINDy(PolynomialLibrary(2), FiniteDifference(2), SR3(threshold=0.2)).fit(xs, [torch.tensor(t)] * 2)
    assert model.equations() == ["x' = 1.000 x - 0.500 x*y", "y' = -1.500 y + 0.750 x*y"]
