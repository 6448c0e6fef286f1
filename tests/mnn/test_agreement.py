"""Every backend agrees with the dense reference solve, values and gradients."""

import itertools

import pytest
import torch

from torchmech.mnn import solve_linear_ode

f64 = torch.float64


def random_problem(seed, B=(2,), T=7, E=1, D=1, K=3, T0=1, K0=2, time_invariant=False, const_step=False,
                   requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    Tc = 1 if time_invariant else T
    coeff = torch.randn(*B, Tc, E, D, K, generator=g, dtype=f64)
    rhs = torch.randn(*B, Tc, E, generator=g, dtype=f64)
    init = torch.randn(*B, T0, D, K0, generator=g, dtype=f64)
    steps = 0.05 + 0.2 * torch.rand(*B, 1 if const_step else T - 1, generator=g, dtype=f64)
    out = [coeff, rhs, init, steps]
    if requires_grad:
        out = [x.requires_grad_() for x in out]
    return out


CASES = [
    dict(),
    dict(K=2),  # first order
    dict(K=4, K0=3),
    dict(D=3, E=2),
    dict(D=2, E=3, K=2, K0=1),
    dict(T0=0, K0=0),
    dict(T0=3, K0=1),
    dict(T=2),
    dict(T=8),
    dict(T=33, D=2, E=2),
    dict(B=(), T=9),
    dict(B=(2, 3), T=6),
    dict(time_invariant=True),
    dict(const_step=True, time_invariant=True, D=2, E=2),
]


@pytest.mark.parametrize("method", ["banded", "parallel", "lapack", "native", "auto"])
@pytest.mark.parametrize("central", [True, False])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_dense(method, central, case):
    args = random_problem(case, **CASES[case])
    kw = dict(central=central, weight_equation=1.3, weight_init=2.0, weight_smooth=0.7)
    if CASES[case].get("const_step") and CASES[case].get("time_invariant"):
        kw["num_points"] = CASES[case].get("T", 7)
    ref = solve_linear_ode(*args, method="dense", **kw)
    got = solve_linear_ode(*args, method=method, **kw)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item())


@pytest.mark.parametrize("method", ["banded", "parallel", "lapack", "native"])
@pytest.mark.parametrize("T", [5, 12])
def test_slack_matches_dense(method, T):
    args = random_problem(T, T=T, D=2, E=2)
    ref = solve_linear_ode(*args, slack=0.3, method="dense")
    got = solve_linear_ode(*args, slack=0.3, method=method)
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item())


def test_batch_broadcasting_matches_per_sample():
    coeff, rhs, init, steps = random_problem(3, B=(4,), T=10)
    shared_coeff = coeff[:1]  # broadcast over the batch
    u = solve_linear_ode(shared_coeff, rhs, init, steps)
    for b in range(4):
        ub = solve_linear_ode(coeff[0], rhs[b], init[b], steps[b], method="dense")
        assert torch.allclose(u[b], ub, rtol=1e-9, atol=1e-10)


def test_num_points_for_fully_time_invariant_input():
    coeff, rhs, init, steps = random_problem(1, T=6, time_invariant=True, const_step=True)
    u = solve_linear_ode(coeff, rhs, init, steps, num_points=6)
    assert u.shape[-3] == 6
    ref = solve_linear_ode(coeff, rhs, init, steps.expand(2, 5), method="dense")
    assert torch.allclose(u, ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("method", ["banded", "parallel", "lapack", "native"])
@pytest.mark.parametrize("case", [dict(T=5), dict(T=4, D=2, E=2, K=2, K0=1), dict(T=6, T0=2, K=4, K0=2)])
@pytest.mark.parametrize("slack", [None, 0.5])
def test_gradients_match_dense(method, case, slack):
    args = random_problem(11, requires_grad=True, **case)
    weights = [torch.tensor(w, dtype=f64, requires_grad=True) for w in (1.2, 0.8, 1.5)]
    kw = dict(weight_equation=weights[0], weight_init=weights[1], weight_smooth=weights[2], slack=slack)
    probe = torch.randn(solve_linear_ode(*args, method="dense", **kw).shape, dtype=f64,
                        generator=torch.Generator().manual_seed(0))
    grads = {}
    for m in ("dense", method):
        loss = (solve_linear_ode(*args, method=m, **kw) * probe).sum()
        grads[m] = torch.autograd.grad(loss, args + weights)
    for a, b in zip(grads["dense"], grads[method]):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-9 * a.abs().max().item())


@pytest.mark.parametrize("method", ["dense", "banded", "parallel", "lapack", "native"])
@pytest.mark.parametrize("slack", [None, 0.4])
def test_gradcheck(method, slack):
    coeff, rhs, init, steps = random_problem(5, B=(2,), T=5, D=2, E=2, K=3, requires_grad=True)
    w = torch.tensor(1.1, dtype=f64, requires_grad=True)

    def fn(c, r, i, s, w):
        return solve_linear_ode(c, r, i, s, weight_smooth=w, slack=slack, method=method)

    assert torch.autograd.gradcheck(fn, (coeff, rhs, init, steps, w))


@pytest.mark.parametrize("method", ["banded", "parallel", "lapack", "native"])
def test_double_backward_not_required_but_reentrant(method):
    # Two forward calls before any backward: each must keep its own factorisation.
    a = random_problem(1, T=6, requires_grad=True)
    b = random_problem(2, T=6, requires_grad=True)
    ua = solve_linear_ode(*a, method=method)
    ub = solve_linear_ode(*b, method=method)
    ga = torch.autograd.grad(ua.square().sum(), a)
    gb = torch.autograd.grad(ub.square().sum(), b)
    ra = torch.autograd.grad(solve_linear_ode(*a, method="dense").square().sum(), a)
    rb = torch.autograd.grad(solve_linear_ode(*b, method="dense").square().sum(), b)
    for x, y in itertools.chain(zip(ga, ra), zip(gb, rb)):
        assert torch.allclose(x, y, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", ["banded", "parallel", "lapack", "native"])
def test_create_graph_gives_first_derivatives_and_refuses_second_ones(method):
    """A second derivative through the implicit backward is not implemented: it must raise, not be dropped."""
    c, r, i, s = random_problem(3, T=6, requires_grad=True)
    first = {}
    for m in ("dense", method):
        loss = solve_linear_ode(c, r, i, s, method=m).square().sum() + (c ** 3).sum()
        first[m] = torch.autograd.grad(loss, c, create_graph=True)[0]
    assert torch.allclose(first[method], first["dense"], rtol=1e-8, atol=1e-10)
    assert torch.autograd.grad(first["dense"].sum(), c)[0].abs().sum() > 0
    with pytest.raises(RuntimeError, match="second derivatives through solve_linear_ode are not implemented"):
        torch.autograd.grad(first[method].sum(), c)


@pytest.mark.parametrize("method", ["banded", "parallel", "lapack", "native"])
def test_second_derivative_through_the_incoming_gradient_raises(method):
    """theta reaches dL/drhs only through grad_u = theta (L = sum(u theta) + ...): differentiating dL/drhs for
    theta needs the solver's part J^T 1. It used to be dropped silently (only the direct term came back)."""
    c, r, i, s = random_problem(4, T=6)
    r = r.clone().requires_grad_(True)
    theta = torch.randn(c.shape[:-4] + (6, c.shape[-2], c.shape[-1]), dtype=r.dtype, requires_grad=True)
    loss = (solve_linear_ode(c, r, i, s, method=method) * theta).sum() + (r[..., 0] * theta[..., 0, 0]).sum()
    g = torch.autograd.grad(loss, r, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="second derivatives through solve_linear_ode are not implemented"):
        torch.autograd.grad(g.sum(), theta)


@pytest.mark.parametrize("method", ["banded", "parallel", "lapack", "native"])
def test_in_place_edit_of_the_result_keeps_gradients(method):
    """The result used to be a view of the solver's own output in float64: u[..., 0].clamp_(...) raised."""
    grads = {}
    for m in ("dense", method):
        c, r, i, s = random_problem(5, T=6, requires_grad=True)
        u = solve_linear_ode(c, r, i, s, method=m)
        u[..., 0].clamp_(min=0.0)
        (u.square() * torch.arange(u.numel(), dtype=f64).reshape(u.shape)).sum().backward()
        grads[m] = c.grad
    torch.testing.assert_close(grads[method], grads["dense"], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("slack", [None, 0.5])
def test_float32_dense_gradients_match_float64(slack):
    """The dense reference solves float32 in float64: values and gradients are the float64 ones, rounded."""
    a64 = random_problem(3, T=9, requires_grad=True)
    a32 = [x.detach().float().requires_grad_() for x in a64]
    w = torch.randn(2, 9, 1, 3, generator=torch.Generator().manual_seed(1), dtype=f64)
    u64 = solve_linear_ode(*a64, method="dense", slack=slack)
    u32 = solve_linear_ode(*a32, method="dense", slack=slack)
    assert u32.dtype == torch.float32
    assert torch.allclose(u32.double(), u64, rtol=1e-6, atol=1e-6 * u64.abs().max().item())
    (u64 * w).sum().backward()
    (u32 * w.float()).sum().backward()
    for x32, x64 in zip(a32, a64):
        assert x32.grad.dtype == torch.float32
        assert torch.allclose(x32.grad.double(), x64.grad, rtol=1e-5, atol=1e-5 * x64.grad.abs().max().item())


@pytest.mark.parametrize("method", ["banded", "parallel", "lapack", "native"])
@pytest.mark.parametrize("layout", ["per_sample", "shared", "two_axes", "slack"])
def test_batch_chunking_matches_one_piece(monkeypatch, method, layout):
    """CPU batch chunking (forced small here) gives the unchunked values and gradients, with inputs that are
    per-sample, shared along the chunked axis, or broadcast from fewer batch axes."""
    import torchmech.mnn.solve as solve_mod

    B0 = 17 if method == "native" else 7  # the C sweep chunks in whole groups of 8 lanes: 8 + 8 + 1
    B = (B0, 2) if layout == "two_axes" else (B0,)
    args = random_problem(11, B=B, T=9, D=2, E=2)
    kw = dict(weight_smooth=torch.rand(*B, generator=torch.Generator().manual_seed(2), dtype=f64) + 0.5)
    if layout == "shared":
        args[0], args[2] = args[0][:1], args[2][:1]  # size-1 batch axis: broadcast over the chunked axis
        kw["weight_init"] = torch.tensor(1.5, dtype=f64)
    if layout == "two_axes":
        args[1] = args[1][0]  # rhs without the leading batch axis
        kw["weight_equation"] = torch.full((2,), 1.2, dtype=f64)
    if layout == "slack":
        kw["slack"] = torch.full(B, 0.3, dtype=f64)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(*B, 9, 2, 3, generator=g, dtype=f64)
    results = []
    for target in (solve_mod._CHUNK_TARGET, 2 * 9 * 36):  # one piece; then chunks of 2 samples (4 chunks)
        monkeypatch.setattr(solve_mod, "_CHUNK_TARGET", target)
        monkeypatch.setattr(solve_mod, "_BANDED_MIN_CHUNK", 1)
        xs = [a.detach().clone().requires_grad_() for a in args]
        ks = {k: v.detach().clone().requires_grad_() for k, v in kw.items()}
        p = solve_mod.prepare(*xs, **ks)
        results.append((solve_mod._chunk_size(p, method), *_solve_and_grads(xs, ks, w, method)))
    (c0, u0, g0), (c1, u1, g1) = results
    assert c0 is None and c1 == (8 if method == "native" else 1 if layout == "two_axes" else 2)
    assert torch.allclose(u1, u0, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g0):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def _solve_and_grads(xs, ks, w, method):
    u = solve_linear_ode(*xs, method=method, **ks)
    leaves = xs + list(ks.values())
    grads = torch.autograd.grad((u * w).sum(), leaves)
    return u.detach(), grads


def test_chunk_size_rules():
    """Chunks only on CPU, only with >= 2 chunks, for the banded sweep only with >= 64 samples each, for the C sweep
    in multiples of 8 samples."""
    import torchmech.mnn.solve as solve_mod

    def p(B, T):
        return solve_mod.prepare(torch.zeros(*B, 1, 1, 1, 3, dtype=f64), torch.zeros(1, 1, dtype=f64),
                                 torch.zeros(1, 1, 2, dtype=f64), torch.full((T - 1,), 0.1, dtype=f64))

    assert solve_mod._chunk_size(p((64,), 1000), "parallel") is None  # one chunk would hold the batch
    assert solve_mod._chunk_size(p((1024,), 1000), "parallel") == 131
    assert solve_mod._chunk_size(p((1024,), 1000), "banded") == 131
    assert solve_mod._chunk_size(p((64,), 10000), "parallel") == 13
    assert solve_mod._chunk_size(p((64,), 10000), "banded") is None
    assert solve_mod._chunk_size(p((), 100000), "parallel") is None
    assert solve_mod._chunk_size(p((1, 1024), 1000), "parallel") is None  # leading axis of size 1
    assert solve_mod._chunk_size(p((1024,), 1000), "native") == 128  # whole groups of the C sweep's 8 lanes
    assert solve_mod._chunk_size(p((64,), 10000), "native") == 8
    assert solve_mod._chunk_size(p((12,), 100000), "native") is None  # one group of 8 and a partial one


@pytest.mark.parametrize("method", ["banded", "parallel", "lapack", "native"])
@pytest.mark.parametrize("slack", [False, True])
def test_backward_refactorisation_matches_kept_factor(monkeypatch, method, slack):
    """Past the memory budget the backward factorises again instead of keeping the forward's factor: same
    gradients, and two forward calls before one backward still give each call's own gradients."""
    import torchmech.mnn.solve as solve_mod

    args = random_problem(21, B=(5,), T=40, D=2, E=1)
    kw = {"slack": torch.full((5,), 0.3, dtype=f64)} if slack else {}
    w = torch.randn(5, 40, 2, 3, generator=torch.Generator().manual_seed(3), dtype=f64)
    results = []
    for budget in (solve_mod._KEEP_FACTOR_BYTES, 0):
        monkeypatch.setattr(solve_mod, "_KEEP_FACTOR_BYTES", budget)
        xs = [a.detach().clone().requires_grad_() for a in args]
        ks = {k: v.detach().clone().requires_grad_() for k, v in kw.items()}
        assert solve_mod._keep_factor(solve_mod.prepare(*xs, **ks)) == (budget > 0)
        results.append(_solve_and_grads(xs, ks, w, method))
        # re-entrant: a second, different solve between the first one's forward and backward
        xs2 = [a.detach().clone().requires_grad_() for a in args]
        u1 = solve_linear_ode(*xs2, method=method, **kw)
        u2 = solve_linear_ode(*[x * 1.1 for x in xs2[:2]], *xs2[2:], method=method, **kw)
        g_both = torch.autograd.grad((u1 * w).sum(), xs2)
        torch.autograd.grad(u2.sum(), xs2)
        for a, b in zip(g_both, results[-1][1]):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    (u0, g0), (u1, g1) = results
    assert torch.equal(u0, u1)
    for a, b in zip(g1, g0):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_keep_factor_budget_rule():
    import torchmech.mnn.solve as solve_mod

    def p(B, T):
        c = torch.zeros(B, 1, 1, 1, 3, dtype=f64, requires_grad=True)
        return solve_mod.prepare(c, torch.zeros(1, 1, dtype=f64), torch.zeros(1, 1, 2, dtype=f64),
                                 torch.full((T - 1,), 0.1, dtype=f64))

    assert solve_mod._keep_factor(p(1024, 1000))  # ~0.5 GB of factors: kept
    assert not solve_mod._keep_factor(p(1024, 10000))  # ~4.6 GB: recomputed in backward
    with torch.no_grad():
        assert solve_mod._keep_factor(p(1024, 10000))  # no backward, nothing to keep


@pytest.mark.parametrize("method", ["dense", "banded", "parallel", "lapack", "native"])
def test_empty_batch(method):
    c, r, i, s = random_problem(0, B=(0,), T=6, requires_grad=True)
    u = solve_linear_ode(c, r, i, s, method=method)
    assert u.shape == (0, 6, 1, 3)
    grads = torch.autograd.grad(u.sum(), (c, r, i, s), allow_unused=True)
    assert all(g is None or g.shape == x.shape for g, x in zip(grads, (c, r, i, s)))


@pytest.mark.parametrize("method", ["banded", "parallel", "lapack", "native"])
def test_empty_inner_batch_axis_and_inference_mode(method):
    """Batch (2, 0) divided by zero in the CPU chunking; a first solve under inference_mode cached an inference
    tensor that broke every later backward in the process."""
    from torchmech.mnn import system

    c, r, i, s = random_problem(6, B=(2, 0), T=7)
    assert solve_linear_ode(c, r, i, s, method=method).shape == (2, 0, 7, 1, 3)
    system._TAYLOR_CONST.clear()
    with torch.inference_mode():
        solve_linear_ode(*random_problem(7, T=7), method=method)
    xs = random_problem(8, T=7, requires_grad=True)
    torch.autograd.grad(solve_linear_ode(*xs, method=method).sum(), xs)


@pytest.mark.parametrize("method", ["banded", "parallel", "lapack", "native", "auto"])
@pytest.mark.parametrize("learnable", ["weight_init", "init"])
def test_backward_when_only_unused_inputs_require_grad(method, learnable):
    """No initial rows (T0 = 0): weight_init and init reach no row. With only those learnable the backward crashed
    (its objective had no graph); their gradients are None, as with the dense reference, and other leaves of the
    loss still get theirs."""
    c, r, i, s = random_problem(9, T=6, T0=0, K0=0)
    wi = torch.tensor(1.5, dtype=f64)
    if learnable == "weight_init":
        wi.requires_grad_()
        leaf = wi
    else:
        i.requires_grad_()
        leaf = i
    other = torch.tensor(2.0, dtype=f64, requires_grad=True)
    u = solve_linear_ode(c, r, i, s, weight_init=wi, method=method)
    (u.square().mean() + other ** 2).backward()
    assert leaf.grad is None or torch.count_nonzero(leaf.grad) == 0
    assert other.grad == 4.0
    torch.testing.assert_close(u, solve_linear_ode(c, r, i, s, weight_init=wi.detach(), method="dense"),
                               rtol=1e-9, atol=1e-9)


_GRAD_CASES = [
    dict(),
    dict(K=2),
    dict(K=4, K0=3),
    dict(K=5, K0=1, T=9),
    dict(D=3, E=2),
    dict(T0=0, K0=0),
    dict(T0=3, K0=1),
    dict(T=2),
    dict(T=3),
    dict(B=(), T=9),
    dict(B=(2, 3), T=6),
    dict(time_invariant=True),
    dict(const_step=True),
    dict(const_step=True, time_invariant=True, D=2, E=2),
]


@pytest.mark.parametrize("central", [True, False])
@pytest.mark.parametrize("slack", [None, 0.3])
@pytest.mark.parametrize("weights", ["floats", "per-sample", "one-element"])
@pytest.mark.parametrize("case", range(len(_GRAD_CASES)))
@pytest.mark.parametrize("impl", ["torch", "c"])
def test_written_out_gradients_match_autograd_through_the_objective(impl, case, weights, slack, central):
    # the implicit backward's closed form (objective_cross_grads) against autograd through objective_cross,
    # with the inputs at their own (broadcast) shapes
    from torchmech.mnn.linalg import native
    from torchmech.mnn.system import objective_cross, objective_cross_grads, prepare

    cfg = _GRAD_CASES[case]
    args = random_problem(100 + case, **cfg)
    bs = args[0].shape[:-4]
    g = torch.Generator().manual_seed(case)
    if weights == "floats":
        w = [1.3, 0.6, 1.7]
    elif weights == "per-sample":
        w = [0.5 + torch.rand(bs, generator=g, dtype=f64) for _ in range(3)]
    else:
        w = [0.5 + torch.rand(1, generator=g, dtype=f64) for _ in range(3)]
    s = None if slack is None else (slack if weights == "floats" else 0.1 + torch.rand(bs, generator=g, dtype=f64))
    num = cfg.get("T", 7) if cfg.get("const_step") and cfg.get("time_invariant") else None
    p = prepare(*args, weight_equation=w[0], weight_init=w[1], weight_smooth=w[2], central=central, slack=s,
                num_points=num)
    T, D, K = p.T, p.D, p.K
    full = p.batch_shape + (T, D, K)
    lam, u = torch.randn(full, generator=g, dtype=f64), torch.randn(full, generator=g, dtype=f64)
    lam_eps = eps = None
    if s is not None:
        lam_eps, eps = torch.randn(p.batch_shape, generator=g, dtype=f64), torch.randn(p.batch_shape, generator=g,
                                                                                        dtype=f64)
    leaves = [t.detach().clone().requires_grad_() for t in p.tensors()]
    q = p.with_tensors(leaves)
    phi = objective_cross(q, lam, lam_eps, u, eps)
    ref = torch.autograd.grad(-phi, leaves, allow_unused=True)
    grads = objective_cross_grads if impl == "torch" else native.objective_grads
    got = grads(p, lam, lam_eps, u, eps, [True] * len(leaves))
    for name, a, b, t in zip(["coefficients", "rhs", "init", "steps", "weight_equation", "weight_init",
                              "weight_smooth", "slack"], ref, got, p.tensors()):
        if a is None:  # reaches no row (init, weight_init without initial rows)
            assert b is None or not b.any(), name
            continue
        assert b is not None and b.shape == t.shape, name
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10 * max(1.0, a.abs().max().item()), msg=name)
    # only what is asked for is computed
    some = grads(p, lam, lam_eps, u, eps, [False, True] + [False] * (len(leaves) - 2))
    assert some[0] is None and some[1] is not None and all(x is None for x in some[2:])
