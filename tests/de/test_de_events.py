"""Events in torchmech.de: per-sample terminal zero crossings, directions, differentiable event times."""

import math

import pytest
import torch

import torchmech.de as de

G = 9.81


def ball(t, y, args):
    return torch.stack([y[:, 1], torch.full_like(y[:, 1], -G)], dim=-1)


def height(t, y, args):
    return y[:, 0]


def landing_time(h0, v0):
    return (v0 + torch.sqrt(v0 ** 2 + 2 * G * h0)) / G


@pytest.mark.parametrize("solver", [de.Tsit5(), de.Dopri5(), de.Bosh3()], ids=lambda s: type(s).__name__)
def test_bouncing_ball_per_sample_event_times(solver):
    h0 = torch.tensor([1.0, 5.0, 0.3, 10.0], dtype=torch.float64)
    v0 = torch.tensor([0.0, 2.0, -1.0, 5.0], dtype=torch.float64)
    y0 = torch.stack([h0, v0], dim=-1)
    ts = torch.linspace(0.0, 5.0, 51, dtype=torch.float64)
    sol = de.solve(ball, solver, 0.0, 5.0, y0, saveat=de.SaveAt(ts=ts, t1=True),
                   event=de.Event(height, direction=-1), controller=de.PIDController(1e-8, 1e-8))
    expect = landing_time(h0, v0)
    assert (sol.status == de.Status.EVENT).all()
    assert torch.allclose(sol.event_t, expect, atol=1e-9, rtol=0)
    assert torch.allclose(sol.ts[:, -1], expect, atol=1e-9, rtol=0)
    assert sol.ys[:, -1, 0].abs().max() < 1e-8
    # save times before the event hold the trajectory, those after it hold NaN
    before = ts[None] <= expect[:, None]
    exact = h0[:, None] + v0[:, None] * ts - 0.5 * G * ts ** 2
    assert torch.allclose(sol.ys[:, :-1, 0][before], exact[before], atol=1e-8)
    assert torch.isnan(sol.ys[:, :-1, 0][~before]).all()


def test_event_direction_and_nonterminal():
    y0 = torch.tensor([[0.0, 5.0]], dtype=torch.float64)
    cond = lambda t, y, a: y[:, 0] - 1.0  # noqa: E731
    up = de.solve(ball, de.Tsit5(), 0.0, 2.0, y0, event=de.Event(cond, direction=1),
                  controller=de.PIDController(1e-9, 1e-9))
    down = de.solve(ball, de.Tsit5(), 0.0, 2.0, y0, event=de.Event(cond, direction=-1),
                    controller=de.PIDController(1e-9, 1e-9))
    disc = math.sqrt(25 - 2 * G)
    assert abs(float(up.event_t[0]) - (5 - disc) / G) < 1e-9
    assert abs(float(down.event_t[0]) - (5 + disc) / G) < 1e-9
    nonterm = de.solve(ball, de.Tsit5(), 0.0, 2.0, y0, event=de.Event(cond, terminal=False),
                       controller=de.PIDController(1e-9, 1e-9))
    assert nonterm.status[0] == de.Status.SUCCESS
    assert float(nonterm.t_final[0]) == 2.0
    assert abs(float(nonterm.event_t[0]) - (5 - disc) / G) < 1e-9


def test_no_event_keeps_success_and_nan_event_time():
    y0 = torch.tensor([[100.0, 0.0]], dtype=torch.float64)
    sol = de.solve(ball, de.Tsit5(), 0.0, 1.0, y0, event=de.Event(height))
    assert sol.status[0] == de.Status.SUCCESS and torch.isnan(sol.event_t).all()


def test_event_time_gradient_implicit_function_theorem():
    h0 = torch.tensor([1.0, 4.0], dtype=torch.float64, requires_grad=True)
    v0 = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    y0 = torch.stack([h0, v0], dim=-1)
    sol = de.solve(ball, de.Tsit5(), 0.0, 5.0, y0, event=de.Event(height, direction=-1),
                   controller=de.PIDController(1e-9, 1e-9))
    gh, gv = torch.autograd.grad(sol.event_t.sum(), [h0, v0], retain_graph=True)
    eh, ev = torch.autograd.grad(landing_time(h0, v0).sum(), [h0, v0])
    assert torch.allclose(gh, eh, rtol=1e-6)
    assert torch.allclose(gv, ev, rtol=1e-6)
    # the state at the event moves with the event time: d v_event / d h0 = -G * dt/dh0
    gv_end = torch.autograd.grad(sol.ys[:, -1, 1].sum(), h0)[0]
    assert torch.allclose(gv_end, -G * eh, rtol=1e-6)


def test_event_with_args_parameter_gradient():
    # threshold crossing y(t) = exp(-k t) = c  ->  t = -log(c)/k ;  dt/dk = log(c)/k^2
    k = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
    y0 = torch.ones(2, 1, dtype=torch.float64)
    c = 0.3
    sol = de.solve(lambda t, y, a: -a[:, None] * y, de.Dopri5(), 0.0, 10.0, y0, args=k,
                   event=de.Event(lambda t, y, a: y[:, 0] - c), controller=de.PIDController(1e-10, 1e-10))
    assert torch.allclose(sol.event_t, -math.log(c) / k, rtol=1e-7)
    g = torch.autograd.grad(sol.event_t.sum(), k)[0]
    assert torch.allclose(g, math.log(c) / k.detach() ** 2, rtol=1e-5)


def test_event_time_gradient_with_respect_to_start_times():
    """Autonomous decay to a threshold: the event is t0 + log(y0 / c) / k, so d t_e / d t0 = 1 and the state at
    the event does not depend on t0; a time-dependent threshold c(t) = c + a t moves it by 1 / (1 + a / (k c(t_e)))."""
    k, c = 1.5, 0.4
    y0 = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    t0 = torch.tensor([0.0, 0.7], dtype=torch.float64, requires_grad=True)
    sol = de.solve(lambda t, y, a: -k * y, de.Dopri5(), t0, 20.0, y0, event=de.Event(lambda t, y, a: y[:, 0] - c),
                   controller=de.PIDController(1e-10, 1e-10))
    torch.testing.assert_close(sol.event_t, t0.detach() + torch.log(y0[:, 0] / c) / k, rtol=1e-8, atol=0)
    (g,) = torch.autograd.grad(sol.event_t.sum(), t0, retain_graph=True)
    torch.testing.assert_close(g, torch.ones_like(g), rtol=1e-9, atol=0)
    (gy,) = torch.autograd.grad(sol.ys[:, -1].sum(), t0)
    torch.testing.assert_close(gy, torch.zeros_like(gy), rtol=0, atol=1e-9)
    a = 0.1
    sol = de.solve(lambda t, y, args: -k * y, de.Dopri5(), t0, 20.0, y0,
                   event=de.Event(lambda t, y, args: y[:, 0] - c - a * t), controller=de.PIDController(1e-10, 1e-10))
    (g,) = torch.autograd.grad(sol.event_t.sum(), t0)
    ce = c + a * sol.event_t.detach()
    torch.testing.assert_close(g, 1 / (1 + a / (k * ce)), rtol=1e-7, atol=0)


def test_event_bad_inputs():
    with pytest.raises(ValueError, match="direction must be None, \\+1 or -1"):
        de.Event(height, direction=2)
    with pytest.raises(TypeError, match="cond_fn must be callable"):
        de.Event(3.0)
    y0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"cond_fn must return a tensor of shape \(B,\)"):
        de.solve(ball, de.Tsit5(), 0.0, 1.0, y0, event=de.Event(lambda t, y, a: y))


@pytest.mark.parametrize("adjoint", [de.DirectAdjoint(), de.CheckpointAdjoint()], ids=["direct", "checkpoint"])
def test_second_derivatives_through_an_event_time_raise(adjoint):
    """The implicit-function gradient holds dg/dt constant: differentiating it again gave a wrong Hessian
    ([[12.07, 0.615], [0.615, 0.031]] for v(t_e)^2, exact [[0, 0], [0, 2]]) without complaint. First derivatives
    with create_graph=True still work."""
    h0 = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    v0 = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    sol = de.solve(ball, de.Tsit5(), 0.0, 5.0, torch.stack([h0, v0], dim=-1),
                   event=de.Event(lambda t, y, a: y[:, 0] - 0.2, direction=-1),
                   controller=de.PIDController(1e-10, 1e-10), adjoint=adjoint)
    loss = (sol.ys[:, -1, 1] ** 2).sum()  # = v0^2 + 2 G (h0 - 0.2)
    gh, gv = torch.autograd.grad(loss, [h0, v0], create_graph=True)
    assert torch.allclose(gh, torch.tensor([2 * G], dtype=torch.float64), rtol=1e-6)
    assert torch.allclose(gv, 2 * v0, rtol=1e-6)
    with pytest.raises(RuntimeError, match="second derivatives through an event time are not supported"):
        torch.autograd.grad(gv.sum(), [h0, v0])


def test_second_derivatives_of_samples_without_an_event_still_work():
    """Sample 0 stops at an event, sample 1 never does: the Hessian of a loss on sample 1 alone needs no event
    derivative and must not raise (it did, the raising node covering the whole batch's event times)."""
    k = torch.tensor([1.0, 0.3], dtype=torch.float64, requires_grad=True)
    y0 = torch.ones(2, 1, dtype=torch.float64)
    sol = de.solve(lambda t, y, a: -a[:, None] * y, de.Tsit5(), 0.0, 2.0, y0, args=k,
                   event=de.Event(lambda t, y, a: y[:, 0] - 0.5), controller=de.PIDController(1e-10, 1e-12))
    assert sol.status.tolist() == [int(de.Status.EVENT), int(de.Status.SUCCESS)]
    (g,) = torch.autograd.grad(sol.ys[1, -1, 0], k, create_graph=True)  # y1(2) = exp(-2 k1)
    (h,) = torch.autograd.grad(g[1], k)
    assert abs(h[1].item() - 4 * math.exp(-0.6)) < 1e-6 and h[0].item() == 0.0
