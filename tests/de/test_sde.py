"""SDE solvers through torchmech.de.solve: strong/weak orders on closed forms, noise types, errors."""

import math

import numpy as np
import pytest
import torch

import torchmech.de as de
from torchmech.de.solvers.sde import (
    SRA1,
    EulerHeun,
    EulerMaruyama,
    Milstein,
    ReversibleHeun,
    StochasticHeun,
    StochasticMidpoint,
)
from torchmech.de.terms import DiagonalControlTerm

DT = torch.float64
M = 2000
NS = (8, 16, 32, 64)


def _slope(errs, Ns):
    return float(np.polyfit(np.log(1.0 / np.asarray(Ns)), np.log(errs), 1)[0])


def _gbm_errors(solver, stratonovich, Ns=NS):
    """GBM dy = mu y dt + sig y dW (Ito) or o dW (Stratonovich); errors against the closed form
    on the same Brownian path: (strong E|e|, weak |E e|) per step count."""
    mu, sig = 0.5, 0.8
    bm = de.BrownianInterval(0.0, 1.0, (M, 1), dtype=DT, seed=1)
    terms = de.MultiTerm(de.ODETerm(lambda t, y, a: mu * y), DiagonalControlTerm(lambda t, y, a: sig * y, bm))
    y0 = torch.ones(M, 1, dtype=DT)
    exact = y0 * torch.exp((mu if stratonovich else mu - sig ** 2 / 2) + sig * bm(0.0, 1.0))
    strong, weak = [], []
    for N in Ns:
        e = de.solve(terms, solver, 0.0, 1.0, y0, dt0=1.0 / N, max_steps=1000).ys[:, -1] - exact
        strong.append(e.abs().mean().item())
        weak.append(e.mean().abs().item())
    return strong, weak


@pytest.mark.parametrize("solver,strat,strong_order", [
    (EulerMaruyama(), False, 0.5),
    (Milstein("ito"), False, 1.0),
    (Milstein("stratonovich"), True, 1.0),
    (StochasticHeun(), True, 1.0),
    (StochasticMidpoint(), True, 1.0),  # commutative (diagonal) noise
    (EulerHeun(), True, 1.0),  # commutative (diagonal) noise
    (ReversibleHeun(), True, 1.0),  # observed on GBM (scalar noise); 0.5 in general
])
def test_gbm_strong_and_weak_orders(solver, strat, strong_order):
    strong, weak = _gbm_errors(solver, strat)
    assert abs(_slope(strong, NS) - strong_order) < 0.15, strong
    assert _slope(weak, NS) > solver.weak_order - 0.25, weak
    assert strong[-1] < 0.1


def test_ito_solver_on_stratonovich_problem_converges_to_ito_solution():
    # Euler-Maruyama must converge to the Ito solution, not the Stratonovich one
    strong_ito, _ = _gbm_errors(EulerMaruyama(), False, Ns=(64,))
    strong_strat, _ = _gbm_errors(EulerMaruyama(), True, Ns=(64,))
    assert strong_ito[0] < 0.5 * strong_strat[0]


def _ou_terms(levy="space-time", n=1000):
    th, sig = 1.5, 0.8
    bm = de.BrownianInterval(0.0, 1.0, (n, 1), dtype=DT, seed=2, levy_area=levy)
    drift = de.ODETerm(lambda t, y, a: -th * y + torch.sin(3 * t)[:, None])
    diff = DiagonalControlTerm(lambda t, y, a: sig * (1 + t[:, None]) * torch.ones_like(y), bm)
    return de.MultiTerm(drift, diff), torch.ones(n, 1, dtype=DT)


def test_ou_additive_noise_orders():
    """Time-dependent OU (additive noise) against a 1024-step SRA1 reference on the same path."""
    terms, y0 = _ou_terms()
    Ns = (4, 8, 16, 32)
    ref = de.solve(terms, SRA1(), 0.0, 1.0, y0, dt0=1.0 / 1024, max_steps=2000).ys[:, -1]
    for solver, order in ((SRA1(), 1.5), (EulerMaruyama(), 1.0), (StochasticHeun(), 1.0)):
        errs = [(de.solve(terms, solver, 0.0, 1.0, y0, dt0=1.0 / N).ys[:, -1] - ref).abs().mean().item()
                for N in Ns]
        s = _slope(errs, Ns)
        assert order - 0.15 < s < order + 0.7, (type(solver).__name__, errs)
    # the space-time Levy area matters: SRA1 beats Heun by far at the same step
    e_sra = (de.solve(terms, SRA1(), 0.0, 1.0, y0, dt0=1 / 16).ys[:, -1] - ref).abs().mean()
    e_heun = (de.solve(terms, StochasticHeun(), 0.0, 1.0, y0, dt0=1 / 16).ys[:, -1] - ref).abs().mean()
    assert e_sra < 0.2 * e_heun


def test_sra1_evaluates_the_diffusion_once_per_step():
    """Additive noise: g(t1, .) from the step is the next step's g(t0, .), not evaluated again."""
    calls = {"f": 0, "g": 0}
    bm = de.BrownianInterval(0.0, 1.0, (3, 2), dtype=DT, seed=0, levy_area="space-time")

    def f(t, y, a):
        calls["f"] += 1
        return -y

    def g(t, y, a):
        calls["g"] += 1
        return (1 + t[:, None]) * torch.ones_like(y)

    terms = de.MultiTerm(de.ODETerm(f), DiagonalControlTerm(g, bm))
    sol = de.solve(terms, SRA1(), 0.0, 1.0, torch.ones(3, 2, dtype=DT), dt0=0.1)
    assert calls == {"f": 1 + 2 * 10, "g": 1 + 1 + 10}  # (one g call checks that g ignores y)
    assert (sol.stats["num_fevals"] == 1 + 3 * 10).all()


@pytest.mark.parametrize("grad", [False, True])
def test_milstein_evaluates_the_diffusion_once_per_step(grad):
    """g is evaluated once per step (with its derivative) and the drift once; without grad no graph is kept."""
    calls = {"f": 0, "g": 0}
    bm = de.BrownianInterval(0.0, 1.0, (3, 2), dtype=DT, seed=0)
    a = torch.tensor(0.5, dtype=DT, requires_grad=True)

    def f(t, y, args):
        calls["f"] += 1
        return -y

    def g(t, y, args):
        calls["g"] += 1
        return a * torch.sin(y)

    terms = de.MultiTerm(de.ODETerm(f), DiagonalControlTerm(g, bm))
    y0 = torch.ones(3, 2, dtype=DT)
    with torch.set_grad_enabled(grad):
        sol = de.solve(terms, Milstein(), 0.0, 1.0, y0, dt0=0.1)
    assert calls == {"f": 1 + 10, "g": 1 + 10}
    assert sol.ys.requires_grad == grad
    # the same solve written out: y1 = y0 + f h + g dW + 1/2 g g' (dW^2 - h)
    y = y0
    for k in range(10):
        t0, t1 = k / 10, (k + 1) / 10 if k < 9 else 1.0
        dw = bm.evaluate(t0, t1)
        gy = a.detach() * torch.sin(y)
        y = y - y * (t1 - t0) + gy * dw + 0.5 * gy * a.detach() * torch.cos(y) * (dw * dw - (t1 - t0))
    torch.testing.assert_close(sol.ys[:, -1].detach(), y, rtol=1e-9, atol=1e-9)  # grid times round differently
    if grad:  # d y_T / d a through g and g g' against finite differences
        (ga,) = torch.autograd.grad(sol.ys[:, -1].sum(), a)
        eps = 1e-6
        with torch.no_grad():
            a += eps
            up = de.solve(terms, Milstein(), 0.0, 1.0, y0, dt0=0.1).ys[:, -1].sum()
            a -= 2 * eps
            dn = de.solve(terms, Milstein(), 0.0, 1.0, y0, dt0=0.1).ys[:, -1].sum()
            a += eps
        torch.testing.assert_close(ga, (up - dn) / (2 * eps), rtol=1e-6, atol=1e-8)


def test_ou_stationary_variance_weak():
    """Weak check on OU statistics: E y_T and Var y_T against the closed form."""
    th, sig, n = 1.0, 0.6, 20000
    bm = de.BrownianInterval(0.0, 2.0, (n, 1), dtype=DT, seed=4)
    terms = de.MultiTerm(de.ODETerm(lambda t, y, a: -th * y),
                         de.ControlTerm(lambda t, y, a: sig * torch.ones(y.shape + (1,), dtype=y.dtype), bm))
    y0 = torch.full((n, 1), 1.0, dtype=DT)
    for solver in (EulerMaruyama(), StochasticHeun(), ReversibleHeun()):
        yT = de.solve(terms, solver, 0.0, 2.0, y0, dt0=0.01, max_steps=1000).ys[:, -1, 0]
        mean = math.exp(-2 * th)
        var = sig ** 2 / (2 * th) * (1 - math.exp(-4 * th))
        assert abs(yT.mean().item() - mean) < 4 * math.sqrt(var / n) + 0.01
        assert abs(yT.var().item() - var) < 0.05 * var


def test_milstein_with_constant_diffusion_is_euler_maruyama():
    """A diffusion built without y (no autograd graph at all) has a zero Milstein correction."""
    bm = de.BrownianInterval(0.0, 1.0, (64, 2), dtype=DT, seed=5)
    y0 = torch.ones(64, 2, dtype=DT)
    for g in (lambda t, y, a: torch.full_like(y, 0.5), lambda t, y, a: 0.5 + 0 * y):
        terms = de.MultiTerm(de.ODETerm(lambda t, y, a: -y), DiagonalControlTerm(g, bm))
        ys = [de.solve(terms, s, 0.0, 1.0, y0, dt0=0.05).ys for s in (Milstein(), EulerMaruyama())]
        torch.testing.assert_close(ys[0], ys[1], rtol=1e-12, atol=1e-12)


def test_general_noise_matches_diagonal_when_matrix_is_diagonal():
    n, d = 16, 3
    bm = de.BrownianInterval(0.0, 1.0, (n, d), dtype=DT, seed=0)
    f = lambda t, y, a: -y  # noqa: E731
    diag = de.MultiTerm(de.ODETerm(f), DiagonalControlTerm(lambda t, y, a: 0.3 * torch.sin(y), bm))
    gen = de.MultiTerm(de.ODETerm(f), de.ControlTerm(lambda t, y, a: torch.diag_embed(0.3 * torch.sin(y)), bm))
    y0 = torch.randn(n, d, dtype=DT)
    for solver in (EulerMaruyama(), StochasticHeun(), StochasticMidpoint(), EulerHeun(), ReversibleHeun()):
        a = de.solve(diag, solver, 0.0, 1.0, y0, dt0=0.05).ys
        b = de.solve(gen, solver, 0.0, 1.0, y0, dt0=0.05).ys
        torch.testing.assert_close(a, b)


def test_reversible_heun_backward_step_inverts_forward():
    terms, y0 = _ou_terms(levy=None, n=8)
    solver = ReversibleHeun()
    t0, t1 = torch.zeros(8, dtype=DT), torch.full((8,), 0.1, dtype=DT)
    z0 = y0 + 0.01
    vz0 = terms.vf(t0, z0, None)
    c = terms.contr(t0, t1)
    y1, z1, vz1 = solver.forward_step(terms, t0, t1, y0, z0, vz0, None, c)
    yb, zb, _ = solver.backward_step(terms, t0, t1, y1, z1, vz1, None, c)
    torch.testing.assert_close(yb, y0, rtol=0, atol=1e-14)
    torch.testing.assert_close(zb, z0, rtol=0, atol=1e-14)


def test_save_times_float32_and_virtual_tree():
    n = 64
    bm = de.VirtualBrownianTree(0.0, 1.0, (n, 2), tol=1e-4, dtype=torch.float32, seed=0)
    terms = de.MultiTerm(de.ODETerm(lambda t, y, a: -y), DiagonalControlTerm(lambda t, y, a: 0.2 * y, bm))
    y0 = torch.ones(n, 2)
    ts = torch.linspace(0, 1, 6)
    sol = de.solve(terms, Milstein(), 0.0, 1.0, y0, dt0=0.01, saveat=de.SaveAt(ts=ts))
    assert sol.ys.shape == (n, 6, 2) and sol.ys.dtype == torch.float32
    assert torch.isfinite(sol.ys).all()
    # close to the float64 solve on the same path
    bm64 = de.VirtualBrownianTree(0.0, 1.0, (n, 2), tol=1e-4, dtype=DT, seed=0)
    t64 = de.MultiTerm(de.ODETerm(lambda t, y, a: -y), DiagonalControlTerm(lambda t, y, a: 0.2 * y, bm64))
    s64 = de.solve(t64, Milstein(), 0.0, 1.0, y0.double(), dt0=0.01, saveat=de.SaveAt(ts=ts.double()))
    torch.testing.assert_close(sol.ys.double(), s64.ys, atol=1e-4, rtol=1e-4)  # float32 step times


def test_direct_gradients_through_sde_solve():
    n = 8
    theta = torch.tensor(0.7, dtype=DT, requires_grad=True)
    bm = de.BrownianInterval(0.0, 1.0, (n, 1), dtype=DT, seed=3)
    terms = de.MultiTerm(de.ODETerm(lambda t, y, a: -theta * y), DiagonalControlTerm(lambda t, y, a: 0.5 * y, bm))
    y0 = torch.ones(n, 1, dtype=DT)
    loss = de.solve(terms, Milstein(), 0.0, 1.0, y0, dt0=0.1).ys.sum()
    (g,) = torch.autograd.grad(loss, theta)
    with torch.no_grad():
        eps = 1e-6
        theta += eps
        lp = de.solve(terms, Milstein(), 0.0, 1.0, y0, dt0=0.1).ys.sum()
        theta -= 2 * eps
        lm = de.solve(terms, Milstein(), 0.0, 1.0, y0, dt0=0.1).ys.sum()
        theta += eps
    assert abs(g.item() - (lp - lm).item() / (2 * eps)) < 1e-6 * max(1.0, abs(g.item()))


def test_errors():
    n = 4
    bm = de.BrownianInterval(0.0, 1.0, (n, 2), seed=0)
    y0 = torch.ones(n, 3)
    f = lambda t, y, a: -y  # noqa: E731
    with pytest.raises(ValueError, match="DiagonalControlTerm"):  # wrong noise shape
        de.solve(de.MultiTerm(de.ODETerm(f), DiagonalControlTerm(lambda t, y, a: y, bm)), EulerMaruyama(),
                 0.0, 1.0, y0, dt0=0.1)
    with pytest.raises(ValueError, match="channels"):
        de.solve(de.MultiTerm(de.ODETerm(f), de.ControlTerm(lambda t, y, a: torch.ones(n, 3, 5), bm)),
                 EulerMaruyama(), 0.0, 1.0, y0, dt0=0.1)
    bm3 = de.BrownianInterval(0.0, 1.0, (n, 3), seed=0)
    # Milstein: additive noise with several channels is Euler-Maruyama; y-dependent noise needs Levy areas
    add = de.MultiTerm(de.ODETerm(f), de.ControlTerm(lambda t, y, a: torch.ones(n, 3, 3), bm3))
    torch.testing.assert_close(de.solve(add, Milstein(), 0.0, 1.0, y0, dt0=0.1).ys,
                               de.solve(add, EulerMaruyama(), 0.0, 1.0, y0, dt0=0.1).ys)
    with pytest.raises(ValueError, match="3 noise channels: its correction needs the Brownian motion's Levy areas"):
        de.solve(de.MultiTerm(de.ODETerm(f), de.ControlTerm(lambda t, y, a: y[..., None] * torch.ones(n, 3, 3), bm3)),
                 Milstein(), 0.0, 1.0, y0, dt0=0.1)
    with pytest.raises(ValueError, match="levy_area"):
        de.solve(de.MultiTerm(de.ODETerm(f), DiagonalControlTerm(lambda t, y, a: torch.ones_like(y), bm3)),
                 SRA1(), 0.0, 1.0, y0, dt0=0.1)
    with pytest.raises(TypeError, match="MultiTerm"):
        de.solve(de.ODETerm(f), EulerMaruyama(), 0.0, 1.0, y0, dt0=0.1)
    with pytest.raises(ValueError, match="outside"):  # solving past the Brownian motion's interval
        de.solve(de.MultiTerm(de.ODETerm(f), DiagonalControlTerm(lambda t, y, a: y, bm3)), EulerMaruyama(),
                 0.0, 2.0, y0, dt0=0.1)
    with pytest.raises(ValueError, match="sde_type"):
        Milstein("backward")


def test_midpoint_general_noise_order_half_and_additive_order_one():
    """Stratonovich midpoint: strong order 0.5 for non-commutative noise (against a fine midpoint
    solve on the same path), 1 for additive noise (time-dependent OU, fine SRA1 reference)."""
    n = 400
    bm = de.BrownianInterval(0.0, 1.0, (n, 2), dtype=DT, seed=8)

    def g(t, y, a):  # non-commutative: columns (y2, 0) and (0, y1) scaled
        z = torch.zeros_like(y[:, :1])
        return 0.8 * torch.stack([torch.cat([y[:, 1:], z], 1), torch.cat([z, y[:, :1]], 1)], dim=-1)

    terms = de.MultiTerm(de.ODETerm(lambda t, y, a: -0.3 * y), de.ControlTerm(g, bm))
    y0 = torch.ones(n, 2, dtype=DT)
    ref = de.solve(terms, StochasticMidpoint(), 0.0, 1.0, y0, dt0=1 / 2048, max_steps=3000).ys[:, -1]
    Ns = (8, 16, 32, 64)
    errs = [(de.solve(terms, StochasticMidpoint(), 0.0, 1.0, y0, dt0=1 / N).ys[:, -1] - ref).norm(dim=-1).mean().item()
            for N in Ns]
    assert abs(_slope(errs, Ns) - 0.5) < 0.2, errs
    terms, y0 = _ou_terms(levy=None, n=1000)
    ref = de.solve(terms, StochasticMidpoint(), 0.0, 1.0, y0, dt0=1 / 1024, max_steps=2000).ys[:, -1]
    errs = [(de.solve(terms, StochasticMidpoint(), 0.0, 1.0, y0, dt0=1 / N).ys[:, -1] - ref).abs().mean().item()
            for N in (4, 8, 16, 32)]
    assert 0.85 < _slope(errs, (4, 8, 16, 32)) < 1.7, errs


def test_milstein_keeps_no_graph_when_nothing_requires_grad():
    """The derivative of g came from a vjp on a helper leaf created with create_graph: with nothing requiring
    grad the whole path kept an autograd graph (6.3 GB at B=2000, 5000 steps, vs 248 MB for Euler-Maruyama)."""
    bm = de.BrownianInterval(0.0, 1.0, (4, 2), seed=0)
    terms = de.MultiTerm(de.ODETerm(lambda t, y, a: -y), de.DiagonalControlTerm(lambda t, y, a: 0.3 * torch.sin(y), bm))
    sol = de.solve(terms, de.Milstein(), 0.0, 1.0, torch.ones(4, 2), dt0=0.01, controller=de.ConstantStep())
    assert not sol.ys.requires_grad
    sig = torch.tensor(0.3, requires_grad=True)  # a trainable diffusion: the graph is kept
    terms = de.MultiTerm(de.ODETerm(lambda t, y, a: -y), de.DiagonalControlTerm(lambda t, y, a: sig * torch.sin(y), bm))
    sol = de.solve(terms, de.Milstein(), 0.0, 1.0, torch.ones(4, 2), dt0=0.01, controller=de.ConstantStep())
    assert sol.ys.requires_grad and torch.autograd.grad(sol.ys.sum(), sig)[0] != 0


def test_sra1_refuses_a_diffusion_that_depends_on_y():
    """SRA1 assumes additive noise; on geometric Brownian motion it silently converged to neither calculus
    (mean error 0.43 against the Stratonovich solution)."""
    bm = de.BrownianInterval(0.0, 1.0, (3, 1), dtype=DT, seed=0, levy_area="space-time")
    terms = de.MultiTerm(de.ODETerm(lambda t, y, a: 0.1 * y), DiagonalControlTerm(lambda t, y, a: 0.5 * y, bm))
    with pytest.raises(ValueError, match="SRA1: the diffusion g depends on y"):
        de.solve(terms, SRA1(), 0.0, 1.0, torch.ones(3, 1, dtype=DT), dt0=0.1)


def test_a_brownian_motion_of_another_dtype_and_a_bad_backward_solver_raise_early():
    """A float32 Brownian motion drove a float64 state silently (increments at float32 precision);
    BacksolveAdjoint(solver=Milstein()) raised only in backward()."""
    bm32 = de.BrownianInterval(0.0, 1.0, (3, 2), seed=0)
    terms = de.MultiTerm(de.ODETerm(lambda t, y, a: -y), DiagonalControlTerm(lambda t, y, a: 0.3 * y, bm32))
    with pytest.raises(ValueError, match="gives torch.float32 increments for a torch.float64 state"):
        de.solve(terms, de.EulerMaruyama(), 0.0, 1.0, torch.ones(3, 2, dtype=DT), dt0=0.1)
    bm = de.BrownianInterval(0.0, 1.0, (3, 2), seed=0, dtype=DT)
    terms = de.MultiTerm(de.ODETerm(lambda t, y, a: -y), DiagonalControlTerm(lambda t, y, a: 0.3 * y, bm))
    with pytest.raises(ValueError, match="solver must be a Stratonovich SDE solver"):
        de.solve(terms, de.StochasticHeun(), 0.0, 1.0, torch.ones(3, 2, dtype=DT, requires_grad=True), dt0=0.1,
                 adjoint=de.BacksolveAdjoint(solver=de.Milstein()))


def test_sra1_backsolve_on_additive_noise_matches_direct():
    """The additive-noise check ran on the adjoint's own (tuple-valued) terms and crashed; it checks the forward
    terms instead. The gradients converge to the direct ones."""
    s = torch.tensor([0.3, 0.5], dtype=DT, requires_grad=True)
    th = torch.tensor(0.7, dtype=DT, requires_grad=True)
    bm = de.VirtualBrownianTree(0.0, 1.0, (3, 2), tol=1e-6, dtype=DT, seed=1, levy_area="space-time")
    terms = de.MultiTerm(de.ODETerm(lambda t, y, a: -th * y),
                         DiagonalControlTerm(lambda t, y, a: s * torch.ones_like(y), bm))
    got = []
    for adj in (de.DirectAdjoint(), de.BacksolveAdjoint(solver=SRA1(), adjoint_params=[th, s])):
        sol = de.solve(terms, SRA1(), 0.0, 1.0, torch.ones(3, 2, dtype=DT), dt0=0.01, adjoint=adj)
        got.append(torch.autograd.grad((sol.ys ** 2).sum(), [th, s]))
    for d, b in zip(*got):
        assert (b - d).abs().max() < 1e-2 * d.abs().max()


def _scalar_gbm_errors(solver, stratonovich, levy=None, Ns=NS):
    """A 2-D GBM driven by one Brownian motion (scalar noise, ControlTerm with one channel): the closed form
    y_i = exp((mu - sig_i^2/2) t + sig_i W) (Ito) or exp(mu t + sig_i W) (Stratonovich) on the same path."""
    mu = 0.5
    sig = torch.tensor([0.8, 0.4], dtype=DT)
    bm = de.BrownianInterval(0.0, 1.0, (M, 1), dtype=DT, seed=1, levy_area=levy)
    terms = de.MultiTerm(de.ODETerm(lambda t, y, a: mu * y), de.ControlTerm(lambda t, y, a: (sig * y)[..., None], bm))
    y0 = torch.ones(M, 2, dtype=DT)
    exact = torch.exp((mu if stratonovich else mu - sig ** 2 / 2) + sig * bm(0.0, 1.0))
    return [(de.solve(terms, solver, 0.0, 1.0, y0, dt0=1.0 / N, max_steps=1000).ys[:, -1] - exact).abs().mean().item()
            for N in Ns]


@pytest.mark.parametrize("solver,strat,levy,order", [
    (Milstein("ito"), False, None, 1.0),
    (Milstein("stratonovich"), True, None, 1.0),
    (de.SRI2(), False, "space-time", 1.5),
])
def test_scalar_noise_strong_orders(solver, strat, levy, order):
    errs = _scalar_gbm_errors(solver, strat, levy)
    assert abs(_slope(errs, NS) - order) < 0.2, errs


def test_sri2_strong_order_on_diagonal_noise_and_its_errors():
    mu, sig = 0.5, 0.8
    bm = de.BrownianInterval(0.0, 1.0, (M, 2), dtype=DT, seed=1, levy_area="space-time")
    terms = de.MultiTerm(de.ODETerm(lambda t, y, a: mu * y), DiagonalControlTerm(lambda t, y, a: sig * y, bm))
    y0 = torch.ones(M, 2, dtype=DT)
    exact = torch.exp((mu - sig ** 2 / 2) + sig * bm(0.0, 1.0))
    errs = [(de.solve(terms, de.SRI2(), 0.0, 1.0, y0, dt0=1.0 / N).ys[:, -1] - exact).abs().mean().item() for N in NS]
    assert abs(_slope(errs, NS) - 1.5) < 0.2, errs
    assert errs[-1] < 2e-3
    plain = de.BrownianInterval(0.0, 1.0, (M, 2), dtype=DT, seed=1)
    with pytest.raises(ValueError, match="SRI2: the Brownian motion must provide the space-time Levy area"):
        de.solve(de.MultiTerm(terms.terms[0], DiagonalControlTerm(lambda t, y, a: sig * y, plain)), de.SRI2(),
                 0.0, 1.0, y0, dt0=0.1)
    bm3 = de.BrownianInterval(0.0, 1.0, (M, 3), dtype=DT, seed=1, levy_area="space-time")
    with pytest.raises(ValueError, match="SRI2: diagonal .* or scalar noise .* only; the diffusion has 3 channels"):
        de.solve(de.MultiTerm(terms.terms[0], de.ControlTerm(lambda t, y, a: y[..., None].expand(M, 2, 3), bm3)),
                 de.SRI2(), 0.0, 1.0, y0, dt0=0.1)
