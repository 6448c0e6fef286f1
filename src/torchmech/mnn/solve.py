"""solve_linear_ode: the differentiable NeuRLP solver, with an implicit backward pass."""

from __future__ import annotations

import torch
from torch import Tensor

from torchmech._autograd import first_order_only
from torchmech.mnn.linalg.blocktri import (_SMALL_MAX, _SMALL_MIN_BLOCKS, CyclicReduction, FactorizationError,
                                          SequentialCholesky)
from torchmech.mnn.linalg.dense import solve_dense
from torchmech.mnn.linalg import native
from torchmech.mnn.linalg.lapack import LapackBanded
from torchmech.mnn.system import (SUSPECT_PIVOT, BandedSystem, Problem, assemble, check_solution, eigen_floor,
                                  objective_cross_grads, pivot_floor, prepare,
                                  warn_ill_conditioned)

METHODS = ("auto", "dense", "banded", "parallel", "lapack", "native")


# ----------------------------------------------------------------------------------------------
# Block-pentadiagonal (blocks n) -> block-tridiagonal (blocks 2n) by pairing time steps.
# ----------------------------------------------------------------------------------------------

def _pair_vec(x: Tensor, pad: bool) -> Tensor:
    """(..., T, n, c) -> (..., ceil(T/2), 2n, c)."""
    if pad:
        x = torch.cat([x, torch.zeros_like(x[..., :1, :, :])], -3)
    return x.reshape(*x.shape[:-3], x.shape[-3] // 2, 2 * x.shape[-2], x.shape[-1])


def _unpair_vec(x: Tensor, T: int) -> Tensor:
    """(..., P, 2n, c) -> (..., T, n, c)."""
    n = x.shape[-2] // 2
    return x.reshape(*x.shape[:-3], 2 * x.shape[-3], n, x.shape[-1])[..., :T, :, :]


def _tridiagonal(diag: Tensor, off1: Tensor, off2: Tensor | None) -> tuple[Tensor, Tensor, bool]:
    """The normal matrix as block-tridiagonal (diag, off) and whether time steps were paired/padded."""
    if off2 is None:
        return diag, off1, False
    T, n = diag.shape[-3], diag.shape[-1]
    if T % 2:
        eye = torch.eye(n, dtype=diag.dtype, device=diag.device).expand(diag.shape[:-3] + (1, n, n))
        diag = torch.cat([diag, eye], -3)
        off1 = torch.cat([off1, torch.zeros_like(off1[..., :1, :, :])], -3)
        off2 = torch.cat([off2, torch.zeros_like(off2[..., :1, :, :])], -3)
        T += 1
    d0, d1 = diag[..., 0::2, :, :], diag[..., 1::2, :, :]
    o_in = off1[..., 0::2, :, :]  # M[2p, 2p+1]
    D2 = torch.cat([torch.cat([d0, o_in], -1), torch.cat([o_in.mT, d1], -1)], -2)
    # M[2p:2p+2, 2p+2:2p+4] = [[off2[2p], 0], [off1[2p+1], off2[2p+1]]]
    a = off2[..., 0::2, :, :]
    c = off1[..., 1::2, :, :]
    d = off2[..., 1::2, :, :]
    U2 = torch.cat([torch.cat([a, torch.zeros_like(a)], -1), torch.cat([c, d], -1)], -2)
    return D2, U2, True


def _soa_pairs(sys: BandedSystem) -> bool:
    """Whether CyclicReduction would pick its unrolled kernels for the paired blocks of this system."""
    T, n = sys.diag.shape[-3], sys.diag.shape[-1]
    return 2 * n <= _SMALL_MAX and sys.diag[..., 0, 0, 0].numel() * ((T + 1) // 2) >= _SMALL_MIN_BLOCKS


def _scaled_tridiagonal(sys: BandedSystem, s: Tensor, low: torch.dtype) -> tuple[Tensor, Tensor, bool]:
    """_tridiagonal of the system scaled by s (the Jacobi scaling), in dtype low."""
    diag = sys.diag * s.unsqueeze(-1) * s.unsqueeze(-2)
    off1 = sys.off1 * s[..., :-1, :, None] * s[..., 1:, None, :]
    off2 = None if sys.off2 is None else sys.off2 * s[..., :-2, :, None] * s[..., 2:, None, :]
    return _tridiagonal(diag.to(low), off1.to(low), None if off2 is None else off2.to(low))


def _wants_soa(p: Problem, method: str) -> bool:
    """_soa_pairs decided before assembly: whether to assemble straight into the SoA layout.

    The C sweep reads the blocks through their strides, so it takes them in the SoA layout always (the copy to
    the contiguous one doubled the assembly: 13 vs 6 ms at B = 64, T = 1000).
    """
    if method == "native":
        return True
    if method != "parallel" or not (p.central and p.T >= 3):
        return False
    return 2 * p.n <= _SMALL_MAX and p.batch_shape.numel() * ((p.T + 1) // 2) >= _SMALL_MIN_BLOCKS


def _soa(x: Tensor) -> Tensor:
    """View (..., N, a, b) as (a, b, ..., N) (no copy)."""
    nd = x.dim()
    return x.permute(nd - 2, nd - 1, *range(nd - 3), nd - 3)


def _paired_soa(sys: BandedSystem, s: Tensor, low: torch.dtype) -> tuple[Tensor, Tensor]:
    """The Jacobi-scaled, paired block-tridiagonal form of _tridiagonal, directly in SoA layout.

    Returns D2 (2n, 2n, ..., P) and U2 (2n, 2n, ..., P-1) in dtype low, P = ceil(T/2); an odd T is padded
    with an identity diagonal block, as in _tridiagonal. Each quarter is one strided pass over its blocks that
    also applies the scaling (a separate scaling pass over D2 and U2, with its (2n, 2n, ..., P) outer product of
    the scales, cost more than all the copies: 7 of 17 ms at B = 64, T = 1000). Its ``out=`` writes refuse
    autograd: it runs inside the factorisation, which records no graph (_NeuRLPFunction differentiates implicitly).
    """
    diag, off1, off2 = sys.diag, sys.off1, sys.off2
    T, n = diag.shape[-3], diag.shape[-1]
    bs = diag.shape[:-3]
    P, To = (T + 1) // 2, T // 2  # pairs; odd time steps
    se = s[..., 0::2, :].movedim(-1, 0).contiguous()  # (n, ..., P): scales of the even steps
    so = s[..., 1::2, :].movedim(-1, 0).contiguous()  # (n, ..., To)

    def put(dst: Tensor, src: Tensor, rows: Tensor, cols: Tensor) -> None:
        """dst = src scaled by rows (n, ..., N) on its first axis and cols on its second."""
        torch.mul(src, rows.unsqueeze(1), out=dst)
        dst.mul_(cols.unsqueeze(0))

    D2 = diag.new_empty((2 * n, 2 * n) + bs + (P,))
    U2 = diag.new_empty((2 * n, 2 * n) + bs + (P - 1,))
    put(D2[:n, :n], _soa(diag[..., 0::2, :, :]), se, se)
    put(D2[n:, n:, ..., :To], _soa(diag[..., 1::2, :, :]), so, so)
    put(D2[:n, n:, ..., :To], _soa(off1[..., 0::2, :, :]), se[..., :To], so)  # M[2p, 2p+1]
    D2[n:, :n, ..., :To] = D2[:n, n:, ..., :To].transpose(0, 1)
    # U2[p] = M[2p:2p+2, 2p+2:2p+4] = [[off2[2p], 0], [off1[2p+1], off2[2p+1]]]: rows of pair p, columns of p+1
    put(U2[:n, :n], _soa(off2[..., 0::2, :, :]), se[..., :-1], se[..., 1:])
    U2[:n, n:] = 0
    put(U2[n:, :n], _soa(off1[..., 1::2, :, :]), so[..., : P - 1], se[..., 1:])
    o2 = _soa(off2[..., 1::2, :, :])
    N2 = o2.shape[-1]
    put(U2[n:, n:, ..., :N2], o2, so[..., :N2], so[..., 1:1 + N2])
    if T % 2:
        D2[n:, n:, ..., To:] = torch.eye(n, dtype=diag.dtype, device=diag.device).reshape((n, n) + (1,) * (len(bs) + 1))
        D2[:n, n:, ..., To:] = 0
        D2[n:, :n, ..., To:] = 0
        U2[n:, n:, ..., N2:] = 0
    return D2.to(low), U2.to(low)


def _matvec(sys: BandedSystem, z: Tensor) -> Tensor:
    """M z for the block-banded normal matrix; z (..., T, n, c)."""
    out = sys.diag @ z
    out[..., :-1, :, :] += sys.off1 @ z[..., 1:, :, :]
    out[..., 1:, :, :] += sys.off1.mT @ z[..., :-1, :, :]
    if sys.off2 is not None:
        out[..., :-2, :, :] += sys.off2 @ z[..., 2:, :, :]
        out[..., 2:, :, :] += sys.off2.mT @ z[..., :-2, :, :]
    return out


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum((-1, -2))


# The low-precision factorisation is used as a preconditioner for conjugate gradients run in float64:
# a float32 Cholesky of M is accurate to about cond(M) * 6e-8, so plain iterative refinement stalls on
# poorly conditioned problems, while CG removes the few slow error modes in a handful of iterations.
_REFINE_TOL = {torch.float32: 1e-7}  # the only low precision: prepare() accepts float32 and float64
_REFINE_MAX = 40
_SLACK_REL = 1e-4  # the slack's Schur complement below this fraction of mu counts as 0 (see _Factorised)


def _cdot(a: Tensor, b: Tensor) -> Tensor:
    """Per-column inner products of (..., T, n, c) tensors -> (..., 1, 1, c)."""
    return (a * b).sum((-3, -2), keepdim=True)


class _Factorised:
    """The NeuRLP normal matrix (with its optional slack border), factorised once, solving many times.

    The blocks are assembled in the working precision `sys.diag.dtype` (float64 when the user's dtype is
    lower) and symmetrically scaled by diag(M)^(-1/2), which makes the factorisation independent of how
    the rows and unknowns happen to be scaled (steps h^k, weights). The factorisation itself runs in the
    user's dtype; for float32 each solve is refined with residuals computed in float64 (mixed-precision
    iterative refinement), so the result is accurate to float32 rounding, not to cond(M) * eps.
    """

    def __init__(self, sys: BandedSystem, method: str, low: torch.dtype):
        self.sys, self.low, self.hi = sys, low, sys.diag.dtype
        if method in ("lapack", "native"):  # both factorise in float64 (the working precision on the CPU)
            self.low = low = self.hi
        self.T = sys.diag.shape[-3]
        self.method = method
        try:
            self._refactor()
        except FactorizationError:
            if low == self.hi:
                raise
            # Positive definite, but not in the low precision: factorise in the working precision.
            self.low = self.hi
            self._refactor()
        if self.low == self.hi == torch.float64 and self.factor.min_pivot < SUSPECT_PIVOT:
            self._check_not_singular()
        self.x2 = self.schur = None
        self.m = sys.m
        if sys.m is not None:
            self.x2 = self._solve_banded(sys.m.unsqueeze(-1)).squeeze(-1)
            self.schur = sys.mu - _dot(sys.m, self.x2)
            # schur = mu - m^T M^-1 m is 0 in exact arithmetic when the rows can absorb the slack, and rounding
            # then picks its sign; compare it with its natural scale mu (the slack's own diagonal entry).
            # Measured schur/mu on random well-posed problems: >= 0.1. On an exactly absorbable family (the
            # tests' _slack_absorbed) the rounding noise grows with cond(M), i.e. with T: <= 1.2e-10 at T = 31,
            # 1e-8 at 101, 9e-7 at 301, 9e-5 at 1001, 7e-3 at 3001 (both precisions). 1e-4 leaves a factor 100
            # on both sides up to T ~ 300; beyond T ~ 1000 such problems can slip through.
            ratio = self.schur / sys.mu
            if bool((ratio <= _SLACK_REL).any()):
                raise FactorizationError(
                    "the slack variable is not determined by the rows: its Schur complement mu - m^T M^-1 m is "
                    f"{ratio.min().item():.1e} of mu (<= {_SLACK_REL:.0e}), i.e. the smoothness rows can absorb "
                    "the shared offset (nearly) exactly; leave slack=None or pin more of the solution")

    @classmethod
    def native_assembled(cls, p: Problem) -> tuple["_Factorised", Tensor]:
        """The C path for a float64 CPU problem without the slack: assembly, scaling and factorisation in C
        (NativeBanded.from_problem), no blocks in between. Returns the factorisation and the right-hand side."""
        self = cls.__new__(cls)
        self.low = self.hi = torch.float64
        self.T, self.method, self.sys = p.T, "native", None
        self.factor, b, self.s = native.NativeBanded.from_problem(p, min_pivot=pivot_floor(self.low, p.T))
        self.paired = self.pad = False
        self.x2 = self.schur = self.m = None
        if self.factor.min_pivot < SUSPECT_PIVOT:
            self._check_not_singular()
        return self, b

    def _refactor(self) -> None:
        sys, low = self.sys, self.low
        s = sys.diag.diagonal(dim1=-2, dim2=-1).rsqrt()  # (..., T, n)
        self.s = s
        if self.method == "native":  # the C sweep scales while it copies the blocks into its band layout
            self.paired = self.pad = False
            self.factor = native.NativeBanded(sys.diag, sys.off1, sys.off2, s, min_pivot=pivot_floor(low, self.T))
            return
        if self.method == "lapack":  # LAPACK's banded Cholesky per sample, on the unpaired scaled blocks
            diag = (sys.diag * s.unsqueeze(-1) * s.unsqueeze(-2)).to(low)
            off1 = (sys.off1 * s[..., :-1, :, None] * s[..., 1:, None, :]).to(low)
            off2 = None if sys.off2 is None else (sys.off2 * s[..., :-2, :, None] * s[..., 2:, None, :]).to(low)
            self.paired = self.pad = False
            self.factor = LapackBanded(diag, off1, off2, min_pivot=pivot_floor(low, self.T))
            return
        if self.method == "parallel" and sys.off2 is not None and _soa_pairs(sys):
            # Many small paired blocks: build them scaled, paired and in the unrolled kernels' layout in one go.
            D2, U2 = _paired_soa(sys, s, low)
            self.paired, self.pad = True, self.T % 2 == 1
            self.factor = CyclicReduction.from_soa(D2, U2, min_pivot=pivot_floor(low, self.T))
            return
        D2, U2, self.paired = _scaled_tridiagonal(sys, s, low)  # (the scaled blocks are freed here)
        self.pad = self.paired and self.T % 2 == 1
        factor = CyclicReduction if self.method == "parallel" else SequentialCholesky
        self.factor = factor(D2, U2, min_pivot=pivot_floor(low, self.T))

    def _check_not_singular(self) -> None:
        """Raise if the unit-diagonal normal matrix S M S is numerically singular.

        Its smallest eigenvalue, per problem of the batch, by three steps of inverse iteration through the
        factorisation (each one solve). The factor is that of a matrix within rounding of S M S, so a singular
        one shows an eigenvalue at the rounding level (<= 1e-15) although its smallest pivot may be 1e-8.
        Only run when some pivot is below SUSPECT_PIVOT.
        """
        s = self.s.unsqueeze(-1)  # (..., T, n, 1)
        g = torch.Generator(device=s.device).manual_seed(0)
        v = torch.randn(s.shape, generator=g, dtype=self.hi, device=s.device)
        v = v / v.square().sum((-3, -2, -1), keepdim=True).sqrt()
        for _ in range(3):
            w = self._solve_once(v / s) / s  # (S M S)^-1 v
            grow = w.square().sum((-3, -2, -1), keepdim=True).sqrt()
            v = w / grow
        lam = (1 / grow).amin().item()
        if lam >= eigen_floor(self.T):
            warn_ill_conditioned(lam)
        if not lam >= eigen_floor(self.T):
            raise FactorizationError(
                f"the NeuRLP normal matrix is numerically singular (smallest eigenvalue about {lam:.1e} of its "
                f"diagonal, below {eigen_floor(self.T):.0e}): the rows do not determine the solution, or too weakly "
                "for the float64 normal equations (condition beyond ~1e14); pin more of it (initial conditions, "
                "more equations, central=True) or check the coefficients, steps and weights")

    def release(self) -> None:
        """Drop the assembled blocks once they are no longer needed (they are only read again by the
        refinement of a low-precision factorisation): a stored factorisation then holds just the factor."""
        if self.low == self.hi:
            self.sys = None

    def _solve_once(self, r: Tensor) -> Tensor:
        """One pass of M^{-1} r through the (low-precision) factorisation; r (..., T, n, c) in hi."""
        x = (r * self.s.unsqueeze(-1)).to(self.low)
        if self.paired:
            x = _unpair_vec(self.factor.solve(_pair_vec(x, self.pad)), self.T)
        else:
            x = self.factor.solve(x)
        return x.to(self.hi) * self.s.unsqueeze(-1)

    def _solve_banded(self, r: Tensor) -> Tensor:
        """M^{-1} r; with a low-precision factorisation, preconditioned CG against the working-precision M."""
        x = self._solve_once(r)
        if self.low == self.hi:
            return x
        res = r - _matvec(self.sys, x)
        zr = self._solve_once(res)
        d, rz = zr, _cdot(res, zr)
        tiny = torch.finfo(self.hi).tiny
        tol = _REFINE_TOL[self.low]
        for _ in range(_REFINE_MAX):
            Md = _matvec(self.sys, d)
            alpha = rz / _cdot(d, Md).clamp_min(tiny)
            x = x + alpha * d
            # One host sync per iteration: stop once every column's update is below the tolerance.
            if bool(((alpha * d).square().sum((-3, -2)) <= tol * tol * x.square().sum((-3, -2))).all()):
                return x
            res = res - alpha * Md
            zr = self._solve_once(res)
            rz_new = _cdot(res, zr)
            d = zr + (rz_new / rz.clamp_min(tiny)) * d
            rz = rz_new
        # CG did not converge with the low-precision preconditioner: the problem is too ill-conditioned
        # for it, so factorise once more in the working precision rather than return an inaccurate result.
        self.low = self.hi
        self._refactor()
        return self._solve_once(r)

    def solve(self, r: Tensor, r_eps: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Solve [[M, m], [m^T, mu]] [z; eps] = [r; r_eps] (just M z = r without a slack). r (..., T, n)."""
        z = self._solve_banded(r.unsqueeze(-1)).squeeze(-1)
        if self.x2 is None:
            return z, None
        # Rank-one border by its Schur complement: both solves share the one factorisation.
        eps = ((0.0 if r_eps is None else r_eps) - _dot(self.m, z)) / self.schur
        return z - eps[..., None, None] * self.x2, eps


def _factor_dtype(low: torch.dtype, hi: torch.dtype, device: torch.device) -> torch.dtype:
    """The precision of the factorisation: the working precision hi on CPU and CUDA, the user's dtype elsewhere.

    A float64 factorisation of a float32 problem is faster than a float32 one plus the float64 CG refinement it
    needs (3-5 extra solve and matvec passes per solve), and exact to float64 before the cast. On CPU: B = 64,
    T = 1000, parallel, forward + backward 117 -> 65 ms in-process. On an H200 the solve is bound by kernel
    launches, not arithmetic, so the extra passes cost the same: float32 parallel took 2.8-4.5x the float64 time
    (B = 64, T = 1000: 82 vs 30 ms; B = 1024, T = 10000: 723 vs 163 ms; benchmarks/RESULTS.md). The
    low-precision factorisation with CG is kept for other devices, where float64 arithmetic may be much slower.
    """
    return hi if device.type in ("cpu", "cuda") else low


def _promote(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


class _NeuRLPFunction(torch.autograd.Function):
    """u = argmin of the NeuRLP objective; backward by implicit differentiation."""

    @staticmethod
    def _factorise(template: Problem, method: str, tensors) -> tuple[_Factorised, BandedSystem, torch.dtype]:
        low = tensors[0].dtype
        hi = torch.float64 if low in _REFINE_TOL else low
        p_hi = template.with_tensors([_promote(t, hi) for t in tensors])
        if method == "native" and p_hi.slack is None:
            fac, b = _Factorised.native_assembled(p_hi)
            return fac, BandedSystem(None, None, None, b), hi
        sys = assemble(p_hi, soa=_wants_soa(p_hi, method))
        return _Factorised(sys, method, _factor_dtype(low, hi, sys.diag.device)), sys, hi

    @staticmethod
    def forward(ctx, template: Problem, method: str, keep: bool, *tensors: Tensor) -> Tensor:
        low = tensors[0].dtype
        fac, sys, hi = _NeuRLPFunction._factorise(template, method, tensors)
        z, eps = fac.solve(sys.b, sys.gamma)
        u = z.reshape(template.batch_shape + (template.T, template.D, template.K))
        check_solution(u, low)
        fac.release()
        # keep=False: the factorisation is recomputed in backward (see _keep_factor)
        ctx.template, ctx.method, ctx.fac, ctx.eps, ctx.hi = template, method, fac if keep else None, eps, hi
        ctx.save_for_backward(u, *tensors)
        # the caller gets its own tensor: u is saved for backward and is a view of the solver's result, so an
        # in-place edit of it (u[..., 0].clamp_(min=0)) would fail (float32 inputs get a cast copy anyway)
        return u.clone() if u.dtype == low else u.to(low)

    @staticmethod
    def backward(ctx, grad_u: Tensor):
        with torch.no_grad():
            grads = _NeuRLPFunction._input_grads(ctx, grad_u)
        # backward(create_graph=True): the gradients are correct, but their own derivatives are not implemented;
        # tied to the inputs they raise when differentiated. grad_u is one of them: the gradients are linear in it,
        # and a derivative through it (a loss on dL/drhs differentiated for a parameter that reaches the gradients
        # only via L's grad_u) would otherwise drop the solver's part silently.
        return first_order_only(grads, (grad_u, *ctx.saved_tensors[1:]),
                                "second derivatives through solve_linear_ode are not implemented for "
                                "method='banded'/'parallel'/'lapack' (its backward is an implicit-differentiation "
                                "solve); use method='dense' on small problems")

    @staticmethod
    def _input_grads(ctx, grad_u: Tensor) -> tuple:
        u, *tensors = ctx.saved_tensors
        template: Problem = ctx.template
        bs, T, n, hi = template.batch_shape, template.T, template.n, ctx.hi
        g = _promote(grad_u, hi).expand(bs + grad_u.shape[-3:]).reshape(bs + (T, n))
        fac = ctx.fac
        if fac is None:
            fac = _NeuRLPFunction._factorise(template, ctx.method, [t.detach() for t in tensors])[0]
        y, lam_eps = fac.solve(g)
        lam = y.reshape(u.shape)
        need = list(ctx.needs_input_grad[3:])
        p = template.with_tensors([_promote(t.detach(), hi) for t in tensors])
        grads = native.objective_grads(p, lam, lam_eps, u, ctx.eps, need)  # (None: no C library, or not CPU float64)
        if grads is None:
            grads = objective_cross_grads(p, lam, lam_eps, u, ctx.eps, need)
        return (None, None, None, *[None if g is None else g.to(t.dtype) for g, t in zip(grads, tensors)])


# CPU batch chunking (see solve_linear_ode). Work is counted in (steps x n^2) block entries; the target is
# 2^17 steps at n = 3, i.e. chunks of 131 samples at T = 1000, whose largest temporaries (~18 MB) stay under
# glibc's 32 MB mmap threshold. Measured (B = 1024, T = 1000, float64, parallel, 1 thread): page faults per call
# 1.2 M unchunked, ~20k with chunks of 64 or 128 samples (same time), ~300k with 256 (25% slower than 128).
# Fewer, larger chunks also mean fewer small operations. Chunks only when there are >= 2 of them.
_CHUNK_TARGET = 2 ** 17 * 9
_BANDED_MIN_CHUNK = 64


def _chunk_size(p: Problem, method: str) -> int | None:
    """Samples per chunk along the first batch axis, or None to solve the batch in one piece.

    The banded sweep issues ~T small operations per chunk, so its chunks hold >= 64 samples: chunks of 13
    (B = 64, T = 10000) measured no faster in float64 and 2.6x slower in float32, while B = 1024, T = 10000
    in one piece spent most of its time in page faults (17M, 64 s; 16 chunks of 64: see RESULTS.md).
    """
    if p.device.type != "cpu" or len(p.batch_shape) == 0 or p.batch_shape[0] < 2:
        return None
    per_sample = p.T * p.n * p.n
    for b in p.batch_shape[1:]:
        per_sample *= b
    if per_sample == 0:  # an empty batch axis after the first: nothing to chunk
        return None
    chunk = max(1, _CHUNK_TARGET // per_sample)
    if method == "banded":
        chunk = max(chunk, _BANDED_MIN_CHUNK)
    if method == "native":  # whole groups of the C sweep's 8 lanes (B = 64, T = 10000: chunks of 13 -> 8, 515 -> 358 ms)
        chunk = max(8, chunk - chunk % 8)
    if 2 * chunk > p.batch_shape[0]:
        return None
    return chunk


def _chunks(p: Problem, chunk: int) -> list[Problem]:
    """Split p along its first batch axis; inputs that broadcast along it are shared by every chunk."""
    B, nb = p.batch_shape[0], len(p.batch_shape)
    core = [4, 2, 3, 1, 0, 0, 0, 0]  # trailing non-batch axes of each of p.tensors()
    # One split per input, not a slice per chunk: autograd then assembles each input's gradient once
    # from all chunks (one SplitBackward), where per-chunk slices would each scatter into a zero tensor of
    # the input's full size (O(B^2 / chunk) work and memory traffic: 79 chunks at B = 1024, T = 10000).
    parts = [t.split(chunk, 0) if t.dim() - c == nb and t.shape[0] == B else None
             for t, c in zip(p.tensors(), core)]
    out = []
    for k, i in enumerate(range(0, B, chunk)):
        j = min(i + chunk, B)
        q = p.with_tensors([t if sp is None else sp[k] for t, sp in zip(p.tensors(), parts)])
        q.batch_shape = torch.Size((j - i,) + tuple(p.batch_shape[1:]))
        out.append(q)
    return out


# Autograd keeps each call's factorisation for its backward solve. Past this many bytes of factors (all chunks
# together) the backward factorises again instead: on CPU every kept byte is freshly mapped memory, and at
# B = 1024, T = 10000 (~9 GB kept) the page faults made the call 35-50x the T = 1000 one instead of ~10x.
_KEEP_FACTOR_BYTES = 2 ** 30


def _keep_factor(p: Problem) -> bool:
    """Whether to keep the factorisation for backward (else recompute it there): ~ its size vs the budget."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in p.tensors()):
        return True  # no backward: nothing is kept either way
    size = p.batch_shape.numel() * p.T * 8 * (6 * p.n * p.n + p.n)  # paired factor blocks, one per step
    return size <= _KEEP_FACTOR_BYTES


# "auto" on CPU: LAPACK's banded sweep up to this many samples, or up to this many steps in all (B = 64, T = 100:
# 6.5 vs 9.0 ms forward + backward; at B = 64, T = 1000 the two tie, at B = 1024 parallel is ~10% faster)
_LAPACK_MAX_BATCH = 8
_LAPACK_MAX_STEPS = 2 ** 14
_NATIVE_MIN_BATCH = 3  # "auto" on CPU: the C sweep from this many samples on (its lanes come in eights) ...
_NATIVE_SHORT_GRID = 1500  # ... or for fewer samples on grids up to this long


def _choose(method: str, p: Problem) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "lapack" and p.device.type != "cpu":
        raise ValueError(f"method='lapack' runs on the CPU (scipy's LAPACK); the inputs are on {p.device}")
    if method == "native":
        if p.device.type != "cpu":
            raise ValueError(f"method='native' runs on the CPU (a C sweep); the inputs are on {p.device}")
        if not native.available():
            raise RuntimeError(f"method='native' is unavailable: {native.unavailable_reason()}; "
                               "use method='auto', 'parallel' or 'lapack'")
    if method != "auto":
        return method
    # On the CPU the C sweep is the least work and the fewest calls: forward + backward at B = 64, T = 1000 in
    # ~25-30 ms against ~70 ms for "parallel" and ~80 ms for "lapack" (benchmarks/RESULTS.md). It runs the
    # samples in lanes of 8, so on long grids one or two samples leave most of its work idle and LAPACK's
    # per-sample sweep wins (B = 1: T = 1000 3.3 vs 4.2 ms, T = 2000 5.2 vs 4.8, T = 4000 11.5 vs 6.1; B = 3 wins
    # at every T measured).
    B = p.batch_shape.numel()
    if p.device.type == "cpu" and (B >= _NATIVE_MIN_BATCH or p.T <= _NATIVE_SHORT_GRID) and native.available():
        return "native"
    # Without the C sweep, measured on CPU (benchmarks/mnn_solver.py, forward + backward): for a few samples
    # LAPACK's compiled banded sweep wins (B = 1, T = 1000: 1.8 vs 3.5 ms; B = 64 is a tie, B = 1024 favours
    # parallel by ~10%). Otherwise, for short grids the sequential sweep has fewer, larger operations; from a few
    # dozen points on, cyclic reduction's O(log T) depth pays off.
    if p.device.type == "cpu" and (B <= _LAPACK_MAX_BATCH or B * p.T <= _LAPACK_MAX_STEPS):
        return "lapack"
    return "banded" if p.T < 24 else "parallel"


def solve_linear_ode(coefficients: Tensor, rhs: Tensor, init: Tensor, steps: Tensor, *,
                     weight_equation=1.0, weight_init=1.0, weight_smooth=1.0, central: bool = True,
                     slack=None, method: str = "auto", num_points: int | None = None) -> Tensor:
    r"""Solve a linear ODE on a time grid by the NeuRLP least-squares relaxation (Mechanistic Neural Networks).

    The unknowns are the values and derivatives ``u[..., t, d, k]`` (the k-th derivative of variable d at grid
    point t). They minimise the weighted squared residuals of

    * equation rows ``sum_{d,k} coefficients[t,e,d,k] u[t,d,k] = rhs[t,e]`` (weight ``weight_equation``),
    * initial rows ``u[t,d,k] = init[t,d,k]`` for ``t < T0, k < K0`` (weight ``weight_init``),
    * forward/backward Taylor and central-difference smoothness rows between neighbouring grid points
      (weight ``weight_smooth``), exactly as written in DESIGN.md.

    Args:
        coefficients: ``(..., T, E, D, K)``, ``K = order + 1 >= 2``. A size-1 time axis broadcasts. Its dtype
            (float32 or float64) is the result's; the other inputs are converted to it.
        rhs: ``(..., T, E)``; a size-1 time axis broadcasts.
        init: ``(..., T0, D, K0)`` with ``0 <= T0 <= T`` and ``0 <= K0 <= K``.
        steps: ``(..., T-1)`` positive step sizes ``h_t`` (learnable); a size-1 axis means a constant step.
        weight_equation, weight_init, weight_smooth: positive floats or tensors broadcastable to the batch
            shape, or with one element (learnable).
        central: include the central-difference rows.
        slack: ``gamma_alpha`` to reproduce the seed paper's exact relaxation with one shared slack variable
            (objective ``1/2 sum r^2 - gamma_alpha * eps``); ``None`` leaves the slack out.
        method: ``"parallel"`` (cyclic reduction, O(T) work, O(log T) depth), ``"banded"`` (sequential block
            Cholesky), ``"lapack"`` (CPU only: LAPACK's banded Cholesky through scipy, one sample at a time, a
            compiled sequential sweep), ``"native"`` (CPU only: a banded Cholesky in C, all samples at once as
            vector lanes; compiled with the system's C compiler (``$CC`` or ``cc``) at first use, in well under a
            second, and cached in ``~/.cache/torchmech``), ``"dense"`` (dense normal equations differentiated by
            autograd; reference for tests) or ``"auto"``: on the CPU ``"native"``, except ``"lapack"`` for one or two
            samples on grids longer than 1500 points (and for up to 8 samples or 16k steps when no C compiler works
            or ``TORCHMECH_NATIVE=0`` is set, ``"parallel"`` beyond); ``"parallel"`` elsewhere (``"banded"`` below 24
            grid points).
        num_points: the number of grid points T, needed only when every input has a size-1 time axis.

    Returns:
        u: ``(..., T, D, K)``; ``u[..., 0]`` is the solution, ``u[..., k]`` its k-th derivative.

    Gradients flow to every tensor argument by implicit differentiation of the normal equations (one more
    solve with the stored factorisation). That backward is not itself differentiable: with ``create_graph=True``
    the first derivatives are exact, and differentiating them again raises a ``RuntimeError`` (only
    ``method="dense"`` gives second derivatives). Raises ``ValueError``/``TypeError`` on bad input (including dtypes
    other than float32/float64), ``FactorizationError`` when the normal matrix is not (numerically) positive
    definite (a failed or tiny Cholesky pivot, or, when a pivot is below 1e-6 of its diagonal, a smallest
    eigenvalue at the rounding level: the rows leave part of the solution undetermined), when the slack is not
    determined by the rows, or when the solve produces non-finite values, and
    ``OverflowError`` when a float32 problem's solution (computed in float64) exceeds float32's range.

    Accuracy: the normal equations square the rows' condition number, so float64 results carry relative
    rounding errors up to ~``eps / lambda_min`` (``lambda_min``: the smallest eigenvalue of the normal matrix
    scaled to a unit diagonal). On reasonably scaled problems that is far below the discretisation error; a
    ``RuntimeWarning`` is raised when the factorisation finds ``lambda_min`` < 1e-12 (errors possibly above ~1e-4;
    it checks when a Cholesky pivot falls below 1e-6). Extreme steps
    condition the Taylor rows badly, the more so the higher the order: a second-order problem with h = 1e-6 solves
    to only ~1e-5 relative (below the warning threshold), and a third-order one (K = 4) with h = 1e-4 already
    raises ``FactorizationError`` in every method; rescale time so that steps are not tiny compared with 1.

    On CPU, large batches (batch size * T * (D*K)^2 above ~2.4e6) are solved in chunks along the first batch
    axis, each ~131k steps at D*K = 3: the temporaries then stay small enough to be reused instead of being
    freshly mapped and zeroed by the kernel, which made unchunked B = 1024, T = 1000 calls ~2x slower. When the
    factorisations kept for the backward would exceed ~1 GiB (e.g. B = 1024, T = 10000), the backward
    factorises again instead of keeping them (one more factorisation, a fraction of the memory).
    """
    p = prepare(coefficients, rhs, init, steps, weight_equation=weight_equation, weight_init=weight_init,
                weight_smooth=weight_smooth, central=central, slack=slack, num_points=num_points)
    method = _choose(method, p)
    if method == "dense":
        return solve_dense(p)
    chunk = _chunk_size(p, method)
    keep = _keep_factor(p)
    if chunk is None:
        return _NeuRLPFunction.apply(p, method, keep, *p.tensors())
    # Autograd runs each chunk's backward separately too, so forward and backward both work chunk by chunk.
    return torch.cat([_NeuRLPFunction.apply(q, method, keep, *q.tensors()) for q in _chunks(p, chunk)], 0)
