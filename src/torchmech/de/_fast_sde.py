"""The lean stepping loop for fixed-step SDE solves whose samples share one time grid.

The generic loop treats every sample on its own (per-sample times, step proposals, acceptance,
finiteness checks, save windows, a host read-back per step). A fixed-step SDE solve whose samples
all start, stop and step together needs none of that per step: the time grid, the save times each
step passes and their interpolation weights are known before the first step, and the Brownian
increment of a step is one query at two plain floats. This loop does exactly the arithmetic of
the generic one (same solver ``step``, same times rounded the same way, same interpolation), so
results are identical to it; it checks finiteness once at the end, and if anything went non-finite
it hands the whole run back to the generic loop (which then stops the offending samples with
status ``NONFINITE`` exactly as usual; Brownian motions return the same increments on re-query).
"""

from __future__ import annotations

import bisect

import numpy as np
import torch
from torch import Tensor

from torchmech.de._tree import all_finite, any_requires_grad
from torchmech.de.brownian import AbstractBrownian, BrownianIncrement
from torchmech.de.controllers import ConstantStep, StepTo
from torchmech.de.terms import ControlTerm, DiagonalControlTerm, MultiTerm, ODETerm

__all__ = ["unsupported", "run", "plan"]


def _solvers():
    from torchmech.de.solvers.sde import (SRA1, SRI2, EulerHeun, EulerMaruyama, Milstein, ReversibleHeun,
                                          StochasticHeun, StochasticMidpoint)

    return (EulerMaruyama, ReversibleHeun, StochasticHeun, StochasticMidpoint, EulerHeun, Milstein, SRA1, SRI2)


def unsupported(integ) -> str | None:
    """Why ``integ`` cannot use this loop on structural grounds (None if it may: see :func:`plan`)."""
    if type(integ.solver) not in _solvers():
        return f"solver {type(integ.solver).__name__}"
    terms = integ.terms
    if not (type(terms) is MultiTerm and len(terms.terms) == 2 and type(terms.terms[0]) is ODETerm
            and (type(terms.terms[1]) in (ControlTerm, DiagonalControlTerm)
                 or getattr(terms.terms[1], "plain_control", False))):
        return "terms other than MultiTerm(ODETerm, ControlTerm/DiagonalControlTerm)"
    if type(integ.controller) not in (ConstantStep, StepTo):
        return f"controller {type(integ.controller).__name__}"
    dense = integ.saveat.dense and not getattr(integ, "records_only", False)
    if integ.event is not None or dense or integ.saveat.steps or integ.progress:
        return "events, dense/steps saving or a progress bar"
    if integ.y0.dtype not in (torch.float32, torch.float64):
        return f"dtype {integ.y0.dtype}"
    return None


class _FixedControl(MultiTerm):
    """The solve's terms with the control increments of the current step given in advance.

    ``brownian_increment``: the step's Brownian increment with its Levy area (a
    :class:`~torchmech.de.brownian.BrownianIncrement`) when the solver asks for it, else None.
    """

    def __init__(self, terms: MultiTerm, control: tuple):
        self.terms = terms.terms
        dw = control[1]
        self.brownian_increment = dw if isinstance(dw, BrownianIncrement) else None
        self._control = (control[0], dw.W) if self.brownian_increment is not None else control

    def contr(self, t0, t1):
        return self._control


class Plan:
    """The shared time grid (``floats``: exact values in the solve's dtype; ``grid``: (K,) tensor),
    the save columns and interpolation weights of every step, and the step's control function."""

    def __init__(self, integ, floats: list, saves: list):
        self.floats = floats
        y0 = integ.y0
        self.grid = torch.tensor(floats, dtype=y0.dtype, device=y0.device)
        self.saves = saves  # per step: [(column, theta), ...] for save times in (t_k, t_{k+1}]
        self.B = y0.shape[0]
        # (K-1,) step lengths, each the generic loop's t_next - t in the solve's dtype
        self.h = self.grid[1:] - self.grid[:-1]
        self.bm = None
        if isinstance(integ.terms, MultiTerm):
            diff = integ.terms.terms[1]
            self.bm = diff.control if isinstance(diff.control, AbstractBrownian) else None

    def times(self, k: int) -> tuple[Tensor, Tensor]:
        """(t_k, t_{k+1}) as (B,) tensors, as the generic loop passes them to vector fields."""
        return self.grid[k].expand(self.B), self.grid[k + 1].expand(self.B)

    def control(self, integ, k: int, tv: Tensor, tn: Tensor) -> tuple:
        """Control increments of step ``k``: (dt (B,), Brownian increment), the increment with its
        Levy area for a solver that uses it (``solver.uses_levy_area``)."""
        drift, diff = integ.terms.terms
        if self.bm is not None:
            levy = getattr(integ.solver, "uses_levy_area", False) and self.bm.has_levy_area
            dw = self.bm.evaluate(self.floats[k], self.floats[k + 1], levy_area=levy)
        else:
            dw = diff.contr(tv, tn)
        return (drift.contr(tv, tn), dw)

    def terms(self, integ, control: tuple) -> MultiTerm:
        return _FixedControl(integ.terms, control)


def _shared(x: Tensor) -> bool:
    return bool((x == x.reshape(-1)[0]).all())


def _times_need_grad(integ) -> bool:
    """Whether gradients are wanted with respect to t0, t1, a StepTo grid or the save times."""
    if not torch.is_grad_enabled():
        return False
    ts = getattr(integ.controller, "ts", None)
    return any_requires_grad((integ.t0, integ.t1, ts, getattr(integ, "ts", None)))


def plan(integ) -> Plan | None:
    """The plan of a fixed-step solve (``unsupported`` here, or an ODE solve with ``ConstantStep`` in
    :mod:`torchmech.de._fast`), or None when its samples do not share one grid
    (per-sample t0/t1/dt0, per-sample StepTo or save times) or it needs more than ``max_steps``."""
    cached = getattr(integ, "_sde_plan", False)
    if cached is not False:
        return cached
    integ._sde_plan = None
    t0, t1 = integ.t0, integ.t1
    if _times_need_grad(integ):
        return None  # the grid here is made of floats: the generic loop keeps the times differentiable
    npdt = np.float32 if integ.y0.dtype == torch.float32 else np.float64
    if not (_shared(t0) and _shared(t1)) or bool((t0 == t1).any()):
        return None
    a, b = npdt(float(t0[0])), npdt(float(t1[0]))
    d = npdt(1.0) if b > a else npdt(-1.0)
    ctrl = integ.controller
    if type(ctrl) is ConstantStep:
        if integ.dt0 is None or not _shared(integ.dt0):
            return None
        # the generic loop: dt = d * |dt0|; t_next = t + dt, snapped to t1 within 64 eps of it
        dt = d * npdt(abs(float(integ.dt0[0])))
        slack = min(npdt(64 * np.finfo(npdt).eps) * max(abs(b), abs(dt)), npdt(0.01) * abs(dt))  # as _snap
        floats = [a]
        t = a
        while t != b:
            if len(floats) > integ.max_steps:
                return None
            tn = npdt(t + dt)
            if d * npdt(b - tn) <= slack:
                tn = b
            floats.append(tn)
            t = tn
    else:
        ts = ctrl.ts
        if not isinstance(ts, Tensor):
            ts = torch.as_tensor(ts)
        ts = ts.to(dtype=integ.y0.dtype)
        if ts.dim() == 2:
            if not bool((ts == ts[:1]).all()):
                return None
            ts = ts[0]
        floats = [npdt(x) for x in ts.tolist()]
        if floats[0] != a or floats[-1] != b or len(floats) - 1 > integ.max_steps:
            return None  # the generic loop reports these
        if any(d * npdt(y - x) <= 0 for x, y in zip(floats[:-1], floats[1:])):
            return None
    saves: list = [[] for _ in range(len(floats) - 1)]
    if integ.ts is not None:
        sts = integ.saveat.ts
        if not isinstance(sts, Tensor) or sts.dim() != 1:
            if not bool((integ.ts == integ.ts[:1]).all()):
                return None
        keys = [d * x for x in floats]  # ascending
        for col, tau in enumerate(integ.ts[0].tolist()):
            tau = npdt(tau)
            k = bisect.bisect_left(keys, d * tau)  # first grid point at or after tau
            if k == 0:
                continue  # tau == t0: filled by init_state
            ta, tb = floats[k - 1], floats[k]
            h = npdt(tb - ta)
            saves[k - 1].append((col, float(npdt(npdt(tau - ta) / h))))
    integ._sde_plan = Plan(integ, [float(x) for x in floats], saves)
    return integ._sde_plan


def _interp(y0: Tensor, q: Tensor, theta: float) -> Tensor:
    return y0 + theta * q  # the generic loop's linear dense output, y0 + theta (y1 - y0)


def run(integ, state: dict, n: int | None):
    """``_Integrator.run_steps`` on the shared grid: up to ``n`` steps (all if None).

    Returns (state, records, all_done), or None to have the generic loop run instead (no shared
    grid, or a non-finite value appeared). ``records`` holds the generic loop's per-step records
    (start and end times, start state, interpolant) when ``integ`` records dense output (the
    backward solve of BacksolveAdjoint, ``records_only``), else it is empty.
    """
    P = plan(integ)
    if P is None:
        return None
    t_now = float(state["t"][0])
    if not bool((state["t"] == state["t"][0]).all()) or bool(state["done"].any()):
        return None
    k0 = P.floats.index(t_now) if t_now in P.floats else -1
    if k0 < 0:
        return None
    K = len(P.floats) - 1
    k1 = K if n is None else min(K, k0 + n)
    solver, args = integ.solver, integ.args
    y, vf = state["y"], state["vf"]
    saved: dict = {}
    records: list = []
    valid = torch.ones(P.B, dtype=torch.bool, device=y.device) if integ.record_dense else None
    nfev = 0
    for k in range(k0, k1):
        tv, tn = P.times(k)
        res = solver.step(P.terms(integ, P.control(integ, k, tv, tn)), tv, tn, y, args, vf, dense=False)
        nfev = res.nfev
        for col, theta in P.saves[k]:
            saved[col] = _interp(y, res.interp[0], theta)
        if valid is not None:
            records.append({"tprev": tv, "tnext": tn, "h": tn - tv, "valid": valid, "y0": y, "qs": res.interp})
        y, vf = res.y1, res.vf1
    if not bool(all_finite((y, vf)).all()):
        return None
    m = k1 - k0
    new = dict(state)
    B = P.B
    new.update(
        t=P.grid[k1].expand(B).clone(), y=y, vf=vf,
        done=torch.full_like(state["done"], k1 == K),
        num_steps=state["num_steps"] + m, num_accepted=state["num_accepted"] + m,
        num_fevals=state["num_fevals"] + m * nfev,
    )
    if saved:
        cols = sorted(saved)
        idx = torch.tensor(cols, device=y.device)
        new["ys_ts"] = state["ys_ts"].index_copy(1, idx, torch.stack([saved[c] for c in cols], dim=1))
    return new, records, k1 == K
