"""solve(compile=True): the torch.compile'd step gives the eager loop's results; unsupported cases raise."""

import pytest
import torch

import torchmech.de as de
from torchmech.de import _fast


def vdp(t, y, args):
    x, v = y[..., 0], y[..., 1]
    return torch.stack([v, 2.0 * (1 - x * x) * v - x], dim=-1)


def test_compiled_matches_eager():
    torch.manual_seed(0)
    y0 = torch.rand(8, 2, dtype=torch.float64) * 4 - 2
    ts = torch.linspace(0, 3, 40, dtype=torch.float64)  # several save times per step
    kw = dict(saveat=de.SaveAt(ts=ts, t1=True), controller=de.PIDController(1e-6, 1e-6))
    eager = de.solve(vdp, de.Tsit5(), 0.0, 3.0, y0, **kw)
    comp = de.solve(vdp, de.Tsit5(), 0.0, 3.0, y0, compile=True, **kw)
    torch.testing.assert_close(comp.ys, eager.ys, rtol=1e-10, atol=1e-10)
    for key in eager.stats:
        assert torch.equal(comp.stats[key], eager.stats[key]), key
    assert torch.equal(comp.status, eager.status)


def test_compiled_gradients_match_eager():
    """A real compile under autograd (DirectAdjoint through the compiled steps): values and gradients of a small
    MLP vector field equal the eager solve's."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    y0 = torch.randn(4, 2, dtype=torch.float64)
    ts = torch.linspace(0, 1, 5, dtype=torch.float64)
    kw = dict(saveat=de.SaveAt(ts=ts), controller=de.PIDController(1e-6, 1e-6))
    out = []
    for compile in (False, True):
        sol = de.solve(lambda t, y, a: net(y), de.Dopri5(), 0.0, 1.0, y0, compile=compile, **kw)
        out.append((sol.ys, torch.autograd.grad(sol.ys.pow(2).sum(), list(net.parameters()))))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-10, atol=1e-10)
    for a, b in zip(out[1][1], out[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_compile_rejects_unsupported():
    y0 = torch.ones(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="compile=True does not support events"):
        de.solve(vdp, de.Tsit5(), 0.0, 1.0, y0, compile=True, event=de.Event(lambda t, y, a: y[:, 0]))
    with pytest.raises(ValueError, match="compile=True does not support SaveAt\\(dense=True\\)"):
        de.solve(vdp, de.Tsit5(), 0.0, 1.0, y0, compile=True, saveat=de.SaveAt(dense=True))
    with pytest.raises(ValueError, match="compile=True does not support controller StepTo"):
        de.solve(vdp, de.Tsit5(), 0.0, 1.0, y0, compile=True, controller=de.StepTo(torch.tensor([0.0, 1.0])))
    with pytest.raises(TypeError, match="compile must be a bool"):
        de.solve(vdp, de.Tsit5(), 0.0, 1.0, y0, compile="yes")
    with pytest.raises(TypeError, match="compile options must have str keys"):
        de.solve(vdp, de.Tsit5(), 0.0, 1.0, y0, compile={1: True})


def test_compile_options_reach_torch_compile(monkeypatch):
    # a dict is handed to torch.compile as Inductor options, one compiled function per set of options
    seen = []

    def fake_compile(fn, dynamic=None, options=None):
        seen.append(options)
        return fn  # run eagerly: only the plumbing is under test here

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(_fast, "_COMPILED", {})
    y0 = torch.rand(3, 2, dtype=torch.float64)
    kw = dict(saveat=de.SaveAt(ts=torch.linspace(0, 1, 5, dtype=torch.float64)), controller=de.PIDController(1e-6, 1e-6))
    eager = de.solve(vdp, de.Tsit5(), 0.0, 1.0, y0, **kw)
    # on CPU: cpp_wrapper by default, a dict's keys override or add to it
    for opts in ({"cpp_wrapper": True}, True, {"cpp_wrapper": False}, {"max_autotune": False}):
        sol = de.solve(vdp, de.Tsit5(), 0.0, 1.0, y0, compile=opts, **kw)
        torch.testing.assert_close(sol.ys, eager.ys, rtol=1e-12, atol=1e-12)
    # two compiled functions per set of options: the block of steps and the save pass
    assert seen == [o for o in ({"cpp_wrapper": True}, {"cpp_wrapper": False}, {"cpp_wrapper": True, "max_autotune": False})
                    for _ in range(2)]


def test_a_vector_field_that_keeps_recompiling_warns():
    """A Python call counter in the vector field makes every compile=True solve recompile (seconds each, ~100x
    eager) until dynamo gives up; the fourth solve that compiles again warns."""
    calls = [0]

    def counted(t, y, args):
        calls[0] += 1
        return -y

    y0 = torch.ones(2, 1)
    with pytest.warns(RuntimeWarning, match="compiled again in 4 solves"):
        for _ in range(4):
            de.solve(counted, de.Euler(), 0.0, 1.0, y0, dt0=0.25, controller=de.ConstantStep(), compile=True)


def test_grad_and_no_grad_solves_do_not_warn(recwarn):
    """Alternating training (grad) and evaluation (no grad) solves compile two graphs once each: no warning."""
    y0 = torch.ones(2, 1)
    for i in range(6):
        with torch.set_grad_enabled(i % 2 == 0):
            de.solve(lambda t, y, a: -y, de.Euler(), 0.0, 1.0, y0.clone().requires_grad_(i % 2 == 0), dt0=0.25,
                     controller=de.ConstantStep(), compile=True)
    assert not [w for w in recwarn if "compiled again" in str(w.message)]


def test_new_save_grids_and_model_sizes_do_not_warn(recwarn):
    """Each number of save times (and each model width) is a new problem structure, compiled once: no warning."""
    y0 = torch.ones(2, 1)
    for n in range(2, 6):  # four structures: the old key (state only) warned at the fourth
        de.solve(lambda t, y, a: -y, de.Euler(), 0.0, 1.0, y0, dt0=0.25, controller=de.ConstantStep(),
                 saveat=de.SaveAt(ts=torch.linspace(0.0, 1.0, n)), compile=True)
    assert not [w for w in recwarn if "compiled again" in str(w.message)]
