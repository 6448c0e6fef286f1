"""Controlled differential equations: cdeint against closed forms, adjoint gradients, ControlTerm."""

import pytest
import torch

import torchmech.de as de
from torchmech.de.cde import cdeint

DT = torch.float64


class Linear(torch.nn.Module):
    """func(t, z) = A (constant), hidden 2, channels 3."""

    def __init__(self):
        super().__init__()
        self.A = torch.nn.Parameter(torch.tensor([[1.0, -0.5, 0.2], [0.3, 0.0, 2.0]], dtype=DT))

    def forward(self, t, z):
        return self.A.expand(z.shape[0], 2, 3)


class Rot(torch.nn.Module):
    """dz = [[0, -z1], [z0, 0]] dX for a scalar channel: rotation by X(t) - X(t0) (exact)."""

    def forward(self, t, z):
        return torch.stack([-z[:, 1], z[:, 0]], dim=-1)[..., None]


def test_constant_field_is_exact_for_any_interpolation():
    ts = torch.tensor([0.0, 0.4, 1.1, 2.0, 2.5], dtype=DT)
    x = torch.randn(3, 5, 3, dtype=DT)
    z0 = torch.randn(3, 2, dtype=DT)
    func = Linear()
    for cls in (de.LinearInterpolation, de.CubicHermiteInterpolation, de.NaturalCubicSpline):
        X = cls(ts, x)
        out = cdeint(X, func, z0, ts, adjoint=False, rtol=1e-9, atol=1e-11)
        expected = z0[:, None] + (x - x[:, :1]) @ func.A.detach().T
        torch.testing.assert_close(out, expected, rtol=1e-7, atol=1e-8)


def test_rotation_closed_form_and_fixed_step():
    ts = torch.linspace(0, 3, 31, dtype=DT)
    x = torch.sin(ts)[None, :, None].expand(2, -1, -1) * torch.tensor([1.0, 2.0], dtype=DT)[:, None, None]
    X = de.NaturalCubicSpline(ts, x)
    z0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=DT)
    out = cdeint(X, Rot(), z0, ts, adjoint=False, rtol=1e-10, atol=1e-12)
    ang = x[..., 0] - x[:, :1, 0]
    expected = torch.stack([z0[:, None, 0] * torch.cos(ang) - z0[:, None, 1] * torch.sin(ang),
                            z0[:, None, 0] * torch.sin(ang) + z0[:, None, 1] * torch.cos(ang)], dim=-1)
    torch.testing.assert_close(out, expected, rtol=1e-7, atol=1e-7)
    fixed = cdeint(X, Rot(), z0, ts, adjoint=False, method="rk4", options={"step_size": 0.05})
    torch.testing.assert_close(fixed, expected, rtol=1e-4, atol=1e-4)


def test_adjoint_gradients_match_direct_including_data():
    torch.manual_seed(0)
    ts = torch.linspace(0, 1, 8, dtype=DT)
    x = torch.randn(4, 8, 2, dtype=DT, requires_grad=True)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 6)).double()

    def func(t, z):
        return net(z).reshape(z.shape[0], 3, 2)

    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, t, z):
            return func(t, z)

    z0 = torch.randn(4, 3, dtype=DT)
    grads = []
    for adjoint in (False, True):
        X = de.CubicHermiteInterpolation(ts, x)
        out = cdeint(X, F(), z0, ts[[0, 3, 7]], adjoint=adjoint, rtol=1e-9, atol=1e-10)
        loss = (out ** 2).sum()
        grads.append(torch.autograd.grad(loss, [x] + list(net.parameters())))
    for a, b in zip(*grads):
        # the backward solve's own error, on the gradient's scale (platforms differ in the last bits of the steps)
        torch.testing.assert_close(b, a, rtol=0, atol=2e-6 * float(a.abs().max()))


def test_control_term_with_linear_interpolation_is_exact_at_knots():
    ts = torch.tensor([0.0, 0.5, 1.5, 2.0], dtype=DT)
    x = torch.randn(2, 4, 3, dtype=DT)
    X = de.LinearInterpolation(ts, x)
    A = torch.randn(2, 3, dtype=DT)
    term = de.ControlTerm(lambda t, y, a: A.expand(y.shape[0], 2, 3), X)
    sol = de.solve(term, de.Euler(), 0.0, 2.0, torch.zeros(2, 2, dtype=DT), controller=de.StepTo(ts),
                   saveat=de.SaveAt(t1=True))
    torch.testing.assert_close(sol.ys[:, -1], (x[:, -1] - x[:, 0]) @ A.T)


def test_errors():
    ts = torch.linspace(0, 1, 4, dtype=DT)
    X = de.LinearInterpolation(ts, torch.randn(2, 4, 3, dtype=DT))
    with pytest.raises(ValueError, match="z0"):
        cdeint(X, Rot(), torch.zeros(2, dtype=DT), ts)
    with pytest.raises(ValueError, match="interval"):
        cdeint(X, Rot(), torch.zeros(2, 2, dtype=DT), torch.tensor([0.0, 2.0], dtype=DT))
    with pytest.raises(ValueError, match="input_channels"):
        cdeint(X, Rot(), torch.zeros(2, 2, dtype=DT), ts, adjoint=False)
    with pytest.raises(ValueError, match="method"):
        cdeint(X, Rot(), torch.zeros(2, 2, dtype=DT), ts, method="nope")
    with pytest.raises(TypeError, match="X must be"):
        cdeint(torch.zeros(3), Rot(), torch.zeros(2, 2, dtype=DT), ts)


def test_torchcde_compat_roundtrip():
    import torchmech.compat.torchcde as torchcde

    ts = torch.linspace(0, 1, 6, dtype=DT)
    x = torch.randn(2, 6, 3, dtype=DT)
    X = torchcde.CubicSpline(torchcde.natural_cubic_coeffs(x, ts), ts)
    ref = de.NaturalCubicSpline(ts, x)
    torch.testing.assert_close(X.evaluate(0.37), ref.evaluate(0.37))
    x[0, 2, 1] = float("nan")  # (missing values: natural_cubic_coeffs differs on purpose, see the test below)
    Xh = torchcde.CubicSpline(torchcde.hermite_cubic_coefficients_with_backward_differences(x, ts), ts)
    torch.testing.assert_close(Xh.derivative(0.61), de.CubicHermiteInterpolation(ts, x).derivative(0.61))
    Xl = torchcde.LinearInterpolation(torchcde.linear_interpolation_coeffs(x, ts), ts)
    z0 = torch.zeros(2, 2, dtype=DT)
    out = torchcde.cdeint(X=Xl, func=Linear(), z0=z0, t=torch.tensor(Xl.interval, dtype=DT), adjoint=False)
    assert out.shape == (2, 2, 2)
    with pytest.raises(ValueError, match="4C"):
        torchcde.CubicSpline(torch.zeros(2, 5, 3))


def test_torchcde_compat_conventions_extrapolation_knots_and_batch_shapes():
    """As torchcde: extrapolation past the ends, the left piece at a knot, and z0/X of any batch shape."""
    import torchmech.compat.torchcde as torchcde

    ts = torch.linspace(0, 3, 4, dtype=DT)
    x = torch.tensor([[0.0], [1.0], [3.0], [3.5]], dtype=DT)
    Xl = torchcde.LinearInterpolation(torchcde.linear_interpolation_coeffs(x, ts), ts)
    derivs = [float(Xl.derivative(torch.tensor(k, dtype=DT))[0]) for k in (0.0, 1.0, 2.0, 3.0)]
    assert derivs == [1.0, 1.0, 2.0, 0.5]  # at knots 1, 2, 3 the piece that ends there
    assert float(Xl.evaluate(torch.tensor(-1.0, dtype=DT))[0]) == -1.0  # the first piece continued
    assert float(Xl.evaluate(torch.tensor(4.0, dtype=DT))[0]) == 4.0  # the last piece continued
    Xc = torchcde.CubicSpline(torchcde.natural_cubic_coeffs(x, ts), ts)
    a, b, c, d = (v[-1, 0] for v in (Xc.a, Xc.b, Xc.c, Xc.d))
    u = 4.0 - 2.0
    assert abs(float(Xc.evaluate(torch.tensor(4.0, dtype=DT))[0]) - float(a + u * (b + u * (c + u * d)))) < 1e-12
    with pytest.raises(ValueError, match="outside the interval"):  # torchmech's own classes stay strict
        de.LinearInterpolation(ts, x).evaluate(4.0)

    class Func(torch.nn.Module):  # any batch shape: (..., hidden 2) -> (..., 2, channels 2)
        def __init__(self):
            super().__init__()
            self.A = torch.nn.Parameter(torch.tensor([[1.0, -0.5], [0.3, 2.0]], dtype=DT))

        def forward(self, t, z):
            return torch.tanh(z)[..., :, None] * self.A + 0.1 * self.A

    torch.manual_seed(0)
    t = torch.linspace(0, 1, 6, dtype=DT)
    func = Func()
    data = torch.randn(6, 3, 6, 2, dtype=DT).cumsum(-2)
    z0 = torch.randn(6, 3, 2, dtype=DT)
    ref = torchcde.cdeint(torchcde.CubicSpline(torchcde.natural_cubic_coeffs(data.reshape(18, 6, 2), t), t), func,
                          z0.reshape(18, 2), t[[0, 3, 5]], rtol=1e-9, atol=1e-11)
    for shape in ((6, 3), (18,), ()):
        X = torchcde.CubicSpline(torchcde.natural_cubic_coeffs(data.reshape(shape + (6, 2)) if shape else data[0, 0],
                                                               t), t)
        zz = z0.reshape(shape + (2,)) if shape else z0[0, 0]
        out = torchcde.cdeint(X, func, zz, t[[0, 3, 5]], rtol=1e-9, atol=1e-11)
        assert out.shape == shape + (3, 2)
        expect = ref.reshape(shape + (3, 2)) if shape else None
        if shape:  # the whole batch steps together: the same steps as the flat solve
            torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)
        else:
            single = torchcde.cdeint(torchcde.CubicSpline(torchcde.natural_cubic_coeffs(data[:1, 0], t), t), func,
                                     z0[:1, 0], t[[0, 3, 5]], rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(out, single[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"batch shape \(6, 3\) but X's data has batch shape \(18,\)"):
        torchcde.cdeint(torchcde.CubicSpline(torchcde.natural_cubic_coeffs(data.reshape(18, 6, 2), t), t), func, z0,
                        t[[0, 5]])


def test_compat_cdeint_steps_the_batch_together_with_a_scalar_time():
    """torchcde passes func a scalar t; with B == hidden * channels a (B,) t would silently broadcast."""
    import torchmech.compat.torchcde as torchcde

    torch.manual_seed(0)
    B, T, C, H = 4, 20, 2, 2
    t = torch.linspace(0, 3, T, dtype=torch.float64)
    x = torch.cumsum(torch.randn(B, T, C, dtype=torch.float64), 1)
    seen = []

    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l = torch.nn.Linear(H, H * C, dtype=torch.float64)

        def forward(self, t, z):
            seen.append(t.dim())
            return (torch.tanh(self.l(z)) * torch.cos(2 * t)).view(z.shape[0], H, C)

    f, z0 = F(), torch.randn(B, H, dtype=torch.float64)
    X = torchcde.CubicSpline(torchcde.natural_cubic_coeffs(x, t), t)
    got = torchcde.cdeint(X, f, z0, X.interval, rtol=1e-9, atol=1e-9)
    assert set(seen) == {0}
    # the reference: each sample alone (a batch of one always shares its time)
    for b in range(B):
        Xb = torchcde.CubicSpline(torchcde.natural_cubic_coeffs(x[b:b + 1], t), t)
        alone = torchcde.cdeint(Xb, f, z0[b:b + 1], X.interval, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got[b], alone[0], rtol=0, atol=1e-6)


def test_compat_natural_cubic_coeffs_run_through_the_observed_values_only():
    """torchcde's missing-value treatment: the spline through a channel's observed points (held constant
    before the first and after the last), a channel with none observed the zero path."""
    import torchmech.compat.torchcde as torchcde
    from torchmech.de.interpolation import NaturalCubicSpline

    g = torch.Generator().manual_seed(0)
    t = torch.linspace(0, 5, 11, dtype=torch.float64)
    x = torch.randn(2, 11, 3, generator=g, dtype=torch.float64)
    x[0, 3, 0] = x[1, 5, 2] = x[1, 6, 2] = x[1, 0, 1] = x[0, 10, 2] = float("nan")
    x[1, :, 0] = float("nan")
    X = torchcde.CubicSpline(torchcde.natural_cubic_coeffs(x, t), t)
    q = torch.linspace(0, 5, 41, dtype=torch.float64)
    got = torch.stack([X.evaluate(float(s)) for s in q], dim=1)  # (2, 41, 3)
    for b in range(2):
        for c in range(3):
            obs = ~torch.isnan(x[b, :, c])
            if not obs.any():
                assert not got[b, :, c].any()
                continue
            first, last = int(obs.nonzero()[0]), int(obs.nonzero()[-1])
            xs = x[b, :, c].clone()
            xs[:first], xs[last + 1:] = xs[first], xs[last]
            keep = ~torch.isnan(xs)
            ref = NaturalCubicSpline(t[keep], xs[keep][:, None])
            want = torch.stack([ref.evaluate(float(s))[0] for s in q])
            torch.testing.assert_close(got[b, :, c], want, rtol=0, atol=1e-12)
    tc = pytest.importorskip("torchcde")
    Y = tc.CubicSpline(tc.natural_cubic_coeffs(x, t), t)
    torch.testing.assert_close(got, torch.stack([Y.evaluate(float(s)) for s in q], dim=1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun", "ralston", "rk4"])
@pytest.mark.parametrize("cls", [de.LinearInterpolation, de.RectilinearInterpolation])
def test_fixed_step_methods_on_piecewise_linear_paths_are_exact_and_causal(method, cls):
    """dz = sum_c dX_c: z(t) = sum_c (X_c(t) - X_c(t0)) exactly for any method whose steps stay inside the path's
    pieces; a stage at a step's end used to take the next piece's slope (rk4: [0, .667, 0, .667, -.333] for
    [0, 1, 0, 1, 0]), and the output at a knot depended on the data after it."""
    x = torch.tensor([[[0.0], [1.0], [0.0], [1.0], [0.0]]], dtype=DT)
    X = cls(None, x)
    t = X.grid_points
    f = lambda t_, z: torch.ones(z.shape[0], 1, X.channels, dtype=DT)  # noqa: E731
    path = torch.stack([X.evaluate(float(s))[0].sum() for s in t])
    for adjoint in (False, True):
        out = cdeint(X, f, torch.zeros(1, 1, dtype=DT), t, method=method, adjoint=adjoint)[0, :, 0]
        torch.testing.assert_close(out, path - path[0], rtol=0, atol=1e-12)
    # causal: the outputs up to the last knot where the two paths agree are the same
    x2 = x.clone()
    x2[0, 3:] += 5.0
    X2 = cls(None, x2)
    same = [bool(torch.equal(X.evaluate(float(s)), X2.evaluate(float(s)))) for s in t]
    k = same.index(False)
    a = cdeint(X, f, torch.zeros(1, 1, dtype=DT), t, method=method, adjoint=False)
    b = cdeint(X2, f, torch.zeros(1, 1, dtype=DT), t, method=method, adjoint=False)
    torch.testing.assert_close(a[:, :k], b[:, :k], rtol=0, atol=0)


def test_adjoint_with_a_plain_function_naming_trainable_tensors():
    """func inside the CDE vector field module: its closure's trainable tensors are found (or passed), not dropped."""
    W = torch.randn(2, 2, dtype=DT, requires_grad=True)
    X = de.NaturalCubicSpline(None, torch.randn(3, 5, 2, dtype=DT).cumsum(1))
    f = lambda t, z: torch.tanh(z)[..., None] * W  # noqa: E731
    z0 = torch.ones(3, 2, dtype=DT)
    with pytest.raises(ValueError, match=r"cdeint: func .* uses tensors that require grad \(W\)"):
        cdeint(X, f, z0, X.grid_points[[0, -1]], adjoint=True)
    direct = torch.autograd.grad(cdeint(X, f, z0, X.grid_points[[0, -1]], adjoint=False, rtol=1e-9, atol=1e-11).sum(),
                                 W)[0]
    adj = torch.autograd.grad(cdeint(X, f, z0, X.grid_points[[0, -1]], adjoint=True, adjoint_params=[W], rtol=1e-9,
                                     atol=1e-11).sum(), W)[0]
    torch.testing.assert_close(adj, direct, rtol=1e-5, atol=1e-7)


def test_fixed_step_linear_path_with_irregular_knots_and_a_step_size():
    """Irregular knots and options={'step_size': h}: every knot is a step end, no step crosses one."""
    ts = torch.tensor([0.0, 0.3, 1.1, 1.2, 2.0], dtype=DT)
    x = torch.tensor([[[0.0], [2.0], [-1.0], [3.0], [0.5]]], dtype=DT)
    X = de.LinearInterpolation(ts, x)
    f = lambda t, z: torch.ones(1, 1, 1, dtype=DT)  # noqa: E731
    t = torch.tensor([0.0, 0.7, 1.15, 2.0], dtype=DT)
    out = cdeint(X, f, torch.zeros(1, 1, dtype=DT), t, method="rk4", options={"step_size": 0.25}, adjoint=False)
    expect = torch.stack([X.evaluate(float(s))[0, 0] - x[0, 0, 0] for s in t])
    torch.testing.assert_close(out[0, :, 0], expect, rtol=0, atol=1e-12)


def test_compat_batch_shaped_cdeint_checks_the_plain_function_too():
    import torchmech.compat.torchcde as torchcde

    W = torch.randn(2, 2, dtype=DT, requires_grad=True)
    t = torch.linspace(0, 1, 5, dtype=DT)
    X = torchcde.CubicSpline(torchcde.natural_cubic_coeffs(torch.randn(2, 3, 5, 2, dtype=DT).cumsum(-2), t), t)
    with pytest.raises(ValueError, match=r"uses tensors that require grad \(W\)"):
        torchcde.cdeint(X, lambda s, z: torch.tanh(z)[..., None] * W, torch.ones(2, 3, 2, dtype=DT), t[[0, -1]])


@pytest.mark.parametrize("kind", ["natural_cubic_coeffs", "hermite_cubic_coefficients_with_backward_differences"])
def test_packed_coefficients_are_torchcdes(kind):
    """torchcde packs [a, b, 2c, 3d]; ours packed [a, b, c, d], so coefficients made by torchcde (cached to disk,
    say) gave another path in torchmech's CubicSpline without an error (max path error 3.3)."""
    peer = pytest.importorskip("torchcde")
    import torchmech.compat.torchcde as ours

    g = torch.Generator().manual_seed(0)
    ts = torch.linspace(0, 2, 7, dtype=DT)
    x = torch.randn(2, 7, 3, generator=g, dtype=DT)
    theirs = getattr(peer, kind)(x, ts)
    torch.testing.assert_close(getattr(ours, kind)(x, ts), theirs)
    X, Xp = ours.CubicSpline(theirs, ts), peer.CubicSpline(theirs, ts)
    for q in (0.0, 0.33, 1.0, 1.71, 2.0):
        torch.testing.assert_close(X.evaluate(q), Xp.evaluate(torch.tensor(q, dtype=DT)))
        torch.testing.assert_close(X.derivative(q), Xp.derivative(torch.tensor(q, dtype=DT)))


def test_packed_coefficients_layout_without_the_peer():
    import torchmech.compat.torchcde as ours

    ts = torch.linspace(0, 2, 7, dtype=DT)
    x = torch.randn(2, 7, 3, dtype=DT)
    S = de.NaturalCubicSpline(ts, x)
    torch.testing.assert_close(ours.natural_cubic_coeffs(x, ts), torch.cat([S.a, S.b, 2 * S.c, 3 * S.d], dim=-1))


def test_torchcde_api_rectilinear_backend_adjoint_method_and_interval():
    """torchcde's rectilinear coefficients, cdeint's backend/adjoint_method/adjoint_options and a tensor
    X.interval (they raised TypeError or differed)."""
    import torchmech.compat.torchcde as tcde

    x = torch.tensor([[[0.0, 1.0], [1.0, float("nan")], [2.0, 3.0]]], dtype=DT)  # time channel 0
    rect = tcde.linear_interpolation_coeffs(x, rectilinear=0)
    expect = torch.tensor([[[0.0, 1.0], [1.0, 1.0], [1.0, 1.0], [2.0, 1.0], [2.0, 3.0]]], dtype=DT)
    torch.testing.assert_close(rect, expect)  # forward-filled; time moves first, then the values
    with pytest.raises(ValueError, match="rectilinear must be the index of the time channel"):
        tcde.linear_interpolation_coeffs(x, rectilinear=2)
    ts = torch.linspace(0, 1, 5, dtype=DT)
    X = tcde.CubicSpline(tcde.natural_cubic_coeffs(torch.randn(2, 5, 2, dtype=DT), ts), ts)
    assert isinstance(X.interval, torch.Tensor) and X.interval.tolist() == [0.0, 1.0]
    f = torch.nn.Linear(3, 6).double()
    func = lambda t, z: f(z).reshape(2, 3, 2)  # noqa: E731
    z0 = torch.zeros(2, 3, dtype=DT)
    ref = tcde.cdeint(X, func, z0, X.interval, adjoint=False)
    got = tcde.cdeint(X, func, z0, X.interval, backend="torchdiffeq", adjoint_method="tsit5",
                      adjoint_options={"norm": "seminorm"}, adjoint_params=list(f.parameters()))
    torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError, match="backend must be 'torchdiffeq'"):
        tcde.cdeint(X, func, z0, X.interval, backend="torchsde")
    with pytest.raises(ValueError, match="adjoint_method must be an adaptive method"):
        tcde.cdeint(X, func, z0, X.interval, adjoint_method="rk4", adjoint_params=list(f.parameters()))


def test_compat_evaluate_and_derivative_take_times_of_any_shape():
    """torchcde: a time tensor of shape S gives (..., *S, C); a (K,) tensor is K times for every series
    (torchmech's own classes read (B,) times as one per sample: with K == B the two differ)."""
    import torchmech.compat.torchcde as torchcde

    ts = torch.linspace(0, 4, 5, dtype=DT)
    x = torch.randn(3, 5, 2, dtype=DT)
    X = torchcde.CubicSpline(torchcde.natural_cubic_coeffs(x, ts), ts)
    ref = de.NaturalCubicSpline(ts, x)
    q = torch.tensor([0.5, 1.5, 3.25], dtype=DT)
    out, der = X.evaluate(q), X.derivative(q)
    assert out.shape == der.shape == (3, 3, 2)
    for j in range(3):
        torch.testing.assert_close(out[:, j], ref.evaluate(float(q[j])))
        torch.testing.assert_close(der[:, j], ref.derivative(float(q[j])))
    assert X.evaluate(q.reshape(3, 1)).shape == (3, 3, 1, 2)
    torch.testing.assert_close(X.evaluate(q[0], q[2]), ref.evaluate(3.25) - ref.evaluate(0.5))
    Xl = torchcde.LinearInterpolation(torchcde.linear_interpolation_coeffs(x, ts), ts)
    assert Xl.derivative(q).shape == (3, 3, 2)


class _ProdFunc(torch.nn.Module):
    """A func with torchcde's prod(t, z, dXdt): cdeint must call it, not func(t, z) @ dX/dt."""

    def __init__(self):
        super().__init__()
        self.A = torch.nn.Parameter(torch.tensor([[0.5, -1.0], [1.0, 0.2]], dtype=DT))

    def forward(self, t, z):  # deliberately not what prod computes
        raise AssertionError("forward called although prod is defined")

    def prod(self, t, z, dxdt):
        return torch.tanh(z) * (dxdt @ self.A)


def test_compat_cdeint_uses_func_prod():
    import torchmech.compat.torchcde as torchcde

    ts = torch.linspace(0, 2, 5, dtype=DT)
    x = torch.randn(3, 5, 2, dtype=DT).cumsum(1)
    X = torchcde.CubicSpline(torchcde.natural_cubic_coeffs(x, ts), ts)
    func = _ProdFunc()
    z0 = torch.full((3, 2), 0.3, dtype=DT)
    out = torchcde.cdeint(X, func, z0, X.interval, adjoint=False, rtol=1e-10, atol=1e-10)

    class Dense(torch.nn.Module):  # the same field written as a matrix: tanh(z)_i A_ji
        def forward(self, t, z):
            return torch.tanh(z)[..., :, None] * func.A.T

    ref = torchcde.cdeint(X, Dense(), z0, X.interval, adjoint=False, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    g = torch.autograd.grad(torchcde.cdeint(X, func, z0, X.interval, rtol=1e-10, atol=1e-10).sum(), func.A)[0]
    torch.testing.assert_close(g, torch.autograd.grad(out.sum(), func.A)[0], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("adjoint", [False, True])
def test_cdeint_gradient_with_respect_to_the_start_time(adjoint):
    """dL/dt[0] against central differences (the start time's derivative used to be dropped: 0 or wrong)."""
    g = torch.Generator().manual_seed(0)
    ts = torch.linspace(0, 5, 6, dtype=DT)
    x = torch.randn(2, 6, 1, generator=g, dtype=DT)
    X = de.NaturalCubicSpline(ts, x)

    def run(t):
        return cdeint(X, Rot(), torch.ones(2, 2, dtype=DT), t, adjoint=adjoint, rtol=1e-10, atol=1e-10)[:, -1].sum()

    t = torch.tensor([0.5, 4.0], dtype=DT, requires_grad=True)
    grad = torch.autograd.grad(run(t), t)[0]
    eps = 1e-5
    with torch.no_grad():
        fd0 = (run(torch.tensor([0.5 + eps, 4.0], dtype=DT)) - run(torch.tensor([0.5 - eps, 4.0], dtype=DT))) / (2 * eps)
        fd1 = (run(torch.tensor([0.5, 4.0 + eps], dtype=DT)) - run(torch.tensor([0.5, 4.0 - eps], dtype=DT))) / (2 * eps)
    assert abs(float(fd0)) > 1e-2
    torch.testing.assert_close(grad, torch.stack([fd0, fd1]), rtol=1e-5, atol=1e-7)


def test_cdeint_with_a_user_defined_control():
    """torchcde's InterpolationBase: any control with derivative(t), interval and grid_points."""
    import torchmech.compat.torchcde as torchcde

    class Sine(torchcde.InterpolationBase):  # X(t) = sin(w t), one w per series
        def __init__(self, w):
            super().__init__()
            self.w = w

        @property
        def interval(self):
            return torch.tensor([0.0, 3.0], dtype=DT)

        @property
        def grid_points(self):
            return torch.tensor([0.0, 3.0], dtype=DT)

        def evaluate(self, t):
            return torch.sin(self.w * t)[:, None]

        def derivative(self, t):
            return (self.w * torch.cos(self.w * t))[:, None]

    w = torch.tensor([1.0, 2.0], dtype=DT)
    Xs = Sine(w)
    t = torch.linspace(0, 3, 4, dtype=DT)
    knots = torch.linspace(0, 3, 301, dtype=DT)
    Xref = de.NaturalCubicSpline(knots, torch.sin(w[:, None] * knots)[..., None])
    z0 = torch.zeros(2, 2, dtype=DT)
    out = torchcde.cdeint(Xs, Rot(), z0, t, rtol=1e-9, atol=1e-9)
    ref = cdeint(Xref, Rot(), z0, t, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="norm=batch_rms_norm"):
        cdeint(Xs, Rot(), z0, t)  # per-sample steps would evaluate it at different times


def test_compat_coefficients_of_unobserved_channels_and_the_deprecated_spline():
    """A channel never observed is the zero path (torchcde); natural_cubic_spline_coeffs only pins the ends."""
    import torchmech.compat.torchcde as torchcde

    ts = torch.linspace(0, 4, 5, dtype=DT)
    x = torch.randn(2, 5, 2, dtype=DT)
    x[1, :, 1] = float("nan")
    for fn in (torchcde.linear_interpolation_coeffs, torchcde.hermite_cubic_coefficients_with_backward_differences,
               torchcde.natural_cubic_coeffs):
        co = fn(x, ts)
        assert not bool(torch.isnan(co).any())
        C = 2
        assert float(co[1, ..., 1::C].abs().max()) == 0.0, fn.__name__
    nan = float("nan")
    ts = torch.linspace(0, 5, 6, dtype=DT)
    y = torch.tensor([[nan], [nan], [1.0], [3.0], [2.0], [nan]], dtype=DT)
    old = torchcde.CubicSpline(torchcde.natural_cubic_spline_coeffs(y, ts), ts)
    new = torchcde.CubicSpline(torchcde.natural_cubic_coeffs(y, ts), ts)
    # deprecated: the spline through (0, 1), (2, 1), (3, 3), (4, 2), (5, 2), the end values pinned at the ends only;
    # current: the first and last observations held, i.e. the spline through 1, 1, 1, 3, 2, 2 at every time
    ref_old = de.NaturalCubicSpline(ts[[0, 2, 3, 4, 5]], torch.tensor([[1.0], [1.0], [3.0], [2.0], [2.0]], dtype=DT))
    ref_new = de.NaturalCubicSpline(ts, torch.tensor([[1.0], [1.0], [1.0], [3.0], [2.0], [2.0]], dtype=DT))
    for q in (0.5, 1.5, 2.5, 4.7):
        torch.testing.assert_close(old.evaluate(q), ref_old.evaluate(q))
        torch.testing.assert_close(new.evaluate(q), ref_new.evaluate(q))
    assert abs(float(old.evaluate(1.0)[0]) - float(new.evaluate(1.0)[0])) > 1e-3


def test_compat_coefficients_match_torchcde_with_missing_values():
    peer = pytest.importorskip("torchcde")
    import torchmech.compat.torchcde as ours

    g = torch.Generator().manual_seed(2)
    ts = torch.linspace(0, 5, 6, dtype=DT)
    x = torch.randn(3, 6, 2, generator=g, dtype=DT)
    x[0, :2, 0] = x[0, -1, 1] = x[1, 3, 1] = float("nan")
    x[2, :, 0] = float("nan")
    for name in ("linear_interpolation_coeffs", "hermite_cubic_coefficients_with_backward_differences",
                 "natural_cubic_coeffs", "natural_cubic_spline_coeffs"):
        torch.testing.assert_close(getattr(ours, name)(x, ts), getattr(peer, name)(x, ts), msg=name)


def test_interpolation_base_needs_every_method():
    import torchmech.compat.torchcde as torchcde

    class Half(torchcde.InterpolationBase):
        def evaluate(self, t):
            return t

    with pytest.raises(TypeError, match="abstract"):
        Half()
