"""Stochastic backsolve adjoint (BacksolveAdjoint on SDEs) and torchsde-style sdeint_adjoint."""

import pytest
import torch

import torchmech.compat.torchsde as torchsde
import torchmech.de as de
from torchmech.de.terms import DiagonalControlTerm

DT = torch.float64
B = 6


class Drift(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.5, -0.3], dtype=DT))

    def forward(self, t, y, args):
        return self.w * y - 0.2 * y ** 3 + 0.1 * torch.sin(t)[:, None]


class DiagDiff(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.v = torch.nn.Parameter(torch.tensor([0.4, 0.2], dtype=DT))

    def forward(self, t, y, args):
        return self.v * torch.cos(y) + 0.1


class GeneralDiff(torch.nn.Module):
    """(B, 2, 3) diffusion matrix: non-commutative noise."""

    def __init__(self):
        super().__init__()
        self.v = torch.nn.Parameter(torch.tensor([[0.3, 0.1, -0.2], [0.1, 0.25, 0.15]], dtype=DT))

    def forward(self, t, y, args):
        return self.v * torch.cos(y.flip(-1))[..., None] + 0.05 * y[..., None]


def _grads(terms, solver, adjoint, params, Ns, ts=None):
    ts = torch.linspace(0, 1, 5, dtype=DT) if ts is None else ts
    y0 = torch.tensor([[1.0, 0.5]], dtype=DT).repeat(B, 1).requires_grad_(True)
    out = []
    for N in Ns:
        sol = de.solve(terms, solver, 0.0, 1.0, y0, dt0=1.0 / N, saveat=de.SaveAt(ts=ts), adjoint=adjoint,
                       max_steps=10 * N)
        loss = (sol.ys ** 2).sum() + sol.ys[:, -1, 0].sum()
        out.append(torch.autograd.grad(loss, [y0, *params]))
    return out


def _rel_errors(terms, solver, params, Ns, backward_solver=None):
    direct = _grads(terms, solver, de.DirectAdjoint(), params, Ns)
    back = _grads(terms, solver, de.BacksolveAdjoint(solver=backward_solver), params, Ns)
    # per step count: relative error of [y0, *params] gradients
    return [[((b - d).abs().max() / d.abs().max()).item() for b, d in zip(bs, ds)] for bs, ds in zip(back, direct)]


def _check_converges(errs, final):
    for k in range(len(errs[0])):
        col = [e[k] for e in errs]
        assert col[-1] < 0.3 * max(col) and col[-1] < final, (k, errs)


@pytest.mark.parametrize("brownian", ["interval", "tree"])
def test_stratonovich_diagonal_backsolve_converges_to_direct(brownian):
    if brownian == "interval":
        bm = de.BrownianInterval(0.0, 1.0, (B, 2), dtype=DT, seed=3)
    else:
        bm = de.VirtualBrownianTree(0.0, 1.0, (B, 2), tol=2 ** -14, dtype=DT, seed=3)
    f, g = Drift(), DiagDiff()
    terms = de.MultiTerm(de.ODETerm(f), DiagonalControlTerm(g, bm))
    errs = _rel_errors(terms, de.StochasticHeun(), [f.w, g.v], (25, 100, 400))
    _check_converges(errs, 5e-3)


def test_ito_diagonal_backsolve_converges_to_direct():
    """Euler-Maruyama forward (Ito); the adjoint runs on the Stratonovich form f - g g'/2."""
    bm = de.BrownianInterval(0.0, 1.0, (B, 2), dtype=DT, seed=5)
    f, g = Drift(), DiagDiff()
    terms = de.MultiTerm(de.ODETerm(f), DiagonalControlTerm(g, bm))
    errs = _rel_errors(terms, de.EulerMaruyama(), [f.w, g.v], (50, 200, 800))
    _check_converges(errs, 2e-2)
    # without the drift correction the backward pass would follow another SDE: its gradient would
    # stay away from the Ito one; check the correction is not a no-op on this problem
    strat = _rel_errors(terms, de.StochasticHeun(), [f.w, g.v], (800,))
    ito = _grads(terms, de.EulerMaruyama(), de.DirectAdjoint(), [f.w, g.v], (800,))[0]
    st = _grads(terms, de.StochasticHeun(), de.DirectAdjoint(), [f.w, g.v], (800,))[0]
    assert (ito[2] - st[2]).abs().max() > 20 * strat[0][2] * st[2].abs().max()


def test_stratonovich_general_noise_backsolve_converges_to_direct():
    bm = de.BrownianInterval(0.0, 1.0, (B, 3), dtype=DT, seed=7)
    f, g = Drift(), GeneralDiff()
    terms = de.MultiTerm(de.ODETerm(f), de.ControlTerm(g, bm))
    errs = _rel_errors(terms, de.EulerHeun(), [f.w, g.v], (25, 100, 400))
    _check_converges(errs, 2e-2)
    # a different backward solver converges to the same gradients
    errs = _rel_errors(terms, de.EulerHeun(), [f.w, g.v], (100, 400), backward_solver=de.ReversibleHeun())
    _check_converges(errs, 2e-2)


def test_backsolve_sde_args_gradient_and_stats():
    bm = de.BrownianInterval(0.0, 1.0, (B, 2), dtype=DT, seed=1)
    k = torch.tensor(0.7, dtype=DT, requires_grad=True)
    terms = de.MultiTerm(de.ODETerm(lambda t, y, a: -a * y), DiagonalControlTerm(lambda t, y, a: 0.3 * y, bm))
    y0 = torch.ones(B, 2, dtype=DT)
    adj = de.BacksolveAdjoint()
    gs = []
    for adjoint in (de.DirectAdjoint(), adj):
        sol = de.solve(terms, de.StochasticHeun(), 0.0, 1.0, y0, dt0=1 / 400, args=k, adjoint=adjoint)
        gs.append(torch.autograd.grad(sol.ys.sum(), k)[0])
    torch.testing.assert_close(gs[1], gs[0], rtol=2e-3, atol=0)
    # the backward solve steps like the forward one (ConstantStep with the same dt0)
    assert bool(((adj.backward_stats["num_steps"] - 400).abs() <= 1).all())


@pytest.mark.parametrize("stages", [True, False])
def test_backsolve_sde_parameter_quadrature_call_counts(stages, monkeypatch):
    """Fixed-step Heun backwards on the forward grid: 2 diffusion calls per step for the adjoint state (plus
    one increment check per segment). The parameter terms come from those stages' own backward passes when the
    batch shares the grid (stages=True: no further call); the trapezoid used otherwise evaluates each backward
    grid point once, shared by the two steps meeting there."""
    from torchmech.de import adjoint as A

    if not stages:
        monkeypatch.setattr(A, "_stage_weights", lambda solver: None)
    bm = de.BrownianInterval(0.0, 1.0, (B, 2), dtype=DT, seed=1)
    calls = []

    class Counted(DiagDiff):
        def forward(self, t, y, args):
            calls.append(1)
            return super().forward(t, y, args)

    f, g = Drift(), Counted()
    terms = de.MultiTerm(de.ODETerm(f), DiagonalControlTerm(g, bm))
    y0 = torch.ones(B, 2, dtype=DT)
    ts = torch.tensor([0.5, 1.0], dtype=DT)  # two backward segments of 10 steps each
    sol = de.solve(terms, de.StochasticHeun(), 0.0, 1.0, y0, dt0=0.05, saveat=de.SaveAt(ts=ts),
                   adjoint=de.BacksolveAdjoint())
    calls.clear()
    torch.autograd.grad(sol.ys.sum(), [f.w, g.v])
    # per segment: the increment check 1 + 10 steps x 2 (solver) [+ 10 + 1 points (trapezoid)]
    assert len(calls) == 2 * (1 + 20 + (0 if stages else 11))


@pytest.mark.parametrize("solver", [de.StochasticHeun(), de.StochasticMidpoint(), de.EulerHeun()])
def test_backsolve_sde_stage_and_trapezoid_parameter_terms_agree(solver, monkeypatch):
    """Both parameter quadratures are consistent: on a fine grid they agree closely, and with the direct adjoint."""
    from torchmech.de import adjoint as A

    bm = de.BrownianInterval(0.0, 1.0, (B, 2), dtype=DT, seed=4)
    f, g = Drift(), DiagDiff()
    terms = de.MultiTerm(de.ODETerm(f), DiagonalControlTerm(g, bm))
    y0 = torch.tensor([[1.0, 0.5]], dtype=DT).repeat(B, 1)
    out = []
    for mode in ("stages", "trapezoid", "direct"):
        with monkeypatch.context() as m:
            if mode == "trapezoid":
                m.setattr(A, "_stage_weights", lambda solver: None)
            adjoint = de.DirectAdjoint() if mode == "direct" else de.BacksolveAdjoint(solver=solver)
            sol = de.solve(terms, solver, 0.0, 1.0, y0, dt0=1 / 400, adjoint=adjoint, max_steps=1000,
                           saveat=de.SaveAt(ts=torch.tensor([0.4, 1.0], dtype=DT)))
            out.append(torch.autograd.grad((sol.ys ** 2).sum(), [f.w, g.v]))
    for k in range(2):
        scale = out[2][k].abs().max()
        assert (out[0][k] - out[1][k]).abs().max() < 5e-3 * scale, (k, out)
        assert (out[0][k] - out[2][k]).abs().max() < 1e-2 * scale, (k, out)


def test_backsolve_sde_errors():
    bm = de.BrownianInterval(0.0, 1.0, (B, 3), dtype=DT, seed=0)
    f, g = Drift(), GeneralDiff()
    terms = de.MultiTerm(de.ODETerm(f), de.ControlTerm(g, bm))
    y0 = torch.ones(B, 2, dtype=DT)
    with pytest.raises(ValueError, match="SDE solver"):
        de.solve(terms, de.Tsit5(), 0.0, 1.0, y0, dt0=0.1, adjoint=de.BacksolveAdjoint())
    with pytest.raises(ValueError, match="Stratonovich SDE solver"):
        sol = de.solve(terms, de.StochasticHeun(), 0.0, 1.0, y0.requires_grad_(True), dt0=0.1,
                       adjoint=de.BacksolveAdjoint(solver=de.EulerMaruyama()))
        sol.ys.sum().backward()
    with pytest.raises(TypeError, match="controller"):
        de.BacksolveAdjoint(controller="pid")


class SDE(torch.nn.Module):
    def __init__(self, sde_type="stratonovich", noise_type="diagonal"):
        super().__init__()
        self.sde_type, self.noise_type = sde_type, noise_type
        self.mu = torch.nn.Parameter(torch.tensor([0.3, -0.2], dtype=DT))
        self.sig = torch.nn.Parameter(torch.tensor([0.4, 0.3], dtype=DT))

    def f(self, t, y):
        return self.mu * y - 0.1 * y ** 3

    def g(self, t, y):
        g = self.sig * torch.sin(y) + 0.1
        return g if self.noise_type == "diagonal" else torch.diag_embed(g)


@pytest.mark.parametrize("sde_type", ["stratonovich", "ito"])
def test_sdeint_adjoint_backsolve_converges_to_sdeint(sde_type):
    sde = SDE(sde_type)
    ts = torch.linspace(0, 1, 3, dtype=DT)
    method = "milstein" if sde_type == "ito" else None  # strong order 1 for the direct reference
    errs = []
    bm = de.BrownianInterval(0.0, 1.0, (B, 2), dtype=DT, seed=11)  # one path, refined coarse to fine
    for dt in (0.02, 0.005, 0.00125):
        y0 = torch.full((B, 2), 0.8, dtype=DT, requires_grad=True)
        gs = []
        for fn in (torchsde.sdeint, torchsde.sdeint_adjoint):
            ys = fn(sde, y0, ts, bm=bm, dt=dt, method=method)
            gs.append(torch.autograd.grad((ys ** 2).sum(), [y0, sde.mu, sde.sig]))
        errs.append([((a - b).abs().max() / b.abs().max()).item() for a, b in zip(gs[1], gs[0])])
    _check_converges(errs, 2e-3)


def test_sdeint_adjoint_methods_and_errors():
    sde = SDE("stratonovich")
    ts = torch.linspace(0, 1, 3, dtype=DT)
    bm = de.BrownianInterval(0.0, 1.0, (B, 2), dtype=DT, seed=2)
    y0 = torch.full((B, 2), 0.8, dtype=DT)
    ref = torch.autograd.grad(torchsde.sdeint(sde, y0, ts, bm=bm, dt=0.005).sum(), sde.sig)[0]
    ck = torch.autograd.grad(torchsde.sdeint_adjoint(sde, y0, ts, bm=bm, dt=0.005, adjoint_method="checkpoint")
                             .sum(), sde.sig)[0]
    torch.testing.assert_close(ck, ref)
    for name in ("heun", "euler_heun", "reversible_heun"):
        g = torch.autograd.grad(torchsde.sdeint_adjoint(sde, y0, ts, bm=bm, dt=0.005, adjoint_method=name)
                                .sum(), sde.sig)[0]
        assert (g - ref).abs().max() < 1e-2 * ref.abs().max(), (name, g, ref)
    with pytest.raises(ValueError, match="adjoint_method"):
        torchsde.sdeint_adjoint(sde, y0, ts, bm=bm, adjoint_method="rk4")
    # srk is SRA1 here (torchsde: SRI2 for diagonal noise): refused for y-dependent noise, whose adjoint
    # gradients it got ~25% wrong
    with pytest.raises(ValueError, match="adjoint_method 'srk' \\(SRA1\\) needs additive noise"):
        torchsde.sdeint_adjoint(sde, y0, ts, bm=bm, adjoint_method="srk")
    ito = SDE("ito", "general")  # (refused before general-noise Ito corrections; see the test below)
    y0g = y0.clone().requires_grad_(True)
    torchsde.sdeint_adjoint(ito, y0g, ts, bm=bm, dt=0.1).sum().backward()
    assert bool(torch.isfinite(y0g.grad).all())


def test_ito_backsolve_with_constant_additive_noise_matches_direct():
    """A constant diffusion has no autograd graph: the Ito correction and its vjp are zero."""
    drift = Drift()
    bm = de.BrownianInterval(0.0, 1.0, (B, 2), dtype=DT, seed=3)
    terms = de.MultiTerm(de.ODETerm(drift), DiagonalControlTerm(lambda t, y, a: torch.full_like(y, 0.3), bm))
    direct, back = (_grads(terms, de.EulerMaruyama(), adj, [drift.w], [64])[0]
                    for adj in (de.DirectAdjoint(), de.BacksolveAdjoint()))
    for b, d in zip(back, direct):
        assert ((b - d).abs().max() / d.abs().max()).item() < 0.05


def test_ito_to_stratonovich_drift_for_general_noise():
    """dY = A Y dt + sum_k B_k Y dW_k (Ito) has the Stratonovich drift (A - 1/2 sum_k B_k^2) Y."""
    from torchmech.de.adjoint import _strat_drift

    g = torch.Generator().manual_seed(0)
    n, m, B = 3, 2, 4
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    Bk = torch.randn(m, n, n, generator=g, dtype=torch.float64) * 0.5
    drift = de.ODETerm(lambda t, y, a: y @ A.T)
    no_control = lambda t0, t1: None  # noqa: E731  (only the vector field is used here)
    diff = de.ControlTerm(lambda t, y, a: torch.einsum("kij,bj->bik", Bk, y), no_control)
    y = torch.randn(B, n, generator=g, dtype=torch.float64).requires_grad_(True)
    got = _strat_drift(drift, diff, True, torch.zeros(B, dtype=torch.float64), y, None)
    expect = y @ (A - 0.5 * torch.einsum("kij,kjl->il", Bk, Bk)).T
    torch.testing.assert_close(got, expect)
    # additive noise: no correction, and nothing to differentiate
    add = de.ControlTerm(lambda t, y, a: Bk[0].expand(y.shape[0], n, n), no_control)
    torch.testing.assert_close(_strat_drift(drift, add, True, torch.zeros(B, dtype=torch.float64), y, None), y @ A.T)


@pytest.mark.parametrize("noise", ["general", "additive"])
def test_backsolve_adjoint_of_an_ito_sde_with_general_noise(noise):
    """Refused before (the correction was diagonal-only); the continuous adjoint's gradients converge to the
    discretised solve's on the same Brownian path."""
    import torchmech.compat.torchsde as torchsde

    class SDE(torch.nn.Module):
        sde_type = "ito"
        noise_type = noise

        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor(0.6, dtype=torch.float64))
            self.s = torch.nn.Parameter(torch.tensor([[0.3, 0.1], [-0.2, 0.25]], dtype=torch.float64))

        def f(self, t, y):
            return -self.a * y

        def g(self, t, y):
            if noise == "additive":
                return self.s.expand(y.shape[0], 2, 2)
            return self.s * torch.sin(y)[:, :, None]  # y-dependent, two noise channels

    sde = SDE()
    y0 = torch.full((8, 2), 0.7, dtype=torch.float64, requires_grad=True)
    ts = torch.linspace(0, 1, 3, dtype=torch.float64)
    bm = de.BrownianInterval(0.0, 1.0, (8, 2), dtype=torch.float64, seed=4)
    out = torchsde.sdeint_adjoint(sde, y0, ts, bm=bm, method="euler", dt=1 / 256)
    g_adj = torch.autograd.grad(out.sum(), (y0, sde.a, sde.s))
    ref = torchsde.sdeint(sde, y0, ts, bm=bm, method="euler", dt=1 / 4096)
    g_ref = torch.autograd.grad(ref.sum(), (y0, sde.a, sde.s))
    for x, r in zip(g_adj, g_ref):
        assert float((x - r).abs().max()) < 0.03 * float(r.abs().max()) + 1e-6, (x, r)
