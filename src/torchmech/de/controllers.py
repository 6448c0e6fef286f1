"""Step-size controllers with per-sample step sizes: ConstantStep, StepTo and PIDController."""

from __future__ import annotations

import math

from typing import Any, Callable

import torch
from torch import Tensor

from torchmech.de._tree import bcast

__all__ = ["AbstractController", "ConstantStep", "StepTo", "PIDController", "rms_norm", "max_norm"]


def rms_norm(x: Tensor) -> Tensor:
    """Root-mean-square over all non-batch axes: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).pow(2).mean(dim=1).sqrt()


def batch_rms_norm(x: Tensor) -> Tensor:
    """Root-mean-square over the WHOLE batch, repeated per sample: (B, ...) -> (B,).

    As a ``PIDController`` norm it makes every sample take the same steps (one error estimate, one
    accept/reject decision and one step size for the batch), which is how torchdiffeq steps a batch.
    Cheaper per step when the samples are alike (and vector fields such as a CDE's see one time
    for the whole batch), but the hardest sample sets the step for all, and one non-finite sample
    stalls every sample. The default :func:`rms_norm` steps each sample on its own error.
    """
    return x.pow(2).mean().sqrt().expand(x.shape[0])


def max_norm(x: Tensor) -> Tensor:
    """Max-abs over all non-batch axes: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).abs().amax(dim=1)


def check_time_cast(orig: Any, cast: Tensor, name: str) -> None:
    """Raise if casting times (ordered along the last axis) to the state's dtype merged or reordered them, or
    moved one by more than a tenth of its spacing to its nearest neighbour (float64 times like 2.8e7 + [0, 0.5, 1]
    all become 2.8e7 in float32, and the solve would silently return the initial state). Repeated times are
    allowed."""
    if not isinstance(orig, Tensor) or orig.dtype == cast.dtype or not orig.is_floating_point() or \
            orig.dim() == 0 or orig.shape[-1] < 2 or cast.shape[-1:] != orig.shape[-1:]:
        return
    with torch.no_grad():
        o = orig.detach().to(device=cast.device, dtype=torch.float64).expand(cast.shape)
        c = cast.detach().to(torch.float64)
        gap = o.diff(dim=-1).abs()
        gap = torch.where(gap > 0, gap, torch.full_like(gap, math.inf))  # repeated times: no spacing to keep
        inf = torch.full_like(gap[..., :1], math.inf)
        local = torch.minimum(torch.cat([inf, gap], -1), torch.cat([gap, inf], -1))  # each time's nearest gap
        shift = (c - o).abs()
        merged = torch.sign(o.diff(dim=-1)) != torch.sign(c.diff(dim=-1))
        moved = shift > 0.1 * local
        if bool(merged.any()) or bool(moved.any()):
            if bool(merged.any()):  # the later of the two times that merged
                j = torch.nonzero(merged)[0]
                j[-1] += 1
            else:
                j = torch.nonzero(moved)[0]
            j = tuple(int(i) for i in j)
            raise ValueError(
                f"{name}: times given in {orig.dtype} are too fine for the state's {cast.dtype}: {o[j].item()!r} "
                f"becomes {c[j].item()!r}, against a spacing of {float(local[j]):.3g} to its neighbour; shift the "
                f"times towards 0 (e.g. t - t[0]) or compute in {orig.dtype}")


def _as_times(x: Any, name: str, like: Tensor) -> Tensor:
    """Validate a 1-D or 2-D tensor of times and cast it to ``like``'s dtype/device."""
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x, dtype=like.dtype)
        except Exception as exc:  # noqa: BLE001
            raise TypeError(f"{name}: expected a tensor or sequence of times, got {type(x).__name__}") from exc
    orig = x
    x = x.to(dtype=like.dtype, device=like.device)
    check_time_cast(orig, x, name)
    if x.dim() not in (1, 2):
        raise ValueError(f"{name}: expected shape (K,) or (B, K), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: times must be finite")
    return x


def _snap(t_next: Tensor, dt: Tensor, t1: Tensor, direction: Tensor) -> Tensor:
    """Clip ``t_next`` to ``t1``, snapping when it falls short by only floating-point round-off.

    The snap never lengthens the step by more than 1%: otherwise a rejected last step, shrunk by the
    controller, could snap straight back to the same step (64 ulps of t1 = 20 are 1.5e-4 in float32) and be
    rejected again for ever, e.g. with a discontinuity at t1.
    """
    slack = torch.minimum(64 * torch.finfo(t_next.dtype).eps * torch.maximum(t1.abs(), dt.abs()), 0.01 * dt.abs())
    past = direction * (t1 - t_next) <= slack
    return torch.where(past, t1, t_next)


def _next_mark(marks: Tensor, t: Tensor, direction: Tensor) -> tuple[Tensor, Tensor]:
    """Per sample, the first mark strictly after ``t`` in ``direction``.

    Returns (signed distance ``direction * (mark - t)``, ``+inf`` where there is none; the mark
    itself, exactly as given) both of shape (B,).
    """
    m = marks if marks.dim() == 2 else marks.unsqueeze(0)
    m = m.expand(t.shape[0], m.shape[-1])
    dist = direction[:, None] * (m - t[:, None])
    dist = torch.where(dist > 0, dist, torch.full_like(dist, float("inf")))
    idx = dist.argmin(dim=1)  # (argmin + gather: min(dim=) with indices is ~100x slower on CPU)
    return dist.gather(1, idx[:, None])[:, 0], m.gather(1, idx[:, None])[:, 0]


class AbstractController:
    """Chooses the time of the next step and accepts/rejects attempted steps, per sample."""

    adaptive: bool = False

    def init(self, solver, t0: Tensor, t1: Tensor, y0: Tensor, dt0: Tensor | None, deriv0: Tensor,
             deriv_fn: Callable[[Tensor, Tensor], Tensor]) -> tuple[Tensor, dict, int]:
        """Return (signed initial dt (B,), controller state dict, extra vector-field evaluations)."""
        raise NotImplementedError

    def propose(self, t: Tensor, dt: Tensor, t1: Tensor, direction: Tensor, state: dict) -> tuple[Tensor, Tensor]:
        """Return (t_next (B,), landed_on_jump (B,) bool) for a step of size ``dt`` from ``t``."""
        t_next = _snap(t + dt, dt, t1, direction)
        return t_next, torch.zeros(t.shape, dtype=torch.bool, device=t.device)

    def adapt(self, t: Tensor, t_next: Tensor, dt: Tensor, y0: Tensor, y1: Tensor, err: Tensor | None,
              state: dict, error_order: int | None) -> tuple[Tensor, Tensor, Tensor, dict]:
        """Return (accept (B,), next signed dt (B,), dt underflow (B,), new state).

        ``dt`` is the step that was proposed, ``t_next - t`` the one taken (clipped to marks/t1).
        """
        raise NotImplementedError


class ConstantStep(AbstractController):
    """Fixed step size ``dt0`` (the last step is shortened to land on ``t1``); every step is accepted."""

    def init(self, solver, t0, t1, y0, dt0, deriv0, deriv_fn):
        if dt0 is None:
            raise ValueError("solve: dt0 must be given with ConstantStep (got dt0=None)")
        return dt0, {}, 0

    def adapt(self, t, t_next, dt, y0, y1, err, state, error_order):
        ones = torch.ones(t.shape, dtype=torch.bool, device=t.device)
        return ones, dt, torch.zeros_like(ones), state


class StepTo(AbstractController):
    """Step exactly onto the given times ``ts`` ((K,) shared or (B, K) per sample), every step accepted.

    ``ts[..., 0]`` must equal ``t0`` and ``ts[..., -1]`` must equal ``t1``; ``dt0`` is ignored.
    """

    def __init__(self, ts: Tensor):
        if not isinstance(ts, Tensor):  # float64: the solve casts to the state's dtype (see SaveAt.ts)
            ts = torch.as_tensor(ts, dtype=torch.float64)
        if ts.dim() not in (1, 2) or ts.shape[-1] < 2:
            raise ValueError(f"StepTo: ts must have shape (K,) or (B, K) with K >= 2, got {tuple(ts.shape)}")
        self.ts = ts

    def init(self, solver, t0, t1, y0, dt0, deriv0, deriv_fn):
        ts = _as_times(self.ts, "StepTo.ts", y0)
        B = y0.shape[0]
        if ts.dim() == 2 and ts.shape[0] != B:
            raise ValueError(f"StepTo.ts: expected shape (K,) or (B={B}, K), got {tuple(ts.shape)}")
        ts = ts.expand(B, ts.shape[-1])
        if not (torch.equal(ts[:, 0], t0) and torch.equal(ts[:, -1], t1)):
            bad = int(torch.nonzero((ts[:, 0] != t0) | (ts[:, -1] != t1))[0, 0])
            raise ValueError(
                "StepTo.ts: first and last entries must equal t0 and t1 for every sample; sample "
                f"{bad} has [{float(ts[bad, 0])!r}, ..., {float(ts[bad, -1])!r}] against t0={float(t0[bad])!r}, "
                f"t1={float(t1[bad])!r} in {y0.dtype} (a grid made in another dtype rounds differently: build it "
                "in y0's dtype, or pass t0=ts[0], t1=ts[-1])")
        direction = torch.sign(t1 - t0)
        if ((direction[:, None] * ts.diff(dim=1) <= 0) & (direction[:, None] != 0)).any():
            raise ValueError("StepTo.ts: times must be strictly monotonic in the direction of integration")
        dt = ts[:, 1] - ts[:, 0]
        return dt, {"marks": ts}, 0

    def propose(self, t, dt, t1, direction, state):
        dist, mark = _next_mark(state["marks"], t, direction)
        t_next = torch.where(torch.isfinite(dist), mark, t1)
        return t_next, torch.zeros_like(t_next, dtype=torch.bool)

    def adapt(self, t, t_next, dt, y0, y1, err, state, error_order):
        ones = torch.ones(t.shape, dtype=torch.bool, device=t.device)
        return ones, t_next - t, torch.zeros_like(ones), state


class PIDController(AbstractController):
    """Adaptive per-sample step sizes from the embedded error estimate (PID control, Soederlind).

    Error ratio per sample: ``e = norm(err / (atol + rtol * max(|y0|, |y1|)))``; a step is
    accepted when ``e <= 1``. The next step is
    ``dt * clip(safety * e_n^(-b1/k) * e_{n-1}^(-b2/k) * e_{n-2}^(-b3/k), factormin, factormax)``
    with ``b1 = p + i + d``, ``b2 = -(p + 2 d)``, ``b3 = d`` and ``k`` the solver's error order.
    Defaults (``pcoeff=0, icoeff=1, dcoeff=0``) give the classical I controller.

    Args:
        rtol, atol: tolerances, floats or tensors broadcastable to the state ``(B, ...)`` (e.g. per
            component ``(D,)``). Must be positive (``rtol > 0``, ``atol >= 0``).
        dtmin, dtmax: bounds on ``|dt|``. A rejected step at ``dtmin`` ends the sample with
            status ``DT_UNDERFLOW``; so does, with or without ``dtmin``, a rejected step that floating point
            cannot shorten (a few ulps of t long, e.g. at a finite-time blow-up). A proposed step too short
            to move t at all is taken as a zero-length step, and the next one grows from the proposal.
        factormin, factormax, safety: step-change limits and safety factor.
        norm: callable (B, ...) -> (B,), default :func:`rms_norm` (each sample on its own error);
            :func:`batch_rms_norm` gives the batch one step size, as torchdiffeq steps it.
        step_ts: times (K,) or (B, K) that steps must land on.
        jump_ts: discontinuity times (K,) or (B, K) of the vector field: a step ends one ulp before
            the jump and the next starts one ulp after it, with the vector field re-evaluated
            there (so no stage straddles the discontinuity).
        force_dtmin: if True, a step of size ``dtmin`` is accepted whatever its error estimate
            (torchdiffeq's ``min_step`` semantics) instead of ending the sample with
            ``DT_UNDERFLOW``. Needs ``dtmin``.
    """

    adaptive = True

    def __init__(self, rtol: float | Tensor = 1e-3, atol: float | Tensor = 1e-6, pcoeff: float = 0.0,
                 icoeff: float = 1.0, dcoeff: float = 0.0, dtmin: float | None = None,
                 dtmax: float | None = None, factormin: float = 0.2, factormax: float = 10.0,
                 safety: float = 0.9, norm: Callable[[Tensor], Tensor] = rms_norm,
                 step_ts: Tensor | None = None, jump_ts: Tensor | None = None, force_dtmin: bool = False):
        for name, val, strict in (("rtol", rtol, True), ("atol", atol, False)):
            # a Python float checked in float64: in the default float32 a tiny positive value would read as 0
            v = val if isinstance(val, Tensor) else torch.as_tensor(val, dtype=torch.float64)
            bad = (v <= 0).any() if strict else (v < 0).any()
            if bad or not torch.isfinite(v).all():
                raise ValueError(f"PIDController: {name} must be {'> 0' if strict else '>= 0'} and finite, got {val}")
        if not (0 < factormin <= 1 <= factormax):
            raise ValueError(f"PIDController: need 0 < factormin <= 1 <= factormax, got {factormin}, {factormax}")
        if not 0 < safety <= 1:
            raise ValueError(f"PIDController: safety must be in (0, 1], got {safety}")
        if dtmin is not None and dtmin <= 0:
            raise ValueError(f"PIDController: dtmin must be > 0, got {dtmin}")
        if dtmax is not None and (dtmax <= 0 or (dtmin is not None and dtmax < dtmin)):
            raise ValueError(f"PIDController: dtmax must be > 0 and >= dtmin, got {dtmax}")
        if not callable(norm):
            raise TypeError(f"PIDController: norm must be callable (B, ...) -> (B,), got {type(norm).__name__}")
        self.rtol, self.atol = rtol, atol
        self.pcoeff, self.icoeff, self.dcoeff = pcoeff, icoeff, dcoeff
        self.dtmin, self.dtmax = dtmin, dtmax
        self.factormin, self.factormax, self.safety = factormin, factormax, safety
        self.norm = norm
        self.step_ts, self.jump_ts = step_ts, jump_ts
        if force_dtmin and dtmin is None:
            raise ValueError("PIDController: force_dtmin=True needs dtmin")
        self.force_dtmin = bool(force_dtmin)

    def _tol(self, val, y: Tensor, name: str) -> Tensor:
        key = (name, y.dtype, y.device, tuple(y.shape))
        cache = self.__dict__.setdefault("_tol_cache", {})
        if key in cache and cache[key][0] is val:
            return cache[key][1]
        with torch.inference_mode(False):  # cached: never an inference tensor (later solves may record autograd)
            v = torch.as_tensor(val, dtype=y.dtype, device=y.device)
        try:
            torch.broadcast_shapes(v.shape, y.shape)
        except RuntimeError:
            raise ValueError(
                f"PIDController: {name} of shape {tuple(v.shape)} does not broadcast against the state "
                f"shape {tuple(y.shape)} (batch first; per-component tolerances have the state's trailing shape)"
            ) from None
        cache[key] = (val, v)
        return v

    def _over(self, x: Tensor, scale: Tensor) -> Tensor:
        """``x / scale``, where a zero atol can leave scale = 0: an exactly-zero ``x`` there is zero error (a
        component that stays 0 under atol = 0), not 0/0 = NaN (which rejected every step until underflow)."""
        out = x / scale
        cached = self.__dict__.get("_zero_atol")
        if cached is None or cached[0] is not self.atol:
            a = self.atol
            cached = (a, bool((torch.as_tensor(a) == 0).any()))  # (a float, tensor, list or numpy array)
            self.__dict__["_zero_atol"] = cached
        if cached[1]:
            out = torch.where(x == 0, torch.zeros_like(out), out)
        return out

    def _scale(self, y0: Tensor, y1: Tensor) -> Tensor:
        rtol = self._tol(self.rtol, y0, "rtol")
        atol = self._tol(self.atol, y0, "atol")
        return atol + rtol * torch.maximum(y0.abs(), y1.abs())

    def _clip_dt(self, adt: Tensor) -> Tensor:
        if self.dtmin is not None:
            adt = adt.clamp(min=self.dtmin)
        if self.dtmax is not None:
            adt = adt.clamp(max=self.dtmax)
        return adt

    def init(self, solver, t0, t1, y0, dt0, deriv0, deriv_fn):
        if not solver.adaptive:
            raise ValueError(
                f"solve: solver {type(solver).__name__} has no error estimate and cannot be used with "
                "PIDController; use ConstantStep(dt0=...) or an adaptive solver"
            )
        direction = torch.sign(t1 - t0)
        span = (t1 - t0).abs()
        state = {}
        for name, marks in (("step_marks", self.step_ts), ("jump_marks", self.jump_ts)):
            if marks is not None:
                m = _as_times(marks, f"PIDController.{name[:4]}_ts", y0)
                if m.dim() == 2 and m.shape[0] != y0.shape[0]:
                    raise ValueError(f"PIDController.{name[:4]}_ts: expected (K,) or (B={y0.shape[0]}, K), got {tuple(m.shape)}")
                state[name] = m
        shape = t0.shape
        big = torch.full(shape, 1.0, dtype=y0.dtype, device=y0.device)
        state["e1"] = big
        state["e2"] = big
        if dt0 is not None:
            return torch.sign(dt0) * self._clip_dt(dt0.abs()), state, 0
        # Hairer, Norsett & Wanner, Solving ODEs I, Sec. II.4: automatic initial step size.
        with torch.no_grad():
            y0d = y0.detach()
            f0 = deriv0.detach()
            scale = self._tol(self.atol, y0d, "atol") + self._tol(self.rtol, y0d, "rtol") * y0d.abs()
            d0 = self.norm(self._over(y0d, scale))
            d1 = self.norm(self._over(f0, scale))
            small = (d0 < 1e-5) | (d1 < 1e-5)
            h0 = torch.where(small, torch.full_like(d0, 1e-6), 0.01 * d0 / torch.where(small, torch.ones_like(d1), d1))
            h0 = torch.minimum(h0, torch.where(span > 0, span, torch.ones_like(span)))
            y1 = y0d + bcast(direction * h0, y0d) * f0
            f1 = deriv_fn(t0 + direction * h0, y1)
            d2 = self.norm(self._over(f1 - f0, scale)) / h0
            dmax = torch.maximum(d1, d2)
            k = solver.order + 1
            h1 = torch.where(
                dmax <= 1e-15,
                torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3),
                (0.01 / torch.where(dmax <= 1e-15, torch.ones_like(dmax), dmax)) ** (1.0 / k),
            )
            h = torch.minimum(100 * h0, h1)
            h = torch.where(torch.isfinite(h), h, torch.full_like(h, 1e-6))
            h = torch.minimum(h, torch.where(span > 0, span, torch.ones_like(span)))
            h = self._clip_dt(h)
        return direction * h, state, 1

    def propose(self, t, dt, t1, direction, state):
        t_next = t + dt
        jump = torch.zeros(t.shape, dtype=torch.bool, device=t.device)
        for name in ("step_marks", "jump_marks"):
            if name in state:
                dist, mark = _next_mark(state[name], t, direction)
                hit = dist <= direction * (t_next - t)
                if name == "jump_marks":
                    # end just before the jump; the loop restarts just after it
                    mark = torch.nextafter(mark, mark - direction)
                    jump = jump | hit
                else:
                    jump = jump & ~hit
                t_next = torch.where(hit, mark, t_next)
        t_next = _snap(t_next, dt, t1, direction)
        return t_next, jump & (t_next != t1)

    def adapt(self, t, t_next, dt, y0, y1, err, state, error_order):
        h = (t_next - t).detach()
        with torch.no_grad():
            scale = self._scale(y0.detach(), y1.detach())
            e = self.norm(self._over(err.detach(), scale))
            finite = torch.isfinite(e)
            accept = (e <= 1) & finite
            habs = h.abs()
            dt = dt.detach()
            # A proposal below half an ulp of t leaves t where it is (h = 0, zero error, accepted): the next step
            # grows from the proposal (as if its error were zero), not from the zero-length step, which would stall
            # the sample for ever (float32 t0 = 5000 with a 1e-4 first step). A zero proposal cannot grow: it is
            # rejected, and the underflow test below ends the sample.
            dabs = dt.abs()
            base = torch.where(habs == 0, dabs, habs)
            live = base != 0
            accept = accept & live
            sign = torch.sign(dt)  # (h, when not 0, has the proposal's sign: it is the proposal clipped)
            if self.force_dtmin:
                # the proposal or the step taken at dtmin: a proposal of exactly dtmin can round to a longer step
                # (float32 at large t), which would then never be forced and retry the same step
                accept = accept | ((torch.minimum(habs, dabs) <= self.dtmin * (1 + 1e-6)) & live)
            tiny = torch.finfo(e.dtype).tiny ** 0.5
            e_safe = torch.where(finite, e, torch.ones_like(e)).clamp(min=tiny)
            k = float(error_order)
            b1 = (self.pcoeff + self.icoeff + self.dcoeff) / k
            b2 = -(self.pcoeff + 2 * self.dcoeff) / k
            b3 = self.dcoeff / k
            factor = self.safety * e_safe ** (-b1)
            if b2 != 0:
                factor = factor * state["e1"] ** (-b2)
            if b3 != 0:
                factor = factor * state["e2"] ** (-b3)
            # a rejected step shrinks by at least 2%, so the snap onto t1 (which lengthens a step by <= 1%) cannot
            # give the same step back (with safety close to 1 and an error ratio just above 1)
            fmax = torch.where(accept, torch.full_like(factor, self.factormax), torch.full_like(factor, 0.98))
            factor = torch.minimum(torch.maximum(factor, torch.full_like(factor, self.factormin)), fmax)
            factor = torch.where(finite, factor, torch.full_like(factor, self.factormin))
            adt = self._clip_dt(base * factor)
            # a rejected step whose retry rounds to no step at all, or to a step no shorter than the rejected one
            # (a step a few ulps long: t + 0.87 h rounds back to t + h), would be retried identically until
            # max_steps: the step size has underflowed (scipy: "step size less than spacing between numbers")
            moved = (torch.addcmul(t, sign, adt) - t).abs()
            underflow = ~accept & ((moved == 0) | (moved >= habs))
            if self.dtmin is not None:
                underflow = underflow | (~accept & (habs <= self.dtmin * (1 + 1e-6)))
            # the PI/PID error history (unused by the default I controller): a zero-length step has no error to
            # remember (its tiny ratio would hold the next steps at factormin)
            kept = accept & (habs != 0) if (b2 != 0 or b3 != 0) else accept
            new_state = dict(state)
            new_state["e1"] = torch.where(kept, e_safe, state["e1"])
            new_state["e2"] = torch.where(kept, state["e1"], state["e2"])
        return accept, sign * adt, underflow, new_state
