"""The block-tridiagonal solvers directly: unrolled (structure-of-arrays) and LAPACK cyclic reduction agree."""

import pytest
import torch

from torchmech.mnn.linalg.blocktri import CyclicReduction, FactorizationError, SequentialCholesky


def _blocktri(bs, N, m, dtype, seed=0):
    """A random SPD block-tridiagonal matrix as (diag, off) and its dense form (float64)."""
    g = torch.Generator().manual_seed(seed)
    n = N * m
    A = torch.randn(*bs, n, n, generator=g, dtype=torch.float64)
    band = torch.zeros(n, n, dtype=torch.bool)
    for i in range(N):
        band[i * m:(i + 1) * m, max(0, i - 1) * m:min(N, i + 2) * m] = True
    A = (A + A.mT) * band + 8 * m * torch.eye(n, dtype=torch.float64)  # diagonally dominant
    diag = torch.stack([A[..., i * m:(i + 1) * m, i * m:(i + 1) * m] for i in range(N)], -3)
    off = torch.stack([A[..., i * m:(i + 1) * m, (i + 1) * m:(i + 2) * m] for i in range(N - 1)], -3) \
        if N > 1 else diag[..., :0, :, :]
    return diag.to(dtype), off.to(dtype), A


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bs", [(), (3,), (2, 3)])
@pytest.mark.parametrize("N", [1, 2, 3, 4, 5, 8, 13])
@pytest.mark.parametrize("m", [1, 3, 6])
def test_unrolled_matches_lapack_and_dense(dtype, bs, N, m):
    diag, off, A = _blocktri(bs, N, m, dtype, seed=N * 10 + m)
    r = torch.randn(*bs, N, m, 2, dtype=dtype)
    x_soa = CyclicReduction(diag, off, unrolled=True).solve(r)
    x_lapack = CyclicReduction(diag, off, unrolled=False).solve(r)
    x_seq = SequentialCholesky(diag, off).solve(r)
    ref = torch.linalg.solve(A, r.to(torch.float64).reshape(*bs, N * m, 2)).reshape(*bs, N, m, 2)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for x in (x_soa, x_lapack, x_seq):
        assert x.shape == r.shape and x.dtype == dtype
        assert torch.allclose(x.to(torch.float64), ref, rtol=tol, atol=tol)


def test_unrolled_is_the_default_for_many_small_blocks():
    diag, off, _ = _blocktri((2,), 5, 6, torch.float64)
    assert not CyclicReduction(diag, off).unrolled  # few blocks: LAPACK
    many = (diag.repeat(2 ** 13, 1, 1, 1), off.repeat(2 ** 13, 1, 1, 1))  # 2^14 * 5 blocks
    assert CyclicReduction(*many).unrolled
    diag, off, _ = _blocktri((2,), 5, 9, torch.float64)
    assert not CyclicReduction(diag.repeat(2 ** 13, 1, 1, 1), off.repeat(2 ** 13, 1, 1, 1)).unrolled


def test_unrolled_solve_leaves_the_input_alone():
    diag, off, _ = _blocktri((), 1, 3, torch.float64)
    r = torch.randn(1, 3, 1, dtype=torch.float64)
    r0 = r.clone()
    CyclicReduction(diag, off, unrolled=True).solve(r)
    assert torch.equal(r, r0)


@pytest.mark.parametrize("unrolled", [True, False])
@pytest.mark.parametrize("N", [1, 6, 7])
def test_breakdown_raises(unrolled, N):
    diag, off, _ = _blocktri((2,), N, 3, torch.float64)
    diag[1, N // 2, 1, 1] = -50.0  # one indefinite block
    with pytest.raises(FactorizationError, match="not positive definite"):
        CyclicReduction(diag, off, unrolled=unrolled)


@pytest.mark.parametrize("unrolled", [True, False])
def test_pivot_floor_raises(unrolled):
    """A tiny positive pivot passes without a floor and raises with one."""
    diag = torch.eye(2, dtype=torch.float64).repeat(1, 3, 1, 1)
    diag[0, 2, 1, 1] = 1e-12
    off = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    CyclicReduction(diag, off, unrolled=unrolled)
    with pytest.raises(FactorizationError, match="fell to <= 1.0e-09"):
        CyclicReduction(diag, off, min_pivot=1e-9, unrolled=unrolled)


def test_nan_block_raises():
    diag, off, _ = _blocktri((), 4, 3, torch.float64)
    off[1, 0, 2] = float("nan")
    with pytest.raises(FactorizationError):
        CyclicReduction(diag, off, unrolled=True)


@pytest.mark.parametrize("central", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_solver_with_unrolled_blocks_matches_dense(monkeypatch, central, dtype):
    """solve_linear_ode(method='parallel') through the unrolled kernels: values and gradients as dense."""
    import torchmech.mnn.linalg.blocktri as bt
    from torchmech.mnn import solve_linear_ode

    monkeypatch.setattr(bt, "_SMALL_MIN_BLOCKS", 1)
    g = torch.Generator().manual_seed(3)
    B, T = 3, 11
    args = [torch.randn(B, T, 1, 1, 3, generator=g, dtype=torch.float64), torch.randn(B, T, 1, generator=g,
            dtype=torch.float64), torch.randn(B, 1, 1, 2, generator=g, dtype=torch.float64),
            0.05 + 0.1 * torch.rand(B, T - 1, generator=g, dtype=torch.float64)]
    args = [a.to(dtype).requires_grad_() for a in args]
    w = torch.randn(B, T, 1, 3, generator=g, dtype=torch.float64).to(dtype)
    outs = []
    for method in ("parallel", "dense"):
        u = solve_linear_ode(*args, method=method, central=central)
        grads = torch.autograd.grad((u * w).sum(), args)
        outs.append((u, grads))
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    for a, b in zip([outs[0][0], *outs[0][1]], [outs[1][0], *outs[1][1]]):
        assert torch.allclose(a, b, rtol=tol, atol=tol * b.abs().max().item())
