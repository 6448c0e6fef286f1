"""SINDy: sparse identification of nonlinear dynamics (library + derivative estimate + sparse regression)."""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch

from torchmech.discovery.base import BaseDiscovery, _tensor, as_trajectories
from torchmech.discovery.differentiation import Differentiator, FiniteDifference, check_xt
from torchmech.discovery.library import Library, PolynomialLibrary
from torchmech.discovery.optimizers import SparseOptimizer, STLSQ

__all__ = ["SINDy", "fit_sindy_batch"]


def _check_parts(library, differentiation, optimizer):
    library = PolynomialLibrary(degree=2) if library is None else library
    differentiation = FiniteDifference(order=2) if differentiation is None else differentiation
    optimizer = STLSQ(threshold=0.1) if optimizer is None else optimizer
    if not isinstance(library, Library):
        raise TypeError(f"library: expected a torchmech.discovery Library, got {type(library).__name__}")
    if not (isinstance(differentiation, Differentiator) or callable(differentiation)):
        raise TypeError("differentiation: expected a Differentiator (or a callable (x, t) -> dx), got "
                        f"{type(differentiation).__name__}")
    if not isinstance(optimizer, SparseOptimizer):
        raise TypeError(f"optimizer: expected a SparseOptimizer such as STLSQ, got {type(optimizer).__name__}")
    return library, differentiation, optimizer


class SINDy(BaseDiscovery):
    """Sparse identification of nonlinear dynamics (Brunton, Proctor & Kutz 2016), in torch.

    The model is ``x' = C @ library([x, u])`` with a sparse (D, F) matrix ``C``: the derivatives
    are estimated from the data by ``differentiation``, the library is evaluated on the samples,
    and ``optimizer`` solves the sparse regression. Runs on the device and in the dtype of the
    data (the regression's normal equations are accumulated in float64).

    Args:
        library: feature library (default ``PolynomialLibrary(degree=2)``).
        differentiation: derivative estimator (default ``FiniteDifference(order=2)``).
        optimizer: sparse regression (default ``STLSQ(threshold=0.1)``); an
            :class:`~torchmech.discovery.optimizers.EnsembleOptimizer` also gives
            ``inclusion_probabilities_``.

    Learned attributes (after :meth:`fit`): ``coefficients_`` (D, F), ``feature_names_``,
    ``variable_names_``, ``control_names_``, ``optimizer_`` (the fitted copy of ``optimizer``),
    ``n_samples_``, and ``inclusion_probabilities_`` (D, F) with an ensemble optimiser.

    Example::

        model = SINDy(optimizer=STLSQ(threshold=0.2)).fit(x, t)   # x (T, 3), t (T,)
        model.print()            # x' = -10.000 x + 10.000 y ...
        x_sim = model.simulate(x[0], t)
    """

    def __init__(self, library: Library | None = None, differentiation: Differentiator | None = None,
                 optimizer: SparseOptimizer | None = None):
        self.library, self.differentiation, self.optimizer = _check_parts(library, differentiation, optimizer)

    def fit(self, x: Any, t: Any, u: Any = None, x_dot: Any = None, variable_names: Sequence[str] | None = None,
            control_names: Sequence[str] | None = None) -> "SINDy":
        """Fit the sparse model to one or several trajectories.

        Args:
            x: one trajectory (T, D), a batch (B, T, D) or a list of (T_i, D): all trajectories
                of the same system, pooled into one regression.
            t: (T,) times (shared), (B, T), a list of (T_i,), or a number (the time step).
            u: optional control inputs, same layout as ``x`` with M columns; the library is
                evaluated on ``[x, u]`` and only ``x``'s derivatives are modelled.
            x_dot: optional known derivatives (same layout as ``x``) instead of estimating them.
            variable_names: D state names (default ``x, y, z`` or ``x0, x1, ...``).
            control_names: M control names (default ``u`` or ``u0, u1, ...``).

        Returns:
            self.
        """
        xs, ts, us = as_trajectories(x, t, u, min_samples=getattr(self.differentiation, "min_points", 2))
        D = xs[0].shape[-1]
        M = 0 if us is None else us[0].shape[-1]
        vnames, cnames = self._names(variable_names, D, control_names, M)
        if x_dot is not None:
            dxs, _, _ = as_trajectories(x_dot, ts)
            for i, (a, b) in enumerate(zip(dxs, xs)):
                if a.shape != b.shape:
                    raise ValueError(f"x_dot[{i}]: expected shape {tuple(b.shape)} like x, got {tuple(a.shape)}")
        elif all(a.shape == xs[0].shape for a in xs) and len(xs) > 1:
            dxs = list(self.differentiation(torch.stack(xs), torch.stack(ts)).unbind(0))  # one batched call
        else:
            dxs = [self.differentiation(a, ti) for a, ti in zip(xs, ts)]
        inputs = [a if us is None else torch.cat([a, c], -1) for a, c in zip(xs, us or [None] * len(xs))]
        Theta = self.library.transform(torch.cat(inputs))
        dX = torch.cat(dxs).to(dtype=Theta.dtype, device=Theta.device)
        F = Theta.shape[-1]
        if Theta.shape[0] < F:
            raise ValueError(f"x: {Theta.shape[0]} samples in all, fewer than the {F} library features; "
                             "pass more data or a smaller library")
        if not torch.isfinite(Theta).all():
            raise ValueError("library: non-finite feature values on the data (e.g. a division by zero or log of "
                             "a negative number)")
        if not torch.isfinite(dX).all():
            raise ValueError("differentiation: produced non-finite derivatives")
        opt = copy.deepcopy(self.optimizer).fit(Theta, dX)
        self.optimizer_ = opt
        self.n_samples_ = int(Theta.shape[0])
        self._set_fit(opt.coef_.T.contiguous(), vnames, cnames)
        if hasattr(opt, "inclusion_probabilities_"):
            self.inclusion_probabilities_ = opt.inclusion_probabilities_.T.contiguous()
        return self

    def __repr__(self) -> str:
        return f"SINDy(library={self.library!r}, differentiation={self.differentiation!r}, optimizer={self.optimizer!r})"


def fit_sindy_batch(x: torch.Tensor, t: Any, library: Library | None = None,
                    differentiation: Differentiator | None = None,
                    optimizer: SparseOptimizer | None = None) -> torch.Tensor:
    """Fit B independent SINDy problems (systems, trajectories, noise seeds) in one batched call.

    Args:
        x: (B, T, D) trajectories; problem b is fitted on ``x[b]`` alone.
        t: (T,) shared times, (B, T) per-problem times, or a number (the time step).
        library, differentiation, optimizer: as in :class:`SINDy` (same defaults). The optimiser's
            ``threshold`` may be a tensor of shape (B,) (one per problem) or (B, D) (one per
            problem and variable).

    Returns:
        (B, D, F) coefficients, ``x'_d = sum_f C[b, d, f] feature_f(x)`` for problem b.
    """
    library, differentiation, optimizer = _check_parts(library, differentiation, optimizer)
    x = _tensor(x, "x")
    if x.ndim != 3:
        raise ValueError(f"x: expected a batch of problems of shape (B, T, D), got {tuple(x.shape)}")
    x, tt = check_xt(x, t, getattr(differentiation, "min_points", 2))
    dx = differentiation(x, tt.to(x.device))
    Theta = library.transform(x)
    if not torch.isfinite(Theta).all():
        raise ValueError("library: non-finite feature values on the data")
    opt = copy.deepcopy(optimizer).fit(Theta, dx.to(Theta.dtype))
    return opt.coef_.transpose(-1, -2).contiguous()
