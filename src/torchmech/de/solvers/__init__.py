"""Solvers for torchmech.de: tableau-driven explicit Runge-Kutta methods."""

from torchmech.de.solvers.explicit import (
    RK4,
    Bosh3,
    Dopri5,
    Dopri8,
    Euler,
    Heun,
    Midpoint,
    Ralston,
    Tsit5,
)
from torchmech.de.solvers.sde import (
    SRA1,
    SRI2,
    AbstractSDESolver,
    EulerHeun,
    EulerMaruyama,
    Milstein,
    ReversibleHeun,
    StochasticHeun,
    StochasticMidpoint,
)
from torchmech.de.solvers.rk import AbstractSolver, ButcherTableau, ExplicitRK, StepResult

__all__ = [
    "AbstractSolver", "ButcherTableau", "ExplicitRK", "StepResult",
    "Euler", "Midpoint", "Heun", "Ralston", "RK4", "Bosh3", "Dopri5", "Tsit5", "Dopri8",
    "AbstractSDESolver", "EulerMaruyama", "Milstein", "StochasticHeun", "StochasticMidpoint", "EulerHeun", "SRA1", "SRI2",
    "ReversibleHeun",
]
