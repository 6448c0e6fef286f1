"""batch_rms_norm: one shared step size for the whole batch (torchdiffeq's stepping), in solve, the
backward solve of BacksolveAdjoint and cdeint."""

import pytest
import torch
from scipy.integrate import solve_ivp

import torchmech.de as de
from torchmech.de.cde import cdeint

DT = torch.float64


def vdp(t, y, args):
    return torch.stack([y[:, 1], 2.0 * (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], dim=1)


def test_batch_rms_norm_values():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=DT)
    torch.testing.assert_close(de.batch_rms_norm(x), torch.full((2,), 2.5, dtype=DT))
    torch.testing.assert_close(de.rms_norm(x), torch.tensor([12.5 ** 0.5, 0.0], dtype=DT))


def test_shared_steps_are_identical_across_samples_and_accurate():
    # an easy and a hard sample: per-sample stepping gives them different step counts, the batch
    # norm one common sequence of steps (so identical statistics), both within tolerance of scipy
    y0 = torch.tensor([[0.01, 0.0], [2.0, 0.0]], dtype=DT)
    ts = torch.linspace(0, 5, 11, dtype=DT)
    per = de.solve(de.ODETerm(vdp), de.Dopri5(), 0.0, 5.0, y0, saveat=de.SaveAt(ts=ts),
                   controller=de.PIDController(1e-7, 1e-7))
    shared = de.solve(de.ODETerm(vdp), de.Dopri5(), 0.0, 5.0, y0, saveat=de.SaveAt(ts=ts),
                      controller=de.PIDController(1e-7, 1e-7, norm=de.batch_rms_norm))
    assert per.stats["num_steps"][0] != per.stats["num_steps"][1]
    for key in ("num_steps", "num_accepted", "num_rejected"):
        assert shared.stats[key][0] == shared.stats[key][1]
    for b in range(2):
        ref = solve_ivp(lambda t, y: [y[1], 2.0 * (1 - y[0] ** 2) * y[1] - y[0]], (0, 5), y0[b].numpy(),
                        method="DOP853", rtol=1e-12, atol=1e-12, t_eval=ts.numpy()).y.T
        torch.testing.assert_close(shared.ys[b], torch.as_tensor(ref), rtol=0, atol=1e-5)


def test_backsolve_with_batch_norm_matches_direct_gradients():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()
    y0 = torch.randn(5, 2, dtype=DT, requires_grad=True)
    ts = torch.tensor([0.0, 0.4, 1.0], dtype=DT)
    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, t, y, args):
            return self.net(y)

    grads = []
    for adjoint in (de.DirectAdjoint(), de.BacksolveAdjoint(1e-10, 1e-10, norm=de.batch_rms_norm)):
        sol = de.solve(de.ODETerm(F()), de.Dopri5(), 0.0, 1.0, y0, saveat=de.SaveAt(ts=ts),
                       controller=de.PIDController(1e-10, 1e-10, norm=de.batch_rms_norm), adjoint=adjoint)
        grads.append(torch.autograd.grad(sol.ys.square().sum(), [y0] + list(net.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-8)


def test_cdeint_shared_steps_gradients_and_values():
    torch.manual_seed(1)
    ts = torch.linspace(0, 1, 9, dtype=DT)
    x = torch.cumsum(torch.randn(4, 9, 2, dtype=DT), dim=1)
    x = torch.cat([ts.expand(4, 9)[..., None], x], dim=-1)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 9)).double()

    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, t, z):
            return self.net(z).reshape(z.shape[0], 3, 3)

    z0 = torch.randn(4, 3, dtype=DT)
    X = de.NaturalCubicSpline(ts, x)
    outs, grads = [], []
    for adjoint, norm in ((False, None), (False, de.batch_rms_norm), (True, de.batch_rms_norm)):
        out = cdeint(X, F(), z0, ts[[0, 4, 8]], adjoint=adjoint, rtol=1e-9, atol=1e-10, norm=norm)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), list(net.parameters())))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(outs[2], outs[0], rtol=1e-6, atol=1e-8)
    for ref, g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g2, ref, rtol=1e-5, atol=1e-7)


def test_bad_norm_arguments():
    with pytest.raises(TypeError, match="BacksolveAdjoint: norm must be callable"):
        de.BacksolveAdjoint(norm="batch")
    X = de.NaturalCubicSpline(torch.linspace(0, 1, 4, dtype=DT), torch.randn(2, 4, 2, dtype=DT))
    with pytest.raises(TypeError, match="cdeint: norm must be None or callable"):
        cdeint(X, lambda t, z: z[..., None].expand(2, 3, 2), torch.zeros(2, 3, dtype=DT),
               torch.tensor([0.0, 1.0], dtype=DT), norm="batch")
