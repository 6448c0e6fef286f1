"""NeuralCDE: classifies irregular, partially observed spirals; shapes, options, clear errors."""

import math

import pytest
import torch

import torchmech.de as de
from torchmech.nn import NeuralCDE


def _spirals(n, T=30, missing=0.3, seed=0):
    """Clockwise (label 1) / anticlockwise (label 0) decaying 2-D spirals at random sorted times in
    [0, 4 pi], with ``missing`` of the points' (x, y) values NaN. Channels: [time / (4 pi), x, y]."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.sort(torch.rand(n, T, generator=gen), dim=1).values * 4 * math.pi
    t[:, 0] = 0.0
    label = torch.randint(0, 2, (n,), generator=gen)
    s = 1.0 - 2.0 * label
    phase = torch.rand(n, 1, generator=gen) * 2 * math.pi
    r = 1.0 - 0.6 * t / (4 * math.pi)
    xy = torch.stack([r * torch.cos(phase + s[:, None] * t), r * torch.sin(phase + s[:, None] * t)], -1)
    xy = xy + 0.05 * torch.randn(xy.shape, generator=gen)
    drop = torch.rand(n, T, generator=gen) < missing
    drop[:, 0] = False  # every series keeps its first point, so each channel has an observation
    xy[drop] = float("nan")
    return torch.cat([t[..., None] / (4 * math.pi), xy], -1), label


def test_classifies_irregular_partially_observed_spirals():
    xtr, ytr = _spirals(256, seed=0)
    xte, yte = _spirals(256, seed=1)
    assert 0.25 < torch.isnan(xtr[..., 1]).float().mean() < 0.35
    model = NeuralCDE(3, hidden=8, output=2, width=32, depth=1)
    with torch.no_grad():
        acc0 = (model(xte).argmax(-1) == yte).float().mean().item()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    perm = torch.randperm(256)
    for epoch in range(2):
        for i in range(0, 256, 32):
            idx = perm[i:i + 32]
            loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (model(xte).argmax(-1) == yte).float().mean().item()
    assert acc >= 0.9, (acc0, acc)
    assert acc0 < 0.8  # the untrained model cannot do it


@pytest.mark.parametrize("interpolation", ["cubic", "hermite", "linear", "rectilinear"])
def test_shapes_interpolations_sequences(interpolation):
    x, _ = _spirals(4, T=8)
    model = NeuralCDE(3, hidden=4, output=5, width=8, interpolation=interpolation, return_sequences=True)
    out = model(x)
    assert out.shape == (4, 8, 5)
    model.return_sequences = False
    final = model(x)
    assert final.shape == (4, 5)
    torch.testing.assert_close(final, out[:, -1], rtol=1e-5, atol=1e-6)


def test_float64_intensity_adaptive_adjoint_and_prebuilt_path():
    x, _ = _spirals(3, T=6)
    x = x.double()
    kw = dict(hidden=4, output=2, width=8, intensity=True, method="dopri5", rtol=1e-8, atol=1e-10)
    model = NeuralCDE(3, **kw).double()
    adj = NeuralCDE(3, adjoint=True, **kw).double()
    adj.load_state_dict(model.state_dict())
    out = model(x)
    assert out.dtype == torch.float64 and model.path_channels == 6
    g1 = torch.autograd.grad(out.sum(), list(model.parameters()))
    g2 = torch.autograd.grad(adj(x).sum(), list(adj.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    X = model.interpolate(x)
    torch.testing.assert_close(model(X), out)
    t = torch.tensor([0.0, 0.1, 0.5, 0.6, 2.0, 3.0], dtype=torch.float64)
    assert model(x, t).shape == (3, 2)


def test_errors():
    model = NeuralCDE(3, hidden=4, output=2)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, T, input_channels=3\) .* got \(4, 10, 2\)"):
        model(torch.randn(4, 10, 2))
    with pytest.raises(ValueError, match="at least 2 time points"):
        model(torch.randn(4, 1, 3))
    with pytest.raises(ValueError, match=r"t must have shape \(T,\) = \(10,\)"):
        model(torch.randn(4, 10, 3), torch.linspace(0, 1, 9))
    with pytest.raises(ValueError, match="no observed value"):
        x = torch.randn(2, 5, 3)
        x[1, :, 2] = float("nan")
        model(x)
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        model(torch.randn(4, 10, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="interpolation must be one of"):
        NeuralCDE(3, 4, 2, interpolation="spline")
    with pytest.raises(ValueError, match="method must be one of"):
        NeuralCDE(3, 4, 2, method="rk45")
    with pytest.raises(ValueError, match=r"the interpolation must hold \(batch, T, 3\) data"):
        model(de.LinearInterpolation(None, torch.randn(2, 5, 4)))


def test_adjoint_data_gradients_at_a_knot_with_missing_values():
    """Where only the time is observed the linear path has a kink at the knot: the backward solve must step
    onto the knots as the forward one does, or the data gradients there come out ~3x off."""
    torch.manual_seed(0)
    x = torch.randn(1, 8, 3, dtype=torch.float64)
    x[..., 0] = torch.linspace(0, 7, 8)
    x[0, 4, 1:] = float("nan")
    grads = []
    for adjoint in (False, True):
        torch.manual_seed(0)
        model = NeuralCDE(3, 8, 1, width=16, interpolation="linear", method="dopri5", rtol=1e-10, atol=1e-12,
                          adjoint=adjoint).double()
        xx = x.clone().requires_grad_()
        model(xx).sum().backward()
        grads.append(torch.nan_to_num(xx.grad))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-9)


def test_prebuilt_rectilinear_path_gives_one_output_per_observation():
    torch.manual_seed(0)
    model = NeuralCDE(3, 4, 1, width=8, interpolation="rectilinear", return_sequences=True)
    x = torch.randn(2, 5, 3)
    out = model(x)
    assert out.shape == (2, 5, 1)
    torch.testing.assert_close(model(model.interpolate(x)), out)


def test_adjoint_must_be_a_bool():
    from torchmech import NeuralCDE

    with pytest.raises(TypeError, match="NeuralCDE: adjoint must be a bool"):
        NeuralCDE(3, 4, 2, adjoint="direct")


def test_non_increasing_times_are_named():
    from torchmech import NeuralCDE

    m = NeuralCDE(2, 4, 1).double()
    with pytest.raises(ValueError, match="NeuralCDE: t must be finite and strictly increasing"):
        m(torch.randn(3, 4, 2, dtype=torch.float64), torch.tensor([0.0, 1.0, 1.0, 2.0], dtype=torch.float64))
