"""Terms of a differential equation: vector fields paired with controls (dt, paths, Brownian motion)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from torchmech.de._tree import bcast

__all__ = ["AbstractTerm", "ODETerm", "ControlTerm", "DiagonalControlTerm", "MultiTerm"]


def _module_of(f) -> torch.nn.Module | None:
    """The module whose parameters the vector field ``f`` uses: ``f`` itself, or the owner of a bound method."""
    if isinstance(f, torch.nn.Module):
        return f
    owner = getattr(f, "__self__", None)
    return owner if isinstance(owner, torch.nn.Module) else None


class AbstractTerm:
    """One term ``f(t, y, args) dX(t)`` of a differential equation ``dy = sum_terms f dX``.

    A solver only ever asks a term three things:

    - ``vf(t, y, args)``: the vector field at per-sample times ``t`` (B,) and state ``y`` (B, ...);
    - ``contr(t0, t1)``: the control increment over ``[t0, t1]`` (per-sample ``(B,)`` tensors);
    - ``prod(vf, control)``: combine the two into a state increment of shape ``y.shape``.

    ``vf_prod(t, y, args, control) = prod(vf(t, y, args), control)``.
    """

    def vf(self, t: Tensor, y: Tensor, args: Any) -> Any:
        """Vector field at per-sample times ``t`` (B,) and state ``y`` (B, ...)."""
        raise NotImplementedError

    def contr(self, t0: Tensor, t1: Tensor) -> Any:
        """Control increment over per-sample intervals ``[t0, t1]`` ((B,) each)."""
        raise NotImplementedError

    def prod(self, vf: Any, control: Any) -> Tensor:
        """Combine a vector field and a control increment into a state increment (B, ...)."""
        raise NotImplementedError

    def vf_prod(self, t: Tensor, y: Tensor, args: Any, control: Any) -> Tensor:
        """Increment ``prod(vf(t, y, args), control)``, shape ``y.shape``."""
        return self.prod(self.vf(t, y, args), control)

    def modules(self) -> list[torch.nn.Module]:
        """``nn.Module`` vector fields held by this term (used to collect adjoint parameters); a bound
        method of a module counts as that module."""
        return []

    def fields(self) -> list:
        """The vector-field callables of this term."""
        return []


class ODETerm(AbstractTerm):
    """The term ``f(t, y, args) dt`` of an ODE ``dy/dt = f(t, y, args)``.

    Args:
        f: callable ``f(t, y, args) -> dy/dt`` with ``t`` of shape (B,) (one time per sample),
            ``y`` of shape (B, ...) and a return value of shape (B, ...) (same as ``y``).
    """

    def __init__(self, f: Callable[[Tensor, Tensor, Any], Tensor]):
        if not callable(f):
            raise TypeError(f"ODETerm: f must be callable f(t, y, args), got {type(f).__name__}")
        self.f = f

    def vf(self, t: Tensor, y: Tensor, args: Any) -> Tensor:
        """Vector field ``f(t, y, args)``, shape (B, ...)."""
        return self.f(t, y, args)

    def contr(self, t0: Tensor, t1: Tensor) -> Tensor:
        """Time increment ``t1 - t0``, shape (B,)."""
        return t1 - t0

    def prod(self, vf: Tensor, control: Tensor) -> Tensor:
        """``vf * dt`` with ``dt`` (B,) broadcast over the state axes."""
        return vf * bcast(control, vf)

    def modules(self) -> list[torch.nn.Module]:
        m = _module_of(self.f)
        return [] if m is None else [m]

    def fields(self) -> list:
        return [self.f]


class ControlTerm(AbstractTerm):
    """The term ``f(t, y, args) dX(t)`` driven by a control path ``X`` with ``channels`` channels.

    Args:
        f: callable ``f(t, y, args)`` returning a matrix per sample, shape (B, *state, channels).
        control: object with ``evaluate(t0, t1) -> Tensor`` giving the increment
            ``X(t1) - X(t0)`` of shape (B, channels) for per-sample times ``t0, t1`` of shape (B,).
            Brownian motion and interpolated data paths plug in here. A callable
            ``control(t0, t1)`` is accepted as well.

    ``prod`` is the batched matrix-vector product ``sum_c f[b, ..., c] * dX[b, c]``.
    Within one step every Runge-Kutta stage uses the increment over the whole step, which is
    exact for controls that are linear inside each step (e.g. a linearly interpolated path with
    the data times in ``jump_ts``/``step_ts``).
    """

    def __init__(self, f: Callable[[Tensor, Tensor, Any], Tensor], control: Any):
        if not callable(f):
            raise TypeError(f"ControlTerm: f must be callable f(t, y, args), got {type(f).__name__}")
        if not (hasattr(control, "evaluate") or callable(control)):
            raise TypeError(
                "ControlTerm: control must have evaluate(t0, t1) or be callable, "
                f"got {type(control).__name__}"
            )
        self.f = f
        self.control = control

    def vf(self, t: Tensor, y: Tensor, args: Any) -> Tensor:
        """Matrix-valued vector field, shape (B, *state, channels)."""
        return self.f(t, y, args)

    def contr(self, t0: Tensor, t1: Tensor) -> Tensor:
        """Control increment ``X(t1) - X(t0)``, shape (B, channels)."""
        if hasattr(self.control, "evaluate"):
            return self.control.evaluate(t0, t1)
        return self.control(t0, t1)

    def prod(self, vf: Tensor, control: Tensor) -> Tensor:
        """Batched matvec: (B, *state, C) x (B, C) -> (B, *state)."""
        if control.dim() != 2 or vf.dim() < 2 or control.shape[-1] != vf.shape[-1]:
            raise ValueError(
                "ControlTerm: the vector field must return (B, *state, channels) and the control increment have "
                f"shape (B, channels) with the same channels; got a vector field of shape {tuple(vf.shape)} and a "
                f"control increment of shape {tuple(control.shape)}"
            )
        c = control.reshape(control.shape[:1] + (1,) * (vf.dim() - 2) + control.shape[1:])
        return (vf * c).sum(-1)

    def modules(self) -> list[torch.nn.Module]:
        m = _module_of(self.f)
        return [] if m is None else [m]

    def fields(self) -> list:
        return [self.f]


class DiagonalControlTerm(ControlTerm):
    """The term ``g(t, y, args) * dX(t)`` with an elementwise product (diagonal noise).

    Args:
        f: callable ``f(t, y, args)`` returning the diagonal of the matrix per sample, shape
            (B, *state), the same shape as ``y``.
        control: as :class:`ControlTerm`, with increments of shape (B, *state).
    """

    def prod(self, vf: Tensor, control: Tensor) -> Tensor:
        """Elementwise product ``vf * dX``, both (B, *state)."""
        if control.shape != vf.shape:
            raise ValueError(
                f"DiagonalControlTerm: diagonal noise needs g(t, y) and the control increment (Brownian motion) in "
                f"the state's shape; got g(t, y) of shape {tuple(vf.shape)} and an increment of shape "
                f"{tuple(control.shape)} (a (batch, state, channels) g is general noise: ControlTerm)"
            )
        return vf * control


class MultiTerm(AbstractTerm):
    """Sum of terms, e.g. drift ``ODETerm`` plus diffusion ``ControlTerm``.

    ``vf`` and ``contr`` return tuples (one entry per term); ``prod`` sums the increments.
    """

    def __init__(self, *terms: AbstractTerm):
        if len(terms) == 0:
            raise ValueError("MultiTerm: expected at least one term, got 0")
        for i, term in enumerate(terms):
            if not isinstance(term, AbstractTerm):
                raise TypeError(f"MultiTerm: terms[{i}] must be an AbstractTerm, got {type(term).__name__}")
        self.terms = tuple(terms)

    def vf(self, t: Tensor, y: Tensor, args: Any) -> tuple:
        """Tuple of the terms' vector fields at per-sample ``t`` (B,) and ``y`` (B, ...)."""
        return tuple(term.vf(t, y, args) for term in self.terms)

    def contr(self, t0: Tensor, t1: Tensor) -> tuple:
        """Tuple of the terms' control increments over per-sample ``[t0, t1]`` (B,)."""
        return tuple(term.contr(t0, t1) for term in self.terms)

    def prod(self, vf: tuple, control: tuple) -> Tensor:
        """Sum of the terms' increments, shape (B, ...)."""
        out = None
        for i, (term, v, c) in enumerate(zip(self.terms, vf, control)):
            inc = term.prod(v, c)
            if out is not None and inc.shape != out.shape:
                raise ValueError(
                    f"MultiTerm: term {i} ({type(term).__name__}) gives an increment of shape {tuple(inc.shape)}, the "
                    f"terms before it {tuple(out.shape)}: check its vector field's shape (a ControlTerm's must be "
                    "(batch, *state, channels), a DiagonalControlTerm's the state's)")
            out = inc if out is None else out + inc
        return out

    def modules(self) -> list[torch.nn.Module]:
        return [m for term in self.terms for m in term.modules()]

    def fields(self) -> list:
        return [f for term in self.terms for f in term.fields()]
