"""The System class: a named vector field with parameters, defaults and its symbolic equations."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import sympy
import torch

from torchmech.systems._sympy_torch import compile_expression, parse

__all__ = ["System"]

TIME = "t"


@dataclass(frozen=True, eq=False)
class System:
    """A dynamical system ``dx/dt = f(t, x; params)`` known in closed form.

    Attributes:
        name: registry name, e.g. ``"lorenz"``.
        variables: state variable names, length D.
        rhs: right-hand side per variable as text (sympy syntax, ``^`` allowed) in the variable
            names, the parameter names and ``t``.
        params: default parameter values by name.
        y0: default initial conditions, shape (n_initial, D).
        t_span: default time span ``(t0, t1)``.
        description: one-line description.
        source: where the equations and parameter values come from.
    """

    name: str
    variables: tuple[str, ...]
    rhs: tuple[str, ...]
    params: Mapping[str, float]
    y0: tuple[tuple[float, ...], ...]
    t_span: tuple[float, float]
    description: str = ""
    source: str = ""
    variable_descriptions: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.rhs) != len(self.variables):
            raise ValueError(
                f"rhs: expected one expression per variable ({len(self.variables)}), got {len(self.rhs)}"
            )
        if TIME in self.variables or TIME in self.params:
            raise ValueError(f"variables/params: the name {TIME!r} is reserved for time")
        for row in self.y0:
            if len(row) != len(self.variables):
                raise ValueError(f"y0: expected rows of length {len(self.variables)}, got {len(row)}")

    # ------------------------------------------------------------------ symbols
    @property
    def dim(self) -> int:
        """Number of state variables D."""
        return len(self.variables)

    @functools.cached_property
    def _symbols(self) -> tuple[sympy.Symbol, tuple[sympy.Symbol, ...], tuple[sympy.Symbol, ...]]:
        t = sympy.Symbol(TIME)
        xs = tuple(sympy.Symbol(v) for v in self.variables)
        ps = tuple(sympy.Symbol(p) for p in self.params)
        return t, xs, ps

    @functools.cached_property
    def symbolic_rhs(self) -> tuple[sympy.Expr, ...]:
        """Right-hand sides as sympy expressions with parameter symbols (not substituted)."""
        t, xs, ps = self._symbols
        names = {TIME: t, **{s.name: s for s in xs}, **{s.name: s for s in ps}}
        out = []
        for text in self.rhs:
            expr = parse(text, names)
            unknown = expr.free_symbols - set(names.values())
            if unknown:
                raise ValueError(f"system {self.name!r}: unknown names {sorted(map(str, unknown))} in {text!r}")
            out.append(expr)
        return tuple(out)

    @property
    def autonomous(self) -> bool:
        """False when the right-hand side depends explicitly on time ``t``."""
        t = self._symbols[0]
        return not any(t in e.free_symbols for e in self.symbolic_rhs)

    def _merged_params(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        merged = dict(self.params)
        if params is not None:
            if not isinstance(params, Mapping):
                raise TypeError(f"params: expected a mapping name -> value, got {type(params).__name__}")
            unknown = set(params) - set(self.params)
            if unknown:
                raise ValueError(
                    f"params: unknown parameter(s) {sorted(unknown)} for system {self.name!r}; "
                    f"expected names among {list(self.params)}"
                )
            merged.update(params)
        return merged

    def equations(self, params: Mapping[str, float] | None = None) -> list[sympy.Expr]:
        """Ground-truth right-hand sides as sympy expressions with parameter values substituted.

        Expressions are in ``sympy.Symbol(name)`` for each variable name (and ``t`` when the
        system is non-autonomous); one per variable.
        """
        values = self._merged_params(params)
        _, _, ps = self._symbols
        subs = {}
        for p in ps:
            v = values[p.name]
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    raise ValueError(f"params[{p.name!r}]: equations need a scalar value, got shape {tuple(v.shape)}")
                v = v.item()
            subs[p] = sympy.Float(v) if not isinstance(v, (sympy.Basic, int)) else sympy.sympify(v)
        return [sympy.expand(e.xreplace(subs)) for e in self.symbolic_rhs]

    def true_coefficients(
        self,
        library: Any,
        params: Mapping[str, float] | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """The true coefficient matrix of this system in a feature library.

        Args:
            library: an object with ``sympy_features(variable_names) -> list[sympy.Expr]`` (any
                ``torchmech.discovery`` library) or a sequence of sympy feature expressions.

        Returns:
            (D, F) tensor ``C`` with ``dx_d/dt = sum_f C[d, f] * feature_f`` (the layout of
            ``SINDy.coefficients_``).

        Raises:
            ValueError: when a term of an expanded right-hand side is not a number times one of
                the features (for example a non-polynomial RHS in a polynomial library).
        """
        if hasattr(library, "sympy_features"):
            features = list(library.sympy_features(list(self.variables)))
        elif isinstance(library, Sequence) and not isinstance(library, str):
            features = [sympy.sympify(f) for f in library]
        else:
            raise TypeError(
                "library: expected a feature library with sympy_features() or a sequence of sympy "
                f"expressions, got {type(library).__name__}"
            )
        index = {}
        for i, f in enumerate(features):
            index.setdefault(sympy.expand(f), i)
        coef = torch.zeros(self.dim, len(features), dtype=dtype, device=device)
        for d, eq in enumerate(self.equations(params)):
            for term in sympy.Add.make_args(sympy.expand(eq)):
                if term == 0:
                    continue
                c, rest = term.as_coeff_Mul()
                key = sympy.Integer(1) if rest == 1 else rest
                if key not in index:
                    raise ValueError(
                        f"library: the term {term} of d{self.variables[d]}/dt is not a multiple of any "
                        f"library feature; system {self.name!r} is not expressible in this library"
                    )
                coef[d, index[key]] += float(c)
        return coef

    # ------------------------------------------------------------------ numerics
    @functools.cached_property
    def _compiled(self):
        t, xs, ps = self._symbols
        syms = (t, *xs, *ps)
        return [compile_expression(e, syms) for e in self.symbolic_rhs]

    def vector_field(self, t: Any, x: torch.Tensor, params: Mapping[str, Any] | None = None) -> torch.Tensor:
        """Evaluate ``f(t, x; params)``.

        Args:
            t: time, a float or a tensor broadcastable to ``x.shape[:-1]`` (e.g. shape (B,)).
            x: states, shape (..., D), floating point.
            params: optional overrides of the default parameters; values are floats or tensors
                broadcastable to ``x.shape[:-1]`` (one value per batch element).

        Returns:
            (..., D) tensor of time derivatives, dtype and device of ``x``.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor of shape (..., {self.dim}), got {type(x).__name__}")
        if x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected shape (..., {self.dim}) for system {self.name!r}, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
        values = self._merged_params(params)
        pvals = [
            v.to(device=x.device, dtype=x.dtype) if isinstance(v, torch.Tensor) else float(v)
            for v in (values[p] for p in self.params)
        ]
        if isinstance(t, torch.Tensor):
            t = t.to(device=x.device, dtype=x.dtype)
        else:
            t = float(t)
        cols = x.unbind(-1)
        batch = x.shape[:-1]
        outs = []
        for g in self._compiled:
            v = g(t, *cols, *pvals)
            if not isinstance(v, torch.Tensor):
                v = torch.full(batch, float(v), dtype=x.dtype, device=x.device)
            outs.append(torch.broadcast_to(v, batch) if v.shape != batch else v)
        return torch.stack(outs, dim=-1)

    __call__ = vector_field

    @functools.cached_property
    def _numpy_rhs(self):
        import numpy as np

        t, xs, ps = self._symbols
        fns = [sympy.lambdify((t, *xs, *ps), e, modules="numpy") for e in self.symbolic_rhs]

        def f(time, x, pvals):
            cols = [x[..., i] for i in range(self.dim)]
            out = np.empty_like(x)
            for d, g in enumerate(fns):
                out[..., d] = g(time, *cols, *pvals)
            return out

        return f

    def numpy_vector_field(self, t: float, x: Any, params: Mapping[str, Any] | None = None) -> Any:
        """``f(t, x; params)`` on numpy float64 arrays (fast path used by :func:`simulate`).

        Args:
            t: time (float).
            x: (..., D) numpy array.
            params: overrides; values are floats or numpy arrays broadcastable to ``x.shape[:-1]``.

        Returns:
            (..., D) numpy array.
        """
        import numpy as np

        values = self._merged_params(params)
        pvals = [np.asarray(values[p], dtype=np.float64) if not isinstance(values[p], float) else values[p]
                 for p in self.params]
        return self._numpy_rhs(float(t), np.asarray(x, dtype=np.float64), pvals)

    def initial_conditions(self, dtype: torch.dtype = torch.float64, device: Any = None) -> torch.Tensor:
        """Default initial conditions as a (n_initial, D) tensor."""
        return torch.tensor(self.y0, dtype=dtype, device=device)

    def __repr__(self) -> str:
        eqs = "; ".join(f"d{v}/dt = {r}" for v, r in zip(self.variables, self.rhs))
        return f"System({self.name!r}: {eqs})"
