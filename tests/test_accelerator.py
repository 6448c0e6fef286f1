"""Every part of torchmech on an accelerator gives what it gives on the CPU.

The device is CUDA by default and the tests skip where it is missing (CI has none). Set
TORCHMECH_TEST_DEVICE to run them on another device (``cpu`` checks the tests themselves).
Deterministic computations are compared with the same computation on the CPU; random ones (Brownian
motion streams differ per device type) are checked by their statistics and by gradient identities on
the device itself.
"""

import json
import math
import os

import pytest
import torch

import torchmech
import torchmech.de as de
from torchmech import systems
from torchmech.discovery import (SINDy, MechanisticDiscovery, PolynomialLibrary, STLSQ, WeakForm, fit_sindy_batch,
                                  fit_sindy_cv)
from torchmech.mnn import MechanisticBlock, solve_linear_ode

_NAME = os.environ.get("TORCHMECH_TEST_DEVICE", "cuda")


def _available(name: str) -> bool:
    kind = torch.device(name).type
    if kind == "cpu":
        return True
    if kind == "cuda":
        return torch.cuda.is_available()
    backend = getattr(torch.backends, kind, None)
    return bool(backend is not None and backend.is_available())


pytestmark = pytest.mark.skipif(not _available(_NAME), reason=f"needs device {_NAME!r}")
DEV = torch.device(_NAME)
CPU = torch.device("cpu")
f64, f32 = torch.float64, torch.float32


def _close(got, ref, rtol, atol=0.0):
    assert got.device.type == DEV.type
    torch.testing.assert_close(got.detach().cpu(), ref.detach().cpu(), rtol=rtol, atol=atol)


# --- NeuRLP solver ------------------------------------------------------------------------------------


def _mnn_problem(B=3, T=40, D=2, E=2, K=3, T0=1, K0=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    coeff = torch.randn(B, T, E, D, K, generator=g, dtype=f64)
    rhs = torch.randn(B, T, E, generator=g, dtype=f64)
    init = torch.randn(B, T0, D, K0, generator=g, dtype=f64)
    steps = 0.05 + 0.1 * torch.rand(B, T - 1, generator=g, dtype=f64)
    return [coeff, rhs, init, steps]


@pytest.mark.parametrize("method", ["dense", "banded", "parallel", "auto"])
@pytest.mark.parametrize("slack", [None, 0.3])
def test_neurlp_values_and_gradients_match_cpu(method, slack):
    args = _mnn_problem()
    kw = dict(method=method, slack=slack, weight_init=2.0, weight_smooth=0.7)

    def run(device):
        xs = [a.to(device).requires_grad_() for a in args]
        u = solve_linear_ode(*xs, **kw)
        loss = (u * torch.linspace(-1, 1, u.numel(), dtype=f64, device=device).reshape(u.shape)).sum()
        return u, torch.autograd.grad(loss, xs)

    u_ref, g_ref = run(CPU)
    u, g = run(DEV)
    _close(u, u_ref, rtol=1e-9, atol=1e-10)
    for a, b in zip(g, g_ref):
        _close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", ["banded", "parallel"])
def test_neurlp_float32_matches_float64_on_a_damped_oscillator(method):
    """The issue's float32 target (~1e-3 relative to float64), here through the device's float32 path."""
    T, h = 1000, 0.01
    c = torch.tensor([4.0, 0.4, 1.0], dtype=f64).reshape(1, 1, 1, 1, 3).expand(2, 1, 1, 1, 3)
    rhs = torch.zeros(2, 1, 1, dtype=f64)
    init = torch.tensor([[1.0, 0.0], [0.5, -1.0]], dtype=f64).reshape(2, 1, 1, 2)
    steps = torch.full((2, 1), h, dtype=f64)
    ref = solve_linear_ode(c, rhs, init, steps, num_points=T, method=method)
    got = solve_linear_ode(*(x.to(DEV, f32) for x in (c, rhs, init, steps)), num_points=T, method=method)
    assert got.dtype == f32 and torch.isfinite(got).all()
    err = (got.double().cpu() - ref).abs().max() / ref.abs().max()
    assert err < 1e-3, f"float32 on {DEV}: relative error {err:.2e}"


def test_neurlp_float32_gradients_are_close_to_float64():
    args = _mnn_problem(B=2, T=60, D=1, E=1, seed=3)
    xs64 = [a.clone().requires_grad_() for a in args]
    g64 = torch.autograd.grad(solve_linear_ode(*xs64, method="parallel").square().sum(), xs64)
    xs32 = [a.to(DEV, f32).requires_grad_() for a in args]
    g32 = torch.autograd.grad(solve_linear_ode(*xs32, method="parallel").square().sum(), xs32)
    for a, b in zip(g32, g64):
        assert a.dtype == f32
        assert (a.double().cpu() - b).abs().max() <= 1e-3 * b.abs().max()


def test_mechanistic_block_learnable_steps_on_device():
    B, T = 5, 30
    g = torch.Generator().manual_seed(1)
    coefficients = torch.randn(B, T, 1, 1, 3, generator=g, dtype=f64)
    rhs = torch.randn(B, T, 1, generator=g, dtype=f64)
    init = torch.randn(B, 1, 1, 2, generator=g, dtype=f64)
    outs = []
    for device in (CPU, DEV):
        torch.manual_seed(0)
        block = MechanisticBlock(order=2, step=0.05, learn_steps=True, num_points=T).to(device, f64)
        out = block(coefficients.to(device), rhs.to(device), init.to(device))
        out.values.square().mean().backward()
        grads = [p.grad for p in block.parameters()]
        assert grads and all(gr is not None and gr.device.type == device.type for gr in grads)
        outs.append((out.values, out.derivatives, grads))
    _close(outs[1][0], outs[0][0], rtol=1e-9, atol=1e-10)
    _close(outs[1][1], outs[0][1], rtol=1e-9, atol=1e-10)
    for a, b in zip(outs[1][2], outs[0][2]):
        _close(a, b, rtol=1e-7, atol=1e-10)


# --- ODE solves ------------------------------------------------------------------------------------------


def _vdp(t, y, args):
    return torch.stack([y[:, 1], args * (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], -1)


@pytest.mark.parametrize("solver", [de.Tsit5(), de.Dopri5(), de.Dopri8(), de.Bosh3()], ids=lambda s: type(s).__name__)
def test_adaptive_solve_matches_cpu(solver):
    y0 = torch.linspace(-2, 2, 16, dtype=f64).reshape(8, 2)
    t1 = torch.linspace(2.0, 4.0, 8, dtype=f64)  # per-sample end times
    ts = torch.linspace(0, 1, 9, dtype=f64)[None] * t1[:, None]  # per-sample save times (B, T)

    def run(device):
        return torchmech.solve(de.ODETerm(_vdp), solver, 0.0, t1.to(device), y0.to(device),
                               args=torch.tensor(2.0, dtype=f64, device=device),
                               saveat=de.SaveAt(ts=ts.to(device), dense=True),
                               controller=de.PIDController(rtol=1e-8, atol=1e-8))

    ref, sol = run(CPU), run(DEV)
    assert (sol.status == de.Status.SUCCESS).all()
    _close(sol.ys, ref.ys, rtol=1e-6, atol=1e-8)
    # step sequences may differ in the last bit of a controller decision, never by much
    assert (sol.stats["num_steps"].cpu() - ref.stats["num_steps"]).abs().max() <= 2
    tq = torch.full((8,), 1.5, dtype=f64)
    _close(sol.evaluate(tq.to(DEV)), ref.evaluate(tq), rtol=1e-6, atol=1e-8)
    _close(sol.derivative(tq.to(DEV)), ref.derivative(tq), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [f32, f64])
def test_fixed_step_grid_solve_matches_cpu(dtype):
    y0 = torch.linspace(-1, 1, 12, dtype=dtype).reshape(6, 2)
    ts = torch.linspace(0, 2, 21, dtype=dtype)
    out = []
    for device in (CPU, DEV):
        sol = torchmech.solve(de.ODETerm(_vdp), de.RK4(), 0.0, 2.0, y0.to(device), dt0=0.01,
                              args=torch.tensor(1.0, dtype=dtype, device=device),
                              saveat=de.SaveAt(ts=ts.to(device)), controller=de.ConstantStep())
        assert sol.ys.dtype == dtype
        out.append(sol.ys)
    _close(out[1], out[0], rtol=1e-5 if dtype == f32 else 1e-12, atol=1e-6 if dtype == f32 else 1e-12)


class _Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))

    def forward(self, t, y, args):
        return self.net(y)


@pytest.mark.parametrize("adjoint", ["direct", "checkpoint", "backsolve"])
def test_adjoint_gradients_match_cpu(adjoint):
    torch.manual_seed(0)
    field = _Field().double()
    y0 = torch.randn(8, 2, dtype=f64)
    ts = torch.linspace(0, 1, 6, dtype=f64)
    out = []
    for device in (CPU, DEV):
        f = field.to(device)
        adj = {"direct": de.DirectAdjoint(), "checkpoint": de.CheckpointAdjoint(checkpoints=3),
               "backsolve": de.BacksolveAdjoint(rtol=1e-10, atol=1e-10, adjoint_params=list(f.parameters()))}[adjoint]
        y = y0.to(device).requires_grad_()
        sol = torchmech.solve(de.ODETerm(f), de.Tsit5(), 0.0, 1.0, y, saveat=de.SaveAt(ts=ts.to(device)),
                              controller=de.PIDController(rtol=1e-9, atol=1e-9), adjoint=adj)
        grads = torch.autograd.grad(sol.ys.square().sum(), [y, *f.parameters()])
        assert all(gr.device.type == device.type for gr in grads)
        out.append(grads)
    for a, b in zip(out[1], out[0]):
        _close(a, b, rtol=1e-6, atol=1e-9)


def test_event_time_and_its_gradient_match_cpu():
    def ball(t, y, args):
        return torch.stack([y[:, 1], torch.full_like(y[:, 0], -9.81)], -1)

    out = []
    for device in (CPU, DEV):
        h0 = torch.tensor([1.0, 4.0, 2.5], dtype=f64, device=device, requires_grad=True)
        y0 = torch.stack([h0, torch.zeros_like(h0)], -1)
        sol = torchmech.solve(de.ODETerm(ball), de.Tsit5(), 0.0, 5.0, y0,
                              event=de.Event(lambda t, y, a: y[:, 0], direction=-1),
                              controller=de.PIDController(1e-9, 1e-9))
        assert (sol.status == de.Status.EVENT).all()
        (grad,) = torch.autograd.grad(sol.event_t.sum(), [h0])
        out.append((sol.event_t, grad))
    _close(out[1][0], torch.sqrt(2 * torch.tensor([1.0, 4.0, 2.5], dtype=f64) / 9.81), rtol=1e-8)
    _close(out[1][1], out[0][1], rtol=1e-7)


def test_status_reports_non_finite_state_on_device():
    y0 = torch.tensor([[1.0], [-1.0]], dtype=f64, device=DEV)
    sol = torchmech.solve(de.ODETerm(lambda t, y, a: y ** 2), de.Tsit5(), 0.0, 2.0, y0, throw=False,
                          controller=de.PIDController(1e-6, 1e-6))
    assert sol.status.device.type == DEV.type
    assert int(sol.status[0]) != int(de.Status.SUCCESS) and int(sol.status[1]) == int(de.Status.SUCCESS)


def test_torchdiffeq_layer_matches_cpu():
    y0 = torch.tensor([[1.0, 0.0], [0.2, 0.5]], dtype=f64)
    t = torch.linspace(0, 3, 7, dtype=f64)
    ys = [torchmech.odeint(lambda t, y: torch.stack([y[:, 1], -y[:, 0]], -1), y0.to(d), t.to(d),
                           method="dopri5", rtol=1e-9, atol=1e-9) for d in (CPU, DEV)]
    _close(ys[1], ys[0], rtol=1e-7, atol=1e-9)


# --- SDEs, Brownian motion, CDEs -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["interval", "tree"])
def test_brownian_motion_on_device_has_the_right_statistics(kind):
    n = 20000
    if kind == "interval":
        bm = de.BrownianInterval(0.0, 2.0, shape=(n, 1), dtype=f64, device=DEV, seed=0)
    else:
        bm = de.VirtualBrownianTree(0.0, 2.0, shape=(n, 1), dtype=f64, device=DEV, seed=0, tol=1e-4)
    w1 = bm.evaluate(0.0, 0.5)
    w2 = bm.evaluate(0.5, 2.0)
    assert w1.device.type == DEV.type and w1.shape == (n, 1)
    # independent increments with variances 0.5 and 1.5 (5 sigma bounds on the sample moments)
    assert abs(float(w1.var()) - 0.5) < 5 * 0.5 * math.sqrt(2 / n)
    assert abs(float(w2.var()) - 1.5) < 5 * 1.5 * math.sqrt(2 / n)
    assert abs(float((w1 * w2).mean())) < 5 * math.sqrt(0.75 / n)
    # consistent: the whole interval is the sum of its parts, and a repeated query is identical
    torch.testing.assert_close(bm.evaluate(0.0, 2.0), w1 + w2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bm.evaluate(0.0, 0.5), w1, rtol=0, atol=0)


def _sde_setup(device):
    torch.manual_seed(0)
    drift = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double().to(device)
    bm = de.BrownianInterval(0.0, 1.0, shape=(16, 3), dtype=f64, device=device, seed=1)
    terms = de.MultiTerm(de.ODETerm(lambda t, y, a: drift(y)),
                         de.DiagonalControlTerm(lambda t, y, a: 0.3 * torch.cos(y), bm))
    y0 = torch.randn(16, 3, dtype=f64).to(device)
    return terms, y0, list(drift.parameters())


def test_reversible_adjoint_equals_backprop_on_device():
    terms, y0, params = _sde_setup(DEV)
    grads = []
    for adjoint in (de.DirectAdjoint(), de.ReversibleAdjoint(params)):
        sol = torchmech.solve(terms, de.ReversibleHeun(), 0.0, 1.0, y0, dt0=0.02,
                              saveat=de.SaveAt(ts=torch.linspace(0, 1, 6, dtype=f64, device=DEV)), adjoint=adjoint)
        grads.append(torch.autograd.grad(sol.ys.square().sum(), params))
    for a, b in zip(*grads):
        assert a.device.type == DEV.type
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("solver", [de.EulerMaruyama(), de.Milstein(), de.StochasticHeun(), de.SRA1()],
                         ids=lambda s: type(s).__name__)
def test_sde_solvers_weak_mean_of_ornstein_uhlenbeck(solver):
    """E[y(1)] = y0 exp(-1) for dy = -y dt + 0.5 dW (additive noise: every listed solver applies)."""
    n = 4000
    bm = de.BrownianInterval(0.0, 1.0, shape=(n, 1), dtype=f64, device=DEV, seed=2, levy_area="space-time")
    terms = de.MultiTerm(de.ODETerm(lambda t, y, a: -y), de.DiagonalControlTerm(lambda t, y, a: torch.full_like(y, 0.5), bm))
    sol = torchmech.solve(terms, solver, 0.0, 1.0, torch.ones(n, 1, dtype=f64, device=DEV), dt0=0.01)
    y1 = sol.ys[:, -1, 0]
    assert y1.device.type == DEV.type
    sd = math.sqrt(0.25 * (1 - math.exp(-2)) / 2)
    assert abs(float(y1.mean()) - math.exp(-1)) < 5 * sd / math.sqrt(n) + 0.01
    assert abs(float(y1.std()) - sd) < 0.05 * sd + 0.01


@pytest.mark.parametrize("adjoint", [False, True], ids=["direct", "backsolve"])
def test_cde_with_missing_values_matches_cpu(adjoint):
    g = torch.Generator().manual_seed(0)
    t = torch.sort(torch.rand(4, 20, generator=g, dtype=f64), dim=1).values * 5
    x = torch.randn(4, 20, 2, generator=g, dtype=f64)
    x[torch.rand(4, 20, 2, generator=g) < 0.3] = float("nan")
    torch.manual_seed(0)
    func = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 15),
                               torch.nn.Unflatten(-1, (5, 3))).double()
    out = []
    for device in (CPU, DEV):
        f = func.to(device)
        X = de.NaturalCubicSpline(None, torch.cat([t[..., None], x], -1).to(device))
        z = torchmech.cdeint(X, lambda s, z: f(z), torch.zeros(4, 5, dtype=f64, device=device), X.interval,
                             rtol=1e-8, atol=1e-8, adjoint=adjoint, adjoint_params=list(f.parameters()))
        grads = torch.autograd.grad(z.square().sum(), list(f.parameters()))
        out.append((z, grads))
    _close(out[1][0], out[0][0], rtol=1e-6, atol=1e-9)
    for a, b in zip(out[1][1], out[0][1]):
        if adjoint:
            # the backward solve's own error (its steps differ in the last bits between devices) is
            # ~1e-6 of the gradient's scale here, on CPU too (against direct backpropagation)
            _close(a, b, rtol=0, atol=2e-5 * float(b.abs().max()))
        else:
            _close(a, b, rtol=1e-6, atol=1e-9)


def test_ready_models_train_a_step_on_device():
    t = torch.linspace(0, 1, 8, device=DEV)
    model = torchmech.NeuralODE(state=2, hidden=16).to(DEV)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    y0, target = torch.randn(32, 2, device=DEV), torch.randn(32, 8, 2, device=DEV)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = (model(y0, t) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# --- equation discovery ----------------------------------------------------------------------------------


def _lorenz(noise=0.0):
    lorenz = systems.get("lorenz")
    t = torch.linspace(0, 10, 1000, dtype=f64)
    x = systems.simulate(lorenz, t, noise=noise, seed=0).x
    return lorenz, t, x


def test_sindy_on_device_matches_cpu_and_recovers_lorenz():
    lorenz, t, x = _lorenz(noise=0.01)
    coefs = []
    for device in (CPU, DEV):
        model = SINDy(PolynomialLibrary(degree=2), WeakForm(), STLSQ(threshold=0.2, alpha="auto"))
        model.fit(x.to(device), t.to(device))
        coefs.append(model.coefficients_)
    truth = lorenz.true_coefficients(PolynomialLibrary(degree=2))
    assert torch.equal(coefs[1].cpu() != 0, truth != 0)
    _close(coefs[1], coefs[0], rtol=1e-6, atol=1e-8)


def test_batched_sindy_on_device():
    lorenz, t, x = _lorenz()
    xb = x.repeat(4, 1, 1)  # (8, T, 3)
    coef = fit_sindy_batch(xb.to(DEV), t.to(DEV), PolynomialLibrary(degree=2), optimizer=STLSQ(threshold=0.2))
    assert coef.device.type == DEV.type and coef.shape[0] == 8
    truth = lorenz.true_coefficients(PolynomialLibrary(degree=2))
    assert all(torch.equal(c.cpu() != 0, truth != 0) for c in coef)


@pytest.mark.parametrize("search", ["threshold", "support"])
def test_cross_validated_sindy_on_device_matches_cpu(search):
    lorenz, t, x = _lorenz(noise=0.05)
    lib = PolynomialLibrary(degree=2)
    res = [fit_sindy_cv(x.to(d), t.to(d), lib, WeakForm(), STLSQ(alpha="auto"), search=search) for d in (CPU, DEV)]
    assert torch.equal(res[1].index.cpu(), res[0].index)
    _close(res[1].coefficients, res[0].coefficients, rtol=1e-6, atol=1e-8)


def test_mechanistic_discovery_on_device_matches_cpu():
    lorenz, t, x = _lorenz(noise=0.01)
    coefs = []
    for device in (CPU, DEV):
        model = MechanisticDiscovery(PolynomialLibrary(degree=2), threshold=0.5, device=device, progress=False)
        coefs.append(model.fit(x, t).coefficients_)
    truth = lorenz.true_coefficients(PolynomialLibrary(degree=2))
    assert torch.equal(coefs[1].cpu() != 0, truth != 0)
    _close(coefs[1], coefs[0], rtol=1e-5, atol=1e-7)


def test_discover_command_on_device(tmp_path, capsys):
    from torchmech.cli import main

    code = main(["discover", "--device", _NAME, "--out", str(tmp_path), "--no-progress", "--method", "both"])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert all(m["metrics"]["exact"] for m in report["methods"].values()), report["methods"]
