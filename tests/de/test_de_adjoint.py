"""Gradients through torchmech.de.solve: direct, checkpointed and continuous (backsolve) adjoints."""

import math

import pytest
import torch

import torchmech.de as de


def decay(t, y, args):
    k, w = args
    return -k[:, None] * y + w * torch.sin(t)[:, None]


def loss_of(sol):
    return (sol.ys ** 2).sum() + sol.ys[..., 0].sum()


def run(adjoint, k, w, y0, fixed=False, ts=None):
    ctrl = de.ConstantStep() if fixed else de.PIDController(1e-9, 1e-9)
    saveat = de.SaveAt(ts=ts if ts is not None else torch.linspace(0, 2, 7, dtype=torch.float64), t1=True)
    return de.solve(decay, de.Tsit5(), 0.0, 2.0, y0, args=(k, w), dt0=0.05 if fixed else None,
                    controller=ctrl, saveat=saveat, adjoint=adjoint)


def _params():
    k = torch.tensor([0.5, 1.5], dtype=torch.float64, requires_grad=True)
    w = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[1.0, -0.5], [2.0, 0.3]], dtype=torch.float64, requires_grad=True)
    return k, w, y0


def test_direct_vs_finite_differences():
    k, w, y0 = _params()
    for fixed in (True, False):
        loss = loss_of(run(de.DirectAdjoint(), k, w, y0, fixed=fixed))
        grads = torch.autograd.grad(loss, [k, w, y0])
        eps = 1e-6
        for p, g in zip((k, w, y0), grads):
            flat = p.detach().reshape(-1)
            for i in range(flat.numel()):
                def at(delta):
                    q = flat.clone()
                    q[i] += delta
                    vals = {id(k): k.detach(), id(w): w.detach(), id(y0): y0.detach()}
                    vals[id(p)] = q.reshape(p.shape)
                    return loss_of(run(de.DirectAdjoint(), vals[id(k)], vals[id(w)], vals[id(y0)], fixed=fixed))
                fd = (at(eps) - at(-eps)) / (2 * eps)
                tol = 1e-6 if fixed else 1e-5
                assert abs(float(g.reshape(-1)[i]) - float(fd)) < tol * (1 + abs(float(fd))), (fixed, i)


def test_direct_second_order_gradient():
    # y' = -k y: y(T) = y0 exp(-k T); d2 y / dk2 = T^2 y(T)
    k = torch.tensor([0.8], dtype=torch.float64, requires_grad=True)
    y0 = torch.ones(1, 1, dtype=torch.float64)
    sol = de.solve(lambda t, y, a: -a[:, None] * y, de.Dopri5(), 0.0, 1.5, y0, args=k,
                   controller=de.PIDController(1e-10, 1e-10))
    (g,) = torch.autograd.grad(sol.ys[0, -1, 0], k, create_graph=True)
    (h,) = torch.autograd.grad(g, k)
    exact = 1.5 ** 2 * math.exp(-0.8 * 1.5)
    assert abs(float(h) - exact) < 1e-7


def test_checkpoint_equals_direct():
    k, w, y0 = _params()
    ref = torch.autograd.grad(loss_of(run(de.DirectAdjoint(), k, w, y0)), [k, w, y0])
    for segs in (None, 3):
        got = torch.autograd.grad(loss_of(run(de.CheckpointAdjoint(checkpoints=segs), k, w, y0)), [k, w, y0])
        for a, b in zip(ref, got):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_checkpoint_with_module_and_dense():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()
    y0 = torch.randn(3, 2, dtype=torch.float64)
    f = lambda t, y, a: net(y)  # noqa: E731
    grads = []
    for adj in (de.DirectAdjoint(), de.CheckpointAdjoint(checkpoints=4)):
        sol = de.solve(f, de.Dopri5(), 0.0, 1.0, y0, saveat=de.SaveAt(ts=torch.linspace(0, 1, 5).double(),
                       dense=True), controller=de.PIDController(1e-7, 1e-7), adjoint=adj)
        loss = sol.ys.pow(2).sum() + sol.evaluate(0.33).sum()
        grads.append(torch.autograd.grad(loss, list(net.parameters())))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("seminorm", [True, False])
def test_backsolve_close_to_direct_args(seminorm):
    k, w, y0 = _params()
    ref = torch.autograd.grad(loss_of(run(de.DirectAdjoint(), k, w, y0)), [k, w, y0])
    sol = run(de.BacksolveAdjoint(rtol=1e-10, atol=1e-10, seminorm=seminorm), k, w, y0)
    got = torch.autograd.grad(loss_of(sol), [k, w, y0])
    for a, b in zip(ref, got):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8), (a, b)


def test_backsolve_seminorm_takes_fewer_steps():
    # the parameter adjoint in the error norm (seminorm=False) can only add backward steps
    torch.manual_seed(4)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    y0 = torch.randn(2, 2, dtype=torch.float64)
    steps, grads = {}, {}
    for seminorm in (True, False):
        adj = de.BacksolveAdjoint(1e-6, 1e-6, seminorm=seminorm, adjoint_params=list(net.parameters()))
        sol = de.solve(lambda t, y, a: net(y), de.Tsit5(), 0.0, 2.0, y0, adjoint=adj,
                       controller=de.PIDController(1e-8, 1e-8))
        grads[seminorm] = torch.autograd.grad((sol.ys ** 2).sum(), list(net.parameters()))
        steps[seminorm] = adj.backward_stats["num_steps"]
    for a, b in zip(grads[True], grads[False]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert (steps[True] > 0).all()
    assert (steps[True] < steps[False]).all()


def test_backsolve_module_parameters_per_sample_times():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()
    f = lambda t, y, a: net(y)  # noqa: E731
    term = de.ODETerm(f)  # a closure: parameters are passed explicitly
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    t1 = torch.tensor([1.0, 0.5, 1.5], dtype=torch.float64)
    ts = torch.stack([torch.linspace(0, float(t), 4) for t in t1]).double()
    results = []
    for adj in (de.DirectAdjoint(), de.BacksolveAdjoint(rtol=1e-10, atol=1e-10, adjoint_params=net.parameters())):
        sol = de.solve(term, de.Tsit5(), 0.0, t1, y0, saveat=de.SaveAt(ts=ts), adjoint=adj,
                       controller=de.PIDController(1e-10, 1e-10))
        loss = (sol.ys ** 2).sum()
        results.append(torch.autograd.grad(loss, [y0, *net.parameters()]))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8)


def test_backsolve_collects_module_parameters():
    torch.manual_seed(2)

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2).double()

        def forward(self, t, y, args):
            return torch.tanh(self.lin(y))

    field = Field()
    y0 = torch.randn(2, 2, dtype=torch.float64)
    grads = []
    for adj in (de.DirectAdjoint(), de.BacksolveAdjoint(rtol=1e-10, atol=1e-10)):
        sol = de.solve(de.ODETerm(field), de.Dopri5(), 0.0, 1.0, y0, adjoint=adj,
                       controller=de.PIDController(1e-10, 1e-10))
        grads.append(torch.autograd.grad(sol.ys.sum(), list(field.parameters())))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)


def test_backsolve_rejects_unsupported():
    y0 = torch.ones(1, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="events are not supported"):
        de.solve(lambda t, y, a: -y, de.Tsit5(), 0.0, 1.0, y0, adjoint=de.BacksolveAdjoint(),
                 event=de.Event(lambda t, y, a: y[:, 0] - 0.5))
    with pytest.raises(ValueError, match="need finite numbers rtol > 0"):
        de.BacksolveAdjoint(rtol=0.0)
    with pytest.raises(ValueError, match="checkpoints must be a positive int"):
        de.CheckpointAdjoint(checkpoints=0)


def test_gradients_float32():
    k = torch.tensor([0.5, 1.5], requires_grad=True)
    y0 = torch.ones(2, 1)
    sol = de.solve(lambda t, y, a: -a[:, None] * y, de.Tsit5(), 0.0, 1.0, y0, args=k,
                   controller=de.PIDController(1e-6, 1e-7))
    (g,) = torch.autograd.grad(sol.ys.sum(), k)
    assert g.dtype == torch.float32
    assert torch.allclose(g, -torch.exp(-k.detach()), rtol=1e-4)


def test_checkpoint_stores_less_for_backward():
    from torch.autograd.graph import saved_tensors_hooks

    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).double()
    y0 = torch.randn(4, 4, dtype=torch.float64)
    saved = {}
    grads = {}
    for adj in (de.DirectAdjoint(), de.CheckpointAdjoint(checkpoints=5)):
        count = [0]

        def pack(x, count=count):
            count[0] += x.numel()
            return x

        with saved_tensors_hooks(pack, lambda x: x):
            sol = de.solve(lambda t, y, a: net(y), de.Tsit5(), 0.0, 3.0, y0, dt0=0.1,
                           controller=de.ConstantStep(), adjoint=adj)
        saved[type(adj).__name__] = count[0]
        grads[type(adj).__name__] = torch.autograd.grad(sol.ys.sum(), list(net.parameters()))
    assert saved["CheckpointAdjoint"] * 4 < saved["DirectAdjoint"]
    for a, b in zip(grads["DirectAdjoint"], grads["CheckpointAdjoint"]):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_backsolve_with_a_field_that_ignores_the_state_and_unused_params():
    """f(t) alone has no autograd graph; unused adjoint_params get no gradient (None), not an error."""
    unused = torch.nn.Linear(2, 2).double()
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    ts = torch.linspace(0, 1, 4, dtype=torch.float64)
    for seminorm in (True, False):
        sol = de.solve(lambda t, y, a: torch.cos(t)[:, None].expand(y.shape), de.Tsit5(), 0.0, 1.0, y0,
                       saveat=de.SaveAt(ts=ts), controller=de.PIDController(1e-9, 1e-9),
                       adjoint=de.BacksolveAdjoint(seminorm=seminorm, adjoint_params=list(unused.parameters())))
        torch.testing.assert_close(sol.ys, y0.detach()[:, None] + torch.sin(ts)[None, :, None])
        (g,) = torch.autograd.grad(sol.ys.sum(), [y0])
        torch.testing.assert_close(g, torch.full_like(y0, 4.0))


def test_backsolve_skips_samples_that_failed_in_the_forward_solve():
    """throw=False: a sample stopped by max_steps has no end state to solve back from; it gets zero
    gradient and the other samples' gradients are those of solving them alone."""

    class Field(torch.nn.Module):
        def __init__(self, k):
            super().__init__()
            self.k = torch.nn.Parameter(torch.tensor(k, dtype=torch.float64))

        def forward(self, t, y, a):
            k = self.k[:, None]
            return -k * y * (1 + torch.sin(30 * k * t[:, None]))

    ts = torch.linspace(0, 1, 5, dtype=torch.float64)
    adj = de.BacksolveAdjoint(max_steps=10000)
    f = Field([1.0, 50.0])
    y0 = torch.ones(2, 1, dtype=torch.float64, requires_grad=True)
    sol = de.solve(f, de.Tsit5(), 0.0, 1.0, y0, saveat=de.SaveAt(ts=ts), max_steps=40, throw=False, adjoint=adj)
    assert sol.status.tolist() == [0, int(de.Status.MAX_STEPS)]
    sol.ys[sol.status == 0].sum().backward()
    alone = Field([1.0])
    y0a = torch.ones(1, 1, dtype=torch.float64, requires_grad=True)
    de.solve(alone, de.Tsit5(), 0.0, 1.0, y0a, saveat=de.SaveAt(ts=ts), adjoint=adj).ys.sum().backward()
    assert f.k.grad[1] == 0 and y0.grad[1, 0] == 0
    torch.testing.assert_close(f.k.grad[:1], alone.k.grad)
    torch.testing.assert_close(y0.grad[:1], y0a.grad)


def test_backsolve_finds_or_refuses_parameters_outside_modules():
    net = torch.nn.Linear(2, 2).double()
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    # a plain function naming a module: its parameters would silently get no gradient
    with pytest.raises(ValueError, match=r"uses tensors that require grad \(net.weight, net.bias\)"):
        de.solve(lambda t, y, a: net(y), de.Tsit5(), 0.0, 1.0, y0, adjoint=de.BacksolveAdjoint())
    ref = torch.autograd.grad(de.solve(lambda t, y, a: net(y), de.Tsit5(), 0.0, 1.0, y0).ys.sum(),
                              list(net.parameters()))
    got = de.solve(lambda t, y, a: net(y), de.Tsit5(), 0.0, 1.0, y0,
                   adjoint=de.BacksolveAdjoint(adjoint_params=list(net.parameters())))
    for a, b in zip(torch.autograd.grad(got.ys.sum(), list(net.parameters())), ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)

    class Model(torch.nn.Module):  # a bound method of a module counts as the module
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2).double()

        def drift(self, t, y, a):
            return self.lin(y)

    m = Model()
    sol = de.solve(m.drift, de.Tsit5(), 0.0, 1.0, y0, adjoint=de.BacksolveAdjoint())
    assert all(g is not None for g in torch.autograd.grad(sol.ys.sum(), list(m.parameters())))


def test_backsolve_runs_through_save_times_without_cotangent():
    """A loss on 2 of 50 saved points: the backward solve needs no segment boundary at the other 48, and the
    gradients are those of the direct adjoint."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    field = lambda t, y, a: net(y)  # noqa: E731
    y0 = torch.randn(3, 2, dtype=torch.float64)
    ts = torch.linspace(0, 1, 50, dtype=torch.float64)
    ctrl = de.PIDController(1e-10, 1e-10)
    params = list(net.parameters())
    ref = torch.autograd.grad(de.solve(field, de.Dopri5(), 0.0, 1.0, y0, saveat=de.SaveAt(ts=ts),
                                       controller=ctrl).ys[:, [10, 30]].sum(), params)
    adj = de.BacksolveAdjoint(rtol=1e-10, atol=1e-10, adjoint_params=params)
    sol = de.solve(field, de.Dopri5(), 0.0, 1.0, y0, saveat=de.SaveAt(ts=ts), controller=ctrl, adjoint=adj)
    got = torch.autograd.grad(sol.ys[:, [10, 30]].sum(), params)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    # (from t[30] back to t0 only: far fewer steps than the 50 segments from t1 would take)
    assert int(adj.backward_stats["num_steps"].max()) < 40


def _sqrt_field(t, y, args):
    """Stays positive, but a too-large trial step puts a stage at y < 0 (sqrt -> NaN): that step is rejected."""
    return -args * (y - 0.01) + 0.1 * torch.sqrt(y)


@pytest.mark.parametrize("loop", ["lean", "generic"])
@pytest.mark.parametrize("adjoint", [de.DirectAdjoint(), de.CheckpointAdjoint()])
def test_rejected_non_finite_stages_leave_gradients_finite(loop, adjoint):
    """The rejected step's NaN rows got zero gradients, and 0 * NaN = NaN made dL/da and dL/dy0 NaN although
    the solve succeeded. Reference: finite differences of a tightly solved loss."""
    extra = {} if loop == "lean" else {"event": de.Event(lambda t, y, args: y[:, 0] + 1.0)}  # never fires

    def loss(a, y0, **kw):
        sol = de.solve(_sqrt_field, de.Tsit5(), 0.0, 2.0, y0, args=a, dt0=1.0, **extra, **kw)
        assert int(sol.stats["num_rejected"][0]) >= 1 and int(sol.status[0]) == int(de.Status.SUCCESS)
        return sol.ys.sum()

    a = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    y0 = torch.ones(1, 1, dtype=torch.float64, requires_grad=True)
    ga, gy = torch.autograd.grad(loss(a, y0, adjoint=adjoint), [a, y0])
    tight = {"controller": de.PIDController(1e-11, 1e-13)}
    e = 1e-5
    with torch.no_grad():
        fa = (loss(a + e, y0, **tight) - loss(a - e, y0, **tight)) / (2 * e)
        fy = (loss(a, y0 + e, **tight) - loss(a, y0 - e, **tight)) / (2 * e)
    assert torch.isfinite(ga) and torch.isfinite(gy).all()
    assert abs(ga.item() - fa.item()) < 0.02 * abs(fa.item()) and abs(gy.item() - fy.item()) < 0.02 * abs(fy.item())


def test_a_failing_sample_does_not_poison_shared_gradients():
    """throw=False: sample 1 ends NONFINITE (sqrt of a negative state); the loss uses sample 0 only, whose
    gradient must equal that of solving it alone (it was NaN for the shared parameter)."""
    f = lambda t, y, args: args * torch.sqrt(y) - 1.0
    a = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[4.0], [0.05]], dtype=torch.float64, requires_grad=True)
    sol = de.solve(f, de.Tsit5(), 0.0, 1.0, y0, args=a, throw=False)
    assert sol.status.tolist() == [int(de.Status.SUCCESS), int(de.Status.NONFINITE)]
    ga, gy = torch.autograd.grad(sol.ys[0].sum(), [a, y0])
    alone = de.solve(f, de.Tsit5(), 0.0, 1.0, y0[:1], args=a)
    ra, ry = torch.autograd.grad(alone.ys.sum(), [a, y0])
    torch.testing.assert_close(ga, ra)
    torch.testing.assert_close(gy, ry)
    assert gy[1].item() == 0.0


@pytest.mark.parametrize("saveat_kw", [dict(ts=True), dict(t0=True, ts=True, t1=True), dict(t1=True)])
@pytest.mark.parametrize("per_sample_ts", [False, True])
def test_backsolve_time_gradients_and_the_final_state(saveat_kw, per_sample_ts):
    """Backsolve used to return no gradient for t0, t1 and SaveAt.ts, and none through sol.y_final unless t1 was
    saved (dL/da came back as -0.39 instead of -1.0). Reference: DirectAdjoint (plain autograd)."""
    f = lambda t, y, args: -args[:, None] * y + torch.sin(t)[:, None]
    got = {}
    for name, adj in (("direct", de.DirectAdjoint()), ("backsolve", de.BacksolveAdjoint(rtol=1e-10, atol=1e-12))):
        a = torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True)
        y0 = torch.tensor([[1.0, -0.5], [0.3, 2.0]], dtype=torch.float64, requires_grad=True)
        t0 = torch.tensor([0.0, 0.2], dtype=torch.float64, requires_grad=True)
        t1 = torch.tensor([2.0, 1.5], dtype=torch.float64, requires_grad=True)
        base = torch.tensor([[0.5, 1.1], [0.6, 1.2]], dtype=torch.float64)
        ts = (base if per_sample_ts else base[0]).clone().requires_grad_(True)
        saveat = de.SaveAt(**{k: (ts if k == "ts" else v) for k, v in saveat_kw.items()})
        sol = de.solve(f, de.Tsit5(), t0, t1, y0, args=a, saveat=saveat, adjoint=adj,
                       controller=de.PIDController(1e-10, 1e-12))
        w = torch.arange(1.0, 1.0 + sol.ys[0].numel(), dtype=torch.float64).reshape(sol.ys.shape[1:])
        loss = (sol.ys * w).sum() + (sol.y_final ** 2).sum()
        wrt = [a, y0, t0, t1] + ([ts] if "ts" in saveat_kw else [])
        got[name] = torch.autograd.grad(loss, wrt, allow_unused=True)
    for d, b in zip(got["direct"], got["backsolve"]):
        torch.testing.assert_close(b, d, rtol=1e-6, atol=1e-8)


def test_backsolve_sde_time_gradients_raise():
    bm = de.VirtualBrownianTree(0.0, 1.0, shape=(2, 1), tol=1e-3, seed=0, dtype=torch.float64)
    terms = de.MultiTerm(de.ODETerm(lambda t, y, a: -y), de.DiagonalControlTerm(lambda t, y, a: 0.1 * y, bm))
    t1 = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    y0 = torch.ones(2, 1, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="gradients with respect to t0, t1 or SaveAt.ts are not computed for SDEs"):
        de.solve(terms, de.StochasticHeun(), 0.0, t1, y0, dt0=0.1, controller=de.ConstantStep(),
                 adjoint=de.BacksolveAdjoint())


def test_backsolve_finds_trainable_tensors_however_the_field_reaches_them():
    """The name-based closure search missed tensors behind default arguments, containers, callable objects,
    functools.partial and non-module objects: they silently got no gradient. A walk of one evaluation's graph
    finds them; tensors given through args or adjoint_params pass."""
    import functools

    k = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    box = [k]
    lin = torch.nn.Linear(1, 1).double()

    class Callable:
        def __call__(self, t, y, args):
            return -k * y

    class Holder:  # not an nn.Module
        def __init__(self):
            self.m = lin

        def __call__(self, t, y, args):
            return self.m(y)

    fields = [lambda t, y, a, kk=k: -kk * y, lambda t, y, a: -box[0] * y, Callable(),
              functools.partial(lambda kk, t, y, a: -kk * y, k), Holder()]
    y0 = torch.ones(2, 1, dtype=torch.float64, requires_grad=True)
    for f in fields:
        with pytest.raises(ValueError, match=r"depends on \d tensor\(s\) that require grad"):
            de.solve(f, de.Tsit5(), 0.0, 1.0, y0, adjoint=de.BacksolveAdjoint())
    # the same tensor passed explicitly: a gradient, equal to the direct one
    got = []
    for adj in (de.DirectAdjoint(), de.BacksolveAdjoint(adjoint_params=[k], rtol=1e-10, atol=1e-12)):
        sol = de.solve(fields[0], de.Tsit5(), 0.0, 1.0, y0, adjoint=adj, controller=de.PIDController(1e-10, 1e-12))
        got.append(torch.autograd.grad(sol.ys.sum(), [k, y0]))
    for d, b in zip(*got):
        torch.testing.assert_close(b, d, rtol=1e-7, atol=1e-10)


def test_backsolve_second_derivatives_raise_clearly():
    k = torch.tensor([0.5, 1.0], dtype=torch.float64, requires_grad=True)
    y0 = torch.ones(2, 1, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(0.3, dtype=torch.float64)
    sol = de.solve(decay, de.Tsit5(), 0.0, 1.0, y0, args=(k, w), adjoint=de.BacksolveAdjoint())
    (g,) = torch.autograd.grad((sol.ys ** 2).sum(), k, create_graph=True)
    with pytest.raises(RuntimeError, match="BacksolveAdjoint: second derivatives are not supported"):
        torch.autograd.grad(g.sum(), k)


def test_backsolve_graph_check_has_no_false_alarms_or_side_effects():
    """Leaves a field makes for itself (an inner optimisation, y.detach().requires_grad_()) are not trainable
    tensors it forgot to declare; the check evaluation leaves the RNG as it was; module fields are not evaluated
    (an extra call would advance BatchNorm's statistics)."""
    lin = torch.nn.Linear(2, 2).double()

    def inner_opt(t, y, args, lin=lin):  # a plain function (lin as a default: only the graph walk sees it)
        z = torch.zeros_like(y, requires_grad=True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(((z - lin(y)) ** 2).sum(), z, create_graph=True)
        return -(z - 0.5 * g)

    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    got = []
    for adj in (de.DirectAdjoint(),
                de.BacksolveAdjoint(rtol=1e-10, atol=1e-12, adjoint_params=list(lin.parameters()))):
        sol = de.solve(inner_opt, de.Tsit5(), 0.0, 1.0, y0, adjoint=adj, controller=de.PIDController(1e-10, 1e-12))
        got.append(torch.autograd.grad(sol.ys.sum(), [y0, lin.weight]))
    for d, b in zip(*got):
        torch.testing.assert_close(b, d, rtol=1e-7, atol=1e-10)
    # no adjoint_params: the check evaluates the field; its inner leaf is no false alarm (lin's tensors are)
    with pytest.raises(ValueError, match=r"depends on 2 tensor\(s\)"):
        de.solve(inner_opt, de.Tsit5(), 0.0, 1.0, y0, adjoint=de.BacksolveAdjoint())

    noisy = lambda t, y, args: -args * y + 0.0 * torch.rand_like(y)
    k = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    de.solve(noisy, de.Tsit5(), 0.0, 1.0, y0, args=k, adjoint=de.DirectAdjoint())
    after_direct = torch.rand(1)
    torch.manual_seed(0)
    de.solve(noisy, de.Tsit5(), 0.0, 1.0, y0, args=k, adjoint=de.BacksolveAdjoint())
    assert torch.equal(torch.rand(1), after_direct)  # the forward solves drew the same numbers

    class BNField(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm1d(2).double()

        def forward(self, t, y, args):
            return -self.bn(y)

    calls = []
    for adj in (de.DirectAdjoint(), de.BacksolveAdjoint()):
        f = BNField()
        de.solve(f, de.Euler(), 0.0, 1.0, y0, dt0=0.25, controller=de.ConstantStep(), adjoint=adj)
        calls.append(int(f.bn.num_batches_tracked))
    assert calls[0] == calls[1]  # the solve's own calls only


def test_backsolve_args_containers():
    """A namedtuple in args was rebuilt from a generator (TypeError); a dataclass's tensors were never searched,
    so an encoder feeding the field through it got no gradient."""
    import collections
    import dataclasses

    enc = torch.nn.Linear(2, 3).double()
    lin = torch.nn.Linear(3, 3).double()

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, t, y, args):
            return 0.1 * self.lin(y) + 0.01 * args.z

    NT = collections.namedtuple("NT", "z")
    x, y0 = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    grads = []
    for adj in (de.DirectAdjoint(), de.BacksolveAdjoint(rtol=1e-10, atol=1e-12)):
        sol = de.solve(Field(), de.Tsit5(), 0.0, 1.0, y0, args=NT(enc(x)), adjoint=adj,
                       controller=de.PIDController(1e-10, 1e-12))
        grads.append(torch.autograd.grad(sol.ys.sum(), [enc.weight, lin.weight]))
    for d, b in zip(*grads):
        torch.testing.assert_close(b, d, rtol=1e-7, atol=1e-10)

    @dataclasses.dataclass
    class DC:
        z: torch.Tensor

    with pytest.raises(ValueError, match=r"args holds a DC whose tensors \['z'\] require grad"):
        de.solve(Field(), de.Tsit5(), 0.0, 1.0, y0, args=DC(enc(x)), adjoint=de.BacksolveAdjoint())


def test_backsolve_module_fields_using_outside_tensors_raise():
    """A module whose forward reads a trainable tensor that is not its parameter (a global, a plain attribute)
    left it without gradient; the graph check covers module fields too, in eval mode (BatchNorm unmoved)."""
    scale = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2).double()
            self.bn = torch.nn.BatchNorm1d(2).double()

        def forward(self, t, y, args):
            return -scale * self.bn(self.lin(y))

    f = F()
    y0 = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"depends on 1 tensor\(s\) that require grad \(shape \(\)\)"):
        de.solve(f, de.Tsit5(), 0.0, 1.0, y0, adjoint=de.BacksolveAdjoint())
    assert int(f.bn.num_batches_tracked) == 0 and f.training and f.bn.training  # modes restored
    params = list(f.parameters()) + [scale]
    got = []
    for adj in (de.DirectAdjoint(), de.BacksolveAdjoint(rtol=1e-10, atol=1e-12, adjoint_params=params)):
        f.eval()  # (BatchNorm's batch statistics would differ between the adjoints' evaluations)
        sol = de.solve(f, de.Tsit5(), 0.0, 1.0, y0, adjoint=adj, controller=de.PIDController(1e-10, 1e-12))
        got.append(torch.autograd.grad(sol.ys.sum(), [scale]))
    torch.testing.assert_close(got[1][0], got[0][0], rtol=1e-6, atol=1e-9)
