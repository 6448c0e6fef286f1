"""Interpolation of (irregular, partially observed) time series into control paths for neural CDEs."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = [
    "AbstractInterpolation", "LinearInterpolation", "RectilinearInterpolation",
    "CubicHermiteInterpolation", "NaturalCubicSpline", "fill_missing", "observational_intensity",
]


def _check_data(ts: Any, x: Any, name: str) -> tuple[Tensor, Tensor]:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: x must be a tensor of shape (..., T, C), got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{name}: x must have shape (..., T, C) with at least 2 dims, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: x must be floating point, got {x.dtype}")
    T = x.shape[-2]
    if ts is None:
        ts = torch.arange(T, dtype=x.dtype, device=x.device)
    if not isinstance(ts, Tensor):
        try:
            ts = torch.as_tensor(ts, dtype=x.dtype)
        except Exception as exc:  # noqa: BLE001
            raise TypeError(f"{name}: ts must be a tensor of times of shape (T,), got {type(ts).__name__}") from exc
    ts = ts.to(dtype=x.dtype, device=x.device)
    if ts.dim() != 1 or ts.shape[0] != T:
        raise ValueError(f"{name}: ts must have shape (T,) = ({T},) matching x's time axis, got {tuple(ts.shape)}")
    if T < 2:
        raise ValueError(f"{name}: need at least 2 time points, got T={T}")
    if not torch.isfinite(ts).all():
        raise ValueError(f"{name}: ts must be finite")
    if not bool((ts.diff() > 0).all()):
        raise ValueError(f"{name}: ts must be strictly increasing")
    if torch.isinf(x).any():
        raise ValueError(f"{name}: x contains inf; mark missing observations with NaN")
    return ts, x


def fill_missing(ts: Tensor, x: Tensor) -> Tensor:
    """Replace NaNs in ``x`` (..., T, C) by linear interpolation in time within each channel.

    Leading NaNs take the first observed value, trailing NaNs the last one (constant
    extension). A channel of some series with no observation at all raises ``ValueError``.
    """
    nan = torch.isnan(x)
    if not bool(nan.any()):
        return x
    obs = ~nan
    if not bool(obs.any(dim=-2).all()):
        bad = torch.nonzero(~obs.any(dim=-2))[:5].tolist()
        raise ValueError(f"fill_missing: some (series..., channel) have no observed value at all, e.g. index "
                         f"{bad}; drop them or fill them before interpolating")
    T = x.shape[-2]
    idx = torch.arange(T, device=x.device).view((T, 1)).expand_as(x)
    # index of the last observation at or before k, and of the first at or after k
    prev = torch.where(obs, idx, torch.full_like(idx, -1)).cummax(dim=-2).values
    nxt = torch.where(obs, idx, torch.full_like(idx, T)).flip(-2).cummin(dim=-2).values.flip(-2)
    prev_c = torch.where(prev < 0, nxt, prev)
    nxt_c = torch.where(nxt >= T, prev_c, nxt)
    xz = torch.where(obs, x, torch.zeros_like(x))
    xp = xz.gather(-2, prev_c)
    xn = xz.gather(-2, nxt_c)
    tp, tn, tk = ts[prev_c], ts[nxt_c], ts[idx]
    span = tn - tp
    w = torch.where(span > 0, (tk - tp) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(span))
    return torch.where(obs, x, xp + w * (xn - xp))


def observational_intensity(x: Tensor) -> Tensor:
    """Cumulative count of observations per channel, (..., T, C) -> (..., T, C).

    Concatenate it to the data (``torch.cat([x, observational_intensity(x)], -1)``) before
    interpolating, so a neural CDE can see where observations were missing.
    """
    return (~torch.isnan(x)).to(x.dtype).cumsum(dim=-2)


class AbstractInterpolation:
    """A piecewise-cubic path ``X(t)`` on ``[ts[0], ts[-1]]`` with ``(..., C)`` values.

    On piece ``k`` (``ts[k] <= t <= ts[k+1]``, ``u = t - ts[k]``):
    ``X(t) = a_k + b_k u + c_k u^2 + d_k u^3``; the coefficients have shape (..., T-1, C).

    Time arguments: a float or 0-d tensor gives (..., C); a (B,) tensor of per-sample times
    (with data of shape (B, T, C)) gives (B, C), row ``b`` at time ``t[b]``.
    Usable as the control of :class:`~torchmech.de.terms.ControlTerm`: ``evaluate(t0, t1)``
    returns the increment ``X(t1) - X(t0)``.
    """

    ts: Tensor
    a: Tensor
    b: Tensor
    c: Tensor
    d: Tensor
    # torchcde's conventions (its compatibility classes set these): times outside [ts[0], ts[-1]] use the
    # first/last piece instead of raising; at a knot the left-hand piece is used instead of the right-hand one
    _extrapolate = False
    _left_at_knots = False

    @property
    def interval(self) -> tuple[float, float]:
        """``(ts[0], ts[-1])``, the times the path is defined on."""
        return float(self.ts[0]), float(self.ts[-1])

    @property
    def grid_points(self) -> Tensor:
        """Knots (T,): the path is smooth between them (pass as ``jump_ts``/``StepTo`` times)."""
        return self.ts

    @property
    def channels(self) -> int:
        return self.a.shape[-1]

    def _locate(self, t: Any) -> tuple[Tensor, Tensor, bool]:
        ts = self.ts
        if not isinstance(t, Tensor):
            t = torch.as_tensor(t, dtype=ts.dtype)
        t = t.to(dtype=ts.dtype, device=ts.device)
        per_sample = t.dim() > 0
        if per_sample:
            if t.dim() != 1 or self.a.dim() != 3 or t.shape[0] != self.a.shape[0]:
                raise ValueError(
                    f"{type(self).__name__}: per-sample times must have shape (B,) with data (B, T, C); got t of "
                    f"shape {tuple(t.shape)} for coefficients of shape {tuple(self.a.shape)}"
                )
        if not torch.isfinite(t).all():
            raise ValueError(f"{type(self).__name__}: query time must be finite")
        lo, hi = ts[0], ts[-1]
        span = (hi - lo).abs()
        slack = 16 * torch.finfo(ts.dtype).eps * torch.maximum(span, torch.maximum(lo.abs(), hi.abs()))
        if not self._extrapolate and bool(((t < lo - slack) | (t > hi + slack)).any()):
            raise ValueError(
                f"{type(self).__name__}: query time outside the interval [{float(lo)}, {float(hi)}]: "
                f"{t.min().item()}..{t.max().item()}"
            )
        right = not self._left_at_knots
        k = (torch.searchsorted(ts, t.reshape(-1).contiguous(), right=right) - 1).clamp(0, ts.shape[0] - 2)
        k = k.reshape(t.shape)
        return t, k, per_sample

    def _coeffs(self, k: Tensor, per_sample: bool):
        if per_sample:
            idx = k.view(-1, 1, 1).expand(-1, 1, self.a.shape[-1])
            return [m.gather(1, idx)[:, 0] for m in (self.a, self.b, self.c, self.d)]
        return [m[..., int(k), :] for m in (self.a, self.b, self.c, self.d)]

    def _value(self, t: Any) -> Tensor:
        t, k, per_sample = self._locate(t)
        a, b, c, d = self._coeffs(k, per_sample)
        u = (t - self.ts[k])
        u = u[:, None] if per_sample else u
        return a + u * (b + u * (c + u * d))

    def evaluate(self, t0: Any, t1: Any = None) -> Tensor:
        """``X(t0)`` of shape (..., C), or the increment ``X(t1) - X(t0)`` when ``t1`` is given."""
        if t1 is None:
            return self._value(t0)
        return self._value(t1) - self._value(t0)

    def __call__(self, t0: Any, t1: Any = None) -> Tensor:
        return self.evaluate(t0, t1)

    def derivative(self, t: Any) -> Tensor:
        """``dX/dt`` at ``t``, shape (..., C); at a knot the right-hand piece is used."""
        return self._derivative_at(t)

    def _derivative_at(self, t: Any) -> Tensor:
        """:meth:`derivative` with this class's time convention (scalar, or per-sample (B,)): what
        :func:`~torchmech.de.cdeint` calls, whatever a subclass makes of the public method."""
        t, k, per_sample = self._locate(t)
        _, b, c, d = self._coeffs(k, per_sample)
        u = (t - self.ts[k])
        u = u[:, None] if per_sample else u
        return b + u * (2 * c + 3 * u * d)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(interval={self.interval}, coeffs={tuple(self.a.shape)})"


def _prepare(ts, x, name):
    ts, x = _check_data(ts, x, name)
    x = fill_missing(ts, x)
    h = ts.diff().unsqueeze(-1)  # (T-1, 1)
    return ts, x, h


class LinearInterpolation(AbstractInterpolation):
    """Piecewise-linear path through the observations (exact for linear functions).

    Args:
        ts: (T,) strictly increasing observation times (default ``0..T-1``).
        x: (..., T, C) observations; NaN marks a missing value, filled by linear interpolation
            in time within its channel (see :func:`fill_missing`).
    """

    def __init__(self, ts: Tensor | None, x: Tensor):
        ts, x, h = _prepare(ts, x, "LinearInterpolation")
        self.ts = ts
        self.a = x[..., :-1, :]
        self.b = x.diff(dim=-2) / h
        self.c = torch.zeros_like(self.a)
        self.d = self.c


def fill_forward(x: Tensor, owner: str) -> Tensor:
    """(..., T, C) with each NaN replaced by the last observed value of its channel (causal); NaNs before a
    channel's first observation take that observation. A channel with no observation raises."""
    if not bool(torch.isnan(x).any()):
        return x
    T = x.shape[-2]
    obs = ~torch.isnan(x)
    if not bool(obs.any(dim=-2).all()):
        raise ValueError(f"{owner}: some (series..., channel) have no observed value")
    idx = torch.arange(T, device=x.device).view(T, 1).expand_as(x)
    prev = torch.where(obs, idx, torch.full_like(idx, -1)).cummax(dim=-2).values
    first = torch.where(obs, idx, torch.full_like(idx, T)).amin(dim=-2, keepdim=True).expand_as(prev)
    return torch.where(obs, x, 0.0).gather(-2, torch.where(prev < 0, first, prev))


class RectilinearInterpolation(LinearInterpolation):
    """Rectilinear ("time first, then value") path of ``[t, x]``, parametrised by a virtual time.

    The path has ``1 + C`` channels (time first) through the 2T-1 points
    ``(t_0, x_0), (t_1, x_0), (t_1, x_1), (t_2, x_1), ...``, at virtual times ``0, 1, ..., 2T-2``:
    on ``[2k, 2k+1]`` time advances with ``x`` held at ``x_k``, on ``[2k+1, 2k+2]`` the value moves
    to ``x_{k+1}`` at time ``t_{k+1}``. It never uses an observation before its time, so it suits
    online prediction. Solve over ``interval = (0, 2T-2)``; data ``2k`` corresponds to ``ts[k]``.

    Args:
        ts: (T,) observation times (default ``0..T-1``).
        x: (..., T, C) observations (NaN = missing: filled forward, i.e. with the last observed
            value, and with the first observation before it).
    """

    def __init__(self, ts: Tensor | None, x: Tensor):
        ts, x = _check_data(ts, x, "RectilinearInterpolation")
        x = fill_forward(x, "RectilinearInterpolation")
        T = x.shape[-2]
        tt = ts.expand(x.shape[:-2] + (T,)).unsqueeze(-1)
        # times  t0, t1, t1, t2, t2, ..., t_{T-1}; values x0, x0, x1, x1, ..., x_{T-1}
        tk = torch.repeat_interleave(torch.arange(T, device=x.device), 2)[1:]  # 0,1,1,2,2,...,T-1
        xk = torch.repeat_interleave(torch.arange(T, device=x.device), 2)[:-1]  # 0,0,1,1,...,T-1
        path = torch.cat([tt[..., tk, :], x[..., xk, :]], dim=-1)
        virt = torch.arange(2 * T - 1, dtype=x.dtype, device=x.device)
        super().__init__(virt, path)


class CubicHermiteInterpolation(AbstractInterpolation):
    """Cubic Hermite path with backward-difference slopes (C1, exact for linear functions).

    On ``[t_k, t_{k+1}]`` the path is the cubic with values ``x_k, x_{k+1}`` and slopes
    ``m_k, m_{k+1}`` where ``m_k = (x_k - x_{k-1}) / (t_k - t_{k-1})`` (``m_0 = m_1``). The piece
    over ``[t_k, t_{k+1}]`` uses only observations up to ``t_{k+1}``, and ``dX/dt`` is continuous.

    Args: as :class:`LinearInterpolation`.
    """

    def __init__(self, ts: Tensor | None, x: Tensor):
        ts, x, h = _prepare(ts, x, "CubicHermiteInterpolation")
        delta = x.diff(dim=-2)
        slope = delta / h  # (..., T-1, C): backward difference at knot k+1
        m = torch.cat([slope[..., :1, :], slope], dim=-2)  # slope at knots 0..T-1
        m0, m1 = m[..., :-1, :], m[..., 1:, :]
        self.ts = ts
        self.a = x[..., :-1, :]
        self.b = m0
        self.c = (3 * slope - 2 * m0 - m1) / h
        self.d = (m0 + m1 - 2 * slope) / (h * h)


class NaturalCubicSpline(AbstractInterpolation):
    """Natural cubic spline through the observations (C2; zero second derivative at both ends).

    Exact for linear functions; fourth-order accurate away from the ends for smooth data.
    Coefficients come from a tridiagonal solve (Thomas algorithm, O(T) per channel).

    Args: as :class:`LinearInterpolation`.
    """

    def __init__(self, ts: Tensor | None, x: Tensor):
        ts, x, h = _prepare(ts, x, "NaturalCubicSpline")
        T = x.shape[-2]
        slope = x.diff(dim=-2) / h  # (..., T-1, C)
        M = torch.zeros_like(x)  # second derivatives at the knots
        if T > 2:
            hh = h[:, 0]
            lower = hh[:-1]  # sub-diagonal for rows 1..T-2 (coefficient of M_{k-1})
            diag = 2 * (hh[:-1] + hh[1:])
            upper = hh[1:]
            rhs = 6 * slope.diff(dim=-2)  # (..., T-2, C)
            n = T - 2
            cp = [None] * n
            dp = [None] * n
            cp[0] = upper[0] / diag[0]
            dp[0] = rhs[..., 0, :] / diag[0]
            for i in range(1, n):
                den = diag[i] - lower[i] * cp[i - 1]
                cp[i] = upper[i] / den
                dp[i] = (rhs[..., i, :] - lower[i] * dp[i - 1]) / den
            sol = [None] * n
            sol[-1] = dp[-1]
            for i in range(n - 2, -1, -1):
                sol[i] = dp[i] - cp[i] * sol[i + 1]
            inner = torch.stack(sol, dim=-2)
            zero = torch.zeros_like(x[..., :1, :])
            M = torch.cat([zero, inner, zero], dim=-2)
        self.ts = ts
        self.a = x[..., :-1, :]
        self.b = slope - h * (2 * M[..., :-1, :] + M[..., 1:, :]) / 6
        self.c = M[..., :-1, :] / 2
        self.d = (M[..., 1:, :] - M[..., :-1, :]) / (6 * h)
