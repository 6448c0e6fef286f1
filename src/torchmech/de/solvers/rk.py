"""Tableau-driven explicit Runge-Kutta solvers with embedded error estimates and dense output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor

from torchmech.de.terms import AbstractTerm

__all__ = ["ButcherTableau", "AbstractSolver", "ExplicitRK", "StepResult", "interp_dtype"]

# The interpolant is stored as monomial coefficients Q_m (y(theta) = y0 + sum_m theta^m Q_m). When the
# dense coefficients are large, the Q_m are large too and cancel in that sum: each loses
# max|coef| * eps of the step's increment. Dopri8's coefficients reach ~545, which costs float32
# ~1e-4 at save times (30x its float64 error); Tsit5's (~88) cost a few ulps. Above this bound the Q_m
# of low-precision states are formed and kept in float64, and the interpolated values cast back.
_DENSE_COEF_BOUND = 100.0


@dataclass(frozen=True)
class ButcherTableau:
    """Coefficients of an explicit Runge-Kutta method with ``s`` stages.

    Args:
        c: nodes, length ``s`` with ``c[0] == 0``.
        a: strictly lower-triangular rows; ``a[i]`` (length ``i``) holds the weights of
            stages ``0..i-1`` in stage ``i``, for ``i = 1..s-1``.
        b: solution weights, length ``s``.
        order: classical order of the solution ``b``.
        b_error: ``b - b_hat`` for an embedded method ``b_hat`` (length ``s``), or ``None``
            for a fixed-step-only method.
        embedded_order: order of ``b_hat``; the error estimate is ``O(h^(min(order, embedded_order)+1))``.
        fsal: first-same-as-last: the last stage is evaluated at ``(t1, y1)`` (``c[-1] == 1``
            and ``a[-1] == b``), so it is reused as the first stage of the next step.
        dense: optional ``s x deg`` matrix ``D`` of a continuous extension
            ``y(t0 + theta h) = y0 + sum_m theta^m sum_i D[i][m-1] k_i`` (``k_i`` = stage
            increments). Without it, a cubic Hermite interpolant from ``y0, y1, f0, f1`` is used.
        dense_stages: optional extra stages ``(c, a_row)`` evaluated only when dense output is
            needed; ``a_row`` weights all previous stages (main and extra). ``dense`` then has
            ``s + len(dense_stages)`` rows.
    """

    c: Sequence[float]
    a: Sequence[Sequence[float]]
    b: Sequence[float]
    order: int
    b_error: Sequence[float] | None = None
    embedded_order: int | None = None
    fsal: bool = False
    dense: Sequence[Sequence[float]] | None = None
    dense_stages: Sequence[tuple[float, Sequence[float]]] | None = None

    def __post_init__(self):
        s = len(self.c)
        if s < 1:
            raise ValueError("ButcherTableau: c must have at least one stage, got 0")
        if len(self.b) != s:
            raise ValueError(f"ButcherTableau: b must have length len(c)={s}, got {len(self.b)}")
        if len(self.a) != s - 1:
            raise ValueError(f"ButcherTableau: a must have len(c)-1={s - 1} rows, got {len(self.a)}")
        if self.c[0] != 0:
            raise ValueError(f"ButcherTableau: c[0] must be 0 for an explicit method, got {self.c[0]}")
        for i, row in enumerate(self.a, start=1):
            if len(row) != i:
                raise ValueError(f"ButcherTableau: a[{i - 1}] (stage {i}) must have length {i}, got {len(row)}")
            if abs(sum(row) - self.c[i]) > 1e-10:
                raise ValueError(
                    f"ButcherTableau: row sum of stage {i} is {sum(row)!r}, expected c[{i}]={self.c[i]!r}"
                )
        if abs(sum(self.b) - 1.0) > 1e-10:
            raise ValueError(f"ButcherTableau: b must sum to 1, got {sum(self.b)!r}")
        if self.b_error is not None:
            if len(self.b_error) != s:
                raise ValueError(f"ButcherTableau: b_error must have length {s}, got {len(self.b_error)}")
            if self.embedded_order is None:
                raise ValueError("ButcherTableau: embedded_order is required when b_error is given")
        if self.fsal:
            if self.c[-1] != 1 or s < 2 or any(abs(x - y) > 1e-14 for x, y in zip(self.a[-1], self.b[:-1])):
                raise ValueError("ButcherTableau: fsal=True requires c[-1] == 1 and a[-1] == b[:-1]")
        n_extra = len(self.dense_stages or ())
        for j, (cj, row) in enumerate(self.dense_stages or ()):
            if len(row) != s + j or abs(sum(row) - cj) > 1e-10:
                raise ValueError(f"ButcherTableau: dense_stages[{j}] needs {s + j} weights summing to its c")
        if n_extra and self.dense is None:
            raise ValueError("ButcherTableau: dense_stages given without dense coefficients")
        if self.dense is not None:
            if len(self.dense) != s + n_extra:
                raise ValueError(f"ButcherTableau: dense must have {s + n_extra} rows, got {len(self.dense)}")
            if len({len(r) for r in self.dense}) != 1:
                raise ValueError("ButcherTableau: all rows of dense must have the same length")

    @property
    def stages(self) -> int:
        return len(self.c)


def interp_dtype(tableau: ButcherTableau, dtype: torch.dtype) -> torch.dtype:
    """The dtype the interpolant coefficients ``Q_m`` of a ``dtype`` state are formed and kept in."""
    if tableau.dense is None or dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return dtype
    big = max(abs(float(x)) for row in tableau.dense for x in row)
    return torch.float64 if big > _DENSE_COEF_BOUND else dtype


class StepResult(NamedTuple):
    """What one attempted step returns (all batch-first)."""

    y1: Tensor  # (B, ...) candidate state at t1
    err: Tensor | None  # (B, ...) local error estimate, None for fixed-step-only methods
    vf1: Any  # vector field at (t1, y1) (the next step's first stage)
    interp: tuple  # (Q_1, ..., Q_deg), each (B, ...): y(theta) = y0 + sum_m theta^m Q_m (dtype: interp_dtype)
    nfev: int  # vector-field evaluations used


class AbstractSolver:
    """A one-step method. Subclasses define ``order``, ``error_order`` and ``step``."""

    order: int
    error_order: int | None = None  # exponent denominator for step-size control

    @property
    def adaptive(self) -> bool:
        return self.error_order is not None

    def step(self, terms: AbstractTerm, t0: Tensor, t1: Tensor, y0: Tensor, args: Any, vf0: Any,
             dense: bool = True) -> StepResult:
        """Attempt one step from per-sample times ``t0`` (B,) to ``t1`` (B,) starting at ``y0`` (B, ...).

        ``vf0`` is the vector field at ``(t0, y0)`` (cached from the previous step). With ``dense``
        the result carries the step's interpolation polynomial.
        """
        raise NotImplementedError


def _combine(base: Tensor | None, coeffs: Sequence[float], ks: Sequence[Tensor]) -> Tensor | None:
    """``base + sum_i coeffs[i] * ks[i]`` skipping zero coefficients."""
    out = base
    for w, k in zip(coeffs, ks):
        if w == 0:
            continue
        term = k * w
        out = term if out is None else out + term
    return out


class ExplicitRK(AbstractSolver):
    """Explicit Runge-Kutta method defined by a :class:`ButcherTableau`.

    Define a new solver with ``ExplicitRK(ButcherTableau(c=..., a=..., b=..., order=...))``.
    One step from ``(t0, y0)`` to ``t1`` (per-sample times of shape (B,)) computes stage
    increments ``k_i = prod(vf(t0 + c_i h, y0 + sum_j a_ij k_j), contr(t0, t1))`` and returns
    ``y1 = y0 + sum_i b_i k_i`` with the embedded error estimate ``sum_i b_error_i k_i``.
    The vector field at ``(t1, y1)`` is always returned (FSAL stage, or one extra evaluation
    that the next step uses as its first stage), so a step costs ``s`` evaluations.
    """

    def __init__(self, tableau: ButcherTableau):
        if not isinstance(tableau, ButcherTableau):
            raise TypeError(f"ExplicitRK: tableau must be a ButcherTableau, got {type(tableau).__name__}")
        self.tableau = tableau
        self.order = tableau.order
        # the error estimate b - b_hat is O(h^(p+1)) with p the lower of the two orders (Fehlberg's pairs
        # propagate the lower-order solution, Dormand-Prince's the higher one)
        self.error_order = None if tableau.b_error is None else min(tableau.order, tableau.embedded_order) + 1
        self._b = [float(x) for x in tableau.b]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def _coef(self, which: str, like: Tensor) -> Tensor:
        """Cached coefficient matrix (rows, stages) in ``like``'s dtype/device."""
        key = (which, like.dtype, like.device)
        cache = self.__dict__.setdefault("_coef_cache", {})
        if key not in cache:
            tab = self.tableau
            if which == "main":
                rows = [list(tab.b)] + ([list(tab.b_error)] if tab.b_error is not None else [])
            else:
                rows = [[r[m] for r in tab.dense] for m in range(len(tab.dense[0]))]
            with torch.inference_mode(False):  # a cached inference tensor would break later backward passes
                cache[key] = torch.tensor(rows, dtype=torch.float64).to(dtype=like.dtype, device=like.device)
        return cache[key]

    def error_estimate(self, ks: Sequence[Tensor]) -> Tensor | None:
        """Local error estimate from the stage increments, shape (B, ...)."""
        if self.tableau.b_error is None:
            return None
        return _combine(None, self.tableau.b_error, ks)

    def step(self, terms, t0, t1, y0, args, vf0, dense=True) -> StepResult:
        """One explicit RK step, (B,) times and (B, ...) states; see :meth:`AbstractSolver.step`."""
        tab = self.tableau
        h = t1 - t0
        control = terms.contr(t0, t1)
        ks = [terms.prod(vf0, control)]
        vf_last = vf0
        nfev = 0
        for i in range(1, tab.stages):
            yi = _combine(y0, tab.a[i - 1], ks)
            ci = tab.c[i]
            ti = t1 if ci == 1 else t0 + ci * h
            vf_last = terms.vf(ti, yi, args)
            nfev += 1
            ks.append(terms.prod(vf_last, control))
        K = torch.stack(ks)  # (s, B, ...)
        default_err = tab.b_error is not None and type(self).error_estimate is ExplicitRK.error_estimate
        comb = torch.tensordot(self._coef("main", K), K, dims=1)  # rows: b, [b_error]
        y1 = y0 + comb[0]
        if tab.fsal:
            vf1 = vf_last
            k_end = ks[-1]
        else:
            vf1 = terms.vf(t1, y1, args)
            nfev += 1
            k_end = terms.prod(vf1, control) if dense and tab.dense is None else None
        err = comb[1] if default_err else self.error_estimate(ks)
        interp: tuple = ()
        if dense:
            if tab.dense is not None:
                if tab.dense_stages:
                    for cj, row in tab.dense_stages:
                        yj = _combine(y0, row, ks)
                        ks.append(terms.prod(terms.vf(t0 + cj * h, yj, args), control))
                        nfev += 1
                    K = torch.stack(ks)
                K = K.to(interp_dtype(tab, K.dtype))
                interp = tuple(torch.tensordot(self._coef("dense", K), K, dims=1).unbind(0))
            else:  # cubic Hermite through (y0, h f0) and (y1, h f1)
                dy = comb[0]
                k0 = ks[0]
                interp = (k0, 3 * dy - 2 * k0 - k_end, -2 * dy + k0 + k_end)
        return StepResult(y1, err, vf1, interp, nfev)


class _NudgeTerm(AbstractTerm):
    """Evaluates the inner term one ulp inside ``[t0, t1]`` at the step ends (torchdiffeq's ``perturb``)."""

    def __init__(self, inner: AbstractTerm, t0: Tensor, t1: Tensor):
        self.inner, self.t0, self.t1 = inner, t0, t1

    def vf(self, t, y, args):
        t = torch.where(t == self.t0, torch.nextafter(self.t0, self.t1),
                        torch.where(t == self.t1, torch.nextafter(self.t1, self.t0), t))
        return self.inner.vf(t, y, args)

    def contr(self, t0, t1):
        return self.inner.contr(t0, t1)

    def prod(self, vf, control):
        return self.inner.prod(vf, control)


class Perturbed(AbstractSolver):
    """A fixed-step solver whose stages at the step ends see times nudged one ulp into the step.

    The first stage is re-evaluated at ``nextafter(t0, t1)`` (one extra evaluation per step), and a
    stage at ``t1`` sees ``nextafter(t1, t0)``: with the grid on the discontinuities of the vector
    field (torchdiffeq's ``perturb``; a CDE's piecewise-linear path), no stage evaluates it on the far
    side of one.
    """

    def __init__(self, inner: AbstractSolver):
        self.inner = inner
        self.order = inner.order
        self.error_order = None

    def step(self, terms, t0, t1, y0, args, vf0, dense=True) -> StepResult:
        nudged = _NudgeTerm(terms, t0, t1)
        vf0 = nudged.vf(t0, y0, args)
        res = self.inner.step(nudged, t0, t1, y0, args, vf0, dense)
        return res._replace(nfev=res.nfev + 1)
