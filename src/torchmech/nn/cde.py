"""NeuralCDE: a neural controlled differential equation from (irregular, partial) time series to predictions."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from torchmech.de.cde import cdeint
from torchmech.de.interpolation import (
    AbstractInterpolation,
    CubicHermiteInterpolation,
    LinearInterpolation,
    NaturalCubicSpline,
    RectilinearInterpolation,
    observational_intensity,
)
from torchmech.nn._common import ODE_SOLVERS, check_like_module, mlp, positive_float, positive_int

__all__ = ["NeuralCDE"]

_INTERPOLATIONS = {
    "cubic": NaturalCubicSpline, "natural_cubic": NaturalCubicSpline, "hermite": CubicHermiteInterpolation,
    "linear": LinearInterpolation, "rectilinear": RectilinearInterpolation,
}


class _CDEFunc(nn.Module):
    """``func(t, z) -> (B, hidden, channels)``: an MLP of ``z`` ending in tanh (keeps the CDE well behaved)."""

    def __init__(self, hidden: int, channels: int, width: int, depth: int, act: Any):
        super().__init__()
        self.hidden, self.channels = hidden, channels
        self.net = mlp(hidden, hidden * channels, width, depth, act, "NeuralCDE", final=nn.Tanh())

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return self.net(z).reshape(z.shape[0], self.hidden, self.channels)


class NeuralCDE(nn.Module):
    """Neural CDE ``dz = f_theta(z) dX(t)``: reads a time series through its interpolated path ``X``.

    ``forward(x)`` fills the missing values (NaN) of ``x`` and interpolates it into a path ``X``
    (:mod:`torchmech.de.interpolation`), starts from ``z0 = Linear(X(t_0))`` (the first, NaN-filled,
    observation), solves the CDE with :func:`torchmech.cdeint` and applies a linear readout to the
    final hidden state (or to every hidden state with ``return_sequences``).

    For irregularly sampled series, put the observation time in as a channel (e.g. channel 0) and
    mark missing values with NaN; series of a batch may then have different observation times, and
    the path is parametrised by the observation index (``t`` defaults to ``0..T-1``). With
    ``intensity=True`` the cumulative count of observations per channel is appended as extra
    channels, so the model can also use *where* values were missing.

    Args:
        input_channels: channels ``C`` of ``x`` (time channel included).
        hidden: size of the hidden state ``z``.
        output: size of the prediction (e.g. the number of classes, for logits).
        width, depth, activation: width, hidden layers and activation of the MLP ``f_theta``
            (``f_theta`` ends with tanh and returns a (hidden, channels) matrix). The default
            softplus is smooth, which keeps ``adjoint=True`` gradients accurate (a ReLU's kinks
            cost the continuous adjoint about three digits).
        interpolation: "cubic" (natural cubic spline, default), "hermite" (cubic Hermite with
            backward differences: causal between knots when every value is observed; missing values
            are filled by linear interpolation, which looks ahead to the next observation), "linear",
            or "rectilinear" (causal, also with missing values; for online use; it adds the time ``t``
            (default ``0..T-1``) as a first channel).
        intensity: append observational-intensity channels (``input_channels`` stays the raw count).
        return_sequences: readout at every observation time, output (B, T, output).
        method: "rk4" (default), "euler", "midpoint", "heun", "ralston" (fixed step) or "dopri5",
            "tsit5", "bosh3", "dopri8" (adaptive, with the knots as jump times).
        step_size: step of fixed-step methods (default: the smallest knot spacing).
        rtol, atol: tolerances of adaptive methods.
        adjoint: gradients by the continuous adjoint (O(1) memory in the number of steps) instead
            of backpropagating through the solver (default False: faster for short series).

    Shapes: ``x`` (B, T, input_channels), NaN for missing values (every channel of every series
    needs at least one observation); ``t`` (T,) optional, strictly increasing; output (B, output),
    or (B, T, output) with ``return_sequences``.

    Example::

        # x: (B, T, 3) = [time, x, y] with NaNs where values are missing
        model = NeuralCDE(input_channels=3, hidden=16, output=2)
        logits = model(x)                       # (B, 2)
        loss = torch.nn.functional.cross_entropy(logits, labels)
    """

    def __init__(self, input_channels: int, hidden: int, output: int, *, width: int = 64, depth: int = 2,
                 activation: Any = "softplus", interpolation: str = "cubic", intensity: bool = False,
                 return_sequences: bool = False, method: str = "rk4", step_size: float | None = None,
                 rtol: float = 1e-4, atol: float = 1e-6, adjoint: bool = False, max_steps: int = 100000):
        super().__init__()
        name = "NeuralCDE"
        self.input_channels = positive_int(input_channels, "input_channels", name)
        self.hidden = positive_int(hidden, "hidden", name)
        self.output = positive_int(output, "output", name)
        positive_int(width, "width", name)
        positive_int(depth, "depth", name, minimum=0)
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"NeuralCDE: interpolation must be one of {sorted(_INTERPOLATIONS)}, got {interpolation!r}")
        self.interpolation = interpolation
        self.intensity = bool(intensity)
        self.return_sequences = bool(return_sequences)
        if not isinstance(method, str) or method.lower() not in ODE_SOLVERS:
            raise ValueError(f"NeuralCDE: method must be one of {sorted(ODE_SOLVERS)}, got {method!r}")
        self.method = method.lower()
        self.step_size = positive_float(step_size, "step_size", name, allow_none=True)
        if not (isinstance(rtol, (int, float)) and rtol > 0 and isinstance(atol, (int, float)) and atol >= 0):
            raise ValueError(f"NeuralCDE: need rtol > 0 and atol >= 0, got rtol={rtol!r}, atol={atol!r}")
        self.rtol, self.atol = float(rtol), float(atol)
        if not isinstance(adjoint, bool):
            raise TypeError(f"NeuralCDE: adjoint must be a bool (True: the continuous adjoint), got {adjoint!r}")
        self.adjoint = adjoint
        self.max_steps = positive_int(max_steps, "max_steps", name)
        channels = self.input_channels * (2 if self.intensity else 1) + (1 if interpolation == "rectilinear" else 0)
        self.path_channels = channels
        self.initial = nn.Linear(channels, hidden)
        self.func = _CDEFunc(hidden, channels, width, depth, activation)
        self.readout = nn.Linear(hidden, output)

    def interpolate(self, x: Tensor, t: Any = None) -> AbstractInterpolation:
        """The control path of ``x`` (B, T, input_channels) (NaN = missing) at times ``t`` (T,)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"NeuralCDE: x must be a tensor of shape (batch, T, {self.input_channels}) or an "
                            f"interpolation, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.input_channels or x.shape[0] == 0:
            raise ValueError(f"NeuralCDE: x must have shape (batch, T, input_channels={self.input_channels}) with "
                             f"batch >= 1, got {tuple(x.shape)}")
        if x.shape[1] < 2:
            raise ValueError(f"NeuralCDE: x needs at least 2 time points (T >= 2), got T={x.shape[1]}")
        if x.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"NeuralCDE: x must be float32 or float64, got {x.dtype}")
        check_like_module(x, "x", "NeuralCDE", self)
        if t is not None:
            t = torch.as_tensor(t, dtype=x.dtype, device=x.device) if not isinstance(t, Tensor) else t
            if t.dim() != 1 or t.shape[0] != x.shape[1]:
                raise ValueError(f"NeuralCDE: t must have shape (T,) = ({x.shape[1]},) matching x's time axis, "
                                 f"got {tuple(t.shape)}")
            if not bool(torch.isfinite(t).all()) or not bool((t.diff() > 0).all()):
                raise ValueError(f"NeuralCDE: t must be finite and strictly increasing, got {t.tolist()[:10]}"
                                 + (" ..." if t.shape[0] > 10 else ""))
        if self.intensity:
            x = torch.cat([x, observational_intensity(x)], dim=-1)
        return _INTERPOLATIONS[self.interpolation](t, x)

    def forward(self, x: Tensor | AbstractInterpolation, t: Any = None) -> Tensor:
        """Predictions (B, output) (or (B, T, output) with ``return_sequences``) for series ``x``.

        ``x`` is (B, T, input_channels) with NaN for missing values, or a path already built by
        :meth:`interpolate` (then ``t`` is not used).
        """
        if isinstance(x, AbstractInterpolation):
            X = x
            if X.a.dim() != 3 or X.channels != self.path_channels:
                raise ValueError(f"NeuralCDE: the interpolation must hold (batch, T, {self.path_channels}) data, "
                                 f"got coefficients of shape {tuple(X.a.shape)}")
            check_like_module(X.a, "the interpolation's data", "NeuralCDE", self)
        else:
            X = self.interpolate(x, t)
        knots = X.grid_points
        z0 = self.initial(X.evaluate(knots[0]))
        times = knots if self.return_sequences else knots[[0, -1]]
        options = {"step_size": self.step_size} if self.step_size is not None and self.method in (
            "euler", "midpoint", "heun", "ralston", "rk4") else None
        zs = cdeint(X, self.func, z0, times, adjoint=self.adjoint, method=self.method, rtol=self.rtol,
                    atol=self.atol, options=options, max_steps=self.max_steps)
        if not self.return_sequences:
            return self.readout(zs[:, -1])
        if isinstance(X, RectilinearInterpolation):  # built here or passed in: the same virtual time
            zs = zs[:, ::2]  # virtual time 2k is observation k
        return self.readout(zs)

    def extra_repr(self) -> str:
        return (f"input_channels={self.input_channels}, hidden={self.hidden}, output={self.output}, "
                f"interpolation={self.interpolation!r}, intensity={self.intensity}, method={self.method!r}, "
                f"adjoint={self.adjoint}, return_sequences={self.return_sequences}")
