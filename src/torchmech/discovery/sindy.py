"""SINDy: sparse identification of nonlinear dynamics (library + derivative estimate + sparse regression)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from torchmech.discovery.base import BaseDiscovery, _tensor, as_trajectories
from torchmech.discovery.differentiation import Differentiator, FiniteDifference, check_xt
from torchmech.discovery.library import Library, PolynomialLibrary
from torchmech.discovery.optimizers import SparseOptimizer, STLSQ, _normalized_stats, masked_ridge, ridge_matrices

__all__ = ["SINDy", "fit_sindy_batch", "fit_sindy_cv", "SINDyCV", "select_threshold", "select_support", "backward_path"]


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
        differentiation: derivative estimator (default ``FiniteDifference(order=2)``); a
            :class:`~torchmech.discovery.differentiation.WeakForm` makes this weak SINDy (the
            regression rows are test-function windows instead of samples: much more robust to
            noise and exact on clean data).
        optimizer: sparse regression (default ``STLSQ(threshold=0.1)``); an
            :class:`~torchmech.discovery.optimizers.EnsembleOptimizer` also gives
            ``inclusion_probabilities_``.

    Learned attributes (after :meth:`fit`): ``coefficients_`` (D, F), ``feature_names_``,
    ``variable_names_``, ``control_names_``, ``optimizer_`` (the fitted copy of ``optimizer``),
    ``n_samples_`` (regression rows: samples, or windows in weak form), and ``inclusion_probabilities_`` (D, F) with an ensemble optimiser.

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
        inputs = [a if us is None else torch.cat([a, c], -1) for a, c in zip(xs, us or [None] * len(xs))]
        same = len(xs) > 1 and all(a.shape == xs[0].shape for a in xs)
        weak = x_dot is None and _is_weak(self.differentiation)
        if weak:  # weak SINDy: rows are test-function windows, no pointwise derivative
            if same:
                X = torch.stack(xs)
                Fw, dXw = self.differentiation.weak_system(X, torch.stack(ts), self._library_values(torch.stack(inputs)))
                Theta, dX = Fw.flatten(0, 1), dXw.flatten(0, 1)
            else:
                pairs = [self.differentiation.weak_system(a, ti, self._library_values(c))
                         for a, ti, c in zip(xs, ts, inputs)]
                Theta, dX = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        else:
            if x_dot is not None:
                dxs, _, _ = as_trajectories(x_dot, ts)
                for i, (a, b) in enumerate(zip(dxs, xs)):
                    if a.shape != b.shape:
                        raise ValueError(f"x_dot[{i}]: expected shape {tuple(b.shape)} like x, got {tuple(a.shape)}")
            elif same:
                dxs = list(self.differentiation(torch.stack(xs), torch.stack(ts)).unbind(0))  # one batched call
            else:
                dxs = [self.differentiation(a, ti) for a, ti in zip(xs, ts)]
            Theta = self._library_values(torch.cat(inputs))
        dX = (dX if weak else torch.cat(dxs)).to(dtype=Theta.dtype, device=Theta.device)
        F = Theta.shape[-1]
        if Theta.shape[0] < F:
            rows = "weak-form windows" if weak else "samples"
            raise ValueError(f"x: {Theta.shape[0]} {rows} in all, fewer than the {F} library features; "
                             "pass more data or a smaller library")
        if not torch.isfinite(dX).all():
            raise ValueError("differentiation: produced non-finite derivatives")
        opt = copy.deepcopy(self.optimizer).fit(Theta, dX)
        self.optimizer_ = opt
        self.n_samples_ = int(Theta.shape[0])
        self._set_fit(opt.coef_.T.contiguous(), vnames, cnames)
        if hasattr(opt, "inclusion_probabilities_"):
            self.inclusion_probabilities_ = opt.inclusion_probabilities_.T.contiguous()
        return self

    def _library_values(self, inputs: torch.Tensor) -> torch.Tensor:
        Theta = self.library.transform(inputs)
        if not torch.isfinite(Theta).all():
            raise ValueError("library: non-finite feature values on the data (e.g. a division by zero or log of "
                             "a negative number)")
        return Theta

    def __repr__(self) -> str:
        return f"SINDy(library={self.library!r}, differentiation={self.differentiation!r}, optimizer={self.optimizer!r})"


def fit_sindy_batch(x: torch.Tensor, t: Any, library: Library | None = None,
                    differentiation: Differentiator | None = None,
                    optimizer: SparseOptimizer | None = None) -> torch.Tensor:
    """Fit B independent SINDy problems (systems, trajectories, noise seeds) in one batched call.

    Args:
        x: (B, T, D) trajectories; problem b is fitted on ``x[b]`` alone.
        t: (T,) shared times, (B, T) per-problem times, or a number (the time step).
        library, differentiation, optimizer: as in :class:`SINDy` (same defaults; a
            :class:`~torchmech.discovery.differentiation.WeakForm` fits weak SINDy). The
            optimiser's ``threshold`` may be a tensor of shape (B,) (one per problem) or (B, D)
            (one per problem and variable).

    Returns:
        (B, D, F) coefficients, ``x'_d = sum_f C[b, d, f] feature_f(x)`` for problem b.
    """
    library, differentiation, optimizer = _check_parts(library, differentiation, optimizer)
    Theta, dx = _regression_rows(x, t, library, differentiation)
    opt = copy.deepcopy(optimizer).fit(Theta, dx)
    return opt.coef_.transpose(-1, -2).contiguous()


def _is_weak(differentiation) -> bool:
    return callable(getattr(differentiation, "weak_system", None))


def _regression_rows(x, t, library, differentiation) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched regression rows: features (B, N, F) and derivative targets (B, N, D).

    N = T samples (pointwise derivatives) or the number of windows (a weak-form ``differentiation``).
    """
    x = _tensor(x, "x")
    if x.ndim != 3:
        raise ValueError(f"x: expected a batch of problems of shape (B, T, D), got {tuple(x.shape)}")
    x, tt = check_xt(x, t, getattr(differentiation, "min_points", 2))
    tt = tt.to(x.device)
    Theta = library.transform(x)
    if not torch.isfinite(Theta).all():
        raise ValueError("library: non-finite feature values on the data")
    if _is_weak(differentiation):
        Theta, dx = differentiation.weak_system(x, tt, Theta)
    else:
        dx = differentiation(x, tt)
    if not torch.isfinite(dx).all():
        raise ValueError("differentiation: produced non-finite derivatives")
    return Theta, dx.to(Theta.dtype)


def _log(e: torch.Tensor) -> torch.Tensor:
    """Fold scores: log held-out errors (float64; exact fits score the log of the tiniest positive)."""
    return torch.log(e.clamp_min(torch.finfo(torch.float64).tiny))


def _drop_null(e: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """Held-out errors (M, ..., K) with the null candidates (M, ...) made inadmissible (inf) unless one of
    them has the smallest mean log error."""
    score = _log(e).mean(-1)
    null_best = null.gather(0, score.argmin(0)[None])[0]
    return torch.where((null & ~null_best)[..., None], torch.full_like(e, float("inf")), e)


def select_threshold(cv_error: torch.Tensor, one_se: bool = True, size: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the chosen threshold from held-out errors along an increasing threshold grid.

    Args:
        cv_error: (G, ..., K) held-out mean squared errors for G increasing thresholds and K folds
            (any batch axes between, e.g. (G, B, D, K): one choice per problem and equation).
        one_se: the one-standard-error rule (Hastie, Tibshirani & Friedman, Elements of Statistical
            Learning, 7.10): the LARGEST threshold (sparsest model) whose mean score is at most the
            smallest mean score plus the standard error (over folds) of that best threshold's fold
            scores. False: the threshold of the smallest mean score.
        size: optional (G, ...) number of terms of each threshold's model. Given it, a null model (no
            terms) is chosen only when its mean score is the smallest (see :func:`select_support`).

    The score of a fold is the LOGARITHM of its held-out error: blocked folds of one trajectory
    differ by orders of magnitude (a held-out transient outside the region the other blocks cover
    is extrapolated), and on the log scale such a fold counts by its ratios between thresholds
    instead of swamping the others.

    Returns:
        (...) long indices into the grid. The rule sees only held-out errors of the data: it is
        the same for any estimator that produces them (the benchmark applies it to PySINDy too).
    """
    e = torch.as_tensor(cv_error, dtype=torch.float64)
    if e.ndim < 2 or e.shape[0] < 1 or e.shape[-1] < 1:
        raise ValueError(f"cv_error: expected shape (G, ..., K) with G, K >= 1, got {tuple(e.shape)}")
    e = torch.nan_to_num(e, nan=float("inf"), posinf=float("inf"))
    if size is not None:
        size = torch.as_tensor(size, device=e.device)
        if size.shape != e.shape[:-1]:
            raise ValueError(f"size: expected shape {tuple(e.shape[:-1])} (cv_error without its fold axis), "
                             f"got {tuple(size.shape)}")
        e = _drop_null(e, size == 0)
    e = _log(e)
    mean = e.mean(-1)  # (G, ...)
    best = mean.argmin(0)  # (...)
    if not one_se:
        return best
    K = e.shape[-1]
    at_best = e.gather(0, best[None, ..., None].expand((1,) + e.shape[1:]))[0]  # (..., K)
    se = at_best.std(-1, correction=1) / K**0.5 if K > 1 else torch.zeros_like(at_best[..., 0])
    limit = mean.gather(0, best[None])[0] + torch.nan_to_num(se, nan=0.0)
    ok = mean <= limit  # always true at the best threshold
    grid = torch.arange(e.shape[0], device=e.device).reshape((-1,) + (1,) * (e.ndim - 2))
    return torch.where(ok, grid, torch.full_like(grid, -1)).amax(0)


# search="support": held-out errors below this fraction of the held-out targets' mean square count as exact
# (a relative RMS of 1e-5). Without the floor, supersets of the true support that also fit the weak form's
# discretisation error (or round-off) win the one-SE rule on the log scale on clean data; the benchmark's
# clean-data exact-recovery rate is the same for floors from 1e-10 to 1e-8 and 1.3 points lower at 1e-12.
_EXACT_FLOOR = 1e-10
# Ridge floor (unit-RMS columns) for the backward path's inverse when the fit's own ridge is 0 (exact data,
# collinear libraries): it only ranks the terms and does not change the refitted coefficients.
_BACKWARD_RIDGE = 1e-10


def backward_path(G: torch.Tensor, b: torch.Tensor, allowed: torch.Tensor, alpha) -> torch.Tensor:
    """Backward elimination on ridge normal equations: nested supports from all allowed terms down to one.

    Each step removes, per (problem, target), the term whose removal raises the minimum of the ridge
    objective ``xi^T (G + diag(alpha)) xi - 2 b^T xi`` least: ``xi_j^2 / [(G + diag(alpha))_S^-1]_jj`` (the
    classical stepwise criterion, a squared t-statistic up to the noise variance). Unlike thresholding
    on ``|xi_j|`` it compares terms by how much of the fit they carry, so a small but necessary
    coefficient is not dropped before a large one that a collinear neighbour can replace.

    Args:
        G: (B, F, F) Gram matrices (unit-RMS columns); b: (B, F, D); allowed: (B, F, D) bool (the start);
        alpha: ridge weights broadcastable to (B, F, D) (floored at 1e-10 for the ranking).

    Returns:
        (F, B, F, D) bool: step k has ``max(n_allowed - k, 1)`` terms per (problem, target).
    """
    B, F, D = b.shape
    a = torch.broadcast_to(torch.as_tensor(alpha, dtype=G.dtype, device=G.device), (B, F, D)).clamp_min(
        _BACKWARD_RIDGE)
    support = allowed.clone()
    out = [support.clone()]
    for _ in range(F - 1):
        Ainv = torch.linalg.pinv(ridge_matrices(G, support, a), hermitian=True)  # (B, D, F, F)
        m = support.transpose(1, 2)  # (B, D, F)
        xi = (Ainv @ (b.transpose(1, 2) * m)[..., None])[..., 0]
        score = xi.square() / torch.diagonal(Ainv, dim1=-2, dim2=-1).clamp_min(torch.finfo(G.dtype).tiny)
        score = torch.where(m, score, torch.full_like(score, float("inf")))
        drop = torch.nn.functional.one_hot(score.argmin(-1), F).bool() & (m.sum(-1, keepdim=True) > 1)
        support = support & ~drop.transpose(1, 2)
        out.append(support.clone())
    return torch.stack(out)


def _refit(stats, supports: torch.Tensor, alpha) -> torch.Tensor:
    """Ridge fits (raw units) of every candidate support: supports (M, B, F, D) -> (M, B, F, D)."""
    M, B, F, D = supports.shape
    s = supports.permute(1, 2, 0, 3).reshape(B, F, M * D)
    a = torch.broadcast_to(torch.as_tensor(alpha, dtype=stats.G.dtype, device=stats.G.device), (B, F, D))
    coef = masked_ridge(stats.G, stats.b.repeat(1, 1, M), s, a.repeat(1, 1, M)) / stats.scale[:, :, None]
    return coef.reshape(B, F, M, D).permute(2, 0, 1, 3)


def _support_cv(Theta, dx, optimizer: STLSQ, grid_path: torch.Tensor, block: torch.Tensor, folds: int,
                one_se: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """search="support" of fit_sindy_cv: candidates (M, B, D, F), held-out errors (M, B, D, K), choice (B, D)."""
    B, N, F = Theta.shape
    D = dx.shape[-1]

    def penalty(stats):
        # the optimiser's own ridge for its fit on all features (a fixed alpha, or "auto" from the full fit)
        full = stats.valid[:, :, None].expand(B, F, D)
        return copy.deepcopy(optimizer)._penalty(stats, full)

    stats = _normalized_stats(Theta, dx)
    alpha = penalty(stats)
    allowed = stats.valid[:, :, None].expand(B, F, D)
    supports = torch.cat([grid_path.transpose(2, 3) != 0, backward_path(stats.G, stats.b, allowed, alpha)])
    candidates = _refit(stats, supports, alpha).transpose(2, 3)  # (M, B, D, F)
    errors = []
    for k in range(folds):
        train = (block != k).to(Theta.dtype).expand(B, N)
        st = _normalized_stats(Theta, dx, train)
        C = _refit(st, supports, penalty(st))  # (M, B, F, D)
        held = block == k
        err = (torch.einsum("bnf,mbfd->mbnd", Theta[:, held].double(), C) - dx[None, :, held].double())
        scale = dx[:, held].double().square().mean(-2)  # (B, D)
        errors.append(torch.maximum(err.square().mean(-2), _EXACT_FLOOR * scale))
    cv_error = torch.stack(errors, -1)  # (M, B, D, K)
    return candidates, cv_error, select_support(cv_error, supports.sum(2), one_se)


def select_support(cv_error: torch.Tensor, size: torch.Tensor, one_se: bool = True) -> torch.Tensor:
    """Index of the chosen candidate from held-out errors of candidate supports in any order.

    Args:
        cv_error: (M, ..., K) held-out errors of M candidates (K folds); size: (M, ...) their number of terms.
        one_se: as in :func:`select_threshold`, over the candidates ordered from the most terms to the
            fewest: the sparsest candidate whose mean log error is within one standard error of the best.
            Among equally sparse candidates the one with the smaller mean log error is preferred.

    The null model (no terms: the variable does not change) is chosen only when its mean log error is
    the smallest: the one-SE rule trades an insignificant loss of fit for a simpler description of the
    dynamics, and "no dynamics" is not one. It matters for trajectories that settle within the first
    block: the blocks after the transient cannot tell ``x' = 0`` from the true model, the spread of the
    fold scores is then mostly the transient block's, and the null model hides inside one standard error.

    Returns:
        (...) long indices into the M candidates.
    """
    e = torch.as_tensor(cv_error, dtype=torch.float64)
    size = torch.as_tensor(size, device=e.device).to(torch.float64)
    if e.ndim < 2 or size.shape != e.shape[:-1]:
        raise ValueError(f"size: expected shape {tuple(e.shape[:-1])} (cv_error without its fold axis), "
                         f"got {tuple(size.shape)}")
    e = _drop_null(torch.nan_to_num(e, nan=float("inf")), size == 0)
    score = _log(e).mean(-1)
    # select_threshold takes the LAST admissible entry: order by size descending, then by error descending
    order = torch.argsort(-size * 1e6 - score.clamp(-1e5, 1e5), dim=0, stable=True)
    ranked = e.gather(0, order[..., None].expand(e.shape))
    return order.gather(0, select_threshold(ranked, one_se)[None])[0]


@dataclass
class SINDyCV:
    """Result of :func:`fit_sindy_cv`.

    Attributes:
        coefficients: (B, D, F) the selected model per problem (each equation at its own threshold
            when ``per_equation``).
        threshold: (B, D) the selected threshold per problem and equation (``search="support"``:
            NaN where the chosen support came from the backward-elimination path).
        index: (B, D) its index along ``path``.
        thresholds: (G,) the increasing grid.
        path: (M, B, D, F) the candidate models fitted on all rows: M = G, one per threshold, or with
            ``search="support"`` M = G + F: the G threshold fits, then the backward-elimination path
            from all F features down to one.
        cv_error: (M, B, D, K) held-out mean squared error of the derivative targets per fold.
    """

    coefficients: torch.Tensor
    threshold: torch.Tensor
    index: torch.Tensor
    thresholds: torch.Tensor
    path: torch.Tensor
    cv_error: torch.Tensor


def _with_threshold(optimizer: SparseOptimizer, threshold: float) -> SparseOptimizer:
    opt = copy.deepcopy(optimizer)
    target = opt if hasattr(opt, "threshold") else getattr(opt, "base", None)
    if target is None or not hasattr(target, "threshold"):
        raise TypeError(f"optimizer: {type(optimizer).__name__} has no threshold to select")
    target.threshold = float(threshold)
    return opt


def fit_sindy_cv(x: torch.Tensor, t: Any, library: Library | None = None,
                 differentiation: Differentiator | None = None, optimizer: SparseOptimizer | None = None,
                 thresholds: Sequence[float] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0), folds: int = 5,
                 one_se: bool = True, per_equation: bool = True, search: str = "threshold") -> SINDyCV:
    """Batched SINDy with the sparsity threshold chosen by blocked cross-validation.

    The regression rows of each problem (samples, or windows with a weak-form ``differentiation``)
    are cut into ``folds`` contiguous blocks in time. For every threshold the optimiser is fitted
    once on all rows and once per fold on the other blocks (zero sample weights on the held-out
    block, so all B problems, thresholds and folds are batched fits), and the held-out block's
    mean squared derivative error is recorded. :func:`select_threshold` then picks the threshold
    per problem, and per equation when ``per_equation`` (STLSQ and SR3 treat equations as
    independent regressions): the one-standard-error rule on log held-out errors by default. No
    ground truth is involved. (Weak-form windows that straddle a block boundary share samples with
    the neighbouring block.)

    Args:
        x: (B, T, D) trajectories, one problem each; t: (T,), (B, T) or a time step. Or a list of
            (T_i, D) trajectories (t: a list of (T_i,) grids, a shared (T,) grid or a time step) that
            form ONE problem (B = 1): their regression rows are pooled, in order, before the folds
            are cut, so each block is a stretch of one trajectory or the junction of two.
        library, differentiation, optimizer: as in :func:`fit_sindy_batch`; the optimiser (or an
            ensemble's base optimiser) gets each threshold of the grid in turn.
        thresholds: the grid (sorted increasingly here).
        folds: number of contiguous blocks (>= 2).
        one_se: the one-standard-error rule (sparser); False picks the smallest held-out error.
        per_equation: select per equation (True) or one threshold per problem.
        search: ``"threshold"`` scores the optimiser at each threshold of the grid (each fold
            thresholds on its own). ``"support"`` (STLSQ only; per equation) scores fixed supports
            instead: the candidates are the supports of the grid's fits on all rows plus the
            :func:`backward_path` from all features down to one; each is refitted with the optimiser's
            ridge on the training blocks and scored on the held-out block, and the one-SE rule runs
            over the candidates ordered by number of terms. Held-out errors below 1e-10 of the
            targets' mean square count as exact. On the polynomial ODEBench problems of
            ``benchmarks/discovery.py`` with weak-form rows it recovers the exact support more often
            at every noise level than ``"threshold"`` (see ``benchmarks/RESULTS.md``).

    Returns:
        :class:`SINDyCV`.
    """
    library, differentiation, optimizer = _check_parts(library, differentiation, optimizer)
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds: expected an int >= 2, got {folds!r}")
    if search not in ("threshold", "support"):
        raise ValueError(f"search: expected 'threshold' or 'support', got {search!r}")
    if search == "support":
        if not isinstance(optimizer, STLSQ):
            raise TypeError(f"search='support': refits candidate supports with STLSQ's ridge; optimizer must be "
                            f"an STLSQ, got {type(optimizer).__name__}")
        if not per_equation:
            raise ValueError("search='support' selects each equation's support on its own; use per_equation=True")
    grid = sorted(float(v) for v in thresholds)
    if not grid or any(not (v >= 0 and v < float("inf")) for v in grid):
        raise ValueError(f"thresholds: expected a non-empty sequence of finite numbers >= 0, got {thresholds!r}")
    if isinstance(x, (list, tuple)):
        xs, ts, _ = as_trajectories(x, t, min_samples=getattr(differentiation, "min_points", 2))
        rows = [_regression_rows(a[None], ti, library, differentiation) for a, ti in zip(xs, ts)]
        Theta, dx = torch.cat([r[0] for r in rows], 1), torch.cat([r[1] for r in rows], 1)
    else:
        Theta, dx = _regression_rows(x, t, library, differentiation)
    B, N, _ = Theta.shape
    D = dx.shape[-1]
    if N < 2 * folds:
        raise ValueError(f"folds: {folds} folds need at least {2 * folds} regression rows, got {N}")
    block = torch.arange(N, device=Theta.device) * folds // N  # (N,) fold of each row
    path, errors = [], []
    for th in grid:
        opt = _with_threshold(optimizer, th)
        path.append(copy.deepcopy(opt).fit(Theta, dx).coef_.transpose(-1, -2))  # (B, D, F)
        if search == "support":
            continue  # only the fits on all rows are candidates; their supports are scored below
        err = []
        for k in range(folds):
            train = (block != k).to(Theta.dtype).expand(B, N)
            C = copy.deepcopy(opt).fit(Theta, dx, sample_weight=train).coef_  # (B, F, D)
            held = block == k
            err.append((Theta[:, held] @ C - dx[:, held]).double().square().mean(-2))  # (B, D)
        errors.append(torch.stack(err, -1))  # (B, D, K)
    path = torch.stack(path)  # (G, B, D, F)
    grid_t = torch.tensor(grid, dtype=torch.float64, device=Theta.device)
    if search == "support":
        candidates, cv_error, index = _support_cv(Theta, dx, optimizer, path, block, folds, one_se)
        index = index.to(Theta.device)
        coefficients = candidates.gather(0, index[None, ..., None].expand((1,) + candidates.shape[1:])).squeeze(0)
        G = len(grid)
        threshold = torch.where(index < G, grid_t[index.clamp_max(G - 1)], torch.full_like(grid_t[:1], float("nan")))
        return SINDyCV(coefficients=coefficients.to(path.dtype).contiguous(), threshold=threshold, index=index,
                       thresholds=grid_t, path=candidates.to(path.dtype), cv_error=cv_error)
    cv_error = torch.stack(errors)  # (G, B, D, K)
    size = (path != 0).sum(-1)  # (G, B, D) terms per equation
    if per_equation:
        index = select_threshold(cv_error, one_se, size=size)  # (B, D)
    else:  # mean over equations; the null model has no term in any equation
        index = select_threshold(cv_error.mean(-2), one_se, size=size.sum(-1))[:, None].expand(B, D)
    index = index.to(Theta.device)
    coefficients = path.gather(0, index[None, ..., None].expand((1,) + path.shape[1:])).squeeze(0)
    return SINDyCV(coefficients=coefficients.contiguous(), threshold=grid_t[index], index=index,
                   thresholds=grid_t, path=path, cv_error=cv_error)
