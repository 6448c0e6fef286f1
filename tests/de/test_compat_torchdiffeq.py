"""torchmech.compat.torchdiffeq: torchdiffeq's documented odeint/odeint_adjoint/odeint_event semantics."""

import math

import numpy as np
import pytest
import torch

import torchmech
from torchmech.compat import torchdiffeq as tdq

D = torch.float64
ADAPTIVE = ["dopri5", "dopri8", "bosh3", "tsit5", "adaptive_heun", "fehlberg2"]
FIXED = ["euler", "midpoint", "heun2", "heun3", "rk4"]


def decay(t, y):
    return -y


def test_exposed_at_top_level():
    assert torchmech.odeint is tdq.odeint
    assert torchmech.odeint_adjoint is tdq.odeint_adjoint
    assert torchmech.odeint_event is tdq.odeint_event


@pytest.mark.parametrize("shape", [(), (3,), (2, 3)])
def test_time_first_output_any_shape(shape):
    y0 = torch.linspace(0.5, 1.5, max(1, math.prod(shape)), dtype=D).reshape(shape)
    t = torch.linspace(0, 1, 5, dtype=D)
    calls = []

    def f(tt, y):
        calls.append((tt.shape, y.shape))
        return -y

    out = tdq.odeint(f, y0, t)
    assert out.shape == (5,) + shape
    assert torch.equal(out[0], y0)
    expect = y0[None] * torch.exp(-t).reshape((5,) + (1,) * len(shape))
    torch.testing.assert_close(out, expect, rtol=1e-6, atol=1e-8)
    assert all(ts == () and ys == shape for ts, ys in calls)  # scalar t, y like y0


@pytest.mark.parametrize("method", ADAPTIVE)
def test_adaptive_methods_accuracy(method):
    t = torch.linspace(0, 2, 6, dtype=D)
    low = method in ("adaptive_heun", "fehlberg2")  # second order: keep the step count small
    tol = 1e-6 if low else 1e-8
    out = tdq.odeint(decay, torch.ones(2, dtype=D), t, method=method, rtol=tol, atol=tol * 1e-2)
    err = (out - torch.exp(-t)[:, None]).abs().max()
    assert err < 100 * tol, (method, err)


@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("heun2", 2), ("heun3", 3), ("rk4", 4)])
def test_fixed_methods_order(method, order):
    t = torch.tensor([0.0, 1.0], dtype=D)
    errs = []
    for h in (0.1, 0.05):
        out = tdq.odeint(decay, torch.ones(1, dtype=D), t, method=method, options={"step_size": h})
        errs.append((out[-1, 0] - math.exp(-1)).abs().item())
    assert abs(math.log2(errs[0] / errs[1]) - order) < 0.3, (method, errs)


def test_fixed_grid_defaults_to_t_and_linear_interp():
    # Euler on the grid t itself
    t = torch.tensor([0.0, 0.5, 1.5], dtype=D)
    out = tdq.odeint(decay, torch.ones((), dtype=D), t, method="euler")
    torch.testing.assert_close(out, torch.tensor([1.0, 0.5, 0.5 * (1 - 1.0)], dtype=D))
    # step_size grid 0, .4, .8, 1.0 (last step shortened); output at 0.6 is the linear interpolant
    t = torch.tensor([0.0, 0.6, 1.0], dtype=D)
    out = tdq.odeint(decay, torch.ones((), dtype=D), t, method="euler", options={"step_size": 0.4})
    y = [1.0, 0.6, 0.36, 0.36 * 0.8]
    torch.testing.assert_close(out, torch.tensor([1.0, 0.5 * (y[1] + y[2]), y[3]], dtype=D))


def test_fixed_cubic_interp_and_grid_constructor():
    t = torch.tensor([0.0, 0.3, 1.0], dtype=D)
    seen = {}

    def grid(func, y0, tt):
        seen["t"] = tt
        return torch.tensor([0.0, 0.5, 1.0], dtype=D)

    lin = tdq.odeint(decay, torch.ones(1, dtype=D), t, method="rk4", options={"grid_constructor": grid})
    cub = tdq.odeint(decay, torch.ones(1, dtype=D), t, method="rk4",
                     options={"grid_constructor": grid, "interp": "cubic"})
    assert torch.equal(seen["t"], t)
    assert torch.equal(lin[-1], cub[-1])  # grid points are exact, interpolation only in between
    exact = math.exp(-0.3)
    assert abs(cub[1, 0] - exact) < abs(lin[1, 0] - exact) / 10
    with pytest.raises(ValueError, match="grid_constructor's grid must start at t\\[0\\]"):
        tdq.odeint(decay, torch.ones(1, dtype=D), t, method="rk4",
                   options={"grid_constructor": lambda f, y, tt: torch.tensor([0.1, 1.0], dtype=D)})


def test_perturb_keeps_stages_off_the_discontinuity():
    # f jumps at t = 1 (f = 1 for t <= 1, 0 after); the grid has a point at 1
    f = lambda t, y: torch.ones_like(y) * (t <= 1).to(y.dtype)  # noqa: E731
    t = torch.tensor([0.0, 1.0, 2.0], dtype=D)
    plain = tdq.odeint(f, torch.zeros(1, dtype=D), t, method="euler")
    pert = tdq.odeint(f, torch.zeros(1, dtype=D), t, method="euler", options={"perturb": True})
    assert plain[-1, 0] == 2.0  # the step from 1 saw f(1) = 1
    assert pert[-1, 0] == 1.0  # ... and with perturb f(1 + ulp) = 0


def test_tuple_state_and_reversed_time():
    f = lambda t, y: (y[1].reshape(2), -y[0].reshape(1, 2))  # noqa: E731
    y0 = (torch.tensor([1.0, 2.0], dtype=D), torch.zeros(1, 2, dtype=D))
    t = torch.linspace(0, 3, 7, dtype=D)
    x, v = tdq.odeint(f, y0, t, rtol=1e-9, atol=1e-11)
    assert x.shape == (7, 2) and v.shape == (7, 1, 2)
    torch.testing.assert_close(x, torch.cos(t)[:, None] * y0[0], rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(v[:, 0], -torch.sin(t)[:, None] * y0[0], rtol=1e-7, atol=1e-8)
    # backwards from t = 3
    tr = t.flip(0)
    xr, vr = tdq.odeint(f, (x[-1], v[-1]), tr, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(xr, torch.cos(tr)[:, None] * y0[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(xr[-1], y0[0], rtol=1e-6, atol=1e-7)


def test_tensor_and_tuple_tolerances():
    y0 = torch.tensor([1.0, 2.0], dtype=D)
    t = torch.tensor([0.0, 1.0], dtype=D)
    a = tdq.odeint(decay, y0, t, rtol=1e-5, atol=1e-7)
    b = tdq.odeint(decay, y0, t, rtol=torch.full((2,), 1e-5, dtype=D), atol=torch.tensor(1e-7))
    # same steps; only round-off (tensor vs scalar tolerance arithmetic) may differ
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    # a looser tolerance on one component changes the steps (and the result)
    c = tdq.odeint(decay, y0, t, rtol=torch.tensor([1e-5, 1e-2], dtype=D), atol=1e-7)
    assert not torch.equal(a, c)
    f = lambda t, y: (-y[0], -y[1])  # noqa: E731
    tu = tdq.odeint(f, (y0[:1], y0[1:]), t, rtol=(1e-5, 1e-5), atol=(1e-7, torch.tensor([1e-7], dtype=D)))
    torch.testing.assert_close(torch.cat(tu, dim=1), a, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one entry per tensor of y0"):
        tdq.odeint(f, (y0[:1], y0[1:]), t, rtol=(1e-5,))
    with pytest.raises(ValueError, match="rtol must not require grad"):
        tdq.odeint(decay, y0, t, rtol=torch.tensor(1e-5, requires_grad=True))


def _counting(fn):
    calls = [0]

    def f(t, y):
        calls[0] += 1
        return fn(t, y)

    return f, calls


def test_adaptive_options_are_used():
    t = torch.tensor([0.0, 1.0], dtype=D)
    y0 = torch.ones(1, dtype=D)
    f, calls = _counting(decay)
    tdq.odeint(f, y0, t, options={"max_step": 0.01})
    assert calls[0] >= 100 * 6  # dopri5: six new evaluations per step, >= 100 steps
    f, calls = _counting(decay)
    out = tdq.odeint(f, y0, t, rtol=1e-12, atol=1e-14, options={"min_step": 0.5})
    assert calls[0] < 30 and abs(out[-1, 0] - math.exp(-1)) < 1e-3  # steps of 0.5 forced through
    f, calls = _counting(decay)
    tdq.odeint(f, y0, t, options={"first_step": 1e-3, "ifactor": 1.5})
    f2, calls2 = _counting(decay)
    tdq.odeint(f2, y0, t, options={"first_step": 1e-3})
    assert calls[0] > calls2[0]  # a smaller growth factor takes more steps
    seen = []

    def norm(x):
        seen.append(tuple(p.shape for p in x))
        return max(p.abs().max() for p in x)

    g = lambda t, y: (-y[0], -y[1])  # noqa: E731
    tdq.odeint(g, (y0, torch.ones(2, 2, dtype=D)), t, options={"norm": norm})
    assert seen and all(s == ((1,), (2, 2)) for s in seen)


def test_step_t_and_jump_t():
    f = lambda t, y: torch.where(t < 0.5, torch.ones_like(y), -torch.ones_like(y))  # noqa: E731
    t = torch.tensor([0.0, 1.0], dtype=D)
    g, plain = _counting(f)
    out = tdq.odeint(g, torch.zeros(1, dtype=D), t, rtol=1e-8, atol=1e-10)
    h, jumped = _counting(f)
    out_j = tdq.odeint(h, torch.zeros(1, dtype=D), t, rtol=1e-8, atol=1e-10,
                       options={"jump_t": torch.tensor([0.5], dtype=D)})
    assert abs(out_j[-1, 0]) < 1e-12 and abs(out[-1, 0]) < 1e-6
    assert jumped[0] < plain[0]
    seen = []
    k = lambda t, y: (seen.append(float(t)), -y)[1]  # noqa: E731
    tdq.odeint(k, torch.ones(1, dtype=D), t, options={"step_t": torch.tensor([0.123], dtype=D)})
    assert any(abs(s - 0.123) < 1e-15 for s in seen)


def test_max_num_steps_raises():
    stiff = lambda t, y: -1e6 * (y - torch.cos(t))  # noqa: E731
    with pytest.raises(RuntimeError, match=r"odeint: dopri5 stopped at t=.*max_num_steps'\]=50 per output interval"):
        tdq.odeint(stiff, torch.zeros(1, dtype=D), torch.tensor([0.0, 10.0], dtype=D),
                   options={"max_num_steps": 50})


def test_max_num_steps_is_per_output_interval():
    """torchdiffeq counts the steps of each output interval: 100 intervals of a few steps each pass."""
    t = torch.linspace(0, 5, 101, dtype=D)
    for m in (10, np.int64(10), torch.tensor(10)):
        out = tdq.odeint(decay, torch.ones(2, dtype=D), t, options={"max_num_steps": m})
        torch.testing.assert_close(out[-1], torch.full((2,), math.exp(-5.0), dtype=D), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match=r"options\['max_num_steps'\] must be a positive int"):
        tdq.odeint(decay, torch.ones(2, dtype=D), t, options={"max_num_steps": 2.5})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_rtol_is_pure_absolute_control(dtype):
    y0 = torch.tensor([1.0], dtype=dtype, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=dtype)
    atol = 1e-6 if dtype == torch.float32 else 1e-10
    out = tdq.odeint(decay, y0, t, rtol=0.0, atol=atol)
    assert abs(out[-1].item() - math.exp(-1.0)) < 100 * atol
    lin = torch.nn.Linear(1, 1, bias=False).to(dtype)
    with torch.no_grad():
        lin.weight.fill_(-1.0)
    out = tdq.odeint_adjoint(lambda t, y: lin(y), y0, t, rtol=0.0, atol=atol, adjoint_rtol=0.0, adjoint_atol=atol,
                             adjoint_params=tuple(lin.parameters()))
    (g,) = torch.autograd.grad(out[-1].sum(), y0)
    assert abs(g.item() - math.exp(-1.0)) < 1e3 * atol


def test_fixed_grid_cubic_interp_time_gradient_at_grid_points():
    """interp='cubic': the output's derivative in t is the Hermite interpolant's (f at a grid point), also
    where t coincides with a (detached) grid point, as torchdiffeq's cubic interpolation gives."""
    f = lambda t, y: -y + torch.sin(t)  # noqa: E731
    y0 = torch.tensor([1.0], dtype=D)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=D, requires_grad=True)
    gc = lambda func, y0, t: torch.linspace(0.0, 1.0, 5, dtype=D)  # noqa: E731
    out = tdq.odeint(f, y0, t, method="rk4", options=dict(grid_constructor=gc, interp="cubic"))
    (g,) = torch.autograd.grad(out[-1].sum(), t)
    assert g[0] == 0 and g[1] == 0
    torch.testing.assert_close(g[2], f(t[2], out[-1]).detach()[0], rtol=1e-12, atol=0)


def test_bad_inputs():
    y0 = torch.ones(2, dtype=D)
    t = torch.tensor([0.0, 1.0], dtype=D)
    with pytest.raises(ValueError, match="option 'foo' is not supported"):
        tdq.odeint(decay, y0, t, options={"foo": 1})
    with pytest.raises(ValueError, match="option 'step_size' is not supported for the adaptive method"):
        tdq.odeint(decay, y0, t, options={"step_size": 0.1})
    with pytest.raises(ValueError, match="option 'max_num_steps' is not supported for the fixed-grid"):
        tdq.odeint(decay, y0, t, method="rk4", options={"max_num_steps": 10})
    with pytest.raises(ValueError, match="mutually exclusive"):
        tdq.odeint(decay, y0, t, method="rk4", options={"step_size": 0.1, "grid_constructor": lambda *a: t})
    with pytest.raises(ValueError, match="interp"):
        tdq.odeint(decay, y0, t, method="rk4", options={"interp": "quintic"})
    with pytest.raises(ValueError, match="method 'scipy_solver'.*not provided"):
        tdq.odeint(decay, y0, t, method="scipy_solver")
    with pytest.raises(ValueError, match="invalid method 'rk45'"):
        tdq.odeint(decay, y0, t, method="rk45")
    with pytest.raises(ValueError, match="strictly increasing or strictly decreasing"):
        tdq.odeint(decay, y0, torch.tensor([0.0, 1.0, 0.5], dtype=D))
    with pytest.raises(ValueError, match="1-D tensor"):
        tdq.odeint(decay, y0, torch.zeros(2, 2, dtype=D))
    with pytest.raises(TypeError, match="y0 must be a floating-point or complex tensor"):
        tdq.odeint(decay, torch.ones(2, dtype=torch.int64), t)
    with pytest.raises(TypeError, match="y0 must be a torch.Tensor or a tuple"):
        tdq.odeint(decay, [1.0, 2.0], t)
    with pytest.raises(ValueError, match="y0 must be finite"):
        tdq.odeint(decay, torch.tensor([1.0, float("nan")], dtype=D), t)
    with pytest.raises(ValueError, match="func must return a tensor shaped like y0"):
        tdq.odeint(lambda t, y: y[:1], y0, t)
    # the right number of elements in another layout is not silently reshaped
    with pytest.raises(ValueError, match=r"func must return a tensor shaped like y0 \(2, 3\), got \(3, 2\)"):
        tdq.odeint(lambda t, y: -y.T, torch.ones(2, 3, dtype=D), t, method="rk4")
    with pytest.raises(ValueError, match=r"func must return a tensor shaped like y0 \(2,\), got \(2, 1\)"):
        tdq.odeint(lambda t, y: -y[:, None], y0, t)
    with pytest.raises(ValueError, match=r"func output \[1\] must have shape \(2, 3\), got \(3, 2\)"):
        tdq.odeint(lambda t, y: (-y[0], -y[1].T), (torch.ones(2, 3, dtype=D), torch.ones(2, 3, dtype=D)), t)
    with pytest.raises(ValueError, match=r"event_fn with a fixed-grid method needs options\['step_size'\]"):
        tdq.odeint(decay, y0, t, method="rk4", event_fn=lambda t, y: y[0] - 0.5)
    with pytest.raises(ValueError, match="event_fn is not supported with the multistep method 'explicit_adams'"):
        tdq.odeint(decay, y0, t, method="explicit_adams", options={"step_size": 0.1}, event_fn=lambda t, y: y[0])
    with pytest.raises(ValueError, match=r"with event_fn, t must be \[t0\] or \[t0, t1\].*len\(t\)=3"):
        tdq.odeint(decay, y0, torch.tensor([0.0, 0.5, 1.0], dtype=D), event_fn=lambda t, y: y[0] - 0.5)
    with pytest.raises(ValueError, match="func must be an nn.Module"):
        tdq.odeint_adjoint(decay, y0, t)
    with pytest.raises(ValueError, match="adjoint_method 'rk4' is fixed-grid"):
        tdq.odeint_adjoint(decay, y0, t, adjoint_params=(), adjoint_method="rk4")
    with pytest.raises(ValueError, match="adjoint option 'step_t' is not supported"):
        tdq.odeint_adjoint(decay, y0, t, adjoint_params=(), adjoint_options={"step_t": t})


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()

    def forward(self, t, y):
        return self.net(y)


@pytest.mark.parametrize("adjoint_options", [None, {"norm": "seminorm"}])
def test_adjoint_gradients_match_direct(adjoint_options):
    func = _MLP()
    y0 = torch.tensor([[0.5, -1.0], [1.0, 0.3]], dtype=D, requires_grad=True)
    t = torch.linspace(0, 1, 4, dtype=D)

    def grads(fn, **kw):
        out = fn(func, y0, t, rtol=1e-8, atol=1e-10, **kw)
        loss = (out ** 2).sum()
        return torch.autograd.grad(loss, [y0] + list(func.parameters()))

    g_direct = grads(tdq.odeint)
    g_adj = grads(tdq.odeint_adjoint, adjoint_options=adjoint_options)
    for a, b in zip(g_direct, g_adj):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adjoint_params_explicit_and_fixed_method():
    w = torch.tensor(0.7, dtype=D, requires_grad=True)
    f = lambda t, y: -w * y  # noqa: E731
    t = torch.tensor([0.0, 1.0], dtype=D)
    y0 = torch.tensor([2.0], dtype=D)
    out = tdq.odeint_adjoint(f, y0, t, method="rk4", options={"step_size": 0.01}, adjoint_params=(w,),
                             adjoint_rtol=1e-9, adjoint_atol=1e-11)
    (g,) = torch.autograd.grad(out[-1, 0], w)
    torch.testing.assert_close(g, -2.0 * torch.exp(-w.detach()), rtol=1e-6, atol=1e-8)


def _ball():
    g = 9.81

    def f(t, y):
        return (y[1], -g * torch.ones_like(y[1]))

    return f, g


@pytest.mark.parametrize("method,options", [("dopri5", None), ("rk4", {"step_size": 0.001, "interp": "cubic"})])
def test_adjoint_gradients_with_respect_to_t(method, options):
    """odeint_adjoint's t-gradients (adjoint identities) against odeint's (autograd through the solve), on a
    time-dependent field with a loss on every output; t chosen off the rk4 grid."""
    lin = torch.nn.Linear(2, 2).to(D)

    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, t, y):
            return torch.tanh(self.lin(y)) + torch.sin(2 * t)

    f = F()
    y0 = torch.tensor([0.5, -0.3], dtype=D, requires_grad=True)
    grads = []
    for odeint in (tdq.odeint, tdq.odeint_adjoint):
        t = torch.tensor([0.1005, 0.4005, 1.3005], dtype=D, requires_grad=True)
        out = odeint(f, y0, t, rtol=1e-10, atol=1e-12, method=method, options=options)
        loss = (out ** 2).sum() + out[1, 0] + out[0, 1]
        grads.append(torch.autograd.grad(loss, [t, y0]))
    for direct, adj in zip(*grads):
        torch.testing.assert_close(adj, direct, rtol=1e-5 if method == "rk4" else 1e-7, atol=1e-8)


def test_odeint_event_falling_ball_and_gradient():
    f, g = _ball()
    h0 = torch.tensor([2.0], dtype=D, requires_grad=True)
    y0 = (h0, torch.zeros(1, dtype=D))
    ev = lambda t, y: y[0][0]  # noqa: E731
    for interface in (tdq.odeint, tdq.odeint_adjoint):
        kw = {} if interface is tdq.odeint else {"adjoint_params": ()}
        t_ev, (h, v) = tdq.odeint_event(f, y0, torch.tensor(0.0, dtype=D), event_fn=ev, odeint_interface=interface,
                                        rtol=1e-9, atol=1e-11, **kw)
        t_exact = math.sqrt(2 * 2.0 / g)
        assert t_ev.dim() == 0 and abs(t_ev.item() - t_exact) < 1e-7
        assert h.shape == (2, 1) and torch.equal(h[0], h0.detach()) and abs(h[1].item()) < 1e-7
        (dt_dh,) = torch.autograd.grad(t_ev, h0)
        assert abs(dt_dh.item() - 1 / math.sqrt(2 * g * 2.0)) < 1e-5


def test_odeint_event_gradient_with_respect_to_t0():
    """Autonomous system: the event moves 1:1 with t0 and the state at the event does not depend on t0."""
    y0 = torch.tensor([1.0, 2.0], dtype=D)
    for interface in (tdq.odeint, tdq.odeint_adjoint):
        t0 = torch.tensor(0.25, dtype=D, requires_grad=True)
        kw = {} if interface is tdq.odeint else {"adjoint_params": ()}
        t_ev, ys = tdq.odeint_event(lambda t, y: -y - 0.2, y0, t0, event_fn=lambda t, y: y[0] - 0.5,
                                    odeint_interface=interface, rtol=1e-10, atol=1e-12, **kw)
        assert abs(t_ev.item() - (0.25 + math.log(1.2 / 0.7))) < 1e-8
        g_t, = torch.autograd.grad(t_ev, t0, retain_graph=True)
        g_y, = torch.autograd.grad(ys[-1, 1], t0)
        assert abs(g_t.item() - 1.0) < 1e-9 and abs(g_y.item()) < 1e-9


@pytest.mark.parametrize("interface", ["odeint", "odeint_adjoint"])
def test_odeint_event_fixed_step_method_and_several_event_functions(interface):
    """A falling ball with rk4 steps of 0.01 (the event between steps, found on the step's interpolant) and
    event functions [height, 5 - height, t - c]: the first of them to change sign ends the solve."""
    odeint = getattr(tdq, interface)
    kw = {} if interface == "odeint" else {"adjoint_params": ()}
    f, g = _ball()
    h0 = torch.tensor([2.0], dtype=D, requires_grad=True)
    y0 = (h0, torch.zeros(1, dtype=D))
    t_exact = math.sqrt(2 * 2.0 / g)
    t_ev, (h, v) = tdq.odeint_event(f, y0, torch.tensor(0.0, dtype=D), event_fn=lambda t, y: y[0][0],
                                    method="rk4", options={"step_size": 0.01}, odeint_interface=odeint, **kw)
    assert abs(t_ev.item() - t_exact) < 1e-9 and abs(h[1].item()) < 1e-9
    (dt_dh,) = torch.autograd.grad(t_ev, h0)
    assert abs(dt_dh.item() - 1 / math.sqrt(2 * g * 2.0)) < 1e-7
    for c, expected in ((0.3, 0.3), (5.0, t_exact)):
        t_ev, _ = tdq.odeint_event(f, y0, torch.tensor(0.0, dtype=D), odeint_interface=odeint, rtol=1e-10,
                                   atol=1e-12, event_fn=lambda t, y: torch.stack([y[0][0], 5 - y[0][0], t - c]), **kw)
        assert abs(t_ev.item() - expected) < 1e-8


def test_odeint_event_reverse_time_and_event_at_start():
    # y' = 1 from y(0) = 0 backwards: y = t, event y = -0.75 at t = -0.75
    f = lambda t, y: torch.ones_like(y)  # noqa: E731
    t_ev, sol = tdq.odeint_event(f, torch.zeros(1, dtype=D), torch.tensor(0.0, dtype=D),
                                 event_fn=lambda t, y: y[0] + 0.75, reverse_time=True)
    assert abs(t_ev.item() + 0.75) < 1e-8 and abs(sol[1, 0].item() + 0.75) < 1e-8
    t_ev, sol = tdq.odeint(f, torch.zeros(1, dtype=D), torch.tensor([0.0, 1.0], dtype=D),
                           event_fn=lambda t, y: y[0])
    assert t_ev.item() == 0.0 and torch.equal(sol[1], sol[0])
    # the event is far away: several integration windows
    t_ev, sol = tdq.odeint_event(f, torch.zeros(1, dtype=D), 0.0, event_fn=lambda t, y: y[0] - 37.5)
    assert abs(t_ev.item() - 37.5) < 1e-8


def test_float32():
    t = torch.linspace(0, 1, 5)
    out = tdq.odeint(decay, torch.ones(3), t, rtol=1e-5, atol=1e-7)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.exp(-t)[:, None].expand(5, 3), rtol=1e-5, atol=1e-6)


# -- against torchdiffeq itself, when installed --------------------------------------------------

def _problem():
    torch.manual_seed(1)
    A = torch.randn(3, 3, dtype=D) * 0.5
    return (lambda t, y: torch.tanh(y @ A) + torch.sin(t)), torch.randn(4, 3, dtype=D)


@pytest.mark.parametrize("method", FIXED)
def test_fixed_grid_equals_torchdiffeq(method):
    torchdiffeq = pytest.importorskip("torchdiffeq")
    f, y0 = _problem()
    t = torch.linspace(0, 2, 7, dtype=D)
    for opts in ({"step_size": 0.07}, {"step_size": 0.07, "interp": "cubic", "perturb": True}, None):
        a = torchdiffeq.odeint(f, y0, t, method=method, options=opts)
        b = tdq.odeint(f, y0, t, method=method, options=opts)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["dopri5", "dopri8", "bosh3", "adaptive_heun", "fehlberg2"])
def test_adaptive_close_to_torchdiffeq(method):
    torchdiffeq = pytest.importorskip("torchdiffeq")
    f, y0 = _problem()
    t = torch.linspace(2, 0, 7, dtype=D)
    ref = torchdiffeq.odeint(f, y0, t, method="dopri8", rtol=1e-12, atol=1e-12)
    a = torchdiffeq.odeint(f, y0, t, method=method, rtol=1e-6, atol=1e-8)
    b = tdq.odeint(f, y0, t, method=method, rtol=1e-6, atol=1e-8)
    err_a = (a - ref).abs().max()
    err_b = (b - ref).abs().max()
    assert err_b < max(3 * err_a, 1e-6), (err_a, err_b)


@pytest.mark.parametrize("method,options", [("rk4", None), ("euler", None), ("midpoint", None),
                                            ("rk4", {"step_size": 0.1})])
def test_fixed_grid_gradients_with_respect_to_t(method, options):
    """The fixed grid is built from t, so the discrete solution depends on t (as in torchdiffeq)."""
    def fn(t):
        return torchmech.odeint(lambda t, y: -2 * y + t, torch.tensor([1.0], dtype=torch.float64), t,
                                method=method, options=options)

    t = torch.tensor([0.0, 0.45, 1.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (t,))
    assert torch.autograd.grad(fn(t)[-1].sum(), t)[0][-1] > 0.1


def test_adams_refuses_gradients_with_respect_to_t():
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    out = torchmech.odeint(lambda t, y: -y, y0, t, method="explicit_adams")
    with pytest.raises(RuntimeError, match="gradients with respect to t are not supported by the Adams"):
        out.sum().backward()
    # a t that requires grad does not stop the gradient of y0 alone (as torchdiffeq)
    out = torchmech.odeint(lambda t, y: -y, y0, t, method="explicit_adams")
    ref = torchmech.odeint(lambda t, y: -y, y0, t.detach(), method="explicit_adams")
    torch.testing.assert_close(torch.autograd.grad(out.sum(), y0)[0], torch.autograd.grad(ref.sum(), y0)[0])


def test_odeint_adjoint_reuses_jump_t_backwards():
    """A square-wave forcing: without the marks the backward solve steps across every jump (4x the calls)."""
    calls = [0]

    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k = torch.nn.Parameter(torch.tensor(1.0, dtype=D))

        def forward(self, t, y):
            calls[0] += 1
            return -self.k * y + (torch.floor(t) % 2 * 2 - 1)

    y0 = torch.zeros(1, dtype=D)
    t = torch.tensor([0.0, 10.0], dtype=D)
    f = F()
    ref = torch.autograd.grad(tdq.odeint(f, y0, t, rtol=1e-10, atol=1e-10, options={"jump_t": torch.arange(1.0, 11.0, dtype=D)})[-1].sum(), f.k)[0]
    for tol in (1e-6, 1e-9):
        calls[0] = 0
        out = tdq.odeint_adjoint(f, y0, t, rtol=tol, atol=tol, options={"jump_t": torch.arange(1.0, 11.0, dtype=D)})
        forward = calls[0]
        (g,) = torch.autograd.grad(out[-1].sum(), f.k)
        assert calls[0] - forward < forward  # (without the marks: 2096 backward calls for 563 forward)
    torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-8)  # (at 1e-6 both libraries are ~2% off)


def test_odeint_adjoint_fixed_grid_runs_the_same_method_backwards_on_the_grid():
    """As torchdiffeq: rk4 forward, rk4 backward on the forward grid (an adaptive backward solve restarted at
    every grid point took twice the calls and 4x the time)."""
    calls = [0]

    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2).double()

        def forward(self, t, y):
            calls[0] += 1
            return torch.tanh(self.lin(y))

    torch.manual_seed(0)
    f = F()
    y0 = torch.randn(4, 2, dtype=D)
    t = torch.linspace(0, 1, 11, dtype=D)
    ref = torch.autograd.grad(tdq.odeint(f, y0, t, method="rk4", options={"step_size": 0.01})[[3, -1]].sum(),
                              list(f.parameters()))
    calls[0] = 0
    out = tdq.odeint_adjoint(f, y0, t, method="rk4", options={"step_size": 0.01})
    forward = calls[0]
    got = torch.autograd.grad(out[[3, -1]].sum(), list(f.parameters()))
    assert calls[0] - forward <= 1.1 * forward
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_odeint_event_runs_one_solve_to_the_event():
    """A falling ball: restarting over doubling spans paid an initial-step estimate and a ramp-up per restart."""
    calls = [0]

    def f(t, y):
        calls[0] += 1
        return torch.stack([y[1], torch.full_like(y[1], -9.81)])

    y0 = torch.tensor([100.0, 0.0], dtype=D)
    t_ev, ys = tdq.odeint_event(f, y0, torch.tensor(0.0, dtype=D), event_fn=lambda t, y: y[0], rtol=1e-7,
                                atol=1e-7)
    assert abs(float(t_ev) - math.sqrt(2 * 100.0 / 9.81)) < 1e-6
    assert calls[0] <= 35  # (26; over the spans [0, 1], [1, 3], [3, 7]: 60)


def test_adjoint_leaves_out_frozen_parameters():
    """Default adjoint_params are func.parameters(); frozen ones get no gradient, as torchdiffeq."""
    func = _MLP()
    func.net[0].weight.requires_grad_(False)
    y0 = torch.tensor([[0.5, -1.0]], dtype=D, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=D)
    tdq.odeint_adjoint(func, y0, t, rtol=1e-10, atol=1e-10).sum().backward()
    g_adj = (y0.grad.clone(), func.net[2].weight.grad.clone())
    assert func.net[0].weight.grad is None
    y0.grad = None
    func.zero_grad()
    tdq.odeint(func, y0, t, rtol=1e-10, atol=1e-10).sum().backward()
    torch.testing.assert_close(g_adj, (y0.grad, func.net[2].weight.grad), rtol=1e-6, atol=1e-8)


def _step_at_half(t, y):
    """dy/dt jumps from 0 to 5 at t = 0.5."""
    return torch.where(t >= 0.5, torch.full_like(y, 5.0), torch.zeros_like(y))


def test_perturb_cubic_interpolant_stays_inside_each_step():
    """A jump on a grid point: the exact solution is 0 up to 0.5, then 5 (t - 0.5)."""
    t = torch.tensor([0.0, 0.2, 0.4, 0.5, 0.8, 1.0], dtype=D)
    out = tdq.odeint(_step_at_half, torch.zeros(1, dtype=D), t, method="rk4",
                     options={"step_size": 0.5, "perturb": True, "interp": "cubic"})
    torch.testing.assert_close(out[:, 0], 5 * (t - 0.5).clamp(min=0), rtol=0, atol=1e-12)


def test_odeint_adjoint_perturbs_the_backward_steps_too():
    """Fixed-grid backward solve on the forward grid with perturb: the gradient of the perturbed problem."""
    w = torch.tensor([1.5], dtype=D, requires_grad=True)

    def f(t, y):  # a jump at the grid point 0.5 scaled by w, plus a decay
        return w * _step_at_half(t, y) - y

    class F(torch.nn.Module):
        def forward(self, t, y):
            return f(t, y)

    y0 = torch.ones(1, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=D)
    opts = {"step_size": 0.25, "perturb": True}
    direct = torch.autograd.grad(tdq.odeint(f, y0, t, method="rk4", options=opts)[-1].sum(), (y0, w))
    adj = torch.autograd.grad(tdq.odeint_adjoint(F(), y0, t, method="rk4", options=opts,
                                                 adjoint_params=(w,))[-1].sum(), (y0, w))
    torch.testing.assert_close(adj, direct, rtol=1e-3, atol=1e-6)
    # the exact gradient in w: the forcing acts over [0.5, 1]: dy1/dw = 5 (1 - e^{-0.5})
    torch.testing.assert_close(adj[1], torch.tensor([5 * (1 - math.exp(-0.5))], dtype=D), rtol=1e-3, atol=0)


def test_step_callbacks_are_refused():
    class F(torch.nn.Module):
        def forward(self, t, y):
            return -y

        def callback_step(self, t0, y0, dt):
            raise AssertionError("never reached")

    with pytest.raises(ValueError, match="func defines callback_step.*does not support step callbacks"):
        tdq.odeint(F(), torch.ones(1, dtype=D), torch.tensor([0.0, 1.0], dtype=D))


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_single_time_output_is_a_copy(method):
    y0 = torch.ones(2, dtype=D)
    out = tdq.odeint(decay, y0, torch.tensor([0.0], dtype=D), method=method)
    assert out.shape == (1, 2)
    out[0, 0] = 5.0
    assert y0[0] == 1.0


def test_grid_constructor_gets_the_flattened_tuple_state():
    seen = []

    def gc(func, y0, t):
        seen.append((tuple(y0.shape), tuple(func(t[0], y0).shape)))
        return torch.linspace(float(t[0]), float(t[-1]), 11, dtype=D)

    y0 = (torch.ones(2, dtype=D), torch.ones(3, dtype=D))
    out = tdq.odeint(lambda t, y: (-y[0], -2 * y[1]), y0, torch.tensor([0.0, 1.0], dtype=D), method="euler",
                     options={"grid_constructor": gc})
    assert seen == [((5,), (5,))]
    torch.testing.assert_close(out[1][-1], torch.full((3,), 0.8 ** 10, dtype=D))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_states(dtype):
    seen = []

    def f(t, y):
        seen.append(y.dtype)
        return -y

    out = tdq.odeint(f, torch.ones(3, dtype=dtype), torch.tensor([0.0, 1.0]), rtol=1e-5, atol=1e-5)
    assert out.dtype == dtype and set(seen) == {dtype}
    torch.testing.assert_close(out[-1].float(), torch.full((3,), math.exp(-1.0)), rtol=1e-2, atol=0)


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_complex_state(method):
    """y' = i w y: y(t) = exp(i w t) y0; tolerances act on the real and imaginary parts."""
    w = 2.0
    y0 = torch.tensor([1.0 + 0.5j, -0.3j], dtype=torch.complex128)
    t = torch.linspace(0, 1, 5, dtype=D)
    opts = {"step_size": 0.01} if method == "rk4" else None
    out = tdq.odeint(lambda t, y: 1j * w * y, y0, t, method=method, rtol=1e-10,
                     atol=torch.tensor([1e-10, 1e-12], dtype=D), options=opts)
    assert out.dtype == torch.complex128 and out.shape == (5, 2)
    exact = torch.exp(1j * w * t.to(torch.complex128))[:, None] * y0
    torch.testing.assert_close(out, exact, rtol=1e-8, atol=1e-8)


def test_tuple_state_with_mixed_dtypes_and_numpy_tolerances():
    y0 = (torch.ones(2, dtype=torch.float32), torch.ones(1, dtype=D))
    out = tdq.odeint(lambda t, y: (-y[0], -2 * y[1]), y0, torch.tensor([0.0, 1.0], dtype=D),
                     rtol=np.array([1e-9, 1e-9]), atol=np.float64(1e-10))
    assert out[0].dtype == torch.float32 and out[1].dtype == D
    torch.testing.assert_close(out[1][-1], torch.tensor([math.exp(-2.0)], dtype=D), rtol=1e-7, atol=0)
    torch.testing.assert_close(out[0][-1], torch.full((2,), math.exp(-1.0)), rtol=1e-6, atol=0)


def test_tolerance_requiring_grad_message():
    with pytest.raises(ValueError, match=r"^odeint: atol must not require grad$"):
        tdq.odeint(decay, torch.ones(1, dtype=D), torch.tensor([0.0, 1.0], dtype=D),
                   atol=torch.tensor(1e-8, dtype=D, requires_grad=True))


def test_event_never_reached_names_the_step_budget():
    with pytest.raises(RuntimeError, match=r"stopped before the event: options\['max_num_steps'\]=5 exceeded"):
        tdq.odeint(decay, torch.ones(1, dtype=D), torch.tensor([0.0, 1.0], dtype=D), event_fn=lambda t, y: y[0] + 1.0,
                   options={"max_num_steps": 5})


def test_blow_up_and_large_t0_finish_instead_of_running_for_ever():
    """odeint's max_num_steps is unlimited by default: a rejected step a few ulps long retried for ever (a
    finite-time blow-up) and a first step shorter than half an ulp of t0 (which never moved t) both hung."""
    with pytest.raises(RuntimeError, match="step size underflow"):
        torchmech.odeint(lambda t, y: y ** 2, torch.ones(1), torch.tensor([0.0, 2.0]))
    out = torchmech.odeint(lambda t, y: -y, torch.ones(1), torch.tensor([100.0, 101.0]), options={"first_step": 1e-6})
    assert abs(float(out[-1, 0]) - math.exp(-1.0)) < 1e-4
    out = torchmech.odeint(lambda t, y: 1 - y, torch.zeros(1), torch.tensor([5000.0, 5001.0]))
    assert abs(float(out[-1, 0]) - (1 - math.exp(-1.0))) < 1e-4
