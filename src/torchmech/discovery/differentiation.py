"""Numerical differentiation of sampled trajectories: finite differences, Savitzky-Golay, splines, TV, weak form."""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "Differentiator",
    "FiniteDifference",
    "SavitzkyGolay",
    "SmoothingSpline",
    "TotalVariation",
    "WeakForm",
]


def _as_tensor(v, name: str, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        out = v
    elif isinstance(v, (np.ndarray, list, tuple)):
        out = torch.as_tensor(np.asarray(v, dtype=np.float64))
    else:
        raise TypeError(f"{name}: expected a tensor or array, got {type(v).__name__}")
    if not out.is_floating_point():
        out = out.to(torch.float64)
    if like is not None:
        out = out.to(device=like.device)
    return out


def check_xt(x, t, min_points: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``x`` (..., T, D) and ``t`` (T,) or (..., T) (or a float step); return tensors.

    ``t`` is returned in float64 with shape broadcastable to ``x.shape[:-1]``.
    """
    x = _as_tensor(x, "x")
    if x.ndim < 2:
        raise ValueError(f"x: expected shape (..., T, D), got {tuple(x.shape)}")
    T = x.shape[-2]
    if T < min_points:
        raise ValueError(f"x: expected at least {min_points} time samples along axis -2, got {T}")
    if not torch.isfinite(x).all():
        raise ValueError("x: expected finite values, got NaN or infinite entries")
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"t: a scalar t is the time step and must be finite and > 0, got {t!r}")
        t = torch.arange(T, dtype=torch.float64, device=x.device) * float(t)
    t = _as_tensor(t, "t", like=x).to(torch.float64)
    if t.ndim < 1 or t.shape[-1] != T:
        raise ValueError(f"t: expected shape ({T},) or (..., {T}) matching x of shape {tuple(x.shape)}, got {tuple(t.shape)}")
    try:
        torch.broadcast_shapes(t.shape, x.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"t: leading shape {tuple(t.shape[:-1])} does not broadcast with x's {tuple(x.shape[:-2])}"
        ) from None
    if not torch.isfinite(t).all():
        raise ValueError("t: expected finite times, got NaN or infinite values")
    if not (t[..., 1:] > t[..., :-1]).all():
        raise ValueError("t: expected strictly increasing times along the last axis")
    return x, t


class Differentiator:
    """Base class: ``est(x, t) -> dx``, derivative along the time axis -2.

    Call with ``x`` of shape (..., T, D) and ``t`` of shape (T,), (..., T) or a float time step;
    returns (..., T, D) with the dtype and device of ``x``.
    """

    min_points = 2

    def __call__(self, x, t) -> torch.Tensor:
        x, t = check_xt(x, t, self.min_points)
        return self._differentiate(x, t)

    def _differentiate(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _window_indices(T: int, W: int, device) -> torch.Tensor:
    """(T, W) indices of a window of W samples around each point, shifted inside [0, T)."""
    start = torch.arange(T, device=device) - (W - 1) // 2
    start = start.clamp(0, T - W)
    return start[:, None] + torch.arange(W, device=device)[None, :]


class _LocalPolynomial(Differentiator):
    """Derivative at each point of a polynomial fitted (least squares) to a local window."""

    def _window_and_degree(self) -> tuple[int, int]:
        raise NotImplementedError

    def _differentiate(self, x, t):
        W, q = self._window_and_degree()
        T = x.shape[-2]
        idx = _window_indices(T, W, x.device)  # (T, W)
        s = t[..., idx] - t[..., :, None]  # (..., T, W) offsets in float64
        h = (t[..., idx[:, -1]] - t[..., idx[:, 0]]) / (W - 1)  # (..., T) local step
        s = s / h[..., None]
        V = torch.stack([s**k for k in range(q + 1)], dim=-1)  # (..., T, W, q+1)
        e1 = torch.zeros(q + 1, dtype=t.dtype, device=t.device)
        e1[1] = 1.0
        if W == q + 1:  # interpolation: V^T w = e1
            w = torch.linalg.solve(V.transpose(-1, -2), e1.expand(V.shape[:-2] + (q + 1,)))
        else:  # least squares: w = V (V^T V)^-1 e1
            G = V.transpose(-1, -2) @ V
            z = torch.linalg.solve(G, e1.expand(G.shape[:-1]))
            w = (V @ z[..., None])[..., 0]
        w = (w / h[..., None]).to(x.dtype)  # (..., T, W)
        xs = x[..., idx, :]  # (..., T, W, D)
        return (w[..., None] * xs).sum(dim=-2)


class FiniteDifference(_LocalPolynomial):
    """Finite differences of accuracy ``order`` on any (also irregular) time grid.

    Each derivative uses the ``order + 1`` nearest samples (centred where possible, one-sided
    at the ends), with weights exact for polynomials of degree ``order``. ``order=1`` is the
    forward difference (backward at the last sample), ``order=2`` the classic 3-point rule.
    """

    def __init__(self, order: int = 2):
        if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 8:
            raise ValueError(f"order: expected an int in [1, 8], got {order!r}")
        self.order = order
        self.min_points = order + 1

    def _window_and_degree(self):
        return self.order + 1, self.order

    def __repr__(self) -> str:
        return f"FiniteDifference(order={self.order})"


class SavitzkyGolay(_LocalPolynomial):
    """Savitzky-Golay derivative: local least-squares polynomial of degree ``polyorder``.

    Args:
        window: odd number of samples per window (> polyorder). Windows near the ends are
            shifted inside the series; irregular grids use the actual sample times.
        polyorder: degree of the local polynomial (>= 1).
    """

    def __init__(self, window: int = 9, polyorder: int = 3):
        if isinstance(polyorder, bool) or not isinstance(polyorder, int) or polyorder < 1:
            raise ValueError(f"polyorder: expected an int >= 1, got {polyorder!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window % 2 == 0 or window <= polyorder:
            raise ValueError(f"window: expected an odd int > polyorder ({polyorder}), got {window!r}")
        self.window = window
        self.polyorder = polyorder
        self.min_points = window

    def _window_and_degree(self):
        return self.window, self.polyorder

    def __repr__(self) -> str:
        return f"SavitzkyGolay(window={self.window}, polyorder={self.polyorder})"


def _series(x: torch.Tensor, t: torch.Tensor):
    """Flatten to numpy float64 series: xs (N, T), ts (N, T), and the restore shape."""
    shape = x.shape
    tb = torch.broadcast_to(t[..., None], shape[:-1] + (1,)).expand(shape)  # (..., T, D)
    xs = x.detach().to("cpu", torch.float64).movedim(-2, -1).reshape(-1, shape[-2]).numpy()
    ts = tb.detach().to("cpu", torch.float64).movedim(-2, -1).reshape(-1, shape[-2]).numpy()
    return xs, ts


def _progress(n: int, show: bool, desc: str):
    from tqdm import tqdm

    return tqdm(range(n), desc=desc, disable=not show, leave=False)


def _unseries(d: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    out = torch.from_numpy(np.ascontiguousarray(d)).reshape(shape[:-2] + (shape[-1], shape[-2])).movedim(-1, -2)
    return out.to(dtype=x.dtype, device=x.device)


def _penta_ldl(d0: np.ndarray, d1: np.ndarray, d2: np.ndarray):
    """LDL^T of symmetric pentadiagonal matrices given by their bands (..., m) (d1, d2 zero-padded).

    Returns D, L1, L2 with L1[i] = L[i+1, i] and L2[i] = L[i+2, i]; vectorised over leading axes.
    """
    m = d0.shape[-1]
    D = np.empty_like(d0)
    L1 = np.zeros_like(d0)
    L2 = np.zeros_like(d0)
    for i in range(m):
        di = d0[..., i].copy()
        off = d1[..., i].copy()
        if i >= 1:
            di -= L1[..., i - 1] ** 2 * D[..., i - 1]
            off -= L2[..., i - 1] * D[..., i - 1] * L1[..., i - 1]
        if i >= 2:
            di -= L2[..., i - 2] ** 2 * D[..., i - 2]
        D[..., i] = di
        if i + 1 < m:
            L1[..., i] = off / di
        if i + 2 < m:
            L2[..., i] = d2[..., i] / di
    return D, L1, L2


def _penta_solve(D: np.ndarray, L1: np.ndarray, L2: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Solve L D L^T x = r (r broadcastable to D's shape)."""
    m = D.shape[-1]
    z = np.array(np.broadcast_to(r, D.shape))
    for i in range(1, m):
        z[..., i] -= L1[..., i - 1] * z[..., i - 1]
        if i >= 2:
            z[..., i] -= L2[..., i - 2] * z[..., i - 2]
    z /= D
    for i in range(m - 2, -1, -1):
        z[..., i] -= L1[..., i] * z[..., i + 1]
        if i + 2 < m:
            z[..., i] -= L2[..., i] * z[..., i + 2]
    return z


def _penta_inverse_bands(D: np.ndarray, L1: np.ndarray, L2: np.ndarray):
    """Main, first and second bands of the inverse of L D L^T (selected inversion, O(m))."""
    m = D.shape[-1]
    S0 = np.empty_like(D)
    S1 = np.zeros_like(D)  # S1[i] = inv[i, i+1]
    S2 = np.zeros_like(D)  # S2[i] = inv[i, i+2]
    S0[..., m - 1] = 1.0 / D[..., m - 1]
    S1[..., m - 2] = -L1[..., m - 2] * S0[..., m - 1]
    S0[..., m - 2] = 1.0 / D[..., m - 2] - L1[..., m - 2] * S1[..., m - 2]
    for i in range(m - 3, -1, -1):
        a, b = L1[..., i], L2[..., i]
        S1[..., i] = -(a * S0[..., i + 1] + b * S1[..., i + 1])
        S2[..., i] = -(a * S1[..., i + 1] + b * S0[..., i + 2])
        S0[..., i] = 1.0 / D[..., i] - a * S1[..., i] - b * S2[..., i]
    return S0, S1, S2


class _SplineBands:
    """The Reinsch matrices of a natural cubic smoothing spline on grids t (N, n), as bands.

    With h_i = t_{i+1} - t_i, Q (n, n-2) is the second-difference matrix and R (n-2, n-2) the
    tridiagonal Gram matrix of the spline's second derivatives; the spline minimising
    ``sum (y_i - g(t_i))^2 + lam * integral g''^2`` has interior second derivatives gamma solving
    ``(R + lam Q^T Q) gamma = Q^T y`` and values ``g = y - lam Q gamma`` (Green & Silverman 1994).
    """

    def __init__(self, t: np.ndarray):
        self.h = h = np.diff(t, axis=-1)
        self.a = 1.0 / h[..., :-1]
        self.c = 1.0 / h[..., 1:]
        self.b = -(self.a + self.c)
        a, b, c = self.a, self.b, self.c
        self.R0 = (h[..., :-1] + h[..., 1:]) / 3.0
        self.R1 = np.zeros_like(self.R0)
        self.R1[..., :-1] = h[..., 1:-1] / 6.0
        self.P0 = a * a + b * b + c * c  # bands of Q^T Q
        self.P1 = np.zeros_like(self.R0)
        self.P1[..., :-1] = b[..., :-1] * a[..., 1:] + c[..., :-1] * b[..., 1:]
        self.P2 = np.zeros_like(self.R0)
        self.P2[..., :-2] = c[..., :-2] * a[..., 2:]

    def fit(self, y: np.ndarray, lam: np.ndarray):
        """y (N, n), lam (N, G) -> gamma (N, G, n-2), Q gamma (N, G, n) and the factors."""
        a, b, c = self.a[:, None], self.b[:, None], self.c[:, None]
        qty = self.a * y[..., :-2] + self.b * y[..., 1:-1] + self.c * y[..., 2:]
        L = lam[..., None]
        D, L1, L2 = _penta_ldl(self.R0[:, None] + L * self.P0[:, None], self.R1[:, None] + L * self.P1[:, None],
                               L * self.P2[:, None])
        gamma = _penta_solve(D, L1, L2, qty[:, None])
        qg = np.zeros(gamma.shape[:-1] + (y.shape[-1],))
        qg[..., :-2] += a * gamma
        qg[..., 1:-1] += b * gamma
        qg[..., 2:] += c * gamma
        return gamma, qg, (D, L1, L2)

    def gcv(self, y: np.ndarray, lam: np.ndarray) -> np.ndarray:
        """Generalised cross-validation score ``n RSS / (n - tr A)^2`` for lam (N, G) -> (N, G)."""
        n = y.shape[-1]
        _, qg, factors = self.fit(y, lam)
        S0, S1, S2 = _penta_inverse_bands(*factors)
        # n - tr(A) = lam * tr((R + lam Q^T Q)^-1 Q^T Q): only the inverse's five bands are needed
        tr = (S0 * self.P0[:, None]).sum(-1) + 2 * (S1 * self.P1[:, None]).sum(-1) + 2 * (S2 * self.P2[:, None]).sum(-1)
        rss = lam**2 * (qg**2).sum(-1)
        return n * rss / np.maximum(lam * tr, 1e-300) ** 2

    def values(self, y: np.ndarray, lam: np.ndarray) -> np.ndarray:
        """The smoothing spline at the samples, y (N, n), lam (N,) -> (N, n)."""
        _, qg, _ = self.fit(y, lam[:, None])
        return y - lam[:, None] * qg[:, 0]

    def derivative(self, y: np.ndarray, lam: np.ndarray) -> np.ndarray:
        """Derivative of the smoothing spline at the samples, y (N, n), lam (N,) -> (N, n)."""
        gamma, qg, _ = self.fit(y, lam[:, None])
        g = y - lam[:, None] * qg[:, 0]
        G = np.zeros_like(y)
        G[:, 1:-1] = gamma[:, 0]
        h = self.h
        d = np.empty_like(y)
        d[:, :-1] = (g[:, 1:] - g[:, :-1]) / h - h * (2 * G[:, :-1] + G[:, 1:]) / 6
        d[:, -1] = (g[:, -1] - g[:, -2]) / h[:, -1] + h[:, -1] * (G[:, -2] + 2 * G[:, -1]) / 6
        return d


class SmoothingSpline(Differentiator):
    """Derivative of a natural cubic smoothing spline, batched over series.

    Each series y sampled at t (any strictly increasing grid) is replaced by the natural cubic
    spline g minimising ``sum_i (y_i - g(t_i))^2 + lam * integral g''(t)^2 dt`` (scipy's
    ``make_smoothing_spline`` convention), and g' is returned at the samples. The spline is
    computed in Reinsch form with banded O(T) solves, vectorised over all series.

    Args:
        lam: smoothing parameter (>= 0); ``None`` chooses it per series by generalised
            cross-validation (a log-spaced grid over 16 decades around the grid's natural scale,
            then a finer grid around the best value).
        progress: show a tqdm bar over chunks of series.

    Runs on CPU in float64; the result follows ``x``'s dtype and device.
    """

    min_points = 5
    _GRID = np.linspace(-8.0, 8.0, 41)  # log10 of lam relative to tr(R) / tr(Q^T Q)
    _CHUNK_ELEMENTS = 4_000_000  # series * lam values * samples per chunk: bounds memory

    def __init__(self, lam: float | None = None, progress: bool = False):
        self.progress = bool(progress)
        if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0
                                or not math.isfinite(lam)):
            raise ValueError(f"lam: expected None or a finite number >= 0, got {lam!r}")
        self.lam = lam

    def _choose_lam(self, bands: _SplineBands, y: np.ndarray) -> np.ndarray:
        ref = bands.R0.sum(-1) / bands.P0.sum(-1)  # (N,): lam at which R and lam Q^T Q balance
        grid = self._GRID
        k = bands.gcv(y, ref[:, None] * 10.0 ** grid[None]).argmin(-1)
        step = grid[1] - grid[0]
        fine = grid[k][:, None] + np.linspace(-step, step, 11)[None]
        k2 = bands.gcv(y, ref[:, None] * 10.0**fine).argmin(-1)
        return ref * 10.0 ** fine[np.arange(len(k2)), k2]

    def _differentiate(self, x, t):
        return self._apply(x, t, "derivative")

    def smooth(self, x, t) -> torch.Tensor:
        """The smoothing spline's values at the samples (same layouts and lam choice as the derivative)."""
        x, t = check_xt(x, t, self.min_points)
        return self._apply(x, t.to(x.device), "values")

    def _apply(self, x, t, what: str):
        xs, ts = _series(x, t)
        N, T = xs.shape
        out = np.empty_like(xs)
        per_series = T * (1 if self.lam is not None else len(self._GRID))
        chunk = max(1, self._CHUNK_ELEMENTS // per_series)
        starts = range(0, N, chunk)
        from tqdm import tqdm

        for s in tqdm(starts, desc="smoothing splines", disable=not self.progress, leave=False):
            y, tt = xs[s:s + chunk], ts[s:s + chunk]
            bands = _SplineBands(tt)
            lam = np.full(len(y), float(self.lam)) if self.lam is not None else self._choose_lam(bands, y)
            out[s:s + chunk] = getattr(bands, what)(y, lam)
        return _unseries(out, x)

    def __repr__(self) -> str:
        return f"SmoothingSpline(lam={self.lam})"


class TotalVariation(Differentiator):
    """Total-variation regularised differentiation (Chartrand 2011 style), iterative.

    For each series f sampled at t, finds the smooth antiderivative y minimising

        1/2 * sum_i q_i (y_i - f_i)^2  +  alpha * sum_i |u_{i+1} - u_i|,   u_i = (y_{i+1} - y_i) / h_i

    (q_i trapezoid weights, so the fit term approximates the integral of the squared residual),
    i.e. the derivative u has small total variation: piecewise-constant where the data are noisy,
    sharp jumps kept. Each series is scaled to unit standard deviation first, so ``alpha`` does
    not depend on the units of the data. Solved by lagged-diffusivity iterations (majorise-
    minimise): every iteration is one symmetric pentadiagonal solve, O(T). The derivative at the
    samples interpolates the midpoint slopes u linearly.

    ``alpha`` carries units of time squared (the data are unit-free after scaling, the fit term is
    an integral over time and the TV term is not): on signals whose features last about ``tau``
    time units, values around ``1e-5 * tau**2`` to ``1e-3 * tau**2`` work; larger is smoother. The
    default suits dynamics on time scales of order 1 (e.g. Lorenz at its usual parameters).

    Args:
        alpha: regularisation weight (> 0); larger is smoother.
        max_iter: maximal lagged-diffusivity iterations.
        tol: stop when the relative change of y is below ``tol``.
        eps: smoothing of |.| in the TV term, relative to the largest |u_{i+1} - u_i| of the data.
        progress: show a tqdm bar over the series.

    Runs on CPU in float64 (scipy banded solver per series); the result follows ``x``.
    """

    min_points = 3

    def __init__(self, alpha: float = 1e-5, max_iter: int = 100, tol: float = 1e-8, eps: float = 1e-6,
                 progress: bool = False):
        self.progress = bool(progress)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or not math.isfinite(alpha):
            raise ValueError(f"alpha: expected a finite number > 0, got {alpha!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter: expected an int >= 1, got {max_iter!r}")
        if not tol > 0 or not eps > 0:
            raise ValueError(f"tol, eps: expected numbers > 0, got {tol!r}, {eps!r}")
        self.alpha = float(alpha)
        self.max_iter = max_iter
        self.tol = float(tol)
        self.eps = float(eps)

    def _one(self, f: np.ndarray, t: np.ndarray) -> np.ndarray:
        from scipy.linalg import solveh_banded

        T = len(f)
        h = np.diff(t)
        scale = f.std()
        if not scale > 0:
            return np.zeros_like(f)
        fn = (f - f.mean()) / scale
        q = np.zeros(T)
        q[:-1] += h / 2
        q[1:] += h / 2
        a = 1.0 / h[:-1]
        c = 1.0 / h[1:]
        b = -(a + c)

        def d2(y):
            u = np.diff(y) / h
            return np.diff(u)

        y = fn.copy()
        eps = self.eps * max(np.abs(d2(fn)).max(), 1e-300)
        for _ in range(self.max_iter):
            w = self.alpha / np.sqrt(d2(y) ** 2 + eps**2)
            ab = np.zeros((3, T))
            diag = q.copy()
            diag[:-2] += w * a * a
            diag[1:-1] += w * b * b
            diag[2:] += w * c * c
            sup1 = np.zeros(T - 1)
            sup1[:-1] += w * a * b  # (r, r+1)
            sup1[1:] += w * b * c  # (r+1, r+2)
            ab[2] = diag
            ab[1, 1:] = sup1
            ab[0, 2:] = w * a * c
            y_new = solveh_banded(ab, q * fn, lower=False, check_finite=False)
            change = np.linalg.norm(y_new - y) / max(np.linalg.norm(y_new), 1e-300)
            y = y_new
            if change < self.tol:
                break
        u = np.diff(y) / h  # slopes at midpoints (T-1,)
        d = np.empty(T)
        d[1:-1] = (h[1:] * u[:-1] + h[:-1] * u[1:]) / (h[:-1] + h[1:])
        if T > 2:
            d[0] = u[0] - (u[1] - u[0]) * h[0] / (h[0] + h[1])
            d[-1] = u[-1] + (u[-1] - u[-2]) * h[-1] / (h[-2] + h[-1])
        else:
            d[:] = u[0]
        return d * scale

    def _differentiate(self, x, t):
        return self._apply(x, t, "derivative")

    def smooth(self, x, t) -> torch.Tensor:
        """The smoothing spline's values at the samples (same layouts and lam choice as the derivative)."""
        x, t = check_xt(x, t, self.min_points)
        return self._apply(x, t.to(x.device), "values")

    def _apply(self, x, t, what: str):
        xs, ts = _series(x, t)
        out = np.empty_like(xs)
        for i in _progress(xs.shape[0], self.progress, "TV differentiation"):
            out[i] = self._one(xs[i], ts[i])
        return _unseries(out, x)

    def __repr__(self) -> str:
        return f"TotalVariation(alpha={self.alpha}, max_iter={self.max_iter})"


class WeakForm(Differentiator):
    """Weak (integral) form: test-function means of ``x'`` obtained from ``x`` by integration by parts.

    A test function ``phi`` lives on a window of ``width`` consecutive samples ``[t_a, t_b]``:
    ``phi(t) = c * ((t - t_a) (t_b - t)) ** power`` with ``c`` such that ``integral phi dt = 1``,
    so ``phi`` and its first ``power - 1`` derivatives vanish at both ends. Then

        integral phi x' dt = - integral phi' x dt,

    the phi-weighted mean of ``x'`` over the window, computed from ``x`` alone (integrals against the
    linear interpolant of the samples, any strictly increasing grid). Noise in ``x`` is averaged,
    not amplified.

    Used as the ``differentiation`` of :class:`~torchmech.discovery.sindy.SINDy` (or
    :func:`~torchmech.discovery.sindy.fit_sindy_batch`) it turns SINDy into weak SINDy (Messenger
    & Bortz 2021): the regression rows are the windows, each equating the weighted mean of ``x'``
    with the weighted means of the library features (see :meth:`weak_system`). That identity holds
    for any window width, so on clean data the coefficients are exact up to quadrature error and
    no pointwise derivative is ever formed.

    Called like any :class:`Differentiator` it returns a pointwise estimate: the test-function
    mean of ``x'`` over the window centred on each sample (shifted inside the series at the ends),
    a smoothing derivative whose bias grows like ``(width * dt) ** 2`` times the third derivative.

    Args:
        width: samples per test function (odd, >= 5): longer averages out more noise, shorter
            resolves faster dynamics.
        stride: samples between the starts of consecutive windows of :meth:`weak_system`
            (default ``max(1, width // 8)``); the last window always ends at the last sample.
        power: exponent of the test function (>= 2).
    """

    def __init__(self, width: int = 33, stride: int | None = None, power: int = 4):
        if isinstance(width, bool) or not isinstance(width, int) or width < 5 or width % 2 == 0:
            raise ValueError(f"width: expected an odd int >= 5, got {width!r}")
        if stride is not None and (isinstance(stride, bool) or not isinstance(stride, int) or stride < 1):
            raise ValueError(f"stride: expected None or an int >= 1, got {stride!r}")
        if isinstance(power, bool) or not isinstance(power, int) or power < 2:
            raise ValueError(f"power: expected an int >= 2, got {power!r}")
        self.width = width
        self.stride = stride
        self.power = power
        self.min_points = width

    @classmethod
    def fitting(cls, n_samples: int, min_rows: int = 0, width: int = 33, **kwargs) -> "WeakForm":
        """A ``WeakForm`` for series of ``n_samples``: the largest odd width <= ``width`` (at least 5)
        that fits the series and leaves at least ``min_rows`` windows per series for the regression
        (e.g. twice the number of library features); 5 if none does."""
        w = min(width, n_samples)
        w -= 1 - w % 2
        while w > 5:
            if len(cls(width=w, **kwargs)._starts(n_samples, "cpu")) >= min_rows:
                break
            w -= 2
        return cls(width=max(5, w), **kwargs)

    def _weights(self, t: torch.Tensor, starts: torch.Tensor):
        """Weights of phi and of its time derivative on the windows starting at ``starts`` (K,).

        t (..., T) float64 -> idx (K, W), w_phi (..., K, W), w_dphi (..., K, W) with
        ``w_phi[j] = integral phi * hat_j dt`` and ``w_dphi[j] = integral phi' * hat_j dt``, where
        hat_j is the piecewise-linear hat function of sample j: the integrals of phi (resp. phi')
        against the linear interpolant of the samples, exact (Gauss-Legendre with power + 1 nodes
        per interval) on any grid. On clean data this keeps the two sides of the weak identity
        consistent to O(h^2) on irregular grids and to rounding on regular ones.
        """
        W, p = self.width, self.power
        idx = starts[:, None] + torch.arange(W, device=t.device)[None, :]  # (K, W)
        tw = t[..., idx]  # (..., K, W)
        L = tw[..., -1:, None] - tw[..., :1, None]  # (..., K, 1, 1)
        nodes, gw = np.polynomial.legendre.leggauss(p + 1)
        u = torch.as_tensor((nodes + 1) / 2, dtype=t.dtype, device=t.device)  # nodes on [0, 1]
        gw = torch.as_tensor(gw / 2, dtype=t.dtype, device=t.device)
        a = tw[..., :-1, None]
        h = tw[..., 1:, None] - a  # (..., K, W-1, 1)
        s = (a + h * u - tw[..., :1, None]) / L  # (..., K, W-1, G) in [0, 1]
        v = 4.0 * s * (1.0 - s)  # 1 at the window's centre
        psi = v**p
        dpsi = p * v ** (p - 1) * 4.0 * (1.0 - 2.0 * s) / L  # d psi / dt
        w_phi = torch.zeros_like(tw)
        w_dphi = torch.zeros_like(tw)
        for f, out in ((psi, w_phi), (dpsi, w_dphi)):
            out[..., :-1] += (h * (gw * (1 - u) * f).sum(-1, keepdim=True))[..., 0]  # hat of the left sample
            out[..., 1:] += (h * (gw * u * f).sum(-1, keepdim=True))[..., 0]  # hat of the right sample
        c = w_phi.sum(-1, keepdim=True)  # integral psi dt: phi = psi / c has unit integral
        return idx, w_phi / c, w_dphi / c

    def _starts(self, T: int, device) -> torch.Tensor:
        stride = self.stride or max(1, self.width // 8)
        starts = list(range(0, T - self.width + 1, stride))
        if starts[-1] != T - self.width:
            starts.append(T - self.width)
        return torch.tensor(starts, device=device)

    def _differentiate(self, x, t):
        idx = _window_indices(x.shape[-2], self.width, x.device)  # (T, W), centred where possible
        _, _, w_dphi = self._weights(t, idx[:, 0])
        w = (-w_dphi).to(x.dtype)  # (..., T, W)
        return (w[..., None] * x[..., idx, :]).sum(-2)

    def weak_system(self, x, t, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The weak-form regression rows of one or many series.

        Args:
            x: (..., T, D) states.
            t: (T,), (..., T) times or a float time step.
            features: (..., T, F) library features on the samples (e.g. ``library.transform(x)``).

        Returns:
            ``(features_w, dx_w)`` of shapes (..., K, F) and (..., K, D): per window, the
            test-function means of the features and of ``x'``; K is the number of windows.
        """
        x, t = check_xt(x, t, self.min_points)
        if not isinstance(features, torch.Tensor) or features.ndim != x.ndim or features.shape[:-1] != x.shape[:-1]:
            got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features: expected shape {tuple(x.shape[:-1])} + (F,) to match x, got {got}")
        T = x.shape[-2]
        idx, w_phi, w_dphi = self._weights(t, self._starts(T, x.device))
        lead = torch.broadcast_shapes(t.shape[:-1], x.shape[:-2])
        shape = lead + idx.shape
        P = torch.zeros(lead + (idx.shape[0], T), dtype=torch.float64, device=x.device)
        dP = torch.zeros_like(P)
        P.scatter_(-1, idx.expand(shape), w_phi.expand(shape))  # dense (..., K, T): one matmul per series
        dP.scatter_(-1, idx.expand(shape), w_dphi.expand(shape))
        return P.to(features.dtype) @ features, -(dP.to(x.dtype) @ x)

    def __repr__(self) -> str:
        return f"WeakForm(width={self.width}, stride={self.stride}, power={self.power})"
