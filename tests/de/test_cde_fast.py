"""Neural CDE solves on the lean loop (_fast) against the generic loop: values and gradients.

cdeint solves ``ODETerm(CDEVectorField)``; its forward solve and BacksolveAdjoint's backward solve
(records-only dense output for the parameter quadrature) run the lean loop. Forcing the generic
loop must give the same values and gradients up to round-off.
"""

import pytest
import torch

import torchmech.de as de
from torchmech.de import _fast
from torchmech.de.cde import cdeint

DT = torch.float64


class Func(torch.nn.Module):
    def __init__(self, hidden=4, channels=3):
        super().__init__()
        self.h, self.c = hidden, channels
        self.net = torch.nn.Sequential(torch.nn.Linear(hidden, 16), torch.nn.Tanh(),
                                       torch.nn.Linear(16, hidden * channels))

    def forward(self, t, z):
        return torch.tanh(self.net(z)).view(z.shape[0], self.h, self.c)


class _Autonomous(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, t, y, args):
        return self.net(y)


def _problem(cls, obs):
    torch.manual_seed(0)
    ts = torch.linspace(0.0, 3.0, obs, dtype=DT)
    x = torch.cumsum(torch.randn(5, obs, 3, dtype=DT) * 0.3, dim=1)
    x = x.requires_grad_(True)
    func = Func().to(DT)
    z0 = (torch.randn(5, 4, dtype=DT) * 0.5).requires_grad_(True)
    return cls(ts, x), x, func, z0, ts


def _run(cls, force, monkeypatch, obs=12, **kw):
    """(values, grads wrt z0, data, params); ``force``: which solves go through the generic loop."""
    X, x, func, z0, ts = _problem(cls, obs)
    real = _fast.unsupported
    calls = {"fast": 0, "records": 0}

    def patched(integ):
        why = real(integ)
        records = integ.record_dense  # the backsolve adjoint's backward solves record their steps
        if force == "all" or (force == "backward" and records):
            return "forced generic loop"
        if why is None:
            calls["records" if records else "fast"] += 1
        return why

    with monkeypatch.context() as m:
        m.setattr(_fast, "unsupported", patched)
        out = cdeint(X, func, z0, torch.stack([ts[0], ts[0] + 0.4 * (ts[-1] - ts[0]), ts[-1]]), **kw)
        loss = (out ** 2).sum() + out[:, 1].sin().sum()
        grads = torch.autograd.grad(loss, [z0, x] + list(func.parameters()))
    return out.detach(), grads, calls


@pytest.mark.parametrize("cls", [de.NaturalCubicSpline, de.CubicHermiteInterpolation, de.LinearInterpolation])
@pytest.mark.parametrize("kw", [
    dict(method="rk4", adjoint=False),
    dict(method="dopri5", adjoint=False, rtol=1e-7, atol=1e-9),
    dict(method="dopri5", adjoint=True, rtol=1e-7, atol=1e-9, options={"jump_t": torch.zeros(0, dtype=DT)}),
    dict(method="tsit5", adjoint=True, rtol=1e-7, atol=1e-9, options={"jump_t": torch.zeros(0, dtype=DT)}),
    dict(method="bosh3", adjoint=True, rtol=1e-6, atol=1e-8, options={"jump_t": torch.zeros(0, dtype=DT)}),
    dict(method="dopri5", adjoint=True, rtol=1e-7, atol=1e-9),  # jump times: forward generic, backward lean
])
def test_cde_lean_equals_generic(monkeypatch, cls, kw):
    """Round-off equality on a smooth problem: the path has one piece (two observations), so the
    vector field has no kinks in t (kinks at the knots make adaptive accept/reject decisions hinge
    on round-off; see test_cde_lean_kinked_path)."""
    obs = 12 if kw["method"] == "rk4" else 2
    fast, gf, calls = _run(cls, None, monkeypatch, obs, **kw)
    slow, gs, calls_slow = _run(cls, "all", monkeypatch, obs, **kw)
    assert calls_slow == {"fast": 0, "records": 0}
    if kw["adjoint"]:
        assert calls["records"] > 0  # the backward solve ran the lean loop
    # (a piecewise-linear path with a fixed-step method takes the perturbed stages, on the generic loop)
    linear_fixed = issubclass(cls, de.LinearInterpolation) and kw["method"] == "rk4"
    if ("jump_t" in kw.get("options", {}) or kw["method"] == "rk4" or not kw["adjoint"] and kw["method"] != "dopri5") \
            and not linear_fixed:
        assert calls["fast"] > 0
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    for a, b in zip(gf, gs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_backward_lean_equals_generic_only_backward(monkeypatch):
    kw = dict(method="dopri5", adjoint=True, rtol=1e-7, atol=1e-9, options={"jump_t": torch.zeros(0, dtype=DT)})
    fast, gf, calls = _run(de.NaturalCubicSpline, None, monkeypatch, 2, **kw)
    slow, gs, calls_b = _run(de.NaturalCubicSpline, "backward", monkeypatch, 2, **kw)
    assert calls["records"] > 0 and calls_b["records"] == 0 and calls_b["fast"] > 0
    torch.testing.assert_close(fast, slow, rtol=0, atol=0)
    for a, b in zip(gf, gs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_backsolve_ode_backward_lean_equals_generic(monkeypatch):
    """Plain ODE with BacksolveAdjoint: backward stats equal on both loops, gradients to round-off."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(DT)
    y0 = torch.randn(4, 3, dtype=DT, requires_grad=True)
    res = []
    for force in (None, "backward"):
        real = _fast.unsupported
        with monkeypatch.context() as m:
            if force:
                m.setattr(_fast, "unsupported",
                          lambda integ: "forced" if integ.record_dense else real(integ))
            adj = de.BacksolveAdjoint(rtol=1e-8, atol=1e-10)
            sol = de.solve(de.ODETerm(_Autonomous(net)), de.Tsit5(), 0.0, 2.0, y0,
                           saveat=de.SaveAt(ts=torch.linspace(0, 2, 5, dtype=DT)), adjoint=adj)
            g = torch.autograd.grad(sol.ys.pow(2).sum(), [y0] + list(net.parameters()))
            res.append((g, {k: v.clone() for k, v in adj.backward_stats.items()}))
    for a, b in zip(res[0][0], res[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    for k in res[0][1]:
        assert torch.equal(res[0][1][k], res[1][1][k]), k


@pytest.mark.parametrize("cls", [de.NaturalCubicSpline, de.LinearInterpolation])
def test_cde_lean_kinked_path(monkeypatch, cls):
    """Many knots, no jump times: the vector field has kinks (or jumps) in t, adaptive step
    decisions there differ with round-off, so both loops agree to the solve tolerance only."""
    kw = dict(method="dopri5", adjoint=True, rtol=1e-7, atol=1e-9, options={"jump_t": torch.zeros(0, dtype=DT)})
    fast, gf, calls = _run(cls, None, monkeypatch, **kw)
    slow, gs, _ = _run(cls, "all", monkeypatch, **kw)
    assert calls["records"] > 0 and calls["fast"] > 0
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    for a, b in zip(gf, gs):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
