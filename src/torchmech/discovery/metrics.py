"""Metrics of equation discovery: support recovery, coefficient error, derivative and trajectory R2."""

from __future__ import annotations

import torch

__all__ = [
    "support_precision",
    "support_recall",
    "support_f1",
    "exact_recovery",
    "coefficient_error",
    "r2_score",
    "derivative_r2",
    "trajectory_r2",
    "discovery_report",
]


def _pair(found, true, name="found"):
    if not isinstance(found, torch.Tensor) or not isinstance(true, torch.Tensor):
        raise TypeError(f"{name}/true: expected tensors, got {type(found).__name__} and {type(true).__name__}")
    if found.shape != true.shape:
        raise ValueError(f"{name}: expected the shape of true {tuple(true.shape)}, got {tuple(found.shape)}")
    if found.ndim < 2:
        raise ValueError(f"{name}: expected coefficient matrices of shape (..., D, F), got {tuple(found.shape)}")
    return found, true.to(device=found.device)


def _counts(found, true):
    found, true = _pair(found, true)
    f, t = found != 0, true != 0
    tp = (f & t).sum((-2, -1)).double()
    return tp, f.sum((-2, -1)).double(), t.sum((-2, -1)).double()


def support_precision(found: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Fraction of discovered terms that are true terms; (..., D, F) -> (...). 1 when none is found."""
    tp, nf, _ = _counts(found, true)
    return torch.where(nf > 0, tp / nf.clamp_min(1), torch.ones_like(tp))


def support_recall(found: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Fraction of true terms that were discovered; (..., D, F) -> (...). 1 when there are none."""
    tp, _, nt = _counts(found, true)
    return torch.where(nt > 0, tp / nt.clamp_min(1), torch.ones_like(tp))


def support_f1(found: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Harmonic mean of support precision and recall; (..., D, F) -> (...)."""
    p, r = support_precision(found, true), support_recall(found, true)
    return torch.where(p + r > 0, 2 * p * r / (p + r).clamp_min(1e-300), torch.zeros_like(p))


def exact_recovery(found: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """True where the discovered support equals the true support exactly; (..., D, F) -> (...) bool."""
    found, true = _pair(found, true)
    return ((found != 0) == (true != 0)).all(-1).all(-1)


def coefficient_error(found: torch.Tensor, true: torch.Tensor, reduction: str = "median") -> torch.Tensor:
    """Relative coefficient error ``|found - true| / |true|`` on the true support.

    Args:
        found, true: (..., D, F) coefficients.
        reduction: ``"median"``, ``"mean"`` or ``"max"`` over the true support per problem
            (-> (...)), or ``"none"`` (-> (..., D, F) with NaN off the true support).

    A problem whose true support is empty has error 0 (there is no true coefficient to miss).
    """
    found, true = _pair(found, true)
    if reduction not in ("median", "mean", "max", "none"):
        raise ValueError(f"reduction: expected 'median', 'mean', 'max' or 'none', got {reduction!r}")
    on = true != 0
    rel = torch.where(on, (found - true).abs() / true.abs().where(on, torch.ones_like(true)),
                      torch.full_like(true, float("nan")))
    if reduction == "none":
        return rel
    flat = rel.flatten(-2)
    empty = ~on.flatten(-2).any(-1)
    if reduction == "median":
        return flat.nanmedian(-1).values.masked_fill(empty, 0.0)
    if reduction == "mean":
        return flat.nanmean(-1).masked_fill(empty, 0.0)
    return torch.where(torch.isnan(flat), torch.full_like(flat, -float("inf")), flat).amax(-1).clamp_min(0)


def r2_score(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Coefficient of determination over the last two axes (T, D), pooled over variables.

    ``1 - sum (pred - true)^2 / sum (true - mean_T(true))^2``; (..., T, D) -> (...). Where the
    reference is constant (zero variance) the score is 1 for a perfect prediction and 0 otherwise
    (the scikit-learn convention), never NaN.
    """
    if not isinstance(pred, torch.Tensor) or not isinstance(true, torch.Tensor):
        raise TypeError("pred/true: expected tensors")
    if pred.shape != true.shape or pred.ndim < 2:
        raise ValueError(f"pred: expected shape (..., T, D) equal to true's {tuple(true.shape)}, got {tuple(pred.shape)}")
    true = true.to(device=pred.device, dtype=pred.dtype)
    ss_res = (pred - true).square().sum((-2, -1))
    ss_tot = (true - true.mean(-2, keepdim=True)).square().sum((-2, -1))
    constant = ss_tot == 0
    r2 = 1 - ss_res / torch.where(constant, torch.ones_like(ss_tot), ss_tot)
    return torch.where(constant, (ss_res == 0).to(r2.dtype), r2)


def derivative_r2(pred_dx: torch.Tensor, true_dx: torch.Tensor) -> torch.Tensor:
    """R2 of model derivatives against reference derivatives (..., T, D) -> (...)."""
    return r2_score(pred_dx, true_dx)


def trajectory_r2(pred_x: torch.Tensor, true_x: torch.Tensor) -> torch.Tensor:
    """R2 of a simulated trajectory (e.g. from a held-out initial condition) against data (..., T, D) -> (...).

    A diverged simulation (non-finite values) scores ``-inf``.
    """
    r2 = r2_score(torch.nan_to_num(pred_x, nan=0.0), true_x)
    bad = ~torch.isfinite(pred_x).flatten(-2).all(-1)
    return torch.where(bad, torch.full_like(r2, -float("inf")), r2)


def discovery_report(found: torch.Tensor, true: torch.Tensor) -> dict:
    """All support and coefficient metrics of one problem (D, F) as python numbers."""
    found, true = _pair(found, true)
    if found.ndim != 2:
        raise ValueError(f"found: expected one problem of shape (D, F), got {tuple(found.shape)}")
    return dict(
        precision=float(support_precision(found, true)),
        recall=float(support_recall(found, true)),
        f1=float(support_f1(found, true)),
        exact=bool(exact_recovery(found, true)),
        median_rel_error=float(coefficient_error(found, true, "median")),
        max_rel_error=float(coefficient_error(found, true, "max")),
    )
