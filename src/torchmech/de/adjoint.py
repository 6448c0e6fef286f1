"""Gradient strategies for solve(): direct autograd, checkpointed recomputation, continuous adjoint."""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from torchmech._autograd import first_order_only
from torchmech.de._tree import bcast
from torchmech.de.controllers import AbstractController, ConstantStep, StepTo, _next_mark
from torchmech.de.terms import ControlTerm, DiagonalControlTerm, MultiTerm, ODETerm

__all__ = ["AbstractAdjoint", "DirectAdjoint", "CheckpointAdjoint", "BacksolveAdjoint"]


def _grad(out, inputs, **kw) -> tuple:
    """``torch.autograd.grad`` with unused inputs as None, also when ``out`` has no graph at all (a vector
    field that ignores its state, or ``adjoint_params`` it does not use), where autograd would raise."""
    inputs = [inputs] if torch.is_tensor(inputs) else list(inputs)
    if not (torch.is_tensor(out) and out.requires_grad):
        return (None,) * len(inputs)
    return torch.autograd.grad(out, inputs, allow_unused=True, **kw)


class AbstractAdjoint:
    """How gradients flow through :func:`torchmech.de.solve`. ``run(integrator)`` returns a Solution."""

    def run(self, integ):
        raise NotImplementedError


class DirectAdjoint(AbstractAdjoint):
    """Plain autograd through every operation of the stepping loop.

    Exact gradients of the discrete solution (step sizes are treated as constants); memory grows
    with the number of steps; higher-order gradients work (except through an event time, which raises).
    """

    def run(self, integ):
        state = integ.init_state()
        state, records, _ = integ.run_steps(state)
        return integ.finalize(state, records)


class CheckpointAdjoint(AbstractAdjoint):
    """Autograd through the loop, storing only segment boundaries and recomputing segments.

    Args:
        checkpoints: number of steps per recomputed segment (``torch.utils.checkpoint``); default
            ``ceil(sqrt(max_steps))``. Gradients equal :class:`DirectAdjoint` up to round-off;
            memory is O(steps / checkpoints + checkpoints) instead of O(steps).
    """

    def __init__(self, checkpoints: int | None = None):
        if checkpoints is not None and (isinstance(checkpoints, bool) or not isinstance(checkpoints, int)
                                        or checkpoints < 1):
            raise ValueError(f"CheckpointAdjoint: checkpoints must be a positive int or None, got {checkpoints!r}")
        self.checkpoints = checkpoints

    def run(self, integ):
        n = self.checkpoints or max(1, math.ceil(math.sqrt(integ.max_steps)))
        state = integ.init_state()
        records: list = []

        def segment(st):
            st = dict(st)
            if "ys_ts" in st:  # the loop writes save slots in place; keep the segment input intact
                st["ys_ts"] = st["ys_ts"].clone()
            return integ.run_steps(st, n)

        done = bool(state["done"].all())
        while not done:
            if torch.is_grad_enabled():
                state, recs, done = checkpoint(segment, state, use_reentrant=False)
            else:
                state, recs, done = segment(state)
            records.extend(recs)
        return integ.finalize(state, records)


# Gauss-Legendre nodes/weights on [0, 1] (3 points: exact for degree-5 polynomials).
_GL_NODES = (0.5 - 0.5 * math.sqrt(0.6), 0.5, 0.5 + 0.5 * math.sqrt(0.6))
_GL_WEIGHTS = (5.0 / 18.0, 8.0 / 18.0, 5.0 / 18.0)


class BacksolveAdjoint(AbstractAdjoint):
    """Continuous adjoint: gradients from solving the adjoint ODE backwards in time.

    Forward: the solve runs without building a graph (O(1) memory in the number of steps).
    Backward: ``[y, a]`` with ``dy/dt = f`` and ``da/dt = -a^T df/dy`` is solved from the last save
    time back to ``t0`` (adding ``dL/dy(t_j)`` at each save time), each sample with its own
    adaptive steps. Parameter gradients ``dL/dtheta = int a^T df/dtheta dt`` are accumulated by
    3-point Gauss-Legendre quadrature over every accepted backward step using that step's dense
    interpolant, so the parameter adjoint never enters the error norm (``seminorm=True``).

    Args:
        rtol, atol: tolerances of the backward solve.
        solver: adaptive solver of the backward solve (default: the forward solver, or ``Tsit5``
            when the forward solver has no error estimate).
        seminorm: True (default): the parameter adjoint is excluded from the error norm
            (computed by the quadrature above). False: the per-sample parameter adjoint
            ``a_theta`` (B, P) is part of the backward ODE state and of its error norm, as in
            torchdiffeq without seminorms; per-sample ``a^T df/dtheta`` comes from one batched
            vjp (``is_grads_batched``) costing O(B^2 * state) memory per evaluation, so keep B small.
        adjoint_params: tensors to differentiate with respect to. Default: the parameters of
            every ``nn.Module`` vector field in ``terms`` (for a bound method such as
            ``model.drift``, of its module). Tensors in ``args`` that require grad are always
            included (as tensors, or in tuples, lists, namedtuples and dicts; a dataclass holding them
            raises). Without ``adjoint_params``, one evaluation of each field at ``(t0, y0)`` is walked back
            to the persistent leaf tensors its output depends on: a trainable one outside those (reached
            through a closure, a default argument, a container, an attribute, ``functools.partial``, or
            used by a module's forward without being its parameter) raises ``ValueError`` rather than get no
            gradient; pass it here, through ``args``, or make it a parameter of the field's ``nn.Module``.
            (That evaluation is one extra call per solve, with the fields' modules in eval mode and the RNG
            state restored after it.)
        max_steps: step limit of the backward solve (default: the forward ``max_steps``).
        norm: ODEs: error norm of the backward solve's ``PIDController`` (default per-sample
            :func:`~torchmech.de.rms_norm`; :func:`~torchmech.de.batch_rms_norm` for one step
            size shared by the batch, as in torchdiffeq).
        controller: controller of the backward solve. ODEs: default a ``PIDController(rtol, atol)``
            (on the forward solve's step and jump marks); give one with a fixed-step ``solver`` to solve
            backwards on a grid, as ``odeint_adjoint`` does for fixed-grid methods. SDEs: default as the
            forward solve: the same ``ConstantStep`` dt0, the ``StepTo`` times, or the forward
            ``PIDController``.

    After a backward pass, ``backward_stats`` holds the backward solves' per-sample statistics
    (summed over the segments between save times). Samples that did not finish the forward solve
    (``throw=False`` and a status other than SUCCESS) have no end state to solve back from: they get
    zero gradient.

    **SDEs** (``MultiTerm(ODETerm(f), ControlTerm/DiagonalControlTerm(g, brownian))`` with an SDE
    solver): the stochastic adjoint of Li et al. (2020, "Scalable Gradients for Stochastic
    Differential Equations"). With the Stratonovich form ``dy = f dt + g o dW``, ``[y, a]`` is
    solved backwards from each save time by ``dy = f dt + g o dW``,
    ``da = -(df/dy)^T a dt - (d(g dW)/dy)^T a``, re-querying the same Brownian motion (a
    ``BrownianInterval`` answers from its cache or regenerates, a ``VirtualBrownianTree``
    regenerates); ``dL/dtheta = int a^T (df/dtheta dt + dg/dtheta o dW)`` is summed over every
    accepted backward step by the trapezoidal rule (a Stratonovich quadrature). The gradients are
    those of the continuous SDE: they converge to :class:`DirectAdjoint`'s (of the discretised
    solve, same Brownian path) as the steps shrink. ``solver`` is the backward SDE solver
    (default: the forward one if it is a Stratonovich solver other than ``Milstein``, else
    ``StochasticHeun``; ``rtol``/``atol``/``seminorm`` apply to ODEs only). An Ito solver's SDE
    (e.g. ``EulerMaruyama``) is converted to Stratonovich form with the drift correction
    ``f - 1/2 sum_k (dg_k/dy) g_k`` (``g_k``: the diffusion's column for noise channel ``k``; for diagonal
    noise ``f - 1/2 g dg/dy`` elementwise). General noise costs two extra vector-Jacobian products per
    noise channel and drift evaluation (none when the diffusion does not depend on ``y``).

    Supports ``ODETerm``, the SDE terms above and ``SaveAt(t0, ts, t1)``; not dense/steps
    saving, events or higher-order gradients (use :class:`DirectAdjoint` or
    :class:`CheckpointAdjoint`). ODEs: gradients with respect to ``t0``, ``t1`` and ``SaveAt.ts`` come from the
    adjoint identities (``<dL/dy(tau), f(tau, y(tau))>`` per save time, ``-<a(t0), f(t0, y0)>`` for ``t0``; one
    vector-field call per save time, only when a time requires grad); ``sol.y_final`` is differentiable whether or
    not ``t1`` is saved. SDEs: time gradients raise ``ValueError``.
    """

    def __init__(self, rtol: float = 1e-6, atol: float = 1e-8, solver=None, seminorm: bool = True,
                 adjoint_params=None, max_steps: int | None = None, controller=None, norm=None):
        real = (int, float)
        if not (isinstance(rtol, real) and isinstance(atol, real) and not isinstance(rtol, bool)
                and not isinstance(atol, bool) and 0 < rtol < math.inf and 0 <= atol < math.inf):
            raise ValueError(f"BacksolveAdjoint: need finite numbers rtol > 0 and atol >= 0, got rtol={rtol!r}, "
                             f"atol={atol!r}")
        if controller is not None and not isinstance(controller, AbstractController):
            raise TypeError(f"BacksolveAdjoint: controller must be an AbstractController or None, got "
                            f"{type(controller).__name__}")
        if norm is not None and not callable(norm):
            raise TypeError(f"BacksolveAdjoint: norm must be callable (B, ...) -> (B,) or None, got {type(norm).__name__}")
        self.rtol, self.atol, self.solver, self.seminorm = rtol, atol, solver, seminorm
        self.norm = norm
        self.adjoint_params = None if adjoint_params is None else list(adjoint_params)
        self.max_steps = max_steps
        self.controller = controller

    def run(self, integ):
        from torchmech.de.terms import ODETerm

        sde = _sde_parts(integ) if not isinstance(integ.terms, ODETerm) else None
        if sde is not None and torch.is_grad_enabled():
            # a bad backward solver or controller raises now, not at backward() (inference without grad is fine)
            back, _, _ = self._sde_backward_setup(integ)
            check = getattr(back, "check_terms", None)  # SRA1 backwards needs additive forward noise
            if check is not None:
                check(integ.terms, integ.t0, integ.y0, integ.args)
        if integ.event is not None:
            raise ValueError("BacksolveAdjoint: events are not supported; use DirectAdjoint or CheckpointAdjoint")
        if integ.saveat.dense or integ.saveat.steps:
            raise ValueError("BacksolveAdjoint: SaveAt(dense=True) and SaveAt(steps=True) are not supported")
        params = collect_params(integ, self.adjoint_params, "BacksolveAdjoint")
        times = [x for x in (integ.t0, integ.t1, integ.ts) if x is not None]
        timed = torch.is_grad_enabled() and any(x.requires_grad for x in times)
        if timed and sde is not None:
            raise ValueError("BacksolveAdjoint: gradients with respect to t0, t1 or SaveAt.ts are not computed for "
                             "SDEs; use DirectAdjoint or CheckpointAdjoint, or detach the times")
        holder = {"sde": sde, "n_times": len(times) if timed else 0}
        ys, y_final = _BacksolveFn.apply(self, integ, holder, integ.y0, *params, *(times if timed else ()))
        sol = holder["sol"]
        sol.ys = ys
        # with t1 saved, y_final is that save (one gradient path); otherwise the Function's second output, whose
        # cotangent starts the backward solve at t_final
        sol.y_final = ys[:, -1] if integ.saveat.t1 else y_final
        return sol

    # backward pass -----------------------------------------------------------------------------
    def backward(self, integ, params, ts, ys, grad_ys):
        from torchmech.de.controllers import PIDController
        from torchmech.de.integrate import SaveAt, _Integrator
        from torchmech.de.terms import ODETerm

        f = integ.terms.f
        args, params = _detached_args(integ.args, params)
        shape = ys.shape[2:]
        B = ys.shape[0]
        n = int(torch.tensor(shape).prod()) if len(shape) else 1

        sizes = [p.numel() for p in params]
        augment = bool(params) and not self.seminorm  # parameter adjoint inside the ODE state

        def aug(t, z, _):
            y = z[:, :n].reshape((B,) + tuple(shape))
            a = z[:, n:2 * n].reshape((B,) + tuple(shape))
            with torch.enable_grad():
                y_ = y.detach().requires_grad_(True)
                fy = f(t, y_, args)
                if augment and B == 1:  # one sample (odeint_adjoint's flattened state): one plain vjp for all
                    vjp, *pg = _grad(fy, [y_] + list(params), grad_outputs=a)
                else:
                    (vjp,) = _grad(fy, y_, grad_outputs=a, retain_graph=augment)
                if augment and B > 1:
                    # per-sample a^T df/dtheta: one batched vjp with one-hot-in-batch cotangents
                    eye = torch.eye(B, dtype=a.dtype, device=a.device).reshape((B, B) + (1,) * len(shape))
                    pg = _grad(fy, params, grad_outputs=eye * a.unsqueeze(0), is_grads_batched=True)
            if vjp is None:
                vjp = torch.zeros_like(a)
            parts = [fy.detach().reshape(B, n), -vjp.reshape(B, n)]
            if augment:
                parts += [(-g.reshape(B, -1)) if g is not None else z.new_zeros(B, k) for g, k in zip(pg, sizes)]
            return torch.cat(parts, dim=1)

        # times to visit backwards: the save times, then t0
        times = torch.cat([integ.t0[:, None], ts], dim=1)  # (B, T+1)
        cot = torch.cat([torch.zeros_like(grad_ys[:, :1]), grad_ys], dim=1)
        a = torch.zeros_like(ys[:, 0])
        y = ys[:, -1]
        ap = ys.new_zeros(B, sum(sizes)) if augment else None  # (B, P): only for seminorm=False
        zeros_i = torch.zeros(B, dtype=torch.int64, device=ys.device)
        stats = {k: zeros_i for k in ("num_fevals", "num_steps", "num_accepted", "num_rejected")}
        self.backward_stats = stats
        grads = [torch.zeros_like(p) for p in params]
        solver = self.solver if self.solver is not None else integ.solver
        if not solver.adaptive and self.controller is None:  # adaptive, unless a fixed backward grid is given
            from torchmech.de.solvers import Tsit5

            solver = Tsit5() if self.solver is None else solver
        max_steps = self.max_steps or integ.max_steps
        # The forward solve's marks (e.g. a CDE's knots, where dX/dt jumps): the adjoint's integrand has the
        # same kinks, and the backward solve must step onto them too (with the seminorm the parameter and
        # data integrands are outside the error norm, so nothing else would make it refine there).
        fc = integ.controller
        pid_kwargs = {k: v for k, v in (("jump_ts", getattr(fc, "jump_ts", None)),
                                        ("step_ts", getattr(fc, "step_ts", None)), ("norm", self.norm)) if v is not None}
        segments = _backward_segments(cot)
        if segments:
            y = ys[:, segments[0][0] - 1]
        for j, jp in segments:
            a = a + cot[:, j]
            pieces = [y.reshape(B, n), a.reshape(B, n)] + ([ap] if augment else [])
            z0 = torch.cat(pieces, dim=1)
            tj, tprev = times[:, j], times[:, jp]
            if bool((tj == tprev).all()):
                continue
            quad = bool(params) and not augment
            ctrl = self.controller if self.controller is not None else PIDController(self.rtol, self.atol, **pid_kwargs)
            binteg = _Integrator(ODETerm(aug), solver, tj, tprev, z0, None, None, SaveAt(t1=True, dense=quad),
                                 ctrl, None, max_steps, False)
            # with quad, the step records (dense output) feed the quadrature below; the lean loop records them
            quadrature = (lambda records: self._quadrature(f, args, params, grads, records, n, shape)) if quad else None
            zT = self._segment(binteg, quadrature, stats, "backward solve", "loosen rtol/atol or raise max_steps")
            y = zT[:, :n].reshape(y.shape)
            a = zT[:, n:2 * n].reshape(a.shape)
            if augment:
                ap = zT[:, 2 * n:]
        self.backward_stats = stats
        if augment:
            total = ap.sum(dim=0)
            grads = [g.reshape(p.shape) for g, p in zip(total.split(sizes), params)]
        a = a + cot[:, 0]
        return a, grads

    def _sde_backward_setup(self, integ):
        """(solver, controller, dt0) of the backward SDE solve."""
        from torchmech.de.controllers import ConstantStep, StepTo
        from torchmech.de.solvers import sde as S

        fwd, fc = integ.solver, integ.controller
        ctrl = self.controller
        if ctrl is None:
            if isinstance(fc, StepTo):
                ctrl = _MarksTo(torch.as_tensor(fc.ts))
            else:
                ctrl = fc  # ConstantStep with the forward dt0, or the forward PIDController
        solver = self.solver
        if solver is None:
            ok = fwd.sde_type in ("stratonovich", "any") and not isinstance(fwd, S.Milstein)
            solver = fwd if ok else S.StochasticHeun()
            if ctrl.adaptive and not solver.adaptive:
                cls = type(solver) if type(solver) in _adaptive_sde_solvers() else S.StochasticHeun
                solver = cls(adaptive=True)
        elif (not isinstance(solver, S.AbstractSDESolver) or solver.sde_type not in ("stratonovich", "any")
              or isinstance(solver, S.Milstein)):
            raise ValueError("BacksolveAdjoint: for an SDE, solver must be a Stratonovich SDE solver that works "
                             "through the terms' products (StochasticHeun, EulerHeun, StochasticMidpoint, "
                             f"ReversibleHeun; SRA1 for additive noise), got {solver!r}")
        if ctrl.adaptive and not solver.adaptive:
            raise ValueError(f"BacksolveAdjoint: the backward controller {type(ctrl).__name__} is adaptive but the "
                             f"backward solver {solver!r} has no error estimate; pass an adaptive solver such as "
                             "StochasticHeun(adaptive=True)")
        if isinstance(ctrl, ConstantStep) and integ.dt0 is None:
            raise ValueError("BacksolveAdjoint: controller ConstantStep needs the forward solve's dt0")
        return solver, ctrl, integ.dt0

    def backward_sde(self, integ, sde, params, ts, ys, grad_ys):
        """Backward pass for an SDE: the Stratonovich adjoint SDE, on the forward Brownian path.

        With ``a = dL/dy`` and the Stratonovich form ``dy = f dt + g o dW`` (an Ito drift gets the
        correction ``f - 1/2 g dg/dy``, diagonal noise), ``[y, a]`` solves backwards from each save
        time with ``da = -(df/dy)^T a dt - (d(g dW)/dy)^T a`` (Li et al. 2020; Kidger 2021,
        Sec. 5.2), querying the same Brownian motion over the backward steps. The parameter
        gradient ``int a^T (df/dtheta dt + dg/dtheta o dW)`` never enters the state or the error
        norm. When the batch shares one backward grid and the solver is Heun, midpoint or
        Euler-Heun, it comes from the solver's own stages, weighted as the solver combines them
        (``_StageQuadrature``; no extra evaluation). Otherwise (per-sample or adaptive steps,
        Reversible Heun) it is the trapezoidal rule over the accepted backward steps
        (``_SDEQuadrature``). Both are consistent Stratonovich quadratures.
        """
        from torchmech.de import _fast_sde

        args, params = _detached_args(integ.args, params)
        shape = ys.shape[2:]
        B = ys.shape[0]
        n = int(torch.tensor(shape).prod()) if len(shape) else 1
        solver, ctrl, dt0 = self._sde_backward_setup(integ)
        terms = None  # the adjoint terms without a stage tape, built when a segment needs them
        times = torch.cat([integ.t0[:, None], ts], dim=1)
        cot = torch.cat([torch.zeros_like(grad_ys[:, :1]), grad_ys], dim=1)
        a = torch.zeros_like(ys[:, 0])
        y = ys[:, -1]
        zeros_i = torch.zeros(B, dtype=torch.int64, device=ys.device)
        stats = {k: zeros_i for k in ("num_fevals", "num_steps", "num_accepted", "num_rejected")}
        grads = [torch.zeros_like(p) for p in params]
        max_steps = self.max_steps or integ.max_steps
        segments = _backward_segments(cot)
        if segments:
            y = ys[:, segments[0][0] - 1]
        for j, jp in segments:
            a = a + cot[:, j]
            tj, tprev = times[:, j], times[:, jp]
            if bool((tj == tprev).all()):
                continue
            z0 = torch.cat([y.reshape(B, n), a.reshape(B, n)], dim=1)
            seg_ctrl = _segment_grid(ctrl, tj, tprev, z0.dtype)
            binteg, quadrature = None, None
            if params and type(seg_ctrl) in (ConstantStep, StepTo) and _stage_weights(solver) is not None:
                # the parameter terms from the solver's own stages, if the batch shares one grid (one h per step)
                stage = _StageQuadrature(solver, grads)
                binteg = self._sde_segment(_make_adjoint_terms(sde, args, shape, B, n, stage.tape, params), solver,
                                           tj, tprev, z0, dt0, seg_ctrl, max_steps, True)
                if binteg.fast_sde and _fast_sde.plan(binteg) is not None:
                    quadrature = stage
                else:
                    binteg = None
            if binteg is None:
                terms = terms or _make_adjoint_terms(sde, args, shape, B, n)
                binteg = self._sde_segment(terms, solver, tj, tprev, z0, dt0, seg_ctrl, max_steps, bool(params))
                quadrature = _SDEQuadrature(sde, args, params, grads, n, shape) if params else None
            zT = self._segment(binteg, quadrature, stats, "backward SDE solve",
                               "raise max_steps or change the controller")
            if quadrature is not None:
                quadrature.finish(tprev, zT)
            y = zT[:, :n].reshape(y.shape)
            a = zT[:, n:].reshape(a.shape)
        self.backward_stats = stats
        return a + cot[:, 0], grads

    @staticmethod
    def _sde_segment(terms, solver, t0, t1, z0, dt0, ctrl, max_steps: int, records: bool):
        """The integrator of one backward SDE segment; with ``records``, its steps are recorded for the
        parameter quadrature (no dense Solution is built, so the fixed-grid loop can run it)."""
        from torchmech.de import _fast_sde
        from torchmech.de.integrate import SaveAt, _Integrator

        binteg = _Integrator(terms, solver, t0, t1, z0, dt0, None, SaveAt(t1=True, dense=records), ctrl, None,
                             max_steps, False)
        if records:
            binteg.records_only = True
            binteg.fast_sde = not binteg.fast and _fast_sde.unsupported(binteg) is None
        return binteg

    _CHUNK = 4  # backward steps between parameter quadratures

    def _segment(self, binteg, quadrature, stats: dict, what: str, advice: str) -> torch.Tensor:
        """Run one backward segment to its end; returns its final state (B, ...).

        ``quadrature(records)`` (if given) runs every few steps on those steps' dense output, so
        memory does not grow with the number of backward steps; ``stats`` accumulates the
        segment's statistics; a failed sample raises, naming the samples and their statuses.
        """
        from torchmech.de.integrate import Status

        state = binteg.init_state()
        done = False
        while not done:
            state, records, done = binteg.run_steps(state, self._CHUNK)
            if quadrature is not None and records:
                quadrature(records)
        sol = binteg.finalize(state, [])
        if not bool((sol.status == Status.SUCCESS).all()):
            bad = torch.nonzero(sol.status != Status.SUCCESS)[:, 0].tolist()
            raise RuntimeError(f"BacksolveAdjoint: {what} failed for samples {bad} "
                               f"(statuses {sol.status[bad].tolist()}); {advice}")
        for key in stats:
            stats[key] = stats[key] + sol.stats[key]
        return sol.ys[:, -1]

    @staticmethod
    def _quadrature(f, args, params, grads, records, n, shape):
        """grads += sum over the recorded accepted backward steps of int a^T df/dtheta dt (Gauss-Legendre)."""
        for rec in records:
            valid = rec["valid"]
            if not bool(valid.any()):
                continue
            B = valid.shape[0]
            h = torch.where(valid, rec["h"], torch.zeros_like(rec["h"]))
            y0 = rec["y0"]
            qs = list(rec["qs"])
            tprev = rec["tprev"]
            total = 0.0
            with torch.enable_grad():
                for node, w in zip(_GL_NODES, _GL_WEIGHTS):
                    z = y0
                    p = node
                    for q in qs:
                        z = z + p * q
                        p = p * node
                    z = z.to(y0.dtype)  # the qs may be kept in float64 (solvers.rk.interp_dtype)
                    y = z[:, :n].reshape((B,) + tuple(shape)).detach()
                    a = z[:, n:].reshape((B,) + tuple(shape)).detach()
                    t = tprev + node * h
                    fy = f(t, y, args)
                    # integrating backwards: h < 0, and dL/dtheta = -int_{t1}^{t0} a f_theta dt
                    wt = (-w * h).reshape((B,) + (1,) * len(shape))
                    total = total + (fy * a * wt).sum()
                gs = _grad(total, params)
            for i, g in enumerate(gs):
                if g is not None:
                    grads[i] += g


class _SDEQuadrature:
    """The parameter gradient of one backward SDE segment, fed its accepted steps in order.

    ``grads -= sum over points p of a_p^T (df/dtheta w_p + d(g dW_p)/dtheta)`` where, by the
    trapezoidal rule (a consistent Stratonovich quadrature), a point's weights are the halves of
    the steps meeting there: ``w_p = (h_in + h_out) / 2``, ``dW_p = (dW_in + dW_out) / 2``. So each
    point is evaluated once, not once per step end. Call it with each chunk of records (each
    record's start point is weighted with the step it starts and the sample's previous accepted
    step), then ``finish`` with the segment's end point.
    """

    def __init__(self, sde: dict, args, params: list, grads: list, n: int, shape):
        self.drift, self.diff, self.ito = sde["drift"], sde["diff"], sde["ito"]
        self.args, self.params, self.grads, self.n, self.shape = args, params, grads, n, tuple(shape)
        self.h_in = self.dw_in = None  # per sample: the last accepted step's h and dW (zero at the start)

    def __call__(self, records: list) -> None:
        for rec in records:
            valid = rec["valid"]
            if not bool(valid.any()):
                continue
            t0 = rec["tprev"]
            t1 = torch.where(valid, rec["tnext"], t0)
            h = t1 - t0
            dW = self.diff.contr(t0, t1)
            if self.h_in is None:
                self.h_in, self.dw_in = torch.zeros_like(h), torch.zeros_like(dW)
            vb = bcast(valid, dW)
            zero = torch.zeros_like(dW)
            self._point(t0, rec["y0"], torch.where(valid, 0.5 * (self.h_in + h), torch.zeros_like(h)),
                        torch.where(vb, 0.5 * (self.dw_in + dW), zero))
            self.h_in = torch.where(valid, h, self.h_in)
            self.dw_in = torch.where(vb, dW, self.dw_in)

    def finish(self, t: torch.Tensor, z: torch.Tensor) -> None:
        """The segment's end point (t (B,), z (B, 2n...)): the second half of each sample's last step."""
        if self.h_in is not None:
            self._point(t, z, 0.5 * self.h_in, 0.5 * self.dw_in)

    def _point(self, t, z, wh, wdw) -> None:
        shp = (z.shape[0],) + self.shape
        with torch.enable_grad():
            y = z[:, :self.n].reshape(shp).detach().requires_grad_(self.ito)
            a = z[:, self.n:2 * self.n].reshape(shp).detach()
            inc = self.drift.prod(_strat_drift(self.drift, self.diff, self.ito, t, y, self.args), wh)
            inc = inc + self.diff.prod(self.diff.vf(t, y, self.args), wdw)
            gs = _grad(-(inc * a).sum(), self.params)
        for i, g in enumerate(gs):
            if g is not None:
                self.grads[i] += g


def _stage_weights(solver) -> tuple | None:
    """(weight of the drift at the step's start, weights of the step's inner evaluations in call order) with
    which a fixed-step Stratonovich solver combines its stages, or None for the other solvers. Drift weights
    multiply h, diffusion ones the increment the stage already formed with the step's dW. Inner evaluations
    follow the start drift (carried from the previous step's end, or the segment's initial evaluation) and
    precede the end drift: midpoint g(t0), f(mid), g(mid); Heun g(t0), f(pred), g(pred); Euler-Heun g(t0),
    g(pred)."""
    from torchmech.de.solvers import sde as S

    if getattr(solver, "error_order", None) is not None:
        return None
    return {S.StochasticMidpoint: (0.0, (("g", 0.0), ("f", 1.0), ("g", 1.0))),
            S.StochasticHeun: (0.5, (("g", 0.5), ("f", 0.5), ("g", 0.5))),
            S.EulerHeun: (1.0, (("g", 0.5), ("g", 0.5)))}.get(type(solver))


class _StageQuadrature:
    """The parameter gradient of one backward SDE segment from the solver's own stages (as torchsde).

    On a grid the whole batch shares, every backward step has one ``h`` and the solver combines its stage
    evaluations with fixed weights, so the parameter adjoint's increment over the step is
    ``-sum_i w_i vjp_theta(stage_i; a_i)`` with the batch-summed vjps the stages took in their own backward
    passes (recorded on ``tape`` by :func:`_make_adjoint_terms`). No extra evaluation of drift or diffusion,
    where :class:`_SDEQuadrature` evaluates every grid point once more. Fed the step records in order.
    """

    def __init__(self, solver, grads: list):
        self.w_start, self.inner = _stage_weights(solver)
        self.grads = grads
        self.tape: list = []  # the evaluations not yet combined (consumed ones are dropped)
        self.start = None  # the drift at the current step's start
        self.broken = None

    def __call__(self, records: list) -> None:
        if self.broken is not None:
            return
        if self.start is None:
            # the loop's start: the drift at the segment's first point, then init_state's increment check (a
            # diffusion product over a zero-length interval)
            if [k for k, _ in self.tape[:2]] != ["f", "g"]:
                self.broken = f"{[k for k, _ in self.tape[:2]]} at the start instead of ['f', 'g']"
                return
            self.start = self.tape[0]
            del self.tape[:2]
        n = len(self.inner) + 1
        expected = [k for k, _ in self.inner] + ["f"]
        for rec in records:
            h = float((rec["tnext"] - rec["tprev"]).reshape(-1)[0])  # shared by the batch on this grid
            events = self.tape[:n]  # the step's inner evaluations, then the drift at its end
            if [k for k, _ in events] != expected:  # (a fixed-grid run that fell back to the generic loop)
                self.broken = f"{[k for k, _ in events]} instead of {expected}"
                return
            self._add(self.start[1], self.w_start * h)
            for (kind, w), (_, pv) in zip(self.inner, events[:-1]):
                self._add(pv, w * h if kind == "f" else w)
            self.start = events[-1]
            del self.tape[:n]

    def _add(self, pv: list, w: float) -> None:
        if w == 0.0:
            return
        for i, g in enumerate(pv):
            if g is not None:
                self.grads[i] -= w * g

    def finish(self, t, z) -> None:
        if self.broken is not None:
            raise RuntimeError(f"BacksolveAdjoint: the backward stages were recorded as {self.broken} (internal "
                               "error)")
        self.tape.clear()
        self.start = None


def _adaptive_sde_solvers() -> tuple:
    """SDE solver classes that take ``adaptive=True``."""
    from torchmech.de.solvers import sde as S

    return tuple(getattr(S, name) for name in ("StochasticHeun", "EulerHeun", "StochasticMidpoint") if hasattr(S, name))


def _sde_parts(integ) -> dict:
    """(drift, diffusion, ito) of an SDE solve that BacksolveAdjoint supports, or a ValueError saying why not."""
    from torchmech.de.solvers.sde import AbstractSDESolver

    terms = integ.terms
    if not (isinstance(terms, MultiTerm) and len(terms.terms) == 2 and isinstance(terms.terms[0], ODETerm)
            and isinstance(terms.terms[1], ControlTerm)):
        got = type(terms).__name__
        if isinstance(terms, MultiTerm):
            got += "(" + ", ".join(type(t).__name__ for t in terms.terms) + ")"
        raise ValueError("BacksolveAdjoint: terms must be an ODETerm (ODE) or MultiTerm(ODETerm(drift), "
                         f"ControlTerm/DiagonalControlTerm(diffusion, brownian)) (SDE), got {got}")
    if not isinstance(integ.solver, AbstractSDESolver):
        raise ValueError("BacksolveAdjoint: drift + ControlTerm terms are supported with an SDE solver "
                         f"(AbstractSDESolver), got {type(integ.solver).__name__}")
    drift, diff = terms.terms
    ito = integ.solver.sde_type == "ito"
    return {"drift": drift, "diff": diff, "ito": ito}


def _strat_drift(drift, diff, ito: bool, t, y, args):
    """Stratonovich drift ``f`` (Ito: ``f - 1/2 sum_k (dg_k/dy) g_k`` over the noise channels ``k``; for diagonal
    noise ``f - 1/2 g dg/dy`` elementwise), with a graph (``y`` needs grad)."""
    fy = drift.vf(t, y, args)
    if not ito:
        return fy
    g = diff.vf(t, y, args)
    if isinstance(diff, DiagonalControlTerm):
        (gdg,) = _grad(g, y, grad_outputs=g, create_graph=True)
        return fy if gdg is None else fy - 0.5 * gdg
    # general noise g (B, *state, m): per channel the Jacobian-vector product (dg_k/dy) g_k; a diffusion that does
    # not depend on y (additive noise) costs one vjp per channel
    from torchmech.de.solvers.sde import column_jvp

    corr = None
    for k in range(g.shape[-1]):
        jv = column_jvp(g, y, k, create=True)
        if jv is not None:
            corr = jv if corr is None else corr + jv
    return fy if corr is None else fy - 0.5 * corr


class _AdjointDiffusion(ControlTerm):
    """Diffusion of the adjoint SDE of ``z = [y, a]`` (flattened, (B, 2n)): ``[g dW, -(d(g dW)/dy)^T a]``.

    ``vf`` defers the work to ``prod`` (it returns ``(t, z)``): the adjoint part is a
    vector-Jacobian product with the increment ``g dW`` itself, one diffusion evaluation per product.
    """

    def __init__(self, diff: ControlTerm, args, shape, B: int, n: int, tape: list | None = None,
                 params: list | None = None):
        self.diff, self.f, self.control = diff, diff.f, diff.control
        self.args, self.shp, self.B, self.n = args, (B,) + tuple(shape), B, n
        self.tape, self.params = tape, list(params or [])

    def vf(self, t, z, args):
        return (t, z)

    def contr(self, t0, t1):
        return self.diff.contr(t0, t1)

    @property
    def plain_control(self) -> bool:
        """Whether ``contr`` is the increment of ``control`` (the fixed-grid SDE loop then queries it directly)."""
        return type(self.diff) in (ControlTerm, DiagonalControlTerm)

    def prod(self, vf, control):
        t, z = vf
        n, B = self.n, self.B
        y = z[:, :n].reshape(self.shp)
        a = z[:, n:].reshape(self.shp)
        with torch.enable_grad():
            y_ = y.detach().requires_grad_(True)
            inc = self.diff.prod(self.diff.vf(t, y_, self.args), control)
            vjp, *pv = _grad(inc, [y_] + self.params, grad_outputs=a)
        if self.tape is not None:
            self.tape.append(("g", pv))
        if vjp is None:
            vjp = torch.zeros_like(a)
        return torch.cat([inc.detach().reshape(B, n), -vjp.reshape(B, n)], dim=1)

    def modules(self):
        return []


def _make_adjoint_terms(sde: dict, args, shape, B: int, n: int, tape: list | None = None,
                        params: list | None = None) -> MultiTerm:
    """MultiTerm(drift, diffusion) of the Stratonovich adjoint SDE of ``[y, a]``.

    With a ``tape``, every evaluation also takes the vector-Jacobian product with respect to ``params`` in
    the same backward pass and appends ``("f", vjps)`` (drift) or ``("g", vjps)`` (diffusion increment) to it,
    for :class:`_StageQuadrature`.
    """
    drift, diff, ito = sde["drift"], sde["diff"], sde["ito"]
    shp = (B,) + tuple(shape)
    params = list(params or [])

    def aug_drift(t, z, _):
        y = z[:, :n].reshape(shp)
        a = z[:, n:].reshape(shp)
        with torch.enable_grad():
            y_ = y.detach().requires_grad_(True)
            fy = _strat_drift(drift, diff, ito, t, y_, args)
            vjp, *pv = _grad(fy, [y_] + (params if tape is not None else []), grad_outputs=a)
        if tape is not None:
            tape.append(("f", pv))
        if vjp is None:
            vjp = torch.zeros_like(a)
        return torch.cat([fy.detach().reshape(B, n), -vjp.reshape(B, n)], dim=1)

    return MultiTerm(ODETerm(aug_drift), _AdjointDiffusion(diff, args, shape, B, n, tape, params if tape is not None
                                                           else None))


class _MarksTo(AbstractController):
    """Fixed steps onto given times ((K,) or (B, K), e.g. the forward StepTo grid), clipped to ``t1``."""

    def __init__(self, marks: torch.Tensor):
        self.marks = marks

    def init(self, solver, t0, t1, y0, dt0, deriv0, deriv_fn):
        m = self.marks.to(dtype=y0.dtype, device=y0.device)
        state = {"marks": m}
        t_next, _ = self.propose(t0, None, t1, torch.sign(t1 - t0), state)
        return t_next - t0, state, 0

    def propose(self, t, dt, t1, direction, state):
        dist, mark = _next_mark(state["marks"], t, direction)
        t_next = torch.where(dist < direction * (t1 - t), mark, t1)
        return t_next, torch.zeros_like(t_next, dtype=torch.bool)

    def adapt(self, t, t_next, dt, y0, y1, err, state, error_order):
        ones = torch.ones(t.shape, dtype=torch.bool, device=t.device)
        return ones, t_next - t, torch.zeros_like(ones), state


def _segment_grid(ctrl: AbstractController, t0: torch.Tensor, t1: torch.Tensor, dtype) -> AbstractController:
    """``ctrl`` for one backward segment from ``t0`` to ``t1``; a ``_MarksTo`` over one grid shared by
    all samples becomes the ``StepTo`` over the same steps (which the fixed-grid SDE loop runs)."""
    from torchmech.de.controllers import StepTo

    if not isinstance(ctrl, _MarksTo) or ctrl.marks.dim() != 1:
        return ctrl
    a, b = t0.reshape(-1)[0], t1.reshape(-1)[0]
    if not (bool((t0 == a).all()) and bool((t1 == b).all())):
        return ctrl
    m = ctrl.marks.to(dtype=dtype, device=t0.device)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    inner = m[(m > lo) & (m < hi)].sort(descending=bool(b < a)).values
    return StepTo(torch.cat([a.reshape(1).to(dtype), inner, b.reshape(1).to(dtype)]))


def _backward_segments(cot: torch.Tensor) -> list[tuple[int, int]]:
    """The backward solve's segments as (from, to) indices into the times ``[t0, ts...]``, last first.

    Only save times with a nonzero cotangent (for some sample) start or end a segment: at the others the
    adjoint does not jump, so one solve runs through them (a loss on a few of many saved points, or the
    grid points a fixed-grid interpolation does not use). The first segment starts at the last such time,
    from its saved state. Empty when every cotangent is zero.
    """
    nz = (cot != 0).reshape(cot.shape[0], cot.shape[1], -1).any(-1).any(0).tolist()
    idx = [0] + [j for j in range(1, len(nz)) if nz[j]]
    return [(idx[i], idx[i - 1]) for i in range(len(idx) - 1, 0, -1)]


def _detached_args(args, params: list) -> tuple:
    """``args`` with every tensor that requires grad replaced by a detached leaf, and ``params`` with the same
    replacements (same positions, so the gradients map back).

    The backward pass differentiates the vector field with respect to ``params``; an args tensor computed from
    other parameters (an encoder's output, say) must end its graph there. Otherwise a module parameter upstream
    of it would be reached twice (once directly, once through the tensor's own gradient), and that upstream
    graph would be freed by the first of the many quadrature calls.
    """
    swap: dict = {}

    def go(x):
        if isinstance(x, torch.Tensor):
            if not x.requires_grad:
                return x
            if id(x) not in swap:
                swap[id(x)] = x.detach().requires_grad_(True)
            return swap[id(x)]
        if isinstance(x, tuple) and hasattr(x, "_fields"):  # a namedtuple takes its fields as arguments
            return type(x)(*(go(v) for v in x))
        if isinstance(x, (tuple, list)):
            return type(x)(go(v) for v in x)
        if isinstance(x, dict):
            return {k: go(v) for k, v in x.items()}
        return x

    args_d = go(args)
    return args_d, [swap.get(id(p), p) for p in params]


def _closure_tensors(f) -> list[tuple[str, torch.Tensor]]:
    """Tensors requiring grad that a plain-function vector field reaches by name (its closure and the
    globals it names; module parameters included), one level deep."""
    import inspect

    code_owner = getattr(f, "__func__", f)
    if not inspect.isfunction(code_owner):
        return []
    try:
        cv = inspect.getclosurevars(code_owner)
    except (TypeError, ValueError):
        return []
    found = []
    for name, v in {**cv.globals, **cv.nonlocals}.items():
        if isinstance(v, torch.nn.Module):
            found += [(f"{name}.{pn}", p) for pn, p in v.named_parameters() if p.requires_grad]
        elif isinstance(v, torch.Tensor) and v.requires_grad:
            found.append((name, v))
    return found


def collect_params(integ, adjoint_params, owner: str) -> list:
    """The tensors a continuous adjoint differentiates: ``adjoint_params``, else the parameters of the
    terms' ``nn.Module`` vector fields (or of the modules whose bound methods they are); plus every
    tensor in ``args`` that requires grad. Each tensor once.

    Uncollected tensors would silently get no gradient: a plain function that names one (closure, globals)
    raises with its name, and ``_check_graph`` walks one evaluation of every field to find the rest.
    """
    from torchmech.de._tree import tree_leaves

    if adjoint_params is not None:
        params = [p for p in adjoint_params if isinstance(p, torch.Tensor)]
    else:
        params = [p for m in integ.terms.modules() for p in m.parameters() if p.requires_grad]
    uniq: dict = {}
    for p in params:  # drift and diffusion may share a module: count each tensor once
        uniq.setdefault(id(p), p)
    params = list(uniq.values())
    seen = set(uniq)
    for leaf in tree_leaves(integ.args):
        # tensors inside other objects (a dataclass, a plain object) are not searched: they would get no gradient
        inner = vars(leaf) if hasattr(leaf, "__dict__") and not isinstance(leaf, (torch.Tensor, torch.nn.Module)) else {}
        hidden = [k for k, v in inner.items() if isinstance(v, torch.Tensor) and v.requires_grad]
        if hidden and torch.is_grad_enabled() and adjoint_params is None:
            raise ValueError(
                f"{owner}: args holds a {type(leaf).__name__} whose tensors {hidden[:4]} require grad; a continuous "
                "adjoint finds tensors in args only as tensors or in tuples, lists, namedtuples and dicts, so these "
                "would get no gradient: pass them in one of those (e.g. a dict)")
        if isinstance(leaf, torch.Tensor) and leaf.requires_grad and id(leaf) not in seen:
            params.append(leaf)
            seen.add(id(leaf))
    if adjoint_params is None and torch.is_grad_enabled():
        from torchmech.de.terms import _module_of

        for f in integ.terms.fields():
            if _module_of(f) is None:
                check_closure(f, owner, seen, "pass them through args, ")
        _check_graph(integ, params, owner)
    return params


def _hidden_leaves(f, t, y, args, seen: set, stops: set) -> list:
    """(shape, description) of the persistent leaf tensors requiring grad that ``f(t, y, args)`` depends on,
    other than ``y`` and those in ``seen``; the walk does not pass the nodes in ``stops``."""
    import weakref

    from torchmech.de._tree import tree_leaves

    with torch.enable_grad():
        out = f(t, y, args)
    nodes = [o.grad_fn for o in tree_leaves(out) if isinstance(o, torch.Tensor) and o.grad_fn is not None]
    del out
    visited: set = set()
    refs = []
    node = None
    while nodes:
        node = nodes.pop()
        if node is None or node in visited or node in stops:
            continue
        visited.add(node)
        var = getattr(node, "variable", None)  # AccumulateGrad: a leaf that requires grad
        if var is not None:
            if var is not y and id(var) not in seen:
                refs.append((weakref.ref(var), tuple(var.shape)))
            del var
            continue
        nodes.extend(nxt for nxt, _ in node.next_functions)
    del visited, node
    # leaves the call made for itself (an inner optimisation's variables, y.detach().requires_grad_()) die with
    # its graph; those that live on are held by the field (closure, default argument, attribute, container)
    return [shape for ref, shape in refs if ref() is not None]


def _check_graph(integ, params: list, owner: str) -> None:
    """Raise if a vector field's output depends on a trainable tensor that is not collected.

    The name-based search of ``check_closure`` misses tensors reached through default arguments, containers,
    callable objects, ``functools.partial`` or attributes, and a module's forward can use trainable tensors that
    are not its parameters (a global, a plain attribute, a network in a list). One evaluation of each field at
    ``(t0, y0)`` with a graph, walked back to its leaves, finds them. (The state and the args enter as fresh
    leaves, so their own graphs are not searched; the RNG state is restored afterwards, and the fields' modules
    run in eval mode for it, so BatchNorm statistics do not move.)
    """
    from torchmech.de._tree import tree_leaves

    fields = integ.terms.fields()
    if not fields:
        return
    seen = {id(p) for p in params}
    # a collected tensor that is not a leaf (e.g. interpolation coefficients computed from data): the walk
    # stops at its node, gradients reach what it was computed from through it
    stops = {p.grad_fn for p in params if p.grad_fn is not None}
    y = integ.y0.detach().requires_grad_(True)
    args = _detached_args(integ.args, [])[0]
    seen |= {id(a) for a in tree_leaves(args) if isinstance(a, torch.Tensor)}
    devices = [y.device] if y.device.type == "cuda" else []
    modes = [(m, m.training) for top in integ.terms.modules() for m in top.modules()]
    try:
        for m, _ in modes:
            m.training = False
        for f in fields:
            with torch.random.fork_rng(devices=devices):  # a field drawing random numbers leaves the RNG as it was
                hidden = _hidden_leaves(f, integ.t0.detach(), y, args, seen, stops)
            _raise_hidden(owner, f, hidden)
    finally:
        for m, mode in modes:
            m.training = mode


def _raise_hidden(owner: str, f, hidden: list) -> None:
    """Raise for the shapes in ``hidden`` of trainable tensors ``f`` depends on that get no gradient."""
    if hidden:
        shapes = ", ".join(f"shape {s}" for s in hidden[:4]) + (", ..." if len(hidden) > 4 else "")
        raise ValueError(
            f"{owner}: the vector field {getattr(f, '__qualname__', f)!r} depends on {len(hidden)} tensor(s) that "
            f"require grad ({shapes}) and are not among the parameters it differentiates (nn.Module "
            "parameters of the fields, and tensors in args given as tensors or tuples/lists/dicts of them), "
            "so they would get no gradient; pass them as adjoint_params=[...] (with the others), pass them "
            "through args, or make them parameters of the vector field's nn.Module")


def check_closure(f, owner: str, seen=frozenset(), also: str = "", what: str = "the vector field") -> None:
    """Raise if the plain function ``f`` names (closure, globals) tensors that require grad, other than those
    with ids in ``seen``: a continuous adjoint cannot find them, so they would get no gradient. ``also``: more
    ways out for the message (ending in ", "); ``what``: how the message names ``f``."""
    hidden = [name for name, p in _closure_tensors(f) if id(p) not in seen]
    if hidden:
        raise ValueError(
            f"{owner}: {what} {getattr(f, '__qualname__', f)!r} uses tensors that require grad "
            f"({', '.join(hidden[:4])}{', ...' if len(hidden) > 4 else ''}) which a continuous adjoint "
            f"cannot find in a plain function, so they would get no gradient; pass them as "
            f"adjoint_params=[...], {also}or make {what} an nn.Module")


class _BacksolveFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, adj, integ, holder, y0, *params):
        with torch.no_grad():
            sol = DirectAdjoint().run(integ)
        holder["sol"] = sol
        ctx.adj, ctx.integ, ctx.sde, ctx.n_times = adj, integ, holder["sde"], holder["n_times"]
        y_final = sol.y_final.clone()  # its own tensor (it may be a view of ys, another output)
        ctx.save_for_backward(sol.ts, sol.ys, sol.status, sol.t_final, y_final, *params)
        return sol.ys, y_final

    @staticmethod
    def backward(ctx, grad_ys, grad_y_final):
        ts, ys, status, t_final, y_final, *params = ctx.saved_tensors  # (unpacked once: checkpoint hooks allow one)
        inputs = list(params)
        if ctx.n_times:  # the times ride along as the last inputs; only their gradients are returned for them
            params = params[:len(params) - ctx.n_times]
        grad_ys = torch.nan_to_num(grad_ys) if grad_ys is not None else torch.zeros_like(ys)
        n_saved = ys.shape[1]
        if grad_y_final is not None and not ctx.integ.saveat.t1:
            # the final state is one more save time (t_final, after every save time) with its own cotangent
            ts = torch.cat([ts, t_final[:, None]], dim=1)
            ys = torch.cat([ys, y_final.unsqueeze(1)], dim=1)
            grad_ys = torch.cat([grad_ys, torch.nan_to_num(grad_y_final).unsqueeze(1)], dim=1)
        from torchmech.de.integrate import Status

        failed = status != Status.SUCCESS
        if bool(failed.any()):
            # A sample that stopped early (throw=False) has no end state to solve back from: it gets no
            # gradient, and its backward solve has zero length (all its times at t0, a finite state).
            keep = (~failed).reshape((-1,) + (1,) * (ys.dim() - 1))
            grad_ys = grad_ys * keep
            ys = torch.where(keep, ys, ctx.integ.y0.unsqueeze(1))
            ts = torch.where(failed[:, None], ctx.integ.t0[:, None], ts)
        with torch.no_grad():
            if ctx.sde is not None:
                a0, grads = ctx.adj.backward_sde(ctx.integ, ctx.sde, params, ts, ys, grad_ys)
            else:
                a0, grads = ctx.adj.backward(ctx.integ, params, ts, ys, grad_ys)
            tgrads = _time_grads(ctx.integ, ts, ys, grad_ys, a0, n_saved) if ctx.n_times else ()
        out = first_order_only((a0, *grads, *tgrads), (grad_ys, grad_y_final, *inputs),
                               "BacksolveAdjoint: second derivatives are not supported (its backward is an adjoint "
                               "solve without a graph); use DirectAdjoint or CheckpointAdjoint")
        return (None, None, None, *out)


def _time_grads(integ, ts, ys, grad_ys, a0, n_saved) -> tuple:
    """dL/dt0, dL/dt1, dL/dts of an ODE solve from the adjoint identities, for _BacksolveFn.

    A save at time tau contributes <dL/dy(tau), f(tau, y(tau))>; t0 gets -<a(t0), f(t0, y0)> with a(t0) the
    adjoint the solve carries back (a0 less the cotangent of a save at t0, whose value y0 does not move with t0).
    ``ts``/``ys``/``grad_ys`` are the saves (B, T', ...), extended by the final state when it was not saved at t1;
    failed samples arrive with zero cotangents.
    """
    sv = integ.saveat
    f, args = integ.terms.f, integ.args
    B = ys.shape[0]

    def pair(j):  # <grad_ys[:, j], f(ts[:, j], ys[:, j])> per sample
        return (grad_ys[:, j] * f(ts[:, j], ys[:, j], args)).reshape(B, -1).sum(dim=1)

    g_t1 = torch.zeros_like(integ.t1)
    cols = list(range(ts.shape[1]))
    first = 1 if sv.t0 else 0
    n_ts = integ.ts.shape[1] if integ.ts is not None else 0
    g_ts = torch.stack([pair(j) for j in cols[first:first + n_ts]], dim=1) if n_ts else None
    for j in cols[first + n_ts:]:  # the save at t1, or the final state (same time, t_final = t1 on success)
        g_t1 = g_t1 + pair(j)
    a = a0 - grad_ys[:, 0] if sv.t0 else a0
    g_t0 = -(a * f(integ.t0, integ.y0.detach(), args)).reshape(B, -1).sum(dim=1)
    out = [g_t0, g_t1]
    if integ.ts is not None:
        out.append(g_ts)
    return tuple(out)
