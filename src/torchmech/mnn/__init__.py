"""Mechanistic Neural Networks: the NeuRLP linear-ODE solver and the MechanisticBlock layer."""

from torchmech.mnn.block import MechanisticBlock, MechanisticOutput
from torchmech.mnn.linalg.blocktri import FactorizationError
from torchmech.mnn.solve import solve_linear_ode

__all__ = ["solve_linear_ode", "MechanisticBlock", "MechanisticOutput", "FactorizationError"]
