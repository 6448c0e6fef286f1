"""torchsde-compatible sdeint / sdeint_adjoint."""

import math

import pytest
import torch

import torchmech.compat.torchsde as torchsde
import torchmech.de as de

DT = torch.float64


class GBM(torch.nn.Module):
    def __init__(self, sde_type="ito", noise_type="diagonal"):
        super().__init__()
        self.sde_type, self.noise_type = sde_type, noise_type
        self.mu = torch.nn.Parameter(torch.tensor(0.5, dtype=DT))
        self.sig = 0.4

    def f(self, t, y):
        return self.mu * y

    def g(self, t, y):
        return self.sig * y if self.noise_type == "diagonal" else (self.sig * y)[..., None]

    def h(self, t, y):
        return 0.0 * y


def test_sdeint_matches_closed_form_and_shapes():
    n = 500
    sde = GBM()
    y0 = torch.ones(n, 1, dtype=DT)
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    bm = de.BrownianInterval(0.0, 1.0, (n, 1), dtype=DT, seed=0)
    ys = torchsde.sdeint(sde, y0, ts, bm=bm, method="milstein", dt=5e-3)
    assert ys.shape == (3, n, 1)
    exact = torch.exp((0.5 - 0.08) * 1.0 + 0.4 * bm(0.0, 1.0))
    assert (ys[-1] - exact).abs().mean() < 5e-3
    torch.testing.assert_close(ys[0], y0)


def test_methods_and_noise_types_run():
    y0 = torch.ones(4, 2, dtype=DT)
    ts = torch.linspace(0, 1, 5, dtype=DT)
    for sde_type, methods in (("ito", ["euler", "milstein"]), ("stratonovich", ["heun", "midpoint", "euler_heun",
                                                                               "reversible_heun", "milstein"])):
        for m in methods:
            ys = torchsde.sdeint(GBM(sde_type), y0, ts, method=m, dt=0.05)
            assert ys.shape == (5, 4, 2) and torch.isfinite(ys).all()
    ys = torchsde.sdeint(GBM("ito", "scalar"), y0, ts, dt=0.05)
    assert ys.shape == (5, 4, 2)


def test_logqp_and_adjoint_gradients():
    sde = GBM()
    y0 = torch.ones(3, 1, dtype=DT)
    ts = torch.linspace(0, 1, 4, dtype=DT)
    bm = de.BrownianInterval(0.0, 1.0, (3, 1), dtype=DT, seed=1)
    ys, kl = torchsde.sdeint(sde, y0, ts, bm=bm, dt=0.01, logqp=True)
    assert ys.shape == (4, 3, 1) and kl.shape == (3, 3)
    # (f - h) / g = mu / sig constant: KL rate mu^2 / (2 sig^2) per unit time
    torch.testing.assert_close(kl, torch.full((3, 3), 0.25 / 0.32 / 3, dtype=DT))
    sde = GBM("stratonovich")
    grads = []
    for fn in (torchsde.sdeint, torchsde.sdeint_adjoint):
        ys = fn(sde, y0, ts, bm=bm, method="reversible_heun", dt=0.01) if fn is torchsde.sdeint else \
            fn(sde, y0, ts, bm=bm, method="reversible_heun", adjoint_method="adjoint_reversible_heun", dt=0.01)
        grads.append(torch.autograd.grad(ys.sum(), sde.mu)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=0)


def test_errors():
    y0 = torch.ones(2, 1, dtype=DT)
    ts = torch.linspace(0, 1, 3, dtype=DT)
    with pytest.raises(ValueError, match="solves ito SDEs"):
        torchsde.sdeint(GBM("stratonovich"), y0, ts, method="euler")
    with pytest.raises(ValueError, match="'milstein' supports noise_type 'diagonal', 'scalar' or 'additive'"):
        torchsde.sdeint(GBM("ito", "general"), y0, ts, method="milstein")
    with pytest.raises(ValueError, match="'srk' supports noise_type 'additive' \\(SRA1\\), 'diagonal' or 'scalar'"):
        torchsde.sdeint(GBM("ito", "general"), y0, ts, method="srk")
    with pytest.raises(ValueError, match="noise_type"):
        torchsde.sdeint(GBM("ito", "weird"), y0, ts)
    with pytest.raises(ValueError, match="midpoint.*solves stratonovich SDEs"):
        torchsde.sdeint(GBM("ito"), y0, ts, method="midpoint")
    with pytest.raises(ValueError, match="adaptive=True does not apply to method 'reversible_heun'"):
        torchsde.sdeint(GBM("stratonovich"), y0, ts, method="reversible_heun", adaptive=True)
    with pytest.raises(ValueError, match="bm.shape"):
        torchsde.sdeint(GBM(), y0, ts, bm=de.BrownianInterval(0.0, 1.0, (3, 1)))


def test_adaptive_sdeint_calls_f_and_g_with_a_scalar_time():
    """torchsde steps the batch together and passes a scalar t; with B == D a (B,) t would broadcast
    over the channels and silently give a different SDE."""
    seen = []

    class SDE(torch.nn.Module):
        noise_type, sde_type = "diagonal", "stratonovich"

        def f(self, t, y):
            seen.append(t.dim())
            return torch.cos(3 * t) * y * torch.tensor([1.0, -2.0], dtype=y.dtype)

        def g(self, t, y):
            seen.append(t.dim())
            return 0.3 * y

    y0 = torch.tensor([[1.0, 1.0], [2.0, 0.5]], dtype=torch.float64)
    ts = torch.linspace(0, 2, 3, dtype=torch.float64)
    bm = torchsde.BrownianInterval(0.0, 2.0, shape=(2, 2), dtype=torch.float64, seed=0)
    fixed = torchsde.sdeint(SDE(), y0, ts, bm=bm, method="midpoint", dt=1e-3)
    adaptive = torchsde.sdeint(SDE(), y0, ts, bm=bm, method="midpoint", dt=0.1, adaptive=True, rtol=1e-3,
                               atol=1e-3, dt_min=1e-6)
    assert set(seen) == {0}
    # (a (B,) time gave 1.26 instead of 1.79 for sample 0, channel 1 at t = 2)
    torch.testing.assert_close(adaptive, fixed, rtol=0, atol=2e-2)


# max_calls: 1.5x torchsde 0.2.6's drift calls on this problem at 1e-4 (2344, 871, 457)
@pytest.mark.parametrize("method,sde_type,max_calls", [("euler", "ito", 3500), ("milstein", "ito", 1300),
                                                       ("midpoint", "stratonovich", 700)])
def test_adaptive_sdeint_steps_by_step_doubling(method, sde_type, max_calls):
    """As torchsde: any method is adaptive, its error being one full step against two half steps. It converges
    to the fixed-step solution on the same Brownian path, and it needs far fewer vector-field calls than an
    embedded estimate against Euler-Maruyama (midpoint: 3090 calls at 1e-4, before)."""
    calls = [0]

    class SDE(torch.nn.Module):
        noise_type = "diagonal"

        def __init__(self):
            super().__init__()
            self.sde_type = sde_type

        def f(self, t, y):
            calls[0] += 1
            return torch.cos(3 * t) * y * torch.tensor([1.0, -2.0], dtype=y.dtype)

        def g(self, t, y):
            return 0.3 * y

    y0 = torch.tensor([[1.0, 1.0], [2.0, 0.5]], dtype=torch.float64)
    ts = torch.linspace(0, 2, 3, dtype=torch.float64)
    bm = torchsde.BrownianInterval(0.0, 2.0, shape=(2, 2), dtype=torch.float64, seed=0)
    fine = torchsde.sdeint(SDE(), y0, ts, bm=bm, method=method, dt=1e-3)
    errs = []
    for tol in (1e-2, 1e-4):
        calls[0] = 0
        ys = torchsde.sdeint(SDE(), y0, ts, bm=bm, method=method, dt=0.1, adaptive=True, rtol=tol, atol=tol,
                             dt_min=1e-6)
        errs.append(float((ys - fine).detach().abs().max()))  # (Milstein builds a graph for its g dg/dy)
    assert errs[1] < 0.5 * errs[0]  # (the fixed-step reference has its own error, ~3e-2 for Euler-Maruyama)
    assert calls[0] < max_calls


def test_torchsde_brownian_signatures_and_queries():
    """torchsde's constructor keywords and call: bm(ta, tb), bm(t), return_U / return_A."""
    DT = torch.float64
    bm = torchsde.BrownianInterval(t0=0.0, t1=2.0, size=(3, 2), dtype=DT, entropy=7,
                                   levy_area_approximation="space-time", dt=0.01, tol=1e-5, pool_size=16,
                                   halfway_tree=True)
    ref = de.BrownianInterval(0.0, 2.0, (3, 2), dtype=DT, seed=7, levy_area="space-time")
    assert isinstance(bm, de.BrownianInterval) and bm.shape == (3, 2) and bm.levy_area == "space-time"
    torch.testing.assert_close(bm(0.5, 1.25), ref.evaluate(0.5, 1.25), rtol=0, atol=0)  # same seed, same path
    torch.testing.assert_close(bm(1.25), bm(0.0, 1.25), rtol=0, atol=0)  # a point: W(t) - W(t0)
    # U = int_s^u (W_r - W_s) dr; for s < v < u: U_su = U_sv + U_vu + (u - v) W_sv (exact on this path)
    W_su, U_su = bm(0.25, 1.5, return_U=True)
    W_sv, U_sv = bm(0.25, 0.75, return_U=True)
    W_vu, U_vu = bm(0.75, 1.5, return_U=True)
    torch.testing.assert_close(W_su, W_sv + W_vu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(U_su, U_sv + U_vu + 0.75 * W_sv, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="return_A needs levy_area_approximation 'davie' or 'foster'"):
        bm(0.0, 1.0, return_A=True)
    davie = torchsde.BrownianInterval(0.0, 1.0, (3, 2), dtype=DT, levy_area_approximation="davie")
    W, U, A = davie(0.0, 0.5, return_U=True, return_A=True)
    assert U.shape == (3, 2) and A.shape == (3, 2, 2)
    torch.testing.assert_close(A, -A.transpose(-1, -2))
    # torchmech's own keywords still work; mixing both spellings is an error
    assert torchsde.BrownianInterval(0.0, 1.0, shape=(2, 1), seed=3).seed == 3
    with pytest.raises(ValueError, match="size or shape, not both"):
        torchsde.BrownianInterval(0.0, 1.0, size=(2, 1), shape=(2, 1))
    with pytest.raises(ValueError, match="size .* is required"):
        torchsde.BrownianInterval(0.0, 1.0)
    with pytest.raises(ValueError, match="levy_area_approximation must be one of"):
        torchsde.BrownianInterval(0.0, 1.0, (2, 1), levy_area_approximation="spacetime")
    with pytest.raises(ValueError, match="W/H"):
        torchsde.BrownianInterval(0.0, 1.0, (2, 1), W=torch.zeros(2, 1))


def test_torchsde_brownian_tree_and_path_start_at_w0_and_drive_sdeint():
    DT = torch.float64
    w0 = torch.full((4, 1), 3.0, dtype=DT)
    tree = torchsde.BrownianTree(t0=0.0, w0=w0, t1=1.0, tol=1e-7, entropy=1)
    assert isinstance(tree, de.VirtualBrownianTree) and tree.tol == 1e-7
    torch.testing.assert_close(tree(0.6), w0 + tree(0.0, 0.6), rtol=0, atol=1e-12)
    path = torchsde.BrownianPath(t0=0.0, w0=w0)
    assert path.t1 == 1.0  # as torchsde's: [t0, t0 + 1]
    torch.testing.assert_close(path(0.4), w0 + path(0.0, 0.4), rtol=0, atol=0)
    with pytest.raises(ValueError, match="w1"):
        torchsde.BrownianTree(0.0, w0, 1.0, w1=w0)
    with pytest.raises(TypeError, match="w0 must be a tensor"):
        torchsde.BrownianPath(0.0, (4, 1))

    class OU(torchsde.SDEIto):
        def __init__(self):
            super().__init__(noise_type="diagonal")

        def f(self, t, y):
            return -y

        def g(self, t, y):
            return 0.5 * torch.ones_like(y)

    y0 = torch.ones(4, 1, dtype=DT)
    ts = torch.linspace(0, 1, 3, dtype=DT)
    for bm in (tree, path):
        # y_1 = e^{-1} y0 + 0.5 int_0^1 e^{-(1-s)} dW_s, the integral summed over 4000 pieces of the same path
        ys = torchsde.sdeint(OU(), y0, ts, bm=bm, dt=1e-3)
        assert ys.shape == (3, 4, 1)
        grid = torch.linspace(0, 1, 4001, dtype=DT).tolist()
        integral = sum(math.exp(-(1 - 0.5 * (a + b))) * bm(a, b) for a, b in zip(grid[:-1], grid[1:]))
        exact = math.exp(-1.0) * y0 + 0.5 * integral
        torch.testing.assert_close(ys[-1], exact, rtol=0, atol=5e-3)
    assert OU().sde_type == "ito" and torchsde.SDEStratonovich("general").sde_type == "stratonovich"
    with pytest.raises(ValueError, match="noise_type must be one of"):
        torchsde.SDEIto("diag")


def test_torchsde_conventions_logqp_brownian_1d_area_and_attributes():
    """logqp takes torchsde's (B, d + 1) Brownian motion as well; a 1-D size's space-space area is 0 (a batch of
    scalar motions); torchsde's attribute names exist."""
    class S(torch.nn.Module):
        noise_type, sde_type = "diagonal", "ito"

        def f(self, t, y):
            return -y

        def g(self, t, y):
            return 0.5 + 0 * y

        def h(self, t, y):
            return 0 * y

    y0, ts = torch.ones(4, 2, dtype=torch.float64), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    wide = torchsde.BrownianInterval(0.0, 1.0, size=(4, 3), dtype=torch.float64, entropy=3)
    narrow = torchsde.BrownianInterval(0.0, 1.0, size=(4, 2), dtype=torch.float64, entropy=3)
    ys_w, kl_w = torchsde.sdeint(S(), y0, ts, bm=wide, dt=0.01, logqp=True)
    ys_n, kl_n = torchsde.sdeint(S(), y0, ts, bm=narrow, dt=0.01, logqp=True)
    assert ys_w.shape == ys_n.shape == (3, 4, 2) and kl_w.shape == kl_n.shape == (2, 4)
    assert bool(torch.isfinite(kl_w).all()) and bool((kl_w >= 0).all())
    with pytest.raises(ValueError, match=r"bm.shape must be \(4, 2\) \(or \(4, 3\) with logqp"):
        torchsde.sdeint(S(), y0, ts, bm=torchsde.BrownianInterval(0.0, 1.0, size=(4, 5)), dt=0.01, logqp=True)
    bm = torchsde.BrownianInterval(0.0, 1.0, size=(3,), entropy=1, levy_area_approximation="foster", dt=0.1,
                                   cache_size=0)
    W, A = bm(0.2, 0.5, return_A=True)
    assert A.shape == (3,) and bool((A == 0).all())
    assert bm.levy_area_approximation == "foster" and bm.entropy == 1 and bm.dt == 0.1
    assert torchsde.BrownianInterval(0.0, 1.0, size=(2, 2)).levy_area_approximation == "none"


@pytest.mark.parametrize("dt", [-0.1, 0.0, float("nan"), float("inf")])
def test_sdeint_rejects_a_bad_dt(dt):
    """dt <= 0 looped for ever building the step grid (as torchsde does); nan took one step per output interval."""
    with pytest.raises(ValueError, match="sdeint: dt must be a positive finite number"):
        torchsde.sdeint(GBM(), torch.ones(4, 1, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64),
                        dt=dt)


class _PlainOU:
    """torchsde accepts any object with f, g, sde_type and noise_type, not only an nn.Module."""

    sde_type, noise_type = "ito", "diagonal"

    def f(self, t, y):
        return -y

    def g(self, t, y):
        return 0.2 * torch.ones_like(y)


def test_sdeint_plain_object_single_time_and_tensor_dt():
    y0 = torch.ones(3, 2, dtype=DT)
    ts = torch.linspace(0, 1, 3, dtype=DT)
    bm = de.BrownianInterval(0.0, 1.0, (3, 2), dtype=DT, seed=0)
    a = torchsde.sdeint(_PlainOU(), y0, ts, bm=bm, dt=0.01)
    b = torchsde.sdeint(_PlainOU(), y0, ts, bm=bm, dt=torch.tensor(0.01, dtype=DT))
    assert a.shape == (3, 3, 2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # exact mean of the OU process over the noise-free part: the Ito-Euler steps stay near exp(-t)
    assert float((a[-1].mean() - math.exp(-1.0)).abs()) < 0.2
    one = torchsde.sdeint(_PlainOU(), y0, ts[:1], dt=0.01)
    assert one.shape == (1, 3, 2)
    torch.testing.assert_close(one[0], y0)
    one[0, 0, 0] = 5.0
    assert y0[0, 0] == 1.0  # a copy, not y0 itself
    with pytest.raises(ValueError, match="dt must be a positive finite number"):
        torchsde.sdeint(_PlainOU(), y0, ts, dt=torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize("noise", ["diagonal", "scalar"])
def test_torchsde_methods_and_defaults_per_noise_type(noise):
    """As torchsde: srk (SRI2 here) and milstein for diagonal and scalar noise, srk the Ito default and midpoint
    the Stratonovich one. Against the closed form of GBM on the same path, SRI2 is far more accurate than Euler."""
    from torchmech.de.solvers.sde import SRI2, StochasticMidpoint

    B = 200
    y0 = torch.ones(B, 1, dtype=DT)
    ts = torch.linspace(0, 1, 3, dtype=DT)
    bm = torchsde.BrownianInterval(0.0, 1.0, size=(B, 1), dtype=DT, levy_area_approximation="space-time", entropy=3)
    sde = GBM("ito", noise)
    ys, sol = torchsde.sdeint(sde, y0, ts, bm=bm, dt=1 / 64, extra=True)  # default method
    W = bm(0.0, 1.0)
    exact = torch.exp((0.5 - 0.4 ** 2 / 2) + 0.4 * W)
    err_srk = float((ys[-1] - exact).detach().abs().mean())
    err_mil = float((torchsde.sdeint(sde, y0, ts, bm=bm, dt=1 / 64, method="milstein")[-1] - exact).detach().abs().mean())
    err_eul = float((torchsde.sdeint(sde, y0, ts, bm=bm, dt=1 / 64, method="euler")[-1] - exact).detach().abs().mean())
    assert err_srk < 0.2 * err_mil < 0.2 * err_eul, (err_srk, err_mil, err_eul)
    from torchmech.compat.torchsde import _make_solver

    assert isinstance(_make_solver("srk", "ito", noise), SRI2)
    assert isinstance(_make_solver("midpoint", "stratonovich", noise), StochasticMidpoint)
    # a given Brownian motion without the Levy area: the default falls back to euler (torchsde would raise)
    plain = torchsde.BrownianInterval(0.0, 1.0, size=(B, 1), dtype=DT, entropy=3)
    torch.testing.assert_close(torchsde.sdeint(sde, y0, ts, bm=plain, dt=1 / 64),
                               torchsde.sdeint(sde, y0, ts, bm=plain, dt=1 / 64, method="euler"))


def test_logqp_with_the_default_srk_and_per_sample_end_times_with_sri2():
    """logqp pads the Brownian motion with a zero channel: its Levy area must be padded too (the default srk
    raised); SRI2 steps finished samples with h = 0 without 0/0 in the gradients."""
    B = 4
    y0 = torch.ones(B, 1, dtype=DT)
    ts = torch.linspace(0, 1, 3, dtype=DT)
    sde = GBM("ito")
    ys, kl = torchsde.sdeint(sde, y0, ts, dt=0.05, logqp=True)
    assert ys.shape == (3, B, 1) and kl.shape == (2, B) and bool(torch.isfinite(kl).all())
    bm = de.BrownianInterval(0.0, 1.0, (B, 1), dtype=DT, seed=0, levy_area="space-time")
    ys2, _ = torchsde.sdeint(sde, y0, ts, bm=bm, dt=0.05, logqp=True)
    torch.testing.assert_close(ys2, torchsde.sdeint(sde, y0, ts, bm=bm, dt=0.05, method="srk"))

    mu = torch.tensor(0.3, dtype=DT, requires_grad=True)
    terms = de.MultiTerm(de.ODETerm(lambda t, y, a: mu * y), de.DiagonalControlTerm(lambda t, y, a: 0.5 * y, bm))
    t1 = torch.tensor([1.0, 0.5, 0.75, 1.0], dtype=DT)
    sol = de.solve(terms, de.SRI2(), 0.0, t1, y0, dt0=0.125, saveat=de.SaveAt(t1=True))
    g = torch.autograd.grad(sol.ys[:, -1].sum(), mu)[0]
    parts = [de.solve(de.MultiTerm(terms.terms[0], de.DiagonalControlTerm(lambda t, y, a: 0.5 * y, bm)),
                      de.SRI2(), 0.0, float(t1[i]), y0, dt0=0.125, saveat=de.SaveAt(t1=True)).ys[i, -1].sum()
             for i in range(B)]
    torch.testing.assert_close(g, torch.autograd.grad(sum(parts), mu)[0])


def test_sri2_gradient_with_respect_to_per_sample_end_times():
    """Finished samples step with h = 0: sqrt(0) in the graph made the end-time gradients NaN."""
    B = 3
    bm = de.BrownianInterval(0.0, 1.0, (B, 1), dtype=DT, seed=2, levy_area="space-time")
    terms = de.MultiTerm(de.ODETerm(lambda t, y, a: 0.3 * y), de.DiagonalControlTerm(lambda t, y, a: 0.5 * y, bm))
    y0 = torch.ones(B, 1, dtype=DT)
    t1 = torch.tensor([1.0, 0.55, 0.3], dtype=DT, requires_grad=True)
    sol = de.solve(terms, de.SRI2(), 0.0, t1, y0, dt0=0.1, saveat=de.SaveAt(t1=True))
    g = torch.autograd.grad(sol.ys[:, -1].sum(), t1)[0]
    assert bool(torch.isfinite(g).all()), g
    # sample 1 alone over the same grid (all samples ending at 0.55): the same gradient
    t1s = torch.full((B,), 0.55, dtype=DT, requires_grad=True)
    gs = torch.autograd.grad(de.solve(terms, de.SRI2(), 0.0, t1s, y0, dt0=0.1, saveat=de.SaveAt(t1=True))
                             .ys[:, -1].sum(), t1s)[0]
    torch.testing.assert_close(g[1], gs[1])


def test_sdeint_adjoint_reversible_heun_with_logqp_is_exact():
    """As torchsde, logqp works with the reversible adjoint (it was refused); its gradients equal direct
    backpropagation through the same solve (the reversible adjoint is exact for the discretisation)."""

    class Posterior(torch.nn.Module):
        noise_type, sde_type = "diagonal", "stratonovich"

        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor(0.5, dtype=DT))
            self.b = torch.nn.Parameter(torch.tensor(0.3, dtype=DT))
            self.c = torch.nn.Parameter(torch.tensor(-0.2, dtype=DT))

        def f(self, t, y):
            return -self.a * y + self.c

        def h(self, t, y):
            return -self.a * y

        def g(self, t, y):
            return self.b * torch.cos(y) + 0.5

    sde = Posterior()
    y0 = torch.full((4, 2), 0.8, dtype=DT, requires_grad=True)
    ts = torch.linspace(0, 1, 5, dtype=DT)
    bm = de.BrownianInterval(0.0, 1.0, (4, 2), dtype=DT, seed=0)
    params = (y0, sde.a, sde.b, sde.c)
    ys, kl = torchsde.sdeint_adjoint(sde, y0, ts, bm=bm, method="reversible_heun", dt=0.01, logqp=True)
    g = torch.autograd.grad(ys.sum() + kl.sum(), params)
    ys2, kl2 = torchsde.sdeint(sde, y0, ts, bm=bm, method="reversible_heun", dt=0.01, logqp=True)
    g2 = torch.autograd.grad(ys2.sum() + kl2.sum(), params)
    torch.testing.assert_close(g, g2, rtol=1e-10, atol=1e-12)
