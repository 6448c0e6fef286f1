"""Translate sympy expressions into batched torch functions (a small tree compiler)."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import sympy
import torch

__all__ = ["compile_expression", "parse"]


def _cot(a):
    return 1.0 / torch.tan(a)


def _sec(a):
    return 1.0 / torch.cos(a)


def _csc(a):
    return 1.0 / torch.sin(a)


# sympy function class -> torch callable (element-wise)
_FUNCTIONS: dict[type, Callable] = {
    sympy.sin: torch.sin,
    sympy.cos: torch.cos,
    sympy.tan: torch.tan,
    sympy.cot: _cot,
    sympy.sec: _sec,
    sympy.csc: _csc,
    sympy.asin: torch.asin,
    sympy.acos: torch.acos,
    sympy.atan: torch.atan,
    sympy.sinh: torch.sinh,
    sympy.cosh: torch.cosh,
    sympy.tanh: torch.tanh,
    sympy.exp: torch.exp,
    sympy.log: torch.log,
    sympy.Abs: torch.abs,
    sympy.sign: torch.sign,
    sympy.erf: torch.erf,
    sympy.floor: torch.floor,
    sympy.ceiling: torch.ceil,
}


def parse(text: str, symbols: Mapping[str, sympy.Symbol]) -> sympy.Expr:
    """Parse ``text`` (``^`` allowed for powers) with the given names bound to ``symbols``.

    Names such as ``beta``, ``gamma``, ``S``, ``I`` or ``E`` are taken from ``symbols`` and
    never from sympy's own namespace.
    """
    from sympy.parsing.sympy_parser import parse_expr

    return parse_expr(text.replace("^", "**"), local_dict=dict(symbols), evaluate=True)


def _compile(expr: sympy.Expr, index: Mapping[sympy.Symbol, int]) -> Callable:
    """Return a closure ``g(args)`` evaluating ``expr`` where ``args[i]`` is the value of symbol i."""
    if expr.is_Symbol:
        if expr not in index:
            raise ValueError(f"expression has a free symbol {expr!s} with no value bound to it")
        i = index[expr]
        return lambda args: args[i]
    if expr.is_Number or expr.is_NumberSymbol:
        value = float(expr)
        return lambda args: value
    if expr.is_Add:
        parts = [_compile(a, index) for a in expr.args]

        def add(args):
            out = parts[0](args)
            for p in parts[1:]:
                out = out + p(args)
            return out

        return add
    if expr.is_Mul:
        parts = [_compile(a, index) for a in expr.args]

        def mul(args):
            out = parts[0](args)
            for p in parts[1:]:
                out = out * p(args)
            return out

        return mul
    if expr.is_Pow:
        base, exponent = expr.args
        b = _compile(base, index)
        if exponent.is_Integer:
            n = int(exponent)
            if n == -1:
                return lambda args: 1.0 / b(args)
            if n < 0:
                return lambda args: 1.0 / b(args) ** (-n)
            return lambda args: b(args) ** n
        if exponent == sympy.Rational(1, 2):
            return lambda args: torch.sqrt(_as_tensor(b(args), args))
        if exponent == sympy.Rational(-1, 2):
            return lambda args: torch.rsqrt(_as_tensor(b(args), args))
        e = _compile(exponent, index)
        return lambda args: _as_tensor(b(args), args) ** e(args)
    if isinstance(expr, sympy.Function) and type(expr) in _FUNCTIONS:
        fn = _FUNCTIONS[type(expr)]
        parts = [_compile(a, index) for a in expr.args]
        return lambda args: fn(*[_as_tensor(p(args), args) for p in parts])
    raise ValueError(f"cannot translate {expr!s} (type {type(expr).__name__}) into torch operations")


def _as_tensor(value, args):
    """Turn a python number into a tensor like the first tensor argument (for torch functions)."""
    if isinstance(value, torch.Tensor):
        return value
    for a in args:
        if isinstance(a, torch.Tensor):
            return torch.as_tensor(value, dtype=a.dtype, device=a.device)
    return torch.as_tensor(value, dtype=torch.float64)


def compile_expression(expr: sympy.Expr, symbols: Sequence[sympy.Symbol]) -> Callable:
    """Compile ``expr`` into ``g(*values)``, values bound positionally to ``symbols``.

    Values may be tensors of any broadcastable shapes or python floats; the result broadcasts
    them (it may be a python float when ``expr`` is constant).
    """
    index = {s: i for i, s in enumerate(symbols)}
    body = _compile(sympy.sympify(expr), index)

    def g(*values):
        return body(values)

    return g
