"""Equation discovery: feature libraries, derivative estimators, sparse regression, SINDy, MNN discovery, metrics."""

from torchmech.discovery import metrics
from torchmech.discovery.base import BaseDiscovery, as_trajectories, format_equations, sympy_to_coefficients
from torchmech.discovery.differentiation import (
    Differentiator,
    FiniteDifference,
    SavitzkyGolay,
    SmoothingSpline,
    TotalVariation,
    WeakForm,
)
from torchmech.discovery.library import (
    ConcatLibrary,
    CustomLibrary,
    FourierLibrary,
    Library,
    PolynomialLibrary,
    TensorLibrary,
)
from torchmech.discovery.mechanistic import MechanisticDiscovery, fit_mechanistic
from torchmech.discovery.optimizers import SR3, STLSQ, EnsembleOptimizer, SparseOptimizer
from torchmech.discovery.sindy import (SINDy, SINDyCV, backward_path, fit_sindy_batch, fit_sindy_cv, select_support,
                                      select_threshold)

__all__ = [
    "BaseDiscovery", "SINDy", "SINDyCV", "fit_sindy_cv", "select_threshold", "select_support", "backward_path", "MechanisticDiscovery", "fit_mechanistic", "fit_sindy_batch", "as_trajectories", "format_equations", "sympy_to_coefficients",
    "Library", "PolynomialLibrary", "FourierLibrary", "CustomLibrary", "ConcatLibrary", "TensorLibrary",
    "Differentiator", "FiniteDifference", "SavitzkyGolay", "SmoothingSpline", "TotalVariation", "WeakForm",
    "SparseOptimizer", "STLSQ", "SR3", "EnsembleOptimizer", "metrics",
]
