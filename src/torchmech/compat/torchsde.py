"""torchsde-style entry points (``import torchmech.compat.torchsde as torchsde``) over torchmech.de.solve."""

from __future__ import annotations

import math

from typing import Any

import torch
from torch import Tensor

from torchmech.de.adjoint import BacksolveAdjoint, CheckpointAdjoint, DirectAdjoint, _MarksTo
from torchmech.de import brownian as _bm
from torchmech.de.brownian import AbstractBrownian
from torchmech.de.controllers import PIDController, StepTo, batch_rms_norm
from torchmech.de.integrate import SaveAt, solve
from torchmech.de.reversible_adjoint import ReversibleAdjoint
from torchmech.de.solvers.rk import StepResult
from torchmech.de.solvers.sde import (
    SDE_METHODS,
    SRA1,
    AbstractSDESolver,
    EulerHeun,
    ReversibleHeun,
    StochasticHeun,
    StochasticMidpoint,
    sde_solver_by_name,
)
from torchmech.de.terms import ControlTerm, DiagonalControlTerm, MultiTerm, ODETerm

__all__ = ["sdeint", "sdeint_adjoint", "BrownianInterval", "BrownianTree", "BrownianPath", "VirtualBrownianTree",
           "BaseSDE", "SDEIto", "SDEStratonovich"]

_NOISE = ("diagonal", "scalar", "additive", "general")
_METHODS = tuple(SDE_METHODS)
_ADAPTIVE = ("heun", "midpoint", "euler_heun")  # methods with an embedded error estimate (adaptive=True)


class BaseSDE(torch.nn.Module):
    """torchsde's base class of SDE modules: checks and sets ``noise_type`` and ``sde_type``."""

    def __init__(self, noise_type: str, sde_type: str):
        super().__init__()
        if noise_type not in _NOISE:
            raise ValueError(f"BaseSDE: noise_type must be one of {_NOISE}, got {noise_type!r}")
        if sde_type not in ("ito", "stratonovich"):
            raise ValueError(f"BaseSDE: sde_type must be 'ito' or 'stratonovich', got {sde_type!r}")
        self.noise_type, self.sde_type = noise_type, sde_type


class SDEIto(BaseSDE):
    """torchsde's base class of Ito SDE modules."""

    def __init__(self, noise_type: str):
        super().__init__(noise_type, "ito")


class SDEStratonovich(BaseSDE):
    """torchsde's base class of Stratonovich SDE modules."""

    def __init__(self, noise_type: str):
        super().__init__(noise_type, "stratonovich")


_LEVY_NAMES = {"none": None, "space-time": "space-time", "davie": "davie", "foster": "foster"}


def _levy_name(levy_area_approximation: Any, levy_area: Any, owner: str) -> str | None:
    """torchmech's ``levy_area`` from torchsde's ``levy_area_approximation`` (or torchmech's own keyword)."""
    if levy_area is not None:
        if levy_area_approximation not in (None, "none"):
            raise ValueError(f"{owner}: pass levy_area_approximation (torchsde) or levy_area (torchmech), not both")
        return levy_area
    if levy_area_approximation is None:
        return None
    if levy_area_approximation not in _LEVY_NAMES:
        raise ValueError(f"{owner}: levy_area_approximation must be one of {sorted(_LEVY_NAMES)}, "
                         f"got {levy_area_approximation!r}")
    return _LEVY_NAMES[levy_area_approximation]


def _alias(a: Any, b: Any, names: str, owner: str) -> Any:
    """The one of two synonymous keyword arguments that was given (torchsde's name first in ``names``)."""
    if a is not None and b is not None:
        raise ValueError(f"{owner}: pass {names.replace('/', ' or ')}, not both")
    return a if a is not None else b


class _TorchsdeQueries:
    """torchsde's query ``bm(ta, tb=None, return_U=False, return_A=False)`` on a torchmech Brownian motion.

    ``bm(ta, tb)`` is the increment ``W(tb) - W(ta)``; ``bm(t)`` the value ``w0 + W(t) - W(t0)``.
    ``return_U``: also the time integral ``U = int_ta^tb (W_s - W_ta) ds = h (W / 2 + H)`` (needs
    ``levy_area_approximation`` "space-time", "davie" or "foster"); ``return_A``: also the space-space
    Levy area (needs "davie" or "foster"). Order of the results: ``W, U, A``.
    """

    _w0: Tensor | None = None

    def __call__(self, ta: Any, tb: Any = None, return_U: bool = False, return_A: bool = False):
        point = tb is None
        if point:
            ta, tb = self.t0, ta
        if not (return_U or return_A):
            W = self.evaluate(ta, tb)
            return W + self._w0 if point and self._w0 is not None else W
        if return_A and not self.has_space_space_levy_area:
            raise ValueError(f"{type(self).__name__}: return_A needs levy_area_approximation 'davie' or 'foster', "
                             f"got {self.levy_area!r}")
        inc = self.evaluate(ta, tb, levy_area=True)
        out = [inc.W]
        if return_U:
            h = torch.as_tensor(tb, dtype=inc.W.dtype) - torch.as_tensor(ta, dtype=inc.W.dtype)
            out.append(_bcast_time(h.to(inc.W.device), inc.W) * (0.5 * inc.W + inc.H))
        if return_A:
            # as torchsde: a 1-D size is a batch of scalar motions, which have no space-space area
            out.append(inc.A if len(self.shape) > 1 else torch.zeros_like(inc.W))
        return tuple(out)

    @property
    def levy_area_approximation(self) -> str:
        """torchsde's name of the Levy area the motion provides ("none", "space-time", "davie", "foster")."""
        return "none" if self.levy_area is None else self.levy_area

    @property
    def entropy(self) -> int:
        """torchsde's name of the seed."""
        return self.seed


def _bcast_time(h: Tensor, like: Tensor) -> Tensor:
    """A 0-d or per-sample (B,) time difference shaped to multiply ``like`` (B, ...)."""
    return h.reshape(h.shape + (1,) * (like.dim() - h.dim())) if h.dim() else h


class BrownianInterval(_TorchsdeQueries, _bm.BrownianInterval):
    """torchsde's ``BrownianInterval`` signature over torchmech's exact, lazily sampled Brownian motion.

    ``size``, ``entropy`` and ``levy_area_approximation`` are torchsde's names for ``shape``, ``seed`` and
    ``levy_area`` (either spelling works, as attributes too). ``dt``, ``tol``, ``pool_size``,
    ``halfway_tree`` and ``cache_size=0`` tune torchsde's own cache and tree and leave the law of the path
    unchanged; torchmech's interval needs no such hints, so they are accepted and have no effect.
    Not supported, raising instead: ``W``/``H`` (the path's total increment given in advance), an empty
    ``size`` (a scalar motion: use ``size=(1,)``), ``t0 == t1``, and queries outside ``[t0, t1]``
    (torchsde clamps them with a warning). Queries: see :class:`_TorchsdeQueries`; ``evaluate`` is
    torchmech's.
    """

    def __init__(self, t0: float = 0.0, t1: float = 1.0, size: Any = None, dtype: torch.dtype | None = None,
                 device: Any = None, entropy: int | None = None, dt: float | None = None, tol: float = 0.0,
                 pool_size: int = 8, cache_size: int | None = 45, halfway_tree: bool = False,
                 levy_area_approximation: str | None = "none", W: Tensor | None = None, H: Tensor | None = None,
                 *, shape: Any = None, seed: int | None = None, levy_area: str | None = None):
        if W is not None or H is not None:
            raise ValueError("BrownianInterval: W/H (conditioning on the total increment) are not supported")
        shape = _alias(size, shape, "size/shape", "BrownianInterval")
        if shape is None:
            raise ValueError("BrownianInterval: size (the shape of W, e.g. (batch, brownian channels)) is required")
        if cache_size is not None and isinstance(cache_size, int) and not isinstance(cache_size, bool):
            cache_size = max(cache_size, 2)  # torchsde's 0 (no cache): the smallest cache here
        super().__init__(t0, t1, shape, dtype=dtype, device=device,
                         seed=_alias(entropy, seed, "entropy/seed", "BrownianInterval"),
                         levy_area=_levy_name(levy_area_approximation, levy_area, "BrownianInterval"),
                         cache_size=cache_size)
        # torchsde's tuning attributes, kept for code that reads them (they do not change the path)
        self.dt, self.tol, self.pool_size, self.halfway_tree = dt, tol, pool_size, halfway_tree


class BrownianPath(_TorchsdeQueries, _bm.BrownianInterval):
    """torchsde's ``BrownianPath(t0, w0)``: an exact path from ``w0`` at ``t0``, kept in full, on
    ``[t0, t0 + 1]`` as torchsde's (``window_size`` is unused there too)."""

    def __init__(self, t0: float, w0: Tensor, window_size: int = 8):
        if not isinstance(w0, Tensor):
            raise TypeError(f"BrownianPath: w0 must be a tensor (the initial value), got {type(w0).__name__}")
        super().__init__(t0, float(t0) + 1.0, w0.shape, dtype=w0.dtype, device=w0.device, cache_size=None)
        self._w0 = w0


class BrownianTree(_TorchsdeQueries, _bm.VirtualBrownianTree):
    """torchsde's ``BrownianTree(t0, w0, t1=None, w1=None, entropy=None, tol=1e-6)`` as torchmech's
    :class:`~torchmech.de.brownian.VirtualBrownianTree` (constant memory, resolution ``tol``) on
    ``[t0, t1]`` (``t1`` defaults to ``t0 + 1``, as torchsde's), starting from ``w0``. ``pool_size``,
    ``cache_depth`` and ``safety`` tune torchsde's implementation and have no effect here; ``w1`` (a
    given end value) is not supported."""

    def __init__(self, t0: float, w0: Tensor, t1: float | None = None, w1: Tensor | None = None,
                 entropy: int | None = None, tol: float = 1e-6, pool_size: int = 24, cache_depth: int = 9,
                 safety: float | None = None):
        if not isinstance(w0, Tensor):
            raise TypeError(f"BrownianTree: w0 must be a tensor (the initial value), got {type(w0).__name__}")
        if w1 is not None:
            raise ValueError("BrownianTree: w1 (conditioning on the end value) is not supported")
        t1 = float(t0) + 1.0 if t1 is None else t1
        super().__init__(t0, t1, w0.shape, tol=tol, dtype=w0.dtype, device=w0.device, seed=entropy)
        self._w0 = w0


VirtualBrownianTree = _bm.VirtualBrownianTree


def _make_solver(method: str, sde_type: str, noise_type: str, adaptive: bool = False):
    if method not in _METHODS:
        raise ValueError(f"sdeint: unknown method {method!r}; expected one of {list(_METHODS)}")
    if method == "milstein":
        if noise_type == "general":
            raise ValueError("sdeint: method 'milstein' supports noise_type 'diagonal', 'scalar' or 'additive' (as "
                             "torchsde), got 'general'")
        solver = sde_solver_by_name(method, sde_type)
    else:
        if method == "srk" and noise_type == "general":
            raise ValueError("sdeint: method 'srk' supports noise_type 'additive' (SRA1), 'diagonal' or 'scalar' "
                             "(SRI2), as torchsde, got 'general'")
        solver = sde_solver_by_name(method, noise_type=noise_type)
        if solver.sde_type not in ("any", sde_type):
            raise ValueError(f"sdeint: method {method!r} solves {solver.sde_type} SDEs but sde.sde_type is "
                             f"{sde_type!r}")
    if not isinstance(adaptive, bool):
        raise TypeError(f"sdeint: adaptive must be a bool, got {type(adaptive).__name__}")
    if adaptive:
        if method == "reversible_heun":
            raise ValueError("sdeint: adaptive=True does not apply to method 'reversible_heun' (its steps carry "
                             "state between them); use fixed steps (adaptive=False, dt=...)")
        solver = _StepDoubling(solver)
    return solver


class _StepDoubling(AbstractSDESolver):
    """torchsde's adaptive stepping around any SDE method: a step is taken as two half steps, its error is
    their difference from one full step over the same Brownian increment, and the half steps are kept.

    This estimates the error of the method itself, where an embedded pair against Euler-Maruyama (the
    solvers' own ``adaptive=True``) estimates that of the lower-order method: on a diagonal-noise problem at
    rtol = atol = 1e-4 the embedded estimate took ~7x as many vector-field calls. The local error of a method
    of strong order p is O(h^(p + 1/2)), the step controller's exponent.
    """

    def __init__(self, base: AbstractSDESolver):
        self.base = base
        self.sde_type, self.strong_order, self.weak_order = base.sde_type, base.strong_order, base.weak_order
        self.order = base.order
        self.error_order = base.strong_order + 0.5

    def __repr__(self) -> str:
        return f"StepDoubling({self.base!r})"

    def init_vf(self, y0: Tensor, vf0: Any) -> Any:
        init = getattr(self.base, "init_vf", None)
        return vf0 if init is None else init(y0, vf0)

    def step(self, terms, t0, t1, y0, args, vf0, dense=True):
        tm = t0 + 0.5 * (t1 - t0)
        first = self.base.step(terms, t0, tm, y0, args, vf0, dense)
        second = self.base.step(terms, tm, t1, first.y1, args, first.vf1, dense)
        full = self.base.step(terms, t0, t1, y0, args, vf0, dense)
        return StepResult(second.y1, second.y1 - full.y1, second.vf1, (second.y1 - y0,),
                          first.nfev + second.nfev + full.nfev)


def _grid(ts: Tensor, dt: float, dtype: torch.dtype = torch.float64) -> Tensor:
    """Steps of size dt from each ts[i] to ts[i+1] (the last one shortened), so that every output time is a step
    end. (torchsde instead steps a uniform grid from ts[0] and interpolates the outputs linearly between steps.)

    Built in float64; a point that would land within a few units of round-off of ``dtype`` below
    the next output time is dropped (so no zero-length step appears once cast to ``dtype``).
    """
    eps = max(1e-12, 8 * torch.finfo(dtype).eps)
    pts = [float(ts[0])]
    for a, b in zip(ts[:-1].tolist(), ts[1:].tolist()):
        k = 1
        while a + k * dt < b - eps * max(1.0, abs(b)):
            pts.append(a + k * dt)
            k += 1
        pts.append(b)
    return torch.tensor(pts, dtype=torch.float64)


def _scalar_time(t: Tensor) -> Tensor:
    """The batch's one time as a 0-d tensor: torchsde calls f(t, y) and g(t, y) with a scalar t.

    Every solve this module starts has one t0 for the batch and shared steps (a shared grid, or
    ``norm=batch_rms_norm``; the backward solves of ``sdeint_adjoint`` alike), so ``t[0]`` is every
    sample's time (``test_adaptive_sdeint_calls_f_and_g_with_a_scalar_time``). Not checked per call: that
    would be a host read-back on every drift and diffusion evaluation.
    """
    return t[0]


class _Fn(torch.nn.Module):
    """Wraps sde.f / sde.g (torchsde signature f(t, y), scalar t) as f(t, y, args) with (B,) t."""

    def __init__(self, sde: torch.nn.Module, name: str):
        super().__init__()
        self.sde, self.name = sde, name

    def forward(self, t, y, args):
        return getattr(self.sde, self.name)(_scalar_time(t), y)


class _LogQP(torch.nn.Module):
    """Drift and diffusion of ``[y, log_ratio]`` with ``d log_ratio = |(f - h) / g|^2 / 2 dt``."""

    def __init__(self, sde, names):
        super().__init__()
        self.sde, self.names = sde, names

    def drift(self, t, z, args):
        tt = _scalar_time(t)
        y = z[:, :-1]
        f = getattr(self.sde, self.names["drift"])(tt, y)
        h = getattr(self.sde, self.names["prior_drift"])(tt, y)
        g = getattr(self.sde, self.names["diffusion"])(tt, y)
        u = (f - h) / g
        return torch.cat([f, 0.5 * (u * u).sum(-1, keepdim=True)], dim=-1)

    def diffusion(self, t, z, args):
        tt = _scalar_time(t)
        g = getattr(self.sde, self.names["diffusion"])(tt, z[:, :-1])
        return torch.cat([g, torch.zeros_like(g[:, :1])], dim=-1)


def _prepare(sde, y0, ts, bm, method, dt, adaptive, names, logqp):
    if isinstance(dt, Tensor) and dt.numel() == 1 and not dt.is_complex():
        dt = float(dt)
    if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not math.isfinite(dt) or dt <= 0:
        # (dt <= 0 looped for ever building the step grid, as in torchsde; nan took one step per output interval)
        raise ValueError(f"sdeint: dt must be a positive finite number, got {dt!r}")
    sde_type = getattr(sde, "sde_type", None)
    noise_type = getattr(sde, "noise_type", None)
    if sde_type not in ("ito", "stratonovich"):
        raise ValueError(f"sdeint: sde.sde_type must be 'ito' or 'stratonovich', got {sde_type!r}")
    if noise_type not in _NOISE:
        raise ValueError(f"sdeint: sde.noise_type must be one of {_NOISE}, got {noise_type!r}")
    names = {"drift": "f", "diffusion": "g", "prior_drift": "h", **(names or {})}
    for key in ("drift", "diffusion"):
        if not hasattr(sde, names[key]):
            raise ValueError(f"sdeint: sde has no method {names[key]!r} ({key})")
    if not isinstance(y0, Tensor) or y0.dim() != 2:
        raise ValueError(f"sdeint: y0 must have shape (batch, state), got "
                         f"{tuple(y0.shape) if isinstance(y0, Tensor) else type(y0).__name__}")
    ts = torch.as_tensor(ts, dtype=y0.dtype, device=y0.device)
    if ts.dim() != 1 or ts.shape[0] < 1 or not bool((ts.diff() > 0).all()):
        raise ValueError(f"sdeint: ts must be strictly increasing of shape (T,) with T >= 1, got {tuple(ts.shape)}")
    if method is None:
        # torchsde's defaults: srk for Ito SDEs (but general noise: euler), midpoint for Stratonovich ones. A given
        # Brownian motion without the space-time Levy area that srk needs gets euler instead of an error.
        levy = bm is None or getattr(bm, "has_levy_area", False)
        if sde_type == "stratonovich":
            method = "midpoint"
        else:
            method = "srk" if noise_type != "general" and levy else "euler"
    solver = _make_solver(method, sde_type, noise_type, adaptive)
    B, d = y0.shape
    if ts.shape[0] == 1:  # nothing to solve: the output is y0 (the checks above are all that apply)
        return None, solver, y0, ts, None
    with torch.no_grad():
        g0 = getattr(sde, names["diffusion"])(ts[0], y0)
    if noise_type == "diagonal":
        if g0.shape != y0.shape:
            raise ValueError(f"sdeint: diagonal noise needs g(t, y) of shape {tuple(y0.shape)}, got {tuple(g0.shape)}")
        m = d
    else:
        if g0.dim() != 3 or g0.shape[:2] != y0.shape:
            raise ValueError(f"sdeint: {noise_type} noise needs g(t, y) of shape (batch, state, brownian) = "
                             f"({B}, {d}, m), got {tuple(g0.shape)}")
        m = g0.shape[2]
        if noise_type == "scalar" and m != 1:
            raise ValueError(f"sdeint: scalar noise needs g(t, y) of shape ({B}, {d}, 1), got {tuple(g0.shape)}")
    if bm is None:
        bm = _bm.BrownianInterval(float(ts[0]), float(ts[-1]), (B, m), dtype=y0.dtype, device=y0.device,
                                  levy_area="space-time" if method == "srk" else None)
    if not isinstance(bm, AbstractBrownian):
        raise TypeError(f"sdeint: bm must be a torchmech BrownianInterval/VirtualBrownianTree, got {type(bm).__name__}")
    # with logqp torchsde's Brownian motion has one more channel, for the log-ratio (whose diffusion is 0)
    logqp_bm = logqp and bm.shape == (B, m + 1)
    if bm.shape != (B, m) and not logqp_bm:
        raise ValueError(f"sdeint: bm.shape must be ({B}, {m})" + (f" (or ({B}, {m + 1}) with logqp, as torchsde)"
                                                                    if logqp else "") + f", got {bm.shape}")
    if logqp:
        if noise_type != "diagonal":
            raise ValueError("sdeint: logqp=True supports diagonal noise only")
        if not hasattr(sde, names["prior_drift"]):
            raise ValueError(f"sdeint: logqp=True needs the prior drift method {names['prior_drift']!r}")
        lq = _LogQP(sde, names)
        bm_aug = bm if logqp_bm else _bm.WithZeroChannel(bm)
        terms = MultiTerm(ODETerm(lq.drift), DiagonalControlTerm(lq.diffusion, bm_aug))
        y0 = torch.cat([y0, torch.zeros_like(y0[:, :1])], dim=-1)
    else:
        drift = _Fn(sde, names["drift"])
        diff = _Fn(sde, names["diffusion"])
        diff_term = DiagonalControlTerm(diff, bm) if noise_type == "diagonal" else ControlTerm(diff, bm)
        terms = MultiTerm(ODETerm(drift), diff_term)
    grid = _grid(ts.detach().cpu().double(), float(dt), y0.dtype).to(dtype=y0.dtype, device=y0.device)
    return terms, solver, y0, ts, grid


def _adaptive_controller(rtol, atol, dt_min, ts=None):
    """torchsde's adaptive stepping: PID on the error estimate, a step of ``dt_min`` always accepted."""
    for name, v in (("rtol", rtol), ("atol", atol), ("dt_min", dt_min)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"sdeint: {name} must be a positive float with adaptive=True, got {v!r}")
    # one error estimate and one step for the whole batch, as torchsde steps: every sample is then at the
    # same time, and sde.f / sde.g get the scalar t they are written for
    return PIDController(rtol=rtol, atol=atol, dtmin=dt_min, force_dtmin=True, step_ts=ts, norm=batch_rms_norm)


def _adaptive_max_steps(ts, dt_min) -> int:
    """Enough attempted steps for steps of dt_min over the whole span (and rejections)."""
    return int(min(10 ** 7, 4 * float(ts[-1] - ts[0]) / dt_min + 16 * ts.shape[0] + 1000))


def _run(sde, y0, ts, bm, method, dt, adaptive, names, logqp, extra, adjoint, rtol=None, atol=None, dt_min=None):
    """``adjoint``: an adjoint, or a function ``(grid, ts) -> adjoint`` for one that needs the fixed step grid
    (steps of ``dt`` landing on every output time) or the checked output times."""
    terms, solver, y0a, ts, grid = _prepare(sde, y0, ts, bm, method, dt, adaptive, names, logqp)
    if terms is None:  # a single output time: y0 itself, as torchsde
        if extra:
            raise ValueError("sdeint: extra=True needs at least two times in ts (there is no solve to report on)")
        ys = y0a.unsqueeze(0).clone()
        return (ys, ys.new_zeros(0, ys.shape[1])) if logqp else ys
    if callable(adjoint):
        adjoint = adjoint(grid, ts)
    if adaptive:
        controller = _adaptive_controller(rtol, atol, dt_min, ts)
        sol = solve(terms, solver, float(ts[0]), float(ts[-1]), y0a, dt0=float(dt), controller=controller,
                    saveat=SaveAt(ts=ts), adjoint=adjoint, max_steps=_adaptive_max_steps(ts, dt_min))
    else:
        sol = solve(terms, solver, float(ts[0]), float(ts[-1]), y0a, controller=StepTo(grid),
                    saveat=SaveAt(ts=ts), adjoint=adjoint, max_steps=grid.shape[0] + 1)
    ys = sol.ys.transpose(0, 1)  # (T, B, d) time-first as torchsde
    if logqp:
        lr = ys[..., -1]
        ys = ys[..., :-1]
        out = (ys, lr.diff(dim=0))  # (T-1, B) KL per output interval
    else:
        out = ys
    if extra:
        return (*out, sol) if isinstance(out, tuple) else (out, sol)
    return out


def sdeint(sde, y0: Tensor, ts: Tensor, bm: Any = None, method: str | None = None, dt: float = 1e-3,
           adaptive: bool = False, rtol: float = 1e-5, atol: float = 1e-4, dt_min: float = 1e-5,
           options: dict | None = None, names: dict | None = None, logqp: bool = False, extra: bool = False):
    """Solve an SDE given as a torchsde-style module; gradients by direct backpropagation.

    Args:
        sde: an object (usually an ``nn.Module``) with ``sde_type`` ("ito"/"stratonovich"), ``noise_type`` ("diagonal",
            "scalar", "additive", "general"), ``f(t, y)`` (drift, (B, d)) and ``g(t, y)``
            (diffusion: (B, d) for diagonal noise, else (B, d, m)); ``h(t, y)`` (prior drift)
            for ``logqp``. ``t`` is a 0-d tensor.
        y0: (B, d) initial state.
        ts: (T,) increasing output times; the solve starts at ``ts[0]`` (T = 1 returns ``y0``).
        bm: a torchmech Brownian motion (this module's torchsde-style ``BrownianInterval``,
            ``BrownianTree``, ``BrownianPath``, or :mod:`torchmech.de.brownian`'s) of shape (B, m)
            covering ``[ts[0], ts[-1]]`` (default: a new ``BrownianInterval``).
        method: "euler" (Ito), "milstein" (diagonal, scalar, additive), "srk" (Ito; SRA1 for additive noise,
            SRI2 for diagonal and scalar noise; strong order 1.5, needs the space-time Levy area), "euler_heun",
            "heun", "midpoint", "reversible_heun" (Stratonovich). Default as torchsde: "srk" for Ito SDEs
            ("euler" for general noise, or when the given ``bm`` has no Levy area), "midpoint" for
            Stratonovich ones.
        dt: step size (a number or a one-element tensor); steps land exactly on every ``ts``.
        names: rename ``drift``/``diffusion``/``prior_drift`` methods, e.g. ``{"drift": "f_post"}``.
        logqp: also return the KL path term ``int |(f - h)/g|^2 / 2 dt`` per output interval (T-1, B)
            (diagonal noise; ``bm`` of shape (B, m) or, as torchsde's, (B, m + 1)).
        extra: also return the torchmech ``Solution``.
        adaptive: adaptive steps, as torchsde: every method but "reversible_heun"; each step is taken as
            two half steps, and its error is their difference from one full step. A ``PIDController(rtol,
            atol, dtmin=dt_min, force_dtmin=True, step_ts=ts, norm=batch_rms_norm)`` starting from ``dt``
            sets one step size for the whole batch, so ``f``/``g`` always get a scalar ``t``; every step
            lands on the output times, a rejected step re-queries the Brownian motion over the shorter
            interval (consistently, on the same path), and a step of ``dt_min`` is always accepted.
        rtol, atol, dt_min: tolerances and smallest step of adaptive stepping.
        options: torchsde solver options; none are supported (a non-empty dict raises).

    Returns:
        ys (T, B, d) time-first; with ``logqp`` a tuple ``(ys, log_ratio)``.
    """
    if options:
        raise ValueError(f"sdeint: unsupported options {sorted(options)}")
    return _run(sde, y0, ts, bm, method, dt, adaptive, names, logqp, extra, DirectAdjoint(), rtol, atol, dt_min)


def sdeint_adjoint(sde, y0: Tensor, ts: Tensor, bm: Any = None, method: str | None = None,
                   adjoint_method: str | None = None, dt: float = 1e-3, adaptive: bool = False,
                   adjoint_adaptive: bool = False, rtol: float = 1e-5, atol: float = 1e-4, adjoint_rtol: float = 1e-5,
                   adjoint_atol: float = 1e-4, dt_min: float = 1e-5, options: dict | None = None,
                   adjoint_options: dict | None = None, adjoint_params=None, names: dict | None = None,
                   logqp: bool = False, extra: bool = False):
    """As :func:`sdeint`, with memory-efficient gradients.

    - ``method="reversible_heun"`` with ``adjoint_method`` None or "adjoint_reversible_heun":
      :class:`~torchmech.de.reversible_adjoint.ReversibleAdjoint` (exact gradients of the
      discrete solve, memory independent of the number of steps).
    - otherwise (torchsde's stochastic adjoint): :class:`~torchmech.de.adjoint.BacksolveAdjoint`
      solves the adjoint SDE backwards in time on the same Brownian path (gradients of the
      continuous SDE, converging to those of :func:`sdeint` as ``dt`` shrinks; O(1) memory in the
      number of steps). ``adjoint_method`` is the backward solver: "midpoint", "heun", "euler_heun",
      "reversible_heun" ("srk" for additive noise); default: torchsde's, "midpoint" for
      Stratonovich SDEs. The adjoint SDE is solved in Stratonovich form, so for Ito SDEs (any noise
      type; the drift gets the correction ``-1/2 sum_k (dg_k/dy) g_k``) torchsde's Ito names "euler" and
      "milstein" (and the default) use "heun" on that form. Backward steps are steps of ``dt``
      landing on every output time (as the fixed-step forward grid, also after an adaptive forward
      solve), or with ``adjoint_adaptive=True`` a ``PIDController(adjoint_rtol, adjoint_atol,
      dtmin=dt_min)`` ("midpoint"/"heun"/"euler_heun"); ``adaptive`` and ``adjoint_adaptive`` are
      independent, as in torchsde.
    - ``adjoint_method="checkpoint"`` (not in torchsde): autograd through the forward solve with
      recomputed segments (exact gradients of the discrete solve, O(sqrt(steps)) memory).

    ``adjoint_params`` default to ``sde.parameters()``.
    """
    if options or adjoint_options:
        raise ValueError("sdeint_adjoint: options/adjoint_options are not supported")
    if adjoint_params is None:
        adjoint_params = [p for p in sde.parameters() if p.requires_grad] if isinstance(sde, torch.nn.Module) else None
    if method == "reversible_heun" and adjoint_method in (None, "adjoint_reversible_heun"):
        if adjoint_adaptive:
            raise ValueError("sdeint_adjoint: adjoint_adaptive=True is not supported with the reversible adjoint "
                             "(adjoint_method 'adjoint_reversible_heun' steps back exactly over the forward steps)")
        adjoint = ReversibleAdjoint(adjoint_params=adjoint_params)
    elif adjoint_method == "checkpoint":
        if adjoint_adaptive:
            raise ValueError("sdeint_adjoint: adjoint_adaptive=True has no meaning with adjoint_method 'checkpoint'")
        adjoint = CheckpointAdjoint()
    else:
        sde_type = getattr(sde, "sde_type", None)
        name = adjoint_method
        if name is None:
            name = "midpoint" if sde_type == "stratonovich" else "heun"
        elif name in ("euler", "milstein") and sde_type == "ito":
            name = "heun"  # the adjoint SDE is solved in Stratonovich form
        if name not in _ADJOINT_SOLVERS:
            raise ValueError(f"sdeint_adjoint: unknown or unsupported adjoint_method {adjoint_method!r}; expected "
                             f"one of {sorted(set(_ADJOINT_SOLVERS) | {'euler', 'milstein', 'checkpoint'})} "
                             "or 'adjoint_reversible_heun' with method 'reversible_heun'")
        cls = _ADJOINT_SOLVERS[name]
        if name == "srk" and getattr(sde, "noise_type", None) != "additive":
            # torchsde's srk for diagonal noise is SRI2; here it is SRA1, for additive noise only: the adjoint
            # SDE of a y-dependent diffusion has y-dependent noise, and SRA1's gradients came out ~25% off
            raise ValueError(f"sdeint_adjoint: adjoint_method 'srk' (SRA1) needs additive noise, got noise_type "
                             f"{getattr(sde, 'noise_type', None)!r}; use 'midpoint', 'heun' or 'euler_heun'")
        if adjoint_adaptive:
            if cls not in _adaptive_solver_classes():
                raise ValueError(f"sdeint_adjoint: adjoint_adaptive=True needs adjoint_method in {list(_ADAPTIVE)}, "
                                 f"got {name!r}")
            controller = _adaptive_controller(adjoint_rtol, adjoint_atol, dt_min)
            backward = cls(adaptive=True)
        else:
            controller = None
            backward = cls()

        def adjoint(grid, ts):
            # as torchsde, the backward solve steps by dt unless adjoint_adaptive, whatever the forward did:
            # after adaptive forward steps, by the fixed grid (steps of dt onto every output time)
            ctrl = controller
            if ctrl is None and adaptive:
                ctrl = _MarksTo(grid)
            steps = _adaptive_max_steps(ts, dt_min) if adjoint_adaptive else grid.shape[0] + 1
            return BacksolveAdjoint(solver=backward, controller=ctrl, adjoint_params=adjoint_params,
                                    max_steps=steps)
    return _run(sde, y0, ts, bm, method, dt, adaptive, names, logqp, extra, adjoint, rtol, atol, dt_min)


def _adaptive_solver_classes() -> tuple:
    return tuple(_ADJOINT_SOLVERS[m] for m in _ADAPTIVE if m in _ADJOINT_SOLVERS)


# backward solvers of the stochastic adjoint (Stratonovich, working through the terms' products)
_ADJOINT_SOLVERS = {"heun": StochasticHeun, "midpoint": StochasticMidpoint, "euler_heun": EulerHeun,
                    "reversible_heun": ReversibleHeun, "srk": SRA1}
