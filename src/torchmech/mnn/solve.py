"""solve_linear_ode: the differentiable NeuRLP solver, with an implicit backward pass."""

from __future__ import annotations

import torch
from torch import Tensor

from torchmech.mnn.linalg.blocktri import CyclicReduction, SequentialCholesky
from torchmech.mnn.linalg.dense import solve_dense
from torchmech.mnn.system import BandedSystem, Problem, assemble, objective_cross, prepare

METHODS = ("auto", "dense", "banded", "parallel")


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


def _tridiagonal(sys: BandedSystem) -> tuple[Tensor, Tensor, bool]:
    """The normal matrix as block-tridiagonal (diag, off) and whether time steps were paired/padded."""
    if sys.off2 is None:
        return sys.diag, sys.off1, False
    diag, off1, off2 = sys.diag, sys.off1, sys.off2
    T, n = diag.shape[-3], diag.shape[-1]
    if T % 2:
        eye = torch.eye(n, dtype=diag.dtype, device=diag.device).expand(diag.shape[:-3] + (1, n, n))
        diag = torch.cat([diag, eye], -3)
        off1 = torch.cat([off1, torch.zeros_like(off1[..., :1, :, :])], -3)
        off2 = torch.cat([off2, torch.zeros_like(off2[..., :1, :, :])], -3)
        T += 1
    P = T // 2
    d0, d1 = diag[..., 0::2, :, :], diag[..., 1::2, :, :]
    o_in = off1[..., 0::2, :, :]  # M[2p, 2p+1]
    D2 = torch.cat([torch.cat([d0, o_in], -1), torch.cat([o_in.mT, d1], -1)], -2)
    # M[2p:2p+2, 2p+2:2p+4] = [[off2[2p], 0], [off1[2p+1], off2[2p+1]]]
    a = off2[..., 0::2, :, :]
    c = off1[..., 1::2, :, :]
    d = off2[..., 1::2, :, :]
    U2 = torch.cat([torch.cat([a, torch.zeros_like(a)], -1), torch.cat([c, d], -1)], -2)
    assert D2.shape[-3] == P and U2.shape[-3] == P - 1
    return D2, U2, True


class _Factorised:
    """A factorised normal matrix that solves in the (..., T, n) layout."""

    def __init__(self, sys: BandedSystem, method: str):
        diag, off, self.paired = _tridiagonal(sys)
        self.T = sys.diag.shape[-3]
        self.pad = self.paired and self.T % 2 == 1
        self.factor = (CyclicReduction if method == "parallel" else SequentialCholesky)(diag, off)

    def solve(self, r: Tensor) -> Tensor:
        """r (..., T, n, c) -> M^{-1} r."""
        if not self.paired:
            return self.factor.solve(r)
        return _unpair_vec(self.factor.solve(_pair_vec(r, self.pad)), self.T)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum((-1, -2))


class _NeuRLPFunction(torch.autograd.Function):
    """u = argmin of the NeuRLP objective; backward by implicit differentiation."""

    @staticmethod
    def forward(ctx, template: Problem, method: str, *tensors: Tensor) -> Tensor:
        p = template.with_tensors(list(tensors))
        sys = assemble(p)
        fac = _Factorised(sys, method)
        bs, T, n = p.batch_shape, p.T, p.n
        eps = x2 = schur = None
        if p.slack is None:
            z = fac.solve(sys.b.unsqueeze(-1)).squeeze(-1)
        else:
            # Rank-one border: both solves share one factorisation and run as two columns.
            X = fac.solve(torch.stack([sys.b, sys.m], -1))
            x1, x2 = X[..., 0], X[..., 1]
            schur = sys.mu - _dot(sys.m, x2)
            if bool((schur <= 0).any()):
                raise RuntimeError("the slack variable is not determined by the rows (its Schur complement is "
                                   "not positive): the smoothness rows can absorb a constant offset exactly")
            eps = (sys.gamma - _dot(sys.m, x1)) / schur
            z = x1 - eps[..., None, None] * x2
        u = z.reshape(bs + (T, p.D, p.K))
        ctx.template, ctx.fac, ctx.m = template, fac, sys.m
        ctx.eps, ctx.x2, ctx.schur = eps, x2, schur
        ctx.save_for_backward(u, *tensors)
        return u

    @staticmethod
    def backward(ctx, grad_u: Tensor):
        u, *tensors = ctx.saved_tensors
        template: Problem = ctx.template
        bs, T, n = template.batch_shape, template.T, template.n
        g = grad_u.expand(bs + grad_u.shape[-3:]).reshape(bs + (T, n))
        y1 = ctx.fac.solve(g.unsqueeze(-1)).squeeze(-1)
        lam_eps = None
        if template.slack is not None:
            lam_eps = -_dot(ctx.m, y1) / ctx.schur
            y1 = y1 - lam_eps[..., None, None] * ctx.x2
        lam = y1.reshape(u.shape)
        need = ctx.needs_input_grad[2:]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(nd) for t, nd in zip(tensors, need)]
            p = template.with_tensors(leaves)
            phi = objective_cross(p, lam, lam_eps, u, ctx.eps)
            wrt = [x for x, nd in zip(leaves, need) if nd]
            grads = iter(torch.autograd.grad(-phi, wrt, allow_unused=True)) if wrt else iter(())
        out = [next(grads) if nd else None for nd in need]
        return (None, None, *out)


def _choose(method: str, p: Problem) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "auto":
        return method
    return "parallel"


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
        coefficients: ``(..., T, E, D, K)``, ``K = order + 1 >= 2``. A size-1 time axis broadcasts.
        rhs: ``(..., T, E)``; a size-1 time axis broadcasts.
        init: ``(..., T0, D, K0)`` with ``0 <= T0 <= T`` and ``0 <= K0 <= K``.
        steps: ``(..., T-1)`` positive step sizes ``h_t`` (learnable); a size-1 axis means a constant step.
        weight_equation, weight_init, weight_smooth: positive floats or tensors broadcastable to the batch
            shape (learnable).
        central: include the central-difference rows.
        slack: ``gamma_alpha`` to reproduce the seed paper's exact relaxation with one shared slack variable
            (objective ``1/2 sum r^2 - gamma_alpha * eps``); ``None`` leaves the slack out.
        method: ``"parallel"`` (cyclic reduction, O(T) work, O(log T) depth), ``"banded"`` (sequential block
            Cholesky), ``"dense"`` (dense normal equations differentiated by autograd; reference for tests)
            or ``"auto"``.
        num_points: the number of grid points T, needed only when every input has a size-1 time axis.

    Returns:
        u: ``(..., T, D, K)``; ``u[..., 0]`` is the solution, ``u[..., k]`` its k-th derivative.

    Gradients flow to every tensor argument by implicit differentiation of the normal equations (one more
    solve with the stored factorisation). Raises ``ValueError``/``TypeError`` on bad input and
    ``FactorizationError`` when the normal matrix is not positive definite.
    """
    p = prepare(coefficients, rhs, init, steps, weight_equation=weight_equation, weight_init=weight_init,
                weight_smooth=weight_smooth, central=central, slack=slack, num_points=num_points)
    method = _choose(method, p)
    if method == "dense":
        return solve_dense(p)
    return _NeuRLPFunction.apply(p, method, *p.tensors())
