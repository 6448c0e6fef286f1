"""The solve loop: per-sample stepping, SaveAt, Solution, statuses and statistics."""

from __future__ import annotations

import math

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
import torch
from torch import Tensor

from torchmech._autograd import FirstOrderOnly
from torchmech._stack import caller_level
from torchmech.de._tree import all_finite, any_requires_grad, bcast, tree_leaves, tree_map, where
from torchmech.de.adjoint import AbstractAdjoint, DirectAdjoint
from torchmech.de.controllers import AbstractController, ConstantStep, PIDController, StepTo, check_time_cast
from torchmech.de.events import Event, illinois
from torchmech.de.solvers import explicit as _explicit
from torchmech.de.solvers.rk import AbstractSolver
from torchmech.de.terms import AbstractTerm, ODETerm

__all__ = ["Status", "SaveAt", "Solution", "solve"]


class Status(IntEnum):
    """Why a sample stopped. ``Solution.status`` holds one per sample."""

    SUCCESS = 0
    MAX_STEPS = 1
    DT_UNDERFLOW = 2
    NONFINITE = 3
    EVENT = 4


_STATUS_REASON = {
    Status.MAX_STEPS: "max_steps reached before t1 (stiff problem or too tight tolerances?)",
    Status.DT_UNDERFLOW: "step size underflow (dt below dtmin or below floating-point resolution of t)",
    Status.NONFINITE: "non-finite state or vector field (NaN/inf)",
}


@dataclass
class SaveAt:
    """What ``solve`` returns in ``Solution.ts``/``Solution.ys`` (concatenated in this order).

    Args:
        t0: save the initial point.
        ts: save times, shape (T,) shared or (B, T) per sample, monotonic in the direction of
            integration and inside ``[t0, t1]``. Values come from each step's dense interpolant.
        steps: save every accepted step (per-sample counts differ; shorter rows are padded with
            their final time/state).
        t1: save the final point (the event point for samples stopped by an event).
        dense: keep per-step interpolation data so ``Solution.evaluate``/``derivative`` work.
    """

    t0: bool = False
    t1: bool = False
    ts: Tensor | None = None
    steps: bool = False
    dense: bool = False

    def __post_init__(self):
        for name in ("t0", "t1", "steps", "dense"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"SaveAt: {name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.ts is not None and not isinstance(self.ts, Tensor):
            try:
                # float64: the solve casts to the state's dtype; through float32 a float64 solve's 0.1 became
                # 0.10000000149 (and a last time equal to t1 fell outside [t0, t1])
                self.ts = torch.as_tensor(self.ts, dtype=torch.float64)
            except Exception as exc:  # noqa: BLE001
                raise TypeError(f"SaveAt: ts must be a tensor of times, got {type(self.ts).__name__}") from exc
        if not (self.t0 or self.t1 or self.steps or self.dense or self.ts is not None):
            raise ValueError("SaveAt: nothing to save; set at least one of t0, t1, ts, steps, dense")


class _Dense:
    """Per-step interpolation data of a solve, for ``Solution.evaluate``/``derivative``."""

    def __init__(self, tprev: Tensor, h: Tensor, valid: Tensor, y0s: Tensor, qs: list[Tensor],
                 t0: Tensor, tfinal: Tensor, direction: Tensor):
        self.tprev, self.h, self.valid, self.y0s, self.qs = tprev, h, valid, y0s, qs  # (N, B, ...)
        self.t0, self.tfinal, self.direction = t0, tfinal, direction

    def _locate(self, t: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        B = self.t0.shape[0]
        t = torch.as_tensor(t, dtype=self.t0.dtype, device=self.t0.device)
        if t.dim() == 0:
            tt = t.expand(B, 1)
        elif t.dim() == 1:
            tt = t.unsqueeze(0).expand(B, t.shape[0])
        elif t.dim() == 2 and t.shape[0] == B:
            tt = t
        else:
            raise ValueError(f"evaluate: t must be a scalar, (T,) or (B={B}, T), got shape {tuple(t.shape)}")
        d = self.direction[:, None]
        lo = torch.minimum(self.t0, self.tfinal)[:, None]
        hi = torch.maximum(self.t0, self.tfinal)[:, None]
        out = (tt < lo) | (tt > hi) | ~torch.isfinite(tt)
        if out.any():
            b, j = (int(i) for i in torch.nonzero(out)[0])
            raise ValueError(
                f"evaluate: t outside the solved interval of some sample: sample {b} asks for t={float(tt[b, j])!r} "
                f"but was solved on [{float(lo[b, 0])!r}, {float(hi[b, 0])!r}] ({int(out.any(1).sum())} of {B} "
                "samples ask outside their interval)"
            )
        # the first accepted step covering t, per sample and time, with a few ulps of slack (steps at
        # jump_ts leave a two-ulp gap around the jump time): accepted steps follow each other, so it is
        # the first whose end, counted along the direction of integration, reaches t - slack. A binary
        # search over the running maximum of the accepted ends (rejected steps repeat the previous one).
        slack = 8 * torch.finfo(tt.dtype).eps * tt.abs().clamp(min=1.0)
        ends = torch.where(self.valid, self.direction[None] * (self.tprev + self.h),
                           torch.full_like(self.tprev, -math.inf))
        ends = ends.cummax(dim=0).values.T.contiguous()  # (B, N), non-decreasing
        bidx = torch.arange(B, device=tt.device)[:, None].expand(B, tt.shape[1])

        def cover(q: Tensor, tol) -> tuple[Tensor, Tensor]:
            n = torch.searchsorted(ends, q.contiguous()).clamp(max=ends.shape[1] - 1)  # (B, T)
            tp, h = self.tprev[n, bidx], self.h[n, bidx]
            return n, self.valid[n, bidx] & (d * (tt - tp) >= -tol) & (d * (tt - tp - h) <= tol)

        # a step that covers t exactly wins over one that covers it only within the slack (just after a jump
        # the step before it ends one ulp short of the jump and would otherwise be taken)
        n, exact = cover(d * tt, 0.0)
        n_slack, near = cover(d * tt - slack, slack)
        n = torch.where(exact, n, n_slack)
        h = self.h[n, bidx]
        tp = self.tprev[n, bidx]
        found = exact | near | (self.tfinal[:, None] == self.t0[:, None])
        if not bool(found.all()):
            raise ValueError("evaluate: no accepted step covers some of the requested times")
        safe_h = torch.where(h != 0, h, torch.ones_like(h))
        theta = torch.where(found & (h != 0), (tt - tp) / safe_h, torch.zeros_like(tt))
        return tt, n, bidx, theta, safe_h

    def evaluate(self, t: Any) -> Tensor:
        tt, n, bidx, theta, _ = self._locate(t)
        y = self.y0s[n, bidx]  # (B, T, ...)
        th = bcast(theta, y)
        out = y
        p = th
        for q in self.qs:
            out = out + p * q[n, bidx]
            p = p * th
        return out.to(y.dtype)  # the qs may be kept in float64 (solvers.rk.interp_dtype)

    def derivative(self, t: Any) -> Tensor:
        """Time derivative of the interpolant; 0 for a sample solved over a zero-length interval (no step)."""
        tt, n, bidx, theta, h = self._locate(t)
        th = bcast(theta, self.y0s[n, bidx])
        out = torch.zeros_like(self.y0s[n, bidx])
        p = torch.ones_like(th)
        for m, q in enumerate(self.qs, start=1):
            out = out + m * p * q[n, bidx]
            p = p * th
        return (out / bcast(h, th)).to(th.dtype)


class Solution:
    """Result of :func:`solve`. All tensors are batch-first.

    Attributes:
        ts: (B, T) save times (see :class:`SaveAt` for the order of the pieces).
        ys: (B, T, ...) states at ``ts``. Save times a sample never reached (it stopped early
            with a non-SUCCESS status, e.g. at an event) hold NaN.
        stats: dict of per-sample int64 tensors (B,): ``num_fevals``, ``num_steps``,
            ``num_accepted``, ``num_rejected``.
        status: (B,) int64 tensor of :class:`Status` values.
        event_t: (B,) event times (NaN where no event happened), or None without an event.
        t_final, y_final: (B,) and (B, ...) where each sample stopped.
    """

    def __init__(self, ts, ys, stats, status, event_t, t_final, y_final, dense: _Dense | None):
        self.ts, self.ys, self.stats, self.status = ts, ys, stats, status
        self.event_t, self.t_final, self.y_final = event_t, t_final, y_final
        self._dense = dense

    @property
    def success(self) -> Tensor:
        """(B,) bool: sample finished at t1 or at a terminal event."""
        return (self.status == Status.SUCCESS) | (self.status == Status.EVENT)

    def evaluate(self, t: Any) -> Tensor:
        """Dense output ``y(t)``: ``t`` scalar, (T,) or (B, T) -> (B, T, ...) (scalar -> (B, 1, ...)).

        Needs ``SaveAt(dense=True)``; ``t`` must lie in each sample's solved interval.
        """
        if self._dense is None:
            raise ValueError("Solution.evaluate: solve with saveat=SaveAt(dense=True) to use dense output")
        return self._dense.evaluate(t)

    def derivative(self, t: Any) -> Tensor:
        """Time derivative of the dense interpolant, same shapes as :meth:`evaluate`."""
        if self._dense is None:
            raise ValueError("Solution.derivative: solve with saveat=SaveAt(dense=True) to use dense output")
        return self._dense.derivative(t)

    def __repr__(self) -> str:
        counts = {Status(s).name: int((self.status == s).sum()) for s in Status if (self.status == s).any()}
        return f"Solution(ts={tuple(self.ts.shape)}, ys={tuple(self.ys.shape)}, status={counts})"


_SOLVER_NAMES = {
    "euler": _explicit.Euler, "midpoint": _explicit.Midpoint, "heun": _explicit.Heun,
    "ralston": _explicit.Ralston, "rk4": _explicit.RK4, "bosh3": _explicit.Bosh3,
    "dopri5": _explicit.Dopri5, "tsit5": _explicit.Tsit5, "dopri8": _explicit.Dopri8,
}


def _autocast(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: no device argument
        return bool(torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled())


def _per_sample_time(x: Any, name: str, B: int, like: Tensor) -> Tensor:
    if isinstance(x, Tensor):
        t = x.to(dtype=like.dtype, device=like.device)
    elif isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_)):
        t = torch.tensor(float(x), dtype=like.dtype, device=like.device)
    else:
        raise TypeError(f"solve: {name} must be a float or a tensor of shape () or (B,), got {type(x).__name__}")
    if t.dim() == 0:
        t = t.expand(B)
    elif t.shape != (B,):
        raise ValueError(f"solve: {name} must have shape () or (B,)=({B},), got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"solve: {name} must be finite, got {t.tolist()}")
    return t


class _Integrator:
    """Holds one solve problem and runs its per-sample stepping loop (used by the adjoints)."""

    _EVENT_SUBDIV = 4  # interior points of each step checked for event sign changes

    def __init__(self, terms, solver, t0, t1, y0, dt0, args, saveat, controller, event, max_steps, progress):
        self.terms, self.solver, self.controller, self.event = terms, solver, controller, event
        self.t0, self.t1, self.y0, self.dt0, self.args = t0, t1, y0, dt0, args
        self.saveat, self.max_steps, self.progress = saveat, max_steps, progress
        self.direction = torch.sign(t1 - t0)
        self.B = y0.shape[0]
        self.ts = None
        if saveat.ts is not None:
            self.ts = self._check_ts(saveat.ts)
            self._dts = (self.direction[:, None] * self.ts).contiguous()  # ascending per sample
            self._ts_pad = torch.cat([self.ts, self.ts[:, -1:]], dim=1)
        self.need_interp = self.ts is not None or saveat.dense or event is not None
        self.record_dense = saveat.dense
        self.record_steps = saveat.steps
        self.has_jumps = isinstance(controller, PIDController) and controller.jump_ts is not None
        self.pbar = None
        from torchmech.de import _fast

        # the lean loop of _fast handles the common case; everything else steps through self.step
        self.fast = _fast.unsupported(self) is None
        from torchmech.de import _fast_sde

        # fixed-step SDE solves on one shared time grid: the lean loop of _fast_sde (checked again at run time)
        self.fast_sde = not self.fast and _fast_sde.unsupported(self) is None
        self.compiled = False  # set by solve(compile=True): the lean loop's step runs torch.compile'd
        self.compile_options: dict = {}  # solve(compile={...}): Inductor options for that compile

    def _check_ts(self, ts: Tensor) -> Tensor:
        B = self.B
        orig = ts
        ts = ts.to(dtype=self.y0.dtype, device=self.y0.device)
        check_time_cast(orig, ts, "SaveAt.ts")
        if ts.dim() not in (1, 2) or (ts.dim() == 2 and ts.shape[0] != B):
            raise ValueError(f"SaveAt.ts: expected shape (T,) or (B={B}, T), got {tuple(ts.shape)}")
        if ts.shape[-1] == 0:
            raise ValueError("SaveAt.ts: expected at least one save time, got an empty tensor")
        if ts.dim() == 1 and self._shared_ts_ok(ts):
            return ts.expand(B, ts.shape[-1])
        if not torch.isfinite(ts).all():
            raise ValueError("SaveAt.ts: save times must be finite")
        ts = ts.expand(B, ts.shape[-1])
        d = self.direction[:, None]
        outside = (d * (ts - self.t0[:, None]) < 0) | (d * (self.t1[:, None] - ts) < 0)
        outside = outside | ((d == 0) & (ts != self.t0[:, None]))
        if outside.any():
            bad = sorted(set(torch.nonzero(outside)[:, 0].tolist()))
            raise ValueError(
                f"SaveAt.ts: save times must lie in [t0, t1] of their sample; samples {bad[:10]} have times "
                "outside (with t0 == t1 only ts == t0 is allowed)"
            )
        if (d * ts.diff(dim=1) < 0).any():
            raise ValueError("SaveAt.ts: save times must be monotonic (non-decreasing in the direction of "
                             "integration t0 -> t1) for every sample")
        return ts

    def _shared_ts_ok(self, ts: Tensor) -> bool:
        """Whether shared save times ts (T,) pass every check of _check_ts, in O(T + B) work and one read-back
        (the full check compares the (B, T) expansion; it runs only to say what is wrong).

        ts monotonic in a sample's direction lies in [t0, t1] when its first and last times do; a sample with
        t0 == t1 needs every time equal to t0."""
        d = self.direction
        step = ts.diff()
        inc, dec = (step >= 0).all(), (step <= 0).all()
        first, last = ts[0], ts[-1]
        lo, hi = torch.minimum(first, last), torch.maximum(first, last)
        ok = torch.where(d > 0, inc & (first >= self.t0) & (last <= self.t1),
                         torch.where(d < 0, dec & (first <= self.t0) & (last >= self.t1),
                                     (inc | dec) & (lo == self.t0) & (hi == self.t0)))
        return bool(ok.all() & torch.isfinite(ts).all())

    # -- loop -----------------------------------------------------------------------------
    def deriv(self, t: Tensor, y: Tensor, vf: Any = None) -> Tensor:
        """dy/dt estimate (B, ...) for initial step selection: prod(vf, contr over [t0, t1]) / (t1 - t0).

        The control's increment is always the one over the whole span: the same for every call (so the
        difference of two estimates reflects the vector field's change), and never outside the span (a
        Brownian motion or path defined on [t0, t1] only would refuse the query)."""
        H = torch.where(self.direction != 0, self.t1 - self.t0, torch.ones_like(self.t0))
        if vf is None:
            vf = self.terms.vf(t, y, self.args)
        if isinstance(self.terms, ODETerm):
            return vf
        inc = self.terms.prod(vf, self.terms.contr(self.t0, self.t1))
        return inc / bcast(H, inc)

    def init_state(self) -> dict:
        t0, y0, B = self.t0, self.y0, self.B
        dev = y0.device
        zeros_i = torch.zeros(B, dtype=torch.int64, device=dev)
        vf0 = self.terms.vf(t0, y0, self.args)
        if isinstance(self.terms, ODETerm) and not isinstance(vf0, Tensor):
            raise ValueError(f"solve: ODETerm f(t, y, args) must return a tensor of y's shape {tuple(y0.shape)}, "
                             f"got {type(vf0).__name__} (for a tuple or nested state, stack it into one tensor)")
        other = [x.dtype for x in tree_leaves(vf0) if isinstance(x, Tensor) and x.dtype != y0.dtype]
        c00 = self.terms.contr(t0, t0)  # (a zero-length query: it leaves a Brownian motion's path as it is)
        ctl = [x.dtype for x in tree_leaves(c00) if isinstance(x, Tensor) and x.is_floating_point() and x.dtype != y0.dtype]
        if ctl:  # e.g. a float32 Brownian motion driving a float64 state: increments at float32 precision
            raise ValueError(f"solve: the control (Brownian motion or path) gives {ctl[0]} increments for a {y0.dtype} "
                             "state; build it in the state's dtype")
        # a float32 field on a float64 state: the increments would be promoted, the accuracy not (under autocast a
        # lower-precision field is the point)
        if other and not _autocast(y0.device.type):
            raise ValueError(f"solve: the vector field returns {other[0]} for a {y0.dtype} state; it must return "
                             "the state's dtype (cast its parameters, e.g. model.to(y0.dtype), or y0)")
        inc = self.terms.prod(vf0, c00)
        if not isinstance(inc, Tensor) or inc.shape != y0.shape or inc.dtype != y0.dtype:
            got = (tuple(inc.shape), inc.dtype) if isinstance(inc, Tensor) else type(inc).__name__
            raise ValueError(
                f"solve: the vector field's increment must match y0 (shape {tuple(y0.shape)}, dtype "
                f"{y0.dtype}); got {got}. ODETerm f(t, y, args) must return y's shape and dtype"
            )
        done = self.direction == 0
        finite0 = all_finite(vf0)
        status = torch.where(~finite0 & ~done, torch.full_like(zeros_i, int(Status.NONFINITE)), zeros_i)
        done = done | ~finite0
        dt0 = None
        if self.dt0 is not None:
            dt0 = self.direction * self.dt0.abs()
        if not bool(finite0.all()):  # keep NaN out of the batch (and out of gradients)
            vf0 = where(finite0, vf0, tree_map(torch.zeros_like, vf0))
        # only initial step selection uses it; for an SDE it would query the Brownian motion over
        # the whole interval (a wasted draw, and every later step would split that piece)
        # (with dt0 given no controller uses it)
        fixed = type(self.controller) in (ConstantStep, StepTo) or self.dt0 is not None
        deriv0 = None if fixed else self.deriv(t0, y0, vf0)
        dt, cstate, extra = self.controller.init(self.solver, t0, self.t1, y0, dt0, deriv0,
                                                 lambda t, y: self.deriv(t, y))
        dt = torch.where(done, torch.zeros_like(dt), dt)
        nfev = torch.where(done & finite0, zeros_i, zeros_i + 1 + extra)
        check_terms = getattr(self.solver, "check_terms", None)  # solvers with conditions on the terms (SRA1)
        if check_terms is not None:
            check_terms(self.terms, t0, y0, self.args)
        # An ODE's values that stay at y0 (samples with t0 == t1, save times at t0) still depend on those times to
        # first order: y(t0 + d) = y0 + d f(t0, y0). Adding d f (zero in value) gives them that derivative.
        first_order = (isinstance(self.terms, ODETerm) and torch.is_grad_enabled()
                       and any_requires_grad((t0, self.t1, self.ts)))
        f0 = vf0  # (the field itself, before a solver wraps it in its own state)
        y_start = y0
        if first_order and bool((self.direction == 0).any()):
            zero_span = torch.where(self.direction == 0, self.t1 - t0, torch.zeros_like(t0))
            y_start = y0 + bcast(zero_span, y0) * f0
        init_vf = getattr(self.solver, "init_vf", None)  # solvers with extra state (ReversibleHeun)
        if init_vf is not None:
            vf0 = init_vf(y0, vf0)
        state = {
            "t": t0, "y": y_start, "dt": dt, "vf": vf0, "done": done, "status": status,
            "num_steps": zeros_i, "num_accepted": zeros_i, "num_rejected": zeros_i, "num_fevals": nfev,
            "nonfinite": zeros_i, "ctrl": cstate,
        }
        if self.ts is not None:
            # NaN until filled (one spare column at the end); save times at t0 hold y0. Each sample's times are
            # monotonic from t0, so those at t0 are a prefix of its row: only the longest prefix is written (a
            # masked select over the whole (B, T, ...) buffer cost ~0.4 ms for Van der Pol's 256 x 200 times).
            buf = torch.full((B, self.ts.shape[1] + 1) + y0.shape[1:], float("nan"), dtype=y0.dtype, device=dev)
            n0 = int((self.ts == t0[:, None]).sum(1).max())
            if n0:
                ts0 = self.ts[:, :n0]
                at0 = (ts0 == t0[:, None]).reshape(ts0.shape + (1,) * (y0.dim() - 1))
                held = y0.unsqueeze(1)
                if first_order:
                    d = ts0 - t0[:, None]
                    held = held + d.reshape(d.shape + (1,) * (y0.dim() - 1)) * f0.unsqueeze(1)
                buf[:, :n0] = torch.where(at0, held, buf[:, :n0])
            state["ys_ts"] = buf
        if self.event is not None:
            state["g"] = self.event(t0, y0, self.args)
            state["event_t"] = torch.full((B,), float("nan"), dtype=y0.dtype, device=dev)
        return state

    def _interp(self, y0: Tensor, qs: tuple, theta: Tensor) -> Tensor:
        th = bcast(theta, y0)
        out = y0
        p = th
        for q in qs:
            out = out + p * q
            p = p * th
        return out.to(y0.dtype)  # the qs may be kept in float64 (solvers.rk.interp_dtype)

    def _interp_deriv(self, qs: tuple, theta: Tensor, h: Tensor) -> Tensor:
        th = bcast(theta, qs[0])
        out = 0
        p = torch.ones_like(th)
        for m, q in enumerate(qs, start=1):
            out = out + m * p * q
            p = p * th
        return (out / bcast(torch.where(h != 0, h, torch.ones_like(h)), th)).to(th.dtype)

    def save_counts(self, t: Tensor, t_end: Tensor, accept: Tensor) -> tuple[Tensor, Tensor]:
        """Per sample: the number of save times before ``t``, and how many the accepted step to
        ``t_end`` passes (O(B log T))."""
        d = self.direction
        before = torch.searchsorted(self._dts, (d * t.detach())[:, None], right=True)[:, 0]
        after = torch.searchsorted(self._dts, (d * t_end.detach())[:, None], right=True)[:, 0]
        return before, torch.where(accept, after - before, torch.zeros_like(before))

    def write_saves(self, buf: Tensor, K: int, before: Tensor, count: Tensor, t: Tensor, h: Tensor, y: Tensor,
                    qs: tuple) -> Tensor:
        """Write the values at the (at most ``K`` per sample) save times a step from ``(t, y)`` over ``h``
        passed into ``buf`` (in place), from its interpolant ``qs``: each sample's ``count`` save times
        after its first ``before``; unused slots write to the spare last column."""
        T = self.ts.shape[1]
        ar = torch.arange(K, device=t.device)
        used = ar[None] < count[:, None]
        idx = torch.where(used, before[:, None] + ar[None], torch.full_like(used, T, dtype=before.dtype))
        tw = self._ts_pad.gather(1, idx)
        safe_h = torch.where(h != 0, h, torch.ones_like(h))
        theta = torch.where(used, (tw - t[:, None]) / safe_h[:, None], torch.zeros_like(tw))
        vals = self._interp(y.unsqueeze(1), tuple(q.unsqueeze(1) for q in qs), theta)
        buf.scatter_(1, bcast(idx, vals).expand_as(vals), vals)
        return buf

    def step(self, s: dict) -> tuple[dict, dict]:
        """One attempted step for every unfinished sample. Returns (new state, record)."""
        ctrl = self.controller
        d = self.direction
        done = s["done"]
        active = ~done
        t, y, dt = s["t"], s["y"], s["dt"]
        t_next, jump = ctrl.propose(t, dt, self.t1, d, s["ctrl"])
        t_next = torch.where(active, t_next, t)
        h = t_next - t
        res = self.solver.step(self.terms, t, t_next, y, self.args, s["vf"], dense=self.need_interp)
        finite = all_finite(res.y1) & all_finite(res.vf1)
        if res.err is not None:
            finite = finite & all_finite(res.err)
        # (only when the step's graph is recorded: without one there is nothing to redo, and no host read-back)
        if any_requires_grad((res.y1, res.vf1, res.interp)) and not bool((finite | ~active).all()):
            # rejected non-finite stages would leave 0 * NaN in the backward pass (see _fast.step): the graph
            # takes the step again with h = 0 for those samples; the decisions below use the first attempt
            t_g = torch.where(finite | ~active, t_next, t)
            res_g = self.solver.step(self.terms, t, t_g, y, self.args, s["vf"], dense=self.need_interp)
        else:
            res_g = res
        if ctrl.adaptive:
            accept, dt_new, underflow, cstate = ctrl.adapt(t, t_next, dt, y, res.y1, res.err, s["ctrl"],
                                                          self.solver.error_order)
            limit = 10
        else:
            accept, dt_new, underflow, cstate = ctrl.adapt(t, t_next, dt, y, res.y1, res.err, s["ctrl"], None)
            limit = 1
        accept = accept & finite & active
        nonfinite = torch.where(active & ~finite, s["nonfinite"] + 1, torch.where(accept, 0, s["nonfinite"]))
        fail_nonfinite = active & ~finite & ((nonfinite >= limit) | underflow)
        underflow = underflow & active & ~accept & ~fail_nonfinite
        dt_new = torch.where(active, dt_new, dt)
        nfev_redo = res_g.nfev if res_g is not res else 0
        res = res_g

        y_new = where(accept, res.y1, y)
        t_new = torch.where(accept, t_next, t)
        vf_new = where(accept, res.vf1, s["vf"])
        nfev_step = res.nfev + nfev_redo
        if self.has_jumps:
            jumped = accept & jump
            if bool(jumped.any()):
                t_after = torch.nextafter(torch.nextafter(t_new, t_new + d), t_new + 2 * d)
                t_new = torch.where(jumped, t_after, t_new)
                vf_new = where(jumped, self.terms.vf(t_new, y_new, self.args), vf_new)
                nfev_step += 1
        reached = accept & (t_new == self.t1)
        status = s["status"]
        new = dict(s)
        new_done = done | reached

        # events -------------------------------------------------------------------------
        t_save_end = t_new
        if self.event is not None:
            ev = self.event
            g1 = ev(t_next, res.y1, self.args)
            # sign changes are looked for at the step ends and at interior points of the
            # interpolant, so a pair of crossings inside one step is not missed
            K = self._EVENT_SUBDIV
            with torch.no_grad():
                qd = tuple(q.detach() for q in res.interp)
                gs = [s["g"].detach()]
                for j in range(1, K):
                    th = torch.full_like(t, j / K)
                    gs.append(ev(t + th * h, self._interp(y.detach(), qd, th), self.args).detach())
                gs.append(g1.detach())
                gs = torch.stack(gs, dim=1)  # (B, K+1)
                sub = ev.crossed(gs[:, :-1], gs[:, 1:])  # (B, K)
                j0 = sub.to(torch.int8).argmax(dim=1)
            trig = accept & sub.any(dim=1)
            if not ev.terminal:
                trig = trig & torch.isnan(s["event_t"])
            if bool(trig.any()):
                ga = gs.gather(1, j0[:, None])[:, 0]
                gb = gs.gather(1, j0[:, None] + 1)[:, 0]
                t_ev, y_ev = self._locate_event(t, h, y, res.interp, ga, gb, trig, j0.to(t.dtype) / K, 1.0 / K)
                new["event_t"] = torch.where(trig, t_ev, s["event_t"])
                if ev.terminal:
                    y_new = where(trig, y_ev, y_new)
                    t_new = torch.where(trig, t_ev, t_new)
                    t_save_end = t_new
                    status = torch.where(trig, torch.full_like(status, int(Status.EVENT)), status)
                    new_done = new_done | trig
            new["g"] = torch.where(accept, g1, s["g"])

        # saving at ts: fill every save time in (t, t_save_end] from this step's interpolant -------
        sync = [new_done.all().to(torch.int64)]
        if self.ts is not None:
            before, count = self.save_counts(t, t_save_end, accept)
            sync.append(count.max())
        num_steps = s["num_steps"] + active.to(torch.int64)
        hit_max = active & ~new_done & (num_steps >= self.max_steps) & ~underflow & ~fail_nonfinite
        status = torch.where(hit_max, torch.full_like(status, int(Status.MAX_STEPS)), status)
        status = torch.where(underflow, torch.full_like(status, int(Status.DT_UNDERFLOW)), status)
        status = torch.where(fail_nonfinite, torch.full_like(status, int(Status.NONFINITE)), status)
        new_done = new_done | hit_max | underflow | fail_nonfinite
        sync[0] = new_done.all().to(torch.int64)
        if self.pbar is not None:
            frac = torch.where(d != 0, (t_new - self.t0) / torch.where(d != 0, self.t1 - self.t0, 1.0), 1.0)
            sync.append((frac.detach().min() * 1e6).to(torch.int64))
        flags = torch.stack(sync).tolist()
        if self.ts is not None and flags[1] > 0:
            new["ys_ts"] = self.write_saves(s["ys_ts"], flags[1], before, count, t, h, y, res.interp)
        if self.pbar is not None:
            self.pbar.update(flags[-1] / 1e6 - self.pbar.n)

        new.update(
            t=t_new, y=y_new, dt=dt_new, vf=vf_new, done=new_done, status=status, num_steps=num_steps,
            num_accepted=s["num_accepted"] + accept.to(torch.int64),
            num_rejected=s["num_rejected"] + (active & ~accept).to(torch.int64),
            num_fevals=s["num_fevals"] + nfev_step * active.to(torch.int64),
            nonfinite=nonfinite, ctrl=cstate,
        )
        record = {}
        if self.record_dense:
            record.update(tprev=t, tnext=t_next, h=torch.where(accept, h, torch.zeros_like(h)), valid=accept,
                          y0=y, qs=res.interp)
        if self.record_steps:
            record.update(t=t_new, y=y_new, valid=accept)
        return new, {"__done__": bool(flags[0]), **record}

    def _locate_event(self, t, h, y, qs, g0, g1, trig, theta_a, width):
        """Root of the event function in theta in [theta_a, theta_a + width] of the step; (t_e, y_e)."""
        ev = self.event
        args = self.args
        with torch.no_grad():
            qd = tuple(q.detach() for q in qs)
            yd = y.detach()
            td, hd = t.detach(), h.detach()

            def G(u):
                theta = theta_a + u * width
                return ev(td + theta * hd, self._interp(yd, qd, theta), args)

            u = illinois(G, g0.detach(), g1.detach(), trig)
            theta = torch.where(trig, theta_a + u * width, torch.ones_like(u))
        # t* keeps the step's own dependence on the solve's times (t0, earlier step ends): an event of an
        # autonomous system moves 1:1 with t0; the implicit-function correction below adds that through y
        t_star = t + theta * h
        y_star = self._interp(y, qs, theta)
        needs_grad = torch.is_grad_enabled() and (
            y_star.requires_grad or t_star.requires_grad
            or any(isinstance(a, Tensor) and a.requires_grad for a in tree_leaves(args))
        )
        if not needs_grad:
            return t_star, y_star
        # implicit function theorem: t_e = t* - (g(t*, y(t*)) - stop_grad) / (dg/dt)
        with torch.enable_grad():
            tt = t_star.detach().requires_grad_(True)
            yy = y_star.detach().requires_grad_(True)
            gg = ev(tt, yy, args)
            g_t, g_y = torch.autograd.grad(gg.sum(), [tt, yy], allow_unused=True)
        f_star = self._interp_deriv(qd, theta, hd)
        dgdt = torch.zeros_like(t_star) if g_t is None else g_t
        if g_y is not None:
            dgdt = dgdt + (g_y * f_star).reshape(g_y.shape[0], -1).sum(dim=1)
        ok = trig & (dgdt != 0) & torch.isfinite(dgdt)
        g_val = ev(t_star, y_star, args)
        corr = (g_val - g_val.detach()) / torch.where(ok, dgdt, torch.ones_like(dgdt))
        t_e = t_star - torch.where(ok, corr, torch.zeros_like(corr))
        # dg/dt above is a constant of the first derivative: a second derivative through the event time would
        # miss its terms, so it raises instead
        t_e = FirstOrderOnly.apply(
            "second derivatives through an event time are not supported (its implicit-function gradient is first "
            "order); differentiate once, or remove the event", t_e, t_star, y_star,
            *[a for a in tree_leaves(args) if isinstance(a, Tensor)])
        theta_e = (t_e - t) / torch.where(hd != 0, hd, torch.ones_like(hd))
        y_e = self._interp(y, qs, theta_e)
        return t_e, y_e

    def finalize(self, s: dict, records: list[dict]) -> Solution:
        """Assemble the Solution from the final state and the per-step records."""
        B = self.B
        ts_parts, ys_parts = [], []
        if self.saveat.t0:
            ts_parts.append(self.t0[:, None])
            ys_parts.append(self.y0[:, None])
        if self.ts is not None:
            ts_parts.append(self.ts)
            ys_parts.append(s["ys_ts"][:, :-1])
        if self.saveat.steps:
            if records:
                tt = torch.stack([r["t"] for r in records])  # (N, B)
                yy = torch.stack([r["y"] for r in records])
                vv = torch.stack([r["valid"] for r in records])
                count = vv.sum(dim=0)
                M = max(int(count.max()), 1)
                order = torch.argsort((~vv).to(torch.int8), dim=0, stable=True)[:M]  # accepted first
                pos = torch.arange(M, device=tt.device)[:, None]
                last = torch.gather(order, 0, (count - 1).clamp(min=0)[None])
                order = torch.where(pos < count[None], order, last)
                bidx = torch.arange(B, device=tt.device)[None].expand_as(order)
                st = tt[order, bidx].T
                sy = yy[order, bidx].transpose(0, 1)
                none = count == 0
                st = torch.where(none[:, None], self.t0[:, None], st)
                sy = torch.where(bcast(none, sy), self.y0[:, None].expand_as(sy), sy)
            else:
                st, sy = self.t0[:, None], self.y0[:, None]
            ts_parts.append(st)
            ys_parts.append(sy)
        if self.saveat.t1:
            ts_parts.append(s["t"][:, None])
            ys_parts.append(s["y"][:, None])
        if ts_parts:
            ts_out = torch.cat(ts_parts, dim=1)
            ys_out = torch.cat(ys_parts, dim=1)
        else:
            ts_out = self.t0.new_zeros((B, 0))
            ys_out = self.y0.new_zeros((B, 0) + tuple(self.y0.shape[1:]))
        dense = None
        if self.record_dense:
            if records:
                dense = _Dense(
                    torch.stack([r["tprev"] for r in records]), torch.stack([r["h"] for r in records]),
                    torch.stack([r["valid"] for r in records]), torch.stack([r["y0"] for r in records]),
                    [torch.stack([r["qs"][m] for r in records]) for m in range(len(records[0]["qs"]))],
                    self.t0, s["t"], self.direction,
                )
            else:
                z = torch.zeros_like(self.t0)[None]
                dense = _Dense(z, z, torch.ones_like(z, dtype=torch.bool), self.y0[None], [],
                               self.t0, s["t"], self.direction)
        stats = {k: s[k] for k in ("num_fevals", "num_steps", "num_accepted", "num_rejected")}
        return Solution(ts_out, ys_out, stats, s["status"], s.get("event_t"), s["t"], s["y"], dense)

    def run_steps(self, state: dict, n: int | None = None) -> tuple[dict, list[dict], bool]:
        """Run up to ``n`` steps (all remaining if None). Returns (state, records, all_done)."""
        records = []
        if bool(state["done"].all()):
            return state, records, True
        if self.fast:
            from torchmech.de import _fast

            out = _fast.run(self, state, n, compiled=self.compiled, options=self.compile_options)
            if out is not None:
                return out
        if self.fast_sde:
            from torchmech.de import _fast_sde

            out = _fast_sde.run(self, state, n)
            if out is not None:
                return out
        k = 0
        while n is None or k < n:
            state, rec = self.step(state)
            done = rec.pop("__done__")
            if rec:
                records.append(rec)
            k += 1
            if done:
                return state, records, True
        return state, records, False

def _check_y0(y0: Any) -> Tensor:
    if not isinstance(y0, Tensor):
        raise TypeError(f"solve: y0 must be a torch.Tensor of shape (B, ...), got {type(y0).__name__}")
    if y0.dim() < 2:
        raise ValueError(
            f"solve: y0 must have a leading batch axis, shape (B, ...) with at least 2 dims, got shape "
            f"{tuple(y0.shape)} (use y0[None] for a single sample)"
        )
    if y0.dtype not in (torch.float32, torch.float64):
        # (half precision cannot meet the step-size control's tolerances: solves stall or reject for ever)
        raise TypeError(f"solve: y0 must be a float32 or float64 tensor, got {y0.dtype}")
    if y0.shape[0] == 0:
        raise ValueError("solve: y0 has batch size 0")
    if y0[0].numel() == 0:
        raise ValueError(f"solve: y0 has no state entries per sample (shape {tuple(y0.shape)})")
    if not torch.isfinite(y0).all():
        bad = torch.nonzero(~torch.isfinite(y0).reshape(y0.shape[0], -1).all(dim=1))[:, 0].tolist()
        raise ValueError(f"solve: y0 must be finite; samples {bad[:10]} contain NaN/inf")
    return y0


def _compiled_frames() -> int:
    """How many frames torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


_RECOMPILING: dict = {}  # problem structure -> number of compile=True solves that compiled something
_RECOMPILE_WARN_AFTER = 4  # grad and no-grad modes and the first step's layout legitimately compile a few graphs


def _watch_recompiles(integ, new_frames: int) -> None:
    """Warn (once per problem structure) when compile=True solves of one problem keep compiling.

    torch.compile specialises on the Python values a vector field reads; one that changes between solves (a call
    counter, a float attribute, a list) recompiles the step on every solve, seconds each, until dynamo's
    recompile limit, after which the step runs uncompiled: tens of solves silently ~100x slower than eager.
    """
    if new_frames <= 0:
        return
    f = integ.terms.fields()[0] if integ.terms.fields() else None
    code = getattr(f, "__code__", None) or getattr(getattr(type(f), "forward", None), "__code__", None)
    # what legitimately makes a new graph: shapes and dtypes of the state, the save times, the fields' parameters
    # (a sweep over model widths) and the args
    shapes = lambda xs: tuple((tuple(x.shape), x.dtype) for x in xs if isinstance(x, Tensor))  # noqa: E731
    key = (code, type(integ.solver), tuple(integ.y0.shape), integ.y0.dtype, integ.y0.device.type,
           None if integ.ts is None else tuple(integ.ts.shape),
           shapes(p for m in integ.terms.modules() for p in m.parameters()), shapes(tree_leaves(integ.args)))
    n = _RECOMPILING[key] = _RECOMPILING.get(key, 0) + 1
    if n == _RECOMPILE_WARN_AFTER:
        import warnings

        warnings.warn(
            f"solve(compile=True): the step of this problem has been compiled again in {n} solves (seconds each). "
            "torch.compile specialises on Python values the vector field reads or changes (a call counter, a float "
            "or int attribute, a list) and recompiles when they change; after torch._dynamo's recompile limit the "
            "step runs uncompiled. Keep such state out of the vector field (tensors are fine), or use "
            "compile=False.", RuntimeWarning, stacklevel=caller_level())


def solve(terms, solver, t0, t1, y0, *, dt0=None, args=None, saveat: SaveAt | None = None,
          controller: AbstractController | None = None, adjoint: AbstractAdjoint | None = None,
          event: Event | None = None, max_steps: int = 4096, throw: bool = True,
          progress: bool = False, compile: bool | dict = False) -> Solution:
    """Solve ``dy = sum_terms f(t, y, args) dX`` from ``t0`` to ``t1``, every sample with its own steps.

    Args:
        terms: an :class:`~torchmech.de.terms.AbstractTerm` (a plain callable ``f(t, y, args)`` is
            wrapped in ``ODETerm``). Vector fields get per-sample times ``t`` of shape (B,).
        solver: an :class:`~torchmech.de.solvers.AbstractSolver` instance (or a name such as
            ``"tsit5"``).
        t0, t1: float or per-sample (B,) tensor; ``t1 < t0`` integrates backwards, ``t0 == t1``
            returns ``y0``.
        y0: (B, ...) initial state with a leading batch axis, float32 or float64.
        dt0: initial (ConstantStep: fixed) step size, float or (B,); its sign is ignored. With an
            adaptive controller and ``dt0=None`` it is chosen automatically (Hairer's algorithm).
        args: passed to vector fields and event functions unchanged.
        saveat: :class:`SaveAt`, default ``SaveAt(t1=True)``.
        controller: default ``ConstantStep()`` for solvers without an error estimate, else
            ``PIDController(rtol=1e-3, atol=1e-6)``.
        adjoint: gradient strategy, default :class:`~torchmech.de.adjoint.DirectAdjoint`.
        event: optional :class:`~torchmech.de.events.Event`.
        max_steps: maximum attempted steps per sample; exceeding it gives status ``MAX_STEPS``.
        throw: raise ``RuntimeError`` naming failing samples if any status is not SUCCESS/EVENT.
        progress: show a tqdm progress bar of the slowest sample over [t0, t1].
        compile: run the steps (stages, error norm, controller, bookkeeping) as ``torch.compile``d
            graphs of four steps each (samples that finish inside one repeat masked no-op steps; one
            step per graph when gradients are recorded (grad mode on and y0, t0, t1,
            dt0, args or the field's parameters requiring grad), so no extra steps enter the backward pass), and
            the interpolation at ``SaveAt.ts`` as a compiled pass over up to 256 steps at a time. Needs the
            common case that the lean eager loop also covers: an ``ODETerm`` with an explicit RK
            solver, ``PIDController`` (no ``step_ts``/``jump_ts``) or ``ConstantStep``, no
            events, no dense or steps saving, no progress bar; anything else raises
            ``ValueError``. The first call for a problem structure compiles (tens of seconds on
            CPU); later calls with the same solver, vector-field code, shapes and dtypes reuse it.
            Pays off for many steps of a cheap vector field (small states, where per-operation
            dispatch dominates: about 4x faster per step on the Van der Pol benchmark) and for
            repeated training steps of a small MLP vector field (Inductor fuses its elementwise
            work and the solver's: ~1.4x the eager training step of the ODE benchmark); not for
            one-off solves, nor when the vector field's own cost dominates (a large MLP). On CPU
            the graph runs from Inductor's generated C++ wrapper (``cpp_wrapper``) instead of
            Python: ~20% faster per step on Van der Pol for ~10% more compile time. A dict instead
            of ``True`` adds or overrides Inductor options (``torch.compile(..., options=...)``),
            e.g. ``{"cpp_wrapper": False}``. See benchmarks/RESULTS.md. The vector field must not
            read Python values that change between solves (a call counter, a float attribute):
            ``torch.compile`` specialises on them and recompiles every solve; a ``RuntimeWarning``
            says so after four such solves. Under autograd, a compiled step rejected because its stages
            went non-finite stays in the graph and can make gradients NaN (the eager loop retakes such
            steps with ``h = 0`` for those samples); train with ``compile=False`` if stages can overflow.

    Returns:
        :class:`Solution` with ``ts`` (B, T), ``ys`` (B, T, ...), ``stats``, ``status``.
    """
    if isinstance(solver, str):
        key = solver.lower()
        if key not in _SOLVER_NAMES:
            raise ValueError(f"solve: unknown solver name {solver!r}; expected one of {sorted(_SOLVER_NAMES)}")
        solver = _SOLVER_NAMES[key]()
    if isinstance(solver, type) and issubclass(solver, AbstractSolver):
        raise TypeError(f"solve: solver must be an instance, e.g. {solver.__name__}(), got the class itself")
    if not isinstance(solver, AbstractSolver):
        raise TypeError(f"solve: unknown solver type {type(solver).__name__}; expected an AbstractSolver "
                        "instance such as Tsit5()")
    if not isinstance(terms, AbstractTerm):
        if callable(terms):
            terms = ODETerm(terms)
        else:
            raise TypeError(f"solve: terms must be an AbstractTerm (e.g. ODETerm(f)), got {type(terms).__name__}")
    y0 = _check_y0(y0)
    B = y0.shape[0]
    t0_in, t1_in = t0, t1
    t0 = _per_sample_time(t0, "t0", B, y0)
    t1 = _per_sample_time(t1, "t1", B, y0)
    if y0.dtype != torch.float64:  # t0 and t1 (floats or tensors) must stay apart in y0's dtype
        if not isinstance(t0_in, Tensor) and not isinstance(t1_in, Tensor):  # (numbers: checked without tensors)
            a, b = float(t0_in), float(t1_in)
            if a != b and float(t0[0]) == float(t1[0]):
                raise ValueError(f"t0, t1: {a!r} and {b!r} are the same number in the state's {y0.dtype}; shift the "
                                 f"times towards 0 or compute in torch.float64")
        elif any(isinstance(x, Tensor) and x.dtype != y0.dtype for x in (t0_in, t1_in)):
            pair = torch.stack([(x.detach() if isinstance(x, Tensor) else torch.tensor(float(x), dtype=torch.float64))
                                .to(device=y0.device, dtype=torch.float64).expand(B) for x in (t0_in, t1_in)], -1)
            check_time_cast(pair, torch.stack([t0, t1], -1), "t0, t1")
    if saveat is None:
        saveat = SaveAt(t1=True)
    if not isinstance(saveat, SaveAt):
        raise TypeError(f"solve: saveat must be a SaveAt, got {type(saveat).__name__}")
    if controller is None:
        controller = PIDController() if solver.adaptive else ConstantStep()
    if not isinstance(controller, AbstractController):
        raise TypeError(f"solve: controller must be an AbstractController, got {type(controller).__name__}")
    if adjoint is None:
        adjoint = DirectAdjoint()
    if not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(f"solve: adjoint must be an AbstractAdjoint, got {type(adjoint).__name__}")
    if event is not None and not isinstance(event, Event):
        raise TypeError(f"solve: event must be an Event, got {type(event).__name__}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"solve: max_steps must be a positive int, got {max_steps!r}")
    if dt0 is not None:
        dt0 = _per_sample_time(dt0, "dt0", B, y0)
        if (dt0 == 0).any():
            raise ValueError("solve: dt0 must be non-zero")
    integ = _Integrator(terms, solver, t0, t1, y0, dt0, args, saveat, controller, event, max_steps, progress)
    if isinstance(compile, dict):
        bad = [k for k in compile if not isinstance(k, str)]
        if bad:
            raise TypeError(f"solve: compile options must have str keys (Inductor option names), got {bad[0]!r}")
    elif not isinstance(compile, bool):
        raise TypeError(f"solve: compile must be a bool or a dict of torch.compile options, "
                        f"got {type(compile).__name__}")
    if compile is not False:
        from torchmech.de import _fast

        why = _fast.unsupported(integ)
        if why is None and isinstance(controller, StepTo):
            why = "controller StepTo (its shared-grid loop runs eagerly)"
        if why is None and saveat.dense:
            why = "SaveAt(dense=True) (dense output is recorded by eager steps)"
        if why is not None:
            raise ValueError(f"solve: compile=True does not support {why}; use compile=False")
        integ.compiled = True
        # on CPU Inductor's C++ wrapper by default: the graph's ~200 buffer allocations and kernel calls leave
        # Python (~20% per step on Van der Pol, ~10% more compile time); a dict's keys override it
        default = {"cpp_wrapper": True} if integ.y0.device.type == "cpu" else {}
        integ.compile_options = {**default, **(compile if isinstance(compile, dict) else {})}
    if progress:
        from tqdm.auto import tqdm

        integ.pbar = tqdm(total=1.0, desc="solve", unit="", bar_format="{l_bar}{bar}| {n:.3f}/1 [{elapsed}]")
    compiles = _compiled_frames() if integ.compiled else None
    try:
        sol = adjoint.run(integ)
    finally:
        if integ.pbar is not None:
            integ.pbar.close()
            integ.pbar = None
    if compiles is not None:
        _watch_recompiles(integ, _compiled_frames() - compiles)
    if throw:
        bad = (sol.status != Status.SUCCESS) & (sol.status != Status.EVENT)
        if bool(bad.any()):
            parts = []
            for code in (Status.MAX_STEPS, Status.DT_UNDERFLOW, Status.NONFINITE):
                idx = torch.nonzero(sol.status == code)[:, 0].tolist()
                if idx:
                    shown = idx[:20] + (["..."] if len(idx) > 20 else [])
                    parts.append(f"{code.name} for samples {shown}: {_STATUS_REASON[code]}")
            raise RuntimeError("solve failed: " + "; ".join(parts) +
                               ". Pass throw=False to get partial results and per-sample statuses.")
    return sol
