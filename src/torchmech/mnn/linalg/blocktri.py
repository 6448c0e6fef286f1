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


def _raise_if_failed(infos: list[Tensor], factors: list[Tensor], min_pivot: float) -> float:
    """One host sync: raise if any Cholesky failed or, with min_pivot > 0, if any pivot L_ii^2 <= min_pivot.

    A Cholesky of a singular matrix need not fail: rounding can leave tiny positive pivots instead of a
    negative one, and the factor is then garbage. For a matrix scaled to a unit diagonal the pivots are
    relative, and one at the rounding level of the precision means the matrix is singular in it.
    """
    return _raise_if_bad(torch.stack([(i > 0).any() for i in infos]).any(),
                         [L.diagonal(dim1=-2, dim2=-1) for L in factors], min_pivot)


def _raise_if_bad(bad: Tensor, diags: list[Tensor], min_pivot: float, strict: bool = False) -> float:
    """Raise if `bad` or, with min_pivot > 0 (or strict), if any Cholesky diagonal entry is <= sqrt(min_pivot).

    strict: the diagonals come from the unrolled Cholesky, which marks a failed pivot by a NaN or zero entry
    instead of an info code, so they are checked even when min_pivot is 0.
    Returns the smallest pivot L_ii^2 (inf when the pivots were not checked), read back in the same sync.
    """
    dtype = next((d.dtype for d in diags if d.numel()), torch.float32)  # (the factor's: no float64 on some devices)
    smallest = torch.full((), math.inf, dtype=dtype, device=bad.device)
    if min_pivot > 0 or strict:
        mins = [d.amin() for d in diags if d.numel()]
        if mins:
            smallest = torch.stack(mins).amin()
            # `not >` also catches a NaN pivot
            bad = bad | ~(smallest > math.sqrt(min_pivot))
    bad, smallest = torch.stack([bad.to(dtype), smallest]).tolist()
    if bool(bad):
        raise FactorizationError(
            "Cholesky factorisation of the NeuRLP normal matrix broke down (matrix not positive definite "
            "in this precision"
            + (f": a pivot failed or fell to <= {min_pivot:.1e} of its diagonal" if min_pivot > 0 else "")
            + "): the rows do not determine the solution, or the problem is too ill-conditioned; check the "
            "coefficients, steps and weights, or use float64")
    return smallest * smallest


def _tri_solve(L: Tensor, B: Tensor, *, transpose: bool = False) -> Tensor:
    """L^{-1} B (or L^{-T} B) for lower-triangular L."""
    if transpose:
        return torch.linalg.solve_triangular(L.mT, B, upper=True)
    return torch.linalg.solve_triangular(L, B, upper=False)


# ----------------------------------------------------------------------------------------------
# Small blocks: structure-of-arrays kernels. A batch of m x m blocks is stored as (m, m, *batch, N): entry
# (i, j) of every block is one contiguous vector over the batch and time axes, so each step of an unrolled
# Cholesky / substitution / product is one elementwise kernel over all blocks of a cyclic-reduction level,
# instead of a batched LAPACK/BLAS call that pays its per-matrix overhead on matrices of 3x3 or 6x6.
# ----------------------------------------------------------------------------------------------

_SMALL_MAX = 8  # block sizes up to this use the unrolled kernels (the NeuRLP blocks are D*K or 2*D*K)
# ... and only for systems with at least this many blocks (batch x N): each level issues ~100 small kernels at
# m = 6 against ~15 LAPACK calls, so on few blocks the launch overhead loses. Measured (m = 6, 1 thread, forward
# + backward of benchmarks/mnn_solver.py): B = 1, T = 1000 (500 blocks) 2.3x slower unrolled; B = 1024,
# T = 1000 (chunks of 131 x 500 blocks) 16% faster, B = 64, T = 10000 (chunks of 13 x 5000) 21% faster,
# B = 64, T = 1000 (32k blocks) within noise. Factorisation alone, B = 64: N = 50 tie, N = 500 solve 1.6x faster.
_SMALL_MIN_BLOCKS = 2 ** 14


def _to_soa(x: Tensor, copy: bool = False) -> Tensor:
    """(..., N, a, b) -> (a, b, ..., N), contiguous (a fresh tensor with copy=True)."""
    nd = x.dim()
    y = x.permute(nd - 2, nd - 1, *range(nd - 3), nd - 3)
    return y.clone(memory_format=torch.contiguous_format) if copy else y.contiguous()


def _from_soa(x: Tensor) -> Tensor:
    """(a, b, ..., N) -> (..., N, a, b)."""
    nd = x.dim()
    return x.permute(*range(2, nd - 1), nd - 1, 0, 1)


def _chol_soa(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Cholesky of SoA blocks A (m, m, ...): returns (L, Ldiag, Linv) with L's lower triangle valid.

    Right-looking, column by column, in place on a copy of A. A non-positive pivot gives a NaN diagonal entry
    (instead of LAPACK's info > 0); the caller checks the diagonal.
    """
    m = A.shape[0]
    L = A.clone()
    diag = torch.empty_like(L[0])  # (m, ...)
    inv = torch.empty_like(L[0])
    for k in range(m):
        torch.sqrt(L[k, k], out=diag[k])
        torch.reciprocal(diag[k], out=inv[k])
        if k + 1 < m:
            col = L[k + 1:, k]
            col.mul_(inv[k])
            L[k + 1:, k + 1:].addcmul_(col.unsqueeze(1), col.unsqueeze(0), value=-1)
    return L, diag, inv


def _fsub_soa(L: Tensor, inv: Tensor, B: Tensor) -> Tensor:
    """L^{-1} B in place for SoA L (m, m, ...), inv = 1/diag(L) (m, ...), B (m, c, ...)."""
    m = L.shape[0]
    for k in range(m):
        B[k].mul_(inv[k].unsqueeze(0))
        if k + 1 < m:
            B[k + 1:].addcmul_(L[k + 1:, k].unsqueeze(1), B[k].unsqueeze(0), value=-1)
    return B


def _bsub_soa(L: Tensor, inv: Tensor, B: Tensor) -> Tensor:
    """L^{-T} B in place for SoA L (m, m, ...), inv = 1/diag(L) (m, ...), B (m, c, ...)."""
    m = L.shape[0]
    for k in range(m - 1, -1, -1):
        B[k].mul_(inv[k].unsqueeze(0))
        if k > 0:
            B[:k].addcmul_(L[k, :k].unsqueeze(1), B[k].unsqueeze(0), value=-1)
    return B


def _tmm_soa(W: Tensor, Z: Tensor) -> Tensor:
    """W^T Z for SoA W (k, a, ...), Z (k, b, ...) -> (a, b, ...)."""
    out = W[0].unsqueeze(1) * Z[0].unsqueeze(0)
    for k in range(1, W.shape[0]):
        out.addcmul_(W[k].unsqueeze(1), Z[k].unsqueeze(0))
    return out


def _tmm_soa_sub(out: Tensor, W: Tensor, Z: Tensor) -> Tensor:
    """out -= W^T Z in place for SoA W (k, a, ...), Z (k, b, ...), out (a, b, ...)."""
    for k in range(W.shape[0]):
        out.addcmul_(W[k].unsqueeze(1), Z[k].unsqueeze(0), value=-1)
    return out


def _mm_soa(W: Tensor, Z: Tensor) -> Tensor:
    """W Z for SoA W (a, k, ...), Z (k, b, ...) -> (a, b, ...)."""
    out = W[:, 0].unsqueeze(1) * Z[0].unsqueeze(0)
    for k in range(1, W.shape[1]):
        out.addcmul_(W[:, k].unsqueeze(1), Z[k].unsqueeze(0))
    return out


class SequentialCholesky:
    """Block Cholesky factorisation A = L L^T, sweeping over the N blocks one after another.

    O(N m^3) work and O(N m^2) memory, N sequential steps. Raises FactorizationError when a block Cholesky
    fails or a pivot L_ii^2 is <= min_pivot (meaningful when A has a unit diagonal).
    """

    def __init__(self, diag: Tensor, off: Tensor, min_pivot: float = 0.0):
        # Time-major copies (N, ..., m, m): each step reads and writes one contiguous slab. Slicing step i of a
        # (..., N, m, m) batch instead gathers blocks N*m*m apart, and the cache and TLB misses of that grow
        # with N (B = 64: T = 10000 cost 13x T = 1000 in that layout).
        diag, off = diag.movedim(-3, 0).contiguous(), off.movedim(-3, 0).contiguous()
        N = diag.shape[0]
        L = torch.empty_like(diag)
        CT = torch.empty_like(off)  # CT[i-1] = L_{i-1}^{-1} A[i-1, i], so A[i, i-1] L_{i-1}^{-T} = CT^T
        infos = []
        Li, info = torch.linalg.cholesky_ex(diag[0])
        L[0] = Li
        infos.append(info)
        for i in range(1, N):
            ct = _tri_solve(Li, off[i - 1])
            CT[i - 1] = ct
            Li, info = torch.linalg.cholesky_ex(diag[i] - ct.mT @ ct)
            L[i] = Li
            infos.append(info)
        self.min_pivot = _raise_if_failed(infos, [L], min_pivot)
        self.L, self.CT = L, CT  # time-major

    def solve(self, r: Tensor) -> Tensor:
        L, CT = self.L, self.CT
        N = L.shape[0]
        r = r.movedim(-3, 0).contiguous()
        y = torch.empty_like(r)
        yi = _tri_solve(L[0], r[0])
        y[0] = yi
        for i in range(1, N):
            yi = _tri_solve(L[i], r[i] - CT[i - 1].mT @ yi)
            y[i] = yi
        x = torch.empty_like(r)
        xi = _tri_solve(L[N - 1], y[N - 1], transpose=True)
        x[N - 1] = xi
        for i in range(N - 2, -1, -1):
            xi = _tri_solve(L[i], y[i] - CT[i] @ xi, transpose=True)
            x[i] = xi
        return x.movedim(0, -3)


class CyclicReduction:
    """Block cyclic reduction: eliminate the odd blocks, recurse on the even ones.

    It is block Cholesky in odd-even nested order, so it inherits Cholesky's stability. O(N m^3) work,
    O(log N) sequential levels, each a batched operation over all blocks of the level. Fails like
    SequentialCholesky (including the min_pivot test).
    """

    def __init__(self, diag: Tensor, off: Tensor, min_pivot: float = 0.0, unrolled: bool | None = None):
        m = diag.shape[-1]
        # unrolled: None picks the structure-of-arrays kernels for blocks up to _SMALL_MAX when there are at least
        # _SMALL_MIN_BLOCKS of them, batched LAPACK otherwise.
        if unrolled is None:
            unrolled = m <= _SMALL_MAX and diag.numel() // (m * m) >= _SMALL_MIN_BLOCKS
        self.unrolled = bool(unrolled)
        if self.unrolled:
            self._factor_soa(diag, off, min_pivot)
            return
        self.levels: list[tuple[Tensor, Tensor, Tensor, bool]] = []
        infos = []
        D, U = diag, off
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
        self.min_pivot = _raise_if_failed(infos, [lv[0] for lv in self.levels] + [self.root], min_pivot)

    @classmethod
    def from_soa(cls, diag: Tensor, off: Tensor, min_pivot: float = 0.0) -> "CyclicReduction":
        """The unrolled factorisation of blocks given already in SoA layout: diag (m, m, ..., N), off (m, m, ..., N-1)."""
        self = cls.__new__(cls)
        self.unrolled = True
        self._factor_soa(diag, off, min_pivot, soa=True)
        return self

    def _factor_soa(self, diag: Tensor, off: Tensor, min_pivot: float, soa: bool = False) -> None:
        """The same elimination on (m, m, ..., N) blocks with the unrolled kernels (see _chol_soa)."""
        D, U = (diag, off) if soa else (_to_soa(diag), _to_soa(off))
        m = D.shape[0]
        self.levels_soa: list[tuple[Tensor, Tensor, Tensor, int]] = []
        diags = []
        while D.shape[-1] > 1:
            N = D.shape[-1]
            No = N // 2  # odd blocks 1, 3, ...; the even ones are 0, 2, ...
            Nr = (N - 1) // 2  # odd blocks with a right neighbour (all but the last when N is even)
            Lo, dg, inv = _chol_soa(D[..., 1::2])
            diags.append(dg)
            # W = Lo^{-1} [A[odd, left]; A[odd, right]] as (m, 2m, ..., No); a missing right neighbour is a 0 block
            R = D.new_empty((m, 2 * m) + D.shape[2:-1] + (No,))
            R[:, :m] = U[..., 0::2].transpose(0, 1)
            R[:, m:, ..., :Nr] = U[..., 1::2]
            if Nr < No:
                R[:, m:, ..., Nr:] = 0
            W = _fsub_soa(Lo, inv, R)
            # Of W^T W = [[Wl^T Wl, Wl^T Wr], [Wr^T Wl, Wr^T Wr]] only three quarters are needed (the fourth is
            # a transpose); the diagonal ones are subtracted in place.
            Wl, Wr = W[:, :m], W[:, m:, ..., :Nr]
            De = D[..., 0::2].clone()
            _tmm_soa_sub(De[..., :No], Wl, Wl)
            _tmm_soa_sub(De[..., 1:1 + Nr], Wr, Wr)
            U = _tmm_soa(Wl[..., :Nr], -Wr)
            D = De
            self.levels_soa.append((Lo, inv, W, Nr))
        self.root_soa = _chol_soa(D)
        diags.append(self.root_soa[1])
        # A failed pivot is a NaN (or 0) diagonal entry: `not > floor` catches both, one host sync for all levels.
        self.min_pivot = _raise_if_bad(torch.zeros((), dtype=torch.bool, device=diag.device), diags, min_pivot,
                                       strict=True)

    def _solve_soa(self, r: Tensor) -> Tensor:
        m = self.root_soa[0].shape[0]
        R = _to_soa(r, copy=True)  # (m, c, ..., N)
        zs = []
        for Lo, inv, W, Nr in self.levels_soa:
            z = _fsub_soa(Lo, inv, R[..., 1::2].clone())
            No = z.shape[-1]
            re = R[..., 0::2].clone()
            for k in range(m):
                re[..., :No].addcmul_(W[k, :m].unsqueeze(1), z[k].unsqueeze(0), value=-1)
                re[..., 1:1 + Nr].addcmul_(W[k, m:, ..., :Nr].unsqueeze(1), z[k, ..., :Nr].unsqueeze(0), value=-1)
            zs.append(z)
            R = re
        L, _, inv = self.root_soa
        x = _bsub_soa(L, inv, _fsub_soa(L, inv, R))
        for (Lo, inv, W, Nr), z in zip(reversed(self.levels_soa), reversed(zs)):
            No = z.shape[-1]
            # z <- z - Wl x[left] - Wr x[right], then xo = Lo^{-T} z
            for k in range(m):
                z.addcmul_(W[:, k].unsqueeze(1), x[k, ..., :No].unsqueeze(0), value=-1)
                z[..., :Nr].addcmul_(W[:, m + k, ..., :Nr].unsqueeze(1), x[k, ..., 1:1 + Nr].unsqueeze(0), value=-1)
            xo = _bsub_soa(Lo, inv, z)
            full = x.new_empty(x.shape[:-1] + (x.shape[-1] + No,))
            full[..., 0::2] = x
            full[..., 1::2] = xo
            x = full
        return _from_soa(x)

    def solve(self, r: Tensor) -> Tensor:
        if self.unrolled:
            return self._solve_soa(r)
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
