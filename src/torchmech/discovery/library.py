"""Feature libraries for sparse regression: polynomial, Fourier, custom, sums and products."""

from __future__ import annotations

import itertools
import string
from typing import Callable, Sequence

import sympy
import torch

__all__ = [
    "Library",
    "PolynomialLibrary",
    "FourierLibrary",
    "CustomLibrary",
    "ConcatLibrary",
    "TensorLibrary",
]


def default_variable_names(n: int) -> list[str]:
    """``x, y, z`` for up to three variables, else ``x0, x1, ...``."""
    return ["x", "y", "z"][:n] if n <= 3 else [f"x{i}" for i in range(n)]


def _check_x(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (..., T, D), got {type(x).__name__}")
    if x.ndim < 1:
        raise ValueError(f"{name}: expected shape (..., D), got a 0-d tensor")
    if x.shape[-1] == 0:
        raise ValueError(f"{name}: expected shape (..., D) with D >= 1 variables, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")


class Library:
    """Base class: a fixed list of features of the D state variables, evaluated point-wise.

    Subclasses implement ``n_features(D)``, ``_transform(x)``, ``_names(variable_names)`` and
    ``_sympy(symbols)``. Libraries hold hyper-parameters only; any D works at any call.
    """

    def n_features(self, n_variables: int) -> int:
        """Number of features F for D = ``n_variables`` state variables."""
        raise NotImplementedError

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluate the features.

        Args:
            x: (..., D) states (typically (..., T, D)).

        Returns:
            Theta of shape (..., F), same dtype and device as ``x``.
        """
        _check_x(x)
        return self._transform(x)

    __call__ = transform

    def feature_names(self, variable_names: Sequence[str] | None = None, n_variables: int | None = None) -> list[str]:
        """Readable feature names such as ``"1"``, ``"x*y"``, ``"z^2"``, ``"sin(x)"``.

        ``variable_names`` gives the D variable names; if omitted, ``n_variables`` must be given
        and the names default to ``x, y, z`` (D <= 3) or ``x0, x1, ...``.
        """
        names = self._variable_names(variable_names, n_variables)
        return self._names(names)

    def sympy_features(self, variable_names: Sequence[str] | None = None, n_variables: int | None = None) -> list[sympy.Expr]:
        """The features as sympy expressions in ``sympy.Symbol(name)`` for each variable name."""
        names = self._variable_names(variable_names, n_variables)
        return self._sympy([sympy.Symbol(n) for n in names])

    @staticmethod
    def _variable_names(variable_names, n_variables) -> list[str]:
        if variable_names is None:
            if n_variables is None:
                raise ValueError("variable_names: expected a list of names or n_variables, got neither")
            return default_variable_names(int(n_variables))
        if isinstance(variable_names, str) or not all(isinstance(v, str) for v in variable_names):
            raise TypeError(f"variable_names: expected a sequence of str, got {variable_names!r}")
        names = list(variable_names)
        if n_variables is not None and len(names) != n_variables:
            raise ValueError(f"variable_names: expected {n_variables} names, got {len(names)}")
        if len(set(names)) != len(names):
            raise ValueError(f"variable_names: expected distinct names, got {names}")
        for n in names:
            try:
                float(n)
            except ValueError:
                continue
            # a variable named "1" or "0" would print x' = 2.0 1 as "x' = 2.0", read as a constant
            raise ValueError(f"variable_names: {n!r} reads as a number, which the printed equations would confuse "
                             f"with constants; name the variables (e.g. x0, x1), got {names}")
        return names

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _names(self, names: list[str]) -> list[str]:
        raise NotImplementedError

    def _sympy(self, symbols: list[sympy.Symbol]) -> list[sympy.Expr]:
        raise NotImplementedError

    def __add__(self, other: "Library") -> "ConcatLibrary":
        if not isinstance(other, Library):
            return NotImplemented
        return ConcatLibrary([self, other])

    def __mul__(self, other: "Library") -> "TensorLibrary":
        if not isinstance(other, Library):
            return NotImplemented
        return TensorLibrary(self, other)


class PolynomialLibrary(Library):
    """All monomials of the D variables up to total degree ``degree``.

    Args:
        degree: maximal total degree (>= 1).
        include_interaction: if False, only pure powers ``x_i^k`` (no products of variables).
        include_bias: include the constant feature ``"1"``.

    Order: by degree, then lexicographically (``1, x, y, x^2, x*y, y^2, ...``).
    """

    def __init__(self, degree: int = 2, include_interaction: bool = True, include_bias: bool = True):
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise ValueError(f"degree: expected an int >= 1, got {degree!r}")
        self.degree = degree
        self.include_interaction = bool(include_interaction)
        self.include_bias = bool(include_bias)

    def powers(self, n_variables: int) -> list[tuple[int, ...]]:
        """Exponent tuples (length D) of the features, in order."""
        out = []
        start = 0 if self.include_bias else 1
        for k in range(start, self.degree + 1):
            for combo in itertools.combinations_with_replacement(range(n_variables), k):
                if not self.include_interaction and len(set(combo)) > 1:
                    continue
                p = [0] * n_variables
                for i in combo:
                    p[i] += 1
                out.append(tuple(p))
        return out

    def n_features(self, n_variables: int) -> int:
        return len(self.powers(n_variables))

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        D = x.shape[-1]
        pw = self.powers(D)
        # power table: (..., D, degree+1) with x^0 = 1
        table = [torch.ones_like(x), x]
        for _ in range(2, self.degree + 1):
            table.append(table[-1] * x)
        cols = []
        for p in pw:
            term = None
            for i, e in enumerate(p):
                if e:
                    v = table[e][..., i]
                    term = v if term is None else term * v
            cols.append(torch.ones_like(x[..., 0]) if term is None else term)
        return torch.stack(cols, dim=-1)

    def _names(self, names: list[str]) -> list[str]:
        out = []
        for p in self.powers(len(names)):
            parts = [n if e == 1 else f"{n}^{e}" for n, e in zip(names, p) if e]
            out.append("*".join(parts) if parts else "1")
        return out

    def _sympy(self, symbols):
        return [sympy.Mul(*[s**e for s, e in zip(symbols, p)]) for p in self.powers(len(symbols))]

    def __repr__(self) -> str:
        return (
            f"PolynomialLibrary(degree={self.degree}, include_interaction={self.include_interaction}, "
            f"include_bias={self.include_bias})"
        )


class FourierLibrary(Library):
    """``sin(k x_i)`` and ``cos(k x_i)`` for k = 1..n_frequencies and every variable.

    Order: for each k, for each variable, sin then cos.
    """

    def __init__(self, n_frequencies: int = 1, include_sin: bool = True, include_cos: bool = True):
        if isinstance(n_frequencies, bool) or not isinstance(n_frequencies, int) or n_frequencies < 1:
            raise ValueError(f"n_frequencies: expected an int >= 1, got {n_frequencies!r}")
        if not (include_sin or include_cos):
            raise ValueError("include_sin/include_cos: expected at least one of them True, got both False")
        self.n_frequencies = n_frequencies
        self.include_sin = bool(include_sin)
        self.include_cos = bool(include_cos)

    def _items(self, n_variables: int):
        for k in range(1, self.n_frequencies + 1):
            for i in range(n_variables):
                if self.include_sin:
                    yield "sin", k, i
                if self.include_cos:
                    yield "cos", k, i

    def n_features(self, n_variables: int) -> int:
        return sum(1 for _ in self._items(n_variables))

    def _transform(self, x):
        cols = []
        for fn, k, i in self._items(x.shape[-1]):
            arg = x[..., i] if k == 1 else k * x[..., i]
            cols.append(torch.sin(arg) if fn == "sin" else torch.cos(arg))
        return torch.stack(cols, dim=-1)

    def _names(self, names):
        return [f"{fn}({names[i]})" if k == 1 else f"{fn}({k}*{names[i]})" for fn, k, i in self._items(len(names))]

    def _sympy(self, symbols):
        f = {"sin": sympy.sin, "cos": sympy.cos}
        return [f[fn](k * symbols[i]) for fn, k, i in self._items(len(symbols))]

    def __repr__(self) -> str:
        return f"FourierLibrary(n_frequencies={self.n_frequencies}, include_sin={self.include_sin}, include_cos={self.include_cos})"


def _arity(fn: Callable) -> int:
    import inspect

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return 1
    params = [
        p for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return max(1, len(params))


class CustomLibrary(Library):
    """User functions applied to every variable (or every combination of variables).

    Args:
        functions: element-wise torch callables. A function of k arguments is applied to every
            combination of k distinct variables (``itertools.combinations`` order).
        names: one per function: a format string with ``{}`` / ``{0}``, ``{1}``... placeholders for
            the variable names (e.g. ``"exp({})"``, ``"{0}/{1}"``), or a callable taking the
            variable names and returning the feature name.
        sympy_functions: optional, one per function: callables mapping sympy symbols to the sympy
            form of the feature. If omitted, the formatted name is parsed as a sympy expression
            (``^`` read as a power); a name that does not parse becomes an undefined sympy
            function of the variables.

    Example: ``CustomLibrary([torch.exp, lambda a, b: a / b], ["exp({})", "{0}/{1}"])``.
    """

    def __init__(
        self,
        functions: Sequence[Callable],
        names: Sequence[str | Callable],
        sympy_functions: Sequence[Callable] | None = None,
    ):
        functions = list(functions)
        names = list(names)
        if not functions:
            raise ValueError("functions: expected at least one callable, got none")
        if not all(callable(f) for f in functions):
            raise TypeError("functions: expected callables")
        if len(names) != len(functions):
            raise ValueError(f"names: expected one name per function ({len(functions)}), got {len(names)}")
        for n in names:
            if not (isinstance(n, str) or callable(n)):
                raise TypeError(f"names: expected format strings or callables, got {type(n).__name__}")
        if sympy_functions is not None:
            sympy_functions = list(sympy_functions)
            if len(sympy_functions) != len(functions):
                raise ValueError(
                    f"sympy_functions: expected one per function ({len(functions)}), got {len(sympy_functions)}"
                )
        self.functions = functions
        self.names = names
        self.sympy_functions = sympy_functions
        self._arities = [_arity(f) for f in functions]

    def _items(self, n_variables: int):
        for j, k in enumerate(self._arities):
            for combo in itertools.combinations(range(n_variables), k):
                yield j, combo

    def n_features(self, n_variables: int) -> int:
        return sum(1 for _ in self._items(n_variables))

    def _transform(self, x):
        cols = []
        for j, combo in self._items(x.shape[-1]):
            v = self.functions[j](*[x[..., i] for i in combo])
            if not isinstance(v, torch.Tensor):
                v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
            cols.append(torch.broadcast_to(v, x.shape[:-1]))
        if not cols:
            return x.new_zeros(x.shape[:-1] + (0,))
        return torch.stack(cols, dim=-1)

    def _format(self, j: int, args: list[str]) -> str:
        n = self.names[j]
        if callable(n):
            return str(n(*args))
        return n.format(*args)

    def _names(self, names):
        return [self._format(j, [names[i] for i in combo]) for j, combo in self._items(len(names))]

    def _sympy(self, symbols):
        from sympy.parsing.sympy_parser import parse_expr

        out = []
        local = {s.name: s for s in symbols}
        for j, combo in self._items(len(symbols)):
            args = [symbols[i] for i in combo]
            if self.sympy_functions is not None:
                out.append(sympy.sympify(self.sympy_functions[j](*args)))
                continue
            text = self._format(j, [a.name for a in args])
            try:
                expr = parse_expr(text.replace("^", "**"), local_dict=local)
                if not isinstance(expr, sympy.Expr) or not expr.free_symbols <= set(args):
                    raise ValueError(text)
            except Exception:
                fname = "".join(c if c in string.ascii_letters + string.digits + "_" else "_" for c in text)
                expr = sympy.Function(fname)(*args)
            out.append(expr)
        return out

    def __repr__(self) -> str:
        return f"CustomLibrary(names={[n if isinstance(n, str) else n.__name__ for n in self.names]})"


class ConcatLibrary(Library):
    """Features of several libraries side by side (``lib1 + lib2``)."""

    def __init__(self, libraries: Sequence[Library]):
        libs = []
        for lib in libraries:
            if not isinstance(lib, Library):
                raise TypeError(f"libraries: expected Library instances, got {type(lib).__name__}")
            libs.extend(lib.libraries if isinstance(lib, ConcatLibrary) else [lib])
        if not libs:
            raise ValueError("libraries: expected at least one library, got none")
        self.libraries = libs

    def n_features(self, n_variables):
        return sum(lib.n_features(n_variables) for lib in self.libraries)

    def _transform(self, x):
        return torch.cat([lib._transform(x) for lib in self.libraries], dim=-1)

    def _names(self, names):
        return [n for lib in self.libraries for n in lib._names(names)]

    def _sympy(self, symbols):
        return [e for lib in self.libraries for e in lib._sympy(symbols)]

    def __repr__(self) -> str:
        return " + ".join(repr(lib) for lib in self.libraries)


class TensorLibrary(Library):
    """Products of every feature of ``left`` with every feature of ``right`` (``left * right``).

    Order: left-major. A product with a constant ``"1"`` feature keeps the other name.
    """

    def __init__(self, left: Library, right: Library):
        if not isinstance(left, Library) or not isinstance(right, Library):
            raise TypeError("left/right: expected Library instances")
        self.left = left
        self.right = right

    def n_features(self, n_variables):
        return self.left.n_features(n_variables) * self.right.n_features(n_variables)

    def _transform(self, x):
        a = self.left._transform(x)
        b = self.right._transform(x)
        return (a[..., :, None] * b[..., None, :]).flatten(-2)

    def _names(self, names):
        out = []
        for a in self.left._names(names):
            for b in self.right._names(names):
                out.append(b if a == "1" else a if b == "1" else f"{a}*{b}")
        return out

    def _sympy(self, symbols):
        return [a * b for a in self.left._sympy(symbols) for b in self.right._sympy(symbols)]

    def __repr__(self) -> str:
        return f"({self.left!r}) * ({self.right!r})"
