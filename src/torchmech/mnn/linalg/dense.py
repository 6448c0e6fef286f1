"""Dense reference: the NeuRLP row matrix written out in full and solved by dense normal equations.

Built straight from the row definitions in DESIGN.md, independently of the banded assembly, and
differentiated by plain autograd. O((T*D*K)^2) memory: for tests and small problems only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from torchmech.mnn.linalg.blocktri import FactorizationError
from torchmech.mnn.system import (SUSPECT_PIVOT, Problem, check_solution, eigen_floor, pivot_floor,
                                  warn_ill_conditioned)


def dense_rows(p: Problem) -> tuple[Tensor, Tensor, Tensor]:
    """The weighted row matrix and targets.

    Returns A (..., R, T*n + s) with the slack column last when slack is used, y (..., R) (both already
    multiplied by the row weights), and the row count R.
    """
    T, E, D, K, n, bs = p.T, p.E, p.D, p.K, p.n, p.batch_shape
    idx = lambda t, d, k: t * n + d * K + k  # noqa: E731 - column of u[t, d, k]
    h = p.steps.expand(bs + (T - 1,))
    c = p.coefficients.expand(bs + (T, E, D, K))
    rhs = p.rhs.expand(bs + (T, E))
    we = p.weight_equation.expand(bs)[..., None]
    wi = p.weight_init.expand(bs)[..., None]
    ws = p.weight_smooth.expand(bs)[..., None]
    extra = 1 if p.slack is not None else 0
    cols = T * n + extra
    blocks_A, blocks_y = [], []

    def new(rows: int) -> Tensor:
        return torch.zeros(bs + (rows, cols), dtype=p.dtype, device=p.device)

    # equation rows: one per (t, e)
    A = new(T * E)
    for t in range(T):
        for e in range(E):
            A[..., t * E + e, t * n:(t + 1) * n] = c[..., t, e, :, :].reshape(bs + (n,))
    blocks_A.append(we[..., None] * A)
    blocks_y.append(we * rhs.reshape(bs + (T * E,)))
    # initial rows: u[t, d, k] = init[t, d, k]
    if p.T0 > 0 and p.K0 > 0:
        A = new(p.T0 * D * p.K0)
        y = p.init.expand(bs + (p.T0, D, p.K0)).reshape(bs + (p.T0 * D * p.K0,))  # (not -1: bs may hold a 0)
        r = 0
        for t in range(p.T0):
            for d in range(D):
                for k in range(p.K0):
                    A[..., r, idx(t, d, k)] = 1.0
                    r += 1
        blocks_A.append(wi[..., None] * A)
        blocks_y.append(wi * y)
    # forward and backward Taylor rows
    rows = []
    for t in range(T - 1):
        ht = h[..., t]
        for d in range(D):
            for i in range(K - 1):
                fwd = torch.zeros(bs + (cols,), dtype=p.dtype, device=p.device)
                bwd = torch.zeros(bs + (cols,), dtype=p.dtype, device=p.device)
                for j in range(i, K):
                    fwd[..., idx(t, d, j)] = ht ** j / math.factorial(j - i)
                    bwd[..., idx(t + 1, d, j)] = (-ht) ** j / math.factorial(j - i)
                fwd[..., idx(t + 1, d, i)] = fwd[..., idx(t + 1, d, i)] - ht ** i
                bwd[..., idx(t, d, i)] = bwd[..., idx(t, d, i)] - (-ht) ** i
                if extra:
                    fwd[..., -1] = 1.0
                    bwd[..., -1] = 1.0
                rows += [fwd, bwd]
    if p.central:
        for t in range(T - 2):
            S = h[..., t] + h[..., t + 1]
            for d in range(D):
                row = torch.zeros(bs + (cols,), dtype=p.dtype, device=p.device)
                row[..., idx(t, d, K - 2)] = S ** (K - 3)
                row[..., idx(t + 2, d, K - 2)] = -S ** (K - 3)
                row[..., idx(t + 1, d, K - 1)] = S ** (K - 2)
                if extra:
                    row[..., -1] = -1.0
                rows.append(row)
    if rows:
        A = torch.stack(rows, -2)
        blocks_A.append(ws[..., None] * A)
        blocks_y.append(torch.zeros(bs + (len(rows),), dtype=p.dtype, device=p.device))
    A = torch.cat(blocks_A, -2)
    y = torch.cat(blocks_y, -1)
    return A, y, A.shape[-2]


def solve_dense(p: Problem) -> Tensor:
    """Minimise 1/2 |A z - y|^2 - gamma * eps by dense normal equations. Returns u (..., T, D, K).

    float32 problems are assembled and solved in float64 and the result cast back (differentiably): a float32
    Cholesky of the dense normal matrix loses cond(H) * 6e-8, which measured 1e-2..0.8 relative on a T = 1000
    oscillator. H is scaled to a unit diagonal before its Cholesky, with the same relative pivot floor as the
    banded backends. Raises FactorizationError when H is not (numerically) positive definite, OverflowError
    when the solution does not fit float32.
    """
    low = p.dtype
    if low != torch.float64:
        p = p.with_tensors([t.to(torch.float64) for t in p.tensors()])
    A, y, _ = dense_rows(p)
    H = A.transpose(-1, -2) @ A
    g = (A.transpose(-1, -2) @ y.unsqueeze(-1)).squeeze(-1)
    if p.slack is not None:
        g = g.clone()
        g[..., -1] = g[..., -1] + p.slack.expand(p.batch_shape)
    s = H.diagonal(dim1=-2, dim2=-1).rsqrt()
    Hs = H * s.unsqueeze(-1) * s.unsqueeze(-2)
    L, info = torch.linalg.cholesky_ex(Hs)
    floor = pivot_floor(torch.float64, p.T)
    min_pivot = L.detach().diagonal(dim1=-2, dim2=-1).amin().square() if L.numel() else torch.ones(())
    low_pivot = ~(min_pivot > floor)
    where = None
    if bool((info > 0).any() | low_pivot):
        where = f"Cholesky failed at column {int(info.max())} of {H.shape[-1]}" if bool((info > 0).any()) else \
            f"a pivot fell to <= {floor:.1e} of its diagonal"
    elif float(min_pivot) < SUSPECT_PIVOT:  # pivots do not tell singular from ill-conditioned here: eigenvalues do
        lam = torch.linalg.eigvalsh(Hs.detach()).amin()
        if float(lam) >= eigen_floor(p.T):
            warn_ill_conditioned(float(lam))
        if float(lam) < eigen_floor(p.T):
            where = f"its smallest eigenvalue is {float(lam):.1e} of the diagonal"
    if where is not None:
        raise FactorizationError(
            f"the dense normal matrix is not positive definite ({where}): the least-squares problem does not "
            "determine the solution (check the coefficients and the initial conditions)")
    z = s * torch.cholesky_solve((s * g).unsqueeze(-1), L).squeeze(-1)
    u = z[..., : p.T * p.n].reshape(p.batch_shape + (p.T, p.D, p.K))
    check_solution(u, low)
    return u.to(low)
