"""BaseDiscovery: everything an equation-discovery estimator needs once it has its coefficients."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import sympy
import torch

from torchmech.discovery.library import Library, default_variable_names

__all__ = ["BaseDiscovery", "as_trajectories", "format_equations", "sympy_to_coefficients"]


# ---------------------------------------------------------------------------------------------- data
def _tensor(v: Any, name: str) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        out = v
    elif isinstance(v, np.ndarray):
        out = torch.from_numpy(np.asarray(v, dtype=np.float64))
    else:
        raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(v).__name__}")
    if not out.is_floating_point():
        out = out.to(torch.float64)
    return out


def _time(t: Any, T: int, like: torch.Tensor, name: str) -> torch.Tensor:
    """One trajectory's time grid (T,) in float64 on ``like``'s device from a grid or a scalar step.

    Times stay float64 even for float32 data: a float32 clock at t ~ 1000 resolves only ~6e-5, which
    would corrupt derivative estimates on fine grids.
    """
    dtype = torch.float64
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"{name}: a number is read as the time step and must be finite and > 0, got {t!r}")
        return torch.arange(T, dtype=dtype, device=like.device) * float(t)
    tt = _tensor(t, name).to(dtype=dtype, device=like.device)
    if tt.shape != (T,):
        raise ValueError(f"{name}: expected shape ({T},) to match the trajectory's {T} samples, got {tuple(tt.shape)}")
    if not torch.isfinite(tt).all():
        raise ValueError(f"{name}: expected finite times, got NaN or infinite values")
    if not (tt[1:] > tt[:-1]).all():
        raise ValueError(f"{name}: expected strictly increasing times")
    return tt


def _split(v: Any, name: str) -> tuple[list[torch.Tensor], bool]:
    """A trajectory (T, D), a batch (B, T, D) or a list of (T_i, D) -> list of (T_i, D), is_batch."""
    if isinstance(v, (list, tuple)):
        if not v:
            raise ValueError(f"{name}: expected at least one trajectory, got an empty list")
        out = [_tensor(a, f"{name}[{i}]") for i, a in enumerate(v)]
        for i, a in enumerate(out):
            if a.ndim != 2:
                raise ValueError(f"{name}[{i}]: expected a trajectory of shape (T, D), got {tuple(a.shape)}")
        return out, True
    a = _tensor(v, name)
    if a.ndim == 2:
        return [a], False
    if a.ndim == 3:
        return list(a.unbind(0)), True
    raise ValueError(f"{name}: expected shape (T, D), (B, T, D) or a list of (T_i, D), got {tuple(a.shape)}")


def as_trajectories(
    x: Any, t: Any, u: Any = None, min_samples: int = 2
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None]:
    """Normalise the accepted data layouts into lists of trajectories.

    Args:
        x: one trajectory (T, D), a batch (B, T, D), or a list of (T_i, D) (tensors or arrays).
        t: times: (T,) (shared by all trajectories of equal length; a tensor, array or list of
            numbers), (B, T), a list of (T_i,) grids, or a number (the constant time step).
        u: optional control inputs with the layout of ``x`` and M columns: (T, M), (B, T, M)
            or a list of (T_i, M).
        min_samples: smallest accepted T_i.

    Returns:
        ``xs`` list of (T_i, D), ``ts`` list of (T_i,), ``us`` list of (T_i, M) or None; all on
        the device of the first trajectory, ``xs``/``us`` in its dtype, ``ts`` in float64.

    Raises:
        TypeError / ValueError naming the argument when shapes, dtypes or values are wrong.
    """
    xs, _ = _split(x, "x")
    ref = xs[0]
    D = ref.shape[-1]
    for i, a in enumerate(xs):
        if a.shape[-1] != D:
            raise ValueError(f"x[{i}]: expected {D} variables like the first trajectory, got {a.shape[-1]}")
        if a.shape[0] < min_samples:
            raise ValueError(f"x[{i}]: expected at least {min_samples} samples, got {a.shape[0]}")
        if not torch.isfinite(a).all():
            raise ValueError(f"x[{i}]: expected finite values, got NaN or infinite entries")
    xs = [a.to(dtype=ref.dtype, device=ref.device) for a in xs]
    n = len(xs)
    if (isinstance(t, (list, tuple)) and len(t) == xs[0].shape[0]
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in t)):
        # a plain list of T numbers is one shared grid (a list of n numbers would be n time steps)
        t = torch.tensor([float(v) for v in t], dtype=torch.float64)
    if isinstance(t, (list, tuple)):
        if len(t) != n:
            raise ValueError(f"t: expected one time grid per trajectory ({n}), got {len(t)}")
        ts = [_time(ti, a.shape[0], ref, f"t[{i}]") for i, (ti, a) in enumerate(zip(t, xs))]
    elif isinstance(t, (torch.Tensor, np.ndarray)) and t.ndim == 2:
        if t.shape[0] != n:
            raise ValueError(f"t: expected shape ({n}, T) for {n} trajectories, got {tuple(t.shape)}")
        ts = [_time(t[i], a.shape[0], ref, f"t[{i}]") for i, a in enumerate(xs)]
    else:
        ts = [_time(t, a.shape[0], ref, "t") for a in xs]
    us = None
    if u is not None:
        us, _ = _split(u, "u")
        if len(us) != n:
            raise ValueError(f"u: expected one control trajectory per state trajectory ({n}), got {len(us)}")
        M = us[0].shape[-1]
        for i, (c, a) in enumerate(zip(us, xs)):
            if c.shape != (a.shape[0], M):
                raise ValueError(f"u[{i}]: expected shape ({a.shape[0]}, {M}), got {tuple(c.shape)}")
            if not torch.isfinite(c).all():
                raise ValueError(f"u[{i}]: expected finite values, got NaN or infinite entries")
        us = [c.to(dtype=ref.dtype, device=ref.device) for c in us]
    return xs, ts, us


# ---------------------------------------------------------------------------------------------- text
def format_number(x: float, precision: int = 3) -> str:
    """``precision`` decimals for magnitudes in [1e-2, 1e5), else ``precision + 1`` significant digits in
    scientific notation (0.0004 prints as 4.000e-04, not 0.000)."""
    return f"{x:.{precision}f}" if 1e-2 <= abs(x) < 1e5 else f"{x:.{precision}e}"


def format_equations(coefficients: torch.Tensor, feature_names: Sequence[str], variable_names: Sequence[str],
                     precision: int = 3) -> list[str]:
    """Readable equations ``"x' = -10.000 x + 10.000 y"``, one per row of ``coefficients`` (D, F);
    coefficients below 1e-2 or from 1e5 in magnitude in scientific notation."""
    lines = []
    for d, v in enumerate(variable_names):
        parts = []
        for c, n in zip(coefficients[d].tolist(), feature_names):
            if c == 0:
                continue
            body = format_number(abs(c), precision) + ("" if n == "1" else f" {n}")
            if parts:
                parts.append(f"{'-' if c < 0 else '+'} {body}")
            else:
                parts.append(f"-{body}" if c < 0 else body)
        lines.append(f"{v}' = {' '.join(parts) if parts else '0'}")
    return lines


def sympy_to_coefficients(expressions: Sequence[Any], library: Library, variable_names: Sequence[str],
                          dtype: torch.dtype = torch.float64, device: Any = None) -> torch.Tensor:
    """Read right-hand sides written in a library's features back into a (D, F) coefficient matrix.

    Args:
        expressions: D sympy expressions (or strings) in the symbols ``variable_names`` (state
            then control names, as the library was evaluated on).
        library: the feature library.
        variable_names: the names the library's features are written in.

    Raises:
        ValueError: when a term is not a number times one library feature.
    """
    feats = [sympy.expand(f) for f in library.sympy_features(list(variable_names))]
    index: dict = {}
    for i, f in enumerate(feats):
        index.setdefault(f, i)
    local = {n: sympy.Symbol(n) for n in variable_names}
    out = torch.zeros(len(expressions), len(feats), dtype=dtype, device=device)
    for d, e in enumerate(expressions):
        expr = sympy.sympify(e, locals=local) if isinstance(e, str) else e
        for term in sympy.Add.make_args(sympy.expand(expr)):
            if term == 0:
                continue
            c, rest = term.as_coeff_Mul()
            key = sympy.Integer(1) if rest == 1 else rest
            if key not in index:
                raise ValueError(f"expressions[{d}]: the term {term} is not a number times a library feature")
            out[d, index[key]] += float(c)
    return out


# ---------------------------------------------------------------------------------------------- base
class BaseDiscovery:
    """Base class of equation-discovery estimators with models ``x' = C @ library([x, u])``.

    Hyper-parameters are stored by the constructor and never changed by ``fit``; learned
    attributes end with ``_``. Everything here needs only the learned coefficients, the library
    and the names, so a subclass only has to implement ``fit``.

    **Contract for subclasses.** ``fit(x, t, u=None, ...)`` must return ``self`` after setting:

    * ``self.library``: a :class:`~torchmech.discovery.library.Library` (normally a
      constructor hyper-parameter; set it before ``fit`` returns);
    * ``coefficients_``: (D, F) tensor on the data's device and dtype, zero off the support,
      with ``x'_d = sum_f coefficients_[d, f] * feature_f([x, u])``;
    * ``variable_names_``: the D state names; ``control_names_``: the M control names
      (``[]`` without control);
    * ``feature_names_``: the F feature names, ``library.feature_names(variable_names_ + control_names_)``.

    :meth:`_set_fit` sets the last four at once (and checks their shapes); :func:`as_trajectories`
    and :meth:`_names` turn the accepted inputs into lists of trajectories and names. Optional:
    ``differentiation`` (an attribute used by :meth:`score`'s derivative metrics; default:
    second-order finite differences).
    """

    library: Library

    # ------------------------------------------------------------------ helpers for subclasses
    @staticmethod
    def _names(variable_names: Sequence[str] | None, D: int, control_names: Sequence[str] | None, M: int,
               ) -> tuple[list[str], list[str]]:
        """Validated state and control names (defaults ``x, y, z`` / ``x0..`` and ``u0..``)."""
        if variable_names is None:
            variable_names = default_variable_names(D)
        if isinstance(variable_names, str) or len(variable_names) != D:
            raise ValueError(f"variable_names: expected {D} names (one per column of x), got {variable_names!r}")
        if control_names is None:
            control_names = [f"u{i}" for i in range(M)] if M > 1 else (["u"] if M == 1 else [])
        if isinstance(control_names, str) or len(control_names) != M:
            raise ValueError(f"control_names: expected {M} names (one per column of u), got {control_names!r}")
        names = [*variable_names, *control_names]
        if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise ValueError(f"variable_names/control_names: expected distinct non-empty strings, got {names}")
        return list(variable_names), list(control_names)

    def _set_fit(self, coefficients: torch.Tensor, variable_names: Sequence[str],
                 control_names: Sequence[str] = ()) -> None:
        """Store ``coefficients_`` (D, F), the names and ``feature_names_`` after a fit."""
        names = [*variable_names, *control_names]
        feature_names = self.library.feature_names(names)
        if coefficients.shape != (len(variable_names), len(feature_names)):
            raise ValueError(f"coefficients: expected shape (D, F) = ({len(variable_names)}, {len(feature_names)}), "
                             f"got {tuple(coefficients.shape)}")
        self.coefficients_ = coefficients
        self.variable_names_ = list(variable_names)
        self.control_names_ = list(control_names)
        self.feature_names_ = feature_names

    def _check_fitted(self) -> None:
        if not hasattr(self, "coefficients_"):
            raise RuntimeError(f"{type(self).__name__}: call fit(x, t) before using the model")

    def _features(self, x: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        D, M = len(self.variable_names_), len(self.control_names_)
        if x.shape[-1] != D:
            raise ValueError(f"x: expected {D} variables in the last axis, got shape {tuple(x.shape)}")
        if M:
            if u is None:
                raise ValueError(f"u: the model was fitted with {M} control input(s); pass u")
            u = _tensor(u, "u").to(dtype=x.dtype, device=x.device)
            if u.shape[-1] != M:
                raise ValueError(f"u: expected {M} columns in the last axis, got shape {tuple(u.shape)}")
            try:
                u = u.expand(x.shape[:-1] + (M,))
            except RuntimeError:
                raise ValueError(f"u: shape {tuple(u.shape)} does not match x's {tuple(x.shape)}") from None
            x = torch.cat([x, u], dim=-1)
        elif u is not None:
            raise ValueError("u: the model was fitted without control inputs; got u")
        return self.library.transform(x)

    # ------------------------------------------------------------------ public API
    def predict(self, x: Any, u: Any = None) -> torch.Tensor:
        """Model derivatives ``x' = C @ library([x, u])``.

        Args:
            x: states (..., D) (e.g. (T, D) or (B, T, D)), tensor or array.
            u: controls (..., M) when the model was fitted with controls.

        Returns:
            (..., D) derivatives in the dtype/device of ``x``.
        """
        self._check_fitted()
        x = _tensor(x, "x")
        C = self.coefficients_.to(dtype=x.dtype, device=x.device)
        return self._features(x, u) @ C.T

    def simulate(self, x0: Any, t: Any, u: Any = None, rtol: float = 1e-8, atol: float = 1e-8,
                 max_steps: int = 100_000, throw: bool = True, progress: bool = False) -> torch.Tensor:
        """Integrate the discovered model with ``torchmech.solve`` (Dopri5, adaptive steps).

        Args:
            x0: initial states (D,) or (B, D).
            t: (T,) increasing output times; integration starts at ``t[0]``.
            u: controls: a callable ``u(t) -> (B, M)`` of per-sample times ``t`` (B,), or samples
                on ``t`` of shape (T, M) or (B, T, M), linearly interpolated.
            rtol, atol, max_steps: step control (``PIDController``) and the step budget.
            throw: raise ``RuntimeError`` when the model diverges or the budget runs out; with
                ``throw=False`` the unreached times are NaN.

        Returns:
            (T, D) for x0 of shape (D,), else (B, T, D), dtype/device of ``x0``.
        """
        from torchmech import de

        self._check_fitted()
        y0 = _tensor(x0, "x0")
        single = y0.ndim == 1
        if single:
            y0 = y0[None]
        D = len(self.variable_names_)
        if y0.ndim != 2 or y0.shape[-1] != D:
            raise ValueError(f"x0: expected shape ({D},) or (B, {D}), got {tuple(_tensor(x0, 'x0').shape)}")
        tt = _tensor(t, "t").to(dtype=y0.dtype, device=y0.device)
        if tt.ndim != 1 or tt.shape[0] < 2:
            raise ValueError(f"t: expected a 1-D grid of at least 2 times, got shape {tuple(tt.shape)}")
        tt = _time(tt, tt.shape[0], y0, "t").to(y0.dtype)
        if y0.shape[0] == 0:
            return y0.new_zeros(0, tt.shape[0], D)
        control = self._control_function(u, tt, y0.shape[0])
        C = self.coefficients_.to(dtype=y0.dtype, device=y0.device)

        def field(s, y, _args):
            return self._features(y, None if control is None else control(s)) @ C.T

        sol = de.solve(de.ODETerm(field), de.Dopri5(), tt[0], tt[-1], y0, saveat=de.SaveAt(ts=tt),
                       controller=de.PIDController(rtol=rtol, atol=atol), max_steps=max_steps, throw=False,
                       progress=progress)
        ys = sol.ys
        if throw and not (bool(sol.success.all()) and bool(torch.isfinite(ys).all())):
            bad = (~sol.success | ~torch.isfinite(ys).flatten(1).all(1)).nonzero().flatten().tolist()
            raise RuntimeError(f"simulate: the discovered model could not be integrated over t for initial "
                               f"state(s) {bad} (it diverges or needs more than max_steps={max_steps} steps); "
                               "pass throw=False to get NaN where it failed")
        return ys[0] if single else ys

    def _control_function(self, u: Any, t: torch.Tensor, B: int) -> Callable | None:
        M = len(self.control_names_)
        if not M:
            if u is not None:
                raise ValueError("u: the model was fitted without control inputs; got u")
            return None
        if u is None:
            raise ValueError(f"u: the model was fitted with {M} control input(s); pass u")
        if callable(u):
            return u
        uu = _tensor(u, "u").to(dtype=t.dtype, device=t.device)
        T = t.shape[0]
        if uu.shape not in ((T, M), (B, T, M)):
            raise ValueError(f"u: expected a callable or samples of shape ({T}, {M}) or ({B}, {T}, {M}), got "
                             f"{tuple(uu.shape)}")
        if uu.ndim == 2:
            uu = uu.expand(B, T, M)

        def control(s: torch.Tensor) -> torch.Tensor:
            s = torch.as_tensor(s, dtype=t.dtype, device=t.device).expand(B)
            i = torch.searchsorted(t, s.contiguous()).clamp(1, T - 1)
            w = ((s - t[i - 1]) / (t[i] - t[i - 1])).clamp(0, 1)[:, None]
            rows = torch.arange(B, device=t.device)
            return uu[rows, i - 1] * (1 - w) + uu[rows, i] * w

        return control

    def equations(self, precision: int = 3) -> list[str]:
        """One readable line per variable, e.g. ``"x' = -10.000 x + 10.000 y"``."""
        self._check_fitted()
        if isinstance(precision, bool) or not isinstance(precision, int) or precision < 0:
            raise ValueError(f"precision: expected an int >= 0, got {precision!r}")
        return format_equations(self.coefficients_, self.feature_names_, self.variable_names_, precision)

    def print(self, precision: int = 3) -> None:
        """Print :meth:`equations`."""
        print("\n".join(self.equations(precision)))

    def to_sympy(self, precision: int | None = None) -> list[sympy.Expr]:
        """Right-hand sides as sympy expressions in ``sympy.Symbol(name)`` of the variable names.

        ``precision`` rounds coefficients to that many decimals (``None``: exact float values).
        """
        self._check_fitted()
        feats = self.library.sympy_features(self.variable_names_ + self.control_names_)
        out = []
        for row in self.coefficients_.tolist():
            terms = [sympy.Float(round(c, precision) if precision is not None else c) * f
                     for c, f in zip(row, feats) if c != 0]
            out.append(sympy.Add(*terms) if terms else sympy.Integer(0))
        return out

    @property
    def complexity(self) -> int:
        """Number of non-zero coefficients (terms in all equations)."""
        self._check_fitted()
        return int((self.coefficients_ != 0).sum())

    def score(self, x: Any, t: Any, u: Any = None, metric: str = "r2", x_dot: Any = None) -> float:
        """How well the model explains data.

        Args:
            x, t, u: data in any layout accepted by ``fit`` (see :func:`as_trajectories`).
            metric: ``"r2"`` (derivative R2: model derivatives vs ``x_dot`` or the estimator's
                ``differentiation`` of ``x``; with a smoothing differentiation such as ``WeakForm`` the
                reference is that smoothed derivative, so even the exact model scores below 1: 0.88 on clean
                Lorenz; compare models with ``"trajectory_r2"`` or known ``x_dot`` instead),
                ``"mse"`` (derivative mean squared error) or
                ``"trajectory_r2"`` (R2 of the model simulated from each trajectory's first
                state; needs a callable or sampled ``u`` when there are controls).
            x_dot: optional known derivatives, same layout as ``x``.

        Returns:
            A float (pooled over all trajectories).
        """
        from torchmech.discovery import metrics
        from torchmech.discovery.differentiation import FiniteDifference

        self._check_fitted()
        if metric not in ("r2", "mse", "trajectory_r2"):
            raise ValueError(f"metric: expected 'r2', 'mse' or 'trajectory_r2', got {metric!r}")
        xs, ts, us = as_trajectories(x, t, u)
        if metric == "trajectory_r2":
            sims = [self.simulate(xi[0], ti, u=ui, throw=False) for xi, ti, ui in
                    zip(xs, ts, us if us is not None else [None] * len(xs))]
            pred, true = torch.cat(sims), torch.cat(xs)
            if not torch.isfinite(pred).all():
                return float("-inf")
            return float(metrics.trajectory_r2(pred, true))
        if x_dot is not None:
            dxs, _, _ = as_trajectories(x_dot, ts)
        else:
            diff = getattr(self, "differentiation", None) or FiniteDifference(2)
            dxs = [diff(xi, ti) for xi, ti in zip(xs, ts)]
        pred = torch.cat([self.predict(xi, ui) for xi, ui in zip(xs, us if us is not None else [None] * len(xs))])
        true = torch.cat(dxs).to(pred.dtype)
        if metric == "mse":
            return float((pred - true).square().mean())
        return float(metrics.derivative_r2(pred, true))
