"""Davie's and Foster's space-space Levy area approximations in BrownianInterval/VirtualBrownianTree."""

import pytest
import torch

import torchmech.de as de

N = 40000
DT = torch.float64


def _bm(cls, kind, d=3, seed=0, n=N):
    if cls == "interval":
        return de.BrownianInterval(0.0, 2.0, (n, d), dtype=DT, seed=seed, levy_area=kind)
    return de.VirtualBrownianTree(0.0, 2.0, (n, d), tol=2 ** -10, dtype=DT, seed=seed, levy_area=kind)


@pytest.mark.parametrize("cls", ["interval", "tree"])
@pytest.mark.parametrize("kind", ["davie", "foster"])
def test_space_space_levy_area_statistics(cls, kind):
    bm = _bm(cls, kind)
    s, u = 0.25, 1.75
    h = u - s
    inc = bm(s, u, levy_area=True)
    W, H, A = inc.W, inc.H, inc.A
    assert A.shape == (N, 3, 3) and A.dtype == DT
    # antisymmetric with a zero diagonal, exactly
    assert torch.equal(A, -A.transpose(-1, -2))
    assert torch.equal(torch.diagonal(A, dim1=-2, dim2=-1), torch.zeros(N, 3, dtype=DT))
    se = h * h / 4 / N ** 0.5  # standard error of a mean of A_ij (Var A_ij = h^2/4)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        a = A[:, i, j]
        assert abs(a.mean().item()) < 4 * se
        # total variance of the Levy area: h^2/4 (= h^2/6 from H W - W H, h^2/12 from the rest)
        assert abs(a.var().item() / (h * h / 4) - 1) < 0.05
        r = a - (H[:, i] * W[:, j] - W[:, i] * H[:, j])
        assert abs(r.var().item() / (h * h / 12) - 1) < 0.05
        # the extra part is uncorrelated with W and H
        for x in (W[:, i], W[:, j], H[:, i], H[:, j]):
            assert abs(torch.corrcoef(torch.stack([r, x]))[0, 1].item()) < 0.03
        # conditional variance of the extra part given H: constant (Davie) or h^2/20 + h (H_i^2 + H_j^2)/5
        x = H[:, i] ** 2 + H[:, j] ** 2
        X = torch.stack([torch.ones_like(x), x], dim=1)
        coef = torch.linalg.lstsq(X, (r * r)[:, None]).solution[:, 0]
        want = (h * h / 12, 0.0) if kind == "davie" else (h * h / 20, h / 5)
        assert abs(coef[0].item() - want[0]) < 0.1 * h * h / 12, coef
        assert abs(coef[1].item() - want[1]) < 0.04 * h, coef  # Foster's slope h/5 = 0.3; Davie's 0


@pytest.mark.parametrize("cls", ["interval", "tree"])
def test_space_space_levy_area_requery_reversal_and_per_sample(cls):
    bm = _bm(cls, "foster", d=2, n=5)
    a = bm(0.3, 0.9, levy_area=True)
    b = bm(0.3, 0.9, levy_area=True)
    assert torch.equal(a.A, b.A) and torch.equal(a.W, b.W)
    r = bm(0.9, 0.3, levy_area=True)
    assert torch.equal(r.A, -a.A) and torch.equal(r.W, -a.W)
    # per-sample times: row k equals the scalar query over sample k's interval (to round-off: a
    # BrownianInterval sums the pieces between the queried times, which later queries refine)
    t0 = torch.tensor([0.3, 0.1, 0.3, 0.5, 0.0], dtype=DT)
    t1 = torch.tensor([0.9, 0.4, 0.9, 1.0, 2.0], dtype=DT)
    inc = bm(t0, t1, levy_area=True)
    for k in range(5):
        one = bm(float(t0[k]), float(t1[k]), levy_area=True)
        torch.testing.assert_close(inc.A[k], one.A[k], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(inc.W[k], one.W[k], rtol=1e-12, atol=1e-14)
    z = bm(0.5, 0.5, levy_area=True)
    assert z.A.shape == (5, 2, 2) and not z.A.any()
    # the space-time-only motion gives no A; unpacking stays (W, H)
    W, H = _bm(cls, "space-time", n=5)(0.0, 1.0, levy_area=True)
    assert _bm(cls, "space-time", n=5)(0.0, 1.0, levy_area=True).A is None and W.shape == H.shape


def test_levy_area_argument_errors():
    with pytest.raises(ValueError, match="levy_area must be one of"):
        de.BrownianInterval(0.0, 1.0, (2, 2), levy_area="wiktorsson")
    with pytest.raises(ValueError, match="levy_area must be one of"):
        de.VirtualBrownianTree(0.0, 1.0, (2, 2), levy_area="space-space")
    bm = de.BrownianInterval(0.0, 1.0, (2, 2), seed=0)
    with pytest.raises(ValueError, match="davie"):
        bm(0.0, 1.0, levy_area=True)
    assert "foster" in repr(de.BrownianInterval(0.0, 1.0, (2, 2), seed=0, levy_area="foster"))
