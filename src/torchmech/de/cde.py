"""Controlled differential equations: cdeint with torchcde's semantics over torchmech.de.solve."""

from __future__ import annotations

import bisect
import copy
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from torchmech.de.adjoint import BacksolveAdjoint, DirectAdjoint
from torchmech.de.controllers import ConstantStep, PIDController, StepTo
from torchmech.de.integrate import SaveAt, solve
from torchmech.de.interpolation import AbstractInterpolation, LinearInterpolation
from torchmech.de.solvers.rk import Perturbed
from torchmech.de.terms import ODETerm

__all__ = ["cdeint", "CDEVectorField"]

_FIXED = {"euler", "midpoint", "heun", "ralston", "rk4"}


class CDEVectorField(torch.nn.Module):
    """The ODE ``dz/dt = func(t, z) @ dX/dt(t)`` equivalent to the CDE ``dz = func(t, z) dX(t)``.

    ``func(t, z)`` returns (B, hidden, channels); ``t`` is passed as a 0-d tensor when all samples
    share the time (the usual case) and as (B,) otherwise. The path's coefficients travel as
    ``args`` so that adjoint methods differentiate with respect to them too.
    """

    def __init__(self, func: torch.nn.Module, X: AbstractInterpolation):
        super().__init__()
        self.func = func
        self.X = X
        # torchcde: a func with a prod(t, z, dX/dt) method computes the product itself (e.g. without
        # materialising the (B, hidden, C) matrix)
        self._prod = callable(getattr(func, "prod", None))
        # a control that is not a torchmech interpolation: anything with derivative(t) -> (B, C) at a shared t
        self._generic = not isinstance(X, AbstractInterpolation)
        # the piecewise-cubic derivative is evaluated here directly (no per-call validation: the
        # solver's times lie in the solve interval) unless the path overrides it
        self._direct = (not self._generic and type(X)._derivative_at is AbstractInterpolation._derivative_at
                        and X.a.dim() == 3)
        if self._direct:
            self._knots = X.ts.tolist()
            self._np = np.float32 if X.ts.dtype == torch.float32 else np.float64

    def _dX(self, t: Tensor, coeffs: Any) -> tuple[Tensor, Tensor]:
        """(dX/dt (B, C), the time to pass to func: 0-d when all samples share it, else (B,))."""
        if self._generic:
            if not bool((t == t[0]).all()):
                raise ValueError("cdeint: a control other than a torchmech interpolation is evaluated at one time "
                                 "for the whole batch, but the samples' times differ; pass norm=batch_rms_norm "
                                 "(one step size for the batch) or use a fixed-step method")
            return self.X.derivative(t[0]), t[0]
        if not self._direct:
            X = copy.copy(self.X)
            X.a, X.b, X.c, X.d = coeffs
            dX = X._derivative_at(t)  # (B, C) per sample
            return dX, (t[0] if bool((t == t[0]).all()) else t)
        _, b, c, d = coeffs
        lo, hi = torch.aminmax(t.detach())
        lo, hi = lo.item(), hi.item()
        kn = self._knots
        if lo == hi:  # the usual case: one piece for the whole batch, its coefficients are views
            k = min(max(bisect.bisect_right(kn, lo) - 1, 0), len(kn) - 2)
            if t.requires_grad:  # (a gradient with respect to the start time t[0] flows through here)
                u = t[0].to(self.X.ts.dtype) - self.X.ts[k]
            else:
                npdt = self._np
                u = float(npdt(npdt(lo) - npdt(kn[k])))  # as t - ts[k] in the path's dtype
            dX = b[:, k] + u * (2 * c[:, k] + (3 * u) * d[:, k])
            return dX, t[0]
        ts = self.X.ts
        tt = t.to(ts.dtype)
        k = (torch.searchsorted(ts, tt.detach().contiguous(), right=True) - 1).clamp_(0, ts.shape[0] - 2)
        idx = k.view(-1, 1, 1).expand(-1, 1, b.shape[-1])
        bk, ck, dk = (m.gather(1, idx)[:, 0] for m in (b, c, d))
        u = (tt - ts[k])[:, None]
        return bk + u * (2 * ck + 3 * u * dk), t

    def forward(self, t: Tensor, z: Tensor, coeffs: Any) -> Tensor:
        dX, tt = self._dX(t, coeffs)
        if not (isinstance(dX, Tensor) and dX.shape[:-1] == z.shape[:-1]):
            raise ValueError(f"cdeint: X.derivative(t) must return (batch, input_channels) with batch = "
                             f"{z.shape[0]}, got {tuple(dX.shape) if isinstance(dX, Tensor) else type(dX).__name__}")
        if self._prod:
            out = self.func.prod(tt, z, dX)
            if not (isinstance(out, Tensor) and out.shape == z.shape):
                raise ValueError(f"cdeint: func.prod(t, z, dX/dt) must return z's shape {tuple(z.shape)}, got "
                                 f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
            return out
        F = self.func(tt, z)
        if F.shape != z.shape + dX.shape[-1:]:
            raise ValueError(
                f"cdeint: func(t, z) must return shape (batch, hidden, input_channels) = "
                f"{tuple(z.shape) + tuple(dX.shape[-1:])}, got {tuple(F.shape)}"
            )
        return (F @ dX.unsqueeze(-1)).squeeze(-1)


def check_plain_func(func, adjoint: bool, adjoint_params) -> None:
    """Raise if the continuous adjoint would miss trainable tensors of a plain-function ``func``.

    ``func`` sits inside :class:`CDEVectorField` (a module), so the adjoint's own check for plain functions
    does not see it, and the tensors its closure names would get no gradient.
    """
    from torchmech.de.adjoint import check_closure
    from torchmech.de.terms import _module_of

    if adjoint and adjoint_params is None and torch.is_grad_enabled() and _module_of(func) is None:
        check_closure(func, "cdeint", also="use adjoint=False, ", what="func")


def _knot_grid(knots: Tensor, t0: float, t1: float, dt: float) -> Tensor:
    """Times from t0 to t1 through every knot between them, each interval in equal steps of at most dt."""
    pts = [t0] + [k for k in knots.tolist() if t0 < k < t1] + [t1]
    grid = [t0]
    for a, b in zip(pts[:-1], pts[1:]):
        m = max(1, math.ceil((b - a) / dt - 1e-9))
        grid += [a + (b - a) * i / m for i in range(1, m)] + [b]
    return torch.tensor(grid, dtype=torch.float64)


def cdeint(X: AbstractInterpolation, func: torch.nn.Module, z0: Tensor, t: Tensor, adjoint: bool = True,
           method: str | None = None, rtol: float = 1e-4, atol: float = 1e-6, options: dict | None = None,
           adjoint_rtol: float | None = None, adjoint_atol: float | None = None, adjoint_params=None,
           max_steps: int = 100000, norm=None, adjoint_method: str | None = None, adjoint_options: dict | None = None,
           **kwargs) -> Tensor:
    """Solve the CDE ``dz = func(t, z) dX(t)``, ``z(t[0]) = z0``, at times ``t`` (torchcde semantics).

    Args:
        X: an interpolation from :mod:`torchmech.de.interpolation` with data (B, T, C), or any control
            with ``derivative(t) -> (B, C)`` at a 0-d time, ``interval`` and ``grid_points`` (as torchcde's
            ``InterpolationBase``; it is evaluated at one time for the whole batch, so adaptive methods
            need ``norm=batch_rms_norm``; gradients reach its tensors with ``adjoint=False`` or through
            ``adjoint_params``).
        func: ``func(t, z) -> (B, hidden, C)``. ``t`` is a 0-d tensor while every sample is at the same
            time (always with fixed steps or ``norm=batch_rms_norm``), else the samples' times (B,). If
            ``func`` has a method ``prod(t, z, dXdt) -> (B, hidden)``, it is called instead to form the
            product with ``dX/dt`` (B, C) (as torchcde).
        z0: (B, hidden) initial state.
        t: (K,) increasing times inside ``X.interval``; the solve runs from ``t[0]`` to ``t[-1]``.
        adjoint: gradients by the continuous adjoint (O(1) memory; ``BacksolveAdjoint``) when True,
            else direct backpropagation through the solver.
        method: "dopri5" (default), "tsit5", "bosh3", "dopri8" (adaptive, with the path's knots as
            jump times) or "euler", "midpoint", "heun", "ralston", "rk4" (fixed step: pass
            ``options={"step_size": h}``; default the smallest knot spacing).
        rtol, atol: tolerances of adaptive methods; ``adjoint_rtol``/``adjoint_atol`` of the
            backward solve (default: the same).
        options: torchdiffeq-style dict; ``step_size`` for fixed-step methods, ``jump_t`` to
            override the jump times.
        adjoint_params: tensors to differentiate in the adjoint (default: ``func``'s parameters and
            the path's coefficients when they require grad).
        adjoint_method: adaptive solver of the backward solve ("dopri5", "tsit5", "bosh3", "dopri8";
            default: ``method`` when adaptive, else Tsit5). adjoint_options: ``{"norm": "seminorm"}`` (the
            default here) is accepted; other keys raise.
        norm: error norm of adaptive methods, forward and backward: None = per sample (every
            sample steps on its own error), or :func:`torchmech.de.batch_rms_norm` for one step
            size shared by the batch, as torchcde/torchdiffeq step (fewer steps when one sample is
            much harder than the rest, and each step evaluates the path at one time for all).

    Returns:
        (B, K, hidden): the solution at ``t`` (batch-first, as torchcde).
    """
    if kwargs:
        raise TypeError(f"cdeint: unexpected keyword arguments {sorted(kwargs)}")
    generic = not isinstance(X, AbstractInterpolation)
    if generic and not (callable(getattr(X, "derivative", None)) and hasattr(X, "interval")
                        and hasattr(X, "grid_points")):
        raise TypeError(f"cdeint: X must be a torchmech interpolation (e.g. NaturalCubicSpline) or a control with "
                        f"derivative(t) -> (batch, C), interval and grid_points (as torchcde's), got "
                        f"{type(X).__name__}")
    if not callable(func):
        raise TypeError(f"cdeint: func must be callable func(t, z), got {type(func).__name__}")
    if not isinstance(z0, Tensor) or z0.dim() != 2:
        raise ValueError(f"cdeint: z0 must be a tensor of shape (batch, hidden), got "
                         f"{tuple(z0.shape) if isinstance(z0, Tensor) else type(z0).__name__}")
    if not generic and (X.a.dim() != 3 or X.a.shape[0] != z0.shape[0]):
        raise ValueError(f"cdeint: X must hold data of shape (batch, T, C) with batch = z0.shape[0] = {z0.shape[0]}, "
                         f"got coefficients of shape {tuple(X.a.shape)}")
    t = torch.as_tensor(t, dtype=z0.dtype, device=z0.device)
    if t.dim() != 1 or t.shape[0] < 1:
        raise ValueError(f"cdeint: t must have shape (K,) with K >= 1, got {tuple(t.shape)}")
    td = t.detach()
    t_first, t_last, t_min, t_max = float(td[0]), float(td[-1]), float(td.min()), float(td.max())
    lo, hi = (float(v) for v in X.interval)
    if t_min < lo or t_max > hi:
        raise ValueError(f"cdeint: t must lie in X.interval = ({lo}, {hi}), got [{t_min}, {t_max}]")
    options = dict(options or {})
    method = (method or "dopri5").lower()
    from torchmech.de.integrate import _SOLVER_NAMES

    if method not in _SOLVER_NAMES:
        raise ValueError(f"cdeint: unknown method {method!r}; expected one of {sorted(_SOLVER_NAMES)}")
    solver = _SOLVER_NAMES[method]()
    knots = torch.as_tensor(X.grid_points).to(z0.dtype)
    if generic and method not in _FIXED and norm is None and z0.shape[0] > 1:
        raise ValueError(f"cdeint: X ({type(X).__name__}) is evaluated at one time for the whole batch; with the "
                         f"adaptive method {method!r} pass norm=batch_rms_norm (one step size for the batch)")
    if method in _FIXED:
        dt0 = options.pop("step_size", None)
        if dt0 is None:
            dt0 = float(knots.diff().min())
        controller = ConstantStep()
        if isinstance(X, LinearInterpolation):
            # dX/dt jumps at every knot: step onto each knot (each interval in equal steps of at most dt0) and
            # nudge the stages at the step ends one ulp inside, so no stage takes the slope of the next piece
            # (a stage at t1 would: the derivative at a knot is the right-hand piece's)
            grid = _knot_grid(knots, t_first, t_last, float(dt0))
            controller = StepTo(grid.to(dtype=z0.dtype, device=z0.device))
            solver, dt0 = Perturbed(solver), None
    else:
        dt0 = options.pop("first_step", None)
        jump = options.pop("jump_t", knots[(knots > t[0]) & (knots < t[-1])])
        if norm is not None and not callable(norm):
            raise TypeError(f"cdeint: norm must be None or callable (B, ...) -> (B,), got {type(norm).__name__}")
        controller = PIDController(rtol=rtol, atol=atol, jump_ts=jump if len(jump) else None,
                                   **({"norm": norm} if norm is not None else {}))
    if options:
        raise ValueError(f"cdeint: unsupported options {sorted(options)}")
    vf = CDEVectorField(func, X)
    # non-view copies: the adjoint differentiates with respect to these tensors, and autograd
    # cannot take gradients with respect to views of the data inside a backward pass
    coeffs = None if generic else tuple(c.clone() if c.requires_grad else c for c in (X.a, X.b, X.c, X.d))
    check_plain_func(func, adjoint, adjoint_params)
    back = None
    if adjoint_method is not None:
        am = str(adjoint_method).lower()
        if am not in _SOLVER_NAMES or am in _FIXED:
            raise ValueError(f"cdeint: adjoint_method must be an adaptive method ('dopri5', 'tsit5', 'bosh3', "
                             f"'dopri8'), got {adjoint_method!r}")
        back = _SOLVER_NAMES[am]()
    extra = {k: v for k, v in (adjoint_options or {}).items() if not (k == "norm" and v == "seminorm")}
    if extra:
        raise ValueError(f"cdeint: unsupported adjoint_options {sorted(extra)} (only norm='seminorm', the default)")
    if adjoint:
        adj = BacksolveAdjoint(rtol=rtol if adjoint_rtol is None else adjoint_rtol,
                               atol=atol if adjoint_atol is None else adjoint_atol, adjoint_params=adjoint_params,
                               norm=norm, solver=back)
    else:
        adj = DirectAdjoint()
    if t.shape[0] == 1 or t_first == t_last:
        return z0.unsqueeze(1).expand(z0.shape[0], t.shape[0], z0.shape[1])
    # t[0] as given (a gradient with respect to it is that of the start time), the end as a number (its gradient
    # comes through the save time t[-1])
    sol = solve(ODETerm(vf), solver, t[0], t_last, z0, dt0=dt0, args=coeffs,
                saveat=SaveAt(ts=t), controller=controller, adjoint=adj, max_steps=max_steps)
    return sol.ys
