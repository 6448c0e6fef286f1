"""Brownian motion: exact statistics, consistency, reproducibility, Levy area, errors."""

import math

import pytest
import torch

import torchmech.de as de
from torchmech.de.brownian import BrownianInterval, VirtualBrownianTree

N = 20000  # samples (batch) for statistics; 4-sigma tolerances below


def _bms(levy=None):
    return [
        BrownianInterval(0.0, 2.0, (N, 2), dtype=torch.float64, seed=3, levy_area=levy),
        VirtualBrownianTree(0.0, 2.0, (N, 2), tol=2 ** -12, dtype=torch.float64, seed=3, levy_area=levy),
    ]


def _check_normal(x, var):
    x = x.reshape(-1)
    n = x.numel()
    assert abs(x.mean().item()) < 4 * math.sqrt(var / n)
    # variance of the sample variance of a normal: 2 var^2 / n
    assert abs(x.var().item() - var) < 4 * var * math.sqrt(2 / n)


@pytest.mark.parametrize("kind", [0, 1])
def test_increment_mean_variance_any_order(kind):
    bm = _bms()[kind]
    # arbitrary query order, dyadic points (exact for the virtual tree too)
    for s, u in [(0.5, 0.75), (0.0, 2.0), (1.25, 1.5), (0.125, 0.5), (1.5, 2.0)]:
        _check_normal(bm(s, u), u - s)


@pytest.mark.parametrize("kind", [0, 1])
def test_disjoint_intervals_independent_and_bridge_consistent(kind):
    bm = _bms()[kind]
    a = bm(0.0, 0.5)
    b = bm(0.5, 1.25)
    c = bm(1.25, 2.0)
    for x, y in ((a, b), (b, c), (a, c)):
        corr = (x * y).mean() / (x.std() * y.std())
        assert abs(corr.item()) < 4 / math.sqrt(x.numel())
    # consistency under splitting
    torch.testing.assert_close(a + b + c, bm(0.0, 2.0), rtol=0, atol=1e-12)
    torch.testing.assert_close(bm(0.3, 0.9), bm(0.3, 0.6) + bm(0.6, 0.9), rtol=0, atol=1e-12)


def test_interval_exact_at_arbitrary_points_and_requery_identical():
    bm = BrownianInterval(0.0, 1.0, (N, 1), dtype=torch.float64, seed=0)
    x = bm(0.1234, 0.5678)
    _check_normal(x, 0.5678 - 0.1234)
    y = bm(0.5678, 0.9)
    corr = (x * y).mean() / (x.std() * y.std())
    assert abs(corr.item()) < 4 / math.sqrt(N)
    torch.testing.assert_close(bm(0.1234, 0.5678), x, rtol=0, atol=0)
    # backwards query is the negative
    torch.testing.assert_close(bm(0.5678, 0.1234), -x, rtol=0, atol=0)


def test_reproducible_from_seed_and_sequential_is_cheap():
    def run(seed):
        bm = BrownianInterval(0.0, 1.0, (4, 3), seed=seed)
        ts = torch.linspace(0, 1, 101)
        return torch.stack([bm(ts[i], ts[i + 1]) for i in range(100)]), bm

    a, bm = run(7)
    b, _ = run(7)
    c, _ = run(8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert bm.num_pieces == 100  # one piece per step: no wasted splits
    # telescoping sum equals the whole increment
    torch.testing.assert_close(a.sum(0), bm(0.0, 1.0), rtol=1e-5, atol=1e-5)


def test_virtual_tree_is_order_independent():
    t = [0.7, 0.1, 0.4, 0.95]
    bm1 = VirtualBrownianTree(0.0, 1.0, (5, 2), tol=1e-4, dtype=torch.float64, seed=11)
    bm2 = VirtualBrownianTree(0.0, 1.0, (5, 2), tol=1e-4, dtype=torch.float64, seed=11)
    v1 = [bm1(0.0, s) for s in t]
    v2 = [bm2(0.0, s) for s in reversed(t)][::-1]
    for a, b in zip(v1, v2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


@pytest.mark.parametrize("kind", [0, 1])
def test_space_time_levy_area(kind):
    bm = _bms("space-time")[kind]
    W, H = bm(0.5, 1.5, levy_area=True)
    _check_normal(W, 1.0)
    _check_normal(H, 1.0 / 12.0)
    corr = (W * H).mean() / (W.std() * H.std())
    assert abs(corr.item()) < 4 / math.sqrt(W.numel())
    # Levy area of the union equals the merge of the pieces
    W1, H1 = bm(0.5, 1.0, levy_area=True)
    W2, H2 = bm(1.0, 1.5, levy_area=True)
    torch.testing.assert_close(W1 + W2, W, rtol=0, atol=1e-12)
    torch.testing.assert_close(0.5 * H1 + 0.5 * H2 + (0.5 * W1 - 0.5 * W2) / 2.0, H, rtol=0, atol=1e-12)
    # the halves have their own correct distribution
    _check_normal(H1, 0.5 / 12.0)


def test_levy_area_interval_nondyadic_split_matches_distribution():
    bm = BrownianInterval(0.0, 1.0, (N, 1), dtype=torch.float64, seed=5, levy_area="space-time")
    bm(0.0, 1.0, levy_area=True)
    W, H = bm(0.2, 0.3, levy_area=True)
    _check_normal(W, 0.1)
    _check_normal(H, 0.1 / 12)


def test_per_sample_times():
    bm = BrownianInterval(0.0, 1.0, (3, 2), dtype=torch.float64, seed=1)
    s = torch.tensor([0.0, 0.25, 0.0], dtype=torch.float64)
    u = torch.tensor([0.5, 0.75, 0.5], dtype=torch.float64)
    out = bm(s, u)
    assert out.shape == (3, 2)
    torch.testing.assert_close(out[0], bm(0.0, 0.5)[0])
    torch.testing.assert_close(out[1], bm(0.25, 0.75)[1])
    torch.testing.assert_close(out[2], bm(0.0, 0.5)[2])


def test_errors():
    bm = BrownianInterval(0.0, 1.0, (2, 2), seed=0)
    with pytest.raises(ValueError, match="outside"):
        bm(0.5, 1.5)
    with pytest.raises(ValueError, match="levy_area"):
        bm(0.0, 0.5, levy_area=True)
    with pytest.raises(ValueError, match="shape"):
        bm(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="t0 < t1"):
        BrownianInterval(1.0, 0.0, (2,))
    with pytest.raises(ValueError, match="levy_area"):
        BrownianInterval(0.0, 1.0, (2,), levy_area="wiktorsson")
    with pytest.raises(ValueError, match="tol"):
        VirtualBrownianTree(0.0, 1.0, (2,), tol=-1.0)
    with pytest.raises(TypeError, match="dtype"):
        BrownianInterval(0.0, 1.0, (2,), dtype=torch.int64)


def test_float32_and_device_follow():
    bm = VirtualBrownianTree(0.0, 1.0, (2, 3), dtype=torch.float32, seed=0, levy_area="space-time")
    W, H = bm(0.1, 0.2, levy_area=True)
    assert W.dtype == torch.float32 and H.dtype == torch.float32 and W.device.type == "cpu"


@pytest.mark.parametrize("cls", [BrownianInterval, VirtualBrownianTree])
@pytest.mark.parametrize("t1", [0.1, 0.3])
def test_float32_solve_whose_end_time_rounds_past_the_interval(cls, t1):
    """float32(0.1) = 0.10000000149 > 0.1: the solve's last query must still mean t1, not be an error."""
    bm = cls(0.0, t1, shape=(4, 2), seed=0)
    terms = de.MultiTerm(de.ODETerm(lambda t, y, a: -y),
                         de.DiagonalControlTerm(lambda t, y, a: 0.5 * torch.ones_like(y), bm))
    sol = de.solve(terms, de.EulerMaruyama(), 0.0, t1, torch.zeros(4, 2), dt0=0.01,
                   saveat=de.SaveAt(ts=torch.linspace(0, t1, 5)))
    assert (sol.status == 0).all() and torch.isfinite(sol.ys).all()
    # snapping is limited to rounding: the full increment is W(t1) - W(0), and beyond that is an error
    assert torch.equal(bm(0.0, float(torch.tensor(t1, dtype=torch.float32))), bm(0.0, t1))
    with pytest.raises(ValueError, match="outside"):
        bm(0.0, t1 * 1.001)


def test_virtual_tree_increments_between_its_nodes_keep_their_variance():
    """Between the tree's nodes the path is its conditional mean, so an increment over h misses about tol / (3 h)
    of its variance: with the old default tol (2**-16 of the span) 1.7% at h = 3e-4, an Ito drift. The default
    now keeps that below 0.01%, and a step within 30 tol warns."""
    h = 3e-4
    bm = VirtualBrownianTree(0.0, 1.0, (20000, 1), seed=0, dtype=torch.float64)
    qv = sum(bm(k * h, (k + 1) * h).square() for k in range(100)).mean() / (100 * h)
    # standard error of the mean quadratic variation over 20000 paths of 100 steps: sqrt(2 / 100 / 20000) = 0.1%
    assert abs(float(qv) - 1.0) < 0.005
    coarse = VirtualBrownianTree(0.0, 1.0, (20000, 1), seed=0, dtype=torch.float64, tol=2.0 ** -16)
    with pytest.warns(UserWarning, match=r"misses about tol / \(3 h\) = 5.1% of its variance") as record:
        coarse(0.3, 0.3 + 1e-4)
    assert record[0].filename == __file__  # attributed to the caller, not to torchmech's internals
