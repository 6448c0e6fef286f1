"""The lean shared-grid SDE loop equals the generic loop; reversible adjoint on both; bounded Brownian cache."""

import pytest
import torch

import torchmech.de as de
from torchmech.de import _fast_sde
from torchmech.de.solvers.sde import SRA1, EulerHeun, EulerMaruyama, Milstein, ReversibleHeun, StochasticHeun
from torchmech.de.terms import DiagonalControlTerm


class Net(torch.nn.Module):
    def __init__(self, d, out_act=None):
        super().__init__()
        self.lin = torch.nn.Linear(d + 1, d)
        self.out_act = out_act

    def forward(self, t, y, args):
        out = torch.tanh(self.lin(torch.cat([y, t[:, None].to(y.dtype)], -1)))
        return 0.3 * torch.sigmoid(out) if self.out_act else out


class TimeNoise(torch.nn.Module):
    """Additive noise: a learnable function of t alone."""

    def __init__(self, d):
        super().__init__()
        self.lin = torch.nn.Linear(1, d)

    def forward(self, t, y, args):
        return 0.3 * torch.sigmoid(self.lin(t[:, None].to(y.dtype)))


def _problem(dtype, n=5, d=3, seed=0, t1=1.0, additive=False):
    torch.manual_seed(seed)
    f = Net(d).to(dtype)
    g = (TimeNoise(d) if additive else Net(d, out_act=True)).to(dtype)
    bm = de.BrownianInterval(0.0, t1, (n, d), dtype=dtype, seed=seed + 1,
                             levy_area="space-time" if additive else None)
    terms = de.MultiTerm(de.ODETerm(f), DiagonalControlTerm(g, bm))
    y0 = torch.randn(n, d, dtype=dtype)
    return terms, y0, list(f.parameters()) + list(g.parameters())


@pytest.fixture
def generic(monkeypatch):
    """Context switch: inside, solves take the generic loop."""
    class Switch:
        def __enter__(self):
            monkeypatch.setattr(_fast_sde, "run", lambda integ, state, n: None)

        def __exit__(self, *exc):
            monkeypatch.undo()

    return Switch()


@pytest.fixture
def fast_calls(monkeypatch):
    calls = []
    real = _fast_sde.run

    def spy(integ, state, n):
        out = real(integ, state, n)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(_fast_sde, "run", spy)
    return calls


@pytest.mark.parametrize("solver", [EulerMaruyama(), ReversibleHeun(), StochasticHeun(), EulerHeun(), Milstein(),
                                    SRA1()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stepto", [False, True])
def test_fast_loop_equals_generic_values_and_gradients(solver, dtype, stepto, generic, fast_calls):
    terms, y0, params = _problem(dtype, additive=isinstance(solver, SRA1))
    ts = torch.tensor([0.0, 0.13, 0.5, 0.5, 0.77, 1.0], dtype=dtype)
    kw = dict(saveat=de.SaveAt(t0=True, ts=ts, t1=True))
    if stepto:
        kw["controller"] = de.StepTo(torch.tensor([0.0, 0.05, 0.2, 0.5, 0.61, 0.9, 1.0], dtype=dtype))
    else:
        kw["dt0"] = 0.07  # does not divide the interval: the last step is shortened
    outs = []
    for use_generic in (False, True):
        if use_generic:
            with generic:
                sol = de.solve(terms, solver, 0.0, 1.0, y0, **kw)
        else:
            sol = de.solve(terms, solver, 0.0, 1.0, y0, **kw)
        loss = (sol.ys ** 2).sum()
        outs.append((sol, torch.autograd.grad(loss, params)))
    assert fast_calls and all(fast_calls)
    (a, ga), (b, gb) = outs
    assert torch.equal(a.ys, b.ys) and torch.equal(a.ts, b.ts)
    for k in a.stats:
        assert torch.equal(a.stats[k], b.stats[k]), k
    assert torch.equal(a.status, b.status)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)


def test_nonfinite_falls_back_to_generic_statuses(generic):
    n, d = 4, 2
    bm = de.BrownianInterval(0.0, 1.0, (n, d), dtype=torch.float64, seed=0)
    scale = torch.tensor([1.0, 1.0, 1e200, 1.0], dtype=torch.float64)[:, None]
    terms = de.MultiTerm(de.ODETerm(lambda t, y, a: scale * y ** 3),
                         DiagonalControlTerm(lambda t, y, a: 0.1 * torch.ones_like(y), bm))
    y0 = torch.ones(n, d, dtype=torch.float64)
    sol = de.solve(terms, EulerMaruyama(), 0.0, 1.0, y0, dt0=0.1, throw=False)
    with generic:
        ref = de.solve(terms, EulerMaruyama(), 0.0, 1.0, y0, dt0=0.1, throw=False)
    assert sol.status.tolist() == ref.status.tolist()
    assert sol.status[2] == de.Status.NONFINITE and (sol.status[[0, 1, 3]] == de.Status.SUCCESS).all()
    torch.testing.assert_close(sol.ys, ref.ys, rtol=0, atol=0, equal_nan=True)


def test_per_sample_end_times_take_generic_loop(fast_calls):
    terms, y0, _ = _problem(torch.float64)
    t1 = torch.tensor([1.0, 0.5, 1.0, 0.75, 1.0], dtype=torch.float64)
    sol = de.solve(terms, EulerMaruyama(), 0.0, t1, y0, dt0=0.1)
    assert fast_calls == [False]
    torch.testing.assert_close(sol.t_final, t1)


@pytest.mark.parametrize("per_sample", [False, True])
def test_reversible_adjoint_matches_direct(per_sample, fast_calls):
    """Shared grid (lean loop) and per-sample end times (generic loop, steps inactive for some samples)."""
    terms, y0, params = _problem(torch.float64, n=4)
    y0 = y0.requires_grad_(True)
    t1 = torch.tensor([1.0, 0.6, 1.0, 0.8], dtype=torch.float64) if per_sample else 1.0
    ts = torch.tensor([0.0, 0.25, 0.6], dtype=torch.float64)
    saveat = de.SaveAt(ts=ts, t1=True)
    grads = []
    for adjoint in (de.DirectAdjoint(), de.ReversibleAdjoint()):
        sol = de.solve(terms, ReversibleHeun(), 0.0, t1, y0, dt0=0.05, saveat=saveat, adjoint=adjoint)
        loss = (sol.ys ** 2).sum() + sol.ys[..., 0].sum()
        grads.append(torch.autograd.grad(loss, [y0] + params))
    assert all(fast_calls) != per_sample
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("stepto", [False, True])
def test_backsolve_backward_solve_takes_the_fixed_grid_loop(stepto, generic, fast_calls):
    """The stochastic adjoint's backward segments on the forward grid (ConstantStep, or StepTo: one grid
    for all samples) run the lean loop, with records for the parameter quadrature: gradients as generic."""
    terms, y0, params = _problem(torch.float64)
    y0 = y0.requires_grad_(True)
    kw = dict(saveat=de.SaveAt(ts=torch.tensor([0.3, 0.6, 1.0], dtype=torch.float64)),
              adjoint=de.BacksolveAdjoint())
    if stepto:
        kw["controller"] = de.StepTo(torch.linspace(0, 1, 21, dtype=torch.float64) ** 1.5)
    else:
        kw["dt0"] = 0.05
    grads = []
    for use_generic in (False, True):
        fast_calls.clear()
        if use_generic:
            with generic:
                sol = de.solve(terms, StochasticHeun(), 0.0, 1.0, y0, **kw)
                grads.append(torch.autograd.grad((sol.ys ** 2).sum(), [y0] + params))
        else:
            sol = de.solve(terms, StochasticHeun(), 0.0, 1.0, y0, **kw)
            grads.append(torch.autograd.grad((sol.ys ** 2).sum(), [y0] + params))
            assert len(fast_calls) > 3 and all(fast_calls)  # the forward solve and the backward segments
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_reversible_adjoint_vector_field_without_parameters():
    bm = de.BrownianInterval(0.0, 1.0, (3, 2), dtype=torch.float64, seed=0)
    terms = de.MultiTerm(de.ODETerm(lambda t, y, a: torch.ones_like(y)),
                         DiagonalControlTerm(lambda t, y, a: 0.5 * torch.ones_like(y), bm))
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    sol = de.solve(terms, ReversibleHeun(), 0.0, 1.0, y0, dt0=0.1, adjoint=de.ReversibleAdjoint(adjoint_params=[]))
    (g,) = torch.autograd.grad(sol.ys.sum(), y0)
    torch.testing.assert_close(g, torch.ones_like(g))


def test_brownian_interval_bounded_cache_regenerates_identically():
    grid = torch.linspace(0, 1, 41, dtype=torch.float64).tolist()
    bm = de.BrownianInterval(0.0, 1.0, (6, 2), dtype=torch.float64, seed=4, cache_size=4)
    ref = de.BrownianInterval(0.0, 1.0, (6, 2), dtype=torch.float64, seed=4, cache_size=None)
    fw = [bm(a, b) for a, b in zip(grid[:-1], grid[1:])]
    fr = [ref(a, b) for a, b in zip(grid[:-1], grid[1:])]
    assert len(bm._cache) <= 4 and len(ref._cache) == 40
    for x, y in zip(fw, fr):
        assert torch.equal(x, y)
    # re-queried in reverse order (as a reversible backward pass does): evicted pieces regenerate exactly
    for (a, b), x in zip(reversed(list(zip(grid[:-1], grid[1:]))), reversed(fw)):
        assert torch.equal(bm(a, b), x)
    # a split of an evicted piece and the whole path
    torch.testing.assert_close(bm(0.0, 0.0125) + bm(0.0125, 0.025), fw[0], rtol=0, atol=1e-15)
    torch.testing.assert_close(bm(0.0, 1.0), torch.stack(fw).sum(0), rtol=0, atol=1e-13)


def test_brownian_interval_long_split_chain_is_pinned_and_consistent():
    grid = torch.linspace(0, 1, 101, dtype=torch.float64).tolist()
    bm = de.BrownianInterval(0.0, 1.0, (3, 1), dtype=torch.float64, seed=2, cache_size=4, levy_area="space-time")
    total = bm(0.0, 1.0, levy_area=True)  # one piece, then split 99 times in a chain
    fw = [bm(a, b, levy_area=True) for a, b in zip(grid[:-1], grid[1:])]
    assert 0 < len(bm._pinned) <= 2 * (100 // bm._PIN_EVERY)  # both children at every 16th level
    for (a, b), x in zip(reversed(list(zip(grid[:-1], grid[1:]))), reversed(fw)):
        y = bm(a, b, levy_area=True)
        assert torch.equal(y.W, x.W) and torch.equal(y.H, x.H)
    torch.testing.assert_close(sum(x.W for x in fw), total.W, rtol=0, atol=1e-13)


def test_brownian_interval_cache_size_checked():
    with pytest.raises(ValueError, match="cache_size"):
        de.BrownianInterval(0.0, 1.0, (2,), cache_size=1)


@pytest.mark.parametrize("levy", [None, "space-time"])
def test_virtual_tree_path_reuse_matches_fresh_trees(levy):
    grid = torch.linspace(0, 1, 51, dtype=torch.float64).tolist()
    bm = de.VirtualBrownianTree(0.0, 1.0, (4, 2), tol=1e-4, dtype=torch.float64, seed=9, levy_area=levy)
    for a, b in list(zip(grid[:-1], grid[1:]))[::7] + [(0.3, 0.9), (0.05, 0.06)]:
        got = bm(a, b, levy_area=bool(levy))
        fresh = de.VirtualBrownianTree(0.0, 1.0, (4, 2), tol=1e-4, dtype=torch.float64, seed=9,
                                       levy_area=levy)(a, b, levy_area=bool(levy))
        if levy:
            assert torch.equal(got.W, fresh.W) and torch.equal(got.H, fresh.H)
        else:
            assert torch.equal(got, fresh)
    assert len(bm._path) <= bm.depth + 1


def test_virtual_tree_float32_is_the_float64_path_rounded():
    b64 = de.VirtualBrownianTree(0.0, 1.0, (3, 2), tol=1e-4, dtype=torch.float64, seed=1)
    b32 = de.VirtualBrownianTree(0.0, 1.0, (3, 2), tol=1e-4, dtype=torch.float32, seed=1)
    for a, b in [(0.0, 0.1), (0.1, 0.35), (0.7, 1.0)]:
        assert torch.equal(b32(a, b), b64(a, b).float())
