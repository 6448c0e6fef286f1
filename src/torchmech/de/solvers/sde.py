"""SDE solvers: Euler-Maruyama, Milstein, stochastic Heun and midpoint, Euler-Heun, SRA1, SRI2, Reversible Heun.

Every solver here works on ``MultiTerm(ODETerm(drift), ControlTerm(diffusion, brownian))``:
``dy = f(t, y) dt + g(t, y) dW``. Noise types are expressed by the diffusion term:

- general: ``ControlTerm(g, bm)`` with ``g(t, y, args)`` of shape (B, *state, m), ``bm`` of shape (B, m);
- scalar: the general case with ``m = 1``;
- additive: general (or diagonal) with ``g`` independent of ``y``;
- diagonal: ``DiagonalControlTerm(g, bm)`` with ``g`` and ``bm`` both of shape (B, *state).

Each solver has ``sde_type`` ("ito", "stratonovich", or "any" where both coincide, as for
additive noise) saying which calculus it converges to. They are fixed-step (``ConstantStep`` or
``StepTo``) except ``StochasticHeun``, ``StochasticMidpoint`` and ``EulerHeun`` with ``adaptive=True``, which carry
an error estimate for ``PIDController``; the dense output between steps is linear.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from torchmech.de.solvers.rk import AbstractSolver, StepResult
from torchmech.de.terms import ControlTerm, DiagonalControlTerm, MultiTerm, ODETerm

__all__ = [
    "AbstractSDESolver", "EulerMaruyama", "Milstein", "StochasticHeun", "StochasticMidpoint", "EulerHeun", "SRA1",
    "SRI2", "ReversibleHeun", "SDE_METHODS", "sde_solver_by_name",
]


def sde_terms(terms: Any, solver: str) -> tuple[ODETerm, ControlTerm]:
    """Split ``MultiTerm(ODETerm(f), ControlTerm(g, bm))`` into (drift, diffusion) or raise TypeError."""
    if (isinstance(terms, MultiTerm) and len(terms.terms) == 2 and isinstance(terms.terms[0], ODETerm)
            and isinstance(terms.terms[1], ControlTerm)):
        return terms.terms[0], terms.terms[1]
    got = type(terms).__name__
    if isinstance(terms, MultiTerm):
        got += "(" + ", ".join(type(t).__name__ for t in terms.terms) + ")"
    raise TypeError(f"{solver}: terms must be MultiTerm(ODETerm(drift), ControlTerm(diffusion, brownian)) "
                    f"(or DiagonalControlTerm for diagonal noise), got {got}")


class AbstractSDESolver(AbstractSolver):
    """Base of the SDE solvers: fixed step, no error estimate, linear dense output.

    Attributes:
        sde_type: "ito", "stratonovich" or "any".
        strong_order, weak_order: convergence orders for the noise types the solver supports
            (general multidimensional noise may be lower: see each solver).
    """

    sde_type: str = "ito"
    strong_order: float = 0.5
    weak_order: float = 1.0
    error_order = None
    order = 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EulerMaruyama(AbstractSDESolver):
    """Euler-Maruyama, ``y1 = y0 + f h + g dW`` (Ito). Strong order 0.5 (1.0 for additive noise),
    weak order 1. Any noise type. One drift and one diffusion evaluation per step."""

    sde_type = "ito"
    strong_order = 0.5
    weak_order = 1.0

    def step(self, terms, t0, t1, y0, args, vf0, dense=True) -> StepResult:
        sde_terms(terms, "EulerMaruyama")
        control = terms.contr(t0, t1)
        y1 = y0 + terms.prod(vf0, control)
        vf1 = terms.vf(t1, y1, args)
        return StepResult(y1, None, vf1, (y1 - y0,), 1)


class Milstein(AbstractSDESolver):
    """Milstein's method for diagonal, scalar or additive noise, Ito or Stratonovich. Strong order 1, weak order 1.

    ``y1 = y0 + f h + g dW + 1/2 (dg/dy) g (dW^2 - h)`` (Ito) or ``... + 1/2 (dg/dy) g dW^2``
    (Stratonovich). Diagonal noise (:class:`~torchmech.de.terms.DiagonalControlTerm`): elementwise,
    ``(dg/dy) g`` a vector-Jacobian product of ``g`` with itself (exact there, ``g_i`` depending on
    ``y_i`` only). Scalar noise (``ControlTerm`` with one channel): ``(dg/dy) g`` is a
    Jacobian-vector product (two vector-Jacobian products). Additive noise (a ``ControlTerm`` whose
    ``g`` does not depend on ``y``, any number of channels): the correction vanishes (Euler-Maruyama).
    A ``y``-dependent diffusion with several channels needs the Levy areas and raises. One drift and
    one diffusion evaluation (with its derivative product) per step.

    Args:
        sde_type: "ito" (default) or "stratonovich".
    """

    strong_order = 1.0
    weak_order = 1.0

    def __init__(self, sde_type: str = "ito"):
        if sde_type not in ("ito", "stratonovich"):
            raise ValueError(f"Milstein: sde_type must be 'ito' or 'stratonovich', got {sde_type!r}")
        self.sde_type = sde_type

    def __repr__(self) -> str:
        return f"Milstein(sde_type={self.sde_type!r})"

    @staticmethod
    def init_vf(y0: Tensor, vf0: Any) -> _DriftOnly:
        """The cached vector field keeps the drift only: each step evaluates ``g`` itself, with its
        derivative (called by the solve loop)."""
        return _DriftOnly((vf0[0],))

    def step(self, terms, t0, t1, y0, args, vf0, dense=True) -> StepResult:
        drift, diff = sde_terms(terms, "Milstein")
        diagonal = isinstance(diff, DiagonalControlTerm)
        h, dW = terms.contr(t0, t1)
        f0 = vf0[0]
        grad = torch.is_grad_enabled()
        with torch.enable_grad():
            yy = y0 if y0.requires_grad else y0.detach().requires_grad_(True)
            g = diff.vf(t0, yy, args)
            # keep a graph only if the solve needs one: y0 carries one, or g depends on a trainable tensor. (With
            # create_graph on the helper leaf yy alone, every later step, and the whole path, kept a graph.)
            create = grad and g.requires_grad and (y0.requires_grad or _depends_on_leaves_other_than(g, yy))
            if diagonal:
                # g built without y (a constant, additive noise) has no graph at all: its derivative is zero
                gdg = torch.autograd.grad(g, yy, grad_outputs=g, create_graph=create,
                                          allow_unused=True)[0] if g.requires_grad else None
            else:
                gdg = _scalar_noise_gdg(g, yy, create)
        if not create:
            g = g.detach()  # the graph was only for gdg
        y1 = y0 + drift.prod(f0, h) + diff.prod(g, dW)
        if gdg is not None:  # (None: g independent of y, no correction)
            corr = dW * dW
            if self.sde_type == "ito":
                corr = corr - h.reshape(h.shape + (1,) * (dW.dim() - 1))
            if not diagonal:  # scalar noise: dW (B, 1) over the state (B, *state)
                corr = corr.reshape(corr.shape[:1] + (1,) * (y0.dim() - 1))
            y1 = y1 + 0.5 * gdg * corr
        vf1 = _DriftOnly((drift.vf(t1, y1, args),))
        return StepResult(y1, None, vf1, (y1 - y0,), 2)


def column_jvp(g: Tensor, y: Tensor, k: int, create: bool) -> Tensor | None:
    """``(dg_k/dy) g_k`` for the diffusion's column ``g_k = g[..., k]`` (y's shape), by the double-vjp trick
    (``J v = d/du <v, J^T u>``); None when ``g_k`` does not depend on ``y``. ``create``: keep a graph of the result.
    (Milstein's scalar-noise correction, and the Ito -> Stratonovich drift correction of the stochastic adjoint.)"""
    gk = g[..., k]
    if not gk.requires_grad:
        return None
    u = torch.zeros_like(gk, requires_grad=True)
    (w,) = torch.autograd.grad(gk, y, grad_outputs=u, create_graph=True, allow_unused=True)
    if w is None:
        return None
    (jv,) = torch.autograd.grad(w, u, grad_outputs=gk if create else gk.detach(), create_graph=create,
                                allow_unused=True)
    return jv


def _scalar_noise_gdg(g: Tensor, y: Tensor, create: bool) -> Tensor | None:
    """``(dg/dy) g`` for a ``ControlTerm`` diffusion ``g`` (B, *state, m) with one channel; None when ``g`` does
    not depend on ``y`` (additive noise, any ``m``)."""
    if not g.requires_grad:
        return None
    if g.shape[-1] != 1:
        (dep,) = torch.autograd.grad(g, y, grad_outputs=torch.ones_like(g), retain_graph=True, allow_unused=True)
        if dep is None:
            return None
        raise ValueError(f"Milstein: the diffusion depends on y and has {g.shape[-1]} noise channels: its correction "
                         "needs the Brownian motion's Levy areas, which Milstein does not use. Use diagonal noise "
                         "(DiagonalControlTerm), one channel, or another solver (EulerMaruyama, StochasticHeun)")
    return column_jvp(g, y, 0, create)


def _depends_on_leaves_other_than(out: Tensor, leaf: Tensor) -> bool:
    """Whether ``out``'s autograd graph reaches a leaf that requires grad other than ``leaf``."""
    nodes, seen = [out.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None:
            if var is not leaf:
                return True
            continue
        nodes.extend(nxt for nxt, _ in node.next_functions)
    return False


class _DriftOnly(tuple):
    """``(f(t, y),)``: Milstein's cached vector field (it evaluates the diffusion inside each step)."""

    __slots__ = ()


def _check_adaptive(adaptive: Any, name: str) -> float | None:
    if not isinstance(adaptive, bool):
        raise TypeError(f"{name}: adaptive must be a bool, got {type(adaptive).__name__}")
    return 1.0 if adaptive else None


class StochasticHeun(AbstractSDESolver):
    """Heun's method (explicit trapezoid on drift and diffusion), converging to the Stratonovich
    solution. Strong order 1 for commutative (e.g. diagonal, scalar, additive) noise, 0.5 in
    general; weak order 1. Two evaluations per step.

    Args:
        adaptive: if True, also return an error estimate (embedded pair with the Euler
            predictor: ``err = y1 - (y0 + k0) = (k_p - k0) / 2``, of size ``O(h)`` for
            multiplicative noise, ``O(h^1.5)`` for additive noise) so that the solver can be used
            with :class:`~torchmech.de.controllers.PIDController` (``error_order = 1``). A
            rejected step is retried over a shorter interval from the same point; the Brownian
            motion answers that query consistently (``BrownianInterval`` by its Brownian
            bridge, ``VirtualBrownianTree`` from its tree), so every sample stays on its one
            path. Save times inside a step get the linear interpolant: pass the save times as
            ``PIDController(step_ts=...)`` to land on them. Default False (fixed steps).
    """

    sde_type = "stratonovich"
    strong_order = 1.0
    weak_order = 1.0

    def __init__(self, adaptive: bool = False):
        self.error_order = _check_adaptive(adaptive, "StochasticHeun")

    def __repr__(self) -> str:
        return "StochasticHeun(adaptive=True)" if self.adaptive else "StochasticHeun()"

    def step(self, terms, t0, t1, y0, args, vf0, dense=True) -> StepResult:
        sde_terms(terms, "StochasticHeun")
        control = terms.contr(t0, t1)
        k0 = terms.prod(vf0, control)
        vf_p = terms.vf(t1, y0 + k0, args)
        k1 = terms.prod(vf_p, control)
        y1 = y0 + 0.5 * (k0 + k1)
        vf1 = terms.vf(t1, y1, args)
        err = 0.5 * (k1 - k0) if self.error_order is not None else None
        return StepResult(y1, err, vf1, (y1 - y0,), 2)


class StochasticMidpoint(AbstractSDESolver):
    """The explicit midpoint method on drift and diffusion, converging to the Stratonovich solution
    (torchsde's ``midpoint``).

    ``y_m = y0 + (f0 h + g0 dW) / 2``, ``y1 = y0 + f(t0 + h/2, y_m) h + g(t0 + h/2, y_m) dW``
    (the same ``dW`` over the whole step in both stages). Strong order 1 for commutative (e.g.
    diagonal, scalar, additive) noise, 0.5 in general; weak order 1. Two evaluations of drift
    and diffusion per step.

    Args:
        adaptive: if True, return the error estimate ``y1 - (y0 + f0 h + g0 dW)`` against
            Euler-Maruyama for :class:`~torchmech.de.controllers.PIDController`
            (``error_order = 1``; see :class:`StochasticHeun`). Default False.
    """

    sde_type = "stratonovich"
    strong_order = 1.0
    weak_order = 1.0

    def __init__(self, adaptive: bool = False):
        self.error_order = _check_adaptive(adaptive, "StochasticMidpoint")

    def __repr__(self) -> str:
        return "StochasticMidpoint(adaptive=True)" if self.adaptive else "StochasticMidpoint()"

    def step(self, terms, t0, t1, y0, args, vf0, dense=True) -> StepResult:
        sde_terms(terms, "StochasticMidpoint")
        control = terms.contr(t0, t1)
        k0 = terms.prod(vf0, control)
        vf_m = terms.vf(t0 + 0.5 * (t1 - t0), y0 + 0.5 * k0, args)
        k1 = terms.prod(vf_m, control)
        y1 = y0 + k1
        vf1 = terms.vf(t1, y1, args)
        err = k1 - k0 if self.error_order is not None else None
        return StepResult(y1, err, vf1, (y1 - y0,), 2)


class EulerHeun(AbstractSDESolver):
    """Euler-Heun: Euler on the drift, Heun on the diffusion (Stratonovich).

    ``y' = y0 + g0 dW``, ``y1 = y0 + f0 h + (g0 + g(t1, y')) dW / 2``. Strong order 0.5 in
    general, 1 for commutative noise. One drift and two diffusion evaluations per step.

    Args:
        adaptive: if True, return the error estimate ``(g(t1, y') - g0) dW / 2`` against
            Euler-Maruyama for :class:`~torchmech.de.controllers.PIDController`
            (``error_order = 1``; see :class:`StochasticHeun`). Default False.
    """

    sde_type = "stratonovich"
    strong_order = 0.5
    weak_order = 1.0

    def __init__(self, adaptive: bool = False):
        self.error_order = _check_adaptive(adaptive, "EulerHeun")

    def __repr__(self) -> str:
        return "EulerHeun(adaptive=True)" if self.adaptive else "EulerHeun()"

    def step(self, terms, t0, t1, y0, args, vf0, dense=True) -> StepResult:
        drift, diff = sde_terms(terms, "EulerHeun")
        h, dW = terms.contr(t0, t1)
        f0, g0 = vf0
        gdW = diff.prod(g0, dW)
        g_p = diff.vf(t1, y0 + gdW, args)
        gdW_p = diff.prod(g_p, dW)
        y1 = y0 + drift.prod(f0, h) + 0.5 * (gdW + gdW_p)
        vf1 = terms.vf(t1, y1, args)
        err = 0.5 * (gdW_p - gdW) if self.error_order is not None else None
        return StepResult(y1, err, vf1, (y1 - y0,), 2)


def _increment_with_levy_area(terms, diff: ControlTerm, t0: Tensor, t1: Tensor, solver: str) -> tuple[Tensor, Tensor]:
    """The step's Brownian increment ``W`` and space-time Levy area ``H`` (handed in by the fixed-step loop, or
    queried), for the stochastic Runge-Kutta methods."""
    bm = diff.control
    if not getattr(bm, "has_levy_area", False):
        raise ValueError(f"{solver}: the Brownian motion must provide the space-time Levy area; build it with "
                         "levy_area='space-time'")
    inc = getattr(terms, "brownian_increment", None)
    return inc if inc is not None else bm.evaluate(t0, t1, levy_area=True)


class SRA1(AbstractSDESolver):
    """Rossler's SRA1 stochastic Runge-Kutta method for additive noise (strong order 1.5, weak 2).

    Uses the space-time Levy area ``H`` of the Brownian motion (build it with
    ``levy_area="space-time"``): with ``I10/h = dW/2 + H``,

    ``H2 = y0 + 3/4 f(t0, y0) h + 3/2 g(t1) I10/h``,
    ``y1 = y0 + (f(t0, y0)/3 + 2 f(t0 + 3h/4, H2)/3) h + g(t1) (dW - I10/h) + g(t0) I10/h``.

    The diffusion must not depend on ``y`` (additive noise); it may depend on ``t``.
    Ito and Stratonovich coincide for additive noise (``sde_type = "any"``). Two drift and one
    diffusion evaluation per step.
    """

    sde_type = "any"
    strong_order = 1.5
    weak_order = 2.0
    uses_levy_area = True  # the fixed-step loop hands the step its increment with the Levy area

    @staticmethod
    def check_terms(terms, t0: Tensor, y0: Tensor, args: Any) -> None:
        """Raise if the diffusion depends on y (called once per solve): SRA1's formula assumes it does not,
        and on multiplicative noise it silently converged to neither the Ito nor the Stratonovich solution."""
        _, diff = sde_terms(terms, "SRA1")
        with torch.enable_grad():
            yy = y0.detach().requires_grad_(True)
            g = diff.vf(t0, yy, args)
            # (a tuple: a continuous adjoint's backward terms, checked on the forward terms instead)
            if not isinstance(g, Tensor) or not g.requires_grad:
                return
            # a fixed, uneven cotangent: sums of partial derivatives cannot cancel by symmetry
            w = torch.linspace(1.0, 2.0, g.numel(), dtype=g.dtype, device=g.device).reshape(g.shape)
            (dg,) = torch.autograd.grad(g, yy, grad_outputs=w, allow_unused=True)
        if dg is not None and bool((dg != 0).any()):
            raise ValueError("SRA1: the diffusion g depends on y, but SRA1 is for additive noise (g(t) only); for "
                             "y-dependent noise use EulerMaruyama or Milstein (Ito), or StochasticHeun, "
                             "StochasticMidpoint or ReversibleHeun (Stratonovich)")

    def step(self, terms, t0, t1, y0, args, vf0, dense=True) -> StepResult:
        drift, diff = sde_terms(terms, "SRA1")
        h = t1 - t0
        W, H = _increment_with_levy_area(terms, diff, t0, t1, "SRA1")
        i10 = 0.5 * W + H  # I10 / h
        f0, g0 = vf0
        # additive noise: g(t1, .) is the same at y0 and y1, so it is also the next step's g0
        g1 = diff.vf(t1, y0, args)
        H2 = y0 + drift.prod(f0, 0.75 * h) + 1.5 * diff.prod(g1, i10)
        f2 = drift.vf(t0 + 0.75 * h, H2, args)
        y1 = (y0 + drift.prod(f0 / 3.0 + (2.0 / 3.0) * f2, h) + diff.prod(g1, W - i10) + diff.prod(g0, i10))
        vf1 = (drift.vf(t1, y1, args), g1)
        return StepResult(y1, None, vf1, (y1 - y0,), 3)


# Rossler (2010)'s SRI2 tableau for Ito SDEs with scalar or diagonal noise (stages 0..3): stage times c0 (drift)
# and c1 (diffusion), stage matrices A0, B0 (the H0 stages, drift arguments) and A1, B1 (the H1 stages, diffusion
# arguments), and the weights of f (alpha) and of g against dW, I_11 / sqrt(h), I_10 / h and I_111 / h (beta1-4).
_SRI2 = dict(
    c0=(0.0, 1.0, 0.5, 0.0), c1=(0.0, 0.25, 1.0, 0.25),
    A0=((), (1.0,), (0.25, 0.25), (0.0, 0.0, 0.0)), A1=((), (0.25,), (1.0, 0.0), (0.0, 0.0, 0.25)),
    B0=((), (0.0,), (1.0, 0.5), (0.0, 0.0, 0.0)), B1=((), (-0.5,), (1.0, 0.0), (2.0, -1.0, 0.5)),
    alpha=(1 / 6, 1 / 6, 2 / 3, 0.0), beta1=(-1.0, 4 / 3, 2 / 3, 0.0), beta2=(1.0, -4 / 3, 1 / 3, 0.0),
    beta3=(2.0, -4 / 3, -2 / 3, 0.0), beta4=(-2.0, 5 / 3, -2 / 3, 1.0),
)


class SRI2(AbstractSDESolver):
    """Rossler's SRI2 stochastic Runge-Kutta method for Ito SDEs with diagonal or scalar noise (strong order 1.5).

    Uses the increment ``dW`` and the space-time Levy area ``H`` of the Brownian motion (build it with
    ``levy_area="space-time"``), from which ``I10 / h = dW/2 + H``, ``I11 = (dW^2 - h)/2`` and
    ``I111 = (dW^3 - 3 h dW)/6``. Diagonal noise (``DiagonalControlTerm``): componentwise; scalar noise
    (``ControlTerm`` with one channel) as written. Three drift and four diffusion evaluations per step (the
    first stage reuses the previous step's). torchsde's ``"srk"`` for these noise types.
    """

    sde_type = "ito"
    strong_order = 1.5
    weak_order = 2.0
    uses_levy_area = True

    @staticmethod
    def check_terms(terms, t0: Tensor, y0: Tensor, args: Any) -> None:
        """Raise unless the noise is diagonal or scalar (called once per solve)."""
        _, diff = sde_terms(terms, "SRI2")
        if isinstance(diff, DiagonalControlTerm) or not isinstance(diff, ControlTerm):
            return
        g = diff.vf(t0, y0, args)
        if isinstance(g, Tensor) and g.shape[-1] != 1:
            raise ValueError(f"SRI2: diagonal (DiagonalControlTerm) or scalar noise (one channel) only; the diffusion "
                             f"has {g.shape[-1]} channels. For additive noise use SRA1; for general noise "
                             "EulerMaruyama or a Stratonovich solver")

    def step(self, terms, t0, t1, y0, args, vf0, dense=True) -> StepResult:
        drift, diff = sde_terms(terms, "SRI2")
        h = t1 - t0
        W, H = _increment_with_levy_area(terms, diff, t0, t1, "SRI2")
        hw = h.reshape(h.shape + (1,) * (W.dim() - 1))  # h against the increments (B, m)
        # samples that have finished step with h = 0 (and W = 0): their weights must be 0, not 0/0, and no sqrt(0)
        # may enter the graph (its derivative is infinite): NaN masked out of the values would still reach the
        # gradients (also those with respect to the times) as 0 * NaN or 0 * inf
        live = hw != 0
        hw_safe = torch.where(live, hw, torch.ones_like(hw))
        sq_safe = hw_safe.sqrt().expand_as(W)
        sq = torch.where(live, sq_safe, torch.zeros_like(sq_safe))
        i10 = 0.5 * W + H  # I10 / h
        i11 = 0.5 * (W * W - hw)
        i111 = (W * W * W - 3 * hw * W) / 6.0
        T = _SRI2
        f0, g0 = vf0
        fs, gs = [f0], [g0]
        y1 = y0 + drift.prod(f0, T["alpha"][0] * h)
        for k in range(4):
            if k > 0:
                H0, H1 = y0, y0
                for j in range(k):
                    if T["A0"][k][j] or T["B0"][k][j]:
                        H0 = H0 + drift.prod(fs[j], T["A0"][k][j] * h) + diff.prod(gs[j], T["B0"][k][j] * i10)
                    if T["A1"][k][j] or T["B1"][k][j]:
                        H1 = H1 + drift.prod(fs[j], T["A1"][k][j] * h) + diff.prod(gs[j], T["B1"][k][j] * sq)
                if T["alpha"][k]:
                    fs.append(drift.vf(t0 + T["c0"][k] * h, H0, args))
                    y1 = y1 + drift.prod(fs[k], T["alpha"][k] * h)
                else:
                    fs.append(None)  # (the last stage's drift has weight 0 and feeds no later stage)
                gs.append(diff.vf(t0 + T["c1"][k] * h, H1, args))
            weight = (T["beta1"][k] * W + T["beta2"][k] * i11 / sq_safe + T["beta3"][k] * i10
                      + T["beta4"][k] * i111 / hw_safe)
            y1 = y1 + diff.prod(gs[k], weight)
        vf1 = (drift.vf(t1, y1, args), diff.vf(t1, y1, args))
        return StepResult(y1, None, vf1, (y1 - y0,), 7)


class _RevState(tuple):
    """(vector field at (t, y_hat), y_hat): Reversible Heun's extra state, carried in the vf slot."""

    __slots__ = ()


class ReversibleHeun(AbstractSDESolver):
    """Reversible Heun (Kidger et al., 2021), Stratonovich; algebraically reversible.

    Carries ``(y, y_hat)``; with ``y_hat_0 = y_0`` and ``v(t, z) = f(t, z) dt + g(t, z) dW``:
    ``y_hat_{n+1} = 2 y_n - y_hat_n + v(t_n, y_hat_n)``,
    ``y_{n+1} = y_n + (v(t_n, y_hat_n) + v(t_{n+1}, y_hat_{n+1})) / 2``.
    The step can be inverted exactly (up to round-off), which
    :class:`~torchmech.de.reversible_adjoint.ReversibleAdjoint` uses for O(1)-memory exact
    gradients. Strong order 0.5 in general (1 for additive noise), weak order 1; one evaluation
    of drift and diffusion per step. Also a second-order method for ODEs (``ODETerm``).
    """

    sde_type = "stratonovich"
    strong_order = 0.5
    weak_order = 1.0

    @staticmethod
    def init_vf(y0: Tensor, vf0: Any) -> _RevState:
        """Initial extra state: ``y_hat_0 = y_0`` with its vector field (called by the solve loop)."""
        return _RevState((vf0, y0))

    @staticmethod
    def split_state(y0: Tensor, vf0: Any) -> tuple[Any, Tensor]:
        """(vector field at y_hat, y_hat) from the loop's cached ``vf0``."""
        if isinstance(vf0, _RevState):
            return vf0[0], vf0[1]
        return vf0, y0

    def forward_step(self, terms, t0, t1, y0, z0, vz0, args, control):
        """One step from ``(y0, y_hat0)`` with ``vz0 = vf(t0, y_hat0)``; returns (y1, z1, vz1)."""
        k0 = terms.prod(vz0, control)
        z1 = 2 * y0 - z0 + k0
        vz1 = terms.vf(t1, z1, args)
        y1 = y0 + 0.5 * (k0 + terms.prod(vz1, control))
        return y1, z1, vz1

    def backward_step(self, terms, t0, t1, y1, z1, vz1, args, control):
        """Exact inverse of :meth:`forward_step`: from (y1, y_hat1, vf1) to (y0, y_hat0, vf0)."""
        k1 = terms.prod(vz1, control)
        z0 = 2 * y1 - z1 - k1
        vz0 = terms.vf(t0, z0, args)
        y0 = y1 - 0.5 * (terms.prod(vz0, control) + k1)
        return y0, z0, vz0

    def step(self, terms, t0, t1, y0, args, vf0, dense=True) -> StepResult:
        vz0, z0 = self.split_state(y0, vf0)
        control = terms.contr(t0, t1)
        y1, z1, vz1 = self.forward_step(terms, t0, t1, y0, z0, vz0, args, control)
        return StepResult(y1, None, _RevState((vz1, z1)), (y1 - y0,), 1)


# The method names of torchsde, shared by torchmech.sdeint and torchmech.nn.NeuralSDE.
SDE_METHODS = {"euler": EulerMaruyama, "milstein": Milstein, "srk": SRA1, "midpoint": StochasticMidpoint,
               "euler_heun": EulerHeun, "heun": StochasticHeun, "reversible_heun": ReversibleHeun}


def sde_solver_by_name(name: str, sde_type: str = "ito", noise_type: str | None = None) -> AbstractSDESolver:
    """A new solver for a torchsde method name. ``sde_type`` picks Milstein's calculus; ``noise_type`` picks what
    "srk" means, as in torchsde: SRI2 for "diagonal" and "scalar" noise, SRA1 otherwise (additive noise)."""
    if name == "srk" and noise_type in ("diagonal", "scalar"):
        return SRI2()
    cls = SDE_METHODS[name]
    return cls(sde_type) if cls is Milstein else cls()
