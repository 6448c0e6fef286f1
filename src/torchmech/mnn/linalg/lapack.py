"""The NeuRLP normal matrix factorised by LAPACK's banded Cholesky (pbtrf/pbtrs through scipy), per sample.

On CPU a compiled sequential sweep over the grid beats the tensor-op cyclic reduction, whose every level pays
per-operation dispatch (benchmarks/RESULTS.md, "An outside peer"). The blocks are copied into LAPACK's upper
band storage: block (t, t+k), entry (a, b) is M[t n + a, (t + k) n + b], so with n unknowns per step and
neighbours up to two steps apart the upper bandwidth is 3 n - 1 scalars.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg as sl
import torch
from torch import Tensor

from torchmech.mnn.linalg.blocktri import FactorizationError


class LapackBanded:
    """Factor of the (Jacobi-scaled, float64, CPU) block-banded normal matrix, one LAPACK band per sample.

    ``diag`` (..., T, n, n), ``off1`` (..., T-1, n, n) = M[t, t+1], ``off2`` (..., T-2, n, n) = M[t, t+2] or None.
    ``solve(x)`` takes and returns (..., T, n, c). ``min_pivot`` is the smallest pivot of the factor (the
    squared diagonal of the band Cholesky factor, relative to the unit diagonal).
    """

    def __init__(self, diag: Tensor, off1: Tensor, off2: Tensor | None, min_pivot: float):
        if diag.device.type != "cpu" or diag.dtype != torch.float64:
            raise ValueError("LapackBanded: needs float64 blocks on the CPU")
        self.batch_shape = diag.shape[:-3]
        T, n = diag.shape[-3], diag.shape[-1]
        self.T, self.n = T, n
        blocks = [diag, off1] + ([off2] if off2 is not None else [])
        u = len(blocks) * n - 1
        B = math.prod(self.batch_shape)
        ab = np.zeros((B, u + 1, T * n))
        for k, blk in enumerate(blocks):
            if blk.shape[-3] == 0 or B == 0:
                continue
            blk = blk.detach().reshape(B, T - k, n, n).numpy()
            for a in range(n):
                for b in range(n):
                    if k * n + b >= a:  # the upper triangle
                        ab[:, u + a - k * n - b, k * n + b::n][:, :T - k] = blk[:, :, a, b]
        self.factors = []
        smallest = math.inf
        for s_ in range(B):
            try:
                cb = sl.cholesky_banded(ab[s_], lower=False, check_finite=False)
            except np.linalg.LinAlgError:
                smallest = -math.inf
                break
            piv = float(np.min(cb[u])) if cb.shape[1] else math.inf
            if not np.isfinite(piv):
                smallest = -math.inf
                break
            smallest = min(smallest, piv * piv)
            self.factors.append(cb)
        if not smallest > min_pivot:
            raise FactorizationError(
                "Cholesky factorisation of the NeuRLP normal matrix broke down (matrix not positive definite "
                f"in this precision: a pivot failed or fell to <= {min_pivot:.1e} of its diagonal): the rows do not "
                "determine the solution, or the problem is too ill-conditioned; check the coefficients, steps and "
                "weights")
        self.min_pivot = smallest

    def solve(self, x: Tensor) -> Tensor:
        """M^{-1} x for x (..., T, n, c) (float64, CPU)."""
        c = x.shape[-1]
        B = len(self.factors)
        flat = x.detach().reshape(B, self.T * self.n, c).numpy()
        out = np.empty_like(flat)
        for s_, cb in enumerate(self.factors):
            out[s_] = sl.cho_solve_banded((cb, False), flat[s_], check_finite=False)
        return torch.from_numpy(out).reshape(x.shape)
