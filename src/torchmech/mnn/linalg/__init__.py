"""Solvers for the NeuRLP normal equations: dense reference, sequential and parallel block-banded."""

from torchmech.mnn.linalg.blocktri import CyclicReduction, SequentialCholesky, FactorizationError

__all__ = ["CyclicReduction", "SequentialCholesky", "FactorizationError"]
