"""Known dynamical systems (classic benchmarks and ODEBench) and trajectory generation."""

from torchmech.systems.registry import get, names, odebench_attribution, register, true_coefficients
from torchmech.systems.simulate import Trajectory, simulate
from torchmech.systems.system import System

__all__ = ["System", "Trajectory", "get", "names", "odebench_attribution", "register", "simulate",
           "true_coefficients"]
