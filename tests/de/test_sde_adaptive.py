"""Adaptive stepping for SDEs: StochasticHeun/EulerHeun(adaptive=True) with PIDController, sdeint(adaptive=True)."""

import math

import pytest
import torch

import torchmech.compat.torchsde as torchsde
import torchmech.de as de
from torchmech.de.terms import DiagonalControlTerm

DT = torch.float64


def _gbm(bm, mu=0.3, sig=0.9):
    return de.MultiTerm(de.ODETerm(lambda t, y, a: mu * y), DiagonalControlTerm(lambda t, y, a: sig * y, bm))


@pytest.mark.parametrize("solver_cls", [de.StochasticHeun, de.StochasticMidpoint, de.EulerHeun])
@pytest.mark.parametrize("brownian", ["interval", "tree"])
def test_adaptive_gbm_converges_to_closed_form_on_the_same_path(solver_cls, brownian):
    """Stratonovich GBM y = y0 exp(mu t + sig W_t). Rejected steps re-query the Brownian motion
    over shorter intervals: if that were not consistent with the path, the solution would not
    converge to the closed form evaluated at W(1)."""
    B, mu, sig = 8, 0.3, 0.9
    if brownian == "interval":
        bm = de.BrownianInterval(0.0, 1.0, (B, 1), dtype=DT, seed=0)
    else:
        bm = de.VirtualBrownianTree(0.0, 1.0, (B, 1), tol=2 ** -16, dtype=DT, seed=0)
    terms = _gbm(bm, mu, sig)
    y0 = torch.ones(B, 1, dtype=DT)
    exact = y0 * torch.exp(mu + sig * bm(0.0, 1.0))
    errs = []
    for tol in (1e-2, 1e-3, 2e-4):
        sol = de.solve(terms, solver_cls(adaptive=True), 0.0, 1.0, y0, dt0=0.05,
                       controller=de.PIDController(rtol=tol, atol=tol), max_steps=20000)
        assert bool((sol.stats["num_rejected"] > 0).any())  # the rejection path is exercised
        errs.append(((sol.ys[:, -1] - exact).abs() / exact).mean().item())
    assert errs[2] < 0.3 * errs[0] and errs[2] < 3e-2, errs


def test_adaptive_steps_follow_the_noise_level():
    """Noise switched on smoothly at t = 1: fewer accepted steps on the quiet first half (drift
    only: the error estimate is O(h^2) there); the
    adaptive solution converges to a fine fixed-step solution on the same path."""
    B = 8
    bm = de.BrownianInterval(0.0, 2.0, (B, 1), dtype=DT, seed=4)

    def g(t, y, a):
        return 0.8 * torch.sigmoid(20 * (t[:, None] - 1)) * torch.sin(y) * y

    terms = de.MultiTerm(de.ODETerm(lambda t, y, a: -0.05 * y), DiagonalControlTerm(g, bm))
    y0 = torch.ones(B, 1, dtype=DT)
    ts = torch.tensor([0.0, 1.0, 2.0], dtype=DT)
    sols = {}
    for tol in (1e-2, 1e-4):
        sols[tol] = de.solve(terms, de.StochasticHeun(adaptive=True), 0.0, 2.0, y0, dt0=0.01,
                             saveat=de.SaveAt(ts=ts, steps=True),
                             controller=de.PIDController(rtol=tol, atol=tol, step_ts=ts), max_steps=20000)
    ref = de.solve(terms, de.StochasticHeun(), 0.0, 2.0, y0, dt0=2.0 / 4096, saveat=de.SaveAt(ts=ts),
                   max_steps=5000).ys
    e = [(sols[tol].ys[:, :3] - ref).abs().mean().item() for tol in (1e-2, 1e-4)]
    assert e[1] < 0.2 * e[0] and e[1] < 0.01, e
    steps = sols[1e-4].ts[:, 3:]  # accepted step end times (padded with the final time)
    new = torch.cat([steps[:, :1] > 0, steps[:, 1:] > steps[:, :-1]], dim=1)
    first = (new & (steps <= 1.0)).sum(1)
    second = (new & (steps > 1.0)).sum(1)
    assert bool((2 * first < second).all()), (first, second)


def test_adaptive_backsolve_adjoint():
    """BacksolveAdjoint after an adaptive forward solve steps the adjoint SDE adaptively too."""
    B = 4
    bm = de.BrownianInterval(0.0, 1.0, (B, 1), dtype=DT, seed=2)
    mu = torch.tensor(0.3, dtype=DT, requires_grad=True)
    terms = de.MultiTerm(de.ODETerm(lambda t, y, a: a * y - 0.1 * y ** 3),
                         DiagonalControlTerm(lambda t, y, a: 0.5 * torch.sin(y), bm))
    y0 = torch.ones(B, 1, dtype=DT)
    ctrl = de.PIDController(rtol=1e-4, atol=1e-4)
    gs = []
    adj = de.BacksolveAdjoint()
    for adjoint in (de.DirectAdjoint(), adj):
        sol = de.solve(terms, de.StochasticHeun(adaptive=True), 0.0, 1.0, y0, dt0=0.01, args=mu,
                       controller=ctrl, adjoint=adjoint, max_steps=20000)
        gs.append(torch.autograd.grad(sol.ys.sum(), mu)[0])
    assert abs(gs[1] - gs[0]) < 1e-2 * abs(gs[0]), gs
    assert bool((adj.backward_stats["num_rejected"] > 0).any())


class _SDE(torch.nn.Module):
    sde_type, noise_type = "stratonovich", "diagonal"

    def f(self, t, y):
        return 0.2 * y

    def g(self, t, y):
        return 0.7 * torch.sin(y)


def test_sdeint_adaptive_matches_fixed_step_and_errors():
    B = 4
    bm = de.BrownianInterval(0.0, 1.0, (B, 1), dtype=DT, seed=6)
    y0 = torch.full((B, 1), 0.5, dtype=DT)
    ts = torch.linspace(0, 1, 4, dtype=DT)
    sde = _SDE()
    ys, sol = torchsde.sdeint(sde, y0, ts, bm=bm, dt=0.05, adaptive=True, rtol=1e-4, atol=1e-4, extra=True)
    fine = torchsde.sdeint(sde, y0, ts, bm=bm, dt=1 / 2048)
    assert ys.shape == (4, B, 1)
    torch.testing.assert_close(sol.ts[0], ts)  # the output times are stepped onto
    assert (ys - fine).abs().max() < 5e-3
    assert bool((sol.stats["num_rejected"] > 0).any()) and bool((sol.stats["num_accepted"] < 2048).all())
    ys2 = torchsde.sdeint(sde, y0, ts, bm=bm, method="euler_heun", dt=0.05, adaptive=True, rtol=1e-4, atol=1e-4)
    assert (ys2 - fine).abs().max() < 2e-2
    with pytest.raises(ValueError, match="adaptive=True does not apply to method 'reversible_heun'"):
        torchsde.sdeint(sde, y0, ts, bm=bm, method="reversible_heun", adaptive=True)
    with pytest.raises(ValueError, match="rtol"):
        torchsde.sdeint(sde, y0, ts, bm=bm, adaptive=True, rtol=-1.0)
    with pytest.raises(TypeError, match="adaptive"):
        de.StochasticHeun(adaptive=1)
    with pytest.raises(ValueError, match="no error estimate"):
        de.solve(_gbm(bm), de.StochasticHeun(), 0.0, 1.0, y0, dt0=0.1, controller=de.PIDController())
    # adaptive sdeint_adjoint: forward and adjoint both adaptive
    sde_p = _SDEParam()
    g_ref = torch.autograd.grad(torchsde.sdeint(sde_p, y0, ts, bm=bm, dt=1 / 1024).sum(), sde_p.a)[0]
    g = torch.autograd.grad(torchsde.sdeint_adjoint(sde_p, y0, ts, bm=bm, dt=0.05, adaptive=True, rtol=1e-4,
                                                    atol=1e-4, adjoint_adaptive=True, adjoint_rtol=1e-4,
                                                    adjoint_atol=1e-4).sum(), sde_p.a)[0]
    assert abs(g - g_ref) < 2e-2 * abs(g_ref), (g, g_ref)
    assert math.isfinite(float(g))


class _SDEParam(_SDE):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.2, dtype=DT))

    def f(self, t, y):
        return self.a * y


@pytest.mark.parametrize("adaptive,adjoint_adaptive", [(True, False), (False, True), (True, True)])
def test_sdeint_adjoint_adaptive_forward_or_backward_alone(adaptive, adjoint_adaptive):
    """torchsde's flags are independent: an adaptive forward with a backward on steps of dt, or a fixed forward
    with an adaptive backward. Both give the continuous gradient: against sdeint's on a fine grid (same path)."""
    B = 4
    bm = de.BrownianInterval(0.0, 1.0, (B, 1), dtype=DT, seed=3)
    y0 = torch.full((B, 1), 0.7, dtype=DT)
    ts = torch.linspace(0, 1, 5, dtype=DT)
    sde_p = _SDEParam()
    g_ref = torch.autograd.grad(torchsde.sdeint(sde_p, y0, ts, bm=bm, dt=1 / 1024).sum(), sde_p.a)[0]
    out = torchsde.sdeint_adjoint(sde_p, y0, ts, bm=bm, dt=0.01, adaptive=adaptive, rtol=1e-4, atol=1e-4,
                                  adjoint_adaptive=adjoint_adaptive, adjoint_rtol=1e-4, adjoint_atol=1e-4)
    g = torch.autograd.grad(out.sum(), sde_p.a)[0]
    assert abs(g - g_ref) < 2e-2 * abs(g_ref), (g, g_ref)


def test_automatic_initial_step_keeps_brownian_queries_inside_the_span():
    """The initial-step estimate used to query the control over [t, t + (t1 - t0)], past t1 for t > t0."""
    B = 3
    bm = de.BrownianInterval(0.0, 1.0, (B, 1), dtype=DT, seed=1)
    sol = de.solve(_gbm(bm), de.StochasticHeun(adaptive=True), 0.0, 1.0, torch.ones(B, 1, dtype=DT),
                   controller=de.PIDController(rtol=1e-3, atol=1e-3), saveat=de.SaveAt(t1=True))
    assert bool((sol.status == 0).all())
