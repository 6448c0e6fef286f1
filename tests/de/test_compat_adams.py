"""torchmech.compat.torchdiffeq: the fixed-grid Adams methods (explicit_adams, implicit_adams, fixed_adams)."""

import math
import warnings

import numpy as np
import pytest
import torch

from torchmech.compat import torchdiffeq as tdq

D = torch.float64
ADAMS = ["explicit_adams", "implicit_adams"]


def forced_decay(t, y):
    return -y + torch.sin(t)


def forced_decay_exact(t):  # y' = -y + sin t, y(0) = 1
    return 1.5 * torch.exp(-t) + 0.5 * (torch.sin(t) - torch.cos(t))


def test_weights_are_the_textbook_adams_coefficients():
    ab = tdq._adams_weights(np.array([[0.0, -1.0, -2.0, -3.0]]))
    np.testing.assert_allclose(ab[0], np.array([55, -59, 37, -9]) / 24, rtol=1e-14)
    am = tdq._adams_weights(np.array([[1.0, 0.0, -1.0, -2.0], [1.0, 0.0, -1.0, -2.0]]))
    np.testing.assert_allclose(am, np.array([[9, 19, -5, 1], [9, 19, -5, 1]]) / 24, rtol=1e-14)
    np.testing.assert_allclose(tdq._adams_weights(np.array([[0.0, -1.0]])), [[1.5, -0.5]], rtol=1e-15)
    np.testing.assert_allclose(tdq._adams_weights(np.array([[0.0]])), [[1.0]])
    # uneven nodes: the weights integrate every polynomial of degree < k exactly over [0, 1]
    nodes = np.array([[0.0, -0.7, -2.1, -2.6, -4.0]])
    w = tdq._adams_weights(nodes)[0]
    for p in range(5):
        assert abs((w * nodes[0] ** p).sum() - 1 / (p + 1)) < 1e-13


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("method", ADAMS)
def test_convergence_order_is_four(method):
    t = torch.tensor([0.0, 3.0], dtype=D)
    errs = []
    for h in (0.0125, 0.00625):
        out = tdq.odeint(forced_decay, torch.ones(1, dtype=D), t, method=method, options={"step_size": h},
                         rtol=1e-13, atol=1e-15)
        errs.append((out[-1, 0] - forced_decay_exact(t[-1])).abs().item())
    order = math.log2(errs[0] / errs[1])
    assert abs(order - 4) < 0.15, (method, errs, order)
    assert errs[1] < 1e-9


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("method", ADAMS)
def test_order_four_on_an_uneven_grid(method):
    # the default grid is t itself; variable-step weights keep the order where constant ones drop it
    errs = []
    for n in (320, 640):
        u = torch.linspace(0, 1, n + 1, dtype=D)
        t = 3 * (u + 0.3 * u * (1 - u))
        opts = {"max_iters": 10} if method == "implicit_adams" else None
        out = tdq.odeint(forced_decay, torch.ones(1, dtype=D), t, method=method, options=opts, rtol=1e-14, atol=1e-16)
        errs.append((out[:, 0] - forced_decay_exact(t)).abs().max().item())
    order = math.log2(errs[0] / errs[1])
    assert 3.8 < order < 4.2, (method, errs, order)


def test_start_up_steps_are_rk4_and_low_orders():
    t = torch.linspace(0, 1, 11, dtype=D)
    y0 = torch.tensor([1.0, -0.5], dtype=D)
    rk4 = tdq.odeint(forced_decay, y0, t, method="rk4")
    for method in ADAMS:  # with max_order 4 the first two steps are rk4 steps, the third is not
        out = tdq.odeint(forced_decay, y0, t, method=method)
        torch.testing.assert_close(out[:3], rk4[:3], rtol=1e-15, atol=1e-15)
        assert (out[3] - rk4[3]).abs().max() > 1e-12
    # Adams-Bashforth of order 1 is Euler
    euler = tdq.odeint(forced_decay, y0, t, method="euler")
    torch.testing.assert_close(tdq.odeint(forced_decay, y0, t, method="explicit_adams", options={"max_order": 1}),
                               euler, rtol=1e-15, atol=1e-15)
    # implicit order 2, iterated to convergence, is the trapezoidal rule: y1 = y0 (1 + h l / 2) / (1 - h l / 2)
    lam, h = -2.0, 0.1
    out = tdq.odeint(lambda t, y: lam * y, y0, t, method="fixed_adams", options={"max_order": 2, "max_iters": 50},
                     rtol=1e-14, atol=1e-16)
    ratio = (1 + h * lam / 2) / (1 - h * lam / 2)
    torch.testing.assert_close(out, y0 * ratio ** torch.arange(11, dtype=D)[:, None], rtol=1e-13, atol=1e-15)


def test_fixed_adams_is_implicit_adams():
    t = torch.linspace(0, 2, 5, dtype=D)
    a = tdq.odeint(forced_decay, torch.ones(3, dtype=D), t, method="fixed_adams", options={"step_size": 0.1})
    b = tdq.odeint(forced_decay, torch.ones(3, dtype=D), t, method="implicit_adams", options={"step_size": 0.1})
    assert torch.equal(a, b)


def test_tuple_state_reversed_time_and_interp():
    # harmonic oscillator x'' = -x as (x, v), integrated backwards from t = 2
    f = lambda t, y: (y[1], -y[0])  # noqa: E731
    t = torch.linspace(2, 0, 5, dtype=D)
    x0, v0 = torch.tensor([[1.0, 0.5]], dtype=D), torch.tensor([[0.0, -1.0]], dtype=D)
    for method in ADAMS:
        for interp in ("linear", "cubic"):
            opts = {"step_size": 0.03, "interp": interp}  # 1.5, 1.0, 0.5 fall between grid points
            x, v = tdq.odeint(f, (x0, v0), t, method=method, options=opts)
            assert x.shape == (5, 1, 2) and v.shape == (5, 1, 2)
            s = (t - 2)[:, None, None]
            x_exact = x0 * torch.cos(s) + v0 * torch.sin(s)
            tol = 2e-6 if interp == "cubic" else 2e-4  # linear: O(h^2) between grid points
            torch.testing.assert_close(x, x_exact, rtol=0, atol=tol)
            torch.testing.assert_close(v, -x0 * torch.sin(s) + v0 * torch.cos(s), rtol=0, atol=tol)
            # a tuple state is the same computation as the flattened tensor state
            g = lambda t, y: torch.cat([y[2:], -y[:2]])  # noqa: E731
            flat = tdq.odeint(g, torch.cat([x0[0], v0[0]]), t, method=method, options=opts)
            assert torch.equal(flat[:, :2], x[:, 0]) and torch.equal(flat[:, 2:], v[:, 0])


def test_float32_and_single_time():
    t = torch.linspace(0, 2, 5)
    for method in ADAMS:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # float32 rounding must not stall the corrector
            out = tdq.odeint(forced_decay, torch.ones(3), t, method=method, options={"step_size": 0.05})
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, forced_decay_exact(t)[:, None].expand(5, 3), rtol=0, atol=2e-6)
        one = tdq.odeint(forced_decay, torch.ones(3), t[:1], method=method)
        assert one.shape == (1, 3) and torch.equal(one[0], torch.ones(3))


def test_corrector_that_does_not_converge_warns():
    f = lambda t, y: -30.0 * y  # noqa: E731  h * 30 * 9/24 > 1: the functional iteration diverges
    with pytest.warns(RuntimeWarning, match="corrector did not converge.*max_iters=4"):
        tdq.odeint(f, torch.ones(2, dtype=D), torch.linspace(0, 1, 11, dtype=D), method="implicit_adams")


# -- gradients -----------------------------------------------------------------------------------

class _Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return self.net(y) + torch.sin(t)


@pytest.mark.parametrize("method", ADAMS)
def test_gradients_match_finite_differences_and_adjoint(method):
    func = _Field()
    y0 = torch.tensor([[0.5, -1.0], [1.0, 0.3]], dtype=D, requires_grad=True)
    t = torch.linspace(0, 1, 4, dtype=D)
    opts = {"step_size": 0.05, "interp": "cubic"}

    def loss(interface, y0):
        return (interface(func, y0, t, method=method, options=opts) ** 2).sum()

    params = [y0] + list(func.parameters())
    g = torch.autograd.grad(loss(tdq.odeint, y0), params)
    eps = 1e-6
    for idx in [(0, 0), (1, 1), (0, 1)]:
        e = torch.zeros_like(y0)
        e[idx] = eps
        with torch.no_grad():
            fd = (loss(tdq.odeint, y0 + e) - loss(tdq.odeint, y0 - e)) / (2 * eps)
        assert abs(fd.item() - g[0][idx].item()) < 1e-7, (idx, fd.item(), g[0][idx].item())
    w = func.net[0].weight
    with torch.no_grad():
        w[0, 0] += eps
        up = loss(tdq.odeint, y0)
        w[0, 0] -= 2 * eps
        down = loss(tdq.odeint, y0)
        w[0, 0] += eps
    assert abs(((up - down) / (2 * eps)).item() - g[1][0, 0].item()) < 1e-7

    # odeint_adjoint: the same discrete gradient, by checkpointed recomputation during backward
    out = loss(tdq.odeint_adjoint, y0)
    before = func.calls
    g_adj = torch.autograd.grad(out, params)
    assert func.calls > before  # backward recomputed the forward segments
    for a, b in zip(g, g_adj):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    out = loss(tdq.odeint, y0)
    before = func.calls
    torch.autograd.grad(out, params)
    assert func.calls == before  # plain odeint backpropagates through the stored graph


# -- options and errors --------------------------------------------------------------------------

def test_unsupported_options_raise():
    y0 = torch.ones(2, dtype=D)
    t = torch.tensor([0.0, 1.0], dtype=D)
    with pytest.raises(ValueError, match="perturb.*not supported for 'implicit_adams'"):
        tdq.odeint(forced_decay, y0, t, method="implicit_adams", options={"perturb": True})
    tdq.odeint(forced_decay, y0, t, method="explicit_adams", options={"perturb": False})
    with pytest.raises(ValueError, match="option 'max_iters' is not supported for the fixed-grid method 'explicit"):
        tdq.odeint(forced_decay, y0, t, method="explicit_adams", options={"max_iters": 3})
    with pytest.raises(ValueError, match="option 'max_num_steps' is not supported"):
        tdq.odeint(forced_decay, y0, t, method="implicit_adams", options={"max_num_steps": 3})
    for bad in (0, 13, 2.5, True):
        with pytest.raises(ValueError, match=r"options\['max_order'\] must be an int in \[1, 12\]"):
            tdq.odeint(forced_decay, y0, t, method="explicit_adams", options={"max_order": bad})
    with pytest.raises(ValueError, match=r"options\['max_iters'\] must be an int >= 1"):
        tdq.odeint(forced_decay, y0, t, method="implicit_adams", options={"max_iters": 0})
    with pytest.raises(ValueError, match="mutually exclusive"):
        tdq.odeint(forced_decay, y0, t, method="explicit_adams", options={"step_size": 0.1, "grid_constructor": None})
    with pytest.raises(ValueError, match="rtol must be finite and >= 0"):
        tdq.odeint(forced_decay, y0, t, method="implicit_adams", rtol=-1.0)
    with pytest.raises(ValueError, match="event_fn is not supported with the multistep method"):
        tdq.odeint(forced_decay, y0, t, method="explicit_adams", event_fn=lambda t, y: y[0])
    with pytest.raises(ValueError, match="adjoint_rtol, adjoint_method do not apply to 'explicit_adams'"):
        tdq.odeint_adjoint(forced_decay, y0, t, method="explicit_adams", adjoint_params=(), adjoint_rtol=1e-6,
                           adjoint_method="dopri5")
    with pytest.raises(ValueError, match="adjoint_method 'implicit_adams' is fixed-grid"):
        tdq.odeint_adjoint(forced_decay, y0, t, adjoint_params=(), adjoint_method="implicit_adams")
    assert {"explicit_adams", "implicit_adams", "fixed_adams"} <= set(tdq.SOLVERS)


# -- against torchdiffeq itself, when installed --------------------------------------------------

def _problem():
    torch.manual_seed(1)
    A = torch.randn(3, 3, dtype=D) * 0.5
    return (lambda t, y: torch.tanh(y @ A) + torch.sin(t)), torch.randn(4, 3, dtype=D)


def test_explicit_adams_equals_torchdiffeq():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    f, y0 = _problem()
    t = torch.linspace(0, 2, 7, dtype=D)
    # torchdiffeq's documentation: max_order is "the maximum order of the Adams-Bashforth predictor";
    # torchdiffeq 0.2.5 steps with order max_order - 1, so its max_order=p+1 is our max_order=p
    for ours, theirs in ((4, 5), (3, 4), (6, 7)):
        for opts in ({"step_size": 0.05}, {"step_size": 0.05, "interp": "cubic"}, {}):
            kw = dict(method="explicit_adams", rtol=1e-3, atol=1e-4)  # tolerances unused
            a = torchdiffeq.odeint(f, y0, t, options={**opts, "max_order": theirs}, **kw)
            b = tdq.odeint(f, y0, t, options={**opts, "max_order": ours}, **kw)
            if ours == 4:
                assert torch.equal(b, tdq.odeint(f, y0, t, options=opts, **kw))  # our default order is 4
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_implicit_adams_equals_torchdiffeq():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    f, y0 = _problem()
    t = torch.linspace(0, 2, 7, dtype=D)
    for order in (4, 5):
        for interp in ("linear", "cubic"):
            # both correctors converge to the Adams-Moulton solution: the same numbers
            opts = {"step_size": 0.02, "interp": interp, "max_order": order}
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # neither library reports a stalled corrector
                a = torchdiffeq.odeint(f, y0, t, method="implicit_adams", options=opts, rtol=1e-12, atol=1e-12)
                b = tdq.odeint(f, y0, t, method="implicit_adams", options=opts, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
            # default tolerances, larger steps: the stopping tests of the corrector (undocumented in
            # torchdiffeq) differ, so the results agree to the tolerance rather than to rounding
            opts["step_size"] = 0.05
            a = torchdiffeq.odeint(f, y0, t, method="implicit_adams", options=opts)
            b = tdq.odeint(f, y0, t, method="implicit_adams", options=opts)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-8)
