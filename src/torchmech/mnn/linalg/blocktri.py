"""Block-tridiagonal SPD solvers: sequential block Cholesky and parallel-in-time cyclic reduction.

Both factorise once and then solve for any number of right-hand sides, which is what the implicit
backward pass needs (one more solve with the stored factorisation).

Matrix layout: diag (..., N, m, m) holds the diagonal blocks, off (..., N-1, m, m) holds A[i, i+1];
A[i+1, i] = off[i]^T. Right-hand sides are (..., N, m, c).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class FactorizationError(RuntimeError):
    """The normal matrix is not (numerically) positive definite."""


def _raise_if_failed(infos: list[Tensor], factors: list[Tensor], min_pivot: float) -> None:
    """One host sync: raise if any Cholesky failed or, with min_pivot > 0, if any pivot L_ii^2 <= min_pivot.

    A Cholesky of a singular matrix need not fail: rounding can leave tiny positive pivots instead of a
    negative one, and the factor is then garbage. For a matrix scaled to a unit diagonal the pivots are
    relative, and one at the rounding level of the precision means the matrix is singular in it.
    """
    bad = torch.stack([(i > 0).any() for i in infos]).any()
    if min_pivot > 0:
        mins = [L.diagonal(dim1=-2, dim2=-1).amin() for L in factors if L.numel()]
        if mins:
            # `not >` also catches a NaN pivot
            bad = bad | ~(torch.stack(mins).amin() > math.sqrt(min_pivot))
    if bool(bad):
        raise FactorizationError(
            "Cholesky factorisation of the NeuRLP normal matrix broke down (matrix not positive definite "
            "in this precision"
            + (f": a pivot failed or fell to <= {min_pivot:.1e} of its diagonal" if min_pivot > 0 else "")
            + "): the rows do not determine the solution, or the problem is too ill-conditioned; check the "
            "coefficients, steps and weights, or use float64")


def _tri_solve(L: Tensor, B: Tensor, *, transpose: bool = False) -> Tensor:
    """L^{-1} B (or L^{-T} B) for lower-triangular L."""
    if transpose:
        return torch.linalg.solve_triangular(L.mT, B, upper=True)
    return torch.linalg.solve_triangular(L, B, upper=False)


class SequentialCholesky:
    """Block Cholesky factorisation A = L L^T, sweeping over the N blocks one after another.

    O(N m^3) work and O(N m^2) memory, N sequential steps. Raises FactorizationError when a block Cholesky
    fails or a pivot L_ii^2 is <= min_pivot (meaningful when A has a unit diagonal).
    """

    def __init__(self, diag: Tensor, off: Tensor, min_pivot: float = 0.0):
        N = diag.shape[-3]
        L = torch.empty_like(diag)
        CT = torch.empty_like(off)  # CT[i-1] = L_{i-1}^{-1} A[i-1, i], so A[i, i-1] L_{i-1}^{-T} = CT^T
        infos = []
        Li, info = torch.linalg.cholesky_ex(diag[..., 0, :, :])
        L[..., 0, :, :] = Li
        infos.append(info)
        for i in range(1, N):
            ct = _tri_solve(Li, off[..., i - 1, :, :])
            CT[..., i - 1, :, :] = ct
            Li, info = torch.linalg.cholesky_ex(diag[..., i, :, :] - ct.mT @ ct)
            L[..., i, :, :] = Li
            infos.append(info)
        _raise_if_failed(infos, [L], min_pivot)
        self.L, self.CT = L, CT

    def solve(self, r: Tensor) -> Tensor:
        L, CT = self.L, self.CT
        N = L.shape[-3]
        y = torch.empty_like(r)
        yi = _tri_solve(L[..., 0, :, :], r[..., 0, :, :])
        y[..., 0, :, :] = yi
        for i in range(1, N):
            yi = _tri_solve(L[..., i, :, :], r[..., i, :, :] - CT[..., i - 1, :, :].mT @ yi)
            y[..., i, :, :] = yi
        x = torch.empty_like(r)
        xi = _tri_solve(L[..., N - 1, :, :], y[..., N - 1, :, :], transpose=True)
        x[..., N - 1, :, :] = xi
        for i in range(N - 2, -1, -1):
            xi = _tri_solve(L[..., i, :, :], y[..., i, :, :] - CT[..., i, :, :] @ xi, transpose=True)
            x[..., i, :, :] = xi
        return x


class CyclicReduction:
    """Block cyclic reduction: eliminate the odd blocks, recurse on the even ones.

    It is block Cholesky in odd-even nested order, so it inherits Cholesky's stability. O(N m^3) work,
    O(log N) sequential levels, each a batched operation over all blocks of the level. Fails like
    SequentialCholesky (including the min_pivot test).
    """

    def __init__(self, diag: Tensor, off: Tensor, min_pivot: float = 0.0):
        self.levels: list[tuple[Tensor, Tensor, Tensor, bool]] = []
        infos = []
        D, U = diag, off
        m = D.shape[-1]
        while D.shape[-3] > 1:
            # Odd blocks 1, 3, ... are eliminated. With N even the last odd block has no right
            # neighbour: its right coupling is a zero block, so nothing extra is materialised.
            even = D.shape[-3] % 2 == 0
            Ur = U[..., 1::2, :, :]
            if even:
                Ur = torch.cat([Ur, torch.zeros_like(U[..., :1, :, :])], -3)
            Lo, info = torch.linalg.cholesky_ex(D[..., 1::2, :, :])
            infos.append(info)
            W = _tri_solve(Lo, torch.cat([U[..., 0::2, :, :].mT, Ur], -1))
            Wl, Wr = W[..., :m], W[..., m:]
            De = D[..., 0::2, :, :] - Wl.mT @ Wl if even else D[..., 0::2, :, :].clone()
            if even:
                De[..., 1:, :, :] -= Wr[..., :-1, :, :].mT @ Wr[..., :-1, :, :]
                U = -(Wl[..., :-1, :, :].mT @ Wr[..., :-1, :, :])
            else:
                De[..., 1:, :, :] -= Wr.mT @ Wr
                De[..., :-1, :, :] -= Wl.mT @ Wl
                U = -(Wl.mT @ Wr)
            D = De
            self.levels.append((Lo, Wl, Wr, even))
        self.root, info = torch.linalg.cholesky_ex(D)
        infos.append(info)
        _raise_if_failed(infos, [lv[0] for lv in self.levels] + [self.root], min_pivot)

    def solve(self, r: Tensor) -> Tensor:
        zs = []
        for Lo, Wl, Wr, even in self.levels:
            z = _tri_solve(Lo, r[..., 1::2, :, :])
            re = r[..., 0::2, :, :] - Wl.mT @ z if even else r[..., 0::2, :, :].clone()
            if even:
                re[..., 1:, :, :] -= Wr[..., :-1, :, :].mT @ z[..., :-1, :, :]
            else:
                re[..., 1:, :, :] -= Wr.mT @ z
                re[..., :-1, :, :] -= Wl.mT @ z
            zs.append(z)
            r = re
        x = torch.cholesky_solve(r, self.root)
        for (Lo, Wl, Wr, even), z in zip(reversed(self.levels), reversed(zs)):
            right = torch.cat([x[..., 1:, :, :], torch.zeros_like(x[..., :1, :, :])], -3) if even else x[..., 1:, :, :]
            left = x if even else x[..., :-1, :, :]
            xo = _tri_solve(Lo, z - Wl @ left - Wr @ right, transpose=True)
            N = x.shape[-3] + xo.shape[-3]
            full = torch.empty(x.shape[:-3] + (N,) + x.shape[-2:], dtype=x.dtype, device=x.device)
            full[..., 0::2, :, :] = x
            full[..., 1::2, :, :] = xo
            x = full
        return x
