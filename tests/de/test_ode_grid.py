"""ConstantStep ODE solves on one shared grid take the stage-only loop and agree with the per-sample loop."""

import math

import pytest
import torch

import torchmech.de as de
from torchmech.de import _fast


class Net(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = torch.nn.Linear(d + 1, d)

    def forward(self, t, y, args):
        tt = t.to(y.dtype).expand(y.shape[0])[:, None]
        return torch.tanh(self.lin(torch.cat([y, tt], -1))) - 0.3 * y


@pytest.fixture
def grid_calls(monkeypatch):
    """Records, per run_steps call, whether the shared-grid loop took it."""
    calls = []
    real = _fast._run_grid

    def spy(*a):
        out = real(*a)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(_fast, "_run_grid", spy)
    return calls


def _solve(solver, dtype, t0=0.0, t1=1.0, dt0=0.07, per_sample=False, seed=0, grad=True, y0=None):
    torch.manual_seed(seed)
    f = Net(3).to(dtype)
    if y0 is None:
        y0 = torch.randn(4, 3, dtype=dtype)
    y0 = y0.clone().requires_grad_(grad)
    lo, hi = min(t0, t1), max(t0, t1)
    ts = torch.tensor([lo, lo + 0.13 * (hi - lo), lo + 0.5 * (hi - lo), lo + 0.5 * (hi - lo), hi], dtype=dtype)
    if t1 < t0:
        ts = ts.flip(0)
    T0 = torch.tensor([t0, t0 - 0.1, t0, t0 - 0.05], dtype=dtype) if per_sample else t0
    sol = de.solve(de.ODETerm(f), solver, T0, t1, y0, dt0=dt0, controller=de.ConstantStep(),
                   saveat=de.SaveAt(ts=ts, t1=True), throw=False)
    out = [sol.ys, sol.status, sol.stats["num_steps"]]
    if grad:
        out += list(torch.autograd.grad(sol.ys.square().sum(), [y0] + list(f.parameters())))
    return out


@pytest.mark.parametrize("solver", [de.Euler(), de.Midpoint(), de.RK4(), de.Tsit5(), de.Dopri8()],
                         ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t1", [1.0, -0.8])
def test_grid_loop_agrees_with_per_sample_loop(solver, dtype, t1, grid_calls, monkeypatch):
    fast = _solve(solver, dtype, t1=t1)
    assert grid_calls and all(grid_calls)
    monkeypatch.setattr(_fast, "_run_grid", lambda *a: None)
    ref = _solve(solver, dtype, t1=t1)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    assert torch.equal(fast[1], ref[1]) and torch.equal(fast[2], ref[2])
    for a, b in zip(fast[:1] + fast[3:], ref[:1] + ref[3:]):
        torch.testing.assert_close(a, b, **tol)


def test_grid_loop_matches_analytic_solution():
    # dy/dt = -y with RK4 and h = 0.01: error ~ h^4, at save times between grid points too
    # (the cubic Hermite dense output is third order)
    lam = torch.tensor([[0.5], [1.0], [2.0]], dtype=torch.float64)
    ts = torch.tensor([0.0, 0.123, 0.5, 1.0], dtype=torch.float64)
    sol = de.solve(de.ODETerm(lambda t, y, a: -lam * y), de.RK4(), 0.0, 1.0, torch.ones(3, 1, dtype=torch.float64),
                   dt0=0.01, controller=de.ConstantStep(), saveat=de.SaveAt(ts=ts))
    exact = torch.exp(-lam * ts)[..., None]
    torch.testing.assert_close(sol.ys, exact, rtol=0, atol=1e-7)
    assert sol.stats["num_steps"].tolist() == [100, 100, 100]


def test_per_sample_times_take_the_per_sample_loop(grid_calls):
    _solve(de.RK4(), torch.float64, per_sample=True, grad=False)
    assert grid_calls and not any(grid_calls)


def test_non_finite_state_falls_back_and_reports_status(grid_calls):
    y0 = torch.tensor([[0.1], [1.0]], dtype=torch.float64)
    # dy/dt = y^3 blows up at t = 1/(2 y0^2): 0.5 for the second sample, 50 for the first
    sol = de.solve(de.ODETerm(lambda t, y, a: y ** 3), de.RK4(), 0.0, 2.0, y0, dt0=0.01,
                   controller=de.ConstantStep(), saveat=de.SaveAt(t1=True), throw=False)
    assert grid_calls == [False]
    assert sol.status.tolist() == [int(de.Status.SUCCESS), int(de.Status.NONFINITE)]
    assert torch.isfinite(sol.ys[0]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_to_grid_agrees_with_generic_loop(dtype, grid_calls, monkeypatch):
    def run(per_sample):
        torch.manual_seed(1)
        f = Net(3).to(dtype)
        y0 = torch.randn(4, 3, dtype=dtype, requires_grad=True)
        grid = torch.tensor([0.0, 0.1, 0.25, 0.3, 0.6, 1.0], dtype=dtype)
        if per_sample:
            grid = torch.stack([grid, grid ** 2, grid, grid.sqrt()])
        ts = torch.tensor([0.0, 0.25, 0.4, 1.0], dtype=dtype)
        sol = de.solve(de.ODETerm(f), de.RK4(), 0.0, 1.0, y0, controller=de.StepTo(grid), saveat=de.SaveAt(ts=ts))
        return [sol.ys, sol.stats["num_steps"]] + list(torch.autograd.grad(sol.ys.square().sum(),
                                                                          [y0] + list(f.parameters())))

    fast = run(False)
    assert grid_calls == [True]
    per_sample = run(True)  # a different grid per sample: the generic loop
    assert grid_calls[-1] is False
    assert per_sample[1].tolist() == [5, 5, 5, 5]
    monkeypatch.setattr(_fast, "run", lambda *a, **k: None)
    ref = run(False)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    assert torch.equal(fast[1], ref[1])
    for a, b in zip(fast[:1] + fast[2:], ref[:1] + ref[2:]):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("how", ["constant", "step_to"])
def test_fixed_step_gradients_with_respect_to_t0_and_t1(how):
    """y' = -2 y + t, y(t0) = 1: dy(t1)/dt1 = f(t1, y(t1)) and dy(t1)/dt0 = -exp(-2 (t1 - t0)) f(t0, 1).
    The float grid of the stage-only loop would leave the times out of the graph."""
    f64 = torch.float64
    t0 = torch.tensor(0.0, dtype=f64, requires_grad=True)
    t1 = torch.tensor(1.0, dtype=f64, requires_grad=True)
    if how == "constant":
        kw = dict(dt0=0.05, controller=de.ConstantStep())
    else:
        grid = torch.cat([t0[None], torch.linspace(0.05, 0.95, 19, dtype=f64), t1[None]])
        kw = dict(controller=de.StepTo(grid))
    sol = de.solve(lambda t, y, a: -2 * y + t[:, None], de.RK4(), t0, t1, torch.ones(1, 1, dtype=f64), **kw)
    g0, g1 = torch.autograd.grad(sol.ys[0, -1, 0], (t0, t1))
    y1 = 0.25 + 1.25 * math.exp(-2.0)
    assert abs(float(g1) - (1 - 2 * y1)) < 1e-5  # RK4 at h = 0.05; the float grid gave 0 and 0.001
    assert abs(float(g0) - 2 * math.exp(-2.0)) < 1e-5
