"""MechanisticBlock: the NeuRLP solver as an nn.Module layer with optional learnable step sizes."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor, nn

from torchmech.mnn.solve import METHODS, solve_linear_ode
from torchmech.mnn.system import check_central


class MechanisticOutput(NamedTuple):
    """What a MechanisticBlock returns.

    Attributes:
        u: ``(..., T, D, K)``, all of it: ``u[..., k]`` is the k-th derivative (``k = 0`` the solution).
        values: ``(..., T, D)``, the solution itself (``u[..., 0]``).
        derivatives: ``(..., T, D, K-1)``, its first to (K-1)-th derivatives (``u[..., 1:]``).
        steps: the step sizes used, ``(..., T-1)`` or ``(..., 1)`` (a constant step).
    """

    u: Tensor
    values: Tensor
    derivatives: Tensor
    steps: Tensor


class MechanisticBlock(nn.Module):
    r"""A layer whose output is the solution of a linear ODE with network-produced coefficients.

    Per sample and per time step, the block solves (in the NeuRLP least-squares sense, see
    :func:`torchmech.mnn.solve_linear_ode`)

    .. math:: \sum_{d,k} c_{t,e,d,k}\, u^{(k)}_{t,d} = r_{t,e}, \qquad u^{(k)}_{t,d} = \text{init}_{t,d,k}
              \text{ for } t < T_0,\ k < K_0,

    with smoothness rows tying neighbouring grid points together. Nothing about the batch is fixed at
    construction: call it with any leading batch shape.

    Args:
        order: the ODE order (``K = order + 1`` unknowns per variable and step).
        num_points: the number of grid points ``T``. Needed only for learnable per-step steps
            (``learn_steps=True, per_step_steps=True``) or when every input is time-invariant.
        step: the initial (or fixed) step size ``h > 0``. Like any module's tensors it is stored in
            float32 until the block is converted (``.double()``), so a float64 caller gets it rounded
            to float32 (``0.05`` -> ``0.05000000447``) unless the block is converted first.
        learn_steps: make the step size a parameter (kept positive through a softplus).
        per_step_steps: learn one step per interval (``T-1`` of them) rather than one shared step.
        central, slack, method, weight_equation, weight_init, weight_smooth: as in ``solve_linear_ode``.

    Example::

        block = MechanisticBlock(order=2, step=0.05)
        out = block(coefficients, rhs, init)   # coefficients (B, T, E, D, 3), rhs (B, T, E), init (B, 1, D, 2)
        out.values      # (B, T, D) solution
        out.derivatives # (B, T, D, 2) first and second derivatives
    """

    def __init__(self, order: int = 2, *, num_points: int | None = None, step: float = 0.1,
                 learn_steps: bool = False, per_step_steps: bool = False, central: bool = True,
                 slack: float | None = None, method: str = "auto", weight_equation: float = 1.0,
                 weight_init: float = 1.0, weight_smooth: float = 1.0):
        super().__init__()
        if not isinstance(order, numbers.Integral) or isinstance(order, bool) or order < 1:
            raise ValueError(f"order must be an int >= 1, got {order!r}")
        order = int(order)
        if not (isinstance(step, numbers.Real) and not isinstance(step, bool) and math.isfinite(step) and step > 0):
            raise ValueError(f"step must be a positive finite number, got {step!r}")
        if step < torch.finfo(torch.float32).tiny:  # the block's tensors start in float32, where it would be 0
            raise ValueError(f"step must be at least float32's smallest normal number "
                             f"({torch.finfo(torch.float32).tiny:.1e}), got {step!r}: the block starts in float32")
        if num_points is not None and (not isinstance(num_points, numbers.Integral) or isinstance(num_points, bool)
                                       or num_points < 2):
            raise ValueError(f"num_points must be an int >= 2 or None, got {num_points!r}")
        if per_step_steps and num_points is None:
            raise ValueError("per_step_steps=True needs num_points (the number of grid points T): it holds one "
                             "step per interval, T-1 of them")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        check_central(central)
        central = bool(central)
        # numbers are checked here rather than at the first forward; tensors (learnable weights) at each forward
        for name, val in (("weight_equation", weight_equation), ("weight_init", weight_init),
                          ("weight_smooth", weight_smooth), ("slack", slack)):
            if (name == "slack" and val is None) or isinstance(val, torch.Tensor):
                continue
            ok = isinstance(val, numbers.Real) and not isinstance(val, bool) and math.isfinite(val)
            if not ok or (name != "slack" and val <= 0):
                raise ValueError(f"{name} must be a {'positive ' if name != 'slack' else ''}finite float or a tensor"
                                 f"{' or None' if name == 'slack' else ''}, got {val!r}")
        self.order, self.num_points = order, None if num_points is None else int(num_points)
        self.central, self.slack, self.method = central, slack, method
        self.weight_equation, self.weight_init, self.weight_smooth = weight_equation, weight_init, weight_smooth
        size = (self.num_points - 1) if per_step_steps else 1
        # softplus^{-1}(h) so the initial step is exactly `step`.
        step = float(step)
        raw = torch.full((size,), math.log(math.expm1(step)) if step < 30 else step)
        if learn_steps:
            self.raw_steps = nn.Parameter(raw)
        else:
            self.register_buffer("raw_steps", raw)

    @property
    def steps(self) -> Tensor:
        """The current step sizes, ``(T-1,)`` or ``(1,)``."""
        return nn.functional.softplus(self.raw_steps)

    def forward(self, coefficients: Tensor, rhs: Tensor, init: Tensor, steps: Tensor | None = None) -> MechanisticOutput:
        """Solve. ``coefficients (..., T, E, D, K)``, ``rhs (..., T, E)``, ``init (..., T0, D, K0)``.

        ``steps (..., T-1)``, if given (e.g. produced per sample by a network), replaces the block's own steps.
        """
        K = self.order + 1
        if not isinstance(coefficients, Tensor):
            raise TypeError(f"coefficients must be a tensor of shape (..., T, E, D, {K}), got "
                            f"{type(coefficients).__name__}")
        if coefficients.dim() >= 1 and coefficients.shape[-1] != K:
            raise ValueError(f"coefficients must have K = order + 1 = {K} entries on the last axis, got shape "
                             f"{tuple(coefficients.shape)}")
        if steps is None:
            steps = self.steps.to(dtype=coefficients.dtype, device=coefficients.device)
        u = solve_linear_ode(coefficients, rhs, init, steps, weight_equation=self.weight_equation,
                             weight_init=self.weight_init, weight_smooth=self.weight_smooth,
                             central=self.central, slack=self.slack, method=self.method,
                             num_points=self.num_points)
        return MechanisticOutput(u, u[..., 0], u[..., 1:], steps)

    def extra_repr(self) -> str:
        return (f"order={self.order}, num_points={self.num_points}, learn_steps="
                f"{isinstance(self.raw_steps, nn.Parameter)}, central={self.central}, method={self.method!r}")
