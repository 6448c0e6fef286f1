"""Gradient strategies for solve(): direct autograd, checkpointed recomputation, continuous adjoint."""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["AbstractAdjoint", "DirectAdjoint", "CheckpointAdjoint", "BacksolveAdjoint"]


class AbstractAdjoint:
    """How gradients flow through :func:`torchmech.de.solve`. ``run(integrator)`` returns a Solution."""

    def run(self, integ):
        raise NotImplementedError


class DirectAdjoint(AbstractAdjoint):
    """Plain autograd through every operation of the stepping loop.

    Exact gradients of the discrete solution (step sizes are treated as constants); memory grows
    with the number of steps; higher-order gradients work.
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
            every ``nn.Module`` vector field in ``terms``. Tensors in ``args`` that require grad
            are always included.
        max_steps: step limit of the backward solve (default: the forward ``max_steps``).

    After a backward pass, ``backward_stats`` holds the backward solves' per-sample statistics
    (summed over the segments between save times).

    Supports ``ODETerm`` and ``SaveAt(t0, ts, t1)``; not dense/steps saving, events or
    higher-order gradients (use :class:`DirectAdjoint` or :class:`CheckpointAdjoint`).
    Gradients with respect to ``t0``/``t1`` are not computed.
    """

    def __init__(self, rtol: float = 1e-6, atol: float = 1e-8, solver=None, seminorm: bool = True,
                 adjoint_params=None, max_steps: int | None = None):
        if not (rtol > 0 and atol >= 0):
            raise ValueError(f"BacksolveAdjoint: need rtol > 0 and atol >= 0, got rtol={rtol}, atol={atol}")
        self.rtol, self.atol, self.solver, self.seminorm = rtol, atol, solver, seminorm
        self.adjoint_params = None if adjoint_params is None else list(adjoint_params)
        self.max_steps = max_steps

    def run(self, integ):
        from torchmech.de._tree import tree_leaves
        from torchmech.de.terms import ODETerm

        if not isinstance(integ.terms, ODETerm):
            raise ValueError(f"BacksolveAdjoint: only ODETerm is supported, got {type(integ.terms).__name__}")
        if integ.event is not None:
            raise ValueError("BacksolveAdjoint: events are not supported; use DirectAdjoint or CheckpointAdjoint")
        if integ.saveat.dense or integ.saveat.steps:
            raise ValueError("BacksolveAdjoint: SaveAt(dense=True) and SaveAt(steps=True) are not supported")
        if self.adjoint_params is not None:
            params = [p for p in self.adjoint_params if isinstance(p, torch.Tensor)]
        else:
            params = [p for m in integ.terms.modules() for p in m.parameters() if p.requires_grad]
        seen = {id(p) for p in params}
        for leaf in tree_leaves(integ.args):
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad and id(leaf) not in seen:
                params.append(leaf)
                seen.add(id(leaf))
        holder = {}
        ys = _BacksolveFn.apply(self, integ, holder, integ.y0, *params)
        sol = holder["sol"]
        sol.ys = ys
        sol.y_final = sol.y_final.detach()
        if integ.saveat.t1:
            sol.y_final = ys[:, -1]
        return sol

    # backward pass -----------------------------------------------------------------------------
    def backward(self, integ, params, ts, ys, grad_ys):
        from torchmech.de.controllers import PIDController
        from torchmech.de.integrate import SaveAt, Status, _Integrator
        from torchmech.de.terms import ODETerm

        f = integ.terms.f
        args = integ.args
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
                (vjp,) = torch.autograd.grad(fy, y_, grad_outputs=a, allow_unused=True, retain_graph=augment)
                if augment:
                    # per-sample a^T df/dtheta: one batched vjp with one-hot-in-batch cotangents
                    eye = torch.eye(B, dtype=a.dtype, device=a.device).reshape((B, B) + (1,) * len(shape))
                    pg = torch.autograd.grad(fy, params, grad_outputs=eye * a.unsqueeze(0),
                                             is_grads_batched=True, allow_unused=True)
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
        if not solver.adaptive:  # the backward solve is always adaptive
            from torchmech.de.solvers import Tsit5

            solver = Tsit5() if self.solver is None else solver
        max_steps = self.max_steps or integ.max_steps
        for j in range(times.shape[1] - 1, 0, -1):
            a = a + cot[:, j]
            pieces = [y.reshape(B, n), a.reshape(B, n)] + ([ap] if augment else [])
            z0 = torch.cat(pieces, dim=1)
            tj, tprev = times[:, j], times[:, j - 1]
            if bool((tj == tprev).all()):
                continue
            quad = bool(params) and not augment
            binteg = _Integrator(ODETerm(aug), solver, tj, tprev, z0, None, None, SaveAt(t1=True, dense=quad),
                                 PIDController(self.rtol, self.atol), None, max_steps, False)
            state = binteg.init_state()
            done = False
            while not done:
                # the parameter quadrature runs every few steps on those steps' dense output, so
                # memory does not grow with the number of backward steps
                state, records, done = binteg.run_steps(state, self._CHUNK)
                if quad and records:
                    self._quadrature(f, args, params, grads, records, n, shape)
            sol = binteg.finalize(state, [])
            if not bool((sol.status == Status.SUCCESS).all()):
                bad = torch.nonzero(sol.status != Status.SUCCESS)[:, 0].tolist()
                raise RuntimeError(f"BacksolveAdjoint: backward solve failed for samples {bad} "
                                   f"(statuses {sol.status[bad].tolist()}); loosen rtol/atol or raise max_steps")
            for key in stats:
                stats[key] = stats[key] + sol.stats[key]
            zT = sol.ys[:, -1]
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

    _CHUNK = 4  # backward steps between parameter quadratures

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
                    y = z[:, :n].reshape((B,) + tuple(shape)).detach()
                    a = z[:, n:].reshape((B,) + tuple(shape)).detach()
                    t = tprev + node * h
                    fy = f(t, y, args)
                    # integrating backwards: h < 0, and dL/dtheta = -int_{t1}^{t0} a f_theta dt
                    wt = (-w * h).reshape((B,) + (1,) * len(shape))
                    total = total + (fy * a * wt).sum()
                gs = torch.autograd.grad(total, params, allow_unused=True)
            for i, g in enumerate(gs):
                if g is not None:
                    grads[i] += g


class _BacksolveFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, adj, integ, holder, y0, *params):
        with torch.no_grad():
            sol = DirectAdjoint().run(integ)
        holder["sol"] = sol
        ctx.adj, ctx.integ, ctx.n_params = adj, integ, len(params)
        ctx.save_for_backward(sol.ts, sol.ys, *params)
        return sol.ys

    @staticmethod
    def backward(ctx, grad_ys):
        ts, ys, *params = ctx.saved_tensors
        grad_ys = torch.nan_to_num(grad_ys) if grad_ys is not None else torch.zeros_like(ys)
        with torch.no_grad():
            a0, grads = ctx.adj.backward(ctx.integ, params, ts, ys, grad_ys)
        return (None, None, None, a0, *grads)
