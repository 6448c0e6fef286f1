"""torchcde-style entry points (``import torchmech.compat.torchcde as torchcde``) over torchmech.de.

Coefficient functions return packed tensors as torchcde does, and the interpolation classes take
them back: ``X = CubicSpline(natural_cubic_coeffs(x, t), t)``; then ``cdeint(X, func, z0, X.interval)``.
Packed layouts: linear -> the NaN-filled data (..., T, C); cubic -> (..., T-1, 4C) holding, as torchcde
packs them, ``[a, b, 2c, 3d]`` for the per-piece polynomial ``a + b u + c u^2 + d u^3``, so coefficients made
by either library (e.g. cached to disk) give the same path in both.

As torchcde: ``X.evaluate(t)``/``X.derivative(t)`` with a time tensor of shape ``S`` give ``(..., *S, C)``;
``cdeint`` calls ``func.prod(t, z, dXdt)`` when ``func`` defines it, accepts user-defined controls
(subclasses of :class:`InterpolationBase`, or anything with ``derivative``, ``interval`` and
``grid_points``) and differentiates with respect to every output time, ``t[0]`` included. Not provided:
``TupleControl``, ``logsig_windows``/``logsignature_windows`` and ``log_ode`` (they need a signature
library), torchcde's ``torchsde`` backend; the path classes are not ``nn.Module`` s (no ``.to()``).
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import Tensor

from torchmech.de.cde import cdeint as _cdeint
from torchmech.de.cde import check_plain_func
from torchmech.de.controllers import batch_rms_norm
from torchmech.de.interpolation import (
    AbstractInterpolation,
    CubicHermiteInterpolation,
    NaturalCubicSpline,
    _check_data,
    fill_forward,
    fill_missing,
)
from torchmech.de.interpolation import LinearInterpolation as _Linear

__all__ = [
    "cdeint", "linear_interpolation_coeffs", "natural_cubic_coeffs", "natural_cubic_spline_coeffs",
    "hermite_cubic_coefficients_with_backward_differences", "LinearInterpolation", "CubicSpline", "InterpolationBase",
]


def cdeint(X: AbstractInterpolation, func: torch.nn.Module, z0: Tensor, t: Tensor, adjoint: bool = True,
           backend: str = "torchdiffeq", method: str | None = None, rtol: float = 1e-4, atol: float = 1e-6,
           options: dict | None = None, norm=batch_rms_norm, **kwargs) -> Tensor:
    """:func:`torchmech.de.cdeint` with torchcde's stepping: one step size for the whole batch.

    torchcde (through torchdiffeq) steps a batch together and calls ``func(t, z)`` with a scalar ``t``; so
    does this function, by default (``norm=batch_rms_norm``). Pass ``norm=None`` for torchmech's per-sample
    steps, under which ``func`` receives a (B,) ``t`` whenever the samples' times differ. As in torchcde,
    ``z0`` may have any batch shape ``(..., hidden)`` (none included) equal to the path's (``X``'s data
    ``(..., T, C)``); ``func`` gets ``z`` in that shape and returns ``(..., hidden, C)``; the result is
    ``(..., len(t), hidden)``. ``backend="torchdiffeq"`` (torchcde's default) is accepted: torchmech's solvers
    take its place; "torchsde" raises. The other arguments (``adjoint_method``, ``adjoint_rtol``,
    ``adjoint_options``, ...) are those of :func:`torchmech.de.cdeint`.
    """
    if backend != "torchdiffeq":
        raise ValueError(f"cdeint: backend must be 'torchdiffeq' (torchmech's own ODE solvers stand in for it), got "
                         f"{backend!r}; torchcde's 'torchsde' backend is not supported")
    if isinstance(z0, Tensor) and isinstance(X, AbstractInterpolation) and z0.dim() != 2 and z0.dim() >= 1:
        batch = tuple(z0.shape[:-1])
        if tuple(X.a.shape[:-2]) != batch:
            raise ValueError(f"cdeint: z0 of shape {tuple(z0.shape)} has batch shape {batch} but X's data has batch "
                             f"shape {tuple(X.a.shape[:-2])} (coefficients {tuple(X.a.shape)}); they must be equal")
        check_plain_func(func, adjoint, kwargs.get("adjoint_params"))  # (the wrapper below is a module)
        n = 1
        for b in batch:
            n *= b
        flat = _FlatBatch(func, batch)
        out = _cdeint(_batch_flattened(X, n), flat, z0.reshape(n, z0.shape[-1]), t, adjoint=adjoint, method=method,
                      rtol=rtol, atol=atol, options=options, norm=norm, **kwargs)
        return out.reshape(batch + tuple(out.shape[1:]))
    return _cdeint(X, func, z0, t, adjoint=adjoint, method=method, rtol=rtol, atol=atol, options=options,
                   norm=norm, **kwargs)


class _FlatBatch(torch.nn.Module):
    """``func`` on a flattened batch: ``z`` (N, hidden) reshaped to the caller's batch shape and back."""

    def __init__(self, func, batch: tuple):
        super().__init__()
        self.func, self.batch = func, batch

    def forward(self, t, z):
        out = self.func(t, z.reshape(self.batch + (z.shape[-1],)))
        return out.reshape((z.shape[0],) + tuple(out.shape[len(self.batch):]))


def _batch_flattened(X: AbstractInterpolation, n: int) -> AbstractInterpolation:
    """The same path with its batch axes flattened into one of length ``n``."""
    Y = type(X).__new__(type(X))
    Y.__dict__.update(X.__dict__)
    for name in ("a", "b", "c", "d"):
        v = getattr(X, name)
        setattr(Y, name, v.reshape((n,) + tuple(v.shape[-2:])))
    return Y


def _times(t, x):
    T = x.shape[-2]
    return torch.arange(T, dtype=x.dtype, device=x.device) if t is None else torch.as_tensor(t).to(x)


def linear_interpolation_coeffs(x: Tensor, t: Tensor | None = None, rectilinear: int | None = None) -> Tensor:
    """(..., T, C) data with NaNs filled by linear interpolation (the linear path's coefficients).

    ``rectilinear``: the index of a time channel in ``x``. The result is then torchcde's rectilinear data
    (..., 2T-1, C): every value forward-filled (causal), and between two observations first the time channel
    moves to the next time, then the other channels move to the next values. Use it with
    ``LinearInterpolation(coeffs)`` (times ``0..2T-2``).
    """
    if rectilinear is not None:
        C = x.shape[-1] if isinstance(x, Tensor) and x.dim() >= 1 else 0
        if isinstance(rectilinear, bool) or not isinstance(rectilinear, int) or not 0 <= rectilinear < C:
            raise ValueError(f"linear_interpolation_coeffs: rectilinear must be the index of the time channel, an int "
                             f"in [0, {C - 1}], got {rectilinear!r}")
        _check_data(_times(t, x), x, "linear_interpolation_coeffs")
        if bool(torch.isnan(x[..., rectilinear]).any()):
            raise ValueError("linear_interpolation_coeffs: the time channel (rectilinear) must not contain NaN; "
                             "forward-fill padded final times")
        rep = fill_forward(x, "linear_interpolation_coeffs").repeat_interleave(2, dim=-2)
        rep[..., :-1, rectilinear] = rep[..., 1:, rectilinear].clone()  # time moves first
        return rep[..., :-1, :]
    ts, x = _check_data(_times(t, x), x, "linear_interpolation_coeffs")
    return fill_missing(ts, _zero_unobserved(x))


def _zero_unobserved(x: Tensor) -> Tensor:
    """A channel of a series with no observation at all becomes the zero path (torchcde's treatment)."""
    empty = torch.isnan(x).all(dim=-2, keepdim=True)
    return x.masked_fill(empty, 0.0) if bool(empty.any()) else x


def _pack(X: AbstractInterpolation) -> Tensor:
    return torch.cat([X.a, X.b, 2 * X.c, 3 * X.d], dim=-1)  # torchcde's packing


def _spline_through_observed(ts: Tensor, x: Tensor, hold_ends: bool = True) -> Tensor:
    """Coefficients (T-1, 4) on every interval of ``ts`` of the natural spline through the non-NaN entries
    of one channel ``x`` (T,), each re-expanded about its interval's start (torchcde's treatment).

    ``hold_ends``: the value is held constant before the first and after the last observation
    (``natural_cubic_coeffs``); else only the first and last times get those values and the spline runs
    on through them (the deprecated ``natural_cubic_spline_coeffs``)."""
    obs = ~torch.isnan(x)
    if not bool(obs.any()):  # nothing observed: torchcde's constant zero path
        return x.new_zeros(x.shape[0] - 1, 4)
    first, last = int(obs.nonzero()[0]), int(obs.nonzero()[-1])
    x = x.clone()
    if hold_ends:
        x[:first], x[last + 1:] = x[first], x[last]
    else:
        x[0], x[-1] = x[first], x[last]
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
    return _natural_cubic(x, t, "natural_cubic_coeffs", hold_ends=True)


def natural_cubic_spline_coeffs(x: Tensor, t: Tensor | None = None) -> Tensor:
    """torchcde's deprecated ``natural_cubic_spline_coeffs``: as :func:`natural_cubic_coeffs` but for
    missing values at the start or end of a channel, where only the first and last times are given the
    first and last observed values and the spline runs through them (no constant hold). Without missing
    values the two are identical."""
    return _natural_cubic(x, t, "natural_cubic_spline_coeffs", hold_ends=False)


def _natural_cubic(x: Tensor, t: Tensor | None, name: str, hold_ends: bool) -> Tensor:
    ts, x = _check_data(_times(t, x), x, name)
    T, C = x.shape[-2:]
    flat = x.reshape(-1, T, C)
    missing = torch.isnan(flat).any(1)  # (series, C)
    if not bool(missing.any()):
        return _pack(NaturalCubicSpline(ts, x))
    # channels without missing values in one batched spline (NaNs zeroed: those channels are overwritten)
    S = NaturalCubicSpline(ts, torch.nan_to_num(flat))
    out = torch.stack([S.a, S.b, S.c, S.d], dim=2)  # (series, T-1, 4, C)
    for s_, c_ in missing.nonzero().tolist():
        out[s_, :, :, c_] = _spline_through_observed(ts, flat[s_, :, c_], hold_ends)
    # packed as torchcde: (..., T-1, 4C) = [a | b | 2c | 3d], each C wide
    out = out * torch.tensor([1.0, 1.0, 2.0, 3.0], dtype=out.dtype, device=out.device)[:, None]
    return out.reshape(x.shape[:-2] + (T - 1, 4 * C))


def hermite_cubic_coefficients_with_backward_differences(x: Tensor, t: Tensor | None = None) -> Tensor:
    """Cubic Hermite (backward differences) coefficients (..., T-1, 4C) of data (..., T, C)."""
    ts, x = _check_data(_times(t, x), x, "hermite_cubic_coefficients_with_backward_differences")
    return _pack(CubicHermiteInterpolation(ts, _zero_unobserved(x)))


class InterpolationBase(torch.nn.Module, abc.ABC):
    """Base class of a user-defined control path, as torchcde's ``InterpolationBase``.

    Subclass it and implement ``interval`` (a tensor ``[t0, t1]``), ``grid_points`` (the times where
    the path may be non-smooth: the solver steps onto them), ``evaluate(t)`` and ``derivative(t)``
    (``(batch, channels)`` at a 0-d time); a subclass missing one cannot be instantiated.
    :func:`cdeint` evaluates it at one time for the whole batch.
    """

    @property
    @abc.abstractmethod
    def interval(self) -> Tensor:
        """The tensor ``[t0, t1]`` the path is defined on."""

    @property
    @abc.abstractmethod
    def grid_points(self) -> Tensor:
        """Times (increasing) where the path may be non-smooth."""

    @abc.abstractmethod
    def evaluate(self, t):
        """``X(t)``, ``(batch, channels)``."""

    @abc.abstractmethod
    def derivative(self, t):
        """``dX/dt(t)``, ``(batch, channels)``."""


class _TorchcdeAPI:
    """torchcde's conventions for the compatibility classes: ``interval`` is a tensor ``[t0, t1]``, and a time
    argument of any shape ``S`` gives values of shape ``(..., *S, C)`` (torchmech's own classes read a
    (B,) time as one time per sample). Times outside the interval extrapolate the end pieces; at a knot
    the left-hand piece is used."""

    _extrapolate = True
    _left_at_knots = True

    @property
    def interval(self) -> Tensor:
        return torch.stack([self.ts[0], self.ts[-1]])

    def _pieces(self, t: Any) -> tuple[Tensor, list]:
        ts = self.ts
        if isinstance(t, Tensor):
            t = t.to(dtype=ts.dtype, device=ts.device)
        else:  # (a Python float straight to the path's dtype, not through the default dtype)
            t = torch.as_tensor(t, dtype=ts.dtype, device=ts.device)
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{type(self).__name__}: query times must be finite")
        k = (torch.searchsorted(ts, t.detach().reshape(-1).contiguous()) - 1).clamp(0, ts.shape[0] - 2)
        u = (t.reshape(-1) - ts[k])[:, None]
        shape = self.a.shape[:-2] + t.shape + self.a.shape[-1:]
        return u, [m[..., k, :] for m in (self.a, self.b, self.c, self.d)], shape

    def evaluate(self, t0: Any, t1: Any = None) -> Tensor:
        """``X(t)`` of shape ``(..., *t.shape, C)`` (torchcde); with ``t1`` the increment ``X(t1) - X(t0)``."""
        if t1 is not None:
            return self.evaluate(t1) - self.evaluate(t0)
        u, (a, b, c, d), shape = self._pieces(t0)
        return (a + u * (b + u * (c + u * d))).reshape(shape)

    def derivative(self, t: Any) -> Tensor:
        """``dX/dt`` of shape ``(..., *t.shape, C)`` (torchcde)."""
        u, (_, b, c, d), shape = self._pieces(t)
        return (b + u * (2 * c + 3 * u * d)).reshape(shape)


class LinearInterpolation(_TorchcdeAPI, _Linear):
    """torchcde's ``LinearInterpolation(coeffs, t=None)`` from :func:`linear_interpolation_coeffs`.

    As torchcde's: ``evaluate``/``derivative`` take times of any shape ``S`` and give ``(..., *S, C)``;
    times outside the interval use the first or last piece, and the derivative at a knot is the
    left-hand piece's slope. Unlike torchcde's it is not an ``nn.Module``: build it from coefficients
    already on the device (``.to()`` is not available).
    """

    def __init__(self, coeffs: Tensor, t: Tensor | None = None, **kwargs):
        if kwargs:
            raise TypeError(f"LinearInterpolation: unsupported arguments {sorted(kwargs)}")
        super().__init__(_times(t, coeffs), coeffs)


class CubicSpline(_TorchcdeAPI, AbstractInterpolation):
    """torchcde's ``CubicSpline(coeffs, t=None)`` from packed cubic coefficients (..., T-1, 4C).

    As torchcde's: ``evaluate``/``derivative`` take times of any shape ``S`` and give ``(..., *S, C)``;
    times outside the interval extrapolate the first or last piece's polynomial, and at a knot the
    left-hand piece is used. Unlike torchcde's it is not an ``nn.Module``: build it from coefficients
    already on the device (``.to()`` is not available).
    """

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
        a, b, two_c, three_d = coeffs.chunk(4, dim=-1)  # torchcde's packing
        self.a, self.b, self.c, self.d = a, b, two_c / 2, three_d / 3
