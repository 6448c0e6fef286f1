"""Shared pieces of the ready models: small MLPs, per-dimension networks, input and option checks."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from torchmech.de.adjoint import AbstractAdjoint, BacksolveAdjoint, CheckpointAdjoint, DirectAdjoint
from torchmech.de.controllers import check_time_cast
from torchmech.de.solvers import (
    RK4,
    AbstractSolver,
    Bosh3,
    Dopri5,
    Dopri8,
    Euler,
    Heun,
    Midpoint,
    Ralston,
    Tsit5,
)

_ACTIVATIONS = {
    "tanh": nn.Tanh, "softplus": nn.Softplus, "relu": nn.ReLU, "silu": nn.SiLU, "elu": nn.ELU,
    "gelu": nn.GELU, "sigmoid": nn.Sigmoid,
}

ODE_SOLVERS = {
    "euler": Euler, "midpoint": Midpoint, "heun": Heun, "ralston": Ralston, "rk4": RK4,
    "bosh3": Bosh3, "dopri5": Dopri5, "tsit5": Tsit5, "dopri8": Dopri8,
}


def activation(act: Any, owner: str) -> nn.Module:
    """An activation module from a name ("tanh", "softplus", ...), an ``nn.Module`` class or instance."""
    if isinstance(act, str):
        key = act.lower()
        if key not in _ACTIVATIONS:
            raise ValueError(f"{owner}: unknown activation {act!r}; expected one of {sorted(_ACTIVATIONS)}")
        return _ACTIVATIONS[key]()
    if isinstance(act, type) and issubclass(act, nn.Module):
        return act()
    if isinstance(act, nn.Module):  # a copy per layer: a PReLU instance would otherwise share one weight everywhere
        return copy.deepcopy(act)
    raise TypeError(f"{owner}: activation must be a name, an nn.Module class or instance, got {type(act).__name__}")


def positive_int(value: Any, name: str, owner: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def positive_float(value: Any, name: str, owner: str, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive finite number{' or None' if allow_none else ''}, "
                         f"got {value!r}")
    return float(value)


def mlp(in_features: int, out_features: int, hidden: int, depth: int, act: Any, owner: str,
        final: nn.Module | None = None) -> nn.Sequential:
    """``depth`` hidden layers of width ``hidden`` with activation ``act``, then a linear layer
    (and ``final`` if given). ``depth = 0`` is a single linear layer."""
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), activation(act, owner)]
        width = hidden
    layers.append(nn.Linear(width, out_features))
    if final is not None:
        layers.append(final)
    return nn.Sequential(*layers)


class PerDimensionMLP(nn.Module):
    """``dims`` independent small MLPs run in parallel: input (B, dims, in_features) -> (B, dims).

    Network ``i`` sees only the features of dimension ``i``, so e.g. a diagonal diffusion
    ``g_i(t, y_i)`` depends on its own coordinate only (what diagonal noise and Milstein assume).
    """

    def __init__(self, dims: int, in_features: int, hidden: int, depth: int, act: Any, owner: str,
                 final: nn.Module | None = None):
        super().__init__()
        sizes = [in_features] + [hidden] * depth + [1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(sizes[:-1], sizes[1:]):
            bound = 1.0 / math.sqrt(a)
            self.weights.append(nn.Parameter(torch.empty(dims, a, b).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(dims, b).uniform_(-bound, bound)))
        self.act = activation(act, owner)
        self.final = final if final is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = x
        n = len(self.weights)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.einsum("bdi,dio->bdo", h, w) + b
            if i < n - 1:
                h = self.act(h)
        return self.final(h[..., 0])


def first_param(module: nn.Module) -> Tensor | None:
    for p in module.parameters():
        return p
    return None


def check_like_module(x: Tensor, name: str, owner: str, module: nn.Module) -> None:
    """Raise a clear error when ``x``'s dtype or device differs from ``module``'s parameters."""
    p = first_param(module)
    if p is None:
        return
    if x.dtype != p.dtype:
        raise TypeError(f"{owner}: {name} has dtype {x.dtype} but the model's parameters are {p.dtype}; "
                        f"convert one of them (e.g. model.to({x.dtype}) or {name}.to({p.dtype}))")
    if x.device != p.device:
        raise ValueError(f"{owner}: {name} is on {x.device} but the model's parameters are on {p.device}; "
                         f"move one of them (e.g. model.to({str(x.device)!r}))")


def check_state(y0: Any, name: str, owner: str, size: int | None) -> Tensor:
    """``y0`` must be a floating (B, size) tensor (any (B, ...) when ``size`` is None)."""
    if not isinstance(y0, Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor of shape (batch, {size or 'state'}), "
                        f"got {type(y0).__name__}")
    if not y0.is_floating_point():
        raise TypeError(f"{owner}: {name} must be float32 or float64, got {y0.dtype}")
    if size is not None and (y0.dim() != 2 or y0.shape[1] != size):
        raise ValueError(f"{owner}: {name} must have shape (batch, {size}), got {tuple(y0.shape)}"
                         + (" (add a batch axis: y0[None])" if y0.dim() == 1 and y0.shape[0] == size else ""))
    if y0.dim() < 2:
        raise ValueError(f"{owner}: {name} must have shape (batch, ...) with a leading batch axis, got "
                         f"{tuple(y0.shape)}")
    if y0.shape[0] == 0:
        raise ValueError(f"{owner}: {name} has batch size 0")
    return y0


def check_times(t: Any, name: str, owner: str, B: int, like: Tensor, strict: bool = False,
                direction: str = "monotonic", min_len: int = 1) -> Tensor:
    """Times of shape (T,) shared or (B, T) per sample, as a tensor with ``like``'s dtype and device.

    ``direction``: "monotonic" (each row non-decreasing or non-increasing) or "increasing";
    ``strict`` forbids repeated times.
    """
    if not isinstance(t, Tensor):
        try:
            t = torch.as_tensor(t, dtype=like.dtype)
        except Exception as exc:  # noqa: BLE001
            raise TypeError(f"{owner}: {name} must be a tensor of times of shape (T,) or (batch, T), "
                            f"got {type(t).__name__}") from exc
    if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{owner}: {name} must be real times, got dtype {t.dtype}")
    orig = t
    t = t.to(dtype=like.dtype, device=like.device)
    check_time_cast(orig, t, f"{owner}: {name}")
    if t.dim() not in (1, 2) or (t.dim() == 2 and t.shape[0] != B):
        raise ValueError(f"{owner}: {name} must have shape (T,) or (batch, T) = ({B}, T), got {tuple(t.shape)}")
    if t.shape[-1] < min_len:
        raise ValueError(f"{owner}: {name} must hold at least {min_len} time(s), got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{owner}: {name} must be finite")
    d = t.diff(dim=-1)
    if direction == "increasing":
        bad = (d <= 0) if strict else (d < 0)
        if bool(bad.any()):
            raise ValueError(f"{owner}: {name} must be {'strictly ' if strict else ''}increasing along its last axis")
    else:
        sign = torch.sign(t[..., -1:] - t[..., :1])
        bad = (sign * d < 0) | ((d == 0) if strict else torch.zeros_like(d, dtype=torch.bool))
        if bool(bad.any()):
            raise ValueError(f"{owner}: {name} must be monotonic along its last axis "
                             f"({'strictly, ' if strict else ''}all increasing or all decreasing per sample)")
    return t


def ode_solver(solver: Any, owner: str) -> AbstractSolver:
    if isinstance(solver, str):
        key = solver.lower()
        if key not in ODE_SOLVERS:
            raise ValueError(f"{owner}: unknown solver {solver!r}; expected one of {sorted(ODE_SOLVERS)} "
                             "or an AbstractSolver instance")
        return ODE_SOLVERS[key]()
    if isinstance(solver, AbstractSolver):
        return solver
    raise TypeError(f"{owner}: solver must be a name or an AbstractSolver instance (e.g. Tsit5()), "
                    f"got {type(solver).__name__}")


def ode_adjoint(adjoint: Any, owner: str, rtol: float = 1e-6, atol: float = 1e-8,
                accepted: str = "'direct', 'checkpoint', 'backsolve'") -> AbstractAdjoint:
    """"direct" | "checkpoint" | "backsolve" (alias "adjoint") | an AbstractAdjoint instance.

    ``accepted`` lists the names in the error message (a caller that handles more names says so)."""
    if isinstance(adjoint, AbstractAdjoint):
        return adjoint
    if adjoint is None or adjoint is False or adjoint == "direct":
        return DirectAdjoint()
    if adjoint == "checkpoint":
        return CheckpointAdjoint()
    if adjoint is True or adjoint in ("backsolve", "adjoint"):
        return BacksolveAdjoint(rtol=rtol, atol=atol)
    raise ValueError(f"{owner}: adjoint must be {accepted} or an AbstractAdjoint, got {adjoint!r}")


def step_grid(t: Tensor, dt: float | None, owner: str = "step_grid") -> Tensor:
    """Step times (B, K) through every time of ``t`` (B, T) (strictly increasing rows).

    Each interval ``[t_k, t_{k+1}]`` is cut into ``n_k = ceil(max over the batch of
    (t_{k+1} - t_k) / dt)`` equal steps, so every row has the same number of steps and lands exactly
    on its own observation times; ``dt=None`` steps from observation time to observation time.
    """
    if dt is None or t.shape[1] < 2:
        return t
    t64 = t.double()
    h = t64.diff(dim=1)  # (B, T-1)
    n = torch.ceil(h / dt - 1e-9).clamp(min=1).amax(dim=0).to(torch.int64)  # (T-1,)
    idx = torch.repeat_interleave(torch.arange(n.shape[0], device=t.device), n)
    start = (torch.cumsum(n, 0) - n)[idx]
    j = torch.arange(idx.shape[0], device=t.device) - start
    frac = j.to(torch.float64) / n[idx].to(torch.float64)
    grid = t64[:, idx] + h[:, idx] * frac
    grid = torch.cat([grid, t64[:, -1:]], dim=1).to(t.dtype)
    # at j = 0 the grid value is t_k + 0 * h: the observation time itself, exactly
    if bool((grid.diff(dim=1) <= 0).any()):
        top = float(t64.abs().max())
        ulp = float(torch.finfo(t.dtype).eps) * top
        raise ValueError(f"{owner}: the step grid is finer than {t.dtype} resolves the times (around {top:.3g} they are "
                         f"~{ulp:.1g} apart): dt = {dt:g}, and each interval is cut into as many steps as the batch's "
                         "longest one needs; use a larger dt, shift the times towards 0, or a float64 model")
    return grid


class TimeNet(nn.Module):
    """Adapts a network to ``f(t, y, args)``: mode "user" calls ``net(t, y)``, "time" feeds ``[y, t]``,
    anything else feeds ``y`` (an autonomous field)."""

    def __init__(self, net: nn.Module, mode: str):
        super().__init__()
        self.net, self.mode = net, mode

    def forward(self, t: Tensor, y: Tensor, args: Any = None) -> Tensor:
        if self.mode == "user":
            return self.net(t, y)
        if self.mode == "time":
            return self.net(torch.cat([y, t.to(y.dtype)[:, None]], dim=-1))
        return self.net(y)
