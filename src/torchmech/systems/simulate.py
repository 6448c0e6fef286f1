"""Generate clean and noisy trajectories of registered systems."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from torchmech.systems._integrate import integrate
from torchmech.systems.registry import get
from torchmech.systems.system import System

__all__ = ["Trajectory", "simulate", "as_time_grid"]


@dataclass
class Trajectory:
    """Result of :func:`simulate`.

    Attributes:
        t: (T,) output times.
        x: noisy states, (B, T, D), or (T, D) when ``y0`` was a single state of shape (D,).
        x_clean: noise-free states, same shape as ``x``.
        system: the simulated :class:`System`.
        y0: initial states, (B, D) or (D,).
        params: the parameter values used (defaults merged with overrides).
        noise: the noise level (fraction of each variable's standard deviation).
    """

    t: torch.Tensor
    x: torch.Tensor
    x_clean: torch.Tensor
    system: System
    y0: torch.Tensor
    params: dict = field(default_factory=dict)
    noise: float = 0.0


def as_time_grid(t: Any, name: str = "t", min_length: int = 2) -> torch.Tensor:
    """Validate a 1-D, finite, strictly increasing time grid and return it as a tensor (T,)."""
    if isinstance(t, torch.Tensor):
        tt = t
    elif isinstance(t, (np.ndarray, list, tuple)):
        tt = torch.as_tensor(np.asarray(t, dtype=np.float64))
    else:
        raise TypeError(f"{name}: expected a 1-D tensor/array of times, got {type(t).__name__}")
    if tt.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D time grid of shape (T,), got shape {tuple(tt.shape)}")
    if not tt.is_floating_point():
        tt = tt.to(torch.float64)
    if tt.shape[0] < min_length:
        raise ValueError(f"{name}: expected at least {min_length} time points, got {tt.shape[0]}")
    if not torch.isfinite(tt).all():
        raise ValueError(f"{name}: expected finite times, got NaN or infinite values")
    if tt.shape[0] > 1 and not (tt[1:] > tt[:-1]).all():
        raise ValueError(f"{name}: expected strictly increasing times, got a non-increasing grid")
    return tt


def simulate(
    system: System | str,
    t: Any,
    y0: Any = None,
    noise: float = 0.0,
    seed: int | None = None,
    params: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Trajectory:
    """Integrate ``system`` from several initial conditions and add Gaussian measurement noise.

    Args:
        system: a :class:`System` or a registered name (see ``torchmech.systems.names()``).
        t: (T,) strictly increasing output times; integration starts at ``t[0]``.
        y0: initial states (B, D), or one state (D,); default ``system.y0`` (all of them).
        noise: standard deviation of the added noise as a fraction of each variable's standard
            deviation over time (computed per trajectory on the clean data).
        seed: seed of the noise generator (``None``: torch's global generator).
        params: overrides of the default parameters; values are floats, or tensors of shape
            (B,) giving one value per trajectory.
        dtype: output dtype (default: dtype of ``t`` if a floating tensor, else float64).

    Returns:
        :class:`Trajectory` with ``x`` and ``x_clean`` of shape (B, T, D) (or (T, D) for a
        single state), on the device of ``t`` when ``t`` is a tensor.

    The integration is scipy's DOP853 at rtol = atol = 1e-10 on CPU float64.
    """
    system = get(system)
    tt = as_time_grid(t, "t", min_length=2)
    device = tt.device
    if dtype is None:
        dtype = tt.dtype if isinstance(t, torch.Tensor) and tt.is_floating_point() else torch.float64
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype: expected None, torch.float32 or torch.float64, got {dtype!r}")
    if isinstance(noise, np.floating):
        noise = float(noise)
    if not isinstance(noise, (int, float)) or isinstance(noise, bool) or not np.isfinite(noise) or noise < 0:
        raise ValueError(f"noise: expected a finite number >= 0 (fraction of each variable's std), got {noise!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise TypeError(f"seed: expected None or an int, got {type(seed).__name__}")
    D = system.dim
    if y0 is None:
        y = torch.tensor(system.y0, dtype=torch.float64)
        single = False
    else:
        y = torch.as_tensor(y0.detach().cpu() if isinstance(y0, torch.Tensor) else np.asarray(y0, dtype=np.float64))
        y = y.to(torch.float64)
        single = y.ndim == 1
        if single:
            y = y[None]
        if y.ndim != 2 or y.shape[1] != D:
            raise ValueError(
                f"y0: expected shape (B, {D}) or ({D},) for system {system.name!r}, got {tuple(torch.as_tensor(y0).shape)}"
            )
        if not torch.isfinite(y).all():
            raise ValueError("y0: expected finite initial states, got NaN or infinite values")
    merged = system._merged_params(params)
    cpu_params = {}
    for k, v in merged.items():
        if isinstance(v, (np.ndarray, np.generic)):
            v = torch.as_tensor(np.asarray(v, dtype=np.float64))
        if isinstance(v, torch.Tensor):
            v = v.detach().to("cpu", torch.float64)
            if v.numel() != 1 and tuple(v.shape) != (y.shape[0],):
                raise ValueError(
                    f"params[{k!r}]: expected a float or a tensor of shape ({y.shape[0]},), got {tuple(v.shape)}"
                )
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"params[{k!r}]: expected finite values, got {v.tolist()}")
            cpu_params[k] = v.reshape(-1).numpy() if v.numel() > 1 else float(v)
        else:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                raise ValueError(f"params[{k!r}]: expected a finite number or a tensor of shape ({y.shape[0]},), "
                                 f"got {v!r}")
            cpu_params[k] = float(v)

    def f(s, state):
        return system.numpy_vector_field(s, state, cpu_params)

    clean = integrate(f, tt.detach().cpu().to(torch.float64).numpy(), y.numpy())
    x_clean = torch.from_numpy(clean)
    x = x_clean
    if noise > 0:
        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        eps = torch.randn(x_clean.shape, generator=gen, dtype=torch.float64)
        std = x_clean.std(dim=1, keepdim=True)
        x = x_clean + noise * std * eps
    if single:
        x, x_clean, y = x[0], x_clean[0], y[0]
    return Trajectory(
        t=tt.to(dtype=dtype, device=device),
        x=x.to(dtype=dtype, device=device),
        x_clean=x_clean.to(dtype=dtype, device=device),
        system=system,
        y0=y.to(dtype=dtype, device=device),
        params=merged,
        noise=float(noise),
    )
