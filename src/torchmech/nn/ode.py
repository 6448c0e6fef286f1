"""NeuralODE: an MLP (or any module) as the vector field of an ODE, solved with torchmech.solve."""

from __future__ import annotations

import math

from typing import Any

import torch
from torch import Tensor, nn

from torchmech.de.controllers import ConstantStep, PIDController
from torchmech.de.integrate import SaveAt, Solution, solve
from torchmech.de.terms import ODETerm
from torchmech.nn._common import (
    TimeNet,
    check_like_module,
    check_state,
    check_times,
    mlp,
    ode_adjoint,
    ode_solver,
    positive_float,
    positive_int,
)

__all__ = ["NeuralODE"]


class NeuralODE(nn.Module):
    """Neural ODE ``dy/dt = f_theta(t, y)``: maps initial states to trajectories.

    The vector field is an MLP with ``depth`` hidden layers of width ``hidden`` (``state`` inputs,
    plus the time when ``time_dependent``), or any ``nn.Module`` given as ``vector_field``. The ODE
    is solved by :func:`torchmech.solve` (each sample with its own adaptive steps); gradients come
    from the chosen ``adjoint`` strategy.

    Args:
        vector_field: optional module ``vector_field(t, y) -> dy/dt`` with ``t`` of shape (B,) (one
            time per sample) and ``y``, the result, of shape (B, ...). Replaces the default MLP.
        state: size ``D`` of the state (required without ``vector_field``; checks ``y0`` with it).
        hidden, depth, activation: width, number of hidden layers and activation of the MLP.
        time_dependent: the MLP also sees ``t`` (default False: autonomous).
        solver: a solver name ("tsit5", "dopri5", "dopri8", "bosh3", "rk4", "euler", ...) or an
            :class:`~torchmech.de.solvers.AbstractSolver` instance.
        rtol, atol: tolerances of adaptive solvers (``PIDController``).
        dt: step size of fixed-step solvers (required for them); initial step of adaptive ones
            (default: chosen automatically).
        adjoint: "direct" (backpropagate through the solver), "checkpoint" (the same gradients,
            recomputing segments to save memory), "backsolve" (continuous adjoint, O(1) memory in
            the number of steps), or an :class:`~torchmech.de.adjoint.AbstractAdjoint` instance.
        adjoint_rtol, adjoint_atol: tolerances of the backsolve adjoint (default ``rtol``/``atol``).
        max_steps: step limit per sample; exceeding it raises ``RuntimeError``.

    Shapes (batch-first, as :class:`~torchmech.de.integrate.Solution`):
        ``y0`` (B, D); ``t`` (T,) shared or (B, T) per sample, monotonic; output (B, T, D), where
        ``output[:, 0] == y0`` when ``t[..., 0]`` is the start time (the solve always starts at
        ``t[..., 0]``).

    Example::

        model = NeuralODE(state=2, hidden=64)
        y0 = torch.randn(16, 2)
        t = torch.linspace(0, 1, 20)
        ys = model(y0, t)                 # (16, 20, 2)
        loss = (ys - target).pow(2).mean()
        loss.backward()
    """

    def __init__(self, vector_field: nn.Module | None = None, *, state: int | None = None, hidden: int = 64,
                 depth: int = 2, activation: Any = "tanh", time_dependent: bool = False, solver: Any = "tsit5",
                 rtol: float = 1e-3, atol: float = 1e-6, dt: float | None = None, adjoint: Any = "direct",
                 adjoint_rtol: float | None = None, adjoint_atol: float | None = None, max_steps: int = 4096):
        super().__init__()
        name = "NeuralODE"
        if vector_field is None:
            if state is None:
                raise ValueError("NeuralODE: give either vector_field (a module f(t, y)) or state (the state size "
                                 "for the default MLP)")
            positive_int(state, "state", name)
            positive_int(hidden, "hidden", name)
            positive_int(depth, "depth", name, minimum=0)
            net = mlp(state + int(bool(time_dependent)), state, hidden, depth, activation, name)
            self.func = TimeNet(net, "time" if time_dependent else "autonomous")
        else:
            if not isinstance(vector_field, nn.Module):
                raise TypeError(f"NeuralODE: vector_field must be an nn.Module f(t, y), got {type(vector_field).__name__}")
            if state is not None:
                positive_int(state, "state", name)
            self.func = TimeNet(vector_field, "user")
        self.state = state
        self.solver = ode_solver(solver, name)
        if not (isinstance(rtol, (int, float)) and 0 < rtol < math.inf and isinstance(atol, (int, float))
                and 0 <= atol < math.inf):
            raise ValueError(f"NeuralODE: need finite rtol > 0 and atol >= 0, got rtol={rtol!r}, atol={atol!r}")
        self.rtol, self.atol = float(rtol), float(atol)
        self.dt = positive_float(dt, "dt", name, allow_none=True)
        if not self.solver.adaptive and self.dt is None:
            raise ValueError(f"NeuralODE: the fixed-step solver {type(self.solver).__name__} needs a step size; "
                             "pass dt")
        # (None means "as the forward solve"; 0.0 is a valid atol, so not `or`)
        self.adjoint = ode_adjoint(adjoint, name, self.rtol if adjoint_rtol is None else adjoint_rtol,
                                   self.atol if adjoint_atol is None else adjoint_atol)
        self.max_steps = positive_int(max_steps, "max_steps", name)

    def solve(self, y0: Tensor, t: Any) -> Solution:
        """Solve from ``t[..., 0]`` and return the full :class:`~torchmech.de.integrate.Solution`
        (``ys`` (B, T, D), ``stats``, ``status``); see :meth:`forward` for the shapes."""
        y0 = check_state(y0, "y0", "NeuralODE", self.state)
        check_like_module(y0, "y0", "NeuralODE", self)
        t = check_times(t, "t", "NeuralODE", y0.shape[0], y0)
        controller = PIDController(self.rtol, self.atol) if self.solver.adaptive else ConstantStep()
        return solve(ODETerm(self.func), self.solver, t[..., 0], t[..., -1], y0, dt0=self.dt,
                     saveat=SaveAt(ts=t), controller=controller, adjoint=self.adjoint, max_steps=self.max_steps)

    def forward(self, y0: Tensor, t: Any) -> Tensor:
        """Trajectories from ``y0`` (B, D) at times ``t`` (T,) or (B, T): shape (B, T, D)."""
        return self.solve(y0, t).ys

    def vector_field(self, t: Any, y: Tensor) -> Tensor:
        """The learned ``dy/dt`` at ``y`` (B, D) and times ``t`` (scalar or (B,)): shape (B, D)."""
        y = check_state(y, "y", "NeuralODE", self.state)
        t = torch.as_tensor(t, dtype=y.dtype, device=y.device)
        return self.func(t.expand(y.shape[0]) if t.dim() == 0 else t, y, None)

    def extra_repr(self) -> str:
        return (f"state={self.state}, solver={type(self.solver).__name__}, rtol={self.rtol}, atol={self.atol}, "
                f"dt={self.dt}, adjoint={type(self.adjoint).__name__}")
