"""The torchmech.de solve loop: per-sample stepping, saving, dense output, statuses, bad input."""

import math

import numpy as np
import pytest
import torch

import torchmech.de as de


def decay(t, y, args):
    """y' = -k y with per-sample rates k (B,) in args."""
    return -args[:, None] * y


def test_per_sample_steps_easy_vs_hard():
    k = torch.tensor([0.1, 20.0], dtype=torch.float64)
    y0 = torch.ones(2, 1, dtype=torch.float64)
    ctrl = de.PIDController(rtol=1e-7, atol=1e-9)
    sol = de.solve(decay, de.Tsit5(), 0.0, 2.0, y0, args=k, controller=ctrl)
    steps = sol.stats["num_steps"]
    assert steps[0] < steps[1] / 2
    assert (sol.stats["num_fevals"][0] < sol.stats["num_fevals"][1])
    assert torch.allclose(sol.ys[:, -1, 0], torch.exp(-2.0 * k), rtol=1e-5, atol=1e-9)
    for i in range(2):
        alone = de.solve(decay, de.Tsit5(), 0.0, 2.0, y0[i:i + 1], args=k[i:i + 1], controller=ctrl)
        assert torch.equal(alone.ys[0], sol.ys[i])
        assert int(alone.stats["num_steps"][0]) == int(steps[i])
        assert int(alone.stats["num_rejected"][0]) == int(sol.stats["num_rejected"][i])


def test_finished_sample_stops_changing():
    # sample 0 ends at t1 = 0.5, sample 1 runs to 3; sample 0's state must be the solution at 0.5
    y0 = torch.ones(2, 1, dtype=torch.float64)
    k = torch.tensor([1.0, 1.0], dtype=torch.float64)
    t1 = torch.tensor([0.5, 3.0], dtype=torch.float64)
    sol = de.solve(decay, de.Dopri5(), 0.0, t1, y0, args=k, controller=de.PIDController(1e-9, 1e-9))
    assert torch.equal(sol.ts[:, -1], t1)
    assert torch.allclose(sol.ys[:, -1, 0], torch.exp(-t1), rtol=1e-7)


def test_saveat_shared_and_per_sample_ts_and_t0_t1():
    y0 = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    k = torch.tensor([0.5, 1.5], dtype=torch.float64)
    t0 = torch.tensor([0.0, 1.0], dtype=torch.float64)
    t1 = torch.tensor([2.0, 4.0], dtype=torch.float64)
    ts = torch.stack([torch.linspace(0.0, 2.0, 9), torch.linspace(1.0, 4.0, 9)]).double()
    sol = de.solve(decay, de.Tsit5(), t0, t1, y0, args=k, saveat=de.SaveAt(t0=True, ts=ts, t1=True),
                   controller=de.PIDController(1e-9, 1e-9))
    assert sol.ts.shape == (2, 11) and sol.ys.shape == (2, 11, 1)
    assert torch.equal(sol.ts[:, 1:10], ts)
    exact = y0[:, None] * torch.exp(-k[:, None, None] * (sol.ts - t0[:, None])[..., None])
    assert torch.allclose(sol.ys, exact, rtol=1e-7, atol=1e-10)
    # ts saving uses the interpolant, not extra steps
    plain = de.solve(decay, de.Tsit5(), t0, t1, y0, args=k, controller=de.PIDController(1e-9, 1e-9))
    assert torch.equal(plain.stats["num_steps"], sol.stats["num_steps"])


def test_saveat_steps():
    y0 = torch.ones(2, 1, dtype=torch.float64)
    k = torch.tensor([0.1, 5.0], dtype=torch.float64)
    sol = de.solve(decay, de.Dopri5(), 0.0, 1.0, y0, args=k, saveat=de.SaveAt(steps=True),
                   controller=de.PIDController(1e-6, 1e-8))
    n = sol.stats["num_accepted"]
    assert sol.ts.shape[1] == int(n.max())
    for i in range(2):
        row = sol.ts[i, : int(n[i])]
        assert (row.diff() > 0).all() and row[-1] == 1.0
        assert (sol.ts[i, int(n[i]):] == 1.0).all()  # padding repeats the end
        assert torch.allclose(sol.ys[i, :, 0], torch.exp(-k[i] * sol.ts[i]), rtol=1e-5)


def test_dense_output_off_grid_and_derivative(probs):
    f = probs.problems["linear"][0]
    y0 = torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=torch.float64)
    for solver, tol in ((de.Dopri5(), 1e-6), (de.Tsit5(), 1e-6), (de.Dopri8(), 1e-6), (de.Bosh3(), 1e-6)):
        sol = de.solve(f, solver, 0.0, 4.0, y0, saveat=de.SaveAt(dense=True),
                       controller=de.PIDController(tol, tol))
        tq = torch.tensor([0.0, 0.123, 1.777, 2.5, 3.99, 4.0], dtype=torch.float64)
        ys = sol.evaluate(tq)

        exact = torch.stack([probs.linear_exact(float(t), y0) for t in tq], dim=1)
        assert (ys - exact).abs().max() < 20 * tol, type(solver).__name__
        dy = sol.derivative(tq)
        assert (dy - exact @ torch.tensor([[-0.5, 1.0], [-1.0, -0.5]], dtype=torch.float64).T).abs().max() < 200 * tol
    with pytest.raises(ValueError, match="outside"):
        sol.evaluate(5.0)


def test_dense_interpolant_order(probs):
    # error of the interpolant at the middle of the steps shrinks like h^5 (4th-order interpolant)
    f = probs.problems["linear"][0]
    y0 = torch.tensor([[1.0, 0.5]], dtype=torch.float64)

    for solver in (de.Dopri5(), de.Tsit5()):
        errs = []
        for n in (10, 20):
            h = 2.0 / n
            sol = de.solve(f, solver, 0.0, 2.0, y0, dt0=h, controller=de.ConstantStep(),
                           saveat=de.SaveAt(dense=True))
            tq = torch.arange(n, dtype=torch.float64) * h + 0.37 * h
            exact = torch.stack([probs.linear_exact(float(t), y0) for t in tq], dim=1)
            errs.append((sol.evaluate(tq) - exact).abs().max().item())
        assert math.log2(errs[0] / errs[1]) > 4.5


def test_backwards_integration(probs):
    f = probs.problems["linear"][0]
    y0 = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    fwd = de.solve(f, de.Tsit5(), 0.0, 3.0, y0, controller=de.PIDController(1e-10, 1e-10))
    ts = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    back = de.solve(f, de.Tsit5(), 3.0, 0.0, fwd.ys[:, -1], saveat=de.SaveAt(ts=ts, dense=True),
                    controller=de.PIDController(1e-10, 1e-10))
    assert torch.allclose(back.ys[:, -1], y0, atol=1e-8)
    assert torch.allclose(back.evaluate(1.5), fwd.ys[:, -1:] * 0 + back.evaluate(1.5))

    assert torch.allclose(back.ys[0, 1], probs.linear_exact(2.0, y0)[0], atol=1e-8)
    assert torch.allclose(back.evaluate(1.5)[:, 0], probs.linear_exact(1.5, y0), atol=1e-8)
    # fixed steps backwards too
    back2 = de.solve(f, de.RK4(), 3.0, 0.0, fwd.ys[:, -1], dt0=0.01)
    assert torch.allclose(back2.ys[:, -1], y0, atol=1e-7)


def test_mixed_directions_and_zero_length():
    y0 = torch.ones(3, 1, dtype=torch.float64)
    k = torch.ones(3, dtype=torch.float64)
    t1 = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
    sol = de.solve(decay, de.Dopri5(), 0.0, t1, y0, args=k, controller=de.PIDController(1e-9, 1e-9))
    assert torch.allclose(sol.ys[:, -1, 0], torch.exp(-t1), rtol=1e-7)
    assert int(sol.stats["num_steps"][2]) == 0


def test_auto_initial_step_reasonable():
    y0 = torch.ones(2, 1, dtype=torch.float64)
    k = torch.tensor([1.0, 1000.0], dtype=torch.float64)
    sol = de.solve(decay, de.Dopri5(), 0.0, 1e-3, y0, args=k, controller=de.PIDController(1e-6, 1e-9))
    # Hairer's algorithm picks a smaller first step for the faster sample: few rejections overall
    assert (sol.stats["num_rejected"] <= 2).all()


def test_step_ts_and_jump_ts():
    def f(t, y, args):  # discontinuous forcing at t = 1
        return torch.where(t[:, None] < 1.0, torch.ones_like(y), -torch.ones_like(y))

    y0 = torch.zeros(1, 1, dtype=torch.float64)
    sol = de.solve(f, de.Dopri5(), 0.0, 2.0, y0, saveat=de.SaveAt(steps=True),
                   controller=de.PIDController(1e-8, 1e-8, jump_ts=torch.tensor([1.0])))
    assert ((sol.ts - 1.0).abs() < 1e-12).any()  # a step ends (one ulp) at the jump
    assert abs(float(sol.ys[0, -1, 0])) < 1e-10
    assert int(sol.stats["num_steps"][0]) < 15  # no cascade of rejections at the discontinuity
    sol2 = de.solve(decay, de.Dopri5(), 0.0, 2.0, y0 + 1, args=torch.ones(1, dtype=torch.float64),
                    saveat=de.SaveAt(steps=True),
                    controller=de.PIDController(1e-4, 1e-6, step_ts=torch.tensor([0.3, 0.7], dtype=torch.float64)))
    assert (sol2.ts == 0.3).any() and (sol2.ts == 0.7).any()


def test_step_to():
    y0 = torch.ones(2, 1, dtype=torch.float64)
    ts = torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=torch.float64)
    sol = de.solve(decay, de.RK4(), 0.0, 1.0, y0, args=torch.ones(2, dtype=torch.float64),
                   controller=de.StepTo(ts), saveat=de.SaveAt(steps=True))
    assert torch.equal(sol.ts[0], ts[1:])
    assert (sol.stats["num_steps"] == 3).all()


def test_control_and_multi_term():
    # dy = -y dt + y dX with X(t) = sin(t): y = exp(-t + sin t)
    class Sine:
        def evaluate(self, t0, t1):
            return (torch.sin(t1) - torch.sin(t0))[:, None]

    drift = de.ODETerm(lambda t, y, a: -y)
    diff = de.ControlTerm(lambda t, y, a: y[..., None], Sine())
    y0 = torch.ones(3, 1, dtype=torch.float64)
    sol = de.solve(de.MultiTerm(drift, diff), de.Heun(), 0.0, 2.0, y0, dt0=0.001,
                   controller=de.ConstantStep())
    assert torch.allclose(sol.ys[:, -1, 0], torch.full((3,), math.exp(-2 + math.sin(2.0)), dtype=torch.float64),
                          rtol=1e-4)


def test_progress_bar(capsys):
    y0 = torch.ones(1, 1, dtype=torch.float64)
    sol = de.solve(decay, de.Tsit5(), 0.0, 1.0, y0, args=torch.ones(1, dtype=torch.float64), progress=True)
    assert sol.status[0] == de.Status.SUCCESS
    assert "solve" in capsys.readouterr().err


# -- statuses -------------------------------------------------------------------------------------
def stiff(t, y, args):
    return torch.stack([-1e4 * (y[:, 0] - torch.cos(t)), -y[:, 1]], dim=-1)


def test_max_steps_status_and_throw():
    y0 = torch.tensor([[0.0, 1.0]], dtype=torch.float64).repeat(2, 1)
    y0[1] = torch.tensor([1.0, 1.0])
    t1 = torch.tensor([10.0, 1e-5], dtype=torch.float64)
    sol = de.solve(stiff, de.Dopri5(), 0.0, t1, y0, max_steps=50, throw=False,
                   controller=de.PIDController(1e-6, 1e-8))
    assert sol.status.tolist() == [de.Status.MAX_STEPS, de.Status.SUCCESS]
    assert int(sol.stats["num_steps"][0]) == 50
    assert torch.isfinite(sol.ys).all()
    with pytest.raises(RuntimeError, match=r"MAX_STEPS for samples \[0\]"):
        de.solve(stiff, de.Dopri5(), 0.0, t1, y0, max_steps=50, controller=de.PIDController(1e-6, 1e-8))


def test_nonfinite_status():
    def f(t, y, args):
        bad = (t >= 0.5)[:, None] & (args[:, None] > 0)
        return torch.where(bad, torch.full_like(y, float("nan")), -y)

    y0 = torch.ones(2, 1, dtype=torch.float64)
    flag = torch.tensor([1.0, 0.0], dtype=torch.float64)
    for ctrl, solver in ((de.PIDController(1e-6, 1e-8), de.Tsit5()), (de.ConstantStep(), de.RK4())):
        sol = de.solve(f, solver, 0.0, 1.0, y0, args=flag, dt0=0.01, throw=False, controller=ctrl,
                       saveat=de.SaveAt(ts=torch.linspace(0, 1, 5), t1=True))
        assert sol.status.tolist() == [de.Status.NONFINITE, de.Status.SUCCESS]
        assert torch.isfinite(sol.ys[0, :2]).all() and torch.isfinite(sol.ys[1]).all()
        assert float(sol.ts[0, -1]) < 0.5 + 1e-12  # stopped where the field became NaN
        with pytest.raises(RuntimeError, match="NONFINITE"):
            de.solve(f, solver, 0.0, 1.0, y0, args=flag, dt0=0.01, controller=ctrl)


def test_dt_underflow_status():
    def f(t, y, args):  # blows up at t = 1: needs ever smaller steps
        return y ** 2

    y0 = torch.ones(1, 1, dtype=torch.float64)
    sol = de.solve(f, de.Dopri5(), 0.0, 2.0, y0, throw=False,
                   controller=de.PIDController(1e-6, 1e-6, dtmin=1e-4))
    assert sol.status.tolist() == [de.Status.DT_UNDERFLOW]
    assert 0.9 < float(sol.t_final[0]) < 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loop", ["fast", "generic"])
def test_rejected_steps_a_few_ulps_long_underflow(monkeypatch, dtype, loop):
    """Without dtmin, a finite-time blow-up (y' = y^2, y(0) = 1, at t = 1) ends in DT_UNDERFLOW near t = 1. A
    rejected step a few ulps long was retried identically (t + 0.87 h rounds back to t + h) until max_steps, so
    odeint's unlimited default ran for ever."""
    if loop == "generic":
        from torchmech.de import _fast
        monkeypatch.setattr(_fast, "unsupported", lambda integ: "forced generic loop")
    sol = de.solve(lambda t, y, a: y ** 2, de.Dopri5(), 0.0, 2.0, torch.ones(3, 1, dtype=dtype), throw=False,
                   controller=de.PIDController(1e-7, 1e-9), max_steps=5000)
    assert sol.status.tolist() == [de.Status.DT_UNDERFLOW] * 3
    assert int(sol.stats["num_steps"].max()) < 1000
    assert 0.999 < float(sol.t_final.min()) <= float(sol.t_final.max()) < 1.001  # at the blow-up


@pytest.mark.parametrize("loop", ["fast", "generic"])
def test_a_first_step_below_half_an_ulp_of_t0_grows(monkeypatch, loop):
    """A proposed step too short to move t (float32 t0 = 5000, where the automatic first step is 1e-4 < half an
    ulp = 2.4e-4, or a tiny dt0) was taken with length 0, accepted, and the next step grew from that zero length:
    the sample never moved until max_steps. It now grows from the proposal, as torchdiffeq does."""
    if loop == "generic":
        from torchmech.de import _fast
        monkeypatch.setattr(_fast, "unsupported", lambda integ: "forced generic loop")
    sol = de.solve(lambda t, y, a: 1 - y, de.Tsit5(), 5000.0, 5001.0, torch.zeros(2, 1), throw=False,
                   controller=de.PIDController(1e-3, 1e-6))
    assert sol.status.tolist() == [de.Status.SUCCESS] * 2
    torch.testing.assert_close(sol.ys[:, -1, 0], torch.full((2,), 1 - math.exp(-1.0)), rtol=1e-4, atol=1e-4)
    # with a PID controller the zero-length steps leave its error history alone (their zero error held the
    # following steps at factormin: 13-14 steps instead of 10-11 here; the two loops differ by one step in float32)
    pid = de.solve(lambda t, y, a: 1 - y, de.Tsit5(), 5000.0, 5001.0, torch.zeros(1, 1), throw=False,
                   controller=de.PIDController(1e-3, 1e-6, pcoeff=0.2, icoeff=0.4, dcoeff=0.1))
    assert pid.status.tolist() == [de.Status.SUCCESS] and int(pid.stats["num_steps"][0]) <= 11
    sol = de.solve(decay, de.Dopri5(), 100.0, 101.0, torch.ones(1, 1), dt0=1e-6, args=torch.ones(1),
                   controller=de.PIDController(1e-6, 1e-8), throw=False)
    assert sol.status.tolist() == [de.Status.SUCCESS]
    assert abs(float(sol.ys[0, -1, 0]) - math.exp(-1.0)) < 1e-5


def test_force_dtmin_accepts_a_dtmin_proposal_that_rounds_longer():
    """float32 at t ~ 50: a proposal of exactly dtmin = 1e-5 rounds to a longer step (ulp 3.8e-6), which the
    forced acceptance (tested on the rounded length) never took; the step was retried for ever (MAX_STEPS, later
    DT_UNDERFLOW). A jump of the field at t = 50.5 needs steps at dtmin to pass."""
    def f(t, y, a):
        return torch.where(t[:, None] > 50.5, torch.full_like(y, 1e4), torch.zeros_like(y))

    for dtype in (torch.float32, torch.float64):
        sol = de.solve(f, de.Tsit5(), 50.0, 51.0, torch.zeros(1, 1, dtype=dtype), throw=False, max_steps=3000,
                       controller=de.PIDController(1e-6, 1e-6, dtmin=1e-5, force_dtmin=True))
        assert sol.status.tolist() == [de.Status.SUCCESS]
        assert abs(float(sol.ys[0, -1, 0]) - 5000.0) < 0.5


def test_a_zero_step_proposal_underflows():
    # the generic controller contract: a proposal of 0 for an active sample cannot grow; it is not accepted
    ctrl = de.PIDController(1e-6, 1e-6)
    t = torch.tensor([1.0, 1.0], dtype=torch.float64)
    y = torch.ones(2, 1, dtype=torch.float64)
    dt = torch.tensor([0.0, 0.1], dtype=torch.float64)
    st = {"e1": torch.ones(2, dtype=torch.float64), "e2": torch.ones(2, dtype=torch.float64)}
    accept, dt_new, underflow, _ = ctrl.adapt(t, t + dt, dt, y, y, torch.zeros_like(y), st, 5)
    assert accept.tolist() == [False, True] and underflow.tolist() == [True, False]
    assert float(dt_new[1]) == pytest.approx(1.0)  # zero error: grows by factormax


# -- bad input -------------------------------------------------------------------------------------
def test_bad_inputs(probs):
    f = probs.problems["linear"][0]
    y0 = torch.ones(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"y0 must have a leading batch axis.*\(2,\)"):
        de.solve(f, de.Tsit5(), 0.0, 1.0, torch.ones(2))
    with pytest.raises(ValueError, match=r"y0 must be finite; samples \[1\]"):
        de.solve(f, de.Tsit5(), 0.0, 1.0, torch.tensor([[1.0, 0.0], [float("nan"), 0.0]]))
    with pytest.raises(TypeError, match="y0 must be a float32 or float64 tensor, got torch.int64"):
        de.solve(f, de.Tsit5(), 0.0, 1.0, torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="y0 must be a float32 or float64 tensor, got torch.float16"):
        de.solve(lambda t, y, a: -y, de.Tsit5(), 0.0, 1.0, torch.ones(2, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"y0 has no state entries per sample \(shape \(2, 0\)\)"):
        de.solve(lambda t, y, a: -y, de.Tsit5(), 0.0, 1.0, torch.ones(2, 0))
    with pytest.raises(ValueError, match="ODETerm f\\(t, y, args\\) must return a tensor of y's shape \\(2, 2\\), got tuple"):
        de.solve(lambda t, y, a: (y, y), de.Tsit5(), 0.0, 1.0, y0)
    with pytest.raises(ValueError, match=r"sample 0 has \[0.0, ..., 0.30000001192092896\] against t0=0.0, t1=0.3"):
        de.solve(lambda t, y, a: -y, de.RK4(), 0.0, 0.3, y0, controller=de.StepTo(torch.linspace(0, 0.3, 4)))
    assert de.solve(lambda t, y, a: -y, de.Tsit5(), np.float32(0.0), np.float64(1.0), y0).status.eq(0).all()
    with pytest.raises(ValueError, match=r"t1 must have shape \(\) or \(B,\)=\(2,\), got \(3,\)"):
        de.solve(f, de.Tsit5(), 0.0, torch.ones(3), y0)
    with pytest.raises(ValueError, match="SaveAt.ts: save times must lie in"):
        de.solve(f, de.Tsit5(), 0.0, 0.0, y0, saveat=de.SaveAt(ts=torch.tensor([0.0, 0.5])))
    with pytest.raises(ValueError, match="monotonic"):
        de.solve(f, de.Tsit5(), 0.0, 1.0, y0, saveat=de.SaveAt(ts=torch.tensor([0.5, 0.2])))
    with pytest.raises(ValueError, match=r"SaveAt.ts: expected shape \(T,\) or \(B=2, T\)"):
        de.solve(f, de.Tsit5(), 0.0, 1.0, y0, saveat=de.SaveAt(ts=torch.zeros(3, 4)))
    with pytest.raises(TypeError, match="unknown solver type str|unknown solver type"):
        de.solve(f, object(), 0.0, 1.0, y0)
    with pytest.raises(ValueError, match="unknown solver name 'rk45'"):
        de.solve(f, "rk45", 0.0, 1.0, y0)
    with pytest.raises(ValueError, match=r"rtol must be > 0"):
        de.PIDController(rtol=0.0)
    with pytest.raises(ValueError, match=r"atol must be >= 0"):
        de.PIDController(rtol=1e-3, atol=-1.0)
    with pytest.raises(ValueError, match="rtol of shape \\(3,\\) does not broadcast"):
        de.solve(f, de.Tsit5(), 0.0, 1.0, y0, controller=de.PIDController(rtol=torch.ones(3) * 1e-3))
    with pytest.raises(ValueError, match="dt0 must be given with ConstantStep"):
        de.solve(f, de.RK4(), 0.0, 1.0, y0)
    with pytest.raises(ValueError, match="Euler has no error estimate"):
        de.solve(f, de.Euler(), 0.0, 1.0, y0, controller=de.PIDController())
    with pytest.raises(ValueError, match="SaveAt: nothing to save"):
        de.SaveAt()
    with pytest.raises(ValueError, match="max_steps must be a positive int"):
        de.solve(f, de.Tsit5(), 0.0, 1.0, y0, max_steps=0)
    with pytest.raises(ValueError, match=r"increment must match y0 \(shape \(2, 2\)"):
        de.solve(lambda t, y, a: y[:, 0], de.Tsit5(), 0.0, 1.0, y0)
    with pytest.raises(ValueError, match="returns torch.float64 for a torch.float32 state"):
        de.solve(lambda t, y, a: y.double(), de.Tsit5(), 0.0, 1.0, y0.float())
    # the other way round the increment was promoted and passed, at float32 accuracy
    with pytest.raises(ValueError, match="returns torch.float32 for a torch.float64 state"):
        de.solve(lambda t, y, a: y.float(), de.Tsit5(), 0.0, 1.0, y0.double())
    with pytest.raises(ValueError, match="evaluate: solve with saveat=SaveAt\\(dense=True\\)"):
        de.solve(f, de.Tsit5(), 0.0, 1.0, y0).evaluate(0.5)


def test_per_component_tolerances(probs):
    f = probs.problems["lotka"][0]
    y0 = torch.tensor([[3.0, 1.0]], dtype=torch.float64)
    loose = de.solve(f, de.Tsit5(), 0.0, 2.0, y0, controller=de.PIDController(rtol=torch.tensor([1e-3, 1e-3]), atol=1e-6))
    tight = de.solve(f, de.Tsit5(), 0.0, 2.0, y0, controller=de.PIDController(rtol=torch.tensor([1e-3, 1e-9]), atol=1e-12))
    assert int(tight.stats["num_steps"][0]) > int(loose.stats["num_steps"][0])


def test_dt0_is_used_by_pid_and_sign_ignored():
    y0 = torch.ones(1, 1, dtype=torch.float64)
    k = torch.ones(1, dtype=torch.float64)
    sol = de.solve(decay, de.Dopri5(), 1.0, 0.0, y0, args=k, dt0=0.125, saveat=de.SaveAt(steps=True),
                   controller=de.PIDController(1e-3, 1e-3, factormax=1.0))
    # factormax=1 forbids growth: the first step is exactly -dt0 (backwards)
    assert float(sol.ts[0, 0]) == 0.875
    assert torch.allclose(sol.ys[:, -1, 0], torch.exp(torch.tensor([1.0], dtype=torch.float64)), rtol=1e-3)


def test_dense_per_sample_query_times():
    y0 = torch.ones(2, 1, dtype=torch.float64)
    k = torch.tensor([1.0, 2.0], dtype=torch.float64)
    t1 = torch.tensor([1.0, 3.0], dtype=torch.float64)
    sol = de.solve(decay, de.Tsit5(), 0.0, t1, y0, args=k, saveat=de.SaveAt(dense=True),
                   controller=de.PIDController(1e-9, 1e-9))
    tq = torch.tensor([[0.2, 0.9], [2.5, 3.0]], dtype=torch.float64)
    assert torch.allclose(sol.evaluate(tq)[..., 0], torch.exp(-k[:, None] * tq), rtol=1e-7)
    with pytest.raises(ValueError, match="outside the solved interval"):
        sol.evaluate(torch.tensor([[0.5], [3.5]], dtype=torch.float64))


@pytest.mark.parametrize("backwards", [False, True])
def test_dense_output_across_jump_gaps_and_rejected_steps(backwards):
    """dy/dt = -y before t = 0.5, +y after: steps end one ulp before the jump and restart one ulp after it,
    and the dense output covers that gap; rejected steps (a tight tolerance from a large dt0) do not count."""
    def f(t, y, args):
        return torch.where((t < 0.5)[:, None], -y, y)

    t0, t1 = (1.0, 0.0) if backwards else (0.0, 1.0)
    y0 = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    sol = de.solve(de.ODETerm(f), de.Tsit5(), t0, t1, y0, dt0=0.9 if not backwards else -0.9,
                   saveat=de.SaveAt(dense=True), controller=de.PIDController(1e-10, 1e-10, jump_ts=torch.tensor([0.5])))
    assert bool((sol.stats["num_rejected"] > 0).all())
    half = torch.tensor(0.5, dtype=torch.float64)
    tq = torch.stack([half, torch.nextafter(half, half + 1), torch.nextafter(half, half - 1),
                      torch.tensor(0.25, dtype=torch.float64), torch.tensor(0.75, dtype=torch.float64),
                      torch.tensor(t0, dtype=torch.float64), torch.tensor(t1, dtype=torch.float64)])

    def exact(t):  # y(t) / y(t0)
        g = lambda s: torch.where(s < 0.5, -s, s - 1.0)  # a potential: y = y(t0) exp(g(t) - g(t0))
        return torch.exp(g(t) - g(torch.tensor(t0, dtype=torch.float64)))

    torch.testing.assert_close(sol.evaluate(tq)[..., 0], y0 * exact(tq)[None], rtol=1e-8, atol=0)


def test_dense_derivative_shapes_and_just_after_a_jump():
    """derivative has evaluate's shape also when no step was taken; one ulp after a jump it is the new slope."""
    f = lambda t, y, a: torch.stack([y[:, 1], -y[:, 0]], 1)  # noqa: E731
    y0 = torch.tensor([[0.2, -1.0], [1.0, 0.0]], dtype=torch.float64)
    sol = de.solve(f, de.Tsit5(), 1.0, 1.0, y0, saveat=de.SaveAt(dense=True))
    assert sol.derivative(1.0).shape == sol.evaluate(1.0).shape == (2, 1, 2)
    assert sol.derivative(torch.tensor([1.0, 1.0], dtype=torch.float64)).shape == (2, 2, 2)
    g = lambda t, y, a: torch.where(t < 1.0, 1.0, -1.0).to(y.dtype)[:, None] * torch.ones_like(y)  # noqa: E731
    sol = de.solve(g, de.Tsit5(), 0.0, 2.0, torch.zeros(1, 1, dtype=torch.float64), saveat=de.SaveAt(dense=True),
                   controller=de.PIDController(1e-6, 1e-8, jump_ts=torch.tensor([1.0], dtype=torch.float64)))
    after = torch.tensor([1 + k * 2.0 ** -52 for k in range(1, 10)], dtype=torch.float64)
    before = torch.tensor([1 - k * 2.0 ** -53 for k in range(2, 10)], dtype=torch.float64)
    torch.testing.assert_close(sol.derivative(after)[0, :, 0], torch.full((9,), -1.0, dtype=torch.float64))
    torch.testing.assert_close(sol.derivative(before)[0, :, 0], torch.full((8,), 1.0, dtype=torch.float64))


def test_control_term_shape_error():
    class Bad:
        def evaluate(self, t0, t1):
            return torch.zeros(t0.shape[0], 3, dtype=t0.dtype)

    term = de.ControlTerm(lambda t, y, a: y[..., None].expand(-1, -1, 2), Bad())
    with pytest.raises(ValueError, match=r"a vector field of shape \(2, 1, 2\) and a control increment of shape \(2, 3\)"):
        de.solve(term, de.Euler(), 0.0, 1.0, torch.ones(2, 1), dt0=0.1)


def test_saveat_order_of_pieces():
    y0 = torch.ones(1, 1, dtype=torch.float64)
    ts = torch.tensor([0.25, 0.5], dtype=torch.float64)
    sol = de.solve(decay, de.Tsit5(), 0.0, 1.0, y0, args=torch.ones(1, dtype=torch.float64),
                   saveat=de.SaveAt(t0=True, ts=ts, t1=True))
    assert sol.ts[0].tolist() == [0.0, 0.25, 0.5, 1.0]
    assert "SUCCESS" in repr(sol)


def test_pid_coefficients_and_dtmax(probs):
    f, y0, t1 = probs.problems["vanderpol"]
    y0 = torch.tensor(y0, dtype=torch.float64)
    ref = de.solve(f, de.Tsit5(), 0.0, t1, y0, controller=de.PIDController(1e-11, 1e-11), max_steps=20000)
    pid = de.solve(f, de.Tsit5(), 0.0, t1, y0,
                   controller=de.PIDController(1e-7, 1e-7, pcoeff=0.4, icoeff=0.3, dcoeff=0.1))
    assert (pid.ys - ref.ys).abs().max() < 1e-5
    capped = de.solve(f, de.Tsit5(), 0.0, t1, y0, saveat=de.SaveAt(steps=True),
                      controller=de.PIDController(1e-3, 1e-3, dtmax=0.05))
    n = int(capped.stats["num_accepted"].min())
    assert n >= t1 / 0.05 and (capped.ts[:, :n].diff(dim=1) <= 0.05 + 1e-12).all()


@pytest.mark.parametrize("t1", [3.0, 20.0])
def test_a_discontinuity_at_t1_in_float32_ends(t1):
    """The last step, rejected at the jump, must be allowed to shrink: snapping it back onto t1 (64 ulps of t1
    is 1.5e-4 at t1 = 20 in float32) repeated the same rejected step until max_steps."""
    def f(t, y, a):
        return -y + (torch.floor(t) % 2 * 2 - 1)[:, None]

    sol = de.solve(f, de.Dopri5(), 0.0, t1, torch.zeros(1, 1), controller=de.PIDController(1e-6, 1e-6),
                   max_steps=5000, throw=False)
    assert sol.status.tolist() == [0] and int(sol.stats["num_steps"][0]) < 2000
    ref = de.solve(f, de.Dopri5(), 0.0, t1, torch.zeros(1, 1, dtype=torch.float64),
                   controller=de.PIDController(1e-9, 1e-9, jump_ts=torch.arange(1.0, t1 + 1, dtype=torch.float64)))
    assert abs(float(sol.ys[0, -1, 0]) - float(ref.ys[0, -1, 0])) < 1e-4


def _oscillator(t, y, args):
    return torch.stack([y[:, 1], -y[:, 0]], dim=1)


@pytest.mark.parametrize("path", ["ts", "dense", "grid", "generic", "odeint"])
def test_float32_dopri8_interpolant_is_as_accurate_as_its_steps(path):
    """Dopri8's dense coefficients reach ~545: formed and summed in float32 they cancel to ~1e-4 errors at
    save times, 20x its error at the step ends. They are kept in float64 for float32 states."""
    y0 = torch.tensor([[1.0, 0.0]])
    ts = torch.linspace(0, 10, 201)
    ref = torch.stack([ts.double().cos(), -ts.double().sin()], dim=1)
    ctrl = de.PIDController(1e-6, 1e-6)
    if path == "ts":
        ys = de.solve(_oscillator, de.Dopri8(), 0.0, 10.0, y0, saveat=de.SaveAt(ts=ts), controller=ctrl).ys[0]
    elif path == "dense":
        ys = de.solve(_oscillator, de.Dopri8(), 0.0, 10.0, y0, saveat=de.SaveAt(dense=True),
                      controller=ctrl).evaluate(ts)[0]
    elif path == "grid":  # fixed steps of 0.5: the save times between grid points come from the interpolant
        ys = de.solve(_oscillator, de.Dopri8(), 0.0, 10.0, y0, dt0=0.5, controller=de.ConstantStep(),
                      saveat=de.SaveAt(ts=ts)).ys[0]
    elif path == "generic":  # an event that never fires keeps the solve in the generic loop
        ys = de.solve(_oscillator, de.Dopri8(), 0.0, 10.0, y0, saveat=de.SaveAt(ts=ts), controller=ctrl,
                      event=de.Event(lambda t, y, args: y[:, 0] - 5.0)).ys[0]
    else:
        import torchmech
        ys = torchmech.odeint(lambda t, y: torch.stack([y[..., 1], -y[..., 0]], -1), y0[0], ts,
                              method="dopri8", rtol=1e-6, atol=1e-6)
    assert ys.dtype == torch.float32
    err = (ys.double() - ref).abs().max().item()
    # the solution's own error at the step ends is ~5e-6 (adaptive) and ~4e-6 on the grid of 0.5 (rounding
    # over 20 steps); before, the save times between step ends were off by 1e-4 (grid: 3e-5)
    assert err < (1e-5 if path == "grid" else 2e-5), err


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_save_times_from_a_list_are_the_state_dtypes_numbers(dtype):
    """A list went through float32 first: a float64 solve saved at 0.10000000149 instead of 0.1, and a last
    save time equal to t1 fell outside [t0, t1]."""
    y0 = torch.ones(1, 1, dtype=dtype)
    sol = de.solve(lambda t, y, a: -y, de.Tsit5(), 0.0, 0.3, y0, saveat=de.SaveAt(ts=[0.1, 0.2, 0.3]))
    assert sol.ts.dtype == dtype
    assert torch.equal(sol.ts[0], torch.tensor([0.1, 0.2, 0.3], dtype=dtype))


def test_times_too_fine_for_the_state_dtype_raise():
    """float64 times 2.8e7 + [0, 0.5, ...] all round to one float32: a float32 solve returned its initial state
    (and a NeuralODE a constant trajectory) without complaint."""
    y0 = torch.ones(1, 1)
    base = 2.8e7
    with pytest.raises(ValueError, match=r"t0, t1: 28000000.0 and 28000000.5 are the same number in the state's "
                                         r"torch.float32"):
        de.solve(lambda t, y, a: -y, de.Tsit5(), base, base + 0.5, y0)
    with pytest.raises(ValueError, match=r"t0, t1: times given in torch.float64 are too fine for the state's "
                                         r"torch.float32"):
        de.solve(lambda t, y, a: -y, de.Tsit5(), torch.tensor(base, dtype=torch.float64), base + 0.5, y0)
    ts = base + torch.arange(4, dtype=torch.float64) * 0.5
    with pytest.raises(ValueError, match="SaveAt.ts: times given in torch.float64 are too fine"):
        de.solve(lambda t, y, a: -y, de.Tsit5(), 0.0, base + 2.0, y0, saveat=de.SaveAt(ts=ts))
    grid = torch.cat([torch.zeros(1, dtype=torch.float64), ts])
    with pytest.raises(ValueError, match="StepTo.ts: times given in torch.float64 are too fine"):
        de.solve(lambda t, y, a: -y, de.RK4(), 0.0, float(ts[-1]), y0, controller=de.StepTo(grid))
    # ordinary float64 grids cast to float32 pass
    de.solve(lambda t, y, a: -y, de.Tsit5(), 0.0, 10.0, y0, saveat=de.SaveAt(ts=torch.linspace(0, 10, 1001,
                                                                                             dtype=torch.float64)))


def test_step_to_a_list_of_times_in_float64():
    """StepTo([0, 0.1, 0.3]) built its grid in float32 first: a float64 solve found t1 = 0.3 'not equal' to it."""
    y0 = torch.ones(1, 1, dtype=torch.float64)
    sol = de.solve(lambda t, y, a: -y, de.RK4(), 0.0, 0.3, y0, controller=de.StepTo([0.0, 0.1, 0.3]),
                   saveat=de.SaveAt(ts=[0.1, 0.3]))
    assert torch.equal(sol.ts[0], torch.tensor([0.1, 0.3], dtype=torch.float64))


def test_times_spread_over_many_scales_are_not_too_fine():
    """The resolution check compares each time's rounding with its own neighbours: log-spaced float64 times on a
    float32 state (moved by ~1e-6 of their local spacing) raised, compared with the smallest spacing anywhere."""
    y0 = torch.ones(2, 1)
    ts = torch.logspace(-3, 4, 100, dtype=torch.float64)
    de.solve(lambda t, y, a: -1e-4 * y, de.Tsit5(), 0.0, 1e4, y0, saveat=de.SaveAt(ts=ts))
    rows = torch.stack([torch.linspace(0, 0.01, 5, dtype=torch.float64),
                        torch.linspace(0.1, 1e4 + 0.1, 5, dtype=torch.float64)])
    de.solve(lambda t, y, a: -1e-4 * y, de.Tsit5(), rows[:, 0], rows[:, -1], y0, saveat=de.SaveAt(ts=rows))
    with pytest.raises(ValueError, match="SaveAt.ts: expected shape"):  # a 0-d tensor: the shape message
        de.solve(lambda t, y, a: -y, de.Tsit5(), 0.0, 1.0, y0, saveat=de.SaveAt(ts=torch.tensor(0.5, dtype=torch.float64)))


def test_a_lower_precision_field_under_autocast_is_allowed():
    lin = torch.nn.Linear(2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sol = de.solve(lambda t, y, a: lin(y), de.RK4(), 0.0, 1.0, torch.ones(3, 2), dt0=0.1,
                       controller=de.ConstantStep())
    assert sol.ys.dtype == torch.float32


def test_inference_mode_solves_do_not_poison_later_training():
    """Solver coefficient caches and Brownian increments made under torch.inference_mode were inference tensors:
    a later solve with autograd on the same solver instance or Brownian path failed in backward."""
    solver, ctrl = de.Tsit5(), de.PIDController(1e-6, 1e-6)
    lin = torch.nn.Linear(2, 2)
    f = lambda t, y, a: torch.tanh(lin(y))  # noqa: E731
    ev = de.Event(lambda t, y, a: y[:, 0] + 10.0)  # never fires; keeps the generic loop
    bm = de.BrownianInterval(0.0, 1.0, (3, 2), seed=0)
    sig = torch.tensor(0.3, requires_grad=True)
    terms = de.MultiTerm(de.ODETerm(lambda t, y, a: -y), de.DiagonalControlTerm(lambda t, y, a: sig * torch.sin(y), bm))
    y0 = torch.randn(3, 2)
    with torch.inference_mode():
        de.solve(f, solver, 0.0, 1.0, y0, controller=ctrl, event=ev)
        de.solve(terms, de.EulerMaruyama(), 0.0, 1.0, y0, dt0=0.1)
    de.solve(f, solver, 0.0, 1.0, y0.clone().requires_grad_(), controller=ctrl, event=ev).ys.sum().backward()
    de.solve(terms, de.EulerMaruyama(), 0.0, 1.0, y0, dt0=0.1).ys.sum().backward()
    assert lin.weight.grad is not None and sig.grad is not None


SHARED_TS_CASES = [
    # (t0, t1, ts): every branch of the shared-save-times check, valid and invalid
    (0.0, 1.0, [0.0, 0.5, 1.0]),
    (0.0, 1.0, [0.2, 0.2, 0.9]),  # repeated times
    (0.0, 1.0, [0.0, 0.7, 0.5]),  # not monotonic
    (0.0, 1.0, [-0.1, 0.5]),  # before t0
    (0.0, 1.0, [0.5, 1.1]),  # after t1
    (1.0, 0.0, [1.0, 0.5, 0.0]),  # backwards
    (1.0, 0.0, [0.0, 0.5, 1.0]),  # backwards, ascending times
    (0.0, 1.0, [0.0, float("nan")]),
    (0.0, 1.0, [0.0, float("inf")]),
    (0.5, 0.5, [0.5, 0.5]),  # t0 == t1: only t0
    (0.5, 0.5, [0.5, 0.6, 0.5]),  # t0 == t1, a time elsewhere between two at t0
    ([0.0, 1.0, 0.5], [1.0, 0.0, 0.5], [0.5, 0.5]),  # mixed directions, all valid
    ([0.0, 1.0, 0.5], [1.0, 0.0, 0.5], [0.4, 0.5]),  # mixed: fine forwards, not backwards, not at t0 == t1
    ([0.0, 1.0], [1.0, 0.0], [0.0, 1.0]),  # mixed: ascending times outside the backward sample's order
]


@pytest.mark.parametrize("t0,t1,ts", SHARED_TS_CASES)
def test_shared_save_times_checked_like_per_sample_ones(t0, t1, ts):
    # shared (T,) save times take a fast check on the ends of the grid; it must accept and refuse exactly what
    # the full check of the same times given per sample (B, T) does, with the same message
    B = len(t0) if isinstance(t0, list) else 3
    t0 = torch.tensor(t0, dtype=torch.float64) if isinstance(t0, list) else t0
    t1 = torch.tensor(t1, dtype=torch.float64) if isinstance(t1, list) else t1
    ts = torch.tensor(ts, dtype=torch.float64)
    y0 = torch.ones(B, 1, dtype=torch.float64)
    outcomes = []
    for times in (ts, ts.expand(B, -1)):
        try:
            sol = de.solve(lambda t, y, a: -y, de.Tsit5(), t0, t1, y0, saveat=de.SaveAt(ts=times))
            outcomes.append(("ok", sol.ys))
        except ValueError as exc:
            outcomes.append(("error", str(exc)))
    assert outcomes[0][0] == outcomes[1][0]
    if outcomes[0][0] == "ok":
        torch.testing.assert_close(outcomes[0][1], outcomes[1][1], rtol=0, atol=0)
    else:
        assert outcomes[0][1] == outcomes[1][1]


def test_save_times_at_t0_per_sample_prefixes():
    # save times equal to t0 hold y0 exactly, however many each sample has (a prefix of its row), and the
    # others are solved values; backwards in time too
    y0 = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    t0 = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    t1 = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    ts = torch.tensor([[0.0, 0.0, 0.5], [0.2, 0.4, 1.0], [1.0, 0.5, 0.0]], dtype=torch.float64)
    sol = de.solve(lambda t, y, a: -y, de.Tsit5(), t0, t1, y0, saveat=de.SaveAt(ts=ts),
                   controller=de.PIDController(1e-10, 1e-10))
    exact = y0[:, None, :] * torch.exp(-(ts - t0[:, None]))[..., None]
    torch.testing.assert_close(sol.ys, exact, rtol=1e-8, atol=0)
    assert torch.equal(sol.ys[0, :2], y0[0].expand(2, 1)) and torch.equal(sol.ys[2, 0], y0[2])
