"""The NeuRLP least-squares system: input checks, its rows, and its block-banded normal equations."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from torchmech._stack import caller_level
from torchmech.mnn.linalg.blocktri import FactorizationError


@dataclass
class Problem:
    """Checked NeuRLP inputs, kept at their own (broadcastable) shapes.

    Time axes of size 1 broadcast over all steps; nothing is expanded here so
    time-invariant inputs are never materialised T times.
    """

    coefficients: Tensor  # (..., T or 1, E, D, K)
    rhs: Tensor  # (..., T or 1, E)
    init: Tensor  # (..., T0, D, K0)
    steps: Tensor  # (..., T-1 or 1)
    weight_equation: Tensor  # broadcastable to batch_shape
    weight_init: Tensor
    weight_smooth: Tensor
    slack: Tensor | None  # gamma_alpha, broadcastable to batch_shape, or None
    central: bool
    batch_shape: torch.Size
    T: int
    E: int
    D: int
    K: int
    T0: int
    K0: int

    @property
    def n(self) -> int:
        """Unknowns per time step."""
        return self.D * self.K

    @property
    def dtype(self) -> torch.dtype:
        return self.coefficients.dtype

    @property
    def device(self) -> torch.device:
        return self.coefficients.device

    def tensors(self) -> list[Tensor]:
        """The differentiable inputs, in a fixed order (see `with_tensors`)."""
        out = [self.coefficients, self.rhs, self.init, self.steps,
               self.weight_equation, self.weight_init, self.weight_smooth]
        if self.slack is not None:
            out.append(self.slack)
        return out

    def with_tensors(self, tensors: list[Tensor]) -> "Problem":
        c, r, i, s, we, wi, ws = tensors[:7]
        slack = tensors[7] if self.slack is not None else None
        return Problem(c, r, i, s, we, wi, ws, slack, self.central, self.batch_shape,
                       self.T, self.E, self.D, self.K, self.T0, self.K0)


def _as_tensor(name: str, value, like: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
        return value.to(dtype=like.dtype, device=like.device)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):  # numpy scalars too
        return torch.tensor(float(value), dtype=like.dtype, device=like.device)
    raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")


def _per_sample(name: str, value, like: Tensor) -> Tensor:
    """A weight or slack as a tensor; one element means one value for every sample, whatever its shape (a (1,)
    parameter serves batched and unbatched calls)."""
    w = _as_tensor(name, value, like)
    return w.reshape(()) if w.numel() == 1 and w.dim() > 0 else w


def _check_finite(name: str, x: Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or inf); all entries must be finite")


def _time_size(name: str, size: int, full: int, what: str) -> None:
    if size not in (1, full):
        raise ValueError(f"{name} has {size} {what}; expected {full} (one per {what[:-1]}) or 1 (broadcast)")


def check_central(central) -> None:
    """``central`` must be a bool: a truthy string such as "False" would otherwise switch the rows on."""
    if not isinstance(central, (bool, np.bool_)):
        raise TypeError(f"central must be a bool (include the central-difference rows or not), got {central!r}")


def prepare(coefficients, rhs, init, steps, *, weight_equation=1.0, weight_init=1.0,
            weight_smooth=1.0, central=True, slack=None, num_points=None) -> Problem:
    """Check NeuRLP inputs and work out the problem sizes. Raises ValueError/TypeError naming the argument."""
    if not isinstance(coefficients, Tensor):
        raise TypeError(f"coefficients must be a tensor of shape (..., T, E, D, K), got {type(coefficients).__name__}")
    check_central(central)
    if coefficients.dtype not in (torch.float32, torch.float64):
        # float16/bfloat16 included: their ~3-digit mantissa cannot resolve the normal equations.
        raise TypeError(f"coefficients must be float32 or float64, got dtype {coefficients.dtype} "
                        "(the other inputs are converted to coefficients' dtype)")
    if coefficients.dim() < 4:
        raise ValueError(f"coefficients must have shape (..., T, E, D, K); got shape {tuple(coefficients.shape)}")
    *_, Tc, E, D, K = coefficients.shape
    if K < 2:
        raise ValueError(f"coefficients' last axis is K = order + 1 and must be >= 2 (a first-order ODE has K = 2); got K = {K}")
    if E < 1 or D < 1:
        raise ValueError(f"coefficients must have E >= 1 equations and D >= 1 variables; got shape {tuple(coefficients.shape)}")
    rhs = _as_tensor("rhs", rhs, coefficients)
    init = _as_tensor("init", init, coefficients)
    steps = _as_tensor("steps", steps, coefficients)
    if rhs.dim() < 2 or rhs.shape[-1] != E:
        raise ValueError(f"rhs must have shape (..., T, E) with E = {E} (from coefficients); got shape {tuple(rhs.shape)}")
    if init.dim() < 3 or init.shape[-2] != D or init.shape[-1] > K:
        raise ValueError(f"init must have shape (..., T0, D, K0) with D = {D} and K0 <= K = {K} (from coefficients); "
                         f"got shape {tuple(init.shape)}")
    if steps.dim() < 1:
        steps = steps.reshape(1)
    # Time length: coefficients and rhs count grid points, so a non-broadcast time axis there decides; steps
    # counts intervals (T-1) and decides only when both of them broadcast. Then a steps tensor with one entry
    # per point instead of per interval is reported as a steps error, not blamed on coefficients.
    points = [v for v in (Tc, rhs.shape[-2]) if v > 1]
    if num_points is None and len(set(points)) > 1:
        hint = f"; steps has {steps.shape[-1]} intervals (T = {steps.shape[-1] + 1})" if steps.shape[-1] > 1 else ""
        raise ValueError(f"coefficients has {Tc} time points but rhs has {rhs.shape[-2]}{hint}: the time axes "
                         "must agree (or have size 1, to broadcast)")
    if num_points is None and not points and steps.shape[-1] == 0:
        raise ValueError("the time grid needs at least 2 points; steps has 0 intervals (T = 1)")
    if num_points is not None:
        if not isinstance(num_points, numbers.Integral) or isinstance(num_points, (bool, np.bool_)) or num_points < 2:
            raise ValueError(f"num_points must be an int >= 2, got {num_points!r}")
        T = int(num_points)
    elif points:
        T = max(points)
    elif steps.shape[-1] > 1:
        T = steps.shape[-1] + 1
    else:
        raise ValueError("cannot tell the number of time points T: coefficients, rhs and steps all have a size-1 "
                         "time axis; pass num_points=T")
    if T < 2:
        raise ValueError(f"the time grid needs at least 2 points; got T = {T}")
    _time_size("coefficients", Tc, T, "time points")
    _time_size("rhs", rhs.shape[-2], T, "time points")
    if steps.shape[-1] not in (1, T - 1):
        raise ValueError(f"steps has {steps.shape[-1]} intervals; expected {T - 1} (one per interval of the "
                         f"T = {T}-point grid) or 1 (broadcast): steps must have shape "
                         f"(..., T-1) = (..., {T - 1}) or (..., 1), got shape {tuple(steps.shape)}")
    T0, K0 = init.shape[-3], init.shape[-1]
    if T0 > T:
        raise ValueError(f"init pins T0 = {T0} steps but the grid has only T = {T} points")
    weights = {}
    for name, w in (("weight_equation", weight_equation), ("weight_init", weight_init), ("weight_smooth", weight_smooth)):
        w = _per_sample(name, w, coefficients)
        _check_finite(name, w)
        if bool((w <= 0).any()):
            raise ValueError(f"{name} must be > 0, got min {w.min().item():g}")
        weights[name] = w
    gamma = None
    if slack is not None:
        gamma = _per_sample("slack", slack, coefficients)
        _check_finite("slack", gamma)
    for name, x in (("coefficients", coefficients), ("rhs", rhs), ("init", init), ("steps", steps)):
        _check_finite(name, x)
    if bool((steps <= 0).any()):
        raise ValueError(f"steps must be > 0 (h_t is the spacing between grid points t and t+1); "
                         f"got min {steps.min().item():g}")
    try:
        shapes = [coefficients.shape[:-4], rhs.shape[:-2], init.shape[:-3], steps.shape[:-1]]
        batch_shape = torch.broadcast_shapes(*shapes)
    except RuntimeError:
        raise ValueError(
            "batch dimensions do not broadcast: coefficients (...,T,E,D,K) batch "
            f"{tuple(coefficients.shape[:-4])}, rhs (...,T,E) batch {tuple(rhs.shape[:-2])}, init (...,T0,D,K0) batch "
            f"{tuple(init.shape[:-3])}, steps (...,T-1) batch {tuple(steps.shape[:-1])}"
        ) from None
    for name, w in dict(weights, **({"slack": gamma} if gamma is not None else {})).items():
        # one value per sample: a (T,) weight must not become a batch axis (it used to, silently)
        try:
            fits = torch.broadcast_shapes(batch_shape, w.shape) == batch_shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"{name} has shape {tuple(w.shape)}, which does not broadcast to the batch shape {tuple(batch_shape)} "
                "of coefficients/rhs/init/steps: it is one value per sample (a float, or a tensor broadcastable to "
                "the batch shape; per-time-step weights are not supported, scale the rows' coefficients and rhs "
                "instead)")
    return Problem(coefficients, rhs, init, steps, weights["weight_equation"], weights["weight_init"],
                   weights["weight_smooth"], gamma, bool(central), batch_shape, T, E, D, K, T0, K0)


def pivot_floor(dtype: torch.dtype, T: int) -> float:
    """The smallest pivot L_ii^2 that a Cholesky factor of the normal matrix, scaled to a unit diagonal, may have.

    After the diag(M)^(-1/2) scaling every diagonal entry is 1, so the pivots are relative. A factor with a
    pivot at the rounding-noise level must not be used, not even as a CG preconditioner: on a singular,
    consistent system CG "converges" to an arbitrary member of the solution set. Measured on singular
    systems whose Cholesky happened not to fail, the noise left in the smallest pivot grows like
    0.15 * T * eps (float64: 7 eps at T = 51, 148 at T = 1001, 446 at T = 3001; float32: 1.2 eps at T = 6).
    Well-posed problems: >= 4e-7 (float64 accuracy tests); the random benchmark problems with central rows
    have batch minima down to 4e-5 (banded, B = 1024, T = 1000) in either precision. Hence eps * max(64, T),
    capped at 1e-5 so that those float32 problems keep their float32 factorisation. In float32 a pivot below
    the floor only sends the problem to a float64 factorisation, which then decides; the cap means that from
    T ~ 300 on a singular float32 system can still get past it (3 of 320 grid variants in a sweep did).
    """
    return min(torch.finfo(dtype).eps * max(64, T), 1e-5)


# A Cholesky pivot (of the unit-diagonal normal matrix) below this sends the factorisation to an eigenvalue
# check: singular systems leave pivots up to ~6e-8 in float64 (the rounding noise of the null direction grows
# with the ill-conditioning of the leading blocks), so no pivot floor separates them from well-posed ones
# (>= 4e-7 in the accuracy tests, >= 4e-5 on the random benchmark problems); the smallest eigenvalue does.
SUSPECT_PIVOT = 1e-6


def eigen_floor(T: int) -> float:
    """The smallest eigenvalue of the unit-diagonal float64 normal matrix below which it counts as singular.

    Singular systems measure <= 1.1e-16 (inverse iteration through the factor, or eigvalsh), with no growth
    from T = 7 to 1000. Well-posed ones go far lower than their pivots suggest: high orders over long grids
    are ill-conditioned in the Taylor rows (u'' + u = 0 without central rows at T = 1001, h = 0.002: 8.9e-12;
    at T = 10001, h = 0.001: 4.1e-14; a third-order equation at T = 1001: 5.8e-13) and still solve to their
    discretisation error. 32 eps (7e-15) keeps a factor ~64 above the singular ones and rejects only
    conditions beyond ~1e14, where the normal equations' rounding swamps the solution. (An earlier floor of
    1e3 eps * T rejected the well-posed problems above.) ``T`` is accepted for the call sites' sake.
    """
    return 32 * torch.finfo(torch.float64).eps


ILL_CONDITIONED = 1e-12  # smallest eigenvalue (unit diagonal) below which a solve warns: relative errors ~eps/lam


def warn_ill_conditioned(lam: float) -> None:
    """Warn that a solve above the singularity floor may still carry visible rounding errors."""
    if lam < ILL_CONDITIONED:
        import warnings

        warnings.warn(
            f"solve_linear_ode: the NeuRLP normal matrix is ill-conditioned (smallest eigenvalue {lam:.1e} of its "
            f"diagonal): float64 rounding can leave relative errors up to ~{torch.finfo(torch.float64).eps / lam:.0e} "
            "in the solution; central=True, fewer grid points, or more equations/initial conditions condition it "
            "better", RuntimeWarning, stacklevel=caller_level())


def check_solution(u: Tensor, dtype: torch.dtype) -> None:
    """Raise unless u (computed in the working precision) is finite and fits the caller's dtype.

    A float32 problem is solved in float64 and cast back; a trajectory that leaves float32's range would
    come back as inf. One reduction and one host sync.
    """
    if u.numel() == 0:
        return
    big = u.detach().abs().amax().item()
    if not math.isfinite(big):
        raise FactorizationError(
            f"the NeuRLP solve produced non-finite values (NaN or overflow in {u.dtype}): the normal matrix is "
            "numerically singular or the problem is too badly scaled; check the coefficients, steps and weights")
    limit = torch.finfo(dtype).max
    if big > limit:
        raise OverflowError(
            f"the solution exceeds the {dtype} range: max |u| = {big:.3g} > {limit:.3g} (it was solved in "
            f"{u.dtype} and cannot be cast back); pass float64 inputs, or rescale the problem")


# ----------------------------------------------------------------------------------------------
# Smoothness stencils. Per variable and per interval t, the forward/backward rows form a local
# (2(K-1), 2K) matrix over [u_t, u_{t+1}]; the central row is a 3K vector over [u_t, u_{t+1}, u_{t+2}].
# ----------------------------------------------------------------------------------------------

def _powers(h: Tensor, K: int) -> Tensor:
    """h (...,) -> (..., K) with h**j, built by products so autograd stays finite at any h."""
    out = [torch.ones_like(h)]
    for _ in range(1, K):
        out.append(out[-1] * h)
    return torch.stack(out, -1)


def taylor_stencil(h: Tensor, K: int) -> Tensor:
    """Forward and backward rows of one interval for one variable.

    h (..., S) -> (..., S, 2(K-1), 2K). Row i < K-1 is the forward row of order i, row K-1+i the backward one;
    columns 0..K-1 act on u_t, K..2K-1 on u_{t+1}.
    """
    hp = _powers(h, K)  # (..., S, K)
    mp = _powers(-h, K)
    inv_fact = torch.tensor([1.0 / math.factorial(m) for m in range(K)], dtype=h.dtype, device=h.device)
    rows = []
    for i in range(K - 1):
        fwd = [torch.zeros_like(h)] * i + [hp[..., j] * inv_fact[j - i] for j in range(i, K)]
        fwd += [torch.zeros_like(h)] * K
        fwd[K + i] = -hp[..., i]
        rows.append(torch.stack(fwd, -1))
    for i in range(K - 1):
        bwd = [torch.zeros_like(h)] * K + [torch.zeros_like(h)] * i + [mp[..., j] * inv_fact[j - i] for j in range(i, K)]
        bwd[i] = -mp[..., i]
        rows.append(torch.stack(bwd, -1))
    return torch.stack(rows, -2)


def central_stencil(h: Tensor, K: int, T: int) -> Tensor:
    """Central rows for one variable: h (..., T-1 or 1) -> (..., T-2 or 1, 3K) over [u_t, u_{t+1}, u_{t+2}]."""
    if h.shape[-1] == 1:
        S = 2 * h
    else:
        S = h[..., :-1] + h[..., 1:]
    # S**(K-3) and S**(K-2) by products (K = 2 needs 1/S).
    lo = torch.ones_like(S) if K >= 3 else 1.0 / S
    for _ in range(K - 3):
        lo = lo * S
    hi = lo * S
    z = torch.zeros_like(S)
    cols = [z] * (3 * K)
    cols[K - 2] = lo
    cols[2 * K + K - 2] = -lo
    cols[K + K - 1] = hi
    return torch.stack(cols, -1)


_TAYLOR_CONST: dict = {}


def taylor_constant(K: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The step-free part C (2(K-1), 2K) of the Taylor stencil: taylor_stencil(h) = C * [h^k, h^k] columnwise.

    Every entry of column a of the stencil is a constant times h^(a mod K) (the power of h that goes with
    the derivative the column acts on), so the per-step rows are C scaled column by column. Cached.
    """
    key = (K, dtype, device)
    C = _TAYLOR_CONST.get(key)
    if C is None:
        with torch.inference_mode(False):  # a cached inference tensor would break every later backward
            C = taylor_stencil(torch.ones(1, dtype=dtype, device=device), K)[0]
        _TAYLOR_CONST[key] = C
    return C


def _central_coeffs(h: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """The two distinct central-row entries (lo, hi), each (..., T-2 or 1): the row is
    lo * u_t[K-2] + hi * u_{t+1}[K-1] - lo * u_{t+2}[K-2] (see central_stencil)."""
    S = 2 * h if h.shape[-1] == 1 else h[..., :-1] + h[..., 1:]
    lo = torch.ones_like(S) if K >= 3 else 1.0 / S
    for _ in range(K - 3):
        lo = lo * S
    return lo, lo * S


# ----------------------------------------------------------------------------------------------
# Rows applied to a trajectory: the residuals of every row family (weighted by w, not w^2).
# ----------------------------------------------------------------------------------------------

def _bw(w: Tensor, extra: int) -> Tensor:
    """A batch-shaped weight, with `extra` trailing singleton axes for broadcasting."""
    return w.reshape(w.shape + (1,) * extra)


def row_residuals(p: Problem, u: Tensor, eps: Tensor | None = None, target: bool = True) -> list[Tensor]:
    """Weighted residuals of all rows at trajectory u (..., T, D, K) and slack eps (...,).

    With target=False the right-hand sides are left out, i.e. this applies the row matrix A.
    Returns a list of tensors, one per row family (equation, initial, taylor, central).
    """
    T, K = p.T, p.K
    c = p.coefficients
    eq = (c * u.unsqueeze(-3)).sum((-1, -2))  # (..., T, E)
    if target:
        eq = eq - p.rhs
    out = [_bw(p.weight_equation, 2) * eq]
    if p.T0 > 0 and p.K0 > 0:
        iv = u[..., : p.T0, :, : p.K0]
        if target:
            iv = iv - p.init
        out.append(_bw(p.weight_init, 3) * iv)
    # Taylor rows = C scaled columnwise by the step powers: two plain matmuls with the constant C.
    C = taylor_constant(K, u.dtype, u.device)
    hp = _powers(p.steps, K).unsqueeze(-2)  # (..., T-1 or 1, 1, K)
    tay = (u[..., :-1, :, :] * hp) @ C[:, :K].T + (u[..., 1:, :, :] * hp) @ C[:, K:].T  # (..., T-1, D, 2(K-1))
    if eps is not None:
        tay = tay + eps.reshape(eps.shape + (1, 1, 1))
    out.append(_bw(p.weight_smooth, 3) * tay)
    if p.central and T >= 3:
        lo, hi = _central_coeffs(p.steps, K)  # (..., T-2 or 1) each
        cen = (lo.unsqueeze(-1) * (u[..., :-2, :, K - 2] - u[..., 2:, :, K - 2])
               + hi.unsqueeze(-1) * u[..., 1:-1, :, K - 1])  # (..., T-2, D)
        if eps is not None:
            cen = cen - eps.reshape(eps.shape + (1, 1))
        out.append(_bw(p.weight_smooth, 2) * cen)
    return out


def objective_cross(p: Problem, lam: Tensor, lam_eps: Tensor | None, u: Tensor, eps: Tensor | None) -> Tensor:
    """Phi = sum_r w_r^2 (a_r . lam)(a_r . z - y_r) - gamma * lam_eps, summed over the batch.

    Its gradient with respect to the problem's tensors, negated, is the implicit gradient of a loss whose
    gradient with respect to z is H lam (H the normal matrix). See solve.py.
    """
    ra = row_residuals(p, lam, lam_eps, target=False)
    rb = row_residuals(p, u, eps, target=True)
    phi = sum((a * b).sum() for a, b in zip(ra, rb))
    if p.slack is not None:
        phi = phi - (p.slack * lam_eps).sum()
    return phi


def objective_cross_grads(p: Problem, lam: Tensor, lam_eps: Tensor | None, u: Tensor, eps: Tensor | None,
                          need: list[bool]) -> list[Tensor | None]:
    """The gradients of -objective_cross with respect to p.tensors(), written out (None where not needed, or
    where the input reaches no row: init and weight_init without initial rows).

    Differentiating objective_cross by autograd records and replays ~60 operations on (..., T, D, K) tensors;
    written out, every row family's residuals are formed once for lam and once for u and each gradient is one or
    two products of them: no graph, and ~21 -> ~19 ms at B = 64, T = 1000 (small-inner-dimension matmuls dominate
    both). The C kernel native.objective_grads, used on the CPU when available, takes ~5 ms. This is the path
    elsewhere (CUDA, or without a C compiler). Each row family contributes w^2 (a . lam)(a . u - y); with
    ea = a . lam and eb = a . u - y its derivative is w^2 (ea d(a . u - y) + eb d(a . lam)).
    tests/mnn/test_agreement.py checks both against autograd through objective_cross.
    """
    T, K, T0, K0 = p.T, p.K, p.T0, p.K0
    out: list[Tensor | None] = [None] * len(need)

    def put(i: int, g: Tensor, like: Tensor) -> None:
        out[i] = (-g).sum_to_size(like.shape)

    # equation rows: a . x = sum_{d,k} c[t,e,d,k] x[t,d,k], target rhs[t,e]
    c = p.coefficients
    ea = (c * lam.unsqueeze(-3)).sum((-1, -2))  # (..., T, E)
    eb = (c * u.unsqueeze(-3)).sum((-1, -2)) - p.rhs
    we2 = _bw(p.weight_equation, 2) ** 2
    if need[0]:
        put(0, _bw(we2, 2) * (lam.unsqueeze(-3) * eb[..., None, None] + ea[..., None, None] * u.unsqueeze(-3)), c)
    if need[1]:
        put(1, -we2 * ea, p.rhs)
    if need[4]:
        put(4, 2 * p.weight_equation * (ea * eb).sum((-1, -2)), p.weight_equation)

    # initial rows: x[t,d,k] for t < T0, k < K0, target init
    if T0 > 0 and K0 > 0:
        la = lam[..., :T0, :, :K0]
        if need[2]:
            put(2, -_bw(p.weight_init, 3) ** 2 * la, p.init)
        if need[5]:
            put(5, 2 * p.weight_init * (la * (u[..., :T0, :, :K0] - p.init)).sum((-1, -2, -3)), p.weight_init)

    # Taylor rows of interval t: C1 (hp x_t) + C2 (hp x_{t+1}), hp = h_t^j per derivative j; + the slack
    C = taylor_constant(K, u.dtype, u.device)
    C1, C2 = C[:, :K], C[:, K:]
    h = p.steps
    hp = _powers(h, K).unsqueeze(-2)  # (..., T-1|1, 1, K)
    ta = (lam[..., :-1, :, :] * hp) @ C1.T + (lam[..., 1:, :, :] * hp) @ C2.T  # (..., T-1, D, 2(K-1))
    tb = (u[..., :-1, :, :] * hp) @ C1.T + (u[..., 1:, :, :] * hp) @ C2.T
    if lam_eps is not None:
        ta = ta + lam_eps.reshape(lam_eps.shape + (1, 1, 1))
    if eps is not None:
        tb = tb + eps.reshape(eps.shape + (1, 1, 1))
    ws = p.weight_smooth
    ws2 = _bw(ws, 1) ** 2
    smooth = (ta * tb).sum((-1, -2, -3)) if need[6] else None
    g_h = None
    if need[3]:
        # d phi / d hp[t, j], summed over the variables; h^j's derivative is j h^(j-1)
        g_hp = (u[..., :-1, :, :] * (ta @ C1) + u[..., 1:, :, :] * (ta @ C2)
                + lam[..., :-1, :, :] * (tb @ C1) + lam[..., 1:, :, :] * (tb @ C2)).sum(-2)  # (..., T-1, K)
        dpow = torch.cat([torch.zeros_like(hp[..., :1]),
                          hp[..., :-1] * torch.arange(1, K, dtype=h.dtype, device=h.device)], -1).squeeze(-2)
        g_h = ws2 * (g_hp * dpow).sum(-1)  # (..., T-1)
    if p.central and T >= 3:
        # central row of t: lo (x_t[K-2] - x_{t+2}[K-2]) + hi x_{t+1}[K-1] - slack, with S = h_t + h_{t+1},
        # lo = S^(K-3), hi = S^(K-2)
        lo, hi = _central_coeffs(h, K)  # (..., T-2|1)
        da = lam[..., :-2, :, K - 2] - lam[..., 2:, :, K - 2]  # (..., T-2, D)
        db = u[..., :-2, :, K - 2] - u[..., 2:, :, K - 2]
        ma, mb = lam[..., 1:-1, :, K - 1], u[..., 1:-1, :, K - 1]
        ca = lo.unsqueeze(-1) * da + hi.unsqueeze(-1) * ma
        cb = lo.unsqueeze(-1) * db + hi.unsqueeze(-1) * mb
        if lam_eps is not None:
            ca = ca - lam_eps.reshape(lam_eps.shape + (1, 1))
        if eps is not None:
            cb = cb - eps.reshape(eps.shape + (1, 1))
        if smooth is not None:
            smooth = smooth + (ca * cb).sum((-1, -2))
        if g_h is not None:
            S = 2 * h if h.shape[-1] == 1 else h[..., :-1] + h[..., 1:]
            g_lo = (ca * db + cb * da).sum(-1)  # (..., T-2)
            g_hi = (ca * mb + cb * ma).sum(-1)
            g_S = ws2 * (g_lo * ((K - 3) * lo / S) + g_hi * ((K - 2) * hi / S))
            if h.shape[-1] == 1:  # one step for all intervals: S = 2 h
                g_h = g_h.sum(-1, keepdim=True) + 2 * g_S.sum(-1, keepdim=True)
            else:
                g_h = g_h + torch.nn.functional.pad(g_S, (0, 1)) + torch.nn.functional.pad(g_S, (1, 0))
    if need[3]:
        put(3, g_h, h)
    if need[6]:
        put(6, 2 * ws * smooth, ws)
    if p.slack is not None and need[7]:
        put(7, -lam_eps, p.slack)
    return out


# ----------------------------------------------------------------------------------------------
# Normal equations in block-banded form.
# ----------------------------------------------------------------------------------------------

@dataclass
class BandedSystem:
    """Normal matrix of one problem in block form with blocks of size n = D*K.

    diag (..., T, n, n); off1 (..., T-1, n, n) = M[t, t+1]; off2 (..., T-2, n, n) = M[t, t+2] or None;
    b (..., T, n); and for the slack border: m (..., T, n), mu (...,), gamma (...,).
    """

    diag: Tensor
    off1: Tensor
    off2: Tensor | None
    b: Tensor
    m: Tensor | None = None
    mu: Tensor | None = None
    gamma: Tensor | None = None


def _per_variable(x: Tensor, D: int) -> Tensor:
    """(K, K, ...) per-variable block -> (D*K, D*K, ...) block diagonal over the D variables."""
    if D == 1:
        return x
    K = x.shape[0]
    y = x.new_zeros((D * K, D * K) + x.shape[2:])
    for d in range(D):
        y[d * K:(d + 1) * K, d * K:(d + 1) * K] = x
    return y


def _expand_time(x: Tensor, size: int, batch_shape: torch.Size, tail: int) -> Tensor:
    """Broadcast x (..., S, *tail) with S in {1, size} to batch_shape + (size, *tail)."""
    shape = batch_shape + (size,) + x.shape[x.dim() - tail:]
    return x.expand(shape)


def _lead(x: Tensor, k: int) -> Tensor:
    """(..., *last k axes) -> (*last k axes, ...), contiguous in that order."""
    nd = x.dim()
    return x.permute(*range(nd - k, nd), *range(nd - k)).contiguous()


def _blocks(x: Tensor) -> Tensor:
    """View (a, b, ...) as (..., a, b) (no copy)."""
    nd = x.dim()
    return x.permute(*range(2, nd), 0, 1)


def _const(A: Tensor, like: Tensor) -> Tensor:
    """A (a, b) shaped to broadcast against (a, b, ...) like."""
    return A.reshape(A.shape + (1,) * (like.dim() - 2))


def assemble(p: Problem, soa: bool = False) -> BandedSystem:
    """Form the block-banded normal equations A^T W A z = A^T W y (and the slack border).

    The blocks are computed in structure-of-arrays layout (block entry first, time last), where every
    product runs along the long time axis instead of over tiny trailing K x K axes (4-10x faster on
    CPU). With ``soa`` the system's blocks are (..., T, n, n) views of that storage (what the
    unrolled cyclic-reduction kernels read); otherwise they are copied to the usual contiguous layout.
    """
    T, D, K, n, bs = p.T, p.D, p.K, p.n, p.batch_shape
    dt, dev = p.dtype, p.device
    c = p.coefficients.reshape(*p.coefficients.shape[:-2], n)  # (..., T|1, E, n)
    # every operand carries the full batch shape, which sits between the block axes and time
    we2 = p.weight_equation.expand(bs).unsqueeze(-1) ** 2  # (*bs, 1): broadcasts against (..., *bs, T|1)
    ws2 = p.weight_smooth.expand(bs).unsqueeze(-1) ** 2
    cT = _lead(_expand_time(c, c.shape[-3], bs, 2), 2)  # (E, n, *bs, T|1)
    if p.E == 1:
        eq_b = c.squeeze(-2) * p.rhs
    else:
        eq_b = (c * p.rhs.unsqueeze(-1)).sum(-2)  # (..., T|1, n)
    b = _expand_time(_bw(p.weight_equation, 2) ** 2 * eq_b, T, bs, 1).clone()

    # Smoothness: the local Gram of interval t is ws^2 * (C^T C) * (q q^T) with q = [h_t^k, h_t^k] (see
    # taylor_constant), so its K x K quarters are constant matrices times the outer product of the step powers.
    C = taylor_constant(K, dt, dev)
    A = C.T @ C
    steps = _expand_time(p.steps, p.steps.shape[-1], bs, 0)  # (*bs, T-1|1)
    hp = _powers(steps, K)  # (*bs, T-1|1, K)
    hpT = _lead(hp, 1)  # (K, *bs, T-1|1)
    whh = ws2 * (hpT[:, None] * hpT[None, :])  # (K, K, ..., T-1|1)
    sdiag = torch.zeros((K, K) + bs + (T,), dtype=dt, device=dev)
    sdiag[..., :-1] += whh * _const(A[:K, :K], whh)
    sdiag[..., 1:] += whh * _const(A[K:, K:], whh)
    soff1 = (whh * _const(A[:K, K:], whh)).expand((K, K) + bs + (T - 1,)).clone()
    soff2 = None
    m_var = None
    if p.slack is not None:
        # Slack column: +1 in every Taylor row (weight w_s), -1 in every central row.
        csum = C.sum(0)
        ws2v = _bw(p.weight_smooth, 2) ** 2
        m_var = torch.zeros(bs + (T, K), dtype=dt, device=dev)
        m_var[..., :-1, :] += ws2v * csum[:K] * hp
        m_var[..., 1:, :] += ws2v * csum[K:] * hp
    if p.central and T >= 3:
        # The central row has three non-zeros (u_t[K-2], u_{t+1}[K-1], u_{t+2}[K-2]); add their nine
        # products directly instead of forming a dense 3K x 3K Gram per step.
        lo, hi = _central_coeffs(steps, K)
        idx = (K - 2, K - 1, K - 2)
        v = [lo, hi, -lo]  # (..., T-2 | 1) each
        soff2 = torch.zeros((K, K) + bs + (T - 2,), dtype=dt, device=dev)
        for a in range(3):
            sdiag[idx[a], idx[a], ..., a: T - 2 + a] += ws2 * v[a] * v[a]
        soff1[idx[0], idx[1], ..., :-1] += ws2 * v[0] * v[1]
        soff1[idx[1], idx[2], ..., 1:] += ws2 * v[1] * v[2]
        soff2[idx[0], idx[2]] += ws2 * v[0] * v[2]
        if m_var is not None:
            for a in range(3):
                m_var[..., a: T - 2 + a, idx[a]] -= ws2 * v[a]
    diag = _per_variable(sdiag, D)  # fresh (n, n, *bs, T)
    for e in range(p.E):  # + we^2 c_e c_e^T per equation, in place (no (n, n, *bs, T) temporaries)
        diag.addcmul_(cT[e][:, None] * we2, cT[e][None, :])
    off1 = _per_variable(soff1, D)
    off2 = _per_variable(soff2, D) if soff2 is not None else None

    if p.T0 > 0 and p.K0 > 0:
        wi2 = _bw(p.weight_init, 3) ** 2
        ivd = torch.zeros(bs + (p.T0, D, K), dtype=dt, device=dev)
        ivd[..., : p.K0] = wi2
        ivb = torch.zeros(bs + (p.T0, D, K), dtype=dt, device=dev)
        ivb[..., : p.K0] = wi2 * p.init
        diag.diagonal(dim1=0, dim2=1)[..., : p.T0, :] += ivd.reshape(bs + (p.T0, n))
        b[..., : p.T0, :] += ivb.reshape(bs + (p.T0, n))

    diag, off1 = _blocks(diag), _blocks(off1)
    off2 = _blocks(off2) if off2 is not None else None
    if not soa:
        diag, off1 = diag.contiguous(), off1.contiguous()
        off2 = off2.contiguous() if off2 is not None else None
    sys = BandedSystem(diag, off1, off2, b)
    if p.slack is not None:
        m = m_var.unsqueeze(-2).expand(bs + (T, D, K)).reshape(bs + (T, n))
        rows = 2 * (K - 1) * (T - 1) + ((T - 2) if (p.central and T >= 3) else 0)
        mu = (p.weight_smooth ** 2).expand(bs) * (rows * D)
        sys.m, sys.mu, sys.gamma = m, mu, p.slack.expand(bs)
    return sys
