"""torchcde-style entry points (``import torchmech.compat.torchcde as torchcde``) over torchmech.de.

Coefficient functions return packed tensors as torchcde does, and the interpolation classes take
them back: ``X = CubicSpline(natural_cubic_coeffs(x, t), t)``; then ``cdeint(X, func, z0, X.interval)``.
Packed layouts: linear -> the NaN-filled data (..., T, C); cubic -> (..., T-1, 4C) holding the
per-piece polynomial coefficients ``a, b, c, d`` of ``a + b u + c u^2 + d u^3``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchmech.de.cde import cdeint as _cdeint
from torchmech.de.controllers import batch_rms_norm
from torchmech.de.interpolation import (
    AbstractInterpolation,
    CubicHermiteInterpolation,
    NaturalCubicSpline,
    _check_data,
    fill_missing,
)
from torchmech.de.interpolation import LinearInterpolation as _Linear

__all__ = [
    "cdeint", "linear_interpolation_coeffs", "natural_cubic_coeffs", "natural_cubic_spline_coeffs",
    "hermite_cubic_coefficients_with_backward_differences", "LinearInterpolation", "CubicSpline",
]


def cdeint(X: AbstractInterpolation, func: torch.nn.Module, z0: Tensor, t: Tensor, adjoint: bool = True,
           method: str | None = None, rtol: float = 1e-4, atol: float = 1e-6, options: dict | None = None,
           norm=batch_rms_norm, **kwargs) -> Tensor:
    """:func:`torchmech.de.cdeint` with torchcde's stepping: one step size for the whole batch.

    torchcde (through torchdiffeq) steps a batch together and calls ``func(t, z)`` with a scalar ``t``; so
    does this function, by default (``norm=batch_rms_norm``). Pass ``norm=None`` for torchmech's per-sample
    steps, under which ``func`` receives a (B,) ``t`` whenever the samples' times differ. The other
    arguments are those of :func:`torchmech.de.cdeint`.
    """
    return _cdeint(X, func, z0, t, adjoint=adjoint, method=method, rtol=rtol, atol=atol, options=options,
                   norm=norm, **kwargs)


def _times(t, x):
    T = x.shape[-2]
    return torch.arange(T, dtype=x.dtype, device=x.device) if t is None else torch.as_tensor(t).to(x)


def linear_interpolation_coeffs(x: Tensor, t: Tensor | None = None) -> Tensor:
    """(..., T, C) data with NaNs filled by linear interpolation (the linear path's coefficients)."""
    ts, x = _check_data(_times(t, x), x, "linear_interpolation_coeffs")
    return fill_missing(ts, x)


def _pack(X: AbstractInterpolation) -> Tensor:
    return torch.cat([X.a, X.b, X.c, X.d], dim=-1)


def _spline_through_observed(ts: Tensor, x: Tensor) -> Tensor:
    """Coefficients (T-1, 4) on every interval of ``ts`` of the natural spline through the non-NaN entries
    of one channel ``x`` (T,), each re-expanded about its interval's start (torchcde's treatment)."""
    obs = ~torch.isnan(x)
    if not bool(obs.any()):  # nothing observed: torchcde's constant zero path
        return x.new_zeros(x.shape[0] - 1, 4)
    first, last = int(obs.nonzero()[0]), int(obs.nonzero()[-1])
    x = x.clone()
    x[:first], x[last + 1:] = x[first], x[last]  # constant before the first and after the last observation
    obs = ~torch.isnan(x)
    t_obs = ts[obs]
    S = NaturalCubicSpline(t_obs, x[obs][:, None])
    a, b, c, d = (v[:, 0] for v in (S.a, S.b, S.c, S.d))
    # each interval of ts lies inside one observed interval (observed times are a subset of ts)
    j = (torch.searchsorted(t_obs, ts[:-1], right=True) - 1).clamp_(0, t_obs.shape[0] - 2)
    u = ts[:-1] - t_obs[j]
    a, b, c, d = a[j], b[j], c[j], d[j]
    return torch.stack([a + u * (b + u * (c + u * d)), b + u * (2 * c + 3 * u * d), c + 3 * u * d, d], dim=-1)


def natural_cubic_coeffs(x: Tensor, t: Tensor | None = None) -> Tensor:
    """Natural cubic spline coefficients (..., T-1, 4C) of data (..., T, C).

    Missing values (NaN) are handled as torchcde does: per channel, the spline runs through the observed
    values only (held constant before the first and after the last observation; a channel with no
    observation is the zero path). :class:`torchmech.de.NaturalCubicSpline` instead fills interior gaps
    linearly first.
    """
    ts, x = _check_data(_times(t, x), x, "natural_cubic_coeffs")
    T, C = x.shape[-2:]
    flat = x.reshape(-1, T, C)
    missing = torch.isnan(flat).any(1)  # (series, C)
    if not bool(missing.any()):
        return _pack(NaturalCubicSpline(ts, x))
    # channels without missing values in one batched spline (NaNs zeroed: those channels are overwritten)
    S = NaturalCubicSpline(ts, torch.nan_to_num(flat))
    out = torch.stack([S.a, S.b, S.c, S.d], dim=2)  # (series, T-1, 4, C)
    for s_, c_ in missing.nonzero().tolist():
        out[s_, :, :, c_] = _spline_through_observed(ts, flat[s_, :, c_])
    # packed as torchcde: (..., T-1, 4C) = [a | b | c | d], each C wide
    return out.reshape(x.shape[:-2] + (T - 1, 4 * C))


natural_cubic_spline_coeffs = natural_cubic_coeffs


def hermite_cubic_coefficients_with_backward_differences(x: Tensor, t: Tensor | None = None) -> Tensor:
    """Cubic Hermite (backward differences) coefficients (..., T-1, 4C) of data (..., T, C)."""
    return _pack(CubicHermiteInterpolation(_times(t, x), x))


class LinearInterpolation(_Linear):
    """torchcde's ``LinearInterpolation(coeffs, t=None)`` from :func:`linear_interpolation_coeffs`."""

    def __init__(self, coeffs: Tensor, t: Tensor | None = None, **kwargs):
        if kwargs:
            raise TypeError(f"LinearInterpolation: unsupported arguments {sorted(kwargs)}")
        super().__init__(_times(t, coeffs), coeffs)


class CubicSpline(AbstractInterpolation):
    """torchcde's ``CubicSpline(coeffs, t=None)`` from packed cubic coefficients (..., T-1, 4C)."""

    def __init__(self, coeffs: Tensor, t: Tensor | None = None, **kwargs):
        if kwargs:
            raise TypeError(f"CubicSpline: unsupported arguments {sorted(kwargs)}")
        if not isinstance(coeffs, Tensor) or coeffs.dim() < 2 or coeffs.shape[-1] % 4:
            raise ValueError("CubicSpline: coeffs must have shape (..., T-1, 4C) from natural_cubic_coeffs or "
                             f"hermite_cubic_coefficients_with_backward_differences, got "
                             f"{tuple(coeffs.shape) if isinstance(coeffs, Tensor) else type(coeffs).__name__}")
        T = coeffs.shape[-2] + 1
        ts = torch.arange(T, dtype=coeffs.dtype, device=coeffs.device) if t is None else torch.as_tensor(t).to(coeffs)
        if ts.shape != (T,):
            raise ValueError(f"CubicSpline: t must have shape ({T},), got {tuple(ts.shape)}")
        self.ts = ts
        self.a, self.b, self.c, self.d = coeffs.chunk(4, dim=-1)
