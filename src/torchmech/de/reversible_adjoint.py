"""ReversibleAdjoint: exact O(1)-memory gradients for the algebraically reversible Reversible Heun solver."""

from __future__ import annotations

import torch

from torchmech._autograd import first_order_only
from torchmech.de._tree import bcast, where
from torchmech.de.adjoint import AbstractAdjoint, collect_params
from torchmech.de.controllers import PIDController

__all__ = ["ReversibleAdjoint"]


class ReversibleAdjoint(AbstractAdjoint):
    """Gradients through :class:`~torchmech.de.solvers.sde.ReversibleHeun` by reversing its steps.

    The forward solve keeps no graph. The backward pass walks the steps from the last to the
    first, reconstructing each earlier state ``(y_n, y_hat_n)`` exactly (up to floating-point
    round-off) from the later one, and back-propagating through that single step. Gradients equal
    those of :class:`~torchmech.de.adjoint.DirectAdjoint` to round-off (Kidger et al., "Efficient
    and Accurate Gradients for Neural SDEs", 2021); memory does not grow with the number of steps
    (only the (B,) step times are kept). The Brownian motion is queried again over the same
    intervals, so it must return the same increments (``BrownianInterval`` caches them,
    ``VirtualBrownianTree`` regenerates them).

    Args:
        adjoint_params: tensors to differentiate with respect to. Default: the parameters of
            every ``nn.Module`` vector field in ``terms`` (or of the module of a bound method); tensors
            in ``args`` that require grad are always included. A vector field depending on other trainable
            tensors raises, as for :class:`~torchmech.de.BacksolveAdjoint`.

    Supports fixed steps (``ConstantStep``/``StepTo``), ``SaveAt(t0, ts, t1)``; not events,
    dense/steps saving or higher-order gradients.
    """

    def __init__(self, adjoint_params=None):
        self.adjoint_params = None if adjoint_params is None else list(adjoint_params)

    def run(self, integ):
        from torchmech.de.solvers.sde import ReversibleHeun

        if not isinstance(integ.solver, ReversibleHeun):
            raise ValueError(f"ReversibleAdjoint: the solver must be ReversibleHeun, got {type(integ.solver).__name__}")
        if integ.event is not None:
            raise ValueError("ReversibleAdjoint: events are not supported; use DirectAdjoint or CheckpointAdjoint")
        if integ.saveat.dense or integ.saveat.steps:
            raise ValueError("ReversibleAdjoint: SaveAt(dense=True) and SaveAt(steps=True) are not supported")
        if isinstance(integ.controller, PIDController) or integ.controller.adaptive:
            raise ValueError("ReversibleAdjoint: needs fixed steps (ConstantStep or StepTo), got "
                             f"{type(integ.controller).__name__}")
        params = collect_params(integ, self.adjoint_params, "ReversibleAdjoint")
        holder: dict = {}
        ys, y_final = _ReversibleFn.apply(integ, holder, integ.y0, *params)
        sol = holder["sol"]
        sol.ys = ys
        sol.y_final = ys[:, -1] if integ.saveat.t1 else y_final  # differentiable either way
        return sol


def _forward(integ):
    """Run the solve without a graph. Returns (solution, final state, steps) where ``steps`` is a
    list of ``(t_n, t_{n+1})`` (B,) tensors, or the shared-grid plan of the lean SDE loop."""
    state = integ.init_state()
    if getattr(integ, "fast_sde", False):
        from torchmech.de import _fast_sde

        out = _fast_sde.run(integ, state, None)
        if out is not None:
            return integ.finalize(out[0], []), out[0], _fast_sde.plan(integ)
    steps = []
    done = bool(state["done"].all())
    while not done:
        t_before = state["t"]
        state, rec = integ.step(state)
        steps.append((t_before, state["t"]))
        done = rec.pop("__done__")
    return integ.finalize(state, []), state, steps


class _Steps:
    """Uniform view of the forward steps for the backward pass: per step (from the last) the (B,)
    times, the active mask (None when every sample takes the step), the control, the terms to
    use, and the save-time interpolation data."""

    def __init__(self, integ, steps):
        self.integ = integ
        self.plan = None if isinstance(steps, list) else steps
        self.steps = steps

    def __len__(self):
        return len(self.plan.floats) - 1 if self.plan is not None else len(self.steps)

    def last_time(self):
        if self.plan is not None:
            return self.plan.times(len(self) - 1)[1]
        return self.steps[-1][1]

    def reversed(self):
        integ, P = self.integ, self.plan
        if P is not None:
            for k in range(len(self) - 1, -1, -1):
                tv, tn = P.times(k)
                control = P.control(integ, k, tv, tn)
                yield tv, tn, None, control, P.terms(integ, control), P.saves[k]
            return
        for t_prev, t_next in reversed(self.steps):
            active = t_next != t_prev
            if not bool(active.any()):
                continue
            if bool(active.all()):
                active = None
            yield t_prev, t_next, active, integ.terms.contr(t_prev, t_next), integ.terms, None


def _masked(active, new, old):
    return new if active is None else where(active, new, old)


class _ReversibleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, integ, holder, y0, *params):
        with torch.no_grad():
            sol, state, steps = _forward(integ)
        holder["sol"] = sol
        ctx.integ, ctx.steps = integ, steps
        vz, z = integ.solver.split_state(state["y"], state["vf"])
        ctx.final = (state["y"], z)
        ctx.save_for_backward(*params)
        return sol.ys, sol.y_final.clone()  # y_final: its own tensor (it may be a view of ys, another output)

    @staticmethod
    def backward(ctx, grad_ys, grad_y_final):
        """Reverse the steps, one vector-field evaluation (with its graph) and one vjp per step.

        The forward step from ``(y0, z0)`` with ``v0 = v(t0, z0)`` and control ``c`` is
        ``z1 = 2 y0 - z0 + P(v0, c)``, ``y1 = y0 + (P(v0, c) + P(v1, c)) / 2`` with
        ``v1 = v(t1, z1)`` (``P`` = ``terms.prod``, linear in ``v``). Walking backwards, the step
        is inverted (``z0 = 2 y1 - z1 - P(v1, c)``, then ``v0``, then ``y0``); ``v0`` is
        evaluated with its graph once, serving both the inversion and, one step later, the vjp
        that carries the cotangents of ``P(v0, .)`` back to ``z0`` and the parameters. With
        cotangents ``(a_y, a_z)`` on ``(y1, z1)``: ``a_z1 = a_z + dz1 <a_y / 2, P(v1, c)>``
        (plus the pending ``<alpha, P(v1, c_next)>`` from the later step), then
        ``a_y0 = a_y + 2 a_z1``, ``a_z0 = -a_z1`` and ``alpha = a_y / 2 + a_z1`` pending on
        ``P(v0, c)``.
        """
        integ = ctx.integ
        steps = _Steps(integ, ctx.steps)
        params = list(ctx.saved_tensors)
        args = integ.args
        grad_ys = torch.zeros_like(grad_ys) if grad_ys is None else torch.nan_to_num(grad_ys)
        # split the output cotangent into its SaveAt pieces
        col = 0
        g_t0 = g_ts = g_t1 = None
        if integ.saveat.t0:
            g_t0 = grad_ys[:, 0]
            col = 1
        if integ.ts is not None:
            T = integ.ts.shape[1]
            g_ts = grad_ys[:, col:col + T]
            col += T
        if integ.saveat.t1:
            g_t1 = grad_ys[:, col]
        y, z = ctx.final
        a_y = torch.zeros_like(y) if g_t1 is None else g_t1.clone()
        if grad_y_final is not None and not integ.saveat.t1:  # the final state is the last step's y
            a_y = a_y + torch.nan_to_num(grad_y_final)
        a_z = torch.zeros_like(y)
        grads = [torch.zeros_like(p) for p in params]
        d = integ.direction
        zl = None
        pending = None  # (P(v1, c_next) with its graph, its cotangent alpha)
        if len(steps):
            with torch.enable_grad():
                zl = z.detach().requires_grad_(True)
                v1 = integ.terms.vf(steps.last_time(), zl, args)

        def vjp(outputs, cotangents, z_leaf):
            keep = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
            if not keep:  # a vector field that depends on neither the state nor the parameters
                return None
            inputs = [z_leaf] + [p for p in params if p.requires_grad]
            got = torch.autograd.grad([o for o, _ in keep], inputs, grad_outputs=[c for _, c in keep],
                                      allow_unused=True)
            it = iter(got[1:])
            out = [got[0]] + [next(it) if p.requires_grad else None for p in params]
            for i, g in enumerate(out[1:]):
                if g is not None:
                    grads[i] += g
            return out[0]

        for t_prev, t_next, active, control, terms, saves in steps.reversed():
            extra0 = None
            if g_ts is not None:  # save times in (t_prev, t_next]: y = (1 - theta) y_prev + theta y_next
                if saves is not None:
                    for c, theta in saves:
                        a_y = a_y + theta * g_ts[:, c]
                        extra0 = (1 - theta) * g_ts[:, c] if extra0 is None else extra0 + (1 - theta) * g_ts[:, c]
                else:
                    ts = integ.ts
                    act = torch.ones_like(t_prev, dtype=torch.bool) if active is None else active
                    inside = act[:, None] & (d[:, None] * (ts - t_prev[:, None]) > 0) & \
                        (d[:, None] * (ts - t_next[:, None]) <= 0)
                    h = torch.where(act, t_next - t_prev, torch.ones_like(t_prev))
                    theta = torch.where(inside, (ts - t_prev[:, None]) / h[:, None], torch.zeros_like(ts))
                    w1 = torch.where(inside, theta, torch.zeros_like(theta))
                    w0 = torch.where(inside, 1 - theta, torch.zeros_like(theta))
                    a_y = a_y + (bcast(w1, g_ts) * g_ts).sum(1)
                    extra0 = (bcast(w0, g_ts) * g_ts).sum(1)
            # invert the step
            with torch.no_grad():
                k1 = terms.prod(_detach(v1), control)
                z_prev = _masked(active, 2 * y - z - k1, z)
            with torch.enable_grad():
                zl0 = z_prev.detach().requires_grad_(True)
                v0 = terms.vf(t_prev, zl0, args)
                kv1 = terms.prod(v1, control)
            with torch.no_grad():
                y_prev = _masked(active, y - 0.5 * (terms.prod(_detach(v0), control) + k1), y)
            # cotangents: the vjp through v1 = v(t_next, z)
            half = 0.5 * a_y
            outs, cots = [kv1], [half]
            if pending is not None:
                outs.append(pending[0])
                cots.append(pending[1])
            gz = vjp(outs, cots, zl)
            a_z1 = a_z if gz is None else a_z + gz
            if active is None:
                a_y_new, a_z_new, alpha = a_y + 2 * a_z1, -a_z1, half + a_z1
            else:
                a_y_new = where(active, a_y + 2 * a_z1, a_y)
                a_z_new = where(active, -a_z1, a_z1)
                alpha = where(active, half + a_z1, torch.zeros_like(a_z1))
            with torch.enable_grad():
                pending = (terms.prod(v0, control), alpha)
            a_y, a_z = a_y_new, a_z_new
            if extra0 is not None:
                a_y = a_y + extra0
            y, z, v1, zl = y_prev, z_prev, v0, zl0
        if pending is not None:  # v0 = v(t0, z0) and z0 = y0
            gz = vjp([pending[0]], [pending[1]], zl)
            if gz is not None:
                a_z = a_z + gz
        a0 = a_y + a_z  # y_hat_0 = y_0
        if g_t0 is not None:
            a0 = a0 + g_t0
        if g_ts is not None:  # save times equal to t0
            at0 = (integ.ts == integ.t0[:, None]).to(g_ts.dtype)
            a0 = a0 + (bcast(at0, g_ts) * g_ts).sum(1)
        out = first_order_only((a0, *grads), (grad_ys, grad_y_final, *params),
                               "ReversibleAdjoint: second derivatives are not supported (its backward reverses the "
                               "steps without a graph); use DirectAdjoint")
        return (None, None, *out)


def _detach(v):
    return tuple(x.detach() for x in v) if isinstance(v, tuple) else v.detach()
