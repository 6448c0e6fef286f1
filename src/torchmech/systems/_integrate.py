"""The one place where systems and discovered models are integrated in time (scipy for now)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

__all__ = ["integrate"]

RTOL = 1e-10
ATOL = 1e-10


class _NonFinite(Exception):
    def __init__(self, t: float):
        super().__init__(t)
        self.t = t


def integrate(
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    t: np.ndarray,
    y0: np.ndarray,
    rtol: float = RTOL,
    atol: float = ATOL,
) -> np.ndarray:
    """Integrate ``dy/dt = f(t, y)`` for a batch of initial conditions.

    Args:
        f: vector field ``f(t, y)`` with ``t`` a float and ``y`` a (B, D) float64 numpy array;
            returns (B, D) (numpy array or tensor).
        t: (T,) strictly increasing float64 output times; integration starts at ``t[0]``.
        y0: (B, D) float64 initial states at ``t[0]``.

    Returns:
        (B, T, D) float64 numpy array.

    Raises:
        RuntimeError: when the integrator fails or the solution becomes non-finite.

    This is scipy's DOP853 (rtol = atol = 1e-10 by default) on CPU float64; the whole batch is integrated as one flattened state.
    """
    from scipy.integrate import solve_ivp

    t = np.asarray(t, dtype=np.float64)
    y0 = np.asarray(y0, dtype=np.float64)
    B, D = y0.shape
    if len(t) == 1:
        return np.repeat(y0[:, None, :], 1, axis=1)

    def rhs(s, y):
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite values are reported below
            out = f(float(s), y.reshape(B, D))
        if isinstance(out, torch.Tensor):
            out = out.detach().to("cpu", torch.float64).numpy()
        out = np.asarray(out, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(out)):
            # DOP853's step-size control never terminates on a NaN error estimate
            raise _NonFinite(float(s))
        return out

    try:
        sol = solve_ivp(rhs, (t[0], t[-1]), y0.reshape(-1), method="DOP853", t_eval=t, rtol=rtol, atol=atol)
    except _NonFinite as exc:
        raise RuntimeError(f"integration failed at t={exc.t:.6g}: the vector field returned NaN or infinite "
                           "values (check the parameters and initial states)") from None
    if not sol.success or sol.y.shape[1] != len(t):
        t_fail = np.asarray(sol.t).reshape(-1)
        raise RuntimeError(f"integration failed at t={t_fail[-1] if t_fail.size else t[0]:.6g}: {sol.message}")
    out = sol.y.T.reshape(len(t), B, D).transpose(1, 0, 2)
    if not np.all(np.isfinite(out)):
        raise RuntimeError("integration produced non-finite values")
    return np.ascontiguousarray(out)
