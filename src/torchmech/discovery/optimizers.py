"""Batched sparse-regression optimisers: STLSQ, SR3 and bagged ensembles."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["SparseOptimizer", "STLSQ", "SR3", "EnsembleOptimizer"]


@dataclass
class _Normalized:
    """Sufficient statistics of a (weighted) regression in float64, columns scaled to unit RMS."""

    G: torch.Tensor  # (B, F, F) normalised Gram / n
    b: torch.Tensor  # (B, F, D) normalised Theta^T dX / n
    scale: torch.Tensor  # (B, F) column RMS (1 where a column is zero)
    valid: torch.Tensor  # (B, F) bool, column not identically zero
    yy: torch.Tensor  # (B, D) mean square of the targets
    n: torch.Tensor  # (B,) number of rows (sum of the weights)


def _as_float_tensor(v, name: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(v).__name__}")
    if not v.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {v.dtype}")
    return v


def _check_problem(Theta, dX, mask, sample_weight):
    """Validate and batch: Theta (B, T, F), dX (B, T, D), mask (B, F, D) bool, weights (B, T)."""
    Theta = _as_float_tensor(Theta, "Theta")
    dX = _as_float_tensor(dX, "dX")
    if Theta.ndim not in (2, 3):
        raise ValueError(f"Theta: expected shape (T, F) or (B, T, F), got {tuple(Theta.shape)}")
    batched = Theta.ndim == 3
    if dX.ndim != Theta.ndim:
        raise ValueError(
            f"dX: expected {'(B, T, D)' if batched else '(T, D)'} to match Theta {tuple(Theta.shape)}, got {tuple(dX.shape)}"
        )
    if not batched:
        Theta, dX = Theta[None], dX[None]
    B, T, F = Theta.shape
    if dX.shape[0] != B or dX.shape[1] != T:
        raise ValueError(f"dX: expected shape ({B}, {T}, D) to match Theta {tuple(Theta.shape)}, got {tuple(dX.shape)}")
    if F < 1 or dX.shape[2] < 1:
        raise ValueError(f"Theta/dX: expected at least one feature and one target, got F={F}, D={dX.shape[2]}")
    if T < 1:
        raise ValueError("Theta: expected at least one sample (T >= 1)")
    if not torch.isfinite(Theta).all():
        raise ValueError("Theta: expected finite values, got NaN or infinite entries")
    if not torch.isfinite(dX).all():
        raise ValueError("dX: expected finite values, got NaN or infinite entries")
    D = dX.shape[2]
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask: expected a bool tensor of shape (F,), (B, F) or (B, F, D)")
        if batched or mask.ndim == 3:
            pass
        mask = mask.to(Theta.device)
        if mask.ndim == 1:
            mask = mask[None, :, None]
        elif mask.ndim == 2:
            if not batched and mask.shape == (F, D):
                mask = mask[None]
            else:
                mask = mask[:, :, None]
        elif mask.ndim == 3 and not batched:
            raise ValueError(f"mask: expected shape (F,) or (F, D) for an unbatched problem, got {tuple(mask.shape)}")
        try:
            mask = torch.broadcast_to(mask, (B, F, D))
        except RuntimeError:
            raise ValueError(f"mask: expected shape broadcastable to ({B}, {F}, {D}), got {tuple(mask.shape)}") from None
    if sample_weight is not None:
        sample_weight = _as_float_tensor(sample_weight, "sample_weight").to(Theta.device)
        if sample_weight.ndim == 1:
            sample_weight = sample_weight[None]
        try:
            sample_weight = torch.broadcast_to(sample_weight, (B, T))
        except RuntimeError:
            raise ValueError(
                f"sample_weight: expected shape ({T},) or ({B}, {T}), got {tuple(sample_weight.shape)}"
            ) from None
        if not torch.isfinite(sample_weight).all() or (sample_weight < 0).any():
            raise ValueError("sample_weight: expected finite non-negative weights")
    return Theta, dX, mask, sample_weight, batched


def _normalized_stats(Theta: torch.Tensor, dX: torch.Tensor, weight: torch.Tensor | None = None) -> _Normalized:
    """Float64 normal-equation statistics with unit-RMS columns.

    Theta (B, T, F), dX (B, T, D), weight None, (B, T) or (B, M, T). With (B, M, T) weights
    the result has batch B*M (model-major within each problem).
    """
    Th = Theta.to(torch.float64)
    Y = dX.to(torch.float64)
    if weight is None:
        n = torch.full((Th.shape[0],), float(Th.shape[1]), dtype=torch.float64, device=Th.device)
        G = Th.transpose(1, 2) @ Th
        b = Th.transpose(1, 2) @ Y
        yy = Y.square().sum(1)
    elif weight.ndim == 2:
        w = weight.to(torch.float64)
        n = w.sum(-1)
        Tw = Th * w[..., None]
        G = Tw.transpose(1, 2) @ Th
        b = Tw.transpose(1, 2) @ Y
        yy = (w[..., None] * Y.square()).sum(1)
    else:
        w = weight.to(torch.float64)  # (B, M, T)
        B, M, T = w.shape
        n = w.sum(-1).reshape(B * M)
        Tw = Th[:, None] * w[..., None]  # (B, M, T, F)
        G = (Tw.transpose(-1, -2) @ Th[:, None]).reshape(B * M, Th.shape[2], Th.shape[2])
        b = (Tw.transpose(-1, -2) @ Y[:, None]).reshape(B * M, Th.shape[2], Y.shape[2])
        yy = (w @ Y.square()).reshape(B * M, Y.shape[2])  # (B, M, T) @ (B, T, D)
    n = n.clamp_min(1e-300)
    G = G / n[:, None, None]
    b = b / n[:, None, None]
    yy = yy / n[:, None]
    ms = torch.diagonal(G, dim1=-2, dim2=-1)  # mean squares
    valid = ms > 0
    scale = torch.where(valid, ms.sqrt(), torch.ones_like(ms))
    G = G / (scale[:, :, None] * scale[:, None, :])
    b = b / scale[:, :, None]
    return _Normalized(G=G, b=b, scale=scale, valid=valid, yy=yy, n=n)


def ridge_matrices(G: torch.Tensor, support: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """The masked ridge normal matrices (B, D, F, F) of :func:`masked_ridge`: ``G_SS + diag(alpha_S)`` on the
    support of each (batch, target), identity rows and columns off it (pinning those coefficients to zero)."""
    B, F, D = support.shape
    m = support.to(G.dtype).transpose(1, 2)  # (B, D, F)
    a = torch.broadcast_to(torch.as_tensor(alpha, dtype=G.dtype, device=G.device), (B, F, D)).transpose(1, 2)
    return G[:, None] * (m[..., :, None] * m[..., None, :]) + torch.diag_embed(a * m + (1.0 - m))


def masked_ridge(G: torch.Tensor, b: torch.Tensor, support: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """Solve ridge problems restricted to a support, one per (batch, target), without loops.

    Args:
        G: (B, F, F) symmetric positive semi-definite Gram matrices.
        b: (B, F, D) right-hand sides.
        support: (B, F, D) bool; coefficients outside it are zero.
        alpha: ridge weight: a float or a tensor broadcastable to (B, F, D) (one weight per
            coefficient, e.g. (B, 1, D) per target or (B, F, 1) per feature).

    Returns:
        (B, F, D) coefficients solving ``(G_SS + diag(alpha_S)) xi_S = b_S`` per (batch, target);
        systems that are singular fall back to the pseudo-inverse.
    """
    m = support.to(G.dtype).transpose(1, 2)  # (B, D, F)
    A = ridge_matrices(G, support, alpha)
    rhs = b.transpose(1, 2) * m  # (B, D, F)
    sol, info = torch.linalg.solve_ex(A, rhs)
    bad = (info != 0) | ~torch.isfinite(sol).all(-1)
    if bad.any():
        sol = sol.clone()
        sol[bad] = (torch.linalg.pinv(A[bad], hermitian=True) @ rhs[bad][..., None])[..., 0]
    return (sol * m).transpose(1, 2)


class SparseOptimizer:
    """Base class of the batched sparse-regression optimisers.

    ``fit(Theta, dX)`` solves ``dX ~ Theta @ Xi`` with sparse ``Xi`` for every batch element at
    once and stores ``coef_``. Theta (T, F) / dX (T, D) give ``coef_`` (F, D); Theta (B, T, F) /
    dX (B, T, D) give (B, F, D), each batch element an independent problem. Internally all
    statistics are float64 (normal equations of unit-RMS columns); ``coef_`` has Theta's dtype
    and device.
    """

    def fit(
        self,
        Theta: torch.Tensor,
        dX: torch.Tensor,
        mask: torch.Tensor | None = None,
        sample_weight: torch.Tensor | None = None,
    ) -> "SparseOptimizer":
        """Fit the coefficients.

        Args:
            Theta: (T, F) or (B, T, F) features.
            dX: (T, D) or (B, T, D) targets (time derivatives).
            mask: optional bool (F,), (B, F) or (B, F, D) (unbatched: (F,) or (F, D)): features
                allowed in the model; others get coefficient 0.
            sample_weight: optional (T,) or (B, T) non-negative row weights.

        Returns:
            self, with ``coef_`` of shape (F, D) or (B, F, D).
        """
        Theta, dX, mask, sample_weight, batched = _check_problem(Theta, dX, mask, sample_weight)
        stats = _normalized_stats(Theta, dX, sample_weight)
        th = _threshold_tensor(getattr(self, "threshold", 0.0), Theta.shape[0], dX.shape[2], batched, Theta.device)
        coef = self._solve(stats, mask, th)
        coef = coef.to(Theta.dtype)
        self.coef_ = coef if batched else coef[0]
        return self

    def _initial_support(self, stats: _Normalized, mask: torch.Tensor | None) -> torch.Tensor:
        B, F, D = stats.b.shape
        support = stats.valid[:, :, None].expand(B, F, D)
        if mask is not None:
            support = support & mask
        return support

    def _solve(self, stats: _Normalized, mask: torch.Tensor | None, threshold: torch.Tensor) -> torch.Tensor:
        """Coefficients (B, F, D) in the original units; ``threshold`` is (B, 1, D) float64."""
        raise NotImplementedError


def _check_threshold(threshold, name="threshold"):
    if isinstance(threshold, torch.Tensor):
        if not torch.isfinite(threshold).all() or (threshold < 0).any():
            raise ValueError(f"{name}: expected finite values >= 0")
        return threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {threshold!r}")
    return float(threshold)


def _threshold_tensor(threshold, B: int, D: int, batched: bool, device) -> torch.Tensor:
    """The threshold as a (B, 1, D) float64 tensor.

    A number applies everywhere. A tensor is read without guessing: for a batched fit, shape (B,)
    gives one value per problem and (B, D) (or (1, D), (B, 1)) one per problem and target; for an
    unbatched fit, shape (D,) gives one value per target. Any shape broadcastable to (B, 1, D)
    with three axes is also accepted.
    """
    th = torch.as_tensor(threshold, dtype=torch.float64, device=device)
    if th.ndim == 1:
        th = th[:, None, None] if batched else th[None, None, :]
    elif th.ndim == 2:
        th = th[:, None, :]
    elif th.ndim > 3:
        th = th.reshape(-1)  # forces the error below
    try:
        return torch.broadcast_to(th, (B, 1, D))
    except RuntimeError:
        expected = f"a number, ({B},) per problem or ({B}, {D}) per problem and target" if batched else \
            f"a number or ({D},) per target"
        raise ValueError(f"threshold: expected {expected}, got a tensor of shape {tuple(torch.as_tensor(threshold).shape)}"
                         ) from None


class STLSQ(SparseOptimizer):
    """Sequentially thresholded (ridge) least squares, batched.

    Repeat: ridge fit on the current support; drop coefficients with ``|xi| < threshold``;
    stop when no support changes. Every (batch, target) pair has its own support; all are
    solved together as masked normal equations with ``torch.linalg.solve``.

    The ridge ``alpha="auto"`` adapts to the noise: it is the posterior mode of a
    Gaussian prior ``xi ~ N(0, prior_scale^2)`` on every (unscaled) coefficient under Gaussian
    residuals whose variance ``s_d^2`` is estimated per problem and target from the least-squares
    fit on all allowed features. In the mean-over-rows normal equations that is the penalty
    ``s_d^2 / (n * prior_scale^2) * |xi|^2`` (n rows): zero on exact data (so clean problems are
    solved by plain least squares, however collinear the library), growing with the noise, and
    vanishing as the data grow. It keeps ill-determined combinations of nearly collinear features
    small instead of letting them cancel with huge coefficients, which is what spoils thresholding
    on noisy data.

    Args:
        threshold: smallest kept coefficient magnitude, in the units of the returned
            coefficients: a number, or a tensor of shape (B,) (one per problem of a batched
            fit), (B, D) or (1, D) (per problem and target), or (D,) for an unbatched fit.
        alpha: a fixed ridge weight >= 0 (default 0 = plain least squares): on the
            unit-RMS-column problem (dimensionless) when ``normalize_columns``, else on the raw
            coefficients (mean-over-rows form: ``alpha * |xi|^2`` next to
            ``mean |dX - Theta xi|^2``); or ``"auto"`` (see above; recommended for noisy data,
            e.g. with :class:`~torchmech.discovery.differentiation.WeakForm`).
        max_iter: maximal thresholding rounds.
        normalize_columns: scale features to unit RMS before the ridge solve (better conditioned;
            the threshold still applies to the returned, unscaled coefficients). Only changes
            what a fixed ``alpha`` penalises.
        prior_scale: with ``alpha="auto"``, the prior standard deviation of a coefficient, in the
            units of the returned coefficients (> 0; larger = weaker ridge).

    Learned attributes: ``coef_``, ``n_iter_`` and, with ``alpha="auto"``, ``alpha_`` (B, D)
    (or (D,) unbatched): the ridge weight used on the raw coefficients.
    """

    def __init__(self, threshold: float = 0.1, alpha: float | str = 0.0, max_iter: int = 20,
                 normalize_columns: bool = True, prior_scale: float = 1.0):
        self.threshold = _check_threshold(threshold)
        if alpha != "auto" and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                                or not math.isfinite(alpha) or alpha < 0):
            raise ValueError(f"alpha: expected 'auto' or a finite number >= 0, got {alpha!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter: expected an int >= 1, got {max_iter!r}")
        if (isinstance(prior_scale, bool) or not isinstance(prior_scale, (int, float)) or not math.isfinite(prior_scale)
                or prior_scale <= 0):
            raise ValueError(f"prior_scale: expected a finite number > 0, got {prior_scale!r}")
        self.alpha = alpha if alpha == "auto" else float(alpha)
        self.max_iter = max_iter
        self.normalize_columns = bool(normalize_columns)
        self.prior_scale = float(prior_scale)

    def fit(self, Theta, dX, mask=None, sample_weight=None) -> "STLSQ":
        super().fit(Theta, dX, mask=mask, sample_weight=sample_weight)
        if hasattr(self, "alpha_") and self.coef_.ndim == 2:
            self.alpha_ = self.alpha_[0]
        return self

    fit.__doc__ = SparseOptimizer.fit.__doc__

    def _penalty(self, stats: _Normalized, support: torch.Tensor):
        """Ridge weights in normalised coordinates: a float or a (B, F, D) / (B, F, 1) tensor."""
        if self.alpha == "auto":
            s2 = _residual_variance(stats, support)  # (B, D)
            raw = s2 / (stats.n[:, None] * self.prior_scale**2)
            self.alpha_ = raw
            return raw[:, None, :] / stats.scale[:, :, None] ** 2
        if self.normalize_columns:
            return self.alpha
        return self.alpha / stats.scale[:, :, None] ** 2  # alpha |xi|^2 on raw coefficients

    def _solve(self, stats, mask, threshold):
        th = threshold
        support = self._initial_support(stats, mask)
        scale = stats.scale[:, :, None]  # (B, F, 1)
        alpha = self._penalty(stats, support)
        self.n_iter_ = 0
        for _ in range(self.max_iter):
            coef = masked_ridge(stats.G, stats.b, support, alpha) / scale
            new = support & (coef.abs() >= th)
            self.n_iter_ += 1
            if torch.equal(new, support):
                break
            support = new
        return masked_ridge(stats.G, stats.b, support, alpha) / scale

    def __repr__(self) -> str:
        return f"STLSQ(threshold={self.threshold}, alpha={self.alpha!r}, max_iter={self.max_iter})"


def _residual_variance(stats: _Normalized, support: torch.Tensor) -> torch.Tensor:
    """Mean squared residual of the least-squares fit on ``support`` (B, F, D) per target -> (B, D).

    ``mean |y|^2 - b_S^T xi_S`` with ``(G_SS + 1e-12 I) xi_S = b_S`` on the unit-RMS columns: the
    least-squares fit up to directions with relative eigenvalue below 1e-12, so collinear
    libraries are fine and exact data give (almost) zero. Clamped at 0.
    """
    xi = masked_ridge(stats.G, stats.b, support, 1e-12)  # (B, F, D)
    return (stats.yy - (stats.b * xi).sum(1)).clamp_min(0.0)


class SR3(SparseOptimizer):
    """Sparse relaxed regularised regression (Zheng et al. 2019), batched.

    Minimises ``1/2 mean|dX - Theta xi|^2 + R(w) + 1/(2 nu) |xi - w|^2`` by alternating an exact
    ridge-like update of ``xi`` (one Cholesky factorisation reused every iteration) and the
    proximal map of R on ``w``. ``R`` is l0 (hard threshold) or l1 (soft threshold); the
    penalty weights are chosen so that ``threshold`` is the coefficient magnitude, in the units
    of the returned coefficients, at which the proximal map cuts: l0 zeroes ``|w| < threshold``,
    l1 shrinks every coefficient by ``threshold``. The returned coefficients are ``w``; with
    ``unbias=True`` they are refitted by least squares on their support, and terms that the
    refit leaves below ``threshold`` are dropped (one more refit).

    Args:
        threshold: see above; a number or a tensor shaped as for :class:`STLSQ`.
        nu: relaxation parameter (> 0) on the unit-RMS-column problem. The default 100 keeps the relaxation
            weak there; at 1 (pysindy's default, on unnormalised columns) ``I / nu`` is as large as the Gram
            matrix itself and clean Lotka-Volterra came back as x' = 0, y' = 0 (10: x' = 2.0 - 1.0 y).
        thresholder: ``"l0"`` or ``"l1"``.
        max_iter: maximal iterations; tol: stop when max |w change| (normalised units) < tol.
        unbias: refit the final support by least squares.
    """

    def __init__(
        self,
        threshold: float = 0.1,
        nu: float = 100.0,
        thresholder: str = "l0",
        max_iter: int = 1000,
        tol: float = 1e-10,
        unbias: bool = True,
    ):
        self.threshold = _check_threshold(threshold)
        if isinstance(nu, bool) or not isinstance(nu, (int, float)) or not math.isfinite(nu) or nu <= 0:
            raise ValueError(f"nu: expected a finite number > 0, got {nu!r}")
        if thresholder not in ("l0", "l1"):
            raise ValueError(f"thresholder: expected 'l0' or 'l1', got {thresholder!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter: expected an int >= 1, got {max_iter!r}")
        if not tol > 0:
            raise ValueError(f"tol: expected a number > 0, got {tol!r}")
        self.nu = float(nu)
        self.thresholder = thresholder
        self.max_iter = max_iter
        self.tol = float(tol)
        self.unbias = bool(unbias)

    def _solve(self, stats, mask, threshold):
        B, F, D = stats.b.shape
        allowed = self._initial_support(stats, mask)  # (B, F, D)
        m = allowed.to(torch.float64).transpose(1, 2)  # (B, D, F)
        G = stats.G[:, None] * (m[..., :, None] * m[..., None, :])  # (B, D, F, F)
        H = G + torch.eye(F, dtype=G.dtype, device=G.device) / self.nu
        L, info = torch.linalg.cholesky_ex(H)
        rhs0 = stats.b.transpose(1, 2) * m  # (B, D, F)
        # threshold in normalised units: |w_orig| = |w_norm| / scale
        cut = threshold.transpose(1, 2) * stats.scale[:, None, :]  # (B, D, F)
        w = torch.cholesky_solve(rhs0[..., None], L)[..., 0]  # least-squares-like start
        w = self._prox(w, cut) * m
        self.n_iter_ = 0
        for _ in range(self.max_iter):
            xi = torch.cholesky_solve((rhs0 + w / self.nu)[..., None], L)[..., 0]
            w_new = self._prox(xi, cut) * m
            delta = (w_new - w).abs().max() if w.numel() else torch.zeros(())
            w = w_new
            self.n_iter_ += 1
            if delta < self.tol:
                break
        support = (w != 0).transpose(1, 2)
        if self.unbias:
            coef = masked_ridge(stats.G, stats.b, support, 0.0)
            # l1 shrinkage can leave tiny terms that the refit sends below the cut: drop them, refit.
            keep = support & (coef.abs() >= cut.transpose(1, 2))
            if not torch.equal(keep, support):
                coef = masked_ridge(stats.G, stats.b, keep, 0.0)
        else:
            coef = w.transpose(1, 2)
        return coef / stats.scale[:, :, None]

    def _prox(self, v, cut):
        if self.thresholder == "l0":
            return torch.where(v.abs() >= cut, v, torch.zeros_like(v))
        return torch.sign(v) * (v.abs() - cut).clamp_min(0.0)

    def __repr__(self) -> str:
        return f"SR3(threshold={self.threshold}, nu={self.nu}, thresholder={self.thresholder!r})"


class EnsembleOptimizer(SparseOptimizer):
    """Bagging ensemble (E-SINDy style) around a base optimiser, batched over problems and models.

    Every one of ``n_models`` models is fitted by ``base`` on a bootstrap of the rows (sample
    bagging: multinomial row weights, no copies of the data) and/or a random subset of the
    library (library bagging: ``n_drop`` features removed per model). All B * n_models fits
    run in ONE call of the base optimiser.

    Args:
        base: a :class:`STLSQ` or :class:`SR3` (any :class:`SparseOptimizer`).
        n_models: ensemble size.
        bagging: resample rows (bootstrap with replacement of ``n_subset`` rows).
        n_subset: rows per bootstrap sample (default: all T).
        library_bagging: drop ``n_drop`` random features per model.
        n_drop: features dropped per model under library bagging.
        aggregation: ``"median"`` or ``"mean"`` of the models' coefficients (over the models in
            which a feature was offered; with an even count the median is the lower middle value,
            so it is always one model's coefficient and exactly zero when most models drop a term).
        inclusion_threshold: optional; aggregated coefficients whose inclusion probability is
            below it are set to zero (E-SINDy's inclusion rule).
        seed: seed of the resampling generator.

    Learned attributes: ``coef_`` (aggregated), ``coefs_`` (B, n_models, F, D) (or
    (n_models, F, D) unbatched) and ``inclusion_probabilities_`` (B, F, D) (or (F, D)): the
    fraction of models, among those offered the feature, that kept it.
    """

    def __init__(
        self,
        base: SparseOptimizer | None = None,
        n_models: int = 20,
        bagging: bool = True,
        n_subset: int | None = None,
        library_bagging: bool = False,
        n_drop: int = 1,
        aggregation: str = "median",
        seed: int | None = None,
        inclusion_threshold: float | None = None,
    ):
        if base is None:
            base = STLSQ()
        if not isinstance(base, SparseOptimizer) or isinstance(base, EnsembleOptimizer):
            raise TypeError(f"base: expected a non-ensemble SparseOptimizer such as STLSQ, got {type(base).__name__}")
        if isinstance(n_models, bool) or not isinstance(n_models, int) or n_models < 1:
            raise ValueError(f"n_models: expected an int >= 1, got {n_models!r}")
        if not bagging and not library_bagging:
            raise ValueError("bagging/library_bagging: expected at least one of them True, got both False")
        if n_subset is not None and (isinstance(n_subset, bool) or not isinstance(n_subset, int) or n_subset < 1):
            raise ValueError(f"n_subset: expected None or an int >= 1, got {n_subset!r}")
        if isinstance(n_drop, bool) or not isinstance(n_drop, int) or n_drop < 1:
            raise ValueError(f"n_drop: expected an int >= 1, got {n_drop!r}")
        if aggregation not in ("median", "mean"):
            raise ValueError(f"aggregation: expected 'median' or 'mean', got {aggregation!r}")
        if inclusion_threshold is not None and not (
            isinstance(inclusion_threshold, (int, float)) and 0 <= inclusion_threshold <= 1
        ):
            raise ValueError(f"inclusion_threshold: expected None or a number in [0, 1], got {inclusion_threshold!r}")
        self.inclusion_threshold = inclusion_threshold
        self.base = base
        self.n_models = n_models
        self.bagging = bool(bagging)
        self.n_subset = n_subset
        self.library_bagging = bool(library_bagging)
        self.n_drop = n_drop
        self.aggregation = aggregation
        self.seed = seed

    def fit(self, Theta, dX, mask=None, sample_weight=None) -> "EnsembleOptimizer":
        """Fit all models; shapes as :meth:`SparseOptimizer.fit`. Returns self."""
        Theta, dX, mask, sample_weight, batched = _check_problem(Theta, dX, mask, sample_weight)
        B, T, F = Theta.shape
        D = dX.shape[2]
        M = self.n_models
        gen = torch.Generator(device="cpu")
        if self.seed is not None:
            gen.manual_seed(self.seed)
        else:
            gen.seed()
        dev = Theta.device
        if self.bagging:
            n = self.n_subset or T
            rows = torch.randint(0, T, (B, M, n), generator=gen)
            w = torch.zeros(B, M, T, dtype=torch.float64)
            w.scatter_add_(2, rows, torch.ones(B, M, n, dtype=torch.float64))
            w = w.to(dev)
        else:
            w = torch.ones(B, M, T, dtype=torch.float64, device=dev)
        if sample_weight is not None:
            w = w * sample_weight[:, None, :].to(torch.float64)
        offered = torch.ones(B, M, F, dtype=torch.bool)
        if self.library_bagging:
            if self.n_drop >= F:
                raise ValueError(f"n_drop: expected fewer than the {F} library features, got {self.n_drop}")
            drop = torch.rand(B, M, F, generator=gen).argsort(-1)[..., : self.n_drop]
            offered.scatter_(2, drop, False)
        offered = offered.to(dev)
        stats = _normalized_stats(Theta, dX, w)  # batch B*M
        full_mask = offered[..., None].expand(B, M, F, D)
        if mask is not None:
            full_mask = full_mask & mask[:, None]
        # every model of problem b uses problem b's threshold (stats are model-major within problems)
        th = _threshold_tensor(getattr(self.base, "threshold", 0.0), B, D, batched, dev).repeat_interleave(M, 0)
        coefs = self.base._solve(stats, full_mask.reshape(B * M, F, D), th).reshape(B, M, F, D)
        coefs = coefs.to(Theta.dtype)
        avail = offered[..., None].expand(B, M, F, D)
        nan = torch.full_like(coefs, float("nan"))
        masked = torch.where(avail, coefs, nan)
        if self.aggregation == "median":
            agg = torch.nanmedian(masked, dim=1).values
        else:
            agg = torch.nanmean(masked, dim=1)
        agg = torch.nan_to_num(agg, nan=0.0)
        n_avail = avail.sum(1).clamp_min(1)
        incl = ((coefs != 0) & avail).sum(1).to(Theta.dtype) / n_avail.to(Theta.dtype)
        if self.inclusion_threshold is not None:
            agg = torch.where(incl >= self.inclusion_threshold, agg, torch.zeros_like(agg))
        self.coefs_ = coefs if batched else coefs[0]
        self.coef_ = agg if batched else agg[0]
        self.inclusion_probabilities_ = incl if batched else incl[0]
        return self

    def __repr__(self) -> str:
        return (
            f"EnsembleOptimizer(base={self.base!r}, n_models={self.n_models}, bagging={self.bagging}, "
            f"library_bagging={self.library_bagging}, aggregation={self.aggregation!r})"
        )
