"""CDEVectorField's direct derivative of the path equals the interpolation's own derivative."""

import pytest
import torch

import torchmech.de as de
from torchmech.de.cde import CDEVectorField


class Func(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, t, z):
        self.seen.append(t)
        return torch.ones(z.shape[0], z.shape[1], 3, dtype=z.dtype)


@pytest.mark.parametrize("cls", [de.NaturalCubicSpline, de.CubicHermiteInterpolation, de.LinearInterpolation])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_direct_derivative_matches_interpolation(cls, dtype):
    torch.manual_seed(0)
    ts = torch.tensor([0.0, 0.3, 0.7, 1.5, 2.0], dtype=dtype)
    X = cls(ts, torch.randn(4, 5, 3, dtype=dtype))
    func = Func()
    vf = CDEVectorField(func, X)
    assert vf._direct
    z = torch.zeros(4, 2, dtype=dtype)
    coeffs = (X.a, X.b, X.c, X.d)
    for t in ([0.0] * 4, [0.7] * 4, [1.9] * 4, [2.0] * 4, [0.1, 0.7, 1.6, 2.0]):
        tt = torch.tensor(t, dtype=dtype)
        out = vf(tt, z, coeffs)
        expected = X.derivative(tt).sum(-1, keepdim=True).expand(4, 2)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        shared = len(set(t)) == 1
        assert func.seen[-1].dim() == (0 if shared else 1)
