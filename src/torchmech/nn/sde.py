"""NeuralSDE: drift and diffusion networks of an SDE, solved with torchmech.solve and Brownian motion."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from torchmech.de.adjoint import AbstractAdjoint, BacksolveAdjoint
from torchmech.de.brownian import AbstractBrownian, BrownianInterval
from torchmech.de.controllers import StepTo
from torchmech.de.integrate import SaveAt, Solution, solve
from torchmech.de.reversible_adjoint import ReversibleAdjoint
from torchmech.de.solvers.sde import (
    SDE_METHODS,
    SRA1,
    SRI2,
    AbstractSDESolver,
    Milstein,
    ReversibleHeun,
    sde_solver_by_name,
)
from torchmech.de.terms import ControlTerm, DiagonalControlTerm, MultiTerm, ODETerm
from torchmech.nn._common import (
    PerDimensionMLP,
    TimeNet,
    check_like_module,
    check_state,
    check_times,
    mlp,
    ode_adjoint,
    positive_float,
    positive_int,
    step_grid,
)

__all__ = ["NeuralSDE"]

NOISE_TYPES = ("diagonal", "general", "scalar", "additive")
SDE_SOLVERS = tuple(SDE_METHODS)


def sde_solver(solver: Any, sde_type: str | None, noise: str, owner: str) -> AbstractSDESolver:
    """An SDE solver from a name or instance, checked against the calculus (unless ``sde_type`` is
    None) and the noise type."""
    if isinstance(solver, str):
        key = solver.lower()
        if key not in SDE_SOLVERS:
            raise ValueError(f"{owner}: unknown solver {solver!r}; expected one of {list(SDE_SOLVERS)} or an "
                             "AbstractSDESolver instance")
        # "srk" as torchsde: SRA1 for additive noise, SRI2 (Ito) for diagonal and scalar noise
        solver = sde_solver_by_name(key, sde_type or "ito", noise)
    if not isinstance(solver, AbstractSDESolver):
        raise TypeError(f"{owner}: solver must be an SDE solver name or AbstractSDESolver instance, "
                        f"got {type(solver).__name__}")
    # for additive noise Ito and Stratonovich coincide, so any SDE solver is consistent
    if sde_type is not None and noise != "additive" and solver.sde_type not in ("any", sde_type):
        raise ValueError(f"{owner}: solver {type(solver).__name__} solves {solver.sde_type} SDEs but "
                         f"sde_type={sde_type!r}")
    if isinstance(solver, Milstein) and noise == "general":
        raise ValueError(f"{owner}: the Milstein solver needs noise='diagonal', 'scalar' or 'additive', got "
                         "noise='general'")
    if isinstance(solver, SRA1) and noise != "additive":
        raise ValueError(f"{owner}: the SRA1 solver needs noise='additive', got noise={noise!r}"
                         + ("; 'srk' is SRA1 for additive noise and SRI2 for diagonal or scalar noise, and has "
                            "nothing for general noise" if noise == "general" else ""))
    if isinstance(solver, SRI2) and noise not in ("diagonal", "scalar"):
        raise ValueError(f"{owner}: the SRI2 solver needs noise='diagonal' or 'scalar', got noise={noise!r}")
    return solver


def sde_adjoint(adjoint: Any, solver: AbstractSDESolver, owner: str, reversible: bool = True) -> AbstractAdjoint:
    """The ODE adjoints (direct, checkpoint, backsolve = the stochastic adjoint) plus "reversible" (unless
    ``reversible=False``: then it is not among the accepted names)."""
    if not reversible:
        if adjoint == "reversible":
            raise ValueError(f"{owner}: adjoint='reversible' is not supported; use 'direct', 'checkpoint' or "
                             "'backsolve'")
        return ode_adjoint(adjoint, owner)
    if adjoint == "reversible":
        if not isinstance(solver, ReversibleHeun):
            raise ValueError(f"{owner}: adjoint='reversible' needs solver='reversible_heun' (Stratonovich), got "
                             f"{type(solver).__name__}")
        return ReversibleAdjoint()
    return ode_adjoint(adjoint, owner, accepted="'direct', 'checkpoint', 'backsolve', 'reversible'")


def make_brownian(brownian: Any, seed: Any, t: Tensor, shape: tuple, like: Tensor, levy: bool,
                  owner: str) -> AbstractBrownian:
    """The given Brownian motion (checked), or a new ``BrownianInterval`` on ``[t.min(), t.max()]``."""
    lo, hi = float(t.min()), float(t.max())
    if brownian is None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"{owner}: seed must be an int or None, got {type(seed).__name__}")
        return BrownianInterval(lo, hi, shape, dtype=like.dtype, device=like.device, seed=seed,
                                levy_area="space-time" if levy else None)
    if seed is not None:
        raise ValueError(f"{owner}: pass either brownian or seed, not both (the seed of a given Brownian motion "
                         "is fixed at its construction)")
    if not isinstance(brownian, AbstractBrownian):
        raise TypeError(f"{owner}: brownian must be a torchmech BrownianInterval or VirtualBrownianTree, "
                        f"got {type(brownian).__name__}")
    if tuple(brownian.shape) != tuple(shape):
        raise ValueError(f"{owner}: brownian.shape must be (batch, brownian channels) = {tuple(shape)}, "
                         f"got {tuple(brownian.shape)}")
    if brownian.t0 > lo or brownian.t1 < hi:
        raise ValueError(f"{owner}: brownian covers [{brownian.t0}, {brownian.t1}] but the times span [{lo}, {hi}]")
    if brownian.dtype != like.dtype or torch.device(brownian.device) != like.device:
        raise ValueError(f"{owner}: brownian has dtype {brownian.dtype} on {brownian.device}, the model's inputs "
                         f"{like.dtype} on {like.device}; build it with dtype= and device= to match")
    return brownian


class _Diffusion(nn.Module):
    """``g(t, y, args)``: (B, D) for diagonal noise, (B, D, m) otherwise."""

    def __init__(self, net: nn.Module | None, mode: str, state: int, m: int, time_dependent: bool):
        super().__init__()
        self.net, self.mode, self.state, self.m, self.time_dependent = net, mode, state, m, time_dependent
        if mode == "constant":  # additive noise without time dependence: a learnable matrix
            self.raw = nn.Parameter(torch.zeros(state, m))

    def forward(self, t: Tensor, y: Tensor, args: Any = None) -> Tensor:
        B = y.shape[0]
        tt = t.to(y.dtype)[:, None]
        if self.mode == "user":
            return self.net(t, y)
        if self.mode == "diagonal":
            feats = y[..., None]
            if self.time_dependent:
                feats = torch.cat([feats, tt[:, :, None].expand(B, self.state, 1)], dim=-1)
            return self.net(feats)
        if self.mode == "constant":
            return torch.sigmoid(self.raw).expand(B, self.state, self.m)
        if self.mode == "additive":
            inp = tt
        else:
            inp = torch.cat([y, tt], dim=-1) if self.time_dependent else y
        return self.net(inp).reshape(B, self.state, self.m)


class NeuralSDE(nn.Module):
    """Neural SDE ``dy = f_theta(t, y) dt + g_theta(t, y) dW``: maps initial states to sample paths.

    The drift ``f`` is an MLP of ``[y, t]``. The diffusion ``g`` depends on ``noise``:

    - "diagonal": ``g_i(t, y_i)``, one small MLP per state dimension (so each noise channel acts on
      its own coordinate only, as diagonal noise and the Milstein solver assume); ``W`` has ``D``
      channels;
    - "general": ``g(t, y)`` a (D, m) matrix from an MLP of ``[y, t]``; ``W`` has ``m = brownian_size``
      channels (default ``D``); "scalar" is general noise with ``m = 1``;
    - "additive": ``g(t)`` a (D, m) matrix depending on time only (a learnable constant when not
      ``time_dependent``).

    Diffusion networks end with a sigmoid, keeping the noise bounded. Any ``nn.Module``
    ``drift(t, y)`` / ``diffusion(t, y)`` (``t`` of shape (B,)) can replace the defaults.
    The solve runs on :func:`torchmech.solve` with fixed steps that land exactly on every output
    time (``dt`` refines the steps between them).

    Args:
        state: size ``D`` of the state.
        hidden, depth, activation: width, hidden layers and activation of the default networks.
        noise: "diagonal" (default), "general", "scalar" or "additive".
        brownian_size: channels ``m`` of the Brownian motion for general/additive noise (default ``D``).
        sde_type: "ito" (default) or "stratonovich": the calculus the SDE is read in. It picks the
            default solver and is checked against a given one.
        solver: "euler" (Euler-Maruyama, Ito), "milstein" (diagonal, scalar, additive), "heun", "midpoint",
            "euler_heun", "reversible_heun" (Stratonovich), "srk" (SRA1 for additive noise, SRI2 for diagonal or
            scalar Ito noise) or an
            :class:`~torchmech.de.solvers.AbstractSDESolver`. Default: "reversible_heun" with
            ``adjoint="reversible"``, else "euler" (Ito) or "heun" (Stratonovich).
        dt: largest step; each interval between output times is cut into equal steps of at most
            ``dt`` (the same number for the whole batch). ``None``: one step per output interval.
        adjoint: "direct" (backpropagate through the steps), "checkpoint" (same gradients, less
            memory), "backsolve" (the stochastic adjoint: the adjoint SDE solved backwards on the same
            Brownian path, O(1) memory, gradients converge to direct ones as ``dt`` shrinks; an Ito SDE is
            converted to Stratonovich form for it), "reversible" (Reversible Heun's exact O(1)-memory gradients; needs
            ``solver="reversible_heun"`` and ``sde_type="stratonovich"``) or an ``AbstractAdjoint``.
        time_dependent: default networks also see ``t`` (default True).
        drift, diffusion: optional modules replacing the default networks.

    Shapes (batch-first): ``y0`` (B, D); ``t`` (T,) or (B, T), strictly increasing; output
    (B, T, D) with ``output[:, 0] == y0``.

    Example::

        sde = NeuralSDE(state=3, hidden=32, noise="diagonal", dt=0.01)
        y0 = torch.randn(8, 3)
        t = torch.linspace(0, 1, 50)
        paths = sde(y0, t, seed=0)        # (8, 50, 3), reproducible with the seed
        paths.pow(2).mean().backward()
    """

    def __init__(self, state: int, hidden: int = 64, depth: int = 2, *, noise: str = "diagonal",
                 brownian_size: int | None = None, sde_type: str = "ito", solver: Any = None,
                 dt: float | None = None, adjoint: Any = "direct", activation: Any = "tanh",
                 time_dependent: bool = True, drift: nn.Module | None = None, diffusion: nn.Module | None = None):
        super().__init__()
        name = "NeuralSDE"
        self.state = positive_int(state, "state", name)
        positive_int(hidden, "hidden", name)
        positive_int(depth, "depth", name, minimum=0)
        if noise not in NOISE_TYPES:
            raise ValueError(f"NeuralSDE: noise must be one of {NOISE_TYPES}, got {noise!r}")
        if sde_type not in ("ito", "stratonovich"):
            raise ValueError(f"NeuralSDE: sde_type must be 'ito' or 'stratonovich', got {sde_type!r}")
        self.noise, self.sde_type = noise, sde_type
        if noise == "diagonal":
            if brownian_size not in (None, state):
                raise ValueError(f"NeuralSDE: diagonal noise has brownian_size = state = {state}, got {brownian_size}")
            m = state
        elif noise == "scalar":
            if brownian_size not in (None, 1):
                raise ValueError(f"NeuralSDE: scalar noise has brownian_size = 1, got {brownian_size}")
            m = 1
        else:
            m = state if brownian_size is None else positive_int(brownian_size, "brownian_size", name)
        self.brownian_size = m
        self.time_dependent = bool(time_dependent)
        td = int(self.time_dependent)
        for arg, val in (("drift", drift), ("diffusion", diffusion)):
            if val is not None and not isinstance(val, nn.Module):
                raise TypeError(f"NeuralSDE: {arg} must be an nn.Module {arg}(t, y), got {type(val).__name__}")
        if drift is not None:
            self.drift = TimeNet(drift, "user")
        else:
            self.drift = TimeNet(mlp(state + td, state, hidden, depth, activation, name), "time" if td else "plain")
        if diffusion is not None:
            self.diffusion = _Diffusion(diffusion, "user", state, m, self.time_dependent)
        elif noise == "diagonal":
            net = PerDimensionMLP(state, 1 + td, hidden, depth, activation, name, final=nn.Sigmoid())
            self.diffusion = _Diffusion(net, "diagonal", state, m, self.time_dependent)
        elif noise == "additive" and not self.time_dependent:
            self.diffusion = _Diffusion(None, "constant", state, m, False)
        else:
            n_in = 1 if noise == "additive" else state + td
            net = mlp(n_in, state * m, hidden, depth, activation, name, final=nn.Sigmoid())
            self.diffusion = _Diffusion(net, "additive" if noise == "additive" else "general", state, m,
                                        self.time_dependent)
        if solver is None:
            if adjoint == "reversible":
                if sde_type != "stratonovich" and noise != "additive":
                    raise ValueError(f"{name}: adjoint='reversible' solves with reversible_heun, a Stratonovich "
                                     "solver; pass sde_type='stratonovich' (read as Ito, the same networks define "
                                     "another SDE)")
                solver = "reversible_heun"
            else:
                solver = "euler" if sde_type == "ito" else "heun"
        self.solver = sde_solver(solver, sde_type, noise, name)
        self.adjoint = sde_adjoint(adjoint, self.solver, name)
        self.dt = positive_float(dt, "dt", name, allow_none=True)

    def _terms(self, bm: AbstractBrownian) -> MultiTerm:
        if self.noise == "diagonal":
            return MultiTerm(ODETerm(self.drift), DiagonalControlTerm(self.diffusion, bm))
        return MultiTerm(ODETerm(self.drift), ControlTerm(self.diffusion, bm))

    def solve(self, y0: Tensor, t: Any, brownian: AbstractBrownian | None = None,
              seed: int | None = None) -> Solution:
        """As :meth:`forward`, returning the full :class:`~torchmech.de.integrate.Solution`."""
        y0 = check_state(y0, "y0", "NeuralSDE", self.state)
        check_like_module(y0, "y0", "NeuralSDE", self)
        B = y0.shape[0]
        t = check_times(t, "t", "NeuralSDE", B, y0, strict=True, direction="increasing")
        tb = t.expand(B, t.shape[-1])
        if t.shape[-1] == 1:  # nothing to integrate (and no interval for a Brownian motion)
            from torchmech.de.solvers import Euler

            return solve(ODETerm(self.drift), Euler(), t[..., 0], t[..., 0], y0, saveat=SaveAt(ts=t), dt0=1.0)
        bm = make_brownian(brownian, seed, tb, (B, self.brownian_size), y0,
                           getattr(self.solver, "uses_levy_area", False), "NeuralSDE")
        grid = step_grid(tb, self.dt, "NeuralSDE")
        if t.dim() == 1:
            grid = grid[0]
        return solve(self._terms(bm), self.solver, t[..., 0], t[..., -1], y0, saveat=SaveAt(ts=t),
                     controller=StepTo(grid), adjoint=self.adjoint, max_steps=grid.shape[-1] + 1)

    def forward(self, y0: Tensor, t: Any, brownian: AbstractBrownian | None = None,
                seed: int | None = None) -> Tensor:
        """Sample paths from ``y0`` (B, D) at times ``t`` (T,) or (B, T): shape (B, T, D).

        Args:
            brownian: the driving Brownian motion, shape (B, brownian_size), covering the times of
                ``t`` (e.g. ``BrownianInterval(t0, t1, (B, m), seed=0, dtype=y0.dtype)``, in the model's dtype);
                reuse one to get the same path again. Default: a new ``BrownianInterval``.
            seed: seed of the new Brownian motion (default: drawn from torch's global generator). A
                ``BrownianInterval``'s path depends on the intervals it is asked for: the same seed with
                another ``dt`` gives another path. To compare step sizes on one path, pass
                ``brownian=VirtualBrownianTree(...)``.
        """
        return self.solve(y0, t, brownian, seed).ys

    def extra_repr(self) -> str:
        return (f"state={self.state}, noise={self.noise!r}, brownian_size={self.brownian_size}, "
                f"sde_type={self.sde_type!r}, solver={type(self.solver).__name__}, dt={self.dt}, "
                f"adjoint={type(self.adjoint).__name__}")
