"""Mechanistic Neural Networks: the NeuRLP linear-ODE solver and the Mechanistic Block."""

from torchmech.mnn.linalg.blocktri import FactorizationError
from torchmech.mnn.solve import solve_linear_ode

__all__ = ["solve_linear_ode", "FactorizationError"]
