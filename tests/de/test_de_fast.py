"""The lean loop (de/_fast.py) gives the generic loop's results: values, statistics and statuses."""

import pytest
import torch

import torchmech.de as de
from torchmech.de import _fast


def forced(t, y, args):
    # a linear oscillator with a time-dependent forcing: exercises per-sample t in the stages
    return torch.stack([y[:, 1], -y[:, 0] - 0.1 * y[:, 1] + torch.sin(2 * t)], dim=-1)


def generic(monkeypatch, *a, **kw):
    with monkeypatch.context() as m:
        m.setattr(_fast, "unsupported", lambda integ: "forced generic loop")
        return de.solve(*a, **kw)


def assert_same(a, b, tol=1e-12):
    torch.testing.assert_close(a.ts, b.ts, rtol=0, atol=0)
    torch.testing.assert_close(a.ys, b.ys, rtol=tol, atol=tol, equal_nan=True)
    for key in b.stats:
        assert torch.equal(a.stats[key], b.stats[key]), key
    assert torch.equal(a.status, b.status)


def assert_compiled_path_matches(monkeypatch, f, solver, t0, t1, y0, **kw):
    """The compiled mode's code path (blocks of steps, its save pass) run eagerly == the generic loop."""
    monkeypatch.setattr(_fast, "_compiled_step", lambda options=None: _fast.steps)
    monkeypatch.setattr(_fast, "_compiled_save", lambda options=None: _fast._save_values)
    comp = de.solve(f, solver, t0, t1, y0, compile=True, **kw)
    assert_same(comp, generic(monkeypatch, f, solver, t0, t1, y0, **kw), tol=1e-11)


CASES = [
    (de.Tsit5, dict(controller=de.PIDController(1e-7, 1e-7))),
    (de.Dopri5, dict(controller=de.PIDController(1e-6, 1e-8, pcoeff=0.2, icoeff=0.4, dcoeff=0.1))),
    (de.Dopri8, dict(controller=de.PIDController(1e-8, 1e-8, dtmax=0.3))),
    (de.Bosh3, dict(controller=de.PIDController(1e-5, torch.tensor([1e-6, 1e-5], dtype=torch.float64)))),
    (de.Heun, dict(controller=de.PIDController(1e-4, 1e-6, dtmin=1e-4, force_dtmin=True))),
    (de.RK4, dict(dt0=0.07)),
    (de.Euler, dict(dt0=0.01)),
    (de.Midpoint, dict(dt0=0.03)),
]


@pytest.mark.parametrize("solver_cls,kw", CASES, ids=[c[0].__name__ for c in CASES])
def test_fast_equals_generic(monkeypatch, solver_cls, kw):
    torch.manual_seed(0)
    y0 = torch.randn(5, 2, dtype=torch.float64)
    t0 = torch.tensor([0.0, 0.5, 0.0, 1.0, 2.0], dtype=torch.float64)
    t1 = torch.tensor([2.0, 2.5, -1.5, 1.0, 0.2], dtype=torch.float64)  # forwards, backwards, zero length
    ts = t0[:, None] + (t1 - t0)[:, None] * torch.linspace(0, 1, 17, dtype=torch.float64)
    ts[:, -1] = t1  # exactly, whatever the round-off above
    saveat = de.SaveAt(t0=True, ts=ts, t1=True)
    fast = de.solve(forced, solver_cls(), t0, t1, y0, saveat=saveat, **kw)
    slow = generic(monkeypatch, forced, solver_cls(), t0, t1, y0, saveat=saveat, **kw)
    assert_same(fast, slow)
    assert bool((fast.status == de.Status.SUCCESS).all())


@pytest.mark.parametrize("solver_cls,kw", CASES[:2] + CASES[5:6], ids=["Tsit5", "Dopri5", "RK4"])
def test_fast_dense_output_equals_generic(monkeypatch, solver_cls, kw):
    """SaveAt(dense=True) (with ts) runs the lean loop: the same values, statistics, and dense output
    (evaluate and derivative) as the generic loop, forwards, backwards and over a zero-length interval."""
    torch.manual_seed(1)
    y0 = torch.randn(5, 2, dtype=torch.float64)
    t0 = torch.tensor([0.0, 0.5, 0.0, 1.0, 2.0], dtype=torch.float64)
    t1 = torch.tensor([2.0, 2.5, -1.5, 1.0, 0.2], dtype=torch.float64)
    ts = t0[:, None] + (t1 - t0)[:, None] * torch.linspace(0, 1, 9, dtype=torch.float64)
    ts[:, -1] = t1
    saveat = de.SaveAt(ts=ts, t1=True, dense=True)
    runs = []
    real = _fast.run
    monkeypatch.setattr(_fast, "run", lambda *a, **k: runs.append(1) or real(*a, **k))
    fast = de.solve(forced, solver_cls(), t0, t1, y0, saveat=saveat, **kw)
    assert runs
    slow = generic(monkeypatch, forced, solver_cls(), t0, t1, y0, saveat=saveat, **kw)
    assert_same(fast, slow)
    tq = t0[:, None] + (t1 - t0)[:, None] * torch.rand(5, 40, dtype=torch.float64)
    tq[:, 0], tq[:, 1] = t0, t1  # the ends of the interval
    torch.testing.assert_close(fast.evaluate(tq), slow.evaluate(tq), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.derivative(tq), slow.derivative(tq), rtol=1e-12, atol=1e-12)
    # the dense output at the save times is what was saved there
    torch.testing.assert_close(fast.evaluate(ts), fast.ys[:, :-1], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="compile=True does not support SaveAt"):
        de.solve(forced, solver_cls(), t0, t1, y0, saveat=saveat, compile=True, **kw)


def test_fast_statuses_equal_generic(monkeypatch):
    def blowup(t, y, args):  # y' = y^2 blows up at t = 1/y0; sample 1 is finite on [0, 1]
        return y * y

    y0 = torch.tensor([[2.0], [0.5], [1.5]], dtype=torch.float64)
    kw = dict(saveat=de.SaveAt(ts=torch.linspace(0, 1, 5, dtype=torch.float64)), throw=False)
    for extra in (dict(max_steps=30), dict(controller=de.PIDController(1e-6, 1e-6, dtmin=1e-3))):
        fast = de.solve(blowup, de.Tsit5(), 0.0, 1.0, y0, **kw, **extra)
        slow = generic(monkeypatch, blowup, de.Tsit5(), 0.0, 1.0, y0, **kw, **extra)
        assert_same(fast, slow)
        assert fast.status[1] == de.Status.SUCCESS and bool((fast.status[[0, 2]] != de.Status.SUCCESS).all())
    fast = de.solve(blowup, de.Euler(), 0.0, 1.0, y0 * 100, dt0=0.1, **kw)
    slow = generic(monkeypatch, blowup, de.Euler(), 0.0, 1.0, y0 * 100, dt0=0.1, **kw)
    # (values saved just before the blow-up are round-off noise of ~1e80 terms: compare the rest)
    for key in slow.stats:
        assert torch.equal(fast.stats[key], slow.stats[key]), key
    assert torch.equal(fast.t_final, slow.t_final)
    assert torch.isnan(fast.ys[:, -1]).all() and torch.isnan(slow.ys[:, -1]).all()
    assert bool((fast.status == de.Status.NONFINITE).all())


def test_fast_gradients_equal_generic(monkeypatch):
    torch.manual_seed(1)
    y0 = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)

    def f(t, y, args):
        return torch.stack([y[:, 1], -args * y[:, 0]], dim=-1)

    ts = torch.linspace(0, 1.5, 7, dtype=torch.float64)
    grads = []
    for run in (de.solve, lambda *a, **k: generic(monkeypatch, *a, **k)):
        for adjoint in (de.DirectAdjoint(), de.CheckpointAdjoint(checkpoints=3)):
            sol = run(f, de.Tsit5(), 0.0, 1.5, y0, args=w, saveat=de.SaveAt(ts=ts), adjoint=adjoint,
                      controller=de.PIDController(1e-8, 1e-8))
            grads.append(torch.autograd.grad(sol.ys.pow(2).sum(), [y0, w]))
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-9, atol=1e-9)


def test_compiled_path_with_gradients_takes_one_step_per_call(monkeypatch):
    """While autograd records, the compiled mode's calls take one step each (a block's surplus masked steps would
    enter the backward pass); without it (no grad mode, or nothing requiring grad), blocks of _BLOCK. Values and
    gradients equal the generic loop's."""
    torch.manual_seed(3)
    y0 = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)

    def f(t, y, args):
        return torch.stack([y[:, 1], -args * y[:, 0] + torch.sin(t)], dim=-1)

    ks = []

    def steps(P, integ, k, *state):
        ks.append(k)
        return _fast.steps(P, integ, k, *state)

    monkeypatch.setattr(_fast, "_compiled_step", lambda options=None: steps)
    monkeypatch.setattr(_fast, "_compiled_save", lambda options=None: _fast._save_values)
    kw = dict(args=w, saveat=de.SaveAt(ts=torch.linspace(0, 2, 9, dtype=torch.float64)),
              controller=de.PIDController(1e-7, 1e-7))
    comp = de.solve(f, de.Dopri5(), 0.0, 2.0, y0, compile=True, **kw)
    assert ks and set(ks) == {1}
    slow = generic(monkeypatch, f, de.Dopri5(), 0.0, 2.0, y0, **kw)
    assert_same(comp, slow, tol=1e-11)
    g_comp = torch.autograd.grad(comp.ys.pow(2).sum(), [y0, w])
    g_slow = torch.autograd.grad(slow.ys.pow(2).sum(), [y0, w])
    for a, b in zip(g_comp, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    ks.clear()
    with torch.no_grad():
        de.solve(f, de.Dopri5(), 0.0, 2.0, y0, compile=True, **kw)
    assert set(ks) == {_fast._BLOCK}
    # grad mode on: whether a graph is recorded decides, not the mode
    y0d, wd = y0.detach(), w.detach()
    for inputs, recorded in [((y0d, wd, 2.0), False),  # nothing requires grad: a plain script
                             ((y0d, w, 2.0), True),  # a parameter of the field (through args)
                             ((y0d, wd, torch.tensor(2.0, dtype=torch.float64, requires_grad=True)), True)]:
        ks.clear()
        y, a, t1 = inputs
        de.solve(f, de.Dopri5(), 0.0, t1, y, compile=True, **dict(kw, args=a))
        assert set(ks) == ({1} if recorded else {_fast._BLOCK}), inputs


def test_compiled_save_passes_without_compiling(monkeypatch):
    # the compiled mode's save passes (the compiled _save_values, writing in place), run eagerly: a tiny
    # record limit makes them run every block, each covering a different number of save times
    monkeypatch.setattr(_fast, "_MAX_RECORDS_COMPILED", 3)
    torch.manual_seed(2)
    y0 = torch.randn(6, 2, dtype=torch.float64)
    ts = torch.linspace(0, 3, 60, dtype=torch.float64)
    kw = dict(saveat=de.SaveAt(ts=ts, t1=True), controller=de.PIDController(1e-6, 1e-6))
    calls = []
    real = _fast.save_pass
    monkeypatch.setattr(_fast, "save_pass", lambda *a: calls.append(a[-1]) or real(*a))
    assert_compiled_path_matches(monkeypatch, forced, de.Tsit5(), 0.0, 3.0, y0, **kw)
    assert len(calls) > 3 and all(c is not None for c in calls)


@pytest.mark.parametrize("block", [1, 3])
def test_compiled_blocks_of_steps_without_compiling(monkeypatch, block):
    # several steps per compiled call: samples that finish inside a block (per-sample end times) repeat
    # masked no-op steps, which must leave their state, statistics and status untouched
    monkeypatch.setattr(_fast, "_BLOCK", block)
    torch.manual_seed(4)
    y0 = torch.randn(5, 2, dtype=torch.float64)
    t1 = torch.tensor([0.3, 1.0, 1.7, 2.2, 3.0], dtype=torch.float64)
    ts = torch.linspace(0, 1, 13, dtype=torch.float64)[None] * t1[:, None]
    kw = dict(saveat=de.SaveAt(ts=ts, t1=True), controller=de.PIDController(1e-7, 1e-7))
    assert_compiled_path_matches(monkeypatch, forced, de.Dopri5(), 0.0, t1, y0, **kw)


@pytest.mark.parametrize("max_records", [3, 256])
def test_compiled_save_backwards_in_time_nonflat_state(monkeypatch, max_records):
    # the save pass locates each save time's step by the step ends in the direction of integration; a
    # (B, 2, 2) state exercises the gathers' broadcasting and the flat in-place write
    monkeypatch.setattr(_fast, "_MAX_RECORDS_COMPILED", max_records)
    torch.manual_seed(5)
    y0 = torch.randn(4, 2, 2, dtype=torch.float64)
    t0 = torch.tensor([2.0, 2.5, 3.0, 1.5], dtype=torch.float64)
    ts = t0[:, None] * torch.linspace(1, 0, 25, dtype=torch.float64)[None]

    def f(t, y, args):
        return torch.stack([y[:, :, 1], -y[:, :, 0] + torch.cos(t)[:, None]], dim=-1)

    kw = dict(saveat=de.SaveAt(ts=ts), controller=de.PIDController(1e-7, 1e-7))
    assert_compiled_path_matches(monkeypatch, f, de.Tsit5(), t0, 0.0, y0, **kw)


def test_large_state_flushes_records(monkeypatch):
    # a tiny record budget forces a save pass after every step
    monkeypatch.setattr(_fast, "_RECORD_BUDGET", 1)
    torch.manual_seed(3)
    y0 = torch.randn(3, 4, 2, dtype=torch.float64)  # non-flat state

    def f(t, y, args):
        return -y * t[:, None, None]

    ts = torch.linspace(0, 2, 9, dtype=torch.float64)
    sol = de.solve(f, de.Dopri5(), 0.0, 2.0, y0, saveat=de.SaveAt(ts=ts), controller=de.PIDController(1e-9, 1e-9))
    exact = y0[:, None] * torch.exp(-ts ** 2 / 2)[None, :, None, None]
    torch.testing.assert_close(sol.ys, exact, rtol=1e-7, atol=1e-8)


def test_nonfinite_step_retaken_when_only_the_next_stage_is_recorded(monkeypatch):
    # Euler's new state y + h f0 has no graph when f(t0, y0) does not use the parameter; the next first stage
    # f(t1, y1) does. A sample whose step goes non-finite must still be retaken with h = 0 in the graph, or its
    # NaN reaches the parameter's gradient through 0 * NaN. Reference: the healthy sample solved alone.
    p = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)

    def f(t, y, p):
        if bool((t <= 0).all()):  # the parameter is switched on after t0
            return -torch.ones_like(y)
        return -p * torch.sqrt(y)

    y0 = torch.tensor([[0.5], [2.0]], dtype=torch.float64)  # sample 0: y1 = -0.1, sqrt -> NaN
    for solve in (de.solve, lambda *a, **kw: generic(monkeypatch, *a, **kw)):
        sol = solve(f, de.Euler(), 0.0, 1.0, y0, dt0=0.6, args=p, throw=False)
        assert sol.status[0] != de.Status.SUCCESS and sol.status[1] == de.Status.SUCCESS
        (g,) = torch.autograd.grad(sol.ys[1].sum(), p)
        alone = solve(f, de.Euler(), 0.0, 1.0, y0[1:], dt0=0.6, args=p)
        (g_ref,) = torch.autograd.grad(alone.ys.sum(), p)
        assert torch.isfinite(g_ref) and g_ref != 0
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=0)
