"""ReversibleAdjoint: exact O(1)-memory gradients for the algebraically reversible Reversible Heun solver."""

from __future__ import annotations

import torch

from torchmech.de._tree import bcast, tree_leaves, where
from torchmech.de.adjoint import AbstractAdjoint
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
            every ``nn.Module`` vector field in ``terms``; tensors in ``args`` that require grad
            are always included.

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
        if self.adjoint_params is not None:
            params = [p for p in self.adjoint_params if isinstance(p, torch.Tensor)]
        else:
            params = [p for m in integ.terms.modules() for p in m.parameters() if p.requires_grad]
        uniq: dict = {}
        for p in params:  # drift and diffusion may share a module: count each tensor once
            uniq.setdefault(id(p), p)
        params = list(uniq.values())
        seen = set(uniq)
        for leaf in tree_leaves(integ.args):
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad and id(leaf) not in seen:
                params.append(leaf)
                seen.add(id(leaf))
        holder: dict = {}
        ys = _ReversibleFn.apply(integ, holder, integ.y0, *params)
        sol = holder["sol"]
        sol.ys = ys
        sol.y_final = ys[:, -1] if integ.saveat.t1 else sol.y_final.detach()
        return sol


def _forward(integ):
    """Run the solve without a graph; return (solution, final state, [(t_n, t_{n+1}, accepted)])."""
    state = integ.init_state()
    steps = []
    done = bool(state["done"].all())
    while not done:
        t_before = state["t"]
        state, rec = integ.step(state)
        steps.append((t_before, state["t"]))
        done = rec.pop("__done__")
    return integ.finalize(state, []), state, steps


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
        return sol.ys

    @staticmethod
    def backward(ctx, grad_ys):
        integ, steps = ctx.integ, ctx.steps
        params = list(ctx.saved_tensors)
        solver, terms, args = integ.solver, integ.terms, integ.args
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
        a_z = torch.zeros_like(y)
        grads = [torch.zeros_like(p) for p in params]
        d = integ.direction
        with torch.no_grad():
            vz = terms.vf(steps[-1][1], z, args) if steps else None
            for t_prev, t_next in reversed(steps):
                active = t_next != t_prev
                if not bool(active.any()):
                    continue
                control = terms.contr(t_prev, t_next)
                if g_ts is not None:  # save times in (t_prev, t_next]: linear interpolation weights
                    ts = integ.ts
                    inside = active[:, None] & (d[:, None] * (ts - t_prev[:, None]) > 0) & \
                        (d[:, None] * (ts - t_next[:, None]) <= 0)
                    h = torch.where(active, t_next - t_prev, torch.ones_like(t_prev))
                    theta = torch.where(inside, (ts - t_prev[:, None]) / h[:, None], torch.zeros_like(ts))
                    w1 = torch.where(inside, theta, torch.zeros_like(theta))
                    w0 = torch.where(inside, 1 - theta, torch.zeros_like(theta))
                    a_y = a_y + (bcast(w1, g_ts) * g_ts).sum(1)
                    extra0 = (bcast(w0, g_ts) * g_ts).sum(1)
                else:
                    extra0 = None
                y_prev, z_prev, _ = solver.backward_step(terms, t_prev, t_next, y, z, vz, args, control)
                with torch.enable_grad():
                    yi = y_prev.detach().requires_grad_(True)
                    zi = z_prev.detach().requires_grad_(True)
                    vzi = terms.vf(t_prev, zi, args)
                    y1, z1, _ = solver.forward_step(terms, t_prev, t_next, yi, zi, vzi, args, control)
                    m = bcast(active, y1).to(y1.dtype)
                    out = torch.autograd.grad([y1, z1], [yi, zi, *params], grad_outputs=[a_y * m, a_z * m],
                                              allow_unused=True)
                gy, gz = out[0], out[1]
                for i, g in enumerate(out[2:]):
                    if g is not None:
                        grads[i] += g
                a_y = where(active, gy, a_y)
                a_z = where(active, gz, a_z)
                if extra0 is not None:
                    a_y = a_y + extra0
                y = where(active, y_prev, y)
                z = where(active, z_prev, z)
                vz = where(active, tuple(v.detach() for v in vzi) if isinstance(vzi, tuple) else vzi.detach(), vz)
        a0 = a_y + a_z  # y_hat_0 = y_0
        if g_t0 is not None:
            a0 = a0 + g_t0
        if g_ts is not None:  # save times equal to t0
            at0 = (integ.ts == integ.t0[:, None]).to(g_ts.dtype)
            a0 = a0 + (bcast(at0, g_ts) * g_ts).sum(1)
        return (None, None, a0, *grads)
