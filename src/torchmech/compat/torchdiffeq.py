"""torchdiffeq-style entry points (``import torchmech.compat.torchdiffeq as torchdiffeq``) over torchmech.de.solve.

``odeint(func, y0, t)`` follows torchdiffeq's semantics: ``func(t, y)`` gets a scalar (0-dim) time
and a state shaped like ``y0`` (a tensor of any shape, or a tuple of tensors); the result is
time-first, ``(len(t), *y0.shape)`` (a tuple of such tensors for a tuple state); the whole state
is integrated with one shared step size (it is solved as one flattened sample ``(1, N)`` by
:func:`torchmech.de.solve`). The error norm, tolerances and step-size rule are torchdiffeq's:
``norm(err / (atol + rtol * max(|y0|, |y1|))) <= 1`` with an RMS norm over the whole state (the
max of per-tensor RMS norms for a tuple state).

The Adams methods (``explicit_adams``: Adams-Bashforth; ``implicit_adams``, alias ``fixed_adams``:
Adams-Bashforth-Moulton predictor-corrector with the corrector iterated until it converges to
``rtol``/``atol``) are fixed-grid multistep methods run by a small loop in this module (the
:func:`torchmech.de.solve` loop keeps no history between steps). Their first steps, while too few
past derivatives exist, are ``rk4`` (3/8 rule) steps; the order then builds up to ``max_order``
as the history grows (default 4, order 4 overall). Their weights are exact for the actual grid
(variable-step Adams), so a shortened last step or an irregular ``t`` keeps the order.

Differences worth knowing: values between steps of the adaptive methods come from torchmech's
interpolants (Dopri5/Tsit5 fourth-order continuous extensions, cubic Hermite otherwise), so they
agree with torchdiffeq to the tolerance, not bit for bit; the adaptive and RK methods hold times in the
solve's dtype (the state's; float32 for a half-precision state), the Adams methods in ``t``'s own dtype
(torchdiffeq keeps float64 time internally); failures raise ``RuntimeError`` (torchdiffeq:
``AssertionError``); ``scipy_solver`` is not provided. ``options['max_num_steps']`` bounds the steps
(accepted and rejected) of each output interval as torchdiffeq, but is enforced over the whole solve:
``len(t) - 1`` intervals may take ``max_num_steps * (len(t) - 1)`` steps in all, however they are
shared out. float16/bfloat16 states are integrated in float32 (``func`` still sees, and the result
has, the state's dtype); complex states are integrated as their real views (as torchdiffeq); a tuple
state may mix dtypes (each part keeps its own; the solve runs in the widest). torchdiffeq's step
callbacks (``func.callback_step`` and the like) are not supported: a ``func`` defining them is
refused rather than silently not called. ``adaptive_heun`` evaluates ``func`` at each new state where
torchdiffeq reuses the last stage (taken at the Euler predictor, not the new state): on Van der Pol
at rtol = atol = 1e-5 it takes about twice torchdiffeq's steps and is about 6x more accurate.
``fehlberg2`` likewise spends one more evaluation per step than torchdiffeq's. With
``perturb=True`` and ``interp='cubic'``, the derivative at the end of a step is taken just inside
the step (torchdiffeq takes it on the grid point, the far side of a discontinuity there). Adams methods: ``max_order`` defaults to 4
(torchdiffeq: 12, whose Adams-Bashforth formulas are stable only for very small steps) and means
what torchdiffeq's documentation says: the order of the Adams-Bashforth formula for
``explicit_adams`` (torchdiffeq 0.2.5 is observed to step with order ``max_order - 1``: its
``max_order=5`` gives our default) and of the predictor-corrector pair for ``implicit_adams`` (as
torchdiffeq); ``max_order < 4`` gives that lower-order Adams method (torchdiffeq falls back to
``rk4``); on an uneven grid our weights follow the grid while torchdiffeq's constant-step weights
lose order, so the two agree on evenly spaced grids only; the corrector's stopping test is ours,
so ``implicit_adams`` agrees with torchdiffeq to the tolerance (to rounding once both converge).
"""

from __future__ import annotations

import math
import operator
import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from torchmech.de.adjoint import BacksolveAdjoint, CheckpointAdjoint, DirectAdjoint, _MarksTo
from torchmech.de.controllers import ConstantStep, PIDController, StepTo
from torchmech.de.events import Event
from torchmech.de.integrate import SaveAt, Status, solve
from torchmech.de.solvers import explicit as _ex
from torchmech.de.solvers.rk import AbstractSolver, ButcherTableau, ExplicitRK, Perturbed, StepResult

__all__ = ["odeint", "odeint_adjoint", "odeint_event", "SOLVERS"]

# --- tableaux that torchdiffeq uses and torchmech.de does not name --------------------------------

# Runge-Kutta-Fehlberg 2(1): second-order solution, first-order embedded one.
FEHLBERG2 = ButcherTableau(
    c=[0.0, 0.5, 1.0], a=[[0.5], [1 / 256, 255 / 256]], b=[1 / 512, 255 / 256, 1 / 512], order=2,
    b_error=[-1 / 512, 0.0, 1 / 512], embedded_order=1,
)
# Heun's third-order method.
HEUN3 = ButcherTableau(c=[0.0, 1 / 3, 2 / 3], a=[[1 / 3], [0.0, 2 / 3]], b=[0.25, 0.0, 0.75], order=3)
# Kutta's 3/8 rule: torchdiffeq's "rk4".
RK4_38 = ButcherTableau(c=[0.0, 1 / 3, 2 / 3, 1.0], a=[[1 / 3], [-1 / 3, 1.0], [1.0, -1.0, 1.0]],
                        b=[1 / 8, 3 / 8, 3 / 8, 1 / 8], order=4)
HEUN2 = ButcherTableau(c=[0.0, 1.0], a=[[1.0]], b=[0.5, 0.5], order=2)

_ADAPTIVE: dict[str, Callable[[], AbstractSolver]] = {
    "dopri5": _ex.Dopri5, "dopri8": _ex.Dopri8, "bosh3": _ex.Bosh3, "tsit5": _ex.Tsit5,
    "adaptive_heun": _ex.Heun, "fehlberg2": lambda: ExplicitRK(FEHLBERG2),
}
_FIXED: dict[str, Callable[[], AbstractSolver]] = {
    "euler": _ex.Euler, "midpoint": lambda: ExplicitRK(ButcherTableau(c=[0.0, 0.5], a=[[0.5]], b=[0.0, 1.0], order=2)),
    "heun2": lambda: ExplicitRK(HEUN2), "heun3": lambda: ExplicitRK(HEUN3), "rk4": lambda: ExplicitRK(RK4_38),
}
# fixed-grid multistep methods, run by _adams below; the value says whether the corrector is used
_ADAMS: dict[str, bool] = {"explicit_adams": False, "implicit_adams": True, "fixed_adams": True}
_NOT_PROVIDED = {
    "scipy_solver": "a wrapper around scipy.integrate.solve_ivp",
}
#: Method names accepted by :func:`odeint`.
SOLVERS = tuple(_ADAPTIVE) + tuple(_FIXED) + tuple(_ADAMS)

_ADAPTIVE_OPTIONS = ("first_step", "min_step", "max_step", "safety", "ifactor", "dfactor", "max_num_steps",
                     "step_t", "jump_t", "norm")
_FIXED_OPTIONS = ("step_size", "grid_constructor", "perturb", "interp")
_ADAMS_OPTIONS = {"explicit_adams": _FIXED_OPTIONS + ("max_order",),
                  "implicit_adams": _FIXED_OPTIONS + ("max_order", "max_iters"),
                  "fixed_adams": _FIXED_OPTIONS + ("max_order", "max_iters")}
#: Largest ``max_order`` accepted by the Adams methods (as torchdiffeq).
ADAMS_MAX_ORDER = 12


# --- state flattening --------------------------------------------------------------------------

def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return {torch.complex32: torch.float16, torch.complex64: torch.float32,
            torch.complex128: torch.float64}.get(dtype, dtype)


class _Layout:
    """Maps a tensor or tuple-of-tensors state to one flat real vector (N,) and back.

    The flat vector has the *compute dtype*: float64 if any part is (complex) float64, else float32
    (the solvers run in float32 or float64; float16/bfloat16 states are integrated in float32 and
    handed to ``func`` and returned in their own dtype). A complex part is flattened as its real
    view (real and imaginary parts interleaved), so tolerances and norms act on both, as torchdiffeq.
    """

    def __init__(self, y0: Any):
        if isinstance(y0, Tensor):
            self.shapes = None
            parts = [y0]
        elif isinstance(y0, tuple):
            if len(y0) == 0:
                raise ValueError("odeint: y0 is an empty tuple; expected a tensor or a tuple of tensors")
            for i, p in enumerate(y0):
                if not isinstance(p, Tensor):
                    raise TypeError(f"odeint: y0[{i}] must be a torch.Tensor, got {type(p).__name__}")
            self.shapes = [p.shape for p in y0]
            parts = list(y0)
        else:
            raise TypeError(f"odeint: y0 must be a torch.Tensor or a tuple of tensors, got {type(y0).__name__}")
        for i, p in enumerate(parts):
            where = "y0" if self.shapes is None else f"y0[{i}]"
            if not (p.is_floating_point() or p.is_complex()):
                raise TypeError(f"odeint: {where} must be a floating-point or complex tensor, got dtype {p.dtype}")
            if p.device != parts[0].device:
                raise TypeError(f"odeint: all tensors of a tuple y0 must be on one device; y0[0] is on "
                                f"{parts[0].device}, {where} is on {p.device}")
        self.shape = parts[0].shape if self.shapes is None else None
        self.dtypes = [p.dtype for p in parts]
        self.complex = [p.is_complex() for p in parts]
        self.sizes = [p.numel() * (2 if c else 1) for p, c in zip(parts, self.complex)]
        wide = any(_real_dtype(d) == torch.float64 for d in self.dtypes)
        self.dtype = torch.float64 if wide else torch.float32
        self.device = parts[0].device

    @property
    def is_tuple(self) -> bool:
        return self.shapes is not None

    def part_shapes(self) -> list:
        """The shapes of the flattened parts' elements: a complex part's shape gets a trailing 2."""
        shapes = [self.shape] if self.shapes is None else self.shapes
        return [tuple(s) + ((2,) if c else ()) for s, c in zip(shapes, self.complex)]

    def _flat_part(self, p: Tensor, i: int) -> Tensor:
        if self.complex[i]:
            p = torch.view_as_real(p.to(self.dtypes[i]))
        return p.to(self.dtype).reshape(-1)

    def flatten(self, y: Any, what: str = "func") -> Tensor:
        """State-like value -> (N,). Each tensor must have exactly its part's shape: an output with the
        right number of elements in another layout (e.g. transposed) would otherwise be silently reshaped."""
        if self.shapes is None:
            if not (isinstance(y, Tensor) and y.shape == self.shape):
                got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
                raise ValueError(f"odeint: {what} must return a tensor shaped like y0 {tuple(self.shape)}, got {got}")
            return self._flat_part(y, 0)
        if not isinstance(y, (tuple, list)) or len(y) != len(self.shapes):
            raise ValueError(f"odeint: {what} must return a tuple of {len(self.shapes)} tensors (like y0), "
                             f"got {type(y).__name__}")
        for i, (p, s) in enumerate(zip(y, self.shapes)):
            if not (isinstance(p, Tensor) and p.shape == s):
                got = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
                raise ValueError(f"odeint: {what} output [{i}] must have shape {tuple(s)}, got {got}")
        return torch.cat([self._flat_part(p, i) for i, p in enumerate(y)])

    def unflatten(self, flat: Tensor) -> Any:
        """(..., N) -> state with the leading axes kept: (..., *shape) or a tuple of those, each part in
        its own dtype."""
        lead = tuple(flat.shape[:-1])
        out = []
        for i, (p, s) in enumerate(zip(flat.split(self.sizes, dim=-1), self.part_shapes())):
            p = p.reshape(lead + s)
            if self.complex[i]:
                p = torch.complex(p[..., 0], p[..., 1])
            out.append(p.to(self.dtypes[i]))
        return out[0] if self.shapes is None else tuple(out)


class _FlatFunc(torch.nn.Module):
    """torchdiffeq ``func(t, y)`` (scalar t, y like y0) as a torchmech vector field on (1, N)."""

    def __init__(self, func: Callable, layout: _Layout):
        super().__init__()
        self.func = func
        self.layout = layout

    def forward(self, t: Tensor, y: Tensor, args: Any) -> Tensor:
        out = self.func(t[0], self.layout.unflatten(y[0]))
        return self.layout.flatten(out, "func").unsqueeze(0)


# --- argument checking -------------------------------------------------------------------------

_CALLBACKS = ("callback_step", "callback_accept_step", "callback_reject_step", "callback_step_adjoint",
              "callback_accept_step_adjoint", "callback_reject_step_adjoint")


def _refuse_callbacks(func: Any) -> None:
    """torchdiffeq calls these hooks of ``func`` around each step; torchmech's solve loop has none to call."""
    found = [name for name in _CALLBACKS if callable(getattr(func, name, None))]
    if found:
        raise ValueError(f"odeint: func defines {', '.join(found)}; torchdiffeq calls these around each step, "
                         "torchmech does not support step callbacks. Remove them (or call odeint on a wrapper "
                         "without them), or use torchmech.solve(..., saveat=SaveAt(steps=True)) to get every "
                         "step's time and state")


def _check_t(t: Any, layout: _Layout, min_len: int = 1) -> Tensor:
    if not isinstance(t, Tensor):
        try:
            t = torch.as_tensor(t, dtype=layout.dtype)
        except Exception as exc:  # noqa: BLE001
            raise TypeError(f"odeint: t must be a 1-D tensor of times, got {type(t).__name__}") from exc
    if not t.is_floating_point():
        raise TypeError(f"odeint: t must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != 1 or t.shape[0] < min_len:
        raise ValueError(f"odeint: t must be a 1-D tensor with at least {min_len} time(s), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError("odeint: t must be finite")
    t = t.to(device=layout.device)
    if t.shape[0] > 1:
        d = t.diff()
        if not (bool((d > 0).all()) or bool((d < 0).all())):
            raise ValueError(f"odeint: t must be strictly increasing or strictly decreasing, got {t.tolist()[:20]}")
    return t


def _tol(name: str, tol: Any, layout: _Layout) -> float | Tensor:
    """Tolerance as a float or a (1, N) tensor over the flattened state."""
    if isinstance(tol, Tensor) and tol.requires_grad:
        raise ValueError(f"odeint: {name} must not require grad")
    if isinstance(tol, np.ndarray) or isinstance(tol, np.generic):
        tol = torch.as_tensor(tol)

    def spread(v: Tensor, i: int, shape: tuple, where: str) -> Tensor:
        """``v`` broadcast over part ``i`` (shape ``shape``), repeated for the real and imaginary parts."""
        if v.is_complex():
            raise TypeError(f"odeint: {where} must be real, got dtype {v.dtype}")
        v = v.to(dtype=layout.dtype, device=layout.device)
        try:
            v = v.expand(shape)
        except RuntimeError:
            raise ValueError(f"odeint: {where} of shape {tuple(v.shape)} does not broadcast to "
                             f"{'y0' if len(layout.sizes) == 1 else f'y0[{i}]'}'s shape {tuple(shape)}") from None
        if layout.complex[i]:
            v = v.unsqueeze(-1).expand(*shape, 2)
        return v.reshape(-1)

    if layout.is_tuple and (isinstance(tol, (tuple, list)) or (isinstance(tol, Tensor) and tol.dim() > 0)):
        tols = list(tol)
        if len(tols) != len(layout.shapes):
            raise ValueError(f"odeint: a per-tensor {name} must have one entry per tensor of y0 "
                             f"({len(layout.shapes)}), got {len(tols)}")
        out = torch.cat([spread(torch.as_tensor(v), i, tuple(s), f"{name}[{i}]")
                         for i, (v, s) in enumerate(zip(tols, layout.shapes))])[None]
    elif isinstance(tol, Tensor) and tol.numel() > 1:
        out = spread(tol, 0, tuple(layout.shape), name)[None]
    else:
        try:
            out = float(tol)
        except Exception as exc:  # noqa: BLE001
            raise TypeError(f"odeint: {name} must be a float, a tensor or (tuple y0) a tuple, "
                            f"got {type(tol).__name__}") from exc
    vals = torch.as_tensor(out)
    if not torch.isfinite(vals).all() or (vals < 0).any():
        raise ValueError(f"odeint: {name} must be finite and >= 0, got {tol}")
    if name == "rtol":  # rtol = 0 (pure absolute control): a positive value far below any atol
        tiny = torch.finfo(layout.dtype).tiny
        out = max(out, tiny) if isinstance(out, float) else out.clamp(min=tiny)
    return out


def _method(method: Any) -> str:
    if method is None:
        return "dopri5"
    if not isinstance(method, str):
        raise TypeError(f"odeint: method must be a string such as 'dopri5', got {type(method).__name__}")
    if method in _NOT_PROVIDED:
        raise ValueError(f"odeint: method {method!r} ({_NOT_PROVIDED[method]}) is not provided by torchmech; "
                         f"use one of {list(SOLVERS)}")
    if method not in _ADAPTIVE and method not in _FIXED and method not in _ADAMS:
        raise ValueError(f"odeint: invalid method {method!r}; expected one of {list(SOLVERS)}")
    return method


def _check_options(method: str, options: Any) -> dict:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"odeint: options must be a dict, got {type(options).__name__}")
    allowed = _ADAPTIVE_OPTIONS if method in _ADAPTIVE else _ADAMS_OPTIONS.get(method, _FIXED_OPTIONS)
    kind = "adaptive" if method in _ADAPTIVE else "fixed-grid"
    for key in options:
        if key not in allowed:
            raise ValueError(f"odeint: option {key!r} is not supported for the {kind} method {method!r}; "
                             f"supported options: {list(allowed)}")
    return dict(options)


def _norm(user_norm: Any, layout: _Layout) -> Callable[[Tensor], Tensor]:
    """Error norm on (1, N): torchdiffeq's RMS (mixed RMS/max for tuples) or the user's on unflattened y."""
    if user_norm is None:
        if not layout.is_tuple:
            return lambda x: x.pow(2).mean(dim=1).sqrt()
        sizes = layout.sizes
        return lambda x: torch.stack([p.pow(2).mean(dim=1).sqrt() for p in x.split(sizes, dim=1)]).amax(dim=0)
    if not callable(user_norm):
        raise TypeError(f"odeint: options['norm'] must be callable, got {type(user_norm).__name__}")

    def norm(x: Tensor) -> Tensor:
        val = torch.as_tensor(user_norm(layout.unflatten(x[0])), dtype=x.dtype, device=x.device)
        if val.numel() != 1:
            raise ValueError(f"odeint: options['norm'] must return a scalar, got shape {tuple(val.shape)}")
        return val.reshape(1)

    return norm


def _times(v: Any, name: str, layout: _Layout) -> Tensor:
    v = torch.as_tensor(v, dtype=layout.dtype, device=layout.device)
    if v.dim() != 1:
        raise ValueError(f"odeint: options[{name!r}] must be a 1-D tensor of times, got shape {tuple(v.shape)}")
    return v


def _int_option(o: dict, name: str, default: int, lo: int, hi: int | None) -> int:
    v = o.get(name, default)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
        expect = f"an int in [{lo}, {hi}]" if hi is not None else f"an int >= {lo}"
        raise ValueError(f"odeint: options[{name!r}] must be {expect}, got {v!r}")
    return int(v)


def _positive(v: Any, name: str) -> float:
    try:
        x = float(v)
    except Exception as exc:  # noqa: BLE001
        raise TypeError(f"odeint: options[{name!r}] must be a number, got {type(v).__name__}") from exc
    if not x > 0:
        raise ValueError(f"odeint: options[{name!r}] must be > 0, got {v}")
    return x


# --- problem setup -----------------------------------------------------------------------------

class _Setup:
    """Everything ``solve`` needs for one torchdiffeq-style call."""

    def __init__(self, func, y0, t, rtol, atol, method, options, min_t_len=1):
        if not callable(func):
            raise TypeError(f"odeint: func must be callable func(t, y), got {type(func).__name__}")
        self.layout = _Layout(y0)
        self.method = _method(method)
        self.options = _check_options(self.method, options)
        self.t = _check_t(t, self.layout, min_t_len)
        self.func = func
        self.f = _FlatFunc(func, self.layout)
        self.y0_flat = self.layout.flatten(y0 if isinstance(y0, Tensor) else y0, "y0").unsqueeze(0)
        self.adams = self.method in _ADAMS
        self.fixed = self.method in _FIXED or self.adams
        self.max_steps = 2 ** 31 - 1
        self.max_num_steps = None
        _refuse_callbacks(func)
        o = self.options
        if self.fixed:
            self.solver = None if self.adams else _FIXED[self.method]()
            if "perturb" in o:
                if not isinstance(o["perturb"], bool):
                    raise TypeError(f"odeint: options['perturb'] must be a bool, got {o['perturb']!r}")
                if o["perturb"] and self.adams:
                    raise ValueError(f"odeint: options['perturb']=True is not supported for {self.method!r}: a "
                                     "multistep method reuses each derivative over several steps and extrapolates "
                                     "across grid points, so it cannot keep func on one side of a discontinuity; "
                                     "use a one-step method such as 'rk4' there")
                if o["perturb"]:
                    self.solver = Perturbed(self.solver)
            if self.adams:
                self.implicit = _ADAMS[self.method]
                self.max_order = _int_option(o, "max_order", 4, 1, ADAMS_MAX_ORDER)
                self.max_iters = _int_option(o, "max_iters", 4, 1, None)
                self.rtol = _tol("rtol", rtol, self.layout)
                self.atol = _tol("atol", atol, self.layout)
            self.interp = o.get("interp", "linear")
            if self.interp not in ("linear", "cubic"):
                raise ValueError(f"odeint: options['interp'] must be 'linear' or 'cubic', got {self.interp!r}")
            if "step_size" in o and "grid_constructor" in o:
                raise ValueError("odeint: options 'step_size' and 'grid_constructor' are mutually exclusive")
            self.controller = None  # built from the grid
        else:
            self.solver = _ADAPTIVE[self.method]()
            min_step = o.get("min_step", 0.0)
            max_step = o.get("max_step", math.inf)
            dtmin = float(min_step) if float(min_step) > 0 else None
            dtmax = None if math.isinf(float(max_step)) else _positive(max_step, "max_step")
            if "max_num_steps" in o:
                m = o["max_num_steps"]
                try:
                    m = operator.index(m) if not isinstance(m, bool) else 0
                except TypeError:
                    m = 0
                if m < 1:
                    raise ValueError(f"odeint: options['max_num_steps'] must be a positive int, "
                                     f"got {o['max_num_steps']!r}")
                # torchdiffeq's limit holds per output interval; one solve over all of them gets the sum
                self.max_num_steps = m
                self.max_steps = m * max(1, self.t.shape[0] - 1)
            self.first_step = None
            if o.get("first_step") is not None:
                self.first_step = _positive(o["first_step"], "first_step")
            rtol_, atol_ = _tol("rtol", rtol, self.layout), _tol("atol", atol, self.layout)
            try:
                self.controller = PIDController(
                    rtol=rtol_, atol=atol_,
                    dtmin=dtmin, dtmax=dtmax, force_dtmin=dtmin is not None,
                    safety=float(o.get("safety", 0.9)), factormax=float(o.get("ifactor", 10.0)),
                    factormin=float(o.get("dfactor", 0.2)), norm=_norm(o.get("norm"), self.layout),
                    step_ts=None if o.get("step_t") is None else _times(o["step_t"], "step_t", self.layout),
                    jump_ts=None if o.get("jump_t") is None else _times(o["jump_t"], "jump_t", self.layout),
                )
            except ValueError as exc:
                raise ValueError(f"odeint: invalid options for {self.method!r}: {exc}") from None
        if self.fixed:
            # tolerances are not used by fixed-grid methods but must still be valid
            _tol("rtol", rtol, self.layout)
            _tol("atol", atol, self.layout)

    def grid(self) -> Tensor:
        """Fixed-grid methods: the step grid (M,) from t[0] to t[-1] (torchdiffeq's construction)."""
        t, o = self.t, self.options
        if "grid_constructor" in o:
            gc = o["grid_constructor"]
            if not callable(gc):
                raise TypeError("odeint: options['grid_constructor'] must be callable (func, y0, t) -> grid")
            if self.layout.is_tuple:  # as torchdiffeq: the flattened state and a func on it
                g = gc(lambda tt, y: self.layout.flatten(self.func(tt, self.layout.unflatten(y))),
                       self.y0_flat[0], t)
            else:
                g = gc(self.func, self.layout.unflatten(self.y0_flat[0]), t)
            if not isinstance(g, Tensor) or g.dim() != 1:
                raise ValueError("odeint: grid_constructor must return a 1-D tensor of times")
            g = g.to(dtype=t.dtype, device=t.device)
            if g[0] != t[0] or g[-1] != t[-1]:
                raise ValueError(f"odeint: grid_constructor's grid must start at t[0]={float(t[0])} and end at "
                                 f"t[-1]={float(t[-1])}, got [{float(g[0])}, ..., {float(g[-1])}]")
        elif o.get("step_size") is not None:
            h = _positive(o["step_size"], "step_size")
            span = float((t[-1] - t[0]).detach().abs())
            n = int(math.ceil(span / h + 1))
            d = 1.0 if t.shape[0] < 2 or t[-1] > t[0] else -1.0
            g = t[0] + d * h * torch.arange(n, dtype=t.dtype, device=t.device)
            g[-1] = t[-1]
        else:
            g = t.clone()  # (not detached: the discrete solution depends on the grid, and so on t)
        if g.shape[0] > 1:
            d = 1.0 if g[-1] > g[0] else -1.0
            step = d * g.diff()
            if bool((step < 0).any()) or not bool(torch.isfinite(g).all()):
                raise ValueError("odeint: the fixed-step grid must be finite and monotonic from t[0] to t[-1]")
            keep = torch.ones_like(g, dtype=torch.bool)
            keep[1:] = step > 0  # drop repeated points (zero-length steps change nothing)
            g = g[keep]
        return g


def _interp_fixed(setup: _Setup, grid: Tensor, Y: Tensor) -> Tensor:
    """Values at ``setup.t`` (T, N) from grid values ``Y`` (M, N): linear or cubic Hermite per step."""
    t = setup.t.to(Y.dtype)
    g = grid.to(Y.dtype)
    if g.shape[0] == 1:
        return Y[:1].expand(t.shape[0], Y.shape[1])
    d = 1.0 if g[-1] > g[0] else -1.0
    k = torch.searchsorted(d * g, d * t, right=False).clamp(1, g.shape[0] - 1)  # step (k-1, k) holds t
    exact_end = g[k] == t
    exact_start = g[k - 1] == t
    ta, tb = g[k - 1], g[k]
    ya, yb = Y[k - 1], Y[k]
    s = ((t - ta) / (tb - ta))[:, None]
    if setup.interp == "linear":
        val = ya + s * (yb - ya)
    else:
        # derivatives at the step ends; with perturb each is taken inside its step (just after the start,
        # just before the end), so a discontinuity on a grid point never leaks into the neighbouring step
        # (torchdiffeq evaluates the end one exactly on the grid point, i.e. on the far side)
        perturb = isinstance(setup.solver, Perturbed)
        fs: dict = {}

        def deriv(i: int, towards: int) -> Tensor:
            key = (i, towards if perturb else i)
            if key not in fs:
                ti = torch.nextafter(g[i], g[towards]) if perturb else g[i]
                fs[key] = setup.f(ti.reshape(1), Y[i:i + 1], None)[0]
            return fs[key]

        fa = torch.stack([deriv(int(i), int(i) + 1) for i in (k - 1)])
        fb = torch.stack([deriv(int(i), int(i) - 1) for i in k])
        h = (tb - ta)[:, None]
        h00 = (1 + 2 * s) * (1 - s) ** 2
        h10 = s * (1 - s) ** 2
        h01 = s ** 2 * (3 - 2 * s)
        h11 = s ** 2 * (s - 1)
        # at s = 0 or 1 the polynomial is ya or yb exactly; not substituting them keeps its derivative in
        # t (f there) for a t that requires grad, as torchdiffeq's cubic interpolation does
        return h00 * ya + h10 * h * fa + h01 * yb + h11 * h * fb
    val = torch.where(exact_start[:, None], ya, val)
    return torch.where(exact_end[:, None], yb, val)


# --- Adams multistep methods -------------------------------------------------------------------

def _adams_weights(nodes: np.ndarray) -> np.ndarray:
    """Quadrature weights of an Adams formula, per step.

    ``nodes`` (S, k): the times whose derivatives enter the formula, in units of the step, the step
    itself running over ``[0, 1]`` (so 0 is the current grid point, 1 the next, -1 the previous on an
    even grid). Returns (S, k): ``w[s, j]`` is the integral over ``[0, 1]`` of the j-th Lagrange basis
    polynomial on the nodes, by Gauss-Legendre quadrature (exact for these degrees) with the basis
    evaluated in product form, which stays accurate for high orders where a Vandermonde solve does not.
    On an even grid these are the textbook Adams-Bashforth / Adams-Moulton coefficients.
    """
    S, k = nodes.shape
    x, wq = np.polynomial.legendre.leggauss(k // 2 + 1)
    x, wq = 0.5 * (x + 1.0), 0.5 * wq
    eye = np.eye(k, dtype=bool)
    out = np.empty((S, k))
    for a in range(0, S, 2048):  # bounded memory: chunk (c, k, k, G)
        nd = nodes[a:a + 2048]
        denom = np.where(eye, 1.0, nd[:, :, None] - nd[:, None, :]).prod(axis=2)  # (c, j)
        num = x[None, None, :] - nd[:, :, None]  # (c, i, G)
        numer = np.where(eye[None, :, :, None], 1.0, num[:, None, :, :]).prod(axis=2)  # (c, j, G)
        out[a:a + 2048] = (numer * wq).sum(-1) / denom
    return out


class _AdamsPlan:
    """Per-step formulas of an Adams method on a grid (M,), computed once in float64.

    For step ``n`` (``grid[n] -> grid[n+1]``, step ``h``): ``rk[n]`` says the step is an ``rk4`` (3/8)
    start-up step; otherwise ``ab[n]`` holds ``h * weights`` of the Adams-Bashforth formula on the
    derivatives at ``grid[n], grid[n-1], ...`` and, for the implicit method, ``am_new[n]`` the weight
    of the derivative at ``grid[n+1]`` and ``am_past[n]`` those at ``grid[n], grid[n-1], ...`` of the
    Adams-Moulton corrector. The Adams-Bashforth window is ``max_order`` (explicit) or
    ``max_order - 1`` (implicit, at least 1) past derivatives, filled as they accumulate: steps with
    fewer than ``min(window, 3)`` past derivatives are ``rk4`` steps, and the orders then build up
    (3, 4, ...), so the start-up keeps the overall order (4 at most); the corrector uses one order
    more than the predictor, up to ``max_order``.
    """

    def __init__(self, grid: Tensor, implicit: bool, max_order: int):
        g = grid.detach().to("cpu", torch.float64).numpy()
        m = g.shape[0] - 1
        self.h = (g[1:] - g[:-1]).tolist()
        window = max(max_order - 1, 1) if implicit else max_order
        q = np.minimum(np.arange(m) + 1, window)  # AB order of each step
        self.rk = (q < min(window, 3)).tolist()
        self.window = window
        self.ab: list = [None] * m
        self.am_new: list = [None] * m
        self.am_past: list = [None] * m
        h = g[1:] - g[:-1]

        def past(steps, k):  # (S, k) nodes grid[n - j], j < k, in step units
            idx = steps[:, None] - np.arange(k)[None, :]
            return (g[idx] - g[steps][:, None]) / h[steps][:, None]

        for order in np.unique(q):
            steps = np.nonzero((q == order) & ~np.asarray(self.rk, dtype=bool))[0]
            if steps.size == 0:
                continue
            w = _adams_weights(past(steps, int(order))) * h[steps][:, None]
            for n, row in zip(steps.tolist(), w.tolist()):
                self.ab[n] = row
            if implicit:
                c = min(int(order) + 1, max_order)  # corrector order: the new point and c - 1 past ones
                nodes = np.concatenate([np.ones((steps.size, 1)), past(steps, c - 1)], axis=1)
                w = _adams_weights(nodes) * h[steps][:, None]
                for n, row in zip(steps.tolist(), w.tolist()):
                    self.am_new[n], self.am_past[n] = row[0], row[1:]


def _adams(setup: _Setup, grid: Tensor, checkpointed: bool) -> Tensor:
    """Adams-Bashforth(-Moulton) on ``grid`` (M,); returns the grid values (M, N).

    The state is the flattened ``(1, N)`` vector, so every operation is vectorised over it. With
    ``checkpointed`` (and autograd on) the steps run in segments of ~sqrt(M) under
    ``torch.utils.checkpoint``: backward recomputes one segment at a time, so memory is
    O(sqrt(M)) states instead of O(M), and the gradient is still the exact gradient of the
    discrete recursion.
    """
    plan = _AdamsPlan(grid, setup.implicit, setup.max_order)
    f, implicit, max_iters = setup.f, setup.implicit, setup.max_iters
    # successive iterates cannot agree more closely than rounding: rtol is floored at 2 machine epsilons
    eps2 = 2 * torch.finfo(setup.layout.dtype).eps
    rtol = max(setup.rtol, eps2) if isinstance(setup.rtol, float) else setup.rtol.clamp(min=eps2)
    atol = setup.atol
    m = grid.shape[0] - 1
    warned: list = []

    def converged(a: Tensor, b: Tensor) -> bool:
        with torch.no_grad():
            return bool(((b - a).abs() <= atol + rtol * torch.maximum(a.abs(), b.abs())).all())

    def run(n0: int, n1: int, y: Tensor, hist: list) -> tuple[list, list]:
        """Steps n0..n1-1 from y = y_{n0}; hist = derivatives at grid[n0-1], grid[n0-2], ..."""
        ys = []
        for n in range(n0, n1):
            t0, t1 = grid[n:n + 1], grid[n + 1:n + 2]
            hist = [f(t0, y, None)] + hist[:plan.window - 1]
            h = plan.h[n]
            if plan.rk[n]:  # rk4, 3/8 rule
                k1 = hist[0]
                k2 = f(t0 + (t1 - t0) / 3, y + (h / 3) * k1, None)
                k3 = f(t0 + (t1 - t0) * (2 / 3), y + h * (k2 - k1 / 3), None)
                k4 = f(t1, y + h * (k1 - k2 + k3), None)
                y = y + (h / 8) * (k1 + 3 * (k2 + k3) + k4)
            else:
                pred = y + sum(w * fj for w, fj in zip(plan.ab[n], hist))
                if implicit:
                    base = y + sum(w * fj for w, fj in zip(plan.am_past[n], hist))
                    for _ in range(max_iters):
                        new = base + plan.am_new[n] * f(t1, pred, None)
                        done = converged(pred, new)
                        pred = new
                        if done:
                            break
                    else:
                        if not warned:
                            warned.append(n)
                            warnings.warn(
                                f"odeint: {setup.method}: the Adams-Moulton corrector did not converge to rtol/atol "
                                f"within max_iters={max_iters} iterations (first at t={float(t1):.6g}); the "
                                "solution may be inaccurate: use a smaller step_size or a larger max_iters",
                                RuntimeWarning, stacklevel=5)
                y = pred
            ys.append(y)
        return ys, hist

    y = setup.y0_flat
    if not (checkpointed and torch.is_grad_enabled()):
        ys, _ = run(0, m, y, [])
        return torch.cat([y] + ys)
    seg = max(1, math.ceil(math.sqrt(m)))
    out = [y]
    hist: list = []
    for n0 in range(0, m, seg):
        n1 = min(n0 + seg, m)

        def segment(y, *hist, n0=n0, n1=n1):
            ys, hist = run(n0, n1, y, list(hist))
            return (torch.cat(ys), *hist)

        res = checkpoint(segment, y, *hist, use_reentrant=False)
        out.append(res[0])
        hist = list(res[1:])
        y = res[0][-1:]
    return torch.cat(out)


def _run(setup: _Setup, adjoint) -> Tensor:
    """Solve on the output times; returns (T, N)."""
    t = setup.t
    y0 = setup.y0_flat
    if setup.fixed:
        grid = setup.grid()
        if grid.shape[0] == 1:
            return y0.expand(t.shape[0], y0.shape[1]).clone()
        if setup.adams:
            if torch.is_grad_enabled() and grid.requires_grad:
                # the per-step weights are computed once, outside autograd: a gradient with respect to t
                # cannot be had, but one with respect to y0 or parameters alone can
                grid = _NoTimeGrad.apply(grid)
            return _interp_fixed(setup, grid, _adams(setup, grid, isinstance(adjoint, CheckpointAdjoint)))
        sol = solve(setup.f, setup.solver, grid[0], grid[-1], y0, saveat=SaveAt(ts=grid),
                    controller=StepTo(grid), adjoint=adjoint, max_steps=grid.shape[0] + 1)
        return _interp_fixed(setup, grid, sol.ys[0])
    if t.shape[0] == 1:
        return y0.clone()
    sol = solve(setup.f, setup.solver, t[0], t[-1], y0, dt0=setup.first_step, saveat=SaveAt(ts=t),
                controller=setup.controller, adjoint=adjoint, max_steps=setup.max_steps, throw=False)
    status = Status(int(sol.status[0]))
    if status != Status.SUCCESS:
        where = f"t={float(sol.t_final[0]):.6g} (solving from t={float(t[0]):.6g} to {float(t[-1]):.6g})"
        if setup.max_num_steps is None:
            steps = f"{setup.max_steps} steps taken"
        else:
            steps = (f"options['max_num_steps']={setup.max_num_steps} per output interval exceeded "
                     f"({setup.max_steps} steps over the {t.shape[0] - 1} intervals)")
        raise RuntimeError(f"odeint: {setup.method} stopped at {where}: {_stop_reason(status, steps)}")
    return sol.ys[0]


def _stop_reason(status: Status, steps: str) -> str:
    """Why a solve stopped early, and what to try; ``steps`` describes the step budget that ran out."""
    if status == Status.DT_UNDERFLOW:
        return "step size underflow; loosen rtol/atol or lower options['min_step']"
    if status == Status.NONFINITE:
        return "the state became non-finite (NaN or inf); check func for a blow-up"
    return f"{steps}; raise options['max_num_steps'], loosen rtol/atol, or check for stiffness"


class _NoTimeGrad(torch.autograd.Function):
    """Identity on a time grid whose backward refuses: the Adams weights do not carry gradients to t."""

    @staticmethod
    def forward(ctx, grid):
        return grid.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("odeint: gradients with respect to t are not supported by the Adams methods (their "
                           "per-step weights are computed once, outside autograd); pass t.detach(), ask for the "
                           "gradients of y0 or parameters only (torch.autograd.grad), or use an RK method")


def _run_event(setup: _Setup, event_fn: Callable, adjoint) -> tuple[Tensor, Tensor]:
    """Integrate from t[0] until ``event_fn(t, y)`` changes sign; returns (event_t (), [y0, y_event] (2, N))."""
    if not callable(event_fn):
        raise TypeError(f"odeint: event_fn must be callable event_fn(t, y), got {type(event_fn).__name__}")
    dt0, controller = setup.first_step if not setup.fixed else None, setup.controller
    if setup.fixed:
        if setup.adams:
            raise ValueError(f"odeint: event_fn is not supported with the multistep method {setup.method!r}; use a "
                             f"one-step fixed-grid method (e.g. 'rk4') or an adaptive one ({list(_ADAPTIVE)})")
        if "step_size" not in setup.options:
            raise ValueError("odeint: event_fn with a fixed-grid method needs options['step_size'] (the solve has "
                             "no end time to build a grid for)")
        # steps of step_size until the event; it is located on the method's dense interpolant (cubic
        # Hermite for these methods), whatever options['interp'] says about the values at t
        dt0, controller = _positive(setup.options["step_size"], "step_size"), ConstantStep()
    layout = setup.layout
    t = setup.t
    if t.shape[0] > 2:  # as torchdiffeq: the later times would be ignored
        raise ValueError(f"odeint: with event_fn, t must be [t0] or [t0, t1] (the direction), got len(t)={t.shape[0]}")
    direction = -1.0 if t.shape[0] > 1 and t[1] < t[0] else 1.0
    signs = []  # several event functions: as torchdiffeq, the event is the first of them to cross zero

    def cond(tt, y, args):
        g = event_fn(tt[0], layout.unflatten(y[0]))
        g = torch.as_tensor(g, dtype=y.dtype, device=y.device)
        if g.numel() == 1:
            return g.reshape(1)
        if not signs:
            signs.append(torch.sign(g.detach()))
        return torch.min(g * signs[0]).reshape(1)

    t0 = t[0]
    y = setup.y0_flat
    g0 = cond(t0.reshape(1), y, None)
    if bool(g0 == 0):
        return t0, torch.cat([y, y])
    event = Event(cond)
    # An open-ended solve needs some t1; a far one lets a single solve run to the event (each restart pays
    # an initial-step estimate and the controller's ramp-up: the falling ball took 58 calls, not 38). It is
    # doubled if it is reached without an event.
    span = 1e6 * (1.0 + abs(float(t[0].detach())))
    steps_left = setup.max_steps
    tc = t0
    while True:
        t1 = tc + direction * span
        sol = solve(setup.f, setup.solver, tc, t1, y, dt0=dt0, saveat=SaveAt(t1=True),
                    controller=controller, adjoint=adjoint, event=event,
                    max_steps=max(1, min(steps_left, 2 ** 62)), throw=False)
        status = int(sol.status[0])
        steps_left -= int(sol.stats["num_steps"][0])
        if status == Status.EVENT:
            return sol.event_t[0], torch.cat([setup.y0_flat, sol.ys[:, -1]])
        if status != Status.SUCCESS or steps_left <= 0:
            budget = f"{setup.max_steps} steps taken" if setup.max_num_steps is None else \
                f"options['max_num_steps']={setup.max_num_steps} exceeded"
            reason = _stop_reason(Status(status) if status != Status.SUCCESS else Status.MAX_STEPS, budget)
            raise RuntimeError(f"odeint: integration stopped before the event: {reason}")
        tc = sol.t_final[0]
        y = sol.ys[:, -1]
        span *= 2.0


# --- public API --------------------------------------------------------------------------------

def odeint(func: Callable, y0: Any, t: Any, *, rtol: Any = 1e-7, atol: Any = 1e-9, method: str | None = None,
           options: dict | None = None, event_fn: Callable | None = None):
    """Solve ``dy/dt = func(t, y)`` with ``y(t[0]) = y0``; torchdiffeq's ``odeint``.

    Args:
        func: ``func(t, y)`` with scalar (0-dim) ``t`` and ``y`` shaped like ``y0``; returns ``dy/dt``
            of the same shape (a tuple for a tuple state).
        y0: initial state, a tensor of any shape ``S`` or a tuple of tensors.
        t: (T,) strictly increasing or strictly decreasing output times; ``t[0]`` is the initial time.
        rtol, atol: floats, tensors broadcastable to ``y0``, or (tuple ``y0``) one entry per tensor.
        method: ``'dopri5'`` (default), ``'dopri8'``, ``'bosh3'``, ``'tsit5'``, ``'adaptive_heun'``,
            ``'fehlberg2'`` (adaptive) or ``'euler'``, ``'midpoint'``, ``'heun2'``, ``'heun3'``, ``'rk4'``
            (fixed grid; ``'rk4'`` is Kutta's 3/8 rule as in torchdiffeq), or the fixed-grid multistep
            ``'explicit_adams'`` (Adams-Bashforth; ``rtol``/``atol`` unused) and ``'implicit_adams'``
            (alias ``'fixed_adams'``; Adams-Bashforth predictor, Adams-Moulton corrector iterated until
            successive iterates agree to ``atol + rtol * |y|`` in every component, with ``rtol`` at
            least two machine epsilons, else a ``RuntimeWarning``). Both start with ``rk4`` steps and
            build up to ``max_order``.
        options: adaptive methods: ``first_step``, ``min_step``, ``max_step``, ``safety``, ``ifactor``,
            ``dfactor``, ``max_num_steps``, ``step_t``, ``jump_t``, ``norm``. Fixed-grid methods:
            ``step_size`` (default: step on ``t``), ``grid_constructor(func, y0, t)``, ``perturb``,
            ``interp`` (``'linear'`` default or ``'cubic'``); the Adams methods also take ``max_order``
            (1 to 12, default 4: the order of the Adams-Bashforth formula, or of the predictor-corrector
            pair whose predictor is one order lower) and, implicit only, ``max_iters`` (corrector
            iterations per step, default 4), and reject ``perturb=True``. Any other key raises
            ``ValueError``.
        event_fn: optional ``event_fn(t, y) -> scalar``; integration then runs from ``t[0]`` (in the
            direction of ``t[1]`` if given) until its sign changes. A tensor of several event
            functions stops at the first of them to change sign (as torchdiffeq). Fixed-grid
            one-step methods need ``options['step_size']`` and locate the event on their cubic
            Hermite interpolant (torchdiffeq's ``interp='linear'`` default would use the chord).

    Returns:
        ``(T, *S)`` solution at ``t`` (tuple of those for a tuple ``y0``); with ``event_fn``,
        ``(event_t, solution)`` where ``solution`` is ``(2, *S)``: ``[y0, y(event_t)]``.
    """
    setup = _Setup(func, y0, t, rtol, atol, method, options)
    adjoint = DirectAdjoint()
    if event_fn is not None:
        event_t, ys = _run_event(setup, event_fn, adjoint)
        return event_t.to(setup.t.dtype), setup.layout.unflatten(ys)
    return setup.layout.unflatten(_run(setup, adjoint))


def odeint_adjoint(func: Callable, y0: Any, t: Any, *, rtol: Any = 1e-7, atol: Any = 1e-9,
                   method: str | None = None, options: dict | None = None, event_fn: Callable | None = None,
                   adjoint_rtol: Any = None, adjoint_atol: Any = None, adjoint_method: str | None = None,
                   adjoint_options: dict | None = None, adjoint_params: Any = None):
    """:func:`odeint` with gradients from the continuous adjoint (O(1) memory in the number of steps).

    Same arguments and result as :func:`odeint`, plus:

    Args:
        adjoint_rtol, adjoint_atol: scalar tolerances of the backward solve (default ``rtol``/``atol``;
            per-component tolerances are not supported for the backward solve).
        adjoint_method: method of the backward solve (default ``method``). After a fixed-grid ``method``
            the backward solve runs a fixed-grid method backwards on the forward grid (with
            ``perturb=True`` it is perturbed too), or an adaptive one if named. torchdiffeq instead lays
            a fresh grid of ``step_size`` backwards from the end of each output interval; the two grids
            are the same when ``step_size`` is not given or divides every interval. After an adaptive
            method it must be adaptive.
        adjoint_options: ``{'norm': 'seminorm'}`` leaves the parameter adjoint out of the error norm
            (Kidger et al. 2021, fewer backward steps); ``{'max_num_steps': n}`` bounds the backward
            solve. Other keys raise ``ValueError``. Of the forward ``options``, the backward solve reuses
            ``step_t`` and ``jump_t`` (it steps onto the same marks, as torchdiffeq), no others.
        adjoint_params: tensors to differentiate with respect to; default ``func.parameters()``
            (``func`` must then be an ``nn.Module``; pass ``adjoint_params=()`` for none). Tensors that do
            not require grad (frozen parameters) are left out, as torchdiffeq.

    Gradients flow to ``y0``, ``adjoint_params`` and ``t`` (as torchdiffeq: from the adjoint identities
    ``dL/dt_i = <f(t_i, y_i), dL/dy_i>`` and ``dL/dt_0 = -<f(t_0, y_0), a(t_0)>``). With ``event_fn`` the solve is
    differentiated by checkpointed recomputation instead (memory O(sqrt(steps))), which gives the
    exact gradient of the event time and state.

    The Adams methods (``'explicit_adams'``, ``'implicit_adams'``, ``'fixed_adams'``) are not solved
    backwards either: their gradient is discretise-then-optimise, backpropagation through the
    multistep recursion with checkpointed recomputation (segments of ~sqrt(steps) grid steps, memory
    O(sqrt(steps))). It equals :func:`odeint`'s gradient, reaches every tensor ``func`` uses (not only
    ``adjoint_params``), and ``adjoint_rtol``/``adjoint_atol``/``adjoint_method``/``adjoint_options``
    raise ``ValueError`` for them.
    """
    if adjoint_params is None:
        if not isinstance(func, torch.nn.Module):
            raise ValueError("odeint_adjoint: func must be an nn.Module to collect the adjoint parameters; "
                             "alternatively pass them as adjoint_params (adjoint_params=() for none)")
        adjoint_params = tuple(func.parameters())
    adjoint_params = tuple(adjoint_params)
    for i, p in enumerate(adjoint_params):
        if not isinstance(p, Tensor):
            raise TypeError(f"odeint_adjoint: adjoint_params[{i}] must be a tensor, got {type(p).__name__}")
    # frozen parameters get no gradient (as torchdiffeq), and asking autograd for one would fail
    adjoint_params = tuple(p for p in adjoint_params if p.requires_grad)
    setup = _Setup(func, y0, t, rtol, atol, method, options)
    if event_fn is not None:
        event_t, ys = _run_event(setup, event_fn, CheckpointAdjoint())
        return event_t.to(setup.t.dtype), setup.layout.unflatten(ys)
    if setup.adams:
        given = [name for name, v in (("adjoint_rtol", adjoint_rtol), ("adjoint_atol", adjoint_atol),
                                      ("adjoint_method", adjoint_method), ("adjoint_options", adjoint_options))
                 if v is not None]
        if given:
            verb = "does" if len(given) == 1 else "do"
            raise ValueError(f"odeint_adjoint: {', '.join(given)} {verb} not apply to {setup.method!r}: its gradient "
                             "is the checkpointed gradient of the multistep recursion, with no backward ODE solve")
        return setup.layout.unflatten(_run(setup, CheckpointAdjoint()))

    def scalar_tol(name, v, default):
        v = default if v is None else v
        if isinstance(v, (tuple, list)) or (isinstance(v, Tensor) and v.numel() != 1):
            raise ValueError(f"odeint_adjoint: {name} must be a scalar (per-component backward tolerances "
                             "are not supported)")
        if isinstance(default, Tensor) and default.numel() != 1 and v is default:
            raise ValueError(f"odeint_adjoint: {name} defaults to the forward tolerance, which is not a scalar; "
                             f"pass a scalar {name}")
        return float(v)

    a_rtol = scalar_tol("adjoint_rtol", adjoint_rtol, rtol)
    a_atol = scalar_tol("adjoint_atol", adjoint_atol, atol)
    # fixed-grid forward (not Adams): by default the same method backwards on the same grid, as torchdiffeq
    if adjoint_method is not None and not isinstance(adjoint_method, str):
        raise TypeError(f"odeint_adjoint: adjoint_method must be a string, got {type(adjoint_method).__name__}")
    # after a fixed-grid (RK) method: by default the same method backwards on the forward grid, as torchdiffeq
    grid_back = setup.fixed and not setup.adams and (adjoint_method is None or adjoint_method in _FIXED)
    if grid_back:
        a_method = adjoint_method or setup.method
    else:
        a_method = adjoint_method or ("tsit5" if setup.fixed else setup.method)
        if a_method in _FIXED or a_method in _ADAMS:
            raise ValueError(f"odeint_adjoint: adjoint_method {a_method!r} is fixed-grid; it can only follow a "
                             f"fixed-grid RK method (on its grid); here the backward solve needs an adaptive "
                             f"method ({list(_ADAPTIVE)})")
        if a_method not in _ADAPTIVE:
            raise ValueError(f"odeint_adjoint: invalid adjoint_method {a_method!r}; expected one of "
                             f"{list(_ADAPTIVE)}")
    ao = {} if adjoint_options is None else adjoint_options
    if not isinstance(ao, dict):
        raise TypeError(f"odeint_adjoint: adjoint_options must be a dict, got {type(ao).__name__}")
    for key in ao:
        if key not in ("norm", "max_num_steps"):
            raise ValueError(f"odeint_adjoint: adjoint option {key!r} is not supported; supported: "
                             "'norm' ('seminorm' only), 'max_num_steps'")
    seminorm = False
    if "norm" in ao:
        if ao["norm"] != "seminorm":
            raise ValueError(f"odeint_adjoint: adjoint_options['norm'] must be 'seminorm', got {ao['norm']!r}")
        seminorm = True
    max_steps = ao.get("max_num_steps", setup.max_steps)
    if grid_back:
        solver, controller = _FIXED[a_method](), _MarksTo(setup.grid().detach())
        if isinstance(setup.solver, Perturbed):  # the backward steps keep off the same discontinuities
            solver = Perturbed(solver)
    else:
        solver, controller = _ADAPTIVE[a_method](), None
    adjoint = BacksolveAdjoint(rtol=max(a_rtol, torch.finfo(setup.layout.dtype).tiny), atol=a_atol,
                               solver=solver, seminorm=seminorm, adjoint_params=adjoint_params,
                               max_steps=max_steps, controller=controller)
    if not (torch.is_grad_enabled() and setup.t.requires_grad):
        return setup.layout.unflatten(_run(setup, adjoint))
    # gradients with respect to t from the adjoint identities (as torchdiffeq): dL/dt_i = <f(t_i, y_i), dL/dy_i>
    # for the outputs, dL/dt_0 = -<f(t_0, y_0), a(t_0)> with a(t_0) the adjoint state the backward solve
    # brings back to t_0; the solve itself runs on the detached times
    t = setup.t
    setup.t = t.detach()
    holder = _OutputCotangent()
    setup.y0_flat = _TimeGrad.apply(t, setup.y0_flat, setup.f, holder, False)
    ys = _TimeGrad.apply(t, _run(setup, adjoint), setup.f, holder, True)
    return setup.layout.unflatten(ys)


class _OutputCotangent:
    """The cotangent of the output at t[0] (= y0), handed from the outputs' backward to y0's."""

    g0: Tensor | None = None


class _TimeGrad(torch.autograd.Function):
    """Identity on ``x``; its backward adds the adjoint identities' gradient with respect to ``t``.

    ``outputs=True``: ``x`` are the outputs ``ys`` (T, N), and ``dL/dt_i = <f(t_i, y_i), g_i>`` for i >= 1
    (the cotangent ``g_0`` of the output at t[0] is handed to the other one through ``holder``).
    ``outputs=False``: ``x`` is y0 (1, N) before the solve, and ``dL/dt_0 = -<f(t_0, y_0), a(t_0)>``, ``a(t_0)``
    being y0's cotangent from the solve less ``g_0`` (the output at t[0] is y0 itself). The outputs' backward
    runs first: their graph ends in y0's.
    """

    @staticmethod
    def forward(ctx, t, x, f, holder, outputs):
        ctx.f, ctx.holder, ctx.outputs = f, holder, outputs
        ctx.save_for_backward(t, x)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        t, x = ctx.saved_tensors
        gt = torch.zeros_like(t)
        with torch.no_grad():
            if ctx.outputs:
                for i in range(1, t.shape[0]):
                    gt[i] = (ctx.f(t[i].reshape(1), x[i:i + 1], None)[0] * g[i]).sum()
                ctx.holder.g0 = g[0]
            else:
                a = g[0] if ctx.holder.g0 is None else g[0] - ctx.holder.g0
                gt[0] = -(ctx.f(t[:1], x, None)[0] * a).sum()
        return gt, g, None, None, None


def odeint_event(func: Callable, y0: Any, t0: Any, *, event_fn: Callable, reverse_time: bool = False,
                 odeint_interface: Callable = odeint, **kwargs):
    """Integrate from ``t0`` until ``event_fn(t, y)`` crosses zero; torchdiffeq's ``odeint_event``.

    Args:
        func, y0: as :func:`odeint`.
        t0: scalar start time.
        event_fn: ``event_fn(t, y) -> scalar`` (or a tensor of several: the first to change sign);
            the event is its first sign change.
        reverse_time: integrate towards decreasing time.
        odeint_interface: :func:`odeint` or :func:`odeint_adjoint`.
        **kwargs: passed to ``odeint_interface`` (rtol, atol, method, options, ...).

    Returns:
        ``(event_t, solution)``: the event time (0-dim, differentiable by the implicit function
        theorem) and ``(2, *y0.shape)`` holding ``[y0, y(event_t)]`` (tuples for a tuple state).
    """
    if odeint_interface not in (odeint, odeint_adjoint):
        raise ValueError("odeint_event: odeint_interface must be torchmech's odeint or odeint_adjoint")
    t0 = torch.as_tensor(t0)
    if t0.numel() != 1:
        raise ValueError(f"odeint_event: t0 must be a scalar, got shape {tuple(t0.shape)}")
    if not t0.is_floating_point():
        t0 = t0.to(torch.get_default_dtype())
    t0 = t0.reshape(-1)
    t = torch.cat([t0, t0.detach() + (-1.0 if reverse_time else 1.0)])
    return odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)
