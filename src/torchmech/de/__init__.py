"""Numerical differential equations: terms, explicit RK solvers, step control, solve loop, adjoints."""

from torchmech.de.adjoint import AbstractAdjoint, BacksolveAdjoint, CheckpointAdjoint, DirectAdjoint
from torchmech.de.brownian import AbstractBrownian, BrownianIncrement, BrownianInterval, VirtualBrownianTree
from torchmech.de.cde import cdeint
from torchmech.de.controllers import (
    AbstractController,
    ConstantStep,
    PIDController,
    StepTo,
    batch_rms_norm,
    max_norm,
    rms_norm,
)
from torchmech.de.events import Event
from torchmech.de.interpolation import (
    AbstractInterpolation,
    CubicHermiteInterpolation,
    LinearInterpolation,
    NaturalCubicSpline,
    RectilinearInterpolation,
    fill_missing,
    observational_intensity,
)
from torchmech.de.integrate import SaveAt, Solution, Status, solve
from torchmech.de.solvers import (
    RK4,
    AbstractSolver,
    Bosh3,
    ButcherTableau,
    Dopri5,
    Dopri8,
    SRA1,
    SRI2,
    AbstractSDESolver,
    Euler,
    EulerHeun,
    EulerMaruyama,
    ExplicitRK,
    Milstein,
    ReversibleHeun,
    StochasticHeun,
    StochasticMidpoint,
    Heun,
    Midpoint,
    Ralston,
    Tsit5,
)
from torchmech.de.reversible_adjoint import ReversibleAdjoint
from torchmech.de.terms import AbstractTerm, ControlTerm, DiagonalControlTerm, MultiTerm, ODETerm

__all__ = [
    "solve", "SaveAt", "Solution", "Status", "Event", "cdeint",
    "AbstractTerm", "ODETerm", "ControlTerm", "DiagonalControlTerm", "MultiTerm",
    "AbstractSolver", "ButcherTableau", "ExplicitRK",
    "Euler", "Midpoint", "Heun", "Ralston", "RK4", "Bosh3", "Dopri5", "Tsit5", "Dopri8",
    "AbstractController", "ConstantStep", "StepTo", "PIDController", "rms_norm", "max_norm", "batch_rms_norm",
    "AbstractAdjoint", "DirectAdjoint", "CheckpointAdjoint", "BacksolveAdjoint", "ReversibleAdjoint",
    "AbstractBrownian", "BrownianIncrement", "BrownianInterval", "VirtualBrownianTree",
    "AbstractInterpolation", "LinearInterpolation", "RectilinearInterpolation", "CubicHermiteInterpolation",
    "NaturalCubicSpline", "fill_missing", "observational_intensity",
    "AbstractSDESolver", "EulerMaruyama", "Milstein", "StochasticHeun", "StochasticMidpoint", "EulerHeun", "SRA1", "SRI2",
    "ReversibleHeun",
]
