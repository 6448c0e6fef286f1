"""SINDy: recovery of known systems, data layouts, controls, sympy export, simulation and batching."""

import pytest
import sympy
import torch

from torchmech import systems
from torchmech.discovery import (
    SINDy,
    STLSQ,
    EnsembleOptimizer,
    FiniteDifference,
    PolynomialLibrary,
    fit_sindy_batch,
    metrics,
    sympy_to_coefficients,
)


def data(name, n, noise=0.0):
    s = systems.get(name)
    t = torch.linspace(*s.t_span, n, dtype=torch.float64)
    return s, t, systems.simulate(s, t, noise=noise, seed=0)


@pytest.mark.parametrize("name, degree, threshold, n", [("lorenz", 2, 0.2, 2000), ("van_der_pol", 3, 0.1, 1000),
                                                        ("lotka_volterra", 2, 0.1, 1000)])
def test_recovers_known_systems_from_clean_data(name, degree, threshold, n):
    s, t, tr = data(name, n)
    lib = PolynomialLibrary(degree)
    model = SINDy(lib, FiniteDifference(2), STLSQ(threshold)).fit(tr.x, t, variable_names=list(s.variables))
    true = s.true_coefficients(lib)
    assert model.coefficients_.shape == true.shape
    assert bool(metrics.exact_recovery(model.coefficients_, true))
    assert float(metrics.coefficient_error(model.coefficients_, true, "max")) < 0.01
    assert model.complexity == int((true != 0).sum())
    assert model.feature_names_ == lib.feature_names(list(s.variables))


def test_equations_sympy_round_trip_and_score():
    s, t, tr = data("lorenz", 1500)
    model = SINDy(optimizer=STLSQ(0.2)).fit(tr.x[0], t)
    assert model.equations(precision=1)[0] == "x' = -10.0 x + 10.0 y"
    exprs = model.to_sympy()
    x, y, z = sympy.symbols("x y z")
    assert exprs[2].coeff(x * y) == pytest.approx(1.0, rel=1e-2)
    back = sympy_to_coefficients(exprs, model.library, ["x", "y", "z"])
    assert torch.allclose(back, model.coefficients_, rtol=1e-12, atol=0)
    # the sympy form evaluates like predict
    f = sympy.lambdify((x, y, z), exprs, "math")
    p = tr.x[0, 100]
    assert torch.allclose(torch.tensor(f(*p.tolist()), dtype=torch.float64), model.predict(p), rtol=1e-10)
    assert model.score(tr.x[1], t) > 0.999
    assert model.score(tr.x[1], t, metric="mse") < 1.0


def test_simulate_matches_held_out_data_float32_and_batch():
    s, t, tr = data("van_der_pol", 800)
    model = SINDy(PolynomialLibrary(3), optimizer=STLSQ(0.1)).fit(tr.x[0], t)
    held = tr.x_clean[1]
    sim = model.simulate(held[0], t)
    assert sim.shape == held.shape
    assert float(metrics.trajectory_r2(sim, held)) > 0.999
    sim32 = model.simulate(tr.x_clean[:, 0].float(), t.float())
    assert sim32.dtype == torch.float32 and sim32.shape == (2, 800, 2)
    assert (sim32[1] - held.float()).abs().max() < 1e-2
    assert model.score(tr.x_clean[1:], t, metric="trajectory_r2") > 0.999


def test_data_layouts_agree():
    s, t, tr = data("lotka_volterra", 600)
    opt = STLSQ(0.1)
    a = SINDy(optimizer=opt).fit(tr.x, t).coefficients_  # (B, T, D) batch
    b = SINDy(optimizer=opt).fit([tr.x[0], tr.x[1]], [t, t]).coefficients_  # list
    c = SINDy(optimizer=opt).fit(list(tr.x.numpy()), float(t[1] - t[0])).coefficients_  # arrays, time step
    assert torch.allclose(a, b) and torch.allclose(a, c, atol=1e-8)
    d = SINDy(optimizer=opt).fit(tr.x_clean[0], t, x_dot=s.vector_field(t, tr.x_clean[0])).coefficients_
    assert torch.allclose(d, s.true_coefficients(PolynomialLibrary(2)), atol=1e-8)


def test_control_input():
    # x' = -x + u, u(t) = sin(t): the control enters the library as a variable
    t = torch.linspace(0, 10, 2001, dtype=torch.float64)
    u = torch.sin(t)[:, None]
    x = (0.5 * (torch.sin(t) - torch.cos(t)) + 1.5 * torch.exp(-t))[:, None]
    model = SINDy(PolynomialLibrary(2), FiniteDifference(4), STLSQ(0.05)).fit(x, t, u=u)
    assert model.feature_names_ == ["1", "x", "u", "x^2", "x*u", "u^2"]
    assert model.equations(2) == ["x' = -1.00 x + 1.00 u"]
    sim = model.simulate(x[0], t, u=u)
    assert (sim - x).abs().max() < 1e-3
    sim_fn = model.simulate(x[0], t, u=lambda s: torch.sin(s)[:, None])
    assert (sim_fn - x).abs().max() < 1e-3
    with pytest.raises(ValueError, match="u: the model was fitted with 1 control"):
        model.predict(x)


def test_ensemble_inclusion_probabilities_exposed():
    s, t, tr = data("lorenz", 1000, noise=0.01)
    model = SINDy(optimizer=EnsembleOptimizer(STLSQ(0.5), n_models=20, seed=0)).fit(tr.x, t)
    p = model.inclusion_probabilities_
    true = s.true_coefficients(model.library)
    assert p.shape == true.shape and (p[true != 0] == 1).all()
    assert bool(metrics.exact_recovery(model.coefficients_, true))


def test_batched_independent_problems():
    # two Lotka-Volterra parameter sets and one damped oscillator (all D = 2) in one call
    t = torch.linspace(0, 10, 1000, dtype=torch.float64)
    lv = systems.simulate("lotka_volterra", t, y0=[[5.0, 2.0], [5.0, 2.0]], params={"alpha": torch.tensor([1.5, 1.0])})
    osc = systems.simulate("damped_oscillator", t, y0=[1.0, 0.0])
    x = torch.cat([lv.x, osc.x[None]])
    lib = PolynomialLibrary(2)
    C = fit_sindy_batch(x, t, lib, FiniteDifference(2), STLSQ(0.05))
    assert C.shape == (3, 2, 6)
    true = torch.stack([systems.get("lotka_volterra").true_coefficients(lib, params={"alpha": a}) for a in (1.5, 1.0)]
                       + [systems.get("damped_oscillator").true_coefficients(lib)])
    assert metrics.exact_recovery(C, true).all()
    assert (metrics.coefficient_error(C, true, "max") < 0.01).all()


def test_bad_inputs():
    with pytest.raises(TypeError, match="optimizer"):
        SINDy(optimizer="stlsq")
    with pytest.raises(TypeError, match="library"):
        SINDy(library=PolynomialLibrary)
    model = SINDy()
    with pytest.raises(RuntimeError, match="call fit"):
        model.equations()
    with pytest.raises(ValueError, match=r"t: expected shape \(50,\)"):
        model.fit(torch.randn(50, 2), torch.arange(40.0))
    with pytest.raises(ValueError, match="x\\[0\\]: expected finite"):
        model.fit(torch.full((50, 2), float("nan")), 0.1)
    with pytest.raises(ValueError, match="fewer than the 10 library features"):
        model.fit(torch.randn(5, 3), 0.1)
    with pytest.raises(ValueError, match="x: expected shape"):
        model.fit(torch.randn(50), 0.1)
    with pytest.raises(ValueError, match="variable_names: expected 2 names"):
        model.fit(torch.randn(50, 2), 0.1, variable_names=["a"])
    model.fit(torch.randn(50, 2, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match=r"x0: expected shape \(2,\)"):
        model.simulate(torch.zeros(3), torch.linspace(0, 1, 5))
    with pytest.raises(ValueError, match="metric"):
        model.score(torch.randn(50, 2), 0.1, metric="aic")


def test_time_as_python_list():
    s, t, tr = data("lotka_volterra", 600)
    a = SINDy(optimizer=STLSQ(0.1)).fit(tr.x, t).coefficients_
    b = SINDy(optimizer=STLSQ(0.1)).fit(tr.x, t.tolist()).coefficients_  # one grid as a list of numbers
    step = float(t[1] - t[0])
    c = SINDy(optimizer=STLSQ(0.1)).fit([tr.x[0], tr.x[1]], [step, step]).coefficients_  # one step per trajectory
    assert torch.allclose(a, b) and torch.allclose(a, c, atol=1e-8)


def test_float32_data_on_a_late_fine_clock_keeps_time_precision():
    # x' = -x sampled every 1e-3 around t = 1000: in float32 those times would be off by up to 6%
    t = 1000.0 + 1e-3 * torch.arange(400, dtype=torch.float64)
    x = torch.exp(-(t - 1000.0))[:, None].float()
    model = SINDy(PolynomialLibrary(1), FiniteDifference(2), STLSQ(0.05)).fit(x, t)
    assert model.coefficients_.dtype == torch.float32
    assert model.coefficients_[0, 1] == pytest.approx(-1.0, rel=1e-4) and model.complexity == 1
    assert model.simulate(torch.zeros(0, 1), t[:5].float()).shape == (0, 5, 1)  # an empty batch is fine


def test_weak_sindy_exact_on_clean_data_and_robust_to_noise():
    from torchmech.discovery.differentiation import WeakForm

    lib = PolynomialLibrary(3)
    t = torch.linspace(0, 10, 512, dtype=torch.float64)
    true = systems.get("lorenz").true_coefficients(lib)
    clean = systems.simulate("lorenz", t, y0=[-8.0, 8.0, 27.0])
    model = SINDy(lib, WeakForm(), STLSQ(0.5)).fit(clean.x, t)
    assert bool(metrics.exact_recovery(model.coefficients_, true))
    assert float(metrics.coefficient_error(model.coefficients_, true, "max")) < 1e-4
    fd = SINDy(lib, FiniteDifference(2), STLSQ(0.5)).fit(clean.x, t)  # same data: truncation error shows
    assert float(metrics.coefficient_error(fd.coefficients_, true, "max")) > 100 * float(
        metrics.coefficient_error(model.coefficients_, true, "max"))
    assert model.n_samples_ == WeakForm().weak_system(clean.x, t, clean.x)[0].shape[0]
    t = torch.linspace(0, 10, 1000, dtype=torch.float64)
    noisy = systems.simulate("lorenz", t, noise=0.02, seed=1)  # both default initial conditions, pooled
    weak = SINDy(lib, WeakForm(), STLSQ(0.2, alpha="auto")).fit(noisy.x, t)
    fd = SINDy(lib, FiniteDifference(2), STLSQ(0.2, alpha="auto")).fit(noisy.x, t)
    assert bool(metrics.exact_recovery(weak.coefficients_, true))
    weak_err = float(metrics.coefficient_error(weak.coefficients_, true, "median"))
    assert weak_err < 0.005 and weak_err < float(metrics.coefficient_error(fd.coefficients_, true, "median")) / 5
    assert weak.score(noisy.x_clean, t, x_dot=systems.get("lorenz").vector_field(t, noisy.x_clean)) > 0.999
    # lists of unequal trajectories
    lists = SINDy(lib, WeakForm(), STLSQ(0.2, alpha="auto")).fit([noisy.x[0], noisy.x[1, :700]], [t, t[:700]])
    assert bool(metrics.exact_recovery(lists.coefficients_, true))
    assert lists.n_samples_ == sum(WeakForm().weak_system(x, t[:len(x)], x)[0].shape[0]
                                   for x in (noisy.x[0], noisy.x[1, :700]))


def test_fit_sindy_batch_weak_and_cv_threshold_selection():
    from torchmech.discovery.differentiation import WeakForm
    from torchmech.discovery.sindy import fit_sindy_cv

    lib = PolynomialLibrary(3)
    t = torch.linspace(0, 10, 1000, dtype=torch.float64)
    lv = systems.simulate("lotka_volterra", t, noise=0.02, seed=0)  # two initial conditions each
    vdp = systems.simulate("van_der_pol", t, noise=0.02, seed=1)
    x = torch.cat([lv.x, vdp.x])
    C = fit_sindy_batch(x, t, lib, WeakForm(), STLSQ(0.05, alpha="auto"))
    assert C.shape == (4, 2, 10)
    assert torch.allclose(C[2], SINDy(lib, WeakForm(), STLSQ(0.05, alpha="auto")).fit(vdp.x[0], t).coefficients_)
    grid = (0.001, 0.01, 0.1, 0.5, 5.0)
    res = fit_sindy_cv(vdp.x, t, lib, WeakForm(), STLSQ(alpha="auto"), thresholds=grid[::-1])  # any order
    true = systems.get("van_der_pol").true_coefficients(lib).expand(2, 2, 10)
    assert res.coefficients.shape == (2, 2, 10) and res.threshold.shape == (2, 2)
    assert res.path.shape == (5, 2, 2, 10) and res.cv_error.shape == (5, 2, 2, 5)
    assert torch.equal(res.thresholds, torch.tensor(grid, dtype=torch.float64))
    assert metrics.exact_recovery(res.coefficients, true).all()  # chosen without the truth
    assert (res.threshold < 5.0).all()  # the largest threshold empties the model: never chosen
    for b in range(2):
        for d in range(2):
            assert torch.equal(res.coefficients[b, d], res.path[res.index[b, d], b, d])
    lorenz = systems.simulate("lorenz", t, noise=0.01, seed=0)
    lib2 = PolynomialLibrary(2)
    res = fit_sindy_cv(lorenz.x, t, lib2, WeakForm(), STLSQ(alpha="auto"), thresholds=grid)
    assert metrics.exact_recovery(res.coefficients, systems.get("lorenz").true_coefficients(lib2).expand(2, 3, 10)).all()
    shared = fit_sindy_cv(x, t, lib, WeakForm(), STLSQ(alpha="auto"), thresholds=(0.05, 0.001), per_equation=False)
    assert (shared.threshold[:, 0] == shared.threshold[:, 1]).all()
    ens = fit_sindy_cv(x[:1], t, lib, FiniteDifference(2), EnsembleOptimizer(STLSQ(), n_models=4, seed=0),
                       thresholds=(0.05, 0.2), folds=3)
    assert ens.coefficients.shape == (1, 2, 10) and ens.cv_error.shape == (2, 1, 2, 3)
    with pytest.raises(ValueError, match="folds"):
        fit_sindy_cv(x, t, lib, folds=1)
    with pytest.raises(ValueError, match="thresholds"):
        fit_sindy_cv(x, t, lib, thresholds=())


def test_backward_path_is_nested_and_contains_the_true_support():
    from torchmech.discovery.optimizers import _normalized_stats
    from torchmech.discovery.sindy import backward_path

    g = torch.Generator().manual_seed(0)
    B, N, F = 4, 200, 8
    Theta = torch.randn(B, N, F, generator=g, dtype=torch.float64)
    Theta[..., 5] = Theta[..., 4] + 0.05 * Theta[..., 5]  # a nearly collinear pair, only column 4 is true
    true = torch.zeros(B, F, 2, dtype=torch.float64)
    true[:, 0, 0], true[:, 4, 0], true[:, 2, 1], true[:, 7, 1] = 0.05, 3.0, -1.0, 0.2  # small terms included
    dx = Theta @ true + 1e-3 * torch.randn(B, N, 2, generator=g, dtype=torch.float64)
    st = _normalized_stats(Theta, dx)
    allowed = torch.ones(B, F, 2, dtype=torch.bool)
    path = backward_path(st.G, st.b, allowed, 0.0)
    assert path.shape == (F, B, F, 2)
    sizes = path.sum(2)  # (F, B, 2)
    assert torch.equal(sizes, torch.arange(F, 0, -1)[:, None, None].expand(F, B, 2))
    assert (path[1:] <= path[:-1]).all()  # nested
    assert torch.equal(path[F - 2], true != 0)  # two terms left: exactly the true ones, small ones kept
    part = allowed.clone()
    part[:, 3] = False
    assert not backward_path(st.G, st.b, part, 0.0)[:, :, 3].any()  # never adds a disallowed term


def test_fit_sindy_cv_support_search():
    from torchmech.discovery.differentiation import WeakForm
    from torchmech.discovery.sindy import fit_sindy_cv

    t = torch.linspace(0, 10, 1000, dtype=torch.float64)
    lib = PolynomialLibrary(3)
    grid = (0.001, 0.01, 0.1, 0.5)
    for name, noise in (("van_der_pol", 0.05), ("lotka_volterra", 0.05), ("lorenz", 0.0)):
        data = systems.simulate(name, t, noise=noise, seed=2)
        res = fit_sindy_cv(data.x, t, lib, WeakForm(), STLSQ(alpha="auto"), thresholds=grid, search="support")
        Bn, Dn = data.x.shape[0], data.x.shape[-1]
        F = lib.n_features(Dn)
        assert res.path.shape == (len(grid) + F, Bn, Dn, F) and res.cv_error.shape == (len(grid) + F, Bn, Dn, 5)
        true = systems.get(name).true_coefficients(lib).expand(Bn, Dn, F)
        assert metrics.exact_recovery(res.coefficients, true).all(), name  # chosen without the truth
        assert metrics.coefficient_error(res.coefficients[0], true[0], "median") < 0.05
        from_grid = res.index < len(grid)
        assert torch.isnan(res.threshold[~from_grid]).all()
        assert torch.equal(res.threshold[from_grid], res.thresholds[res.index[from_grid]])
        for b in range(Bn):
            for d in range(Dn):
                assert torch.equal(res.coefficients[b, d], res.path[res.index[b, d], b, d])
    x = systems.simulate("van_der_pol", t, noise=0.01, seed=0).x
    with pytest.raises(TypeError, match="STLSQ"):
        fit_sindy_cv(x, t, lib, optimizer=EnsembleOptimizer(STLSQ(), n_models=2), search="support")
    with pytest.raises(ValueError, match="per_equation"):
        fit_sindy_cv(x, t, lib, search="support", per_equation=False)
    with pytest.raises(ValueError, match="search"):
        fit_sindy_cv(x, t, lib, search="greedy")


def test_select_threshold_rules():
    import math

    from torchmech.discovery.sindy import select_threshold

    # scores are log errors: thresholds 0-3 have mean log errors 0, 0.05, 0.4, 2 (relative to the best);
    # the best threshold's fold scores (-1, 0, 1) have standard error 1/sqrt(3) = 0.577
    base = torch.tensor([-1.0, 0.0, 1.0])
    e = torch.exp(torch.stack([base, base + 0.05, base + 0.4, base + 2.0]))
    assert int(select_threshold(e[:, None])[0]) == 2
    assert int(select_threshold(e[:, None], one_se=False)[0]) == 0
    # one fold that the models cannot extrapolate to does not swamp the others on the log scale:
    # threshold 1 is 10x worse on two folds and slightly better on the blown-up one
    blowup = torch.tensor([[1e6, 1.0, 1.0], [0.9e6, 10.0, 10.0]])
    assert int(select_threshold(blowup[:, None], one_se=False)[0]) == 0
    tight = torch.tensor([[1.0, 1.0, 1.0], [1.1, 1.1, 1.1], [0.9, 1.0, 1.2]])  # no spread at the best
    assert int(select_threshold(tight[:, None])[0]) == 0
    batched = torch.stack([e, e.flip(0)], 1)  # (G, 2, K): the second problem prefers the last threshold
    assert select_threshold(batched).tolist() == [2, 3]
    assert int(select_threshold(torch.zeros(2, 1, 3))[0]) == 1  # exact fits everywhere: the sparsest
    with pytest.raises(ValueError, match="cv_error"):
        select_threshold(torch.zeros(3))
    assert math.isfinite(float(select_threshold(torch.tensor([[float("nan"), 1.0], [1.0, 1.0]])[:, None])[0]))


def test_select_support_orders_by_size():
    from torchmech.discovery.sindy import select_support

    folds = torch.tensor([1.0, 1.1, 0.9])
    e = torch.stack([folds * 1e-2, folds * 10.0, folds * 1.05e-2, folds * 2e-2])[:, None]  # (4 candidates, 1, K)
    size = torch.tensor([[5], [1], [2], [2]])
    assert int(select_support(e, size)[0]) == 2  # the sparsest within one SE; of the two 2-term ones the better
    assert int(select_support(e, size, one_se=False)[0]) == 0
    with pytest.raises(ValueError, match="size"):
        select_support(e, size[:3])


def test_select_support_takes_the_null_model_only_when_it_is_best():
    from torchmech.discovery.sindy import select_support

    # a transient in the first fold only: the null model (size 0) is 4x worse there and within one SE on
    # the mean, so the one-SE rule alone would take it; it is admissible only as the best candidate
    folds = torch.tensor([1.0, 0.01, 0.01, 0.01])
    e = torch.stack([folds * 0.5, folds * 0.55, torch.tensor([4.0, 0.01, 0.01, 0.01])])[:, None]
    size = torch.tensor([[3], [2], [0]])
    assert int(select_support(e, size)[0]) == 1
    null_best = torch.stack([folds * 2.0, folds * 3.0, folds])[:, None]
    assert int(select_support(null_best, size)[0]) == 2
    only_null = torch.ones(2, 1, 3)
    assert int(select_support(only_null, torch.zeros(2, 1))[0]) in (0, 1)
    # the threshold rule takes the same sizes optionally (thresholds increase: the last one gives the null model)
    from torchmech.discovery.sindy import select_threshold

    assert int(select_threshold(e)[0]) == 2
    assert int(select_threshold(e, size=size)[0]) == 1
    assert int(select_threshold(null_best, size=size)[0]) == 2
    with pytest.raises(ValueError, match="size"):
        select_threshold(e, size=size[:2])


def test_support_search_does_not_stop_the_dynamics_of_a_settling_trajectory():
    # odebench_06 from its second initial condition settles within the first of the 5 blocks; at 5% noise
    # the null model x' = 0 was within one SE of the true two-term model and won the one-SE rule
    from torchmech.discovery.differentiation import WeakForm
    from torchmech.discovery.sindy import fit_sindy_cv

    t = torch.linspace(0, 10, 512, dtype=torch.float64)
    lib = PolynomialLibrary(3)
    x = systems.simulate("odebench_06", t, noise=0.05, seed=0).x[1:]
    res = fit_sindy_cv(x, t, lib, WeakForm(), STLSQ(alpha="auto"), folds=5, search="support")
    assert metrics.exact_recovery(res.coefficients[0], systems.get("odebench_06").true_coefficients(lib))


def test_fit_sindy_cv_pools_a_list_of_trajectories_into_one_problem():
    from torchmech.discovery.differentiation import WeakForm
    from torchmech.discovery.sindy import fit_sindy_cv

    t = torch.linspace(0, 10, 800, dtype=torch.float64)
    x = systems.simulate("lorenz", t, noise=0.02, seed=3).x
    lib = PolynomialLibrary(2)
    xs, ts = [x[0], x[1, :500]], [t, t[:500]]
    res = fit_sindy_cv(xs, ts, lib, WeakForm(), STLSQ(alpha="auto"), search="support")
    assert res.coefficients.shape == (1, 3, 10)
    assert metrics.exact_recovery(res.coefficients[0], systems.get("lorenz").true_coefficients(lib))
    # a one-trajectory list is the same problem as a batch of one
    single = fit_sindy_cv(x[:1], t, lib, WeakForm(), STLSQ(alpha="auto"), search="support")
    assert torch.equal(fit_sindy_cv([x[0]], [t], lib, WeakForm(), STLSQ(alpha="auto"), search="support").coefficients,
                       single.coefficients)
