"""Time gradients in the edge cases the main loops used to drop, and the error ratio under atol = 0."""

import math

import numpy as np
import pytest
import torch

import torchmech.de as de
from torchmech.de.solvers.rk import ButcherTableau, ExplicitRK

DT = torch.float64


def decay(t, y, args):
    return -y + torch.sin(t)[:, None]


@pytest.mark.parametrize("controller", ["constant", "stepto"])
def test_fixed_step_shared_grid_differentiates_the_save_times(controller):
    """dy(ts_j)/dts_j = f(ts_j, y(ts_j)); the shared-grid loop read the save times as floats (gradient None)."""
    y0 = torch.tensor([[1.0]], dtype=DT)
    ctrl = de.ConstantStep() if controller == "constant" else de.StepTo(torch.linspace(0, 1, 51, dtype=DT))

    def run(ts):
        return de.solve(de.ODETerm(decay), de.RK4(), 0.0, 1.0, y0, dt0=0.02 if controller == "constant" else None,
                        controller=ctrl, saveat=de.SaveAt(ts=ts)).ys[0, :, 0]

    ts = torch.tensor([0.3, 0.55, 0.9], dtype=DT, requires_grad=True)
    ys = run(ts)
    grad = torch.autograd.grad(ys.sum(), ts)[0]
    expect = (-ys + torch.sin(ts)).detach()  # f at the save times (the interpolant's derivative there)
    torch.testing.assert_close(grad, expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("adjoint", [de.DirectAdjoint(), de.CheckpointAdjoint(), de.BacksolveAdjoint(1e-10, 1e-10)])
def test_zero_length_samples_and_saves_at_t0_have_time_derivatives(adjoint):
    """y(t1) with t1 == t0 moves as f(t0, y0) when t1 or t0 moves; so does a save time at t0 (one-sided)."""
    y0 = torch.tensor([[1.0], [2.0]], dtype=DT)
    t0 = torch.tensor([0.0, 0.5], dtype=DT, requires_grad=True)
    t1 = torch.tensor([1.0, 0.5], dtype=DT, requires_grad=True)  # sample 1: t0 == t1
    sol = de.solve(de.ODETerm(decay), de.Dopri5(), t0, t1, y0, saveat=de.SaveAt(t1=True),
                   controller=de.PIDController(1e-10, 1e-10), adjoint=adjoint)
    g0, g1 = torch.autograd.grad(sol.ys[:, -1, 0].sum(), (t0, t1))
    f1 = -2.0 + math.sin(0.5)  # f(t0, y0) of sample 1
    assert abs(float(g1[1]) - f1) < 1e-9 and abs(float(g0[1]) + f1) < 1e-9
    # sample 0 (a real solve) against the closed form y = 1.5 e^{-t} + (sin t - cos t) / 2 from y(0) = 1
    y1 = 1.5 * math.exp(-1.0) + (math.sin(1.0) - math.cos(1.0)) / 2
    assert abs(float(g1[0]) - (-y1 + math.sin(1.0))) < 1e-7

    ts = torch.tensor([[0.0, 0.4], [0.5, 0.5]], dtype=DT, requires_grad=True)
    sol = de.solve(de.ODETerm(decay), de.Dopri5(), torch.tensor([0.0, 0.5], dtype=DT), torch.tensor([1.0, 0.5], dtype=DT),
                   y0, saveat=de.SaveAt(ts=ts), controller=de.PIDController(1e-10, 1e-10), adjoint=adjoint)
    g = torch.autograd.grad(sol.ys[..., 0].sum(), ts)[0]
    assert abs(float(g[0, 0]) - (-1.0)) < 1e-9  # f(0, 1) = -1
    assert abs(float(g[1, 0]) - f1) < 1e-9 and abs(float(g[1, 1]) - f1) < 1e-9


def test_zero_atol_with_a_component_that_stays_zero():
    """atol = 0 and an exactly-zero component: 0/0 in the error ratio rejected every step (DT_UNDERFLOW)."""
    y0 = torch.tensor([[1.0, 0.0]], dtype=DT)
    sol = de.solve(de.ODETerm(lambda t, y, a: -y), de.Dopri5(), 0.0, 1.0, y0, saveat=de.SaveAt(t1=True),
                   controller=de.PIDController(rtol=1e-8, atol=0.0))
    assert int(sol.status[0]) == 0
    torch.testing.assert_close(sol.ys[0, -1], torch.tensor([math.exp(-1.0), 0.0], dtype=DT), rtol=1e-7, atol=0)
    sol = de.solve(de.ODETerm(lambda t, y, a: -y), de.Dopri5(), 0.0, 1.0, y0, saveat=de.SaveAt(t1=True),
                   controller=de.PIDController(rtol=1e-8, atol=torch.tensor([0.0, 0.0], dtype=DT)))
    assert int(sol.status[0]) == 0


def test_user_tableau_error_order_is_the_lower_order_plus_one():
    """Fehlberg's RKF45 propagates the fourth-order solution; its error estimate is O(h^5), not O(h^6)."""
    c = [0, 1 / 4, 3 / 8, 12 / 13, 1, 1 / 2]
    a = [[1 / 4], [3 / 32, 9 / 32], [1932 / 2197, -7200 / 2197, 7296 / 2197],
         [439 / 216, -8, 3680 / 513, -845 / 4104], [-8 / 27, 2, -3544 / 2565, 1859 / 4104, -11 / 40]]
    b4 = [25 / 216, 0, 1408 / 2565, 2197 / 4104, -1 / 5, 0]
    b5 = [16 / 135, 0, 6656 / 12825, 28561 / 56430, -9 / 50, 2 / 55]
    tab = ButcherTableau(c=c, a=a, b=b4, order=4, b_error=[x - y for x, y in zip(b4, b5)], embedded_order=5)
    assert ExplicitRK(tab).error_order == 5
    assert de.Dopri5().error_order == 5  # (5th-order solution, 4th-order embedded: unchanged)


@pytest.mark.parametrize("atol", [np.array([0.0, 1e-8]), [1e-8, 0.0], (0.0, 0.0), np.float64(0.0)])
def test_zero_atol_given_as_a_list_tuple_or_numpy(atol):
    y0 = torch.tensor([[1.0, 0.0]], dtype=DT)
    sol = de.solve(de.ODETerm(lambda t, y, a: -y), de.Tsit5(), 0.0, 1.0, y0, saveat=de.SaveAt(t1=True),
                   controller=de.PIDController(rtol=1e-8, atol=atol))
    assert int(sol.status[0]) == 0 and int(sol.stats["num_steps"][0]) < 100


def test_reversible_heun_on_an_ode_keeps_the_first_order_time_terms():
    """ReversibleHeun wraps f(t0, y0) in its own state: the first-order terms must use the field itself."""
    y0 = torch.ones(2, 1, dtype=DT)
    t1 = torch.tensor([1.0, 0.0], dtype=DT, requires_grad=True)  # sample 1: zero length
    ts = torch.tensor([0.5, 1.0], dtype=DT, requires_grad=True)
    sol = de.solve(de.ODETerm(lambda t, y, a: -y), de.ReversibleHeun(), 0.0, 1.0, y0[:1], dt0=0.001,
                   controller=de.ConstantStep(), saveat=de.SaveAt(ts=ts))
    g = torch.autograd.grad(sol.ys[0, :, 0].sum(), ts)[0]
    torch.testing.assert_close(g, -torch.exp(-ts.detach()), rtol=1e-3, atol=0)
    sol = de.solve(de.ODETerm(lambda t, y, a: -y), de.ReversibleHeun(), 0.0, t1, y0, dt0=0.001,
                   controller=de.ConstantStep(), saveat=de.SaveAt(t1=True))
    g1 = torch.autograd.grad(sol.ys[:, -1, 0].sum(), t1)[0]
    torch.testing.assert_close(g1, torch.tensor([-math.exp(-1.0), -1.0], dtype=DT), rtol=1e-3, atol=0)
