"""Accuracy of torchmech.de solvers: against scipy DOP853 and measured convergence orders."""

import math

import pytest
import torch

import torchmech.de as de

PROBLEM_NAMES = ["linear", "vanderpol", "lorenz", "lotka", "forced"]

ADAPTIVE = [
    (de.Dopri5, 1e-8, 40.0),
    (de.Tsit5, 1e-8, 40.0),
    (de.Dopri8, 1e-8, 40.0),
    (de.Bosh3, 1e-6, 100.0),
    (de.Heun, 1e-4, 100.0),
    (de.Midpoint, 1e-4, 100.0),
    (de.Ralston, 1e-4, 100.0),
]


@pytest.fixture(scope="module")
def references(probs):
    out = {}
    for name, (f, y0, t1) in probs.problems.items():
        ts = torch.linspace(0.0, t1, 11, dtype=torch.float64)
        out[name] = (ts, probs.scipy_reference(f, y0, t1, ts))
    return out


@pytest.mark.parametrize("problem", PROBLEM_NAMES)
@pytest.mark.parametrize("solver_cls,tol,mult", ADAPTIVE, ids=[c[0].__name__ for c in ADAPTIVE])
def test_adaptive_vs_scipy(problem, solver_cls, tol, mult, references, probs):
    f, y0, t1 = probs.problems[problem]
    ts, ref = references[problem]
    y0 = torch.tensor(y0, dtype=torch.float64)
    sol = de.solve(de.ODETerm(f), solver_cls(), 0.0, t1, y0, saveat=de.SaveAt(ts=ts),
                   controller=de.PIDController(rtol=tol, atol=tol))
    assert sol.ys.shape == ref.shape
    assert (sol.status == de.Status.SUCCESS).all()
    ratio = ((sol.ys - ref).abs() / (tol + tol * ref.abs())).max().item()
    assert ratio < mult, f"error {ratio:.2f} x tolerance"


@pytest.mark.parametrize("solver_cls,tol,mult", ADAPTIVE, ids=[c[0].__name__ for c in ADAPTIVE])
def test_tighter_tolerance_smaller_error(solver_cls, tol, mult, references, probs):
    f, y0, t1 = probs.problems["vanderpol"]
    ts, ref = references["vanderpol"]
    y0 = torch.tensor(y0, dtype=torch.float64)
    errs, steps = [], []
    for rtol in (tol * 10, tol):
        sol = de.solve(de.ODETerm(f), solver_cls(), 0.0, t1, y0, saveat=de.SaveAt(ts=ts),
                       controller=de.PIDController(rtol=rtol, atol=rtol))
        errs.append((sol.ys - ref).abs().max().item())
        steps.append(sol.stats["num_steps"])
    assert errs[1] < errs[0]
    assert (steps[1] > steps[0]).all()




ORDERS = [(de.Euler, 1), (de.Midpoint, 2), (de.Heun, 2), (de.Ralston, 2), (de.Bosh3, 3), (de.RK4, 4),
          (de.Dopri5, 5), (de.Tsit5, 5)]


@pytest.mark.parametrize("solver_cls,order", ORDERS, ids=[c[0].__name__ for c in ORDERS])
def test_convergence_order(solver_cls, order, probs):
    f = probs.problems["linear"][0]
    y0 = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    T = 2.0
    ns = [10, 20, 40] if order >= 4 else [32, 64, 128]
    errs = []
    for n in ns:
        sol = de.solve(de.ODETerm(f), solver_cls(), 0.0, T, y0, dt0=T / n, controller=de.ConstantStep())
        assert int(sol.stats["num_steps"][0]) == n
        errs.append((sol.ys[:, -1] - probs.linear_exact(T, y0)).abs().max().item())
    slopes = [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]
    assert abs(slopes[-1] - order) < 0.3, f"measured orders {slopes}"


def test_dopri8_high_order(probs):
    f = probs.problems["linear"][0]
    y0 = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    errs = []
    for n in (4, 8):
        sol = de.solve(f, de.Dopri8(), 0.0, 2.0, y0, dt0=2.0 / n, controller=de.ConstantStep())
        errs.append((sol.ys[:, -1] - probs.linear_exact(2.0, y0)).abs().max().item())
    assert math.log2(errs[0] / errs[1]) > 7.0


def test_fixed_step_fevals_and_fsal(probs):
    f = probs.problems["linear"][0]
    y0 = torch.ones(2, 2, dtype=torch.float64)
    for cls, per_step in ((de.Euler, 1), (de.RK4, 4), (de.Dopri5, 6), (de.Tsit5, 6), (de.Bosh3, 3)):
        sol = de.solve(f, cls(), 0.0, 1.0, y0, dt0=0.1, controller=de.ConstantStep())
        assert (sol.stats["num_steps"] == 10).all()
        assert (sol.stats["num_fevals"] == 1 + 10 * per_step).all(), cls.__name__


def test_custom_tableau_solver(probs):
    # Kutta's third-order method, defined by the user from its tableau.
    tab = de.ButcherTableau(c=[0.0, 0.5, 1.0], a=[[0.5], [-1.0, 2.0]], b=[1 / 6, 2 / 3, 1 / 6], order=3)
    solver = de.ExplicitRK(tab)
    f = probs.problems["linear"][0]
    y0 = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    errs = []
    for n in (32, 64):
        sol = de.solve(f, solver, 0.0, 2.0, y0, dt0=2.0 / n)
        errs.append((sol.ys[:, -1] - probs.linear_exact(2.0, y0)).abs().max().item())
    assert abs(math.log2(errs[0] / errs[1]) - 3) < 0.3
    with pytest.raises(ValueError, match="row sum"):
        de.ButcherTableau(c=[0.0, 0.5], a=[[0.4]], b=[0.0, 1.0], order=2)


def test_float32_accuracy(probs):
    f = probs.problems["linear"][0]
    y0 = torch.tensor([[1.0, 0.5], [0.2, -1.0]], dtype=torch.float32)
    ts = torch.linspace(0, 3, 7)
    sol = de.solve(f, de.Tsit5(), 0.0, 3.0, y0, saveat=de.SaveAt(ts=ts),
                   controller=de.PIDController(rtol=1e-5, atol=1e-6))
    assert sol.ys.dtype == torch.float32 and sol.ts.dtype == torch.float32
    exact = torch.stack([probs.linear_exact(float(t), y0.double()) for t in ts], dim=1)
    assert (sol.ys.double() - exact).abs().max() < 2e-5


@pytest.mark.parametrize("problem", ["vanderpol", "lotka"])
@pytest.mark.parametrize("solver_cls", [de.Dopri5, de.Tsit5, de.Dopri8, de.Bosh3], ids=lambda c: c.__name__)
def test_float32_vs_scipy(problem, solver_cls, references, probs):
    f, y0, t1 = probs.problems[problem]
    ts, ref = references[problem]
    tol = 1e-5
    sol = de.solve(f, solver_cls(), 0.0, t1, torch.tensor(y0, dtype=torch.float32), saveat=de.SaveAt(ts=ts.float()),
                   controller=de.PIDController(rtol=tol, atol=tol))
    assert sol.ys.dtype == torch.float32
    assert ((sol.ys.double() - ref).abs() / (tol + tol * ref.abs())).max() < 40
